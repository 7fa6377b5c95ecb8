#!/usr/bin/env bash
# Run THERE, as the COMMAND of tools/gpu/device_setup.sh: issue 10's section-4 measurements,
# each dense against RMoE in the same run, and issue 16's expert-parallel step on nccl. Steps
# (STEPS="tests layer model train fps tools ep",
# the default, in this order of priority; each bounded by its own timeout, a failed one does
# not stop the others):
#
#   tests  the layer's CUDA tests (grouped GEMM vs loop, no host sync, fp16 GradScaler, compile)
#          and its CPU tests, on the machine's torch and numpy
#   layer  tools/benchmark_moe.py --grid gpu, bf16, with peak memory       -> $OUT/layer.json
#   model  tools/benchmark_backbone.py: UperNet Swin-T vs RMoE-Swin-T, AMP bf16, batch 8 at
#          512x512, train step and inference time, training peak memory
#   train  `mim train` of the tiny ADE20K and COCO configs with --amp on CUDA
#   fps    `mim run mmdet benchmark --task inference`: Mask R-CNN Swin-T dense vs RMoE (random
#          weights, tiny COCO resized by the shipped pipeline)
#   tools  tools/train.py --launcher pytorch on one GPU (nccl) with MoEStatsHook and CostHook,
#          then tools/visualize_experts.py on cuda
#   ep     tools/benchmark_expert_parallel.py on nccl: RMoE UperNet Swin-T, plain DDP against
#          RMoEDistributedDataParallel (P = the GPUs present; with one GPU, P = 1 runs the
#          exchange's code path) with its per-rank memory
#
# Tables and logs go to stdout (device_setup.sh keeps it as command.log) and $OUT/measure.md.
# DEVICE (default cuda) and QUICK=1 (tiny sizes) let it rehearse on a CPU machine.
set -uo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
PYTHON=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda}
STEPS=${STEPS:-tests layer model train fps tools ep}
OUT=${OUT:-/tmp/rmoe-measure-out}
WORK=${MEASURE_DIR:-/tmp/rmoe-measure}
mkdir -p "$OUT" "$WORK"
REPORT=$OUT/measure.md
export PYTHONUNBUFFERED=1 PYTHONPATH=${PYTHONPATH:-$ROOT}
QUICK=${QUICK:-0}
failed=()

step() {  # step NAME SECONDS COMMAND...: run, time and record one step
  local name=$1 limit=$2 t0 rc
  shift 2
  t0=$(date +%s)
  echo "=== $name ($*)" | tee -a "$REPORT"
  (cd "$WORK" && timeout "$limit" "$@") 2>&1 | tee -a "$WORK/$name.log" \
    | grep -vE '^(\s*warnings.warn|.*(UserWarning|FutureWarning|DeprecationWarning))' \
    | tail -n 60 | tee -a "$REPORT"
  rc=${PIPESTATUS[0]}
  echo "=== $name: exit $rc after $(( $(date +%s) - t0 ))s" | tee -a "$REPORT"
  (( rc )) && failed+=("$name")
  return 0
}

wants() { [[ " $STEPS " == *" $1 "* ]]; }

if (( QUICK )); then
  LAYER_ARGS=(--widths 64:256 --tokens 1024 --num-experts 8 --top-k 1 --repeats 2 --warmup 1)
  MODEL_ARGS=(--batch-size 2 --size 128 --repeats 1 --warmup 1)
  FPS_ITERS=3
  EP_ARGS=(--size 64 --repeats 2 --warmup 1)
else
  LAYER_ARGS=(--grid gpu --repeats 20 --warmup 3)
  MODEL_ARGS=(--batch-size 8 --size 512 --repeats 5 --warmup 2)
  FPS_ITERS=60
  EP_ARGS=("$ROOT"/configs/ade20k/rmoe-swin-tiny-*_ade20k-512x512.py
           --size 512 --batch-size 2 --repeats 10 --warmup 2)
fi
DTYPE=bf16
[[ $DEVICE == cpu ]] && DTYPE=fp32

: >"$REPORT"
{ echo "# measure.sh on $(hostname) $(date -u +%FT%TZ)"; nvidia-smi -L 2>/dev/null
  "$PYTHON" -c 'import torch; print("torch", torch.__version__)'; } | tee -a "$REPORT"

if wants tests; then
  step tests 240 "$PYTHON" -m pytest -q -p no:cacheprovider -o addopts= \
    "$ROOT/tests/test_moe_cuda.py" "$ROOT/tests/test_moe_layer.py" \
    "$ROOT/tests/test_moe_dispatch.py" "$ROOT/tests/test_moe_hot_path.py" \
    "$ROOT/tests/test_moe_compile.py"
fi
if wants layer; then
  step layer 300 "$PYTHON" "$ROOT/tools/benchmark_moe.py" "${LAYER_ARGS[@]}" --device "$DEVICE" \
    --dtype "$DTYPE" --memory --json "$OUT/layer.json"
fi
if wants model; then
  amp=(--amp bf16)
  [[ $DEVICE == cpu ]] && amp=()
  step model 300 "$PYTHON" "$ROOT/tools/benchmark_backbone.py" "${MODEL_ARGS[@]}" \
    --device "$DEVICE" "${amp[@]}" --memory
fi
if wants train || wants fps || wants tools; then
  (cd "$WORK" && "$PYTHON" "$ROOT/tools/make_tiny_datasets.py" data --overwrite >/dev/null)
fi
if wants train; then
  amp=(--amp)
  [[ $DEVICE == cpu ]] && amp=()
  step train-mmseg 180 "$PYTHON" -m mim train mmseg \
    "$ROOT/tests/configs/tiny_rmoe_upernet_ade20k.py" "${amp[@]}" --work-dir seg
  step train-mmdet 180 "$PYTHON" -m mim train mmdet \
    "$ROOT/tests/configs/tiny_rmoe_mask-rcnn_coco.py" "${amp[@]}" --work-dir det
fi
if wants fps; then
  for name in dense rmoe; do
    if [[ $name == dense ]]; then
      config=mmdet::swin/mask-rcnn_swin-t-p4-w7_fpn_1x_coco.py
    else
      config=$ROOT/configs/coco/mask-rcnn_rmoe-swin-t-p4-w7-e8_fpn_1x_coco.py
    fi
    step "fps-$name" 240 "$PYTHON" "$ROOT/tools/gpu/benchmark_fps.py" "$config" \
      --data-root "$WORK/data/coco/" --max-iter "$FPS_ITERS" --work-dir "fps-$name"
  done
fi
if wants tools; then
  cat >"$WORK/tiny_with_hooks.py" <<CONFIG
_base_ = ['$ROOT/tests/configs/tiny_rmoe_upernet_ade20k.py']
train_cfg = dict(max_iters=4, val_interval=4)
default_hooks = dict(checkpoint=dict(interval=4))
custom_hooks = [dict(type='MoEStatsHook', interval=1), dict(type='CostHook')]
CONFIG
  step tools-train 180 "$PYTHON" -m torch.distributed.run --nproc_per_node 1 \
    "$ROOT/tools/train.py" tiny_with_hooks.py --launcher pytorch --work-dir dist
  step tools-visualize 120 bash -c "ckpt=\$(ls dist/iter_*.pth | tail -1) && \
    img=\$(ls data/ade/ADEChallengeData2016/images/validation/*.jpg | head -1) && \
    '$PYTHON' '$ROOT/tools/visualize_experts.py' '$ROOT/tests/configs/tiny_rmoe_upernet_ade20k.py' \
      \"\$ckpt\" \"\$img\" --out vis --device '$DEVICE' && ls vis && cat dist/cost.json"
fi

if wants ep; then
  gpus=1
  [[ $DEVICE == cuda ]] && gpus=$("$PYTHON" -c 'import torch; print(torch.cuda.device_count())')
  step ep 420 "$PYTHON" "$ROOT/tools/benchmark_expert_parallel.py" "${EP_ARGS[@]}" \
    --device "$DEVICE" --world-sizes "$gpus"
fi

echo "measure.sh: failed steps: ${failed[*]:-none}" | tee -a "$REPORT"
(( ${#failed[@]} == 0 ))
