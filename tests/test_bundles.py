"""End-to-end tests of the twelve MONAI bundles on small synthetic data shaped like each dataset (CPU).

Most runs use MONAI's ``ConfigWorkflow`` in-process with the bundle's own config files plus overrides for
tiny filters, patches and epochs (``networks.bundle.synthetic.tiny_overrides``); one test drives the real
``python -m monai.bundle run`` command line for training (killed with SIGKILL and resumed), evaluation and
inference. The loop over all twelve bundles is marked ``slow``.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser, ConfigWorkflow, verify_net_in_out

from networks import bundle_gen
from networks.bundle.synthetic import make_dataset, tiny_overrides
from support import write_dicom_series

REPO = Path(__file__).resolve().parent.parent
BUNDLES = REPO / "bundles"
REAL_CT = REPO / "tests" / "data" / "abdomen_ct_example"
NAMES = bundle_gen.bundle_names()
FAST_BUNDLE = "synapse_bisegmamba"
INFER_KEYS = ("patch_size", "filters", "num_workers", "sw_batch_size", "device", "amp")


@pytest.fixture(scope="session")
def synthetic(tmp_path_factory):
    """dataset -> folder with a synthetic dataset (3 training cases in 3 folds, 1 test case) and datalist.json."""
    made = {}

    def get(dataset):
        if dataset not in made:
            root = tmp_path_factory.mktemp(f"synthetic_{dataset}")
            make_dataset(dataset, str(root))
            made[dataset] = root
        return made[dataset]

    return get


def workflow(name, configs, workflow_type, **overrides):
    conf = BUNDLES / name / "configs"
    return ConfigWorkflow(config_file=[str(conf / c) for c in configs], meta_file=str(conf / "metadata.json"),
                          logging_file=str(conf / "logging.conf"), workflow_type=workflow_type, **overrides)


def run_workflow(wf):
    wf.initialize()
    assert wf.check_properties() == []
    try:
        return wf.run()
    finally:
        wf.finalize()


def infer_overrides(dataset, **extra):
    return {**{k: v for k, v in tiny_overrides(dataset).items() if k in INFER_KEYS}, **extra}


def num_classes(name):
    return json.loads((BUNDLES / name / "configs" / "train.json").read_text())["num_classes"]


def assert_on_input_grid(pred_path, image_path, n_classes):
    pred, ref = nib.load(str(pred_path)), nib.load(str(image_path))
    assert pred.shape == ref.shape[:3]
    assert np.array_equal(pred.affine, ref.affine)
    assert pred.get_data_dtype() == np.uint8
    values = np.unique(np.asarray(pred.dataobj))
    assert values.min() >= 0 and values.max() < n_classes


def write_untrained_model(name, dataset, models_dir):
    """models/model.pt of a tiny untrained network, for inference-only tests."""
    parser = ConfigParser()
    parser.read_config(str(BUNDLES / name / "configs" / "inference.json"))
    parser.update({"filters": tiny_overrides(dataset)["filters"]})
    torch.manual_seed(0)
    net = parser.get_parsed_content("network_def")
    os.makedirs(models_dir, exist_ok=True)
    torch.save(net.state_dict(), os.path.join(models_dir, "model.pt"))


def check_metrics(eval_dir, name, n_cases):
    train = json.loads((BUNDLES / name / "configs" / "train.json").read_text())
    evaluate = json.loads((BUNDLES / name / "configs" / "evaluate.json").read_text())
    doc = json.loads((eval_dir / "metrics.json").read_text())
    assert doc["num_cases"] == n_cases and doc["regions"] == list(train["regions"])
    assert doc["columns"][: len(evaluate["paper_columns"])] == evaluate["paper_columns"]
    for row in doc["per_case"]:
        assert all(np.isfinite(row[c]) for c in doc["columns"])
        assert all(0 <= row[c] <= 100 for c in doc["columns"] if c.endswith("_DSC"))
    header = (eval_dir / "metrics_per_case.csv").read_text().splitlines()[0].split(",")
    assert header == ["id"] + doc["columns"]
    summary = (eval_dir / "metrics_summary.csv").read_text().splitlines()
    assert [line.split(",")[0] for line in summary[1:]] == ["mean", "std"]


def train_evaluate_infer(name, data_root, out_root):
    dataset = name.split("_")[0]
    overrides = tiny_overrides(dataset, bundle_root=str(out_root), dataset_dir=str(data_root))
    run_workflow(workflow(name, ["train.json"], "train", **overrides))
    models = out_root / "models"
    state = torch.load(models / "model.pt", weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in state.values())  # a plain state dict
    ckpt = torch.load(models / "checkpoint.pt", weights_only=True)
    assert {"model", "optimizer", "lr_scheduler", "trainer", "evaluator"} <= set(ckpt)
    assert list((out_root / "logs").glob("events.out.tfevents.*"))

    run_workflow(workflow(name, ["train.json", "evaluate.json"], "train", **overrides))
    check_metrics(out_root / "eval", name, n_cases=1)

    run_workflow(workflow(name, ["inference.json"], "infer", **infer_overrides(
        dataset, bundle_root=str(out_root), dataset_dir=str(data_root / "imagesTs"), output_dir=str(out_root / "pred"))))
    images = sorted((data_root / "imagesTs").glob("*.nii.gz"))
    assert images
    for image in images:
        case = image.name[: -len(".nii.gz")]
        assert_on_input_grid(out_root / "pred" / f"{case}_seg.nii.gz", image, num_classes(name))


def test_train_evaluate_infer_synapse_bisegmamba(synthetic, tmp_path):
    train_evaluate_infer(FAST_BUNDLE, synthetic("synapse"), tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in NAMES if n != FAST_BUNDLE])
def test_train_evaluate_infer_every_bundle(name, synthetic, tmp_path):
    train_evaluate_infer(name, synthetic(name.split("_")[0]), tmp_path)


@pytest.mark.parametrize("name", [pytest.param(n, marks=[] if n == FAST_BUNDLE else [pytest.mark.slow]) for n in NAMES])
def test_verify_net_in_out(name):
    conf = BUNDLES / name / "configs"
    verify_net_in_out(net_id="network_def", meta_file=str(conf / "metadata.json"),
                      config_file=str(conf / "inference.json"), device="cpu",
                      **{"network_def#filters": tiny_overrides(name.split("_")[0])["filters"]})


# ------------------------------------------------------------------ the real command line


def _cli(name, args, **kw):
    cmd = [sys.executable, "-m", "monai.bundle", "run", *args]
    return subprocess.Popen(cmd, cwd=str(BUNDLES / name), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def _cli_overrides(overrides):
    out = []
    for k, v in overrides.items():
        if k in ("device", "amp"):
            continue  # the defaults pick the CPU here
        out += [f"--{k}", json.dumps(v) if isinstance(v, (list, dict)) else str(v)]
    return out


@pytest.mark.slow
def test_cli_train_killed_and_resumed_then_evaluate_and_infer(synthetic, tmp_path):
    name, data = FAST_BUNDLE, synthetic("synapse")
    overrides = tiny_overrides("synapse", bundle_root=str(tmp_path), dataset_dir=str(data), max_epochs=4)
    train_cmd = ["training", "--meta_file", "configs/metadata.json", "--config_file", "configs/train.json",
                 "--logging_file", "configs/logging.conf", *_cli_overrides(overrides)]
    ckpt = tmp_path / "models" / "checkpoint.pt"

    proc = _cli(name, train_cmd)
    deadline = time.time() + 600
    while not ckpt.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, f"training ended before it could be interrupted:\n{proc.communicate()[0][-3000:]}"
    os.kill(proc.pid, signal.SIGKILL)  # interrupt at an arbitrary point after the first checkpoint
    proc.communicate()
    interrupted = torch.load(ckpt, weights_only=True)  # never half-written
    done_iters = interrupted["trainer"]["iteration"]
    assert 2 <= done_iters < 8

    proc = _cli(name, train_cmd)  # the same command again
    log = proc.communicate(timeout=900)[0]
    assert proc.returncode == 0, log[-3000:]
    assert f"resumed from {ckpt}: epoch {done_iters // 2}" in log
    final = torch.load(ckpt, weights_only=True)
    assert final["trainer"]["iteration"] == 8  # 4 epochs x 2 iterations, none lost or repeated
    assert final["lr_scheduler"]["last_epoch"] == 4
    assert all(float(s["step"]) == 8 for s in final["optimizer"]["state"].values())  # optimizer state carried over
    assert final["optimizer"]["param_groups"][0]["lr"] == 0.0  # linear decay to 0 at max_epochs
    assert not [p for p in (tmp_path / "models").iterdir() if p.name not in ("checkpoint.pt", "model.pt")]

    proc = _cli(name, ["--config_file", "['configs/train.json','configs/evaluate.json']", *_cli_overrides(overrides)])
    log = proc.communicate(timeout=900)[0]
    assert proc.returncode == 0, log[-3000:]
    check_metrics(tmp_path / "eval", name, n_cases=1)

    # inference on a folder with one good image and three bad files: the good one is written, the bad ones
    # are listed with the file name and what was expected, and the exit status is non-zero
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    good = next((data / "imagesTs").glob("*.nii.gz"))
    (inputs / good.name).write_bytes(good.read_bytes())
    (inputs / "corrupt.nii.gz").write_bytes(b"\x1f\x8b garbage")
    nib.save(nib.Nifti1Image(np.zeros((20, 20), np.float32), np.eye(4)), str(inputs / "slice2d.nii.gz"))
    nib.save(nib.Nifti1Image(np.zeros((20, 20, 8, 2), np.float32), np.eye(4)), str(inputs / "twochannels.nii.gz"))
    infer = infer_overrides("synapse", bundle_root=str(tmp_path), dataset_dir=str(inputs), output_dir=str(tmp_path / "pred"))
    proc = _cli(name, ["--config_file", "configs/inference.json", *_cli_overrides(infer)])
    log = proc.communicate(timeout=900)[0]
    assert proc.returncode == 1, log[-3000:]
    assert "3 of 4 input(s) could not be segmented" in log
    assert "corrupt.nii.gz: reading:" in log and "slice2d.nii.gz: shape: 2D image" in log
    assert "twochannels.nii.gz: shape: 2 channel(s)" in log and "expected a 3D volume with 1 channel(s) (CT)" in log
    assert_on_input_grid(tmp_path / "pred" / good.name.replace(".nii.gz", "_seg.nii.gz"), good, 14)
    assert len(list((tmp_path / "pred").iterdir())) == 1


# ------------------------------------------------------------------ real CT, DICOM, multi-GPU config


@pytest.mark.slow
def test_synapse_inference_on_real_ct(tmp_path):
    """The Synapse inference config on a real abdominal CT (see tests/data/abdomen_ct_example/README.md).

    Untrained tiny network; the target spacing is coarsened to 2 x 2 x 3 mm to fit a CPU test (resampling
    and its inversion still happen on every axis but z)."""
    name = FAST_BUNDLE
    write_untrained_model(name, "synapse", tmp_path / "models")
    datalist = tmp_path / "list.json"
    datalist.write_text(json.dumps([{"image": str(REAL_CT / "abdomen_ct.nii.gz"), "id": "abdomen_ct"}]))
    overrides = infer_overrides("synapse", bundle_root=str(tmp_path), dataset_dir=None, datalist=str(datalist),
                                output_dir=str(tmp_path / "pred"), pixdim=[3.0, 2.0, 2.0],
                                patch_size=[32, 128, 128], sw_overlap=0.25)
    run_workflow(workflow(name, ["inference.json"], "infer", **overrides))
    assert_on_input_grid(tmp_path / "pred" / "abdomen_ct_seg.nii.gz", REAL_CT / "abdomen_ct.nii.gz", 14)
    ref = nib.load(str(REAL_CT / "abdomen_ct_label.nii.gz"))
    assert np.array_equal(ref.affine, nib.load(str(tmp_path / "pred" / "abdomen_ct_seg.nii.gz")).affine)


@pytest.mark.slow
def test_inference_on_dicom_series(synthetic, tmp_path):
    from monai.transforms import LoadImage

    name = FAST_BUNDLE
    image = nib.load(str(next((synthetic("synapse") / "imagesTs").glob("*.nii.gz"))))
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    write_dicom_series(inputs / "series1", np.asarray(image.dataobj), [0.9, 0.9, 2.5])
    write_untrained_model(name, "synapse", tmp_path / "models")
    overrides = infer_overrides("synapse", bundle_root=str(tmp_path), dataset_dir=str(inputs),
                                output_dir=str(tmp_path / "pred"), tta=True)  # with mirroring TTA
    run_workflow(workflow(name, ["inference.json"], "infer", **overrides))
    loaded = LoadImage(image_only=True)(str(inputs / "series1"))
    pred = nib.load(str(tmp_path / "pred" / "series1_seg.nii.gz"))
    assert pred.shape == tuple(loaded.shape) and pred.get_data_dtype() == np.uint8
    assert np.allclose(pred.affine, np.asarray(loaded.affine), atol=1e-5)


@pytest.mark.slow
def test_brats_channel_files_give_the_same_segmentation_as_a_4d_file(synthetic, tmp_path):
    """nnU-Net style <case>_0000..0003.nii.gz inputs are stacked as the 4 channels of one case."""
    name = "brats_segmamba"
    write_untrained_model(name, "brats", tmp_path / "models")
    image = next((synthetic("brats") / "imagesTs").glob("*.nii.gz"))
    nii = nib.load(str(image))
    four_d, split = tmp_path / "four_d", tmp_path / "split"
    four_d.mkdir()
    split.mkdir()
    (four_d / "case.nii.gz").write_bytes(image.read_bytes())
    for c in range(4):
        nib.save(nib.Nifti1Image(np.asarray(nii.dataobj)[..., c], nii.affine), str(split / f"case_{c:04d}.nii.gz"))
    preds = []
    for folder in (four_d, split):
        run_workflow(workflow(name, ["inference.json"], "infer", **infer_overrides(
            "brats", bundle_root=str(tmp_path), dataset_dir=str(folder), output_dir=str(tmp_path / f"pred_{folder.name}"))))
        preds.append(nib.load(str(tmp_path / f"pred_{folder.name}" / "case_seg.nii.gz")))
    assert_on_input_grid(tmp_path / "pred_split" / "case_seg.nii.gz", image, 4)
    assert np.array_equal(np.asarray(preds[0].dataobj), np.asarray(preds[1].dataobj))


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_multi_gpu_config_runs_on_one_cpu_process(synthetic, tmp_path, monkeypatch):
    """configs/multi_gpu_train.json layered on train.json, as one DDP process with the gloo backend."""
    for k, v in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "RANK": "0", "WORLD_SIZE": "1",
                 "LOCAL_RANK": "0"}.items():
        monkeypatch.setenv(k, v)
    overrides = tiny_overrides("synapse", bundle_root=str(tmp_path), dataset_dir=str(synthetic("synapse")))
    overrides.pop("device")
    run_workflow(workflow(FAST_BUNDLE, ["train.json", "multi_gpu_train.json"], "train", **overrides))
    assert not torch.distributed.is_initialized()
    state = torch.load(tmp_path / "models" / "model.pt", weights_only=True)
    assert not any(k.startswith("module.") for k in state)  # saved without the DDP wrapper
    assert not any(k.startswith("module.") for k in torch.load(tmp_path / "models" / "checkpoint.pt")["model"])
