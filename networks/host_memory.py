"""Keep freed host memory for reuse: no page faults on every new large CPU tensor.

PyTorch's CPU allocator takes every tensor from ``malloc``. glibc serves an allocation above its mmap
threshold (at most 32 MiB) with a fresh ``mmap`` and gives it back with ``munmap`` when the tensor is
freed, so each new activation of a 3D network (226 MiB for 32 channels of a 48 x 192 x 192 patch; a
Mamba layer's ``in_proj`` output is four times that) is faulted in and zeroed by the kernel page by
page, on every layer of every sliding window. Measured on this project's 2-core CPU machine, that was a
third of a float32 window's time: a 128 x 32 matrix product over 1.77 M tokens took 0.53 s into a
fresh tensor and 0.24 s into a reused one, and a whole Synapse window of ResidualUNet 19.2 -> 13.1 s.

`keep_freed_memory` asks glibc (``mallopt``) to serve large blocks from its heap and to keep freed
blocks there (``M_MMAP_MAX = 0``; ``M_TRIM_THRESHOLD = -1``, never trimming the heap's top: with a 2 GiB
threshold, the 2-4 GiB freed at the end of each sliding window went back to the system and was faulted in
again by the next window, 0.5 M faults each): the next tensors reuse pages already mapped. That is what a
caching allocator does on a GPU, and what the jemalloc / tcmalloc ``LD_PRELOAD`` of Intel's PyTorch CPU
tuning guide does; this needs no preload, so a bundle config can turn it on (``keep_freed_memory``: true in
``inference.json`` and ``evaluate.json``, false in ``train.json``; applied by the workflow's ``initialize``).

The cost is memory. What the process frees stays resident until it ends, and its peak is higher: a block
freed in one place is not always the size asked for next, so the heap outgrows the live tensors (on the
project's real CT, a whole case's peak resident memory rose by 1-3 GiB; figures in the README's "Whole
volumes"), and a full-size Synapse training step of ResidualUNet that fits 24 GiB without it (17 GiB) ran
out of memory with it: training leaves it off. It applies to the whole process, is idempotent, and does
nothing (returning why) where the C library is not glibc (macOS, Windows, musl) or when
``NETWORKS_KEEP_FREED_MEMORY=0`` is set.
``keep_freed_memory(False)`` restores glibc's default thresholds and returns freed memory to the system.
"""

from __future__ import annotations

import ctypes
import logging
import os
import platform
import threading
from typing import Optional

from .flags import FALSE_WORDS, parse_flag

__all__ = ["keep_freed_memory", "kept", "ENV_KEEP"]

ENV_KEEP = "NETWORKS_KEEP_FREED_MEMORY"

# glibc's mallopt parameters (malloc.h) and its defaults
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
_DEFAULT_TRIM_THRESHOLD, _DEFAULT_MMAP_MAX = 128 * 1024, 65536
_KEEP_TRIM_THRESHOLD = -1  # never trim the heap top (mallopt(3): "-1 disables trimming completely")

logger = logging.getLogger("networks.host_memory")
_lock = threading.Lock()
_state = {"kept": False}


def _glibc() -> Optional[ctypes.CDLL]:
    """The process's C library when it is glibc (it has ``mallopt`` and ``malloc_trim``), else None."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL(None)
        libc.mallopt, libc.malloc_trim  # noqa: B018 (both must exist)
    except (OSError, AttributeError):
        return None
    return libc


def kept() -> bool:
    """Whether `keep_freed_memory` is in effect in this process."""
    return _state["kept"]


def keep_freed_memory(enable: bool = True) -> Optional[str]:
    """Keep (``enable=True``) or stop keeping freed large blocks for reuse; see the module docstring.

    ``enable`` may also be the text a command line gives (``"false"``, ``"True"``; `networks.flags.parse_flag`).

    Returns None when the setting took effect, else the reason it did not (logged once at INFO):
    not glibc, or turned off by ``NETWORKS_KEEP_FREED_MEMORY=0``. Safe to call any number of times.
    """
    enable = parse_flag(enable, "keep_freed_memory")
    if enable and os.environ.get(ENV_KEEP, "").strip().lower() in FALSE_WORDS:
        return _not_applied(f"turned off by {ENV_KEEP}={os.environ[ENV_KEEP]}")
    libc = _glibc()
    if libc is None:
        return _not_applied(f"the C library is not glibc ({platform.system()} {'/'.join(platform.libc_ver()) or '?'})")
    with _lock:
        if enable == _state["kept"]:
            return None
        trim, mmap_max = (_KEEP_TRIM_THRESHOLD, 0) if enable else (_DEFAULT_TRIM_THRESHOLD, _DEFAULT_MMAP_MAX)
        if libc.mallopt(_M_TRIM_THRESHOLD, trim) != 1 or libc.mallopt(_M_MMAP_MAX, mmap_max) != 1:
            return _not_applied("glibc refused mallopt(M_TRIM_THRESHOLD / M_MMAP_MAX)")
        if not enable:
            libc.malloc_trim(0)  # give back what was kept
        _state["kept"] = enable
    logger.debug("freed host memory is %s", "kept for reuse" if enable else "returned to the system")
    return None


_reported = set()


def _not_applied(reason: str) -> str:
    if reason not in _reported:
        _reported.add(reason)
        logger.info("freed host memory is not kept for reuse: %s", reason)
    return reason
