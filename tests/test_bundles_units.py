"""Fast unit tests of the bundle helpers in ``networks.bundle`` (no bundle run)."""

import json
import os

import nibabel as nib
import numpy as np
import pytest
import torch
from ignite.engine import Engine, Events
from monai.data import MetaTensor

from networks.bundle import (BestModelSaver, InputChecker, LabelsToRegionsd, MirrorTTAInferer, PlainTensorInferer,
                             ResumableCheckpoint, SaveOnInputGridd, atomic_torch_save, case_metrics, list_inputs)
from networks.bundle.evaluation import summarize
from networks.bundle.inference import InputErrors


def _save(path, arr, affine=None):
    nib.save(nib.Nifti1Image(arr, np.eye(4) if affine is None else affine), str(path))
    return str(path)


# ---------------------------------------------------------------- evaluation


def test_case_metrics_identical_and_empty_rules():
    ref = torch.zeros(3, 10, 12, 8)
    ref[0, 2:6, 2:6, 2:6] = 1  # present in both
    pred = ref.clone()
    ref[2, 1:3, 1:3, 1:3] = 1  # region 2: only in the reference; region 1 empty in both
    m = case_metrics(pred, ref, ["A", "B", "C"], spacing=[1.0, 2.0, 3.0])
    assert m["A_DSC"] == pytest.approx(100.0) and m["A_HD95"] == pytest.approx(0.0)
    assert m["B_DSC"] == 100.0 and m["B_HD95"] == 0.0
    diagonal = float(np.sqrt(10**2 + 24**2 + 24**2))
    assert m["C_DSC"] == 0.0 and m["C_HD95"] == pytest.approx(diagonal)
    assert m["Average_DSC"] == pytest.approx(200 / 3) and m["Average_HD95"] == pytest.approx(diagonal / 3)
    assert all(np.isfinite(v) for v in m.values())


def test_case_metrics_hd95_in_mm_uses_spacing():
    ref, pred = torch.zeros(1, 20, 20, 20), torch.zeros(1, 20, 20, 20)
    ref[0, 5:10, 5:10, 5:10] = 1
    pred[0, 7:12, 5:10, 5:10] = 1  # shifted by 2 voxels along axis 0
    m = case_metrics(pred, ref, ["X"], spacing=[2.0, 1.0, 1.0])
    assert m["X_HD95"] == pytest.approx(4.0)
    assert m["X_DSC"] == pytest.approx(100 * 2 * 75 / 250)
    # spacing read from the reference's affine when not given
    ref_mt = MetaTensor(ref, affine=torch.diag(torch.tensor([2.0, 1.0, 1.0, 1.0])))
    assert case_metrics(pred, ref_mt, ["X"])["X_HD95"] == pytest.approx(4.0)


def test_summarize_mean_and_sample_std():
    s = summarize([{"a": 1.0}, {"a": 3.0}], ["a"])
    assert s["mean"]["a"] == 2.0 and s["std"]["a"] == pytest.approx(np.sqrt(2.0))
    assert summarize([{"a": 5.0}], ["a"])["std"]["a"] == 0.0


def test_labels_to_regions_brats_and_output_names():
    lab = MetaTensor(torch.tensor([0, 1, 2, 3]).reshape(1, 4, 1, 1).float(), affine=torch.eye(4) * 2)
    out = LabelsToRegionsd(["label"], {"WT": [1, 2, 3], "ET": [3], "TC": [2, 3]}, names=["regions"])({"label": lab})
    r = out["regions"]
    assert r.shape == (3, 4, 1, 1) and "label" in out
    assert r[:, :, 0, 0].tolist() == [[0, 1, 1, 1], [0, 0, 0, 1], [0, 0, 1, 1]]
    assert isinstance(r, MetaTensor) and torch.equal(r.affine, lab.affine)


# ---------------------------------------------------------------- checkpoints


def test_atomic_torch_save_keeps_old_file_on_failure(tmp_path):
    path = tmp_path / "m.pt"
    atomic_torch_save({"a": torch.ones(2)}, str(path))

    class Boom:
        def __reduce__(self):
            raise RuntimeError("cannot pickle")

    with pytest.raises(RuntimeError):
        atomic_torch_save({"a": Boom()}, str(path))
    assert torch.equal(torch.load(path)["a"], torch.ones(2))
    assert os.listdir(tmp_path) == ["m.pt"]  # no temp file left behind


def _tiny_training(ckpt, max_epochs, evaluator=None):
    torch.manual_seed(0)
    net = torch.nn.Linear(3, 1)
    opt = torch.optim.RAdam(net.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.LinearLR(opt, 1.0, 0.0, total_iters=4)

    def step(engine, batch):
        opt.zero_grad()
        loss = net(batch).pow(2).mean()
        loss.backward()
        opt.step()
        return loss.item()

    trainer = Engine(step)
    trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda e: sched.step())
    ResumableCheckpoint(str(ckpt), {"model": net, "optimizer": opt, "lr_scheduler": sched}, evaluator=evaluator).attach(trainer)
    data = [torch.ones(2, 3)] * 3
    trainer.run(data, max_epochs=max_epochs)
    return trainer, net, opt, sched


def test_resumable_checkpoint_continues_with_optimizer_and_scheduler(tmp_path):
    ckpt = tmp_path / "models" / "checkpoint.pt"
    _, net_full, opt_full, _ = _tiny_training(tmp_path / "other.pt", 4)
    _tiny_training(ckpt, 2)  # "interrupted" after 2 epochs
    evaluator = Engine(lambda e, b: None)
    evaluator.state.best_metric, evaluator.state.best_metric_epoch = 0.5, 2
    trainer, net, opt, sched = _tiny_training(ckpt, 4, evaluator)  # same command again
    assert trainer.state.epoch == 4 and trainer.state.iteration == 12
    assert sched.last_epoch == 4 and opt.param_groups[0]["lr"] == 0.0
    assert torch.allclose(net.weight, net_full.weight) and torch.allclose(net.bias, net_full.bias)
    saved = torch.load(ckpt, weights_only=True)
    assert saved["trainer"]["iteration"] == 12 and saved["evaluator"]["best_metric"] == 0.5


def test_best_model_saver_writes_plain_state_dict_on_improvement(tmp_path):
    net = torch.nn.Linear(2, 2)
    saver = BestModelSaver(str(tmp_path / "model.pt"), torch.nn.DataParallel(net))
    evaluator = Engine(lambda e, b: None)
    saver.attach(evaluator)
    evaluator.state.best_metric_epoch = -1
    evaluator.run([0], max_epochs=1)
    assert not (tmp_path / "model.pt").exists()
    evaluator.state.best_metric, evaluator.state.best_metric_epoch = 0.9, 2
    evaluator.state.epoch = 2
    saver(evaluator)
    sd = torch.load(tmp_path / "model.pt", weights_only=True)
    assert set(sd) == {"weight", "bias"}


# ---------------------------------------------------------------- inference helpers


def test_list_inputs_folder_and_datalist(tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    _save(d / "a.nii.gz", np.zeros((4, 4, 4), np.float32))
    _save(d / "b_0000.nii.gz", np.zeros((4, 4, 4), np.float32))
    _save(d / "b_0001.nii.gz", np.zeros((4, 4, 4), np.float32))
    (d / "notes.txt").write_text("x")
    (d / "dicom_series").mkdir()
    (d / "dicom_series" / "IM0001").write_bytes(b"x")
    (d / "empty_dir").mkdir()
    (d / "old_predictions").mkdir()
    _save(d / "old_predictions" / "a_seg.nii.gz", np.zeros((4, 4, 4), np.uint8))
    items = list_inputs(str(d))
    assert [it["id"] for it in items] == ["a", "b", "dicom_series"]
    assert items[1]["image"] == [str(d / "b_0000.nii.gz"), str(d / "b_0001.nii.gz")]
    assert items[1]["src"] == str(d / "b_0000.nii.gz")
    dl = tmp_path / "list.json"
    dl.write_text(json.dumps({"test": [{"image": "in/a.nii.gz", "id": "case_a"}], "training": []}))
    assert list_inputs(None, str(dl)) == [{"image": str(d / "a.nii.gz"), "src": str(d / "a.nii.gz"), "id": "case_a"}]
    dl.write_text(json.dumps(["in/a.nii.gz"]))
    assert list_inputs(None, str(dl))[0]["id"] == "a"
    with pytest.raises(SystemExit, match="not found"):
        list_inputs(str(tmp_path / "missing"))


def test_input_checker_names_file_and_expectation(tmp_path):
    good = _save(tmp_path / "good.nii.gz", np.ones((6, 6, 6), np.float32))
    flat = _save(tmp_path / "flat.nii.gz", np.zeros((6, 6), np.float32))
    multi = _save(tmp_path / "multi.nii.gz", np.zeros((6, 6, 6, 3), np.float32))
    bad = tmp_path / "bad.nii.gz"
    bad.write_bytes(b"not an image")
    checker = InputChecker(1, ["CT"])
    kept = checker.filter([{"image": p} for p in (good, flat, multi, str(bad))])
    assert [k["image"] for k in kept] == [good]
    msgs = "\n".join(checker.errors)
    assert "flat.nii.gz: shape: 2D image" in msgs and "expected a 3D volume with 1 channel(s) (CT)" in msgs
    assert "multi.nii.gz: shape: 3 channel(s)" in msgs and "bad.nii.gz: readable: unreadable" in msgs
    with pytest.raises(InputErrors) as e:
        checker.report()
    assert e.value.code.startswith("3 of 4 input(s) could not be segmented")
    fine = InputChecker(1)
    fine.filter([{"image": good}])
    fine.report()  # no exception


def test_mirror_tta_and_plain_tensor_inferer():
    conv = torch.nn.Conv3d(1, 2, 1)  # pointwise: equivariant to flips
    x = MetaTensor(torch.rand(1, 1, 4, 5, 6), affine=torch.eye(4))
    plain = PlainTensorInferer()(x, conv)
    assert isinstance(plain, MetaTensor) and plain.shape == (1, 2, 4, 5, 6)
    tta = MirrorTTAInferer(mirror_axes=[0, 1, 2])(x, conv)
    assert torch.allclose(tta.as_tensor(), plain.as_tensor(), atol=1e-6)
    calls = []
    MirrorTTAInferer(mirror_axes=[0, 2])(x, lambda t: calls.append(t) or t)
    assert len(calls) == 4  # identity + 3 flips
    out = PlainTensorInferer()(x, lambda t: [t, t])  # deep-supervision list passes through
    assert isinstance(out, list) and not isinstance(out[0], MetaTensor)


def test_save_on_input_grid_copies_header(tmp_path):
    affine = np.array([[-0.8, 0.1, 0, 10], [0.05, 0.8, 0, -5], [0, 0, 2.5, 3], [0, 0, 0, 1]])
    src = _save(tmp_path / "img.nii.gz", np.zeros((5, 6, 7), np.int16), affine)
    pred = torch.zeros(1, 5, 6, 7)
    pred[0, 1:3, 2:4, 3:5] = 13
    out = SaveOnInputGridd("pred", str(tmp_path / "out"))({"pred": pred, "src": src, "id": "case1"})
    written = nib.load(out["pred_file"])
    ref = nib.load(src)
    assert out["pred_file"].endswith("case1_seg.nii.gz")
    assert written.shape == ref.shape and written.get_data_dtype() == np.uint8
    assert np.array_equal(written.affine, ref.affine)
    assert written.header["sform_code"] == ref.header["sform_code"] and written.header["qform_code"] == ref.header["qform_code"]
    assert np.array_equal(np.asarray(written.dataobj), pred[0].numpy().astype(np.uint8))
    with pytest.raises(ValueError, match="differs from the input"):
        SaveOnInputGridd("pred", str(tmp_path / "out"))({"pred": torch.zeros(1, 5, 6, 8), "src": src})


def test_resumable_checkpoint_refuses_another_runs_checkpoint(tmp_path):
    net = torch.nn.Linear(1, 1)
    ckpt = tmp_path / "checkpoint.pt"
    trainer = Engine(lambda e, b: None)
    ResumableCheckpoint(str(ckpt), {"model": net}, tag="fold 0").attach(trainer)
    trainer.run([0], max_epochs=1)
    other = Engine(lambda e, b: None)
    ResumableCheckpoint(str(ckpt), {"model": net}, tag="fold 1").attach(other)
    with pytest.raises(ValueError, match="belongs to run 'fold 0', not 'fold 1'"):
        other.run([0], max_epochs=1)
    fresh = Engine(lambda e, b: None)
    ResumableCheckpoint(str(ckpt), {"model": net}, tag="fold 1", resume="False").attach(fresh)
    fresh.run([0], max_epochs=1)  # --resume False: starts afresh and overwrites
    assert torch.load(ckpt, weights_only=True)["tag"] == "fold 1"
