#!/usr/bin/env bash
# One-shot GPU check, one run of at most 8 minutes on one H100/H200-class GPU without internet.
# Needs: an NVIDIA GPU and a CUDA build of torch (its wheels ship Triton). Optional: MONAI (for the
# training-step rows; its wheel in $WHEELS is installed into a temporary folder when it is missing) and
# mamba-ssm: when the sdists causal_conv1d-*.tar.gz and mamba_ssm-*.tar.gz are carried in $WHEELS and
# nvcc is present, they are built for THIS GPU's architecture only (their setup.py files pass their own
# `-gencode` list, 9 archs, to nvcc; the unpacked setup.py is patched to the GPU's one arch: a few
# minutes instead of ~1 hour), within BUILD_BUDGET_S, and the `cuda` backend joins the comparison.
# Then bench/gpu_check.py prints one table: the triton and torch scan backends (and cuda) against a
# float64 reference, their speed at the Synapse stage-0/1 shapes, and a bf16 training step per variant.
# Exit status: 0 agrees; 1 disagrees (or the triton backend cannot run); 2 no GPU / CUDA torch.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
WHEELS=${WHEELS:-.whl}
TOTAL_S=${TOTAL_S:-470}                 # the whole run, leaving a margin in 8 minutes
BUILD_BUDGET_S=${BUILD_BUDGET_S:-240}   # both mamba-ssm builds together, when their sdists are carried
START=$SECONDS
command -v nvidia-smi >/dev/null || { echo "gpu_check: nvidia-smi not found: no NVIDIA driver here"; exit 2; }
nvidia-smi --query-gpu=name,compute_cap,memory.total,driver_version --format=csv,noheader
$PY -c "import torch,sys; sys.exit(0 if torch.cuda.is_available() else 'gpu_check: torch has no CUDA device (install a CUDA build of torch)')" || exit 2
$PY -c "import torch, triton; print('torch', torch.__version__, 'CUDA', torch.version.cuda, '| triton', triton.__version__)" \
  || echo "gpu_check: triton is not importable: the triton rows will fail"
# the GPU's architecture as torch sees it (e.g. 90 for an H100/H200)
SM=${GPU_CHECK_SM:-$($PY -c "import torch; print('%d%d' % torch.cuda.get_device_capability(0))")}
export GPU_CHECK_SM=$SM MAX_JOBS=${MAX_JOBS:-$(nproc)}
WORK=$(mktemp -d /tmp/gpu_check.XXXXXX)

if ! $PY -c "import monai" 2>/dev/null && ls "$WHEELS"/*.whl >/dev/null 2>&1; then
  echo "installing the wheels in $WHEELS into $WORK/site"
  $PY -m pip install -q --no-index --no-deps --no-compile --target "$WORK/site" "$WHEELS"/*.whl || true
  export PYTHONPATH="$WORK/site${PYTHONPATH:+:$PYTHONPATH}"
fi
$PY -c "import monai" 2>/dev/null || echo "gpu_check: MONAI is not importable: the training-step rows are skipped"

# build_one <sdist name> <pip spec> <import test>: unpack, restrict the archs in setup.py, pip install
build_one() {
  local name=$1 spec=$2 test=$3 src dir left
  if $PY -c "$test" 2>/dev/null; then echo "$name: already importable"; return 0; fi
  src=$(ls "$WHEELS"/$name-*.tar.gz 2>/dev/null | head -1 || true)
  [ -n "$src" ] || { echo "$name: no source distribution in $WHEELS"; return 3; }
  # (errexit does not apply inside a function called with ||: every step checks its own status)
  tar -xzf "$src" -C "$WORK" || { echo "gpu_check: cannot unpack $src"; return 3; }
  dir=$(ls -d "$WORK"/$name-*/ 2>/dev/null | head -1)
  [ -n "$dir" ] && [ -f "$dir/setup.py" ] || { echo "gpu_check: $src holds no $name-*/setup.py"; return 3; }
  $PY - "$dir/setup.py" <<'EOF'
import re, sys
path = sys.argv[1]
src = open(path).read()
helper = '''
def _gpu_check_one_arch(flags):  # added by bench/gpu_check.sh: build for this GPU's arch only
    import os
    sm = os.environ["GPU_CHECK_SM"]
    out, skip = [], False
    for f in flags:
        if skip or f == "-gencode":
            skip = not skip
            continue
        out.append(f)
    return out + ["-gencode", "arch=compute_%s,code=sm_%s" % (sm, sm)]

'''
new, n = re.subn(r"\+\s*cc_flag\b", "+ _gpu_check_one_arch(cc_flag)", src)
if n == 0:
    sys.exit("gpu_check: %s does not add its arch flags as `+ cc_flag`: cannot restrict the build to one arch" % path)
future = list(re.finditer(r"^from __future__ import .*\n", new, flags=re.M))
at = future[-1].end() if future else 0  # the helper goes after any __future__ import
open(path, "w").write(new[:at] + helper + new[at:])
print("%s: arch flags restricted to sm_%s (%d place(s))" % (path, __import__("os").environ["GPU_CHECK_SM"], n))
EOF
  [ $? -eq 0 ] || return 3
  left=$((BUILD_BUDGET_S - (SECONDS - START)))
  [ "$left" -gt 30 ] || { echo "gpu_check: no build time left for $name"; return 3; }
  echo "$name: building for sm_$SM with MAX_JOBS=$MAX_JOBS (at most ${left}s)"
  local t0=$SECONDS
  if ! (cd "$dir" && MAMBA_FORCE_BUILD=TRUE CAUSAL_CONV1D_FORCE_BUILD=TRUE \
        timeout "$left" $PY -m pip install --no-build-isolation --no-deps --no-index . >"$WORK/$name.log" 2>&1); then
    tail -40 "$WORK/$name.log"
    echo "gpu_check: could not build $name for sm_$SM within ${left}s (log: $WORK/$name.log)"
    return 3
  fi
  echo "$name: built in $((SECONDS - t0))s"
  $PY -c "$test" || { echo "gpu_check: $name installed but not importable"; return 3; }
}

if ls "$WHEELS"/mamba_ssm-*.tar.gz "$WHEELS"/causal_conv1d-*.tar.gz >/dev/null 2>&1 && command -v nvcc >/dev/null; then
  if build_one causal_conv1d causal-conv1d "import causal_conv1d_cuda, causal_conv1d" \
     && build_one mamba_ssm mamba-ssm "import selective_scan_cuda, mamba_ssm"; then
    echo "mamba-ssm builds done after $((SECONDS - START))s"
  else
    echo "gpu_check: mamba-ssm not built: the comparison runs without the cuda backend"
  fi
else
  echo "mamba-ssm: sdists not carried in $WHEELS (or no nvcc): the cuda backend is not compared"
fi
export GPU_CHECK_BUDGET_S=$((TOTAL_S - (SECONDS - START)))
PYTHONUNBUFFERED=1 $PY -m bench.gpu_check "$@"
