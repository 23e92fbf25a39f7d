"""Shared test fixtures."""

import pytest


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
