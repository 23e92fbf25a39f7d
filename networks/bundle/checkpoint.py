"""Crash-safe, verified checkpoints for the bundles' training.

MONAI's ``CheckpointSaver`` is not crash safe: it builds ignite's ``DiskSaver`` with ``atomic=False``
(monai/handlers/checkpoint_saver.py) and, with a fixed ``key_metric_filename``, removes the previous
best file before writing the new one, so a kill at the wrong moment leaves no or a truncated
``model.pt``. The handlers here write every file as temp file + fsync + ``os.replace`` in the same folder:
a reader (or a restarted run) sees either the old or the new complete file, never a partial one.

* :class:`ResumableCheckpoint` (trainer handler): one fixed file holding model, optimizer, LR scheduler,
  trainer state (epoch/iteration), the validator's best metric and a copy of the best model (so that a
  kill between writing ``model.pt`` and ``checkpoint.pt`` is repaired on resume), written at the end of
  every ``save_interval`` epochs and at the end of training; loaded on ``STARTED`` when it exists, so that
  re-running the same command after an interruption (``kill -9`` included) continues from the last
  completed epoch with the same optimizer and scheduler state.
* :class:`BestModelSaver` (evaluator handler): writes the network's plain ``state_dict`` to
  ``models/model.pt`` whenever the evaluator's key metric improved.

Every file carries a sha256 of its content, verified by :func:`load_verified` (a damaged, empty or
truncated file is refused with its path and the reason), and nothing is written from non-finite weights.
``model.pt`` stays a plain ``name -> tensor`` state dict (what MONAI's ``CheckpointLoader``, ``ckpt_export``
and MONAI Label load); its record (checksum, epoch, the network's constructor arguments and the
preprocessing settings it was trained with) rides in the state dict's ``_metadata`` under the reserved
key :data:`META_KEY`, which ``load_state_dict`` never looks at (it holds per-module versions by prefix).
"""

from __future__ import annotations

import atexit
import contextlib
import glob
import hashlib
import json
import logging
import os
import tempfile
from collections import OrderedDict
from typing import Any, Dict, Mapping, Optional

import torch
import torch.distributed as dist
from ignite.engine import Engine, Events

__all__ = ["META_KEY", "CheckpointError", "atomic_torch_save", "content_sha256", "first_nonfinite", "load_verified",
           "model_meta", "remove_stale_temp_files", "resumed_summary_writer", "ResumableCheckpoint", "BestModelSaver"]

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


META_KEY = "__bundle__"  # reserved key of a state dict's ``_metadata`` holding model.pt's record
FORMAT = 1


class CheckpointError(ValueError):
    """A checkpoint or weights file that cannot be used; the message names the file and the reason."""


def _feed(h: "hashlib._Hash", obj: Any) -> None:
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(obj, Mapping):
        h.update(b"{")
        for k in sorted(obj, key=str):
            h.update(repr(str(k)).encode())
            _feed(h, obj[k])
        h.update(b"}")
    elif isinstance(obj, (list, tuple)):
        h.update(b"[")
        for v in obj:
            _feed(h, v)
        h.update(b"]")
    else:
        h.update(repr(obj).encode())


def content_sha256(obj: Any) -> str:
    """sha256 of a nested structure of tensors, dicts, lists and scalars (tensor bytes, dtypes, shapes, keys).

    It hashes the loaded content, not the file, so it is the same for any zip layout ``torch.save`` picks, and it
    catches what ``torch.load`` does not check: flipped bytes inside the tensors' storage.
    """
    h = hashlib.sha256()
    _feed(h, obj)
    return h.hexdigest()


def first_nonfinite(obj: Any, prefix: str = "") -> Optional[str]:
    """The key path of the first floating-point tensor in ``obj`` holding NaN or Inf, or None."""
    if isinstance(obj, torch.Tensor):
        return (prefix or "<tensor>") if obj.is_floating_point() and not bool(torch.isfinite(obj).all()) else None
    items = obj.items() if isinstance(obj, Mapping) else enumerate(obj) if isinstance(obj, (list, tuple)) else ()
    for k, v in items:
        bad = first_nonfinite(v, f"{prefix}.{k}" if prefix else str(k))
        if bad is not None:
            return bad
    return None


def _refuse_nonfinite(obj: Any, what: str, path: str, epoch: Any) -> None:
    bad = first_nonfinite(obj)
    if bad is not None:
        raise FloatingPointError(f"not writing {path}: {what} {bad} holds NaN/Inf at epoch {epoch} (training diverged; "
                                 "the files on disk are the last finite ones)")


def remove_stale_temp_files(path: str) -> list:
    """Remove the temporary files that killed :func:`atomic_torch_save` calls for ``path`` left behind."""
    folder, name = os.path.split(os.path.abspath(path))
    removed = []
    for tmp in glob.glob(os.path.join(glob.escape(folder), f".{glob.escape(name)}.*.tmp")):
        with contextlib.suppress(OSError):
            os.remove(tmp)
            removed.append(tmp)
    if removed:
        logger.info(f"removed {len(removed)} stale temporary file(s) of {path} left by an interrupted write")
    return removed


def model_meta(state: Any) -> Optional[Dict[str, Any]]:
    """The record :class:`BestModelSaver` stored in a ``model.pt`` state dict, or None (a plain state dict)."""
    meta = getattr(state, "_metadata", None)
    rec = meta.get(META_KEY) if isinstance(meta, Mapping) else None
    return dict(rec) if isinstance(rec, Mapping) else None


def load_verified(path: str, map_location: Any = "cpu") -> Any:
    """``torch.load(weights_only=True)`` with errors that name the file, and the recorded checksum verified.

    Raises:
        FileNotFoundError: no file at ``path``.
        CheckpointError: empty, truncated or otherwise unreadable file, or content that does not match the
            sha256 recorded when it was written (a checkpoint's ``"sha256"``, a ``model.pt`` record's
            ``"sha256"``). Files without a record (older plain state dicts) load unverified.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file")
    size = os.path.getsize(path)
    if size == 0:
        raise CheckpointError(f"{path}: empty file (0 bytes), left by an interrupted copy or write; delete it")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # EOFError, zip errors, unpickling errors: all mean the same to the user
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"{path}: truncated or damaged ({size} bytes), torch.load failed: {reason}") from None
    recorded, content = None, obj
    meta = model_meta(obj)
    if meta is not None:
        recorded = meta.get("sha256")
    elif isinstance(obj, Mapping) and "sha256" in obj:
        recorded, content = obj["sha256"], {k: v for k, v in obj.items() if k != "sha256"}
    if recorded is not None:
        actual = content_sha256(content)
        if actual != recorded:
            raise CheckpointError(f"{path}: damaged, its content does not match the sha256 recorded when it was "
                                  f"written ({actual[:12]}... != {str(recorded)[:12]}...); restore it or retrain")
    return obj


def _normalized(value: Any) -> Any:
    """JSON-like form of a record (tuples as lists, tensors as lists) for comparison and storage."""
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, Mapping):
        return {str(k): _normalized(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_normalized(v) for v in value]
    return value


def record_differences(saved: Optional[Mapping[str, Any]], current: Optional[Mapping[str, Any]]) -> list:
    """``[(key, saved value, current value)]`` for the entries of two model records that differ.

    A record is ``{"network": {"target": ..., constructor arguments}, "settings": {patch_size, pixdim, ...}}``;
    keys missing on either side are not compared (an older file records less), and a network argument that
    differs exactly as a setting does (``filters`` in both) is reported once.
    """
    out = []
    saved, current = _normalized(saved or {}), _normalized(current or {})
    for section in ("settings", "network"):
        a, b = saved.get(section) or {}, current.get(section) or {}
        for k in a:
            if k in b and a[k] != b[k] and (section == "settings" or (a[k], b[k]) not in [d[1:] for d in out]):
                out.append((k if section == "settings" or k == "target" else f"network_def#{k}", a[k], b[k]))
    return out


def resumed_summary_writer(log_dir: str, ckpt_path: Optional[str] = None, resume: Any = True) -> Any:
    """A TensorBoard ``SummaryWriter`` that hides the steps an interrupted run logged after its last checkpoint.

    When training resumes from ``ckpt_path`` at iteration ``n``, the writer is created with ``purge_step=n + 1``:
    TensorBoard drops the earlier run's events at steps ``>= n + 1`` (they are logged again), so every step
    appears once. All the bundles' TensorBoard steps are iterations (epoch-level values are logged at
    ``epoch * epoch_length``), so one purge step covers them all. Trainer and validator share the one writer
    (``@tb_writer``): the purge marker of a second event file would hide the first file's new events.
    Returns None on ranks other than 0 of a distributed run.
    """
    from torch.utils.tensorboard import SummaryWriter

    if not _is_main_process():
        return None  # only rank 0 logs (the TensorBoard handlers are disabled on the others)
    purge = None
    if ckpt_path and _truthy(resume) and os.path.isfile(ckpt_path):
        with contextlib.suppress(Exception):  # an unreadable checkpoint is reported by ResumableCheckpoint
            ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True, mmap=True)
            purge = int(ckpt["trainer"]["iteration"]) + 1
    writer = SummaryWriter(log_dir=log_dir, purge_step=purge)
    atexit.register(writer.close)  # MONAI's handlers close only the writers they create
    return writer


def _truthy(value: Any) -> bool:
    return str(value).strip().lower() not in ("false", "0", "no", "off", "none", "")


def _scheduler_lengths(sched: Any) -> Dict[str, Any]:
    return {a: getattr(sched, a) for a in ("total_iters", "T_max") if hasattr(sched, a)}


def _model_state(network: torch.nn.Module, meta: Mapping[str, Any]) -> "OrderedDict[str, torch.Tensor]":
    """CPU copy of the network's state dict with ``meta`` (plus the tensors' sha256) in ``_metadata[META_KEY]``."""
    sd = _unwrap(network).state_dict()
    state: "OrderedDict[str, torch.Tensor]" = OrderedDict((k, v.detach().to("cpu", copy=True)) for k, v in sd.items())
    metadata = OrderedDict(getattr(sd, "_metadata", {}))
    metadata[META_KEY] = {"format": FORMAT, **_normalized(dict(meta)), "sha256": content_sha256(state)}
    state._metadata = metadata  # type: ignore[attr-defined]
    return state


class ResumableCheckpoint:
    """Save / resume a training run through one fixed, atomically written, checksummed file.

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
        record: the model record (``{"network": {"target": ..., constructor arguments}, "settings": {...}}``,
            see :func:`record_differences`); resuming a checkpoint recorded with other values is refused with
            one line naming both.
        best_model: the run's :class:`BestModelSaver`; the checkpoint keeps a copy of the last ``model.pt`` it
            wrote (epoch, sha256, weights), and resuming rewrites ``model.pt`` from it when the file on disk
            differs (a kill between the two writes) or removes a ``model.pt`` written after the checkpoint.

    On ``STARTED`` the temporary files of interrupted writes of both files are removed, and the checkpoint is
    verified (:func:`load_verified`): a damaged, empty or truncated file is refused, never silently replaced.
    When the configured LR scheduler length (``total_iters`` / ``T_max``, i.e. ``max_epochs``) differs from the
    checkpoint's, the schedule is rebuilt for the configured length and the learning rate set to its value at
    the resumed epoch (logged), so that raising ``max_epochs`` after a finished run does not continue at LR 0.
    Nothing is saved when a weight or optimizer value is NaN/Inf (``FloatingPointError``).

    In a distributed run every rank loads, only rank 0 saves or repairs; the checkpoint holds the unwrapped
    module's weights, so it resumes with any number of processes (one included). After loading, the ranks check
    that they all resumed from the same epoch (a checkpoint on storage only some nodes see would otherwise let
    the ranks continue from different weights and optimizer states).
    """

    def __init__(self, save_path: str, save_dict: Mapping[str, Any], evaluator: Optional[Engine] = None,
                 save_interval: int = 1, resume: bool = True, map_location: Any = "cpu", tag: Any = None,
                 record: Optional[Mapping[str, Any]] = None, best_model: Optional["BestModelSaver"] = None) -> None:
        if not save_dict:
            raise ValueError("save_dict must name at least one object")
        self.save_path = os.fspath(save_path)
        self.save_dict = dict(save_dict)
        self.evaluator = evaluator
        self.save_interval = int(save_interval)
        self.resume = _truthy(resume)
        self.map_location = map_location
        self.tag = None if tag is None else str(tag)
        self.record = _normalized(dict(record)) if record else None
        self.best_model = best_model
        self.loaded_epoch: Optional[int] = None

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self.load)
        engine.add_event_handler(Events.EPOCH_COMPLETED(every=self.save_interval), self.save)
        engine.add_event_handler(Events.COMPLETED, self.save)

    def state(self, engine: Engine) -> Dict[str, Any]:
        ckpt: Dict[str, Any] = {k: _unwrap(v).state_dict() for k, v in self.save_dict.items()}
        ckpt["trainer"] = dict(engine.state_dict())
        ckpt["tag"] = self.tag
        ckpt["format"] = FORMAT
        ckpt["record"] = self.record
        if self.evaluator is not None:
            ckpt["evaluator"] = {"best_metric": float(self.evaluator.state.best_metric),
                                 "best_metric_epoch": int(self.evaluator.state.best_metric_epoch)}
        if self.best_model is not None and self.best_model.last_saved is not None:
            ckpt["best_model"] = self.best_model.last_saved
        return ckpt

    def save(self, engine: Engine) -> None:
        # EPOCH_COMPLETED of the last epoch and COMPLETED fire for the same state: write (and log) it once
        if getattr(self, "_saved_iteration", None) == engine.state.iteration:
            return
        self._saved_iteration = engine.state.iteration
        if not _is_main_process():
            return
        ckpt = self.state(engine)
        _refuse_nonfinite({k: ckpt[k] for k in self.save_dict}, "checkpoint entry", self.save_path, engine.state.epoch)
        ckpt["sha256"] = content_sha256(ckpt)
        atomic_torch_save(ckpt, self.save_path)
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
        if _is_main_process():
            remove_stale_temp_files(self.save_path)
            if self.best_model is not None:
                remove_stale_temp_files(self.best_model.save_path)
        if not self.resume or not os.path.isfile(self.save_path):
            return
        ckpt = load_verified(self.save_path, map_location=self.map_location)
        if not isinstance(ckpt, Mapping):
            raise CheckpointError(f"{self.save_path}: not a resumable checkpoint (a {type(ckpt).__name__})")
        if ckpt.get("tag") != self.tag:
            raise ValueError(f"checkpoint {self.save_path} belongs to run {ckpt.get('tag')!r}, not {self.tag!r}: "
                             "use another checkpoint folder (e.g. --ckpt_dir models/fold1) or delete it")
        diffs = record_differences(ckpt.get("record"), self.record)
        if diffs:
            raise ValueError(f"checkpoint {self.save_path} was trained with "
                             + ", ".join(f"{k} {json.dumps(a)}" for k, a, _ in diffs) + "; this run sets "
                             + ", ".join(f"{k} {json.dumps(b)}" for k, _, b in diffs)
                             + ": resume with the training's options, or start afresh (--resume False or another --ckpt_dir)")
        missing = [k for k in list(self.save_dict) + ["trainer"] if k not in ckpt]
        if missing:
            raise ValueError(f"checkpoint {self.save_path} lacks {missing}; delete it to start afresh")
        lengths = {k: _scheduler_lengths(_unwrap(v)) for k, v in self.save_dict.items()}
        for k, v in self.save_dict.items():
            _unwrap(v).load_state_dict(ckpt[k])
        for k, v in self.save_dict.items():
            self._rebuild_schedule(k, _unwrap(v), lengths[k])
        max_epochs = engine.state.max_epochs  # a run parameter: keep the configured value
        engine.load_state_dict(ckpt["trainer"])
        if max_epochs is not None:
            engine.state.max_epochs = max_epochs
        if self.evaluator is not None and "evaluator" in ckpt:
            self.evaluator.state.best_metric = ckpt["evaluator"]["best_metric"]
            self.evaluator.state.best_metric_epoch = ckpt["evaluator"]["best_metric_epoch"]
        self.loaded_epoch = int(engine.state.epoch)
        if self.best_model is not None:
            self.best_model.resumed(ckpt.get("best_model"), self.loaded_epoch, self.tag)
        logger.info(f"resumed from {self.save_path}: epoch {engine.state.epoch}, iteration {engine.state.iteration}")

    @staticmethod
    def _rebuild_schedule(name: str, sched: Any, configured: Mapping[str, Any]) -> None:
        """Give a resumed LR scheduler the configured length (``max_epochs``) instead of the checkpoint's."""
        for attr, value in configured.items():
            loaded = getattr(sched, attr)
            if loaded == value:
                continue
            setattr(sched, attr, value)
            if hasattr(sched, "_get_closed_form_lr") and hasattr(sched, "optimizer"):
                lrs = sched._get_closed_form_lr()
                for group, lr in zip(sched.optimizer.param_groups, lrs):
                    group["lr"] = lr
                sched._last_lr = [group["lr"] for group in sched.optimizer.param_groups]
            logger.warning(f"{name}: the checkpoint's schedule ran over {attr}={loaded} epochs, this run over {value} "
                           f"(max_epochs changed): schedule rebuilt for {value}, learning rate "
                           f"{', '.join(f'{lr:.3g}' for lr in sched._last_lr)} at epoch {sched.last_epoch}")


class BestModelSaver:
    """Evaluator handler: atomically write the network's state dict to ``save_path`` when the key metric improves.

    ``model.pt`` is a plain ``name -> tensor`` state dict (CPU tensors) whose ``_metadata[META_KEY]`` records
    ``{"format", "epoch", "key_metric", "run", "network", "settings", "sha256"}``: ``record`` (the network's
    ``_target_`` and constructor arguments, the preprocessing settings) lets evaluation and inference rebuild the
    network (:class:`networks.bundle.trained.TrainedModel`), the sha256 of the tensors lets every load verify it.
    Weights holding NaN/Inf are never written (``FloatingPointError``).

    Relies on MONAI's ``Workflow`` bookkeeping (``state.best_metric_epoch`` is set to the current epoch when the
    key metric improves); attach it after the key metric (as a ``val_handlers`` entry).
    """

    def __init__(self, save_path: str, network: torch.nn.Module, record: Optional[Mapping[str, Any]] = None,
                 tag: Any = None) -> None:
        self.save_path = os.fspath(save_path)
        self.network = network
        self.record = dict(record) if record else {}
        self.tag = None if tag is None else str(tag)
        self.last_saved: Optional[Dict[str, Any]] = None  # {"epoch", "sha256", "state"} of the model.pt written
        self._last_saved_epoch: Optional[int] = None

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        epoch = int(engine.state.epoch)
        if getattr(engine.state, "best_metric_epoch", -1) != epoch or self._last_saved_epoch == epoch:
            return
        self._last_saved_epoch = epoch
        metric = float(engine.state.best_metric)
        state = _model_state(self.network, {"epoch": epoch, "key_metric": metric, "run": self.tag, **self.record})
        _refuse_nonfinite(state, "parameter", self.save_path, epoch)
        if _is_main_process():
            atomic_torch_save(state, self.save_path)
            logger.info(f"saved best model {self.save_path} (key metric {metric:.4f}, epoch {epoch})")
        self.last_saved = {"epoch": epoch, "sha256": model_meta(state)["sha256"], "state": state}

    def resumed(self, saved: Optional[Mapping[str, Any]], epoch: int, tag: Optional[str]) -> None:
        """Make ``model.pt`` agree with a resumed checkpoint (called by :class:`ResumableCheckpoint`).

        ``saved`` is the checkpoint's copy of the last ``model.pt`` written before it: when the file on disk is
        another one (a kill after writing ``model.pt`` and before the checkpoint), missing or damaged, it is
        rewritten from that copy. Without a copy, a ``model.pt`` of this run from a later epoch than the
        checkpoint's is removed (its weights are being retrained).
        """
        self.last_saved = dict(saved) if saved else None
        if not _is_main_process():
            return
        try:
            meta = model_meta(load_verified(self.save_path)) or {}
            problem = None
        except (FileNotFoundError, CheckpointError) as err:
            meta, problem = {}, str(err)
        if saved:
            if meta.get("sha256") == saved["sha256"]:
                return
            atomic_torch_save(saved["state"], self.save_path)
            found = problem or f"it holds epoch {meta.get('epoch', '?')}, written after the checkpoint"
            logger.warning(f"repaired {self.save_path} ({found}): rewritten with the best model of epoch "
                           f"{saved['epoch']} recorded in the checkpoint")
        elif meta and meta.get("run") == tag and int(meta.get("epoch", -1)) > epoch:
            os.remove(self.save_path)
            logger.warning(f"removed {self.save_path}: written at epoch {meta['epoch']}, after the resumed "
                           f"checkpoint's epoch {epoch}")
