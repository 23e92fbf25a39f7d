"""Helpers shared by several test modules."""

from __future__ import annotations

import pytest

# What pip / urllib print when there is no network: installs that fail this way skip instead of failing.
NETWORK_ISH = ("NewConnectionError", "Temporary failure in name resolution", "Network is unreachable",
               "Max retries exceeded", "ConnectTimeout", "Failed to establish a new connection")


def skip_if_offline(output: str, what: str) -> None:
    """pytest.skip("<what> (no network?): ...") when ``output`` shows that the network was unreachable."""
    if any(s in output for s in NETWORK_ISH):
        pytest.skip(f"{what} (no network?): {output[-600:]}")


def rel_err(got, want) -> float:
    """Max error relative to the largest reference value (float32 rounding shows as ~1e-7)."""
    return ((got.double() - want.double()).abs().max() / want.double().abs().max().clamp_min(1e-30)).item()
