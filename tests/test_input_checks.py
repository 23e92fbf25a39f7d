"""Input checks, per-case isolation and output naming (networks/bundle/validation.py, isolation.py, inference.py).

A bad-input corpus is generated at test time (nothing committed): a NaN block, an all-zero CT, a
zero-length voxel axis, a case whose resampling would need far more memory than the budget, labels with a
wrong slice count, a flipped affine, values 20 / 255 / -1, an empty label, colliding names, an existing
output and an unwritable output folder. The unit tests check :func:`check_case` and friends directly; the
``slow`` ones run the corpus through ``python -m monai.bundle run`` inference and evaluation (tiny network)
and the training datalist check, asserting the named errors, the exit code, the good cases written and
that no existing output was touched.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from networks.bundle import CaseError, InputChecker, check_case, plan_outputs
from networks.bundle.isolation import describe_failure
from networks.bundle.synthetic import make_case, make_dataset, tiny_overrides
from networks.bundle.validation import InputErrors, modality_warning

REPO = Path(__file__).resolve().parent.parent
BUNDLE = "synapse_bisegmamba"


def _mt(arr, affine=None):
    a = torch.as_tensor(np.asarray(arr, dtype=np.float32))
    return MetaTensor(a, affine=torch.as_tensor(np.eye(4) if affine is None else affine))


def _ct(seed=0):
    image, label, affine = make_case("synapse", seed)
    return image.astype(np.float32), label, affine


SETTINGS = dict(in_channels=1, num_classes=14, pixdim=[3.0, 0.76, 0.76], max_case_gb=16.0, modality="CT")


# ------------------------------------------------------------------ the one check, unit by unit


def test_good_case_passes_and_returns_the_image():
    image, label, affine = _ct()
    out, warnings = check_case(_mt(image[None], affine), _mt(label[None], affine), src="good.nii.gz", **SETTINGS)
    assert warnings == [] and torch.equal(out, _mt(image[None], affine))


@pytest.mark.parametrize("what, make, check, text", [
    ("nan block", lambda i, l, a: (np.where(np.pad(np.ones((10, 10, 3)), ((0, 30), (0, 20), (0, 5))) > 0, np.nan, i), l, a, a),
     "finite", "300 NaN/Inf voxel(s)"),
    ("all-zero ct", lambda i, l, a: (np.zeros_like(i), l, a, a), "foreground", "every voxel is 0"),
    ("zero-length axis", lambda i, l, a: (i, l, a @ np.diag([1, 1, 0, 1]), a), "affine", "zero-length"),
    ("huge resampling", lambda i, l, a: (i, l, np.diag([40.0, 40.0, 40.0, 1.0]), np.diag([40.0, 40.0, 40.0, 1.0])),
     "memory", "max_case_gb=16"),
    ("label with 6 of 8 slices", lambda i, l, a: (i, l[..., :6], a, a), "label_grid", "label shape (40, 30, 6)"),
    ("flipped label affine", lambda i, l, a: (i, l, a, a @ np.diag([-1, 1, 1, 1])), "label_grid", "label affine differs"),
    ("label value 20", lambda i, l, a: (i, np.where(l == 1, 20, l), a, a), "label_values", "[20] outside the bundle's classes 0..13"),
    ("label value 255", lambda i, l, a: (i, np.where(l == 1, 255, l), a, a), "label_values", "[255]"),
    ("label value -1", lambda i, l, a: (i, np.where(l == 0, -1, l.astype(np.int16)), a, a), "label_values", "[-1]"),
    ("empty label", lambda i, l, a: (i, np.zeros_like(l), a, a), "label_empty", "no foreground"),
])
def test_bad_case_is_refused_with_file_and_check(what, make, check, text):
    image, label, affine = _ct()
    img, lab, a_img, a_lab = make(image, label, affine)
    with pytest.raises(CaseError) as e:
        check_case(_mt(np.asarray(img)[None], a_img), _mt(np.asarray(lab)[None], a_lab), src="img.nii.gz",
                   label_src="lab.nii.gz", **SETTINGS)
    assert e.value.check == check, what
    assert text in str(e.value)
    assert str(e.value).startswith(("img.nii.gz: " + check, "lab.nii.gz: " + check))


def test_memory_error_names_the_size_and_the_option():
    with pytest.raises(CaseError, match=r"would need about \d+\.\d GiB .* raise it with --max_case_gb"):
        check_case(_mt(np.ones((1, 64, 64, 8)), np.diag([20.0, 20.0, 20.0, 1.0])), src="big.nii.gz", **SETTINGS)
    # the same case within a larger budget passes
    check_case(_mt(np.ones((1, 64, 64, 8)), np.diag([20.0, 20.0, 20.0, 1.0])), src="big.nii.gz",
               **{**SETTINGS, "max_case_gb": 1000})


def test_nonfinite_replace_is_explicit_and_logged(caplog):
    image, _, affine = _ct()
    image[:5, :5, :2] = np.nan
    image[0, 0, 0] = np.inf
    out, warnings = check_case(_mt(image[None], affine), src="nan.nii.gz", **{**SETTINGS, "nonfinite": "replace"})
    assert torch.isfinite(out).all()
    assert float(out[0, 0, 0, 0]) == float(np.nanmin(np.where(np.isfinite(image), image, np.nan)))
    assert any("replaced 50 NaN/Inf voxel(s)" in w for w in warnings)
    checker = InputChecker(1, nonfinite="replace")
    for _ in range(3):
        assert torch.isfinite(checker.validate(_mt(image[None], affine), src="nan.nii.gz")).all()
    assert caplog.text.count("nan.nii.gz: replaced 50 NaN/Inf voxel(s)") == 1  # logged once per file
    with pytest.raises(ValueError, match="nonfinite must be"):
        InputChecker(1, nonfinite="ignore")


def test_shape_and_channel_errors_say_what_was_expected():
    checker = InputChecker(4, ["FLAIR", "T1w", "T1gd", "T2w"])
    with pytest.raises(CaseError, match=r"two.nii.gz: shape: 2 channel\(s\).*expected a 3D volume with 4 channel"):
        checker.validate(_mt(np.ones((2, 8, 8, 8))), src="two.nii.gz")
    with pytest.raises(CaseError, match="flat.nii.gz: shape: 2D image"):
        checker.validate(_mt(np.ones((4, 8, 8))), src="flat.nii.gz")


def test_modality_warning_for_mr_given_to_a_ct_bundle_and_back():
    image, _, _ = _ct()
    assert modality_warning(image, "CT", "ct.nii.gz") is None
    mr = np.clip(image + 1000, 0, None)  # magnitude-like: nothing below -500
    msg = modality_warning(mr, "CT", "mr.nii.gz")
    assert msg.startswith("mr.nii.gz: does not look like a CT") and "minimum 0" in msg
    assert modality_warning(mr, "MRI", "mr.nii.gz") is None
    assert "does not look like an MRI" in modality_warning(image, "MRI", "ct.nii.gz")
    # a warning, not a refusal
    _, warnings = check_case(_mt(mr[None], np.eye(4)), src="mr.nii.gz", **SETTINGS)
    assert warnings and "does not look like a CT" in warnings[0]


# ------------------------------------------------------------------ corpus on disk


def _save(path, arr, affine):
    nib.save(nib.Nifti1Image(np.asarray(arr), affine), str(path))
    return str(path)


def _save_zero_axis(path, arr, affine):
    img = nib.Nifti1Image(np.asarray(arr), np.eye(4))
    img.set_sform(affine @ np.diag([1, 1, 0, 1]), code=1)
    img.set_qform(None, code=0)
    nib.save(img, str(path))
    return str(path)


def write_image_corpus(folder):
    """Inference inputs: good cases and bad ones; returns {name: path}."""
    folder.mkdir(parents=True, exist_ok=True)
    image, _, affine = make_case("synapse", 0)
    image2, _, affine2 = make_case("synapse", 1)
    nan = image.astype(np.float32)
    nan[10:20, 10:20, 2:5] = np.nan
    return {
        "good": _save(folder / "good.nii.gz", image, affine),
        "good_0000": _save(folder / "good_0000.nii.gz", image2, affine2),  # collides with good.nii.gz
        "other": _save(folder / "other.nii.gz", image2, affine2),
        "nan": _save(folder / "nan_block.nii.gz", nan, affine),
        "zero": _save(folder / "all_zero.nii.gz", np.zeros_like(image), affine),
        "zero_axis": _save_zero_axis(folder / "zero_axis.nii.gz", image, affine),
        "huge": _save(folder / "huge.nii.gz", np.full((64, 64, 8), 100, np.int16), np.diag([40.0, 40.0, 40.0, 1.0])),
    }


def test_datalist_check_fast_reads_headers_full_reads_voxels(tmp_path):
    image, label, affine = _ct()
    items = []
    for name, img, lab, a_img, a_lab in [
        ("good", image, label, affine, affine),
        ("short", image, label[..., :6], affine, affine),
        ("flipped", image, label, affine, affine @ np.diag([-1, 1, 1, 1])),
        ("nan", np.where(label > 0, np.nan, image), label, affine, affine),
        ("v20", image, np.where(label == 1, 20, label).astype(np.uint8), affine, affine),
    ]:
        items.append({"image": _save(tmp_path / f"{name}_img.nii.gz", img.astype(np.float32), a_img),
                      "label": _save(tmp_path / f"{name}_lab.nii.gz", lab, a_lab), "id": name})
    items.append({"image": _save_zero_axis(tmp_path / "zaxis_img.nii.gz", image, affine),
                  "label": _save(tmp_path / "zaxis_lab.nii.gz", label, affine), "id": "zaxis"})
    checker = InputChecker(1, ["CT"], num_classes=14, pixdim=[3.0, 0.76, 0.76], modality="CT")
    assert checker.check_datalist(items[:1]) == items[:1]
    with pytest.raises(ValueError) as fast:
        checker.check_datalist(items, "fast", "training cases of fold 0")
    msg = str(fast.value)
    assert msg.startswith("3 of 6 training cases of fold 0 failed the input check (fast mode)")
    assert "short_lab.nii.gz: label_grid: label shape (40, 30, 6)" in msg
    assert "flipped_lab.nii.gz: label_grid: label affine differs" in msg
    assert "zaxis_img.nii.gz: affine: zero-length" in msg
    with pytest.raises(ValueError) as full:
        checker.check_datalist(items, "full")
    msg = str(full.value)
    assert msg.startswith("5 of 6") and "nan_img.nii.gz: finite:" in msg and "v20_lab.nii.gz: label_values" in msg
    with pytest.raises(ValueError, match="no training cases of fold 2"):
        checker.check_fold([[], items[:1]], "fast", 2)


def test_plan_outputs_unique_names_existing_kept_unwritable_refused(tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    image, _, affine = make_case("synapse", 0)
    for name in ("good.nii", "good.nii.gz", "good_2.nii.gz"):
        _save(d / name, image, affine)
    _save(d / "good_0000.nii.gz", image, affine)  # nnU-Net channel file of case "good"
    from networks.bundle import list_inputs

    out = tmp_path / "out"
    checker = InputChecker(1)
    items = plan_outputs(list_inputs(str(d)), str(out), "seg", False, checker)
    ids = {Path(it["src"]).name: it["id"] for it in items}
    assert ids == {"good.nii": "good", "good.nii.gz": "good_3", "good_0000.nii.gz": "good_4", "good_2.nii.gz": "good_2"}
    assert len(checker.notes) == 2 and "both map to good_seg.nii.gz" in checker.notes[0]
    assert plan_outputs(list_inputs(str(d)), str(out), "seg", False, None) == items  # deterministic
    # an existing output is kept (and reported) unless overwrite
    (out / "good_2_seg.nii.gz").write_bytes(b"precious")
    checker = InputChecker(1)
    kept = plan_outputs(list_inputs(str(d)), str(out), "seg", False, checker)
    assert [it["id"] for it in kept] == ["good", "good_3", "good_4"]
    assert "good_2_seg.nii.gz already exists and is kept (pass --overwrite True" in checker.errors[0]
    assert len(plan_outputs(list_inputs(str(d)), str(out), "seg", "True", InputChecker(1))) == 4
    assert (out / "good_2_seg.nii.gz").read_bytes() == b"precious"
    # an output folder that cannot be created is refused before anything is computed
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(SystemExit, match="output folder .*a_file/sub is not writable"):
        plan_outputs(items, str(tmp_path / "a_file" / "sub"))


def test_describe_failure_names_the_step():
    from monai.transforms import Compose, LoadImaged

    try:
        Compose([LoadImaged("image")])({"image": "/nonexistent/x.nii.gz"})
    except Exception as e:  # noqa: BLE001
        msg = describe_failure(e, "/nonexistent/x.nii.gz", "preprocessing")
    assert msg.startswith("/nonexistent/x.nii.gz: reading: ")
    assert describe_failure(RuntimeError("boom"), "a.nii", "network") == "a.nii: network: RuntimeError: boom"
    wrapped = RuntimeError("applying transform <x>")
    wrapped.__cause__ = CaseError("a.nii", "finite", "3 NaN/Inf voxel(s)")
    assert describe_failure(wrapped, "a.nii", "preprocessing") == "a.nii: finite: 3 NaN/Inf voxel(s)"


class _FailsOnThree(torch.nn.Module):
    def forward(self, x):
        if float(x.mean()) == 3.0:
            raise RuntimeError("simulated out of memory")
        return torch.cat([-x, x], 1)


def test_isolating_evaluator_goes_on_after_preprocessing_network_and_writing_failures(tmp_path):
    from monai.data import DataLoader
    from monai.transforms import AsDiscreted, Compose, Lambda

    from networks.bundle import CaseDataset, IsolatingEvaluator, SaveOnInputGridd

    def load(d):
        if d["id"] == "c2":
            raise ValueError("bad voxels")
        return {**d, "image": MetaTensor(torch.full((1, 4, 4, 4), float(d["id"][1])), affine=torch.eye(4))}

    items = [{"image": f"c{k}.nii.gz", "id": f"c{k}", "src": f"c{k}.nii.gz"} for k in (1, 2, 3, 4)]
    out = tmp_path / "out"
    out.mkdir()
    (out / "c4_seg.nii.gz").write_bytes(b"kept")
    checker = InputChecker(1)
    evaluator = IsolatingEvaluator(
        device=torch.device("cpu"), val_data_loader=DataLoader(CaseDataset(items, Lambda(load)), batch_size=1),
        network=_FailsOnThree(), checker=checker,
        postprocessing=Compose([AsDiscreted("pred", argmax=True), SaveOnInputGridd("pred", str(out))]))
    evaluator.run()
    assert checker.checked == 4 and [d.split(":")[0] for d in checker.done] == ["c1"]
    assert checker.errors[0] == "c2.nii.gz: preprocessing (Lambda): ValueError: bad voxels"
    assert checker.errors[1] == "c3.nii.gz: network or postprocessing: RuntimeError: simulated out of memory"
    assert checker.errors[2].startswith("c4.nii.gz: writing: FileExistsError:") and "already exists and is kept" in checker.errors[2]
    assert (out / "c4_seg.nii.gz").read_bytes() == b"kept" and (out / "c1_seg.nii.gz").is_file()
    with pytest.raises(InputErrors, match="3 of 4 input"):
        checker.report()


def test_report_exits_non_zero_with_the_summary():
    checker = InputChecker(1, action="scored")
    checker.checked = 3
    checker.succeed("a")
    checker.fail("b", "b.nii.gz: finite: 2 NaN/Inf voxel(s)")
    checker.fail("c", "c.nii.gz: network: RuntimeError: boom")
    with pytest.raises(InputErrors) as e:
        checker.report()
    assert e.value.code.startswith("2 of 3 input(s) could not be scored; 1 scored fine:")
    assert "  - b.nii.gz: finite: 2 NaN/Inf voxel(s)" in e.value.code


# ------------------------------------------------------------------ end to end through the bundle


def _cli(args, timeout=600):
    cmd = [sys.executable, "-m", "monai.bundle", "run", *args]
    r = subprocess.run(cmd, cwd=str(REPO / "bundles" / BUNDLE), capture_output=True, text=True, timeout=timeout)
    return r.returncode, r.stdout + r.stderr


def _args(**kw):
    out = []
    for k, v in kw.items():
        out += [f"--{k}", json.dumps(v) if isinstance(v, (list, dict)) else str(v)]
    return out


def _tiny(**extra):
    t = tiny_overrides("synapse")
    keep = ("patch_size", "filters", "num_workers", "sw_batch_size")
    return {**{k: t[k] for k in keep}, **extra}


def _untrained_model(models):
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(REPO / "bundles" / BUNDLE / "configs" / "inference.json"))
    parser.update({"filters": tiny_overrides("synapse")["filters"]})
    torch.manual_seed(0)
    os.makedirs(models, exist_ok=True)
    torch.save(parser.get_parsed_content("network_def").state_dict(), os.path.join(models, "model.pt"))


@pytest.mark.slow
def test_inference_corpus_good_cases_written_bad_ones_named(tmp_path):
    _untrained_model(tmp_path / "models")
    inputs = write_image_corpus(tmp_path / "inputs")
    pred = tmp_path / "pred"
    pred.mkdir()
    (pred / "other_seg.nii.gz").write_bytes(b"an earlier result")
    rc, log = _cli(["--config_file", "configs/inference.json",
                    *_args(**_tiny(bundle_root=str(tmp_path), dataset_dir=str(tmp_path / "inputs"), output_dir=str(pred)))])
    assert rc == 1, log[-3000:]
    assert "5 of 7 input(s) could not be segmented; 2 segmented fine" in log, log[-3000:]
    assert f"{inputs['nan']}: finite: 30" in log
    assert f"{inputs['zero']}: foreground: every voxel is 0" in log
    assert f"{inputs['zero_axis']}: affine: zero-length" in log
    assert f"{inputs['huge']}: memory: resampled to [3.0, 0.758, 0.758] mm the case would need about 131.5 GiB" in log
    assert "other_seg.nii.gz already exists and is kept" in log
    assert "both map to good_seg.nii.gz" in log
    assert (pred / "other_seg.nii.gz").read_bytes() == b"an earlier result"  # not overwritten
    for src, name in ((inputs["good"], "good_seg.nii.gz"), (inputs["good_0000"], "good_2_seg.nii.gz")):
        out = nib.load(str(pred / name))
        assert out.shape == nib.load(src).shape and np.array_equal(out.affine, nib.load(src).affine)
    assert sorted(p.name for p in pred.iterdir()) == ["good_2_seg.nii.gz", "good_seg.nii.gz", "other_seg.nii.gz"]

    # --overwrite True replaces it; an unwritable output folder is refused before any case is computed
    datalist = tmp_path / "other.json"
    datalist.write_text(json.dumps([inputs["other"]]))
    rc, log = _cli(["--config_file", "configs/inference.json", *_args(**_tiny(
        bundle_root=str(tmp_path), datalist=str(datalist), output_dir=str(pred), overwrite=True))])
    assert rc == 0, log[-3000:]
    assert nib.load(str(pred / "other_seg.nii.gz")).shape == nib.load(inputs["other"]).shape
    (tmp_path / "a_file").write_text("x")
    rc, log = _cli(["--config_file", "configs/inference.json", *_args(**_tiny(
        bundle_root=str(tmp_path), datalist=str(datalist), output_dir=str(tmp_path / "a_file" / "out")))])
    assert rc != 0 and "a_file/out is not writable" in log and "choose another with --output_dir" in log


@pytest.mark.slow
def test_evaluation_corpus_scores_good_cases_and_names_bad_labels(tmp_path):
    root = tmp_path / "data"
    make_dataset("synapse", str(root), n_train=3, n_test=1)
    dl = json.loads((root / "datalist.json").read_text())
    image, label, affine = make_case("synapse", 5)
    bad = {"short": (label[..., :6], affine), "flipped": (label, affine @ np.diag([-1, 1, 1, 1])),
           "v20": (np.where(label == 1, 20, label).astype(np.uint8), affine),
           "v255": (np.where(label == 1, 255, label).astype(np.uint8), affine),
           "vneg": (np.where(label == 0, -1, label.astype(np.int16)), affine), "empty": (np.zeros_like(label), affine)}
    for name, (lab, a) in bad.items():
        _save(root / "imagesTs" / f"{name}.nii.gz", image, affine)
        _save(root / "labelsTs" / f"{name}.nii.gz", lab, a)
        dl["test"].append({"id": name, "image": f"imagesTs/{name}.nii.gz", "label": f"labelsTs/{name}.nii.gz"})
    nan = image.astype(np.float32)
    nan[5:10, 5:10, 1:3] = np.nan
    _save(root / "imagesTs" / "nan.nii.gz", nan, affine)
    _save(root / "labelsTs" / "nan.nii.gz", label, affine)
    dl["test"].append({"id": "nan", "image": "imagesTs/nan.nii.gz", "label": "labelsTs/nan.nii.gz"})
    (root / "datalist.json").write_text(json.dumps(dl))
    _untrained_model(tmp_path / "models")
    rc, log = _cli(["--config_file", "['configs/train.json','configs/evaluate.json']", *_args(**_tiny(
        bundle_root=str(tmp_path), dataset_dir=str(root), eval_split="test", cache_rate=0.0))])
    assert rc == 1, log[-3000:]
    assert "7 of 8 input(s) could not be scored; 1 scored fine" in log, log[-3000:]
    for name, check in [("short", "label_grid"), ("flipped", "label_grid"), ("v20", "label_values"),
                        ("v255", "label_values"), ("vneg", "label_values"), ("empty", "label_empty")]:
        assert f"labelsTs/{name}.nii.gz: {check}" in log, name
    assert "imagesTs/nan.nii.gz: finite: 50 NaN/Inf" in log
    doc = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert doc["num_cases"] == 1 and [r["id"] for r in doc["per_case"]] == ["synapse_003"]


@pytest.mark.slow
def test_training_refuses_bad_datalist_before_training(tmp_path):
    from monai.bundle import ConfigWorkflow

    root = tmp_path / "data"
    make_dataset("synapse", str(root), n_train=3, n_test=1)
    lab = nib.load(str(root / "labelsTr" / "synapse_001.nii.gz"))
    _save(root / "labelsTr" / "synapse_001.nii.gz", np.asarray(lab.dataobj)[..., :6], lab.affine)
    conf = REPO / "bundles" / BUNDLE / "configs"

    def train(**kw):
        wf = ConfigWorkflow(config_file=str(conf / "train.json"), meta_file=str(conf / "metadata.json"),
                            workflow_type="train", **tiny_overrides("synapse", bundle_root=str(tmp_path), dataset_dir=str(root), **kw))
        wf.initialize()
        return wf.run()

    with pytest.raises(Exception) as e:
        train()
    msg = _messages(e.value)  # MONAI's config parser wraps the ValueError in a RuntimeError
    assert "1 of 2 training cases of fold 0 failed the input check (fast mode)" in msg
    assert "labelsTr/synapse_001.nii.gz: label_grid" in msg
    assert not (tmp_path / "models" / "checkpoint.pt").exists()  # refused before training started
    dl = json.loads((root / "datalist.json").read_text())
    for t in dl["training"]:
        t["fold"] = 0
    (root / "datalist.json").write_text(json.dumps(dl))
    with pytest.raises(Exception) as e:
        train()
    assert "no training cases of fold 0" in _messages(e.value)


def _messages(e):
    out = []
    while e is not None:
        out.append(str(e))
        e = e.__cause__
    return "\n".join(out)
