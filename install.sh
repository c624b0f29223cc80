#!/usr/bin/env bash
# Install mtx-dist (editable) into the current Python environment.
#
#   bash install.sh          runtime + DALI
#   bash install.sh test     runtime + DALI + test tools
#
# torch is never replaced: an installed torch is pinned to its own version through a
# constraints file. With no torch and no NVIDIA driver, the CPU build is pinned
# (MTX_TORCH_VERSION, default 2.13.0; set TORCH_INDEX_URL to take it from a PyTorch index).
# An open range would pull several GB of CUDA wheels onto a CPU machine.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
py=${PYTHON:-python3}
extras=dali
case "${1:-}" in
  "") ;;
  test) extras=dali,test ;;
  *) echo "usage: bash install.sh [test]" >&2; exit 2 ;;
esac

"$py" -c 'import sys; assert sys.version_info >= (3, 11), "mtx-dist needs Python >= 3.11"'
constraints=$(mktemp)
trap 'rm -f "$constraints"' EXIT

if torch_version=$("$py" -c 'import torch; print(torch.__version__)' 2>/dev/null); then
  echo "install.sh: keeping installed torch $torch_version"
  echo "torch==$torch_version" >"$constraints"
elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  echo "install.sh: NVIDIA GPU found and no torch installed: pip chooses a CUDA torch"
else
  want=${MTX_TORCH_VERSION:-2.13.0}
  echo "install.sh: no torch and no GPU: installing the CPU build torch==$want"
  "$py" -m pip install ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} "torch==$want"
  "$py" -c 'import torch; print(torch.__version__)' | sed 's/^/torch==/' >"$constraints"
fi

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  extras=$extras,gpu  # NVML for the GPU figures of MLflow's system metrics
fi

# DS_BUILD_OPS=0: DeepSpeed JIT-builds the few ops it needs; the pure-Python wheel builds in seconds.
DS_BUILD_OPS=0 "$py" -m pip install -c "$constraints" -e "$here[$extras]"

# tests/slurm start a real two-node SLURM cluster on this host (munged, slurmctld, two slurmd).
if [ "${1:-}" = test ]; then
  missing=()
  for b in sbatch slurmctld slurmd munged; do
    command -v "$b" >/dev/null 2>&1 || [ -x "/usr/sbin/$b" ] || missing+=("$b")
  done
  if [ "${#missing[@]}" -gt 0 ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
      echo "install.sh: SLURM not found (${missing[*]}): installing slurm-wlm and munge with apt-get for tests/slurm"
      export DEBIAN_FRONTEND=noninteractive
      apt-get update -qq && apt-get install -y -qq --no-install-recommends slurm-wlm munge
    else
      echo "install.sh: SLURM not found (${missing[*]}); tests/slurm need it. As root on Debian/Ubuntu:" \
           "apt-get install -y --no-install-recommends slurm-wlm munge" >&2
    fi
  fi
fi
