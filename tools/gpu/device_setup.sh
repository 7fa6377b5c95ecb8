#!/usr/bin/env bash
# Run THERE: the one prepared command of a device call (tools/gpu/README.md gives the call).
#
#   bash tools/gpu/device_setup.sh [COMMAND ...]
#
# 1. records the machine (GPU, driver, torch, nvcc, compiler, cores) in $OUT/machine.txt;
# 2. tools/gpu/install_stack.sh: the carried wheels into /tmp/site, mmcv from .whl/mmcv-parts/
#    or built here (the parts then land in $OUT, to copy into .whl/mmcv-parts/), the checks;
# 3. COMMAND, if given, with PYTHONPATH=/tmp/site:$PWD, also when step 2 failed (the layer
#    measurements need no mmcv op), its output in $OUT/command.log; not while the mmcv build
#    still runs (step 2's exit 3).
# Logs go to $OUT (at most 8 files come back: here machine.txt, setup.log, mmcv-build.log.gz,
# the wheel's parts and .sha256, command.log). Exit status: step 2's, else COMMAND's.
# Set BUILD_WAIT (seconds, default 420) to how long step 2 may wait for a build; a build still
# running then goes on (setsid), and the same command in a call made within the machine's warm
# window (30 s) waits for it instead of starting again.
set -uo pipefail
: "${OUT:?device_setup: OUT is not set (this runs through the device tool)}"
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$ROOT" || exit 1
export PYTHONUNBUFFERED=1 SITE=${SITE:-/tmp/site} BUILD_WAIT=${BUILD_WAIT:-420}
WORK=${MMCV_BUILD_DIR:-/tmp/mmcv-build}
t0=$(date +%s)

{
  date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm --format=csv,noheader 2>&1
  "${PYTHON:-python3}" -c 'import sys, torch; print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda, "capability", torch.cuda.get_device_capability() if torch.cuda.is_available() else None)' 2>&1
  (nvcc --version 2>&1 || echo "no nvcc") | tail -2
  (c++ --version 2>&1 || echo "no c++") | head -1
  echo "ninja: $(command -v ninja || echo none); strip: $(command -v strip || echo none); cores: $(nproc)"
  grep -m1 'model name' /proc/cpuinfo
  "${PYTHON:-python3}" -m pip show setuptools wheel ninja pybind11 opencv-python-headless 2>/dev/null | grep -E '^(Name|Version)'
} >"$OUT/machine.txt" 2>&1
cat "$OUT/machine.txt"

bash tools/gpu/install_stack.sh --out "$OUT" 2>&1 | tee "$OUT/setup.log"
setup_rc=${PIPESTATUS[0]}
if [[ -f $WORK/build.log ]]; then
  gzip -c "$WORK/build.log" >"$OUT/mmcv-build.log.gz"
fi
echo "device_setup: step 2 exit $setup_rc after $(( $(date +%s) - t0 ))s"

cmd_rc=0
if (( $# && setup_rc == 3 )); then
  echo "device_setup: the mmcv build is still running: COMMAND not run (it would share the CPU"
  echo "device_setup: with the build); make the same call again now, while the machine is warm"
elif (( $# )); then
  PYTHONPATH=$SITE:$ROOT${PYTHONPATH:+:$PYTHONPATH} "$@" 2>&1 | tee "$OUT/command.log"
  cmd_rc=${PIPESTATUS[0]}
  echo "device_setup: command exit $cmd_rc after $(( $(date +%s) - t0 ))s"
fi
(( setup_rc )) && exit "$setup_rc"
exit "$cmd_rc"
