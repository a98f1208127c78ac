#!/usr/bin/env bash
# Prepares what scripts/gpu_checks.sh needs on a GPU machine without a package index, from a
# machine with one: llama-cpp-python's source archive without the vendored llama.cpp's models, docs,
# tests and web UI (8 MB instead of 77), and wheels for Python 3.12 of the packages neoxq and its
# server tests need beyond what such a machine has (torch, transformers, numpy, scipy, rich, httpx).
#
#   scripts/gpu_bundle.sh [DIR]      # default .gpu (llama-src.tar.gz, wheels/)
#
# Then, on the GPU machine, from the repository root:
#   scripts/gpu_checks.sh DIR/llama-src.tar.gz DIR/wheels OUT_DIR
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
dir=${1:-$root/.gpu}
py=$root/.venv/bin/python
version=$("$py" -c "import importlib.metadata as m; print(m.version('llama-cpp-python'))")
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
mkdir -p "$dir/wheels"

"$py" -m pip download -q --no-deps --no-binary :all: "llama-cpp-python==$version" -d "$tmp"
tar xzf "$tmp"/llama_cpp_python-*.tar.gz -C "$tmp"
src=$(find "$tmp" -maxdepth 1 -type d -name 'llama_cpp_python-*')
(cd "$src" && rm -rf .git examples vendor/llama.cpp/{models,docs,benches,tests,examples,pocs,media,gguf-py} \
    vendor/llama.cpp/tools/{ui,server/public*,server/webui} vendor/llama.cpp/tools/mtmd/test-*)
tar czf "$dir/llama-src.tar.gz" -C "$tmp" "$(basename "$src")"

# the versions of this venv, for CPython 3.12 on x86-64 Linux
pin() {  # NAME==VERSION where this venv has the package, else NAME (the newest)
    "$py" - "$@" <<'EOF'
import importlib.metadata as m, sys
def pinned(n):
    try:
        return f"{n}=={m.version(n)}"
    except m.PackageNotFoundError:
        return n
print(*map(pinned, sys.argv[1:]))
EOF
}
names=(gguf pydantic pydantic_core annotated-types typing-inspection typer click shellingham annotated-doc
    fastapi starlette uvicorn h11 anyio sniffio typing_extensions diskcache openai distro jiter httpx2 httpcore2
    truststore idna opentelemetry-api)
platforms=(--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
# shellcheck disable=SC2046
"$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${platforms[@]}" \
    -d "$dir/wheels" $(pin "${names[@]}")
du -sh "$dir/llama-src.tar.gz" "$dir/wheels"
