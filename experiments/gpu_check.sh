#!/usr/bin/env bash
# experiments/gpu_check.sh — what only a GPU shows, in one short run (under 10 minutes on an H100/H200):
#   1. the CUDA-only tests (the Triton kernels compiled at the adapter's real shapes, augmentation on CUDA data);
#   2. bench.py msda: the Triton kernel vs the PyTorch reference, fp32 and bf16 (time and peak memory);
#   3. bench.py step: pretrain.py's step time, MFU and peak memory, demo config and ViT-L (phantom data);
#   4. finetune_seg.py: ViT-L + ViT-Adapter at 112^3 in bf16 for a few steps (the kernel inside real training);
#   5. bench.py augment on CUDA.
# Each step has its own time limit and a failure does not stop the next. Logs go to $OUT (or out/gpu_check).
#     bash experiments/gpu_check.sh
set -u
OUT=${OUT:-out/gpu_check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
T=$(mktemp -d)
step() {  # step NAME SECONDS COMMAND...
    local name=$1 limit=$2
    shift 2
    echo "=== $name ($(date +%T), limit ${limit}s): $*"
    local t0=$SECONDS
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    tail -n 25 "$OUT/$name.log"
    echo "=== $name: rc=$rc in $((SECONDS - t0)) s"
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
$PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
step tests 120 $PY -m pytest -q -rs tests/test_msda.py tests/test_augment.py -k cuda
step msda_fp32 60 $PY bench.py msda --device cuda
step msda_bf16 60 $PY bench.py msda --device cuda --dtype bfloat16
step step_demo 60 $PY bench.py step --device cuda --iters 10 --eval_at_end=False
step step_vitl 120 $PY bench.py step --device cuda --config configs/pretrain_vitl.py --batch 64 --iters 5 \
    --data_path= --num_workers=14
step seg_adapter 100 $PY finetune_seg.py --out_dir="$T/seg" --max_iters=20 --warmup_iters=5 --eval_interval=20 \
    --log_interval=5 --num_classes=4 --synthetic_cases="(4,1,1)" --synthetic_shape="(112,112,112)" --num_workers=4 --save_predictions=False
step augment 45 $PY bench.py augment --device cuda
rm -rf "$T"
