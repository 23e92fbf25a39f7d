"""`python -m bench.bench_volume --tiny` end to end: the Synapse bundles' inference.json on the real CT and a small
synthetic CT, one subprocess per row, the table printed and written (bench/bench_volume.py)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_tiny_bench_volume_prints_and_writes_the_table(tmp_path):
    out = tmp_path / "table"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "bench.bench_volume", "--tiny", "--volumes=real,synthetic",
           "--networks=dynunet,segmamba,residualunet", "--precision=float32", "--threads=2",
           f"--output={out}", f"--cache_dir={tmp_path / 'cache'}", f"--work_dir={tmp_path / 'work'}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("machine: ") and "2 torch threads per row" in lines[0]
    table = [ln for ln in lines if ln.startswith("| ") and not ln.startswith("| volume")]
    # ResidualUNet first in each volume: the reference of the ratios
    assert [(r.split("|")[1].split()[0], r.split("|")[3].strip()) for r in table] == [
        (v, n) for v in ("real", "synthetic") for n in ("residualunet", "dynunet", "segmamba")]

    doc = json.loads((out.with_suffix(".json")).read_text())
    assert doc["machine"]["threads"] == 2 and doc["tiny"] is True
    rows = doc["rows"]
    assert len(rows) == 6
    for r in rows:
        assert "error" not in r, r
        assert r["windows"] > 0 and r["threads"] == 2
        assert all(r[k] > 0 for k in ("pre_s", "net_s", "sw_s", "post_s", "total_s", "peak_rss_gib"))
        assert r["net_s"] <= r["sw_s"] <= r["total_s"]
        assert r["pre_s"] + r["sw_s"] + r["post_s"] <= r["total_s"] * 1.01
        # one time per network call, each a batch of at most sw_batch_size windows, summing to the network time
        assert len(r["net_calls_s"]) >= r["windows"] / 2 and min(r["net_calls_s"]) > 0
        assert sum(r["net_calls_s"]) == pytest.approx(r["net_s"])
    real = [r for r in rows if r["volume"] == "real"]
    # the same resampled grid and windows for every network on one volume
    assert len({r["windows"] for r in real}) == 1 and len({tuple(r["grid"]) for r in real}) == 1
    assert real[0]["shape"] == "122x101x30"
    base = next(r for r in real if r["network"] == "residualunet")
    assert base["total_ratio"] == 1.0
    dyn = next(r for r in real if r["network"] == "dynunet")
    assert dyn["total_ratio"] == pytest.approx(dyn["total_s"] / base["total_s"])
    md = out.with_suffix(".md").read_text()
    assert md.startswith("| volume") and md.count("| real (122x101x30) |") == 3

    synthetic = next((tmp_path / "cache").glob("synthetic_ct_*.nii.gz"))
    img = nib.load(str(synthetic))
    assert img.shape == (160, 160, 32) and np.allclose(img.header.get_zooms(), (0.78, 0.78, 2.5))
    data = np.asarray(img.dataobj)
    assert data.min() == -1024 and (data == 0).mean() < 0.01  # like a real CT: almost nothing is exactly 0



def test_a_precision_the_bundle_lacks_is_skipped_with_the_reason(tmp_path, monkeypatch, capsys):
    """A bundle whose inference.json has no `precision` key runs float32 only; bf16 rows are skipped saying why."""
    import bench.bench_volume as bv

    real = bv._bundle_config
    monkeypatch.setattr(bv, "_bundle_config", lambda b: {k: v for k, v in real(b).items() if k != "precision"})
    bv.main(tiny=True, volumes="real", networks="segmamba,dynunet", precision="bf16", output=str(tmp_path / "table.md"),
            work_dir=str(tmp_path / "work"))
    out = capsys.readouterr().out
    assert "precision bf16 not supported by this bundle (synapse_segmamba" in out
    assert "segmamba bf16 skipped" in out and "dynunet bf16 skipped" in out and "no row ran" in out
    doc = json.loads((tmp_path / "table.json").read_text())
    assert doc["rows"] == [] and len(doc["skipped"]) == 2


def test_unknown_network_or_volume_is_refused_naming_the_choices():
    from bench.bench_volume import main

    with pytest.raises(SystemExit, match=r"unknown or no network \['unet'\]; choose from segmamba, .*dynunet"):
        main(volumes="real", networks="segmamba,unet")
    with pytest.raises(SystemExit, match=r"unknown or no volume \['brain'\]"):
        main(volumes="brain")
