"""Tests for augment.py: the RRC3D box, every batched transform (shape, seed, and what it claims to do, against
independent numpy/scipy references where the maths allows), the OneOf probabilities, the iBOT masks and the
assembled batch. Random tensors only (no data.py, no files); tiny volumes so the whole file runs in seconds."""
import math

import numpy as np
import pytest
import scipy.ndimage as ndi
import torch
import torch.nn.functional as F

import augment


def run(x, plan):
    """Apply a plan to a copy of x (the plans work in place)."""
    return augment.run_plan(x.clone(), plan)


def recipe(plan_fn):
    """A view recipe as fn(x, g) -> y."""
    return lambda x, g: run(x, plan_fn(len(x), g))


# the batched transforms with their "apply always" probability, as (name, fn(x, g) -> y)
TRANSFORMS = [
    ("flip0", lambda x, g: run(x, augment.plan_flip(len(x), 0, 0.5, g))),
    ("flip2", lambda x, g: run(x, augment.plan_flip(len(x), 2, 0.5, g))),
    ("rot90_01", lambda x, g: run(x, augment.plan_rot90(len(x), (0, 1), 0.5, g))),
    ("rot90_12", lambda x, g: run(x, augment.plan_rot90(len(x), (1, 2), 0.5, g))),
    ("gamma", lambda x, g: run(x, augment.plan_gamma(len(x), 1.0, g))),
    ("noise", lambda x, g: run(x, augment.plan_noise(len(x), 1.0, g))),
    ("hist", lambda x, g: run(x, augment.plan_histogram(len(x), 1.0, g))),
    ("smooth", lambda x, g: run(x, augment.plan_smooth(len(x), 1.0, g))),
    ("sharpen", lambda x, g: run(x, augment.plan_sharpen(len(x), 1.0, g))),
    ("gibbs", lambda x, g: run(x, augment.plan_gibbs(len(x), 1.0, g))),
    ("one_of", recipe(augment.plan_intensity_one_of)),
    ("global_view_1", recipe(augment.plan_global_view_1)),
    ("global_view_2", recipe(augment.plan_global_view_2)),
    ("local_views", recipe(augment.plan_local_views)),
]


def gen(seed):
    return torch.Generator().manual_seed(seed)


def cubes(B=12, S=12, seed=0):
    return torch.rand(B, 1, S, S, S, generator=gen(seed)) * 2 - 1


# ----------------------------------------------------------------------------------------------------------------
# RandomResizedCrop3d box


@pytest.mark.parametrize("scales", [((0.48, 1.0), (0.5, 1.0)), ((0.16, 0.48), (0.2, 0.5))], ids=["global", "local"])
def test_crop_box_ranges(scales):
    (a0, a1), (c0, c1) = scales
    shape = (200, 180, 70)
    g = gen(0)
    boxes = [augment.sample_crop_box(shape, (a0, a1), (c0, c1), g) for _ in range(2000)]
    h, w, d = shape
    for h0, w0, d0, ch, cw, cd in boxes:
        assert 0 <= h0 and h0 + ch <= h and 0 <= w0 and w0 + cw <= w and 0 <= d0 and d0 + cd <= d
        assert ch > 0 and cw > 0 and cd > 0
        # in-plane: area fraction in [a0, a1] and aspect in [0.9, 1/0.9], up to rounding each side by ½ voxel
        area_lo, area_hi = (ch - 0.5) * (cw - 0.5) / (h * w), (ch + 0.5) * (cw + 0.5) / (h * w)
        assert area_hi >= a0 and area_lo <= a1
        assert (cw - 0.5) / (ch + 0.5) <= 1 / 0.9 and (cw + 0.5) / (ch - 0.5) >= 0.9
        # through-plane: length fraction in [c0, c1] up to rounding
        assert c0 - 0.5 / d <= cd / d <= c1 + 0.5 / d
    arr = np.array(boxes)
    # the draws really spread over the ranges, and the origins over the valid positions
    area = arr[:, 3] * arr[:, 4] / (h * w)
    assert area.min() < a0 + 0.05 * (a1 - a0) and area.max() > a1 - 0.1 * (a1 - a0)
    frac_d = arr[:, 5] / d
    assert frac_d.min() < c0 + 0.05 and frac_d.max() > c1 - 0.05
    assert arr[:, 0].min() == 0 and (arr[:, 0] + arr[:, 3]).max() == h


def test_crop_box_fallback_and_tiny_volumes():
    g = gen(1)
    # w/h = 20 > 1/0.9: every area sample is too tall, so the fallback takes the whole height and cw = round(h/0.9)
    for _ in range(20):
        h0, w0, d0, ch, cw, cd = augment.sample_crop_box((10, 200, 30), (0.48, 1.0), (0.5, 1.0), g)
        assert (h0, ch, cw) == (0, 10, 11)
    # w/h < 0.9: the transposed case
    for _ in range(20):
        h0, w0, d0, ch, cw, cd = augment.sample_crop_box((200, 10, 30), (0.48, 1.0), (0.5, 1.0), g)
        assert (w0, ch, cw) == (0, 11, 10)
    # a 1-voxel axis never gives an empty crop (round(1·0.2) = 0 -> the whole axis)
    assert augment.sample_crop_box((1, 1, 1), (0.16, 0.48), (0.2, 0.5), g) == (0, 0, 0, 1, 1, 1)


def test_crop_box_reproducible():
    a = [augment.sample_crop_box((64, 64, 32), (0.16, 0.48), (0.2, 0.5), gen(7)) for _ in range(3)]
    b = [augment.sample_crop_box((64, 64, 32), (0.16, 0.48), (0.2, 0.5), gen(7)) for _ in range(3)]
    g = gen(8)
    c = [augment.sample_crop_box((64, 64, 32), (0.16, 0.48), (0.2, 0.5), g) for _ in range(3)]
    assert a == b and a != c


def test_resize_crops():
    crops = [torch.rand(1, 20, 15, 9), torch.rand(1, 8, 8, 8), torch.rand(1, 3, 30, 5)]
    out = augment.resize_crops(crops, 8)
    assert out.shape == (3, 1, 8, 8, 8) and out.dtype == torch.float32
    torch.testing.assert_close(out[1], crops[1])  # same size: trilinear with align_corners=False is the identity
    ref = F.interpolate(crops[0][None], size=(8, 8, 8), mode="trilinear", align_corners=False)[0]
    torch.testing.assert_close(out[0], ref)
    # a linear ramp along H stays a ramp spanning the same centred range (align_corners=False geometry)
    ramp = torch.arange(20.0).view(1, 20, 1, 1).expand(1, 20, 4, 4)
    r = augment.resize_crops([ramp], 10)[0, 0, :, 0, 0]
    torch.testing.assert_close(r, torch.arange(10.0) * 2 + 0.5)


# ----------------------------------------------------------------------------------------------------------------
# Every batched transform: shape/dtype/device kept, input untouched, reproducible under a seed


@pytest.mark.parametrize("name,fn", TRANSFORMS, ids=[t[0] for t in TRANSFORMS])
def test_transform_contract(name, fn):
    x = cubes()
    x0 = x.clone()
    y1, y2, y3 = fn(x, gen(1)), fn(x, gen(1)), fn(x, gen(2))
    assert y1.shape == x.shape and y1.dtype == x.dtype and y1.device == x.device
    torch.testing.assert_close(x, x0, rtol=0, atol=0)  # the input is never modified
    torch.testing.assert_close(y1, y2, rtol=0, atol=0)  # same seed -> identical output
    assert not torch.equal(y1, y3)  # different seed -> different output
    assert torch.isfinite(y1).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name,fn", TRANSFORMS, ids=[t[0] for t in TRANSFORMS])
def test_transform_cpu_generator_cuda_data(name, fn):
    # a CPU generator with CUDA data: every parameter is drawn on CPU, so the views equal the CPU ones, except the
    # Gaussian-noise voxels, which are drawn on the data's device from per-sample seeds (reproducible, not equal)
    x = cubes()
    y_gpu, y_gpu2 = fn(x.cuda(), gen(3)), fn(x.cuda(), gen(3))
    assert y_gpu.is_cuda and torch.equal(y_gpu, y_gpu2)
    if name not in ("noise", "one_of", "global_view_1", "global_view_2", "local_views"):
        torch.testing.assert_close(y_gpu.cpu(), fn(x, gen(3)), rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------------------------------------------
# Geometric transforms do what they say


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_flip_is_torch_flip_per_sample(axis):
    x = cubes(B=32)
    y = run(x, augment.plan_flip(len(x), axis, 0.5, gen(4)))
    flipped = [torch.equal(y[b], x[b].flip(1 + axis)) for b in range(32)]
    kept = [torch.equal(y[b], x[b]) for b in range(32)]
    assert all(f or k for f, k in zip(flipped, kept))  # each sample: flipped or untouched, nothing else
    assert 5 < sum(flipped) < 27  # p = 0.5 per sample, independently
    assert torch.equal(run(x, augment.plan_flip(len(x), axis, 1.0, gen(4))), x.flip(2 + axis))


@pytest.mark.parametrize("plane", [(0, 1), (1, 2), (0, 2)])
def test_rot90_is_torch_rot90_per_sample(plane):
    x = cubes(B=48)
    y = run(x, augment.plan_rot90(len(x), plane, 0.5, gen(5)))
    ks = []
    for b in range(48):
        match = [k for k in range(4) if torch.equal(y[b], torch.rot90(x[b], k, dims=(1 + plane[0], 1 + plane[1])))]
        assert len(match) == 1
        ks.append(match[0])
    assert set(ks) == {0, 1, 2, 3}  # not applied, and all three k ∈ {1, 2, 3} occur
    y = run(x, augment.plan_rot90(len(x), plane, 1.0, gen(5)))
    assert all(not torch.equal(y[b], x[b]) for b in range(48))
    with pytest.raises(AssertionError):
        run(torch.rand(2, 1, 4, 5, 5), augment.plan_rot90(2, (0, 1), 1.0, gen(0)))  # non-square plane


@pytest.mark.parametrize("chunk_bytes", [augment.CPU_CHUNK_BYTES, 3 * 4 * 5**3])  # whole batch / 3 samples
def test_fused_geometry_equals_the_six_separate_steps(monkeypatch, chunk_bytes):
    # the view recipes apply flips + rot90s as one permute+flip per sample: it must equal the spec's sequence of
    # flip0, flip1, flip2, rot90(0,1), rot90(1,2), rot90(0,2) with the same draws, sample by sample
    monkeypatch.setattr(augment, "CPU_CHUNK_BYTES", chunk_bytes)
    n, p = 400, 0.5
    x = torch.rand(n, 2, 5, 5, 5, generator=gen(0))  # 2 channels: the channel axis must stay put
    g_seq = gen(9)
    steps = sum((augment.plan_flip(n, a, p, g_seq) for a in range(3)), [])
    steps += sum((augment.plan_rot90(n, plane, p, g_seq) for plane in ((0, 1), (1, 2), (0, 2))), [])
    want = augment.run_plan(x.clone(), steps)
    got = augment.run_plan(x.clone(), augment.plan_geometric(n, gen(9), p))
    assert torch.equal(got, want)
    codes = augment.plan_geometric(n, gen(9), p)[0][1]["code"]
    assert len(set(codes.tolist())) == 48  # every symmetry of the cube occurs: the whole table is exercised
    with pytest.raises(ValueError, match="cubes"):
        augment.run_plan(torch.rand(n, 1, 4, 5, 5), augment.plan_geometric(n, gen(9), p))


# ----------------------------------------------------------------------------------------------------------------
# Intensity transforms: the formulas, against independent references


def test_gamma_contrast_keeps_range_and_is_a_power_curve():
    x = cubes(B=8)
    y = run(x, augment.plan_gamma(len(x), 1.0, gen(6)))
    lo, hi = x.flatten(1).amin(1), x.flatten(1).amax(1)
    torch.testing.assert_close(y.flatten(1).amin(1), lo, atol=1e-5, rtol=0)
    torch.testing.assert_close(y.flatten(1).amax(1), hi, atol=1e-5, rtol=0)
    # every sample is ((x − m)/r)^γ·r + m for one γ ∈ [0.5, 2]: log(y_n)/log(x_n) is constant per sample
    t = ((x - lo.view(-1, 1, 1, 1, 1)) / (hi - lo).view(-1, 1, 1, 1, 1)).double().flatten(1)
    yn = ((y - lo.view(-1, 1, 1, 1, 1)) / (hi - lo).view(-1, 1, 1, 1, 1)).double().flatten(1)
    ok = (t > 0.05) & (t < 0.95)
    gammas = []
    for b in range(8):
        est = torch.log(yn[b][ok[b]]) / torch.log(t[b][ok[b]])
        assert est.std() < 1e-3
        gammas.append(est.mean().item())
    assert 0.5 <= min(gammas) and max(gammas) <= 2.0 and max(gammas) - min(gammas) > 0.1  # per-sample γ
    # the pure function against the formula with a fixed γ
    g2 = torch.tensor([2.0] * 8)
    ref = ((x - lo.view(-1, 1, 1, 1, 1)) / ((hi - lo).view(-1, 1, 1, 1, 1) + 1e-7)) ** 2 * (hi - lo).view(
        -1, 1, 1, 1, 1) + lo.view(-1, 1, 1, 1, 1)
    torch.testing.assert_close(augment.adjust_contrast(x, g2), ref, atol=1e-5, rtol=1e-5)


def test_gaussian_noise_std_range():
    x = torch.zeros(64, 1, 8, 8, 8)
    y = run(x, augment.plan_noise(len(x), 1.0, gen(7)))
    std = y.flatten(1).std(1)
    assert std.max() < 0.0025 and std.min() < 0.0005 and std.max() > 0.0015  # σ ~ U(0, 0.002) per sample


def test_histogram_shift_monotone_keeps_range_and_matches_np_interp():
    # a volume whose C-order flattening is sorted: the map must keep it sorted
    x = torch.sort(torch.rand(6, 1 * 10 * 10 * 10, generator=gen(8)) * 4 - 2, dim=1).values.view(6, 1, 10, 10, 10)
    y = run(x, augment.plan_histogram(len(x), 1.0, gen(9)))
    assert (y.flatten(1).diff(dim=1) >= -1e-6).all()
    torch.testing.assert_close(y.flatten(1).amin(1), x.flatten(1).amin(1), atol=1e-6, rtol=0)
    torch.testing.assert_close(y.flatten(1).amax(1), x.flatten(1).amax(1), atol=1e-6, rtol=0)
    assert (y - x).abs().max() > 0.05  # it did shift the histogram
    # the pure map against np.interp with explicit control points
    f = torch.tensor([[0, 0.05, 0.3, 0.31, 0.5, 0.52, 0.7, 0.9, 0.95, 1.0]] * 6)
    out = augment.histogram_map(x, f)
    for b in range(6):
        xb = x[b].double().numpy().ravel()
        lo, hi = xb.min(), xb.max()
        ref = np.interp(xb, np.linspace(0, 1, 10) * (hi - lo) + lo, f[b].double().numpy() * (hi - lo) + lo)
        np.testing.assert_allclose(out[b].numpy().ravel(), ref, atol=1e-5)
    const = torch.full((2, 1, 4, 4, 4), 0.3)
    torch.testing.assert_close(run(const, augment.plan_histogram(len(const), 1.0, gen(0))), const)  # constant image: no-op


def test_gaussian_kernel_erf_taps():
    sigma = torch.tensor([0.25, 1.0, 1.5], dtype=torch.float64)
    k = augment.gaussian_kernel_1d(sigma)
    assert k.shape == (3, 2 * 6 + 1)  # radius int(max(4σ, ½) + ½) = 1, 4, 6
    for row, s, R in zip(k, sigma.tolist(), (1, 4, 6)):
        t = np.arange(-6, 7)
        ref = np.array([0.5 * (math.erf((v + 0.5) / (s * math.sqrt(2))) - math.erf((v - 0.5) / (s * math.sqrt(2))))
                        if abs(v) <= R else 0.0 for v in t])
        np.testing.assert_allclose(row.numpy(), ref, atol=1e-12)
    assert k[1].sum() < 1  # not renormalised


def _scipy_gaussian(x, sigma):
    """Separable zero-padded correlation with our taps, one axis at a time (scipy, float64)."""
    y = x.astype(np.float64)
    for axis, s in enumerate(sigma):
        k = augment.gaussian_kernel_1d(torch.tensor([s], dtype=torch.float64))[0].numpy()
        y = ndi.correlate1d(y, k, axis=axis, mode="constant", cval=0.0)
    return y


@pytest.mark.parametrize("shape", [(14, 11, 9), (10, 10, 10)], ids=["box", "cube"])  # cubes: all matrices at once
def test_gaussian_filter_matches_scipy_and_is_per_sample(shape):
    x = torch.rand(3, 1, *shape, generator=gen(10), dtype=torch.float64)
    sigma = torch.tensor([[0.3, 1.5, 0.8], [1.2, 0.25, 1.0], [0.6, 0.6, 1.4]], dtype=torch.float64)
    y = augment.gaussian_filter(x, sigma)
    for b in range(3):
        np.testing.assert_allclose(y[b, 0].numpy(), _scipy_gaussian(x[b, 0].numpy(), sigma[b].tolist()), atol=1e-10)
    # tiny σ: the centre tap is 1 to many digits, so the filter is the identity
    torch.testing.assert_close(augment.gaussian_filter(x, torch.full((3, 3), 0.05, dtype=torch.float64)), x)


def test_gaussian_smooth_smooths():
    x = cubes(B=4, S=16)
    y = run(x, augment.plan_smooth(len(x), 1.0, gen(11)))
    inner = (slice(None), slice(None), slice(4, -4), slice(4, -4), slice(4, -4))
    assert (y[inner].flatten(1).std(1) < 0.8 * x[inner].flatten(1).std(1)).all()  # white noise gets smoother


@pytest.mark.parametrize("shape", [(12, 10, 8), (9, 9, 9)], ids=["box", "cube"])
def test_sharpen_formula_against_scipy(shape):
    x = torch.rand(2, 1, *shape, generator=gen(12), dtype=torch.float64)
    s1 = torch.tensor([[0.9, 0.6, 1.0], [0.5, 0.7, 0.8]], dtype=torch.float64)
    s2 = torch.tensor([[0.6, 0.5, 0.7], [0.5, 0.55, 0.6]], dtype=torch.float64)
    alpha = torch.tensor([10.0, 27.0], dtype=torch.float64)
    y = augment.sharpen_filter(x, s1, s2, alpha)
    for b in range(2):
        b1 = _scipy_gaussian(x[b, 0].numpy(), s1[b].tolist())
        b2 = _scipy_gaussian(b1, s2[b].tolist())
        np.testing.assert_allclose(y[b, 0].numpy(), b1 + alpha[b].item() * (b1 - b2), atol=1e-9)


def _np_gibbs(x, alpha):
    """MONAI GibbsNoise written out literally: shifted full FFT, spherical mask around (shape−1)/2, real part."""
    k = np.fft.fftshift(np.fft.fftn(x))
    centre = (np.array(x.shape) - 1) / 2
    grid = np.meshgrid(*[np.arange(n) for n in x.shape], indexing="ij")
    dist = np.sqrt(sum((gr - c) ** 2 for gr, c in zip(grid, centre)))
    mask = dist <= (1 - alpha) * max(x.shape) * np.sqrt(2) / 2
    return np.real(np.fft.ifftn(np.fft.ifftshift(k * mask)))


@pytest.mark.parametrize("shape", [(12, 12, 12), (9, 10, 7)])
def test_gibbs_matches_literal_reference(shape):
    x = torch.rand(3, 1, *shape, generator=gen(13), dtype=torch.float64)
    alpha = torch.tensor([0.0, 0.3, 0.8], dtype=torch.float64)
    y = augment.gibbs_filter(x, alpha)
    for b in range(3):
        np.testing.assert_allclose(y[b, 0].numpy(), _np_gibbs(x[b, 0].numpy(), alpha[b].item()), atol=1e-10)


def test_gibbs_alpha_zero_is_identity_for_band_limited_images():
    # α = 0 keeps the ball of radius L·√2/2; in 3D only the k-space corners beyond it are cut, so an image with no
    # energy there (a smooth one) comes back unchanged
    t = torch.linspace(0, 2 * math.pi, 17, dtype=torch.float64)[:-1]
    smooth = (torch.sin(t).view(-1, 1, 1) + torch.cos(2 * t).view(1, -1, 1) * torch.sin(t).view(1, 1, -1))[None, None]
    y = augment.gibbs_filter(smooth.double(), torch.zeros(1, dtype=torch.float64))
    torch.testing.assert_close(y, smooth.double(), atol=1e-10, rtol=0)
    # while α → 1 keeps only the lowest frequencies: strong blurring
    y = augment.gibbs_filter(cubes(B=1, S=16).double(), torch.tensor([0.9], dtype=torch.float64))
    assert y.std() < 0.3 * cubes(B=1, S=16).std()


# ----------------------------------------------------------------------------------------------------------------
# OneOf decisions and view recipes


def test_one_of_probabilities():
    n = 6000
    c = augment.one_of_choice(n, 3, 0.8, gen(14))
    for option in (0, 1, 2):
        assert abs((c == option).float().mean().item() - 0.8 / 3) < 0.02  # ≈ 0.267 each (σ ≈ 0.006)
    assert abs((c == -1).float().mean().item() - 0.2) < 0.02
    c = augment.one_of_choice(n, 2, 1.0, gen(15))  # global view 1: always smooth or sharpen
    assert (c >= 0).all() and abs((c == 0).float().mean().item() - 0.5) < 0.025
    c = augment.one_of_choice(n, 2, 0.1, gen(16))  # global view 2: 10% in total
    assert abs((c >= 0).float().mean().item() - 0.1) < 0.015


def test_view_recipes_extras():
    x = cubes(B=64, S=8)
    # global view 1 blurs or sharpens every sample: none is a pure geometric/intensity copy of the input
    y = run(x, augment.plan_global_view_1(len(x), gen(17)))
    assert (y.flatten(1).std(1) != x.flatten(1).std(1)).all()
    # local views: geometry keeps the sorted values; intensity OneOf and smooth p=0.5 change some, not all
    y = run(x, augment.plan_local_views(len(x), gen(18)))
    same = [torch.allclose(torch.sort(y[b].flatten()).values, torch.sort(x[b].flatten()).values) for b in range(64)]
    assert 0 < sum(same) < 32  # untouched by intensity ≈ 0.2·0.5 = 10%


# ----------------------------------------------------------------------------------------------------------------
# iBOT masks


@pytest.mark.parametrize("n_crops,grid,upperbound", [(256, (6, 6, 6), 13130), (128, (7, 7, 7), 10490), (6, (2, 3, 4), None)])
def test_make_masks(n_crops, grid, upperbound):
    N = math.prod(grid)
    m = augment.make_masks(n_crops, grid, (0.2, 0.75), 0.5, generator=gen(19))
    masks = m["masks"]
    assert masks.shape == (n_crops, N) and masks.dtype == torch.bool
    counts = masks.sum(1)
    n_masked = int(n_crops * 0.5)
    assert (counts > 0).sum() == n_masked  # exactly int(n·p) crops masked, the rest empty
    # stratified ratios: sorted counts fall in [int(N·p_i), int(N·p_{i+1})]
    probs = np.linspace(0.2, 0.75, n_masked + 1)
    sorted_counts = torch.sort(counts[counts > 0]).values.numpy()
    assert (sorted_counts >= np.floor(N * probs[:-1]) - 1e-9).all() and (sorted_counts <= np.floor(N * probs[1:])).all()
    if upperbound is not None:
        assert m["upperbound"] == upperbound  # the reference's numbers
    assert m["upperbound"] == sum(int(N * p) for p in probs[1:])
    # the flat lists are consistent with the masks
    M = int(counts.sum())
    assert m["n_masked_patches"].tolist() == [M] and m["n_masked_patches"].dtype == torch.long
    assert torch.equal(m["mask_indices_list"], masks.flatten().nonzero().flatten())
    row = m["mask_indices_list"] // N
    torch.testing.assert_close(m["masks_weight"], 1.0 / counts[row].float())
    assert M <= m["upperbound"]
    # the masked rows are shuffled (not all first), positions are spread over the grid
    assert not (counts[:n_masked] > 0).all() or n_crops < 10
    # reproducible
    m2 = augment.make_masks(n_crops, grid, (0.2, 0.75), 0.5, generator=gen(19))
    assert torch.equal(m2["masks"], masks)


# ----------------------------------------------------------------------------------------------------------------
# The assembled batch


def fake_batch(B=2, n_local=3, values=True):
    """Crops of different shapes; crop k of the batch is the constant 10·(k+1), to trace the layout."""
    g = gen(20)
    k = iter(range(1000))
    def crop():
        shape = torch.randint(6, 20, (3,), generator=g).tolist()
        return torch.full((1, *shape), 10.0 * (next(k) + 1))
    return {
        "global_crops": [[crop() for _ in range(B)] for _ in range(2)],
        "local_crops": [[crop() for _ in range(B)] for _ in range(n_local)],
        "index": torch.arange(B),
    }


def test_make_views_layout():
    B, n_local = 2, 3
    batch = fake_batch(B, n_local)
    out = augment.make_views(batch, global_size=16, local_size=8, patch_size=4, generator=gen(21), device="cpu")
    assert out["global_crops"].shape == (2 * B, 1, 16, 16, 16) and out["global_crops"].dtype == torch.float32
    assert out["local_crops"].shape == (n_local * B, 1, 8, 8, 8) and out["local_crops"].dtype == torch.float32
    assert out["masks"].shape == (2 * B, 64) and out["masks"].dtype == torch.bool
    assert out["mask_indices_list"].dtype == torch.long and out["masks_weight"].dtype == torch.float32
    assert isinstance(out["upperbound"], int) and out["n_masked_patches"].shape == (1,)
    # layout: globals [view 0 of images 0..B-1; view 1 of images 0..B-1]; locals local-index major.
    # Constant crops stay ≈ constant at the centre (smoothing/sharpening/noise/Gibbs move it by a few %).
    centre = lambda v: v[:, 0, v.shape[2] // 2, v.shape[3] // 2, v.shape[4] // 2]  # noqa: E731
    expect_g = torch.tensor([10.0 * (k + 1) for k in range(2 * B)])
    expect_l = torch.tensor([10.0 * (k + 1) for k in range(2 * B, 2 * B + n_local * B)])
    torch.testing.assert_close(centre(out["global_crops"]), expect_g, rtol=0.1, atol=0)
    torch.testing.assert_close(centre(out["local_crops"]), expect_l, rtol=0.1, atol=0)
    # reproducible under a seed
    out2 = augment.make_views(fake_batch(B, n_local), 16, 8, 4, gen(21), "cpu")
    assert torch.equal(out["global_crops"], out2["global_crops"]) and torch.equal(out["masks"], out2["masks"])


def test_make_views_equals_resize_then_the_view_recipes():
    # make_views moves each recipe's flips/rot90s into resize_crops' copy: the batch must be exactly what resizing
    # first and then running the whole recipes (same generator draws, in the same order) gives
    B, n_local = 6, 4
    batch = {"global_crops": [[torch.rand(1, 9 + i, 11, 7 + j, generator=gen(i + 10 * j)) for i in range(B)]
                              for j in range(2)],
             "local_crops": [[torch.rand(1, 5 + j, 6, 4 + i % 3, generator=gen(100 + i + 10 * j)) for i in range(B)]
                             for j in range(n_local)],
             "index": torch.arange(B)}
    out = augment.make_views(batch, 12, 6, 4, gen(5), "cpu")
    g = gen(5)
    p1, p2 = augment.plan_global_view_1(B, g), augment.plan_global_view_2(B, g)
    G = augment.resize_crops(batch["global_crops"][0] + batch["global_crops"][1], 12)
    augment.run_plan(G[:B], p1)
    augment.run_plan(G[B:], p2)
    L = augment.resize_crops([c for cs in batch["local_crops"] for c in cs], 6)
    augment.run_plan(L, augment.plan_local_views(B * n_local, g))
    assert torch.equal(out["global_crops"], G) and torch.equal(out["local_crops"], L)
    codes = torch.cat([p1[0][1]["code"], p2[0][1]["code"]])
    assert (codes != 0).sum() >= 3  # the symmetries were exercised


def test_bench_reference_views_shapes():
    import bench  # the benchmark's per-sample pipeline (the reference's structure) on the same plans

    vol = torch.rand(1, 40, 36, 20, generator=gen(22))
    r = bench.reference_views(vol, gen(23), global_size=16, local_size=8, n_local=8)
    assert [v.shape for v in r["global_crops"]] == [(1, 16, 16, 16)] * 2
    assert [v.shape for v in r["local_crops"]] == [(1, 8, 8, 8)] * 8


@pytest.mark.parametrize("plan_fn", [augment.plan_global_view_1, augment.plan_global_view_2, augment.plan_local_views])
def test_views_do_not_depend_on_chunking(plan_fn, monkeypatch):
    # parameters are drawn for the whole batch before the CPU runs it in cache-sized chunks: same views either way
    x = cubes(B=10, S=12)
    whole = recipe(plan_fn)(x, gen(30))  # 12³ crops: the whole batch is one chunk
    monkeypatch.setattr(augment, "CPU_CHUNK_BYTES", 1)  # one sample per chunk
    torch.testing.assert_close(recipe(plan_fn)(x, gen(30)), whole, rtol=1e-5, atol=1e-5)


def test_keep_freed_memory_is_applied_on_glibc_only():
    import platform

    ok = augment.keep_freed_memory()
    assert ok is (platform.system() == "Linux" and platform.libc_ver()[0] == "glibc")


def test_augment_plans_take_the_one_of_choice():
    """linear_probe.py's augment_train=True passes OneOf's choice to each intensity transform (`apply=`): the old
    wrappers had lost that argument and the probe configs that set augment_train crashed with a TypeError."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand(4, 1, 8, 8, 8) * 2 - 1
    apply = torch.tensor([True, False, True, False])
    for plan_fn in (augment.plan_gamma, augment.plan_sharpen, augment.plan_smooth, augment.plan_noise):
        y = augment.run_plan(x.clone(), plan_fn(4, 1.0, g, apply=apply))
        assert torch.equal(y[1], x[1]) and torch.equal(y[3], x[3]), plan_fn.__name__  # not chosen: untouched
        assert not torch.equal(y[0], x[0]), plan_fn.__name__
