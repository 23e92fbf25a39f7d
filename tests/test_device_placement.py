"""The networks on a device other than the CPU, without one: every tensor follows the input's device.

A training step (forward with deep supervision, loss, backward, the bundles' RAdam step) and an
inference forward of all five networks run on PyTorch's ``meta`` device, where a tensor created on
the CPU by mistake, a hard-coded ``.cpu()`` or a host sync (``.item()``) raises, and a float64
constant shows in the output dtype. The scan dispatch runs there as on any device that is neither
CPU nor CUDA (the ``torch`` backend).

CUDA itself is faked with ``FakeTensorMode`` where a CPU-only build of torch allows it: the
device-dependent choices (scan backend, Mamba block implementation) for CUDA tensors, and the
convolutional network's forward. A CPU-only torch (2.13) cannot fake more of CUDA: autograd on fake
CUDA tensors aborts the process (its input metadata asks for CUDA's device guard), so does
autocast("cuda"), and ``.contiguous()`` / ``copy_`` of non-contiguous fake CUDA tensors, which the
Mamba layers and the ``torch`` scan use, raise for the same reason; the ``meta`` runs cover those
code paths instead (bf16 autocast of the scan is tested on CPU in test_scan.py).
"""

from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import networks
from networks.mamba import fused_block_fn
from networks.ops.selective_scan import resolve_backend, selective_scan, use_fused_kernels

NETWORKS = [networks.SegMamba, networks.BiSegMamba, networks.MultiSegMamba, networks.SegMambaSkip, networks.ResidualUNet]
TINY = dict(spatial_dims=3, in_channels=1, out_channels=3, kernel_size=[3, 3, 3], strides=[1, 2, 2], filters=[4, 8, 8])


def _outputs(out):
    return list(out) if isinstance(out, (list, tuple)) else [out]


@pytest.mark.parametrize("cls", NETWORKS, ids=lambda c: c.__name__)
def test_training_step_and_inference_on_another_device(cls):
    torch.manual_seed(0)
    net = cls(**TINY, deep_supervision=True).to("meta")
    optimizer = torch.optim.RAdam(net.parameters(), lr=1e-3)  # the bundles' optimizer
    x = torch.randn(2, 1, 8, 8, 4, device="meta")
    outs = _outputs(net.train()(x))
    assert len(outs) == 2
    assert all(o.device.type == "meta" and o.dtype == torch.float32 for o in outs)
    assert outs[0].shape == (2, 3, 8, 8, 4)
    loss = sum(o.float().mean() for o in outs)
    loss.backward()
    assert all(p.grad is not None and p.grad.device.type == "meta" and p.grad.dtype == torch.float32
               for p in net.parameters())
    optimizer.step()
    assert all(p.device.type == "meta" and p.dtype == torch.float32 for p in net.parameters())
    with torch.no_grad():
        y = net.eval()(x)
    assert y.device.type == "meta" and y.dtype == torch.float32 and y.shape == (2, 3, 8, 8, 4)
    if cls is not networks.ResidualUNet:
        assert networks.last_backend() == "torch"  # the scan on a device that is neither CPU nor CUDA


def test_scan_with_last_state_on_another_device():
    g = {k: torch.randn(*s, device="meta", requires_grad=True) for k, s in
         dict(u=(2, 4, 50), delta=(2, 4, 50), A=(4, 8), B=(2, 8, 50), C=(2, 8, 50)).items()}
    out, last = selective_scan(**g, delta_softplus=True, return_last_state=True)
    assert (out.device.type, last.device.type, last.shape) == ("meta", "meta", (2, 4, 8))
    (out.sum() + last.sum()).backward()
    assert all(t.grad.device.type == "meta" for t in g.values())


def test_dispatch_for_cuda_tensors_without_mamba_ssm_kernels():
    """On a CUDA device without mamba-ssm's compiled extension, auto picks a scan that runs there
    and the Mamba block takes the project's path (no fused CPU kernels: they are for CPU tensors)."""
    if networks.available_backends()["cuda"] is None:
        pytest.skip("mamba-ssm's CUDA kernels are usable here")
    with FakeTensorMode():
        x = torch.randn(2, 8, 16, device="cuda")
    assert x.device.type == "cuda"
    assert resolve_backend(x.device) not in ("cuda", "fused")
    assert fused_block_fn(x.device) is None
    assert not use_fused_kernels(x)
    with pytest.raises(ValueError, match="'fused' was requested but cannot run"):
        resolve_backend(x.device, "fused")


def test_convolutional_network_on_fake_cuda():
    net = networks.ResidualUNet(**TINY, deep_supervision=True)
    with FakeTensorMode(allow_non_fake_inputs=True) as mode, torch.no_grad():
        net = net.to_empty(device="cuda")
        mode.allow_non_fake_inputs = False  # from here on, a real (CPU) tensor in the graph raises
        x = torch.randn(2, 1, 8, 8, 4, device="cuda")
        outs = _outputs(net.train()(x)) + [net.eval()(x)]
    assert all(o.device.type == "cuda" and o.dtype == torch.float32 for o in outs)
