# BTCV multi-organ CT (13 organs + background), the paper's settings on one GPU:
#   python finetune_seg.py configs/seg_btcv.py --datalist=/data/btcv/datalist.json --pretrained=teacher_checkpoint.pth
# Data: Synapse "Multi-Atlas Labeling Beyond the Cranial Vault" (https://www.synapse.org/#!Synapse:syn3193805; a
# Synapse account, see the download page for its terms); docs/datasets.md writes the datalist in one command.
# The authors' weights (docs/pretrained_weights.md): download 3dino_vit_weights.pth from the Hugging Face hub
# (https://huggingface.co/AICONSlab/3DINO-ViT, CC BY-NC-ND 4.0, gated: accept its terms first), then
#   python finetune_seg.py configs/seg_btcv.py --datalist=/data/btcv/datalist.json \
#       --pretrained=3dino_vit_weights.pth
# It is the authors' high-resolution ViT-L/16 (112^3 input, the crop_size default); its architecture is read from
# the file, so no model setting is needed. GPU memory and the intensity scaling: docs/pretrained_weights.md.
# The datalist holds {"training", "validation", "test"} lists of {"image", "label"} (a MONAI-style dataset_0.json
# without "test" works too: the test pass then reports the validation cases). The paper's "Random" baseline (a
# randomly initialised, frozen ViT-L/16): pretrained = None, or --random_init=True with the checkpoint (its
# architecture, initialised as pretraining does).
out_dir = "out/seg_btcv"
datalist = "data/btcv/datalist.json"  # written by the command in docs/datasets.md; its paths are under data_root
in_chans = 1
num_classes = 14
class_names = ["spleen", "right kidney", "left kidney", "gallbladder", "esophagus", "liver", "stomach", "aorta",
               "inferior vena cava", "portal and splenic veins", "pancreas", "right adrenal gland",
               "left adrenal gland"]
target_spacing = (1.5, 1.5, 2.0)  # mm, bilinear / nearest (reference)
ct_window = (-175, 250)  # HU -> [-1, 1], clipped
crop_foreground = True  # drop the air around the body (image > -1), label cropped alike
cache_cases = True  # 30 CT volumes fit in memory comfortably after resampling
# everything else is the script's default = the paper: ViT-Adapter + UNETR head on a frozen ViT-L, 112^3 crops,
# 2 volumes x 4 crops (half on foreground), flips/rot90 p 0.1, shift p 0.5, Dice+CE, AdamW 1e-4, 3000 warm-up
# iterations, cosine over 30000, validation every 600 (overlap 0), test with the best weights (overlap 0.75)
