#!/usr/bin/env bash
# Builds mmcv 2.1.0 with its ops against the torch that is installed, also torch >= 2.10.
#
# torch 2.10 and later need C++20 in their headers, where mmcv 2.1.0's setup.py passes
# -std=c++17: tools/gpu/patch_mmcv_cxx_std.py rewrites that flag first (C++20 for torch >= 2.10,
# mmcv's own flag for older torch; MMCV_CXX_STD=c++NN chooses). CUDA ops are built when torch
# is a CUDA build and nvcc is found (FORCE_CUDA=0 for CPU ops only), for TORCH_CUDA_ARCH_LIST.
#
#   bash tools/gpu/build_mmcv.sh install           # build and pip-install into $PYTHON's env
#   bash tools/gpu/build_mmcv.sh start             # build in the background (setsid), return
#   bash tools/gpu/build_mmcv.sh wait [SECONDS]    # poll until it ends (default 540 s)
#   bash tools/gpu/build_mmcv.sh package OUTDIR    # strip debug info, split into <16 MiB parts
#   bash tools/gpu/build_mmcv.sh all OUTDIR [SECONDS]   # start, wait, package
#
# On the GPU machine (tools/gpu/README.md) install_stack.sh runs `all`. start is idempotent: a
# build that runs or has finished is not started again, so a second device call made while the
# machine is still warm picks the same build up with `wait`. Exit status of wait: 0 built,
# 1 failed (first errors and the log's tail printed), 3 still running at the deadline.
#
# The sdist: .whl/src/mmcv-2.1.0.tar.gz (tools/gpu/fetch_wheels.sh puts it there), else MMCV_SDIST,
# else pip downloads it (needs the network). The build needs setuptools < 81 (pkg_resources),
# wheel and ideally ninja in $PYTHON's environment; on the GPU machine a setuptools wheel
# carried in .whl/ is used when the machine's has no pkg_resources.
#
# Environment: PYTHON (python3), TORCH_CUDA_ARCH_LIST (9.0, the H100/H200), MAX_JOBS (nproc),
# MMCV_BUILD_DIR (/tmp/mmcv-build), MMCV_CXX_STD, FORCE_CUDA, PART_MIB (15), BUILD_NICE (0).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
PYTHON=${PYTHON:-python3}
VERSION=2.1.0
WHL=${WHEEL_DIR:-$ROOT/.whl}
SDIST=${MMCV_SDIST:-$WHL/src/mmcv-$VERSION.tar.gz}
WORK=${MMCV_BUILD_DIR:-/tmp/mmcv-build}
SRC=$WORK/mmcv-$VERSION
DIST=$WORK/dist
LOG=$WORK/build.log
STATE=$WORK/state          # running | ok | failed
TOOLS=$WORK/buildtools     # setuptools<81 for pkg_resources, when the machine's has none
PART_MIB=${PART_MIB:-15}

die() { echo "build_mmcv: $*" >&2; exit 1; }
now() { date +%s; }
mib() { awk -v b="$(stat -c %s "$1")" 'BEGIN { printf "%.1f MiB", b / 1048576 }'; }

preflight() {
  command -v "$PYTHON" >/dev/null || die "$PYTHON not found (set PYTHON=...)"
  local info
  info=$("$PYTHON" -c 'import sys, torch; print(torch.__version__, torch.version.cuda or "none", sys.version.split()[0])') \
    || die "$PYTHON cannot import torch: install torch first (mmcv's ops build against it)"
  read -r torch_version torch_cuda py_version <<<"$info"
  echo "build_mmcv: torch $torch_version (CUDA $torch_cuda), Python $py_version, $(${CXX:-c++} --version | head -1)"
  # mmcv's setup.py imports pkg_resources (setuptools < 81).
  if ! "$PYTHON" -c 'import pkg_resources' 2>/dev/null; then
    local st
    st=$(ls "$WHL"/setuptools-*.whl 2>/dev/null | head -1) || true
    [[ -n $st ]] || die "mmcv's setup.py needs pkg_resources: pip install 'setuptools<81' (or carry its wheel in $WHL)"
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$TOOLS" "$st"
    export PYTHONPATH=$TOOLS${PYTHONPATH:+:$PYTHONPATH}
    echo "build_mmcv: setuptools from $st (pkg_resources)"
  fi
  "$PYTHON" -c 'import wheel' 2>/dev/null || die "the build needs the wheel package: pip install wheel"
  if ! command -v ninja >/dev/null; then
    # The ninja wheel's binary, where its bin folder is not on PATH; torch calls `ninja`.
    local nbin
    nbin=$("$PYTHON" -c 'import ninja; print(ninja.BIN_DIR)' 2>/dev/null) || true
    if [[ -n $nbin && -x $nbin/ninja ]]; then
      export PATH=$nbin:$PATH
    else
      echo "build_mmcv: warning: no ninja; torch falls back to a slow serial build (pip install ninja)" >&2
    fi
  fi

  if [[ -z ${FORCE_CUDA:-} ]]; then
    FORCE_CUDA=0
    [[ $torch_cuda != none ]] && FORCE_CUDA=1
  fi
  if [[ $FORCE_CUDA == 1 ]]; then
    [[ $torch_cuda != none ]] || die "FORCE_CUDA=1 but torch $torch_version is a CPU build"
    # The toolkit's root: its bin/nvcc and include/cuda_runtime.h (an nvcc on PATH can be a
    # wrapper script, as /usr/local/bin/nvcc is on these machines: torch would then take
    # /usr/local for CUDA_HOME and fail to link -lcudart).
    local cuda_home='' c nvcc_path
    nvcc_path=$(command -v nvcc || true)
    for c in "${CUDA_HOME:-}" /usr/local/cuda \
             ${nvcc_path:+"$(dirname "$(dirname "$(readlink -f "$nvcc_path")")")"} /usr/local/cuda-*; do
      if [[ -n $c && -x $c/bin/nvcc && -f $c/include/cuda_runtime.h ]]; then cuda_home=$c; break; fi
    done
    [[ -n $cuda_home ]] || die "no CUDA toolkit (bin/nvcc with include/cuda_runtime.h) in CUDA_HOME, /usr/local/cuda or beside the nvcc on PATH: CUDA ops need it; FORCE_CUDA=0 builds CPU ops only"
    export CUDA_HOME=$cuda_home
    echo "build_mmcv: nvcc $("$CUDA_HOME/bin/nvcc" --version | sed -n 's/.*release \([0-9.]*\).*/\1/p') at $CUDA_HOME, TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:=9.0}"
    export TORCH_CUDA_ARCH_LIST
    # torch's CUDA headers include cusparse.h, cublas_v2.h, ...: a toolkit with little more
    # than nvcc lacks them, and the nvidia-* wheels beside torch have them.
    if [[ ! -f $CUDA_HOME/include/cusparse.h ]]; then
      local inc
      inc=$("$PYTHON" - <<'EOF'
import glob, os, site
found = []
for sp in site.getsitepackages() + [site.getusersitepackages()]:
    for h in sorted(glob.glob(os.path.join(sp, 'nvidia', '*', 'include', 'cusparse.h'))):
        found.append(os.path.dirname(h))
print(':'.join(dict.fromkeys(found)))
EOF
)
      [[ -n $inc ]] || die "cusparse.h is in neither $CUDA_HOME/include nor a python nvidia/*/include"
      export CPATH=$inc${CPATH:+:$CPATH}
      echo "build_mmcv: CUDA library headers from $inc"
    fi
  else
    echo "build_mmcv: CPU ops only (torch has no CUDA, or FORCE_CUDA=0)"
  fi
  export FORCE_CUDA
}

get_sdist() {
  [[ -s $SDIST ]] && return 0
  echo "build_mmcv: no sdist at $SDIST: downloading mmcv==$VERSION"
  mkdir -p "$(dirname "$SDIST")"
  # --no-build-isolation: pip runs setup.py for metadata, and an isolated build env would take
  # a setuptools without pkg_resources.
  "$PYTHON" -m pip download -q --no-deps --no-binary=:all: --no-build-isolation \
    -d "$(dirname "$SDIST")" "mmcv==$VERSION" \
    || die "could not download the mmcv $VERSION sdist (no network? run tools/gpu/fetch_wheels.sh where there is one)"
  [[ -s $SDIST ]] || die "pip did not leave $SDIST"
}

cmd_start() {
  mkdir -p "$WORK"
  if [[ -f $STATE ]]; then
    case $(cat "$STATE") in
      ok) echo "build_mmcv: already built: $(ls "$DIST"/mmcv-*.whl)"; return 0 ;;
      running) if [[ -f $WORK/pid ]] && kill -0 "$(cat "$WORK/pid")" 2>/dev/null; then
                 echo "build_mmcv: a build is running (pid $(cat "$WORK/pid")), log $LOG"; return 0
               fi ;;
    esac
  fi
  preflight
  get_sdist
  [[ -f $SRC/setup.py ]] || tar -xzf "$SDIST" -C "$WORK"
  "$PYTHON" "$ROOT/tools/gpu/patch_mmcv_cxx_std.py" "$SRC"
  rm -rf "$DIST"; mkdir -p "$DIST"
  export MMCV_WITH_OPS=1 MAX_JOBS=${MAX_JOBS:-$(nproc)}
  echo "build_mmcv: MAX_JOBS=$MAX_JOBS, log $LOG"
  echo running >"$STATE"
  now >"$WORK/t_start"
  # setsid: the build outlives this command (a device call's leftover processes are killed
  # unless they started their own session), so a later call can wait for it.
  setsid nice -n "${BUILD_NICE:-0}" bash -c '
    cd "$1"
    if "$2" -m pip wheel -v --no-cache-dir --no-build-isolation --no-deps --no-index -w "$3" . >"$4" 2>&1 \
       && ls "$3"/mmcv-*.whl >/dev/null 2>&1; then s=ok; else s=failed; fi
    date +%s >"$6/t_end"; echo $s >"$5"' _ "$SRC" "$PYTHON" "$DIST" "$LOG" "$STATE" "$WORK" \
    </dev/null >/dev/null 2>&1 &
  echo $! >"$WORK/pid"
}

progress() {
  grep -oE '^ *\[[0-9]+/[0-9]+\]' "$LOG" 2>/dev/null | tail -1 | tr -d ' ' || true
}

cmd_wait() {
  local limit=${1:-540} t0 last=
  t0=$(now)
  [[ -f $STATE ]] || die "no build started in $WORK (run: $0 start)"
  while [[ $(cat "$STATE") == running ]]; do
    if ! kill -0 "$(cat "$WORK/pid")" 2>/dev/null; then
      sleep 1
      if [[ $(cat "$STATE") == running ]]; then echo failed >"$STATE"; now >"$WORK/t_end"; fi
      break
    fi
    if (( $(now) - t0 >= limit )); then
      echo "build_mmcv: still running after ${limit}s of waiting, at $(progress); wait again"
      return 3
    fi
    sleep 5
    local p; p=$(progress)
    if [[ $p != "$last" ]]; then
      echo "build_mmcv: $(( $(now) - $(cat "$WORK/t_start") ))s $p"; last=$p
    fi
  done
  local took=$(( $(cat "$WORK/t_end") - $(cat "$WORK/t_start") ))
  if [[ $(cat "$STATE") != ok ]]; then
    echo "build_mmcv: FAILED after ${took}s; the first errors, then the end of $LOG:" >&2
    grep -n -m 20 -E 'error|Error' "$LOG" >&2 || true
    tail -n 40 "$LOG" >&2
    return 1
  fi
  echo "build_mmcv: built in ${took}s: $(ls "$DIST"/mmcv-*.whl)"
}

cmd_package() {
  local out=${1:?usage: $0 package OUTDIR}
  [[ $(cat "$STATE" 2>/dev/null) == ok ]] || die "no finished build in $WORK"
  local whl; whl=$(ls "$DIST"/mmcv-*.whl | head -1)
  local name; name=$(basename "$whl")
  # Debug info is most of the extension's size (distutils compiles with -g): drop it, then
  # re-pack so that the wheel's RECORD matches.
  local tmp=$WORK/repack
  rm -rf "$tmp"; mkdir -p "$tmp/out"
  "$PYTHON" -m wheel unpack -d "$tmp" "$whl" >/dev/null
  if command -v strip >/dev/null; then
    find "$tmp" -name '*.so' -exec strip --strip-debug {} +
  else
    echo "build_mmcv: warning: no strip; the wheel keeps its debug info" >&2
  fi
  "$PYTHON" -m wheel pack -d "$tmp/out" "$tmp"/mmcv-*/ >/dev/null
  [[ -f $tmp/out/$name ]] || die "re-packing the stripped wheel failed"
  echo "build_mmcv: $name: $(mib "$whl"), $(mib "$tmp/out/$name") without debug info"
  # Keep the stripped wheel where install_stack.sh looks first.
  cp "$tmp/out/$name" "$WORK/$name"
  mkdir -p "$out"
  rm -f "$out/$name".part* "$out/$name.sha256"
  split -b "${PART_MIB}M" -d -a 2 "$WORK/$name" "$out/$name.part"
  (cd "$WORK" && sha256sum "$name") >"$out/$name.sha256"
  ls -l "$out/$name".part* "$out/$name.sha256"
  rm -rf "$tmp"
}

cmd_install() {
  cmd_start
  cmd_wait 86400
  local whl; whl=$(ls "$DIST"/mmcv-*.whl | head -1)
  "$PYTHON" -m pip install --no-deps --force-reinstall "$whl"
  "$PYTHON" -m pip install "$whl"     # mmcv's own requirements (mmengine, ...), where missing
  (cd / && "$PYTHON" -c 'import mmcv, mmcv.ops; print("build_mmcv: mmcv", mmcv.__version__, "with ops installed")')
}

case "${1:-}" in
  install) cmd_install ;;
  start) cmd_start ;;
  wait) cmd_wait "${2:-540}" ;;
  package) cmd_package "${2:-}" ;;
  all) [[ -n ${2:-} ]] || die "usage: $0 all OUTDIR [SECONDS]"
       cmd_start; cmd_wait "${3:-540}"; cmd_package "$2" ;;
  *) echo "usage: $0 install | start | wait [SECONDS] | package OUTDIR | all OUTDIR [SECONDS]" >&2
     exit 2 ;;
esac
