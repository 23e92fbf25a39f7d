"""The five network classes: shapes, deep supervision, gradients, determinism, fidelity counts."""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.nn as nn

import networks
from networks import BiSegMamba, Mamba, MultiSegMamba, ResidualUNet, SegMamba, SegMambaSkip
from networks.nets import PLANS, BasicBlockD, from_nnunet_plans, plan_kwargs
from networks.nets.mamba_layers import BiMambaLayer, MambaLayer, MultiMambaLayer, SpatialAdapter

ALL = [ResidualUNet, SegMamba, BiSegMamba, MultiSegMamba, SegMambaSkip]
MAMBA = [SegMamba, BiSegMamba, MultiSegMamba, SegMambaSkip]
SMALL = [4, 8, 8, 16, 16, 16]  # reduced filters for speed
# smallest inputs the plans allow with > 1 voxel at the bottleneck (InstanceNorm needs 2)
SHAPES = {"synapse": (16, 32, 32), "acdc": (16, 32, 32), "brain_tumour": (64, 32, 32)}
# the project's shared/ folder sits beside the checkout (as in CI)
REFERENCE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared", "reference", "nnunet_plans")


def small_net(cls, plan="synapse", seed=0, **kw):
    torch.manual_seed(seed)
    return cls(**plan_kwargs(plan), filters=SMALL, **kw)


def small_input(plan="synapse", batch=1, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, PLANS[plan]["in_channels"], *SHAPES[plan], generator=g)


def ds_shapes(plan, out_channels):
    """Expected deep-supervision output shapes, full resolution first."""
    strides = PLANS[plan]["strides"]
    size, shapes = list(SHAPES[plan]), []
    for s in range(len(strides) - 1):
        size = [a // b for a, b in zip(size, strides[s])]
        shapes.append((1, out_channels, *size))
    return shapes


@pytest.fixture(autouse=True)
def _threads():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # the machine is shared; small nets do not gain from threads
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("plan", sorted(PLANS))
@pytest.mark.parametrize("cls", ALL, ids=lambda c: c.__name__)
def test_shapes_all_plans(cls, plan):
    net = small_net(cls, plan, deep_supervision=True)
    x = small_input(plan)
    out_ch = PLANS[plan]["out_channels"]
    net.eval()
    with torch.inference_mode():
        y = net(x)
    assert isinstance(y, torch.Tensor) and y.shape == (1, out_ch, *SHAPES[plan])
    net.train()
    outs = net(x)
    assert isinstance(outs, list)
    assert [tuple(o.shape) for o in outs] == ds_shapes(plan, out_ch)


def test_train_without_deep_supervision_returns_one_tensor():
    net = small_net(BiSegMamba).train()
    y = net(small_input())
    assert isinstance(y, torch.Tensor) and y.shape == (1, 14, *SHAPES["synapse"])


def test_deep_supervision_loss_accepts_outputs():
    from monai.losses import DeepSupervisionLoss, DiceCELoss

    net = small_net(SegMamba, deep_supervision=True).train()
    x = small_input()
    target = torch.randint(0, 14, (1, 1, *SHAPES["synapse"])).float()
    loss = DeepSupervisionLoss(DiceCELoss(to_onehot_y=True, softmax=True))(net(x), target)
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    assert all(h.conv.conv.weight.grad is not None for h in net.heads)


@pytest.mark.parametrize("cls", ALL, ids=lambda c: c.__name__)
def test_gradient_reaches_every_parameter(cls):
    net = small_net(cls, deep_supervision=True).train()
    # the zero-initialised residual norms block the gradient to the convs before them at step 0
    # (as intended by that initialisation); open them so every path is exercised
    for m in net.modules():
        if isinstance(m, BasicBlockD):
            nn.init.ones_(m.last_norm.weight)
    outs = net(small_input())
    sum(o.square().mean() for o in outs).backward()
    for name, p in net.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        # a conv bias right before an InstanceNorm has a mathematically zero gradient
        if not (name.endswith("conv.bias") and ("encoder" in name or "decoder" in name or "stem" in name)):
            assert p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("cls", ALL, ids=lambda c: c.__name__)
def test_eval_determinism_and_state_dict_round_trip(cls):
    net = small_net(cls, seed=0).eval()
    x = small_input()
    with torch.inference_mode():
        y1, y2 = net(x), net(x)
    assert torch.equal(y1, y2)
    other = small_net(cls, seed=123).eval()
    with torch.inference_mode():
        assert not torch.allclose(other(x), y1)
    other.load_state_dict(net.state_dict(), strict=True)
    with torch.inference_mode():
        assert torch.equal(other(x), y1)


@pytest.mark.parametrize(
    "cls, count",
    [(ResidualUNet, 57_156_326), (SegMamba, 60_800_966), (BiSegMamba, 64_445_606),
     (MultiSegMamba, 77_653_734), (SegMambaSkip, 64_445_606)],
    ids=lambda v: getattr(v, "__name__", str(v)),
)
def test_parameter_counts_synapse(cls, count):
    with torch.device("meta"):
        for ds in (False, True):
            net = cls(**plan_kwargs("synapse"), deep_supervision=ds)
            assert sum(p.numel() for p in net.parameters()) == count


@pytest.mark.parametrize("plan", ["acdc", "brain_tumour"])
@pytest.mark.parametrize("cls", ALL, ids=lambda c: c.__name__)
def test_full_size_other_plans_build(cls, plan):
    with torch.device("meta"):
        net = cls(**plan_kwargs(plan))
    assert net.filters == (32, 64, 128, 256, 320, 320)


def test_d_state_rule():
    def states(net):
        return [(m.d_model, m.d_state) for m in net.modules() if isinstance(m, Mamba)]

    with torch.device("meta"):
        kw = plan_kwargs("synapse")
        for cls in (SegMamba, BiSegMamba, SegMambaSkip):
            assert all(n == min(c, 256) for c, n in states(cls(**kw)))
        assert all(n == min(c, 64) for c, n in states(MultiSegMamba(**kw)))
        assert all(n == min(c, 256) for c, n in states(MultiSegMamba(**kw, d_state_max=256)))
        assert {n for _, n in states(MultiSegMamba(**kw, d_state_max=256))} >= {256}
        assert {len(states(cls(**kw))) for cls in MAMBA} == {6, 12, 48}  # 1, 2, 8 blocks x 6 stages


def test_bad_input_size_raises():
    net = small_net(ResidualUNet).eval()  # synapse total stride (8, 32, 32)
    with pytest.raises(ValueError, match=r"\(16, 48, 32\).*axis 1: 48 is not divisible by 32"):
        net(torch.zeros(1, 1, 16, 48, 32))
    with pytest.raises(ValueError, match="8, 32, 32"):
        net(torch.zeros(1, 1, 12, 32, 32))


def test_bad_constructor_arguments():
    kw = plan_kwargs("synapse")
    with pytest.raises(ValueError, match="strides\\[0\\]"):
        ResidualUNet(3, 1, 2, kw["kernel_size"], [[2, 2, 2]] + kw["strides"][1:])
    with pytest.raises(ValueError, match="filters"):
        ResidualUNet(**kw, filters=[4, 8])
    with pytest.raises(ValueError, match="kernel_size\\[0\\]"):
        ResidualUNet(3, 1, 2, [[3, 3]] + kw["kernel_size"][1:], kw["strides"])


def test_int_kernels_and_strides_and_2d():
    net = BiSegMamba(3, 1, 3, kernel_size=[3, 3, 3], strides=[1, 2, 2], filters=[4, 8, 8]).eval()
    assert net.total_stride == (4, 4, 4)
    with torch.inference_mode():
        assert net(torch.randn(1, 1, 8, 8, 8)).shape == (1, 3, 8, 8, 8)
    for cls in (ResidualUNet, MultiSegMamba):
        net = cls(2, 2, 3, kernel_size=[3, 3, 3], strides=[1, 2, 2], filters=[4, 8, 8]).eval()
        with torch.inference_mode():
            assert net(torch.randn(2, 2, 16, 8)).shape == (2, 3, 16, 8)


def test_placement_replace_vs_skip():
    """Replace: stage s+1 reads the Mamba output; skip: it reads the raw stage-s features."""
    x = small_input()
    for cls, expect_mamba in ((BiSegMamba, True), (SegMambaSkip, False)):
        net = small_net(cls).eval()
        seen = {}
        net.encoder[0].register_forward_hook(lambda m, i, o: seen.__setitem__("raw", o))
        net.mamba_layers[0].register_forward_hook(lambda m, i, o: seen.__setitem__("mamba", o))
        net.encoder[1].register_forward_pre_hook(lambda m, i: seen.__setitem__("next", i[0]))
        with torch.inference_mode():
            net(x)
        assert torch.equal(seen["next"], seen["mamba" if expect_mamba else "raw"])
        assert not torch.equal(seen["mamba"], seen["raw"])
    # same parameters, different wiring
    bi, skip = small_net(BiSegMamba).eval(), small_net(SegMambaSkip).eval()
    skip.load_state_dict(bi.state_dict())
    with torch.inference_mode():
        assert not torch.allclose(bi(x), skip(x))


def test_initialisation():
    net = small_net(SegMamba, plan="synapse")
    convs = [m for m in net.modules() if isinstance(m, (nn.Conv3d, nn.ConvTranspose3d))]
    assert convs and all(m.bias is None or not m.bias.any() for m in convs)
    for w in (m.weight for m in convs if m.weight.numel() > 2000):
        # kaiming normal, a=0.01, torch's fan_in = size(1) * kernel volume (also for transposed convs)
        std = math.sqrt(2.0 / (1 + 0.01**2) / (w.shape[1] * math.prod(w.shape[2:])))
        assert abs(w.std().item() / std - 1) < 0.15
    blocks = [m for m in net.modules() if isinstance(m, BasicBlockD)]
    assert len(blocks) == 2 * 6 + 2 * 5
    assert all(not b.last_norm.weight.any() and not b.last_norm.bias.any() for b in blocks)
    mamba = next(m for m in net.modules() if isinstance(m, Mamba))
    assert mamba.conv1d.bias.any()  # Mamba's own Conv1d init is kept
    assert torch.allclose(mamba.A_log[0].exp(), torch.arange(1, mamba.d_state + 1).float())
    layer = next(m for m in net.modules() if isinstance(m, MambaLayer))
    assert layer.mlp.bias.any()  # Linear keeps its default init


def test_mamba_layer_directions():
    """Unidirectional layer is causal along tokens; the bidirectional one sees both ends."""
    torch.manual_seed(0)
    x = torch.randn(1, 6, 8)
    x2 = x.clone()
    x2[:, -1] += torch.randn(8)  # not a uniform shift, which the LayerNorms would erase
    uni, bi = MambaLayer(8, 4).eval(), BiMambaLayer(8, 4).eval()
    with torch.inference_mode():
        assert torch.equal(uni(x)[:, :-1], uni(x2)[:, :-1])
        assert not torch.equal(bi(x)[:, 0], bi(x2)[:, 0])  # exact: no dependence gives identical bits


def test_spatial_adapter_float32_under_autocast():
    torch.manual_seed(0)
    seen = {}
    inner = MambaLayer(8, 4)
    layer_forward = inner.forward_channels_first  # what the adapter calls on (B, C, L) tokens

    def spy(tokens, *args, **kwargs):
        seen["dtype"] = tokens.dtype
        return layer_forward(tokens, *args, **kwargs)

    inner.forward_channels_first = spy
    adapter = SpatialAdapter(inner, 8).eval()
    x = torch.randn(1, 8, 2, 3, 4)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        y = adapter(x.bfloat16())
    assert seen["dtype"] == torch.float32 and y.dtype == torch.bfloat16 and y.shape == x.shape
    with torch.inference_mode():  # token order: row-major over (D1, D2, D3)
        ref = inner(adapter.norm(x.flatten(2).transpose(1, 2))).transpose(1, 2).reshape(x.shape)
        assert torch.allclose(adapter(x), ref)


def _count_batches(blocks, monkeypatch):
    """Record the batch size of every call of each Mamba block's body."""
    seen = []
    for m in blocks:
        def spy(x, *args, body=m._block):
            seen.append(x.shape[0])
            return body(x, *args)
        monkeypatch.setattr(m, "_block", spy)
    return seen


@pytest.mark.parametrize("kind", ["unidirectional", "bidirectional", "multidirectional"])
def test_mamba_block_inference_one_batch_element_at_a_time(kind, monkeypatch):
    """In CPU inference a batch goes through each Mamba block one element at a time, each writing its rows of
    the output: the same layer output bit for bit as the whole batch at once (what training, with gradients,
    still runs)."""
    from networks.nets.variants import bidirectional, multidirectional, unidirectional

    factory = {"unidirectional": unidirectional, "bidirectional": bidirectional,
               "multidirectional": multidirectional}[kind]
    torch.manual_seed(0)
    layer = factory(3, 8, 4, {}).eval()
    blocks = [m for m in layer.modules() if isinstance(m, Mamba)]
    x = torch.randn(3, 8, 4, 6, 10)
    seen = _count_batches(blocks, monkeypatch)
    with torch.inference_mode():
        y = layer(x)
    assert seen == [1] * 3 * len(blocks)  # every block, one element per call
    monkeypatch.undo()
    with torch.inference_mode():
        for m in blocks:  # the whole batch at once, as with gradients
            monkeypatch.setattr(m, "forward_channels_first", lambda t, reverse=False, m=m: m._block(
                t, -torch.exp(m.A_log.float()), reverse))
        whole = layer(x)
    assert y.shape == x.shape and torch.equal(y, whole)
    monkeypatch.undo()
    seen = _count_batches(blocks, monkeypatch)
    layer.train()(x.requires_grad_()).sum().backward()  # training keeps the whole batch (one graph)
    assert seen == [3] * len(blocks) and x.grad is not None


def test_linear_channels_writes_into_out():
    from networks.ops.channel_ops import linear_channels

    lin = nn.Linear(5, 7)
    x = torch.randn(2, 5, 300)
    with torch.no_grad():
        want = linear_channels(x, lin)
        out = torch.empty(2, 7, 300)
        assert linear_channels(x, lin, out=out) is out and torch.equal(out, want)
        with pytest.raises(ValueError, match=r"torch.float32 tensor of \(2, 7, 300\) with contiguous token rows"):
            linear_channels(x, lin, out=torch.empty(2, 300, 7).transpose(1, 2))


def test_multi_layer_axis_orders():
    layer = MultiMambaLayer(8, 4)
    assert layer.axis_orders == ((0, 1, 2), (0, 2, 1), (1, 0, 2), (2, 0, 1))
    assert all(isinstance(d, SpatialAdapter) and isinstance(d.norm, nn.Identity) for d in layer.directions)
    # each direction is the bidirectional layer on the permuted volume; the result is their mean
    x = torch.randn(1, 8, 2, 3, 4)
    with torch.inference_mode():
        parts = []
        for order, d in zip(layer.axis_orders, layer.directions):
            xp = x.permute(0, 1, *(2 + a for a in order)).contiguous()
            tokens = d.layer(xp.flatten(2).transpose(1, 2)).transpose(1, 2).reshape(xp.shape)
            inv = [0, 1] + [2 + order.index(a) for a in range(3)]
            parts.append(tokens.permute(*inv))
        assert torch.allclose(layer(x), sum(parts) / 4, atol=1e-6)


def test_bundle_config_instantiation():
    from monai.bundle import ConfigParser

    cfg = {"net": {"_target_": "networks.BiSegMamba", "spatial_dims": 3, "in_channels": 1, "out_channels": 4,
                   "kernel_size": [[1, 3, 3], 3, 3], "strides": [1, [1, 2, 2], 2], "filters": [4, 8, 8],
                   "deep_supervision": True}}
    net = ConfigParser(cfg).get_parsed_content("net")
    assert isinstance(net, BiSegMamba) and net.total_stride == (2, 4, 4)


def test_exports():
    assert {"SegMamba", "BiSegMamba", "MultiSegMamba", "SegMambaSkip", "ResidualUNet"} <= set(networks.__all__)


@pytest.mark.skipif(not os.path.isdir(REFERENCE), reason="reference plans not present")
@pytest.mark.parametrize("plan", sorted(PLANS))
def test_stored_plans_match_reference(plan):
    kw = from_nnunet_plans(f"{REFERENCE}/{plan}.json", f"{REFERENCE}/{plan}_dataset.json")
    stored = PLANS[plan]
    for key in ("in_channels", "out_channels", "patch_size", "kernel_size", "strides"):
        assert kw[key] == stored[key], key
    assert kw["filters"] == [32, 64, 128, 256, 320, 320]


def _saved_bytes_and_grads(net, x):
    """Bytes autograd keeps for the backward pass of one deep-supervision forward, then the gradients."""
    saved = [0]

    def pack(t):
        saved[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        outs = net(x)
    loss = sum(o.square().mean() for o in outs)
    loss.backward()
    return saved[0], loss.detach(), {n: p.grad.clone() for n, p in net.named_parameters()}


@pytest.mark.parametrize("cls", [SegMamba, MultiSegMamba], ids=lambda c: c.__name__)
def test_use_checkpoint_same_gradients_less_memory(cls):
    """Activation checkpointing of the Mamba layers: the same loss and gradients, fewer saved tensors."""
    x = small_input(batch=2)
    plain = small_net(cls, deep_supervision=True).train()
    ckpt = small_net(cls, deep_supervision=True, use_checkpoint=True).train()
    ckpt.load_state_dict(plain.state_dict())  # the same weights: the flag adds no parameter
    for net in (plain, ckpt):
        for m in net.modules():
            if isinstance(m, BasicBlockD):
                nn.init.ones_(m.last_norm.weight)
    bytes_plain, loss_plain, grads_plain = _saved_bytes_and_grads(plain, x)
    bytes_ckpt, loss_ckpt, grads_ckpt = _saved_bytes_and_grads(ckpt, x)
    torch.testing.assert_close(loss_ckpt, loss_plain, rtol=1e-6, atol=0)
    for name, g in grads_plain.items():
        torch.testing.assert_close(grads_ckpt[name], g, rtol=1e-4, atol=1e-6, msg=name)
    # the Mamba layers' intermediate tensors are not kept: each stage saves only its layer's input
    assert bytes_ckpt < 0.75 * bytes_plain, (bytes_ckpt, bytes_plain)
    with torch.inference_mode():  # no effect without a gradient
        torch.testing.assert_close(ckpt.eval()(x), plain.eval()(x), rtol=0, atol=0)


def test_use_checkpoint_in_the_bundle_config():
    from monai.bundle import ConfigParser

    root = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bundles", "synapse_segmamba")
    parser = ConfigParser()
    parser.read_config(os.path.join(root, "configs", "train.json"))
    assert parser["use_checkpoint"] is False
    parser["use_checkpoint"] = True
    parser["filters"] = SMALL
    net = parser.get_parsed_content("network_def")
    assert isinstance(net, SegMamba) and net.use_checkpoint


def test_use_checkpoint_reads_command_line_text():
    """`--use_checkpoint false` reaches the config as the text "false": it must mean false, not bool("false")."""
    assert small_net(SegMamba, use_checkpoint="false").use_checkpoint is False
    assert small_net(SegMamba, use_checkpoint="True").use_checkpoint is True
    assert small_net(ResidualUNet, use_checkpoint=True).use_checkpoint is False  # nothing to checkpoint
    with pytest.raises(ValueError, match="use_checkpoint must be true or false"):
        small_net(SegMamba, use_checkpoint="sometimes")
