# MSD Task04 hippocampus (brain-MRI crops of ~35x50x35 voxels, 1 mm, labels 0 background / 1 anterior /
# 2 posterior), sized for a 2-core CPU. Download Task04_Hippocampus.tar from http://medicaldecathlon.com/ (licence
# CC BY-SA 4.0; docs/datasets.md) and unpack it; the fixed split (140 / 20 / 40 of the 200 cases the experiments
# used) is data_splits/msd_hippocampus.json, its paths under data_root. Pretrained from the CPU demo pretraining:
#   python finetune_seg.py configs/seg_hippocampus.py --data_root=/data/Task04_Hippocampus \
#       --pretrained=out/demo/teacher_backbone.pt
# The paper's "Random" baseline: that checkpoint's architecture with fresh weights, initialised as pretraining does:
#   python finetune_seg.py configs/seg_hippocampus.py --pretrained=out/demo/teacher_backbone.pt --random_init=True
# With pretrained = None the demo ViT below is built at random instead. Results: experiments/README.md.
# Any head works with this config: --head=linear (the paper's linear decoder; feature_size is dropped with a note)
# or --head=unetr --freeze_backbone=False (UNETR tuned end to end).
out_dir = "out/seg_hippocampus"
datalist = "data_splits/msd_hippocampus.json"
data_root = "data/Task04_Hippocampus"  # the unpacked MSD download (imagesTr/ labelsTr/; images/ labels/ work too)
in_chans = 1
num_classes = 3
class_names = ["anterior", "posterior"]
label_fraction = 0.1  # 14 training cases: the paper's low-label regime, where pretraining matters most
# the demo ViT (pretrain_demo.py), used for random init only; a checkpoint brings its own size
embed_dim = 192
depth = 4
num_heads = 3
patch_size = 8
head_kwargs = {"feature_size": 16}  # half the paper's 32: tiny volumes, CPU (ViT-Adapter and UNETR; a head
#                                    that does not take an option drops it with a note, e.g. --head=linear)
crop_size = 32  # ~1/4 of a case per crop; the demo ViT saw 48^3 crops (pos-embed interpolated)
samples_per_volume = 2
batch_size = 2
max_iters = 300
warmup_iters = 30
learning_rate = 1e-3  # a 300-step run needs a higher rate than the paper's 1e-4 over 30k steps
eval_interval = 100
log_interval = 10
flip_prob = 0.0  # anterior vs posterior is partly position along the A-P axis: no flips or rotations
rot90_prob = 0.0
num_workers = 0  # the cases are cached in memory; cropping is cheap
sw_batch_size = 4
