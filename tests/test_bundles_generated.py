"""The committed bundles are exactly what ``python -m networks.bundle_gen`` generates, and follow the plans."""

import importlib
import json
import math
from pathlib import Path

import pytest
from monai.bundle import ConfigParser

from networks import bundle_gen

BUNDLES = Path(__file__).resolve().parent.parent / "bundles"


def test_committed_bundles_match_generator():
    drift = bundle_gen.check(str(BUNDLES))
    assert not drift, f"generated bundle files out of date, run `make bundles`: {drift}"


def test_generator_writes_every_bundle(tmp_path):
    files = bundle_gen.generate(str(tmp_path))
    assert len(files) == 12 * (len(bundle_gen.JSON_FILES) + len(bundle_gen.TEXT_FILES))
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(bundle_gen.bundle_names())
    assert bundle_gen.check(str(tmp_path)) == []
    (tmp_path / "acdc_segmamba" / "configs" / "train.json").write_text("{}")
    assert bundle_gen.check(str(tmp_path)) == ["acdc_segmamba/configs/train.json"]


@pytest.mark.parametrize("name", bundle_gen.bundle_names())
def test_bundle_follows_plan_and_variant(name):
    dataset, variant = name.split("_")
    train = json.loads((BUNDLES / name / "configs" / "train.json").read_text())
    parser = ConfigParser()  # inference.json takes these settings from model.pt's record; without one, the plan's
    parser.read_config(str(BUNDLES / name / "configs" / "inference.json"))
    parser["bundle_root"] = "/nonexistent"
    infer = {k: parser.get_parsed_content(k) for k in ("patch_size", "pixdim", "kernel_size", "strides", "filters")}
    infer["network_def"] = parser.get("network_def")
    infer["preprocessing"] = parser.get("preprocessing")
    spec = json.loads((Path(bundle_gen.__file__).parent / "datasets" / f"{dataset}.json").read_text())
    plan = json.loads((Path(bundle_gen.__file__).parent / "plans" / f"{spec['plans']}.json").read_text())
    cls = bundle_gen.VARIANTS[variant][0]
    for cfg in (train, infer):
        assert cfg["network_def"]["_target_"] == f"networks.{cls}"
        # one axis order: nnU-Net's (the plan's lists unchanged), reached by ToNNUNetAxesd
        assert cfg["patch_size"] == plan["patch_size"]
        assert cfg["pixdim"] == plan["spacing"]
        assert cfg["kernel_size"] == plan["conv_kernel_sizes"]
        assert cfg["strides"] == plan["pool_op_kernel_sizes"]
        pre = cfg["preprocess_transforms"] if "preprocess_transforms" in cfg else cfg["preprocessing"]["transforms"]
        names = [t["_target_"] for t in pre]
        assert "Orientationd" not in names
        assert names.index("networks.bundle.ToNNUNetAxesd") < names.index("CropForegroundd")
        assert pre[names.index("networks.bundle.ToNNUNetAxesd")]["transpose_forward"] == spec["transpose_forward"]
        assert cfg["filters"] == [min(32 * 2**i, 320) for i in range(len(plan["conv_kernel_sizes"]))]
    getattr(importlib.import_module("networks"), cls)  # the target exists
    assert train["batch_size"] == plan["batch_size"]
    for size, stride_axis in zip(train["patch_size"], zip(*train["strides"])):
        assert size % math.prod(stride_axis) == 0  # the patch fits the network's strides on every axis
    w = train["ds_weights"]
    assert len(w) == len(plan["pool_op_kernel_sizes"]) - 1 and w[-1] == 0 and math.isclose(sum(w), 1.0)
    assert all(math.isclose(w[i], 2 * w[i + 1]) for i in range(len(w) - 2))
    assert list(train["regions"]) == [r[0] for r in spec["regions"]]
    handlers = [h["_target_"] for h in train["train"]["handlers"]]
    assert "ValidationHandler" in handlers and "networks.bundle.ResumableCheckpoint" in handlers


def test_synapse_ct_normalization_uses_intensity_stats():
    train = json.loads((BUNDLES / "synapse_bisegmamba" / "configs" / "train.json").read_text())
    norm = next(t for t in train["preprocess_transforms"] if t["_target_"] == "ScaleIntensityRanged")
    assert (norm["a_min"], norm["a_max"]) == (-935.0, 294.0)
    assert norm["b_min"] == pytest.approx((-935.0 - 85.1413345336914) / 116.55338287353516)
    brats = json.loads((BUNDLES / "brats_segmamba" / "configs" / "train.json").read_text())
    assert any(t.get("_target_") == "NormalizeIntensityd" and t["nonzero"] for t in brats["preprocess_transforms"])
    acdc = json.loads((BUNDLES / "acdc_segmamba" / "configs" / "train.json").read_text())
    assert not any(t.get("_target_") == "Orientationd" for t in acdc["preprocess_transforms"])
    # dummy-2D rotation about axis 0 (the slice axis) only: MONAI's range_x rotates in the plane of axes (1, 2)
    assert acdc["rotate_range"][1:] == [0.0, 0.0] and acdc["rotate_range"][0] > 3
