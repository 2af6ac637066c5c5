# Linear probe on real MRI (MSD Task04 hippocampus, 200 cropped T1 volumes in ../shared/data):
# "is this case's posterior hippocampus larger than the median case's?" The label comes from the label maps
# (voxels == 2, 1 mm isotropic, median over all 200 cases -> 100 / 100); the backbone only ever sees the image.
#   python linear_probe.py configs/probe_hippocampus.py                   # random ViT-S/16, ~2-3 min on a CPU
#   python linear_probe.py configs/probe_hippocampus.py --pretrained=out/demo/teacher_backbone.pt
out_dir = "out/probe_hippocampus"
datalist = "../shared/data/msd_hippocampus"  # its dataset.json pairs images/x with labels/x
label_from_map = 2  # 2 = posterior hippocampus (body and tail)
num_classes = 2
class_names = ("below median", "above median")
split = (120, 40, 40)  # the folder has one list of 200 cases: train / val / test
split_per_run = True  # 200 cases is small: a new split per run puts split variability into the CI
# the crops are at most 43 x 59 x 47 voxels: pad them (with -1) into 64^3 instead of resizing, so a bigger
# structure stays bigger — resizing every crop to a cube would hide the very size the label is about
image_size = 64
resize_to = None
arch = "vit_small"  # when no checkpoint is given (a --pretrained checkpoint brings its own architecture)
device = "cpu"
