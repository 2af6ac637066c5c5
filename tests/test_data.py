"""data.py: reading, preprocessing, datalists, load_case, the way back to the file grid, the `show` CLI, and the
files a user hands in: malformed datalists, a zero voxel spacing, same-named cases, label maps in a dataset folder.

Everything runs on small volumes written into tmp_path or shipped with nibabel; tests that read the real volumes
in ../shared/data are marked `requires_shared`. Nothing is copied into the repo.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from nibabel.testing import data_path as NIB_DATA

import data
import metrics
from conftest import DATA, ROOT, requires_shared, run_here

HIPPO = DATA / "msd_hippocampus"


# -----------------------------------------------------------------------------
# helpers


def save_nii(path, arr, zooms=None, affine=None):
    """Write arr as NIfTI (affine: diag(zooms) unless given); returns the path as str."""
    arr = np.asarray(arr)
    if affine is None:
        affine = np.diag([*np.nan_to_num((zooms or (1.0, 1.0, 1.0))[:3], nan=1.0), 1.0])  # NaN only in pixdim
    img = nib.Nifti1Image(arr, affine)
    if zooms is not None:
        img.header.set_zooms(tuple(zooms) + tuple(img.header.get_zooms()[len(zooms):]))
    nib.save(img, str(path))
    return str(path)


def phantom(shape=(40, 40, 32), seed=0, margin=3):
    """A bright smooth blob + noise on a darker body, a strictly lowest background rim `margin` voxels wide."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij"))
    x = 100 + 50 * np.exp(-((grid**2).sum(0)) * 3) + rng.normal(0, 5, shape)
    out = np.zeros(shape, dtype=np.float32)
    inner = tuple(slice(margin, s - margin) for s in shape)
    out[inner] = x[inner]
    return out


# -----------------------------------------------------------------------------
# load_volume


@requires_shared
def test_load_real_hippocampus_nifti():
    path = HIPPO / "images" / "hippocampus_001.nii.gz"
    x, spacing, affine = data.load_volume(path)
    assert x.shape == (1, 35, 51, 35) and x.dtype == np.float32  # MANIFEST.csv: 35x51x35, RAS, uint8 2..139
    assert spacing.tolist() == [1.0, 1.0, 1.0] and affine.shape == (4, 4)
    assert x.min() == 2 and x.max() == 139
    assert "".join(nib.aff2axcodes(affine)) == "RAS"


def test_load_4d_splits_frames_and_matches_nibabel_canonical():
    path = os.path.join(NIB_DATA, "example4d.nii.gz")  # (128, 96, 24, 2), zooms (2, 2, 2.2, 2000)
    x, spacing, affine = data.load_volume(path)
    canon = nib.as_closest_canonical(nib.load(path))
    assert x.shape[0] == 2  # one 3D volume per time point
    np.testing.assert_array_equal(x, np.moveaxis(canon.get_fdata(dtype=np.float32), 3, 0))
    np.testing.assert_allclose(affine, canon.affine)
    np.testing.assert_allclose(spacing, canon.header.get_zooms()[:3], rtol=1e-6)


def test_load_reorients_to_ras_and_permutes_spacing(tmp_path):
    arr = np.random.default_rng(0).random((10, 12, 14)).astype(np.float32)
    aff = np.array([[0, 0, 3.0, 0], [-2, 0, 0, 0], [0, 1, 0, 0], [0, 0, 0, 1]])  # axes P, S, R
    path = save_nii(tmp_path / "psr.nii.gz", arr, affine=aff)
    x, spacing, affine = data.load_volume(path)
    canon = nib.as_closest_canonical(nib.load(path))
    assert x.shape == (1, 14, 10, 12)
    np.testing.assert_array_equal(x[0], canon.get_fdata(dtype=np.float32))
    assert spacing.tolist() == [3.0, 2.0, 1.0]
    assert "".join(nib.aff2axcodes(affine)) == "RAS"
    assert data.describe_volume(path) == {"image": path, "shape": [14, 10, 12], "spacing": [3.0, 2.0, 1.0]}


def test_load_mgz_and_npy(tmp_path):
    arr = np.random.default_rng(1).random((6, 7, 8)).astype(np.float32)
    mgz = tmp_path / "v.mgz"
    nib.save(nib.MGHImage(arr, np.diag([1.0, 1.5, 2.0, 1.0])), str(mgz))
    x, spacing, _ = data.load_volume(mgz)
    assert x.shape == (1, 6, 7, 8) and spacing.tolist() == [1.0, 1.5, 2.0]
    np.testing.assert_allclose(x[0], arr)
    np.save(tmp_path / "v3.npy", arr)
    np.save(tmp_path / "v4.npy", np.stack([arr, 2 * arr]))  # .npy 4D is channel-first (C, H, W, D)
    x3, s3, a3 = data.load_volume(tmp_path / "v3.npy")
    x4, _, _ = data.load_volume(tmp_path / "v4.npy")
    assert x3.shape == (1, 6, 7, 8) and s3.tolist() == [1, 1, 1] and (a3 == np.eye(4)).all()
    assert x4.shape == (2, 6, 7, 8) and np.allclose(x4[1], 2 * arr)
    assert data.describe_volume(tmp_path / "v4.npy")["shape"] == [6, 7, 8, 2]


def _bad_files(tmp_path):
    """name -> path of files load_volume must refuse, with the word its message must contain."""
    good = save_nii(tmp_path / "good.nii.gz", phantom())
    raw = Path(good).read_bytes()
    (tmp_path / "corrupt.nii.gz").write_bytes(b"this is not a gzip stream" * 10)
    (tmp_path / "truncated.nii.gz").write_bytes(raw[: len(raw) // 2])
    save_nii(tmp_path / "flat2d.nii.gz", np.ones((16, 16), np.float32))
    save_nii(tmp_path / "slice.nii.gz", np.random.rand(16, 16, 1).astype(np.float32))
    save_nii(tmp_path / "nanspacing.nii.gz", phantom(), zooms=(float("nan"), 1.0, 1.0))
    save_nii(tmp_path / "five_d.nii.gz", np.ones((8, 8, 8, 2, 3), np.float32))
    (tmp_path / "notes.txt").write_text("hello")
    return {
        "missing.nii.gz": "not found",
        "corrupt.nii.gz": "unreadable",
        "truncated.nii.gz": "unreadable",
        "flat2d.nii.gz": "2D",
        "slice.nii.gz": "2D",
        "nanspacing.nii.gz": "spacing",
        "five_d.nii.gz": "channel",
        "notes.txt": "unsupported",
    }


def test_load_volume_errors_name_the_file(tmp_path):
    for name, word in _bad_files(tmp_path).items():
        path = str(tmp_path / name)
        with pytest.raises(data.VolumeError) as err:
            data.load_volume(path)
        assert str(err.value).startswith(path), str(err.value)
        assert word in str(err.value), (name, str(err.value))


def test_load_nonfinite_voxels_raw_unless_rejected(tmp_path):
    arr = phantom()
    arr[5, 5, 5], arr[6, 6, 6], arr[7, 7, 7] = np.nan, np.inf, -np.inf
    path = save_nii(tmp_path / "naninf.nii.gz", arr)
    x, _, _ = data.load_volume(path)
    assert np.isnan(x).sum() == 1 and np.isinf(x).sum() == 2
    with pytest.raises(data.VolumeError, match="3 non-finite"):
        data.load_volume(path, reject_nonfinite=True)


# -----------------------------------------------------------------------------
# preprocessing helpers


def test_fill_nonfinite_uses_mean_of_finite_voxels():
    x = np.array([1.0, 2.0, 3.0, np.nan, np.inf, -np.inf], np.float32)
    np.testing.assert_allclose(data.fill_nonfinite(x), [1, 2, 3, 2, 2, 2])
    with pytest.raises(ValueError, match="no finite"):
        data.fill_nonfinite(np.full(4, np.nan))


def test_normalize_percentile_range_and_degenerate_volumes():
    x = np.random.default_rng(0).normal(0, 1, (20, 20, 20)).astype(np.float32)
    y = data.normalize_percentile(x)
    a, b = np.percentile(x, [0.05, 99.95])
    assert y.dtype == np.float32 and y.min() == -1 and y.max() == 1
    np.testing.assert_allclose(y[x > a][:50], (2 * (x[x > a][:50] - a) / (b - a) - 1).clip(-1, 1), atol=1e-5)
    with np.errstate(all="raise"):  # no division by zero anywhere
        assert (data.normalize_percentile(np.full((8, 8, 8), 7.0, np.float32)) == 0).all()
        sparse = np.zeros((20, 20, 20), np.float32)
        sparse[0, 0, 0] = 5.0  # 1 voxel in 8000: both percentiles are 0 -> min/max fallback
        ys = data.normalize_percentile(sparse)
    assert ys[0, 0, 0] == 1 and (ys[1:] == -1).all()
    assert data.is_constant(np.ones(5)) and not data.is_constant(sparse)


def test_window_maps_ct_range():
    np.testing.assert_allclose(data.window(np.array([-1000, -175, 37.5, 250, 3000.0]), -175, 250), [-1, -1, 0, 1, 1],
                               atol=1e-6)


def test_inplane_first_rules():
    x = np.zeros((1, 2, 3, 4))
    for spacing, order, out_sp in [((1, 1, 3), (0, 1, 2), [1, 1, 3]), ((0.8, 5, 0.8), (0, 2, 1), [0.8, 0.8, 5]),
                                   ((5, 0.7, 0.7), (1, 2, 0), [0.7, 0.7, 5]),
                                   ((0.7, 3.0, 0.75), (0, 2, 1), [0.7, 0.75, 3.0])]:  # no pair: closest pair
        y, sp = data.inplane_first(x, spacing)
        assert y.shape == (1,) + tuple((2, 3, 4)[o] for o in order)
        np.testing.assert_allclose(sp, out_sp)
    y3, _ = data.inplane_first(np.zeros((2, 3, 4)), (5, 1, 1))  # works without the channel axis too
    assert y3.shape == (3, 4, 2)


def test_foreground_box_and_crop():
    x = -np.ones((2, 10, 11, 12), np.float32)
    x[0, 2:4, 5, 6:9] = 0.5
    x[1, 7, 5, 6] = 0.1  # any channel counts
    assert data.foreground_box(x) == (slice(2, 8), slice(5, 6), slice(6, 9))
    assert data.crop_foreground(x).shape == (2, 6, 1, 3)
    assert data.crop_foreground(-np.ones((4, 4, 4))).shape == (4, 4, 4)  # nothing: unchanged


# -----------------------------------------------------------------------------
# datalists


def test_find_volumes_describe_volume_and_pretrain_sources(tmp_path):
    save_nii(tmp_path / "a.nii.gz", phantom(), zooms=(1.0, 1.0, 2.5))
    sub = tmp_path / "sub"
    sub.mkdir()
    save_nii(sub / "b.nii", phantom((30, 32, 34)))
    save_nii(tmp_path / "flat.nii.gz", np.ones((8, 8), np.float32))
    (tmp_path / "._a.nii.gz").write_bytes(b"macOS resource fork junk")
    items, bad = [], []  # the pretraining datalist of a folder: [{"image", "shape", "spacing"}]
    for path in data.find_volumes(tmp_path):
        try:
            items.append(data.describe_volume(path))
        except data.VolumeError as e:
            bad.append((path, str(e)))
    assert [Path(i["image"]).name for i in items] == ["a.nii.gz", "b.nii"]
    assert items[0]["shape"] == [40, 40, 32] and items[0]["spacing"] == [1.0, 1.0, 2.5]
    assert len(bad) == 1 and "flat.nii.gz" in bad[0][0]
    (tmp_path / "list.json").write_text(json.dumps(items))
    assert [s["image"] for s in data.pretrain_sources(tmp_path / "list.json")] == [i["image"] for i in items]
    assert len(data.pretrain_sources(str(tmp_path / "**" / "*.nii*"))) == 3  # a glob (the 2D file included)


def test_read_datalist_finetuning_json(tmp_path):
    for n in ("c1", "c2", "l1", "t1"):
        save_nii(tmp_path / f"{n}.nii.gz", phantom((8, 8, 8)))
    dl = {"training": [{"image": ["c1.nii.gz", "c2.nii.gz"], "label": "l1.nii.gz"},
                       {"image1": "c1.nii.gz", "image2": "c2.nii.gz", "label": 3, "age": 41}],
          "validation": [{"image": "c1.nii.gz", "label": 0}], "test": ["t1.nii.gz"]}
    (tmp_path / "dl.json").write_text(json.dumps(dl))
    out = data.read_datalist(tmp_path / "dl.json")
    t0, t1 = out["training"]
    assert t0["image"] == [str(tmp_path / "c1.nii.gz"), str(tmp_path / "c2.nii.gz")]
    assert t0["label"] == str(tmp_path / "l1.nii.gz")
    assert t1["image"] == t0["image"] and t1["label"] == 3 and t1["age"] == 41  # BraTS keys merged, extras kept
    assert out["validation"][0]["label"] == 0
    assert out["test"] == [{"image": str(tmp_path / "t1.nii.gz"), "label": None}]


def test_read_datalist_msd_layout_with_renamed_folders(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    for n in ("x_001", "x_002"):
        save_nii(tmp_path / "images" / f"{n}.nii.gz", phantom((8, 8, 8)))
        save_nii(tmp_path / "labels" / f"{n}.nii.gz", np.zeros((8, 8, 8), np.uint8))
    msd = {"name": "x", "training": [{"image": f"./imagesTr/{n}.nii.gz", "label": f"./labelsTr/{n}.nii.gz"}
                                     for n in ("x_001", "x_002")], "test": ["./imagesTs/x_003.nii.gz"]}
    (tmp_path / "dataset.json").write_text(json.dumps(msd))
    out = data.read_datalist(tmp_path)  # a folder with dataset.json
    expected = [str(tmp_path / "images" / f"{n}.nii.gz") for n in ("x_001", "x_002")]
    assert [i["image"] for i in out["training"]] == expected
    assert all(Path(i["label"]).is_file() and "/labels/" in i["label"] for i in out["training"])
    assert out["test"][0]["image"].endswith("imagesTs/x_003.nii.gz")  # missing: kept, the loader will name it
    (tmp_path / "dataset.json").unlink()
    assert len(data.read_datalist(tmp_path)["training"]) == 2  # images/ + labels/ pairs without any JSON


@requires_shared
def test_read_datalist_shared_hippocampus_folder():
    out = data.read_datalist(HIPPO)  # its dataset.json has image_dir/label_dir but no item lists
    assert len(out["training"]) == 200 and out["validation"] == [] and out["test"] == []
    assert all(Path(i["image"]).name == Path(i["label"]).name and Path(i["label"]).is_file() for i in out["training"])


# -----------------------------------------------------------------------------
# load_case (finetuning / linear probe)


def test_load_case_validation_errors(tmp_path):
    img = save_nii(tmp_path / "img.nii.gz", phantom((20, 20, 16)))
    lab_bad_shape = save_nii(tmp_path / "lab_shape.nii.gz", np.zeros((20, 20, 15), np.uint8))
    with pytest.raises(data.VolumeError) as err:
        data.load_case(img, lab_bad_shape)
    assert str(err.value).startswith(lab_bad_shape) and img in str(err.value)  # names the label and the case
    lab_float = save_nii(tmp_path / "lab_float.nii.gz", np.full((20, 20, 16), 0.5, np.float32))
    with pytest.raises(data.VolumeError, match="integers"):
        data.load_case(img, lab_float)
    lab_nan = np.zeros((20, 20, 16), np.float32)
    lab_nan[0, 0, 0] = np.nan
    with pytest.raises(data.VolumeError, match="finite"):
        data.load_case(img, save_nii(tmp_path / "lab_nan.nii.gz", lab_nan))
    other = save_nii(tmp_path / "other.nii.gz", phantom((20, 20, 17)))
    with pytest.raises(data.VolumeError) as err:
        data.load_case([img, other])
    assert str(err.value).startswith(other) and "differs" in str(err.value)
    aniso = save_nii(tmp_path / "aniso.nii.gz", phantom((20, 20, 16)), zooms=(1.0, 1.0, 2.0))
    with pytest.raises(data.VolumeError, match="spacing"):
        data.load_case([img, aniso])
    with pytest.raises(data.VolumeError, match="not found"):
        data.load_case(str(tmp_path / "nope.nii.gz"))


def test_load_case_channels_labels_window_crop(tmp_path):
    a, b = phantom((20, 22, 16), 0), phantom((20, 22, 16), 1) * 3
    a[4, 4, 4] = np.nan  # filled, not propagated
    lab = np.zeros((20, 22, 16), np.int16)
    lab[8:12, 8:12, 6:9] = 2
    pa, pb = save_nii(tmp_path / "a.nii.gz", a), save_nii(tmp_path / "b.nii.gz", b)
    case = data.load_case([pa, pb], save_nii(tmp_path / "l.nii.gz", lab))
    assert case["image"].shape == (2, 20, 22, 16) and case["image"].dtype == np.float32
    assert np.isfinite(case["image"]).all() and case["image"].min() == -1 and case["image"].max() == 1
    assert case["label"].dtype == np.int64 and (case["label"] == lab).all()
    assert data.load_case(pa, label=1)["label"] == 1  # classification: an int passes through
    ct = data.load_case(pa, ct_window=(0, 200))["image"]
    np.testing.assert_allclose(ct, np.clip(data.fill_nonfinite(a) / 100 - 1, -1, 1)[None], atol=1e-6)
    cropped = data.load_case(pa, save_nii(tmp_path / "l2.nii.gz", lab), crop_to_foreground=True)
    assert cropped["image"].shape == (1, 14, 16, 10)  # the phantom's rim of 3 background voxels is gone
    assert (cropped["label"] == lab[3:-3, 3:-3, 3:-3]).all()
    np.testing.assert_allclose(cropped["affine"] @ [0, 0, 0, 1], case["affine"] @ [3, 3, 3, 1])


def test_load_case_resampling_keeps_world_extent(tmp_path):
    x = phantom((20, 20, 10))
    lab = np.zeros(x.shape, np.uint8)
    lab[5:15, 5:15, 2:8] = 1
    aff = np.diag([2.0, 2.0, 4.0, 1.0])
    aff[:3, 3] = [10, -5, 3]
    img_p, lab_p = save_nii(tmp_path / "x.nii.gz", x, affine=aff), save_nii(tmp_path / "y.nii.gz", lab, affine=aff)
    case = data.load_case(img_p, lab_p, target_spacing=(1.0, 1.0, 1.0))
    assert case["image"].shape == (1, 40, 40, 40) and case["label"].shape == (40, 40, 40)
    np.testing.assert_allclose(case["spacing"], [1, 1, 1])
    for old_corner, new_corner in [((-0.5,) * 3, (-0.5,) * 3), ((19.5, 19.5, 9.5), (39.5, 39.5, 39.5))]:
        np.testing.assert_allclose(case["affine"] @ [*new_corner, 1], aff @ [*old_corner, 1])  # same world box
    assert set(np.unique(case["label"])) == {0, 1} and case["label"].sum() == 20 * 20 * 24  # nearest: exact


@requires_shared
def test_load_case_real_hippocampus_pair():
    name = "hippocampus_003.nii.gz"
    case = data.load_case(HIPPO / "images" / name, HIPPO / "labels" / name)
    assert case["image"].shape == (1, 34, 52, 35) and case["label"].shape == (34, 52, 35)
    assert set(np.unique(case["label"]).tolist()) == {0, 1, 2}


# -----------------------------------------------------------------------------
# prepare_case (finetuning): padding, and predictions back on the input file's grid


@pytest.mark.parametrize("target_spacing, crop_foreground", [(None, False), ((1.0, 1.0, 1.0), True)])
def test_prediction_goes_back_to_the_input_grid(tmp_path, target_spacing, crop_foreground):
    # an oblique-free but non-RAS file (axes permuted and flipped, 1.5 x 2 x 1 mm): a prediction equal to the label
    # on the processed grid must come back as the label file's own array, with its affine
    rng = np.random.default_rng(0)
    label = np.zeros((12, 10, 14), np.uint8)
    label[3:9, 2:7, 4:12] = 1
    label[5:7, 3:5, 6:9] = 2
    image = rng.normal(size=label.shape).astype(np.float32) + 3 * label
    image[:, :, :2] = image.min()  # a border of background, for the foreground crop
    affine = np.array([[0, 0, -1.0, 40], [-1.5, 0, 0, 20], [0, 2.0, 0, -10], [0, 0, 0, 1]])
    img_p = save_nii(tmp_path / "img.nii.gz", image, affine=affine)
    lab_p = save_nii(tmp_path / "lab.nii.gz", label, affine=affine)
    case = data.prepare_case({"image": img_p, "label": lab_p}, crop_size=16, target_spacing=target_spacing,
                           crop_foreground=crop_foreground)
    assert all(s >= 16 for s in case["image"].shape[1:]) and case["image"].min() == -1
    pred = case["label"][case["inner"]].astype(np.uint8)
    back, back_affine = data.to_input_grid(pred, case)
    np.testing.assert_array_equal(back_affine, affine)
    assert back.shape == label.shape
    if target_spacing is None:
        np.testing.assert_array_equal(back, label)
    else:  # resampled to 1 mm and back with nearest neighbours: boundaries may move by a voxel
        assert np.nanmean(metrics.dice(back, label, 3)) > 0.8


# -----------------------------------------------------------------------------
# CLI


def test_cli_show(tmp_path):
    save_nii(tmp_path / "v0.nii.gz", phantom(seed=0))
    r = subprocess.run([sys.executable, str(ROOT / "data.py"), "show", str(tmp_path / "v0.nii.gz")],
                       capture_output=True, text=True)
    assert r.returncode == 0 and "[1, 40, 40, 32]" in r.stdout and "RAS" in r.stdout


# ---- files and datalists a user hands in ---------------------------------------------------------------------------

def test_cases_with_the_same_file_name_get_distinct_names():
    items = [{"image": "/a/x/case1.nii.gz"}, {"image": "/a/y/case1.nii.gz"}, {"image": "/a/case2.nii.gz"}]
    data.unique_names(items)
    names = [data.case_name(it) for it in items]
    assert names == ["x_case1", "y_case1", "case2"]
    items = [{"image": "/a/x/c.nii.gz"}, {"image": "/b/x/c.nii.gz"}]  # same folder name too: a number decides
    data.unique_names(items)
    assert len({data.case_name(it) for it in items}) == 2


def test_zero_voxel_spacing_in_the_header_is_refused(tmp_path):
    img = nib.Nifti1Image(np.random.rand(8, 8, 8).astype(np.float32), np.diag([2.0, 2.0, 2.0, 1.0]))
    img.header["pixdim"][1:4] = [0, 2, 2]
    img.set_sform(None, code=0)
    path = tmp_path / "zero.nii.gz"
    nib.save(img, path)
    assert nib.load(path).header.get_zooms()[0] == 1.0  # what nibabel makes of it, silently for its caller
    for fn in (data.load_volume, data.describe_volume):
        with pytest.raises(data.VolumeError, match="voxel spacing \\[0.0, 2.0, 2.0\\] in the header"):
            fn(path)


@pytest.mark.parametrize("content, needle", [
    ({"train": [], "val": []}, "item lists under ['train', 'val']"),
    ({"training": "a string"}, '"training" must be a list of items'),
    ({"training": [{"img": "a.nii.gz", "seg": "b.nii.gz"}]}, 'training[0] has no "image" key'),
])
def test_malformed_datalists(tmp_path, content, needle):
    path = tmp_path / "dl.json"
    path.write_text(json.dumps(content))
    with pytest.raises(data.VolumeError, match=None) as e:
        data.read_datalist(path)
    assert needle in str(e.value) and str(path) in str(e.value)


@requires_shared
def test_data_show_names_the_files_own_orientation_and_fails_on_bad_files(tmp_path):
    from conftest import DATA

    good = DATA / "msd_hippocampus" / "images" / "hippocampus_003.nii.gz"
    las = tmp_path / "las.nii.gz"
    nib.save(nib.Nifti1Image(np.random.rand(10, 10, 10).astype(np.float32), np.diag([-1.0, 1, 1, 1])), las)
    nan = tmp_path / "nan.nii.gz"
    nib.save(nib.Nifti1Image(np.full((10, 10, 10), np.nan, np.float32), np.eye(4)), nan)
    p = run_here(ROOT / "data.py", "show", good, las, nan)
    assert "file orientation LAS" in p.stdout and "after reorienting to RAS" in p.stdout
    assert f"{nan}: " in p.stdout and "no finite voxel" in p.stdout  # the listing goes on past it
    assert p.returncode == 1


def test_label_maps_are_not_pretraining_images(tmp_path, caplog):
    """A dataset folder read recursively used to hand its label maps to pretraining as scans (hippocampus: 200
    of 400 sources). Label folders, a dataset.json's label_dir and the labels it lists are skipped, with one
    summary line on the `data` logger."""
    vol = nib.Nifti1Image(np.random.rand(20, 20, 20).astype(np.float32), np.eye(4))
    for sub in ("imagesTr", "imagesTs", "labelsTr", "labelsTs", "extra/labels", "masks", "segs", "more"):
        (tmp_path / sub).mkdir(parents=True)
    for i in range(2):
        nib.save(vol, tmp_path / "imagesTr" / f"c{i}.nii.gz")
        nib.save(vol, tmp_path / "labelsTr" / f"c{i}.nii.gz")
    nib.save(vol, tmp_path / "imagesTs" / "t.nii.gz")
    nib.save(vol, tmp_path / "labelsTs" / "t.nii.gz")
    nib.save(vol, tmp_path / "extra" / "labels" / "e.nii.gz")
    nib.save(vol, tmp_path / "masks" / "m.nii.gz")  # the label_dir below
    nib.save(vol, tmp_path / "segs" / "s.nii.gz")  # listed as a label below
    nib.save(vol, tmp_path / "more" / "scan.nii.gz")
    (tmp_path / "dataset.json").write_text(json.dumps({
        "label_dir": "masks", "training": [{"image": "more/scan.nii.gz", "label": "segs/s.nii.gz"}]}))
    images = sorted(str(tmp_path / p) for p in ("imagesTr/c0.nii.gz", "imagesTr/c1.nii.gz", "imagesTs/t.nii.gz",
                                                "more/scan.nii.gz"))
    with caplog.at_level("INFO", logger="data"):
        assert sorted(s["image"] for s in data.pretrain_sources(tmp_path)) == images
    lines = [r.getMessage() for r in caplog.records if "label maps" in r.getMessage()]
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"skipped 6 label maps in {tmp_path}: ")
    for part in ("2 under labelsTr/", "1 under labelsTs/", "1 under labels/", "1 under masks/ (label_dir of",
                 "1 listed as labels in", "(label maps are never pretrained on)"):
        assert part in lines[0], (part, lines[0])
    # a glob gives the same images; pointing at a label folder itself still reads it
    assert sorted(s["image"] for s in data.pretrain_sources(str(tmp_path / "**" / "*.nii.gz"))) == images
    assert len(data.pretrain_sources(tmp_path / "labelsTr")) == 2
