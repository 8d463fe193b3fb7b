#!/usr/bin/env bash
# Profile the experts on an NVIDIA GPU (or a Jetson) with NVML / INA3221 energy through Zeus.
#
#   bash benchmarks/gpu_profile.sh [device] [out.json]      # device: rtx4090 (default), jetson-agx-orin-64gb
#
# Builds llama-cpp-python 0.3.36 with CUDA once into its own wheel cache and venv (~/.cache/moe2/gpu-*),
# layered over the project's .venv (everything else comes from there), then runs
# benchmarks/profile_device.py with all layers offloaded. First run: the CUDA build (~3-6 min on 16 cores,
# one GPU architecture); later runs: about a minute. Env: MOE2_GPU_VENV, MOE2_GPU_WHEELS, CUDA_ARCH
# (default "native"; Jetson AGX Orin: 87), PROFILE_ARGS (extra profile_device.py flags).
set -euo pipefail
cd "$(dirname "$0")/.."
DEVICE=${1:-rtx4090}
OUT=${2:-runs/gpu/profiles_${DEVICE}.json}
VENV=${MOE2_GPU_VENV:-$HOME/.cache/moe2/gpu-venv}
WHEELS=${MOE2_GPU_WHEELS:-$HOME/.cache/moe2/gpu-wheels}
BASE=${MOE2_VENV:-.venv}
LLAMA_VERSION=0.3.36

command -v nvidia-smi >/dev/null || [ -e /etc/nv_tegra_release ] || { echo "no NVIDIA GPU here" >&2; exit 2; }
[ -x "$BASE/bin/python" ] || { echo "no project venv at $BASE (run: bash run.sh setup)" >&2; exit 2; }

if [ ! -x "$VENV/bin/python" ]; then
  "$BASE/bin/python" -m venv "$VENV"
  # the project's packages, behind the venv's own (its CUDA llama_cpp shadows the CPU one)
  "$BASE/bin/python" -c "import site; print(site.getsitepackages()[0])" \
    > "$("$VENV/bin/python" -c 'import site; print(site.getsitepackages()[0])')/moe2_base.pth"
fi
if ! "$VENV/bin/python" -c "import llama_cpp, sys; sys.exit(not llama_cpp.llama_supports_gpu_offload())" 2>/dev/null; then
  if ! ls "$WHEELS"/llama_cpp_python-"$LLAMA_VERSION"-*.whl >/dev/null 2>&1; then
    mkdir -p "$WHEELS"
    CMAKE_ARGS="-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=${CUDA_ARCH:-native}" \
    CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) \
      "$VENV/bin/pip" wheel --no-deps -w "$WHEELS" "llama-cpp-python==$LLAMA_VERSION"
  fi
  "$VENV/bin/pip" install --no-deps --force-reinstall --no-index --find-links "$WHEELS" \
    "llama-cpp-python==$LLAMA_VERSION"
fi
"$VENV/bin/python" -c "import zeus" 2>/dev/null || "$VENV/bin/pip" install "zeus==0.16.0" -c constraints.txt

mkdir -p "$(dirname "$OUT")"
# shellcheck disable=SC2086
"$VENV/bin/python" benchmarks/profile_device.py --device "$DEVICE" --n-gpu-layers -1 --meter auto \
  --n-threads 4 --out "$OUT" ${PROFILE_ARGS:-}
