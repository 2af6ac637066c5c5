"""
pretrain.py — 3DINO self-supervised pretraining (DINOv2 on 3D volumes): one script, top to bottom.

The defaults are the paper's standard run: ViT-L/16, 2 x 96^3 global + 8 x 48^3 local crops, 125k iterations,
global batch 512. Run it as

    python pretrain.py configs/pretrain_demo.py                      # CPU demo: synthetic phantoms, ~6 minutes
    python pretrain.py configs/pretrain_demo.py --max_iters=20 --out_dir=out/try   # any key, on the command line
    torchrun --standalone --nproc_per_node=8 pretrain.py configs/pretrain_vitl.py --data_path=cache/   # one node
    torchrun --nnodes=2 --node_rank=0 --nproc_per_node=8 --rdzv_endpoint=HOST:29500 pretrain.py configs/pretrain_vitl.py
    python pretrain.py configs/pretrain_vitl_highres.py --init_from=out/vitl/teacher_backbone.pt   # stage 2

One step (paper Eq. 1-2):
    teacher (EMA of the student, no grad) sees the 2 global crops  -> CLS targets (Sinkhorn-Knopp) and patch targets
    student sees all crops, with iBOT masks on half of the global crops
    loss = DINO(CLS, 18 crop pairs) + iBOT(masked patches) + 0.1 KoLeo(student CLS)
    AdamW step (layer-wise lr decay, clipped per sub-module), then teacher <- m teacher + (1 - m) student

Outputs in out_dir: log.jsonl (config + git SHA first, then one JSON line per log step, with the collapse monitors
of metrics.collapse_monitors: a run stuck at the uniform or one-hot fixed point after warm-up is flagged there, in
the progress bar, and once as a WARNING line), ckpt.pt (resumable, every ckpt_interval steps and at the end, written
atomically), teacher_backbone.pt (the teacher export that model.load_pretrained / finetune_seg.py /
linear_probe.py / visualize.py read), and for the demo a PCA montage and eval.json (evaluate.py: the teacher vs
its random init on held-out labelled phantoms).
"""
import json
import math
import os
import sys
import time
from contextlib import nullcontext

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP

import augment
import losses
import metrics
import model
from cache import PretrainDataset, StepSampler, collate_pretrain, open_cache

# -----------------------------------------------------------------------------
# default config values: the paper's standard (stage-1) pretraining run
# I/O
out_dir = "out/pretrain"
log_interval = 10  # steps between log lines (loss values are all-reduced and synced only then)
profile = False  # per-phase ms of the step in each log row ("phase_ms"; CUDA events: no added host sync)
ckpt_interval = 3750  # steps between resumable checkpoints (reference: every 3750 it)
export_interval = 12500  # steps between teacher exports (reference: eval_period_iterations)
resume = False  # continue the run in out_dir from ckpt.pt (an error if there is none)
overwrite = False  # replace the run already in out_dir (without it or resume, an existing run is refused)
init_from = None  # a teacher checkpoint to start from (high-res stage): backbone + heads, pos-embed resized
visualize_at_end = False  # write a PCA/attention montage of one volume with the final teacher (visualize.py)
eval_at_end = False  # evaluate.py: the final teacher vs its random init on held-out labelled phantoms -> eval.json
seed = 0
# data
data_path = ""  # a cache folder written by `python cache.py prepare`; "" = synthetic phantoms
num_workers = 4  # DataLoader workers per rank (they only read crop regions; augmentation runs on the device)
min_axis_size = 24  # drop volumes whose smallest axis is <= this (reference: data_min_axis_size)
batches_from = None  # a .pt list of stored make_views outputs, one per micro-step (tests: the reference trajectory),
# used instead of the loader + augment.make_views; micro-step m of step it reads entry it * grad_accum_steps + m
# model
arch = "vit_large"  # vit_tiny / vit_small / vit_base / vit_large / vit_giant
embed_dim = None  # None = the arch's; set these three for a custom (e.g. demo) size
depth = None
num_heads = None
patch_size = 16
drop_path_rate = 0.3  # student only, the same in every block (drop_path_uniform)
layerscale_init = 1e-5
grad_checkpointing = False  # recompute block activations in backward: less memory, ~30% more compute
head_n_prototypes = 65536  # K of the DINO head ...
ibot_head_n_prototypes = None  # ... and of the (separate) iBOT head; None = the same K (the reference)
head_hidden_dim = 2048
head_bottleneck_dim = 256
head_nlayers = 3
# crops: in-plane *area* fraction and through-plane *length* fraction, drawn independently
global_crops_size = 96
local_crops_size = 48
n_local_crops = 8
global_crops_in_slice_scale = (0.48, 1.0)
global_crops_cross_slice_scale = (0.5, 1.0)
local_crops_in_slice_scale = (0.16, 0.48)
local_crops_cross_slice_scale = (0.2, 0.5)
# iBOT masking
mask_ratio_min_max = (0.2, 0.75)  # 3DINO: uniformly random patches, ratios stratified over this range
mask_sample_probability = 0.5  # fraction of global crops that get a mask
# loss
centering = "sinkhorn_knopp"  # or "softmax" (DINO v1 centering); SK is the 3DINO default
dino_loss_weight = 1.0
ibot_loss_weight = 1.0
koleo_loss_weight = 0.1
student_temp = 0.1
teacher_temp = 0.07  # final teacher temperature; DINO found > 0.07 unstable
warmup_teacher_temp = 0.04  # linear warm-up from this ...
warmup_teacher_temp_iters = 37500  # ... over these steps (30 "epochs" of 1250)
momentum_teacher = 0.992  # EMA momentum, cosine schedule to final_momentum_teacher
final_momentum_teacher = 1.0
center_momentum = 0.9  # only for centering = "softmax"
# optimizer
max_iters = 125_000
batch_size = 512  # global images per optimizer step (all ranks, all accumulation steps)
grad_accum_steps = 1  # micro-steps per optimizer step, so the paper's batch fits fewer GPUs
base_lr = 0.002  # for a batch of 1024; lr = base_lr * sqrt(batch_size / 1024) (sqrt_wrt_1024 rule)
min_lr = 1e-6
warmup_iters = 12500  # linear lr warm-up (10 "epochs")
weight_decay = 0.04  # cosine schedule from this ...
weight_decay_end = 0.4  # ... to this
layerwise_decay = 0.9  # lr multiplier 0.9^(depth + 1 - layer id)
patch_embed_lr_mult = 0.2
clip_grad = 3.0  # max grad norm, for each of backbone / dino_head / ibot_head separately
freeze_last_layer_iters = 1250  # the heads' last layer gets lr 0 for the first "epoch"
adamw_betas = (0.9, 0.999)
# system
device = "auto"  # "auto" = cuda if available else cpu; or "cpu", "cuda", "cuda:1"
dtype = "auto"  # autocast dtype: "bfloat16" or "float32"; "auto" = bfloat16 on CUDA, float32 on CPU (CPU bf16
#                 autocast works too: slower on most CPUs, but it runs the mixed-precision path without a GPU)
compile = False  # torch.compile every transformer block of the student and teacher backbones
threads = 0  # torch CPU threads; 0 = torch's default (all cores). On a busy machine 1 can be several times faster
# -----------------------------------------------------------------------------
from configurator import (ConfigError, check_out_dir, configure, git_sha, hold_out_dir, peak_rss_mb,  # noqa: E402
                          save_atomic)

config = configure(globals(), sys.argv[1:])
t_start = time.time()
if threads > 0:
    torch.set_num_threads(threads)
for key in ("max_iters", "log_interval", "ckpt_interval", "export_interval"):  # each a step count, used with %
    if not isinstance(config[key], int) or config[key] < 1:
        raise ConfigError(f"{key} must be a positive int, got {config[key]!r}")
if dtype not in ("auto", "bfloat16", "float32"):
    # float16 would need loss scaling (a GradScaler) for its narrow range; bfloat16 has float32's range and needs none
    raise ConfigError(f"dtype must be 'auto', 'bfloat16' or 'float32', got {dtype!r}")
if device.startswith("cuda") and not torch.cuda.is_available():
    raise ConfigError(f"device={device!r} but torch sees no CUDA GPU (torch {torch.__version__}); use --device=cpu")
if data_path and not any(c in data_path for c in "*?[") and not os.path.exists(data_path):  # (globs: when read)
    raise ConfigError(f"data_path {data_path}: no such file or folder (expected a cache folder written by "
                      "`python cache.py prepare`)")
# before any rank writes (the DDP rendezvous below waits for every rank to get past this); the master process holds
# out_dir for the run's life (a second writer is refused), and under torchrun every rank dies with its launcher
hold_out_dir(out_dir, int(os.environ.get("RANK", -1)))
check_out_dir(out_dir, resume, overwrite, ("log.jsonl", "ckpt.pt", "teacher_backbone.pt"), "ckpt.pt")

# -----------------------------------------------------------------------------
# DDP, device and dtype
ddp = int(os.environ.get("RANK", -1)) != -1
if device == "auto":
    device = "cuda" if torch.cuda.is_available() else "cpu"
if ddp:
    rank, local_rank, world_size = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
    if device.startswith("cuda"):
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(device)
    dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
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
if batch_size % (world_size * grad_accum_steps):
    raise ConfigError(f"batch_size {batch_size} is not divisible by world_size {world_size} x grad_accum_steps "
                      f"{grad_accum_steps}")
micro_batch = batch_size // (world_size * grad_accum_steps)  # images per rank per micro-step
augment.keep_freed_memory()  # glibc: reuse freed multi-MB blocks (no page faults per step; see augment.py)
torch.backends.cuda.matmul.allow_tf32 = True
torch.backends.cudnn.allow_tf32 = True
if master_process:
    os.makedirs(out_dir, exist_ok=True)
    print(f"full config: the first line of {os.path.join(out_dir, 'log.jsonl')}")
    print(f"world_size {world_size}, {micro_batch} images per rank per micro-step, {grad_accum_steps} micro-steps")

# -----------------------------------------------------------------------------
# schedules: per-iteration arrays a reader can print


def cosine_schedule(base, final, total, warmup=0, start_warmup=0.0, freeze=0):
    """[freeze zeros] + [linspace(start_warmup, base, warmup)] + [cosine from base to final]; length `total`."""
    cos_iters = total - warmup - freeze
    cos = final + 0.5 * (base - final) * (1 + np.cos(np.pi * np.arange(cos_iters) / max(cos_iters, 1)))
    return np.concatenate([np.zeros(freeze), np.linspace(start_warmup, base, warmup), cos])


lr = base_lr * math.sqrt(batch_size / 1024)  # the sqrt_wrt_1024 scaling rule
lr_schedule = cosine_schedule(lr, min_lr, max_iters, warmup=min(warmup_iters, max_iters))
wd_schedule = cosine_schedule(weight_decay, weight_decay_end, max_iters)
momentum_schedule = cosine_schedule(momentum_teacher, final_momentum_teacher, max_iters)
n_tt = min(warmup_teacher_temp_iters, max_iters)
teacher_temp_schedule = np.concatenate([np.linspace(warmup_teacher_temp, teacher_temp, n_tt),
                                        np.full(max_iters - n_tt, teacher_temp)])
last_layer_lr_schedule = lr_schedule.copy()
last_layer_lr_schedule[:freeze_last_layer_iters] = 0  # the heads' last layer is frozen for the first "epoch"
schedules = {"lr": lr_schedule, "wd": wd_schedule, "momentum": momentum_schedule,  # (the log rows' keys)
             "teacher_temp": teacher_temp_schedule, "last_layer_lr": last_layer_lr_schedule}

# -----------------------------------------------------------------------------
# data: workers read crop regions only; resizing, augmentation and masks run batched on the device
if data_path:
    open_cache(data_path)  # a datalist, folder or stale cache is refused here, with the command to run


def make_loader(start_step):
    dataset = PretrainDataset(
        data_path or None, global_crops_size, local_crops_size, n_local_crops,
        global_crops_in_slice_scale, global_crops_cross_slice_scale,
        local_crops_in_slice_scale, local_crops_cross_slice_scale,
        min_axis_size=min_axis_size, seed=seed, rank=rank, world_size=world_size)
    # sample counter k = start, start+1, ...: each sample is a pure function of (seed, rank, k), so a resumed
    # run reads exactly the samples an uninterrupted one would have read
    sampler = StepSampler(start_step * grad_accum_steps * micro_batch)
    return torch.utils.data.DataLoader(
        dataset, batch_size=micro_batch, sampler=sampler, num_workers=num_workers,
        collate_fn=collate_pretrain, pin_memory=device_type == "cuda", drop_last=True,
        persistent_workers=num_workers > 0, prefetch_factor=4 if num_workers > 0 else None,
        generator=torch.Generator().manual_seed(seed))  # keeps the loader off the global RNG

# -----------------------------------------------------------------------------
# student and teacher: backbone + separate DINO and iBOT heads
ibot_k = ibot_head_n_prototypes or head_n_prototypes


def build_backbone(drop_path):
    kw = dict(img_size=global_crops_size, patch_size=patch_size, drop_path_rate=drop_path,
              layerscale_init=layerscale_init, grad_checkpointing=grad_checkpointing)
    if embed_dim is None:
        return model.ARCHS[arch](**kw)
    return model.ViT3D(embed_dim=embed_dim, depth=depth, num_heads=num_heads, **kw)


class MultiCropModel(nn.Module):
    """Backbone + DINO head + iBOT head, the student and (a copy, updated by EMA only) the teacher. The student
    runs all of its crops through one forward, so DDP sees every parameter used in one call."""

    def __init__(self, backbone):
        super().__init__()
        E = backbone.embed_dim
        self.backbone = backbone
        self.dino_head = model.DINOHead(E, head_n_prototypes, head_hidden_dim, head_bottleneck_dim, head_nlayers)
        self.ibot_head = model.DINOHead(E, ibot_k, head_hidden_dim, head_bottleneck_dim, head_nlayers)

    def forward(self, global_crops, local_crops, masks, mask_indices):
        # multi-crop: the 2b masked global crops and the n_local*b local crops through the same blocks
        g, l = self.backbone.forward_features_list([global_crops, local_crops], [masks, None])
        cls_g, cls_l = g["x_norm_clstoken"], l["x_norm_clstoken"]  # (2b, E), (n_local b, E)
        dino_logits = self.dino_head(torch.cat([cls_g, cls_l]))  # (2b + n_local b, K)
        prof.mark("heads_losses")
        masked_tokens = g["x_norm_patchtokens"].flatten(0, 1)[mask_indices]  # (2b, N, E) -> (M, E)
        ibot_logits = self.ibot_head(masked_tokens)  # (M, K)
        return dino_logits[: len(cls_g)], dino_logits[len(cls_g):], ibot_logits, cls_g


torch.manual_seed(seed)  # the same initial weights on every rank (DDP also broadcasts rank 0's at wrap time)
student = MultiCropModel(build_backbone(drop_path_rate))
if init_from:
    # high-res adaptation: the stage-1 teacher (backbone + both heads) into the student, the position
    # embedding resized to the new crop grid; the teacher is then a copy of the student, optimizer and every
    # schedule start from scratch
    model.load_pretrained(student.backbone, init_from, dino_head=student.dino_head, ibot_head=student.ibot_head)
    if master_process:
        print(f"initialised student and teacher from {init_from}")
teacher = MultiCropModel(build_backbone(0.0))  # no drop path in the teacher
teacher.load_state_dict(student.state_dict())
teacher.requires_grad_(False).eval()  # the teacher only ever moves by EMA
student.to(device)
teacher.to(device)

# -----------------------------------------------------------------------------
# optimizer: AdamW with the reference's parameter groups


def param_groups(module):
    """One group per distinct (lr_mult, wd_mult, is_last_layer): layer-wise lr decay over the backbone (embeddings
    = layer 0, block i = layer i + 1, final norm = depth + 1), patch embedding x0.2, no weight decay on biases,
    norms and LayerScale gammas, and a flag on the heads' last layers (frozen for the first epoch)."""
    n_layers = module.backbone.depth + 1
    groups = {}
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        lr_mult = 1.0
        if name.startswith("backbone."):
            sub = name[len("backbone."):]
            if sub.startswith(("pos_embed", "patch_embed", "mask_token", "cls_token")):
                layer_id = 0
            elif sub.startswith("blocks."):
                layer_id = int(sub.split(".")[1]) + 1
            else:
                layer_id = n_layers
            lr_mult = layerwise_decay ** (n_layers - layer_id)
            if sub.startswith("patch_embed"):
                lr_mult *= patch_embed_lr_mult
        wd_mult = 0.0 if (name.endswith(".bias") or "norm" in name or "gamma" in name) else 1.0
        is_last_layer = "last_layer" in name
        key = (lr_mult, wd_mult, is_last_layer)
        groups.setdefault(key, {"params": [], "names": [], "lr_mult": lr_mult, "wd_mult": wd_mult,
                                "is_last_layer": is_last_layer})
        groups[key]["params"].append(p)
        groups[key]["names"].append(name)
    return list(groups.values())


groups = param_groups(student)
# each group keeps its parameter names: the checkpoint then says which lr / wd every parameter had
optimizer = torch.optim.AdamW(groups, lr=0.0, betas=adamw_betas, fused=device_type == "cuda")
submodules = {"backbone": student.backbone, "dino_head": student.dino_head, "ibot_head": student.ibot_head}
student_params = [p for p in student.parameters()]
teacher_params = [p for p in teacher.parameters()]

# -----------------------------------------------------------------------------
# resume


ckpt_path = os.path.join(out_dir, "ckpt.pt")
start_step = 0
centers = {"dino": torch.zeros(1, head_n_prototypes, device=device),
           "ibot": torch.zeros(1, 1, ibot_k, device=device)}
if resume:
    ckpt = torch.load(ckpt_path, map_location=device, weights_only=True)
    shape_keys = ("arch", "embed_dim", "depth", "num_heads", "patch_size", "global_crops_size", "head_n_prototypes",
                  "ibot_head_n_prototypes", "head_hidden_dim", "head_bottleneck_dim", "head_nlayers")
    changed = [f"{k}: checkpoint {ckpt['config'][k]!r}, now {config[k]!r}" for k in shape_keys
               if k in config and k in ckpt.get("config", {}) and ckpt["config"][k] != config[k]]
    if changed:
        raise ConfigError(f"resume: {ckpt_path} was trained with another architecture ({'; '.join(changed)}); "
                          "resume with its settings, or start a new run")
    student.load_state_dict(ckpt["student"])
    teacher.load_state_dict(ckpt["teacher"])
    optimizer.load_state_dict(ckpt["optimizer"])
    centers = {k: v.to(device) for k, v in ckpt["centers"].items()}
    start_step = ckpt["step"]
    if master_process:
        print(f"resumed from {ckpt_path} at step {start_step}")

raw_student = student  # unwrapped, for checkpoints and EMA
if compile:
    # compile the blocks in place: the training calls forward_features(_list), which torch.compile(backbone)
    # would not cover (it compiles `forward` only); in place also keeps the state-dict keys unchanged
    for blk in list(student.backbone.blocks) + list(teacher.backbone.blocks):
        blk.compile()
if ddp:
    student = DDP(student, device_ids=[local_rank] if device_type == "cuda" else None)

# -----------------------------------------------------------------------------
# logging


def flops_per_image():
    """Matmul FLOPs of one image's training step: the student's forward and backward (3× forward) over 2 global
    and n_local local crops, its heads on the CLS tokens and the masked patch tokens, and the teacher's forward."""
    bb, dino, ibot = raw_student.backbone, raw_student.dino_head.flops(), raw_student.ibot_head.flops()
    tg, tl = (global_crops_size // patch_size) ** 3 + 1, (local_crops_size // patch_size) ** 3 + 1
    n_masked = 2 * (tg - 1) * mask_sample_probability * sum(mask_ratio_min_max) / 2  # expected per image
    student = 3 * (2 * bb.flops(tg) + n_local_crops * bb.flops(tl) + (2 + n_local_crops) * dino + n_masked * ibot)
    return student + 2 * bb.flops(tg) + 2 * dino + n_masked * ibot


def log_line(d):
    if "config" not in d:  # every row: wall seconds since start and the process's peak resident memory
        d = {**d, "elapsed_s": round(time.time() - t_start, 1), "peak_rss_mb": peak_rss_mb()}
    with open(os.path.join(out_dir, "log.jsonl"), "a") as f:
        f.write(json.dumps(d) + "\n")


def show_row(rec):
    """A log row (metrics.LogWindow.row) to log.jsonl and the progress bar; the first collapse as a WARNING line."""
    global warned
    log_line(rec)
    collapse = rec["collapse"]
    pbar.set_postfix(dino=f"{rec['dino_loss']:.2f}/lnK {math.log(head_n_prototypes):.2f}",
                     ibot=f"{rec['ibot_loss']:.2f}", H=f"{rec['dino_target_entropy']:.2f}",
                     lr=f"{rec['lr']:.1e}", sps=f"{rec['samples_per_s']:.1f}",
                     **({"COLLAPSE": collapse} if collapse else {}))
    if collapse and not warned:
        warned = True
        pbar.write(f"WARNING step {rec['step']}: {collapse} collapse: {metrics.COLLAPSE_ADVICE[collapse]}")


log_path = os.path.join(out_dir, "log.jsonl")
if master_process and start_step == 0:
    open(log_path, "w").close()
    log_line({"config": config, "git_sha": git_sha(), "world_size": world_size})
elif master_process and os.path.exists(log_path):
    # a resumed run: drop what the killed run logged after its last checkpoint (those steps run again)
    keep = [l for l in open(log_path) if json.loads(l).get("step", 0) <= start_step]
    with open(log_path, "w") as f:
        f.writelines(keep)
# collapse warnings only once the lr has warmed up and the run has had a fifth of its steps to leave the start
collapse_check_from, warned = max(warmup_iters, max_iters // 5), False
prof = metrics.PhaseTimer(profile, device)  # phase marks below: one line each, no-ops unless profile=True
window = metrics.LogWindow(device, batch_size, world_size, head_n_prototypes, flops_per_image(), prof)

# -----------------------------------------------------------------------------
# the training loop


def next_views(it, micro, gen):
    """The views of micro-step `micro` of step `it`: stored ones (batches_from), or the loader's next crop
    regions resized, augmented and masked on the device (augment.make_views)."""
    prof.mark("data", new_step=micro == 0)
    if batches_from:
        return stored_views[it * grad_accum_steps + micro]
    raw = next(batches)
    prof.mark("views")
    return augment.make_views(raw, global_crops_size, local_crops_size, patch_size, gen, device, mask_ratio_min_max,
                              mask_sample_probability)


def teacher_targets(views_list, temp):
    """Teacher forward over every micro-batch of this step. The DINO CLS targets are normalised
    over the whole global batch — all micro-batches, all ranks — exactly as the reference's 4-GPU run normalises
    over its 512 images, because Sinkhorn-Knopp's equal-prototype constraint needs many rows and a micro-batch
    may hold only a few images. The iBOT targets are normalised per micro-batch (all ranks): a micro-batch already
    holds thousands of masked tokens, and keeping every micro-batch's (M, K) targets alive would cost GBs.
    We keep the teacher's masked patch tokens (M, E), not logits, and run the iBOT head just in time."""
    cls_logits, masked_tokens, cls_tokens = [], [], []
    with torch.no_grad(), autocast:
        for v in views_list:
            out = teacher.backbone.forward_features(v["global_crops"])
            cls_tokens.append(out["x_norm_clstoken"].float())  # (2b, E), for the collapse monitors
            cls_logits.append(teacher.dino_head(out["x_norm_clstoken"]).float())  # (2b, K)
            masked_tokens.append(out["x_norm_patchtokens"].flatten(0, 1)[v["mask_indices_list"]])  # (M, E)
    prof.mark("targets")
    all_cls = torch.cat(cls_logits)
    if centering == "sinkhorn_knopp":
        probs = losses.sinkhorn_knopp(all_cls, temp)
    else:
        probs = losses.softmax_center(all_cls, centers["dino"], temp)
        centers["dino"] = losses.update_center(centers["dino"], all_cls, center_momentum)
    monitor_in = {"teacher_cls": torch.cat(cls_tokens), "teacher_logits": all_cls, "dino_targets": probs}
    return list(probs.split([len(c) for c in cls_logits])), masked_tokens, monitor_in


def ibot_targets(tokens, temp):
    with torch.no_grad(), autocast:
        logits = teacher.ibot_head(tokens).float()  # (M, K)
    if centering == "sinkhorn_knopp":
        return losses.sinkhorn_knopp(logits, temp)
    probs = losses.softmax_center(logits, centers["ibot"], temp)
    centers["ibot"] = losses.update_center(centers["ibot"], logits, center_momentum)
    return probs


def clip_checked(it, terms):
    """Clip each student sub-module on its own (reference) and return the pre-clip grad norms (tensors). One host
    sync checks the loss and those norms (a finite loss can still overflow in backward); a non-finite one, on any
    rank, stops every rank before the optimizer step: the weights and the last checkpoint stay as they were."""
    grad_norms = {k: torch.nn.utils.clip_grad_norm_(m.parameters(), clip_grad) for k, m in submodules.items()}
    check = torch.stack([sum(terms.values()).detach(), *grad_norms.values()]).float()  # (4,): loss, 3 norms
    if ddp:
        dist.all_reduce(check)  # every rank stops together when any rank's loss is not finite
    if bool(torch.isfinite(check).all()):
        return grad_norms
    what = terms if not math.isfinite(check[0]) else {f"grad_norm_{k}": v for k, v in grad_norms.items()}
    msg = (f"non-finite loss at step {it}: {', '.join(f'{k}={float(v):.4g}' for k, v in what.items())}. The last "
           f"good checkpoint ({ckpt_path}) is intact; try a lower lr or a higher teacher_temp.")
    if master_process:
        log_line({"step": it, "error": msg})
    raise FloatingPointError(msg)


def export_teacher(step):
    sd = {k: v.detach().cpu() for k, v in teacher.state_dict().items()}  # (blocks compile in place: plain keys)
    save_atomic({"teacher": sd, "model_args": raw_student.backbone.args, "step": step, "config": config},
                os.path.join(out_dir, "teacher_backbone.pt"))


def save_checkpoint(step):
    save_atomic({"student": raw_student.state_dict(), "teacher": teacher.state_dict(),
                 "optimizer": optimizer.state_dict(), "centers": centers, "step": step, "config": config},
                ckpt_path)


if batches_from:  # stored views (one process): no dataset, no augmentation
    stored_views = torch.load(batches_from, map_location=device, weights_only=True)
else:
    batches = iter(make_loader(start_step))
pbar = None
if master_process:
    from tqdm import tqdm

    pbar = tqdm(total=max_iters, initial=start_step, dynamic_ncols=True, desc="pretrain")
if device_type == "cuda":
    torch.cuda.reset_peak_memory_stats(device)
window.open()  # the first row's samples/s counts from here
for it in range(start_step, max_iters):
    # every random draw of step `it` derives from (seed, rank, it): the data sample counters (StepSampler), the
    # augmentation generator below and the global RNG (drop path), re-seeded here; so a killed and resumed run
    # replays exactly the same step, whatever happened to the RNGs before the kill
    torch.manual_seed(seed + 7919 * rank + 1_000_003 * it)
    gen = torch.Generator(device="cpu").manual_seed(seed + 104_729 * rank + 15_485_863 * it)
    sched = {k: float(s[it]) for k, s in schedules.items()}  # lr, wd, momentum, teacher_temp, last_layer_lr
    for g in optimizer.param_groups:
        g["lr"] = (sched["last_layer_lr"] if g["is_last_layer"] else sched["lr"]) * g["lr_mult"]
        g["weight_decay"] = sched["wd"] * g["wd_mult"]

    # views for every micro-step of this optimizer step
    t0 = time.perf_counter()
    views_list = [next_views(it, micro, gen) for micro in range(grad_accum_steps)]
    data_wait = time.perf_counter() - t0

    # teacher targets (no grad) for the whole step
    prof.mark("teacher")
    dino_targets, teacher_masked, monitor_in = teacher_targets(views_list, sched["teacher_temp"])

    # student losses, forward and backward micro-step by micro-step
    optimizer.zero_grad(set_to_none=True)
    terms = {"dino_loss": 0.0, "ibot_loss": 0.0, "koleo_loss": 0.0}
    for micro, v in enumerate(views_list):
        sync = nullcontext() if (not ddp or micro == grad_accum_steps - 1) else student.no_sync()
        with sync:
            prof.mark("targets")
            ibot_t = ibot_targets(teacher_masked[micro], sched["teacher_temp"])
            prof.mark("student")
            with autocast:
                s_glob, s_loc, s_ibot, cls_g = student(v["global_crops"], v["local_crops"], v["masks"],
                                                       v["mask_indices_list"])
            dino = losses.dino_loss(list(s_glob.chunk(2)) + list(s_loc.chunk(n_local_crops)),
                                    list(dino_targets[micro].chunk(2)), student_temp)
            ibot = losses.ibot_loss(s_ibot, ibot_t, v["masks_weight"], len(cls_g), student_temp)
            koleo = sum(losses.koleo_loss(c) for c in cls_g.chunk(2))  # per global crop, not across
            loss = dino_loss_weight * dino + ibot_loss_weight * ibot + koleo_loss_weight * koleo
            prof.mark("backward")
            (loss / grad_accum_steps).backward()
        for k, val in (("dino_loss", dino), ("ibot_loss", ibot), ("koleo_loss", koleo_loss_weight * koleo)):
            terms[k] += val.detach() / grad_accum_steps

    # finite check and clip, optimizer step, then teacher <- m teacher + (1 - m) student
    prof.mark("clip_optim")
    grad_norms = clip_checked(it, terms)
    optimizer.step()
    prof.mark("ema")
    with torch.no_grad():
        torch._foreach_mul_(teacher_params, sched["momentum"])
        torch._foreach_add_(teacher_params, student_params, alpha=1 - sched["momentum"])
    window.add(terms, data_wait)

    # log row (the collapse monitors read this step's last micro-batch and its DINO targets), checkpoints, exports
    prof.mark("log")
    step = it + 1
    if step % log_interval == 0 or step == max_iters:
        monitor_in.update(student_cls=cls_g.detach(), ibot_targets=ibot_t, ibot_weights=v["masks_weight"],
                          teacher_temp=sched["teacher_temp"], dino_loss=terms["dino_loss"], ibot_loss=ibot,
                          n_crops=len(cls_g))
        rec = window.row(step, sched, grad_norms, monitor_in, raw_student.backbone, it >= collapse_check_from)
        if master_process:
            show_row(rec)
    if master_process:
        pbar.update(1)
        if step % ckpt_interval == 0 or step == max_iters:
            save_checkpoint(step)
        if step % export_interval == 0 or step == max_iters:
            export_teacher(step)

# -----------------------------------------------------------------------------
# cleanup
if master_process:
    pbar.close()
    print(f"done: {max_iters} steps; checkpoint {ckpt_path}, teacher export {os.path.join(out_dir, 'teacher_backbone.pt')}")
    print(metrics.pretrain_summary([json.loads(line) for line in open(log_path)], head_n_prototypes,
                                   mask_sample_probability, ibot_k))
    if visualize_at_end:
        import visualize

        png = visualize.demo_montage(os.path.join(out_dir, "teacher_backbone.pt"), data_path or None, out_dir)
        print(f"wrote {png}")
    if eval_at_end:
        import evaluate

        res = evaluate.run(os.path.join(out_dir, "teacher_backbone.pt"), os.path.join(out_dir, "eval.json"))
        print(evaluate.summary_line(res))
if ddp:
    # sanity check: DDP must have kept every rank's student identical (same init, same averaged gradients)
    checksum = torch.stack([p.detach().double().sum() for p in raw_student.parameters()])
    gathered = [torch.zeros_like(checksum) for _ in range(world_size)]
    dist.all_gather(gathered, checksum)
    if not all(torch.equal(gathered[0], g) for g in gathered):
        raise RuntimeError("DDP ranks ended with different students")
    if master_process:
        print(f"DDP check: the students of all {world_size} ranks are identical")
    dist.barrier()  # every rank is done with every collective before the process group goes away
    del student  # the DDP wrapper holds the process group: free it here, not during interpreter shutdown
    dist.destroy_process_group()
