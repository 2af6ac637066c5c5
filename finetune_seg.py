"""
finetune_seg.py — 3D segmentation on top of a (3DINO-)pretrained ViT: a ViT-Adapter + UNETR decoder (or UNETR,
or a linear head) trained with Dice+CE on crops, evaluated with sliding windows, reported as per-class Dice and
HD95 with bootstrap confidence intervals. The defaults are the paper's BTCV recipe.

    python finetune_seg.py configs/seg_synthetic.py                        # CPU, ~40 s, synthetic phantoms
    python finetune_seg.py configs/seg_hippocampus.py                      # CPU ~5 min, MSD hippocampus, random init
    python finetune_seg.py configs/seg_hippocampus.py --pretrained=out/demo/teacher_backbone.pt --label_fraction=0.1
    python finetune_seg.py configs/seg_hippocampus.py --pretrained=out/demo/teacher_backbone.pt --random_init=True \
        --out_dir=out/seg_hippocampus_random            # the baseline: that checkpoint's architecture, fresh weights
    python finetune_seg.py configs/seg_hippocampus.py --head=linear        # the paper's linear decoder, frozen ViT
    python finetune_seg.py configs/seg_hippocampus.py --head=unetr --freeze_backbone=False   # UNETR, end to end
    python finetune_seg.py configs/seg_hippocampus.py --resume=True        # continue an interrupted run
    python finetune_seg.py configs/seg_hippocampus.py --datalist=/data/Task04_Hippocampus --val_fraction=0.2 \
        --out_dir=out/seg_msd                          # the official MSD layout: validation held out of imagesTr
    python finetune_seg.py configs/seg_btcv.py --datalist=/data/btcv/dataset_0.json --pretrained=teacher_checkpoint.pth
    torchrun --standalone --nproc_per_node=4 finetune_seg.py configs/seg_brats.py --datalist=/data/brats.json \
        --pretrained=teacher_checkpoint.pth

One run:
    check every case of the datalist (files, channels, label shape and values) -> load and normalise
    -> train: batch_size volumes x samples_per_volume crops (half centred on foreground), flips/rot90/intensity,
       Dice+CE (softmax) or sigmoid Dice on label regions (BraTS), AdamW, linear warm-up then cosine
    -> every eval_interval: sliding-window Dice on the validation cases, keep the best weights (best.pt)
    -> test pass with best.pt (overlap 0.75): Dice + HD95 per case and class, bootstrap CIs -> results.json,
       predictions as NIfTI in the geometry of the input file (opens over it in 3D Slicer / ITK-SNAP)

Outputs in out_dir: log.jsonl (config + git SHA first), ckpt.pt (resumable, written at every evaluation),
best.pt (weights with the best validation Dice, and all that segment.py needs to rebuild the segmenter and prepare
a new scan as this run did: adapter.segmenter_from_checkpoint), results.json, predictions/<case>.nii.gz.

Heads: `head` = "vit_adapter_unetr" (the paper's segmenter), "unetr" or "linear" (the paper's linear decoder), any
of them with any config: of a config's `head_kwargs`, the options the chosen head's constructor does not take
(adapter.build_segmenter -> the head class, and adapter.ViTAdapter for "vit_adapter_unetr") but another head does
are dropped with a one-line note naming them; an option no head takes is an error (`head_options`).
The "random init" baseline: `--pretrained=CKPT --random_init=True` builds CKPT's architecture and initialises it as
pretrain.py does its student (same class, init scheme and LayerScale init, seeded by `seed`), so pretrained and
random arms differ in the backbone weights only — the head even starts from the same weights
(`model.random_init_like`).

Differences from the reference, on purpose: the label fraction is a seeded shuffle (the reference
takes the first N cases); background is excluded from every reported Dice; HD95 is computed; bf16 autocast on GPU
(`--dtype=bfloat16` runs it on CPU too).

The reusable pieces live with their concepts: sliding-window inference and the head options in adapter.py, the
Dice losses in losses.py, loading a case and the way back to the input file's grid in data.py.
"""
import json
import math
import os
import random
import sys
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from datetime import timedelta
from functools import partial

import nibabel as nib
import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

import adapter
import augment
import cache
import data
import losses
import metrics
import model
import phantoms
from configurator import ConfigError, check_out_dir, configure, git_sha, hold_out_dir, peak_rss_mb, save_atomic

# -----------------------------------------------------------------------------
# default config values: the paper's BTCV fine-tuning run
# I/O
out_dir = "out/seg"
eval_interval = 600  # iterations between validations (reference: eval_iters 600)
log_interval = 10  # iterations between log lines
resume = False  # continue the run in out_dir from ckpt.pt (an error if there is none)
overwrite = False  # replace the run already in out_dir (without it or resume, an existing run is refused)
stop_at = 0  # > 0: checkpoint and exit at this iteration, as if killed (time-sliced jobs, tests); resume goes on
save_predictions = True  # write the test predictions as NIfTI into out_dir/predictions/
seed = 0
# data
datalist = ""  # JSON {"training", "validation", "test"} of {"image": path | [paths], "label": path}; "" = synthetic
data_root = ""  # the dataset folder the datalist's relative paths are under; "" = the datalist's own folder
in_chans = 1  # channels per case (files in an "image" list, or the 4th axis of one file); checked for every case
num_classes = 14  # label values 0..num_classes-1, 0 = background (BTCV: 13 organs + background)
class_names = None  # optional names of classes 1.. (or of the regions) for results.json
label_fraction = 1.0  # fraction of the training cases used (paper: 1.0, 0.25, 0.1 ...)
split_seed = 0  # shuffles the training list before taking the fraction: same subset for every method, nested
val_fraction = 0.0  # > 0: a datalist with no validation list (MSD's dataset.json) gives this fraction of its
#                     training cases to validation (seeded by split_seed, before label_fraction); 0 = none: an error
target_spacing = None  # resample to this spacing in mm, e.g. (1.5, 1.5, 2.0) for BTCV; None = keep the file's
ct_window = None  # (lo, hi) HU -> [-1, 1] clipped, e.g. (-175, 250) for BTCV; None = percentile scaling per channel
crop_foreground = False  # crop each case to the box of image > -1 (BTCV: removes the air around the body)
cache_cases = True  # keep the prepared cases in memory; False reloads them per sample (large datasets)
num_workers = 4  # DataLoader workers (they load and crop; augmentation runs batched on the device)
synthetic_cases = (24, 4, 8)  # training / validation / test phantoms when datalist == ""
synthetic_shape = (64, 64, 64)
# crops and augmentation
crop_size = 112  # training crop and sliding window, voxels per side (a multiple of 16 and of patch_size)
samples_per_volume = 4  # crops per training volume per step: the batch has batch_size * samples_per_volume crops
pos_neg_crops = True  # half the crops centred on foreground (RandCropByPosNegLabel); False = uniform (BraTS)
flip_prob = 0.1  # per axis (BTCV 0.1; BraTS 0.5)
rot90_prob = 0.1  # rot90 by k in {1, 2, 3} in the (H, W) plane
shift_intensity = 0.1  # x + U(-a, a) ...
shift_prob = 0.5  # ... with this probability (BTCV 0.5; BraTS 1.0)
scale_intensity = 0.0  # x * (1 + U(-a, a)) ... (BTCV: none; BraTS 0.1)
scale_prob = 1.0  # ... with this probability
# model
head = "vit_adapter_unetr"  # "vit_adapter_unetr", "unetr" or "linear" (adapter.build_segmenter)
head_kwargs = {}  # extra keyword arguments of the head (adapter.build_segmenter); those the chosen head does
#                   not take but another does (feature_size for "linear") are dropped with a note
pretrained = None  # teacher export, our checkpoint or a reference 3DINO teacher_checkpoint.pth; None = random init
random_init = False  # with pretrained: its architecture and pretrain.py's init, fresh weights (seeded by seed)
arch = "vit_large"  # random init only: vit_tiny / vit_small / vit_base / vit_large / vit_giant
embed_dim = None  # random init only: None = the arch's; set these three for a custom size (as pretrain.py)
depth = None
num_heads = None
patch_size = 16  # random init only
freeze_backbone = True  # the paper trains the head and adapter on a frozen ViT (--train-feature-model: False)
grad_checkpoint = False  # recompute activations in backward (vit_adapter_unetr: with_cp, adapter and decoder;
#   other heads: a trained ViT's blocks). Frozen ViT-L at 112^3, batch 8, bf16: ~1/3 of the bytes saved for backward
#   (docs/performance.md), for one more forward of all but the SPM. On when a batch does not fit
# loss
loss = "dice_ce"  # "dice_ce", "dice" (softmax over num_classes) or "sigmoid_dice" (overlapping regions)
regions = None  # sigmoid_dice: label values per region, e.g. [[1, 3], [1, 2, 3], [3]] (BraTS TC, WT, ET)
# optimizer
batch_size = 2  # volumes per step and rank (x samples_per_volume crops)
max_iters = 30000  # reference: 100 epochs x 300 iterations
learning_rate = 1e-4
warmup_iters = 3000  # linear warm-up, then cosine to 0 at max_iters, per iteration
weight_decay = 0.01  # AdamW's default, as in the reference
adamw_betas = (0.9, 0.999)
clip_grad = 0.0  # max grad norm; 0 = no clipping (reference)
# evaluation
val_overlap = 0.0  # sliding-window overlap for validation (reference 0: fast)
test_overlap = 0.75  # ... and for the test pass (reference 0.75)
blend = "constant"  # window blending: "constant" (reference) or "gaussian"
sw_batch_size = 2  # windows per forward pass
# system
device = "auto"  # "auto" = cuda if available else cpu; or "cpu", "cuda", "cuda:1"
dtype = "auto"  # autocast dtype: "bfloat16" or "float32"; "auto" = bfloat16 on CUDA, float32 on CPU
threads = 0  # torch CPU threads; 0 = torch's default (all cores). On a busy machine 1 can be several times faster
# -----------------------------------------------------------------------------
config = configure(globals(), sys.argv[1:])
t_start = time.time()
if threads > 0:
    torch.set_num_threads(threads)
for key in ("max_iters", "eval_interval", "log_interval"):  # each an iteration count, used with %
    if not isinstance(config[key], int) or config[key] < 1:
        raise ConfigError(f"{key} must be a positive int, got {config[key]!r}")
if dtype not in ("auto", "bfloat16", "float32"):
    # float16 would need loss scaling (a GradScaler) for its narrow range; bfloat16 has float32's range and needs none
    raise ConfigError(f"dtype must be 'auto', 'bfloat16' or 'float32', got {dtype!r}")
if device.startswith("cuda") and not torch.cuda.is_available():
    raise ConfigError(f"device={device!r} but torch sees no CUDA GPU (torch {torch.__version__}); use --device=cpu")
hold_out_dir(out_dir, int(os.environ.get("RANK", -1)))  # one writer per folder; torchrun ranks die with the launcher
check_out_dir(out_dir, resume, overwrite, ("log.jsonl", "ckpt.pt", "best.pt", "results.json"), "ckpt.pt")
n_out = len(regions) if regions else num_classes  # output channels of the head
if loss not in ("dice_ce", "dice", "sigmoid_dice"):
    raise ConfigError(f"loss must be 'dice_ce', 'dice' or 'sigmoid_dice', got {loss!r}")
if (loss == "sigmoid_dice") != bool(regions):
    raise ConfigError("loss='sigmoid_dice' needs regions (label values per region), and regions need it")
if not 0 < label_fraction <= 1:
    raise ConfigError(f"label_fraction must be in (0, 1], got {label_fraction}")
if not 0 <= val_fraction < 1:
    raise ConfigError(f"val_fraction must be in [0, 1), got {val_fraction}")
if random_init and not pretrained:
    raise ConfigError("random_init=True needs pretrained=<checkpoint> (whose architecture it builds); "
                      "without a checkpoint pretrained=None already means random init of arch")
head_kw, head_kw_dropped = adapter.head_options(head, head_kwargs)  # a typo fails here, before any data is read
if grad_checkpoint and head == "vit_adapter_unetr":
    head_kw["with_cp"] = True

# -----------------------------------------------------------------------------
# DDP, device and dtype (every rank trains on its own crops, validation cases are split over ranks)
ddp = int(os.environ.get("RANK", -1)) != -1
if device == "auto":
    device = "cuda" if torch.cuda.is_available() else "cpu"
if ddp:
    rank, local_rank, world_size = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
    if device.startswith("cuda"):
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(device)
    dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo",
                            timeout=timedelta(hours=2))  # a rank waits while the others validate
else:
    rank, local_rank, world_size = 0, 0, 1
master_process = rank == 0
device_type = "cuda" if device.startswith("cuda") else "cpu"
if dtype == "auto":
    dtype = "bfloat16" if device_type == "cuda" else "float32"
ptdtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[dtype]
autocast = torch.autocast(device_type, dtype=ptdtype) if dtype != "float32" else nullcontext()
if master_process and device_type == "cpu" and dtype != "float32":
    print(f"warning: dtype={dtype} on CPU: reduced-precision autocast has no fast kernels on most CPUs and runs "
          "several times slower than --dtype=float32")
torch.manual_seed(seed + rank)
if master_process:
    os.makedirs(out_dir, exist_ok=True)
    print(f"full config: the first line of {os.path.join(out_dir, 'log.jsonl')}")

# -----------------------------------------------------------------------------
# the checks of every case before anything trains, and the training crops: sample k is a pure function of
# (seed, rank, k), so a resumed run reads the same crops


def check_case(item, in_chans: int, num_classes: int, need_label: bool) -> list[str]:
    """Problems with one datalist item, each naming the case, found by reading every file whole: missing,
    truncated or unreadable files, an image channel with no finite voxel, a channel count other than in_chans,
    channels or label of another shape, no label where one is needed, label values that are not integers in
    [0, num_classes). A constant image (nothing to segment) comes back as a "warning: ..." line."""
    name = data.case_name(item)
    paths = item["image"] if isinstance(item["image"], list) else [item["image"]]
    warnings = []
    try:
        loaded = [data.load_volume(p) for p in paths]  # (x (C, H, W, D), spacing, affine) each
        vols = [x for x, _, _ in loaded]
        for p, x in zip(paths, vols):
            if not np.isfinite(x).reshape(len(x), -1).any(1).all():
                return [f"case {name}: {p} has a channel without a single finite voxel"]
            if data.is_constant(data.fill_nonfinite(x)):
                warnings.append(f"warning: case {name}: {p} is constant (one value everywhere)")
        shape = list(vols[0].shape[1:])
        chans = sum(len(x) for x in vols)
        bad = [p for p, x in zip(paths, vols) if list(x.shape[1:]) != shape]
        if bad:
            return [f"case {name}: channel {bad[0]} has shape {list(vols[paths.index(bad[0])].shape[1:])}, "
                    f"{paths[0]} has {shape}"]
        if chans != in_chans:
            return [f"case {name}: image has {chans} channel(s) ({len(paths)} file(s)), the config says "
                    f"in_chans={in_chans}"]
        label = item.get("label")
        if label is None or isinstance(label, (int, float)):
            return [f"case {name}: no label map"] if need_label else warnings
        lab, _, lab_affine = data.load_volume(label)
        if lab.shape[0] != 1:
            return [f"case {name}: label {label} has {lab.shape[0]} channels, expected one label map"]
        if list(lab.shape[1:]) != shape:
            return [f"case {name}: label {label} has shape {list(lab.shape[1:])}, the image has {shape}"]
        # voxels are paired by index: a label whose grid sits elsewhere in space (another affine) is misaligned
        # in a viewer and, most likely, here too; 1e-3 of a voxel absorbs the float32 header rounding
        _, spacing, affine = loaded[0]
        corners = np.array(np.meshgrid(*[(0, n - 1) for n in shape], [1], indexing="ij")).reshape(4, -1)
        apart = float(np.linalg.norm(((lab_affine - affine) @ corners)[:3], axis=0).max())  # mm
        if apart > 1e-3 * spacing.min():
            warnings.append(f"warning: case {name}: label {label} lies up to {apart:.3g} mm away from its image "
                            f"{paths[0]} (another affine in the header); it is used voxel by voxel as if aligned")
        values = np.unique(lab)
        bad = values[~np.isfinite(values) | (values != np.round(values)) | (values < 0) | (values >= num_classes)]
        if bad.size:
            shown = [int(v) if float(v).is_integer() else float(v) for v in bad[:10]]
            return [f"case {name}: label {label} has values {shown}; expected integers in "
                    f"[0, num_classes={num_classes})"]
    except data.VolumeError as e:
        return [f"case {name}: {e}"]
    return warnings


class TrainCrops(torch.utils.data.Dataset):
    """ds[k] -> {"image": (S, C, c, c, c), "label": (S, c, c, c)}: S crops of crop_size³ from one case.

    Case: the k-th entry of a seeded permutation per pass over the cases (every case once per "epoch").
    Crops (MONAI RandCropByPosNegLabel, pos = neg = 1): each is centred with probability ½ on a random
    foreground voxel (label > 0), else on a random background voxel inside the body (label 0, image > −1), then
    shifted to lie inside the volume; `pos_neg=False` draws uniform crops instead (RandSpatialCropSamples, BraTS).
    `cases` are prepared dicts, or raw datalist items together with `prep` (loaded on every access: slow, but no
    memory for large datasets).
    """

    def __init__(self, cases, crop_size: int, samples_per_volume: int, pos_neg: bool = True, seed: int = 0,
                 rank: int = 0, prep=None):
        self.cases, self.crop, self.n, self.pos_neg = cases, crop_size, samples_per_volume, pos_neg
        self.seed, self.rank, self.prep = seed, rank, prep

    def __len__(self):
        return len(self.cases)

    def __getitem__(self, k: int) -> dict:
        epoch, j = divmod(int(k), len(self.cases))
        perm = np.random.default_rng(data.mix_seed(self.seed, self.rank, epoch, 17)).permutation(len(self.cases))
        case = self.cases[perm[j]]
        case = self.prep(case) if self.prep is not None else case
        img, lab = case["image"], case["label"]
        rng = np.random.default_rng(data.mix_seed(self.seed, self.rank, k))
        shape, c = np.array(lab.shape), self.crop
        fg = np.flatnonzero(lab > 0) if self.pos_neg else None
        crops_x, crops_y = [], []
        for _ in range(self.n):
            if not self.pos_neg:
                start = rng.integers(0, shape - c + 1)
            else:
                center = None
                if rng.random() < 0.5 and fg.size:
                    center = np.array(np.unravel_index(fg[rng.integers(fg.size)], lab.shape))
                else:
                    for _try in range(100):  # rejection sampling: the background is most of the volume
                        v = rng.integers(0, shape)
                        if lab[tuple(v)] == 0 and (img[(slice(None), *v)] > -1).any():
                            center = v
                            break
                    if center is None:
                        center = rng.integers(0, shape)
                start = np.clip(center - c // 2, 0, shape - c)
            sl = tuple(slice(s, s + c) for s in start)
            crops_x.append(img[(slice(None), *sl)])
            crops_y.append(lab[sl])
        return {"image": torch.from_numpy(np.stack(crops_x)),
                "label": torch.from_numpy(np.stack(crops_y).astype(np.int64))}


# -----------------------------------------------------------------------------
# data: the datalist (or synthetic phantoms), the label fraction, checks of every case before anything trains
if datalist:
    dl = data.read_datalist(datalist, root=data_root or None)
else:
    if num_classes != phantoms.SyntheticVolumes.num_classes or in_chans != 1:
        raise ConfigError(f"synthetic phantoms have {phantoms.SyntheticVolumes.num_classes} classes and 1 channel; "
                          f"the config says num_classes={num_classes}, in_chans={in_chans}")
    dl = {}
    for s, (split, n) in enumerate(zip(data.SPLITS, synthetic_cases)):  # a different phantom seed per split
        vols = phantoms.SyntheticVolumes(n, synthetic_shape, seed=1000 * split_seed + s, with_labels=True)
        dl[split] = [{"name": f"synthetic_{split}_{i:03d}", "image": vols[i]["image"].numpy(),
                      "label": vols[i]["label"].numpy()} for i in range(n)]
if not dl["training"]:
    raise ConfigError(f"{datalist}: no training cases")
if not dl["validation"] and val_fraction > 0:  # MSD's dataset.json: every labelled case under "training"
    perm = np.random.default_rng(data.mix_seed(split_seed, 23)).permutation(len(dl["training"]))
    n_val = max(1, round(len(perm) * val_fraction))
    if n_val >= len(perm):
        raise ConfigError(f"{datalist}: val_fraction {val_fraction} of {len(perm)} training case(s) leaves none "
                          "to train on")
    dl["validation"] = [dl["training"][i] for i in sorted(perm[:n_val])]
    dl["training"] = [dl["training"][i] for i in sorted(perm[n_val:])]
    print(f"{datalist}: no validation list: {n_val} of its {len(perm)} training cases are held out for validation "
          f"(val_fraction {val_fraction}, split_seed {split_seed})")
elif val_fraction > 0:
    print(f"{datalist or 'phantoms'}: there is a validation list; val_fraction {val_fraction} is not used")
if not dl["validation"]:
    raise ConfigError(f"{datalist}: no validation cases (the best checkpoint is chosen on them): hold out some "
                      "training cases with --val_fraction=0.2, or add a \"validation\" list")
for w in data.cases_in_two_lists(dl) if master_process else ():
    print(w)
if not dl["test"]:
    print(f"{datalist}: no test split; the test pass reports the validation cases")
    dl["test"] = dl["validation"]
for split in data.SPLITS:
    data.unique_names(dl[split])
order = list(range(len(dl["training"])))
random.Random(split_seed).shuffle(order)  # nested subsets: 10% is a prefix of 25%, which is a prefix of 100%
n_train = max(1, round(len(order) * label_fraction))
splits = {"training": [dl["training"][i] for i in order[:n_train]], "validation": dl["validation"],
          "test": dl["test"]}
if datalist:  # all cases of the datalist, also those outside the label fraction: a broken list fails at once
    jobs = [(it, split != "test") for split in data.SPLITS for it in dl[split]]
    with ThreadPoolExecutor(8) as pool:  # gzip and nibabel release the GIL
        problems = sum(pool.map(lambda j: check_case(j[0], in_chans, num_classes, j[1]), jobs), [])
    for w in [p for p in problems if p.startswith("warning: ")]:
        print(w)
    problems = [p for p in problems if not p.startswith("warning: ")]
    if problems:
        raise data.VolumeError(f"{datalist}: {len(problems)} bad case(s):\n  " + "\n  ".join(problems[:20]))
prep = partial(data.prepare_case, crop_size=crop_size, target_spacing=target_spacing, ct_window=ct_window,
               crop_foreground=crop_foreground)
if cache_cases:
    with ThreadPoolExecutor(4) as pool:
        splits = {k: list(pool.map(prep, v)) for k, v in splits.items()}
get_case = (lambda c: c) if cache_cases else prep
if master_process:
    print(f"cases: {n_train} of {len(dl['training'])} training (label_fraction {label_fraction}), "
          f"{len(splits['validation'])} validation, {len(splits['test'])} test")
train_set = TrainCrops(splits["training"], crop_size, samples_per_volume, pos_neg_crops, seed, rank,
                       None if cache_cases else prep)

# -----------------------------------------------------------------------------
# model: pretrained (or random) ViT -> segmenter; the frozen backbone stays in eval mode
if pretrained and random_init:
    vit = model.random_init_like(pretrained, seed)  # the pretraining's start: same architecture and init scheme
    backbone_desc = f"random init of {pretrained}'s architecture"
elif pretrained:
    vit = model.vit_from_checkpoint(pretrained)
    backbone_desc = pretrained
else:
    kw = dict(img_size=crop_size, patch_size=patch_size)
    vit = model.ARCHS[arch](**kw) if embed_dim is None else model.ViT3D(embed_dim=embed_dim, depth=depth,
                                                                        num_heads=num_heads, **kw)
    backbone_desc = "random init"
if freeze_backbone:
    vit.requires_grad_(False)
if grad_checkpoint and head != "vit_adapter_unetr":
    vit.grad_checkpointing = True  # the ViT's own: acts only while it trains (freeze_backbone=False)
if head_kw_dropped and master_process:
    print(f"head {head!r} does not take head_kwargs {head_kw_dropped} (options of another head): dropped")
net = adapter.build_segmenter(head, vit, in_chans, n_out, **head_kw).to(device)
raw_net = net  # unwrapped, for checkpoints and evaluation


def train_mode():
    raw_net.train()
    if freeze_backbone:
        raw_net.vit.eval()  # no dropout / drop path / batch-stat updates in a frozen backbone


n_params = sum(p.numel() for p in net.parameters())
n_train_params = sum(p.numel() for p in net.parameters() if p.requires_grad)
if master_process:
    print(f"segmenter: {n_params / 1e6:.2f}M parameters, {n_train_params / 1e6:.2f}M trained "
          f"(backbone {'frozen' if freeze_backbone else 'trained'}, from {backbone_desc})")

# -----------------------------------------------------------------------------
# optimizer and schedule
optimizer = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=learning_rate,
                              betas=adamw_betas, weight_decay=weight_decay)


def get_lr(it):
    """Linear warm-up to learning_rate over warmup_iters, then ½(1 + cos(π·progress)) down to 0 at max_iters."""
    if it < warmup_iters:
        return learning_rate * (it + 1) / (warmup_iters + 1)
    progress = (it - warmup_iters) / max(1, max_iters - warmup_iters)
    return learning_rate * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


# -----------------------------------------------------------------------------
# resume


ckpt_path, best_path = os.path.join(out_dir, "ckpt.pt"), os.path.join(out_dir, "best.pt")
iter_num, best_val, best_iter, loss_sum, n_loss = 0, -1.0, -1, 0.0, 0
history = {"iters": [], "train_loss": [], "val_dice": [], "val_dice_per_class": []}
if resume:
    ckpt = torch.load(ckpt_path, map_location=device, weights_only=True)
    shape_keys = ("head", "head_kwargs", "pretrained", "arch", "embed_dim", "depth", "num_heads", "patch_size",
                  "in_chans", "num_classes", "regions", "crop_size", "freeze_backbone")
    changed = [f"{k}: checkpoint {ckpt['config'][k]!r}, now {config[k]!r}" for k in shape_keys
               if k in ckpt.get("config", {}) and ckpt["config"][k] != config[k]]
    if changed:
        raise ConfigError(f"resume: {ckpt_path} was trained with other settings ({'; '.join(changed)}); "
                          "resume with its settings, or start a new run")
    raw_net.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    iter_num, best_val, best_iter, history = ckpt["iter_num"], ckpt["best_val"], ckpt["best_iter"], ckpt["history"]
    loss_sum, n_loss = ckpt["loss_sum"], ckpt["n_loss"]  # the running train loss since the last evaluation
    # (every step re-seeds its RNGs from (seed, rank, iter_num) below; the states are restored for anything else)
    torch.set_rng_state(ckpt["rng_cpu"].cpu())  # map_location put it on the device
    if device_type == "cuda" and "rng_cuda" in ckpt:
        torch.cuda.set_rng_state(ckpt["rng_cuda"].cpu(), device)
    if master_process:
        print(f"resumed from {ckpt_path} at iteration {iter_num} (best validation Dice {best_val:.4f})")
start_iter = iter_num
validated_at = start_iter if start_iter > 0 else None  # a resumed run: the stopped run validated there (if due)


def save_checkpoint():
    ckpt = {"model": raw_net.state_dict(), "optimizer": optimizer.state_dict(), "iter_num": iter_num,
            "best_val": best_val, "best_iter": best_iter, "history": history, "loss_sum": loss_sum,
            "n_loss": n_loss, "config": config, "rng_cpu": torch.get_rng_state()}
    if device_type == "cuda":
        ckpt["rng_cuda"] = torch.cuda.get_rng_state(device)
    save_atomic(ckpt, ckpt_path)


if ddp:
    net = torch.nn.parallel.DistributedDataParallel(net, device_ids=[local_rank] if device_type == "cuda" else None)

# -----------------------------------------------------------------------------
# evaluation: sliding windows over each whole (padded) case, metrics on the unpadded voxels


def predict(logits):
    """(1, K, H, W, D) logits -> (H, W, D) class map, or (H, W, D, R) region masks (sigmoid > 0.5)."""
    if regions:
        return (logits[0] > 0).permute(1, 2, 3, 0).to(torch.uint8).cpu().numpy()  # (R, ...) -> (..., R)
    return logits[0].argmax(0).to(torch.uint8 if n_out <= 256 else torch.int16).cpu().numpy()


def case_metrics(pred, label, spacing, with_hd95):
    """Per-class (or per-region) Dice and HD95 of one case, arrays over classes 1.. (NaN where undefined:
    absent from both label and prediction). HD95 of a structure missed or hallucinated outright (one mask
    empty) is the volume's diagonal in mm, so misses count against the mean instead of vanishing from it."""
    diag = float(np.linalg.norm(np.array(label.shape) * spacing))
    if regions:
        lab = np.stack([np.isin(label, r) for r in regions], -1).astype(np.uint8)
        d = np.array([metrics.dice(pred[..., r], lab[..., r], 2)[0] for r in range(len(regions))])
        h = np.array([metrics.hd95(pred[..., r], lab[..., r], 2, spacing, empty=diag)[0]
                      for r in range(len(regions))]) if with_hd95 else None
        return d, h
    d = metrics.dice(pred, label, num_classes)
    return d, metrics.hd95(pred, label, num_classes, spacing, empty=diag) if with_hd95 else None


@torch.no_grad()
def evaluate(cases, overlap, with_hd95=False, pred_dir=None, desc="validation"):
    """Rows {"case", "dice", "hd95", "prediction"} for every case; the ranks split the cases, then gather."""
    raw_net.eval()
    rows = []
    for i in tqdm(range(rank, len(cases), world_size), desc=desc, leave=False, disable=not master_process):
        case = get_case(cases[i])
        x = torch.from_numpy(case["image"])[None].to(device)  # (1, C, H, W, D)
        with autocast:
            logits = adapter.sliding_window_inference(x, crop_size, raw_net, overlap, blend, sw_batch_size,
                                                      progress=master_process)  # a bar of windows under the cases
        pred = predict(logits)[case["inner"]]  # padding cropped away
        row = {"case": case["name"], "index": i, "dice": None, "hd95": None, "prediction": None}
        if case["label"] is not None:
            d, h = case_metrics(pred, case["label"][case["inner"]], case["spacing"], with_hd95)
            row["dice"], row["hd95"] = d.tolist(), None if h is None else h.tolist()
        if pred_dir:
            arr, affine = data.to_input_grid(pred, case)
            row["prediction"] = os.path.join(pred_dir, f"{case['name']}.nii.gz")
            nib.save(nib.Nifti1Image(arr, affine), row["prediction"])
        rows.append(row)
    if dist.is_initialized():
        gathered = [None] * world_size
        dist.all_gather_object(gathered, rows)
        rows = sorted(sum(gathered, []), key=lambda r: r["index"])
    train_mode()
    return rows


def summary(rows, key):
    """(mean over cases per class, each case's mean over its classes); NaN (undefined) entries are skipped."""
    v = np.array([r[key] for r in rows if r[key] is not None], dtype=np.float64)  # (cases, classes)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN rows/columns: the mean stays NaN
        return np.nanmean(v, 0), np.nanmean(v, 1)


def none_if_nan(v):
    """JSON has no NaN: an undefined score (a class absent from both label and prediction) is written as null."""
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else v


def json_floats(values):
    return [none_if_nan(float(v)) for v in values]


def test_scores(rows, key):
    """results.json's test_<key>_mean and _ci (bootstrap over the cases' means), _per_class and _per_class_ci."""
    per_class, per_case = summary(rows, key)
    values = np.array([r[key] for r in rows if r[key] is not None], dtype=np.float64)  # (cases, classes)
    mean, lo, hi = metrics.bootstrap_ci(per_case, n_boot=1000, seed=seed)
    cis = [metrics.bootstrap_ci(values[:, c], n_boot=1000, seed=seed) for c in range(values.shape[1])]
    return {f"test_{key}_mean": none_if_nan(mean), f"test_{key}_ci": json_floats([lo, hi]),
            f"test_{key}_per_class": json_floats(per_class),
            f"test_{key}_per_class_ci": [json_floats(ci[1:]) for ci in cis]}


def case_scores(row):
    """One test case for results.json: its Dice and HD95 per class (None for an unlabelled case)."""
    return {"case": row["case"], "dice": row["dice"] and json_floats(row["dice"]),
            "hd95": row["hd95"] and json_floats(row["hd95"]), "prediction": row["prediction"]}


def f4(v):
    return "n/a" if v is None else f"{v:.4f}"


# -----------------------------------------------------------------------------
# logging


def log_line(d):
    if "config" not in d:  # every row: wall seconds since start and the process's peak resident memory
        d = {**d, "elapsed_s": round(time.time() - t_start, 1), "peak_rss_mb": peak_rss_mb()}
    with open(os.path.join(out_dir, "log.jsonl"), "a") as f:
        f.write(json.dumps(d) + "\n")


if master_process and start_iter == 0:
    open(os.path.join(out_dir, "log.jsonl"), "w").close()
    log_line({"config": config, "git_sha": git_sha(), "world_size": world_size, "backbone": backbone_desc,
              "head_kwargs_used": head_kw})

# -----------------------------------------------------------------------------
# training loop: validate at 0, every eval_interval and at the end; then train one step


def jitter(a, p, n, gen):
    """n draws of U(-a, a), each kept with probability p (else 0): the intensity augmentations' amounts."""
    return (torch.rand(n, generator=gen) * 2 - 1) * a * (torch.rand(n, generator=gen) < p)


# sample counters k = iter_num·batch_size, ...: a resumed run reads the crops an uninterrupted one would have read
loader = torch.utils.data.DataLoader(train_set, batch_size=batch_size, num_workers=num_workers,
                                     sampler=cache.StepSampler(iter_num * batch_size),
                                     pin_memory=device_type == "cuda")
batches = iter(loader)
pbar = None
if master_process:

    pbar = tqdm(total=max_iters, initial=iter_num, dynamic_ncols=True, desc="finetune")
train_mode()
t_last, n_since = time.perf_counter(), 0
if device_type == "cuda":
    torch.cuda.reset_peak_memory_stats(device)
while True:
    if (iter_num % eval_interval == 0 or iter_num == max_iters) and iter_num != validated_at:
        t_eval = time.perf_counter()
        rows = evaluate(splits["validation"], val_overlap)
        per_class, per_case = summary(rows, "dice")
        val_dice = float(np.nanmean(per_case))
        history["iters"].append(iter_num)
        history["train_loss"].append(loss_sum / max(n_loss, 1) if n_loss else None)
        history["val_dice"].append(val_dice)
        history["val_dice_per_class"].append(per_class.tolist())
        loss_sum, n_loss = 0.0, 0
        if val_dice > best_val:
            best_val, best_iter = val_dice, iter_num
            if master_process:  # self-contained: "segmenter" holds adapter.SEGMENTER_KEYS (segment.py reads them)
                seg_meta = {"vit_args": raw_net.vit.args, "head": head, "head_kw": head_kw, "in_chans": in_chans,
                            "n_out": n_out, "regions": regions, "num_classes": num_classes,
                            "class_names": class_names, "crop_size": crop_size, "target_spacing": target_spacing,
                            "ct_window": ct_window, "crop_foreground": crop_foreground, "blend": blend,
                            "test_overlap": test_overlap, "sw_batch_size": sw_batch_size}
                save_atomic({"model": raw_net.state_dict(), "iter_num": iter_num, "val_dice": val_dice,
                             "config": config, "segmenter": seg_meta}, best_path)
        if master_process:
            save_checkpoint()
            log_line({"iter": iter_num, "val_dice": val_dice, "val_dice_per_class": per_class.tolist(),
                      "best_val_dice": best_val, "best_iter": best_iter})
            tqdm.write(f"iter {iter_num}: validation Dice {val_dice:.4f} (per class "
                       f"{np.round(per_class, 3).tolist()}), best {best_val:.4f} at {best_iter}")
        dt_eval = time.perf_counter() - t_eval
        t_last += dt_eval  # the next log row's crops_per_s counts training time only
        if pbar is not None:  # and so do the bar's rate and ETA: its clocks skip this validation
            pbar.start_t += dt_eval
            pbar.last_print_t += dt_eval
    if iter_num == max_iters or (stop_at and iter_num == stop_at):
        break

    # one step: batch_size volumes x samples_per_volume crops, augmented on the device
    # every random draw of step `iter_num` derives from (seed, rank, iter_num): the crops (sample counters),
    # the augmentation generator and the global RNG (dropout, drop path), so a resumed run replays it exactly
    torch.manual_seed(seed + 7919 * rank + 1_000_003 * iter_num)
    gen = torch.Generator().manual_seed(data.mix_seed(seed, rank, iter_num, 1))
    lr = get_lr(iter_num)
    for g in optimizer.param_groups:
        g["lr"] = lr
    batch = next(batches)
    x = batch["image"].flatten(0, 1).to(device, non_blocking=True)  # (B, S, C, c, c, c) -> (B·S, C, c, c, c)
    y = batch["label"].flatten(0, 1).to(device, non_blocking=True)  # (B·S, c, c, c)
    xy = torch.cat([x, y[:, None].float()], 1)  # the label rides along as a channel: same flips and rotations
    n = xy.shape[0]
    plan = sum((augment.plan_flip(n, axis, flip_prob, gen) for axis in range(3)), [])
    xy = augment.run_plan(xy, plan + augment.plan_rot90(n, (0, 1), rot90_prob, gen))
    x, y = xy[:, :-1], xy[:, -1].round().long()
    x = x * (1 + jitter(scale_intensity, scale_prob, n, gen).to(device).view(-1, 1, 1, 1, 1))  # RandScaleIntensity
    x = x + jitter(shift_intensity, shift_prob, n, gen).to(device).view(-1, 1, 1, 1, 1)  # RandShiftIntensity
    with autocast:
        logits = net(x)
    loss_t = losses.seg_loss(logits, y, loss, regions)
    if not torch.isfinite(loss_t):
        raise FloatingPointError(f"non-finite loss at iteration {iter_num}; the last checkpoint {ckpt_path} "
                                 "is intact (try a lower learning_rate)")
    optimizer.zero_grad(set_to_none=True)
    loss_t.backward()
    if clip_grad > 0:
        torch.nn.utils.clip_grad_norm_([p for p in raw_net.parameters() if p.requires_grad], clip_grad)
    optimizer.step()
    iter_num += 1
    loss_sum, n_loss, n_since = loss_sum + loss_t.item(), n_loss + 1, n_since + 1

    if master_process:
        pbar.update(1)
        if iter_num % log_interval == 0 or iter_num == max_iters:
            dt = time.perf_counter() - t_last
            rec = {"iter": iter_num, "loss": loss_t.item(), "lr": lr,
                   "crops_per_s": n_since * n * world_size / dt}
            if device_type == "cuda":
                rec["peak_mem_gb"] = torch.cuda.max_memory_allocated(device) / 2 ** 30
            log_line(rec)
            pbar.set_postfix(loss=f"{rec['loss']:.4f}", lr=f"{lr:.2e}")
            t_last, n_since = time.perf_counter(), 0
    if stop_at and iter_num == stop_at and iter_num % eval_interval != 0 and master_process:
        save_checkpoint()  # stopping between evaluations: keep this step

if pbar is not None:
    pbar.close()

# -----------------------------------------------------------------------------
# test pass with the best checkpoint -> results.json and NIfTI predictions
if iter_num == max_iters:
    if os.path.exists(best_path):  # absent only if no validation Dice was ever defined (all NaN)
        raw_net.load_state_dict(torch.load(best_path, map_location=device, weights_only=True)["model"])
    pred_dir = os.path.join(out_dir, "predictions") if save_predictions else None
    if pred_dir:
        os.makedirs(pred_dir, exist_ok=True)
    rows = evaluate(splits["test"], test_overlap, with_hd95=True, pred_dir=pred_dir, desc="test")
    if master_process:
        res = {"config": config, "git_sha": git_sha(), "backbone": backbone_desc, "best_iter": best_iter,
               "best_val_dice": best_val, "class_names": class_names, "n_train_cases": n_train,
               "hd95_note": "mm on the processed grid; a structure present in only one of prediction and "
                            "label scores the volume diagonal; NaN/null where absent from both",
               "train_cases": [data.case_name(c) for c in splits["training"]],
               "iters_list": history["iters"], "train_loss_list": history["train_loss"],
               "val_dice_list": history["val_dice"], "val_per_cls_dice_list": history["val_dice_per_class"]}
        if any(r["dice"] is not None for r in rows):  # unlabelled test cases: no scores
            res.update(test_scores(rows, "dice"))
            res.update(test_scores(rows, "hd95"))
        res["test_cases"] = [case_scores(r) for r in rows]
        with open(os.path.join(out_dir, "results.json"), "w") as f:
            json.dump(res, f, indent=1)
        log_line({"iter": iter_num, "test_dice_mean": res.get("test_dice_mean"),
                  "test_hd95_mean": res.get("test_hd95_mean")})
        if "test_dice_mean" in res:
            print(f"test ({len(rows)} cases, best iteration {best_iter}): Dice {f4(res['test_dice_mean'])} "
                  f"[{f4(res['test_dice_ci'][0])}, {f4(res['test_dice_ci'][1])}], per class "
                  f"{[f4(v) for v in res['test_dice_per_class']]}; HD95 {f4(res['test_hd95_mean'])} mm")
        print(f"wrote {os.path.join(out_dir, 'results.json')}")
elif master_process:
    print(f"stopped at iteration {iter_num} (stop_at); continue with --resume=True")

# -----------------------------------------------------------------------------
# cleanup
if ddp:
    dist.destroy_process_group()
