"""Public datasets outside this repository: the split files hold paths relative to the dataset's folder, and
`data_root` (data.read_datalist's `root`, the scripts' --data_root) says where a user's copy is. Checked on a copy
of the hippocampus cases laid out exactly as the official MSD download (Task04_Hippocampus/imagesTr, labelsTr,
imagesTs, dataset.json) and on ../shared/data/msd_hippocampus (images/, labels/), which the tests use.
"""
import json
import os
from pathlib import Path

import pytest

from conftest import DATA, ROOT, requires_shared, run_here

import data

HIPPO = DATA / "msd_hippocampus"
SPLIT = ROOT / "data_splits" / "msd_hippocampus.json"
PROBE_LIST = ROOT / "data_splits" / "msd_hippocampus_probe.json"


@pytest.fixture(scope="module")
def msd_copy(tmp_path_factory):
    """Task04_Hippocampus as medicaldecathlon.com's tar unpacks it: imagesTr/ labelsTr/ imagesTs/ (symlinks to the
    shared cases), macOS "._" companions, and a dataset.json with "./imagesTr/..." items and a "test" list of plain
    paths."""
    root = tmp_path_factory.mktemp("msd") / "Task04_Hippocampus"
    for d in ("imagesTr", "labelsTr", "imagesTs"):
        (root / d).mkdir(parents=True)
    names = sorted(p.name for p in (HIPPO / "images").glob("hippocampus_*.nii.gz"))
    for n in names:
        (root / "imagesTr" / n).symlink_to(HIPPO / "images" / n)
        (root / "labelsTr" / n).symlink_to(HIPPO / "labels" / n)
    tests = [f"hippocampus_{900 + i}.nii.gz" for i in range(3)]  # unlabelled test images, as in the download
    for n, src in zip(tests, names):
        (root / "imagesTs" / n).symlink_to(HIPPO / "images" / src)
    (root / "imagesTr" / f"._{names[0]}").write_bytes(b"\0" * 10)  # the tar's AppleDouble files
    meta = {"name": "Hippocampus", "description": "Left and right hippocampus segmentation",
            "reference": "Vanderbilt University Medical Center", "licence": "CC-BY-SA 4.0", "release": "1.0 04/05/2018",
            "tensorImageSize": "3D", "modality": {"0": "MRI"},
            "labels": {"0": "background", "1": "Anterior", "2": "Posterior"},
            "numTraining": len(names), "numTest": len(tests),
            "training": [{"image": f"./imagesTr/{n}", "label": f"./labelsTr/{n}"} for n in names],
            "test": [f"./imagesTs/{n}" for n in tests]}
    (root / "dataset.json").write_text(json.dumps(meta, indent=4))
    return root


def config(path, **overrides):
    """A config file's values (plain assignments), with command-line style overrides."""
    ns = {}
    exec(Path(path).read_text(), {}, ns)
    return {**ns, **overrides}


def test_split_files_name_their_source_and_hold_paths_relative_to_the_dataset():
    for path in (SPLIT, PROBE_LIST):
        meta = json.loads(path.read_text())
        assert "medicaldecathlon.com" in meta["source"] and "CC BY-SA 4.0" in meta["source"]
        items = [it for s in data.SPLITS for it in meta.get(s, [])]
        assert len(items) == 200
        for it in items:
            assert it["image"].startswith("imagesTr/hippocampus_") and it["label"] == "labelsTr" + it["image"][8:]
    assert sorted(it["image"] for it in json.loads(PROBE_LIST.read_text())["training"]) == sorted(
        it["image"] for s in data.SPLITS for it in json.loads(SPLIT.read_text())[s])


def test_a_missing_data_root_is_an_error_that_names_it(tmp_path):
    with pytest.raises(data.VolumeError, match=f"{tmp_path / 'nowhere'}: data_root not found.*docs/datasets.md"):
        data.read_datalist(SPLIT, root=tmp_path / "nowhere")


@requires_shared
def test_split_file_resolves_under_the_official_msd_layout_and_the_shared_copy(msd_copy):
    official = data.read_datalist(SPLIT, root=msd_copy)
    shared = data.read_datalist(SPLIT, root=HIPPO)
    assert [len(official[s]) for s in data.SPLITS] == [140, 20, 40]
    for split in data.SPLITS:
        for a, b in zip(official[split], shared[split]):
            assert Path(a["image"]).parent == msd_copy / "imagesTr" and Path(a["label"]).parent == msd_copy / "labelsTr"
            assert Path(b["image"]).parent == HIPPO / "images" and Path(b["label"]).parent == HIPPO / "labels"
            assert os.path.isfile(a["image"]) and os.path.isfile(a["label"])
            assert Path(a["image"]).name == Path(b["image"]).name == Path(a["label"]).name
            assert os.path.samefile(a["image"], b["image"]) and os.path.samefile(a["label"], b["label"])
    # the download's own dataset.json reads directly too (260 training pairs there; here the copy's 200)
    whole = data.read_datalist(msd_copy)
    assert len(whole["training"]) == 200 and len(whole["test"]) == 3 and whole["test"][0]["label"] is None
    assert all(os.path.isfile(it["image"]) and os.path.isfile(it["label"]) for it in whole["training"])


@requires_shared
def test_hippocampus_configs_load_their_datalists_from_a_data_root(msd_copy):
    for cfg_file, n in (("configs/seg_hippocampus.py", (140, 20, 40)), ("configs/probe_hippocampus.py", (200, 0, 0))):
        cfg = config(ROOT / cfg_file)
        assert cfg["data_root"] == "data/Task04_Hippocampus"  # a user's path by default, set on the command line
        for root in (msd_copy, HIPPO):
            cfg = config(ROOT / cfg_file, data_root=str(root))  # as --data_root=... on the command line
            dl = data.read_datalist(ROOT / cfg["datalist"], root=cfg["data_root"])
            assert tuple(len(dl[s]) for s in data.SPLITS) == n
            assert all(it["image"].startswith(str(root)) and it["label"].startswith(str(root)) for it in dl["training"])
            case = data.load_case(dl["training"][0]["image"], dl["training"][0]["label"])
            assert case["label"].max() == 2 and case["image"].min() >= -1 and case["image"].max() <= 1
    # the probe's case order is the folder's sorted order, as when it read ../shared/data/msd_hippocampus directly
    probe = data.read_datalist(PROBE_LIST, root=HIPPO)["training"]
    assert [it["image"] for it in probe] == data.find_volumes(HIPPO / "images")


def test_the_scripts_read_data_root(tmp_path):
    """finetune_seg.py and linear_probe.py hand `data_root` to the datalist reader: a wrong one is one line naming
    it, before any work."""
    for script, cfg in (("finetune_seg.py", "configs/seg_hippocampus.py"),
                        ("linear_probe.py", "configs/probe_hippocampus.py")):
        p = run_here(script, cfg, f"--data_root={tmp_path / 'nowhere'}", f"--out_dir={tmp_path / script}")
        assert p.returncode != 0 and "Traceback" not in p.stderr, p.stderr[-2000:]
        assert f"error: {tmp_path / 'nowhere'}: data_root not found" in p.stderr, p.stderr[-2000:]
