#!/usr/bin/env bash
# Installs gmorph-tvm and what it needs on a fresh Debian machine.
#   bash scripts/setup.sh          the package (+ benchmark and Jetson extras)
#   bash scripts/setup.sh --test   the package + test extras
# Distro packages: Fashion-MNIST (real data), the aarch64 cross compiler (Jetson artifacts),
# qemu-user-static (runs the board's aarch64 runner here), cmake (the native runner); the ptxas of
# CUDA 11.8 from pip for Jetson Nano/Xavier cubins; scripts/fetch_board_runtime.sh caches the
# aarch64 TVM runtime and the ptxas of CUDA 12.2 (JetPack 6). Python: torch 2.13.0 CPU first, so no CUDA wheels are pulled in.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="bench,jetson"
[ "${1:-}" = "--test" ] && extras="test,bench,jetson"

need=()
[ -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] || need+=(dataset-fashion-mnist)
command -v aarch64-linux-gnu-g++ >/dev/null || need+=(g++-aarch64-linux-gnu)
command -v qemu-aarch64-static >/dev/null || need+=(qemu-user-static)
command -v cmake >/dev/null || need+=(cmake)
command -v g++ >/dev/null || need+=(g++)
if [ ${#need[@]} -gt 0 ]; then
  sudo_cmd=""; [ "$(id -u)" -ne 0 ] && sudo_cmd="sudo"
  $sudo_cmd apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq --no-install-recommends "${need[@]}"
fi

python3 -m pip install -q "torch==2.13.0"
python3 -m pip install -q -e ".[${extras}]"
# Real-model zoo: only the .onnx files of these packages are read (PaddleOCR, Silero VAD); their own
# dependencies (OpenCV, Shapely, torchaudio, ...) are not needed, so they go in without them.
python3 -m pip install -q --no-deps "rapidocr-onnxruntime==1.4.4" "silero-vad==6.2.3"
# apache-tvm accepts any apache-tvm-ffi>=0.1.14; only 0.1.14.post1 serialises IR without crashing.
python3 - <<'PY'
import tvm_ffi, sys
if tvm_ffi.__version__ != "0.1.14.post1":
    sys.exit(f"apache-tvm-ffi {tvm_ffi.__version__} installed; gmorph-tvm needs 0.1.14.post1")
PY
# Not fatal: without it the board-side tests (qemu, JetPack 6 SASS) skip and say what is missing.
bash scripts/fetch_board_runtime.sh || echo "setup: could not fetch the board runtime/toolchains (see above)" >&2
