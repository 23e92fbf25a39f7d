"""What the benchmarks share: one measurement per subprocess, reported on a ``RESULT {json}`` line.

A benchmark row runs in its own interpreter so that its peak resident memory and its allocator state
are its own; the worker prints ``RESULT `` and a JSON object as its last such line. `run_worker`
runs one and returns that object, or the reason there is none (timeout, exit code and the last line
of stderr) for the row's cell.
"""

from __future__ import annotations

import json
import os
import subprocess
from typing import Dict, List, Optional, Tuple

from networks.host_memory import ENV_KEEP

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def worker_env(keep_freed_memory: bool = True, **extra: str) -> Dict[str, str]:
    """This process's environment for a worker, with `networks.host_memory.keep_freed_memory` on or off."""
    return {**os.environ, ENV_KEEP: "1" if keep_freed_memory else "0", **extra}


def run_worker(cmd: List[str], env: Optional[Dict[str, str]] = None,
               timeout: Optional[float] = None) -> Tuple[Optional[dict], str]:
    """Run ``cmd`` in the repository root; (its last RESULT object, "") or (None, why there is none)."""
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env)
    except subprocess.TimeoutExpired:
        return None, f"timed out after {timeout} s"
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode or not lines:
        err = (proc.stderr.strip().splitlines() or ["?"])[-1]
        return None, f"failed (rc {proc.returncode}): {err}"
    return json.loads(lines[-1][len("RESULT "):]), ""
