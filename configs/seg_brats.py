# BraTS brain tumours (4 MRI modalities), the paper's settings, e.g. on 4 GPUs:
#   torchrun --standalone --nproc_per_node=4 finetune_seg.py configs/seg_brats.py --datalist=/data/brats/datalist.json \
#       --pretrained=teacher_checkpoint.pth
# Datalist items: {"image": [t1, t1ce, t2, flair] (or "image1".."image4"), "label": seg}. The three sigmoid
# outputs are the overlapping regions tumour core, whole tumour, enhancing tumour.
# Data: BraTS 2021 (RSNA-ASNR-MICCAI challenge, https://www.synapse.org/brats2021 ; see the download page for its
# terms) or MSD Task01_BrainTumour (http://medicaldecathlon.com/, CC BY-SA 4.0: one 4-channel file per case, other
# label values, see `regions`); docs/datasets.md writes the datalist of either in one command.
out_dir = "out/seg_brats"
datalist = "data/brats/datalist.json"
in_chans = 4  # every case must have exactly 4 channels (checked up front)
num_classes = 4  # label values 0..3 (BraTS 2021 with ET relabelled 4 -> 3: 1 NCR, 2 ED, 3 ET)
regions = [[1, 3], [1, 2, 3], [3]]  # TC, WT, ET. Raw BraTS 2021 files (ET = 4): [[1, 4], [1, 2, 4], [4]]
# with num_classes = 5; MSD Task01 (1 edema, 2 non-enhancing, 3 enhancing): [[2, 3], [1, 2, 3], [3]]
class_names = ["TC", "WT", "ET"]
loss = "sigmoid_dice"  # Dice(sigmoid, squared_pred, smooth_nr 0, smooth_dr 1e-5) on the 3 regions
target_spacing = (1.0, 1.0, 1.0)
pos_neg_crops = False  # RandSpatialCropSamples: 4 uniform crops per volume
flip_prob = 0.5
rot90_prob = 0.0
scale_intensity = 0.1  # x (1 + U(-0.1, 0.1)), p = 1
scale_prob = 1.0
shift_intensity = 0.1  # + U(-0.1, 0.1), p = 1
shift_prob = 1.0
cache_cases = False  # ~1250 cases x 4 modalities do not fit in memory: the workers load each case when drawn
num_workers = 8
