#!/usr/bin/env bash
# The GPU checks on a CUDA machine that has no package index (a lent device): builds
# llama-cpp-python with CUDA from its source archive, installs it and the given wheels into a
# private folder beside the machine's own torch and transformers, then runs scripts/bench_gpu.py,
# the GPU tests and the server tests (a CUDA build offloads every layer by default, so those run
# the batched server on the GPU). On a machine with a package index, `make venv CUDA=1` and
# `make test` do the same.
#
#   scripts/gpu_checks.sh LLAMA_CPP_PYTHON_SDIST.tar.gz WHEEL_DIR OUT_DIR [bench_gpu.py options]
#
# scripts/gpu_bundle.sh makes the archive and the wheels on a machine with an index. Optional
# environment: SMOKE_GGUF (a small GGUF for the load probes), EXTRA_CMAKE, LLAMA_WHEEL (a wheel an
# earlier run built: no build), BUILD_LIMIT, BENCH_LIMIT, OPTIMIZE_LIMIT, TEST_LIMIT, SERVE_LIMIT (seconds).
#
# Each step has its own time limit and writes its log under OUT_DIR, so a step cut short leaves
# what the earlier ones measured.
set -uo pipefail
src=$1 wheels=$2 out=$3
shift 3
root=$(cd "$(dirname "$0")/.." && pwd)
site=/tmp/neoxq-site
tree=/tmp/neoxq-tree
mkdir -p "$out" "$site"
export PYTHONUNBUFFERED=1 PYTHONFAULTHANDLER=1 LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}

step() {  # step NAME SECONDS CMD...: run, log to OUT/NAME.log, report the time and status
    local name=$1 limit=$2 t0=$SECONDS rc
    shift 2
    timeout "$limit" "$@" >"$out/$name.log" 2>&1
    rc=$?
    echo "$name: rc $rc in $((SECONDS - t0)) s"
    return $rc
}

nvidia-smi --query-gpu=name,compute_cap,driver_version,memory.total --format=csv,noheader
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" "$wheels"/*.whl || exit 1
export PYTHONPATH=$tree:$site

# llama-cpp-python with CUDA for this GPU's architecture alone (the build's time grows with each)
arch=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -1 | tr -d .)
rm -rf /tmp/llama-src /tmp/llama-wheel && mkdir -p /tmp/llama-src && tar xzf "$src" -C /tmp/llama-src || exit 1
build() {
    cd /tmp/llama-src/* &&
        CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) CMAKE_ARGS="-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=$arch -DLLAVA_BUILD=OFF ${EXTRA_CMAKE:-}" \
            python3 -m pip wheel -v --no-build-isolation --no-deps -w /tmp/llama-wheel .
}
if [ -n "${LLAMA_WHEEL:-}" ]; then  # a wheel built by an earlier run of this script
    mkdir -p /tmp/llama-wheel && cp "$LLAMA_WHEEL" /tmp/llama-wheel/
else
    export -f build && export arch && step build "${BUILD_LIMIT:-420}" bash -c build || exit 1
fi
python3 -m pip install -q --no-index --no-deps --no-compile --target "$site" /tmp/llama-wheel/*.whl || exit 1
cp /tmp/llama-wheel/*.whl "$out"/ 2>/dev/null

# neoxq as installed: convert/ and runtime/ become neoxq.convert and neoxq.runtime
rm -rf "$tree" && mkdir -p "$tree" && cp -r "$root"/. "$tree"/ && rm -rf "$tree"/.venv "$tree"/.git
cp -r "$tree"/convert "$tree"/neoxq/convert && cp -r "$tree"/runtime "$tree"/neoxq/runtime
cd "$tree" || exit 1
python3 -c "from neoxq.runtime.model import gpu_offload_supported as g; import llama_cpp; print('llama-cpp-python', llama_cpp.__version__, 'offload', g())"

probe() {  # probe TORCH_FIRST GGUF: load with every layer offloaded and run three tokens, in a fresh process
    python3 - "$1" "$2" <<'EOF'
import sys
if sys.argv[1] == "1":
    import torch
    torch.zeros(1, device="cuda")
from neoxq.runtime.model import NeoxModel, RuntimeOptions
with NeoxModel(sys.argv[2], RuntimeOptions(n_ctx=128, n_gpu_layers=-1)) as m:
    print("torch first" if sys.argv[1] == "1" else "no torch", "loaded, logits", m.eval_logits([1, 2, 3]).shape)
EOF
}
if [ -n "${SMOKE_GGUF:-}" ]; then
    probe 0 "$SMOKE_GGUF" || { echo "a plain offloaded load fails"; exit 1; }
    if ! probe 1 "$SMOKE_GGUF"; then  # torch's own CUDA libraries loaded first: share the toolkit's
        export LD_PRELOAD="/usr/local/cuda/lib64/libcudart.so.13 /usr/local/cuda/lib64/libcublas.so.13 /usr/local/cuda/lib64/libcublasLt.so.13"
        probe 1 "$SMOKE_GGUF" || { echo "torch and llama.cpp's CUDA do not share a process"; unset LD_PRELOAD; }
    fi
fi

step bench "${BENCH_LIMIT:-200}" python3 scripts/bench_gpu.py --json "$out/bench_gpu.json" "$@"
step bench-optimize "${OPTIMIZE_LIMIT:-240}" python3 scripts/bench_gpu.py --optimize --windows 4 --json "$out/bench_gpu_optimize.json"
step gpu-tests "${TEST_LIMIT:-150}" python3 -m pytest quant_tests -m gpu -p no:cacheprovider -x -q
step serve-tests "${SERVE_LIMIT:-200}" python3 -m pytest quant_tests/test_serve.py -p no:cacheprovider -q
for f in "$out"/*.log; do echo "== $f"; tail -n 3 "$f"; done
