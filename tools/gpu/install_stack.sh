#!/usr/bin/env bash
# Run THERE (the GPU machine), from the repo root, with .whl carried (tools/gpu/README.md).
#
# Installs the carried wheels (.whl/*.whl, from tools/gpu/fetch_wheels.sh) into SITE
# (default /tmp/site; used through PYTHONPATH, the machine's own packages untouched), then mmcv:
#   1. a wheel built earlier on this machine (build_mmcv.sh package leaves one in its work dir),
#   2. else one reassembled from .whl/mmcv-parts/ (a wheel built in an earlier session, split
#      by build_mmcv.sh package; its .sha256 is checked),
#   3. else it builds mmcv here (tools/gpu/build_mmcv.sh all), which takes minutes.
# Then it checks `import mmcv.ops, mmseg, mmdet, mmpretrain` and nms / RoIAlign on cuda
# against the CPU (tools/gpu/check_stack.py).
#
#   bash tools/gpu/install_stack.sh [--no-build] [--out OUTDIR]
#   export PYTHONPATH=/tmp/site:$PWD     # afterwards, for the commands that use the stack
#
# --no-build: fail instead of building when no built mmcv is at hand. --out: where a build
# made here leaves its parts (to copy back into .whl/mmcv-parts/); default $OUT when set.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
PYTHON=${PYTHON:-python3}
SITE=${SITE:-/tmp/site}
WHL=${WHEEL_DIR:-$ROOT/.whl}
PARTS=$WHL/mmcv-parts
WORK=${MMCV_BUILD_DIR:-/tmp/mmcv-build}
build=1
out=${OUT:-}
while (( $# )); do
  case $1 in
    --no-build) build=0 ;;
    --out) out=${2:?--out needs a folder}; shift ;;
    *) echo "usage: $0 [--no-build] [--out OUTDIR]" >&2; exit 2 ;;
  esac
  shift
done

die() { echo "install_stack: $*" >&2; exit 1; }
t0=$(date +%s)
pip_target() {
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --disable-pip-version-check --target "$SITE" "$@"
}

shopt -s nullglob
wheels=("$WHL"/*.whl)
(( ${#wheels[@]} )) || die "no wheels in $WHL: run tools/gpu/fetch_wheels.sh here and carry .whl"
pip_target "${wheels[@]}"
echo "install_stack: ${#wheels[@]} wheels into $SITE ($(( $(date +%s) - t0 ))s)"

mmcv_whl=
built=("$WORK"/mmcv-2.1.0-*.whl)
if (( ${#built[@]} )); then
  mmcv_whl=${built[0]}
  echo "install_stack: mmcv from this machine's build, $mmcv_whl"
else
  sums=("$PARTS"/mmcv-2.1.0-*.whl.sha256)
  if (( ${#sums[@]} )); then
    name=$(basename "${sums[0]}" .sha256)
    parts=("$PARTS/$name".part*)
    (( ${#parts[@]} )) || die "$PARTS has ${sums[0]} but no $name.part* files"
    mkdir -p "$WORK"
    cat "${parts[@]}" >"$WORK/$name"     # part00, part01, ... sort in order
    (cd "$WORK" && sha256sum -c --quiet "${sums[0]}") \
      || { rm -f "$WORK/$name"; die "$name reassembled from ${#parts[@]} parts fails its sha256"; }
    mmcv_whl=$WORK/$name
    echo "install_stack: mmcv reassembled from ${#parts[@]} parts in $PARTS"
  elif (( build )); then
    echo "install_stack: no built mmcv (neither $WORK/mmcv-*.whl nor $PARTS/): building it"
    [[ -n $out ]] || out=$WORK/parts
    set +e
    bash "$ROOT/tools/gpu/build_mmcv.sh" all "$out" "${BUILD_WAIT:-540}"
    build_rc=$?
    set -e
    built=("$WORK"/mmcv-2.1.0-*.whl)
    if (( build_rc == 0 && ${#built[@]} )); then
      mmcv_whl=${built[0]}
      echo "install_stack: copy $out/mmcv-*.part* and .sha256 back into .whl/mmcv-parts/"
    elif (( build_rc == 3 )); then
      echo "install_stack: the build goes on; run this again (within the machine's warm time) to wait for it" >&2
      exit 3
    fi
  else
    die "no built mmcv: neither $WORK/mmcv-*.whl nor $PARTS/*.sha256 (and --no-build)"
  fi
fi

status=0
if [[ -n $mmcv_whl ]]; then
  pip_target "$mmcv_whl"
else
  # The ops did not build: install mmcv's Python part alone (mmcv-lite, from the same sdist,
  # seconds), so that what needs no mmcv op (the MoE layer, its benchmarks) still runs.
  status=1
  echo "install_stack: mmcv with ops could not be built (above); installing mmcv-lite (no ops) instead" >&2
  sdist=${MMCV_SDIST:-$WHL/src/mmcv-2.1.0.tar.gz}
  rm -rf "$WORK/lite"; mkdir -p "$WORK/lite"
  tar -xzf "$sdist" -C "$WORK/lite"
  PYTHONPATH=$WORK/buildtools${PYTHONPATH:+:$PYTHONPATH} MMCV_WITH_OPS=0 "$PYTHON" -m pip wheel -q --no-cache-dir \
    --no-build-isolation --no-deps --no-index -w "$WORK/lite/dist" "$WORK/lite/mmcv-2.1.0" \
    && pip_target "$WORK"/lite/dist/mmcv_lite-*.whl \
    || echo "install_stack: mmcv-lite did not build either" >&2
fi
echo "install_stack: installed in $(( $(date +%s) - t0 ))s"

PYTHONPATH=$SITE:$ROOT${PYTHONPATH:+:$PYTHONPATH} "$PYTHON" "$ROOT/tools/gpu/check_stack.py" || status=1
echo "install_stack: now  export PYTHONPATH=$SITE:$ROOT"
exit $status
