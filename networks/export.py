"""Export a bundle's network to TorchScript without ever leaving a broken file behind.

``python -m networks.export`` takes the arguments of MONAI's ``python -m monai.bundle ckpt_export``
and runs it, but writes to a temporary name beside the target, loads the written file back with
``torch.jit.load``, checks that its output equals the eager network's (same weights, the ``torch``
scan backend, a random input of the shape the bundle's metadata describes, or the traced shape),
and only then renames it to the requested name. Any failure removes the temporary file, leaves an
existing file of that name untouched, and ends with one line on stderr and exit status 1.

Why a wrapper: ``ckpt_export`` writes straight to its target, so a failed save (or a trace that does
not replay) leaves a truncated or wrong ``.ts`` under the requested name.

The scripted networks run PyTorch ops only (`torch.jit.is_scripting` paths of `networks.Mamba` and the
layers): no fused CPU kernels, and the scan is the ``torch`` backend's recurrence, forward only.
``--use_trace True`` records the same path for one input shape (by default the bundle's patch), so the
traced file only accepts inputs of that shape.

Example (from a bundle folder)::

    python -m networks.export --filepath models/model.ts --ckpt_file models/model.pt \\
        --meta_file configs/metadata.json --config_file configs/inference.json
"""

from __future__ import annotations

import contextlib
import os
import sys
from typing import Any, Dict, Iterator, Optional, Sequence

import torch

__all__ = ["export", "check_export", "main"]


@contextlib.contextmanager
def _scan_backend(name: str) -> Iterator[None]:
    """Force the selective-scan backend of this process (``NETWORKS_SCAN_BACKEND``) inside the block."""
    from .ops.selective_scan import ENV_VAR

    old = os.environ.get(ENV_VAR)
    os.environ[ENV_VAR] = name
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(ENV_VAR, None)
        else:
            os.environ[ENV_VAR] = old


def _parser(config_file: Any, meta_file: Optional[str], bundle_root: str, override: Dict[str, Any]):
    """The bundle's config as ``ckpt_export`` reads it (config, metadata, then the overrides)."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(f=config_file)
    meta = meta_file or os.path.join(bundle_root, "configs", "metadata.json")
    if os.path.exists(meta):
        parser.read_meta(f=meta)
    for k, v in override.items():
        parser[k] = v
    return parser


def check_export(
    path: str, parser: Any, net_id: str, ckpt_file: str, key_in_ckpt: str, input_shape: Sequence[int],
    rtol: float = 1e-4,
) -> float:
    """Load the TorchScript file ``path`` and compare it with the eager network on one random input.

    The eager network is ``parser``'s ``net_id`` with the weights of ``ckpt_file`` (``key_in_ckpt``
    for a nested checkpoint), in eval mode on the ``torch`` scan backend, on CPU. Returns the largest
    absolute difference; raises RuntimeError when it exceeds ``rtol`` times the output's largest magnitude
    (float32 rounding: the two run the same operations).
    """
    from monai.networks.utils import copy_model_state

    loaded = torch.jit.load(path, map_location="cpu").eval()
    net = parser.get_parsed_content(net_id, instantiate=True).to("cpu").eval()
    state = torch.load(ckpt_file, map_location="cpu", weights_only=True)
    copy_model_state(dst=net, src=state[key_in_ckpt] if key_in_ckpt else state, inplace=True)
    x = torch.randn(*[int(s) for s in input_shape], generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), _scan_backend("torch"):
        want, got = net(x), loaded(x)
    if not isinstance(got, torch.Tensor) or got.shape != want.shape:
        raise RuntimeError(f"the exported model returned {type(got).__name__} "
                           f"{tuple(got.shape) if isinstance(got, torch.Tensor) else ''}, expected {tuple(want.shape)}")
    diff = float((got - want).abs().max())
    scale = float(want.abs().max())
    if not diff <= rtol * max(scale, 1e-6):
        raise RuntimeError(f"the exported model's output differs from the eager network's by {diff:.3g} "
                           f"(largest output magnitude {scale:.3g}) on input {tuple(x.shape)}")
    return diff


def export(
    net_id: str = "network_def",
    filepath: Optional[str] = None,
    ckpt_file: Optional[str] = None,
    meta_file: Optional[str] = None,
    config_file: Any = None,
    key_in_ckpt: str = "",
    use_trace: bool = False,
    input_shape: Optional[Sequence[int]] = None,
    bundle_root: Optional[str] = None,
    **override: Any,
) -> str:
    """``monai.bundle.ckpt_export`` to a temporary file, loaded back and checked, then renamed to ``filepath``.

    Args:
        net_id, filepath, ckpt_file, meta_file, config_file, key_in_ckpt, use_trace, input_shape, override:
            as ``monai.bundle.ckpt_export`` (defaults under ``bundle_root``: ``models/model.ts``,
            ``models/model.pt``, ``configs/metadata.json``; ``config_file`` defaults to
            ``configs/inference.json``). With ``use_trace`` and no ``input_shape``, the trace input is
            (1, ``in_channels``, *``patch_size``) of the config when it has both (the sliding-window
            patch), else ``ckpt_export``'s shape from the metadata.
        bundle_root: the bundle folder (default: the current directory).

    Returns:
        The path written. Raises (and writes nothing) when export, loading or the comparison fails.
    """
    from monai.bundle import ckpt_export

    root = bundle_root or os.getcwd()
    config_file = config_file or os.path.join(root, "configs", "inference.json")
    filepath = str(filepath or os.path.join(root, "models", "model.ts"))
    if not os.path.splitext(filepath)[1]:
        filepath += ".ts"  # as ckpt_export names it
    ckpt_file = ckpt_file or os.path.join(root, "models", "model.pt")
    if not os.path.isfile(ckpt_file):
        raise FileNotFoundError(f"checkpoint {ckpt_file} not found (train the bundle or pass --ckpt_file)")
    parser = _parser(config_file, meta_file, root, override)
    if use_trace and input_shape is None and "patch_size" in parser and "in_channels" in parser:
        input_shape = [1, int(parser.get_parsed_content("in_channels"))] + [int(s) for s in parser.get_parsed_content("patch_size")]
    if input_shape is None:
        from monai.bundle.scripts import _get_fake_input_shape

        input_shape = _get_fake_input_shape(parser)
    folder = os.path.dirname(os.path.abspath(filepath))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.path.basename(filepath)}.{os.getpid()}.tmp.ts")
    try:
        with _scan_backend("torch"):  # a trace records the torch path; scripting does anyway
            ckpt_export(net_id=net_id, filepath=tmp, ckpt_file=ckpt_file, meta_file=meta_file, config_file=config_file,
                        key_in_ckpt=key_in_ckpt, use_trace=use_trace, input_shape=list(input_shape),
                        bundle_root=root, **override)
        check_export(tmp, parser, net_id, ckpt_file, key_in_ckpt, input_shape)
        os.replace(tmp, filepath)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return filepath


def main(**kwargs: Any) -> None:
    """Command line: `export`'s arguments; failures end with one line on stderr and exit status 1."""
    target = kwargs.get("filepath") or os.path.join(kwargs.get("bundle_root") or os.getcwd(), "models", "model.ts")
    try:
        path = export(**kwargs)
    except Exception as err:  # noqa: BLE001 - any failure is reported in one line; nothing was written
        msg = str(err).strip().splitlines()
        print(f"export failed, nothing written to {target}: {type(err).__name__}: {msg[0] if msg else ''}",
              file=sys.stderr)
        sys.exit(1)
    print(f"exported {path} (loaded back; output equal to the eager network's within float32 rounding)")


if __name__ == "__main__":
    import fire

    fire.Fire(main)
