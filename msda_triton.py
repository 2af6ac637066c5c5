"""
3D multi-scale deformable attention (MSDA) — a Triton kernel and its pure-PyTorch reference.

What it computes (Deformable DETR, Zhu et al. 2021, eq. 2, lifted to volumes as in 3DINO's ViT-Adapter):

    out[b, q, h, :] = sum_l sum_p  A[b, q, h, l, p] * V_l[b, :, h]( loc[b, q, h, l, p] )

where V_l is level l of the value pyramid and V(loc) is trilinear interpolation with zero padding — exactly
F.grid_sample(mode="bilinear", padding_mode="zeros", align_corners=False) on a 5-D volume.

Shapes (B batch, Q queries, nH heads, Dh channels per head, L levels, P points per level and head):
    value               (B, S, nH, Dh)       S = sum_l H_l*W_l*D_l, each level flattened in C order over (H, W, D)
    spatial_shapes      (L, 3) long          (H_l, W_l, D_l), the project's volume layout (B, C, H, W, D)
    level_start_index   (L,) long            offset of level l inside S
    sampling_locations  (B, Q, nH, L, P, 3)  in [0, 1], ordered (h, w, d) like the volume; points outside are legal
    attention_weights   (B, Q, nH, L, P)     usually a softmax over L*P (not required here)
    -> output           (B, Q, nH*Dh)

Axis convention: grid_sample reads grid component 0 along the *last* axis.
The reference 3DINO fed (w, h, d) and so anchored every query at a cyclically permuted voxel. Here the caller
always speaks (h, w, d) and msda_reference reverses to grid_sample's (x, y, z) = (d, w, h) itself.
A voxel-centre location ((i+.5)/H, (j+.5)/W, (k+.5)/D) returns voxel (i, j, k) exactly; tests pin this.

Why a kernel: the reference materialises every sampled value before the weighted sum — for the adapter's
extractor (25,039 queries x 8 heads x 4 points x 32 channels) that is ~100 MB per sample in fp32, and
grid_sample's backward materialises it again to scatter ~2,300 contributions onto every voxel of the tiny 7^3
value grid. The kernel fuses sampling and the weighted sum (nothing is materialised); its backward adds each
contribution with an atomic straight from registers. Speed and memory against the reference: `python bench.py
msda`, figures in docs/performance.md.

Use msda(...) — the dispatcher: Triton on CUDA, the reference on CPU, or force one with backend=.
CPU parity check through the Triton interpreter:  TRITON_INTERPRET=1 python msda_triton.py
"""
import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

try:  # Triton ships Linux wheels only; without it msda() runs the reference.
    import triton
    import triton.language as tl

    HAS_TRITON, _TRITON_ERROR = True, None
except ImportError as e:  # pragma: no cover - exercised on macOS/Windows
    HAS_TRITON, _TRITON_ERROR = False, e

# Warps per program. Compiled for sm_80/sm_90 at the adapter's shapes (`python bench.py msda --compile-only`), the
# backward kernel at 4 warps spilled (16-24 B on sm_80 at 255 registers); at 8 warps it fits with no spill.
FWD_NUM_WARPS, BWD_NUM_WARPS = 4, 8


# ============ reference: pure PyTorch (what CPU runs use) ============


def msda_reference(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """3D MSDA with F.grid_sample (trilinear, zero padding, align_corners=False). Shapes: see module docstring.

    sampling_locations are (h, w, d) in [0, 1]: u maps to the voxel coordinate u*size - 0.5, so voxel i's centre
    is (i + 0.5)/size. This function reverses them into grid_sample's (x, y, z) = (d, w, h) order.
    """
    B, S, nH, Dh = value.shape
    _, Q, _, L, P, _ = sampling_locations.shape
    grids = 2 * sampling_locations.flip(-1) - 1  # (h, w, d) in [0,1] -> grid_sample's (x, y, z) = (d, w, h) in [-1,1]
    sampled = []
    for l, ((H, W, D), start) in enumerate(zip(spatial_shapes.tolist(), level_start_index.tolist())):
        v = value[:, start : start + H * W * D]  # (B, H*W*D, nH, Dh)
        v = v.permute(0, 2, 3, 1).reshape(B * nH, Dh, H, W, D)  # -> (B*nH, Dh, H, W, D)
        g = grids[:, :, :, l].transpose(1, 2).reshape(B * nH, Q, P, 1, 3)  # (B, Q, nH, P, 3) -> (B*nH, Q, P, 1, 3)
        s = F.grid_sample(v, g, mode="bilinear", padding_mode="zeros", align_corners=False)  # (B*nH, Dh, Q, P, 1)
        sampled.append(s[..., 0])
    sampled = torch.stack(sampled, dim=3)  # (B*nH, Dh, Q, L, P) — the tensor the kernel never materialises
    a = attention_weights.transpose(1, 2).reshape(B * nH, 1, Q, L, P)  # (B, Q, nH, L, P) -> (B*nH, 1, Q, L, P)
    out = (sampled * a).sum((-1, -2))  # (B*nH, Dh, Q)
    return out.view(B, nH * Dh, Q).transpose(1, 2).contiguous()  # (B, nH*Dh, Q) -> (B, Q, nH*Dh)


# ============ Triton kernels ============
#
# Pseudo-code of the forward, one program per (batch b, block of BLOCK_Q queries, head h):
#
#   acc[BLOCK_Q, Dh] = 0                                    # fp32 (fp64 for fp64 inputs)
#   for l in levels:                                        # H, W, D, start loaded from small int tables
#       for p in points:
#           u = loc[b, q, h, l, p, :]                       # (h, w, d) in [0, 1]
#           x = ((2u - 1 + 1) * size - 1) / 2               # voxel coords, grid_sample's own arithmetic
#           x0 = floor(x); f = x - x0                       # 8 corners x0 + {0,1}^3, weights f or 1 - f per axis
#           valid[q, c] = corner c inside the level          # zero padding: outside corners read nothing
#           v[q, c, :] = value[b, start + flat(corner), h, :]    # ONE (BLOCK_Q, 8, Dh) masked gather
#           acc += sum_c A[b,q,h,l,p] * w[q, c] * v[q, c, :]
#   out[b, q, h, :] = acc
#
# Layout choices. The 8 corners are a tensor axis rather than an unrolled loop: the index math is done once per
# point and the gather is one wide load. Channels are the contiguous axis (value is (B, S, nH, Dh), so a
# corner's Dh channels are adjacent in memory) and are loaded as a vector over BLOCK_D = next power of two >= Dh
# with a mask, so Dh = 32 and Dh = 24 both work; L, P, nH and Q are loop/grid extents and need not be powers
# of two. Levels are looped inside the program, so the injector's three levels cost one launch.
#
# Backward, given g = dL/dout[b, q, h, :], with dot_c = <g, value at corner c>:
#   dL/dA[b,q,h,l,p]   = sum_c w_c * dot_c
#   dL/du_k            = A * size_k * sum_c (d w_c / d f_k) * dot_c      (d w_c / d f_k = +-1 times the other two
#                                                                      factors; only in-bounds corners count)
#   dL/dvalue[corner]  += A * w_c * g                                   (a scatter: many queries, one voxel)
# The first two are per (query, head, level, point) and need no atomics: one program per query block writes
# them. The scatter is one tl.atomic_add of each (BLOCK_Q, 8, Dh) corner tile, straight from registers, on every
# level — also on the extractor's 7^3 grid, where each address receives ~2,300 adds (25,039 queries x 4 points
# x 8 corners / 343 voxels). Contention is not the bottleneck there on Hopper: a "dense" path for such levels
# (one-hot weight tiles M[q, v] reduced in registers with tl.dot, one atomic per query slice) is 20-35x slower
# than these atomics (docs/performance.md), so there is none. Sorting the (voxel, contribution) pairs would
# avoid contention too, but needs a global sort and a materialised (Q*P*8, Dh) buffer — the memory this file
# exists to avoid.

if HAS_TRITON:

    @triton.jit
    def _axis(u, size, ACC: tl.constexpr):
        """Normalised coordinate u in [0, 1] along one axis of `size` voxels -> (lower corner index, fraction)."""
        u = u.to(ACC)
        # grid_sample's own arithmetic, ((g + 1) * size - 1) / 2 with g = 2u - 1, step by step, so that points on
        # voxel centres floor to the same corner as the reference (location gradients are one-sided there).
        # Clamping to [-2, size + 1] changes nothing (every corner is already outside) but keeps far-away points
        # from overflowing the int32 cast.
        x = ((u * 2 - 1 + 1) * size - 1) * 0.5
        x = tl.minimum(tl.maximum(x, -2.0), size + 1.0)
        x0 = tl.floor(x)
        return x0.to(tl.int32), x - x0

    @triton.jit
    def _corners(loc_ptr, idx, mask_q, H, W, D, ACC: tl.constexpr):
        """The 8 trilinear corners of BLOCK_Q points as a (BLOCK_Q, 8) tile: flat voxel index inside the level
        (C order over H, W, D), in-bounds mask, and the per-axis weight factors (w = wh * ww * wd)."""
        c = tl.arange(0, 8)
        ch, cw, cd = (c // 4)[None, :], ((c // 2) % 2)[None, :], (c % 2)[None, :]  # corner offsets in {0, 1}
        h0, fh = _axis(tl.load(loc_ptr + 3 * idx + 0, mask=mask_q, other=0.0), H, ACC)  # (h, w, d) order
        w0, fw = _axis(tl.load(loc_ptr + 3 * idx + 1, mask=mask_q, other=0.0), W, ACC)
        d0, fd = _axis(tl.load(loc_ptr + 3 * idx + 2, mask=mask_q, other=0.0), D, ACC)
        hi, wi, di = h0[:, None] + ch, w0[:, None] + cw, d0[:, None] + cd
        # zero padding: an outside corner reads nothing and receives nothing
        valid = mask_q[:, None] & (hi >= 0) & (hi < H) & (wi >= 0) & (wi < W) & (di >= 0) & (di < D)
        wh = tl.where(ch == 1, fh[:, None], 1 - fh[:, None])  # d wh / d fh = +1 for the upper corner, -1 lower
        ww = tl.where(cw == 1, fw[:, None], 1 - fw[:, None])
        wd = tl.where(cd == 1, fd[:, None], 1 - fd[:, None])
        return (hi * W + wi) * D + di, valid, wh, ww, wd

    @triton.jit
    def _msda_fwd_kernel(
        # tensors (all contiguous)
        value_ptr,  # (B, S, nH, Dh)
        shapes_ptr,  # (L, 3) int32: H_l, W_l, D_l
        starts_ptr,  # (L,) int32: level start in S
        loc_ptr,  # (B, Q, nH, L, P, 3)
        attn_ptr,  # (B, Q, nH, L, P)
        out_ptr,  # (B, Q, nH, Dh), dtype of value
        # sizes
        S, Q, nH, Dh, L, P,
        # meta-parameters
        ACC: tl.constexpr,  # accumulation dtype: tl.float32 (tl.float64 for fp64 inputs)
        BLOCK_Q: tl.constexpr,  # queries per program
        BLOCK_D: tl.constexpr,  # next power of two >= Dh
    ):
        b, pid_q, h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        offs_q = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
        offs_d = tl.arange(0, BLOCK_D)
        mask_q, mask_d = offs_q < Q, offs_d < Dh
        acc = tl.zeros((BLOCK_Q, BLOCK_D), dtype=ACC)
        for l in range(L):
            H, W, D = tl.load(shapes_ptr + 3 * l), tl.load(shapes_ptr + 3 * l + 1), tl.load(shapes_ptr + 3 * l + 2)
            start = tl.load(starts_ptr + l)
            for p in range(P):
                idx = (((b * Q + offs_q) * nH + h) * L + l) * P + p  # (BLOCK_Q,) into attn; 3*idx into loc
                a = tl.load(attn_ptr + idx, mask=mask_q, other=0.0).to(ACC)
                flat, valid, wh, ww, wd = _corners(loc_ptr, idx, mask_q, H, W, D, ACC)
                rows = (b * S + start + flat) * nH + h  # (BLOCK_Q, 8) value rows of the corners
                v = tl.load(  # (BLOCK_Q, 8, BLOCK_D): one gather of all corners' channel vectors
                    value_ptr + rows[:, :, None] * Dh + offs_d[None, None, :],
                    mask=valid[:, :, None] & mask_d[None, None, :], other=0.0,
                ).to(ACC)
                acc += tl.sum((a[:, None] * wh * ww * wd)[:, :, None] * v, axis=1)
        out_rows = (b * Q + offs_q) * nH + h
        tl.store(out_ptr + out_rows[:, None] * Dh + offs_d[None, :], acc, mask=mask_q[:, None] & mask_d[None, :])

    @triton.jit
    def _msda_bwd_kernel(
        # tensors (all contiguous)
        value_ptr,  # (B, S, nH, Dh)
        shapes_ptr,  # (L, 3) int32
        starts_ptr,  # (L,) int32
        loc_ptr,  # (B, Q, nH, L, P, 3)
        attn_ptr,  # (B, Q, nH, L, P)
        grad_out_ptr,  # (B, Q, nH, Dh)
        need_value_ptr,  # (1,) int32: 1 = scatter grad_value, 0 = value needs no gradient (grad_value_ptr unused)
        grad_value_ptr,  # (B, S, nH, Dh) in ACC dtype, zero-initialised
        grad_loc_ptr,  # (B, Q, nH, L, P, 3) in ACC dtype
        grad_attn_ptr,  # (B, Q, nH, L, P) in ACC dtype
        # sizes
        S, Q, nH, Dh, L, P,
        # meta-parameters
        ACC: tl.constexpr,
        BLOCK_Q: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        b, pid_q, h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        offs_q = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
        offs_d = tl.arange(0, BLOCK_D)
        mask_q, mask_d = offs_q < Q, offs_d < Dh
        rows_q = (b * Q + offs_q) * nH + h
        mask_g = mask_q[:, None] & mask_d[None, :]
        g = tl.load(grad_out_ptr + rows_q[:, None] * Dh + offs_d[None, :], mask=mask_g, other=0.0).to(ACC)
        need_value = tl.load(need_value_ptr) != 0  # a runtime flag: as a constexpr, sm_80 spilled 8-128 B
        c = tl.arange(0, 8)
        sh, sw, sd = (c // 4 * 2 - 1)[None, :], ((c // 2) % 2 * 2 - 1)[None, :], (c % 2 * 2 - 1)[None, :]  # d w / d f
        for l in range(L):
            H, W, D = tl.load(shapes_ptr + 3 * l), tl.load(shapes_ptr + 3 * l + 1), tl.load(shapes_ptr + 3 * l + 2)
            start = tl.load(starts_ptr + l)
            for p in range(P):
                idx = (((b * Q + offs_q) * nH + h) * L + l) * P + p
                a = tl.load(attn_ptr + idx, mask=mask_q, other=0.0).to(ACC)
                flat, valid, wh, ww, wd = _corners(loc_ptr, idx, mask_q, H, W, D, ACC)
                rows = (b * S + start + flat) * nH + h
                ptrs = rows[:, :, None] * Dh + offs_d[None, None, :]  # (BLOCK_Q, 8, BLOCK_D)
                mask3 = valid[:, :, None] & mask_d[None, None, :]
                v = tl.load(value_ptr + ptrs, mask=mask3, other=0.0).to(ACC)
                dot = tl.sum(v * g[:, None, :], axis=2)  # (BLOCK_Q, 8): <g, corner value>, 0 outside the volume
                tl.store(grad_attn_ptr + idx, tl.sum(wh * ww * wd * dot, axis=1), mask=mask_q)
                # chain rule through x = u * size - 0.5 and f = x - floor(x): d f / d u = size
                tl.store(grad_loc_ptr + 3 * idx + 0, a * H * tl.sum(sh * ww * wd * dot, axis=1), mask=mask_q)
                tl.store(grad_loc_ptr + 3 * idx + 1, a * W * tl.sum(sw * wh * wd * dot, axis=1), mask=mask_q)
                tl.store(grad_loc_ptr + 3 * idx + 2, a * D * tl.sum(sd * wh * ww * dot, axis=1), mask=mask_q)
                if need_value:  # atomics straight from the registers
                    contrib = (a[:, None] * wh * ww * wd)[:, :, None] * g[:, None, :]  # (BLOCK_Q, 8, BLOCK_D)
                    tl.atomic_add(grad_value_ptr + ptrs, contrib, mask=mask3)


# ============ wrappers: launch, autograd, dispatcher ============


def _check(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    """Validate shapes once (clear errors beat out-of-bounds reads); return host copies of shapes and starts."""
    if value.dim() != 4:
        raise ValueError(f"msda: value must be (B, S, nH, Dh), got {tuple(value.shape)}")
    B, S, nH, Dh = value.shape
    if sampling_locations.dim() != 6 or sampling_locations.shape[-1] != 3:
        raise ValueError(f"msda: sampling_locations must be (B, Q, nH, L, P, 3), got {tuple(sampling_locations.shape)}")
    _, Q, _, L, P, _ = sampling_locations.shape
    if tuple(sampling_locations.shape[:3]) != (B, Q, nH):
        raise ValueError(
            f"msda: sampling_locations {tuple(sampling_locations.shape)} does not match value {tuple(value.shape)}"
        )
    if tuple(attention_weights.shape) != (B, Q, nH, L, P):
        raise ValueError(f"msda: attention_weights must be {(B, Q, nH, L, P)}, got {tuple(attention_weights.shape)}")
    if tuple(spatial_shapes.shape) != (L, 3) or tuple(level_start_index.shape) != (L,):
        raise ValueError(f"msda: spatial_shapes must be ({L}, 3) and level_start_index ({L},)")
    shapes, starts = spatial_shapes.tolist(), level_start_index.tolist()  # tiny; one sync on CUDA
    if sum(h * w * d for h, w, d in shapes) != S:
        raise ValueError(f"msda: value has S={S} tokens but spatial_shapes {shapes} sum to a different count")
    if max(value.numel(), sampling_locations.numel()) >= 2**31:
        raise ValueError("msda: the kernel indexes with int32; split the batch")
    return shapes, starts


def _acc_dtype(value):
    return (tl.float64, torch.float64) if value.dtype == torch.float64 else (tl.float32, torch.float32)


def _pow2(n, lo=1):
    return max(lo, triton.next_power_of_2(n))


def _block_q(Q, Dh):
    # the (BLOCK_Q, 8, BLOCK_D) corner gather should stay in registers: <= 4096 elements, 32 per thread at
    # 4 warps (BLOCK_Q = 16 at Dh = 32); no spills at the adapter's shapes (see FWD/BWD_NUM_WARPS); not tuned.
    return max(1, min(4096 // (8 * _pow2(Dh)), _pow2(Q)))


def _msda_forward(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    shapes, starts = _check(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    B, S, nH, Dh = value.shape
    _, Q, _, L, P, _ = sampling_locations.shape
    dev = value.device
    shapes_t = torch.tensor(shapes, dtype=torch.int32, device=dev)
    starts_t = torch.tensor(starts, dtype=torch.int32, device=dev)
    out = torch.empty(B, Q, nH, Dh, dtype=value.dtype, device=dev)
    BLOCK_Q = _block_q(Q, Dh)
    _msda_fwd_kernel[(B, triton.cdiv(Q, BLOCK_Q), nH)](
        value, shapes_t, starts_t, sampling_locations, attention_weights, out,
        S, Q, nH, Dh, L, P,
        ACC=_acc_dtype(value)[0], BLOCK_Q=BLOCK_Q, BLOCK_D=_pow2(Dh), num_warps=FWD_NUM_WARPS,
    )
    return out.view(B, Q, nH * Dh), (shapes, starts, shapes_t, starts_t)


def _msda_backward(
    grad_out, value, sampling_locations, attention_weights, shapes, starts, shapes_t, starts_t, need_value
):
    B, S, nH, Dh = value.shape
    _, Q, _, L, P, _ = sampling_locations.shape
    dev = value.device
    acc_tl, acc_torch = _acc_dtype(value)
    # fp32 accumulator (cast at the end); never touched by the kernel when value needs no gradient
    grad_value = torch.zeros(B, S, nH, Dh, dtype=acc_torch, device=dev) if need_value else torch.empty(0, device=dev)
    grad_loc = torch.empty(sampling_locations.shape, dtype=acc_torch, device=dev)
    grad_attn = torch.empty(attention_weights.shape, dtype=acc_torch, device=dev)
    BLOCK_Q = _block_q(Q, Dh)
    _msda_bwd_kernel[(B, triton.cdiv(Q, BLOCK_Q), nH)](
        value, shapes_t, starts_t, sampling_locations, attention_weights, grad_out,
        torch.tensor([int(need_value)], dtype=torch.int32, device=dev), grad_value, grad_loc, grad_attn,
        S, Q, nH, Dh, L, P,
        ACC=acc_tl, BLOCK_Q=BLOCK_Q, BLOCK_D=_pow2(Dh), num_warps=BWD_NUM_WARPS,
    )
    return grad_value, grad_loc, grad_attn


class MSDAFunction(torch.autograd.Function):
    """Triton forward/backward. Inputs may be fp32, bf16, fp16 (fp64 too, accumulated in fp64); each gradient is
    returned in its input's dtype, accumulated in fp32."""

    @staticmethod
    def forward(ctx, value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
        value, sampling_locations, attention_weights = (
            t.contiguous() for t in (value, sampling_locations, attention_weights)
        )
        out, meta = _msda_forward(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
        ctx.save_for_backward(value, sampling_locations, attention_weights)
        ctx.meta = meta
        return out

    @staticmethod
    @once_differentiable  # the backward kernels are not themselves differentiable: error, not silent zeros
    def backward(ctx, grad_out):
        value, sampling_locations, attention_weights = ctx.saved_tensors
        B, S, nH, Dh = value.shape
        grad_out = grad_out.contiguous().view(B, -1, nH, Dh)  # (B, Q, nH*Dh) -> (B, Q, nH, Dh)
        need_value = ctx.needs_input_grad[0]
        gv, gl, ga = _msda_backward(grad_out, value, sampling_locations, attention_weights, *ctx.meta, need_value)
        return (
            gv.to(value.dtype) if ctx.needs_input_grad[0] else None,
            None,
            None,
            gl.to(sampling_locations.dtype) if ctx.needs_input_grad[3] else None,
            ga.to(attention_weights.dtype) if ctx.needs_input_grad[4] else None,
        )


def msda(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
    backend: str | None = None,
) -> torch.Tensor:
    """3D multi-scale deformable attention, (B, S, nH, Dh) values -> (B, Q, nH*Dh). Shapes: module docstring.

    backend=None: the Triton kernel for CUDA tensors (when Triton imports), the PyTorch reference otherwise.
    backend="triton" / "torch" forces one; "triton" on CPU tensors needs TRITON_INTERPRET=1 set before import.
    """
    if backend is None:
        backend = "triton" if HAS_TRITON and value.is_cuda else "torch"
    if backend == "torch":
        return msda_reference(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    if backend != "triton":
        raise ValueError(f"msda: backend must be None, 'triton' or 'torch', got {backend!r}")
    if not HAS_TRITON:
        raise RuntimeError(f"msda: backend='triton' but triton is not importable ({_TRITON_ERROR}); use 'torch'")
    if not value.is_cuda and type(_msda_fwd_kernel).__name__ != "InterpretedFunction":  # compiled, not interpreted
        raise RuntimeError("msda: backend='triton' on CPU tensors needs TRITON_INTERPRET=1 set before the import")
    return MSDAFunction.apply(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)


# ============ ahead-of-time builds for real GPUs (no GPU needed) ============
# The interpreter checks a kernel's arithmetic, not whether it compiles for a GPU (tl.dot shape rules, dtype
# promotion, registers). These helpers record the launches the wrappers above would make at given shapes (meta
# tensors: nothing is computed), then compile each one for a real target with Triton's own compiler and run the
# wheel's ptxas on the PTX for its resource report. `python bench.py msda --compile-only` prints the table.

class _Recorder:
    def __init__(self, kernel):
        self.kernel, self.launches = kernel, []

    def __getitem__(self, grid):
        return lambda *args, **meta: self.launches.append((self.kernel, grid, args, meta))


def planned_launches(query_shapes, value_shapes, nH: int, Dh: int, P: int, dtype, B: int = 1) -> list:
    """[(kernel, grid, args, meta)] of msda's forward and backward (grad_value needed) at these shapes, as the
    wrappers choose them (block sizes, dtypes)."""
    spatial_shapes = torch.tensor(value_shapes)
    sizes = spatial_shapes.prod(1)
    starts = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])
    Q, S, L = sum(h * w * d for h, w, d in query_shapes), int(sizes.sum()), len(value_shapes)
    meta_t = lambda *shape: torch.empty(*shape, dtype=dtype, device="meta")  # noqa: E731
    value, loc, attn = meta_t(B, S, nH, Dh), meta_t(B, Q, nH, L, P, 3), meta_t(B, Q, nH, L, P)
    g = globals()
    names = ["_msda_fwd_kernel", "_msda_bwd_kernel"]
    saved = {n: g[n] for n in names}
    recorders = [_Recorder(g[n]) for n in names]
    try:
        g.update(zip(names, recorders))
        _, meta = _msda_forward(value, spatial_shapes, starts, loc, attn)
        _msda_backward(meta_t(B, Q, nH, Dh), value, loc, attn, *meta, need_value=True)
    finally:
        g.update(saved)
    return [launch for r in recorders for launch in r.launches]


def compile_launch(kernel, args, meta, arch: int) -> dict:
    """Compile one recorded launch for sm_<arch> exactly as the JIT would specialise it (its own rule: 16-byte
    aligned pointers and ints divisible by 16 get a divisibility hint, ints equal to 1 become constants) ->
    {ok, regs, spills, shared_bytes, error}. regs and spills are ptxas -v's report on the same PTX."""
    import re
    import subprocess
    import tempfile

    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import native_specialize_impl

    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    options = {k: meta[k] for k in ("num_warps", "num_stages") if k in meta}
    constexprs = {k: v for k, v in meta.items() if k not in options}
    signature, attrs = {}, {}
    for i, (name, a) in enumerate(zip(kernel.arg_names, args)):
        ty, attr = native_specialize_impl(type(backend), a, False, True, True)
        signature[name] = ty
        if ty == "constexpr":
            constexprs[name] = attr
        elif attr:
            attrs[(i,)] = backend.parse_attr(attr)
    signature.update({k: "constexpr" for k in constexprs})
    try:
        compiled = triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=target, options=options)
    except Exception as e:  # a kernel that cannot build for this GPU: report, do not stop the table
        return {"ok": False, "regs": None, "spills": None, "shared_bytes": None, "error": str(e).splitlines()[0]}
    with tempfile.TemporaryDirectory() as tmp:
        ptx = f"{tmp}/k.ptx"
        with open(ptx, "w") as f:
            f.write(compiled.asm["ptx"])
        log = subprocess.run([get_ptxas(arch).path, "-v", f"--gpu-name={sm_arch_from_capability(arch)}", ptx,
                              "-o", f"{tmp}/k.cubin"], capture_output=True, text=True, check=True).stderr
    regs = int(re.search(r"Used (\d+) registers", log).group(1))
    spills = sum(int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", log))
    return {"ok": True, "regs": regs, "spills": spills, "shared_bytes": compiled.metadata.shared, "error": None}


# ============ parity self-check ============

if __name__ == "__main__":
    import os
    import sys

    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        os.environ["TRITON_INTERPRET"] = "1"  # the flag is read when kernels are defined: restart with it set
        os.execv(sys.executable, [sys.executable] + sys.argv)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    shapes = torch.tensor([[3, 4, 5], [2, 3, 2]], device=dev)
    starts = torch.cat([shapes.new_zeros(1), shapes.prod(1).cumsum(0)[:-1]])
    B, Q, nH, Dh, P = 2, 13, 3, 6, 3
    S, L = int(shapes.prod(1).sum()), len(shapes)
    ok = True
    dtypes = [(torch.float32, 1e-4), (torch.bfloat16, 3e-2)]  # bf16 against the fp32 reference on rounded inputs
    for dtype, tol in dtypes:
        value = torch.randn(B, S, nH, Dh, device=dev).to(dtype).requires_grad_()
        loc = (torch.rand(B, Q, nH, L, P, 3, device=dev) * 1.4 - 0.2).to(dtype).requires_grad_()  # some outside
        attn = torch.rand(B, Q, nH, L, P, device=dev).to(dtype).requires_grad_()
        g = torch.randn(B, Q, nH * Dh, device=dev)
        results = {}
        for backend in ("torch", "triton"):
            args = [t.float() if backend == "torch" else t for t in (value, loc, attn)]  # reference in fp32
            out = msda(args[0], shapes, starts, args[1], args[2], backend=backend)
            results[backend] = [out, *torch.autograd.grad(out.float(), (value, loc, attn), g)]
        for name, a, b in zip(["out", "grad_value", "grad_loc", "grad_attn"], results["triton"], results["torch"]):
            err = ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-6)).item()
            ok &= err < tol
            print(f"{str(dtype):15s} {name:10s} max rel err {err:.2e} {'ok' if err < tol else 'FAIL'}")
    sys.exit(0 if ok else 1)
