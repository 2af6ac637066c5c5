"""cache.py: prepare (good and bad files, resume, version hash, workers), PretrainDataset, StepSampler, collate,
and the `prepare` CLI (datalist paths relative to the JSON, the hippocampus folder without its label maps).

Everything runs on small volumes written into tmp_path; tests that read the real volumes in ../shared/data are
marked `requires_shared`. Nothing is copied into the repo.
"""
import json
import logging
import os
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import torch

import cache
import data
import phantoms
from conftest import DATA, ROOT, requires_shared, run_here
from test_data import _bad_files, phantom, save_nii

HIPPO = DATA / "msd_hippocampus"


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
    cache_dir = tmp_path / "cache"
    summary = cache.prepare(dl, cache_dir, workers=2, progress=False)
    err = capsys.readouterr().err
    index = cache.load_index(cache_dir)
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
        arr = np.load(cache_dir / e["file"])
        assert arr.dtype == np.float16 and list(arr.shape) == e["shape"] and min(arr.shape) > 24
        assert np.isfinite(arr).all() and arr.min() >= -1 and arr.max() <= 1
    assert index["version"] == cache.prep_version() and not list(cache_dir.glob("*.tmp*"))

    # resume: nothing is redone, files untouched, bad ones not retried
    mtimes = {p: p.stat().st_mtime_ns for p in cache_dir.glob("*.npy")}
    again = cache.prepare(dl, cache_dir, workers=2, progress=False)
    assert again["new"] == 0 and again["rejected"] == [] and again["skipped"] == len(json.loads(dl.read_text()))
    assert {p: p.stat().st_mtime_ns for p in cache_dir.glob("*.npy")} == mtimes
    # a deleted cache file is redone
    os.remove(cache_dir / index["entries"][0]["file"])
    assert cache.prepare(dl, cache_dir, workers=0, progress=False)["new"] == 1


def test_prepare_version_hash_rebuilds(tmp_path, monkeypatch):
    src = tmp_path / "src"
    src.mkdir()
    paths = [save_nii(src / f"v{i}.nii.gz", phantom(seed=i)) for i in range(2)]
    first = cache.prepare(paths, tmp_path / "c", workers=0, progress=False)
    assert first["new"] == 2
    v0 = cache.load_index(tmp_path / "c")
    monkeypatch.setattr(cache, "PREP_VERSION", cache.PREP_VERSION + 1)  # newer preprocessing code
    again = cache.prepare(paths, tmp_path / "c", workers=0, progress=False)
    v = cache.load_index(tmp_path / "c")
    assert again["new"] == 2 and v["version"] == cache.prep_version() != v0["version"]  # newer code: rebuilt
    for e in v["entries"]:
        assert np.load(tmp_path / "c" / e["file"]).dtype == np.float16


def test_prepare_workers_do_not_change_the_index(tmp_path):
    paths = []
    for i in range(4):
        paths.append(save_nii(tmp_path / f"v{i}.nii.gz", phantom(seed=i)))
    cache.prepare(paths, tmp_path / "a", workers=0, progress=False)
    cache.prepare(paths, tmp_path / "b", workers=2, progress=False)
    assert cache.load_index(tmp_path / "a")["entries"] == cache.load_index(tmp_path / "b")["entries"]


# -----------------------------------------------------------------------------
# PretrainDataset, StepSampler, collate


@pytest.fixture(scope="module")
def small_cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("cache")
    paths = [save_nii(root / f"v{i}.nii.gz", phantom((40 + 2 * i, 36, 32), seed=i)) for i in range(5)]
    cache.prepare(paths, root / "cache", workers=0, progress=False)
    return root / "cache"


def _equal(a, b):
    return a["index"] == b["index"] and all(torch.equal(x, y) for x, y in zip(a["global_crops"] + a["local_crops"],
                                                                             b["global_crops"] + b["local_crops"]))


def test_pretrain_dataset_layout_and_determinism(small_cache):
    ds = cache.PretrainDataset(small_cache, n_local=8, seed=0)
    it = ds[3]
    assert set(it) == {"global_crops", "local_crops", "index", "k"} and it["k"] == 3
    assert len(it["global_crops"]) == 2 and len(it["local_crops"]) == 8
    shape = cache.load_index(small_cache)["entries"][it["index"]]["shape"]
    for c in it["global_crops"] + it["local_crops"]:
        assert c.dtype == torch.float32 and c.shape[0] == 1 and all(0 < s <= n for s, n in zip(c.shape[1:], shape))
        assert c.min() >= -1 and c.max() <= 1
    g_vox = min(c[0].numel() for c in it["global_crops"])
    assert g_vox > max(c[0].numel() for c in it["local_crops"])  # global boxes are bigger than local ones
    assert _equal(it, cache.PretrainDataset(small_cache, n_local=8, seed=0)[3])  # pure function of (seed, rank, k)
    assert not _equal(it, cache.PretrainDataset(small_cache, n_local=8, seed=1)[3])
    assert not _equal(ds[3], ds[4])


def test_pretrain_dataset_ranks_partition_each_pass(small_cache):
    n = 5
    r0 = cache.PretrainDataset(small_cache, rank=0, world_size=2)
    r1 = cache.PretrainDataset(small_cache, rank=1, world_size=2)
    # pass 0 covers global positions 0..4: rank 0 takes k = 0, 1, 2 (positions 0, 2, 4), rank 1 k = 0, 1
    seen0, seen1 = [r0.volume_for(k) for k in range(3)], [r1.volume_for(k) for k in range(2)]
    assert sorted(seen0 + seen1) == list(range(n))
    assert not _equal(r0[0], r1[0])  # ranks draw different samples for the same k
    single = cache.PretrainDataset(small_cache)
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

    ds = cache.PretrainDataset(small_cache, n_local=8)
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
    cache.prepare(paths, tmp_path / "c", workers=0, progress=False)
    e = cache.load_index(tmp_path / "c")["entries"][0]
    vol = np.load(tmp_path / "c" / e["file"]).astype(np.float32)
    padded = np.full([max(n, pad_to) for n in vol.shape], -1.0, np.float32)
    offs = [max(pad_to - n, 0) // 2 for n in vol.shape]
    padded[tuple(slice(o, o + n) for o, n in zip(offs, vol.shape))] = vol
    ds = cache.PretrainDataset(tmp_path / "c", n_local=8, pad_to=pad_to)
    boxes, sample = [], cache.sample_crop_box
    monkeypatch.setattr(cache, "sample_crop_box", lambda *a, **k: boxes.append(sample(*a, **k)) or boxes[-1])
    for k in range(3):
        boxes.clear()
        it = ds[k]
        for (h0, w0, d0, ch, cw, cd), c in zip(boxes, it["global_crops"] + it["local_crops"]):
            assert c.dtype == torch.float32
            np.testing.assert_array_equal(c[0].numpy(), padded[h0:h0 + ch, w0:w0 + cw, d0:d0 + cd])


def test_dataloader_workers_and_resume_give_identical_batches():
    ds = cache.PretrainDataset(phantoms.SyntheticVolumes(16, (32, 32, 32), seed=1), n_local=2, seed=7)

    def batches(workers, start, n):
        loader = torch.utils.data.DataLoader(ds, batch_size=3, sampler=cache.StepSampler(start), num_workers=workers,
                                             collate_fn=cache.collate_pretrain)
        return [b for b, _ in zip(loader, range(n))]

    b0, b2, resumed = batches(0, 0, 3), batches(2, 0, 3), batches(0, 6, 1)
    for x, y in zip(b0, b2):
        assert torch.equal(x["index"], y["index"]) and torch.equal(x["k"], y["k"])
        for vx, vy in zip(x["global_crops"] + x["local_crops"], y["global_crops"] + y["local_crops"]):
            assert all(torch.equal(a, b) for a, b in zip(vx, vy))
    assert torch.equal(resumed[0]["k"], torch.tensor([6, 7, 8])) and torch.equal(resumed[0]["index"], b0[2]["index"])
    assert all(torch.equal(a, b) for a, b in zip(resumed[0]["global_crops"][1], b0[2]["global_crops"][1]))


def test_collate_layout():
    ds = cache.PretrainDataset(phantoms.SyntheticVolumes(4, (32, 32, 32)), n_local=3)
    samples = [ds[k] for k in range(4)]
    b = cache.collate_pretrain(samples)
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
            raise cache.VolumeError(f"tiny[{i}]: broken on purpose")
        return {"image": torch.full((1, 10, 12, 8), 0.5)}


def test_volume_smaller_than_crop_is_padded_with_background():
    ds = cache.PretrainDataset(_Tiny(), n_local=4, pad_to=24)
    for k in range(4):
        it = ds[k]
        crops = it["global_crops"] + it["local_crops"]
        assert all(max(c.shape[1:]) <= 24 for c in crops)
        assert any(c.shape[1] > 10 or c.shape[3] > 8 for c in it["global_crops"])  # only possible when padded
        values = set(torch.unique(torch.cat([c.flatten() for c in crops])).tolist())
        assert values <= {-1.0, 0.5} and -1.0 in values


def test_bad_volume_at_train_time_is_logged_and_replaced(caplog):
    ds = cache.PretrainDataset(_Tiny(bad={1}), n_local=1)
    k = next(k for k in range(20) if ds.volume_for(k) == 1)
    with caplog.at_level(logging.WARNING):
        it = ds[k]
    assert it["index"] != 1 and "tiny[1]: broken on purpose" in caplog.text and "_Tiny[1]" in caplog.text
    assert _equal(it, cache.PretrainDataset(_Tiny(bad={1}), n_local=1)[k])  # the replacement is deterministic
    assert _equal(it, ds[k])  # ... also once the volume is known to be bad (skipped without re-reading)
    with pytest.raises(RuntimeError, match="bad volumes in a row"):
        cache.PretrainDataset(_Tiny(bad={0, 1, 2}), n_local=1)[0]


def test_bad_cache_file_at_train_time(small_cache, tmp_path, caplog):
    import shutil

    cache_dir = tmp_path / "cache"
    shutil.copytree(small_cache, cache_dir)
    ds = cache.PretrainDataset(cache_dir, n_local=2)
    k = 0
    victim = cache_dir / ds.entries[ds.volume_for(k)]["file"]
    victim.write_bytes(b"\x93NUMPY garbage")
    with caplog.at_level(logging.WARNING):
        it = ds[k]
    assert str(victim) in caplog.text and it["index"] != ds.volume_for(k)


def test_stale_cache_is_refused_with_the_prepare_command(small_cache, tmp_path):
    import shutil

    cache_dir = tmp_path / "cache"
    shutil.copytree(small_cache, cache_dir)
    index = cache.load_index(cache_dir)
    index["version"] = "0123456789ab"
    (cache_dir / "index.json").write_text(json.dumps(index))
    with pytest.raises(cache.VolumeError, match="preprocessing version 0123456789ab") as err:
        cache.PretrainDataset(cache_dir)
    assert f"python cache.py prepare --datalist <its datalist> --out {cache_dir}" in str(err.value)
    index["version"], index["params"]["dtype"] = cache.prep_version(), "float32"  # an older float32 cache
    (cache_dir / "index.json").write_text(json.dumps(index))
    with pytest.raises(cache.VolumeError, match="float32"):
        cache.PretrainDataset(cache_dir)


def test_synthetic_default_and_files_only_through_a_cache(tmp_path):
    ds = cache.PretrainDataset(None, n_local=2)
    assert isinstance(ds.volumes, phantoms.SyntheticVolumes) and len(ds[0]["global_crops"]) == 2
    x = phantom((40, 40, 32))
    paths = [save_nii(tmp_path / "a.nii.gz", np.stack([x, x[::-1]], -1)), save_nii(tmp_path / "b.nii.gz", x)]
    glob = str(tmp_path / "*.nii.gz")
    for source in (glob, tmp_path, paths):  # a glob, a folder, a list of files: refused with the command to run
        with pytest.raises(cache.VolumeError, match="not a prepared cache") as err:
            cache.PretrainDataset(source, n_local=2)
        assert "python cache.py prepare --datalist" in str(err.value)
    cache.prepare(glob, tmp_path / "c", workers=0, progress=False)
    prepared = cache.PretrainDataset(tmp_path / "c", n_local=2)
    it = prepared[0]
    assert len(prepared) == 3 and it["global_crops"][0].shape[0] == 1  # both frames of the 4D file are volumes
    assert _equal(it, cache.PretrainDataset(tmp_path / "c", n_local=2)[0])  # a pure function of (seed, rank, k)
    with pytest.raises(ValueError, match="no usable volumes"):
        cache.PretrainDataset(tmp_path / "c", min_axis_size=40)  # every volume filtered out


def test_step_sampler():
    it = iter(cache.StepSampler(start=5))
    assert [next(it) for _ in range(4)] == [5, 6, 7, 8]


# -----------------------------------------------------------------------------
# end to end: real volumes -> prepare -> dataset -> loader -> augment.make_views -> the reference's batch


@requires_shared
@pytest.mark.slow
def test_end_to_end_real_hippocampus_to_reference_batch(tmp_path):
    images = sorted((HIPPO / "images").glob("*.nii.gz"))[:4]
    summary = cache.prepare([str(p) for p in images], tmp_path / "cache", workers=2, progress=False)
    assert summary["new"] == 4 and summary["rejected"] == []
    B, n_local = 2, 8
    ds = cache.PretrainDataset(tmp_path / "cache", n_local=n_local)
    loader = torch.utils.data.DataLoader(ds, batch_size=B, sampler=cache.StepSampler(0), num_workers=0,
                                         collate_fn=cache.collate_pretrain, drop_last=True)
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


def test_cli_prepare(tmp_path):
    """A folder goes straight into `prepare` (no datalist needed); a broken file is named and skipped."""
    src = tmp_path / "src"
    src.mkdir()
    for i in range(2):
        save_nii(src / f"v{i}.nii.gz", phantom(seed=i))
    (src / "broken.nii.gz").write_bytes(b"junk")
    r = subprocess.run([sys.executable, str(ROOT / "cache.py"), "prepare", "--datalist", str(src), "--out",
                        str(tmp_path / "cache"), "--workers", "1"], capture_output=True, text=True)
    assert r.returncode == 0 and "broken.nii.gz" in r.stderr, r.stderr
    assert json.loads(r.stdout.strip().splitlines()[-1])["entries"] == 2


# ---- what prepare reads from a datalist or a dataset folder --------------------------------------------------------

def test_datalist_paths_are_read_relative_to_the_json_then_prepare_fails_when_nothing_usable(tmp_path):
    """A datalist's relative paths are read relative to the JSON's folder whatever the current folder, and
    prepare fails when it wrote nothing usable."""
    vols = tmp_path / "vols"
    vols.mkdir()
    for i in range(2):
        nib.save(nib.Nifti1Image(np.random.rand(20, 20, 20).astype(np.float32), np.eye(4)), vols / f"v{i}.nii.gz")
    work = tmp_path / "work"
    (work / "sub").mkdir(parents=True)
    (work / "sub" / "list.json").write_text(json.dumps([{"image": f"../../vols/v{i}.nii.gz"} for i in range(2)]))
    p = run_here(ROOT / "cache.py", "prepare", "--datalist", "sub/list.json", "--out", "cache", "--min_axis_size=8",
                 cwd=work)
    assert p.returncode == 0, p.stderr
    assert len(cache.load_index(work / "cache")["entries"]) == 2
    (work / "bad.json").write_text(json.dumps([{"image": "missing.nii.gz"}]))
    p = run_here(ROOT / "cache.py", "prepare", "--datalist", "bad.json", "--out", "cache2", cwd=work)
    assert p.returncode == 1 and "holds no usable volume" in p.stderr


@requires_shared
def test_hippocampus_folder_pretrains_on_its_200_images_only(tmp_path):
    from conftest import DATA

    hip = DATA / "msd_hippocampus"
    sources = [s["image"] for s in data.pretrain_sources(hip)]
    assert len(sources) == 200 and all("/images/" in s for s in sources)  # not the 200 label maps
    p = run_here(ROOT / "cache.py", "prepare", "--datalist", hip, "--out", tmp_path / "cache", "--workers=1",
                 "--min_axis_size=8")
    assert p.returncode == 0, p.stderr[-2000:]
    assert "skipped 200 label maps" in p.stderr and "under labels/" in p.stderr
    entries = cache.load_index(tmp_path / "cache")["entries"]
    assert len(entries) == 200 and not [e for e in entries if "/labels/" in e["source"]]
