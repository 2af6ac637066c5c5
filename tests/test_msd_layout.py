"""The official Medical Segmentation Decathlon layout (imagesTr/, labelsTr/, imagesTs/, dataset.json with every
labelled case under "training", no validation list, "test" as plain unlabelled paths), and the data hazards a
user should hear about: a label that lies elsewhere in space than its image, a case in two splits.

Built from a few real hippocampus cases (symlinks), run through finetune_seg.py and linear_probe.py at a tiny
size."""
import json
import os
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

from conftest import DATA, ROOT, requires_shared, run_here

HIPPO = DATA / "msd_hippocampus"
TINY_SEG = ["--num_classes=3", "--embed_dim=32", "--depth=4", "--num_heads=2", "--patch_size=8", "--crop_size=16",
            "--head=linear", "--batch_size=1", "--samples_per_volume=1", "--max_iters=2", "--eval_interval=1",
            "--warmup_iters=0", "--num_workers=0", "--threads=1", "--save_predictions=False"]
TINY_PROBE = ["configs/probe_hippocampus.py", "--arch=vit_tiny", "--image_size=32", "--max_iters=2", "--n_runs=1",
              "--threads=1", "--split=(4, 2, 2)", "--split_per_run=False",
              "--split_seed=1"]  # split_seed 1: both classes in every list of these 9 cases


def run(*args):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)


@pytest.fixture
def msd(tmp_path):
    """8 labelled training cases (the first one's label moved 10 mm away from its image), 2 unlabelled test
    images in imagesTs/, and the second training case listed again under "test" (with its label)."""
    root = tmp_path / "Task04_Hippocampus"
    for d in ("imagesTr", "labelsTr", "imagesTs"):
        (root / d).mkdir(parents=True)
    names = sorted(os.listdir(HIPPO / "images"))[:10]
    train, test = names[:8], names[8:]
    for n in train:
        (root / "imagesTr" / n).symlink_to(HIPPO / "images" / n)
        (root / "labelsTr" / n).symlink_to(HIPPO / "labels" / n)
    for n in test:
        (root / "imagesTs" / n).symlink_to(HIPPO / "images" / n)
    moved = root / "labelsTr" / train[0]
    lab = nib.load(moved.resolve())
    affine = lab.affine.copy()
    affine[0, 3] += 10.0  # 10 mm along x: same voxels, another place in space
    moved.unlink()
    nib.save(nib.Nifti1Image(np.asarray(lab.dataobj), affine, lab.header), moved)
    meta = {"name": "Hippocampus", "labels": {"0": "background", "1": "Anterior", "2": "Posterior"},
            "numTraining": len(train), "numTest": len(test),
            "training": [{"image": f"./imagesTr/{n}", "label": f"./labelsTr/{n}"} for n in train],
            "test": [f"./imagesTs/{n}" for n in test]
            + [{"image": f"./imagesTr/{train[1]}", "label": f"./labelsTr/{train[1]}"}]}
    (root / "dataset.json").write_text(json.dumps(meta, indent=1))
    return root, train, test


@requires_shared
def test_finetune_without_a_validation_list_says_how_to_get_one(msd, tmp_path):
    root, _, _ = msd
    p = run_here(ROOT / "finetune_seg.py", *TINY_SEG, f"--datalist={root}", f"--out_dir={tmp_path / 'seg'}")
    assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr[-2000:]
    assert "no validation cases" in p.stderr and "--val_fraction=" in p.stderr, p.stderr[-2000:]


@requires_shared
@pytest.mark.slow
def test_finetune_on_the_msd_layout_holds_out_validation_and_warns(msd, tmp_path):
    root, train, test = msd
    out = tmp_path / "seg"
    p = run(ROOT / "finetune_seg.py", *TINY_SEG, f"--datalist={root}", f"--out_dir={out}", "--val_fraction=0.25")
    assert p.returncode == 0, p.stderr[-3000:]
    assert "no validation list: 2 of its 8 training cases are held out for validation" in p.stdout, p.stdout
    case0, case1 = (n.removesuffix(".nii.gz") for n in train[:2])
    moved = [line for line in p.stdout.splitlines() if line.startswith(f"warning: case {case0}: label")]
    assert len(moved) == 1 and "10 mm away from its image" in moved[0], p.stdout
    twice = [line for line in p.stdout.splitlines() if line.startswith(f"warning: case {case1}")]
    assert len(twice) == 1 and "in both the training and the test list" in twice[0], p.stdout
    assert sum(line.startswith("warning: case") for line in p.stdout.splitlines()) == 2, p.stdout  # no others
    res = json.loads((out / "results.json").read_text())
    assert len(res["train_cases"]) == 6 and len(res["val_dice_list"]) == 3  # 8 - 2 held out; iterations 0, 1, 2
    # the two imagesTs cases are predicted without a score; the labelled test case is scored
    by_case = {c["case"]: c for c in res["test_cases"]}
    assert set(by_case) >= {n.removesuffix(".nii.gz") for n in test}
    assert all(by_case[n.removesuffix(".nii.gz")]["dice"] is None for n in test)
    # the same split for the same split_seed
    again = run(ROOT / "finetune_seg.py", *TINY_SEG, f"--datalist={root}", f"--out_dir={tmp_path / 'seg2'}",
                "--val_fraction=0.25", "--max_iters=1")
    assert again.returncode == 0, again.stderr[-2000:]
    res2 = json.loads((tmp_path / "seg2" / "results.json").read_text())
    assert sorted(res2["train_cases"]) == sorted(res["train_cases"])


@requires_shared
@pytest.mark.slow
def test_probe_on_the_msd_layout_leaves_out_unlabelled_cases(msd, tmp_path):
    root, train, test = msd
    out = tmp_path / "probe"
    p = run(ROOT / "linear_probe.py", *TINY_PROBE, f"--datalist={root}", f"--out_dir={out}")
    assert p.returncode == 0, p.stderr[-3000:]
    assert "2 unlabelled case(s) of the test list left out" in p.stdout, p.stdout
    case1 = train[1].removesuffix(".nii.gz")
    twice = [line for line in p.stdout.splitlines() if line.startswith("warning: case")]
    assert len(twice) == 1 and case1 in twice[0] and "training and the test list" in twice[0], p.stdout
    assert "9 cases" in p.stdout  # 8 training + the labelled test case; the imagesTs cases are gone
    assert json.loads((out / "results.json").read_text())["summary"]
    # without split: no validation list in the MSD layout, and the error says how to get one
    p = run(ROOT / "linear_probe.py", *TINY_PROBE, "--split=()", f"--datalist={root}", f"--out_dir={tmp_path / 'p2'}")
    assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr[-2000:]
    assert "the validation list is empty (split=(n_train, n_val, n_test)" in p.stderr, p.stderr[-2000:]


@requires_shared
@pytest.mark.slow
def test_hazards_in_a_datalist_with_all_three_lists(tmp_path):
    """A reference-style datalist (training, validation, test): the label 10 mm away from its image and the test
    case that is also a training case each get one warning line naming the case, in finetune_seg.py and (the
    duplicate; its labels are class indices) in linear_probe.py. Before: both were used without a word."""
    names = sorted(os.listdir(HIPPO / "images"))[:6]
    moved = tmp_path / f"moved_{names[0]}"
    lab = nib.load(HIPPO / "labels" / names[0])
    affine = lab.affine.copy()
    affine[:3, 3] += [6.0, 8.0, 0.0]  # 10 mm away
    nib.save(nib.Nifti1Image(np.asarray(lab.dataobj), affine, lab.header), moved)
    item = lambda n: {"image": str(HIPPO / "images" / n), "label": str(HIPPO / "labels" / n)}  # noqa: E731
    seg_list = {"training": [{"image": str(HIPPO / "images" / names[0]), "label": str(moved)}, item(names[1]),
                             item(names[2])],
                "validation": [item(names[3])], "test": [item(names[4]), item(names[1])]}
    (tmp_path / "seg.json").write_text(json.dumps(seg_list))
    p = run(ROOT / "finetune_seg.py", *TINY_SEG, f"--datalist={tmp_path / 'seg.json'}", "--max_iters=1",
            f"--out_dir={tmp_path / 'seg'}")
    assert p.returncode == 0, p.stderr[-3000:]
    warned = [line for line in p.stdout.splitlines() if line.startswith("warning: case")]
    case0, case1 = (n.removesuffix(".nii.gz") for n in names[:2])
    assert len(warned) == 2, p.stdout
    assert any(f"warning: case {case0}: label {moved} lies up to 10 mm away from its image" in w for w in warned)
    assert any(f"warning: case {case1} " in w and "both the training and the test list" in w for w in warned)

    probe_list = {"training": [{"image": str(HIPPO / "images" / n), "label": k % 2} for k, n in enumerate(names[:4])],
                  "validation": [{"image": str(HIPPO / "images" / n), "label": k} for k, n in enumerate(names[4:6])],
                  "test": [{"image": str(HIPPO / "images" / n), "label": k} for k, n in enumerate(names[:2])]}
    (tmp_path / "probe.json").write_text(json.dumps(probe_list))
    p = run(ROOT / "linear_probe.py", "--arch=vit_tiny", "--image_size=32", "--max_iters=2", "--n_runs=1",
            "--threads=1", "--device=cpu", f"--datalist={tmp_path / 'probe.json'}", f"--out_dir={tmp_path / 'probe'}")
    assert p.returncode == 0, p.stderr[-3000:]
    warned = [line for line in p.stdout.splitlines() if line.startswith("warning: case")]
    assert len(warned) == 2 and all("both the training and the test list" in w for w in warned), p.stdout
    assert case0 in warned[0] and case1 in warned[1], warned
