#!/usr/bin/env bash
# The first-GPU check on a machine with one NVIDIA GPU and no network (see scripts/gpu_check.py):
#   bash scripts/gpu_check.sh [PACK] [OUT.json]     PACK: made by `make gpu-pack` (.gpu-pack)
# Installs the pack's wheels (if any) into a private folder, then runs the check with the
# machine's own python3 (a CUDA PyTorch) or $PYTHON. Without CUDA it writes a "skipped" JSON.
set -euo pipefail
cd "$(dirname "$0")/.."
PACK=${1:-.gpu-pack}
OUT=${2:-gpu_check.json}
PYTHON=${PYTHON:-python3}
if [ ! -d "$PACK/model" ]; then
  echo "no pack at $PACK: run 'make gpu-pack' first" >&2
  exit 2
fi
if compgen -G "$PACK/wheels/*.whl" >/dev/null; then
  site=$(mktemp -d)
  # The wheels are for CPython 3.12 (the GPU machines'); elsewhere use what is installed.
  if "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$site" "$PACK"/wheels/*.whl 2>"$site.log"; then
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
  else
    echo "the pack's wheels don't fit $("$PYTHON" -V 2>&1): using the installed packages" >&2
  fi
fi
export PYTHONUNBUFFERED=1
exec "$PYTHON" scripts/gpu_check.py --pack "$PACK" --out "$OUT" "${@:3}"
