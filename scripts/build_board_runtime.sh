#!/usr/bin/env bash
# Builds TVM's runtime from source plus gmorph-run linked to it, and prints how long it took:
#   bash scripts/build_board_runtime.sh [aarch64|native] [TVM_SOURCE_DIR] [extra cmake args...]
# aarch64 (default): cross-compiled here for a Jetson's CPU, without CUDA (the board's CUDA is not
# here); on the board itself use `native -DGMORPH_TVM_USE_CUDA=ON` to get the CUDA runtime too.
# Too slow for CI on 2 cores (see docs/deployment.md, TVM's runtime from source for the time measured), so a script.
set -euo pipefail
cd "$(dirname "$0")/.."
mode="${1:-aarch64}"; shift || true
src="${1:-$PWD/third_party/tvm}"; shift || true
out="build/board-runtime-$mode"
cmake_bin="$(command -v cmake)"
# tvm-ffi needs CMake >= 3.26: use the one of the pip `cmake` package when the distribution's is older.
if ! "$cmake_bin" -P /dev/stdin <<<'if(CMAKE_VERSION VERSION_LESS 3.26)
  message(FATAL_ERROR old)
endif()' 2>/dev/null; then
  cache="${GMORPH_TVM_CACHE:-$HOME/.cache/gmorph-tvm}"
  [ -x "$cache/cmake-pip/bin/cmake" ] || python3 -m pip install -q --no-deps --target "$cache/cmake-pip" "cmake>=3.26,<4"
  export PYTHONPATH="$cache/cmake-pip${PYTHONPATH:+:$PYTHONPATH}"
  cmake_bin="$cache/cmake-pip/bin/cmake"
fi
args=(-DGMORPH_BUILD_TVM_RUNTIME=ON "-DGMORPH_TVM_SOURCE_DIR=$src" -DCMAKE_BUILD_TYPE=Release)
[ "$mode" = aarch64 ] && args+=("-DCMAKE_TOOLCHAIN_FILE=$PWD/cmake/aarch64-linux-gnu.cmake")
start=$(date +%s)
"$cmake_bin" -S . -B "$out" "${args[@]}" "$@"
configured=$(date +%s)
"$cmake_bin" --build "$out" --target gmorph-run -j"$(nproc)"
done_=$(date +%s)
echo "configure $((configured - start)) s, build $((done_ - configured)) s ($(nproc) cores): $out/gmorph-run, $out/lib"
