#!/usr/bin/env bash
# Run HERE (a machine that reaches PyPI), not on the GPU machine.
#
# Fills .whl/ (git-ignored) with what the GPU machine lacks for the OpenMMLab stack:
#   - wheels for CPython 3.12, manylinux x86_64, one version each, of mmengine 0.10.7,
#     mmsegmentation 1.2.2, mmdet 3.3.0, mmpretrain 1.2.0, openmim 0.3.9, ftfy, setuptools
#     80.9.0 (pkg_resources, which mmcv's setup.py and mim import) and every dependency they
#     pull in that the machine does not already have (tools/gpu/device_packages.txt);
#   - the mmcv 2.1.0 sdist (.whl/src/mmcv-2.1.0.tar.gz), which tools/gpu/build_mmcv.sh builds
#     there.
# The exact set is tools/gpu/wheels.lock; `--resolve` recomputes it from the roots below
# (following Requires-Dist). .whl/mmcv-parts/ (a built mmcv wheel, see tools/gpu/README.md) is
# left alone. Idempotent: files already there are not downloaded again.
#
#   bash tools/gpu/fetch_wheels.sh [--resolve]
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
DEST=${WHEEL_DIR:-$ROOT/.whl}
GPU=$ROOT/tools/gpu
LOCK=$GPU/wheels.lock
PYTHON=${PYTHON:-python3}
TOOLVENV=${FETCH_VENV:-${TMPDIR:-/tmp}/rmoe-fetch-venv}
MMCV_VERSION=2.1.0
LIMIT_MIB=64

ROOTS=(mmengine==0.10.7 mmsegmentation==1.2.2 mmdet==3.3.0 mmpretrain==1.2.0 openmim==0.3.9
       ftfy setuptools==80.9.0)

resolve=0
case "${1:-}" in
  --resolve) resolve=1 ;;
  '') ;;
  *) echo "usage: $0 [--resolve]" >&2; exit 2 ;;
esac
[[ -f $LOCK ]] || resolve=1

command -v "$PYTHON" >/dev/null || { echo "fetch_wheels: $PYTHON not found (set PYTHON=...)" >&2; exit 1; }

# A small venv for the downloads: packaging for the resolver; setuptools<81 (pkg_resources) and
# wheel because pip must run mmcv's setup.py to download its sdist, and it imports pkg_resources.
if ! "$TOOLVENV/bin/python" -c 'import packaging, pkg_resources, wheel' 2>/dev/null; then
  echo "fetch_wheels: making the download venv $TOOLVENV"
  "$PYTHON" -m venv "$TOOLVENV"
  "$TOOLVENV/bin/python" -m pip install -q --disable-pip-version-check 'setuptools<81' wheel packaging
fi
TP=$TOOLVENV/bin/python

mkdir -p "$DEST/src"
if [[ $resolve == 1 ]]; then
  "$TP" "$GPU/resolve_wheels.py" --dest "$DEST" --present "$GPU/device_packages.txt" \
    --pins "$ROOT/requirements/constraints.txt" --lock "$LOCK" "${ROOTS[@]}"
else
  "$TP" "$GPU/resolve_wheels.py" --dest "$DEST" --present "$GPU/device_packages.txt" \
    --lock "$LOCK" --from-lock
fi

# The mmcv sdist. pip runs its setup.py to read its metadata: no build isolation, so that the
# venv's setuptools<81 is the one used (isolation would take a setuptools without
# pkg_resources and fail: "No module named 'pkg_resources'").
SDIST=$DEST/src/mmcv-$MMCV_VERSION.tar.gz
if [[ ! -s $SDIST ]]; then
  "$TP" -m pip download -q --disable-pip-version-check --no-deps --no-binary=:all: \
    --no-build-isolation -d "$DEST/src" "mmcv==$MMCV_VERSION"
fi
[[ -s $SDIST ]] || { echo "fetch_wheels: $SDIST was not downloaded" >&2; exit 1; }
find "$DEST/src" -maxdepth 1 -type f ! -name "mmcv-$MMCV_VERSION.tar.gz" -print -delete

# What travels with a device call: the working tree (tracked + untracked-not-ignored files)
# plus the carried paths, 64 MiB in all.
cd "$ROOT"
tree_bytes=$(git ls-files -z --cached --others --exclude-standard | du -cb --files0-from=- 2>/dev/null | tail -1 | cut -f1)
stack_bytes=$(du -cb "$DEST"/*.whl "$SDIST" | tail -1 | cut -f1)
parts_bytes=0
if compgen -G "$DEST/mmcv-parts/*" >/dev/null; then
  parts_bytes=$(du -cb "$DEST"/mmcv-parts/* | tail -1 | cut -f1)
fi
mib() { awk -v b="$1" 'BEGIN { printf "%.1f MiB", b / 1048576 }'; }
echo
echo "wheels: $(ls "$DEST"/*.whl | wc -l) files, $(mib "$stack_bytes") (with the mmcv sdist); built mmcv parts: $(mib "$parts_bytes"); working tree: $(mib "$tree_bytes")"
total=$((tree_bytes + stack_bytes + parts_bytes))
echo "one call carrying .whl: $(mib "$total") of $LIMIT_MIB MiB"
if (( total > LIMIT_MIB * 1048576 )); then
  echo "fetch_wheels: over the $LIMIT_MIB MiB a device call carries; see tools/gpu/README.md" >&2
  exit 1
fi
