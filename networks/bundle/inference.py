"""Inference helpers for the bundles' ``inference.json``.

* :func:`list_inputs`: every image of a folder (NIfTI files, nnU-Net style ``<case>_0000.nii.gz`` channel
  files grouped per case, DICOM series folders) or of a datalist JSON.
* :func:`plan_outputs`: one output file per input (name collisions resolved deterministically and
  reported), existing outputs kept unless ``overwrite``, the output folder checked writable before any case
  is computed. (Input checks: :mod:`.validation`; per-case isolation: :mod:`.isolation`.)
* :class:`PlainTensorInferer` / :class:`MirrorTTAInferer`: run any MONAI inferer on plain tensors, with
  optional mirroring test-time augmentation (nnU-Net style: mean of the logits over all flips).
* :class:`SaveOnInputGridd`: writes the label map as uint8 NIfTI with the input file's exact shape,
  affine and qform/sform codes (after the bundle has inverted its preprocessing with ``Invertd``).
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import re
import tempfile
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

import nibabel as nib
import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.inferers import Inferer, SimpleInferer
from monai.transforms import MapTransform

from ..flags import parse_flag
from .validation import InputChecker, InputErrors

__all__ = ["list_inputs", "plan_outputs", "check_writable", "output_path", "InputChecker", "InputErrors",
           "PlainTensorInferer", "MirrorTTAInferer", "SaveOnInputGridd"]

logger = logging.getLogger(__name__)

_NIFTI = re.compile(r"\.nii(\.gz)?$", re.IGNORECASE)
_CHANNEL_FILE = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})\.nii(\.gz)?$", re.IGNORECASE)

Item = Dict[str, Any]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _case_id(path: str) -> str:
    name = os.path.basename(os.path.normpath(path))
    return _NIFTI.sub("", name)


def _item(image: Union[str, List[str]], case_id: Optional[str] = None) -> Item:
    first = image[0] if isinstance(image, list) else image
    return {"image": image, "src": first, "id": case_id or _case_id(first)}


def _is_dicom_file(path: str) -> bool:
    """A DICOM Part 10 file: ``DICM`` after the 128-byte preamble."""
    try:
        with open(path, "rb") as f:
            return f.read(132)[128:] == b"DICM"
    except OSError:
        return False


def _is_dicom_series(folder: str) -> bool:
    """``folder`` directly holds DICOM files (a series given itself as the input folder)."""
    return any(not f.startswith(".") and os.path.isfile(os.path.join(folder, f)) and _is_dicom_file(os.path.join(folder, f))
               for f in os.listdir(folder))


def _scan_folder(folder: str) -> List[Item]:
    if not os.path.isdir(folder):
        raise SystemExit(f"input folder not found: {folder} (expected a folder of NIfTI files / DICOM series folders)")
    if _is_dicom_series(folder) and not any(_NIFTI.search(f) for f in os.listdir(folder)):
        logger.info("%s is a DICOM series: segmenting it as one case", folder)
        return [_item(folder)]
    singles: List[Item] = []
    grouped: Dict[str, Dict[int, str]] = {}
    skipped = []
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if name.startswith("."):
            continue
        if os.path.isdir(path):
            # a DICOM series folder: holds files other than NIfTI (a folder of NIfTI files, e.g. an earlier
            # output_dir, is not an input)
            if any(not f.startswith(".") and not _NIFTI.search(f) and os.path.isfile(os.path.join(path, f))
                   for f in os.listdir(path)):
                singles.append(_item(path))
            continue
        m = _CHANNEL_FILE.match(name)
        if m:
            grouped.setdefault(m.group("case"), {})[int(m.group("channel"))] = path
        elif _NIFTI.search(name):
            singles.append(_item(path))
        else:
            skipped.append(name)
    if skipped:
        logger.warning("ignored %d non-image file(s) in %s: %s", len(skipped), folder, ", ".join(skipped))
    for case, channels in grouped.items():
        files = [channels[c] for c in sorted(channels)]
        singles.append(_item(files if len(files) > 1 else files[0], case))
    return sorted(singles, key=lambda it: it["id"])


def _read_datalist(path: str, key: str) -> List[Item]:
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise SystemExit(f"cannot read datalist {path}: {e}") from None
    entries = data.get(key) if isinstance(data, dict) else data
    if not isinstance(entries, list):
        raise SystemExit(f"datalist {path} has no list of inputs under key {key!r}")
    base = os.path.dirname(os.path.abspath(path))

    def resolve(p: str) -> str:
        return p if os.path.isabs(p) else os.path.normpath(os.path.join(base, p))

    items = []
    for e in entries:
        if isinstance(e, dict) and "image" not in e:
            raise SystemExit(f"datalist {path}: entry {e} has no 'image' key")
        image = e["image"] if isinstance(e, dict) else e
        image = [resolve(p) for p in image] if isinstance(image, list) else resolve(image)
        items.append(_item(image, e.get("id") if isinstance(e, dict) else None))
    return items


def list_inputs(dataset_dir: Optional[str] = None, datalist: Optional[str] = None, datalist_key: str = "test") -> List[Item]:
    """Inputs to segment: ``{"image": path or [channel paths], "src": first path, "id": case id}`` items.

    With ``datalist`` (a JSON file: a list of paths / ``{"image": ...}`` dicts, or an object whose
    ``datalist_key`` entry is such a list, e.g. the ``test`` list of ``networks.data.prepare``), its
    entries (relative paths resolved against the datalist's folder); otherwise every image of
    ``dataset_dir``: ``*.nii`` / ``*.nii.gz`` files (``<case>_0000.nii.gz``, ``<case>_0001.nii.gz``, ...
    grouped as the channels of one case) and sub-folders holding a DICOM series. Other files are skipped
    with a warning. A ``dataset_dir`` that itself holds the DICOM files of one series (and no NIfTI file) is
    that one case.
    """
    if datalist:
        return _read_datalist(os.fspath(datalist), datalist_key)
    if not dataset_dir:
        raise SystemExit("no input: set dataset_dir (a folder of images) or datalist (a JSON file)")
    return _scan_folder(os.fspath(dataset_dir))


def output_path(output_dir: str, case: str, output_postfix: str = "seg") -> str:
    """Where :class:`SaveOnInputGridd` writes the label map of case ``case``."""
    return os.path.join(os.fspath(output_dir), f"{case}_{output_postfix}.nii.gz")


def check_writable(output_dir: str) -> None:
    """Create ``output_dir`` and write (then remove) a probe file in it; SystemExit naming the folder when
    that fails, so that an unusable folder is refused before any case is computed."""
    folder = os.fspath(output_dir)
    try:
        os.makedirs(folder, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write_probe.", dir=folder)
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise SystemExit(f"output folder {folder} is not writable ({type(e).__name__}: {e}); "
                         "choose another with --output_dir") from None


def plan_outputs(items: Sequence[Item], output_dir: str, output_postfix: str = "seg", overwrite: bool = False,
                 checker: Optional[InputChecker] = None) -> List[Item]:
    """Give every input its own output file and keep existing outputs; returns the items to compute.

    * ``output_dir`` must be writable (:func:`check_writable`), checked before any case is computed.
    * Inputs whose names reduce to the same case id (``good.nii`` and ``good.nii.gz``; ``good.nii.gz`` and
      ``good_0000.nii.gz``) get distinct ids: in the order of their paths, the first keeps the id, the next
      ones ``<id>_2``, ``<id>_3``, ... (an id no other input has). Each rename is logged and listed in the
      run's summary.
    * An input whose output already exists is not computed unless ``overwrite`` (``--overwrite True``); it
      is recorded as failed in ``checker`` (the run then ends with exit status 1 naming it).
    """
    check_writable(output_dir)
    items = sorted((dict(it) for it in items), key=lambda it: (str(it["id"]), str(it["src"])))
    taken = {str(it["id"]) for it in items}
    seen: Dict[str, str] = {}
    keep: List[Item] = []
    for it in items:
        case = str(it["id"])
        if case in seen:
            n = 2
            while f"{case}_{n}" in taken:
                n += 1
            new = f"{case}_{n}"
            taken.add(new)
            note = (f"{it['src']} and {seen[case]} both map to {os.path.basename(output_path(output_dir, case, output_postfix))}: "
                    f"{it['src']} is written as {os.path.basename(output_path(output_dir, new, output_postfix))}")
            logger.warning("name collision: %s", note)
            if checker is not None:
                checker.notes.append(note)
            it["id"] = case = new
        seen[case] = str(it["src"])
        out = output_path(output_dir, case, output_postfix)
        if os.path.exists(out) and not parse_flag(overwrite, "overwrite"):
            if checker is None:
                raise FileExistsError(f"{out} exists (pass --overwrite True to replace it)")
            checker.checked += 1
            checker.fail(case, f"{it['src']}: output: {out} already exists and is kept (pass --overwrite True to replace it)")
            continue
        keep.append(it)
    return keep


class PlainTensorInferer(Inferer):
    """Run ``inferer`` (default ``SimpleInferer``) on the plain-tensor view of a MetaTensor input.

    The network then never sees MONAI's MetaTensor (whose per-op ``__torch_function__`` overhead is large for
    the many small ops of a selective scan, and which not every custom op supports); the batch keeps its
    MetaTensor, so ``Invertd`` still finds the applied transforms.
    """

    def __init__(self, inferer: Optional[Inferer] = None) -> None:
        super().__init__()
        self.inferer = inferer if inferer is not None else SimpleInferer()

    def _infer(self, inputs: torch.Tensor, network: Any, *args: Any, **kwargs: Any) -> Any:
        return self.inferer(inputs, network, *args, **kwargs)

    def __call__(self, inputs: torch.Tensor, network: Any, *args: Any, **kwargs: Any) -> Any:
        if not isinstance(inputs, MetaTensor):
            return self._infer(inputs, network, *args, **kwargs)
        out = self._infer(inputs.as_tensor(), network, *args, **kwargs)
        if isinstance(out, torch.Tensor) and not isinstance(out, MetaTensor):
            # a MetaTensor prediction again: MONAI's Invertd silently skips plain tensors
            out = MetaTensor(out, meta=dict(inputs.meta))
        return out


class MirrorTTAInferer(PlainTensorInferer):
    """:class:`PlainTensorInferer` with optional mirroring test-time augmentation: with ``mirror_axes``
    (spatial axes, e.g. ``[0, 1, 2]``) the output is the mean over the input flipped along every subset of
    them (each flipped back), as nnU-Net's mirroring; empty ``mirror_axes``: one plain pass."""

    def __init__(self, inferer: Optional[Inferer] = None, mirror_axes: Sequence[int] = ()) -> None:
        super().__init__(inferer)
        self.mirror_axes = [int(a) for a in (mirror_axes or [])]

    def _infer(self, inputs: torch.Tensor, network: Any, *args: Any, **kwargs: Any) -> Any:
        out = self.inferer(inputs, network, *args, **kwargs)
        if not self.mirror_axes:
            return out
        dims = [a + 2 for a in self.mirror_axes]
        flips = [c for r in range(1, len(dims) + 1) for c in itertools.combinations(dims, r)]
        for f in flips:
            out = out + torch.flip(self.inferer(torch.flip(inputs, f), network, *args, **kwargs), f)
        return out / (len(flips) + 1)


def _axcodes(codes: Optional[str]) -> Optional[str]:
    """Validate an ``output_orientation``: None / "" or three letters, one of each pair L/R, A/P, S/I."""
    if codes is None or str(codes).strip().lower() in ("", "none", "null"):
        return None
    c = str(codes).strip().upper()
    if len(c) != 3 or any(len(set(c) & set(pair)) != 1 for pair in ("LR", "AP", "SI")):
        raise ValueError(f"output_orientation {codes!r}: expected three axis codes, one of each of L/R, A/P, S/I "
                         "(e.g. LAS, RAS, LPS), or None for the input's own grid")
    return c


class SaveOnInputGridd(MapTransform):
    """Write ``data[key]`` (a (1, *spatial) label map already on the input's grid) as a uint8 NIfTI.

    The output ``<output_dir>/<id>_<output_postfix>.nii.gz`` copies the input NIfTI's affine, qform/sform and
    codes (``data[src_key]`` is the input path); for a DICOM series the affine of the loaded image is used, i.e.
    the voxel grid of MONAI's DICOM reader (rows, columns, slices as the reader orders them). A shape that
    differs from the input's raises an error naming the file. The path written is stored in ``data[f"{key}_file"]``.
    An existing output file is refused (FileExistsError) unless ``overwrite``.

    ``output_orientation`` (e.g. ``"LAS"``, the grid of dcm2niix / TotalSegmentator NIfTI files, or ``"RAS"``):
    the label map is instead written with its voxel axes permuted / flipped to point towards these nibabel axis
    codes (same voxels, same world positions, only the array order and the affine change). Default ``None``:
    the input's own grid.
    """

    def __init__(self, keys: KeysCollection, output_dir: str, output_postfix: str = "seg", src_key: str = "src",
                 id_key: str = "id", allow_missing_keys: bool = False, overwrite: bool = False,
                 output_orientation: Optional[str] = None) -> None:
        super().__init__(keys, allow_missing_keys)
        self.overwrite = parse_flag(overwrite, "overwrite")
        self.output_dir = os.fspath(output_dir)
        self.output_postfix = output_postfix
        self.src_key, self.id_key = src_key, id_key
        self.output_orientation = _axcodes(output_orientation)

    def __call__(self, data: Mapping[Any, Any]) -> Dict[Any, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            pred = d[key]
            meta = dict(getattr(pred, "meta", {}) or {})
            src = d.get(self.src_key) or meta.get("filename_or_obj")
            src = str(src[0] if isinstance(src, (list, tuple)) else src)
            case = d.get(self.id_key) or _case_id(src)
            arr = np.asarray(pred.detach().cpu() if isinstance(pred, torch.Tensor) else pred)
            if arr.ndim == 4:
                arr = arr[0]
            if arr.min() < 0 or arr.max() > 255:
                raise ValueError(f"{src}: label values {arr.min()}..{arr.max()} do not fit uint8")
            arr = np.rint(arr).astype(np.uint8)
            if os.path.isfile(src) and _NIFTI.search(src):
                ref = nib.load(src)
                if tuple(arr.shape) != tuple(ref.shape[:3]):
                    raise ValueError(f"{src}: prediction shape {arr.shape} differs from the input's {ref.shape[:3]}")
                hdr = ref.header.copy()
                hdr.set_data_dtype(np.uint8)
                img = nib.Nifti1Image(arr, ref.affine, hdr)
                img.set_qform(ref.header.get_qform(), code=int(ref.header["qform_code"]))
                img.set_sform(ref.header.get_sform(), code=int(ref.header["sform_code"]))
                img.header.set_slope_inter(1.0, 0.0)
            else:
                affine = np.asarray(torch.as_tensor(getattr(pred, "affine", np.eye(4))).cpu(), dtype=np.float64)
                img = nib.Nifti1Image(arr, affine)
            if self.output_orientation:
                img = img.as_reoriented(nib.orientations.ornt_transform(
                    nib.orientations.io_orientation(img.affine), nib.orientations.axcodes2ornt(self.output_orientation)))
            os.makedirs(self.output_dir, exist_ok=True)
            out = output_path(self.output_dir, case, self.output_postfix)
            if os.path.exists(out) and not self.overwrite:
                raise FileExistsError(f"{out} already exists and is kept (pass --overwrite True to replace it)")
            fd, tmp = tempfile.mkstemp(suffix=".nii.gz", prefix=f".{case}.", dir=self.output_dir)
            os.close(fd)
            try:
                nib.save(img, tmp)
                os.chmod(tmp, 0o666 & ~_umask())
                os.replace(tmp, out)
            finally:
                if os.path.exists(tmp):
                    os.remove(tmp)
            logger.info("wrote %s", out)
            d[f"{key}_file"] = out
        return d
