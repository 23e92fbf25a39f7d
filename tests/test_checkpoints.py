"""Checkpoints that survive kills, refuse damage, remember their network, and never hold NaN (CPU).

Unit tests drive the handlers with tiny ignite engines; the end-to-end tests (``slow``) run a bundle with tiny
overrides, in-process or through ``python -m monai.bundle run``, killing it with SIGKILL inside a checkpoint write.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from ignite.engine import Engine, Events
from monai.data import MetaTensor
from monai.engines import SupervisedTrainer
from monai.handlers import CheckpointLoader, TensorBoardStatsHandler
from monai.networks.utils import copy_model_state

from networks.bundle import BestModelSaver, NonFiniteGuard, ResumableCheckpoint, TrainedModel, resumed_summary_writer
from networks.bundle.checkpoint import CheckpointError, atomic_torch_save, load_verified, model_meta

RECORD = {"network": {"target": "torch.nn.Linear", "in_features": 3}, "settings": {"patch_size": [8, 8, 4]}}


def _flip_bytes(path, needle: bytes):
    data = bytearray(Path(path).read_bytes())
    at = data.find(needle)
    assert at >= 0
    data[at:at + len(needle)] = bytes(b ^ 0xFF for b in needle)
    Path(path).write_bytes(bytes(data))


def _saved_model(path, weight=1.25):
    net = torch.nn.Linear(3, 1)
    with torch.no_grad():
        net.weight.fill_(weight)
    saver = BestModelSaver(str(path), net, record=RECORD, tag="fold 0")
    evaluator = Engine(lambda e, b: None)
    evaluator.state.epoch, evaluator.state.best_metric, evaluator.state.best_metric_epoch = 3, 0.5, 3
    saver(evaluator)
    return net, saver


def test_model_file_is_a_plain_state_dict_with_a_verified_record(tmp_path):
    path = tmp_path / "model.pt"
    net, _ = _saved_model(path)
    state = torch.load(path, weights_only=True)  # what CheckpointLoader, ckpt_export and MONAI Label load
    assert set(state) == {"weight", "bias"} and all(isinstance(v, torch.Tensor) for v in state.values())
    torch.nn.Linear(3, 1).load_state_dict(state, strict=True)
    loaded = torch.nn.Linear(3, 1)  # the bundles' former loader, also MONAI Label's and ckpt_export's way
    CheckpointLoader(str(path), {"model": loaded}, map_location="cpu").attach(engine := Engine(lambda e, b: None))
    engine.run([0], max_epochs=1)
    assert torch.equal(loaded.weight, net.weight)
    exported = torch.nn.Linear(3, 1)
    assert sorted(copy_model_state(exported, torch.load(path, weights_only=True))[1]) == ["bias", "weight"]
    meta = model_meta(load_verified(path))
    assert meta["epoch"] == 3 and meta["run"] == "fold 0" and meta["settings"] == {"patch_size": [8, 8, 4]}
    assert meta["network"]["target"] == "torch.nn.Linear" and len(meta["sha256"]) == 64


def test_damaged_empty_and_truncated_files_are_refused_by_name(tmp_path):
    path = tmp_path / "model.pt"
    _saved_model(path)
    _flip_bytes(path, np.full(3, 1.25, np.float32).tobytes())  # flipped bytes inside the weights
    torch.load(path, weights_only=True)  # torch itself does not notice
    with pytest.raises(CheckpointError, match=f"{path}: damaged, its content does not match the sha256"):
        load_verified(path)
    path.write_bytes(b"")
    with pytest.raises(CheckpointError, match=f"{path}: empty file"):
        load_verified(path)
    _saved_model(path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=f"{path}: truncated or damaged"):
        load_verified(path)


def test_nonfinite_weights_are_never_written(tmp_path):
    path = tmp_path / "model.pt"
    net = torch.nn.Linear(3, 1)
    with torch.no_grad():
        net.bias.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match=f"not writing {path}: parameter bias holds NaN/Inf at epoch 4"):
        BestModelSaver(str(path), net)(_evaluator_at(4))
    trainer = Engine(lambda e, b: None)
    ResumableCheckpoint(str(tmp_path / "checkpoint.pt"), {"model": net}).attach(trainer)
    with pytest.raises(FloatingPointError, match="checkpoint entry model.bias holds NaN/Inf at epoch 1"):
        trainer.run([0], max_epochs=1)
    assert os.listdir(tmp_path) == []


def _evaluator_at(epoch, metric=0.5):
    evaluator = Engine(lambda e, b: None)
    evaluator.state.epoch, evaluator.state.best_metric, evaluator.state.best_metric_epoch = epoch, metric, epoch
    return evaluator


def _trainer(net, data, on_nonfinite="stop", **kw):
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    trainer = SupervisedTrainer(device=torch.device("cpu"), max_epochs=1, train_data_loader=data, network=net,
                                optimizer=opt, loss_function=torch.nn.MSELoss(), amp=False)
    NonFiniteGuard(on_nonfinite, **kw).attach(trainer)
    return trainer


def _batch(value, name):
    image = MetaTensor(torch.full((1, 3), value), meta={"filename_or_obj": [name]})
    return {"image": image, "label": torch.zeros(1, 1)}


def test_nonfinite_loss_stops_before_the_weights_change_naming_the_batch():
    torch.manual_seed(0)
    net = torch.nn.Linear(3, 1)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    trainer = _trainer(net, [_batch(1.0, "good.nii.gz"), _batch(float("nan"), "bad.nii.gz")])
    with pytest.raises(FloatingPointError, match=r"non-finite loss nan at epoch 1, iteration 2 \(batch: bad.nii.gz\)"):
        trainer.run()
    assert all(torch.isfinite(v).all() for v in net.state_dict().values())
    assert not torch.equal(before["weight"], net.weight)  # the good step was taken


def test_nonfinite_gradient_with_a_finite_loss_stops_naming_the_parameter():
    net = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 1))
    net[1].weight.register_hook(lambda g: torch.full_like(g, float("nan")))
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(FloatingPointError, match=r"non-finite gradient of 1\.weight at epoch 1, iteration 1"):
        _trainer(net, [_batch(1.0, "good.nii.gz")]).run()
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())


def test_nonfinite_steps_skipped_on_request_are_counted():
    net = torch.nn.Linear(3, 1)
    trainer = _trainer(net, [_batch(float("nan"), "bad.nii.gz"), _batch(1.0, "good.nii.gz"), _batch(float("inf"), "b2")],
                       "skip")
    trainer.run()
    assert trainer.state.nonfinite_steps == 2 and torch.isfinite(net.weight).all()
    trainer = _trainer(torch.nn.Linear(3, 1), [_batch(float("nan"), "a"), _batch(float("nan"), "b")], "skip", max_skipped=1)
    with pytest.raises(FloatingPointError, match="iteration 2"):
        trainer.run()


def _run_training(ckpt, max_epochs, record=RECORD, epochs_run=None, log_dir=None, best=None):
    """A 3-iteration-per-epoch run with a LinearLR over ``max_epochs`` (the bundles' schedule)."""
    torch.manual_seed(0)
    net = torch.nn.Linear(3, 1)
    opt = torch.optim.RAdam(net.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.LinearLR(opt, 1.0, 0.0, total_iters=max_epochs)

    def step(engine, batch):
        opt.zero_grad()
        loss = net(batch).pow(2).mean()
        loss.backward()
        opt.step()
        return {"loss": loss.item()}

    trainer = Engine(step)
    lrs = []
    trainer.add_event_handler(Events.EPOCH_STARTED, lambda e: lrs.append(opt.param_groups[0]["lr"]))
    trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda e: sched.step())
    saver = BestModelSaver(str(Path(ckpt).parent / "model.pt"), net, record=record, tag="t") if best else None
    if saver is not None:
        trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda e: saver(_evaluator_at(e.state.epoch, e.state.epoch)))
    ResumableCheckpoint(str(ckpt), {"model": net, "optimizer": opt, "lr_scheduler": sched}, tag="t",
                        record=record, best_model=saver).attach(trainer)
    if log_dir is not None:
        TensorBoardStatsHandler(summary_writer=resumed_summary_writer(str(log_dir), str(ckpt)), tag_name="loss",
                                output_transform=lambda x: x["loss"]).attach(trainer)
    if epochs_run is not None:  # stop after this many epochs, like a kill after the checkpoint
        trainer.add_event_handler(Events.EPOCH_COMPLETED(once=epochs_run), lambda e: e.terminate())
    trainer.run([torch.ones(2, 3)] * 3, max_epochs=max_epochs)
    return trainer, net, opt, lrs


def test_more_epochs_after_a_finished_run_continue_the_schedule_for_the_new_length(tmp_path, caplog):
    ckpt = tmp_path / "checkpoint.pt"
    _, net2, opt, _ = _run_training(ckpt, 2)
    assert opt.param_groups[0]["lr"] == 0.0  # finished: linear decay to 0
    with caplog.at_level("WARNING"):
        trainer, net4, opt, lrs = _run_training(ckpt, 4)
    assert trainer.state.epoch == 4
    assert lrs == pytest.approx([1e-2 * 0.5, 1e-2 * 0.25])  # epochs 3 and 4 of a 4-epoch linear schedule
    assert "schedule rebuilt for 4" in caplog.text and "total_iters=2" in caplog.text
    assert not torch.equal(net2.weight, net4.weight)


def test_resume_with_other_network_or_preprocessing_is_refused_in_one_line(tmp_path):
    ckpt = tmp_path / "checkpoint.pt"
    _run_training(ckpt, 1)
    other = {"network": RECORD["network"], "settings": {"patch_size": [16, 16, 4]}}
    with pytest.raises(ValueError, match=r"trained with patch_size \[8, 8, 4\]; this run sets patch_size \[16, 16, 4\]"):
        _run_training(ckpt, 2, record=other)


def test_resume_repairs_model_written_after_the_checkpoint_and_removes_temp_files(tmp_path):
    ckpt, model = tmp_path / "checkpoint.pt", tmp_path / "model.pt"
    _run_training(ckpt, 4, epochs_run=2, best=True)
    recorded = torch.load(ckpt, weights_only=True)["best_model"]
    assert recorded["epoch"] == 2 and model_meta(load_verified(model))["sha256"] == recorded["sha256"]
    # a kill after model.pt of epoch 3 was written and before the checkpoint of epoch 3, inside a write
    net3, _ = _saved_model(model, weight=3.0)
    (tmp_path / ".checkpoint.pt.abc123.tmp").write_bytes(b"partial")
    (tmp_path / ".model.pt.def456.tmp").write_bytes(b"partial")
    trainer = Engine(lambda e, b: None)
    saver = BestModelSaver(str(model), torch.nn.Linear(3, 1), record=RECORD, tag="t")
    net = torch.nn.Linear(3, 1)
    ResumableCheckpoint(str(ckpt), {"model": net}, tag="t", record=RECORD, best_model=saver).attach(trainer)
    trainer.add_event_handler(Events.STARTED, lambda e: e.terminate())
    trainer.run([0], max_epochs=4)
    assert sorted(os.listdir(tmp_path)) == ["checkpoint.pt", "model.pt"]
    meta = model_meta(load_verified(model))
    assert meta["epoch"] == 2 and meta["sha256"] == recorded["sha256"]  # the checkpoint's best model again
    model.write_bytes(b"")  # an empty model.pt is repaired the same way
    trainer.run([0], max_epochs=4)
    assert model_meta(load_verified(model))["sha256"] == recorded["sha256"]


def test_tensorboard_steps_are_unique_after_a_resume(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ckpt, logs = tmp_path / "checkpoint.pt", tmp_path / "logs"
    _run_training(ckpt, 3, epochs_run=2, log_dir=logs)
    shutil.copy(ckpt, tmp_path / "epoch2.pt")
    _run_training(ckpt, 3, log_dir=logs)  # runs epoch 3 (iterations 7-9) and is "killed" after logging them ...
    shutil.copy(tmp_path / "epoch2.pt", ckpt)  # ... before its checkpoint
    _run_training(ckpt, 3, log_dir=logs)  # logs iterations 7-9 again
    acc = EventAccumulator(str(logs))
    acc.Reload()
    assert [e.step for e in acc.Scalars("loss")] == list(range(1, 10))


def test_trained_model_check_says_what_is_wrong_in_one_line(tmp_path, caplog):
    path = tmp_path / "model.pt"
    with pytest.raises(SystemExit) as err:
        TrainedModel(str(path)).check(RECORD, torch.nn.Linear(3, 1))
    msg = str(err.value)
    assert "\n" not in msg and f"no trained weights at {path}" in msg
    assert "monai.bundle run training" in msg and "monai.bundle download" in msg and "--ckpt_path" in msg
    _saved_model(path)
    trained = TrainedModel(str(path))
    assert trained.get("patch_size", [1, 1, 1]) == [8, 8, 4] and trained.get("pixdim", [2.0]) == [2.0]
    net = torch.nn.Linear(3, 1)
    trained.check(RECORD, net)
    assert torch.equal(net.weight, torch.full((1, 3), 1.25))
    with pytest.raises(SystemExit, match=r"trained with patch_size \[8, 8, 4\] but this run sets patch_size \[4, 4, 4\]"):
        TrainedModel(str(path)).check({"settings": {"patch_size": [4, 4, 4]}}, torch.nn.Linear(3, 1))
    torch.save(torch.nn.Linear(3, 2).state_dict(), path)  # an older plain state dict of another shape
    with pytest.raises(SystemExit, match=r"does not fit the network \(2 shape\(s\) differ.*weight is \[2, 3\] in the file"):
        TrainedModel(str(path)).check(RECORD, torch.nn.Linear(3, 1))
    path.write_bytes(b"x" * 10)
    with pytest.raises(SystemExit, match=f"cannot use the weights {path}: truncated or damaged"):
        TrainedModel(str(path)).check(RECORD, torch.nn.Linear(3, 1))


# ------------------------------------------------------------------ end to end, with a bundle

from test_bundles import (BUNDLES, FAST_BUNDLE, _cli, _cli_overrides, assert_on_input_grid, check_metrics,  # noqa: E402
                          num_classes, run_workflow, synthetic, workflow)
from networks.bundle.synthetic import tiny_overrides  # noqa: E402

KILLER = textwrap.dedent("""
    # monai.bundle's command line, with every model.pt saved as a new best and a SIGKILL inside the Nth write of
    # checkpoint.pt (temp file written, not yet renamed): after model.pt of that epoch, before its checkpoint
    import os, runpy, signal, sys
    import networks.bundle.checkpoint as ckpt

    kill_at, writes, real_replace, real_call = int(os.environ["KILL_AT_CHECKPOINT_WRITE"]), [0], os.replace, ckpt.BestModelSaver.__call__

    def always_best(self, engine):
        engine.state.best_metric_epoch = engine.state.epoch
        return real_call(self, engine)

    def replace(src, dst, *args, **kwargs):
        if os.path.basename(str(dst)) == "checkpoint.pt":
            writes[0] += 1
            if writes[0] == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
        return real_replace(src, dst, *args, **kwargs)

    ckpt.BestModelSaver.__call__, os.replace = always_best, replace
    sys.argv = ["monai.bundle", *sys.argv[1:]]
    runpy.run_module("monai.bundle", run_name="__main__", alter_sys=True)
""")


def _steps(logs, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logs))
    acc.Reload()
    return [e.step for e in acc.Scalars(tag)]


@pytest.mark.slow
def test_kill_between_model_and_checkpoint_then_resume_evaluate_and_infer_without_overrides(synthetic, tmp_path):
    name, data = FAST_BUNDLE, synthetic("synapse")
    overrides = tiny_overrides("synapse", bundle_root=str(tmp_path), dataset_dir=str(data), max_epochs=3)
    args = ["run", "training", "--meta_file", "configs/metadata.json", "--config_file", "configs/train.json",
            "--logging_file", "configs/logging.conf", *_cli_overrides(overrides)]
    models = tmp_path / "models"
    (tmp_path / "killer.py").write_text(KILLER)
    killed = subprocess.run([sys.executable, str(tmp_path / "killer.py"), *args], cwd=str(BUNDLES / name),
                            env={**os.environ, "KILL_AT_CHECKPOINT_WRITE": "2"}, capture_output=True, text=True,
                            timeout=900)
    assert killed.returncode == -signal.SIGKILL, killed.stdout[-3000:] + killed.stderr[-3000:]
    assert load_verified(models / "checkpoint.pt")["trainer"]["iteration"] == 2  # epoch 1
    assert model_meta(load_verified(models / "model.pt"))["epoch"] == 2  # the two files disagree ...
    assert len(list(models.glob(".checkpoint.pt.*.tmp"))) == 1  # ... and the killed write left its temp file

    proc = _cli(name, args[1:])  # the same command again
    log = proc.communicate(timeout=900)[0]
    assert proc.returncode == 0, log[-3000:]
    assert "removed 1 stale temporary file(s)" in log and "resumed from" in log
    assert "repaired" in log and "rewritten with the best model of epoch 1 recorded in the checkpoint" in log
    assert sorted(p.name for p in models.iterdir()) == ["checkpoint.pt", "model.pt"]
    final = load_verified(models / "checkpoint.pt")
    assert final["trainer"]["iteration"] == 6 and final["best_model"]["sha256"] == model_meta(load_verified(models / "model.pt"))["sha256"]
    assert _steps(tmp_path / "logs", "train_loss") == [1, 2, 3, 4, 5, 6]  # iterations 3-4 logged twice, shown once
    assert _steps(tmp_path / "logs", "val_mean_dice") == [2, 4, 6]

    # more epochs after the finished run: the schedule continues for the new length, not at LR 0
    weights = final["model"]
    more = run_workflow(workflow(name, ["train.json"], "train", **{**overrides, "max_epochs": 4}))
    del more
    after = load_verified(models / "checkpoint.pt")
    assert after["trainer"]["iteration"] == 8 and after["lr_scheduler"]["total_iters"] == 4
    assert any(not torch.equal(weights[k], after["model"][k]) for k in weights)  # LR > 0 in epoch 4
    # resuming with another network is refused, naming both values
    with pytest.raises(Exception) as err:
        run_workflow(workflow(name, ["train.json"], "train", **{**overrides, "max_epochs": 5, "filters": [4, 4, 4, 4, 4, 4]}))
    cause = err.value
    while cause.__cause__ is not None:  # MONAI wraps what the "run" expression raised
        cause = cause.__cause__
    assert str(cause) == (f"checkpoint {models}/checkpoint.pt was trained with filters [4, 8, 8, 8, 8, 8]; this run "
                              "sets filters [4, 4, 4, 4, 4, 4]: resume with the training's options, or start afresh "
                              "(--resume False or another --ckpt_dir)")

    # evaluation and inference without repeating --filters / --patch_size: the network is rebuilt from model.pt
    plain = {k: v for k, v in overrides.items() if k not in ("filters", "patch_size")}
    run_workflow(workflow(name, ["train.json", "evaluate.json"], "train", **plain))
    check_metrics(tmp_path / "eval", name, n_cases=1)
    infer = {"bundle_root": str(tmp_path), "dataset_dir": str(data / "imagesTs"), "output_dir": str(tmp_path / "pred"),
             "device": "$torch.device('cpu')", "amp": False, "num_workers": 0, "sw_batch_size": 1}
    run_workflow(workflow(name, ["inference.json"], "infer", **infer))
    image = next((data / "imagesTs").glob("*.nii.gz"))
    assert_on_input_grid(tmp_path / "pred" / image.name.replace(".nii.gz", "_seg.nii.gz"), image, num_classes(name))
    with pytest.raises(SystemExit, match=r"trained with filters \[4, 8, 8, 8, 8, 8\].* but this run sets filters \[8, "):
        run_workflow(workflow(name, ["inference.json"], "infer", **{**infer, "filters": [8, 8, 8, 8, 8, 8]}))


@pytest.mark.slow
def test_missing_weights_end_in_one_line_before_any_data_is_read(synthetic, tmp_path):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    (inputs / "corrupt.nii.gz").write_bytes(b"\x1f\x8b garbage")
    proc = _cli(FAST_BUNDLE, ["--config_file", "configs/inference.json", "--bundle_root", str(tmp_path),
                              "--dataset_dir", str(inputs), "--output_dir", str(tmp_path / "pred")])
    log = proc.communicate(timeout=900)[0]
    assert proc.returncode == 1, log[-3000:]
    errors = [line for line in log.splitlines() if "error" in line.lower()]
    assert errors == [f"error: no trained weights at {tmp_path}/models/model.pt: train them with this bundle's train "
                      "command (python -m monai.bundle run training --config_file configs/train.json ...), download a "
                      "release (python -m monai.bundle download / download_large_files, or the release archive) so that "
                      f"{tmp_path}/models/model.pt exists, or pass --ckpt_path /path/to/model.pt"]
    assert "Traceback" not in log and "corrupt" not in log and not (tmp_path / "pred").exists()
    overrides = tiny_overrides("synapse", bundle_root=str(tmp_path), dataset_dir=str(synthetic("synapse")))
    with pytest.raises(SystemExit, match=f"no trained weights at {tmp_path}/models/model.pt"):
        run_workflow(workflow(FAST_BUNDLE, ["train.json", "evaluate.json"], "train", **overrides))
    assert not (tmp_path / "eval").exists()


@pytest.mark.slow
def test_nan_loss_stops_training_with_nonzero_exit_and_no_checkpoint(synthetic, tmp_path):
    overrides = tiny_overrides("synapse", bundle_root=str(tmp_path), dataset_dir=str(synthetic("synapse")))
    nan_loss = "$lambda pred, target: (pred[0] if isinstance(pred, (list, tuple)) else pred).mean() * float('nan')"
    proc = _cli(FAST_BUNDLE, ["training", "--meta_file", "configs/metadata.json", "--config_file", "configs/train.json",
                              "--logging_file", "configs/logging.conf", *_cli_overrides(overrides), "--loss", nan_loss])
    log = proc.communicate(timeout=900)[0]
    assert proc.returncode != 0, log[-3000:]
    assert "FloatingPointError: training stopped: non-finite loss nan at epoch 1, iteration 1 (batch: " in log
    assert "synapse_0" in log.split("non-finite loss nan at epoch 1, iteration 1 (batch: ")[1].splitlines()[0]
    assert not (tmp_path / "models" / "checkpoint.pt").exists() and not (tmp_path / "models" / "model.pt").exists()
