"""Weights trained with the authors' code (their nnU-Net v2 fork) <-> a bundle's ``models/model.pt``.

``python -m networks.convert CHECKPOINT BUNDLE``: an nnU-Net trainer checkpoint of the paper's code
(``checkpoint_final.pth`` / ``checkpoint_best.pth``: a dict with ``network_weights``, ``init_args``,
``trainer_name``, ...) becomes ``BUNDLE/models/model.pt`` (a plain state dict, as the bundles write it).
``python -m networks.convert BUNDLE CHECKPOINT --to nnunet``: a bundle's ``models/model.pt`` becomes an nnU-Net
checkpoint the authors' ``nnUNetv2_predict`` loads (with ``plans.json`` and ``dataset.json`` beside it).

Before anything is written, the checkpoint is checked against the bundle:

* the variant: the trainer class (``nnUNetTrainerSegMamba``, ``nnUNetTrainerPanSegMamba`` = BiSegMamba,
  ``nnUNetTrainerMultiSegMamba``, ``nnUNetTrainerSegMambaSkip``) must be the bundle's network;
* the plan: the checkpoint's own plans (``init_args["plans"]``, configuration ``init_args["configuration"]``)
  must give the bundle's kernels, strides, features, blocks per stage, patch size, spacing,
  ``transpose_forward``, input channels and classes. Both speak nnU-Net's axis order (the bundles present the
  volume in nnU-Net's voxel order), so no list is reversed and no kernel transposed: the weights are renamed,
  nothing else;
* the tensors: every tensor the bundle's network needs must be there with its shape, and nothing else;
  errors name each missing, unexpected or mis-shaped key (in the authors' naming).

The names are mapped by module structure (the authors' ``SegMamba.py`` / ``PanSegMamba.py`` /
``MultiSegMamba.py`` / ``SegMambaSkip.py`` on dynamic_network_architectures 0.3.1 blocks -> ``networks.nets``),
never by order or shape (the authors register ``mamba`` before ``norm1`` and decoder stages before transposed
convolutions):

===========================================================  ==============================================
authors (nnU-Net)                                             this project
===========================================================  ==============================================
``encoder.stem.convs.0.{conv,norm}``                          ``stem.{conv,adn.N}``
``encoder.stages.s.blocks.b.{conv1,conv2,skip.j}.{conv,norm}`` ``encoder.s.b.{conv1,conv2,skip.j}.{conv,adn.N}``
``decoder.stages.i.blocks.b.{...}``                           ``decoder.i.b.{...}``
``decoder.transpconvs.i``                                     ``upsamples.i.conv``
``decoder.seg_layers.i``                                      ``heads.i.conv.conv``
``encoder.mamba_layers.s.norm``                               ``mamba_layers.s.norm`` (token LayerNorm)
``encoder.mamba_layers.s.mamba`` (MambaTrans / PanMambaTrans) ``mamba_layers.s.layer`` (MambaLayer / BiMambaLayer)
``MambaTrans.{mamba,norm1,norm2,head}``                       ``MambaLayer.{mamba,norm1,norm2,mlp}``
``PanMambaTrans.{fwd_mamba,bwd_mamba,norm}``                  ``BiMambaLayer.{fwd,bwd,norm}``
``encoder.mamba_layers.s.mambas.k`` (MultiMambaTrans)         ``mamba_layers.s.directions.k.layer``
===========================================================  ==============================================

The authors' state dicts hold every conv/norm of a ``ConvDropoutNormReLU`` twice (``conv``/``norm`` and their
``all_modules.0``/``all_modules.1`` aliases) and the whole encoder twice (``encoder.*`` and ``decoder.encoder.*``,
the decoder keeps a reference); reading, the aliases must equal their original and are dropped; writing, they
are added, since nnU-Net loads with ``strict=True``.
"""

from __future__ import annotations

import json
import logging
import os
import re
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch

__all__ = [
    "TRAINERS", "ConversionError", "to_authors_key", "to_project_key", "authors_state_dict", "project_state_dict",
    "BundleSpec", "read_bundle", "check_trainer", "check_plan", "load_nnunet_checkpoint", "read_bundle_weights",
    "write_bundle_weights", "nnunet_to_bundle", "bundle_to_nnunet", "main",
]

logger = logging.getLogger(__name__)

# trainer class of the authors' release -> network class of this project
TRAINERS: Dict[str, str] = {
    "nnUNetTrainerSegMamba": "SegMamba",
    "nnUNetTrainerPanSegMamba": "BiSegMamba",
    "nnUNetTrainerMultiSegMamba": "MultiSegMamba",
    "nnUNetTrainerSegMambaSkip": "SegMambaSkip",
}
VARIANT_TRAINER = {v: k for k, v in TRAINERS.items()}


class ConversionError(ValueError):
    """A checkpoint that does not fit the bundle; the message names the file and every key or field at fault."""


# ----------------------------------------------------------------------------------------------- key mapping
_CONV_BLOCK = r"(?:conv1|conv2|skip\.\d+)"
# (project pattern, authors' replacement), first match wins; the Mamba layers' inner names are mapped after.
_RULES: List[Tuple[str, str]] = [
    (r"^stem\.conv\.(.+)$", r"encoder.stem.convs.0.conv.\1"),
    (r"^stem\.adn\.N\.(.+)$", r"encoder.stem.convs.0.norm.\1"),
    (rf"^encoder\.(\d+)\.(\d+)\.({_CONV_BLOCK})\.conv\.(.+)$", r"encoder.stages.\1.blocks.\2.\3.conv.\4"),
    (rf"^encoder\.(\d+)\.(\d+)\.({_CONV_BLOCK})\.adn\.N\.(.+)$", r"encoder.stages.\1.blocks.\2.\3.norm.\4"),
    (rf"^decoder\.(\d+)\.(\d+)\.({_CONV_BLOCK})\.conv\.(.+)$", r"decoder.stages.\1.blocks.\2.\3.conv.\4"),
    (rf"^decoder\.(\d+)\.(\d+)\.({_CONV_BLOCK})\.adn\.N\.(.+)$", r"decoder.stages.\1.blocks.\2.\3.norm.\4"),
    (r"^upsamples\.(\d+)\.conv\.(.+)$", r"decoder.transpconvs.\1.\2"),
    (r"^heads\.(\d+)\.conv\.conv\.(.+)$", r"decoder.seg_layers.\1.\2"),
    (r"^mamba_layers\.(\d+)\.directions\.(\d+)\.layer\.(.+)$", r"encoder.mamba_layers.\1.mambas.\2.\3"),
    (r"^mamba_layers\.(\d+)\.norm\.(weight|bias)$", r"encoder.mamba_layers.\1.norm.\2"),
    (r"^mamba_layers\.(\d+)\.layer\.(.+)$", r"encoder.mamba_layers.\1.mamba.\2"),
]
# inside a Mamba layer (after the prefix above): BiMambaLayer / MambaLayer names -> PanMambaTrans / MambaTrans
_MAMBA_INNER = [(r"(^|\.)fwd\.", r"\1fwd_mamba."), (r"(^|\.)bwd\.", r"\1bwd_mamba."), (r"(^|\.)mlp\.", r"\1head.")]
_MAMBA_INNER_BACK = [(r"(^|\.)fwd_mamba\.", r"\1fwd."), (r"(^|\.)bwd_mamba\.", r"\1bwd."), (r"(^|\.)head\.", r"\1mlp.")]
_MAMBA_PREFIX = re.compile(r"^(encoder\.mamba_layers\.\d+\.(?:mambas\.\d+|mamba)\.)(.+)$")
# nnU-Net ConvDropoutNormReLU blocks (the only modules with all_modules aliases)
_CDNR = re.compile(r"^((?:encoder|decoder)\.(?:stem\.convs\.\d+|stages\.\d+\.blocks\.\d+\." + _CONV_BLOCK + r"))"
                   r"\.(conv|norm)\.(.+)$")
_ALIAS = {"conv": "all_modules.0", "norm": "all_modules.1"}


def _sub_all(rules: Sequence[Tuple[str, str]], s: str) -> str:
    for pattern, repl in rules:
        s = re.sub(pattern, repl, s)
    return s


def to_authors_key(key: str) -> str:
    """A project state-dict key -> the authors' canonical key (no alias); KeyError for an unknown key."""
    for pattern, repl in _RULES:
        if re.match(pattern, key):
            out = re.sub(pattern, repl, key)
            m = _MAMBA_PREFIX.match(out)
            return m.group(1) + _sub_all(_MAMBA_INNER, m.group(2)) if m else out
    raise KeyError(f"no authors' name for the project key {key!r}")


_BACK_RULES: List[Tuple[str, str]] = [
    (r"^encoder\.stem\.convs\.0\.conv\.(.+)$", r"stem.conv.\1"),
    (r"^encoder\.stem\.convs\.0\.norm\.(.+)$", r"stem.adn.N.\1"),
    (rf"^(encoder|decoder)\.stages\.(\d+)\.blocks\.(\d+)\.({_CONV_BLOCK})\.conv\.(.+)$", r"\1.\2.\3.\4.conv.\5"),
    (rf"^(encoder|decoder)\.stages\.(\d+)\.blocks\.(\d+)\.({_CONV_BLOCK})\.norm\.(.+)$", r"\1.\2.\3.\4.adn.N.\5"),
    (r"^decoder\.transpconvs\.(\d+)\.(.+)$", r"upsamples.\1.conv.\2"),
    (r"^decoder\.seg_layers\.(\d+)\.(.+)$", r"heads.\1.conv.conv.\2"),
    (r"^encoder\.mamba_layers\.(\d+)\.mambas\.(\d+)\.(.+)$", r"mamba_layers.\1.directions.\2.layer.\3"),
    (r"^encoder\.mamba_layers\.(\d+)\.norm\.(weight|bias)$", r"mamba_layers.\1.norm.\2"),
    (r"^encoder\.mamba_layers\.(\d+)\.mamba\.(.+)$", r"mamba_layers.\1.layer.\2"),
]
_PROJECT_MAMBA_PREFIX = re.compile(r"^(mamba_layers\.\d+\.(?:directions\.\d+\.layer|layer)\.)(.+)$")


def _canonical(key: str) -> str:
    """An authors' key with its aliases resolved: ``decoder.encoder.X`` -> ``encoder.X``,
    ``all_modules.0`` / ``all_modules.1`` of a ConvDropoutNormReLU -> ``conv`` / ``norm``."""
    for prefix in ("module.", "_orig_mod."):  # DDP / torch.compile wrappers
        if key.startswith(prefix):
            key = key[len(prefix):]
    if key.startswith("decoder.encoder."):
        key = key[len("decoder."):]
    m = re.match(r"^(.*)\.all_modules\.([01])\.(.+)$", key)
    if m and _CDNR.match(f"{m.group(1)}.conv.x"):
        key = f"{m.group(1)}.{'conv' if m.group(2) == '0' else 'norm'}.{m.group(3)}"
    return key


def to_project_key(key: str) -> str:
    """An authors' key (aliases allowed) -> the project key; KeyError for a key with no counterpart."""
    key = _canonical(key)
    for pattern, repl in _BACK_RULES:
        if re.match(pattern, key):
            out = re.sub(pattern, repl, key)
            m = _PROJECT_MAMBA_PREFIX.match(out)
            return m.group(1) + _sub_all(_MAMBA_INNER_BACK, m.group(2)) if m else out
    raise KeyError(f"no project name for the authors' key {key!r}")


def authors_state_dict(state: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """A project state dict -> the authors' one, with the aliases nnU-Net's strict loading expects.

    The order of the authors' ``state_dict()``: encoder (stem, stages, Mamba layers), its copy under
    ``decoder.encoder``, then the decoder's stages, transposed convolutions and segmentation layers; every
    ConvDropoutNormReLU's ``all_modules.0/1`` right after its ``conv``/``norm``. Tensors are shared, not copied.
    """
    encoder: Dict[str, torch.Tensor] = {}
    decoder: Dict[str, Dict[str, torch.Tensor]] = {"stages": {}, "transpconvs": {}, "seg_layers": {}}
    pending: List[Tuple[str, torch.Tensor]] = []  # aliases of the current ConvDropoutNormReLU
    block = None

    def flush(target: Dict[str, torch.Tensor]) -> None:
        target.update(pending)
        pending.clear()

    for key, value in state.items():
        new = to_authors_key(key)
        m = _CDNR.match(new)
        target = encoder if new.startswith("encoder.") else decoder[new.split(".")[1]]
        if block is not None and (m is None or m.group(1) != block[0]):
            flush(block[1])
            block = None
        target[new] = value
        if m:
            block = (m.group(1), target)
            pending.append((f"{m.group(1)}.{_ALIAS[m.group(2)]}.{m.group(3)}", value))
    if block is not None:
        flush(block[1])
    encoder = _mamba_trans_order(encoder)
    out = dict(encoder)
    out.update({f"decoder.{k}": v for k, v in encoder.items()})
    for part in ("stages", "transpconvs", "seg_layers"):
        out.update(decoder[part])
    return out


_MAMBA_TRANS = re.compile(r"^(encoder\.mamba_layers\.\d+\.(?:mamba\.|mambas\.\d+\.)(?:fwd_mamba\.|bwd_mamba\.)?)"
                          r"(mamba|norm1|norm2|head)\.")
_MAMBA_TRANS_RANK = {"mamba": 0, "norm1": 1, "norm2": 2, "head": 3}  # the authors' MambaTrans registers mamba first


def _mamba_trans_order(state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """``state`` with the entries of each MambaTrans in the authors' registration order (stable otherwise)."""
    first: Dict[str, int] = {}
    order = []
    for i, key in enumerate(state):
        m = _MAMBA_TRANS.match(key)
        if m:
            start = first.setdefault(m.group(1), i)
            order.append((start, _MAMBA_TRANS_RANK[m.group(2)], i, key))
        else:
            order.append((i, 0, i, key))
    return {key: state[key] for *_, key in sorted(order)}


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same shape and values (aliases saved by torch.save share storage: no comparison needed then)."""
    if a.shape != b.shape:
        return False
    if "meta" in (a.device.type, b.device.type):
        return True
    return (a.data_ptr() == b.data_ptr() and a.stride() == b.stride() and a.dtype == b.dtype) or torch.equal(a, b)


def project_state_dict(weights: Mapping[str, torch.Tensor], where: str = "checkpoint") -> Dict[str, torch.Tensor]:
    """The authors' ``network_weights`` -> a project state dict.

    Every alias must hold the same values as its original (else :class:`ConversionError` naming both keys);
    a key with no counterpart here raises :class:`ConversionError` naming it (with all such keys).
    """
    out: Dict[str, torch.Tensor] = {}
    source: Dict[str, str] = {}
    unknown, differing = [], []
    for key, value in weights.items():
        try:
            new = to_project_key(key)
        except KeyError:
            unknown.append(key)
            continue
        if new in out:
            if not _same(out[new], value):
                differing.append(f"{key} != {source[new]}")
            continue
        out[new], source[new] = value, key
    if unknown:
        raise ConversionError(f"{where}: unexpected tensor(s) with no counterpart in this project's networks: "
                              + ", ".join(unknown))
    if differing:
        raise ConversionError(f"{where}: aliases of the same tensor differ: " + "; ".join(differing))
    return out


# ------------------------------------------------------------------------------------------------- the bundle
class BundleSpec:
    """What a bundle's ``configs/train.json`` says about its network and preprocessing (nnU-Net axis order).

    (``train.json`` holds the plan's values; ``inference.json`` takes them from ``models/model.pt``'s record.)

    Attributes: ``root``, ``variant`` (network class name), ``in_channels``, ``num_classes``, ``kernel_size``,
    ``strides``, ``filters``, ``patch_size``, ``pixdim``, ``transpose_forward``, ``network_kwargs`` (the
    remaining ``network_def`` arguments, e.g. ``d_state_max``).
    """

    def __init__(self, root: str, config: Mapping[str, Any]) -> None:
        self.root = root
        net = dict(config["network_def"])
        target = str(net.pop("_target_"))
        self.variant = target.rsplit(".", 1)[-1]

        def resolve(v: Any) -> Any:
            return config[v[1:]] if isinstance(v, str) and v.startswith("@") else v

        self.in_channels = int(resolve(net.pop("in_channels")))
        self.num_classes = int(resolve(net.pop("out_channels")))
        self.kernel_size = [list(k) for k in resolve(net.pop("kernel_size"))]
        self.strides = [list(s) for s in resolve(net.pop("strides"))]
        self.filters = [int(f) for f in resolve(net.pop("filters"))]
        net.pop("deep_supervision", None)
        self.network_kwargs = {k: resolve(v) for k, v in net.items() if k != "spatial_dims"}
        self.patch_size = list(config["patch_size"])
        self.pixdim = [float(v) for v in config["pixdim"]]
        steps = config["preprocess_transforms"] if "preprocess_transforms" in config else config["preprocessing"]["transforms"]
        order = [t for t in steps
                 if isinstance(t, dict) and str(t.get("_target_", "")).endswith("ToNNUNetAxesd")]
        if not order:
            raise ConversionError(f"{root}: configs/train.json has no ToNNUNetAxesd step, so its network does "
                                  "not see nnU-Net's voxel order; regenerate the bundle (python -m networks.bundle_gen)")
        self.transpose_forward = [int(a) for a in order[0].get("transpose_forward", [0, 1, 2])]

    def network(self, device: str = "meta") -> torch.nn.Module:
        """The bundle's network (deep supervision off), built on ``device`` (meta: shapes only, no memory)."""
        import networks

        with torch.device(device):
            return getattr(networks, self.variant)(
                spatial_dims=3, in_channels=self.in_channels, out_channels=self.num_classes,
                kernel_size=self.kernel_size, strides=self.strides, filters=self.filters, deep_supervision=False,
                **self.network_kwargs)

    def shapes(self) -> Dict[str, Tuple[int, ...]]:
        """Project key -> shape of every tensor of the bundle's network (state dict order)."""
        return {k: tuple(v.shape) for k, v in self.network("meta").state_dict().items()}


def read_bundle(bundle: str) -> BundleSpec:
    """The :class:`BundleSpec` of the bundle folder ``bundle`` (ConversionError naming a missing config)."""
    path = os.path.join(os.fspath(bundle), "configs", "train.json")
    if not os.path.isfile(path):
        raise ConversionError(f"{bundle}: not a bundle (no {path})")
    with open(path) as f:
        return BundleSpec(os.fspath(bundle), json.load(f))


# ------------------------------------------------------------------------------------------------------ checks
def check_trainer(trainer_name: Optional[str], bundle: BundleSpec, where: str, allow_unknown_trainer: bool) -> None:
    """The checkpoint's trainer class must train the bundle's network (ConversionError otherwise)."""
    variant = TRAINERS.get(str(trainer_name))
    if variant is None:
        if allow_unknown_trainer:
            logger.warning("%s: trainer %r is not one of the authors' (%s); trusting the tensor check", where,
                           trainer_name, ", ".join(TRAINERS))
            return
        raise ConversionError(
            f"{where}: trainer {trainer_name!r} is not one of the authors' trainers ({', '.join(TRAINERS)}), so the "
            f"variant cannot be checked (BiSegMamba and SegMambaSkip have the same tensors); pass "
            f"--allow_unknown_trainer if you know it trains a {bundle.variant}")
    if variant != bundle.variant:
        raise ConversionError(f"{where}: trainer {trainer_name} trains a {variant}, but the bundle {bundle.root} "
                              f"holds a {bundle.variant}")


def _configuration(plans: Mapping[str, Any], name: str) -> Dict[str, Any]:
    configs = plans.get("configurations", {})
    if name not in configs:
        raise ConversionError(f"configuration {name!r} not in the plans (have {sorted(configs)})")
    cfg = dict(configs[name])
    parent = cfg.pop("inherits_from", None)  # nnU-Net's ConfigurationManager: the child's entries win
    return {**_configuration(plans, parent), **cfg} if parent else cfg


def _num_classes(dataset_json: Mapping[str, Any]) -> int:
    """Network outputs of nnU-Net's LabelManager: one per label, or one per region when regions are used."""
    labels = dataset_json["labels"]
    if "regions_class_order" in dataset_json:
        return len([k for k in labels if k != "background" and k != "ignore"])
    return len([k for k in labels if k != "ignore"])


def check_plan(init_args: Mapping[str, Any], bundle: BundleSpec, where: str) -> None:
    """The checkpoint's plan (``init_args``) must be the bundle's: ConversionError listing every field that differs."""
    try:
        plans, dataset_json = init_args["plans"], init_args["dataset_json"]
        cfg = _configuration(plans, init_args.get("configuration", "3d_fullres"))
        base, cap = cfg.get("UNet_base_num_features", 32), cfg.get("unet_max_num_features", 320)
        n = len(cfg["conv_kernel_sizes"])
        theirs = {
            "conv_kernel_sizes (kernel_size)": [list(k) for k in cfg["conv_kernel_sizes"]],
            "pool_op_kernel_sizes (strides)": [list(s) for s in cfg["pool_op_kernel_sizes"]],
            "features per stage (filters)": [min(base * 2**i, cap) for i in range(n)],
            "n_conv_per_stage_encoder": list(cfg.get("n_conv_per_stage_encoder", [2] * n)),
            "n_conv_per_stage_decoder": list(cfg.get("n_conv_per_stage_decoder", [2] * (n - 1))),
            "patch_size": list(cfg["patch_size"]),
            "spacing (pixdim)": [round(float(v), 5) for v in cfg["spacing"]],
            "transpose_forward": list(plans.get("transpose_forward", [0, 1, 2])),
            "input channels": len(dataset_json.get("channel_names", dataset_json.get("modality", {}))),
            "classes": _num_classes(dataset_json),
        }
    except (KeyError, TypeError) as e:
        raise ConversionError(f"{where}: init_args hold no readable nnU-Net plans / dataset.json ({e!r})") from None
    ours = {
        "conv_kernel_sizes (kernel_size)": bundle.kernel_size, "pool_op_kernel_sizes (strides)": bundle.strides,
        "features per stage (filters)": bundle.filters, "n_conv_per_stage_encoder": [2] * len(bundle.filters),
        "n_conv_per_stage_decoder": [2] * (len(bundle.filters) - 1), "patch_size": bundle.patch_size,
        "spacing (pixdim)": [round(v, 5) for v in bundle.pixdim], "transpose_forward": bundle.transpose_forward,
        "input channels": bundle.in_channels, "classes": bundle.num_classes,
    }
    bad = [f"{k}: checkpoint {theirs[k]} vs bundle {ours[k]}" for k in ours if theirs[k] != ours[k]]
    if bad:
        raise ConversionError(f"{where}: trained with another plan than the bundle {bundle.root} "
                              f"(both in nnU-Net's axis order):\n  " + "\n  ".join(bad))


def check_tensors(state: Mapping[str, torch.Tensor], bundle: BundleSpec, where: str) -> None:
    """Every tensor of the bundle's network present with its shape, nothing else; ConversionError naming the
    keys at fault (authors' names, project names in brackets)."""
    want = bundle.shapes()
    missing = [k for k in want if k not in state]
    extra = [k for k in state if k not in want]
    shaped = [k for k in want if k in state and tuple(state[k].shape) != want[k]]

    def name(k: str) -> str:
        try:
            return f"{to_authors_key(k)} [{k}]"
        except KeyError:
            return k

    problems = []
    if missing:
        problems.append("missing: " + ", ".join(name(k) for k in missing))
    if extra:
        problems.append("unexpected: " + ", ".join(name(k) for k in extra))
    if shaped:
        problems.append("wrong shape: " + ", ".join(f"{name(k)} {tuple(state[k].shape)} (expected {want[k]})"
                                                    for k in shaped))
    if problems:
        raise ConversionError(f"{where}: tensors do not fit the bundle's {bundle.variant} ({bundle.root}):\n  "
                              + "\n  ".join(problems))


# ----------------------------------------------------------------------------------------------------- files
def load_nnunet_checkpoint(path: str, trust: bool = False) -> Dict[str, Any]:
    """Read an nnU-Net trainer checkpoint without running pickled code (numpy scalars of its training log
    allowed); ``trust=True`` reads any pickle (only for files you trust)."""
    if trust:
        return torch.load(path, map_location="cpu", weights_only=False)
    import numpy.dtypes

    allowed = [np.dtype, np.ndarray, type(np.float64(0).dtype)] + [
        getattr(numpy.dtypes, n) for n in dir(numpy.dtypes) if n.endswith("DType")]
    core = getattr(np, "_core", None) or getattr(np, "core")
    allowed += [core.multiarray.scalar, core.multiarray._reconstruct]
    try:
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ConversionError(f"{path}: no such checkpoint") from None
    except Exception as e:  # noqa: BLE001 - any unpickling refusal
        raise ConversionError(f"{path}: cannot be read without executing pickled code ({str(e).splitlines()[0][:300]}); "
                              "pass --trust if you trust this file") from None


def read_bundle_weights(path: str) -> Dict[str, torch.Tensor]:
    """The network state dict of a bundle weights file: a plain state dict (``models/model.pt``) or a
    training checkpoint holding it under ``"model"`` (``models/checkpoint.pt``)."""
    obj = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(obj, Mapping) and isinstance(obj.get("model"), Mapping):
        obj = obj["model"]
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ConversionError(f"{path}: not a state dict of the network")
    return dict(obj)


def write_bundle_weights(state: Mapping[str, torch.Tensor], path: str) -> None:
    """Write a bundle's ``models/model.pt``: the plain state dict the bundles' ``CheckpointLoader`` reads,
    atomically (temp file + rename), so a failed conversion never leaves a partial file."""
    from .bundle.checkpoint import atomic_torch_save

    atomic_torch_save(dict(state), path)


def nnunet_to_bundle(checkpoint: str, bundle: str, out: Optional[str] = None, trust: bool = False,
                     allow_unknown_trainer: bool = False) -> str:
    """Authors' trainer checkpoint -> ``<bundle>/models/model.pt`` (or ``out``), after every check; returns the path."""
    spec = read_bundle(bundle)
    ckpt = load_nnunet_checkpoint(os.fspath(checkpoint), trust)
    if not isinstance(ckpt, Mapping) or "network_weights" not in ckpt:
        raise ConversionError(f"{checkpoint}: not an nnU-Net trainer checkpoint (no 'network_weights')")
    check_trainer(ckpt.get("trainer_name"), spec, str(checkpoint), allow_unknown_trainer)
    if "init_args" in ckpt:
        check_plan(ckpt["init_args"], spec, str(checkpoint))
    else:
        raise ConversionError(f"{checkpoint}: no 'init_args' (the plan it was trained with cannot be checked)")
    state = project_state_dict(ckpt["network_weights"], str(checkpoint))
    check_tensors(state, spec, str(checkpoint))
    net = spec.network("meta")
    net.load_state_dict(state, strict=True, assign=True)  # PyTorch's own check, on the meta-built network
    ordered = {k: state[k].detach().to("cpu") for k in net.state_dict()}
    target = os.fspath(out) if out else os.path.join(spec.root, "models", "model.pt")
    write_bundle_weights(ordered, target)
    return target


def _packaged_plans(bundle_name: str) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """nnU-Net ``plans.json`` / ``dataset.json`` of the bundle's dataset, from the packaged plan files."""
    here = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bundle_gen")
    dataset = bundle_name.split("_")[0]
    spec_path = os.path.join(here, "datasets", f"{dataset}.json")
    if not os.path.isfile(spec_path):
        raise ConversionError(f"cannot tell the dataset of bundle {bundle_name!r}; pass --plans and --dataset_json")
    with open(spec_path) as f:
        spec = json.load(f)
    stem = os.path.join(here, "plans", spec["plans"])
    with open(f"{stem}.json") as f:
        cfg = json.load(f)
    with open(f"{stem}_dataset.json") as f:
        dataset_json = json.load(f)
    with open(f"{stem}_intensity.json") as f:
        intensity = json.load(f)
    plans = {
        "dataset_name": cfg["dataset"], "plans_name": "nnUNetPlans", "image_reader_writer": "SimpleITKIO",
        "transpose_forward": list(spec["transpose_forward"]),
        "transpose_backward": [int(np.argsort(spec["transpose_forward"])[i]) for i in range(3)],
        "configurations": {cfg.get("configuration", "3d_fullres"): cfg},
        "experiment_planner_used": "ExperimentPlanner", "label_manager": "LabelManager",
        "foreground_intensity_properties_per_channel": intensity["foreground_intensity_properties_per_channel"],
    }
    return plans, dataset_json


def bundle_to_nnunet(bundle: str, out: str, weights: Optional[str] = None, trainer_name: Optional[str] = None,
                     plans: Optional[str] = None, dataset_json: Optional[str] = None, fold: int = 0) -> str:
    """A bundle's weights -> an nnU-Net trainer checkpoint at ``out`` for the authors' ``nnUNetv2_predict``.

    ``plans.json`` and ``dataset.json`` (the packaged plan of the bundle's dataset unless ``plans`` /
    ``dataset_json`` name files) are written beside it, or beside its ``fold_N`` folder, as nnU-Net's model
    folder layout wants (``<trainer>__nnUNetPlans__3d_fullres/{plans.json,dataset.json,fold_0/checkpoint_final.pth}``).
    The checkpoint holds the weights, ``init_args``, ``trainer_name`` and mirroring axes, no optimizer state: it
    is for prediction, not for resuming training.
    """
    spec = read_bundle(bundle)
    trainer_name = trainer_name or VARIANT_TRAINER.get(spec.variant)
    if trainer_name is None:
        raise ConversionError(f"the authors' release has no trainer for {spec.variant}; pass --trainer_name")
    if plans or dataset_json:
        if not (plans and dataset_json):
            raise ConversionError("--plans and --dataset_json go together")
        with open(plans) as f:
            plans_d = json.load(f)
        with open(dataset_json) as f:
            ds = json.load(f)
    else:
        plans_d, ds = _packaged_plans(os.path.basename(os.path.normpath(spec.root)))
    configuration = "3d_fullres"
    init_args = {"plans": plans_d, "configuration": configuration, "fold": int(fold), "dataset_json": ds,
                 "unpack_dataset": True, "device": torch.device("cuda")}
    check_plan(init_args, spec, str(plans or "packaged plans"))
    src = os.fspath(weights) if weights else os.path.join(spec.root, "models", "model.pt")
    state = read_bundle_weights(src)
    check_tensors(state, spec, src)
    ckpt = {
        "network_weights": authors_state_dict(state), "optimizer_state": None, "grad_scaler_state": None,
        "logging": None, "_best_ema": None, "current_epoch": 0, "init_args": init_args,
        "trainer_name": trainer_name, "inference_allowed_mirroring_axes": (0, 1, 2),
    }
    from .bundle.checkpoint import atomic_torch_save

    out = os.fspath(out)
    folder = os.path.dirname(os.path.abspath(out))
    model_folder = os.path.dirname(folder) if re.match(r"^fold_(\d+|all)$", os.path.basename(folder)) else folder
    os.makedirs(model_folder, exist_ok=True)
    for name, doc in (("plans.json", plans_d), ("dataset.json", ds)):
        tmp = os.path.join(model_folder, f".{name}.part")
        with open(tmp, "w") as f:
            json.dump(doc, f, indent=2)
        os.replace(tmp, os.path.join(model_folder, name))
    atomic_torch_save(ckpt, out)
    return out


def main(src: str, dst: str, to: str = "bundle", out: Optional[str] = None, weights: Optional[str] = None,
         trust: bool = False, allow_unknown_trainer: bool = False, trainer_name: Optional[str] = None,
         plans: Optional[str] = None, dataset_json: Optional[str] = None, fold: int = 0) -> None:
    """Convert weights between the authors' nnU-Net checkpoints and a bundle.

    ``python -m networks.convert CHECKPOINT BUNDLE``: the authors' ``checkpoint_final.pth`` -> ``BUNDLE/models/model.pt``
    (``--out`` for another file); ``--trust`` reads a checkpoint whose pickle needs more than tensors and numpy
    scalars; ``--allow_unknown_trainer`` accepts a trainer class outside the authors' four.

    ``python -m networks.convert BUNDLE CHECKPOINT --to nnunet``: ``BUNDLE/models/model.pt`` (``--weights`` for
    another file) -> an nnU-Net checkpoint, plus plans.json / dataset.json (``--plans`` / ``--dataset_json`` for
    your own, else the packaged plan); ``--trainer_name`` and ``--fold`` fill its metadata.
    """
    try:
        if to == "bundle":
            path = nnunet_to_bundle(src, dst, out=out, trust=trust, allow_unknown_trainer=allow_unknown_trainer)
        elif to == "nnunet":
            path = bundle_to_nnunet(src, dst, weights=weights, trainer_name=trainer_name, plans=plans,
                                    dataset_json=dataset_json, fold=fold)
        else:
            raise ConversionError(f"--to must be 'bundle' or 'nnunet', got {to!r}")
    except ConversionError as e:
        raise SystemExit(f"error: {e}") from None
    print(f"wrote {path}")


if __name__ == "__main__":
    import fire

    fire.Fire(main)
