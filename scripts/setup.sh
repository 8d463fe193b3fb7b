#!/usr/bin/env bash
# Create or reuse the project's virtual environment and install the pinned stack into it.
#
#   bash scripts/setup.sh            # idempotent; a no-op when nothing changed since the last run
#
# Environment:
#   PYTHON      interpreter to build the venv from (default: python3.11, else python3)
#   MOE2_VENV   venv folder (default: .venv in the repository)
#   MOE2_CACHE  cache for the llama-cpp-python wheel and models (default: ~/.cache/moe2)
#   CMAKE_ARGS  llama.cpp build flags; default chosen from this CPU (see below)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${MOE2_VENV:-$ROOT/.venv}"
CACHE="${MOE2_CACHE:-$HOME/.cache/moe2}"
LLAMA_VERSION="$(sed -n 's/^llama-cpp-python\[server\]==//p' "$ROOT/requirements.txt")"

log() { printf '[setup] %s\n' "$*" >&2; }

pick_python() {
  if [ -n "${PYTHON:-}" ]; then echo "$PYTHON"; return; fi
  for p in python3.11 python3; do
    if command -v "$p" >/dev/null && "$p" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
      echo "$p"; return
    fi
  done
  log "Python 3.11 is needed (set PYTHON=/path/to/python3.11)"; exit 1
}

# llama.cpp flags. These CPUs advertise AMX but executing it raises SIGILL, so GGML_NATIVE is off and
# the instruction sets are named: the AVX-512 set where the CPU has it, else a portable AVX2 build.
default_cmake_args() {
  local flags=""
  [ -r /proc/cpuinfo ] && flags="$(grep -m1 '^flags' /proc/cpuinfo)"
  if [[ " $flags " == *" avx512f "* ]]; then
    echo "-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=ON -DGGML_AVX512_VBMI=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON"
  elif [[ " $flags " == *" avx2 "* ]]; then
    echo "-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON"
  else
    echo "-DGGML_NATIVE=OFF"
  fi
}

CMAKE_ARGS="${CMAKE_ARGS:-$(default_cmake_args)}"
LLAMA_KEY="$LLAMA_VERSION-$(printf '%s' "$CMAKE_ARGS" | sha256sum | cut -c1-12)"
WHEELS="$CACHE/wheels/llama-cpp-python-$LLAMA_KEY"

STAMP_TEXT="$(cat "$ROOT/requirements.txt" "$ROOT/requirements-nodeps.txt" "$ROOT/constraints.txt" "$ROOT/pyproject.toml"; echo "$LLAMA_KEY")"
STAMP_HASH="$(printf '%s' "$STAMP_TEXT" | sha256sum | cut -c1-32)"
if [ -x "$VENV/bin/python" ] && [ "$(cat "$VENV/.moe2-stamp" 2>/dev/null)" = "$STAMP_HASH" ]; then
  exit 0
fi

if [ ! -x "$VENV/bin/python" ]; then
  PY="$(pick_python)"
  log "creating $VENV with $PY"
  "$PY" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)

if ! ls "$WHEELS"/llama_cpp_python-*.whl >/dev/null 2>&1; then
  log "building llama-cpp-python $LLAMA_VERSION once (5-12 min) with CMAKE_ARGS=$CMAKE_ARGS"
  mkdir -p "$WHEELS.tmp"
  CMAKE_ARGS="$CMAKE_ARGS" CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc 2>/dev/null || echo 2)}" \
    "${PIP[@]}" wheel --no-deps --no-binary llama-cpp-python -w "$WHEELS.tmp" "llama-cpp-python==$LLAMA_VERSION"
  rm -rf "$WHEELS" && mv "$WHEELS.tmp" "$WHEELS"
else
  log "reusing the llama-cpp-python wheel in $WHEELS"
fi

log "installing the pinned stack into $VENV"
"${PIP[@]}" install --find-links "$WHEELS" -c "$ROOT/constraints.txt" -r "$ROOT/requirements.txt"
"${PIP[@]}" install --no-deps -r "$ROOT/requirements-nodeps.txt"
"${PIP[@]}" install --no-deps --no-build-isolation -e "$ROOT"
echo "$STAMP_HASH" > "$VENV/.moe2-stamp"
log "ready: $VENV"
