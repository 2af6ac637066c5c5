# Linear probe on synthetic phantoms (phantoms.SyntheticVolumes): "does this abdomen have liver lesions?" — 1-3 small
# dark spheres in half of the volumes, so the answer hangs on a small structure, not on global intensity.
# Needs no files; a short CPU run.
#   python linear_probe.py configs/probe_synthetic.py
#   python linear_probe.py configs/probe_synthetic.py --pretrained=out/demo/teacher_backbone.pt
out_dir = "out/probe_synthetic"
datalist = ""  # "" = phantoms
synthetic_n = (64, 32, 32)  # train / val / test volumes (128 phantoms)
split = (64, 32, 32)  # ... re-drawn per run: with 32 test phantoms one fixed split can carry a chance confound
split_per_run = True  # (e.g. a test set whose mean intensity alone predicts the label), so vary it
synthetic_size = 32  # phantoms are generated at 32^3 (~0.1 s each)
image_size = 32
resize_to = ()  # the foreground (body) crop resized to 32^3, as the reference's ICBM pipeline
arch = "vit_tiny"  # without a checkpoint: a small random ViT with 8^3 patches, so 64 tokens see the lesions
patch_size = 8
max_iters = 2500  # 64 training volumes: 1250 epochs at batch 32 is already far past convergence
device = "cpu"
