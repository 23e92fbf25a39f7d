"""networks.convert: the authors' nnU-Net checkpoints <-> bundle weights (renaming checked both ways)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import networks.nets as nets
from networks import convert
from networks.convert import ConversionError, authors_state_dict, project_state_dict
from networks.nets.plans import plan_kwargs

REPO = Path(__file__).resolve().parent.parent
PLANS = REPO / "networks" / "bundle_gen" / "plans"
VARIANTS = ["ResidualUNet", "SegMamba", "BiSegMamba", "MultiSegMamba", "SegMambaSkip"]


def _distinct_state(net):
    """Real tensors in the network's shapes, each distinguishable from every other, cheap for the 60-78 M
    parameters of the full plans: random int16 values for the small ones, the tensor's index broadcast (no
    memory) for the large."""
    g = torch.Generator().manual_seed(0)
    return {k: (torch.randint(-2**15, 2**15, v.shape, generator=g, dtype=torch.int16) if v.numel() < 100_000
                else torch.tensor(i, dtype=torch.int16).expand(v.shape))
            for i, (k, v) in enumerate(net.state_dict().items())}


@pytest.mark.parametrize("plan", ["synapse", "acdc", "brain_tumour"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_round_trip_is_bit_exact_for_every_network_and_plan(variant, plan):
    with torch.device("meta"):
        net = getattr(nets, variant)(**plan_kwargs(plan))
    state = _distinct_state(net)
    theirs = authors_state_dict(state)
    # the authors' aliases: every ConvDropoutNormReLU twice, the encoder again under decoder.encoder
    assert torch.equal(theirs["encoder.stem.convs.0.conv.weight"], state["stem.conv.weight"])
    assert theirs["encoder.stem.convs.0.all_modules.1.weight"] is state["stem.adn.N.weight"]
    assert theirs["decoder.encoder.stages.1.blocks.0.skip.1.norm.bias"] is state["encoder.1.0.skip.1.adn.N.bias"]
    assert theirs["decoder.stages.0.blocks.0.conv2.all_modules.0.weight"] is state["decoder.0.0.conv2.conv.weight"]
    assert theirs["decoder.transpconvs.4.bias"] is state["upsamples.4.conv.bias"]
    assert theirs["decoder.seg_layers.4.weight"] is state["heads.4.conv.conv.weight"]
    n_mamba = sum(k.startswith("mamba_layers.") for k in state)
    assert sum(k.startswith("encoder.mamba_layers.") for k in theirs) == n_mamba
    assert sum(k.startswith("decoder.encoder.mamba_layers.") for k in theirs) == n_mamba
    if variant == "SegMamba":
        assert theirs["encoder.mamba_layers.5.mamba.head.weight"] is state["mamba_layers.5.layer.mlp.weight"]
        assert theirs["encoder.mamba_layers.0.norm.bias"] is state["mamba_layers.0.norm.bias"]
        assert not any("all_modules" in k for k in theirs if ".mamba_layers." in k)
    if variant in ("BiSegMamba", "SegMambaSkip"):
        assert theirs["encoder.mamba_layers.2.mamba.bwd_mamba.mamba.A_log"] is state["mamba_layers.2.layer.bwd.mamba.A_log"]
        assert theirs["encoder.mamba_layers.2.mamba.norm.weight"] is state["mamba_layers.2.layer.norm.weight"]
    if variant == "MultiSegMamba":
        key = "encoder.mamba_layers.3.mambas.3.fwd_mamba.norm1.weight"
        assert theirs[key] is state["mamba_layers.3.directions.3.layer.fwd.norm1.weight"]
    back = project_state_dict(theirs)
    assert sorted(back) == sorted(state)
    assert all(torch.equal(back[k], state[k]) and back[k].dtype == state[k].dtype for k in state)


# ------------------------------------------------------------------------------ a tiny bundle and checkpoints
TINY = {"UNet_base_num_features": 4, "unet_max_num_features": 8}


@pytest.fixture()
def tiny(tmp_path):
    """A copy of bundles/synapse_bisegmamba with filters [4, 8, ...], the authors' plans file that gives those
    filters, and a BiSegMamba whose weights an nnU-Net checkpoint of that plan would hold."""
    bundle = tmp_path / "synapse_bisegmamba"
    shutil.copytree(REPO / "bundles" / "synapse_bisegmamba", bundle)
    cfg_path = bundle / "configs" / "train.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["filters"] = [min(4 * 2**i, 8) for i in range(6)]
    cfg_path.write_text(json.dumps(cfg))
    plans, dataset_json = convert._packaged_plans("synapse")
    plans["configurations"]["3d_fullres"].update(TINY)
    torch.manual_seed(0)
    net = nets.BiSegMamba(**plan_kwargs("synapse"), filters=cfg["filters"])
    return bundle, plans, dataset_json, net


def _checkpoint(path, plans, dataset_json, state, trainer="nnUNetTrainerPanSegMamba", **changes):
    ckpt = {
        "network_weights": authors_state_dict(state), "optimizer_state": {}, "grad_scaler_state": None,
        # as the authors' trainer writes them: numpy scalars in the log
        "logging": {"ema_fg_dice": [np.float64(0.5), np.float64(0.6)]}, "_best_ema": np.float64(0.6),
        "current_epoch": 300, "trainer_name": trainer, "inference_allowed_mirroring_axes": (0, 1, 2),
        "init_args": {"plans": plans, "configuration": "3d_fullres", "fold": 0, "dataset_json": dataset_json,
                      "unpack_dataset": True, "device": torch.device("cuda")},
    }
    ckpt.update(changes)
    torch.save(ckpt, path)
    return path


def test_authors_checkpoint_becomes_bundle_weights_and_back(tiny, tmp_path):
    bundle, plans, dataset_json, net = tiny
    ckpt = _checkpoint(tmp_path / "checkpoint_final.pth", plans, dataset_json, net.state_dict())
    out = convert.nnunet_to_bundle(str(ckpt), str(bundle))
    assert out == str(bundle / "models" / "model.pt")
    loaded = torch.load(out, weights_only=True)
    assert list(loaded) == list(net.state_dict())
    assert all(torch.equal(loaded[k], v) for k, v in net.state_dict().items())
    fresh = nets.BiSegMamba(**plan_kwargs("synapse"), filters=[4, 8, 8, 8, 8, 8])
    fresh.load_state_dict(loaded)  # the bundle's network takes it as its CheckpointLoader would (strict)

    # back: an nnU-Net model folder the authors' predictor reads (plans.json, dataset.json, fold_0/...)
    plans_file, ds_file = tmp_path / "my_plans.json", tmp_path / "my_dataset.json"
    plans_file.write_text(json.dumps(plans))
    ds_file.write_text(json.dumps(dataset_json))
    model_dir = tmp_path / "nnUNetTrainerPanSegMamba__nnUNetPlans__3d_fullres"
    back = convert.bundle_to_nnunet(str(bundle), str(model_dir / "fold_0" / "checkpoint_final.pth"),
                                    plans=str(plans_file), dataset_json=str(ds_file))
    written = torch.load(back, map_location="cpu", weights_only=True)  # nnU-Net's predictor can read it safely
    assert written["trainer_name"] == "nnUNetTrainerPanSegMamba"
    assert written["init_args"]["configuration"] == "3d_fullres" and written["init_args"]["plans"] == plans
    original = torch.load(ckpt, weights_only=False)["network_weights"]
    assert list(written["network_weights"]) == list(original)  # every key and alias of the checkpoint it came from
    assert all(torch.equal(written["network_weights"][k], v) for k, v in original.items())
    assert json.loads((model_dir / "plans.json").read_text()) == plans
    assert json.loads((model_dir / "dataset.json").read_text()) == dataset_json


def _refused(ckpt, bundle, *fragments):
    target = Path(bundle) / "models" / "model.pt"
    with pytest.raises(ConversionError) as e:
        convert.nnunet_to_bundle(str(ckpt), str(bundle))
    for f in fragments:
        assert f in str(e.value), str(e.value)
    assert not target.exists()  # nothing written
    return str(e.value)


def _without(weights, canonical):
    """Drop a tensor and its aliases from the authors' weights."""
    block, kind, leaf = canonical.rsplit(".", 2)
    alias = f"{block}.all_modules.{'0' if kind == 'conv' else '1'}.{leaf}"
    names = {canonical, alias, "decoder." + canonical, "decoder." + alias}
    return {k: v for k, v in weights.items() if k not in names}


def test_checkpoints_that_do_not_fit_are_refused_naming_the_key(tiny, tmp_path):
    bundle, plans, dataset_json, net = tiny
    state = net.state_dict()
    good = authors_state_dict(state)

    key = "encoder.stages.2.blocks.0.conv1.norm.weight"
    ckpt = _checkpoint(tmp_path / "a.pth", plans, dataset_json, state, network_weights=_without(good, key))
    _refused(ckpt, bundle, "missing: " + key)

    # an alias alone is enough (nnU-Net writes both; the values are the same tensor)
    only_alias = {k: v for k, v in good.items() if k != key and k != "decoder." + key}
    _checkpoint(tmp_path / "b.pth", plans, dataset_json, state, network_weights=only_alias)
    assert os.path.isfile(convert.nnunet_to_bundle(str(tmp_path / "b.pth"), str(bundle), out=str(tmp_path / "m.pt")))

    extra = dict(good, **{"encoder.mamba_layers.6.norm.weight": torch.zeros(8)})
    _refused(_checkpoint(tmp_path / "c.pth", plans, dataset_json, state, network_weights=extra),
             bundle, "unexpected: encoder.mamba_layers.6.norm.weight")
    unknown = dict(good, **{"decoder.deep_supervision_scale": torch.zeros(1)})
    _refused(_checkpoint(tmp_path / "d.pth", plans, dataset_json, state, network_weights=unknown),
             bundle, "decoder.deep_supervision_scale")

    key = "decoder.seg_layers.4.weight"
    shaped = dict(good, **{key: torch.zeros(13, 4, 1, 1, 1)})
    _refused(_checkpoint(tmp_path / "e.pth", plans, dataset_json, state, network_weights=shaped),
             bundle, f"wrong shape: {key} [heads.4.conv.conv.weight] (13, 4, 1, 1, 1) (expected (14, 4, 1, 1, 1))")

    differing = dict(good)
    differing["decoder.encoder.stem.convs.0.conv.bias"] = torch.ones_like(good["encoder.stem.convs.0.conv.bias"])
    _refused(_checkpoint(tmp_path / "f.pth", plans, dataset_json, state, network_weights=differing),
             bundle, "aliases of the same tensor differ", "decoder.encoder.stem.convs.0.conv.bias")


def test_another_variant_or_plan_is_refused(tiny, tmp_path):
    bundle, plans, dataset_json, net = tiny
    state = net.state_dict()
    # SegMambaSkip has exactly BiSegMamba's tensors: only the trainer tells them apart
    _refused(_checkpoint(tmp_path / "a.pth", plans, dataset_json, state, trainer="nnUNetTrainerSegMambaSkip"),
             bundle, "nnUNetTrainerSegMambaSkip trains a SegMambaSkip", "holds a BiSegMamba")
    uni = nets.SegMamba(**plan_kwargs("synapse"), filters=[4, 8, 8, 8, 8, 8]).state_dict()
    _refused(_checkpoint(tmp_path / "b.pth", plans, dataset_json, uni, trainer="nnUNetTrainerSegMamba"),
             bundle, "trains a SegMamba")
    msg = _refused(_checkpoint(tmp_path / "c.pth", plans, dataset_json, uni, trainer="MyTrainer"),
                   bundle, "'MyTrainer' is not one of the authors' trainers", "--allow_unknown_trainer")
    assert "missing" not in msg
    with pytest.raises(ConversionError, match="missing: encoder.mamba_layers.0.mamba.fwd_mamba"):
        convert.nnunet_to_bundle(str(tmp_path / "c.pth"), str(bundle), allow_unknown_trainer=True)

    other = json.loads(json.dumps(plans))
    other["configurations"]["3d_fullres"]["patch_size"] = [64, 128, 128]
    other["configurations"]["3d_fullres"]["pool_op_kernel_sizes"][1] = [2, 2, 2]
    msg = _refused(_checkpoint(tmp_path / "d.pth", other, dataset_json, state), bundle,
                   "patch_size: checkpoint [64, 128, 128] vs bundle [48, 192, 192]",
                   "pool_op_kernel_sizes (strides): checkpoint [[1, 1, 1], [2, 2, 2]")
    other = json.loads(json.dumps(plans))
    other["transpose_forward"] = [2, 1, 0]
    _refused(_checkpoint(tmp_path / "e.pth", other, dataset_json, state), bundle,
             "transpose_forward: checkpoint [2, 1, 0] vs bundle [0, 1, 2]")
    acdc_plans, acdc_ds = convert._packaged_plans("acdc")
    acdc_plans["configurations"]["3d_fullres"].update(TINY)
    msg = _refused(_checkpoint(tmp_path / "f.pth", acdc_plans, acdc_ds, state), bundle, "classes: checkpoint 4 vs bundle 14")


@pytest.mark.slow
def test_command_line(tiny, tmp_path):
    bundle, plans, dataset_json, net = tiny
    ckpt = _checkpoint(tmp_path / "checkpoint_best.pth", plans, dataset_json, net.state_dict(),
                       trainer="nnUNetTrainerSegMambaSkip")
    with pytest.raises(SystemExit) as e:  # what fire's entry point exits with: status 1 and the message
        convert.main(str(ckpt), str(bundle))
    assert "error: " in str(e.value.code) and "trains a SegMambaSkip" in str(e.value.code)
    _checkpoint(ckpt, plans, dataset_json, net.state_dict())
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-m", "networks.convert", str(ckpt), str(bundle)], env=env,
                          capture_output=True, text=True)
    assert proc.returncode == 0 and f"wrote {bundle / 'models' / 'model.pt'}" in proc.stdout, proc.stderr
    assert sorted(torch.load(bundle / "models" / "model.pt", weights_only=True)) == sorted(net.state_dict())


def test_authors_key_order_for_synapse_segmamba():
    """The keys, aliases and order of the authors' SegMamba ``state_dict()`` (Synapse plan), as their module
    classes on dynamic_network_architectures 0.3.1 produce them: 862 keys, the encoder again from index 326."""
    with torch.device("meta"):
        net = nets.SegMamba(**plan_kwargs("synapse"))
    keys = list(authors_state_dict(net.state_dict()))
    assert len(keys) == 862 and keys.index("decoder.encoder.stem.convs.0.conv.weight") == 326
    mamba = "encoder.mamba_layers.0."
    inner = ["A_log", "D", "in_proj.weight", "conv1d.weight", "conv1d.bias", "x_proj.weight", "dt_proj.weight",
             "dt_proj.bias", "out_proj.weight"]
    assert [k for k in keys if k.startswith(mamba)] == [mamba + k for k in (
        ["norm.weight", "norm.bias"] + [f"mamba.mamba.{n}" for n in inner]
        + ["mamba.norm1.weight", "mamba.norm1.bias", "mamba.norm2.weight", "mamba.norm2.bias", "mamba.head.weight",
           "mamba.head.bias"])]
    block = "encoder.stages.1.blocks.0."
    conv = [f"{c}.{p}" for c in ("conv1", "conv2") for p in (
        "conv.weight", "conv.bias", "norm.weight", "norm.bias", "all_modules.0.weight", "all_modules.0.bias",
        "all_modules.1.weight", "all_modules.1.bias")]
    skip = ["skip.1.conv.weight", "skip.1.norm.weight", "skip.1.norm.bias", "skip.1.all_modules.0.weight",
            "skip.1.all_modules.1.weight", "skip.1.all_modules.1.bias"]
    assert [k for k in keys if k.startswith(block)] == [block + k for k in conv + skip]
    assert keys[-2:] == ["decoder.seg_layers.4.weight", "decoder.seg_layers.4.bias"]


@pytest.mark.parametrize("name", sorted(p.name for p in (REPO / "bundles").iterdir() if (p / "configs").is_dir()))
def test_every_bundle_matches_the_plan_it_was_generated_from(name):
    """The plan check passes for each generated bundle against the authors' plan of its dataset (what
    ``--to nnunet`` writes as plans.json), so the bundles and the authors' checkpoints speak the same order."""
    plans, dataset_json = convert._packaged_plans(name)
    spec = convert.read_bundle(str(REPO / "bundles" / name))
    convert.check_plan({"plans": plans, "dataset_json": dataset_json, "configuration": "3d_fullres"}, spec, name)
    assert spec.transpose_forward == plans["transpose_forward"] == [0, 1, 2]
    assert spec.variant == convert.TRAINERS[convert.VARIANT_TRAINER[spec.variant]]
