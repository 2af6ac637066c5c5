"""
linear_probe.py — linear classification probing of a frozen 3D ViT (paper "Linear classification probing"):
features once, 52 linear classifiers at once, selection on validation, AUC/F1 on test.

    python linear_probe.py configs/probe_synthetic.py          # CPU, ~1 min: lesion / no lesion phantoms, random ViT
    python linear_probe.py configs/probe_hippocampus.py        # CPU, ~3 min: MSD hippocampus, random ViT-S/16
    python linear_probe.py configs/probe_hippocampus.py --pretrained=out/demo/teacher_backbone.pt \\
        --out_dir=out/probe_hippocampus_pretrained                                       # the same with a checkpoint
    python linear_probe.py configs/probe_hippocampus.py --pretrained=out/demo/teacher_backbone.pt \\
        --random_init=True --out_dir=out/probe_hippocampus_random     # its architecture, random weights (baseline)
    python linear_probe.py configs/probe_covid.py --datalist=covid.json --pretrained=3dino_vitl.pth   # paper (GPU)
    python linear_probe.py configs/probe_icbm.py --datalist=icbm.json --pretrained=3dino_vitl.pth     # paper (GPU)

The protocol (the defaults are the paper's run: batch 32, 12 500 iterations, eval every 50, 112^3 input):
1. Every volume is loaded as in finetune_seg (`data.load_case`: RAS orientation, percentile scaling to [-1, 1],
   foreground crop), resized trilinearly to image_size^3 (or to `resize_to`, then centre-cropped; or, with
   resize_to=None, padded with -1 / centre-cropped at its own voxel size).
2. The frozen backbone turns each volume into features ONCE: the CLS tokens of the last 4 blocks and the mean of the
   last block's patch tokens (`get_intermediate_layers(x, n=4, return_class_token=True)`, final LayerNorm
   applied). The reference recomputes them at every step (12 500 x 32 forward passes); the backbone is frozen and
   the val/test view is deterministic, so caching computes the same thing once. With augment=True each training
   volume gets `n_aug_views` random views, each encoded once; a training sample then draws one of them (the
   reference draws a fresh view per step; K fixed views approximate that at K forward passes per volume).
   Multi-channel volumes go through a 1-channel backbone with the channels folded into the batch; the per-channel
   features are concatenated (channel-major), so the classifier sees every modality separately.
3. 52 linear classifiers are trained jointly on the cached features, all on the same batches: 4 inputs
   (CLS of the last 1 or 4 blocks, each with or without the averaged patch tokens: E, 2E, 4E, 5E dims)
   x 13 learning rates, loss = the sum of their cross-entropies. SGD momentum 0.9, no weight decay, cosine
   schedule to 0 over max_iters, per iteration; init N(0, 0.01), bias 0.
4. Every eval_interval iterations all 52 are scored on validation (top-1 accuracy as in the reference, or macro
   AUC with select_metric="auc"); the whole set is kept whenever the best score improves. At the end that set is
   restored, the best classifier re-selected on validation (ties: the first in head order) and only it is
   evaluated on test: macro one-vs-rest ROC AUC of the softmax probabilities (ties count 1/2, i.e. the Mann-Whitney
   U / (n_pos n_neg)), macro F1 and accuracy of the argmax, confusion matrix (metrics.py).
5. n_runs runs with seeds seed, seed+1, ...: each draws its own classifier init, batch order and training subset
   (label_fraction); with split_per_run also its own train/val/test split. The summary is the mean and a t-based
   95% CI over runs (mean +- t_{0.975, n-1} sd / sqrt(n); with 5 runs a percentile bootstrap is too narrow).

Inputs are checked before any backbone work: every label an int in [0, num_classes), every class present in every
validation set (a class with no validation example cannot be selected for), every file readable (header), and in
the feature pass every volume (errors name the case). Outputs in out_dir: results.json (config, task, per-run
results with the test probabilities, summary), log.jsonl (config, then one line per evaluation), classifiers.pt
(the selected classifier of each run).
"""
import json
import math
import os
import sys
import time
from contextlib import nullcontext

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from scipy import stats
from tqdm import tqdm

import augment
import data
import metrics
import model
from phantoms import SyntheticVolumes

# -----------------------------------------------------------------------------
# default config values: the paper's linear-probing run (reference README: 100 epochs x 125 it, batch 32)
# I/O
out_dir = "out/probe"
overwrite = False  # replace the results already in out_dir (otherwise a second run there is refused)
seed = 0  # run r uses seed + r: classifier init, batch order, training subset, augmented views
n_runs = 5  # the paper reports 5 randomised runs
# data
datalist = ""  # JSON {"training","validation","test"} of {"image", "label": int}, a dataset folder; "" = phantoms
data_root = ""  # the dataset folder the datalist's relative paths are under; "" = the datalist's own folder
num_classes = 2  # labels must be ints in [0, num_classes)
class_names = ()  # names for the report, e.g. ("Normal", "COVID-19", "Cap"); () = "0", "1", ...
label_from_map = 0  # > 0: derive a binary label from each case's label map: 1 if its count of voxels equal to this
#                     value is above the median over all cases (the hippocampus task), 0 otherwise
split = ()  # (n_train, n_val, n_test): split all listed cases at random (split_seed); () = the datalist's lists
split_seed = 0
split_per_run = False  # with split: run r re-splits with split_seed + r (the CI then includes split variability)
label_fraction = 1.0  # fraction of the training list each run uses (a random subset per run; paper: 1%-100%)
synthetic_n = (64, 32, 32)  # datalist "": (train, val, test) phantoms; label 1 = lesions in the liver
synthetic_size = 32  # phantom edge length (voxels)
ct_window = None  # (lo, hi) HU -> [-1, 1] clipped; None = per-channel percentile scaling 0.05/99.95 (reference)
target_spacing = None  # resample to this spacing (mm) before cropping; None = keep the file's (reference)
image_size = 112  # the backbone input is image_size^3 (a multiple of the patch size)
resize_to = ()  # () = resize the foreground crop to image_size^3 (ICBM); (H, W, D) = resize to it, then centre
#                 crop image_size^3 (COVID-CT-MD: (144, 144, 112)); None = no resize: pad with -1 / centre crop
#                 to image_size^3 at the file's voxel size (keeps physical size, which a volume task needs)
augment_train = False  # random training views (crop offset, flips, OneOf{gamma, sharpen, smooth, noise} p 0.3,
#                        scale +-10%, shift +-0.1); each of n_aug_views encoded once per volume
n_aug_views = 8
# model
pretrained = None  # a teacher export (pretrain.py) or reference 3DINO checkpoint; None = random `arch`
random_init = False  # with pretrained: build its architecture but keep random weights (the baseline)
arch = "vit_large"  # used when pretrained is None: vit_tiny / vit_small / vit_base / vit_large / vit_giant
patch_size = 16
feature_batch = 8  # volumes per backbone forward pass
dtype = "auto"  # backbone autocast: "bfloat16" or "float32"; "auto" = bfloat16 on CUDA, float32 on CPU
# classifiers and optimisation
lrs = (1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2, 0.1)  # each x batch_size / 256
batch_size = 32
max_iters = 12_500
eval_interval = 50
select_metric = "accuracy"  # "accuracy" (reference: top-1 on validation) or "auc" (macro AUC on validation)
# system
device = "auto"  # "auto" = cuda if available else cpu; or "cpu", "cuda", "cuda:1"
threads = 0  # torch CPU threads for the feature pass; 0 = torch's default (the classifiers always use 1 on CPU)
# -----------------------------------------------------------------------------
from configurator import (ConfigError, check_out_dir, configure, git_sha, hold_out_dir, peak_rss_mb,  # noqa: E402
                          save_atomic)

config = configure(globals(), sys.argv[1:])
hold_out_dir(out_dir)  # one writer per folder (the probe is one process, never a torchrun rank)
check_out_dir(out_dir, False, overwrite, ("results.json", "log.jsonl", "classifiers.pt"), "")  # it cannot resume
if threads > 0:
    torch.set_num_threads(threads)
for key in ("max_iters", "eval_interval", "n_runs", "batch_size"):
    if not isinstance(config[key], int) or config[key] < 1:
        raise ConfigError(f"{key} must be a positive int, got {config[key]!r}")
if dtype not in ("auto", "bfloat16", "float32"):
    # the scripts' one policy (float16 would need loss scaling where they train); the probe then reads its features
    # in the precision pretraining computed them in
    raise ConfigError(f"dtype must be 'auto', 'bfloat16' or 'float32', got {dtype!r}")
if device.startswith("cuda") and not torch.cuda.is_available():
    raise ConfigError(f"device={device!r} but torch sees no CUDA GPU (torch {torch.__version__}); use --device=cpu")
# derived values, visible after the overrides
class_names = tuple(class_names) or tuple(str(k) for k in range(num_classes))
scaled_lrs = [lr * batch_size / 256 for lr in lrs]  # reference: lr x batch x world_size / 256
if num_classes < 2:
    raise ConfigError(f"num_classes must be >= 2, got {num_classes}")
if select_metric not in ("accuracy", "auc"):
    raise ConfigError(f"select_metric must be 'accuracy' or 'auc', got {select_metric!r}")
if len(class_names) != num_classes:
    raise ConfigError(f"class_names has {len(class_names)} names for num_classes = {num_classes}")
if image_size % patch_size:
    raise ConfigError(f"image_size {image_size} is not a multiple of patch_size {patch_size}")
if not 0 < label_fraction <= 1:
    raise ConfigError(f"label_fraction must be in (0, 1], got {label_fraction}")
os.makedirs(out_dir, exist_ok=True)
t_start = time.time()

# -----------------------------------------------------------------------------
# DDP, device and dtype: one process (no DDP: the features are one pass over the cases, the classifiers tiny)
ddp = int(os.environ.get("RANK", -1)) != -1
if device == "auto":
    device = "cuda" if torch.cuda.is_available() else "cpu"
if ddp:
    raise ConfigError("linear_probe.py runs as one process: start it with python, not torchrun")
device_type = "cuda" if device.startswith("cuda") else "cpu"
if dtype == "auto":
    dtype = "bfloat16" if device_type == "cuda" else "float32"
ptdtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[dtype]
autocast = torch.autocast(device_type, dtype=ptdtype) if dtype != "float32" else nullcontext()
if device_type == "cpu" and dtype != "float32":
    print(f"warning: dtype={dtype} on CPU: reduced-precision autocast has no fast kernels on most CPUs and runs "
          "several times slower than --dtype=float32")
torch.manual_seed(seed)

# -----------------------------------------------------------------------------
# data: one list of cases with int labels, the splits of every run, all checked before any backbone work


def case_name(item):
    img = item.get("name", item["image"])
    return os.path.basename(img[0] if isinstance(img, (list, tuple)) else str(img))


if datalist:
    dl = data.read_datalist(datalist, root=data_root or None)
    for name, items in dl.items():  # MSD's imagesTs: no label, nothing to train or score on
        unlabelled = [item for item in items if item.get("label") is None]
        if unlabelled:
            print(f"{datalist}: {len(unlabelled)} unlabelled case(s) of the {name} list left out "
                  f"(e.g. {case_name(unlabelled[0])})")
            dl[name] = [item for item in items if item.get("label") is not None]
    for w in data.cases_in_two_lists(dl):
        print(w)
    cases = dl["training"] + dl["validation"] + dl["test"]
    listed = [np.arange(len(dl["training"])), len(dl["training"]) + np.arange(len(dl["validation"])),
              len(dl["training"]) + len(dl["validation"]) + np.arange(len(dl["test"]))]
else:  # the synthetic task: lesions (label_cls 1) or not, a small structure a global feature must notice
    phantoms = SyntheticVolumes(sum(synthetic_n), (synthetic_size,) * 3, seed=seed)
    cases = []
    for i in tqdm(range(len(phantoms)), desc="phantoms"):
        p = phantoms[i]
        cases.append({"image": p["image"], "label": p["label_cls"], "name": f"phantom_{i:03d}"})
    listed = np.split(np.arange(len(cases)), np.cumsum(synthetic_n)[:-1])
if not cases:
    raise ConfigError(f"datalist {datalist!r} has no cases")

if label_from_map:  # derived label: is this case's structure `label_from_map` larger than the median case's?
    counts = []
    for item in tqdm(cases, desc=f"label maps (value {label_from_map})"):
        if not isinstance(item.get("label"), str):
            raise ConfigError(f"{case_name(item)}: label_from_map needs a label map path, got {item.get('label')!r}")
        lab = data.load_volume(item["label"])[0]  # (1, H, W, D); errors name the file
        counts.append(int((lab == label_from_map).sum()))
    median = float(np.median(counts))
    for item, c in zip(cases, counts):
        item["label"], item["voxels"] = int(c > median), c
    print(f"label_from_map={label_from_map}: median {median:.1f} voxels, {sum(c > median for c in counts)} of "
          f"{len(counts)} cases above it (label 1)")

for item in cases:  # every label an int class index
    lab = item.get("label")
    if not isinstance(lab, (int, np.integer)) or isinstance(lab, bool) or not 0 <= lab < num_classes:
        hint = " (a label map? set label_from_map)" if isinstance(lab, str) else ""
        raise ConfigError(f"{case_name(item)}: label {lab!r} is not a class index in [0, {num_classes}) "
                          f"{list(class_names)}{hint}")
labels = torch.tensor([int(item["label"]) for item in cases])

run_splits = []  # (train, val, test) case indices of every run
for r in range(n_runs):
    if split:
        if sum(split) > len(cases):
            raise ConfigError(f"split {tuple(split)} needs {sum(split)} cases, the datalist has {len(cases)}")
        perm = np.random.default_rng(split_seed + (r if split_per_run else 0)).permutation(len(cases))
        tr, va, te = np.split(perm[: sum(split)], np.cumsum(split)[:-1])
    else:
        tr, va, te = listed
    # the paper's label fractions: a random subset of the training list, its own per run
    n_keep = max(1, round(len(tr) * label_fraction))
    tr = np.sort(np.random.default_rng(data.mix_seed(seed + r, 1)).permutation(tr)[:n_keep])
    run_splits.append((tr, va, te))

for r, (tr, va, te) in enumerate(run_splits):
    for name, idx in (("training", tr), ("validation", va), ("test", te)):
        if len(idx) == 0:
            hint = "" if split else " (split=(n_train, n_val, n_test) splits all the labelled cases at random)"
            raise ConfigError(f"run {r}: the {name} list is empty{hint}")
        missing = [class_names[k] for k in range(num_classes) if not (labels[idx] == k).any()]
        if missing and name == "validation":  # selection could never reward a classifier for these classes
            raise ConfigError(f"run {r}: no validation example of class(es) {missing}; every class needs one")
        if name == "test" and len(missing) >= num_classes - 1:
            raise ConfigError(f"run {r}: the test list has a single class, AUC is undefined")
        if missing:
            print(f"warning: run {r}: no {name} example of class(es) {missing}")

channels = {}  # readable headers and one channel count now, not after an hour of feature extraction
for item in cases:
    if isinstance(item["image"], torch.Tensor):
        channels[case_name(item)] = item["image"].shape[0]
    else:
        heads = [data.describe_volume(p) for p in (item["image"] if isinstance(item["image"], (list, tuple))
                                                   else [item["image"]])]  # VolumeError names the file
        channels[case_name(item)] = sum(h["shape"][3] if len(h["shape"]) > 3 else 1 for h in heads)
counts = sorted(set(channels.values()))
if len(counts) > 1:
    odd = [f"{n} ({c})" for n, c in channels.items() if c != max(counts, key=list(channels.values()).count)]
    raise ConfigError(f"the cases have different channel counts {counts}; these differ from the rest: "
                      + ", ".join(odd[:20]))
in_train = np.unique(np.concatenate([tr for tr, _, _ in run_splits]))  # cases that need augmented views
print(f"{len(cases)} cases, {num_classes} classes {list(class_names)}, "
      f"counts {torch.bincount(labels, minlength=num_classes).tolist()}; run 0: {len(run_splits[0][0])} train / {len(run_splits[0][1])} val / {len(run_splits[0][2])} test")


constant_warned = set()


def load_image(item):
    """Case -> (C, h, w, d) float32 tensor in [-1, 1], foreground-cropped (finetune_seg's preprocessing)."""
    if isinstance(item["image"], torch.Tensor):  # a phantom, already normalised
        x = item["image"]
        return x[(slice(None), *data.foreground_box(x.numpy()))]
    case = data.load_case(item["image"], target_spacing=target_spacing, ct_window=ct_window, crop_to_foreground=True)
    if data.is_constant(case["image"]) and case_name(item) not in constant_warned:
        constant_warned.add(case_name(item))
        tqdm.write(f"warning: case {case_name(item)} is constant: its features describe padding only")
    return torch.from_numpy(case["image"])


def to_input(x, g=None):
    """(C, h, w, d) -> (C, S, S, S), S = image_size: resize, then centre pad (-1) / crop; with a generator g, a
    random training view instead (random crop/pad offset, flips, intensity transforms)."""
    size = tuple(x.shape[1:]) if resize_to is None else (tuple(resize_to) or (image_size,) * 3)
    if size != tuple(x.shape[1:]):
        x = F.interpolate(x[None], size=size, mode="trilinear", align_corners=False)[0]
    for a in range(3):
        n = x.shape[1 + a]
        if n == image_size:
            continue
        span = abs(n - image_size)  # centre (deterministic view) or random (training view) offset
        off = span // 2 if g is None else int(torch.randint(0, span + 1, (1,), generator=g))
        if n > image_size:
            x = x.narrow(1 + a, off, image_size)
        else:
            pad = [0, 0] * 3
            pad[2 * (2 - a)], pad[2 * (2 - a) + 1] = off, span - off  # F.pad lists the last axis first
            x = F.pad(x, pad, value=-1.0)
    if g is None:
        return x.contiguous()
    x = x[None].clone()  # (1, C, S, S, S) for the batched augment.py plans (which work in place)
    plan = augment.plan_flip(1, 0, 0.5, g) + augment.plan_flip(1, 1, 0.5, g) + augment.plan_flip(1, 2, 0.5, g)
    c = augment.one_of_choice(1, 4, 0.3, g)  # reference: OneOf{contrast, sharpen, smooth, noise}, p 0.3 each
    plan += augment.plan_gamma(1, 1.0, g, apply=c == 0) + augment.plan_sharpen(1, 1.0, g, apply=c == 1)
    plan += augment.plan_smooth(1, 1.0, g, apply=c == 2) + augment.plan_noise(1, 1.0, g, apply=c == 3)
    x = augment.run_plan(x, plan)
    scale, shift = 0.9 + 0.2 * torch.rand(1, generator=g), -0.1 + 0.2 * torch.rand(1, generator=g)
    return (x[0] * scale + shift).contiguous()  # intensity scale +-10% and shift +-0.1, p 1


# -----------------------------------------------------------------------------
# model: the frozen backbone
if pretrained:
    backbone = model.vit_from_checkpoint(pretrained)
    if random_init:
        backbone = model.random_init_like(pretrained, seed)  # its architecture, pretraining's init scheme
else:
    backbone = model.ARCHS[arch](img_size=image_size, patch_size=patch_size)
backbone = backbone.to(device).eval().requires_grad_(False)
n_last = min(4, backbone.depth)
E = backbone.embed_dim
print(f"backbone: {'random ' if random_init or not pretrained else ''}"
      f"{pretrained or arch} depth {backbone.depth}, embed_dim {E}, patch {backbone.patch_size}, "
      f"{sum(p.numel() for p in backbone.parameters()) / 1e6:.1f}M params")


# -----------------------------------------------------------------------------
# features, once: cls (N, V, n_last, C·E) and avg (N, V, C·E) per case and view
@torch.inference_mode()
def encode(x):
    """x (B, C, S, S, S) -> CLS of the last n_last blocks (B, n_last, C·E), mean last-block patch token (B, C·E)."""
    B, C = x.shape[:2]
    if backbone.in_chans == 1 and C > 1:
        x = x.reshape(B * C, 1, *x.shape[2:])  # (B, C, S, S, S) -> (B·C, 1, S, S, S): channels into the batch
    elif backbone.in_chans != C:
        raise ValueError(f"the volumes have {C} channels, the backbone takes {backbone.in_chans}")
    with autocast:
        out = backbone.get_intermediate_layers(x.to(device), n=n_last, return_class_token=True)
    cls = torch.stack([c for _, c in out], 1).float()  # (B·C', n_last, E), oldest block first
    avg = out[-1][0].float().mean(1)  # (B·C', N, E) -> (B·C', E): the last block's patch tokens
    cls = cls.reshape(B, -1, n_last, E).transpose(1, 2).reshape(B, n_last, -1)  # -> (B, n_last, C·E)
    return cls.cpu(), avg.reshape(B, -1).cpu()  # (B, C·E)


def encode_all(case_idx, n_views, what):
    """Encode cases (deterministic view if n_views == 0, else n_views random views each) in feature_batch chunks."""
    cls, avg, buf = [], [], []
    for i in tqdm(case_idx, desc=what):
        x = load_image(cases[i])  # VolumeError names the file
        if n_views == 0:
            buf.append(to_input(x))
        else:
            g = torch.Generator().manual_seed(data.mix_seed(seed, 2, int(i)))
            buf.extend(to_input(x, g) for _ in range(n_views))
        while len(buf) >= feature_batch or (i == case_idx[-1] and buf):
            c, a = encode(torch.stack(buf[:feature_batch]))
            cls.append(c), avg.append(a)
            buf = buf[feature_batch:]
    V = max(1, n_views)
    cls, avg = torch.cat(cls), torch.cat(avg)
    return cls.view(len(case_idx), V, n_last, -1), avg.view(len(case_idx), V, -1)


t0 = time.time()
cls_det, avg_det = encode_all(np.arange(len(cases)), 0, "features")  # (N, 1, n_last, C·E), (N, 1, C·E)
if augment_train:  # n_aug_views random views of every case that is in some run's training list
    cls_aug, avg_aug = encode_all(in_train, n_aug_views, f"features x {n_aug_views} augmented views")
    aug_row = {int(i): k for k, i in enumerate(in_train)}
feature_seconds = time.time() - t0
print(f"features: {feature_seconds:.1f} s ({len(cases)} volumes"
      f"{f' + {len(in_train)} x {n_aug_views} views' if augment_train else ''})")

# the 4 classifier inputs (n_blocks, avgpool): concat of the CLS of the last n blocks (+ the averaged patch tokens)
feature_types = [(1, False), (1, True), (n_last, False), (n_last, True)]


def design(cls, avg, n_blocks, avgpool):
    """(..., n_last, F) CLS stack + (..., F) avg -> (..., n_blocks·F [+ F])."""
    x = cls[..., n_last - n_blocks:, :].flatten(-2)
    return torch.cat([x, avg], -1) if avgpool else x


X_det = [design(cls_det[:, 0], avg_det[:, 0], *ft).to(device) for ft in feature_types]  # 4 x (N, d_f)
X_aug = [design(cls_aug, avg_aug, *ft).to(device) for ft in feature_types] if augment_train else None  # (N', V, d_f)
dims = [x.shape[1] for x in X_det]
heads_desc = [{"lr": lr, "n_blocks": nb, "avgpool": ap} for nb, ap in feature_types for lr in scaled_lrs]
L = len(scaled_lrs)
lr_weights = torch.tensor(scaled_lrs, device=device).repeat(len(feature_types))  # (52,) in heads_desc order
print(f"{len(heads_desc)} linear classifiers: inputs {dims} x lrs {[f'{lr:.3g}' for lr in scaled_lrs]}")


# -----------------------------------------------------------------------------
# classifiers, evaluation
# The 13 classifiers of one input are one nn.Linear(d_f, 13·K): output block i (K logits) is classifier i. One
# matmul per input instead of 13 (the step is ~1 ms on a CPU core; 52 separate Linears take ~8 ms).
def all_logits(heads, X):
    """The 52 classifiers on features X (a list of 4 (n, d_f)) -> (52, n, K), head order = heads_desc."""
    z = torch.cat([h(x).view(len(x), L, num_classes) for h, x in zip(heads, X)], 1)  # (n, 4·13, K)
    return z.transpose(0, 1)  # (52, n, K)


def classifier(heads, j):
    """Weight (K, d_f) and bias (K,) of classifier j of heads_desc."""
    f, i = divmod(j, L)
    rows = slice(i * num_classes, (i + 1) * num_classes)
    return heads[f].weight[rows], heads[f].bias[rows]


def evaluate(logits, y):
    """One classifier's logits (n, K) and labels (n,) -> test metrics: AUC of softmax probabilities (macro one-vs-
    rest, Mann-Whitney with ties = 1/2), macro F1 / accuracy / confusion matrix of the argmax."""
    probs = torch.softmax(logits.double(), -1).cpu().numpy()
    y = y.cpu().numpy()
    pred = probs.argmax(1)
    return {"auc": metrics.macro_auc(probs, y), "f1": metrics.f1_macro(pred, y, num_classes),
            "accuracy": metrics.accuracy(pred, y),
            "confusion_matrix": metrics.confusion_matrix(pred, y, num_classes).tolist(), "probs": probs.tolist()}


def val_scores(logits, y):
    """(52, n, K) -> (52,) selection scores: top-1 accuracy (reference) or macro AUC."""
    if select_metric == "accuracy":
        return (logits.argmax(-1) == y).double().mean(1).cpu().numpy()
    probs = torch.softmax(logits.double(), -1).cpu().numpy()
    return np.array([metrics.macro_auc(p, y.cpu().numpy()) for p in probs])


def train_losses(heads, X, y):
    """(52,) mean cross-entropy of every classifier on (X, y)."""
    z = all_logits(heads, X)
    return F.cross_entropy(z.flatten(0, 1), y.repeat(len(z)), reduction="none").view(len(z), -1).mean(1)


# cosine schedule, one value per iteration (CosineAnnealingLR(T_max = max_iters, eta_min 0) stepped per iteration)
lr_schedule = 0.5 * (1 + np.cos(np.pi * np.arange(max_iters) / max_iters))

# -----------------------------------------------------------------------------
# the runs
if device == "cpu":  # the classifier ops are ~0.1 ms: extra threads only add hand-offs (and stall under load)
    torch.set_num_threads(1)
log = open(os.path.join(out_dir, "log.jsonl"), "w")
log.write(json.dumps({"config": config, "git_sha": git_sha()}) + "\n")
runs, selected = [], []
for r, (tr, va, te) in enumerate(run_splits):
    t0 = time.time()
    torch.manual_seed(seed + r)
    heads = nn.ModuleList(nn.Linear(d, L * num_classes) for d in dims).to(device)  # 4 inputs x 13 classifiers
    for h in heads:
        nn.init.normal_(h.weight, std=0.01), nn.init.zeros_(h.bias)  # reference init
    # The 13 learning rates enter as loss weights: with momentum SGD and no weight decay, stepping
    # sum_j lr_j CE_j with lr = schedule(t) is exactly 52 param groups stepping CE_j with lr_j schedule(t)
    # (the momentum buffer is linear in the gradients; tests/test_linear_probe.py checks the equivalence).
    optimizer = torch.optim.SGD(heads.parameters(), lr=1.0, momentum=0.9, weight_decay=0.0)
    y_tr, y_va, y_te = labels[tr].to(device), labels[va].to(device), labels[te].to(device)
    X_va, X_te = [x[va] for x in X_det], [x[te] for x in X_det]
    X_tr = [x[tr] for x in X_det]
    if augment_train:
        X_tr = [x[[aug_row[int(i)] for i in tr]] for x in X_aug]  # (n, V, d_f)
    g = torch.Generator().manual_seed(data.mix_seed(seed + r, 3))

    def batches():  # endless epochs of shuffled training indices
        while True:
            yield from torch.randperm(len(tr), generator=g).split(batch_size)

    loss_init = train_losses(heads, [x[:, 0] if augment_train else x for x in X_tr], y_tr).tolist()
    best_score, best_state, best_iter = -math.inf, None, 0
    batch_iter = batches()
    pbar = tqdm(range(max_iters), desc=f"run {r}", mininterval=1.0)
    for it in pbar:
        idx = next(batch_iter)
        if augment_train:  # each sample one of its precomputed views
            v = torch.randint(0, n_aug_views, (len(idx),), generator=g)
            xb = [x[idx, v] for x in X_tr]
        else:
            xb = [x[idx] for x in X_tr]
        optimizer.param_groups[0]["lr"] = float(lr_schedule[it])
        z = all_logits(heads, xb)  # (52, B, K)
        ce = F.cross_entropy(z.flatten(0, 1), y_tr[idx].repeat(len(z)), reduction="none").view(len(z), -1).mean(1)
        loss = ce.mean()  # (52,) -> the mean over classifiers, for the log
        optimizer.zero_grad(set_to_none=True)
        (ce * lr_weights).sum().backward()  # each classifier's gradient is its own loss's, times its lr
        optimizer.step()
        if (it + 1) % eval_interval == 0 or it + 1 == max_iters:
            with torch.no_grad():
                scores = val_scores(all_logits(heads, X_va), y_va)
            if scores.max() > best_score:  # keep the whole set, as the reference's best_val checkpoint
                best_score, best_iter = float(scores.max()), it + 1
                best_state = {k: v.clone() for k, v in heads.state_dict().items()}
            log.write(json.dumps({"run": r, "iter": it + 1, "lr_factor": float(lr_schedule[it]),
                                  "loss": loss.item(), f"val_{select_metric}_max": float(scores.max()),
                                  "best": best_score, "elapsed_s": round(time.time() - t_start, 1),
                                  "peak_rss_mb": peak_rss_mb()})
                      + "\n")
            pbar.set_postfix(loss=f"{loss.item():.3f}", best_val=f"{best_score:.3f}")
    pbar.close()
    # restore the best set, re-select on validation, evaluate only the selected classifier on test
    if best_state is not None:
        heads.load_state_dict(best_state)
    with torch.no_grad():
        scores = val_scores(all_logits(heads, X_va), y_va)
        best = int(np.argmax(scores))  # ties: the first in heads_desc order
        val_metrics = evaluate(all_logits(heads, X_va)[best], y_va)
        test = evaluate(all_logits(heads, X_te)[best], y_te)
        loss_final = train_losses(heads, [x[:, 0] if augment_train else x for x in X_tr], y_tr).tolist()
    weight, bias = classifier(heads, best)
    selected.append({"weight": weight.detach().cpu(), "bias": bias.detach().cpu(), **heads_desc[best]})
    runs.append({"run": r, "seed": seed + r, "n_train": len(tr), "best_head": {"index": best, **heads_desc[best]},
                 "best_iter": best_iter, "select_metric": select_metric, "val_metric": float(scores[best]),
                 "val_auc": val_metrics["auc"], "val_accuracy": val_metrics["accuracy"],
                 "test_auc": test["auc"], "test_f1": test["f1"], "test_accuracy": test["accuracy"],
                 "test_confusion_matrix": test["confusion_matrix"],
                 "test_cases": [case_name(cases[j]) for j in te], "test_labels": y_te.tolist(),
                 "test_probs": test["probs"], "val_scores": scores.tolist(),
                 "train_loss_init": loss_init, "train_loss_final": loss_final, "seconds": time.time() - t0})
    bh = heads_desc[best]
    print(f"run {r}: head lr {bh['lr']:.3g} n_blocks {bh['n_blocks']} avgpool {bh['avgpool']} (iter {best_iter}, "
          f"val {select_metric} {scores[best]:.3f}) -> test AUC {test['auc']:.3f} F1 {test['f1']:.3f} "
          f"acc {test['accuracy']:.3f}")
log.close()

# -----------------------------------------------------------------------------
# results: mean and t-based 95% CI over runs


def summarize(values):
    v = np.asarray(values, dtype=np.float64)
    mean = float(v.mean())
    if len(v) < 2:
        return {"mean": mean, "std": 0.0, "ci95": [mean, mean], "values": v.tolist()}
    half = float(stats.t.ppf(0.975, len(v) - 1) * v.std(ddof=1) / math.sqrt(len(v)))
    # clipped to [0, 1], the range of AUC, F1 and accuracy (with 2-3 runs the t interval is wide)
    return {"mean": mean, "std": float(v.std(ddof=1)), "ci95": [max(0.0, mean - half), min(1.0, mean + half)],
            "values": v.tolist()}


summary = {m: summarize([run[f"test_{m}"] for run in runs]) for m in ("auc", "f1", "accuracy")}
results = {"config": config, "git_sha": git_sha(),
           "task": {"num_classes": num_classes, "class_names": list(class_names),
                    "n_cases": len(cases),
                    "class_counts": torch.bincount(labels, minlength=num_classes).tolist(),
                    "n_train": len(run_splits[0][0]), "n_val": len(run_splits[0][1]),
                    "n_test": len(run_splits[0][2])},
           "backbone": {"pretrained": pretrained, "random_init": bool(random_init or not pretrained),
                        "args": backbone.args},
           "heads": heads_desc, "feature_dims": dims, "feature_seconds": feature_seconds,
           "runs": runs, "summary": summary, "wall_seconds": time.time() - t_start}
save_atomic(json.dumps(results, indent=1).encode(), os.path.join(out_dir, "results.json"),
            write=lambda b, f: f.write(b))
save_atomic(selected, os.path.join(out_dir, "classifiers.pt"))
print(" ".join(f"{m} {s['mean']:.3f} [{s['ci95'][0]:.3f}, {s['ci95'][1]:.3f}]" for m, s in summary.items())
      + f" over {n_runs} runs; {results['wall_seconds']:.0f} s; {os.path.join(out_dir, 'results.json')}")
