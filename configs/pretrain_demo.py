# CPU demo: ~6 minutes on a 2-core laptop, synthetic phantoms (phantoms.SyntheticVolumes), no files needed; it ends by
# testing the teacher against its own random init on held-out labelled phantoms (evaluate.py -> eval.json).
# A small ViT with patch 8 on 48^3 / 24^3 crops keeps the paper's 216 / 27 tokens per global / local crop.
# Every departure from the paper's settings below is what made a run this short leave the uniform fixed point;
# the runs behind each are in experiments/README.md (arm names in brackets).
out_dir = "out/demo"
data_path = ""  # synthetic phantoms; point it at a prepared cache (python cache.py prepare ...) for real volumes
embed_dim = 192  # ViT-Tiny width ...
depth = 4  # ... but 4 blocks (divisible by 4, so adapter.py's ViT-Adapter can wrap it)
num_heads = 3
patch_size = 8
global_crops_size = 48
local_crops_size = 24
n_local_crops = 4  # half the paper's 8: ~30% less time per step, DINO loss a little lower at equal steps [P14]
layerscale_init = 0.1  # CaiT's rule for < 18 blocks; 1e-5 sits at ln K for ~25 steps, ends alike [L1]
drop_path_rate = 0.0
head_n_prototypes = 32  # DINO's K = the 32 global crops that one Sinkhorn-Knopp batch shares out: 1024 [P18], 256
# [T1] and 64 [T4] leave an equal-share floor ln(K / 32) on the target entropy and ended at 0.81-0.84 ln K; 32 at 0.76
ibot_head_n_prototypes = 256  # [T5]. But iBOT's patch clusters at K 32 made worse patch features (eval +0.006 at 120
# steps); iBOT K 256 (its batch is hundreds of masked tokens) kept them [T7]
head_hidden_dim = 512
head_bottleneck_dim = 128
teacher_temp = 0.0025  # constant. The teacher's logits differ across images by ~0.01 (cosines) early on: only a
warmup_teacher_temp = 0.0025  # temperature of that order turns that into targets that differ (at 0.04 they are
warmup_teacher_temp_iters = 0  # uniform and stay so [B, P1]); raising it undoes it [P7, P8]; 0.0025 > 0.005 [T1]
momentum_teacher = 0.9  # cosine to 1: the teacher takes up what the student learns within ~10 steps
batch_size = 16
max_iters = 125  # the DINO loss is flat from step ~50 [T5], the eval still gains; 140 steps took 6 min 16 s
base_lr = 0.008  # x sqrt(16/1024) = 1e-3 peak
layerwise_decay = 1.0  # 4 blocks, 300 steps: no layer-wise decay, full lr on the patch embedding
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
