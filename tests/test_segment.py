"""segment.py and the self-contained best.pt: the segmenter rebuilt from best.pt alone
(adapter.segmenter_from_checkpoint), the sliding window's progress report, segment.py's input errors, and, on a real
tiny finetune_seg.py run, new scans in another orientation and spacing segmented on their own grid, after the
pretrained backbone's folder was moved, with the test pass's exact predictions."""
import json
import os
import shutil
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import torch

from conftest import ROOT

import adapter
import data
import phantoms
import metrics
import model
import segment

# a tiny ViT and adapter (configs/seg_synthetic.py's sizes): 32^3 windows, patch 8
VIT_ARGS = dict(img_size=32, patch_size=8, embed_dim=48, depth=4, num_heads=2)
HEAD_KW = {"feature_size": 8, "deform_num_heads": 2}


def _meta(**over):
    meta = {"vit_args": model.ViT3D(**VIT_ARGS).args, "head": "vit_adapter_unetr", "head_kw": HEAD_KW, "in_chans": 1,
            "n_out": 4, "regions": None, "num_classes": 4, "class_names": ["liver", "kidneys", "lesion"],
            "crop_size": 32, "target_spacing": (2.0, 2.0, 2.0), "ct_window": None, "crop_foreground": False,
            "blend": "constant", "test_overlap": 0.5, "sw_batch_size": 2}
    return {**meta, **over}


def _tiny_best(path, **over):
    """A best.pt as finetune_seg.py writes it, of an untrained tiny segmenter (weights moved off their init)."""
    meta = _meta(**over)
    torch.manual_seed(0)
    net = adapter.build_segmenter(meta["head"], model.ViT3D(**meta["vit_args"]), meta["in_chans"], meta["n_out"],
                                  **meta["head_kw"])
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.02 * torch.randn_like(p))
    torch.save({"model": net.state_dict(), "iter_num": 10, "val_dice": 0.5, "config": {"pretrained": "gone.pt"},
                "segmenter": meta}, path)
    return net.eval()


def _write(path, arr, affine):
    nib.save(nib.Nifti1Image(np.asarray(arr), affine), str(path))
    return str(path)


# -----------------------------------------------------------------------------
# sliding-window progress, the checkpoint


def test_sliding_window_reports_progress_without_changing_the_result():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv3d(1, 4, 3, padding=1), torch.nn.GELU(),
                              torch.nn.Conv3d(4, 2, 3, padding=1))
    x = torch.randn(1, 1, 23, 17, 30)
    calls = []
    plain = adapter.sliding_window_inference(x, 8, net, 0.5, "gaussian", 3)
    with_cb = adapter.sliding_window_inference(x, 8, net, 0.5, "gaussian", 3,
                                               progress=lambda k, n: calls.append((k, n)))
    with_bar = adapter.sliding_window_inference(x, 8, net, 0.5, "gaussian", 3, progress=True)
    assert torch.equal(plain, with_cb) and torch.equal(plain, with_bar)
    n = len(adapter.window_starts(23, 8, 0.5)) * len(adapter.window_starts(17, 8, 0.5)) * len(
        adapter.window_starts(30, 8, 0.5))  # 5 x 3 x 7 = 105 windows, in batches of 3
    assert calls == [(min(k, n), n) for k in range(3, n + 3, 3)]


def test_segmenter_rebuilds_from_best_pt_alone(tmp_path):
    net = _tiny_best(tmp_path / "best.pt")
    obj = torch.load(tmp_path / "best.pt", weights_only=True)  # plain python and tensors only
    got, meta = adapter.segmenter_from_checkpoint(str(tmp_path / "best.pt"))
    assert meta == obj["segmenter"] and not got.training
    x = torch.randn(1, 1, 32, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(got(x), net(x), rtol=0, atol=0)


def test_checkpoints_that_are_not_a_self_contained_best_pt_are_refused(tmp_path):
    _tiny_best(tmp_path / "best.pt")
    obj = torch.load(tmp_path / "best.pt", weights_only=True)
    older = {k: v for k, v in obj.items() if k != "segmenter"}  # a best.pt of an older finetune_seg.py
    torch.save(older, tmp_path / "old_best.pt")
    with pytest.raises(model.CheckpointError, match=r"old_best.pt: .*missing \['vit_args', 'head'.*re-run finetune"):
        adapter.segmenter_from_checkpoint(str(tmp_path / "old_best.pt"))
    partial = {**obj, "segmenter": {k: v for k, v in obj["segmenter"].items() if k != "target_spacing"}}
    with pytest.raises(model.CheckpointError, match=r"missing \['target_spacing'\]"):
        adapter.segmenter_from_checkpoint(partial)
    torch.save({"model": obj["model"], "optimizer": {}, "best_val": 0.5, "iter_num": 3}, tmp_path / "ckpt.pt")
    with pytest.raises(model.CheckpointError, match="resumable ckpt.pt; use best.pt"):
        adapter.segmenter_from_checkpoint(str(tmp_path / "ckpt.pt"))
    vit = model.ViT3D(**VIT_ARGS)
    torch.save({"teacher": vit.state_dict(), "model_args": vit.args}, tmp_path / "teacher_backbone.pt")
    with pytest.raises(model.CheckpointError, match="teacher_backbone.pt: not a segmentation checkpoint"):
        adapter.segmenter_from_checkpoint(str(tmp_path / "teacher_backbone.pt"))
    wrong = {**obj, "segmenter": {**obj["segmenter"], "n_out": 3}}  # settings that do not describe the weights
    with pytest.raises(model.CheckpointError, match="do not fit"):
        adapter.segmenter_from_checkpoint(wrong)


# -----------------------------------------------------------------------------
# segment.py's input errors (in-process: they come before any work) and --overwrite


def test_segment_input_errors_come_first(tmp_path):
    _tiny_best(tmp_path / "best.pt")
    affine = np.diag([1.5, 1.5, 2.0, 1.0])
    scan = _write(tmp_path / "scan.nii.gz", np.random.default_rng(0).normal(size=(20, 22, 14)).astype(np.float32),
                  affine)
    out = tmp_path / "pred"

    def error(*argv):
        with pytest.raises(Exception) as e:
            segment.main(["--threads", "1", *argv])
        assert getattr(e.value, "input_error", False), e.value  # printed as `error: ...` without a traceback
        return str(e.value)

    assert "missing.nii.gz: file not found" in error("--ckpt", str(tmp_path / "best.pt"), "--input",
                                                     str(tmp_path / "missing.nii.gz"), "--out", str(out))
    (tmp_path / "empty").mkdir()
    assert "empty: no volumes found" in error("--ckpt", str(tmp_path / "best.pt"), "--input", str(tmp_path / "empty"),
                                              "--out", str(out))
    assert "nope.pt: checkpoint not found" in error("--ckpt", str(tmp_path / "nope.pt"), "--input", scan,
                                                    "--out", str(out))
    assert "scan.nii.gz: not a checkpoint" in error("--ckpt", scan, "--input", scan, "--out", str(out))
    two = _write(tmp_path / "two.nii.gz", np.zeros((20, 22, 14, 2), np.float32), affine)
    msg = error("--ckpt", str(tmp_path / "best.pt"), "--input", two, "--out", str(out))
    assert "two.nii.gz: 2 channel(s)" in msg and "in_chans=1" in msg
    listed = tmp_path / "dl.json"  # a datalist's list of files is one multi-channel case
    listed.write_text(json.dumps({"test": [{"image": ["scan.nii.gz", "scan.nii.gz"]}]}))
    assert "scan.nii.gz: 2 channel(s)" in error("--ckpt", str(tmp_path / "best.pt"), "--input", str(listed),
                                                "--out", str(out))
    np.save(tmp_path / "arr.npy", np.zeros((20, 22, 14), np.float32))
    assert "arr.npy: a .npy array has no voxel grid" in error("--ckpt", str(tmp_path / "best.pt"), "--input",
                                                              str(tmp_path / "arr.npy"), "--out", str(out))
    assert not out.exists()  # nothing written by a refused run

    # an existing output is refused without --overwrite, left as it was, and replaced with it
    out.mkdir()
    (out / "scan.nii.gz").write_bytes(b"keep")
    assert "--overwrite" in error("--ckpt", str(tmp_path / "best.pt"), "--input", scan, "--out", str(out))
    assert (out / "scan.nii.gz").read_bytes() == b"keep"
    segment.main(["--threads", "1", "--ckpt", str(tmp_path / "best.pt"), "--input", scan, "--out", str(out),
                  "--overwrite"])
    pred = nib.load(out / "scan.nii.gz")
    assert pred.shape == (20, 22, 14) and np.allclose(pred.affine, affine) and pred.get_data_dtype() == np.uint8
    assert sorted(os.listdir(out)) == ["scan.nii.gz"]  # no temporary file left behind


def test_multichannel_region_run_writes_one_mask_per_region(tmp_path):
    # a BraTS-like segmenter (2 channels, 3 overlapping regions, sigmoid): a datalist's list of files is one case,
    # named after its first file; the output is (X, Y, Z, R) on the first file's grid, in its orientation (LPS here)
    regions = [[1, 3], [1, 2, 3], [3]]
    _tiny_best(tmp_path / "best.pt", in_chans=2, n_out=3, regions=regions, num_classes=4, target_spacing=None)
    affine = np.diag([-1.0, -1.2, 1.5, 1.0])
    rng = np.random.default_rng(0)
    for name in ("t1", "flair"):
        _write(tmp_path / f"case7_{name}.nii.gz", rng.normal(size=(20, 22, 14)).astype(np.float32), affine)
    (tmp_path / "dl.json").write_text(json.dumps({"validation": [{"image": ["case7_t1.nii.gz", "case7_flair.nii.gz"],
                                                                  "label": "not_needed.nii.gz"}]}))
    (out,) = segment.main(["--threads", "1", "--ckpt", str(tmp_path / "best.pt"), "--input", str(tmp_path / "dl.json"),
                           "--out", str(tmp_path / "pred")])
    pred = nib.load(out)
    assert os.path.basename(out) == "case7_t1.nii.gz" and pred.shape == (20, 22, 14, 3)
    assert np.allclose(pred.affine, affine) and set(np.unique(np.asarray(pred.dataobj))) <= {0, 1}


def test_segment_error_is_one_line_on_the_command_line(tmp_path):
    p = subprocess.run([sys.executable, "segment.py", "--ckpt", str(tmp_path / "nope.pt"), "--input", "x.nii.gz",
                        "--out", str(tmp_path / "o")], cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 1 and "Traceback" not in p.stderr
    assert p.stderr.startswith("error: ") and "x.nii.gz: file not found" in p.stderr


# -----------------------------------------------------------------------------
# a real tiny finetune_seg.py run, then segment.py on new files


SPACING = (1.5, 1.5, 2.0)  # the files' voxels; the run resamples to 2 mm isotropic (target_spacing)


def _run(script, *args):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, script, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    if p.returncode != 0:
        raise AssertionError(f"{script} {' '.join(args)} failed:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return p


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """finetune_seg.py on synthetic phantoms stored as RAS NIfTI files (1.5 x 1.5 x 2 mm, trained at 2 mm), from a
    tiny "pretrained" backbone whose folder is moved away after the run."""
    tmp = tmp_path_factory.mktemp("seg")
    (tmp / "pre").mkdir()
    torch.manual_seed(1)
    vit = model.ViT3D(**VIT_ARGS)
    torch.save({"teacher": {f"backbone.{k}": v for k, v in vit.state_dict().items()}, "model_args": vit.args},
               tmp / "pre" / "teacher_backbone.pt")
    affine = np.diag([*SPACING, 1.0])
    affine[:3, 3] = [-30, 12, 40]
    dl = {}
    for s, (split, k) in enumerate(zip(data.SPLITS, (4, 1, 1))):
        vols = phantoms.SyntheticVolumes(k, (40, 44, 36), seed=200 + s, with_labels=True)
        dl[split] = [{"image": _write(tmp / f"{split}_{i}_img.nii.gz", vols[i]["image"][0].numpy(), affine),
                      "label": _write(tmp / f"{split}_{i}_lab.nii.gz", vols[i]["label"].numpy().astype(np.uint8),
                                      affine)} for i in range(k)]
    (tmp / "datalist.json").write_text(json.dumps(dl))
    _run("finetune_seg.py", "configs/seg_synthetic.py", f"--datalist={tmp / 'datalist.json'}",
         f"--out_dir={tmp / 'run'}", f"--pretrained={tmp / 'pre' / 'teacher_backbone.pt'}",
         "--target_spacing=(2.0, 2.0, 2.0)", "--max_iters=40", "--eval_interval=20", "--warmup_iters=5",
         "--threads=1")
    shutil.move(tmp / "pre", tmp / "pre_moved")  # best.pt must not need it
    return {"tmp": tmp, "best": tmp / "run" / "best.pt", "datalist": dl, "affine": affine, "vit": vit}


@pytest.mark.slow
def test_best_pt_is_self_contained(run):
    obj = torch.load(run["best"], weights_only=True)
    assert not os.path.exists(obj["config"]["pretrained"])  # the backbone's file is gone ...
    net, meta = adapter.segmenter_from_checkpoint(str(run["best"]))  # ... and the segmenter rebuilds without it
    assert set(meta) == set(adapter.SEGMENTER_KEYS)
    assert meta["vit_args"] == run["vit"].args and meta["head_kw"] == HEAD_KW and meta["crop_size"] == 32
    assert meta["target_spacing"] == (2.0, 2.0, 2.0) and meta["n_out"] == 4 and meta["test_overlap"] == 0.75
    for k, v in run["vit"].state_dict().items():  # the frozen backbone: the pretrained weights, rebuilt
        assert torch.equal(net.vit.state_dict()[k], v), k


@pytest.mark.slow
def test_new_scan_in_another_orientation_is_segmented_on_its_own_grid(run):
    """The test phantom as a RAS file and as a P-I-L file (axes permuted and flipped: a non-diagonal affine, the
    voxel sizes in another order), both at 1.5 x 1.5 x 2 mm while the run trained at 2 mm: each prediction has its
    file's shape and affine, the two agree voxel for voxel in world space, and they find the liver."""
    tmp, item = run["tmp"], run["datalist"]["test"][0]
    new = tmp / "new"
    new.mkdir()
    ras_img, ras_lab = nib.load(item["image"]), nib.load(item["label"])
    to_pil = nib.orientations.ornt_transform(nib.io_orientation(ras_img.affine), nib.orientations.axcodes2ornt("PIL"))
    pil_img, pil_lab = ras_img.as_reoriented(to_pil), ras_lab.as_reoriented(to_pil)
    assert pil_img.shape == (44, 36, 40) and np.count_nonzero(pil_img.affine[:3, :3] - np.diag(
        np.diag(pil_img.affine[:3, :3]))) == 3
    nib.save(pil_img, new / "scan_pil.nii.gz")
    shutil.copy(item["image"], new / "scan_ras.nii.gz")
    _run("segment.py", "--ckpt", str(run["best"]), "--input", str(new), "--out", str(tmp / "pred_new"),
         "--threads", "1", "--device", "cpu")
    assert sorted(os.listdir(tmp / "pred_new")) == ["scan_pil.nii.gz", "scan_ras.nii.gz"]
    pil, ras = nib.load(tmp / "pred_new" / "scan_pil.nii.gz"), nib.load(tmp / "pred_new" / "scan_ras.nii.gz")
    assert pil.shape == pil_img.shape and np.allclose(pil.affine, pil_img.affine)
    assert ras.shape == ras_img.shape and np.allclose(ras.affine, ras_img.affine)
    back = pil.as_reoriented(nib.orientations.ornt_transform(nib.io_orientation(pil.affine),
                                                             nib.orientations.axcodes2ornt("RAS")))
    assert np.allclose(back.affine, ras.affine)
    np.testing.assert_array_equal(np.asarray(back.dataobj), np.asarray(ras.dataobj))
    # on the P-I-L file's own grid, the liver lies where its label says (chance: its volume fraction, ~0.04)
    lab = np.asarray(pil_lab.dataobj)
    liver = metrics.dice(np.asarray(pil.dataobj), lab, 4)[0]
    assert np.mean(lab == 1) < 0.06 and liver > 0.25, liver


@pytest.mark.slow
def test_segment_equals_the_test_pass(run):
    tmp = run["tmp"]
    (tmp / "test_only.json").write_text(json.dumps({"test": run["datalist"]["test"]}))
    _run("segment.py", "--ckpt", str(run["best"]), "--input", str(tmp / "test_only.json"), "--out",
         str(tmp / "pred_dl"), "--threads", "1")
    ours = nib.load(tmp / "pred_dl" / "test_0_img.nii.gz")
    theirs = nib.load(tmp / "run" / "predictions" / "test_0_img.nii.gz")
    assert np.array_equal(ours.affine, theirs.affine) and ours.shape == theirs.shape
    np.testing.assert_array_equal(np.asarray(ours.dataobj), np.asarray(theirs.dataobj))
    assert np.asarray(ours.dataobj).any()  # not two empty maps
