# CPU smoke run: synthetic phantoms (phantoms.SyntheticVolumes: liver, kidneys, lesions), no files needed, under a minute
# on 2 cores. A tiny random-init ViT with patch 8 on 32^3 crops: the adapter's CNN path and the decoder do the
# learning. 60 steps learn the liver well above chance (its brightness depends on the phantom's contrast phase);
# the small kidneys and lesions need far longer runs.
out_dir = "out/seg_synthetic"
datalist = ""  # synthetic phantoms
num_classes = 4  # background/body, liver, kidneys, lesion
class_names = ["liver", "kidneys", "lesion"]
synthetic_cases = (8, 2, 4)  # training / validation / test
synthetic_shape = (40, 44, 36)  # not a multiple of the crop: the sliding window has to cover the edges
crop_size = 32
samples_per_volume = 2
batch_size = 2
embed_dim = 48  # a tiny ViT: 4 blocks (the adapter needs depth divisible by 4)
depth = 4
num_heads = 2
patch_size = 8
head_kwargs = {"feature_size": 8, "deform_num_heads": 2}  # the adapter's; --head=unetr keeps feature_size,
#                                                         --head=linear drops both (a note names them)
max_iters = 60
warmup_iters = 10
learning_rate = 3e-3  # a short run on an easy task: far above the paper's 1e-4
eval_interval = 30
log_interval = 10
flip_prob = 0.5
num_workers = 0
sw_batch_size = 4
