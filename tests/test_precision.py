"""The bf16 CPU inference mode (networks/precision.py, networks/ops/instance_norm_cl.py) against float32.

Tolerances: the instance-norm kernel's output is a bfloat16 rounding (relative step 2**-8) of the
float64 result on the same bf16 input, so it is compared at 2**-8 relative. A whole network in bf16
rounds every convolution's input and weights to 8-bit mantissas: its float32 logits are compared with
the float32 network's at 6 % of their largest magnitude, and the label maps (argmax) must agree on at
least 97 % of voxels (untrained networks, whose logits are closer to ties than a trained model's:
``python -m bench.bench_precision`` measures a trained one).
"""

from __future__ import annotations

import copy
import json
import logging

import nibabel as nib
import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.networks.nets import DynUNet

import networks
from networks import precision as prec
from networks.nets.mamba_layers import MultiMambaLayer, SpatialAdapter
from networks.ops import scan_fused
from networks.ops.instance_norm_cl import instance_norm_act, kernel_applies

pytestmark = pytest.mark.skipif(prec.bf16_unavailable_reason() is not None,
                                reason=f"no bf16 on this CPU: {prec.bf16_unavailable_reason()}")

KW = dict(spatial_dims=3, in_channels=1, out_channels=4, kernel_size=[[1, 3, 3], [3, 3, 3], [3, 3, 3]],
          strides=[[1, 1, 1], [1, 2, 2], [2, 2, 2]], filters=[8, 16, 24])
VARIANTS = ["ResidualUNet", "SegMamba", "BiSegMamba", "MultiSegMamba", "SegMambaSkip"]


def _cl(x):
    return x.contiguous(memory_format=torch.channels_last_3d if x.dim() == 5 else torch.channels_last)


@pytest.mark.parametrize("shape", [(2, 5, 3, 7, 9), (1, 3, 4, 6), (1, 40, 2, 33, 17)])
@pytest.mark.parametrize("slope", [None, 0.01, 0.0])
@pytest.mark.parametrize("offset", [0.0, 300.0])
def test_instance_norm_kernel_matches_float64(shape, slope, offset):
    g = torch.Generator().manual_seed(0)
    x = _cl((torch.randn(shape, generator=g) * 2 + offset).to(torch.bfloat16))
    c = shape[1]
    w, b = torch.randn(c, generator=g), torch.randn(c, generator=g)
    with torch.inference_mode():
        assert kernel_applies(x)
        y = instance_norm_act(x, w, b, 1e-5, slope)
    ref = F.instance_norm(x.double(), weight=w.double(), bias=b.double(), eps=1e-5)
    if slope is not None:
        ref = F.leaky_relu(ref, slope)
    assert y.dtype == torch.bfloat16 and y.shape == x.shape and _cl(y).data_ptr() == y.data_ptr()
    assert ((y.double() - ref).abs() <= 2**-8 * ref.abs() + 1e-6).all()
    # the PyTorch path (contiguous input: the kernel does not apply) gives the same function
    xc = x.contiguous()
    if not xc.is_contiguous(memory_format=torch.channels_last_3d if x.dim() == 5 else torch.channels_last):
        assert not kernel_applies(xc)
        assert torch.allclose(instance_norm_act(xc, w, b, 1e-5, slope).double(), ref, rtol=2**-7, atol=1e-5)


def test_instance_norm_kernel_without_affine_and_constant_channel():
    x = torch.randn(1, 4, 5, 6, 7)
    x[:, 2] = 3.0  # zero variance: normalised to 0, not NaN
    x = _cl(x.to(torch.bfloat16))
    with torch.inference_mode():
        y = instance_norm_act(x, None, None, 1e-5, None)
    ref = F.instance_norm(x.double(), eps=1e-5)
    assert torch.isfinite(y).all() and (y[:, 2] == 0).all()
    assert ((y.double() - ref).abs() <= 2**-8 * ref.abs() + 1e-6).all()


def _net(name, seed=0):
    torch.manual_seed(seed)
    if name == "DynUNet":
        return DynUNet(3, 1, 4, KW["kernel_size"], KW["strides"], KW["strides"][1:], filters=KW["filters"],
                       norm_name=("INSTANCE", {"affine": True}), act_name=("leakyrelu", {"negative_slope": 0.01}),
                       res_block=True).eval()
    net = getattr(networks, name)(**KW).eval()
    # the norm before every residual addition starts at 0 (nnU-Net's init): randomise it, so that
    # every path of the network carries signal into the comparison
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.InstanceNorm3d) and m.affine:
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    return net


@pytest.mark.parametrize("name", VARIANTS + ["DynUNet"])
def test_bf16_network_against_float32(name):
    net = _net(name)
    x = torch.randn(2, 1, 8, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        ref = net(x)
    state = copy.deepcopy(net.state_dict())
    fast = prec.set_inference_precision(copy.deepcopy(net), "bf16", "cpu")
    assert fast.inference_precision == "bf16"
    seen = {}
    for m in fast.modules():
        if isinstance(m, (SpatialAdapter, MultiMambaLayer)):
            m.register_forward_hook(lambda mod, args, out: seen.update(mamba_in=args[0].dtype) and None)
    with torch.inference_mode():
        y = fast(x)
    assert y.dtype == torch.float32 and y.shape == ref.shape
    assert (y - ref).abs().max() <= 0.06 * ref.abs().max()
    assert (y.argmax(1) == ref.argmax(1)).float().mean() >= 0.97
    if name not in ("ResidualUNet", "DynUNet"):
        assert seen["mamba_in"] == torch.float32  # the Mamba layers run in float32
    # what runs in which dtype: convolutions bf16 channels-last, Mamba layers, heads and norms' affine float32
    for mod_name, m in fast.named_modules():
        if isinstance(m, nn.Conv3d) and ".heads." not in f".{mod_name}." and "output_block" not in mod_name:
            assert m.weight.dtype == torch.bfloat16 and m.weight.is_contiguous(memory_format=torch.channels_last_3d), mod_name
        if isinstance(m, (SpatialAdapter, MultiMambaLayer)):
            assert all(p.dtype == torch.float32 for p in m.parameters()), mod_name
        assert not isinstance(m, nn.InstanceNorm3d), f"{mod_name} was not replaced"
    # same parameter names: a float32 state dict (model.pt) loads strictly into the converted network
    assert list(fast.state_dict()) == list(state)
    fresh = prec.set_inference_precision(_net(name, seed=5), "bf16", "cpu")
    fresh.load_state_dict(state, strict=True)
    with torch.inference_mode():
        assert torch.equal(fresh(x), y)


def test_float32_leaves_the_network_unchanged():
    net = _net("SegMamba")
    before = {k: v.clone() for k, v in net.state_dict().items()}
    assert prec.set_inference_precision(net, "float32") is net and net.inference_precision == "float32"
    assert all(torch.equal(before[k], v) and v.dtype == before[k].dtype for k, v in net.state_dict().items())


def test_resolve_precision_reports_fallbacks(monkeypatch, caplog):
    assert prec.resolve_precision("bf16") == ("bf16", None)
    assert prec.resolve_precision("BFloat16")[0] == "bf16" and prec.resolve_precision("fp32") == ("float32", None)
    with pytest.raises(ValueError, match="'half'"):
        prec.resolve_precision("half")
    used, reason = prec.resolve_precision("bf16", "cuda:0")
    assert used == "float32" and "amp" in reason
    monkeypatch.setattr(prec, "bf16_unavailable_reason", lambda device=None: "this CPU has no bf16 dot-product instructions")
    assert prec.resolve_precision("auto") == ("float32", "this CPU has no bf16 dot-product instructions")
    net = _net("ResidualUNet")
    with caplog.at_level(logging.WARNING, logger="networks.precision"):
        prec.set_inference_precision(net, "bf16")
    assert net.inference_precision == "float32" and all(p.dtype == torch.float32 for p in net.parameters())
    assert "no bf16 dot-product" in caplog.text


def test_kernel_not_used_without_the_fused_library(monkeypatch):
    monkeypatch.setattr(scan_fused, "_library", lambda: None)  # looked up at call time
    x = _cl(torch.randn(1, 3, 4, 5, 6).to(torch.bfloat16))
    assert not kernel_applies(x)
    y = instance_norm_act(x, torch.ones(3), torch.zeros(3), 1e-5, 0.01)
    ref = F.leaky_relu(F.instance_norm(x.double(), eps=1e-5), 0.01)
    assert y.dtype == torch.bfloat16 and y.is_contiguous(memory_format=torch.channels_last_3d)
    assert torch.allclose(y.double(), ref, rtol=2**-7, atol=1e-5)


@pytest.mark.slow
def test_bundle_inference_in_bf16_agrees_with_float32(tmp_path):
    """inference.json with ``precision: bf16`` (what ``--precision bf16`` sets) writes the same kind of
    output as float32, from a network that really ran in bf16, with label maps that agree."""
    from test_bundles import REAL_CT, assert_on_input_grid, infer_overrides, run_workflow, workflow, write_untrained_model

    name = "synapse_segmamba"
    write_untrained_model(name, "synapse", tmp_path / "models")
    datalist = tmp_path / "list.json"
    datalist.write_text(json.dumps([{"image": str(REAL_CT / "abdomen_ct.nii.gz"), "id": "abdomen_ct"}]))
    maps = {}
    for precision in ("float32", "bf16"):
        out = tmp_path / precision
        wf = workflow(name, ["inference.json"], "infer", **infer_overrides(
            "synapse", bundle_root=str(tmp_path), dataset_dir=None, datalist=str(datalist), output_dir=str(out),
            pixdim=[3.0, 2.0, 2.0], patch_size=[32, 128, 128], sw_overlap=0.25, precision=precision))
        wf.initialize()
        assert wf.parser.get_parsed_content("network").inference_precision == precision
        run_workflow(wf)
        assert_on_input_grid(out / "abdomen_ct_seg.nii.gz", REAL_CT / "abdomen_ct.nii.gz", 14)
        maps[precision] = np.asarray(nib.load(str(out / "abdomen_ct_seg.nii.gz")).dataobj)
    assert (maps["bf16"] == maps["float32"]).mean() >= 0.97
