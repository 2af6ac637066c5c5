# The paper's ICBM brain-age setting: T1 MRI, 4 age classes, ViT-L/16 at 112^3.
# The datalist is the reference's JSON: {"training", "validation", "test"} lists of
# {"image": "path/to/subject.nii.gz", "label": k} with ages 20-60 binned [20,30) -> 0, [30,40) -> 1, [40,50) -> 2,
# [50,60] -> 3 (the reference skull-strips with *_mask.nii.gz first; do that when writing the datalist).
# Data: ICBM (International Consortium for Brain Mapping) T1 scans from the LONI Image and Data Archive
# (https://ida.loni.usc.edu, by application; see the download page for its terms).
#   python linear_probe.py configs/probe_icbm.py --datalist=icbm.json --pretrained=3dino_vitl.pth
out_dir = "out/probe_icbm"
num_classes = 4
class_names = ("20-29", "30-39", "40-49", "50-60")
image_size = 112
resize_to = ()  # reference: the foreground crop resized (trilinear) to 112^3
augment_train = True  # reference: RandomAffine / gamma / sharpen / smooth / noise, scale/shift; here 8 random
n_aug_views = 8  # views per training volume (crop offset, flips, OneOf intensity, scale/shift), encoded once
device = "cuda"
