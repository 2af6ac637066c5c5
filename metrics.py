"""
Evaluation metrics for the downstream tasks, numpy in and numpy out, shared by finetune_seg.py, linear_probe.py
and the experiments that compare them.

- segmentation (per class of an integer label map): `dice`, `hd95` (Hausdorff 95 in mm, as MONAI computes it)
- classification: `accuracy`, `confusion_matrix`, `f1_macro`, `roc_auc`, `macro_auc`
- statistics over cases: `bootstrap_ci` (percentile bootstrap of a mean), `wilcoxon` (paired signed-rank test)
- pretraining health: `collapse_monitors` (torch tensors in, floats out) and `collapse_state`, which pretrain.py
  logs and warns with (README "Reading the collapse monitors")
- step profiling: `PhaseTimer`, the per-phase step times of pretrain.py --profile=True (docs/performance.md)
- pretraining log rows: `LogWindow`, the steps since pretrain.py's previous log row and the row that closes them

Segmentation metrics skip class 0 (background) and return an array of length num_classes - 1 whose entry i is
class i + 1. An undefined value is NaN, so `np.nanmean` over cases aggregates the defined ones; each function
says when it returns NaN. Inputs may be numpy arrays, lists or CPU torch tensors (anything np.asarray takes);
label maps may be float (as `nibabel`'s get_fdata returns them) as long as every value is a whole number.
"""

import math
import time

import numpy as np
import torch
import torch.distributed as dist
from scipy import ndimage, stats

import model


# -----------------------------------------------------------------------------
# input checks


def _as_labels(x, name: str, num_classes: int | None = None) -> np.ndarray:
    """x as an int64 array of class indices, checked to lie in [0, num_classes)."""
    x = np.asarray(x)
    if x.dtype.kind == "f":
        if not np.all(np.isfinite(x) & (x == np.round(x))):
            raise ValueError(f"{name} must hold whole-number class indices, got non-integer values")
    elif x.dtype.kind not in "iub":
        raise ValueError(f"{name} must hold integer class indices, got dtype {x.dtype}")
    x = x.astype(np.int64)
    if num_classes is not None and x.size and (x.min() < 0 or x.max() >= num_classes):
        raise ValueError(f"{name} has values in [{x.min()}, {x.max()}], outside [0, {num_classes})")
    return x


def _same_shape(a: np.ndarray, b: np.ndarray, names: str = "pred and label") -> None:
    if a.shape != b.shape:
        raise ValueError(f"{names} must have the same shape, got {a.shape} and {b.shape}")


# -----------------------------------------------------------------------------
# segmentation


def dice(pred, label, num_classes: int) -> np.ndarray:
    """
    Per-class Dice of two integer label maps: for c = 1..num_classes-1, with P = {pred == c}, L = {label == c},

        Dice_c = 2 |P ∩ L| / (|P| + |L|)

    Conventions: both empty -> NaN (nothing to segment and nothing segmented: undefined, skipped by nanmean);
    exactly one empty -> 0 (falls out of the formula: a missed organ and a hallucinated one both score 0).
    Returns a float64 array of length num_classes - 1.
    """
    pred, label = _as_labels(pred, "pred", num_classes), _as_labels(label, "label", num_classes)
    _same_shape(pred, label)
    # one pass over the volume: the joint histogram of (label, pred) is the confusion matrix of the voxels
    cm = confusion_matrix(pred.ravel(), label.ravel(), num_classes)
    inter = np.diag(cm)[1:].astype(np.float64)
    total = (cm.sum(0) + cm.sum(1))[1:].astype(np.float64)  # |P| + |L|
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, 2 * inter / total, np.nan)


def _surface(mask: np.ndarray) -> np.ndarray:
    # The surface is the mask minus its binary erosion, as MONAI's get_mask_edges does. scipy's default
    # structuring element is the cross (connectivity 1: 6 neighbours in 3D), so a voxel is on the surface when
    # one of its face neighbours is outside; voxels on the array border count as surface (border_value=0).
    return mask & ~ndimage.binary_erosion(mask)


def _directed_hd95(from_surface: np.ndarray, to_surface: np.ndarray, spacing) -> float:
    # distance_transform_edt gives, for every voxel, the Euclidean distance (in mm, via `sampling`) to the
    # nearest zero, so passing ~to_surface gives the distance to the nearest voxel of `to_surface`
    dist = ndimage.distance_transform_edt(~to_surface, sampling=spacing)
    return float(np.percentile(dist[from_surface], 95))  # linear interpolation, numpy's (and MONAI's) default


def hd95(pred, label, num_classes: int, spacing=None, empty: float = np.nan) -> np.ndarray:
    """
    Per-class 95th-percentile Hausdorff distance in mm, for c = 1..num_classes-1, the way MONAI's
    compute_hausdorff_distance(percentile=95) defines it:

        S_P, S_L = surface voxels of P = {pred == c} and L = {label == c}  (mask minus its binary erosion)
        d(p, S) = min over s in S of || (p - s) * spacing ||_2
        HD95_c  = max( P95{ d(p, S_L) : p in S_P },  P95{ d(l, S_P) : l in S_L } )

    `spacing` is the voxel size in mm along each array axis (default 1 for every axis).
    Conventions: both masks empty -> NaN (undefined, like Dice). Exactly one empty -> `empty`, NaN by default:
    the distance to a missing surface has no finite value (MONAI gives inf or nan), and NaN keeps nanmean
    usable. Such a case is not hidden from the evaluation: its Dice is 0; count these cases with
    `np.isnan(hd) & ~np.isnan(dice(...))`, or pass empty=np.inf to have them dominate any mean, as MONAI's do.

    Speed: both distance transforms run on the bounding box of P ∪ L, padded by one voxel, instead of the
    whole volume. That is exact: every surface voxel of both masks lies inside the box, so the nearest one to
    any voxel of the box is found inside it, and the erosion sees the same zeros at the box edge as outside it
    (the pad is not needed for correctness, it only keeps the box edge off the masks when possible).
    """
    pred, label = _as_labels(pred, "pred", num_classes), _as_labels(label, "label", num_classes)
    _same_shape(pred, label)
    spacing = np.ones(pred.ndim) if spacing is None else np.asarray(spacing, dtype=np.float64)
    if spacing.shape != (pred.ndim,) or np.any(spacing <= 0):
        raise ValueError(f"spacing must hold {pred.ndim} positive voxel sizes, got {spacing.tolist()}")
    out = np.full(num_classes - 1, np.nan)
    for c in range(1, num_classes):
        p, l = pred == c, label == c
        union = p | l
        if not union.any():
            continue  # both empty: NaN
        if not (p.any() and l.any()):
            out[c - 1] = empty
            continue
        # bounding box of the union along each axis, padded by one voxel and clipped to the array
        box = []
        for axis in range(union.ndim):
            hit = np.flatnonzero(union.any(axis=tuple(a for a in range(union.ndim) if a != axis)))
            box.append(slice(max(hit[0] - 1, 0), hit[-1] + 2))
        sp, sl = _surface(p[tuple(box)]), _surface(l[tuple(box)])
        out[c - 1] = max(_directed_hd95(sp, sl, spacing), _directed_hd95(sl, sp, spacing))
    return out


# -----------------------------------------------------------------------------
# classification


def accuracy(pred, labels) -> float:
    """Fraction of samples whose predicted class equals the true one."""
    pred, labels = _as_labels(pred, "pred"), _as_labels(labels, "labels")
    _same_shape(pred, labels, "pred and labels")
    if pred.size == 0:
        raise ValueError("accuracy of zero samples is undefined")
    return float(np.mean(pred == labels))


def confusion_matrix(pred, labels, num_classes: int) -> np.ndarray:
    """(num_classes, num_classes) int64 counts; rows are the true class, columns the predicted one."""
    pred = _as_labels(pred, "pred", num_classes).ravel()
    labels = _as_labels(labels, "labels", num_classes).ravel()
    _same_shape(pred, labels, "pred and labels")
    # each (true, predicted) pair gets one flat bin index; bincount counts all pairs in one pass
    return np.bincount(labels * num_classes + pred, minlength=num_classes**2).reshape(num_classes, num_classes)


def f1_macro(pred, labels, num_classes: int) -> float:
    """
    Macro F1: the unweighted mean over classes of F1_k = 2 TP_k / (2 TP_k + FP_k + FN_k).

    The mean runs over the classes that occur in `labels` or in `pred`, as sklearn's
    f1_score(labels, pred, average="macro", zero_division=0) does: a class that is predicted but absent from
    the labels, or present but never predicted, scores 0; a class absent from both (say, a test split without
    that class) is left out rather than counted as 0 or 1, since it says nothing about the classifier.
    """
    cm = confusion_matrix(pred, labels, num_classes)
    tp = np.diag(cm)
    fp, fn = cm.sum(0) - tp, cm.sum(1) - tp  # column sums are predictions, row sums are the true counts
    seen = (cm.sum(0) + cm.sum(1)) > 0
    if not seen.any():
        raise ValueError("f1_macro of zero samples is undefined")
    return float(np.mean(2 * tp[seen] / (2 * tp[seen] + fp[seen] + fn[seen])))


def roc_auc(scores, labels) -> float:
    """
    Binary ROC AUC: the probability that a random positive scores higher than a random negative, ties counted
    as one half. It equals the Mann-Whitney U statistic of the positives divided by n_pos * n_neg:

        U   = (sum of the ranks of the positives among all scores) - n_pos (n_pos + 1) / 2
        AUC = U / (n_pos * n_neg)

    with average ranks for ties (scipy.stats.rankdata), which is what counts a tie as 1/2. Constant scores give
    0.5. `labels` are 0/1 (or bool); both classes must be present, otherwise the AUC is undefined (error).
    """
    scores = np.asarray(scores, dtype=np.float64)
    labels = _as_labels(labels, "labels", 2)
    _same_shape(scores, labels, "scores and labels")
    if scores.ndim != 1 or not np.all(np.isfinite(scores)):
        raise ValueError(f"scores must be a 1-D array of finite numbers, got shape {scores.shape}")
    n_pos = int(labels.sum())
    n_neg = labels.size - n_pos
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"roc_auc needs both classes, got {n_pos} positives and {n_neg} negatives")
    ranks = stats.rankdata(scores)  # 1-based, ties get the average of the ranks they span
    u = ranks[labels == 1].sum() - n_pos * (n_pos + 1) / 2
    return float(u / (n_pos * n_neg))


def macro_auc(probs, labels) -> float:
    """
    One-vs-rest macro ROC AUC: the mean over classes k of roc_auc(probs[:, k], labels == k).

    probs is (n, K) (class scores or probabilities; only their order within a column matters), labels holds
    n class indices in [0, K). A class with no sample in `labels` has no one-vs-rest AUC and is skipped (its
    column is not used); at least two classes must be present.
    """
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2:
        raise ValueError(f"probs must be (n, K), got shape {probs.shape}")
    labels = _as_labels(labels, "labels", probs.shape[1])
    if labels.shape != (probs.shape[0],):
        raise ValueError(f"labels must be ({probs.shape[0]},) to match probs {probs.shape}, got {labels.shape}")
    present = np.unique(labels)
    if present.size < 2:
        raise ValueError(f"macro_auc needs at least two classes in labels, got {present.tolist()}")
    return float(np.mean([roc_auc(probs[:, k], labels == k) for k in present]))


# -----------------------------------------------------------------------------
# statistics over cases


def bootstrap_ci(values, n_boot: int = 1000, alpha: float = 0.05, seed: int = 0) -> tuple[float, float, float]:
    """
    (mean, low, high): the mean of `values` and its percentile-bootstrap (1 - alpha) confidence interval.

    NaNs are dropped first (undefined per-case metrics, see dice/hd95). Then n_boot resamples of the n values,
    drawn with replacement from np.random.default_rng(seed), give n_boot means; low and high are their
    alpha/2 and 1 - alpha/2 percentiles. One value gives (v, v, v) and no value (nan, nan, nan).
    """
    values = np.asarray(values, dtype=np.float64).ravel()
    values = values[~np.isnan(values)]
    if values.size == 0:
        return (float("nan"),) * 3
    mean = float(values.mean())
    if values.size == 1:
        return mean, mean, mean
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, values.size, size=(n_boot, values.size))  # (n_boot, n) resample indices
    boot_means = values[idx].mean(axis=1)
    low, high = np.percentile(boot_means, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return mean, float(low), float(high)


def wilcoxon(a, b) -> float:
    """
    Two-sided p-value of the Wilcoxon signed-rank test on paired values a[i], b[i] (scipy.stats.wilcoxon with
    its defaults: zero differences dropped, exact distribution for small n without ties).

    A pair with a NaN on either side is dropped (the metric was undefined for that case). NaN is returned when
    fewer than 2 pairs remain or all differences are zero: there is then nothing to test.
    """
    a, b = np.asarray(a, dtype=np.float64).ravel(), np.asarray(b, dtype=np.float64).ravel()
    _same_shape(a, b, "a and b")
    keep = ~(np.isnan(a) | np.isnan(b))
    a, b = a[keep], b[keep]
    if a.size < 2 or np.all(a == b):
        return float("nan")
    return float(stats.wilcoxon(a, b).pvalue)


# -----------------------------------------------------------------------------
# pretraining health: is the DINO/iBOT run learning, or sitting at a collapsed fixed point?


def _row_entropy(p: torch.Tensor) -> torch.Tensor:
    """H(p_i) = -sum_k p_ik log p_ik per row, in nats (0 log 0 = 0)."""
    p = p.float()
    return -(p * torch.log(p.clamp_min(1e-30))).sum(-1)


def effective_rank(x: torch.Tensor) -> float:
    """exp(H(s / sum s)) of the singular values s of the row-centred (n, d) matrix x (RankMe): 1 when every row
    lies on one line, min(n - 1, d) when the rows spread evenly over every direction."""
    s = torch.linalg.svdvals(x.float() - x.float().mean(0, keepdim=True))
    if float(s.sum()) == 0.0:
        return 0.0
    return float(torch.exp(_row_entropy(s / s.sum())))


@torch.no_grad()
def collapse_monitors(teacher_cls, teacher_logits, dino_targets, student_cls, ibot_targets=None,
                      ibot_weights=None, teacher_temp=None, dino_loss=None, ibot_loss=None, n_crops=None) -> dict:
    """
    Health numbers of one DINO/iBOT step, from tensors the step has anyway (nats unless said):

    dino_target_entropy   mean_i H(p_i) of the teacher CLS targets (2B, K): ln K = uniform (no information);
                          Sinkhorn-Knopp keeps it >= ~ln(K / 2B) in a healthy run; -> 0 one-hot
    dino_marginal_entropy H(mean_i p_i): ~ln K when the batch uses every prototype; -> 0 when one prototype
                          takes every image (the one-hot collapse softmax centering can fall into)
    ibot_target_entropy   mean H over the masked-token targets (M, K)
    teacher_cls_std       std over the batch's rows of the L2-normalised teacher CLS (2B, E), mean over dims:
                          ~1/sqrt(E) when images point in different directions, -> 0 when all look alike
    teacher_logit_spread  mean_k std_i(z_ik) / teacher_temp: how far the targets can move off uniform; << 0.1 means
                          image-independent teacher outputs
    cls_effective_rank    effective rank of the centred student CLS (2B, E)
    dino_kl, ibot_kl      loss - target entropy = KL(teacher || student): ~0 when the student only copies a
                          (possibly uninformative) target; stays > 0 while there is something left to learn
    """
    out = {"dino_target_entropy": float(_row_entropy(dino_targets).mean()),
           "dino_marginal_entropy": float(_row_entropy(dino_targets.float().mean(0))),
           "teacher_cls_std": float(torch.nn.functional.normalize(teacher_cls.float(), dim=-1).std(0).mean()),
           "cls_effective_rank": effective_rank(student_cls)}
    if teacher_temp:
        out["teacher_logit_spread"] = float(teacher_logits.float().std(0).mean()) / teacher_temp
    if dino_loss is not None:
        out["dino_kl"] = float(dino_loss) - out["dino_target_entropy"]
    if ibot_targets is not None and len(ibot_targets):
        h = _row_entropy(ibot_targets)
        out["ibot_target_entropy"] = float(h.mean())
        if ibot_loss is not None and ibot_weights is not None and n_crops:
            # the iBOT loss is sum_j w_j CE_j / n_crops: subtract the same weighting of H to get the KL part
            out["ibot_kl"] = float(ibot_loss) - float((ibot_weights.float() * h).sum()) / n_crops
    return out


def collapse_state(rec: dict, n_prototypes: int) -> str | None:
    """"uniform", "one-hot" or None (no collapse these numbers can see) for one logged row of monitors.

    uniform: the teacher targets carry (almost) no image information: per-row target entropy >= 0.98 ln K. The
        DINO loss then sits at ln K (and iBOT at p_mask ln K) whatever the student does.
    one-hot: one prototype takes (almost) every image: marginal target entropy < 0.1 ln K (softmax centering can
        fall into it; Sinkhorn-Knopp's equal-share constraint excludes it).
    """
    ln_k = math.log(n_prototypes)
    if rec.get("dino_target_entropy", 0.0) >= 0.98 * ln_k:
        return "uniform"
    if rec.get("dino_marginal_entropy", ln_k) < 0.1 * ln_k:
        return "one-hot"
    return None


COLLAPSE_ADVICE = {  # the knobs in the order they mattered in experiments/README.md's runs
    "uniform": ("the teacher's DINO targets are uniform: they carry no image information and the DINO loss sits "
                "at ln K. Try, most effective first: a much lower, constant teacher temperature "
                "(warmup_teacher_temp = teacher_temp = 0.005-0.01 with Sinkhorn-Knopp); check that views of one "
                "volume share something (experiments/data_check.py); layerscale_init 0.1 (< 18 blocks); "
                "a fast teacher (momentum_teacher 0.9); head_n_prototypes of a few hundred; more steps"),
    "one-hot": ("one prototype takes the whole batch (constant, one-hot targets): the features no longer depend "
                "on the image. Try centering='sinkhorn_knopp' (its equal-share constraint excludes this), or a "
                "higher teacher_temp"),
}


def pretrain_summary(rows: list[dict], n_prototypes: int, p_mask: float, ibot_prototypes: int | None = None) -> str:
    """One line on what a pretraining run's losses say, from its logged rows (log.jsonl, in order): the DINO and
    iBOT losses at the first row and over the last 10% of rows (at least one), against their no-information
    values ln K and p_mask·ln K_ibot. Below 0.8 ln K the run has left the uniform fixed point (experiments/README.md)."""
    rows = [r for r in rows if "dino_loss" in r]
    if not rows:
        return "pretraining: no logged step"
    ln_k, tail = math.log(n_prototypes), rows[-max(1, len(rows) // 10):]
    ibot_floor = p_mask * math.log(ibot_prototypes or n_prototypes)
    dino, ibot = (sum(r[k] for r in tail) / len(tail) for k in ("dino_loss", "ibot_loss"))
    verdict = ("left the uniform fixed point (<= 0.8 ln K)" if dino <= 0.8 * ln_k else
               "still near the uniform fixed point (ln K)" if dino >= 0.95 * ln_k else
               "below ln K but above the 0.8 ln K criterion: leaving it slowly")
    return (f"pretraining: DINO loss {rows[0]['dino_loss']:.3f} -> {dino:.3f} = {dino / ln_k:.3f} ln K over the last "
            f"{len(tail)} of {len(rows)} log rows: {verdict}; iBOT {rows[0]['ibot_loss']:.3f} -> {ibot:.3f} = "
            f"{ibot / ibot_floor:.2f} x its no-information value {p_mask:g} ln K")


# -----------------------------------------------------------------------------
# step profiling: where the time of a training step goes


class PhaseTimer:
    """Time the phases of a training loop without adding host syncs: `mark(name)` ends the phase that is open and
    opens `name`; `mark(name, new_step=True)` also starts a new step. `read()` returns the mean ms per
    step of every phase over the steps completed since the previous read, and their sum as `step_ms`.

    On CUDA a mark records an event in the current stream, so a phase is its span on the GPU's timeline (a data
    wait is then the time the GPU sat idle waiting for the host); only `read()`, called at log steps, waits for
    the events. On CPU a mark reads the wall clock. Disabled (enabled=False), a mark is a no-op."""

    current = None  # the last timer created: bench.py's sync counter reads its open phase

    def __init__(self, enabled: bool, device: str):
        self.enabled, self.cuda = enabled, str(device).startswith("cuda")
        self.phase, self.marks, self.steps = None, [], 0  # marks: (phase, event or perf_counter time, new step)
        PhaseTimer.current = self

    def mark(self, phase: str, new_step: bool = False) -> None:
        if not self.enabled:
            return
        if self.cuda:
            t = torch.cuda.Event(enable_timing=True)
            t.record()
        else:
            t = time.perf_counter()
        self.steps += new_step
        self.marks.append((phase, t, new_step))
        self.phase = phase

    def read(self) -> dict:
        """{phase: ms per step} over the completed steps since the last read (the open step carries over)."""
        starts = [i for i, m in enumerate(self.marks) if m[2]]
        if len(starts) < 2:
            return {}
        done, self.marks = self.marks[:starts[-1] + 1], self.marks[starts[-1]:]
        if self.cuda:
            done[-1][1].synchronize()
            ms = [a[1].elapsed_time(b[1]) for a, b in zip(done, done[1:])]
        else:
            ms = [1e3 * (b[1] - a[1]) for a, b in zip(done, done[1:])]
        out = {}
        for (phase, *_), t in zip(done, ms):
            out[phase] = out.get(phase, 0.0) + t / (len(starts) - 1)
        out["step_ms"] = sum(ms) / (len(starts) - 1)
        return out


# -----------------------------------------------------------------------------
# pretraining log rows: one row of log.jsonl sums up the steps since the previous row

PRETRAIN_MONITORS = ("dino_target_entropy", "dino_marginal_entropy", "ibot_target_entropy", "teacher_cls_std",
                     "teacher_logit_spread", "cls_effective_rank", "dino_kl", "ibot_kl", "layerscale_gamma")


def layerscale_gamma(backbone) -> torch.Tensor:
    """Mean |gamma| of the LayerScales of every block (both per block, averaged): how much the blocks add to the
    residual stream; it stays at layerscale_init when the blocks learn nothing."""
    gammas = [(b.ls1.gamma.detach().abs().mean() + b.ls2.gamma.detach().abs().mean()) / 2 for b in backbone.blocks]
    return torch.stack(gammas).mean()


class LogWindow:
    """The steps of pretrain.py since its previous log row: `add` one step's losses (summed on the device: no
    host sync) and data-wait seconds; `row` builds the next log row from them and this step's numbers, and opens
    the next window.

    A row holds the step, the losses as means over the window (one step's DINO loss is noisy: +-0.05 ln K at the
    demo's batch of 16), this step's schedules and pre-clip grad norms, samples/s and the share of the window's
    wall time spent waiting for data, this step's collapse monitors (collapse_monitors, layerscale_gamma), the
    per-phase ms (PhaseTimer, when enabled), the collapse state (collapse_state, once check_collapse), and on
    CUDA the peak memory and the MFU. Under DDP the losses and monitors are averaged over the ranks."""

    def __init__(self, device, batch_size: int, world_size: int, n_prototypes: int, flops_per_image: float,
                 timer: PhaseTimer):
        self.device, self.batch_size, self.world_size = device, batch_size, world_size
        self.n_prototypes, self.flops_per_image, self.timer = n_prototypes, flops_per_image, timer
        self.loss_sum = torch.zeros(3, dtype=torch.float64, device=device)  # dino, ibot, koleo
        self.open()

    def open(self) -> None:
        self.loss_sum.zero_()
        self.steps, self.data_wait, self.t_start = 0, 0.0, time.perf_counter()

    def add(self, terms: dict, data_wait: float) -> None:
        """terms: this step's {"dino_loss", "ibot_loss", "koleo_loss"} tensors (the weighted KoLeo term)."""
        self.steps += 1
        self.data_wait += data_wait
        self.loss_sum += torch.stack([terms["dino_loss"], terms["ibot_loss"], terms["koleo_loss"]]).detach().double()

    def row(self, step: int, schedules: dict, grad_norms: dict, monitor_in: dict, backbone,
            check_collapse: bool) -> dict:
        """schedules: this step's {"lr", "wd", "momentum", "teacher_temp", "last_layer_lr"}; grad_norms: the
        pre-clip norm per sub-module; monitor_in: the keyword arguments of collapse_monitors."""
        mon = collapse_monitors(**monitor_in)
        mon["layerscale_gamma"] = float(layerscale_gamma(backbone))
        mon = {k: mon.get(k, float("nan")) for k in PRETRAIN_MONITORS}  # the same keys on every rank
        vals = torch.cat([self.loss_sum / self.steps,
                          torch.tensor(list(mon.values()), dtype=torch.float64, device=self.device)])
        if dist.is_initialized():
            dist.all_reduce(vals, op=dist.ReduceOp.AVG)
        mon = dict(zip(PRETRAIN_MONITORS, vals[3:].tolist()))
        dt = time.perf_counter() - self.t_start
        samples_per_s = self.steps * self.batch_size / dt
        rec = {"step": step, "loss": float(vals[:3].sum()), "dino_loss": float(vals[0]), "ibot_loss": float(vals[1]),
               "koleo_loss": float(vals[2]), **schedules, **{f"grad_norm_{k}": float(v) for k, v in grad_norms.items()},
               "samples_per_s": samples_per_s, "data_wait_frac": self.data_wait / dt, **mon}
        if self.timer.enabled:
            rec["phase_ms"] = self.timer.read()
        rec["collapse"] = collapse_state(rec, self.n_prototypes) if check_collapse else None
        if str(self.device).startswith("cuda"):
            rec["peak_mem_gb"] = torch.cuda.max_memory_allocated(self.device) / 2 ** 30
            mfu = model.estimate_mfu(self.flops_per_image, samples_per_s / self.world_size, self.device)
            if mfu is not None:
                rec["mfu"] = mfu
        self.open()
        return rec
