# The paper's linear decoder (frozen ViT, last-4-block patch tokens, linear map, trilinear upsampling) on MSD
# hippocampus. Applied after configs/seg_hippocampus.py, whose split, data_root and label fraction it keeps:
#   python finetune_seg.py configs/seg_hippocampus.py configs/seg_hippocampus_linear.py --pretrained=<teacher>
# Why these settings (chosen on validation Dice; the runs are in experiments/README.md):
# - 0.5 mm instead of the files' 1 mm: a linear decoder predicts one logit vector per 8-voxel patch. At 1 mm a
#   hippocampus (~11 voxels across) fills 18% of the patches it touches, so even *perfect* per-patch class
#   fractions, upsampled, give Dice 0.20 (argmax); at 0.5 mm that ceiling is 0.79
#   (experiments/linear_decoder_ceiling.py, validation cases).
# - crop 64: the same ~1/4 of a case per crop as 32 voxels at 1 mm (8^3 patch tokens per crop).
# - learning_rate 1e-2: the head has ~3.8k weights (BatchNorm + a 768 -> 3 map); 1e-3 barely moves it.
# - loss "dice": cross-entropy calibrates the head to the patches' majority class (background); Dice alone
#   rewards the foreground.
# - 1000 steps: validation Dice still rises after 600.
head = "linear"
head_kwargs = {}
target_spacing = (0.5, 0.5, 0.5)
crop_size = 64
learning_rate = 1e-2
loss = "dice"
max_iters = 1000
warmup_iters = 50
eval_interval = 200
