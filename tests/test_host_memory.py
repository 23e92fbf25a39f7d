"""`networks.host_memory.keep_freed_memory`: large freed CPU tensors are reused, not faulted in afresh.

Each check runs in a fresh interpreter (the setting is process-wide) and counts the minor page faults
(``getrusage``) of 20 steps of a layer-like loop (64-68 MiB activations of varying sizes, after 10 steps
of warm-up): glibc's default serves each activation with a new mmap (one fault per 4 KiB page), a kept heap with pages already mapped.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from networks import host_memory

ROOT = Path(__file__).resolve().parents[1]
glibc = pytest.mark.skipif(host_memory._glibc() is None, reason="keep_freed_memory needs glibc")

_PROBE = r"""
import json, resource, sys
import torch
from networks.host_memory import keep_freed_memory, kept
reason = keep_freed_memory(sys.argv[1] == "keep") if sys.argv[1] != "untouched" else None

def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt

def rss_mib():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmRSS:"))

# a layer-like loop: fresh 64-68 MiB activations of varying sizes, freed at the end of each step
torch.manual_seed(0)
x = torch.randn(16, 2**20 + 300_000)
steady, rss = 0, []
for i in range(30):
    before = faults()
    n = 2**20 + (i * 7919) % 300_000
    y = torch.relu(x[:, :n] * 2.0 + 1.0)
    z = torch.mm(torch.ones(8 + i % 5, 16), y)
    total = float(y.sum() + z.sum())
    del y, z
    if i >= 10:
        steady += faults() - before
    if i in (9, 29):
        rss.append(rss_mib())
print("RESULT", json.dumps({"faults": steady, "rss": rss, "reason": reason, "kept": kept(), "total": total}))
"""


def _probe(mode: str, env_extra=None) -> dict:
    env = {k: v for k, v in os.environ.items() if k != host_memory.ENV_KEEP}
    env.update(PYTHONPATH=str(ROOT), **(env_extra or {}))
    out = subprocess.run([sys.executable, "-c", _PROBE, mode], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    line = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


@glibc
def test_freed_tensor_is_reused_without_page_faults():
    default, keep = _probe("untouched"), _probe("keep")
    assert keep["reason"] is None and keep["kept"] and not default["kept"]
    assert keep["total"] == default["total"]
    # glibc's default: fresh mappings, faulted in page by page (about 16,000 pages of 4 KiB per step)
    assert default["faults"] > 100_000, default
    assert keep["faults"] < 0.05 * default["faults"], (keep, default)
    # what is kept is reused: not reusing would add one activation (64 MiB) or more per step, 1.25 GiB or
    # more over the last 20 steps. The heap may still extend a little as the varying sizes fit around the
    # blocks torch's threads free: 0-53 MiB over runs here, 83 MiB once on CI (a machine with more cores).
    # Three activations leave room for that and still fail a heap that keeps but does not reuse.
    assert keep["rss"][1] < keep["rss"][0] + 3 * 64, keep


@glibc
def test_keep_then_release_restores_the_default():
    released = _probe("release")  # keep_freed_memory(False) on a fresh process: the default behaviour
    assert released["reason"] is None and not released["kept"]
    assert released["faults"] > 100_000, released


@glibc
def test_environment_turns_it_off():
    off = _probe("keep", {host_memory.ENV_KEEP: "0"})
    assert off["reason"] == f"turned off by {host_memory.ENV_KEEP}=0"
    assert not off["kept"] and off["faults"] > 100_000, off


def test_not_glibc_is_reported_not_raised(monkeypatch, caplog):
    monkeypatch.setattr(host_memory, "_glibc", lambda: None)
    monkeypatch.setattr(host_memory, "_reported", set())
    # this process's setting as a fresh one has it (an earlier test in the process, e.g. a bundle's
    # inference.json run in process, may have turned it on)
    monkeypatch.setattr(host_memory, "_state", {"kept": False})
    with caplog.at_level("INFO", logger="networks.host_memory"):
        reason = host_memory.keep_freed_memory()
    assert reason is not None and "not glibc" in reason
    assert not host_memory.kept()
    assert "not kept for reuse" in caplog.text


def test_every_bundle_workflow_has_the_setting():
    """Inference and evaluation keep freed memory by default; training does not (a full Synapse patch's
    training step no longer fit in 24 GiB with it); every workflow applies the key in its ``initialize``."""
    bundles = sorted(p for p in (ROOT / "bundles").iterdir() if (p / "configs" / "inference.json").exists())
    assert len(bundles) == 12
    call = "$networks.bundle.keep_freed_memory(@keep_freed_memory)"
    for bundle in bundles:
        cfg = {name: json.loads((bundle / "configs" / name).read_text())
               for name in ("train.json", "evaluate.json", "inference.json", "multi_gpu_train.json")}
        assert cfg["inference.json"]["keep_freed_memory"] is True, bundle.name
        assert cfg["evaluate.json"]["keep_freed_memory"] is True, bundle.name  # overrides train.json's when merged
        assert cfg["train.json"]["keep_freed_memory"] is False, bundle.name
        for name in ("train.json", "inference.json", "multi_gpu_train.json"):
            assert call in cfg[name]["initialize"], (bundle.name, name)
        assert "initialize" not in cfg["evaluate.json"]  # train.json's runs when the two are merged


@glibc
@pytest.mark.parametrize("configs, workflow, kept", [
    (["inference.json"], "infer", True),
    (["train.json", "evaluate.json"], "train", True),
    (["train.json"], "train", False),
], ids=["inference", "evaluate", "train"])
def test_workflow_initialize_applies_the_bundle_default(tmp_path, configs, workflow, kept):
    """`python -m monai.bundle run` runs ``initialize`` first: each workflow's own config sets it."""
    root = ROOT / "bundles" / "synapse_segmamba"
    files = [str(root / "configs" / c) for c in configs]
    code = (
        "from monai.bundle import ConfigWorkflow\n"
        "from networks.host_memory import kept\n"
        f"wf = ConfigWorkflow(config_file={files if len(files) > 1 else files[0]!r}, workflow_type={workflow!r},"
        f" bundle_root={str(root)!r}, output_dir={str(tmp_path)!r}, dataset_dir={str(tmp_path)!r})\n"
        "wf.parser.get_parsed_content('initialize')\n"
        "print('KEPT', kept())\n"
    )
    env = {k: v for k, v in os.environ.items() if k != host_memory.ENV_KEEP}
    out = subprocess.run([sys.executable, "-c", code], env={**env, "PYTHONPATH": str(ROOT)}, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"KEPT {kept}" in out.stdout, out.stdout


@pytest.mark.parametrize("value, expected", [(True, True), (False, False), ("false", False), ("False", False),
                                             ("TRUE", True), ("0", False), ("on", True), (1, True), (0, False)])
def test_parse_flag_reads_command_line_spellings(value, expected):
    from networks.flags import parse_flag

    assert parse_flag(value, "x") is expected


@pytest.mark.parametrize("value", ["maybe", "", 2, None, 0.5])
def test_parse_flag_refuses_anything_else_naming_the_setting(value):
    from networks.flags import parse_flag

    with pytest.raises(ValueError, match="keep_freed_memory must be true or false"):
        parse_flag(value, "keep_freed_memory")
    with pytest.raises(ValueError, match="keep_freed_memory must be true or false"):
        host_memory.keep_freed_memory(value)


@pytest.mark.parametrize("tta, axes", [("false", []), ("False", []), (False, []), ("true", [0, 1, 2]), (True, [0, 1, 2])])
def test_bundle_tta_reads_command_line_text(tta, axes):
    """``--tta false`` reaches inference.json as the text "false": test-time augmentation stays off."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(ROOT / "bundles" / "synapse_segmamba" / "configs" / "inference.json"))
    parser["tta"] = tta
    assert list(parser.get_parsed_content("inferer#mirror_axes")) == axes
    parser["tta"] = "sometimes"
    with pytest.raises(Exception) as err:  # MONAI wraps the expression's error: the cause names the setting
        parser.get_parsed_content("inferer#mirror_axes", lazy=False)
    chain, e = [], err.value
    while e is not None:
        chain.append(str(e))
        e = e.__cause__ or e.__context__
    assert any("tta must be true or false, got 'sometimes'" in c for c in chain), chain
