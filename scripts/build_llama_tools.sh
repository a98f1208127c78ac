#!/usr/bin/env bash
# Build llama.cpp's own tools (llama-perplexity, llama-quantize, llama-server) from the llama.cpp vendored in the
# pinned llama-cpp-python sdist, and a venv for its convert_hf_to_gguf.py (it needs transformers < 5),
# into a cache folder. For benchmarks only: the tests never need them, nothing here is committed.
#
#   scripts/build_llama_tools.sh            # prints the cache folder when done (reused afterwards)
set -euo pipefail
VER=0.3.36
CACHE=${NEOXQ_BENCH_CACHE:-$HOME/.cache/neoxq/bench}
PY=$(command -v "${PYTHON:-python3}" || echo "${PYTHON:-python3}")
PY=$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")
SRC=$CACHE/llama_cpp_python-$VER
mkdir -p "$CACHE"
cd "$CACHE"
if [ ! -d "$SRC" ]; then
  echo "downloading the llama-cpp-python $VER sdist ..." >&2
  "$PY" -m pip download -q --no-binary :all: --no-deps "llama-cpp-python==$VER" -d "$CACHE"
  tar xzf "llama_cpp_python-$VER.tar.gz"
fi
TOOLS="llama-perplexity llama-quantize llama-server"
missing=0
for t in $TOOLS; do [ -x "$CACHE/bin/$t" ] || missing=1; done
if [ "$missing" = 1 ]; then
  echo "building $TOOLS (several minutes) ..." >&2
  cmake -S "$SRC/vendor/llama.cpp" -B "$CACHE/build" -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_EXAMPLES=OFF -DBUILD_SHARED_LIBS=OFF \
    >"$CACHE/build.log" 2>&1 || { tail -20 "$CACHE/build.log" >&2; exit 1; }
  cmake --build "$CACHE/build" --target $TOOLS -j"$(nproc)" \
    >>"$CACHE/build.log" 2>&1 || { tail -20 "$CACHE/build.log" >&2; exit 1; }
  mkdir -p "$CACHE/bin"
  for t in $TOOLS; do cp "$CACHE/build/bin/$t" "$CACHE/bin/"; done
fi
if [ ! -x "$CACHE/convert-venv/bin/python" ]; then
  echo "making the venv for convert_hf_to_gguf.py (transformers < 5) ..." >&2
  "$PY" -m venv "$CACHE/convert-venv"
  "$CACHE/convert-venv/bin/pip" install -q torch==2.13.0
  "$CACHE/convert-venv/bin/pip" install -q "transformers<5" numpy safetensors sentencepiece protobuf "$SRC/vendor/llama.cpp/gguf-py"
fi
echo "$CACHE"
