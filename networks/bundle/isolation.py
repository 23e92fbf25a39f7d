"""Per-case isolation for the bundles' evaluation and inference: one bad case never stops the others.

* :class:`CaseDataset`: MONAI's ``Dataset``, except that a case whose loading, validation or preprocessing
  fails yields a failure record (``{"case_failure": message, "id": ..., "src": ...}``) instead of raising
  (in a DataLoader worker too).
* :class:`IsolatingEvaluator`: MONAI's ``SupervisedEvaluator`` that records a failure record, or any
  exception of the network, the postprocessing or the writing of one case, in the bundle's
  :class:`~networks.bundle.validation.InputChecker` and goes on with the next case (that iteration's
  ``engine.state.batch`` / ``output`` are empty lists, so metric handlers see nothing of it). The run
  ends with ``InputChecker.report()``: exit status 1 and a summary naming each failed file, step and reason.

Ignite offers ``Events.EXCEPTION_RAISED``, but its handlers run after the engine has already left the epoch,
so they cannot continue with the next case; hence the exception is caught inside the iteration.
Use ``batch_size`` 1 (a failure record and a good case do not collate into one batch).
"""

from __future__ import annotations

import re
from typing import Any, Callable, List, Optional, Sequence, Tuple

from monai.data import Dataset
from monai.engines import SupervisedEvaluator

from .validation import CaseError, InputChecker

__all__ = ["FAILURE_KEY", "describe_failure", "CaseDataset", "IsolatingEvaluator"]

FAILURE_KEY = "case_failure"
_TRANSFORM = re.compile(r"applying transform <?(?:[\w.]+\.)?(\w+)")
_READING = ("LoadImaged", "LoadImage", "EnsureChannelFirstd", "EnsureChannelFirst")


def _chain(e: BaseException) -> List[BaseException]:
    out: List[BaseException] = []
    while e is not None and e not in out:
        out.append(e)
        e = e.__cause__ or (None if e.__suppress_context__ else e.__context__)
    return out


def describe_failure(e: BaseException, src: str, default_step: str) -> str:
    """``"<src>: <step>: <reason>"`` for an exception raised while processing one case.

    A :class:`CaseError` in the chain gives its own message (file and check). Otherwise the step is the
    innermost MONAI transform named in the chain (``reading`` for the loader, ``writing`` for a saver,
    ``<default_step> (<Transform>)`` else) or ``default_step``; the reason is the innermost exception."""
    chain = _chain(e)
    for c in chain:
        if isinstance(c, CaseError):
            return str(c)
    names = [m.group(1) for c in chain for m in [_TRANSFORM.search(str(c))] if m and m.group(1) != "Compose"]
    step = default_step
    if names:
        name = names[-1]
        step = ("reading" if name in _READING else "writing" if name.startswith("Save")
                else f"{default_step} ({name})")
    root = chain[-1]
    text = str(root).strip().splitlines()
    reason = f"{type(root).__name__}: {text[0][:300] if text else ''}".rstrip(": ")
    return f"{src}: {step}: {reason}"


def _first(x: Any) -> Any:
    return x[0] if isinstance(x, (list, tuple)) and len(x) == 1 else x


class CaseDataset(Dataset):
    """``monai.data.Dataset`` whose failing items become failure records (see the module docstring).

    Args:
        data: items (``{"image": ..., "id": ..., "src": ...}``).
        transform: the preprocessing.
    """

    def __init__(self, data: Sequence[Any], transform: Optional[Callable] = None) -> None:
        super().__init__(data=data, transform=transform)

    def _transform(self, index: int) -> Any:
        try:
            return super()._transform(index)
        except Exception as e:  # noqa: BLE001 - every per-case failure is recorded, none is swallowed
            item = self.data[index]
            item = item if isinstance(item, dict) else {"image": item}
            src = item.get("src") or item.get("image")
            src = ", ".join(map(str, src)) if isinstance(src, (list, tuple)) else str(src)
            return {FAILURE_KEY: describe_failure(e, src, "preprocessing"), "id": str(item.get("id", src)), "src": src}


class IsolatingEvaluator(SupervisedEvaluator):
    """``SupervisedEvaluator`` that records a failing case in ``checker`` and goes on (module docstring).

    Args:
        checker: the bundle's :class:`InputChecker` (its ``report()`` ends the run with the summary).
        args, kwargs: those of ``monai.engines.SupervisedEvaluator``.
    """

    def __init__(self, *args: Any, checker: InputChecker, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.checker = checker

    @staticmethod
    def _case(batch: Any) -> Tuple[str, str]:
        if not isinstance(batch, dict):
            return "?", "?"
        src = _first(batch.get("src"))
        if src is None:
            meta = getattr(batch.get("image"), "meta", {}) or {}
            src = _first(meta.get("filename_or_obj", "?"))
        src = ", ".join(map(str, src)) if isinstance(src, (list, tuple)) else str(src)
        return str(_first(batch.get("id", src))), src

    def _skip(self, engine: Any) -> list:
        engine.state.batch, engine.state.output = [], []
        return []

    def _iteration(self, engine: Any, batchdata: Any) -> Any:
        self.checker.checked += 1
        case, src = self._case(batchdata)
        if isinstance(batchdata, dict) and FAILURE_KEY in batchdata:
            self.checker.fail(case, str(_first(batchdata[FAILURE_KEY])))
            return self._skip(engine)
        try:
            out = super()._iteration(engine, batchdata)
        except Exception as e:  # noqa: BLE001 - recorded with the file, step and reason
            self.checker.fail(case, describe_failure(e, src, "network or postprocessing"))
            return self._skip(engine)
        written = [o.get("pred_file") for o in (out if isinstance(out, list) else [out]) if isinstance(o, dict)]
        self.checker.succeed(case, ", ".join(str(w) for w in written if w))
        return out
