#!/usr/bin/env bash
# Install llama-cpp-python (the llama.cpp oracle) into the venv whose python is $1.
# PyPI has only its sdist: build the wheel once (5–7 min on 2 cores), keep it in $APR_CACHE/wheels,
# and install from there on later runs. A fresh machine always takes the build path.
set -euo pipefail
PY=$1
VER=0.3.36   # pinned: src/apr/runtimes/llamacpp.py maps the ggml_tensor layout of this build
WHEELS="${APR_CACHE:-$HOME/.cache/apr}/wheels"

if "$PY" -c "import sys, llama_cpp; sys.exit(llama_cpp.__version__ != '$VER')" 2>/dev/null; then
  exit 0
fi
mkdir -p "$WHEELS"
pyver=$("$PY" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')
marker="$WHEELS/llama_cpp_python-$VER.$pyver.path"
if [ ! -s "$marker" ] || [ ! -f "$(cat "$marker")" ]; then
  echo "building llama-cpp-python $VER from source (5-7 min, once; cached in $WHEELS)"
  tmp=$(mktemp -d)
  start=$(date +%s)
  CMAKE_ARGS="-DGGML_NATIVE=OFF -DLLAVA_BUILD=OFF" CMAKE_BUILD_PARALLEL_LEVEL=2 \
    "$PY" -m pip wheel -q --disable-pip-version-check --no-deps --no-binary llama-cpp-python \
    -w "$tmp" "llama-cpp-python==$VER"
  whl=$(ls "$tmp"/llama_cpp_python-"$VER"-*.whl)
  mkdir -p "$WHEELS/$pyver"
  mv "$whl" "$WHEELS/$pyver/"
  echo "$WHEELS/$pyver/$(basename "$whl")" > "$marker"
  rm -rf "$tmp"
  echo "built in $(( $(date +%s) - start )) s"
fi
"$PY" -m pip install -q --disable-pip-version-check "$(cat "$marker")"
