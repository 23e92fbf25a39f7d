"""TorchScript export: the networks script and trace, the exported bundles give the eager network's output,
and a failed export leaves no file behind.

Eager references run on the ``torch`` scan backend, which is what the scripted and traced networks run, so
they agree within float32 rounding (in practice exactly).
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from monai.bundle import ConfigParser
from monai.data import load_net_with_metadata

import networks
from networks import export as export_mod

REPO = Path(__file__).resolve().parent.parent
BUNDLES = REPO / "bundles"
VARIANTS = ("ResidualUNet", "SegMamba", "BiSegMamba", "MultiSegMamba", "SegMambaSkip")
TINY = dict(spatial_dims=3, in_channels=2, out_channels=3, kernel_size=[3, 3, 3, 3], strides=[1, 2, 2, [2, 2, 1]],
            filters=[4, 8, 8, 8])


def max_rel(got, want):
    return float((got - want).abs().max() / want.abs().max())


@pytest.fixture
def torch_scan(monkeypatch):
    monkeypatch.setenv("NETWORKS_SCAN_BACKEND", "torch")


@pytest.mark.parametrize("variant", [pytest.param(v, marks=[pytest.mark.slow] if v == "MultiSegMamba" else [])
                                     for v in VARIANTS])
def test_scripted_network_equals_eager(variant, torch_scan):
    torch.manual_seed(0)
    net = getattr(networks, variant)(**TINY).eval()
    scripted = torch.jit.script(net)
    x = torch.randn(2, 2, 16, 16, 8)
    with torch.no_grad():
        want = net(x)
    got = scripted(x)  # also without no_grad: the scan does not record a graph
    assert got.shape == (2, 3, 16, 16, 8)
    assert max_rel(got.detach(), want) < 1e-6
    with pytest.raises(Exception, match="divisible"):
        scripted(torch.randn(1, 2, 12, 16, 8))


def test_scripted_network_returns_deep_supervision_outputs_in_training(torch_scan):
    net = networks.SegMambaSkip(**TINY, deep_supervision=True).train()
    outs = torch.jit.script(net)(torch.randn(2, 2, 16, 16, 8))
    assert [tuple(o.shape) for o in outs] == [(2, 3, 16, 16, 8), (2, 3, 8, 8, 4), (2, 3, 4, 4, 2)]


@pytest.mark.slow
def test_traced_network_equals_eager_and_passes_the_trace_check(torch_scan):
    torch.manual_seed(0)
    net = networks.BiSegMamba(**TINY).eval()
    x = torch.randn(1, 2, 16, 16, 8)
    traced = torch.jit.trace(net, x)  # check_trace on: the graph is the same with and without gradients
    with torch.no_grad():
        assert max_rel(traced(x), net(x)) < 1e-6


def bundle_copy(name, tmp_path, weights=True):
    """A copy of bundle ``name`` whose network has filters 4 on every stage, with fake weights
    (as the zoo's CI writes them) in models/model.pt; returns (folder, filters override)."""
    bundle = tmp_path / name
    shutil.copytree(BUNDLES / name, bundle)
    filters = [4] * len(json.loads((bundle / "configs" / "train.json").read_text())["filters"])
    if weights:
        parser = ConfigParser()
        parser.read_config(str(bundle / "configs" / "inference.json"))
        parser["filters"] = filters
        (bundle / "models").mkdir()
        torch.save(parser.get_parsed_content("network_def").state_dict(), bundle / "models" / "model.pt")
    return bundle, filters


def eager_network(bundle, filters):
    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / "inference.json"))
    parser["filters"] = filters
    net = parser.get_parsed_content("network_def").eval()
    net.load_state_dict(torch.load(bundle / "models" / "model.pt", weights_only=True))
    return net


def export_args(bundle):
    return dict(filepath=str(bundle / "models" / "model.ts"), ckpt_file=str(bundle / "models" / "model.pt"),
                meta_file=str(bundle / "configs" / "metadata.json"),
                config_file=str(bundle / "configs" / "inference.json"), bundle_root=str(bundle))


@pytest.mark.parametrize("name", [
    "synapse_bisegmamba",
    pytest.param("brats_segmamba", marks=pytest.mark.slow),
    pytest.param("acdc_multisegmamba", marks=pytest.mark.slow),
])
def test_exported_bundle_loads_and_equals_eager(name, tmp_path, torch_scan):
    bundle, filters = bundle_copy(name, tmp_path)
    path = export_mod.export(**export_args(bundle), filters=filters)
    assert path == str(bundle / "models" / "model.ts")
    assert sorted(os.listdir(bundle / "models")) == ["model.pt", "model.ts"]  # no temporary file left
    loaded, meta, extra = load_net_with_metadata(path, more_extra_files=["inference.json"])
    assert meta["version"] == json.loads((bundle / "configs" / "metadata.json").read_text())["version"]
    assert "network_def" in json.loads(extra["inference.json"])
    spatial = [int(s.split("*")[0]) for s in meta["network_data_format"]["inputs"]["image"]["spatial_shape"]]
    x = torch.randn(1, meta["network_data_format"]["inputs"]["image"]["num_channels"], *spatial)
    with torch.no_grad():
        assert max_rel(loaded(x), eager_network(bundle, filters)(x)) < 1e-6


@pytest.mark.slow
def test_traced_export_of_a_bundle(tmp_path, torch_scan):
    bundle, filters = bundle_copy("acdc_segmamba", tmp_path)
    patch = [4, 64, 32]  # a small patch (divisible by the strides): the traced input shape
    export_mod.export(**export_args(bundle), use_trace=True, filters=filters, patch_size=patch)
    loaded = torch.jit.load(str(bundle / "models" / "model.ts"))
    x = torch.randn(1, 1, *patch)
    with torch.no_grad():
        assert max_rel(loaded(x), eager_network(bundle, filters)(x)) < 1e-6


@pytest.mark.slow
def test_model_zoo_ckpt_export_command(tmp_path):
    """The zoo CI's command line, verbatim, in the bundle folder (plus the tiny-network override)."""
    bundle, filters = bundle_copy("synapse_segmamba", tmp_path)
    env = {**os.environ, "PYTHONPATH": str(REPO)}  # the default (auto) scan backend: scripting ignores it
    cmd = [sys.executable, "-m", "monai.bundle", "ckpt_export", "network_def", "--filepath", "models/model.ts",
           "--ckpt_file", "models/model.pt", "--meta_file", "configs/metadata.json",
           "--config_file", "configs/inference.json", "--filters", json.dumps(filters)]
    proc = subprocess.run(cmd, cwd=bundle, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    loaded = torch.jit.load(str(bundle / "models" / "model.ts"))
    x = torch.randn(1, 1, 16, 64, 64)
    os.environ["NETWORKS_SCAN_BACKEND"] = "torch"
    try:
        with torch.no_grad():
            assert max_rel(loaded(x), eager_network(bundle, filters)(x)) < 1e-6
    finally:
        del os.environ["NETWORKS_SCAN_BACKEND"]


def test_failed_export_leaves_no_file_and_says_why_in_one_line(tmp_path):
    bundle, filters = bundle_copy("synapse_segmamba", tmp_path)  # weights of the tiny network ...
    target = bundle / "models" / "model.ts"
    target.write_bytes(b"an earlier export")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "networks.export", "--filepath", "models/model.ts", "--ckpt_file", "models/model.pt",
           "--meta_file", "configs/metadata.json", "--config_file", "configs/inference.json"]  # ... full network
    proc = subprocess.run(cmd, cwd=bundle, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1
    lines = [line for line in proc.stderr.splitlines() if line.startswith("export failed")]
    assert len(lines) == 1 and "nothing written to models/model.ts" in lines[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert target.read_bytes() == b"an earlier export"
    assert sorted(os.listdir(bundle / "models")) == ["model.pt", "model.ts"]


def test_export_that_fails_its_check_removes_the_written_file(tmp_path, monkeypatch, torch_scan):
    bundle, filters = bundle_copy("synapse_segmamba", tmp_path)

    def wrong(path, *args, **kwargs):
        assert Path(path).is_file()  # the file was written under its temporary name ...
        raise RuntimeError("output differs")

    monkeypatch.setattr(export_mod, "check_export", wrong)
    with pytest.raises(RuntimeError, match="output differs"):
        export_mod.export(**export_args(bundle), filters=filters)
    assert os.listdir(bundle / "models") == ["model.pt"]  # ... and removed


def test_export_without_checkpoint_names_it(tmp_path):
    bundle, _ = bundle_copy("acdc_segmamba", tmp_path, weights=False)
    with pytest.raises(FileNotFoundError, match="model.pt"):
        export_mod.export(**export_args(bundle))
    assert not (bundle / "models" / "model.ts").exists()
