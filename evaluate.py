"""
evaluate.py — did pretraining improve the features? A frozen-feature test of a teacher export against a random
init of the same architecture and init scheme (the pretraining's own starting point), on labels the pretraining
never saw.

    python evaluate.py out/demo/teacher_backbone.pt            # phantoms; writes out/demo/eval.json
    python evaluate.py out/demo/teacher_backbone.pt --n_test=64 --out=out/demo/eval_big.json

Task: linear-decoder segmentation of held-out phantoms (phantoms.SyntheticVolumes with a seed the pretraining never
used; classes liver, kidneys, lesion), the paper's linear decoder (Fig. 2g) in miniature:
  1. each volume (64^3, the pretraining crops' voxel scale) -> the frozen ViT -> patch tokens of the last 4 blocks,
     concatenated (4E per 8^3 patch), standardised with the training volumes' statistics;
  2. one linear map from those features to the 4 classes at the patch grid, trained on n_train volumes with a
     class-balanced soft-label cross-entropy (targets: each patch's class fractions), full batch, Adam;
  3. its logits upsampled trilinearly to the voxel grid, argmax, Dice per foreground class (metrics.dice); the
     per-volume score is the mean over the classes present in that volume.
The same decoder recipe, volumes and seeds are used for both backbones. eval.json holds
{"task", "metric", "pretrained", "random", "diff_ci": [lo, hi] (95% percentile-bootstrap CI of the mean
per-volume difference pretrained - random over the test volumes), "p_wilcoxon", "per_class", ...}.
"""
import argparse
import json
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

import metrics
import model
from configurator import _excepthook, save_atomic
from phantoms import SyntheticVolumes

TASK = "phantom linear-decoder segmentation (liver, kidneys, lesion), frozen last-4-block patch tokens"
METRIC = "mean foreground Dice per test volume"


@torch.no_grad()
def features(vit: model.ViT3D, images: torch.Tensor, batch: int = 8) -> torch.Tensor:
    """(n, 1, S, S, S) -> (n, N, 4E): the last four blocks' normalised patch tokens, concatenated."""
    vit.eval()
    n_last = min(4, vit.depth)
    out = []
    for i in range(0, len(images), batch):
        layers = vit.get_intermediate_layers(images[i:i + batch], n=n_last)
        out.append(torch.cat(list(layers), dim=-1))
    return torch.cat(out)


def patch_targets(labels: torch.Tensor, patch: int, n_classes: int) -> torch.Tensor:
    """(n, S, S, S) int labels -> (n, N, C) class fractions of each patch (token order of the ViT: C order)."""
    onehot = F.one_hot(labels, n_classes).permute(0, 4, 1, 2, 3).float()  # (n, C, S, S, S)
    frac = F.avg_pool3d(onehot, patch)  # (n, C, g, g, g)
    return frac.flatten(2).transpose(1, 2)  # (n, N, C)


def fit_decoder(X: torch.Tensor, T: torch.Tensor, iters: int = 300, lr: float = 1e-2, seed: int = 0):
    """Linear softmax decoder on (rows, D) features to soft targets (rows, C), class-balanced."""
    g = torch.Generator().manual_seed(seed)
    # W is kept as (C, D) for F.linear: its gradient is then G^T X, which CPU BLAS does ~6x faster than the X^T G
    # that `X @ W` with a (D, C) W asks for (a third of the demo's evaluation time)
    W = (0.01 * torch.randn(X.shape[1], T.shape[1], generator=g)).t().contiguous().requires_grad_()
    b = torch.zeros(T.shape[1], requires_grad=True)
    weight = 1.0 / T.mean(0).clamp_min(1e-4)  # inverse class frequency
    weight = weight / (weight * T.mean(0)).sum()  # the weighted mean target mass is 1
    opt = torch.optim.Adam([W, b], lr=lr)
    for _ in range(iters):
        opt.zero_grad(set_to_none=True)
        logp = F.log_softmax(F.linear(X, W, b), dim=-1)
        loss = -(T * weight * logp).sum(-1).mean()
        loss.backward()
        opt.step()
    return W.detach().t(), b.detach()


def evaluate_backbone(vit, train, test, n_classes, seed, stage=lambda msg: None):
    """Per-test-volume mean foreground Dice and per-class Dice of the linear decoder on vit's features.
    stage(msg) is called as each step starts (the steps take seconds to a minute: the user sees which runs)."""
    p = vit.patch_size
    stage(f"features of {len(train['image'])} training + {len(test['image'])} test phantoms")
    Ftr, Fte = features(vit, train["image"]), features(vit, test["image"])
    mu, sd = Ftr.flatten(0, 1).mean(0), Ftr.flatten(0, 1).std(0).clamp_min(1e-6)
    Ftr, Fte = (Ftr - mu) / sd, (Fte - mu) / sd
    stage("fitting the linear decoder (300 full-batch Adam steps)")
    W, b = fit_decoder(Ftr.flatten(0, 1), patch_targets(train["label"], p, n_classes).flatten(0, 1), seed=seed)
    stage(f"scoring {len(Fte)} test phantoms")
    S = test["label"].shape[1:]
    g = [s // p for s in S]
    logits = (Fte @ W + b).transpose(1, 2).reshape(len(Fte), n_classes, *g)  # (n, C, g, g, g)
    pred = F.interpolate(logits, size=S, mode="trilinear", align_corners=False).argmax(1)  # (n, S, S, S)
    per_class = np.stack([metrics.dice(pr.numpy(), lb.numpy(), n_classes)
                          for pr, lb in zip(pred, test["label"])])  # (n, C-1), NaN where a class is absent
    return np.nanmean(per_class, axis=1), per_class


def phantoms(n: int, size: int, seed: int) -> dict:
    vols = SyntheticVolumes(n, (size,) * 3, seed=seed, with_labels=True)
    items = [vols[i] for i in range(n)]
    return {"image": torch.stack([it["image"] for it in items]), "label": torch.stack([it["label"] for it in items])}


def run(ckpt: str, out: str | None = None, n_train: int = 24, n_test: int = 40, size: int = 64,
        data_seed: int = 90_210, seed: int | None = None, log=print) -> dict:
    """The whole test -> eval.json's dict; log (None: silent) gets one line as each stage starts."""
    t0 = time.perf_counter()

    def say(msg):  # "eval 12s: random init: fitting the linear decoder ...": the 40-60 s are not silent
        if log:
            log(f"eval {time.perf_counter() - t0:.0f}s: {msg}")

    obj = model.load_checkpoint(ckpt)
    vit = model.vit_from_checkpoint(obj)
    if seed is None:  # the pretraining run's seed, so the random twin is exactly its starting point
        seed = int(obj.get("config", {}).get("seed", 0))
    rand = model.random_init_like(obj, seed)  # the pretraining's step-0 backbone
    n_classes = SyntheticVolumes.num_classes
    say(f"{n_train} training + {n_test} test phantoms of {size}^3 (seed {data_seed})")
    train, test = phantoms(n_train, size, data_seed), phantoms(n_test, size, data_seed + 1)
    pre, pre_cls = evaluate_backbone(vit, train, test, n_classes, 0, lambda m: say(f"pretrained backbone: {m}"))
    ran, ran_cls = evaluate_backbone(rand, train, test, n_classes, 0, lambda m: say(f"random init: {m}"))
    diff = pre - ran
    mean, lo, hi = metrics.bootstrap_ci(diff, n_boot=2000)
    res = {"task": TASK, "metric": METRIC, "pretrained": float(np.nanmean(pre)), "random": float(np.nanmean(ran)),
           "diff": mean, "diff_ci": [lo, hi], "p_wilcoxon": metrics.wilcoxon(pre, ran),
           "per_class": {name: {"pretrained": float(np.nanmean(pre_cls[:, i])),
                                "random": float(np.nanmean(ran_cls[:, i]))}
                         for i, name in enumerate(SyntheticVolumes.class_names[1:])},
           "n_train": n_train, "n_test": n_test, "size": size, "data_seed": data_seed, "init_seed": seed,
           "checkpoint": ckpt, "seconds": round(time.perf_counter() - t0, 1)}
    if out:
        save_atomic(json.dumps(res, indent=1).encode(), out, write=lambda b, f: f.write(b))
    return res


def summary_line(res: dict) -> str:
    verdict = ("better than" if res["diff_ci"][0] > 0 else "worse than" if res["diff_ci"][1] < 0
               else "not distinguishable from")
    return (f"eval: {res['metric']} on {res['n_test']} held-out phantoms: pretrained {res['pretrained']:.3f} vs "
            f"random init {res['random']:.3f}, difference {res['diff']:+.3f} (95% CI {res['diff_ci'][0]:+.3f} .. "
            f"{res['diff_ci'][1]:+.3f}, Wilcoxon p={res['p_wilcoxon']:.2g}): the pretrained features are "
            f"{verdict} their random init")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("ckpt", help="a teacher export (pretrain.py's teacher_backbone.pt)")
    ap.add_argument("--out", default=None, help="eval.json path (default: next to the checkpoint)")
    ap.add_argument("--n_train", type=int, default=24)
    ap.add_argument("--n_test", type=int, default=40)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--data_seed", type=int, default=90_210)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads; 0 = torch's default (all cores)")
    a = ap.parse_args()
    sys.excepthook = _excepthook  # input errors (a bad checkpoint) print their message, no traceback
    if a.threads > 0:
        torch.set_num_threads(a.threads)
    if not os.path.isfile(a.ckpt):
        raise SystemExit(f"evaluate.py: {a.ckpt}: no such file")
    try:
        model.vit_from_checkpoint(a.ckpt)
    except Exception as e:  # not a checkpoint, or not a ViT's: say so before any work, without a traceback
        raise SystemExit(f"evaluate.py: {a.ckpt}: not a ViT checkpoint this repository can read ({type(e).__name__})")
    res = run(a.ckpt, a.out or os.path.join(os.path.dirname(a.ckpt) or ".", "eval.json"), a.n_train, a.n_test,
              a.size, a.data_seed)
    print(summary_line(res))
