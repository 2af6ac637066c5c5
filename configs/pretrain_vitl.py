# The paper's standard pretraining (stage 1): ViT-L/16, 2 x 96^3 + 8 x 48^3 crops, 125k iterations, batch 512
# on 4 x A100-80GB (128 per GPU), about 10 days. These are also pretrain.py's defaults; spelled out for reference.
# torchrun --standalone --nproc_per_node=4 pretrain.py configs/pretrain_vitl.py --data_path=cache/
# The paper's ~100k CT/MRI volumes come from many public sources, not one download: prepare your own volumes
# (docs/datasets.md), or start from the authors' weights (docs/pretrained_weights.md).
out_dir = "out/vitl"
data_path = "cache/"  # a folder prepared by `python cache.py prepare --datalist list.json --out cache/`
arch = "vit_large"
patch_size = 16
global_crops_size = 96
local_crops_size = 48
batch_size = 512  # global; with fewer GPUs raise grad_accum_steps (e.g. 8 GPUs x 64, or 4 x 32 x 4 steps)
grad_accum_steps = 1
max_iters = 125_000
base_lr = 0.002  # -> 1.414e-3 at batch 512
warmup_iters = 12_500
warmup_teacher_temp_iters = 37_500
freeze_last_layer_iters = 1_250
ckpt_interval = 3_750
export_interval = 12_500
num_workers = 10
dtype = "bfloat16"
