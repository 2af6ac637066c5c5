# The paper's COVID-CT-MD setting: 3 classes, chest CT, ViT-L/16 at 112^3.
# The datalist is the reference's JSON: {"training", "validation", "test"} lists of
# {"image": "path/to/case.nii.gz", "label": 0 | 1 | 2}  (Normal -> 0, COVID-19 -> 1, Cap -> 2).
# Data: COVID-CT-MD (Afshar et al. 2021, https://doi.org/10.6084/m9.figshare.12991592 ; see the download page for
# its terms), DICOM series: convert each to NIfTI first (docs/datasets.md).
#   python linear_probe.py configs/probe_covid.py --datalist=covid.json --pretrained=3dino_vitl.pth
#   python linear_probe.py configs/probe_covid.py --datalist=covid.json --pretrained=... --label_fraction=0.1
out_dir = "out/probe_covid"
num_classes = 3
class_names = ("Normal", "COVID-19", "Cap")
image_size = 112
resize_to = (144, 144, 112)  # reference: foreground crop resized to 144 x 144 x 112, then a 112^3 crop
augment_train = True  # reference: random crop, flips p 0.5 per axis, OneOf{contrast, sharpen, smooth, noise},
n_aug_views = 8  # scale/shift. Here 8 random views per training volume, each encoded once (not one per step)
device = "cuda"
