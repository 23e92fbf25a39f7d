"""Selective-scan kernels and their dispatcher."""

from .selective_scan import BACKENDS, ENV_VAR, available_backends, last_backend, resolve_backend, selective_scan

__all__ = ["selective_scan", "available_backends", "resolve_backend", "last_backend", "BACKENDS", "ENV_VAR"]
