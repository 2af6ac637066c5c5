"""
The 3DINO / DINOv2 training objective: teacher-target normalisation, the DINO CLS loss, the iBOT masked-patch
loss and the KoLeo regulariser. Pure functions on tensors; no state, no config globals.

What one training step computes (3DINO paper, Methods, Eq. 1-2):

    targets_cls   = sinkhorn_knopp(teacher CLS logits of the 2 global crops, teacher_temp)     # or softmax_center
    targets_patch = sinkhorn_knopp(teacher patch logits at the masked positions, teacher_temp)
    loss = dino_loss(student CLS logits of all crops, targets_cls)                     # Eq. 1, averaged over 18 pairs
         + ibot_loss(student patch logits at the masked positions, targets_patch, ...)  # Eq. 2, per-image mean
         + 0.1 * (koleo_loss(student backbone CLS of global crop 0) + koleo_loss(... of global crop 1))

Conventions (those of the reference's collate):
  K   number of prototypes (the head's output size, 65536 in the paper)
  B   images per GPU; every crop is a (B, K) block of logits
  global rows (2B, K) are crop-major: row r is global crop r // B of image r % B, so `.chunk(2)` gives the crops
  local rows  (8B, K) are crop-major too: `.chunk(8)` gives the 8 local crops
  patch rows  (M, K) are the M masked tokens, row-major over the (2B, N) bool masks

Precision: every function computes in fp32 whatever dtype the heads ran in (bf16 has 8 mantissa bits; at
teacher_temp 0.04 a logit of 3.6 gives exp(90) = inf even in fp32). Distributed: `sinkhorn_knopp` and
`update_center` all-reduce their batch statistics when a process group exists; the losses are local means that
DDP's gradient averaging turns into global ones.
"""

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor


def _ddp() -> bool:
    """True when there is a process group to all-reduce over (CPU runs and most tests have none)."""
    return dist.is_available() and dist.is_initialized()


# ============ teacher targets: Sinkhorn-Knopp (default) ============


@torch.no_grad()
def sinkhorn_knopp(teacher_logits: Tensor, teacher_temp: float, n_iters: int = 3) -> Tensor:
    """
    Teacher probabilities by Sinkhorn-Knopp normalisation (DINOv2 / SwAV), the default `centering`:

        P = diag(u) exp(T / teacher_temp) diag(v)     (n_total, K), rows summing to 1, columns to n_total / K

    T (n, K) are this rank's logits, n_total the rows of all ranks. Equal column sums give every prototype the same
    share of the batch, which forbids the collapse onto one prototype without DINO v1's running center. As the
    reference, n_iters rounds of alternating normalisation, in fp32, with Q = P^T (K, n):
        Q = exp((T - max_rows T) / teacher_temp)^T;  Q /= sum(Q)
        repeat n_iters: Q /= K * Q.sum(1, keepdim)  (prototypes, all ranks);  Q /= n_total * Q.sum(0, keepdim)
        return (n_total * Q)^T                        rows sum to 1 exactly; column sums only roughly equal
    Subtracting each prototype's max (all-reduced) is the one difference from the reference: the first prototype
    normalisation divides it out again, but the reference's exp overflows once a logit exceeds ~3.5 at
    teacher_temp 0.04. The sums, maxima and row count are all-reduced, so each rank gets its rows of the Sinkhorn
    matrix of the whole global batch; ranks may hold different numbers of rows, even none (every rank must call).

    teacher_logits: (n, K), any float dtype — for DINO both global crops' 2B rows together, for iBOT the M masked
    tokens. Returns (n, K) fp32 probabilities in the input's row order, no gradient.
    """
    if teacher_logits.ndim != 2:
        raise ValueError(f"losses.py: sinkhorn_knopp expects (n, K) logits, got shape {tuple(teacher_logits.shape)}")
    if teacher_temp <= 0:
        raise ValueError(f"losses.py: sinkhorn_knopp needs teacher_temp > 0, got {teacher_temp}")
    if n_iters < 1:
        raise ValueError(f"losses.py: sinkhorn_knopp needs n_iters >= 1, got {n_iters}")
    T = teacher_logits.float()
    n_local, K = T.shape

    # global row count and per-prototype max (empty ranks contribute 0 rows and -inf). No .item() here: in DDP a batch
    # with no rows on *any* rank is not checked (that would be a host sync every step); it gives NaN targets,
    # and pretrain.py's finite check on the total loss stops the run.
    if n_local == 0 and not _ddp():
        raise ValueError("losses.py: sinkhorn_knopp got no rows (e.g. an iBOT step with no masked token)")
    n_total = torch.tensor(float(n_local), device=T.device)
    t_max = T.amax(dim=0) if n_local > 0 else torch.full((K,), float("-inf"), device=T.device)  # (K,)
    if _ddp():
        dist.all_reduce(n_total)
        dist.all_reduce(t_max, op=dist.ReduceOp.MAX)

    Q = torch.exp((T - t_max) / teacher_temp).t()  # (n, K) -> (K, n)
    total = Q.sum()
    if _ddp():
        dist.all_reduce(total)
    Q = Q / total
    for _ in range(n_iters):
        # each prototype (row of Q) gets total mass 1/K, summed over the samples of every rank
        proto_sum = Q.sum(dim=1, keepdim=True)  # (K, 1)
        if _ddp():
            dist.all_reduce(proto_sum)
        Q = Q / proto_sum / K
        # each sample (column of Q) gets total mass 1/n_total; a column lives on one rank, so no all-reduce
        Q = Q / Q.sum(dim=0, keepdim=True) / n_total
    return (Q * n_total).t()  # (K, n) -> (n, K), rows sum to 1


# ============ teacher targets: softmax centering (DINO v1 alternative) ============


@torch.no_grad()
def softmax_center(teacher_logits: Tensor, center: Tensor, teacher_temp: float) -> Tensor:
    """
    Teacher probabilities by centering and sharpening, DINO v1's anti-collapse recipe (`centering = "softmax"`):

        P = softmax((T - c) / teacher_temp, dim=-1)

    Subtracting the running mean c stops one prototype from dominating; the low temperature stops the opposite
    collapse to uniform. teacher_logits (..., K), any float dtype; center: K numbers in any shape ((1, K) for
    DINO, (1, 1, K) for iBOT in reference checkpoints). Returns fp32 probabilities shaped like the logits.
    """
    K = teacher_logits.shape[-1]
    if center.numel() != K:
        raise ValueError(f"losses.py: softmax_center: center has {center.numel()} values but the logits have K={K}")
    if teacher_temp <= 0:
        raise ValueError(f"losses.py: softmax_center needs teacher_temp > 0, got {teacher_temp}")
    return torch.softmax((teacher_logits.float() - center.float().reshape(K)) / teacher_temp, dim=-1)


@torch.no_grad()
def update_center(center: Tensor, teacher_logits: Tensor, momentum: float = 0.9) -> Tensor:
    """
    EMA of the teacher logits' batch mean, the DINO v1 center:

        c <- momentum * c + (1 - momentum) * mean over all rows of all ranks of T

    Row sums and row counts are all-reduced, so ranks may hold different numbers of rows. The reference applies the
    batch mean lazily at the next `softmax_center` call; `probs = softmax_center(T, c, tau); c = update_center(c,
    T)` in one step is the same. Returns the new center with `center`'s shape and dtype (`center` is not modified).
    """
    K = teacher_logits.shape[-1]
    if center.numel() != K:
        raise ValueError(f"losses.py: update_center: center has {center.numel()} values but the logits have K={K}")
    T = teacher_logits.float().reshape(-1, K)  # (..., K) -> (rows, K)
    if T.shape[0] == 0 and not _ddp():
        raise ValueError("losses.py: update_center got no rows")
    row_sum = T.sum(dim=0)  # (K,)
    n_rows = torch.tensor(float(T.shape[0]), device=T.device)
    if _ddp():
        dist.all_reduce(row_sum)
        dist.all_reduce(n_rows)
    batch_mean = row_sum / n_rows
    new = momentum * center.float().reshape(K) + (1 - momentum) * batch_mean
    return new.reshape(center.shape).to(center.dtype)


# ============ DINO CLS loss (paper Eq. 1) ============


def _cross_entropy(teacher_probs: Tensor, student_logits: Tensor, student_temp: float) -> Tensor:
    """
    Per-row H(t, s) = -sum_k t_k log softmax(s / student_temp)_k, in fp32. Returns (rows,).
    The teacher side is detached: the targets are constants (stop-gradient, the teacher learns by EMA only).
    """
    log_p = F.log_softmax(student_logits.float() / student_temp, dim=-1)
    return -(teacher_probs.detach().float() * log_p).sum(dim=-1)


def dino_loss(
    student_logits: list[Tensor],
    teacher_probs: list[Tensor],
    student_temp: float = 0.1,
) -> Tensor:
    """
    The image-level DINO loss (paper Eq. 1), averaged over (teacher crop, student crop) pairs:

        L = 1/n_pairs * sum_{t in globals} sum_{s in all crops, s != t} mean_b H(P_t[b], S_s[b])
        H(p, s) = -sum_k p_k log softmax(s / student_temp)_k

    Each teacher global crop supervises every other crop of the image; local crops are never targets. For 2 global
    and 8 local crops n_pairs = 2 + 16 = 18, and L equals the reference's `dino_local_crops_loss +
    dino_global_crops_loss`. The teacher list is in natural crop order and pairs by crop index, which is the
    reference's swap of the two global chunks. With no local crops n_pairs = 2 (the reference's formula would say 3).

    student_logits: per-crop (B, K) outputs, the n_global global crops first (`s_global.chunk(2) +
    s_local.chunk(8)`); teacher_probs: n_global (B, K) targets (`sinkhorn_knopp(t_global, tau).chunk(2)`).
    Returns a scalar fp32 loss (NaN/inf pass through: pretrain.py checks the total); gradients reach the student
    logits only.
    """
    student_logits, teacher_probs = list(student_logits), list(teacher_probs)
    n_global = len(teacher_probs)
    if n_global < 1 or len(student_logits) < n_global:
        raise ValueError(
            f"losses.py: dino_loss needs >= 1 teacher crop and at least as many student crops (globals first), "
            f"got {n_global} teacher and {len(student_logits)} student crops"
        )
    shape = tuple(teacher_probs[0].shape)
    for i, x in enumerate(teacher_probs + student_logits):
        if x.ndim != 2 or tuple(x.shape) != shape:
            who = f"teacher crop {i}" if i < n_global else f"student crop {i - n_global}"
            raise ValueError(
                f"losses.py: dino_loss: {who} has shape {tuple(x.shape)}, expected (B, K) = {shape} like teacher "
                f"crop 0 (mismatched K or batch?)"
            )

    total, n_pairs = 0.0, 0
    for t, p in enumerate(teacher_probs):  # teacher global crop t ...
        for s, logits in enumerate(student_logits):  # ... supervises every other student crop s
            if s == t:
                continue  # no same-view pair
            total = total + _cross_entropy(p, logits, student_temp).mean()  # mean over the B images
            n_pairs += 1
    if n_pairs == 0:
        raise ValueError("losses.py: dino_loss: one global crop and no local crops leave no (teacher, student) pair")
    return total / n_pairs


# ============ iBOT masked-patch loss (paper Eq. 2) ============


def ibot_loss(
    student_patch_logits: Tensor,
    teacher_patch_probs: Tensor,
    masks_weight: Tensor,
    n_crops: int,
    student_temp: float = 0.1,
) -> Tensor:
    """
    The patch-level iBOT loss (paper Eq. 2) over the masked tokens, each global-crop image weighted equally:

        L = 1/n_crops * sum_j w_j H(Q_j, s_j),      w_j = 1 / (number of masked tokens in token j's image)

    j runs over the M masked tokens of this rank's n_crops global-crop images, so L is the mean over images of the
    mean CE over each image's masked tokens (unmasked images count 0). This is the reference's
    `iBOTPatchLoss.forward_masked` times its training-step scaling (x1); the reference logs L / 2.
    n_crops is the number of global-crop *rows* the masks were drawn for, masks.shape[0] = 2B — not the 2 global
    crops per image, which would scale L by B (the weights sum to the number of masked images, <= n_crops).

    student_patch_logits, teacher_patch_probs: (M, K); masks_weight: (M,) w_j as made by the collate.
    Returns a scalar fp32 loss; gradients reach the student logits only.
    """
    if student_patch_logits.ndim != 2 or tuple(student_patch_logits.shape) != tuple(teacher_patch_probs.shape):
        raise ValueError(
            f"losses.py: ibot_loss: student {tuple(student_patch_logits.shape)} and teacher "
            f"{tuple(teacher_patch_probs.shape)} must both be (M, K) with the same M and K"
        )
    M = student_patch_logits.shape[0]
    if M == 0:
        raise ValueError("losses.py: ibot_loss got an empty mask set (no masked token); nothing to predict")
    if tuple(masks_weight.shape) != (M,):
        raise ValueError(f"losses.py: ibot_loss: masks_weight has shape {tuple(masks_weight.shape)}, expected ({M},)")
    if n_crops < 1:
        raise ValueError(f"losses.py: ibot_loss: n_crops must be >= 1, got {n_crops}")
    w = masks_weight.float()
    return (w * _cross_entropy(teacher_patch_probs, student_patch_logits, student_temp)).sum() / n_crops


# ============ KoLeo regulariser ============


def koleo_loss(x: Tensor, eps: float = 1e-8) -> Tensor:
    """
    Kozachenko-Leonenko differential-entropy estimator (DINOv2; Sablayrolles et al. 2019), a regulariser that
    spreads features on the sphere:

        x_i <- x_i / max(|x_i|, eps);   nn(i) = argmax_{j != i} <x_i, x_j>
        L = -1/n sum_i log(|x_i - x_nn(i) + eps|_2 + eps)

    The diagonal of the Gram matrix is set to -1 to exclude i itself (the reference's choice: one row finds
    itself, and the loss is a constant). Always fp32 with autocast off: under the reference's fp16 autocast eps
    underflows and a duplicated image gives inf; here it gives ~16, finite. pretrain.py applies it to the student's
    global CLS tokens one global crop at a time: 0.1 * (koleo_loss(cls[:B]) + koleo_loss(cls[B:])).
    x: (n, D), any float dtype. Returns a scalar fp32 loss.
    """
    if x.ndim != 2 or x.shape[0] < 1:
        raise ValueError(f"losses.py: koleo_loss expects (n >= 1, D) features, got shape {tuple(x.shape)}")
    with torch.autocast(device_type=x.device.type, enabled=False):
        x = F.normalize(x.float(), p=2, dim=-1, eps=eps)
        with torch.no_grad():  # the neighbour index is a discrete choice; the gradient flows through d_i
            dots = x @ x.t()  # (n, D) @ (D, n) -> (n, n) cosine similarities
            dots.fill_diagonal_(-1.0)
            nn_idx = dots.argmax(dim=1)  # (n,)
        d = torch.linalg.vector_norm(x - x[nn_idx] + eps, ord=2, dim=-1)  # (n,)
        return -torch.log(d + eps).mean()


# ============ segmentation losses (MONAI DiceLoss / DiceCELoss semantics), for finetune_seg.py ============


def dice_loss(probs, target, squared: bool = False, smooth_nr: float = 1e-5, smooth_dr: float = 1e-5):
    """1 − (2 Σ p·g + smooth_nr) / (Σ p + Σ g + smooth_dr), per sample and channel, then the mean (MONAI's
    DiceLoss with include_background=True, batch=False). probs, target: (B, K, H, W, D); `squared` sums p², g²
    in the denominator (squared_pred=True, used for BraTS). A channel empty in both scores loss 0."""
    dims = tuple(range(2, probs.ndim))
    inter = (probs * target).sum(dims)
    denom = (probs ** 2).sum(dims) + (target ** 2).sum(dims) if squared else probs.sum(dims) + target.sum(dims)
    return (1 - (2 * inter + smooth_nr) / (denom + smooth_dr)).mean()


def label_to_regions(label, regions):
    """Integer label map (B, H, W, D) -> float region masks (B, R, H, W, D); region r = label ∈ regions[r]
    (BraTS: TC = {1, 3}, WT = {1, 2, 3}, ET = {3}; regions overlap, so they are sigmoid channels)."""
    return torch.stack([torch.isin(label, torch.tensor(r, device=label.device)) for r in regions], 1).float()


def seg_loss(logits, label, loss: str = "dice_ce", regions=None):
    """logits (B, K, H, W, D), label (B, H, W, D) int64 -> scalar.
    "dice_ce": Dice(softmax, one-hot) + CE (BTCV, LA-SEG, TDSC-ABUS);  "dice": Dice(softmax, one-hot) only;
    "sigmoid_dice": Dice(sigmoid, region masks, squared, smooth_nr 0, smooth_dr 1e-5) (BraTS)."""
    logits = logits.float()
    if loss == "sigmoid_dice":
        return dice_loss(torch.sigmoid(logits), label_to_regions(label, regions), squared=True, smooth_nr=0.0)
    onehot = F.one_hot(label, logits.shape[1]).permute(0, 4, 1, 2, 3).float()  # (B, H, W, D, K) -> (B, K, H, W, D)
    dl = dice_loss(torch.softmax(logits, 1), onehot)
    if loss == "dice":
        return dl
    if loss == "dice_ce":
        return dl + F.cross_entropy(logits, label)
    raise ValueError(f"loss must be 'dice', 'dice_ce' or 'sigmoid_dice', got {loss!r}")


if __name__ == "__main__":
    # a 5-second tour: closed forms anyone can check by hand
    torch.manual_seed(0)
    B, K = 4, 16
    print("uniform DINO loss", dino_loss([torch.zeros(B, K)] * 3, [torch.full((B, K), 1 / K)] * 2).item(),
          "= log K", torch.log(torch.tensor(K)).item())
    P = sinkhorn_knopp(0.5 * torch.randn(8, K), teacher_temp=0.05, n_iters=50)
    print("Sinkhorn rows", P.sum(1)[:3].tolist(), "prototype marginals (n/K = 0.5)", P.sum(0)[:3].tolist())
    print("KoLeo spread", koleo_loss(torch.eye(8)).item(), "clustered", koleo_loss(1 + 0.01 * torch.randn(8, 8)).item())
