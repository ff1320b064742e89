#!/usr/bin/env bash
# Create (or reuse) .venv and install igs2gs into it with its test extras. Used by test.sh and demo.sh.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -x .venv/bin/python ]; then
    "${PYTHON:-python3}" -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
# torch first, pinned: on this project's machines these two are served from local disk, while an
# unpinned torch (asked for by nerfstudio) would download gigabytes.
if ! python -c "import torch, torchvision" 2>/dev/null; then
    # A full .venv is ~8.5 GB (torch's CUDA libraries 5.5 GB): say so before pip fails halfway with ENOSPC.
    free_gb=$(df -Pk .venv | awk 'NR == 2 { print int($4 / 1048576) }')
    if [ "${free_gb:-0}" -lt 9 ]; then
        echo "install.sh: warning: ${free_gb} GB free under $(pwd)/.venv; the environment needs about 9 GB." >&2
    fi
    python -m pip install -q torch==2.14.1 torchvision==0.29.1
fi
python -m pip install -q -e ".[test]"

# nerfstudio reads sparse_pc.ply with open3d, whose wheel needs the system's libusb.
if ! python -c "import open3d" 2>/dev/null; then
    if command -v apt-get >/dev/null; then
        SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
        $SUDO apt-get install -y -q libusb-1.0-0 >/dev/null 2>&1 || { $SUDO apt-get update -q >/dev/null && $SUDO apt-get install -y -q libusb-1.0-0 >/dev/null; }
    fi
    python -c "import open3d" || { echo "open3d does not import: install the libusb-1.0-0 system package" >&2; exit 1; }
fi
