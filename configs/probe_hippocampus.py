# Linear probe on real MRI (MSD Task04 hippocampus, the 200 labelled cases of data_splits/msd_hippocampus_probe.json):
# "is this case's posterior hippocampus larger than the median case's?" The label comes from the label maps
# (voxels == 2, 1 mm isotropic, median over all 200 cases -> 100 / 100); the backbone only ever sees the image.
# Results (pretrained vs random init): experiments/README.md.
# Data: Task04_Hippocampus.tar from http://medicaldecathlon.com/ (licence CC BY-SA 4.0; docs/datasets.md), unpacked.
#   python linear_probe.py configs/probe_hippocampus.py --data_root=/data/Task04_Hippocampus   # random ViT-S/16, CPU
#   python linear_probe.py configs/probe_hippocampus.py --data_root=... --pretrained=out/demo/teacher_backbone.pt
out_dir = "out/probe_hippocampus"
datalist = "data_splits/msd_hippocampus_probe.json"  # one sorted list of the 200 cases, paths under data_root
data_root = "data/Task04_Hippocampus"  # the unpacked MSD download (imagesTr/ labelsTr/; images/ labels/ work too)
label_from_map = 2  # 2 = posterior hippocampus (body and tail)
num_classes = 2
class_names = ("below median", "above median")
split = (120, 40, 40)  # the list holds all 200 cases: train / val / test
split_per_run = True  # 200 cases is small: a new split per run puts split variability into the CI
# the crops are at most 43 x 59 x 47 voxels: pad them (with -1) into 64^3 instead of resizing, so a bigger
# structure stays bigger — resizing every crop to a cube would hide the very size the label is about
image_size = 64
resize_to = None
arch = "vit_small"  # when no checkpoint is given (a --pretrained checkpoint brings its own architecture)
device = "cpu"
