# High-resolution adaptation (stage 2, paper "DINOv2 pretraining objective"): 112^3 / 64^3 crops, 12.5k
# iterations (every schedule compressed 10x), base lr 1e-3, batch 256, from the stage-1 teacher whose position
# embedding is resized 6^3 -> 7^3 at load time. Volumes must have > 48 slices.
# torchrun --standalone --nproc_per_node=4 pretrain.py configs/pretrain_vitl_highres.py --init_from=out/vitl/teacher_backbone.pt
out_dir = "out/vitl_highres"
data_path = "cache/"
init_from = "out/vitl/teacher_backbone.pt"  # the stage-1 teacher export (ours or a reference 3DINO checkpoint)
arch = "vit_large"
patch_size = 16
global_crops_size = 112
local_crops_size = 64
batch_size = 256
max_iters = 12_500
base_lr = 0.001  # -> 5e-4 at batch 256
warmup_iters = 1_250
warmup_teacher_temp_iters = 3_750
freeze_last_layer_iters = 125
ckpt_interval = 3_750
export_interval = 3_125
min_axis_size = 48
num_workers = 10
dtype = "bfloat16"
