"""Progress of the long steps: sliding-window inference, validation / evaluation cases, data preparation.

* :class:`Progress`: counts ``done / total`` units of one step. On a terminal (the stream is a TTY) it draws a
  tqdm bar with elapsed time and the estimate of the time left; otherwise (a CI log, ``| tee``, a file) it
  never redraws anything and writes an occasional plain log line instead (``<step>: 12/48 windows (25 %),
  elapsed 1 min 3 s, about 3 min 9 s left``): after every further ``every_fraction`` of the total or
  ``every_s`` seconds, whichever comes first, at most one per ``min_interval_s``, and one when a step that
  logged has finished.
* :class:`SlidingWindowProgressInferer`: MONAI's ``SlidingWindowInferer`` with that progress, in windows.
* :class:`CaseProgress`: an ignite handler reporting the cases an evaluator has done (validation during
  training, evaluation, inference).

Why a wrapper instead of MONAI's ``SlidingWindowInferer(progress=True)`` / ignite's ``ProgressBar`` alone:
both draw a tqdm bar whatever the stream, so a non-TTY log gets one redraw per window (or case) glued by
carriage returns, and neither writes anything to the Python log. The bar itself is still tqdm's.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any, Optional, Sequence, TextIO

import torch
from ignite.engine import Engine, Events
from monai.data.utils import dense_patch_slices
from monai.inferers import SlidingWindowInferer
from monai.inferers.utils import _get_scan_interval
from monai.utils import ensure_tuple_rep, fall_back_tuple
from tqdm.auto import tqdm

__all__ = ["Progress", "stderr_is_tty", "format_seconds", "count_windows", "SlidingWindowProgressInferer", "CaseProgress"]

logger = logging.getLogger(__name__)


def format_seconds(seconds: float) -> str:
    """``75.3`` -> ``"1 min 15 s"``; ``4000`` -> ``"1 h 6 min"``."""
    s = int(round(max(seconds, 0.0)))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60} s"
    return f"{s // 3600} h {s % 3600 // 60} min"


def _is_tty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def stderr_is_tty() -> bool:
    """Whether bars may be drawn on stderr; for MONAI's own bars (e.g. ``CacheDataset(progress=...)``) in configs."""
    return _is_tty(sys.stderr)


class Progress:
    """``done / total`` of one step, as a tqdm bar on a TTY or as occasional log lines otherwise.

    Args:
        total: number of units the step will do (windows, cases, files).
        desc: what the step is, first word of every line (e.g. ``"case 3/10 sliding window"``).
        unit: plural name of a unit (``"windows"``).
        stream: where a bar would be drawn (default ``sys.stderr``); decides TTY or not unless ``tty`` is given.
        tty: force the bar (True) or the log lines (False).
        every_fraction, every_s: a log line after every this fraction of ``total`` (0: after every update) or
            this many seconds.
        min_interval_s: no log line sooner than this after the start or the previous line (short steps stay
            silent in logs).
        leave: keep the bar on screen when done.
        log: the logger of the lines (default this module's).

    In a distributed run only rank 0 reports (the other ranks' steps are the same).
    """

    def __init__(self, total: int, desc: str, unit: str, stream: Optional[TextIO] = None, tty: Optional[bool] = None,
                 every_fraction: float = 0.1, every_s: float = 30.0, min_interval_s: float = 5.0, leave: bool = True,
                 log: Optional[logging.Logger] = None) -> None:
        self.total, self.desc, self.unit = int(total), desc, unit
        self.stream = stream if stream is not None else sys.stderr
        self.tty = _is_tty(self.stream) if tty is None else bool(tty)
        self.every_fraction, self.every_s, self.min_interval_s = float(every_fraction), float(every_s), float(min_interval_s)
        self.log = log or logger
        self.done = 0
        self.start = self._last_time = time.monotonic()
        self._last_done = 0
        self._logged = False
        self.silent = torch.distributed.is_available() and torch.distributed.is_initialized() and \
            torch.distributed.get_rank() != 0
        self.bar = None if self.silent else (tqdm(total=self.total, desc=desc, unit=unit[:-1] if unit.endswith("s") else unit,
                         file=self.stream, leave=leave, dynamic_ncols=True) if self.tty else None)

    def line(self) -> str:
        """The plain status line: done / total, percent, elapsed time and the estimate of the time left."""
        elapsed = time.monotonic() - self.start
        pct = 100.0 * self.done / self.total if self.total else 100.0
        text = f"{self.desc}: {self.done}/{self.total} {self.unit} ({pct:.0f} %), elapsed {format_seconds(elapsed)}"
        if 0 < self.done < self.total:
            text += f", about {format_seconds(elapsed * (self.total - self.done) / self.done)} left"
        return text

    def update(self, n: int = 1) -> None:
        self.done += int(n)
        if self.silent:
            return
        if self.bar is not None:
            self.bar.update(int(n))
            return
        now = time.monotonic()
        since = now - self._last_time
        step = self.total * self.every_fraction
        due = since >= self.every_s or step <= 0 or self.done - self._last_done >= step
        if due and since >= self.min_interval_s and self.done < self.total:
            self.log.info(self.line())
            self._last_time, self._last_done, self._logged = now, self.done, True

    def close(self) -> None:
        """Close the bar; in log mode write the final line if the step logged before (or took long)."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        elif not self.silent and (self._logged or time.monotonic() - self.start >= self.every_s):
            self.log.info(self.line())
            self._logged = False

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def count_windows(spatial_shape: Sequence[int], roi_size: Any, overlap: Any) -> int:
    """Windows MONAI's ``sliding_window_inference`` runs on one image of ``spatial_shape`` (after its padding
    to at least ``roi_size``), from MONAI's own scan interval and patch slicing."""
    nd = len(spatial_shape)
    roi = fall_back_tuple(roi_size, spatial_shape)
    size = [max(int(s), int(r)) for s, r in zip(spatial_shape, roi)]
    interval = _get_scan_interval(size, roi, nd, ensure_tuple_rep(overlap, nd))
    return len(dense_patch_slices(size, roi, interval, return_slice=False))


class SlidingWindowProgressInferer(SlidingWindowInferer):
    """MONAI's ``SlidingWindowInferer`` (same arguments) that reports windows done / total, elapsed time and the
    estimate of the time left per image (:class:`Progress`: a bar on a TTY, log lines otherwise).

    Windows are counted as the network sees them (each call gets ``sw_batch_size`` windows); a batch of B
    images counts B x the windows of one.
    """

    def __init__(self, *args: Any, progress_desc: str = "sliding window", **kwargs: Any) -> None:
        kwargs["progress"] = False  # MONAI's own tqdm bar would redraw in logs too
        super().__init__(*args, **kwargs)
        self.progress_desc = progress_desc

    def __call__(self, inputs: torch.Tensor, network: Any, *args: Any, **kwargs: Any) -> Any:
        total = count_windows(inputs.shape[2:], self.roi_size, self.overlap) * int(inputs.shape[0])
        desc = f"{self.progress_desc} {tuple(int(s) for s in inputs.shape[2:])}"
        with Progress(total, desc, "windows", leave=False) as progress:
            def counted(x: torch.Tensor, *a: Any, **k: Any) -> Any:
                out = network(x, *a, **k)
                progress.update(int(x.shape[0]))
                return out

            return super().__call__(inputs, counted, *args, **kwargs)


class CaseProgress:
    """Evaluator handler: cases done / total of each run of the engine (:class:`Progress`, unit ``cases``).

    Args:
        desc: the step's name in the bar and log lines (``"validation"``, ``"evaluation"``, ``"inference"``).
        every_fraction, every_s, min_interval_s: as :class:`Progress` (default: a line per case after 5 s).
    """

    def __init__(self, desc: str = "validation", every_fraction: float = 0.0, every_s: float = 30.0,
                 min_interval_s: float = 5.0) -> None:
        self.desc = desc
        self.kwargs = dict(every_fraction=every_fraction, every_s=every_s, min_interval_s=min_interval_s)
        self.progress: Optional[Progress] = None

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self._start)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._update)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._close)

    def _start(self, engine: Engine) -> None:
        self._close(engine)
        total = engine.state.epoch_length or len(engine.state.dataloader)
        self.progress = Progress(total, self.desc, "cases", **self.kwargs)

    def _update(self, engine: Engine) -> None:
        if self.progress is not None:
            batch = engine.state.batch
            n = len(batch) if isinstance(batch, (list, tuple)) else 1
            self.progress.update(n)

    def _close(self, engine: Engine) -> None:
        if self.progress is not None:
            self.progress.close()
            self.progress = None
