"""One check of input data, shared by training, evaluation, inference and MONAI Label.

:func:`check_case` is THE validation of one case (image, and label when there is one) before it reaches the
network; everything else here calls it:

* :class:`ValidateCased`: the MONAI transform in every bundle pipeline (after ``EnsureChannelFirstd``), hence
  in MONAI Label's inference too (it runs the bundle's ``preprocessing``);
* :class:`InputChecker`: the bundle's settings (channels, classes, spacing, modality, options) plus the record
  of failed cases of a run, reported at its end (:meth:`InputChecker.report`, exit status 1);
* :meth:`InputChecker.check_datalist`: training's whole-datalist check before training starts, reading
  headers only (``fast``, the default) or every voxel (``full``).

Checks, each with a name that appears in the error (:class:`CaseError`, which names the file):

========================  ==================================================================================
``readable``              the file loads (NIfTI or DICOM series)
``shape``                 3D with the bundle's channel count
``finite``                no NaN/Inf voxel (``nonfinite="replace"``: replaced by the channel's finite minimum,
                          logged)
``affine``                finite affine with non-zero voxel sizes
``foreground``            a non-empty extent after the crop to nonzero voxels
``memory``                the resampled case fits ``max_case_gb`` (the estimate and the option are named)
``label_grid``            label shape and affine equal to the image's (affine within ``affine_tol`` mm)
``label_values``          integer values in ``0..num_classes-1``
``label_empty``           a label with foreground (``allow_empty_label`` to accept empty ones)
========================  ==================================================================================

Besides, :func:`modality_warning` warns (never refuses) when intensities do not look like the bundle's modality.
"""

from __future__ import annotations

import logging
import math
import os
from typing import Any, Dict, Hashable, List, Mapping, Optional, Sequence, Tuple

import nibabel as nib
import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import LoadImage, MapTransform

__all__ = ["CaseError", "InputErrors", "check_case", "check_affine", "modality_warning", "estimate_case_bytes", "InputChecker",
           "ValidateCased"]

logger = logging.getLogger(__name__)

BYTES_PER_VOXEL = 4  # float32 arrays
GB = 1024**3


class CaseError(ValueError):
    """A case that cannot be used: ``str()`` is ``"<file>: <check>: <reason>"``."""

    def __init__(self, src: str, check: str, reason: str) -> None:
        super().__init__(f"{src}: {check}: {reason}")
        self.src, self.check, self.reason = src, check, reason


class InputErrors(SystemExit):
    """Raised by :meth:`InputChecker.report`: the process exits with status 1 and this message."""


def _name(src: Any) -> str:
    if isinstance(src, (list, tuple)):
        return ", ".join(map(str, src))
    return str(src)


def _tensor(x: Any) -> torch.Tensor:
    """A plain CPU tensor view of ``x`` (torch's element-wise reductions are several times faster than
    numpy's on large volumes)."""
    if hasattr(x, "as_tensor"):
        x = x.as_tensor()
    return torch.as_tensor(x).detach().cpu()


def _array(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def _affine(x: Any) -> Optional[np.ndarray]:
    a = getattr(x, "affine", None)
    return None if a is None else np.asarray(_array(a), dtype=np.float64)


def voxel_sizes(affine: np.ndarray) -> np.ndarray:
    """Column norms of the 3x3 part: the voxel size in mm along each array axis."""
    return np.sqrt((np.asarray(affine, dtype=np.float64)[:3, :3] ** 2).sum(axis=0))


def estimate_case_bytes(extent_mm: Sequence[float], pixdim: Sequence[float], in_channels: int, num_classes: int) -> int:
    """Bytes of the dominant float32 arrays of one case at the bundle's spacing: the image
    (``in_channels``), the sliding-window logits and their accumulator (``2 * num_classes``)."""
    voxels = math.prod(max(1.0, e / p) for e, p in zip(extent_mm, pixdim))
    return int(voxels * BYTES_PER_VOXEL * (in_channels + 2 * num_classes))


def modality_warning(image: Any, modality: Optional[str], src: str = "") -> Optional[str]:
    """A message when ``image``'s intensities do not look like ``modality`` (``"CT"`` in HU, or an MRI
    magnitude), else None. Heuristic, used to warn, never to refuse: a CT in HU has air (about -1000) in
    its field of view, so a CT with no value below -500 is suspicious; an MR magnitude image has no values
    below -500, so one that has them looks like a CT."""
    if not modality:
        return None
    arr = _tensor(image)
    if arr.is_floating_point():
        finite = torch.isfinite(arr)
        if not bool(finite.any()):
            return None
        lo = float(arr.min()) if bool(finite.all()) else float(arr[finite].min())
    else:
        lo = float(arr.min())
    mod = str(modality).upper()
    if mod == "CT" and lo > -500:
        return (f"{src}: does not look like a CT in Hounsfield units (no value below -500 HU, minimum {lo:g}); "
                f"this bundle was trained on CT: is it an MR or a rescaled image?")
    if mod.startswith("MR") and lo < -500:
        return (f"{src}: does not look like an MRI magnitude image (values down to {lo:g}, like a CT in HU); "
                f"this bundle was trained on {modality}")
    return None


def check_affine(affine: np.ndarray, src: str) -> np.ndarray:
    """The voxel sizes (mm) of ``affine``; :class:`CaseError` (check ``affine``) when it is not finite or an
    axis has zero length / the axes are degenerate."""
    affine = np.asarray(affine, dtype=np.float64)
    if not np.isfinite(affine).all():
        raise CaseError(src, "affine", f"non-finite affine {affine[:3].tolist()}")
    sizes = voxel_sizes(affine)
    if (sizes < 1e-6).any() or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise CaseError(src, "affine", f"zero-length or degenerate voxel axis (voxel sizes {np.round(sizes, 6).tolist()} mm)")
    return sizes


def check_case(image: Any, label: Any = None, *, src: Any = "", label_src: Any = "", in_channels: int,
               num_classes: Optional[int] = None, pixdim: Optional[Sequence[float]] = None,
               max_case_gb: Optional[float] = None, nonfinite: str = "error", affine_tol: float = 1e-3,
               allow_empty_label: bool = False, modality: Optional[str] = None,
               expected: str = "") -> Tuple[Any, List[str]]:
    """Validate one case; returns ``(image, warnings)`` (the image with non-finite voxels replaced when
    ``nonfinite="replace"``; messages naming the file, for the caller to log) or raises :class:`CaseError`
    naming the file and the check that failed.

    Args:
        image: (C, X, Y, Z) channel-first tensor with an ``affine`` attribute (a MetaTensor), or the
            header-only stand-in of a file (shape and affine, no voxels: the checks that need voxels are
            skipped; see :meth:`InputChecker.check_datalist`).
        label: (1, X, Y, Z) label map (or header stand-in), or None.
        src, label_src: file names for the messages.
        in_channels: channels the network expects. num_classes: classes incl. background (label values).
        pixdim: the bundle's target spacing in mm (for the ``memory`` check).
        max_case_gb: memory budget of one case in GiB (None: no limit).
        nonfinite: ``"error"`` (default) or ``"replace"`` (NaN/Inf set to the channel's finite minimum, logged).
        affine_tol: largest difference of label and image affine entries (mm).
        allow_empty_label: accept labels with no foreground.
        modality: the bundle's modality (``"CT"``, ``"MRI"``) for :func:`modality_warning`.
        expected: a description of the expected input, appended to shape errors.
    """
    src = _name(src)
    warnings: List[str] = []
    hint = f"; expected {expected}" if expected else ""
    shape = tuple(int(s) for s in image.shape)
    if len(shape) != 4:
        raise CaseError(src, "shape", f"{len(shape) - 1}D image of shape {shape[1:]}{hint}")
    if shape[0] != int(in_channels):
        raise CaseError(src, "shape", f"{shape[0]} channel(s), shape {shape}{hint}")
    if min(shape[1:]) < 1:
        raise CaseError(src, "shape", f"empty axis in shape {shape[1:]}{hint}")
    affine = _affine(image)
    sizes = check_affine(affine, src) if affine is not None else np.ones(3)
    has_voxels = not isinstance(image, _Header)
    extent = np.asarray(shape[1:], dtype=np.float64)
    if has_voxels:
        arr = _tensor(image)
        bad = ~torch.isfinite(arr) if arr.is_floating_point() else None
        if bad is not None and bool(bad.any()):
            n = int(bad.sum())
            if nonfinite != "replace":
                raise CaseError(src, "finite", f"{n} NaN/Inf voxel(s) (set nonfinite to 'replace' to replace them "
                                               "by each channel's finite minimum)")
            fixed = arr.clone()
            for c in range(fixed.shape[0]):
                ok = torch.isfinite(fixed[c])
                fixed[c][~ok] = fixed[c][ok].min() if bool(ok.any()) else 0.0
            warnings.append(f"{src}: replaced {n} NaN/Inf voxel(s) by each channel's finite minimum (nonfinite='replace')")
            image = _like(image, fixed)
            arr = fixed
        extent = _foreground_extent(arr)
        if extent is None:
            raise CaseError(src, "foreground", "every voxel is 0: the crop to the nonzero foreground leaves nothing")
        msg = modality_warning(arr, modality, src)
        if msg:
            warnings.append(msg)
    if pixdim is not None and max_case_gb is not None:
        need = estimate_case_bytes(extent * sizes, pixdim, int(in_channels), int(num_classes or 1))
        if need > float(max_case_gb) * GB:
            raise CaseError(src, "memory", f"resampled to {[round(float(p), 3) for p in pixdim]} mm the case would need about {need / GB:.1f} GiB "
                                           f"(foreground {np.round(extent * sizes, 1).tolist()} mm, voxel sizes "
                                           f"{np.round(sizes, 3).tolist()} mm), over the budget max_case_gb={max_case_gb:g}; "
                                           f"raise it with --max_case_gb if the machine has the memory")
    if label is not None:
        _check_label(label, shape, affine, _name(label_src) or src, num_classes, affine_tol, allow_empty_label, warnings)
    return image, warnings


def _check_label(label: Any, shape: Tuple[int, ...], affine: Optional[np.ndarray], lsrc: str, num_classes: Optional[int],
                 affine_tol: float, allow_empty: bool, warnings: List[str]) -> None:
    lshape = tuple(int(s) for s in label.shape)
    if lshape[0] != 1 or lshape[1:] != shape[1:]:
        raise CaseError(lsrc, "label_grid", f"label shape {lshape[1:]} (channels {lshape[0]}) differs from the image's {shape[1:]}")
    laff = _affine(label)
    if affine is not None and laff is not None and not np.allclose(laff, affine, atol=affine_tol, rtol=0):
        diff = float(np.abs(laff - affine).max())
        raise CaseError(lsrc, "label_grid", f"label affine differs from the image's by up to {diff:.4g} (tolerance "
                                            f"{affine_tol:g}): label {np.round(laff[:3], 4).tolist()}, image {np.round(affine[:3], 4).tolist()}")
    if isinstance(label, _Header):
        if label.dtype is not None and not (np.issubdtype(label.dtype, np.integer) or np.issubdtype(label.dtype, np.floating)):
            raise CaseError(lsrc, "label_values", f"label data type {label.dtype} is not numeric")
        return
    arr = _tensor(label)
    if arr.is_floating_point():  # min/max and masks, not unique(): labels can be large
        if not bool(torch.isfinite(arr).all()):
            raise CaseError(lsrc, "label_values", "NaN/Inf in the label")
        frac = torch.frac(arr) != 0
        if bool(frac.any()):
            raise CaseError(lsrc, "label_values", f"non-integer label values, e.g. {torch.unique(arr[frac])[:5].tolist()}")
    lo, hi = float(arr.min()), float(arr.max())
    if num_classes is not None and (lo < 0 or hi >= int(num_classes)):
        out = torch.unique(arr[(arr < 0) | (arr >= int(num_classes))]).numpy()
        raise CaseError(lsrc, "label_values", f"label values {out.astype(np.int64).tolist()[:10]} outside the bundle's "
                                              f"classes 0..{int(num_classes) - 1}")
    if lo == 0 and hi == 0:
        if not allow_empty:
            raise CaseError(lsrc, "label_empty", "the label has no foreground (set allow_empty_label to accept it)")
        warnings.append(f"{lsrc}: the label has no foreground")


def _foreground_extent(arr: torch.Tensor) -> Optional[np.ndarray]:
    """Voxel extent per spatial axis of the nonzero voxels of a (C, X, Y, Z) tensor (MONAI's crop with
    ``x != 0``), None when there are none. Axis projections, not ``argwhere`` (no coordinate list)."""
    mask = (arr != 0).any(dim=0)
    extent = []
    for axis in range(mask.ndim):
        proj = mask
        for a in reversed([a for a in range(mask.ndim) if a != axis]):
            proj = proj.any(dim=a)
        hit = torch.nonzero(proj).flatten()
        if hit.numel() == 0:
            return None
        extent.append(int(hit[-1] - hit[0] + 1))
    return np.asarray(extent, dtype=np.float64)


def _like(image: Any, arr: torch.Tensor) -> Any:
    """``arr`` as the type of ``image`` (MetaTensor keeps its metadata)."""
    if isinstance(image, torch.Tensor):
        out = image.clone()
        out.copy_(arr.to(image.dtype))
        return out
    return arr.numpy()


class _Header:
    """Shape and affine of a file without its voxels (fast datalist check)."""

    def __init__(self, shape: Tuple[int, ...], affine: np.ndarray, dtype: Any = None) -> None:
        self.shape, self.affine, self.dtype, self.data = shape, affine, dtype, None


def _read_header(path: Any) -> Optional[_Header]:
    """Channel-first header of a NIfTI file (or a list of per-channel files); None when not NIfTI."""
    paths = list(path) if isinstance(path, (list, tuple)) else [path]
    if not all(str(p).lower().endswith((".nii", ".nii.gz")) for p in paths):
        return None
    imgs = [nib.load(str(p)) for p in paths]
    shp = tuple(int(s) for s in imgs[0].shape)
    channels = shp[3] if len(shp) == 4 else 1
    if len(paths) > 1:
        channels = sum(int(i.shape[3]) if len(i.shape) == 4 else 1 for i in imgs)
    spatial = shp[:3] if len(shp) >= 3 else shp
    return _Header((channels,) + spatial, np.asarray(imgs[0].affine, dtype=np.float64), imgs[0].get_data_dtype())


class InputChecker:
    """The bundle's input check (see :func:`check_case`) with its settings, plus the record of the cases of a
    run that failed, listed by :meth:`report` at the end of the run (exit status 1).

    Args:
        in_channels: number of channels the network expects.
        channel_names: their names, for the messages (e.g. ``["FLAIR", "T1w", "T1gd", "T2w"]``).
        reader: image reader passed to ``LoadImage`` (default: MONAI's choice by file type).
        num_classes: classes incl. background (valid label values ``0..num_classes-1``).
        pixdim: the bundle's target spacing (mm) for the memory estimate.
        max_case_gb: memory budget of one case in GiB (None: unlimited).
        nonfinite: ``"error"`` or ``"replace"`` (see :func:`check_case`).
        modality: the bundle's modality, for the modality warning.
        affine_tol, allow_empty_label: see :func:`check_case`.
        action: what the run does with a case, for the summary ("segmented", "scored").
    """

    def __init__(self, in_channels: int, channel_names: Optional[Sequence[str]] = None, reader: Any = None,
                 num_classes: Optional[int] = None, pixdim: Optional[Sequence[float]] = None,
                 max_case_gb: Optional[float] = 16.0, nonfinite: str = "error", modality: Optional[str] = None,
                 affine_tol: float = 1e-3, allow_empty_label: bool = False, action: str = "segmented") -> None:
        if nonfinite not in ("error", "replace"):
            raise ValueError(f"nonfinite must be 'error' or 'replace', got {nonfinite!r}")
        self.in_channels = int(in_channels)
        self.channel_names = list(channel_names or [])
        self.reader = reader
        self.num_classes = None if num_classes is None else int(num_classes)
        self.pixdim = None if pixdim is None else [float(p) for p in pixdim]
        self.max_case_gb = None if max_case_gb is None else float(max_case_gb)
        self.nonfinite, self.modality = nonfinite, modality
        self.affine_tol, self.allow_empty_label = float(affine_tol), bool(allow_empty_label)
        self.action = action
        self.errors: List[str] = []
        self.notes: List[str] = []
        self.done: List[str] = []
        self.warned: set = set()
        self.checked = 0

    def expected(self) -> str:
        names = f" ({', '.join(self.channel_names)})" if self.channel_names else ""
        return f"a 3D volume with {self.in_channels} channel(s){names}"

    def settings(self) -> Dict[str, Any]:
        """Keyword arguments of :func:`check_case`."""
        return {"in_channels": self.in_channels, "num_classes": self.num_classes, "pixdim": self.pixdim,
                "max_case_gb": self.max_case_gb, "nonfinite": self.nonfinite, "affine_tol": self.affine_tol,
                "allow_empty_label": self.allow_empty_label, "modality": self.modality, "expected": self.expected()}

    def validate(self, image: Any, label: Any = None, src: Any = "", label_src: Any = "") -> Any:
        """:func:`check_case` with this checker's settings; returns the (possibly repaired) image.

        For NIfTI files the affine stored in the file is checked as well (``check_affine``): MONAI's reader
        replaces a degenerate one by the identity, while the output is written with the file's own."""
        for path in (src, label_src):
            try:
                header = _read_header(path) if path else None
            except Exception:  # noqa: BLE001 - the loaded image was readable; its header is checked below
                header = None
            if header is not None:
                check_affine(header.affine, _name(path))
        image, warnings = check_case(image, label, src=src, label_src=label_src, **self.settings())
        for w in warnings:  # once per file and process (a training pipeline sees a case every epoch)
            if w not in self.warned:
                self.warned.add(w)
                logger.warning(w)
        return image

    def _load(self, path: Any, what: str) -> Any:
        try:
            return LoadImage(image_only=True, ensure_channel_first=True, reader=self.reader)(path)
        except Exception as e:  # noqa: BLE001 - any reader failure is reported per file
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise CaseError(_name(path), "readable", f"unreadable ({type(e).__name__}: {reason[:300]}); expected a NIfTI "
                                                     f"file or DICOM series folder holding {what}") from None

    def check(self, item: Mapping[str, Any], full: bool = True) -> Optional[str]:
        """None when ``item`` (``{"image": ..., "label": ... optional}``) passes, else the message naming the file.
        ``full=False`` reads NIfTI headers only (shape, channels, affine, label grid, memory from the full extent)."""
        try:
            self._check(item, full)
        except CaseError as e:
            return str(e)
        return None

    def _check(self, item: Mapping[str, Any], full: bool) -> None:
        src, lsrc = item.get("image"), item.get("label")
        image = label = None
        if not full:
            try:
                image = _read_header(src)
                label = _read_header(lsrc) if lsrc is not None else None
            except Exception as e:  # noqa: BLE001
                raise CaseError(_name(src if image is None else lsrc), "readable",
                                f"unreadable header ({type(e).__name__}: {str(e)[:300]})") from None
        if image is None:
            image = self._load(src, self.expected())
        if lsrc is not None and label is None:
            label = self._load(lsrc, "a 3D label map")
        check_case(image, label, src=src, label_src=lsrc or "", **self.settings())

    def filter(self, items: Sequence[Mapping[str, Any]]) -> List[Mapping[str, Any]]:
        """The items that pass :meth:`check` (full read); the others are recorded for :meth:`report`."""
        good = []
        for item in items:
            self.checked += 1
            msg = self.check(item)
            if msg is None:
                good.append(item)
            else:
                self.errors.append(msg)
                logger.error("skipping input: %s", msg)
        return good

    def check_datalist(self, items: Sequence[Mapping[str, Any]], mode: str = "fast", what: str = "training cases") -> List[Mapping[str, Any]]:
        """Check every item before training starts; returns ``items`` or raises ValueError listing every bad case.

        ``mode``: ``"fast"`` (default) reads NIfTI headers only; ``"full"`` reads every voxel (NaN/Inf,
        empty foreground, label values); ``"off"`` skips the check. An empty list is refused."""
        if mode not in ("fast", "full", "off"):
            raise ValueError(f"data_check must be 'fast', 'full' or 'off', got {mode!r}")
        items = list(items)
        if not items:
            raise ValueError(f"no {what}: the datalist gives this run nothing to train or validate on")
        if mode == "off":
            return items
        bad = [m for m in (self.check(it, full=mode == "full") for it in items) if m]
        if bad:
            lines = "\n".join(f"  - {m}" for m in bad)
            raise ValueError(f"{len(bad)} of {len(items)} {what} failed the input check ({mode} mode); fix or remove "
                             f"them from the datalist:\n{lines}")
        logger.info("input check (%s) passed: %d %s", mode, len(items), what)
        return items

    def check_fold(self, fold_items: Sequence[Sequence[Mapping[str, Any]]], mode: str = "fast", fold: Any = "") -> List[List[Mapping[str, Any]]]:
        """:meth:`check_datalist` of a fold's ``(train_items, val_items)``, every bad case of both listed at once."""
        errors, out = [], []
        for items, what in zip(fold_items, ("training", "validation")):
            try:
                out.append(self.check_datalist(items, mode, f"{what} cases of fold {fold}"))
            except ValueError as e:
                errors.append(str(e))
        if errors:
            raise ValueError("\n".join(errors))
        return out

    # ------------------------------------------------------------ the record of a run

    def begin(self, items: Sequence[Any]) -> None:
        """Count ``items`` as the cases of this run (for the summary)."""
        self.checked += len(items)

    def fail(self, case: str, message: str) -> None:
        """Record a failed case (``message`` names the file, the step and the reason)."""
        self.errors.append(message)
        logger.error("case %s failed, going on with the next: %s", case, message)

    def succeed(self, case: str, note: str = "") -> None:
        self.done.append(f"{case}{': ' + note if note else ''}")

    def report(self) -> None:
        """Raise :class:`InputErrors` (exit status 1) listing every failed case; no-op when all were fine."""
        if self.checked == 0:
            raise InputErrors("no input images found")
        if self.notes:
            logger.warning("notes:\n%s", "\n".join(f"  - {n}" for n in self.notes))
        if self.errors:
            lines = "\n".join(f"  - {m}" for m in self.errors)
            ok = f"; {len(self.done)} {self.action} fine" if self.done else ""
            raise InputErrors(f"{len(self.errors)} of {self.checked} input(s) could not be {self.action}{ok}:\n{lines}")
        logger.info("all %d input(s) %s", self.checked, self.action)


class ValidateCased(MapTransform):
    """Run :func:`check_case` (with ``checker``'s settings) on ``data[image_key]`` and, when present,
    ``data[label_key]``; place it after ``EnsureChannelFirstd``. Raises :class:`CaseError` naming the file.

    Args:
        checker: the bundle's :class:`InputChecker`.
        image_key, label_key: keys of the channel-first image and (optional) label.
    """

    def __init__(self, checker: InputChecker, image_key: str = "image", label_key: str = "label",
                 keys: KeysCollection = "image") -> None:
        super().__init__(keys, allow_missing_keys=True)
        self.checker = checker
        self.image_key, self.label_key = image_key, label_key

    @staticmethod
    def _src(x: Any, fallback: Any) -> str:
        meta = getattr(x, "meta", None) or {}
        name = meta.get("filename_or_obj") or fallback
        return _name(name) if name else "<in-memory image>"

    def __call__(self, data: Mapping[Hashable, Any]) -> Dict[Hashable, Any]:
        d = dict(data)
        image, label = d[self.image_key], d.get(self.label_key)
        if label is not None and isinstance(label, (str, os.PathLike)):
            label = None  # not loaded here (e.g. MONAI Label's label path)
        src = self._src(image, d.get("image_path") or d.get("src"))
        d[self.image_key] = self.checker.validate(image, label, src=src,
                                                  label_src=self._src(label, None) if label is not None else "")
        return d
