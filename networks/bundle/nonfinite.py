"""Stop (or skip the step of) a training run whose loss or gradients are NaN/Inf, before the weights change.

MONAI's ``SupervisedTrainer`` fires ``IterationEvents.BACKWARD_COMPLETED`` after ``loss.backward()`` and before
``optimizer.step()`` (monai/engines/trainer.py), so checking there keeps the weights finite: one NaN voxel in one
training image otherwise turns every weight NaN within a step and training goes on, with exit code 0.
"""

from __future__ import annotations

import logging
import math
from typing import Any, List, Optional

import torch
from ignite.engine import Engine
from monai.engines.utils import IterationEvents
from monai.utils import CommonKeys

__all__ = ["NonFiniteGuard"]

logger = logging.getLogger(__name__)


def _batch_files(batch: Any) -> List[str]:
    """The source files of a collated batch (``image``/``label`` ``filename_or_obj`` metadata), when known."""
    files: List[str] = []
    if isinstance(batch, dict):
        for key in (CommonKeys.IMAGE, CommonKeys.LABEL):
            names = getattr(batch.get(key), "meta", {}).get("filename_or_obj")
            if names is not None:
                files += [str(n) for n in (names if isinstance(names, (list, tuple)) else [names])]
    return files


class NonFiniteGuard:
    """Trainer handler: a NaN/Inf loss or gradient stops training with an error naming where it happened.

    Args:
        on_nonfinite: ``"stop"`` (default): raise ``FloatingPointError`` naming the epoch, the iteration, the
            quantity (loss or the first parameter whose gradient is non-finite) and the batch's files, before the
            optimizer step, so the weights and every file written from them stay finite and the run exits
            non-zero. ``"skip"``: drop that step (the gradients are discarded, the optimizer is not stepped),
            log it, and count it in ``engine.state.nonfinite_steps``; a run that skips more than
            ``max_skipped`` steps stops as with ``"stop"``.
        max_skipped: the most steps ``"skip"`` drops in one run (``None``: no limit).

    With mixed precision (``amp``), non-finite gradients are the ``GradScaler``'s business (it skips those steps and
    lowers its scale), so only the loss is checked; a skipped step fills the gradients with NaN so that the scaler
    skips it too.
    """

    def __init__(self, on_nonfinite: str = "stop", max_skipped: Optional[int] = None) -> None:
        if on_nonfinite not in ("stop", "skip"):
            raise ValueError(f"on_nonfinite must be 'stop' or 'skip', not {on_nonfinite!r}")
        self.on_nonfinite = on_nonfinite
        self.max_skipped = None if max_skipped is None else int(max_skipped)

    def attach(self, engine: Engine) -> None:
        engine.state.nonfinite_steps = 0
        engine.add_event_handler(IterationEvents.BACKWARD_COMPLETED, self)

    def _problem(self, engine: Engine) -> Optional[str]:
        output = engine.state.output or {}
        loss = output.get(CommonKeys.LOSS) if isinstance(output, dict) else None
        if loss is not None:
            value = float(loss.detach().float().mean()) if isinstance(loss, torch.Tensor) else float(loss)
            if not math.isfinite(value):
                return f"loss {value}"
        if getattr(engine, "scaler", None) is not None:
            return None
        named = [(name, p.grad) for name, p in engine.network.named_parameters() if p.grad is not None]
        if not named:
            return None
        # one host sync per step (not one per parameter); the name is looked up only when something is wrong
        finite = torch.stack([torch.isfinite(g).all() for _, g in named])
        if bool(finite.all()):
            return None
        name = named[int((~finite).nonzero()[0, 0])][0]
        return f"gradient of {name.removeprefix('module.')}"

    def __call__(self, engine: Engine) -> None:
        problem = self._problem(engine)
        if problem is None:
            return
        files = _batch_files(engine.state.batch)
        where = (f"non-finite {problem} at epoch {engine.state.epoch}, iteration {engine.state.iteration}"
                 + (f" (batch: {', '.join(files)})" if files else ""))
        skipped = int(getattr(engine.state, "nonfinite_steps", 0)) + 1
        if self.on_nonfinite == "stop" or (self.max_skipped is not None and skipped > self.max_skipped):
            hint = ("" if self.on_nonfinite == "skip" else
                    "; check those images for NaN/Inf voxels, lower the learning rate, or pass "
                    "--on_nonfinite skip to drop such steps")
            raise FloatingPointError(f"training stopped: {where}{hint}; the weights were not updated with it")
        engine.state.nonfinite_steps = skipped
        for p in engine.network.parameters():
            if p.grad is not None:
                if getattr(engine, "scaler", None) is not None:
                    p.grad.fill_(float("nan"))  # GradScaler.step() skips a step with non-finite gradients
                else:
                    p.grad = None  # optimizers skip parameters without a gradient
        logger.warning(f"skipped the optimizer step: {where} ({skipped} step(s) skipped so far)")
