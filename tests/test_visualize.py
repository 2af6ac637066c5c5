"""visualize.py: the PNG encoder, the input-grid bookkeeping, the one-pass features/attention, PCA, the CLI outputs.

Everything runs a tiny random ViT (img 16, patch 8, width 32, depth 2, 2 heads) on volumes of a few thousand
voxels, so the file takes seconds. A random ViT's maps are meaningless pictures; what is tested is the plumbing
that every checkpoint goes through: shapes, affines, orientation, probabilities, file formats.
"""
import struct
import zlib

import nibabel as nib
import numpy as np
import pytest
import torch

import data
import model
import visualize
from conftest import DATA, requires_shared


def read_png(path) -> np.ndarray:
    """An independent minimal PNG decoder (8-bit grey/RGB, filter type 0 only, no interlace): it checks the
    signature, every chunk's CRC and the chunk order, inflates the IDAT stream with zlib and strips the filter
    bytes. Kept here, not in visualize.py, so the encoder is not tested against its own mirror image."""
    buf = open(path, "rb").read()
    assert buf[:8] == b"\x89PNG\r\n\x1a\n", "bad signature"
    pos, chunks = 8, []
    while pos < len(buf):
        (n,) = struct.unpack(">I", buf[pos:pos + 4])
        kind, payload = buf[pos + 4:pos + 8], buf[pos + 8:pos + 8 + n]
        (crc,) = struct.unpack(">I", buf[pos + 8 + n:pos + 12 + n])
        assert crc == zlib.crc32(kind + payload), f"bad CRC in {kind}"
        chunks.append((kind, payload))
        pos += 12 + n
    assert pos == len(buf), "trailing bytes"
    assert chunks[0][0] == b"IHDR" and chunks[-1] == (b"IEND", b"")
    W, H, depth, colour, comp, filt, interlace = struct.unpack(">IIBBBBB", chunks[0][1])
    assert (depth, comp, filt, interlace) == (8, 0, 0, 0) and colour in (0, 2)
    channels = 3 if colour == 2 else 1
    raw = zlib.decompress(b"".join(p for k, p in chunks if k == b"IDAT"))
    rows = np.frombuffer(raw, np.uint8).reshape(H, 1 + W * channels)
    assert (rows[:, 0] == 0).all(), "only filter type 0 is expected"
    img = rows[:, 1:].reshape(H, W, channels)
    return img[..., 0] if channels == 1 else img


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random ViT saved as a teacher export (the format pretrain.py writes) -> (model, path)."""
    torch.manual_seed(0)
    m = model.ViT3D(img_size=16, patch_size=8, embed_dim=32, depth=2, num_heads=2).eval()
    path = tmp_path_factory.mktemp("ckpt") / "teacher_backbone.pt"
    torch.save({"teacher": {f"backbone.{k}": v for k, v in m.state_dict().items()}, "model_args": m.args}, path)
    return m, path


def _volume(tmp_path, shape=(19, 13, 22)):
    """A non-cubic, non-multiple-of-8 NIfTI with a bright blob on a dark background and an affine that permutes,
    flips, scales and shifts the axes (so its RAS+ canonical grid differs from the file's grid)."""
    g = np.random.default_rng(0)
    idx = np.indices(shape).astype(np.float32)
    c = np.array(shape, np.float32)[:, None, None, None] * np.array([0.6, 0.4, 0.5])[:, None, None, None]
    blob = (((idx - c) / 5.0) ** 2).sum(0) < 1
    x = np.where(blob, 100.0, 0.0) + 10 * g.random(shape)
    x[:, :, :3] = 0  # a few exactly-dark slices, so the foreground crop has something to remove
    affine = np.array([[0.0, 0.0, -1.5, 40.0],  # file axis 2 -> -x (L), axis 1 -> +z, axis 0 -> -y: a "PSL" file
                       [-0.8, 0.0, 0.0, 10.0],
                       [0.0, 2.0, 0.0, -30.0],
                       [0.0, 0.0, 0.0, 1.0]])
    path = tmp_path / "vol.nii.gz"
    nib.save(nib.Nifti1Image(x.astype(np.float32), affine), str(path))
    return path, x.astype(np.float32), affine


# -----------------------------------------------------------------------------
# PNG


def test_png_roundtrip(tmp_path):
    g = np.random.default_rng(1)
    rgb = g.integers(0, 256, (7, 5, 3), dtype=np.uint8)  # non-square, odd: catches W/H or row-stride mix-ups
    grey = g.integers(0, 256, (3, 11), dtype=np.uint8)
    assert np.array_equal(read_png(visualize.write_png(tmp_path / "rgb.png", rgb)), rgb)
    assert np.array_equal(read_png(visualize.write_png(tmp_path / "grey.png", grey)), grey)
    with pytest.raises(ValueError):
        visualize.write_png(tmp_path / "bad.png", rgb.astype(np.float32))


# -----------------------------------------------------------------------------
# input grid <-> box the ViT sees


def test_box_geometry_roundtrip():
    g = np.random.default_rng(2)
    img = -np.ones((19, 13, 22), np.float32)
    img[5:12, 2:13, 8:15] = g.random((7, 11, 7))  # foreground box (7, 11, 7), touching the W border
    for crop in (True, False):
        origin, size = visualize.plan_box(img, 8, crop)
        assert (size % 8 == 0).all()
        region = visualize.extract_box(img, origin, size)
        assert region.shape == tuple(size) and region.min() == -1.0
        # every foreground voxel is inside the box, and pasting the box back restores it exactly
        back = visualize.paste_box(region, origin, img.shape, fill=-1)
        assert np.array_equal(back, img)
        # patch maps: voxel v of the input grid gets the patch (v - origin) // 8
        grid = size // 8
        ids = np.arange(np.prod(grid)).reshape(grid)
        full = visualize.paste_box(visualize.upsample_nearest(ids, size), origin, img.shape, fill=-1)
        v = np.array([10, 7, 14])
        assert full[tuple(v)] == ids[tuple((v - origin) // 8)]
    assert list(visualize.plan_box(img, 8, True)[1]) == [8, 16, 8]  # cropped: 7 -> 8, 11 -> 16, 7 -> 8
    assert list(visualize.plan_box(img, 8, False)[1]) == [24, 16, 24]  # padded whole volume


def test_window_starts():
    assert visualize.window_starts(16, 32) == [0]
    assert visualize.window_starts(32, 16) == [0, 16]
    assert visualize.window_starts(40, 16) == [0, 16, 24]  # last window moved back to end at the border


# -----------------------------------------------------------------------------
# model pass


def test_features_and_attention_match_model(tiny):
    m, _ = tiny
    x = torch.randn(1, 1, 16, 24, 8)  # a non-native grid: the position embedding is interpolated
    feats, attn = visualize.features_and_attention(m, x)
    assert torch.allclose(feats, m.forward_features(x)["x_norm_patchtokens"][0], atol=1e-5)
    assert torch.allclose(attn, m.get_last_self_attention(x)[0, :, 0], atol=1e-6)
    assert attn.shape == (2, 1 + 2 * 3 * 1)
    assert torch.allclose(attn.sum(-1), torch.ones(2), atol=1e-6)  # a probability over the 1 + N keys per head


def test_sliding_windows_stitch(tiny):
    m, _ = tiny
    x = np.random.default_rng(3).standard_normal((16, 24, 8)).astype(np.float32)
    whole_f, whole_a = visualize.infer(m, x, window=64)
    f_direct, a_direct = visualize.features_and_attention(m, torch.from_numpy(x)[None, None])
    assert np.allclose(whole_f, f_direct.reshape(2, 3, 1, 32).numpy(), atol=1e-5)
    # windows of 16 along W (24 -> starts 0, 8): patches 0 from the first window, 1-2 from the second
    f, a = visualize.infer(m, x, window=16)
    f2, a2 = visualize.features_and_attention(m, torch.from_numpy(x[:, 8:24])[None, None])
    assert np.allclose(f[:, 1:], f2.reshape(2, 2, 1, 32).numpy(), atol=1e-5)
    assert np.allclose(a[:, :, 1:], a2[:, 1:].reshape(2, 2, 2, 1).numpy(), atol=1e-6)
    f1, _ = visualize.features_and_attention(m, torch.from_numpy(x[:, :16])[None, None])
    assert np.allclose(f[:, :1], f1.reshape(2, 2, 1, 32).numpy()[:, :1], atol=1e-5)
    assert not np.allclose(f, whole_f, atol=1e-3)  # windows really ran on their own (other context)


# -----------------------------------------------------------------------------
# PCA


def test_pca_sign_and_foreground():
    """Features with a two-cluster structure along a random direction: the bright patches must come out as the
    foreground whatever sign the eigen-solver picks (we flip the features to force both cases)."""
    g = np.random.default_rng(4)
    bright = g.random(200) < 0.3
    direction = g.standard_normal(16)
    feats = np.outer(np.where(bright, 2.0, -1.0), direction) + 0.1 * g.standard_normal((200, 16))
    intensity = np.where(bright, 0.5, -1.0) + 0.05 * g.standard_normal(200)
    for sign in (1.0, -1.0):
        out = visualize.pca_rgb(sign * feats, intensity)
        assert np.array_equal(out["fg"], bright)
        assert out["scores"].shape == (200, 4) and np.corrcoef(out["scores"][:, 0], intensity)[0, 1] > 0.9
        assert (out["rgb"][~bright] == 0).all()  # background painted black
        assert np.allclose(out["rgb"][bright].min(0), 0) and np.allclose(out["rgb"][bright].max(0), 1)
    assert visualize.pca_rgb(feats, intensity, fg_threshold=-1)["fg"].all()


# -----------------------------------------------------------------------------
# montage


def test_montage_orientation_and_size():
    """RAS+ volume with one bright voxel at the right-anterior-superior corner: in the axial tile (top row) it must
    appear top-left (anterior up, patient's right on the viewer's left); anisotropic spacing keeps the aspect."""
    img = -np.ones((10, 12, 8), np.float32)
    img[9, 11, 4] = 1.0  # max R, max A, mid S
    rgb = np.zeros(img.shape + (3,), np.uint8)
    pic, boxes = visualize.montage(img, rgb, np.zeros(img.shape), spacing=(1.0, 1.0, 3.0), center=(5, 6, 4),
                                   tile=48, return_boxes=True)
    assert pic.dtype == np.uint8 and pic.ndim == 3
    assert (pic[:2] == 255).all() and (pic[:, :2] == 255).all()  # white gutters
    # axial tile: 12 A-rows x 10 R-columns at 48 / 24 mm = 2 px per mm -> 24 x 20 px, voxel at the top-left 2x2
    y, x, h, w = boxes[(0, 0)]
    assert (h, w) == (24, 20)
    tile = pic[y:y + h, x:x + w, 0]
    assert (tile[:2, :2] == 255).all() and (tile[2:, :] == 0).all() and (tile[:, 2:] == 0).all()
    # coronal row: 8 S-rows of 3 mm -> 48 px tall, 20 wide; sagittal 48 x 24 (A-P across)
    assert boxes[(1, 0)][2:] == (48, 20) and boxes[(2, 0)][2:] == (48, 24)
    y, x, h, w = boxes[(1, 0)]
    assert (pic[y:y + h, x:x + w, 0] == 0).all() and pic[y + h, x, 0] == 255
    # columns line up: every cell of a column has the same centre, whatever the plane's width
    for c in range(3):
        centres = {boxes[(r, c)][1] + boxes[(r, c)][3] / 2 for r in range(3)}
        assert max(centres) - min(centres) <= 0.5, centres
    # titles (black pixels above the first row, left of the tiles) and the colour bar under the attention column
    assert (pic[:boxes[(0, 0)][0], :, 0] == 0).any() and (pic[:, :boxes[(2, 0)][1], 0] == 0).any()
    bar = pic[boxes[(2, 2)][0] + boxes[(2, 2)][2]:, boxes[(2, 2)][1] - 20:]
    assert ((bar[..., 0] == 255) & (bar[..., 1] > 0) & (bar[..., 1] < 255) & (bar[..., 2] == 0)).any()  # orange
    assert visualize.heat(np.array([0.0, 1.0])).tolist() == [[0, 0, 0], [255, 255, 255]]


# -----------------------------------------------------------------------------
# the whole tool


def test_cli_outputs_on_input_grid(tiny, tmp_path):
    m, ckpt = tiny
    path, x, affine = _volume(tmp_path)
    res = visualize.main(["--ckpt", str(ckpt), "--image", str(path), "--out", str(tmp_path / "vis"),
                          "--device", "cpu"])
    out = tmp_path / "vis"
    for name in ("image", "pca_rgb", "pca_fg", "attn"):
        img = nib.load(str(out / f"{name}.nii.gz"))
        assert img.shape[:3] == x.shape, name  # the file's own grid, not the RAS+ one (which is permuted)
        assert np.allclose(img.affine, affine, atol=1e-5), name
    # the saved image is the normalised input voxel for voxel, in the file's axis order
    saved = np.asarray(nib.load(str(out / "image.nii.gz")).dataobj)
    assert np.allclose(saved, data.normalize_percentile(x), atol=1e-6)
    rgb = nib.load(str(out / "pca_rgb.nii.gz"))
    assert rgb.shape == x.shape + (1, 3) and rgb.get_data_dtype() == np.uint8
    assert rgb.header.get_intent()[0] == "vector"
    fg = np.asarray(nib.load(str(out / "pca_fg.nii.gz")).dataobj)
    assert set(np.unique(fg)) <= {0, 1} and fg.any()
    assert (np.asarray(rgb.dataobj)[..., 0, :][fg == 0] == 0).all()  # background black
    attn = np.asarray(nib.load(str(out / "attn.nii.gz")).dataobj)
    assert attn.shape == x.shape + (m.num_heads,)
    # raw probabilities: every patch's value appears on the grid, and per head they sum to < 1 (CLS->CLS is the rest)
    patch = res["patch_attn"]  # (nh, h, w, d), one window
    assert 0.0 < patch.sum((1, 2, 3)).max() < 1.0
    assert np.isin(np.unique(attn[attn > 0]), patch).all()
    # recompute the CLS row for the box the tool used: the saved maps are exactly that
    img_ras = data.normalize_percentile(data.load_volume(path)[0][0])
    box = visualize.extract_box(img_ras, res["origin"], res["size"])
    _, a = visualize.features_and_attention(m, torch.from_numpy(box)[None, None])
    assert np.allclose(patch.reshape(2, -1), a[:, 1:].numpy(), atol=1e-6)
    # montage: decodes, small
    pic = read_png(out / "montage.png")
    assert pic.ndim == 3 and pic.shape[2] == 3 and (out / "montage.png").stat().st_size < 200_000


def test_resize_and_no_crop(tiny, tmp_path):
    _, ckpt = tiny
    path, x, affine = _volume(tmp_path)
    res = visualize.run(ckpt, path, tmp_path / "a", resize=16, crop=False)
    assert res["model_shape"] == (16, 16, 16) and list(res["size"]) == [24, 24, 16]  # RAS+ shape (22, 19, 13)
    assert res["attn"].shape == (22, 19, 13, 2) and (res["attn"] > 0).all()  # no crop: every voxel covered
    assert nib.load(str(tmp_path / "a" / "pca_fg.nii.gz")).shape == x.shape


def test_demo_montage_sources(tiny, tmp_path):
    _, ckpt = tiny
    png = visualize.demo_montage(ckpt, None, tmp_path / "synthetic")  # a phantom, written next to the outputs
    assert read_png(png).shape[2] == 3
    assert nib.load(str(tmp_path / "synthetic" / "vis" / "input.nii.gz")).shape == (64, 64, 64)
    # a prepared cache: the first .npy of index.json
    cache = tmp_path / "cache"
    cache.mkdir()
    np.save(cache / "a.npy", np.random.default_rng(5).random((17, 9, 12)).astype(np.float16))
    (cache / "index.json").write_text('{"entries": [{"file": "a.npy", "scale": 1.0}]}')
    assert visualize.first_volume(cache) == str(cache / "a.npy")
    visualize.demo_montage(ckpt, str(cache), tmp_path / "c")
    assert nib.load(str(tmp_path / "c" / "vis" / "attn.nii.gz")).shape == (17, 9, 12, 2)
    # a folder of NIfTIs
    (tmp_path / "nii").mkdir()
    path, x, _ = _volume(tmp_path / "nii")
    assert visualize.first_volume(tmp_path / "nii") == str(path)


@requires_shared
def test_real_volume_las(tiny, tmp_path):
    """A real LAS-oriented scanner file (MONAI's test volume): outputs on its own grid, input voxel for voxel."""
    _, ckpt = tiny
    path = DATA / "monai_testing_data" / "anatomical.nii"
    visualize.run(ckpt, path, tmp_path)
    src = nib.load(str(path))
    out = nib.load(str(tmp_path / "image.nii.gz"))
    assert out.shape == src.shape[:3] and np.allclose(out.affine, src.affine, atol=1e-4)
    expect = data.normalize_percentile(np.asarray(src.dataobj, np.float32).reshape(src.shape[:3]))
    assert np.allclose(np.asarray(out.dataobj), expect, atol=1e-6)
