"""Datalist preparation (networks.data.prepare) and loading (networks.data.datalist) on fake downloads.

The fake trees copy the public layouts with tiny NIfTI files; their case ids come from the packaged
split files, plus the held-out test cases the paper's datasets hold.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from networks.data import load_fold, load_split, load_test
from networks.data.prepare import SPLITS_DIR, DatalistError, load_splits, prepare

REFERENCE_SPLITS = Path(__file__).resolve().parent.parent.parent / "shared" / "reference" / "splits"  # shared/ beside the checkout
REPO = Path(__file__).resolve().parents[1]


def splits(dataset):
    return json.loads((SPLITS_DIR / f"{dataset}.json").read_text())


def split_ids(dataset):
    return sorted({c for fold in splits(dataset) for c in fold["val"]})


def save_nifti(path, shape, dtype=np.uint8, affine=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.zeros(shape, dtype), np.eye(4) if affine is None else affine), str(path))
    return path


class Templates:
    """One tiny file per kind, copied byte for byte into the trees (fast even for ~1000 files)."""

    def __init__(self, folder):
        self.img3 = save_nifti(folder / "img3.nii.gz", (2, 2, 2), np.int16)
        self.img4 = save_nifti(folder / "img4.nii.gz", (2, 2, 2, 4), np.int16)
        self.lbl = save_nifti(folder / "lbl.nii.gz", (2, 2, 2))


@pytest.fixture(scope="module")
def templates(tmp_path_factory):
    return Templates(tmp_path_factory.mktemp("templates"))


def copy(src, dst):
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dst)


def make_brats(root, t):
    base = root / "Task01_BrainTumour"
    for n in range(1, 485):
        copy(t.img4, base / "imagesTr" / f"BRATS_{n:03d}.nii.gz")
        copy(t.lbl, base / "labelsTr" / f"BRATS_{n:03d}.nii.gz")
    (base / "imagesTr" / "._BRATS_001.nii.gz").write_bytes(b"\x00\x05\x16\x07 macOS resource fork")
    copy(t.img4, base / "imagesTs" / "BRATS_485.nii.gz")  # unlabelled MSD test images are not read
    (base / "dataset.json").write_text("{}")
    return base


def make_synapse(root, t):
    base = root / "RawData" / "Training"
    for n in list(range(1, 11)) + list(range(21, 41)):
        copy(t.img3, base / "img" / f"img{n:04d}.nii.gz")
        copy(t.lbl, base / "label" / f"label{n:04d}.nii.gz")
    copy(t.img3, root / "RawData" / "Testing" / "img" / "img0061.nii.gz")
    return base


def make_acdc(root, t):
    base = root / "training"
    frames = {}
    for case in split_ids("acdc"):
        patient, frame = case.split("_frame")
        frames.setdefault(patient, []).append(int(frame))
    for n in range(1, 101):
        patient = f"patient{n:03d}"
        ed, es = sorted(frames.get(patient, [1, 10]))
        (base / patient).mkdir(parents=True)
        (base / patient / "Info.cfg").write_text(f"ED: {ed}\nES: {es}\nGroup: NOR\nHeight: 180.0\nNbFrame: 30\n")
        copy(t.img4, base / patient / f"{patient}_4d.nii.gz")
        for f in (ed, es):
            copy(t.img3, base / patient / f"{patient}_frame{f:02d}.nii.gz")
            copy(t.lbl, base / patient / f"{patient}_frame{f:02d}_gt.nii.gz")
    (root / "MANDATORY_CITATION.md").write_text("cite")
    return base


MAKERS = {"brats": make_brats, "synapse": make_synapse, "acdc": make_acdc}
NUM_TEST = {"brats": 24, "synapse": 12, "acdc": 40}


@pytest.fixture
def synapse(tmp_path, templates):
    root = tmp_path / "BTCV"
    return root, make_synapse(root, templates), tmp_path / "out" / "datalist.json"


def failing(dataset, root, output, **kw):
    """Run prepare expecting failure; check nothing was written; return the problem list."""
    with pytest.raises(DatalistError) as err:
        prepare(dataset, str(root), str(output), **kw)
    assert not output.exists()
    assert not output.parent.exists() or not list(output.parent.iterdir())  # no temp file left
    return err.value.problems


def test_packaged_splits_are_the_reference_ones():
    if not REFERENCE_SPLITS.is_dir():
        pytest.skip("reference splits not available")
    for dataset, ref in (("brats", "brain_tumour"), ("synapse", "synapse"), ("acdc", "acdc")):
        assert splits(dataset) == json.loads((REFERENCE_SPLITS / f"{ref}.json").read_text())
        assert load_splits(SPLITS_DIR / f"{dataset}.json") == splits(dataset)


@pytest.mark.parametrize("dataset", ["brats", "synapse", "acdc"])
def test_folds_and_test_set(dataset, tmp_path, templates):
    root = tmp_path / "download"
    MAKERS[dataset](root, templates)
    output = tmp_path / "lists" / f"{dataset}_datalist.json"
    prepare(dataset, str(root), str(output))
    data = json.loads(output.read_text())
    ref = splits(dataset)

    assert data["dataset"] == dataset and data["num_folds"] == 5
    assert data["folds"] == ref
    assert {it["id"]: it["fold"] for it in data["training"]} == {c: k for k, f in enumerate(ref) for c in f["val"]}
    assert data["numTraining"] == len(split_ids(dataset)) == len(data["training"])
    assert data["numTest"] == NUM_TEST[dataset] == len(data["test"])
    test_ids = {it["id"] for it in data["test"]}
    assert not test_ids & set(split_ids(dataset))
    if dataset == "acdc":
        assert len({i.split("_")[0] for i in test_ids}) == 20
    for item in data["training"] + data["test"]:
        assert not os.path.isabs(item["image"]) and not os.path.isabs(item["label"])

    for k in range(5):
        train, val = load_fold(str(output), k)
        assert sorted(it["id"] for it in train) == sorted(ref[k]["train"])
        assert sorted(it["id"] for it in val) == sorted(ref[k]["val"])
        assert all(Path(it["image"]).is_file() and Path(it["label"]).is_file() for it in train + val)
    test = load_test(str(output))
    assert all(Path(it["image"]).is_file() and Path(it["label"]).is_file() for it in test)


def test_paths_resolve_like_monai_and_with_base_dir(synapse, tmp_path):
    from monai.data import load_decathlon_datalist

    root, base, output = synapse
    prepare("synapse", str(root), str(output))
    train, val = load_fold(output, 0)
    assert train[0]["image"] == str(base / "img" / "img0002.nii.gz")
    assert [it["image"] for it in train] == [
        it["image"] for it in load_decathlon_datalist(str(output), data_list_key="training") if it["fold"] != 0
    ]
    assert load_split(output, "val", 0) == val and load_split(output, "test") == load_test(output)

    moved = tmp_path / "elsewhere" / "deeper" / "copy.json"  # a moved datalist resolves against base_dir
    moved.parent.mkdir(parents=True)
    shutil.copy(output, moved)
    assert load_fold(moved, 0, base_dir=output.parent) == (train, val)
    assert not Path(load_fold(moved, 0)[0][0]["image"]).exists()


def test_absolute_paths(synapse):
    root, base, output = synapse
    prepare("synapse", str(root), str(output), absolute=True)
    item = json.loads(output.read_text())["test"][0]
    assert item == {"id": "abdomen_029", "image": str(base / "img" / "img0029.nii.gz"),
                    "label": str(base / "label" / "label0029.nii.gz")}


@pytest.mark.parametrize("fold", [5, -1, "x", None, True, 1.5])
def test_bad_fold(synapse, fold):
    root, _, output = synapse
    prepare("synapse", str(root), str(output))
    with pytest.raises(ValueError, match=rf"fold must be an integer in 0\.\.4, got .*{output.name}"):
        load_fold(str(output), fold)


def test_missing_files_all_reported(synapse):
    root, base, output = synapse
    (base / "label" / "label0005.nii.gz").unlink()  # split case
    (base / "img" / "img0022.nii.gz").unlink()  # split case
    (base / "img" / "img0035.nii.gz").unlink()  # held-out test case
    (base / "label" / "label0035.nii.gz").unlink()
    problems = failing("synapse", root, output)
    assert problems == [
        f"abdomen_005: missing label {base / 'label' / 'label0005.nii.gz'}",
        f"abdomen_022: missing image {base / 'img' / 'img0022.nii.gz'}",
        f"abdomen_035: missing image {base / 'img' / 'img0035.nii.gz'}",
        f"abdomen_035: missing label {base / 'label' / 'label0035.nii.gz'}",
    ]


def test_unreadable_file(synapse):
    root, base, output = synapse
    (base / "img" / "img0003.nii.gz").write_bytes(b"not a nifti file at all" * 10)
    (problem,) = failing("synapse", root, output)
    assert problem.startswith(f"abdomen_003: unreadable image {base / 'img' / 'img0003.nii.gz'}: ")
    prepare("synapse", str(root), str(output), check_headers=False)  # existence only
    assert output.is_file()


def test_shape_and_affine_mismatch(synapse):
    root, base, output = synapse
    save_nifti(base / "label" / "label0004.nii.gz", (2, 2, 3))
    shifted = np.eye(4)
    shifted[0, 3] = 0.5
    save_nifti(base / "label" / "label0030.nii.gz", (2, 2, 2), affine=shifted)
    within = np.eye(4)
    within[0, 3] = 1e-5
    save_nifti(base / "label" / "label0031.nii.gz", (2, 2, 2), affine=within)  # within tolerance: fine
    problems = failing("synapse", root, output)
    assert len(problems) == 2
    assert problems[0].startswith("abdomen_004: shape mismatch: image") and "label0004.nii.gz (2, 2, 3)" in problems[0]
    assert problems[1].startswith("abdomen_030: affine mismatch") and "label0030.nii.gz" in problems[1]


def test_unexpected_case_and_existing_output_kept(synapse, templates):
    root, base, output = synapse
    copy(templates.img3, base / "img" / "img0011.nii.gz")
    output.parent.mkdir(parents=True)
    output.write_text("previous")
    with pytest.raises(DatalistError) as err:
        prepare("synapse", str(root), str(output))
    unexpected = f"abdomen_011: unexpected case in {base} (neither in the splits nor in the paper's test set)"
    assert err.value.problems == [unexpected]
    assert output.read_text() == "previous" and os.listdir(output.parent) == ["datalist.json"]


def test_brats_4d_checks(tmp_path, templates):
    root = tmp_path / "MSD"
    base = make_brats(root, templates)
    output = tmp_path / "out" / "brats.json"
    save_nifti(base / "imagesTr" / "BRATS_001.nii.gz", (2, 2, 3, 4))  # spatial dims differ from the label
    save_nifti(base / "imagesTr" / "BRATS_058.nii.gz", (2, 2, 2, 3))  # held-out case, 3 channels
    (base / "labelsTr" / "BRATS_100.nii.gz").unlink()
    problems = failing("brats", base, output)  # --root may be Task01_BrainTumour itself
    assert problems[0].startswith("BRATS_001: shape mismatch") and "(2, 2, 3, 4)" in problems[0]
    assert problems[1] == f"BRATS_100: missing label {base / 'labelsTr' / 'BRATS_100.nii.gz'}"
    assert problems[2].startswith("BRATS_058: image") and "expected 4D with 4 channels" in problems[2]
    assert len(problems) == 3


def test_acdc_missing_gt_and_frame(tmp_path, templates):
    root = tmp_path / "ACDC"
    base = make_acdc(root, templates)
    output = tmp_path / "out" / "acdc.json"
    (base / "patient002" / "patient002_frame10_gt.nii.gz").unlink()  # held-out patient
    (base / "patient001" / "patient001_frame12.nii.gz").unlink()  # split frame
    problems = failing("acdc", root, output)
    assert problems == [
        f"patient001_frame12: missing image {base / 'patient001' / 'patient001_frame12.nii.gz'}",
        f"patient002_frame10: missing label {base / 'patient002' / 'patient002_frame10_gt.nii.gz'}",
    ]


def test_layout_not_found(tmp_path):
    output = tmp_path / "out.json"
    with pytest.raises(DatalistError, match="BTCV RawData/Training/img/ not found"):
        prepare("synapse", str(tmp_path), str(output))
    with pytest.raises(DatalistError, match="unknown dataset"):
        prepare("BraTS", str(tmp_path), str(output))
    assert not output.exists()


def test_cli(synapse, capsys):
    from networks.data.prepare import main

    root, base, output = synapse
    cmd = [sys.executable, "-m", "networks.data.prepare", "synapse", "--root", str(root), "--output", str(output)]
    ok = subprocess.run(cmd + ["--check_headers", "True"], cwd=REPO, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert "18 training cases in 5 folds, 12 test cases" in ok.stdout
    assert json.loads(output.read_text())["numTest"] == 12

    output.unlink()
    (base / "label" / "label0001.nii.gz").unlink()
    (base / "label" / "label0002.nii.gz").unlink()
    with pytest.raises(SystemExit) as exit_:  # the error path of the same entry point, in-process
        main("synapse", str(root), str(output))
    err = capsys.readouterr().err
    assert exit_.value.code == 1 and not output.exists()
    assert "2 problem(s)" in err and "label0001.nii.gz" in err and "label0002.nii.gz" in err


def test_allow_missing_writes_a_partial_datalist_with_a_summary(synapse, capsys):
    from networks.data.prepare import main

    root, base, output = synapse
    for f in ("label/label0005.nii.gz", "img/img0022.nii.gz", "img/img0035.nii.gz", "label/label0035.nii.gz"):
        (base / f).unlink()  # two split cases, one held-out test case
    failing("synapse", root, output)  # strict by default
    data = prepare("synapse", str(root), str(output), allow_missing=True)
    assert json.loads(output.read_text()) == data
    ids = {it["id"] for it in data["training"]}
    assert data["numTraining"] == 16 == len(ids) and not {"abdomen_005", "abdomen_022"} & ids
    assert data["numTest"] == 11 and "abdomen_035" not in {it["id"] for it in data["test"]}
    assert all("abdomen_005" not in f["val"] + f["train"] for f in data["folds"])
    assert sorted(data["missing"]) == sorted([
        f"abdomen_005: missing label {base / 'label' / 'label0005.nii.gz'}",
        f"abdomen_022: missing image {base / 'img' / 'img0022.nii.gz'}",
        f"abdomen_035: missing image {base / 'img' / 'img0035.nii.gz'}",
        f"abdomen_035: missing label {base / 'label' / 'label0035.nii.gz'}",
    ])
    train, val = load_fold(str(output), 0)
    assert {it["id"] for it in train + val} == ids
    output.unlink()
    main("synapse", str(root), str(output), allow_missing=True)
    out = capsys.readouterr().out
    assert "partial synapse dataset: 16 of 18 training cases" in out and "11 of 12 test cases" in out
    assert "4 missing file(s)" in out and "label0005.nii.gz" in out


def test_allow_missing_still_refuses_bad_files(synapse):
    root, base, output = synapse
    (base / "img" / "img0001.nii.gz").unlink()
    (base / "img" / "img0003.nii.gz").write_bytes(b"not a nifti file at all" * 10)
    (problem,) = failing("synapse", root, output, allow_missing=True)
    assert problem.startswith("abdomen_003: unreadable image")


def test_allow_missing_acdc_test_patient_without_folder(tmp_path, templates):
    root = tmp_path / "ACDC"
    base = make_acdc(root, templates)
    held_out = sorted({f"patient{n:03d}" for n in range(1, 101)} - {c.split("_")[0] for c in split_ids("acdc")})[0]
    shutil.rmtree(base / held_out)
    output = tmp_path / "out" / "acdc.json"
    failing("acdc", root, output)
    data = prepare("acdc", str(root), str(output), allow_missing=True)
    assert data["numTest"] == NUM_TEST["acdc"] - 2 and not [t for t in data["test"] if t["id"].startswith(held_out)]
    assert data["missing"] == [f"{held_out}: missing test patient folder {base / held_out}"]
