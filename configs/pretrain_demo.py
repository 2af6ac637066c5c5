# CPU demo: a few minutes on a 2-core laptop, synthetic phantoms (phantoms.SyntheticVolumes), no files needed; it ends by
# testing the teacher against its own random init on held-out labelled phantoms (evaluate.py -> eval.json).
# A small ViT with patch 8 on 48^3 / 24^3 crops keeps the paper's 216 / 27 tokens per global / local crop.
# Each departure from the paper's settings below is what lets a run this short leave the uniform fixed point
# (DINO loss at ln K); the runs behind each are in experiments/README.md.
out_dir = "out/demo"
data_path = ""  # synthetic phantoms; point it at a prepared cache (python cache.py prepare ...) for real volumes
embed_dim = 192  # ViT-Tiny width ...
depth = 4  # ... but 4 blocks (divisible by 4, so adapter.py's ViT-Adapter can wrap it)
num_heads = 3
patch_size = 8
global_crops_size = 48
local_crops_size = 24
n_local_crops = 4  # half the paper's 8: ~30% less time per step at a similar loss
layerscale_init = 0.1  # CaiT's rule for < 18 blocks; 1e-5 keeps the loss at ln K for the first steps
drop_path_rate = 0.0
head_n_prototypes = 32  # DINO's K = the 32 global crops one Sinkhorn-Knopp batch shares out: with more prototypes
#                         than crops every target keeps an equal-share floor ln(K / 32) of entropy
ibot_head_n_prototypes = 256  # iBOT's batch is hundreds of masked tokens: K 256 keeps the patch features useful
head_hidden_dim = 512
head_bottleneck_dim = 128
teacher_temp = 0.0025  # constant. Early on the teacher's logits differ across images by ~0.01 (cosines): only a
warmup_teacher_temp = 0.0025  # temperature of that order turns that into targets that differ (at 0.04 they are
warmup_teacher_temp_iters = 0  # uniform and stay so); no warm-up, which would undo it
momentum_teacher = 0.9  # cosine to 1: the teacher takes up what the student learns within ~10 steps
batch_size = 16
max_iters = 125  # the DINO loss flattens about halfway; the eval keeps gaining to the end
base_lr = 0.008  # x sqrt(16/1024) = 1e-3 peak
layerwise_decay = 1.0  # 4 blocks, a short run: no layer-wise decay, full lr on the patch embedding
patch_embed_lr_mult = 1.0
warmup_iters = 12
freeze_last_layer_iters = 3
log_interval = 10
ckpt_interval = 50
export_interval = 125
num_workers = 0  # on a 2-core CPU a loader process fights the 2 compute threads; phantoms take ~20 ms
min_axis_size = 24
visualize_at_end = True  # leave a PCA / attention montage to look at: out/demo/vis/montage.png
eval_at_end = True  # out/demo/eval.json: the teacher vs its random init on held-out labelled phantoms
