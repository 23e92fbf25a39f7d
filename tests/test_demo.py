"""`make demo`'s job end to end, shortened: data, training, evaluation, the real CT and its picture."""

import json
import os

import nibabel as nib
import numpy as np
import pytest

from networks.demo import run as demo

CT = os.path.join(os.path.dirname(__file__), "data", "abdomen_ct_example", "abdomen_ct.nii.gz")


@pytest.mark.slow
def test_demo_writes_everything_and_reuses_it(tmp_path, capsys, monkeypatch):
    # a quarter-size patch keeps the CI run short; the real demo uses DEMO_SETTINGS as they are
    monkeypatch.setitem(demo.DEMO_SETTINGS, "synapse", dict(demo.DEMO_SETTINGS["synapse"], patch_size=[8, 32, 64]))
    paths = demo.main(output_dir=str(tmp_path), n_cases=5, n_test=2, max_epochs=1, epoch_length=2, threads=2)
    out = capsys.readouterr().out
    assert "held-out synthetic cases" in out and "Liver" in out and "Written:" in out
    assert os.path.exists(paths["model"])
    metrics = json.load(open(os.path.join(paths["evaluation"], "metrics.json")))
    assert metrics["num_cases"] == 2 and "Average_DSC" in metrics["summary"]["mean"]
    pred, ct = nib.load(paths["prediction"]), nib.load(CT)
    assert pred.shape == ct.shape and np.allclose(pred.affine, ct.affine) and pred.get_data_dtype() == np.uint8
    with open(paths["overlay"], "rb") as f:
        assert f.read(4) == b"\x89PNG"
    stamp = os.path.getmtime(paths["model"])
    demo.main(output_dir=str(tmp_path), n_cases=5, n_test=2, max_epochs=1, epoch_length=2, threads=2)
    assert "reusing" in capsys.readouterr().out and os.path.getmtime(paths["model"]) == stamp


def test_unknown_bundle_is_named():
    with pytest.raises(ValueError, match="unknown bundle 'synapse_unet'"):
        demo.main(bundle="synapse_unet")
