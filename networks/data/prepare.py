"""Turn a public dataset download into a MONAI datalist JSON with the paper's 5 folds and test set.

Usage::

    python -m networks.data.prepare brats   --root /data/Task01_BrainTumour --output /data/brats_datalist.json
    python -m networks.data.prepare synapse --root /data/BTCV --output /data/synapse_datalist.json
    python -m networks.data.prepare acdc    --root /data/ACDC --output /data/acdc_datalist.json [--check_headers False]

Layouts read (``--root`` may be the folder named here or its parent):

* ``brats``: MSD ``Task01_BrainTumour/`` with ``imagesTr/BRATS_XXX.nii.gz`` (4D, 4 channels) and
  ``labelsTr/BRATS_XXX.nii.gz``. macOS ``._*`` files of the MSD archive are ignored.
* ``synapse``: BTCV ``RawData/Training/img/img0001.nii.gz`` and ``.../label/label0001.nii.gz``;
  split id ``abdomen_001`` is BTCV case ``0001``.
* ``acdc``: ``training/patientXXX/patientXXX_frameYY.nii.gz`` + ``patientXXX_frameYY_gt.nii.gz``
  (``patientXXX_4d.nii.gz`` and ``Info.cfg`` are not cases; ``Info.cfg`` gives the ED/ES frames).

Cases of the split files (``networks/data/splits/<dataset>.json``, copies of the paper's splits) go to
``training`` with the index of the fold that validates them; the dataset's other cases (Synapse 12,
BrainTumour 24, ACDC the frames of the 20 remaining patients) go to ``test``. Every problem (missing
file, unexpected case, unreadable file, image/label shape or affine mismatch) is collected and reported
in one error naming the case and file; the datalist is then not written. It is written atomically.
``--allow_missing True`` accepts a partial download: cases with a missing image or label file (and ACDC test
patients without a folder) are left out of the datalist and its folds, listed in its ``missing`` key and in a
summary; every other problem still fails. ``--splits my_splits.json`` replaces the paper's folds (a JSON list
of ``{"train": [ids], "val": [ids]}``, one per fold, in the format of ``networks/data/splits/``).
Image/label paths are relative to the datalist's directory (``--absolute True`` for absolute paths).
See :mod:`networks.data.datalist` for the keys and for reading it back.
"""

from __future__ import annotations

import json
import os
import re
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Set, Tuple

import nibabel as nib
import numpy as np

from ..flags import parse_flag
from .datalist import NUM_FOLDS

SPLITS_DIR = Path(__file__).resolve().parent / "splits"
AFFINE_ATOL = 1e-3  # mm; absorbs float32 rounding of the qform/sform between image and label headers

Paths = Tuple[Path, Path]  # (image, label)


class DatalistError(ValueError):
    """Raised with every problem found; ``problems`` holds them one per entry."""

    def __init__(self, header: str, problems: Sequence[str]):
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{header}: {len(self.problems)} problem(s)\n{lines}")


# --------------------------------------------------------------------------------------------------
# Dataset layouts: locate the folder, map a case id to its files, list the cases present on disk, and
# give the ids the paper's dataset is made of.


@dataclass(frozen=True)
class Layout:
    """How one public download is laid out and what it holds."""

    name: str
    meta: Dict[str, object]
    find_base: Callable[[Path], Path]
    case_paths: Callable[[Path, str], Paths]
    scan: Callable[[Path], Set[str]]
    expected_ids: Callable[[Path, Set[str], Set[str]], Tuple[Set[str], List[str]]]
    image_ndim: int
    channels: int = 1


def _find_dir(root: Path, candidates: Sequence[str], marker: str, what: str) -> Path:
    """Return the first ``root/candidate`` that holds ``marker``; raise naming every place looked at."""
    tried = []
    for cand in candidates:
        base = root / cand if cand else root
        if (base / marker).is_dir():
            return base
        tried.append(str(base / marker))
    raise DatalistError(f"{what} not found under {root}", [f"no folder {t}" for t in tried])


def _matching(folder: Path, pattern: re.Pattern) -> Dict[str, str]:
    """Map ``pattern`` group 1 to file name for the files of ``folder`` that fully match ``pattern``."""
    if not folder.is_dir():
        return {}
    return {m.group(1): f for f in sorted(os.listdir(folder)) if (m := pattern.fullmatch(f))}


# BraTS: MSD Task01_BrainTumour ------------------------------------------------------------------------

BRATS_RE = re.compile(r"(BRATS_\d{3})\.nii\.gz")
BRATS_NUM_CASES = 484  # BRATS_001 .. BRATS_484 in imagesTr


def brats_find_base(root: Path) -> Path:
    """The ``Task01_BrainTumour`` folder: ``root`` itself or ``root/Task01_BrainTumour``."""
    return _find_dir(root, ["", "Task01_BrainTumour"], "imagesTr", "MSD Task01_BrainTumour (imagesTr/)")


def brats_case_paths(base: Path, case_id: str) -> Paths:
    """``imagesTr/<id>.nii.gz`` and ``labelsTr/<id>.nii.gz``."""
    return base / "imagesTr" / f"{case_id}.nii.gz", base / "labelsTr" / f"{case_id}.nii.gz"


def brats_scan(base: Path) -> Set[str]:
    """Case ids with an image or a label file."""
    return set(_matching(base / "imagesTr", BRATS_RE)) | set(_matching(base / "labelsTr", BRATS_RE))


def brats_expected_ids(base: Path, split_ids: Set[str], present: Set[str]) -> Tuple[Set[str], List[str]]:
    """All MSD training cases BRATS_001..BRATS_484."""
    return {f"BRATS_{i:03d}" for i in range(1, BRATS_NUM_CASES + 1)}, []


# Synapse: BTCV RawData ------------------------------------------------------------------------------

BTCV_IMG_RE = re.compile(r"img(\d{4})\.nii\.gz")
BTCV_LABEL_RE = re.compile(r"label(\d{4})\.nii\.gz")
BTCV_CASES = list(range(1, 11)) + list(range(21, 41))  # the 30 labelled BTCV training scans


def synapse_id(btcv_number: str) -> str:
    """BTCV ``0001`` -> split id ``abdomen_001``."""
    return f"abdomen_{int(btcv_number):03d}"


def synapse_find_base(root: Path) -> Path:
    """The ``RawData/Training`` folder (holding ``img/`` and ``label/``) under ``root``."""
    cands = ["", "Training", "RawData/Training", "Abdomen/RawData/Training"]
    return _find_dir(root, cands, "img", "BTCV RawData/Training/img/")


def synapse_case_paths(base: Path, case_id: str) -> Paths:
    """``img/imgNNNN.nii.gz`` and ``label/labelNNNN.nii.gz`` for ``abdomen_NNN``."""
    m = re.fullmatch(r"abdomen_(\d+)", case_id)
    if m is None:
        raise DatalistError("bad Synapse case id", [f"{case_id!r} is not of the form abdomen_NNN"])
    n = int(m.group(1))
    return base / "img" / f"img{n:04d}.nii.gz", base / "label" / f"label{n:04d}.nii.gz"


def synapse_scan(base: Path) -> Set[str]:
    """Case ids (``abdomen_NNN``) with an image or a label file."""
    nums = set(_matching(base / "img", BTCV_IMG_RE)) | set(_matching(base / "label", BTCV_LABEL_RE))
    return {synapse_id(n) for n in nums}


def synapse_expected_ids(base: Path, split_ids: Set[str], present: Set[str]) -> Tuple[Set[str], List[str]]:
    """The 30 labelled BTCV training scans."""
    return {f"abdomen_{i:03d}" for i in BTCV_CASES}, []


# ACDC: training/patientXXX ----------------------------------------------------------------------------

ACDC_PATIENT_RE = re.compile(r"(patient\d{3})")
ACDC_FRAME_RE = re.compile(r"(patient\d{3}_frame\d{2})\.nii\.gz")
ACDC_GT_RE = re.compile(r"(patient\d{3}_frame\d{2})_gt\.nii\.gz")
ACDC_NUM_PATIENTS = 100


def acdc_find_base(root: Path) -> Path:
    """The ``training`` folder: ``root/training``, ``root/database/training`` or ``root`` itself."""
    for cand in ("training", "database/training"):
        if (root / cand).is_dir():
            return root / cand
    if any(ACDC_PATIENT_RE.fullmatch(p) for p in os.listdir(root)):
        return root
    raise DatalistError(f"ACDC training/ not found under {root}",
                        [f"no folder {root / 'training'}, {root / 'database/training'} or patientXXX/ in {root}"])


def acdc_case_paths(base: Path, case_id: str) -> Paths:
    """``patientXXX/patientXXX_frameYY.nii.gz`` and ``..._gt.nii.gz``."""
    patient = case_id.split("_")[0]
    return base / patient / f"{case_id}.nii.gz", base / patient / f"{case_id}_gt.nii.gz"


def acdc_scan(base: Path) -> Set[str]:
    """Frame ids with an image or a ground-truth file (``_4d`` volumes and ``Info.cfg`` are skipped)."""
    ids: Set[str] = set()
    for patient in sorted(os.listdir(base)):
        if ACDC_PATIENT_RE.fullmatch(patient):
            found = set(_matching(base / patient, ACDC_FRAME_RE)) | set(_matching(base / patient, ACDC_GT_RE))
            ids |= {i for i in found if i.startswith(patient + "_")}
    return ids


def acdc_info_frames(info_cfg: Path) -> List[int]:
    """The ED and ES frame numbers of an ACDC ``Info.cfg`` (``ED: 1`` / ``ES: 12`` lines)."""
    values = {}
    for line in info_cfg.read_text().splitlines():
        key, _, value = line.partition(":")
        values[key.strip()] = value.strip()
    return sorted({int(values["ED"]), int(values["ES"])})


def acdc_expected_ids(base: Path, split_ids: Set[str], present: Set[str]) -> Tuple[Set[str], List[str]]:
    """Split frames plus the ED/ES frames of the patients absent from the splits.

    The ED/ES frames come from the patient's ``Info.cfg``; without one, the frames found on disk count.
    """
    split_patients = {i.split("_")[0] for i in split_ids}
    expected, problems = set(split_ids), []
    for n in range(1, ACDC_NUM_PATIENTS + 1):
        patient = f"patient{n:03d}"
        if patient in split_patients:
            continue
        info = base / patient / "Info.cfg"
        on_disk = {i for i in present if i.startswith(patient + "_")}
        if not (base / patient).is_dir():
            problems.append(f"{patient}: missing test patient folder {base / patient}")
        elif info.is_file():
            try:
                expected |= {f"{patient}_frame{f:02d}" for f in acdc_info_frames(info)}
            except (OSError, KeyError, ValueError) as e:
                problems.append(f"{patient}: cannot read ED/ES frames from {info}: {type(e).__name__}: {e}")
                expected |= on_disk
        elif on_disk:
            expected |= on_disk
        else:
            problems.append(f"{patient}: no patientXXX_frameYY.nii.gz and no Info.cfg in {base / patient}")
    return expected, problems


# --------------------------------------------------------------------------------------------------

LAYOUTS: Dict[str, Layout] = {
    "brats": Layout(
        "brats",
        {
            "name": "BrainTumour (MSD Task01)",
            "description": "Gliomas segmentation: tumour and oedema in brain MRI",
            "tensorImageSize": "4D",
            "modality": {"0": "FLAIR", "1": "T1w", "2": "t1gd", "3": "T2w"},
            "labels": {"0": "background", "1": "edema", "2": "non-enhancing tumor", "3": "enhancing tumour"},
        },
        brats_find_base, brats_case_paths, brats_scan, brats_expected_ids, image_ndim=4, channels=4,
    ),
    "synapse": Layout(
        "synapse",
        {
            "name": "Synapse multi-organ (BTCV)",
            "description": "MICCAI 2015 Multi-Atlas Abdomen Labeling Challenge, 13 abdominal organs in CT",
            "tensorImageSize": "3D",
            "modality": {"0": "CT"},
            "labels": {
                "0": "background", "1": "spleen", "2": "right kidney", "3": "left kidney", "4": "gallbladder",
                "5": "esophagus", "6": "liver", "7": "stomach", "8": "aorta", "9": "inferior vena cava",
                "10": "portal vein and splenic vein", "11": "pancreas", "12": "right adrenal gland",
                "13": "left adrenal gland",
            },
        },
        synapse_find_base, synapse_case_paths, synapse_scan, synapse_expected_ids, image_ndim=3,
    ),
    "acdc": Layout(
        "acdc",
        {
            "name": "ACDC",
            "description": "Automated Cardiac Diagnosis Challenge, cine MRI at end-diastole and end-systole",
            "tensorImageSize": "3D",
            "modality": {"0": "cineMRI"},
            "labels": {"0": "background", "1": "right ventricle", "2": "myocardium", "3": "left ventricle cavity"},
        },
        acdc_find_base, acdc_case_paths, acdc_scan, acdc_expected_ids, image_ndim=3,
    ),
}


# Splits ---------------------------------------------------------------------------------------------


def load_splits(path: Path) -> List[Dict[str, List[str]]]:
    """Load and check a split file: ``NUM_FOLDS`` entries of ``{"train": [...], "val": [...]}`` whose
    ``val`` lists partition the cases and whose ``train`` lists are the complement of ``val``."""
    try:
        folds = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise DatalistError(f"cannot read split file {path}", [f"{type(e).__name__}: {e}"]) from None
    ok = isinstance(folds, list) and len(folds) == NUM_FOLDS and all(
        isinstance(f, dict) and isinstance(f.get("train"), list) and isinstance(f.get("val"), list) for f in folds)
    if not ok:
        want = f'expected a list of {NUM_FOLDS} {{"train": [...], "val": [...]}}'
        raise DatalistError(f"bad split file {path}", [want])
    problems = []
    everything = set().union(*(set(f["train"]) | set(f["val"]) for f in folds))
    seen: Dict[str, int] = {}
    for k, fold in enumerate(folds):
        train, val = set(fold["train"]), set(fold["val"])
        for case in sorted(val & set(seen)):
            problems.append(f"{case} is in the val list of folds {seen[case]} and {k}")
        seen.update({c: k for c in val})
        if train | val != everything or train & val:
            problems.append(f"fold {k}: train is not the complement of val")
    if set(seen) != everything:
        problems.append(f"cases in no val list: {sorted(everything - set(seen))}")
    if problems:
        raise DatalistError(f"inconsistent split file {path}", problems)
    return [{"train": list(f["train"]), "val": list(f["val"])} for f in folds]


def fold_of(folds: List[Dict[str, List[str]]]) -> Dict[str, int]:
    """Map each case id to the index of the fold whose ``val`` list holds it."""
    return {case: k for k, fold in enumerate(folds) for case in fold["val"]}


# Checks ---------------------------------------------------------------------------------------------


def check_files(case_id: str, paths: Paths) -> List[str]:
    """Problems for a case whose image or label file is absent."""
    return [f"{case_id}: missing {kind} {p}" for kind, p in zip(("image", "label"), paths) if not p.is_file()]


def _load_header(path: Path):
    img = nib.load(str(path))  # reads the header only; the data stay behind a proxy
    _ = img.affine, img.shape
    return img


def check_case_headers(case_id: str, paths: Paths, layout: Layout, atol: float = AFFINE_ATOL) -> List[str]:
    """Problems found in the image/label headers: unreadable file, wrong dimensions, shape or affine mismatch."""
    headers, problems = [], []
    for kind, p in zip(("image", "label"), paths):
        try:
            headers.append(_load_header(p))
        except Exception as e:  # nibabel raises many types for corrupt files; name the file whatever it is
            problems.append(f"{case_id}: unreadable {kind} {p}: {type(e).__name__}: {e}")
    if problems:
        return problems
    image, label = headers
    img_shape, lbl_shape = tuple(image.shape), tuple(label.shape)
    want = f"{layout.image_ndim}D" + (f" with {layout.channels} channels" if layout.channels > 1 else "")
    if len(img_shape) != layout.image_ndim or (layout.channels > 1 and img_shape[-1] != layout.channels):
        problems.append(f"{case_id}: image {paths[0]} has shape {img_shape}, expected {want}")
    if img_shape[:3] != lbl_shape:
        problems.append(f"{case_id}: shape mismatch: image {paths[0]} {img_shape} vs label {paths[1]} {lbl_shape}")
    if not np.allclose(image.affine, label.affine, rtol=0, atol=atol):
        diff = float(np.abs(image.affine - label.affine).max())
        problems.append(
            f"{case_id}: affine mismatch (max abs difference {diff:.3g} > {atol:g}): "
            f"image {paths[0]} vs label {paths[1]}"
        )
    return problems


# Datalist -------------------------------------------------------------------------------------------


def _entry_path(path: Path, out_dir: Path, absolute: bool) -> str:
    path = path.resolve()
    return str(path) if absolute else Path(os.path.relpath(path, out_dir)).as_posix()


def is_missing(problem: str) -> bool:
    """A problem that only says that a file or folder is absent (``"<case>: missing ..."``)."""
    return ": missing " in problem


def collect(layout: Layout, root: Path, folds: List[Dict[str, List[str]]], headers: bool = True,
            atol: float = AFFINE_ATOL) -> Tuple[Dict[str, Paths], List[str], List[str]]:
    """Find every case of the download.

    Returns ``(paths by id, test ids, problems)``: split cases missing from the download, held-out test
    cases missing or unexpected, and (with ``headers``) unreadable or mismatched files are all problems
    (:func:`is_missing` tells the absent files apart).
    """
    base = layout.find_base(root)
    split_ids = set(fold_of(folds))
    present = layout.scan(base)
    expected, problems = layout.expected_ids(base, split_ids, present)
    if not split_ids <= expected:
        problems += [f"{c}: split case is not a case of the {layout.name} dataset"
                     for c in sorted(split_ids - expected)]
    problems += [f"{c}: unexpected case in {base} (neither in the splits nor in the paper's test set)"
                 for c in sorted(present - expected)]
    test_ids = sorted(expected - split_ids)
    paths = {c: layout.case_paths(base, c) for c in sorted(split_ids) + test_ids}
    from networks.bundle.progress import Progress  # torch/MONAI imports: only when there is work to report

    with Progress(len(paths), f"{layout.name}: checking cases", "cases") as progress:
        for case, p in paths.items():
            missing = check_files(case, p)
            problems += missing
            if headers and not missing:
                problems += check_case_headers(case, p, layout, atol)
            progress.update()
    return paths, test_ids, problems


def drop_missing(folds: List[Dict[str, List[str]]], paths: Dict[str, Paths], test_ids: List[str],
                 missing: List[str]) -> Tuple[List[Dict[str, List[str]]], Dict[str, Paths], List[str]]:
    """Folds, paths and test ids without the cases named by the ``missing`` problems."""
    gone = {m.split(":", 1)[0] for m in missing}
    # an ACDC test patient without a folder is named by patient, its frames by "<patient>_frameYY"
    keep = [c for c in paths if c not in gone and c.split("_frame")[0] not in gone]
    folds = [{k: [c for c in f[k] if c in keep] for k in f} for f in folds]
    return folds, {c: paths[c] for c in keep}, [c for c in test_ids if c in keep]


def missing_summary(dataset: str, full_folds, folds, full_test: List[str], test_ids: List[str],
                    missing: List[str]) -> str:
    """One paragraph: what a partial datalist holds and every missing file."""
    sizes = ", ".join(f"{len(f['val'])}/{len(g['val'])}" for f, g in zip(folds, full_folds))
    n_train = sum(len(f["val"]) for f in folds)
    n_full = sum(len(f["val"]) for f in full_folds)
    lines = "\n".join(f"  - {m}" for m in missing)
    return (f"partial {dataset} dataset: {n_train} of {n_full} training cases (validation cases per fold: {sizes}), "
            f"{len(test_ids)} of {len(full_test)} test cases; {len(missing)} missing file(s) or folder(s):\n{lines}")


def build_datalist(layout: Layout, folds, paths: Dict[str, Paths], test_ids: List[str], out_dir: Path,
                   absolute: bool = False, source: Optional[dict] = None) -> dict:
    """The datalist dictionary (keys documented in :mod:`networks.data.datalist`)."""

    def item(case: str) -> dict:
        image, label = paths[case]
        return {"id": case, "image": _entry_path(image, out_dir, absolute),
                "label": _entry_path(label, out_dir, absolute)}

    fold = fold_of(folds)
    training = [dict(item(c), fold=fold[c]) for c in sorted(fold)]
    return {
        **layout.meta,
        "dataset": layout.name,
        "num_folds": len(folds),
        "numTraining": len(training),
        "numTest": len(test_ids),
        "source": dict(source or {}, paths="absolute" if absolute else "relative to this file's directory"),
        "folds": folds,
        "training": training,
        "test": [item(c) for c in test_ids],
    }


def write_json_atomic(data: dict, output: Path) -> None:
    """Write ``data`` to ``output`` through a temporary file in the same folder and ``os.replace``."""
    output.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{output.name}.", suffix=".tmp", dir=output.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, output)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _as_bool(value, name: str) -> bool:
    return parse_flag(value, f"--{name}")


def prepare(dataset: str, root: str, output: str, check_headers: bool = True, splits: Optional[str] = None,
            absolute: bool = False, affine_atol: float = AFFINE_ATOL, allow_missing: bool = False) -> dict:
    """Write the datalist of ``dataset`` (brats, synapse or acdc) found under ``root`` to ``output``.

    ``check_headers`` reads every image/label header (unreadable files, shape and affine mismatches);
    ``splits`` overrides the packaged split file; ``absolute`` writes absolute instead of relative paths;
    ``allow_missing`` leaves cases with absent files out (listed under the datalist's ``missing`` key and
    in ``summary``) instead of failing. Raises :class:`DatalistError` listing every problem; nothing is written
    then. Returns the datalist.
    """
    if dataset not in LAYOUTS:
        raise DatalistError("unknown dataset", [f"{dataset!r}: choose one of {sorted(LAYOUTS)}"])
    layout = LAYOUTS[dataset]
    root_path, out_path = Path(root).expanduser().resolve(), Path(output).expanduser().resolve()
    if not root_path.is_dir():
        raise DatalistError(f"{dataset}: --root", [f"{root_path} is not a folder"])
    split_path = Path(splits) if splits else SPLITS_DIR / f"{dataset}.json"
    folds = load_splits(split_path)
    headers = _as_bool(check_headers, "check_headers")
    paths, test_ids, problems = collect(layout, root_path, folds, headers, float(affine_atol))
    missing: List[str] = []
    if _as_bool(allow_missing, "allow_missing"):
        missing = [p for p in problems if is_missing(p)]
        problems = [p for p in problems if not is_missing(p)]
    if problems:
        raise DatalistError(f"{dataset}: {root_path} does not match the paper's dataset; {out_path} not written",
                            problems)
    source = {"root": str(root_path), "splits": split_path.name, "check_headers": headers}
    summary = ""
    if missing:
        full_folds, full_test = folds, test_ids
        folds, paths, test_ids = drop_missing(folds, paths, test_ids, missing)
        if not any(f["val"] for f in folds):
            raise DatalistError(f"{dataset}: no case of the splits found under {root_path}; {out_path} not written", missing)
        summary = missing_summary(dataset, full_folds, folds, full_test, test_ids, missing)
    data = build_datalist(layout, folds, paths, test_ids, out_path.parent, _as_bool(absolute, "absolute"), source)
    if missing:
        data["missing"] = missing
        data["summary"] = summary
    write_json_atomic(data, out_path)
    return data


def main(dataset: str, root: str, output: str, check_headers: bool = True, splits: Optional[str] = None,
         absolute: bool = False, affine_atol: float = AFFINE_ATOL, allow_missing: bool = False) -> None:
    """CLI: prepare the datalist; print a summary, or every problem and exit with status 1."""
    import logging

    logging.basicConfig(level=logging.INFO, format="%(message)s")  # the progress lines when not on a terminal
    try:
        data = prepare(dataset, root, output, check_headers, splits, absolute, affine_atol, allow_missing)
    except DatalistError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    if data.get("summary"):
        print(data["summary"])
    print(f"wrote {Path(output).resolve()}: {data['numTraining']} training cases in {data['num_folds']} folds, "
          f"{data['numTest']} test cases")


if __name__ == "__main__":
    import fire

    fire.Fire(main)
