"""Pieces of the bundles' ``configs/multi_gpu_train.json`` (DistributedDataParallel through ``torchrun``).

* :class:`DistributedRandomSampler`: the distributed form of the single-process training sampler
  (``RandomSampler`` with replacement, ``epoch_length * batch_size`` cases per epoch). Every rank draws
  ``num_samples`` cases per epoch, uniformly with replacement from the whole training set, as its slice
  of one stream that all ranks generate from the same seed and epoch: the ranks never need to exchange
  indices, their draws are independent of one another, and the run is reproducible for a given seed and
  number of processes. An epoch is therefore ``epoch_length`` iterations on every rank, i.e. ``world_size``
  times the cases of a single-process epoch (the trainer's epoch and iteration counters mean the same
  for any number of processes, so that a checkpoint resumes with another one).
* :func:`shared_seed`: one random seed, the same on every rank (drawn on rank 0 and broadcast).
* :func:`is_not_rank0`: the condition under which a logging or saving handler is disabled.
"""

from __future__ import annotations

import random
from typing import Optional, Sized

import torch
import torch.distributed as dist
from torch.utils.data import DistributedSampler

__all__ = ["DistributedRandomSampler", "shared_seed", "is_not_rank0", "world_size"]


def _initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if _initialized() else 1


def is_not_rank0() -> bool:
    """True in a distributed run on every rank but 0 (False without a process group)."""
    return _initialized() and dist.get_rank() > 0


def shared_seed(seed: Optional[int] = None) -> int:
    """``seed`` when given, else a random seed drawn on rank 0 and broadcast, so that all ranks agree."""
    if seed is not None:
        return int(seed)
    value = [random.SystemRandom().randrange(2**31)]  # OS entropy: leaves the seeded RNGs untouched
    if _initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(value, src=0)
    return int(value[0])


class DistributedRandomSampler(DistributedSampler):
    """Uniform sampling with replacement: ``num_samples`` indices per rank and epoch.

    Per epoch, the indices of all ranks together are ``num_samples * num_replicas`` draws from
    ``torch.randint`` with a generator seeded by ``seed + epoch``; rank ``r`` takes draws ``r``,
    ``r + num_replicas``, ... With one process it is a ``RandomSampler(replacement=True)``.
    ``set_epoch`` is called by MONAI's workflows at every epoch start (as for any ``DistributedSampler``).

    Args:
        dataset: the training dataset (every rank sees all of it).
        num_samples: indices per rank and epoch (``epoch_length * batch_size``).
        seed: shared base seed; None draws one on rank 0 and broadcasts it (needs the process group).
        num_replicas, rank: default from the process group (1 and 0 without one).
    """

    def __init__(self, dataset: Sized, num_samples: int, seed: Optional[int] = None,
                 num_replicas: Optional[int] = None, rank: Optional[int] = None) -> None:
        if num_replicas is None:
            num_replicas = world_size()
        if rank is None:
            rank = dist.get_rank() if _initialized() else 0
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True,  # type: ignore[arg-type]
                         seed=shared_seed(seed), drop_last=False)
        if len(dataset) < 1:
            raise ValueError("DistributedRandomSampler needs a non-empty dataset")
        self.num_samples = int(num_samples)
        self.total_size = self.num_samples * self.num_replicas

    def __iter__(self):
        g = torch.Generator()
        g.manual_seed(self.seed + self.epoch)
        draws = torch.randint(len(self.dataset), (self.total_size,), generator=g)  # type: ignore[arg-type]
        return iter(draws[self.rank :: self.num_replicas].tolist())

    def __len__(self) -> int:
        return self.num_samples
