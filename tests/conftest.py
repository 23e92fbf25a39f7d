"""Shared test fixtures."""

import os

import pytest
import torch

# Triton's CPU interpreter runs the triton scan backend's kernels in tests/test_scan_triton.py on a
# machine without a GPU. Triton reads this when it is first imported (by anything in the process),
# so it is set here, before any test module is imported; GPU machines run the compiled kernels.
if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"


@pytest.fixture(autouse=True)
def reset_ignite_distributed_state():
    """A workflow that initialised and destroyed a process group in this process (the bundles'
    multi_gpu_train.json run in-process) leaves ignite's cached native computation model behind, and
    later metrics would try to all-gather through it. Real DDP runs exit after `finalize`; tests run
    many workflows in one process, so they reset ignite to its serial model after each test."""
    yield
    import torch.distributed as dist
    from ignite.distributed import utils as idist_utils

    if not (dist.is_available() and dist.is_initialized()):
        idist_utils._set_model(idist_utils._SerialModel())
