"""Crash-safe checkpoints for the bundles' training.

MONAI's ``CheckpointSaver`` is not crash safe: it builds ignite's ``DiskSaver`` with ``atomic=False``
(monai/handlers/checkpoint_saver.py) and, with a fixed ``key_metric_filename``, removes the previous
best file before writing the new one, so a kill at the wrong moment leaves no or a truncated
``model.pt``. The handlers here write every file as temp file + fsync + ``os.replace`` in the same folder:
a reader (or a restarted run) sees either the old or the new complete file, never a partial one.

* :class:`ResumableCheckpoint` (trainer handler): one fixed file holding model, optimizer, LR scheduler,
  trainer state (epoch/iteration) and the validator's best metric, written at the end of every
  ``save_interval`` epochs and at the end of training; loaded on ``STARTED`` when it exists, so that
  re-running the same command after an interruption (``kill -9`` included) continues from the last
  completed epoch with the same optimizer and scheduler state.
* :class:`BestModelSaver` (evaluator handler): writes the network's plain ``state_dict`` to
  ``models/model.pt`` whenever the evaluator's key metric improved.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from typing import Any, Dict, Mapping, Optional

import torch
import torch.distributed as dist
from ignite.engine import Engine, Events

__all__ = ["atomic_torch_save", "ResumableCheckpoint", "BestModelSaver"]

logger = logging.getLogger(__name__)


def atomic_torch_save(obj: Any, path: str) -> None:
    """``torch.save`` to a temp file in the destination folder, fsync, then ``os.replace`` onto ``path``."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(tmp, 0o666 & ~mask)  # mkstemp creates 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    with contextlib.suppress(OSError):  # persist the rename itself (best effort, POSIX only)
        dir_fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def _unwrap(obj: Any) -> Any:
    return obj.module if isinstance(obj, (torch.nn.DataParallel, torch.nn.parallel.DistributedDataParallel)) else obj


def _is_main_process() -> bool:
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


class ResumableCheckpoint:
    """Save / resume a training run through one fixed, atomically written file.

    Args:
        save_path: checkpoint file, e.g. ``models/checkpoint.pt``.
        save_dict: objects with ``state_dict``/``load_state_dict`` (network, optimizer, lr_scheduler, ...);
            DataParallel/DDP wrappers are unwrapped. The trainer's own state is added as ``"trainer"``.
        evaluator: optional validation engine whose ``best_metric`` / ``best_metric_epoch`` are saved and
            restored, so that a resumed run does not overwrite a better ``model.pt``.
        save_interval: save after every this many epochs (and always when training completes).
        resume: load ``save_path`` at ``STARTED`` when it exists.
        map_location: passed to ``torch.load`` (default ``"cpu"``; ``load_state_dict`` moves tensors).
        tag: identifies the run (e.g. ``"fold 0"``); a checkpoint saved with another tag is not resumed
            but reported (so that training fold 1 never continues fold 0's weights).

    In a distributed run every rank loads, only rank 0 saves; the checkpoint holds the unwrapped module's
    weights, so it resumes with any number of processes (one included). After loading, the ranks check that
    they all resumed from the same epoch (a checkpoint on storage only some nodes see would otherwise let
    the ranks continue from different weights and optimizer states).
    """

    def __init__(self, save_path: str, save_dict: Mapping[str, Any], evaluator: Optional[Engine] = None,
                 save_interval: int = 1, resume: bool = True, map_location: Any = "cpu", tag: Any = None) -> None:
        if not save_dict:
            raise ValueError("save_dict must name at least one object")
        self.save_path = os.fspath(save_path)
        self.save_dict = dict(save_dict)
        self.evaluator = evaluator
        self.save_interval = int(save_interval)
        self.resume = str(resume).strip().lower() not in ("false", "0", "no", "off", "none", "")
        self.map_location = map_location
        self.tag = None if tag is None else str(tag)
        self.loaded_epoch: Optional[int] = None

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self.load)
        engine.add_event_handler(Events.EPOCH_COMPLETED(every=self.save_interval), self.save)
        engine.add_event_handler(Events.COMPLETED, self.save)

    def state(self, engine: Engine) -> Dict[str, Any]:
        ckpt: Dict[str, Any] = {k: _unwrap(v).state_dict() for k, v in self.save_dict.items()}
        ckpt["trainer"] = dict(engine.state_dict())
        ckpt["tag"] = self.tag
        if self.evaluator is not None:
            ckpt["evaluator"] = {"best_metric": float(self.evaluator.state.best_metric),
                                 "best_metric_epoch": int(self.evaluator.state.best_metric_epoch)}
        return ckpt

    def save(self, engine: Engine) -> None:
        # EPOCH_COMPLETED of the last epoch and COMPLETED fire for the same state: write (and log) it once
        if getattr(self, "_saved_iteration", None) == engine.state.iteration:
            return
        self._saved_iteration = engine.state.iteration
        if _is_main_process():
            atomic_torch_save(self.state(engine), self.save_path)
            logger.info(f"saved resumable checkpoint {self.save_path} at epoch {engine.state.epoch}")

    def load(self, engine: Engine) -> None:
        if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return self._load(engine)
        error: Optional[BaseException] = None
        try:
            self._load(engine)
        except Exception as err:  # reported after the ranks compared notes, so that no rank waits forever
            error = err
        states: list = [None] * dist.get_world_size()
        dist.all_gather_object(states, "failed" if error is not None else self.loaded_epoch)
        if error is not None:
            raise error
        if len(set(states)) > 1:
            raise RuntimeError(f"the ranks resumed from different epochs of {self.save_path} (None: not resumed, "
                               f"failed: could not load): {states}; the checkpoint folder must be on storage that "
                               "every node sees")

    def _load(self, engine: Engine) -> None:
        if not self.resume or not os.path.isfile(self.save_path):
            return
        ckpt = torch.load(self.save_path, map_location=self.map_location, weights_only=True)
        if ckpt.get("tag") != self.tag:
            raise ValueError(f"checkpoint {self.save_path} belongs to run {ckpt.get('tag')!r}, not {self.tag!r}: "
                             "use another checkpoint folder (e.g. --ckpt_dir models/fold1) or delete it")
        missing = [k for k in list(self.save_dict) + ["trainer"] if k not in ckpt]
        if missing:
            raise ValueError(f"checkpoint {self.save_path} lacks {missing}; delete it to start afresh")
        for k, v in self.save_dict.items():
            _unwrap(v).load_state_dict(ckpt[k])
        max_epochs = engine.state.max_epochs  # a run parameter: keep the configured value
        engine.load_state_dict(ckpt["trainer"])
        if max_epochs is not None:
            engine.state.max_epochs = max_epochs
        if self.evaluator is not None and "evaluator" in ckpt:
            self.evaluator.state.best_metric = ckpt["evaluator"]["best_metric"]
            self.evaluator.state.best_metric_epoch = ckpt["evaluator"]["best_metric_epoch"]
        self.loaded_epoch = int(engine.state.epoch)
        logger.info(f"resumed from {self.save_path}: epoch {engine.state.epoch}, iteration {engine.state.iteration}")


class BestModelSaver:
    """Evaluator handler: atomically write ``network.state_dict()`` to ``save_path`` when the key metric improves.

    Relies on MONAI's ``Workflow`` bookkeeping (``state.best_metric_epoch`` is set to the current epoch when the
    key metric improves); attach it after the key metric (as a ``val_handlers`` entry).
    """

    def __init__(self, save_path: str, network: torch.nn.Module) -> None:
        self.save_path = os.fspath(save_path)
        self.network = network
        self._last_saved_epoch: Optional[int] = None

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        epoch = int(engine.state.epoch)
        if getattr(engine.state, "best_metric_epoch", -1) != epoch or self._last_saved_epoch == epoch:
            return
        self._last_saved_epoch = epoch
        if _is_main_process():
            atomic_torch_save(_unwrap(self.network).state_dict(), self.save_path)
            logger.info(f"saved best model {self.save_path} (key metric {engine.state.best_metric:.4f}, epoch {epoch})")
