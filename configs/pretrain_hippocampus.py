# Pretraining on the unlabeled MSD hippocampus *training* images (labels never read), for the label-efficiency
# experiment (experiments/label_efficiency.py). The demo's ViT and recipe (configs/pretrain_demo.py) on real MRI
# crops, except K, the teacher temperature and the batch, chosen on these images; the runs behind them are in
# experiments/README.md. About half an hour on 2 CPU cores.
# Data: MSD Task04_Hippocampus from http://medicaldecathlon.com/ (CC BY-SA 4.0; docs/datasets.md); the experiment
# prepares the cache from the training cases of data_splits/msd_hippocampus.json under its --data_root:
# python cache.py prepare --datalist <training images> --out out/label_efficiency/cache   (the experiment does this)
out_dir = "out/label_efficiency/pretrain"
data_path = "out/label_efficiency/cache"
embed_dim = 192
depth = 4
num_heads = 3
patch_size = 8
global_crops_size = 48  # the hippocampus crops are ~35x50x35: 48^3 global views cover most of one
local_crops_size = 24
n_local_crops = 4
min_axis_size = 16  # the smallest cases have a 24-voxel axis (the reference's strict > 24 would drop them)
layerscale_init = 0.1
drop_path_rate = 0.0
head_n_prototypes = 256  # a smaller DINO K lowers the loss here but not the features (linear-decoder Dice)
head_hidden_dim = 512
head_bottleneck_dim = 128
teacher_temp = 0.005
warmup_teacher_temp = 0.005
warmup_teacher_temp_iters = 0
momentum_teacher = 0.9
batch_size = 32  # Sinkhorn-Knopp spreads each batch's 2B global crops evenly over K prototypes, so every target
#                  keeps >= ln(K/2B) nats no view can predict: a larger batch lowers that floor
max_iters = 300
base_lr = 0.008  # x sqrt(32/1024) = 1.41e-3 peak (the reference's square-root rule)
layerwise_decay = 1.0
patch_embed_lr_mult = 1.0
warmup_iters = 30
freeze_last_layer_iters = 3
log_interval = 10
ckpt_interval = 100
export_interval = 100
num_workers = 1
