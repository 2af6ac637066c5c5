"""
augment.py — 3DINO's random views, batched on (B, C, H, W, D) tensors.

One training sample of 3DINO is 10 views of one volume: 2 global crops (96³) and 8 local crops (48³), each a
RandomResizedCrop3d (RRC3D) followed by random flips/rot90s and MONAI-1.3 intensity transforms, plus the iBOT
masks of the global crops. The reference runs all of this per sample inside 32 DataLoader workers (MONAI, one
volume and one crop at a time). Here the work is split in two:

    worker (cache.py)                     training process (this file, on the training device)
    -----------------                     ------------------------------------------------------
    box = sample_crop_box(shape, ...)     crops -> device -> resize_crops  (B, 1, S, S, S)
    read only that box from the cache     run_plan(crops, plan_global_view_1(B, g)), ... (batched)
                                          make_masks  ->  make_views returns the collated dict

Every random draw goes through an explicit `torch.Generator` (MONAI's per-transform NumPy states replay the
same stream in every worker). Every batched transform draws its parameters *per sample*, and each
sample decides on its own whether the transform applies (`torch.rand(B) < p`), as the per-sample reference does.
A view recipe first draws all its parameters for the whole batch on the generator's device (a CPU generator is
the normal case, also for CUDA data), then applies them chunk by chunk (see "Plans" below). The Gaussian-noise
voxels are drawn on the data's device from per-sample seeds, so a CPU generator gives the same views on CPU and
CUDA except for those noise values; every output is reproducible under a seed on a given device.

What it costs: `python bench.py augment` (the figures are in the README's speed table). What made the CPU path
fast is commented where it happens: one torch copy per box from the memory map, flips/rot90s as one cube symmetry
inside the resize's copy, no log(0) in the gamma transform, cached Gibbs masks, cache-sized chunks, and
`keep_freed_memory`.

Layout: volumes are (B, C, H, W, D); H/W in-plane, D through-plane. "Spatial axis a" means tensor
dim 2 + a, as in MONAI's `spatial_axis`.
"""
import ctypes
import functools
import itertools
import math

import numpy as np
import torch
import torch.nn.functional as F

# ----------------------------------------------------------------------------------------------------------------
# Memory: keep what is freed


def keep_freed_memory(limit_bytes: int = 1 << 30) -> bool:
    """Tell glibc's malloc to keep freed blocks up to `limit_bytes` in the process instead of returning them to
    the OS. Call once at the start of a training process (before DataLoader workers fork: they inherit it).

    Why: every step allocates and frees the same multi-MB tensors (boxes, resized views, filter temporaries). By
    default glibc serves blocks above a threshold (128 kB at start, adapting up to 32 MB) with fresh mmap()s and
    returns freed memory at the top of the heap to the OS, so new blocks are zero-filled page by page on first
    touch; on a small CPU machine those page faults can be a third of make_views' cost (docs/performance.md). This is
    the same effect for which PyTorch's CPU tuning guide recommends jemalloc/tcmalloc; mallopt needs no extra
    package. The price: the process's resident memory stays at its peak. No-op (returns False) without glibc.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # from <malloc.h>
        return bool(libc.mallopt(M_MMAP_THRESHOLD, limit_bytes)) and bool(libc.mallopt(M_TRIM_THRESHOLD, limit_bytes))
    except (OSError, AttributeError):  # not Linux/glibc (macOS, Windows, musl without mallopt)
        return False


# ----------------------------------------------------------------------------------------------------------------
# RandomResizedCrop3d: the box (drawn in the data workers) and the resize (done batched on the device)


def sample_crop_box(
    shape: tuple[int, int, int],
    in_slice_scale: tuple[float, float],
    cross_slice_scale: tuple[float, float],
    generator: torch.Generator,
    ratio: tuple[float, float] = (0.9, 1 / 0.9),
) -> tuple[int, int, int, int, int, int]:
    """Draw one RRC3D box `(h0, w0, d0, ch, cw, cd)` inside a volume of spatial `shape = (h, w, d)`.

    In-plane (torchvision RandomResizedCrop, up to 10 attempts):
        area = h·w·U(a0, a1),   r = exp(U(log r0, log r1)),   cw = round(√(area·r)),   ch = round(√(area/r)),
        accepted if 0 < cw ≤ w and 0 < ch ≤ h.
    Fallback after 10 rejections: the whole slice, with the aspect clamped to [r0, r1]
        (ch = round(w / r0) if w/h < r0;  cw = round(h · r1) if w/h > r1).
    Through-plane, independently: cd = round(d · U(c0, c1)).
    Each extent is clamped to the volume (min(dim, crop), 0 -> dim) and the origin drawn uniformly over the valid
    positions, randint(0, dim − crop + 1) per axis. The crop is resized to a cube later (`resize_crops`), so
    the physical aspect ratio is not kept.

    A pure function of `generator` (CPU): the same seed gives the same box.
    """
    h, w, d = (int(s) for s in shape)
    a0, a1 = in_slice_scale
    c0, c1 = cross_slice_scale
    log_r0, log_r1 = math.log(ratio[0]), math.log(ratio[1])

    # in-plane: torchvision-style area + aspect sampling
    ch = cw = None
    for _ in range(10):
        u_area, u_ratio = torch.rand(2, generator=generator).tolist()
        area = h * w * (a0 + (a1 - a0) * u_area)
        r = math.exp(log_r0 + (log_r1 - log_r0) * u_ratio)  # r = cw / ch
        cw_try, ch_try = int(round(math.sqrt(area * r))), int(round(math.sqrt(area / r)))
        if 0 < cw_try <= w and 0 < ch_try <= h:
            ch, cw = ch_try, cw_try
            break
    if ch is None:  # fallback: whole slice, aspect clamped into [r0, r1]
        ch, cw = h, w
        if w / h < min(ratio):
            ch = int(round(w / min(ratio)))
        elif w / h > max(ratio):
            cw = int(round(h * max(ratio)))

    # through-plane: an independent length fraction
    u_d = torch.rand(1, generator=generator).item()
    cd = int(round(d * (c0 + (c1 - c0) * u_d)))

    # clamp to the volume (0 means "the whole axis"), then a uniform origin per axis
    ch, cw, cd = (min(dim, c) if c > 0 else dim for dim, c in ((h, ch), (w, cw), (d, cd)))
    h0 = int(torch.randint(0, h - ch + 1, (1,), generator=generator))
    w0 = int(torch.randint(0, w - cw + 1, (1,), generator=generator))
    d0 = int(torch.randint(0, d - cd + 1, (1,), generator=generator))
    return h0, w0, d0, ch, cw, cd


def resize_crops(crops: list[torch.Tensor], size: int, symmetry: torch.Tensor | None = None) -> torch.Tensor:
    """Resize crops of any shapes `(C, h, w, d)` to one batch of cubes `(n, C, size, size, size)` (RRC3D resize).

    Trilinear with align_corners=False and no antialiasing, as the reference: output voxel i of an axis samples
    the input at (i + ½)·in/out − ½ and mixes its 2 neighbours, so each output voxel reads 8 input voxels.
    One `F.interpolate` per crop: crops differ in shape, and on 2 CPU cores this loop is ~10× faster than
    padding all crops to one tensor and calling `grid_sample` once.
    symmetry: optional (n,) codes of the view recipes' flips/rot90s (`plan_geometric`); each resized crop is
    then permuted/flipped in the copy into the batch tensor that happens anyway (make_views: −2 ms per sample
    on 2 CPU cores compared with a separate step).
    """
    out = torch.empty(len(crops), crops[0].shape[0], size, size, size, dtype=crops[0].dtype, device=crops[0].device)
    codes = [0] * len(crops) if symmetry is None else symmetry.tolist()
    for i, c in enumerate(crops):
        y = F.interpolate(c[None], size=(size, size, size), mode="trilinear", align_corners=False)[0]
        out[i] = _symmetry_view(y, codes[i]) if codes[i] else y
    return out


# ----------------------------------------------------------------------------------------------------------------
# Plans: draw every random parameter for the whole batch first, then apply chunk by chunk
#
# The one API of this file. A plan is a list of steps (apply_fn, params). `plan_<name>(n, p, g, ...)` draws the
# per-sample parameters of one transform for all n samples (small tensors on g's device: an "apply" flag per
# sample plus γ, σ, k, ...) and returns a one-step plan; plans compose with `+` (the view recipes below), and
# `run_plan(x, plan)` applies them to x (n, C, H, W, D) in place, chunk by chunk:
#     x = augment.run_plan(x, augment.plan_flip(len(x), 0, 0.5, g) + augment.plan_gamma(len(x), 0.3, g))
# Every transform takes `apply=` (n,) bool instead of its own coin, which is how `one_of_choice` reaches it.
# Why chunks: on CPU every transform is a few passes over memory; a whole batch of 96³ crops (3.5 MB each) falls
# out of the caches between passes, and running the 10–20 steps of a view recipe one cache-sized chunk at a time
# is ~1.5× faster (16 vs 29 ms CPU per global crop). On CUDA the chunk is the whole batch.
# Because the draws happen before the chunking, the output does not depend on the chunk size.

CPU_CHUNK_BYTES = 4 << 20  # samples per chunk on CPU: as many as fit in ~4 MB (1 global crop, 9 local crops)


def _chunk_size(x):
    if x.device.type != "cpu":
        return x.shape[0]
    return max(1, CPU_CHUNK_BYTES // (x[0].numel() * x.element_size()))


def run_plan(x, plan):
    """Apply the steps of `plan` to x (B, C, H, W, D) in place, chunk by chunk; returns x (clone x first to keep
    it)."""
    c = _chunk_size(x)
    # per-sample "apply" flags as Python lists: a step none of the chunk's samples drew is skipped without a call
    # (most are: each sample draws ~3 of a recipe's ~8 steps; the small tensor ops of a call cost ~50 µs)
    flags = [prm["apply"].tolist() if "apply" in prm else None for _, prm in plan]
    for i0 in range(0, x.shape[0], c):
        xc = x[i0:i0 + c]
        ptr = xc.data_ptr()
        for (fn, prm), fl in zip(plan, flags):
            if fl is not None and not any(fl[i0:i0 + c]):
                continue
            xc = fn(xc, {k: v[i0:i0 + c] for k, v in prm.items()})
        if xc.data_ptr() != ptr:  # the last steps returned a new tensor: write it back
            x[i0:i0 + c] = xc
    return x


def _coin(n, p, g):
    """(n,) bool on g's device: sample i applies a transform of probability p (MONAI's `R.rand() < prob`)."""
    return torch.rand(n, generator=g, device=g.device) < p


def _uniform(shape, lo, hi, g):
    return lo + (hi - lo) * torch.rand(shape, generator=g, device=g.device)


def _indices(apply, device):
    """Indices of the flagged samples (apply: (n,) bool on the generator's device), on the data's device."""
    return apply.nonzero().flatten().to(device)


def _select(x, idx):
    """x[idx] — or x itself when every sample is flagged (saves a copy; we own x and may overwrite it)."""
    return x if idx.numel() == x.shape[0] else x[idx]


def _put(x, idx, y):
    """Write the transformed samples back: y itself when every sample was flagged, else x with x[idx] = y."""
    if idx.numel() == x.shape[0]:
        return y
    x[idx] = y
    return x


def _param(prm, key, idx, x):
    """The parameter rows of the flagged samples, on x's device and dtype."""
    return prm[key][idx.to(prm[key].device)].to(x.device, x.dtype)


# ----------------------------------------------------------------------------------------------------------------
# Geometric: flips and rot90 (after the resize, so every crop is a cube)


def plan_flip(n, axis, p, g):
    """Flip spatial axis `axis` (0 = H, 1 = W, 2 = D) of each sample with probability p (MONAI RandFlip)."""
    def fn(x, prm):
        idx = _indices(prm["apply"], x.device)
        if idx.numel():
            x[idx] = x[idx].flip(2 + axis)
        return x

    return [(fn, {"apply": _coin(n, p, g)})]


def plan_rot90(n, plane, p, g):
    """Rotate each sample by k·90°, k ~ U{1, 2, 3}, in spatial plane `plane` with probability p (MONAI
    RandRotate90, max_k = 3; the direction of `torch.rot90`). The two sides must be equal (cubes)."""
    a, b = 2 + plane[0], 2 + plane[1]

    def fn(x, prm):
        assert x.shape[a] == x.shape[b], f"rot90 in plane {plane} needs equal sides, got {tuple(x.shape)}"
        for kk in (1, 2, 3):  # one batched rot90 per k
            idx = _indices(prm["apply"] & (prm["k"] == kk), x.device)
            if idx.numel():
                x[idx] = torch.rot90(x[idx], kk, dims=(a, b))
        return x

    return [(fn, {"apply": _coin(n, p, g), "k": torch.randint(1, 4, (n,), generator=g, device=g.device)})]


def _cube_symmetries():
    """The 48 symmetries of a cube (3! axis orders × 2³ flips) and how the spec's flips/rot90s compose them.

    Returns (ops, then): ops[code] = (perm, flip_dims), the symmetry "permute the spatial axes by perm, then flip
    flip_dims" (code 0 = identity); then[step][code] = the code of "symmetry `code`, followed by `step`", for the
    steps ("flip", axis) and ("rot90", plane, k). Built once by moving a 2×2×2 probe arange(8): its 8 corners
    tell the 48 symmetries apart."""
    probe = np.arange(8).reshape(2, 2, 2)
    ops, key_to_code = [], {}
    for perm in itertools.permutations(range(3)):
        for mask in range(8):
            dims = tuple(a for a in range(3) if mask >> a & 1)
            q = probe.transpose(perm)
            key_to_code[(np.flip(q, dims) if dims else q).tobytes()] = len(ops)
            ops.append((perm, dims))
    steps = {("flip", a): (lambda q, a=a: np.flip(q, a)) for a in range(3)}
    steps.update({("rot90", plane, k): (lambda q, plane=plane, k=k: np.rot90(q, k, axes=plane))
                  for plane in ((0, 1), (1, 2), (0, 2)) for k in (1, 2, 3)})
    then = {}
    for step, move in steps.items():
        then[step] = []
        for perm, dims in ops:
            q = probe.transpose(perm)
            then[step].append(key_to_code[move(np.flip(q, dims) if dims else q).tobytes()])
    return ops, then


_SYMMETRY_OPS, _SYMMETRY_THEN = _cube_symmetries()


def _symmetry_view(x, code):
    """Cube symmetry `code` applied to the last three dims of x (..., S, S, S): a permuted view, or a copy when
    the symmetry flips an axis (torch has no negative strides)."""
    perm, dims = _SYMMETRY_OPS[code]
    lead = x.dim() - 3
    y = x.permute(*range(lead), *(lead + a for a in perm))
    return y.flip([lead + a for a in dims]) if dims else y


def plan_geometric(n, g, p=0.3):
    """The geometric part of a view after RRC3D: flips of axes 0, 1, 2, then rot90 in planes (0,1), (1,2), (0,2), each
    with probability p (rot90: k ~ U{1, 2, 3}).

    The draws are those of the six separate steps (plan_flip / plan_rot90, in that order), but the six are
    applied as ONE step: whatever a sample drew, the composition is one of the 48 symmetries of the cube, i.e. an
    axis permutation followed by flips, done in one copy. Six separate steps cost ~6× the memory passes
    (each flagged subset is gathered, flipped and scattered back): 5 of ~36 ms per CPU sample (bench.py augment).
    """
    flips = [_coin(n, p, g) for _ in range(3)]
    rots = [(_coin(n, p, g), torch.randint(1, 4, (n,), generator=g, device=g.device)) for _ in range(3)]
    flips = [f.cpu().tolist() for f in flips]
    rots = [(a.cpu().tolist(), k.cpu().tolist()) for a, k in rots]
    codes = []
    for i in range(n):  # compose this sample's draws, in the reference's order
        code = 0
        for axis in range(3):
            if flips[axis][i]:
                code = _SYMMETRY_THEN[("flip", axis)][code]
        for (apply, k), plane in zip(rots, ((0, 1), (1, 2), (0, 2))):
            if apply[i]:
                code = _SYMMETRY_THEN[("rot90", plane, k[i])][code]
        codes.append(code)

    def fn(x, prm):
        S = x.shape[2:]
        codes = prm["code"].tolist()
        if any(codes) and not S[0] == S[1] == S[2]:
            raise ValueError(f"flips/rot90s of the view recipes need cubes, got spatial shape {tuple(S)}")
        for c in sorted(set(codes) - {0}):  # one batched copy per distinct symmetry present in the chunk
            idx = [i for i, ci in enumerate(codes) if ci == c]
            sel = x if len(idx) == x.shape[0] else x[idx]  # x[idx]: a copy
            y = _symmetry_view(sel, c).contiguous()  # a no-op after a flip (flip copies)
            if len(idx) == x.shape[0]:
                return y  # the whole chunk: run_plan writes the result back once at the end
            x[idx] = y
        return x

    return [(fn, {"code": torch.tensor(codes, dtype=torch.long)})]



# ----------------------------------------------------------------------------------------------------------------
# Intensity (MONAI 1.3 semantics): a pure function with explicit per-sample parameters, then its plan.
# Per-sample statistics (min, max) are over all of a sample's voxels and channels, as MONAI on one image.


def _per_sample_min_max(x):
    """(n,) min and max of each sample of x (n, C, H, W, D), shaped (n, 1, 1, 1, 1) for broadcasting."""
    flat = x.flatten(1)  # (n, C, H, W, D) -> (n, C·H·W·D)
    shape = (-1,) + (1,) * (x.dim() - 1)
    return flat.amin(1).view(shape), flat.amax(1).view(shape)


def adjust_contrast(x: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
    """MONAI AdjustContrast with a per-sample γ: x (n, C, H, W, D), gamma (n,).
    m = min x,  r = max x − m,  y = ((x − m) / (r + 1e-7))^γ · r + m   (keeps min and max up to the 1e-7)."""
    lo, hi = _per_sample_min_max(x)
    rng = hi - lo
    # t^γ as exp(γ·log t): ~3× faster than pow with a per-sample exponent on CPU. But log(0) = −inf and exp of
    # results below ~1e-38 (denormals) leave the vectorised CPU code: a crop whose background sits at its minimum
    # (most of them) took 8 ms instead of 1 ms per 96³. So t is first raised to c = exp(−80/γ): then γ·log t ≥ −80
    # and exp stays normal; t^γ changes only where t < c, by at most c^γ = e^−80 ≈ 2e-35 (0 becomes 2e-35).
    # In-place chain on our own temporary: fresh multi-MB allocations cost as much as the arithmetic here.
    gamma = gamma.to(x.device, x.dtype).view(-1, 1, 1, 1, 1)
    t = (x - lo).div_(rng + 1e-7)
    t = torch.maximum(t, torch.exp(-80.0 / gamma), out=t)
    return t.log_().mul_(gamma).exp_().mul_(rng).add_(lo)


def plan_gamma(n, p, g, gamma_range=(0.5, 2.0), apply=None):
    """RandAdjustContrast: γ ~ U(γ0, γ1) per sample, y = `adjust_contrast`(x, γ)."""
    def fn(x, prm):
        idx = _indices(prm["apply"], x.device)
        return _put(x, idx, adjust_contrast(_select(x, idx), _param(prm, "gamma", idx, x))) if idx.numel() else x

    return [(fn, {"apply": _coin(n, p, g) if apply is None else apply, "gamma": _uniform(n, *gamma_range, g)})]


def plan_noise(n, p, g, std=0.002, apply=None):
    """RandGaussianNoise: σ ~ U(0, std) per sample, y = x + σ·ε with ε ~ N(0, 1) per voxel (float32)."""
    # The noise itself is drawn at apply time from a per-sample seed, on the data's device: the same seed gives
    # the same views whatever the chunking; CPU and CUDA noise differ (different generators) but are each
    # reproducible, and the big draw never crosses the PCIe bus.
    def fn(x, prm):
        idx = _indices(prm["apply"], x.device)
        for i in idx.tolist():
            gi = torch.Generator(device=x.device).manual_seed(int(prm["seed"][i]))
            noise = torch.randn(x.shape[1:], generator=gi, device=x.device, dtype=torch.float32)
            x[i].add_(noise.to(x.dtype), alpha=float(prm["sigma"][i]))
        return x

    return [(fn, {"apply": _coin(n, p, g) if apply is None else apply, "sigma": _uniform(n, 0.0, std, g),
                "seed": torch.randint(0, 2**62, (n,), generator=g, device=g.device)})]


def histogram_map(x: torch.Tensor, floating: torch.Tensor) -> torch.Tensor:
    """MONAI HistogramShift's intensity map with per-sample floating control points: x (n, C, H, W, D),
    floating (n, K) non-decreasing from 0 to 1. With m = min x, r = max x − m and reference points
    r_i = i/(K−1): y = interp(x; m + r·r_i -> m + r·f_i), piecewise linear. A constant image is left unchanged."""
    n, K = floating.shape
    f = floating.to(x.device, x.dtype)
    lo, hi = _per_sample_min_max(x)
    rng = hi - lo
    # In units s = (K−1)·(x − m)/r the reference points are the integers 0..K−1, so a voxel in segment j = floor(s)
    # maps to f_j + (s − j)·(f_{j+1} − f_j) = c_j + slope_j·s with c_j = f_j − j·slope_j; back in intensity units,
    # y = m + r·(c_j + slope_j·s) = C_j + S_j·s with C_j = m + r·c_j, S_j = r·slope_j: a (n·(K−1),) table pair,
    # looked up with int32 indices (index_select; gather would need int64, twice the bytes per voxel).
    # A constant image (r = 0) gets s = 0 -> y = C_0 = m: unchanged, like MONAI, without a branch.
    s = (x - lo).mul_((K - 1) / torch.where(rng > 0, rng, 1)).reshape(-1)  # (n·V,) voxels, sample-major
    slope = f[:, 1:] - f[:, :-1]  # (n, K−1)
    c = f[:, :-1] - slope * torch.arange(K - 1, device=x.device, dtype=x.dtype)  # (n, K−1)
    C, S = (c * rng.view(n, 1) + lo.view(n, 1)).flatten(), (slope * rng.view(n, 1)).flatten()
    j = s.to(torch.int32).clamp_(0, K - 2).view(n, -1)  # floor for s ≥ 0; s = K−1 stays in the last segment
    if n > 1:
        j += (torch.arange(n, device=x.device, dtype=torch.int32) * (K - 1)).view(n, 1)  # sample i's table rows
    j = j.view(-1)
    return torch.index_select(C, 0, j).addcmul_(torch.index_select(S, 0, j), s).view_as(x)


def plan_histogram(n, p, g, num_control_points=10, apply=None):
    """RandHistogramShift: a random monotone piecewise-linear intensity curve per sample (`histogram_map`).
    Floating points f_0 = 0, f_{K−1} = 1, f_i ~ U(f_{i−1}, f_{i+1}) for i = 1..K−2 in order."""
    K = num_control_points
    # floating control points: start at the reference linspace(0, 1, K); interior point i ~ U(f_{i-1}, f_{i+1}),
    # sequentially for i = 1..K-2, so f_{i-1} is already the *new* value and f_{i+1} still the reference one
    f = torch.linspace(0, 1, K, device=g.device).repeat(n, 1)  # (n, K)
    for i in range(1, K - 1):
        f[:, i] = f[:, i - 1] + torch.rand(n, generator=g, device=g.device) * (f[:, i + 1] - f[:, i - 1])

    def fn(x, prm):
        idx = _indices(prm["apply"], x.device)
        return _put(x, idx, histogram_map(_select(x, idx), _param(prm, "f", idx, x))) if idx.numel() else x

    return [(fn, {"apply": _coin(n, p, g) if apply is None else apply, "f": f})]


def gaussian_kernel_1d(sigma: torch.Tensor, radius: int | None = None) -> torch.Tensor:
    """MONAI's "erf" Gaussian taps for σ of shape (n,): k(t) = ½[erf((t+½)/(σ√2)) − erf((t−½)/(σ√2))],
    t = −R..R with R = int(max(4σ, ½) + ½) per σ (taps beyond a sample's own R are 0); not renormalised, so
    Σk is slightly below 1 for small σ. Returns (n, 2·R_max + 1), R_max the largest radius (or `radius`)."""
    tails = (torch.clamp(4 * sigma, min=0.5) + 0.5).floor()  # (n,) per-sample radius R
    R = int(tails.max()) if radius is None else radius
    t = torch.arange(-R, R + 1, device=sigma.device, dtype=sigma.dtype)  # (2R+1,)
    s = (sigma * math.sqrt(2)).unsqueeze(1)  # (n, 1)
    k = 0.5 * (torch.erf((t + 0.5) / s) - torch.erf((t - 0.5) / s))  # (n, 2R+1)
    return (k * (t.abs() <= tails.unsqueeze(1))).clamp(min=0)


def _filter_matrix(sigma, L):
    """(n, L, L) banded Toeplitz matrices M with M[i, j] = k(j − i): M @ v is the zero-padded 1-D correlation
    of v (length L) with the erf kernel of σ (the kernel is symmetric, so M is too and correlation = convolution).
    Taps that fall outside [0, L) are simply absent from the matrix, which is exactly zero padding."""
    k = gaussian_kernel_1d(sigma)  # (n, 2R+1)
    R = (k.shape[1] - 1) // 2
    offset = torch.arange(L, device=sigma.device)[None, :] - torch.arange(L, device=sigma.device)[:, None]  # j − i
    inside = offset.abs() <= R
    M = k[:, (offset.clamp(-R, R) + R)]  # (n, L, L): k(j − i) where |j − i| ≤ R
    return M * inside


def gaussian_filter(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian filter with a different σ per sample and axis: x (n, C, H, W, D), sigma (n, 3).

    y = x ⊛_H k_{σ_H} ⊛_W k_{σ_W} ⊛_D k_{σ_D}, zero padding, erf taps (`gaussian_kernel_1d`); MONAI's
    GaussianFilter(approx="erf"). Each 1-D pass is a batched matmul with a banded (L, L) matrix per sample: ~L
    multiply-adds per voxel instead of 2R+1 ≤ 13, but BLAS runs them so much faster than a grouped conv3d with
    per-sample kernels (batch folded into channels) that it wins by 3-4× on CPU at L = 48..96 (and on GPU too).
    """
    n, C, H, W, D = x.shape
    sigma = sigma.to(x.device, x.dtype)
    if H == W == D:  # cubes (every view): the 3n matrices in one go (the ~20 small ops cost 0.3 ms per call)
        Mh, Mw, Md = _filter_matrix(sigma.reshape(-1), H).view(n, 3, H, H).unbind(1)
    else:
        Mh, Mw, Md = (_filter_matrix(sigma[:, a], L) for a, L in enumerate((H, W, D)))
    y = torch.matmul(Mh.unsqueeze(1), x.reshape(n, C, H, W * D))  # (n,1,H,H) @ (n,C,H,W·D): filter along H
    y = torch.matmul(Mw.view(n, 1, 1, W, W), y.view(n, C, H, W, D))  # (n,1,1,W,W) @ (n,C,H,W,D): along W
    y = torch.matmul(y.view(n, C * H * W, D), Md)  # (n, C·H·W, D) @ (n, D, D) (M symmetric): along D
    return y.view(n, C, H, W, D)


def plan_smooth(n, p, g, sigma_range=(0.25, 1.5), apply=None):
    """RandGaussianSmooth: σ per axis ~ U(0.25, 1.5) independently per sample, y = `gaussian_filter`(x, σ)."""
    def fn(x, prm):
        idx = _indices(prm["apply"], x.device)
        return _put(x, idx, gaussian_filter(_select(x, idx), _param(prm, "sigma", idx, x))) if idx.numel() else x

    # σ_H, σ_W, σ_D drawn independently per sample
    return [(fn, {"apply": _coin(n, p, g) if apply is None else apply, "sigma": _uniform((n, 3), *sigma_range, g)})]


def sharpen_filter(x: torch.Tensor, sigma1: torch.Tensor, sigma2: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """MONAI GaussianSharpen with per-sample parameters: x (n, C, H, W, D), sigma1 and sigma2 (n, 3), alpha (n,).
    b1 = G_σ1(x),  b2 = G_σ2(b1),  y = b1 + α·(b1 − b2)   (`gaussian_filter`: erf taps, zero padding)."""
    b1 = gaussian_filter(x, sigma1)
    b2 = gaussian_filter(b1, sigma2)
    a = alpha.to(x.device, x.dtype).view(-1, 1, 1, 1, 1)
    return b1.lerp_(b2, -a)  # b1 + (−α)(b2 − b1) = b1 + α(b1 − b2): one pass, in place on the temporary b1


def plan_sharpen(n, p, g, sigma1_range=(0.5, 1.0), sigma2_min=0.5, alpha_range=(10.0, 30.0), apply=None):
    """RandGaussianSharpen (unsharp masking): per sample and axis σ1 ~ U(0.5, 1), σ2 ~ U(0.5, σ1); α ~ U(10, 30);
    y = `sharpen_filter`(x, σ1, σ2, α)."""
    apply = _coin(n, p, g) if apply is None else apply
    sigma1 = _uniform((n, 3), *sigma1_range, g)  # (n, 3) per axis
    sigma2 = sigma2_min + (sigma1 - sigma2_min) * torch.rand(n, 3, generator=g, device=g.device)  # U(0.5, σ1)
    alpha = _uniform(n, *alpha_range, g)

    def fn(x, prm):
        idx = _indices(prm["apply"], x.device)
        if not idx.numel():
            return x
        y = sharpen_filter(_select(x, idx), *(_param(prm, k, idx, x) for k in ("sigma1", "sigma2", "alpha")))
        return _put(x, idx, y)

    return [(fn, {"apply": apply, "sigma1": sigma1, "sigma2": sigma2, "alpha": alpha})]


@functools.lru_cache(maxsize=16)
def _gibbs_distances(shape, device):
    """Distance of every k-space voxel to the centre (shape−1)/2 of the *fftshifted* spectrum, in the unshifted
    FFT layout (ifftshift) and cut to the rfft half (f_D = 0..D/2), together with the same at the negated
    frequencies (−f mod L). Cached per (shape, device): building them cost more than the two FFTs of a 96³ crop."""
    axes = [(torch.arange(L, device=device, dtype=torch.float64) - (L - 1) / 2) ** 2 for L in shape]
    d2 = axes[0].view(-1, 1, 1) + axes[1].view(1, -1, 1) + axes[2].view(1, 1, -1)  # (H, W, D), shifted layout
    dist = torch.fft.ifftshift(d2.sqrt())  # unshifted layout: index 0 = zero frequency
    dist_neg = torch.roll(dist.flip(0, 1, 2), shifts=(1, 1, 1), dims=(0, 1, 2))  # dist_neg[f] = dist[−f mod L]
    half = shape[2] // 2 + 1
    return dist[..., :half].contiguous(), dist_neg[..., :half].contiguous()


def gibbs_filter(x: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """MONAI GibbsNoise with a per-sample α: x (n, C, H, W, D), alpha (n,).

    Reference: X = fftshift(fftn(x)); keep voxels with ‖k − (shape−1)/2‖ ≤ r = (1−α)·max(shape)·√2/2, zero the
    rest; y = real(ifftn(ifftshift(X·M))). Note: in 3D even α = 0 cuts the k-space corners (the corner distance
    √3·(L−1)/2 exceeds L·√2/2), so it is the identity only for images without energy there.

    Here: the mask M is not Hermitian-symmetric (the centre (L−1)/2 sits half a voxel off the zero frequency for
    even L), but taking the real part projects X·M onto its Hermitian part, X·(M(f) + M(−f))/2, because X of a
    real image is Hermitian. So y = irfftn(rfftn(x) · M_sym): half the FFT work, no complex output to discard.
    """
    n, C, H, W, D = x.shape
    dist, dist_neg = _gibbs_distances((H, W, D), x.device)  # (H, W, D//2+1): rfft keeps f_D = 0..D/2
    r = ((1 - alpha.to(x.device, torch.float64)) * max(H, W, D) * math.sqrt(2) / 2).view(n, 1, 1, 1, 1)
    m_sym = 0.5 * ((dist <= r).to(x.dtype) + (dist_neg <= r).to(x.dtype))  # (n, 1, H, W, D//2+1)
    X = torch.fft.rfftn(x, dim=(2, 3, 4))  # (n, C, H, W, D//2+1) complex
    return torch.fft.irfftn(X * m_sym, s=(H, W, D), dim=(2, 3, 4))


def plan_gibbs(n, p, g, alpha_range=(0.0, 1.0), apply=None):
    """RandGibbsNoise: α ~ U(0, 1) per sample; y = `gibbs_filter`(x, α) (DINOv2's solarisation slot)."""
    def fn(x, prm):
        idx = _indices(prm["apply"], x.device)
        return _put(x, idx, gibbs_filter(_select(x, idx), _param(prm, "alpha", idx, x))) if idx.numel() else x

    return [(fn, {"apply": _coin(n, p, g) if apply is None else apply, "alpha": _uniform(n, *alpha_range, g)})]


def one_of_choice(n: int, n_options: int, p: float, g: torch.Generator) -> torch.Tensor:
    """Per-sample decision of MONAI `OneOf` over `n_options` equally weighted transforms, each with probability p:
    option c ~ U{0..n_options−1}, then the chosen transform applies if U < p. Returns (n,) long on g's device,
    c or −1 (nothing). With 3 options and p = 0.8: each option 0.8/3 ≈ 0.267, nothing 0.2. Pass `apply=c == k`
    to the k-th option's plan."""
    choice = torch.randint(0, n_options, (n,), generator=g, device=g.device)
    applies = torch.rand(n, generator=g, device=g.device) < p
    return torch.where(applies, choice, -1)


def plan_intensity_one_of(n, g, p=0.8):
    """A view's "colour jitter": OneOf{gamma contrast, Gaussian noise, histogram shift}, each with p = 0.8."""
    c = one_of_choice(n, 3, p, g)
    return plan_gamma(n, 1.0, g, apply=c == 0) + plan_noise(n, 1.0, g, apply=c == 1) + \
        plan_histogram(n, 1.0, g, apply=c == 2)


# ----------------------------------------------------------------------------------------------------------------
# View recipes: plans for resized cube batches (B, C, S, S, S), every parameter drawn in the order of the steps


def plan_global_view_1(n, g):
    """Global crop 1: flips/rot90 (p 0.3 each) → intensity OneOf → OneOf{smooth, sharpen} with p = 1
    (every sample is blurred or sharpened, ½ each; DINOv2's blur p = 1.0)."""
    plan = plan_geometric(n, g) + plan_intensity_one_of(n, g)
    c = one_of_choice(n, 2, 1.0, g)
    return plan + plan_smooth(n, 1.0, g, apply=c == 0) + plan_sharpen(n, 1.0, g, apply=c == 1)


def plan_global_view_2(n, g):
    """Global crop 2: flips/rot90 → intensity OneOf → OneOf{smooth, sharpen} with p = 0.1 (10% in total) →
    Gibbs noise p = 0.2 (DINOv2's blur 0.1 and solarise 0.2)."""
    plan = plan_geometric(n, g) + plan_intensity_one_of(n, g)
    c = one_of_choice(n, 2, 0.1, g)
    return plan + plan_smooth(n, 1.0, g, apply=c == 0) + plan_sharpen(n, 1.0, g, apply=c == 1) + plan_gibbs(n, 0.2, g)


def plan_local_views(n, g):
    """Local crops: flips/rot90 → intensity OneOf → Gaussian smooth p = 0.5 (DINOv2's local blur 0.5)."""
    return plan_geometric(n, g) + plan_intensity_one_of(n, g) + plan_smooth(n, 0.5, g)


# ----------------------------------------------------------------------------------------------------------------
# iBOT masks and the assembled batch


def make_masks(
    n_crops: int,
    grid: tuple[int, int, int],
    mask_ratio_min_max: tuple[float, float] = (0.2, 0.75),
    mask_probability: float = 0.5,
    generator: torch.Generator | None = None,
) -> dict:
    """iBOT patch masks for the `n_crops` global crops of a batch, 3DINO's collate.

    n_masked = int(n_crops · mask_probability) crops get masks, with stratified ratios covering [min, max]:
        p = linspace(min, max, n_masked + 1),   count_i = int(N · U(p_i, p_{i+1})),   i < n_masked,
    each placed uniformly at random without replacement over the N = prod(grid) patches (no block masking); the
    other crops get empty masks; the rows are then shuffled, so which crop (view, image) is masked is random.
        masks             (n_crops, N) bool, C order over (h, w, d)
        mask_indices_list (M,) long   flat indices into n_crops·N of the masked tokens
        masks_weight      (M,) float  1 / count of the token's crop (each masked crop weighs 1 in the iBOT loss)
        n_masked_patches  (1,) long   M
        upperbound        int         Σ_i int(N · p_{i+1}) ≥ M, a static buffer length for the head calls
    """
    g = generator if generator is not None else torch.Generator().manual_seed(0)
    N = math.prod(grid)
    n_masked = int(n_crops * mask_probability)
    probs = torch.linspace(mask_ratio_min_max[0], mask_ratio_min_max[1], n_masked + 1, dtype=torch.float64)
    masks = torch.zeros(n_crops, N, dtype=torch.bool)
    upperbound = 0
    u = torch.rand(n_masked, generator=g, dtype=torch.float64)
    for i in range(n_masked):
        count = int(N * float(probs[i] + (probs[i + 1] - probs[i]) * u[i]))
        masks[i, torch.randperm(N, generator=g)[:count]] = True
        upperbound += int(N * float(probs[i + 1]))
    masks = masks[torch.randperm(n_crops, generator=g)]  # shuffle the rows (the reference: random.shuffle)
    counts = masks.sum(1, keepdim=True).clamp(min=1)  # (n_crops, 1)
    return {
        "masks": masks,
        "mask_indices_list": masks.flatten().nonzero().flatten(),
        "masks_weight": (1.0 / counts).expand(n_crops, N)[masks].float(),
        "n_masked_patches": torch.tensor([int(masks.sum())], dtype=torch.long),
        "upperbound": upperbound,
    }


def make_views(
    batch: dict,
    global_size: int,
    local_size: int,
    patch_size: int,
    generator: torch.Generator,
    device,
    mask_ratio_min_max: tuple[float, float] = (0.2, 0.75),
    mask_probability: float = 0.5,
) -> dict:
    """Turn raw crop regions from `cache.collate_pretrain` into the training batch (no fp16 cast).

    batch: {"global_crops": [view-0 list of B (C, h, w, d) tensors, view-1 list], "local_crops": n_local lists of
    B tensors, "index": (B,)}. The crops are moved to `device` first, then resized to cubes (`resize_crops`) and
    augmented there, one batched call per view recipe. Returns
        global_crops (2B, C, S, S, S)       [view 0 of all images; view 1 of all images]
        local_crops  (n_local·B, C, s, s, s) local-index major
        masks (2B, N) bool on device, N = (S / patch_size)³, and the other `make_masks` keys.
    """
    to_dev = lambda crops: [c.to(device, torch.float32, non_blocking=True) for c in crops]  # noqa: E731
    view0, view1 = batch["global_crops"]
    B = len(view0)
    # both global views resized into one (2B, C, S, S, S) tensor, each half augmented in place by its recipe;
    # all local crops in one (n_local·B, C, s, s, s) tensor, one recipe call
    # Every recipe starts with its flips/rot90s (one cube-symmetry step, `plan_geometric`): resize_crops applies
    # those in its copy into the batch, and run_plan the rest. Same draws, same order, same output.
    plan1, plan2 = plan_global_view_1(B, generator), plan_global_view_2(B, generator)
    codes = torch.cat([plan1[0][1]["code"], plan2[0][1]["code"]])
    globals_ = resize_crops(to_dev(view0 + view1), global_size, symmetry=codes)
    run_plan(globals_[:B], plan1[1:])
    run_plan(globals_[B:], plan2[1:])
    crops = [c for crops in batch["local_crops"] for c in crops]
    plan_l = plan_local_views(len(crops), generator)
    locals_ = resize_crops(to_dev(crops), local_size, symmetry=plan_l[0][1]["code"])
    run_plan(locals_, plan_l[1:])
    grid = (global_size // patch_size,) * 3
    m = make_masks(2 * B, grid, mask_ratio_min_max, mask_probability, generator=_cpu_generator(generator))
    out = {"global_crops": globals_, "local_crops": locals_}
    out.update({k: (v.to(device) if torch.is_tensor(v) else v) for k, v in m.items()})
    return out


def _cpu_generator(g: torch.Generator) -> torch.Generator:
    """Masks are built on CPU (tiny, python-level loop); seed a CPU generator from g when g lives on a GPU."""
    if g.device.type == "cpu":
        return g
    seed = int(torch.randint(0, 2**62, (1,), generator=g, device=g.device))
    return torch.Generator().manual_seed(seed)
