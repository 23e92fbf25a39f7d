"""bench/gpu_check.py keeps working: its --tiny mode runs every section on CPU (Triton's interpreter)."""

import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench import gpu_check

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_tiny_run_prints_one_table_and_agrees():
    pytest.importorskip("triton", reason="triton is not installed: `make test` installs it (setup.cfg extra 'test')")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    env.pop("TRITON_INTERPRET", None)  # the script sets it itself in --tiny mode without a GPU
    out = subprocess.run([sys.executable, "-m", "bench.gpu_check", "--tiny", "--variants", "SegMamba"], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    table = out.stdout[out.stdout.index("| section |"):]
    rows = [line.split(" | ") for line in table.splitlines() if line.startswith("| ") and "---" not in line][1:]
    acc = [r for r in rows if r[0] == "| accuracy"]
    # 3 cases (fp32 both directions, bf16) x (output, gradients) x (triton, torch)
    assert len(acc) == 12 and all(r[-1] == "ok |" for r in acc)
    assert {r[1] for r in acc} == {"triton", "torch"}
    speed = [r for r in rows if r[0] == "| speed" and r[1] in ("triton", "torch")]
    assert len(speed) == 4 and all("fwd+bwd" in r[3] for r in speed)
    assert any(r[1] == "triton 4x8" for r in rows)  # the tile sweep
    steps = [r for r in rows if r[0] == "| train step"]
    assert len(steps) == 1 and "SegMamba" in steps[0][2] and "s/step" in steps[0][3]
    assert "all accuracy checks agree: yes" in out.stdout


def test_exit_status_on_disagreement_and_without_gpu(monkeypatch, capsys):
    if torch.cuda.is_available():
        pytest.skip("checks the CPU-only exit paths")
    assert gpu_check.main([]) == 2  # no GPU and no --tiny
    assert "use --tiny" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        gpu_check.main(["--tiny", "--variants", "Bogus"])

    # a backend that disagrees with the float64 reference makes the run exit 1 and says so
    dispatch = importlib.import_module("networks.ops.selective_scan")  # the module, not the function
    right = dispatch.mamba_scan
    monkeypatch.setattr(dispatch, "mamba_scan", lambda *a, **k: right(*a, **k) * 1.05)
    table = gpu_check.Table()
    gpu_check.check_accuracy(table, ["torch"], torch.device("cpu"), (1, 2, 2, 5))
    assert table.failed and {r[-1] for r in table.rows} == {"FAIL"}
