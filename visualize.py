"""
visualize.py — what a 3DINO ViT sees in one volume: a PCA of its last-layer patch features and the CLS attention
of its final block, as NIfTI volumes on the input's own grid and a PNG montage of three orthogonal planes.

    python visualize.py --ckpt out/demo/teacher_backbone.pt --image ct.nii.gz              # -> out/vis/
    python visualize.py --ckpt 3dino_vitl_teacher.pth --image brain.nii.gz --resize 112    # reference-style cube
    python visualize.py --ckpt ... --image big_ct.nii.gz --window 192 --out out/vis_ct     # sliding windows

Outputs (every NIfTI has the input file's shape and affine, so it overlays the input in 3D Slicer / ITK-SNAP):
    image.nii.gz    the percentile-normalised input in [-1, 1] (float32)
    pca_rgb.nii.gz  PC2..PC4 of the patch features as RGB, uint8, stored as a 3-component vector image
                    (X, Y, Z, 1, 3) with intent "vector" — the layout ITK-based viewers read as one colour volume
    pca_fg.nii.gz   the foreground mask from PC1 (uint8 0/1)
    attn.nii.gz     final-block attention of the CLS query to each patch, one volume per head (X, Y, Z, nh),
                    raw softmax probabilities (with the CLS->CLS entry, each head sums to 1 over the keys)
    montage.png     rows: axial / coronal / sagittal planes through the foreground centre; columns: image,
                    PCA RGB, attention (mean over heads, or --head k) as a black-red-yellow-white heat map

What the paper (Fig. 1) and the reference's `vis` tool do, and how we differ:
- PCA "fitted per image, first component thresholds the background, next three -> RGB". The reference's notebook
  thresholds PC0 > 0.5 after min-max scaling and says the sign and threshold "must be adjusted per image": a PCA
  component's sign is arbitrary. We fix the sign of PC1 so that it correlates positively with the mean image
  intensity per patch (foreground = brighter than the air / padding at -1); then the reference's rule (midpoint
  of PC1's range, `fg_threshold` = 0.5 after min-max scaling) works without per-image tuning.
- Attention: the reference returns block 4 of 24 although the paper says "final layer"; we take the
  final block (as `model.get_last_self_attention`), computing only the CLS query's row so that large volumes
  do not need the (nh, N, N) matrix.
- Preprocessing as the reference: percentile scaling to [-1, 1], crop to the foreground box enlarged to a
  multiple of the patch size (`--no-crop`: pad the whole volume with -1 instead), optional `--resize` to a cube.
  The whole volume goes through the ViT at once (position embedding interpolated, model.resize_pos_embed); only
  when an axis is longer than `--window` (default 4x the pretraining crop) do we use sliding windows.
- Outputs: one multi-component file per kind instead of 10 (PCA) / 16 (heads) single files, written on the
  input's grid (nearest-neighbour upsampling of patch maps, outside the cropped box = 0) instead of the cropped
  one, plus a PNG written by a ~15-line encoder on zlib — no plotting dependency.

Memory: the maps are held on the input grid before writing (also with --resize); attn.nii.gz of a 512 x 512 x 300
CT with 16 heads is 5 GB of float32, so for such volumes crop or downsample the file first.

Array layout (STYLE.md): volumes (C, H, W, D) after data.load_volume's reorientation to RAS+; patch grids (h, w, d)
flattened in C order. The NIfTI outputs are turned back to the file's own axis order before writing.
"""
import argparse
import contextlib
import os
import struct
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F

import cache
import data
import model as vit_model
import phantoms
from configurator import ConfigError, _excepthook

# -----------------------------------------------------------------------------
# PNG encoder: the few bytes a PNG needs, written by hand so no plotting/imaging package is required
#
# A PNG file is an 8-byte signature followed by chunks, each `length (4 bytes, big-endian) | type (4 ASCII bytes) |
# data | CRC-32 of type+data`. A minimal valid image needs three chunk types:
#   IHDR  width, height, bit depth (8), colour type (0 = grey, 2 = RGB), compression 0, filter method 0, interlace 0
#   IDAT  the zlib stream of the "filtered" scanlines: each row is prefixed with a filter-type byte; we always use
#         type 0 (None, the row's bytes as they are). Smarter filters (Sub, Up, Paeth) compress photos better;
#         our montages are flat, upscaled tiles whose repeats zlib's LZ77 already finds.
#   IEND  empty, marks the end.
# (PNG spec, ISO/IEC 15948 §5 and §11; zlib.crc32 is the CRC the spec prescribes.)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def write_png(path, img: np.ndarray) -> str:
    """Write `img` — uint8 (H, W, 3) RGB or (H, W) grey — as an 8-bit PNG. Returns the path."""
    img = np.asarray(img)
    if img.dtype != np.uint8 or not (img.ndim == 2 or (img.ndim == 3 and img.shape[2] == 3)):
        raise ValueError(f"write_png wants uint8 (H, W) or (H, W, 3), got {img.dtype} {img.shape}")
    H, W = img.shape[:2]
    colour_type = 0 if img.ndim == 2 else 2
    ihdr = struct.pack(">IIBBBBB", W, H, 8, colour_type, 0, 0, 0)
    rows = img.reshape(H, -1)  # (H, W[, 3]) -> (H, W * channels): one scanline per row, RGB interleaved
    raw = np.concatenate([np.zeros((H, 1), np.uint8), rows], axis=1)  # filter byte 0 in front of every scanline
    png = PNG_SIGNATURE + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", zlib.compress(raw.tobytes(), 9)) \
        + _png_chunk(b"IEND", b"")
    Path(path).write_bytes(png)
    return str(path)


# -----------------------------------------------------------------------------
# geometry: input grid <-> the region the ViT sees
#
# The ViT needs every axis to be a multiple of the patch size p. We cut a box [origin, origin + size) out of the
# input, per axis, with size a multiple of p; the box may stick out of the volume (origin < 0 or origin + size >
# shape), and the part outside is filled with -1 (the normalised background). Every output map is first brought
# to the box's grid and then pasted back at `origin`, so the mapping to the input grid is exact.


def plan_box(image: np.ndarray, patch_size: int, crop: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(origin (3,), size (3,)) of the box the ViT sees, for a normalised (H, W, D) image.

    crop: the foreground box (voxels > -1, data.foreground_box) enlarged symmetrically to a multiple of p and
    shifted to stay inside the volume where it fits (the reference's vis preprocessing); else the whole volume,
    padded symmetrically up to a multiple of p."""
    shape = np.array(image.shape)
    if crop:
        box = data.foreground_box(image, threshold=-1.0)
        lo, hi = np.array([s.start for s in box]), np.array([s.stop for s in box])
    else:
        lo, hi = np.zeros(3, int), shape.copy()
    size = -(-(hi - lo) // patch_size) * patch_size  # ceil to a multiple of p
    origin = lo - (size - (hi - lo)) // 2  # grow on both sides
    # inside the volume where the box fits; centred on it (padding both ends) where it does not
    fits = size <= shape
    origin = np.where(fits, np.clip(origin, 0, shape - size), -((size - shape) // 2))
    return origin.astype(int), size.astype(int)


def extract_box(image: np.ndarray, origin, size, fill: float = -1.0) -> np.ndarray:
    """image[origin : origin + size] over the last 3 axes, with `fill` where the box leaves the volume."""
    out = np.full(image.shape[:-3] + tuple(size), fill, dtype=image.dtype)
    in_vol, in_box = _overlap(image.shape[-3:], origin, size)
    out[(..., *in_box)] = image[(..., *in_vol)]
    return out


def paste_box(region: np.ndarray, origin, shape, fill: float = 0.0) -> np.ndarray:
    """Inverse of extract_box: region (*size, ...) placed at `origin` in an array (*shape, ...) of `fill`."""
    out = np.full(tuple(shape) + region.shape[3:], fill, dtype=region.dtype)
    in_vol, in_box = _overlap(shape, origin, region.shape[:3])
    out[in_vol] = region[in_box]
    return out


def _overlap(shape, origin, size):
    """Slices (in the volume, in the box) of the part of the box [origin, origin + size) inside [0, shape)."""
    in_vol, in_box = [], []
    for n, o, s in zip(shape, origin, size):
        a, b = max(int(o), 0), min(int(o) + int(s), int(n))
        in_vol.append(slice(a, b))
        in_box.append(slice(a - int(o), b - int(o)))
    return tuple(in_vol), tuple(in_box)


def upsample_nearest(patch_map: np.ndarray, size) -> np.ndarray:
    """(h, w, d, ...) patch-level map -> (size[0], size[1], size[2], ...) by nearest neighbour: voxel i of an axis
    takes patch floor((i + 0.5) * h / size). For size = h * p that is i // p (each patch becomes a p^3 block);
    after a --resize it is the patch whose resized extent holds the voxel centre."""
    idx = [((np.arange(s) + 0.5) * n / s).astype(int) for n, s in zip(patch_map.shape[:3], size)]
    return patch_map[np.ix_(*idx)]


# -----------------------------------------------------------------------------
# the model pass: last-layer patch features and the final block's CLS attention, in one forward


@torch.no_grad()
def features_and_attention(model: vit_model.ViT3D, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (1, 1, H, W, D) -> (patch features (N, E), CLS attention (nh, 1 + N)), both float32.

    features  = forward_features(x)["x_norm_patchtokens"]: the final LayerNorm'd patch tokens (what the
                reference's PCA uses);
    attention = get_last_self_attention(x)[0, :, 0]: softmax(q_cls k^T / sqrt(hd)) of the final block, key 0 is
                the CLS token itself, so each row sums to 1 over its 1 + N keys.
    One pass instead of two, and only the CLS query's row: the full (nh, 1+N, 1+N) matrix of a 30^3-patch volume
    would take 30^6 x 4 bytes = 2.9 GB per head. tests/test_visualize.py checks both against the model's methods."""
    tokens = model.prepare_tokens_with_masks(x)  # (1, 1 + N, E), position embedding interpolated to the grid
    tokens = model._run_blocks(tokens, model.blocks[:-1])
    last = model.blocks[-1]
    q, k, _ = last.attn._qkv(last.norm1(tokens))  # 3 x (1, nh, 1 + N, hd), the block's own head split
    scale = q.shape[-1] ** -0.5
    attn = ((q[:, :, :1].float() * scale) @ k.float().transpose(-2, -1)).softmax(dim=-1)  # (1, nh, 1, 1 + N)
    feats = model.norm(last(tokens))[0, 1:]  # (N, E)
    return feats.float(), attn[0, :, 0]


def window_starts(n: int, win: int) -> list[int]:
    """Starts of the windows along one axis of length n: [0] if n <= win, else non-overlapping windows of size win
    with the last one moved back to end at n (as MONAI's sliding_window_inference does at overlap 0), so every
    window has the same size and sees the same position-embedding grid."""
    if n <= win:
        return [0]
    return list(range(0, n - win, win)) + [n - win]


@torch.no_grad()
def infer(model: vit_model.ViT3D, x: np.ndarray, window: int, device="cpu") -> tuple[np.ndarray, np.ndarray]:
    """x (H, W, D) normalised, every axis a multiple of p -> (features (h, w, d, E), attention (nh, h, w, d)).

    Whole volume in one pass if no axis exceeds `window`; otherwise sliding windows of `window` voxels per long
    axis, stitched at patch level (where the last window overlaps the one before, its values win). Attention is
    then per window: each window has its own CLS query, so the stitched map sums to 1 within each window, not over
    the volume. The PCA is fitted on all stitched features together (one image -> one PCA, as the paper)."""
    p = model.patch_size
    window = max(p, window // p * p)
    device = torch.device(device)
    grid = [n // p for n in x.shape]
    feats = np.zeros((*grid, model.embed_dim), np.float32)
    attn = np.zeros((model.num_heads, *grid), np.float32)
    xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(device)
    # bf16 on GPU as the reference's fp16 autocast (less memory for big volumes); CPU stays fp32
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    for a in window_starts(x.shape[0], window):
        for b in window_starts(x.shape[1], window):
            for c in window_starts(x.shape[2], window):
                crop = xt[a:a + window, b:b + window, c:c + window]
                with amp:
                    f, at = features_and_attention(model, crop[None, None])
                g = [s // p for s in crop.shape]  # this window's patch grid (h', w', d')
                sl = (slice(a // p, a // p + g[0]), slice(b // p, b // p + g[1]), slice(c // p, c // p + g[2]))
                feats[sl] = f.reshape(*g, -1).cpu().numpy()  # (N', E) -> (h', w', d', E), C order
                attn[(slice(None), *sl)] = at[:, 1:].reshape(-1, *g).cpu().numpy()  # (nh, N') -> (nh, h', w', d')
    return feats, attn


# -----------------------------------------------------------------------------
# PCA of one image's patch features


def pca_rgb(feats: np.ndarray, intensity: np.ndarray, fg_threshold: float = 0.5, k: int = 4) -> dict:
    """Per-image PCA as in the paper's Fig. 1: feats (N, E), intensity (N,) mean image value per patch ->
    {"scores" (N, k) PC1..PCk, "fg" (N,) bool, "rgb" (N, 3) float in [0, 1]}.

    scores = (F - mean(F)) V_k with V_k the top-k eigenvectors of the feature covariance (exact, deterministic;
    sklearn's PCA in the reference gives the same subspace). Signs: PC1 is flipped so that it correlates
    positively with the patch intensity (bright = foreground; the padding and air are -1); PC2..PCk so that their
    largest-magnitude score is positive, which only makes the colours reproducible.
    fg = minmax(PC1) > fg_threshold (0.5: the midpoint of PC1's range, the reference's rule; -1 keeps all).
    rgb = PC2..PC4 each min-max scaled over the foreground patches (so the background does not eat the colour
    range), background set to 0 (black)."""
    X = torch.from_numpy(np.asarray(feats, np.float32))
    X = X - X.mean(0)
    cov = (X.T @ X).double() / max(len(X) - 1, 1)  # (E, E)
    evecs = torch.linalg.eigh(cov).eigenvectors.flip(-1)[:, : min(k, X.shape[1])]  # largest eigenvalue first
    scores = (X.double() @ evecs).numpy()  # (N, k')
    if scores.shape[1] < k:  # a model narrower than k channels: the missing components are 0
        scores = np.pad(scores, ((0, 0), (0, k - scores.shape[1])))
    for j in range(1, k):
        if scores[np.abs(scores[:, j]).argmax(), j] < 0:
            scores[:, j] *= -1
    inten = np.asarray(intensity, np.float64)
    pc1 = scores[:, 0]
    if np.sum((pc1 - pc1.mean()) * (inten - inten.mean())) < 0:
        scores[:, 0] = pc1 = -pc1
    span = pc1.max() - pc1.min()
    fg = (pc1 - pc1.min()) / span > fg_threshold if span > 0 else np.ones(len(pc1), bool)
    rgb = np.zeros((len(pc1), 3))
    if fg.any():
        c = scores[fg][:, 1:4]
        rgb[fg] = (c - c.min(0)) / np.maximum(c.max(0) - c.min(0), 1e-12)
    return {"scores": scores.astype(np.float32), "fg": fg, "rgb": rgb.astype(np.float32)}


# -----------------------------------------------------------------------------
# one volume: preprocessing -> model -> PCA/attention -> maps on the input grid


def analyse(model: vit_model.ViT3D, image: np.ndarray, crop: bool = True, resize: int = 0, window: int = 0,
            fg_threshold: float = 0.5, device="cpu") -> dict:
    """image (H, W, D) normalised to [-1, 1] -> maps on the same (H, W, D) grid:
    {"rgb" (H, W, D, 3) uint8, "fg" (H, W, D) bool, "attn" (H, W, D, nh) float32 raw probabilities, and the
    patch-level "patch_fg" (h, w, d), "patch_attn" (nh, h, w, d), "origin", "size", "model_shape"}.
    Outside the box the ViT saw, every map is 0. window 0 = 4x the pretraining crop (model.args["img_size"])."""
    p = model.patch_size
    window = window or 4 * model.args.get("img_size", 96)
    origin, size = plan_box(image, p, crop)
    x = extract_box(image, origin, size)  # (sx, sy, sz), each a multiple of p
    if resize:
        if resize % p:
            raise ConfigError(f"--resize {resize} is not a multiple of the patch size {p}")
        # trilinear to a cube, like the reference's --input-type resize (96^3); maps come back by nearest neighbour
        x = F.interpolate(torch.from_numpy(x)[None, None], size=(resize,) * 3, mode="trilinear",
                          align_corners=False)[0, 0].numpy()
    feats, attn = infer(model, x, window, device)  # (h, w, d, E), (nh, h, w, d)
    grid = feats.shape[:3]
    # mean image value per patch, for PC1's sign: (hp, wp, dp) -> (h, p, w, p, d, p) -> (h, w, d)
    intensity = x.reshape(grid[0], p, grid[1], p, grid[2], p).mean((1, 3, 5))
    pca = pca_rgb(feats.reshape(-1, feats.shape[-1]), intensity.reshape(-1), fg_threshold)

    def to_input(patch_map):  # (h, w, d, ...) -> box grid (nearest) -> input grid (0 outside the box)
        return paste_box(upsample_nearest(patch_map, size), origin, image.shape, fill=0)

    rgb = np.rint(pca["rgb"] * 255).astype(np.uint8).reshape(*grid, 3)  # (N, 3) -> (h, w, d, 3)
    fg = pca["fg"].reshape(grid)
    return {"rgb": to_input(rgb), "fg": to_input(fg), "attn": to_input(np.moveaxis(attn, 0, -1)),
            "patch_fg": fg, "patch_attn": attn, "origin": origin, "size": size, "model_shape": x.shape}


# -----------------------------------------------------------------------------
# the montage: three orthogonal planes x (image, PCA, attention), nearest-neighbour upscaled


def heat(t: np.ndarray) -> np.ndarray:
    """The "hot" colour map: t in [0, 1] -> uint8 RGB going black -> red -> yellow -> white (each channel ramps
    up over one third of the range, red first), readable in grey print as well."""
    t = np.clip(np.asarray(t, np.float64), 0, 1)[..., None]
    return np.rint(np.clip(3 * t - np.array([0.0, 1.0, 2.0]), 0, 1) * 255).astype(np.uint8)


def _tile(vol: np.ndarray, axis: int, index: int, spacing, mm_per_px: float) -> np.ndarray:
    """The plane `index` across `axis` of a (H, W, D, ...) RAS+ volume as a display tile.

    Radiological convention: the plane is transposed and flipped on both axes, which puts anterior (axial) or
    superior (coronal, sagittal) at the top, the patient's right on the viewer's left, and anterior on the left
    of the sagittal plane. Then resampled (nearest) to `mm_per_px`, so anisotropic voxels keep their aspect."""
    plane = np.take(vol, index, axis=axis)  # (a, b, ...) over the two remaining axes, in order
    plane = np.swapaxes(plane, 0, 1)[::-1, ::-1]  # (a, b, ...) -> (b, a, ...): rows b (flipped), columns a
    sp = [s for i, s in enumerate(spacing) if i != axis][::-1]  # (rows, columns) spacing
    out = [max(1, round(n * s / mm_per_px)) for n, s in zip(plane.shape[:2], sp)]
    idx = [((np.arange(o) + 0.5) * n / o).astype(int) for n, o in zip(plane.shape[:2], out)]
    return plane[np.ix_(*idx)]


# a 3x5 pixel font for the montage's titles (row-major bits; only the characters the titles use)
_GLYPHS = {"A": "010101111101101", "C": "011100100100011", "E": "111100110100111", "G": "011100101101011",
           "I": "111010010010111", "L": "100100100100111", "M": "101111111101101", "N": "110101101101101",
           "O": "010101101101010", "P": "110101110100100", "R": "110101110101101", "S": "011100010001110",
           "T": "111010010010010", "X": "101101010101101", "0": "111101101101111", "1": "010110010010111",
           " ": "000000000000000"}


def text(s: str, scale: int = 2) -> np.ndarray:
    """Black text on white, uint8 (5*scale, 4*scale*len(s) - scale, 3)."""
    cols = []
    for ch in s.upper():
        g = np.array([int(b) for b in _GLYPHS[ch]], np.uint8).reshape(5, 3)
        cols += [g, np.zeros((5, 1), np.uint8)]
    bits = np.concatenate(cols[:-1], axis=1).repeat(scale, 0).repeat(scale, 1)
    return np.repeat((255 * (1 - bits))[..., None], 3, -1).astype(np.uint8)


def _place(canvas, img, y, x):
    h, w = min(img.shape[0], canvas.shape[0] - y), min(img.shape[1], canvas.shape[1] - x)
    canvas[y:y + h, x:x + w] = img[:h, :w]


def montage(image: np.ndarray, rgb: np.ndarray, attn_map: np.ndarray, spacing=(1, 1, 1), center=None,
            tile: int = 160, gutter: int = 2, return_boxes: bool = False):
    """uint8 (rows, cols, 3): rows axial / coronal / sagittal, columns image (grey), PCA RGB, attention (heat),
    with row and column titles and a 0..1 colour bar under the attention column.

    image (H, W, D) in [-1, 1], rgb (H, W, D, 3) uint8, attn_map (H, W, D) in [0, 1]; planes through `center`
    (default: the volume centre); the longest physical side of the volume gets `tile` pixels. Every cell of a
    column has the same width (a plane narrower than the widest is centred in it), so columns line up for
    non-cubic volumes. return_boxes: also {(row, col): (y, x, height, width)} of every tile in the picture."""
    spacing = np.asarray(spacing, np.float64)
    center = np.array(image.shape) // 2 if center is None else np.asarray(center, int)
    mm_per_px = float((np.array(image.shape) * spacing).max()) / tile
    # colour maps per column, applied to the cut planes only (a whole CT through heat() would take GBs)
    colour = [lambda t: np.repeat(np.rint((np.clip(t, -1, 1) + 1) * 127.5).astype(np.uint8)[..., None], 3, -1),
              lambda t: t, heat]
    planes = [[f(_tile(v, axis, int(center[axis]), spacing, mm_per_px)) for v, f in zip((image, rgb, attn_map), colour)]
              for axis in (2, 1, 0)]  # RAS+: axial = fixed D (S), coronal = fixed W (A), sagittal = fixed H (R)
    scale = 2 if tile >= 100 else 1
    row_titles = [text(t, scale) for t in ("axial", "coronal", "sagittal")]
    col_titles = [text(t, scale) for t in ("image", "pca", "attention")]
    cell_w = max(max(p[0].shape[1] for p in planes), max(t.shape[1] for t in col_titles))
    left = max(t.shape[1] for t in row_titles) + 2 * gutter
    top = col_titles[0].shape[0] + 2 * gutter
    bar_h = 3 * scale
    heights = [p[0].shape[0] for p in planes]
    H = top + sum(heights) + gutter * (len(planes) + 1) + bar_h + 2 * gutter + 5 * scale + gutter
    Wd = left + 3 * (cell_w + gutter) + gutter
    pic = np.full((H, Wd, 3), 255, np.uint8)
    boxes = {}
    for c, t in enumerate(col_titles):
        _place(pic, t, gutter, left + gutter + c * (cell_w + gutter) + (cell_w - t.shape[1]) // 2)
    y = top + gutter
    for r, (tiles, t) in enumerate(zip(planes, row_titles)):
        _place(pic, t, y + (heights[r] - t.shape[0]) // 2, gutter)
        for c, tl in enumerate(tiles):
            x = left + gutter + c * (cell_w + gutter) + (cell_w - tl.shape[1]) // 2
            _place(pic, tl, y, x)
            boxes[(r, c)] = (y, x, tl.shape[0], tl.shape[1])
        y += heights[r] + gutter
    x0 = left + gutter + 2 * (cell_w + gutter)  # the colour bar: attention 0 (left) .. 1 (right)
    pic[y + gutter:y + gutter + bar_h, x0:x0 + cell_w] = heat(np.linspace(0, 1, cell_w))[None]
    _place(pic, text("0", scale), y + 2 * gutter + bar_h, x0)
    _place(pic, text("1", scale), y + 2 * gutter + bar_h, x0 + cell_w - 3 * scale)
    return (pic, boxes) if return_boxes else pic


# -----------------------------------------------------------------------------
# files: read one volume, write the maps on the file's own grid


def save_nifti(path, arr: np.ndarray, affine: np.ndarray, back=None, vector: bool = False) -> str:
    """arr (H, W, D, ...) on the RAS+ grid -> NIfTI on the file's grid. vector: (H, W, D, K) is stored as
    (X, Y, Z, 1, K) with intent "vector", ITK's layout for multi-component voxels (3 x uint8 shows as colour)."""
    if back is not None:
        arr = nib.apply_orientation(arr, back)  # trailing (component) axes are kept
    if vector:
        arr = arr[:, :, :, None, :]  # (X, Y, Z, K) -> (X, Y, Z, 1, K): NIfTI's 5th axis holds vector components
    img = nib.Nifti1Image(np.ascontiguousarray(arr), affine)
    img.header.set_xyzt_units("mm")
    if vector:
        img.header.set_intent("vector")
    nib.save(img, str(path))
    return str(path)


def run(ckpt, image, out_dir, head: int = -1, window: int = 0, resize: int = 0, crop: bool = True, frame: int = 0,
        fg_threshold: float = 0.5, device="cpu", tile: int = 160) -> dict:
    """The whole tool: checkpoint + volume file -> NIfTI maps and montage.png in out_dir. Returns
    {"files": {name: path}, "montage": path, **analyse's maps}. head: the attention head in the montage (-1:
    the mean over heads). ckpt: our teacher export / training checkpoint or a reference 3DINO checkpoint."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = vit_model.vit_from_checkpoint(ckpt).to(device).eval()
    x, spacing, affine = data.load_volume(image)  # (C, H, W, D) RAS+
    if not 0 <= frame < x.shape[0]:
        raise data.VolumeError(f"{image}: frame {frame} out of range, the volume has {x.shape[0]}")
    if not np.isfinite(x[frame]).any():
        raise data.VolumeError(f"{image}: frame {frame} has no finite voxel (all NaN/Inf): nothing to visualise")
    if data.is_constant(data.fill_nonfinite(x[frame])):
        raise data.VolumeError(f"{image}: frame {frame} is constant (one value everywhere): nothing to visualise")
    img = data.normalize_percentile(data.fill_nonfinite(x[frame]))  # (H, W, D) in [-1, 1]
    if not -1 <= head < model.num_heads:
        raise ConfigError(f"--head {head}: the model has {model.num_heads} heads (-1 = mean)")
    res = analyse(model, img, crop, resize, window, fg_threshold, device)

    back, file_affine = data.file_grid(image, affine, img.shape)
    files = {
        "image": save_nifti(out_dir / "image.nii.gz", img, file_affine, back),
        "pca_rgb": save_nifti(out_dir / "pca_rgb.nii.gz", res["rgb"], file_affine, back, vector=True),
        "pca_fg": save_nifti(out_dir / "pca_fg.nii.gz", res["fg"].astype(np.uint8), file_affine, back),
        "attn": save_nifti(out_dir / "attn.nii.gz", res["attn"].astype(np.float32), file_affine, back),
    }
    # montage: attention min-max scaled over the patches the ViT saw, for display only (the NIfTI keeps the
    # probabilities); outside the box it stays 0 = black
    pa = res["patch_attn"].mean(0) if head < 0 else res["patch_attn"][head]  # (h, w, d)
    a = res["attn"].mean(-1) if head < 0 else res["attn"][..., head]  # (H, W, D)
    a = np.clip((a - pa.min()) / max(float(pa.max() - pa.min()), 1e-12), 0, 1)
    box = data.foreground_box(img)
    center = [(s.start + s.stop - 1) // 2 for s in box]  # planes through the foreground's centre
    picture = montage(img, res["rgb"], a, spacing, center, tile)
    png = write_png(out_dir / "montage.png", picture)
    return {"files": files, "montage": png, **res}


def first_volume(source) -> str:
    """The first volume of a data source: a file; a prepared cache folder (its index.json's first .npy); or
    anything data.pretrain_sources reads (datalist JSON, folder, glob)."""
    source = str(source)
    if os.path.isfile(source) and not source.lower().endswith(".json"):
        return source
    if cache.is_cache(source):
        entries = cache.load_index(source)["entries"]
        if entries:
            return str(Path(source) / entries[0]["file"])
    items = data.pretrain_sources(source)
    if not items:
        raise data.VolumeError(f"{source}: no volumes found")
    return items[0]["image"]


def demo_montage(ckpt_path, data_source, out_dir) -> str:
    """What pretrain.py calls at the end of a run: visualise one volume (the first of `data_source`, or a
    synthetic phantom written to out_dir/vis/input.nii.gz when None) into out_dir/vis/. Returns the PNG's path."""
    vis_dir = Path(out_dir) / "vis"
    vis_dir.mkdir(parents=True, exist_ok=True)
    if data_source:
        image = first_volume(data_source)
    else:
        phantom = phantoms.SyntheticVolumes(1, (64, 64, 64), seed=0)[0]["image"][0].numpy()  # (H, W, D)
        image = str(vis_dir / "input.nii.gz")
        nib.save(nib.Nifti1Image(phantom, np.eye(4)), image)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return run(ckpt_path, image, vis_dir, device=device)["montage"]


# -----------------------------------------------------------------------------


def main(argv=None):
    ap = argparse.ArgumentParser(description="PCA / attention maps of a 3D ViT for one volume (NIfTI + PNG)")
    ap.add_argument("--ckpt", required=True, help="teacher_backbone.pt, ckpt.pt or a reference 3DINO checkpoint")
    ap.add_argument("--image", required=True, help="a volume (.nii, .nii.gz, .mgz, .npy), or a folder/cache/datalist "
                                                   "(its first volume is used)")
    ap.add_argument("--out", default="out/vis", help="output folder")
    ap.add_argument("--head", type=int, default=-1, help="attention head shown in the montage; -1 = mean of heads")
    ap.add_argument("--window", type=int, default=0, help="sliding windows for axes longer than this (voxels); "
                                                          "0 = 4x the pretraining crop. The reference uses 96")
    ap.add_argument("--resize", type=int, default=0, help="resize the cropped box to this cube (reference: 96); 0 = no")
    ap.add_argument("--crop", action=argparse.BooleanOptionalAction, default=True,
                    help="crop to the foreground box (reference); --no-crop pads the whole volume instead")
    ap.add_argument("--frame", type=int, default=0, help="time point / channel of a 4D volume")
    ap.add_argument("--fg_threshold", type=float, default=0.5,
                    help="foreground = min-max scaled PC1 above this (0.5 = midpoint; -1 keeps every patch)")
    ap.add_argument("--tile", type=int, default=160, help="montage tile size in pixels (longest side)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads; 0 = torch's default (all cores)")
    args = ap.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    image = first_volume(args.image)
    res = run(args.ckpt, image, args.out, args.head, args.window, args.resize, args.crop, args.frame,
              args.fg_threshold, args.device, args.tile)
    print(f"{image}: ViT input {tuple(res['model_shape'])} from box origin {res['origin'].tolist()} size "
          f"{res['size'].tolist()}; {int(res['patch_fg'].sum())}/{res['patch_fg'].size} patches foreground")
    for name, path in res["files"].items():
        print(f"wrote {path}")
    print(f"wrote {res['montage']}")
    return res


if __name__ == "__main__":
    import sys

    sys.excepthook = _excepthook  # input errors (bad volume, bad option) print their message, no traceback
    main()
