"""3D MSDA: the reference's axis convention, its gradients, and the Triton kernel against it.

On CPU the kernels run through the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1 before this
module imports triton), which is slow: shapes are tiny but keep every awkward case — several non-cubic levels,
P, nH, Dh that are not powers of two, points on borders and outside the volume, both grad_value strategies.
"""
import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT

import msda_triton
from msda_triton import msda, msda_reference

needs_triton = pytest.mark.skipif(not msda_triton.HAS_TRITON, reason="triton is not importable on this platform")
DEV = "cuda" if torch.cuda.is_available() else "cpu"


def make_levels(shapes, device="cpu"):
    spatial_shapes = torch.tensor(shapes, dtype=torch.long, device=device)
    sizes = spatial_shapes.prod(1)
    return spatial_shapes, torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])


def voxel_grid(shape):
    """(H*W*D, 3): every voxel's (i, j, k), in the C order the levels are flattened in."""
    return torch.stack(torch.meshgrid(*[torch.arange(n) for n in shape], indexing="ij"), -1).reshape(-1, 3)


def make_inputs(B, Q, nH, Dh, P, shapes, dtype=torch.float64, device="cpu", seed=0, special=0.25):
    """Random inputs; a `special` fraction of the location coordinates on hard spots (borders, centres, outside)."""
    gen = torch.Generator().manual_seed(seed)
    spatial_shapes, starts = make_levels(shapes, device)
    S, L = int(spatial_shapes.prod(1).sum()), len(shapes)
    value = torch.randn(B, S, nH, Dh, generator=gen, dtype=torch.float64)
    loc = torch.rand(B, Q, nH, L, P, 3, generator=gen, dtype=torch.float64) * 1.4 - 0.2  # ~1/4 outside [0, 1]
    # exact voxel coordinates x = u*size - 0.5: -1 (only corner 0 can touch), -0.5 (outer face), 0 and size-1
    # (first/last centre), size-0.5 (far face), size (outside); written back as u = (x + 0.5) / size
    size = torch.tensor(shapes, dtype=torch.float64)[:, None, :].expand(L, P, 3)  # (L, P, 3)
    xs = torch.stack([size * 0 - 1, size * 0 - 0.5, size * 0, size - 1, size - 0.5, size], -1)  # (L, P, 3, 6)
    choice = torch.randint(0, 6, (B, Q, nH, L, P, 3, 1), generator=gen)
    u_special = (xs.expand(B, Q, nH, L, P, 3, 6).gather(-1, choice)[..., 0] + 0.5) / size
    loc = torch.where(torch.rand(loc.shape, generator=gen) < special, u_special, loc)
    attn = torch.rand(B, Q, nH, L, P, generator=gen, dtype=torch.float64)
    cast = lambda t: t.to(device=device, dtype=dtype)  # noqa: E731
    return cast(value), spatial_shapes, starts, cast(loc), cast(attn)


def run(backend, value, spatial_shapes, starts, loc, attn, grad_out):
    value, loc, attn = (t.detach().clone().requires_grad_() for t in (value, loc, attn))
    out = msda(value, spatial_shapes, starts, loc, attn, backend=backend)
    out.backward(grad_out)
    return out.detach(), value.grad, loc.grad, attn.grad


def assert_close(got, want, tol, what):
    err = ((got.double() - want.double()).abs().max() / want.double().abs().max().clamp_min(1e-12)).item()
    assert err < tol, f"{what}: max error {err:.2e} (relative to max |ref|) > {tol:.0e}"


# ============ the reference ============


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
def test_axis_order_coordinate_volume(backend):
    """A volume whose channels hold each voxel's own (i, j, k), sampled at voxel centres ((i+.5)/H, (j+.5)/W,
    (k+.5)/D), returns those coordinates — on non-cubic levels, where the reference 3DINO's (w, h, d) order
    would read permuted voxels (or fall outside). Halfway between two centres along w averages them."""
    shapes = [(3, 4, 5), (2, 3, 6)]
    spatial_shapes, starts = make_levels(shapes)
    value = torch.cat([voxel_grid(s) for s in shapes]).float()  # (S, 3): each voxel's (i, j, k)
    value = value[None, :, None, :].expand(1, -1, 2, 3).contiguous()  # (1, S, nH=2, Dh=3): channel = (i, j, k)
    for l, (H, W, D) in enumerate(shapes):
        ijk = voxel_grid((H, W, D))
        loc = torch.zeros(1, len(ijk), 2, 2, 1, 3)
        loc[0, :, :, l, 0] = ((ijk + 0.5) / torch.tensor([H, W, D]))[:, None]  # every voxel centre, (h, w, d) order
        attn = torch.zeros(1, len(ijk), 2, 2, 1)
        attn[..., l, 0] = 1.0  # read level l only
        out = msda(value, spatial_shapes, starts, loc, attn, backend=backend).view(1, -1, 2, 3)
        torch.testing.assert_close(out[0, :, 0], ijk.float(), atol=1e-5, rtol=0)
        torch.testing.assert_close(out[0, :, 1], ijk.float(), atol=1e-5, rtol=0)
        loc[..., 1] += 0.5 / W  # half a voxel along w: linear interpolation between j and j+1 (zero beyond W-1)
        out = msda(value, spatial_shapes, starts, loc, attn, backend=backend).view(1, -1, 2, 3)[0, :, 0]
        inside = ijk[:, 1] < W - 1
        torch.testing.assert_close(out[inside], ijk[inside].float() + torch.tensor([0, 0.5, 0]), atol=1e-5, rtol=0)


def test_reference_gradcheck_fp64():
    # generic (random) points only: trilinear interpolation has kinks on voxel-centre planes
    value, shapes, starts, loc, attn = make_inputs(1, 3, 2, 2, 2, [(2, 3, 2), (1, 2, 3)], seed=1)
    loc = torch.rand(loc.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64) * 1.4 - 0.2
    fn = lambda v, p, a: msda_reference(v, shapes, starts, p, a)  # noqa: E731
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # ~340 tiny calls: a busy 2-core runner turned intra-op threads into 20 ms each
    try:
        assert torch.autograd.gradcheck(fn, (value.requires_grad_(), loc.requires_grad_(), attn.requires_grad_()))
    finally:
        torch.set_num_threads(threads)


# ============ kernel vs reference ============


@needs_triton
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.float64, 1e-10)])
def test_kernel_matches_reference(dtype, tol):
    """Forward and all three gradients, points on borders / voxel centres / outside included, P=3, nH=3, Dh=6,
    two non-cubic levels."""
    inputs = make_inputs(2, 13, 3, 6, 3, [(3, 4, 5), (2, 3, 2)], dtype=dtype, device=DEV)
    grad_out = torch.randn(2, 13, 18, generator=torch.Generator().manual_seed(3), dtype=torch.float64).to(DEV, dtype)
    got = run("triton", *inputs, grad_out)
    want = run("torch", *inputs, grad_out)
    # location gradients are one-sided on voxel-centre planes; the kernel floors with grid_sample's arithmetic,
    # so on CPU it takes the same side and ties are compared too. On GPU either side may fuse a multiply-add
    # differently, so there the tie coordinates (a measure-zero set) are left out of the grad_loc comparison.
    if DEV == "cuda":
        value, spatial_shapes, starts, loc, attn = inputs
        x = loc.double() * spatial_shapes.double()[:, None, :] - 0.5  # voxel coordinates, (B, Q, nH, L, P, 3)
        generic = x != x.round()
        got, want = list(got), list(want)
        got[2], want[2] = got[2][generic], want[2][generic]
    for g, w, name in zip(got, want, ["out", "grad_value", "grad_loc", "grad_attn"]):
        assert g.dtype == dtype
        assert_close(g, w, tol, name)


@needs_triton
def test_kernel_hot_level():
    """The extractor's situation in miniature: 40 queries on a 1x2x3 grid (~100 atomic adds per voxel); Dh = 24
    (padded to 32, so three query blocks of 16); value needs no grad in a second pass."""
    inputs = make_inputs(1, 40, 2, 24, 2, [(1, 2, 3)], dtype=torch.float32, device=DEV, seed=4)
    grad_out = torch.randn(1, 40, 48, generator=torch.Generator().manual_seed(5)).to(DEV)
    want = run("torch", *inputs, grad_out)
    for g, w, name in zip(run("triton", *inputs, grad_out), want, ["out", "grad_value", "grad_loc", "grad_attn"]):
        assert_close(g, w, 1e-4, name)
    value, shapes, starts, loc, attn = inputs
    loc = loc.clone().requires_grad_()
    msda(value, shapes, starts, loc, attn, backend="triton").backward(grad_out)  # value without grad
    assert_close(loc.grad, want[2], 1e-4, "grad_loc without grad_value")


@needs_triton
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_kernel_half_precision(dtype):
    """bf16/fp16 inputs, fp32 accumulation: compare with the reference on the same (rounded) inputs in fp32."""
    inputs = make_inputs(1, 9, 2, 8, 2, [(3, 4, 5), (2, 3, 2)], dtype=dtype, device=DEV, seed=6)
    grad_out = torch.randn(1, 9, 16, generator=torch.Generator().manual_seed(7)).to(DEV, dtype)
    got = run("triton", *inputs, grad_out)
    value, shapes, starts, loc, attn = inputs
    want = run("torch", value.float(), shapes, starts, loc.float(), attn.float(), grad_out.float())
    for g, w, name in zip(got, want, ["out", "grad_value", "grad_loc", "grad_attn"]):
        assert g.dtype == dtype
        assert_close(g, w, 1e-2, name)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="real shapes need a GPU")
def test_kernel_real_shapes_cuda():
    """The adapter's extractor (25,039 queries on one 7^3 level) and injector (343 on 28^3/14^3/7^3)."""
    for Q, shapes in [(25039, [(7, 7, 7)]), (343, [(28, 28, 28), (14, 14, 14), (7, 7, 7)])]:
        inputs = make_inputs(1, Q, 8, 32, 4, shapes, dtype=torch.float32, device="cuda", seed=8, special=0.0)
        grad_out = torch.randn(1, Q, 256, device="cuda")
        got, want = run("triton", *inputs, grad_out), run("torch", *inputs, grad_out)
        for g, w, name in zip(got, want, ["out", "grad_value", "grad_loc", "grad_attn"]):
            assert_close(g, w, 1e-4, name)


# ============ dispatcher ============


def test_dispatcher(monkeypatch):
    inputs = make_inputs(1, 4, 2, 3, 2, [(2, 3, 2)], dtype=torch.float32)
    out = msda(*inputs)  # CPU tensors: backend=None is the reference
    assert out.shape == (1, 4, 6)
    torch.testing.assert_close(out, msda_reference(*inputs), rtol=0, atol=0)
    with pytest.raises(ValueError, match="backend"):
        msda(*inputs, backend="cuda")
    value, shapes, starts, loc, attn = inputs
    with pytest.raises(ValueError, match="spatial_shapes"):
        msda(value[:, :-1], shapes, starts, loc, attn, backend="triton")
    monkeypatch.setattr(msda_triton, "HAS_TRITON", False)  # as on macOS
    with pytest.raises(RuntimeError, match="not importable"):
        msda(*inputs, backend="triton")
    torch.testing.assert_close(msda(*inputs), out, rtol=0, atol=0)


@pytest.mark.slow  # with a cold Triton cache, building the kernels takes ~12 s of CPU
@needs_triton
def test_every_kernel_compiles_for_sm90_without_spills():
    """The interpreter checks arithmetic only. Build every launch the wrappers make at the ViT-Adapter's real
    shapes (injector and extractor, fp32/bf16/fp16) for an H100 with Triton's own compiler — no GPU needed — so a
    kernel that could not run on a GPU, or that spills registers at its chosen block sizes, fails CI."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # compiled, not interpreted
    res = subprocess.run([sys.executable, "bench.py", "msda", "--compile-only", "--arch", "90"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    builds = json.loads(res.stdout.strip().splitlines()[-1])["kernels"]
    names = {b["name"] for b in builds}
    assert names == {"_msda_fwd_kernel", "_msda_bwd_kernel"}
    assert {b["dtype"] for b in builds} == {"float32", "bfloat16", "float16"}
    for b in builds:
        assert b["ok"], b
        assert b["arch"] == "sm_90" and 0 < b["regs"] <= 255, b
        assert b["spills"] == 0, f"{b['name']} ({b['dtype']}) spills {b['spills']} bytes at {b['meta']}"
