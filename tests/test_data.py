"""data.py: reading, preprocessing, datalists, the prepare cache, synthetic phantoms, the pretraining dataset.

Everything runs on small volumes written into tmp_path or shipped with nibabel; tests that read the real volumes
in ../shared/data are marked `requires_shared`. Nothing is copied into the repo.
"""
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from nibabel.testing import data_path as NIB_DATA

import data
from conftest import DATA, ROOT, requires_shared

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


def test_make_datalist_and_pretrain_sources(tmp_path):
    save_nii(tmp_path / "a.nii.gz", phantom(), zooms=(1.0, 1.0, 2.5))
    sub = tmp_path / "sub"
    sub.mkdir()
    save_nii(sub / "b.nii", phantom((30, 32, 34)))
    save_nii(tmp_path / "flat.nii.gz", np.ones((8, 8), np.float32))
    (tmp_path / "._a.nii.gz").write_bytes(b"macOS resource fork junk")
    items, bad = data.make_datalist(tmp_path)
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
# SyntheticVolumes


@pytest.fixture
def one_thread():
    """Run like a DataLoader worker (1 torch thread): tiny ops gain nothing from threads, and on a busy machine
    the spinning thread pool makes them 10x slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_synthetic_volumes_deterministic_and_structured(one_thread):
    sv = data.SyntheticVolumes(n=12, shape=(48, 48, 40), seed=3, with_labels=True)
    a, b = sv[5], data.SyntheticVolumes(n=12, shape=(48, 48, 40), seed=3, with_labels=True)[5]
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])
    assert not torch.equal(sv[6]["image"], a["image"])
    assert not torch.equal(data.SyntheticVolumes(12, (48, 48, 40), seed=4)[5]["image"], a["image"])
    cls, phases = [], []
    for i in range(len(sv)):
        it = sv[i]
        x, lab = it["image"], it["label"]
        assert x.shape == (1, 48, 48, 40) and x.dtype == torch.float32 and lab.dtype == torch.int64
        assert x.min() == -1 and x.max() == 1 and int(lab.max()) < sv.num_classes
        assert (x[0][lab > 0] > -1).all()  # organs are never air
        mean = {c: x[0][lab == c].mean().item() for c in (1, 2, 3) if (lab == c).any()}
        liver_level, kidney_level = list(sv.PHASE_LEVELS.values())[it["phase"]]
        if abs(liver_level - kidney_level) > 0.2:  # the contrast phase decides which organ is brighter
            assert (mean[1] > mean[2]) == (liver_level > kidney_level), (i, it["phase"], mean)
        if 3 in mean:
            assert mean[3] < mean[1]  # lesions are darker than the liver they sit in
        assert ((lab == 3).any().item()) == bool(it["label_cls"])  # the classification label is the lesion
        cls.append(it["label_cls"])
        phases.append(it["phase"])
    assert 0 < sum(cls) < len(cls)
    assert len(set(phases)) >= 3  # volumes differ in phase: intensity alone does not name the organ
    assert data.foreground_box(sv[0]["image"].numpy()) != (slice(0, 48), slice(0, 48), slice(0, 40))  # air border
    with pytest.raises(IndexError):
        sv[12]


def test_synthetic_volume_speed(one_thread):
    sv = data.SyntheticVolumes(n=8, shape=(64, 64, 64))
    sv[0]
    times = []
    for i in range(1, 6):
        t0 = time.process_time()  # CPU time of this process: robust to other jobs sharing the machine
        sv[i]
        times.append(time.process_time() - t0)
    assert sorted(times)[2] < 0.15  # ~15 ms of CPU; generous for slow CI machines


# -----------------------------------------------------------------------------
# prepare: good and bad files, resume, version hash, workers


def _prepare_inputs(tmp_path):
    """A datalist with good volumes (3D, anisotropic, 4D, NaN/Inf) and every kind of bad one."""
    src = tmp_path / "src"
    src.mkdir()
    good = {
        "good.nii.gz": save_nii(src / "good.nii.gz", phantom((40, 40, 32), 0)),
        "aniso.nii.gz": save_nii(src / "aniso.nii.gz", phantom((32, 40, 40), 1), zooms=(3.0, 0.8, 0.8)),
        "series.nii.gz": save_nii(src / "series.nii.gz", np.stack([phantom(seed=2), phantom(seed=3)], -1)),
        "naninf.nii.gz": None,
        "vol.npy": str(src / "vol.npy"),
    }
    x = phantom(seed=4)
    x[10, 10, 10], x[11, 11, 11], x[12, 12, 12] = np.nan, np.inf, -np.inf
    good["naninf.nii.gz"] = save_nii(src / "naninf.nii.gz", x)
    np.save(good["vol.npy"], phantom(seed=5))
    bad = {k: str(src / k) for k in _bad_files(src) if k not in ("slice.nii.gz",)}
    bad["constant.nii.gz"] = save_nii(src / "constant.nii.gz", np.full((30, 30, 30), 7.0, np.float32))
    bad["tiny.nii.gz"] = save_nii(src / "tiny.nii.gz", phantom((20, 20, 20)))
    bad["allnan.nii.gz"] = save_nii(src / "allnan.nii.gz", np.full((30, 30, 30), np.nan, np.float32))
    listing = [{"image": p} for p in list(good.values()) + list(bad.values())]
    listing.append({"image": str(src / "big_but_listed_small.nii.gz"), "shape": [10, 400, 400]})  # datalist filter
    (tmp_path / "list.json").write_text(json.dumps(listing))
    return tmp_path / "list.json", good, bad


def test_prepare_reports_bad_files_finishes_rest_and_resumes(tmp_path, capsys):
    dl, good, bad = _prepare_inputs(tmp_path)
    cache = tmp_path / "cache"
    summary = data.prepare(dl, cache, workers=2, progress=False)
    err = capsys.readouterr().err
    index = data.load_index(cache)
    # every bad file is reported by name (stderr and the summary) and none of them is in the index
    reasons = " ".join(r for _, r in summary["rejected"])
    for name, path in bad.items():
        assert path in err and path in reasons, name
    assert "big_but_listed_small" in reasons
    assert {e["source"] for e in index["entries"]} == set(good.values())
    assert summary["new"] == len(index["entries"]) == len(good) + 1  # the 4D series gives 2 entries (all frames)
    series = [e for e in index["entries"] if e["source"] == good["series.nii.gz"]]
    assert [(e["frame"], e["n_frames"]) for e in series] == [(0, 2), (1, 2)]
    aniso = next(e for e in index["entries"] if e["source"] == good["aniso.nii.gz"])
    # in-plane axes first (3.0 mm axis last), then the 3-voxel background rim cropped
    assert np.allclose(aniso["spacing"], [0.8, 0.8, 3.0]) and aniso["shape"] == [34, 34, 26]
    for e in index["entries"]:
        arr = np.load(cache / e["file"])
        assert arr.dtype == np.float16 and list(arr.shape) == e["shape"] and min(arr.shape) > 24
        assert np.isfinite(arr).all() and arr.min() >= -1 and arr.max() <= 1
    assert index["version"] == data.prep_version() and not list(cache.glob("*.tmp*"))

    # resume: nothing is redone, files untouched, bad ones not retried
    mtimes = {p: p.stat().st_mtime_ns for p in cache.glob("*.npy")}
    again = data.prepare(dl, cache, workers=2, progress=False)
    assert again["new"] == 0 and again["rejected"] == [] and again["skipped"] == len(json.loads(dl.read_text()))
    assert {p: p.stat().st_mtime_ns for p in cache.glob("*.npy")} == mtimes
    # a deleted cache file is redone
    os.remove(cache / index["entries"][0]["file"])
    assert data.prepare(dl, cache, workers=0, progress=False)["new"] == 1


def test_prepare_version_hash_rebuilds(tmp_path, monkeypatch):
    src = tmp_path / "src"
    src.mkdir()
    paths = [save_nii(src / f"v{i}.nii.gz", phantom(seed=i)) for i in range(2)]
    first = data.prepare(paths, tmp_path / "c", workers=0, progress=False)
    assert first["new"] == 2
    v0 = data.load_index(tmp_path / "c")
    monkeypatch.setattr(data, "PREP_VERSION", data.PREP_VERSION + 1)  # newer preprocessing code
    again = data.prepare(paths, tmp_path / "c", workers=0, progress=False)
    v = data.load_index(tmp_path / "c")
    assert again["new"] == 2 and v["version"] == data.prep_version() != v0["version"]  # newer code: rebuilt
    for e in v["entries"]:
        assert np.load(tmp_path / "c" / e["file"]).dtype == np.float16


def test_prepare_workers_do_not_change_the_index(tmp_path):
    paths = []
    for i in range(4):
        paths.append(save_nii(tmp_path / f"v{i}.nii.gz", phantom(seed=i)))
    data.prepare(paths, tmp_path / "a", workers=0, progress=False)
    data.prepare(paths, tmp_path / "b", workers=2, progress=False)
    assert data.load_index(tmp_path / "a")["entries"] == data.load_index(tmp_path / "b")["entries"]


# -----------------------------------------------------------------------------
# PretrainDataset, StepSampler, collate


@pytest.fixture(scope="module")
def small_cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("cache")
    paths = [save_nii(root / f"v{i}.nii.gz", phantom((40 + 2 * i, 36, 32), seed=i)) for i in range(5)]
    data.prepare(paths, root / "cache", workers=0, progress=False)
    return root / "cache"


def _equal(a, b):
    return a["index"] == b["index"] and all(torch.equal(x, y) for x, y in zip(a["global_crops"] + a["local_crops"],
                                                                             b["global_crops"] + b["local_crops"]))


def test_pretrain_dataset_layout_and_determinism(small_cache):
    ds = data.PretrainDataset(small_cache, n_local=8, seed=0)
    it = ds[3]
    assert set(it) == {"global_crops", "local_crops", "index", "k"} and it["k"] == 3
    assert len(it["global_crops"]) == 2 and len(it["local_crops"]) == 8
    shape = data.load_index(small_cache)["entries"][it["index"]]["shape"]
    for c in it["global_crops"] + it["local_crops"]:
        assert c.dtype == torch.float32 and c.shape[0] == 1 and all(0 < s <= n for s, n in zip(c.shape[1:], shape))
        assert c.min() >= -1 and c.max() <= 1
    g_vox = min(c[0].numel() for c in it["global_crops"])
    assert g_vox > max(c[0].numel() for c in it["local_crops"])  # global boxes are bigger than local ones
    assert _equal(it, data.PretrainDataset(small_cache, n_local=8, seed=0)[3])  # pure function of (seed, rank, k)
    assert not _equal(it, data.PretrainDataset(small_cache, n_local=8, seed=1)[3])
    assert not _equal(ds[3], ds[4])


def test_pretrain_dataset_ranks_partition_each_pass(small_cache):
    n = 5
    r0 = data.PretrainDataset(small_cache, rank=0, world_size=2)
    r1 = data.PretrainDataset(small_cache, rank=1, world_size=2)
    # pass 0 covers global positions 0..4: rank 0 takes k = 0, 1, 2 (positions 0, 2, 4), rank 1 k = 0, 1
    seen0, seen1 = [r0.volume_for(k) for k in range(3)], [r1.volume_for(k) for k in range(2)]
    assert sorted(seen0 + seen1) == list(range(n))
    assert not _equal(r0[0], r1[0])  # ranks draw different samples for the same k
    single = data.PretrainDataset(small_cache)
    for p in range(3):  # every pass of a single rank is a permutation, and passes differ
        assert sorted(single.volume_for(k) for k in range(p * n, p * n + n)) == list(range(n))
    assert [single.volume_for(k) for k in range(5)] != [single.volume_for(k) for k in range(5, 10)]


def test_pretrain_dataset_reads_only_the_crop_region(small_cache, monkeypatch):
    reads, real_load = [], np.load

    class Spy:
        def __init__(self, arr):
            self.arr, self.shape = arr, arr.shape

        def __getitem__(self, sl):
            reads.append(sl)
            return self.arr[sl]

    def spy_load(path, *args, **kwargs):
        arr = real_load(path, *args, **kwargs)
        assert kwargs.get("mmap_mode") == "c" and isinstance(arr, np.memmap)  # copy-on-write: never written
        return Spy(arr)

    ds = data.PretrainDataset(small_cache, n_local=8)
    monkeypatch.setattr(np, "load", spy_load)
    it = ds[0]
    assert len(reads) == 10 and all(len(sl) == 3 and all(isinstance(s, slice) for s in sl) for sl in reads)
    read_voxels = sum(np.prod([s.stop - s.start for s in sl]) for sl in reads)
    assert read_voxels == sum(c.numel() for c in it["global_crops"] + it["local_crops"])  # no padding here
    assert read_voxels < 10 * np.prod(ds.entries[it["index"]]["shape"])


@pytest.mark.parametrize("pad_to", [24, 56])  # 24: no padding (the box is read into uninitialised memory); 56: mixed
def test_pretrain_dataset_crops_are_the_exact_boxes(tmp_path, pad_to, monkeypatch):
    # each crop = the sampled box of the prepared volume (virtually padded with -1 to pad_to)
    paths = [save_nii(tmp_path / "v.nii.gz", phantom((40, 36, 34), seed=3))]  # (34, 30, 28) prepared
    data.prepare(paths, tmp_path / "c", workers=0, progress=False)
    e = data.load_index(tmp_path / "c")["entries"][0]
    vol = np.load(tmp_path / "c" / e["file"]).astype(np.float32)
    padded = np.full([max(n, pad_to) for n in vol.shape], -1.0, np.float32)
    offs = [max(pad_to - n, 0) // 2 for n in vol.shape]
    padded[tuple(slice(o, o + n) for o, n in zip(offs, vol.shape))] = vol
    ds = data.PretrainDataset(tmp_path / "c", n_local=8, pad_to=pad_to)
    boxes, sample = [], data.sample_crop_box
    monkeypatch.setattr(data, "sample_crop_box", lambda *a, **k: boxes.append(sample(*a, **k)) or boxes[-1])
    for k in range(3):
        boxes.clear()
        it = ds[k]
        for (h0, w0, d0, ch, cw, cd), c in zip(boxes, it["global_crops"] + it["local_crops"]):
            assert c.dtype == torch.float32
            np.testing.assert_array_equal(c[0].numpy(), padded[h0:h0 + ch, w0:w0 + cw, d0:d0 + cd])


def test_dataloader_workers_and_resume_give_identical_batches():
    ds = data.PretrainDataset(data.SyntheticVolumes(16, (32, 32, 32), seed=1), n_local=2, seed=7)

    def batches(workers, start, n):
        loader = torch.utils.data.DataLoader(ds, batch_size=3, sampler=data.StepSampler(start), num_workers=workers,
                                             collate_fn=data.collate_pretrain)
        return [b for b, _ in zip(loader, range(n))]

    b0, b2, resumed = batches(0, 0, 3), batches(2, 0, 3), batches(0, 6, 1)
    for x, y in zip(b0, b2):
        assert torch.equal(x["index"], y["index"]) and torch.equal(x["k"], y["k"])
        for vx, vy in zip(x["global_crops"] + x["local_crops"], y["global_crops"] + y["local_crops"]):
            assert all(torch.equal(a, b) for a, b in zip(vx, vy))
    assert torch.equal(resumed[0]["k"], torch.tensor([6, 7, 8])) and torch.equal(resumed[0]["index"], b0[2]["index"])
    assert all(torch.equal(a, b) for a, b in zip(resumed[0]["global_crops"][1], b0[2]["global_crops"][1]))


def test_collate_layout():
    ds = data.PretrainDataset(data.SyntheticVolumes(4, (32, 32, 32)), n_local=3)
    samples = [ds[k] for k in range(4)]
    b = data.collate_pretrain(samples)
    assert len(b["global_crops"]) == 2 and all(len(v) == 4 for v in b["global_crops"])
    assert len(b["local_crops"]) == 3 and all(len(v) == 4 for v in b["local_crops"])
    assert b["global_crops"][1][2] is samples[2]["global_crops"][1]  # view-major, then image
    assert b["local_crops"][2][3] is samples[3]["local_crops"][2]
    assert b["index"].dtype == torch.long and b["index"].tolist() == [s["index"] for s in samples]


class _Tiny(torch.utils.data.Dataset):
    """One 10x12x8 volume of 0.5 (and a volume that raises, for the bad-volume test)."""

    def __init__(self, bad=()):
        self.bad = set(bad)

    def __len__(self):
        return 3

    def __getitem__(self, i):
        if i in self.bad:
            raise data.VolumeError(f"tiny[{i}]: broken on purpose")
        return {"image": torch.full((1, 10, 12, 8), 0.5)}


def test_volume_smaller_than_crop_is_padded_with_background():
    ds = data.PretrainDataset(_Tiny(), n_local=4, pad_to=24)
    for k in range(4):
        it = ds[k]
        crops = it["global_crops"] + it["local_crops"]
        assert all(max(c.shape[1:]) <= 24 for c in crops)
        assert any(c.shape[1] > 10 or c.shape[3] > 8 for c in it["global_crops"])  # only possible when padded
        values = set(torch.unique(torch.cat([c.flatten() for c in crops])).tolist())
        assert values <= {-1.0, 0.5} and -1.0 in values


def test_bad_volume_at_train_time_is_logged_and_replaced(caplog):
    ds = data.PretrainDataset(_Tiny(bad={1}), n_local=1)
    k = next(k for k in range(20) if ds.volume_for(k) == 1)
    with caplog.at_level(logging.WARNING):
        it = ds[k]
    assert it["index"] != 1 and "tiny[1]: broken on purpose" in caplog.text and "_Tiny[1]" in caplog.text
    assert _equal(it, data.PretrainDataset(_Tiny(bad={1}), n_local=1)[k])  # the replacement is deterministic
    assert _equal(it, ds[k])  # ... also once the volume is known to be bad (skipped without re-reading)
    with pytest.raises(RuntimeError, match="bad volumes in a row"):
        data.PretrainDataset(_Tiny(bad={0, 1, 2}), n_local=1)[0]


def test_bad_cache_file_at_train_time(small_cache, tmp_path, caplog):
    import shutil

    cache = tmp_path / "cache"
    shutil.copytree(small_cache, cache)
    ds = data.PretrainDataset(cache, n_local=2)
    k = 0
    victim = cache / ds.entries[ds.volume_for(k)]["file"]
    victim.write_bytes(b"\x93NUMPY garbage")
    with caplog.at_level(logging.WARNING):
        it = ds[k]
    assert str(victim) in caplog.text and it["index"] != ds.volume_for(k)


def test_stale_cache_version_is_flagged(small_cache, tmp_path, caplog):
    import shutil

    cache = tmp_path / "cache"
    shutil.copytree(small_cache, cache)
    index = data.load_index(cache)
    index["version"] = "0123456789ab"
    (cache / "index.json").write_text(json.dumps(index))
    with caplog.at_level(logging.WARNING):
        data.PretrainDataset(cache)
    assert "preprocessing version 0123456789ab" in caplog.text


def test_synthetic_default_and_raw_sources(tmp_path):
    ds = data.PretrainDataset(None, n_local=2)
    assert isinstance(ds.volumes, data.SyntheticVolumes) and len(ds[0]["global_crops"]) == 2
    x = phantom((40, 40, 32))
    paths = [save_nii(tmp_path / "a.nii.gz", np.stack([x, x[::-1]], -1)), save_nii(tmp_path / "b.nii.gz", x)]
    with pytest.warns(UserWarning, match="prepare"):
        raw = data.PretrainDataset(str(tmp_path / "*.nii.gz"), n_local=2)
    it = raw[0]
    assert len(raw) == 2 and it["global_crops"][0].shape[0] == 1
    with pytest.warns(UserWarning, match="prepare"):
        again = data.PretrainDataset(str(tmp_path / "*.nii.gz"), n_local=2)
    assert _equal(it, again[0])  # the frame of the 4D file is drawn from (seed, rank, k) too
    with pytest.raises(ValueError, match="no usable volumes"):
        data.PretrainDataset(str(tmp_path / "*.mgz"))


def test_step_sampler():
    it = iter(data.StepSampler(start=5))
    assert [next(it) for _ in range(4)] == [5, 6, 7, 8]


# -----------------------------------------------------------------------------
# end to end: real volumes -> prepare -> dataset -> loader -> augment.make_views -> the reference's batch


@requires_shared
@pytest.mark.slow
def test_end_to_end_real_hippocampus_to_reference_batch(tmp_path):
    images = sorted((HIPPO / "images").glob("*.nii.gz"))[:4]
    summary = data.prepare([str(p) for p in images], tmp_path / "cache", workers=2, progress=False)
    assert summary["new"] == 4 and summary["rejected"] == []
    B, n_local = 2, 8
    ds = data.PretrainDataset(tmp_path / "cache", n_local=n_local)
    loader = torch.utils.data.DataLoader(ds, batch_size=B, sampler=data.StepSampler(0), num_workers=0,
                                         collate_fn=data.collate_pretrain, drop_last=True)
    batch = next(iter(loader))
    assert len(batch["global_crops"]) == 2 and len(batch["local_crops"]) == n_local
    augment = pytest.importorskip("augment")
    if not hasattr(augment, "make_views"):
        pytest.skip("augment.make_views not written yet")
    out = augment.make_views(batch, global_size=96, local_size=48, patch_size=16,
                             generator=torch.Generator().manual_seed(0), device="cpu")
    assert out["global_crops"].shape == (2 * B, 1, 96, 96, 96)  # the reference's layout
    assert out["local_crops"].shape == (n_local * B, 1, 48, 48, 48)
    assert out["masks"].shape == (2 * B, 216) and out["masks"].dtype == torch.bool
    assert int(out["n_masked_patches"]) == out["mask_indices_list"].numel() == out["masks"].sum()


# -----------------------------------------------------------------------------
# CLI


def test_cli_make_datalist_prepare_show(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(2):
        save_nii(src / f"v{i}.nii.gz", phantom(seed=i))
    (src / "broken.nii.gz").write_bytes(b"junk")
    run = lambda *a: subprocess.run([sys.executable, str(ROOT / "data.py"), *a], capture_output=True, text=True)  # noqa
    r = run("make-datalist", str(src), "--out", str(tmp_path / "list.json"))
    assert r.returncode == 0 and "broken.nii.gz" in r.stderr
    assert len(json.loads((tmp_path / "list.json").read_text())) == 2
    r = run("prepare", "--datalist", str(src), "--out", str(tmp_path / "cache"), "--workers", "1")
    assert r.returncode == 0 and "broken.nii.gz" in r.stderr, r.stderr
    assert json.loads(r.stdout.strip().splitlines()[-1])["entries"] == 2
    r = run("show", str(src / "v0.nii.gz"))
    assert r.returncode == 0 and "[1, 40, 40, 32]" in r.stdout and "RAS" in r.stdout
