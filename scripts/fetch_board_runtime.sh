#!/usr/bin/env bash
# Fetches what the board's side needs into the cache (default ~/.cache/gmorph-tvm, or
# $GMORPH_TVM_CACHE), once; later runs reuse it:
#   aarch64-runtime/   libtvm_runtime.so + libtvm_ffi.so of the aarch64 apache-tvm wheels (the
#                      runtime gmorph-run links on a Jetson; the test runs it under qemu-aarch64)
#   nvcc-cu12/         the ptxas of CUDA 12.2 (JetPack 6 SASS); it cannot sit beside the CUDA 11.8
#                      one of the `jetson` extra: both wheels install into nvidia/cuda_nvcc
# Downloads: apache-tvm aarch64 wheel ~95 MB (only 2 libraries, 5 MB, are kept), apache-tvm-ffi
# aarch64 3 MB, nvidia-cuda-nvcc-cu12 ~22 MB.
#   bash scripts/fetch_board_runtime.sh
set -euo pipefail
cache="${GMORPH_TVM_CACHE:-$HOME/.cache/gmorph-tvm}"
tvm_version="$(python3 -c 'from importlib.metadata import version; print(version("apache-tvm"))')"
ffi_version="$(python3 -c 'from importlib.metadata import version; print(version("apache-tvm-ffi"))')"
py="$(python3 -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')"
runtime="$cache/aarch64-runtime"
mkdir -p "$cache"

if [ ! -f "$runtime/VERSION" ] || [ "$(cat "$runtime/VERSION")" != "$tvm_version $ffi_version" ]; then
  wheels="$(mktemp -d "$cache/.wheels.XXXXXX")"
  trap 'rm -rf "$wheels"' EXIT
  python3 -m pip download -q --no-deps --only-binary=:all: --platform manylinux_2_28_aarch64 \
    --python-version "$py" "apache-tvm==$tvm_version" "apache-tvm-ffi==$ffi_version" -d "$wheels"
  python3 - "$wheels" "$runtime.tmp" <<'PY'
import pathlib, sys, zipfile
wheels, out = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
out.mkdir(parents=True, exist_ok=True)
wanted = {"tvm/lib/libtvm_runtime.so", "tvm_ffi/lib/libtvm_ffi.so"}
for wheel in wheels.glob("*.whl"):
    with zipfile.ZipFile(wheel) as archive:
        for name in wanted & set(archive.namelist()):
            (out / pathlib.Path(name).name).write_bytes(archive.read(name))
            wanted.discard(name)
if wanted:
    sys.exit(f"aarch64 wheels lack {sorted(wanted)}")
PY
  echo "$tvm_version $ffi_version" > "$runtime.tmp/VERSION"
  rm -rf "$runtime" && mv "$runtime.tmp" "$runtime"
fi

if [ ! -x "$cache/nvcc-cu12/nvidia/cuda_nvcc/bin/ptxas" ]; then
  python3 -m pip install -q --no-deps --target "$cache/nvcc-cu12" "nvidia-cuda-nvcc-cu12==12.2.140"
fi
echo "board runtime and toolchains in $cache"
