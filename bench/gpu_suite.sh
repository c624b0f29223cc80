#!/usr/bin/env bash
# One-shot GPU benchmark suite (see bench/gpu_suite.py): bash bench/gpu_suite.sh [--smoke] [--out FILE]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHONPATH=. exec python3 bench/gpu_suite.py "$@"
