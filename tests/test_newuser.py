"""A new user's first hour: progress output, the quick trial of a bundle's README followed verbatim, DICOM
series given directly, the output orientation option, Dice in percent, one checkpoint line, quiet installs
and runs.

The quick-trial test reads the commands out of the generated ``docs/README.md`` of a bundle (so that the
documentation cannot drift from what is tested), substitutes only the placeholder paths, and runs them in a
copy of the bundle folder on synthetic data.
"""

import fcntl
import io
import json
import logging
import os
import pty
import re
import shlex
import shutil
import struct
import subprocess
import sys
import termios
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from ignite.engine import Engine

from networks.bundle.checkpoint import ResumableCheckpoint
from networks.bundle.evaluation import MeanDicePercent
from networks.bundle.inference import SaveOnInputGridd, list_inputs
from networks.bundle.progress import CaseProgress, Progress, SlidingWindowProgressInferer, count_windows
from networks.bundle.synthetic import make_dataset, tiny_overrides

import support

REPO = Path(__file__).resolve().parent.parent
BUNDLES = REPO / "bundles"
NAME = "synapse_bisegmamba"


class _Tty(io.StringIO):
    def isatty(self):
        return True


# ------------------------------------------------------------------ progress


def test_progress_bar_on_a_tty_and_plain_lines_in_a_log(caplog):
    tty = _Tty()
    with Progress(20, "windows of case 1", "windows", stream=tty) as p:
        for _ in range(20):
            p.update()
    assert "\r" in tty.getvalue() and "20/20" in tty.getvalue()  # tqdm's redrawn bar

    log = io.StringIO()
    with caplog.at_level(logging.INFO, logger="networks.bundle.progress"):
        with Progress(20, "windows of case 1", "windows", stream=log, min_interval_s=0) as p:
            for _ in range(20):
                p.update()
    assert log.getvalue() == ""  # nothing drawn on a non-TTY stream
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0].startswith("windows of case 1: 2/20 windows (10 %), elapsed ") and "left" in lines[0]
    assert len(lines) == 10 and lines[-1].startswith("windows of case 1: 20/20 windows (100 %)")


def test_short_steps_stay_silent_in_logs(caplog):
    with caplog.at_level(logging.INFO, logger="networks.bundle.progress"):
        with Progress(5, "validation", "cases", stream=io.StringIO()) as p:  # default min_interval_s=5
            for _ in range(5):
                p.update()
    assert caplog.records == []


@pytest.mark.parametrize("shape,roi,overlap", [((50, 40, 9), (16, 16, 8), 0.5), ((10, 12, 3), (16, 16, 8), 0.25),
                                               ((64, 64, 16), (64, 64, 16), 0.5)])
def test_sliding_window_counts_the_windows_the_network_sees(shape, roi, overlap):
    seen = []

    def net(x):
        seen.append(x.shape[0])
        return x

    x = torch.randn(1, 1, *shape)
    inferer = SlidingWindowProgressInferer(roi_size=roi, sw_batch_size=3, overlap=overlap, mode="gaussian")
    y = inferer(x, net)
    assert y.shape == x.shape
    assert sum(seen) == count_windows(shape, roi, overlap)


def test_case_progress_reports_every_case_of_an_evaluator(caplog, monkeypatch):
    # a bundle's logging.conf, applied by an earlier in-process workflow, disables existing loggers
    logger = logging.getLogger("networks.bundle.progress")
    monkeypatch.setattr(logger, "disabled", False)
    monkeypatch.setattr(logger, "propagate", True)
    engine = Engine(lambda e, b: b)
    CaseProgress("evaluation", min_interval_s=0).attach(engine)
    with caplog.at_level(logging.INFO, logger="networks.bundle.progress"):
        engine.run([{"x": 1}] * 3, max_epochs=1)
    msgs = [r.getMessage() for r in caplog.records if r.name == "networks.bundle.progress"]
    assert [m.split(" (")[0] for m in msgs[:2]] == ["evaluation: 1/3 cases", "evaluation: 2/3 cases"]
    assert msgs[-1].startswith("evaluation: 3/3 cases (100 %)")


def test_multi_gpu_config_still_disables_the_logging_and_saving_handlers_on_other_ranks():
    """multi_gpu_train.json disables validate#handlers by index: the progress handler must not shift them."""
    conf = BUNDLES / NAME / "configs"
    handlers = json.loads((conf / "train.json").read_text())["validate"]["handlers"]
    multi = json.loads((conf / "multi_gpu_train.json").read_text())
    disabled = sorted(int(k.split("#")[2]) for k in multi if k.startswith("validate#handlers#"))
    assert [handlers[i]["_target_"] for i in disabled] == ["StatsHandler", "TensorBoardStatsHandler",
                                                            "networks.bundle.BestModelSaver"]


# ------------------------------------------------------------------ units, lines printed once, warnings


def test_validation_dice_in_percent():
    metric = MeanDicePercent(include_background=True, save_details=False)
    pred = torch.zeros(1, 2, 4, 4, 4)
    pred[:, 0, :2], pred[:, 1, 2:] = 1, 1
    metric.update((pred, pred.clone()))
    assert metric.compute() == pytest.approx(100.0)
    metric.reset()
    half = pred.clone()
    half[:, 1, 3:] = 0
    metric.update((half, pred))
    assert metric.compute() == pytest.approx(100.0 * (1 + 2 * 16 / (16 + 32)) / 2, rel=1e-5)


def test_last_checkpoint_written_and_logged_once(tmp_path, caplog):
    net = torch.nn.Linear(2, 2)
    engine = Engine(lambda e, b: None)
    ResumableCheckpoint(str(tmp_path / "checkpoint.pt"), {"model": net}).attach(engine)
    with caplog.at_level(logging.INFO, logger="networks.bundle.checkpoint"):
        engine.run([0, 1], max_epochs=2)
    saved = [r.getMessage() for r in caplog.records if "saved resumable checkpoint" in r.getMessage()]
    assert saved == [f"saved resumable checkpoint {tmp_path / 'checkpoint.pt'} at epoch {e}" for e in (1, 2)]


def test_known_harmless_warnings_filtered_by_message_only(caplog):
    import networks  # noqa: F401  (installs the filters)

    with warnings.catch_warnings(record=True) as got:
        warnings.simplefilter("default")
        networks.quiet.filter_known_warnings()
        warnings.warn('parsing config_file configs/train.json: any `"_target_"` value in it is resolved to an '
                      "importable callable and invoked with no allow list, and any `\"$\"`-prefixed value is "
                      "passed to Python `eval()`. Only proceed if this config is from a source you trust", UserWarning)
        warnings.warn("NvImgCodecPydicomReader: nvImageCodec decoder plugin did not register successfully.", UserWarning)
        warnings.warn("parsing config_file something else", UserWarning)
    assert [str(w.message) for w in got] == ["parsing config_file something else"]
    with caplog.at_level(logging.INFO):
        logging.getLogger("monai.data.nvimgcodec_pydicom_plugin").warning(
            "nvImageCodec is not available; skipping pydicom decoder plugin registration.")
        logging.getLogger("monai.data.nvimgcodec_pydicom_plugin").warning("another message")
    assert [r.getMessage() for r in caplog.records] == ["another message"]


def test_every_package_folder_is_declared_in_setup_cfg():
    """setuptools warns "Package would be ignored" for folders under networks/ that packages= does not list."""
    from setuptools.config.setupcfg import read_configuration

    cwd = os.getcwd()
    os.chdir(REPO)
    try:
        packages = set(read_configuration("setup.cfg")["options"]["packages"])
    finally:
        os.chdir(cwd)
    folders = {".".join(p.relative_to(REPO).parts) for p in (REPO / "networks").rglob("*")
               if p.is_dir() and "__pycache__" not in p.parts and any(f.is_file() for f in p.iterdir())}
    folders.add("networks")
    assert folders - packages == set()
    assert not [p for p in packages if "__pycache__" in p]


# ------------------------------------------------------------------ DICOM


def write_dicom_series(folder, volume):
    """The series of tests/support.py at an origin off zero (-20, -15, 30) mm."""
    support.write_dicom_series(folder, volume, origin=(-20.0, -15.0, 30.0))


def test_dicom_series_folder_is_one_case(tmp_path):
    series = tmp_path / "ct_series"
    write_dicom_series(series, np.zeros((6, 5, 3)))
    assert list_inputs(str(series)) == [{"image": str(series), "src": str(series), "id": "ct_series"}]
    assert [it["id"] for it in list_inputs(str(tmp_path))] == ["ct_series"]  # its parent, as before


def test_output_orientation_writes_the_same_voxels_on_another_grid(tmp_path):
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, (6, 5, 3)).astype(np.float32)
    affine = np.diag([-0.9, -0.9, 2.5, 1.0])
    affine[:3, 3] = [20, 15, 30]  # an LPS grid, as MONAI's DICOM reader returns for an axial series
    from monai.data import MetaTensor

    pred = MetaTensor(torch.as_tensor(labels)[None], affine=torch.as_tensor(affine))
    SaveOnInputGridd("pred", str(tmp_path / "own"))({"pred": pred, "src": "/nowhere/series", "id": "c"})
    SaveOnInputGridd("pred", str(tmp_path / "las"), output_orientation="LAS")({"pred": pred, "src": "/nowhere/series", "id": "c"})
    own, las = nib.load(str(tmp_path / "own" / "c_seg.nii.gz")), nib.load(str(tmp_path / "las" / "c_seg.nii.gz"))
    assert nib.aff2axcodes(own.affine) == ("L", "P", "S") and np.allclose(own.affine, affine, atol=1e-5)
    assert nib.aff2axcodes(las.affine) == ("L", "A", "S")
    # the same label at the same world position
    ijk = np.array([[1, 2, 0], [5, 4, 2], [0, 0, 1]])
    world = nib.affines.apply_affine(own.affine, ijk)
    ijk_las = np.rint(nib.affines.apply_affine(np.linalg.inv(las.affine), world)).astype(int)
    assert [own.get_fdata()[tuple(a)] for a in ijk] == [las.get_fdata()[tuple(b)] for b in ijk_las]
    with pytest.raises(ValueError, match="output_orientation 'LRS'"):
        SaveOnInputGridd("pred", str(tmp_path), output_orientation="LRS")


def _write_untrained_model(models, overrides):
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(BUNDLES / NAME / "configs" / "inference.json"))
    parser.update({"filters": overrides["filters"]})
    torch.manual_seed(0)
    os.makedirs(models, exist_ok=True)
    torch.save(parser.get_parsed_content("network_def").state_dict(), os.path.join(models, "model.pt"))


def _run_in_pty(cmd, cwd):
    """Run ``cmd`` with stderr on a pseudo-terminal (as in an interactive shell); stdout, stderr text and rc."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))  # a 120-column terminal
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=slave, text=True)
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:  # EIO once the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    out = proc.stdout.read()
    return out, b"".join(chunks).decode(errors="replace"), proc.wait(timeout=600)


@pytest.mark.slow
def test_infer_dicom_series_given_directly_with_progress(tmp_path):
    """A DICOM series folder as --dataset_dir; --output_orientation LAS; a bar on a TTY, none in a log."""
    volume = np.full((40, 30, 8), -1000.0)
    volume[10:30, 8:22, 2:6] = 40.0
    series = tmp_path / "series"
    write_dicom_series(series, volume)
    overrides = tiny_overrides("synapse")
    _write_untrained_model(tmp_path / "models", overrides)
    base = [sys.executable, "-m", "monai.bundle", "run", "--config_file", "configs/inference.json",
            "--logging_file", "configs/logging.conf", "--dataset_dir", str(series), "--bundle_root", str(tmp_path),
            "--filters", json.dumps(overrides["filters"]), "--patch_size", json.dumps(overrides["patch_size"]),
            "--num_workers", "0", "--sw_overlap", "0.9"]

    proc = subprocess.run(base + ["--output_dir", str(tmp_path / "own")], cwd=str(BUNDLES / NAME),
                          capture_output=True, text=True, timeout=600)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-3000:]
    assert "\r" not in log and "Traceback" not in log  # no bar redraws in a log
    assert "nvImageCodec" not in log
    own = nib.load(str(tmp_path / "own" / "series_seg.nii.gz"))
    assert own.shape == volume.shape and nib.aff2axcodes(own.affine) == ("L", "P", "S")

    out, err, rc = _run_in_pty(base + ["--output_dir", str(tmp_path / "las"), "--output_orientation", "LAS"],
                               str(BUNDLES / NAME))
    assert rc == 0, (out + err)[-3000:]
    assert "sliding window" in err and "\r" in err and "inference" in err  # the bars, on the terminal
    las = nib.load(str(tmp_path / "las" / "series_seg.nii.gz"))
    assert nib.aff2axcodes(las.affine) == ("L", "A", "S")
    assert np.array_equal(np.asarray(las.dataobj), np.asarray(own.dataobj)[:, ::-1, :])
    assert np.allclose(nib.affines.apply_affine(las.affine, [0, 0, 0]),
                       nib.affines.apply_affine(own.affine, [0, own.shape[1] - 1, 0]))


# ------------------------------------------------------------------ the README's quick trial, verbatim


def quick_trial_commands(readme: Path):
    """The shell commands of the "Quick trial on a CPU" section (one per logical line)."""
    section = readme.read_text().split("## Quick trial on a CPU", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [line for line in block.replace("\\\n", " ").splitlines() if line.strip() and not line.startswith("#")]


def test_quick_trial_commands_are_train_evaluate_infer():
    cmds = quick_trial_commands(BUNDLES / NAME / "docs" / "README.md")
    assert len(cmds) == 3
    assert "training" in cmds[0] and "--val_max_cases" in cmds[0] and "--pixdim" in cmds[0]
    assert "evaluate.json" in cmds[1] and "inference.json" in cmds[2]


def test_main_readme_shows_the_same_quick_trial():
    main = [c.replace("/data/synapse", "/path/to/data") for c in quick_trial_commands(REPO / "README.md")]
    assert main[0] == f"cd bundles/{NAME}"
    assert main[1:] == quick_trial_commands(BUNDLES / NAME / "docs" / "README.md")


def test_val_max_cases_limits_the_validation_cases():
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(BUNDLES / NAME / "configs" / "train.json"))
    cases = [{"image": f"{i}.nii.gz", "label": f"{i}_seg.nii.gz"} for i in range(4)]
    parser.update({"fold_items": [cases[:1], cases], "val_max_cases": 2, "data_check": "off"})
    assert parser.get_parsed_content("validate#dataset#data") == cases[:2]
    parser.update({"val_max_cases": None})
    assert parser.get_parsed_content("validate#dataset#data") == cases


@pytest.mark.slow
def test_readme_quick_trial_verbatim(tmp_path):
    data = tmp_path / "data"
    make_dataset("synapse", str(data))
    bundle = tmp_path / NAME  # a fresh copy of the bundle: the commands write trial/ inside it
    shutil.copytree(BUNDLES / NAME, bundle)
    places = {"/path/to/data": str(data), "/path/to/images": str(data / "imagesTs")}
    for cmd in quick_trial_commands(bundle / "docs" / "README.md"):
        for placeholder, path in places.items():
            cmd = cmd.replace(placeholder, path)
        argv = shlex.split(cmd)
        assert argv[0] == "python"
        proc = subprocess.run([sys.executable, *argv[1:]], cwd=str(bundle), capture_output=True, text=True,
                              timeout=3600)  # minutes on a quiet 2-core machine; far more on a loaded one
        log = proc.stdout + proc.stderr
        assert proc.returncode == 0, f"{cmd}\n{log[-4000:]}"
        assert "Traceback" not in log and "\r" not in log, log[-4000:]
    trial = bundle / "trial"
    assert torch.load(trial / "models" / "model.pt", weights_only=True)
    metrics = json.loads((trial / "eval" / "metrics.json").read_text())
    assert metrics["num_cases"] == 1 and metrics["units"]["DSC"] == "%"
    for image in sorted((data / "imagesTs").glob("*.nii.gz")):
        pred = nib.load(str(trial / "predictions" / image.name.replace(".nii.gz", "_seg.nii.gz")))
        assert pred.shape == nib.load(str(image)).shape


# ------------------------------------------------------------------ download errors offline


def test_fetch_offline_fails_in_one_line(tmp_path):
    """No network (a closed local port): one "error: ..." line, exit status 1, nothing left behind."""
    proc = subprocess.run([sys.executable, "-m", "networks.dist", "fetch", "--url",
                           "http://127.0.0.1:9/synapse_bisegmamba_v0.1.0.zip", "--bundle_dir", str(tmp_path / "b")],
                          capture_output=True, text=True, timeout=300, cwd=str(REPO))
    assert proc.returncode == 1
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: download of http://127.0.0.1:9/model_info.json failed"), proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    assert list((tmp_path / "b").iterdir()) == []
