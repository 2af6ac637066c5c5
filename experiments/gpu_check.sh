#!/usr/bin/env bash
# experiments/gpu_check.sh — what only a GPU shows, in one prepared call on an H100/H200, most important first:
#   1. bench.py input: 4 phantoms written as .nii.gz and prepared into a cache (the real-data path: the loader
#      workers only read crop boxes), and the workers' box-read throughput;
#   2. bench.py step --profile: ViT-L pretraining from that cache at batch 64, eager (with the host-sync count)
#      and compiled: where the step goes (CUDA events per phase), MFU, data wait, peak memory;
#   3. bench.py finetune_memory: ViT-L + ViT-Adapter + UNETR at 112^3, batch 8, bf16, frozen ViT: saved bytes,
#      forward + backward time and peak memory without and with with_cp (finetune_seg.py grad_checkpoint);
#   4. bench.py msda: the Triton kernel vs the PyTorch reference, fp32 and bf16;
#   5. the same ViT-L step at batch 128, eager and compiled (may not fit an H100's 80 GB: then it fails fast);
#   6. the CUDA-only tests.
# Each step has its own time limit and a failure does not stop the next; the whole script stays within BUDGET
# seconds (default 540: a device call is at most 600): a step gets what is left of it, and is skipped when under
# 30 s remain. Logs go to $OUT (or out/gpu_check); each bench ends with one JSON line.
#     bash experiments/gpu_check.sh
set -u
OUT=${OUT:-out/gpu_check}
BUDGET=${BUDGET:-540}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
T=$(mktemp -d)
step() {  # step NAME SECONDS COMMAND...
    local name=$1 limit=$2
    shift 2
    local left=$((BUDGET - SECONDS))
    if [ "$left" -lt 30 ]; then
        echo "=== $name: skipped, ${left}s of the ${BUDGET}s budget left"
        return
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    echo "=== $name ($(date +%T), limit ${limit}s): $*"
    local t0=$SECONDS
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    tail -n 30 "$OUT/$name.log"
    echo "=== $name: rc=$rc in $((SECONDS - t0)) s"
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
$PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
VITL="--config configs/pretrain_vitl.py --iters 5 --data_path=$T/cache --num_workers=14"
step input 75 $PY bench.py input --out "$T/cache" --volumes 4 --iters 20
step step_vitl_b64 120 $PY bench.py step --device cuda --profile --batch 64 $VITL
step step_vitl_b64_compiled 170 $PY bench.py step --device cuda --profile --no_syncs --batch 64 $VITL --compile=True
step finetune_memory 90 $PY bench.py finetune_memory --device cuda --batch 8 --dtypes bfloat16
step msda_fp32 40 $PY bench.py msda --device cuda
step msda_bf16 40 $PY bench.py msda --device cuda --dtype bfloat16
step step_vitl_b128 90 $PY bench.py step --device cuda --profile --no_syncs --batch 128 $VITL
step step_vitl_b128_compiled 150 $PY bench.py step --device cuda --profile --no_syncs --batch 128 $VITL --compile=True
step tests 90 $PY -m pytest -q -rs tests/test_msda.py tests/test_augment.py -k cuda
rm -rf "$T"
