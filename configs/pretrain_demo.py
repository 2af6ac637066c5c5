# CPU demo: a few minutes on a 2-core laptop, synthetic phantoms (data.SyntheticVolumes), no files needed.
# A small ViT with patch 8 on 48^3 / 24^3 crops keeps the paper's 216 / 27 tokens per global / local crop.
out_dir = "out/demo"
data = ""  # synthetic phantoms; point it at a prepared cache (python data.py prepare ...) for real volumes
embed_dim = 192  # ViT-Tiny width ...
depth = 4  # ... but 4 blocks (divisible by 4, so adapter.py's ViT-Adapter can wrap it)
num_heads = 3
patch_size = 8
global_crops_size = 48
local_crops_size = 24
drop_path_rate = 0.1  # a tiny model overfits less than ViT-L; less regularisation
head_n_prototypes = 1024  # K: far fewer images than the paper's 100k, far fewer prototypes
head_hidden_dim = 512
head_bottleneck_dim = 128
batch_size = 16
max_iters = 120
base_lr = 0.004  # x sqrt(16/1024) = 5e-4 peak
warmup_iters = 12
warmup_teacher_temp_iters = 40
freeze_last_layer_iters = 6
momentum_teacher = 0.99  # a short run: let the teacher move a little faster
log_interval = 5
ckpt_interval = 40
export_interval = 60
num_workers = 0  # on a 2-core CPU a loader process fights the 2 compute threads; phantoms take ~20 ms
min_axis_size = 24
visualize_at_end = True  # leave a PCA / attention montage to look at: out/demo/vis/montage.png
