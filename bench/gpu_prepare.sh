#!/usr/bin/env bash
# Build here (CPU, TVM installed) everything the GPU check needs, into one folder under 64 MiB:
#   bash bench/gpu_prepare.sh -o gpu-check                 # sm_90 artifacts for an H100/H200
#   bash bench/gpu_prepare.sh -o gpu-check --arch sm_87    # another GPU
#   bash bench/gpu_prepare.sh -o gpu-dry --device cpu      # the same cases for this CPU (dry run)
# Options: see python3 bench/gpu_prepare.py --help.
set -euo pipefail
exec python3 "$(cd "$(dirname "$0")" && pwd)/gpu_prepare.py" "$@"
