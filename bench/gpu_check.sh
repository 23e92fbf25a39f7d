#!/usr/bin/env bash
# One-shot GPU check (budget: 8 minutes wall time on one H100/H200-class GPU with 16 cores):
#  1. makes mamba-ssm and causal-conv1d importable: builds them from their source distributions in
#     $WHEELS (default .whl/, for machines without internet; else pip fetches them) for THIS GPU's
#     architecture only. TORCH_CUDA_ARCH_LIST cannot do that: both setup.py files pass their own
#     `-gencode` list (sm_75 ... sm_121 with CUDA 13) to nvcc, and torch's cpp_extension then adds no
#     arch flags of its own. So the unpacked setup.py is patched to replace that list by the GPU's one
#     arch (9 archs -> 1: the difference between ~1 hour and a few minutes for mamba-ssm's kernels);
#  2. runs bench/gpu_check.py: CUDA path vs the project's scan (forward + gradients), then the
#     training-step time and peak memory of every variant at the Synapse patch, batch 2, bf16.
# Needs: an NVIDIA GPU, nvcc of the same major CUDA version as torch, a CUDA build of torch, ninja,
# einops, transformers and triton (mamba-ssm imports them). Python packages the repository needs that
# are missing (monai, ...) are installed from the wheels in $WHEELS when there are any.
# Exit status: 0 agrees; 1 disagrees; 2 no GPU / CUDA torch; 3 build failed or over its time budget.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
WHEELS=${WHEELS:-.whl}
BUILD_BUDGET_S=${BUILD_BUDGET_S:-390}  # both builds together, leaving the rest of 8 minutes to the measurements
START=$SECONDS
command -v nvidia-smi >/dev/null || { echo "gpu_check: nvidia-smi not found: no NVIDIA driver here"; exit 2; }
nvidia-smi --query-gpu=name,compute_cap,memory.total,driver_version --format=csv,noheader
$PY -c "import torch,sys; sys.exit(0 if torch.cuda.is_available() else 'gpu_check: torch has no CUDA device (install a CUDA build of torch)')" || exit 2
# the GPU's architecture as torch sees it (e.g. 90 for an H100/H200)
SM=${GPU_CHECK_SM:-$($PY -c "import torch; print('%d%d' % torch.cuda.get_device_capability(0))")}
export GPU_CHECK_SM=$SM MAX_JOBS=${MAX_JOBS:-$(nproc)}
WORK=$(mktemp -d /tmp/gpu_check.XXXXXX)

if ! $PY -c "import monai" 2>/dev/null; then
  if ls "$WHEELS"/*.whl >/dev/null 2>&1; then
    echo "installing the wheels in $WHEELS into $WORK/site"
    $PY -m pip install -q --no-index --no-deps --no-compile --target "$WORK/site" "$WHEELS"/*.whl
    export PYTHONPATH="$WORK/site${PYTHONPATH:+:$PYTHONPATH}"
  fi
  $PY -c "import monai" || { echo "gpu_check: monai is not importable: put its wheel in $WHEELS or install it"; exit 2; }
fi

# build_one <sdist name> <pip spec> <import test>: unpack, restrict the archs in setup.py, pip install
build_one() {
  local name=$1 spec=$2 test=$3 src dir left
  if $PY -c "$test" 2>/dev/null; then echo "$name: already importable"; return 0; fi
  src=$(ls "$WHEELS"/$name-*.tar.gz 2>/dev/null | head -1 || true)
  if [ -z "$src" ]; then
    echo "$name: no source distribution in $WHEELS; fetching $spec"
    MAMBA_SKIP_CUDA_BUILD=TRUE CAUSAL_CONV1D_SKIP_CUDA_BUILD=TRUE \
      $PY -m pip download -q --no-deps --no-binary :all: --no-build-isolation -d "$WORK" "$spec" >/dev/null 2>&1 \
      || { echo "gpu_check: $name: no sdist in $WHEELS and pip could not fetch $spec"; return 3; }
    src=$(ls "$WORK"/$name-*.tar.gz | head -1)
  fi
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

build_one causal_conv1d causal-conv1d==1.7.0 "import causal_conv1d_cuda, causal_conv1d" || exit 3
build_one mamba_ssm mamba-ssm==2.3.2.post1 "import selective_scan_cuda, mamba_ssm" || exit 3
echo "builds done after $((SECONDS - START))s"
PYTHONUNBUFFERED=1 $PY -m bench.gpu_check "$@"
