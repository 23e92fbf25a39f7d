"""Selective-scan kernels and their dispatcher, and the channel-first ops around them."""

from .selective_scan import (BACKENDS, ENV_VAR, available_backends, last_backend, mamba_scan, resolve_backend,
                             selective_scan)

__all__ = ["selective_scan", "mamba_scan", "available_backends", "resolve_backend", "last_backend", "BACKENDS",
           "ENV_VAR"]
