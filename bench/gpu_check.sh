#!/usr/bin/env bash
# Run the GPU check on the GPU machine (PyTorch + numpy there; no TVM needed):
#   bash bench/gpu_check.sh DIR [--out results.md]     # DIR: what gpu_prepare.sh wrote
#   bash bench/gpu_check.sh DIR --device cpu           # the dry run, here
# Also inside DIR (DIR/gpu_check.sh DIR). Options: python3 DIR/gpu_check.py --help.
set -euo pipefail
if [ $# -lt 1 ]; then
  echo "usage: gpu_check.sh DIR [--device cuda|cpu] [--out FILE] [--repeat N] [--no-compile]" >&2
  exit 2
fi
dir=$1
shift
if [ ! -f "$dir/cases.json" ]; then
  echo "gpu_check.sh: $dir/cases.json not found: run bench/gpu_prepare.sh -o $dir first" >&2
  exit 2
fi
exec python3 "$dir/gpu_check.py" "$dir" "$@"
