#!/usr/bin/env bash
# Install llama-cpp-python (the llama.cpp oracle) into the venv whose python is $1, and unpack llama.cpp's own
# HF → GGUF converter next to it.
# PyPI has only its sdist: download it once to $APR_CACHE/sdist, build the wheel from that file once (5–7 min
# on 2 cores), keep the wheel in $APR_CACHE/wheels and install from there on later runs. A fresh machine always
# takes the download + build path.
# The same sdist carries vendor/llama.cpp/convert_hf_to_gguf.py, its conversion/ package and the gguf-py that
# matches it; they are unpacked to $APR_CACHE/llama.cpp-$VER (tests/fixtures/zoo.py runs the converter there).
set -euo pipefail
PY=$1
VER=0.3.36   # pinned: src/apr/runtimes/llamacpp.py maps the ggml_tensor layout of this build
CACHE="${APR_CACHE:-$HOME/.cache/apr}"
WHEELS="$CACHE/wheels"
SDIST="$CACHE/sdist/llama_cpp_python-$VER.tar.gz"
CONVERTER="$CACHE/llama.cpp-$VER"
# What the converter imports from the source tree (checked against convert_hf_to_gguf.py and conversion/*.py):
# the conversion package, the vendored gguf-py, and the chat templates some model classes read.
CONVERTER_FILES=(convert_hf_to_gguf.py conversion gguf-py models/templates)

fetch_sdist() {
  [ -f "$SDIST" ] && return
  local tmp
  mkdir -p "$(dirname "$SDIST")"
  tmp=$(mktemp -d "$(dirname "$SDIST")/.download.XXXXXX")
  echo "downloading the llama-cpp-python $VER sdist (77 MB, once; cached in $(dirname "$SDIST"))"
  "$PY" -m pip download -q --disable-pip-version-check --no-deps --no-binary :all: \
    "llama-cpp-python==$VER" -d "$tmp"
  mv "$tmp/$(basename "$SDIST")" "$SDIST"
  rm -rf "$tmp"
}

extract_converter() {
  [ -f "$CONVERTER/convert_hf_to_gguf.py" ] && return
  local tmp prefix="llama_cpp_python-$VER/vendor/llama.cpp"
  fetch_sdist
  tmp=$(mktemp -d "$CACHE/.llama.cpp-$VER.XXXXXX")
  tar -xzf "$SDIST" -C "$tmp" --strip-components=3 "${CONVERTER_FILES[@]/#/$prefix/}"
  rm -rf "$CONVERTER"
  mv "$tmp" "$CONVERTER"   # atomic: a half-extracted tree never carries the name
}

build_wheel() {
  local tmp start whl pyver=$1 marker=$2
  fetch_sdist
  echo "building llama-cpp-python $VER from source (5-7 min, once; cached in $WHEELS)"
  tmp=$(mktemp -d)
  start=$(date +%s)
  CMAKE_ARGS="-DGGML_NATIVE=OFF -DLLAVA_BUILD=OFF" CMAKE_BUILD_PARALLEL_LEVEL=2 \
    "$PY" -m pip wheel -q --disable-pip-version-check --no-deps -w "$tmp" "$SDIST"
  whl=$(ls "$tmp"/llama_cpp_python-"$VER"-*.whl)
  mkdir -p "$WHEELS/$pyver"
  mv "$whl" "$WHEELS/$pyver/"
  echo "$WHEELS/$pyver/$(basename "$whl")" > "$marker"
  rm -rf "$tmp"
  echo "built in $(( $(date +%s) - start )) s"
}

extract_converter
if "$PY" -c "import sys, llama_cpp; sys.exit(llama_cpp.__version__ != '$VER')" 2>/dev/null; then
  exit 0
fi
mkdir -p "$WHEELS"
pyver=$("$PY" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')
marker="$WHEELS/llama_cpp_python-$VER.$pyver.path"
if [ ! -s "$marker" ] || [ ! -f "$(cat "$marker")" ]; then
  build_wheel "$pyver" "$marker"
fi
"$PY" -m pip install -q --disable-pip-version-check "$(cat "$marker")"
