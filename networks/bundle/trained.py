"""The trained weights an evaluation or inference run uses: checked before any data is read, and the source of
the network's and preprocessing's settings, so that options given at training need not be repeated.

``model.pt`` written by :class:`networks.bundle.checkpoint.BestModelSaver` records the network's ``_target_`` and
constructor arguments and the preprocessing settings (patch, spacing, channels, classes, kernels, strides,
filters). The bundles' ``evaluate.json`` / ``inference.json`` take each of these settings from the record
(:meth:`TrainedModel.get`, the bundle's default for a plain state dict), and :meth:`TrainedModel.check` runs
first: a missing, damaged or mismatching file ends the run with one line and a non-zero exit.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any, Dict, Mapping, Optional

import torch
from ignite.engine import Engine, Events

from .checkpoint import CheckpointError, _unwrap, load_verified, model_meta, record_differences

__all__ = ["TrainedModel", "how_to_get_weights"]

logger = logging.getLogger(__name__)


def how_to_get_weights(path: str) -> str:
    return (f"train them with this bundle's train command (python -m monai.bundle run training --config_file "
            f"configs/train.json ...), download a release (python -m monai.bundle download / download_large_files, "
            f"or the release archive) so that {path} exists, or pass --ckpt_path /path/to/model.pt")


class TrainedModel:
    """A ``model.pt`` for evaluation or inference: its recorded settings, its checks, and loading it.

    Args:
        path: the weights file (``@ckpt_path``).
        map_location: passed to ``torch.load``.

    Reading the record is lenient (a missing or unreadable file records nothing, so the configs still parse,
    e.g. for ``verify_net_in_out`` without weights); :meth:`check` is strict.
    """

    def __init__(self, path: str, map_location: Any = "cpu") -> None:
        self.path = os.fspath(path)
        self.map_location = map_location
        self.meta: Dict[str, Any] = {}
        self._loaded_into: Optional[int] = None
        try:
            state = torch.load(self.path, map_location="cpu", weights_only=True, mmap=True)
            self.meta = model_meta(state) or {}
        except Exception:  # reported by check()
            pass

    def get(self, key: str, default: Any) -> Any:
        """The recorded value of setting ``key`` (e.g. ``"filters"``), or ``default`` when the file records none."""
        return (self.meta.get("settings") or {}).get(key, default)

    @staticmethod
    def _fail(message: str) -> None:
        raise SystemExit(f"error: {message}")  # printed once, as the run's last line, by the interpreter

    def check(self, record: Mapping[str, Any], network: torch.nn.Module) -> None:
        """Verify the file and load it into ``network``, or end the run with one line (``SystemExit``, status 1).

        Args:
            record: this run's ``{"network": {"target", constructor arguments}, "settings": {...}}``; a value that
                differs from the file's record (an explicit command-line override) is refused naming both.
            network: the instantiated network; a plain state dict that does not fit it is refused with the first
                tensor whose shape differs (instead of the ~1,800 lines ``load_state_dict`` prints).
        """
        if id(network) == self._loaded_into:
            return
        if not os.path.isfile(self.path):
            self._fail(f"no trained weights at {os.path.abspath(self.path)}: {how_to_get_weights(self.path)}")
        try:
            state = load_verified(self.path, map_location=self.map_location)
        except (CheckpointError, OSError) as err:
            self._fail(f"cannot use the weights {err}")
        if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            hint = " (a resumable checkpoint: use models/model.pt)" if isinstance(state, Mapping) and "trainer" in state else ""
            self._fail(f"{self.path} is not a state dict (name -> tensor){hint}")
        meta = model_meta(state) or {}
        diffs = record_differences(meta, record)
        if diffs:
            self._fail(f"{self.path} was trained with " + ", ".join(f"{k} {json.dumps(a)}" for k, a, _ in diffs)
                       + " but this run sets " + ", ".join(f"{k} {json.dumps(b)}" for k, _, b in diffs)
                       + ": drop those overrides (the recorded values are used) or use weights trained with them")
        net = _unwrap(network)
        own = net.state_dict()
        unexpected = sorted(set(state) - set(own))
        missing = sorted(set(own) - set(state))
        shapes = [k for k in own if k in state and tuple(own[k].shape) != tuple(state[k].shape)]
        if unexpected or missing or shapes:
            first = (f"{shapes[0]} is {list(state[shapes[0]].shape)} in the file and {list(own[shapes[0]].shape)} in the "
                     "network" if shapes else f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}")
            hint = ("" if meta else "; it records no settings (an older plain state dict): pass the options it was "
                    "trained with (e.g. --filters, --patch_size)")
            self._fail(f"{self.path} does not fit the network ({len(shapes)} shape(s) differ, {len(missing)} missing, "
                       f"{len(unexpected)} unexpected: {first}){hint}")
        net.load_state_dict(state)
        self._loaded_into = id(network)
        logger.info(f"loaded {self.path}" + (f" (epoch {meta.get('epoch')}, settings "
                                             f"{json.dumps(meta.get('settings'))})" if meta else " (a plain state dict)"))

    def handler(self, network: torch.nn.Module, record: Mapping[str, Any]) -> "_LoadOnStart":
        """An engine handler that runs :meth:`check` (verify and load) on ``STARTED``, when it has not run yet."""
        return _LoadOnStart(self, network, record)


class _LoadOnStart:
    def __init__(self, trained: TrainedModel, network: torch.nn.Module, record: Mapping[str, Any]) -> None:
        self.trained, self.network, self.record = trained, network, record

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, lambda _: self.trained.check(self.record, self.network))
