"""finetune_seg.py end to end, run as the real script on synthetic phantoms stored as NIfTI: it learns and writes
its results and predictions, resumes a killed run exactly, rejects bad datalists before training, runs any head with
a config written for another, runs under CPU bf16 autocast, and names bad cases and bad settings in one line
without a traceback. (Its parts are tested where they live: the sliding
window and head options in test_adapter.py, the Dice losses in test_losses.py, cases and the way back to the input
grid in test_data.py, random init of a checkpoint's architecture in test_model.py.)"""
import json
import os
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import torch

from conftest import ROOT, assert_input_error, run_here, script
from test_model import _tiny_checkpoint

import data
import metrics
import phantoms


def _write(path, arr, affine):
    nib.save(nib.Nifti1Image(np.asarray(arr), affine), str(path))
    return str(path)


# -----------------------------------------------------------------------------
# the script, end to end


def _run(*args, cwd=ROOT, check=True):
    # one intra-op thread: these runs are tiny, and on a shared 2-core machine two spinning OpenMP threads slowed
    # them down 20x whenever another process was busy (the assertions hold either way)
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    p = subprocess.run([sys.executable, "finetune_seg.py", *args], cwd=cwd, env=env, capture_output=True, text=True,
                       timeout=600)
    if check and p.returncode != 0:
        raise AssertionError(f"finetune_seg.py {' '.join(args)} failed:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return p


def _phantom_datalist(tmp_path, n=(6, 2, 3), shape=(40, 44, 36)):
    """Synthetic phantoms stored as NIfTI files in LPS-like orientation with 1.5 x 1.5 x 2 mm voxels."""
    affine = np.diag([-1.5, -1.5, 2.0, 1.0])
    affine[:3, 3] = [30, 40, -20]
    dl = {}
    for s, (split, k) in enumerate(zip(data.SPLITS, n)):
        vols = phantoms.SyntheticVolumes(k, shape, seed=100 + s, with_labels=True)
        items = []
        for i in range(k):
            v = vols[i]
            img = _write(tmp_path / f"{split}_{i}_img.nii.gz", v["image"][0].numpy(), affine)
            lab = _write(tmp_path / f"{split}_{i}_lab.nii.gz", v["label"].numpy().astype(np.uint8), affine)
            items.append({"image": os.path.basename(img), "label": os.path.basename(lab)})  # relative to the JSON
        dl[split] = items
    path = tmp_path / "datalist.json"
    path.write_text(json.dumps(dl))
    return path, affine


@pytest.mark.slow
def test_short_run_learns_and_writes_results(tmp_path):
    datalist, affine = _phantom_datalist(tmp_path)
    out = tmp_path / "run"
    _run("configs/seg_synthetic.py", f"--datalist={datalist}", f"--out_dir={out}", "--max_iters=40",
         "--eval_interval=20", "--warmup_iters=5")
    res = json.loads((out / "results.json").read_text())
    for key in ("test_dice_mean", "test_dice_ci", "test_dice_per_class", "test_dice_per_class_ci",
                "test_hd95_mean", "test_hd95_ci", "test_hd95_per_class", "test_hd95_per_class_ci", "config",
                "test_cases", "val_dice_list", "best_iter"):
        assert key in res, key
    assert res["config"]["max_iters"] == 40 and len(res["test_cases"]) == 3
    lo, hi = res["test_dice_ci"]
    assert lo <= res["test_dice_mean"] <= hi

    # chance: a labelling drawn at random with the true class frequencies has expected Dice = frequency
    test = json.loads(datalist.read_text())["test"]
    labels = [np.asarray(nib.load(tmp_path / t["label"]).dataobj) for t in test]
    freq = np.mean([[np.mean(lab == c) for c in (1, 2, 3)] for lab in labels], 0)
    chance = float(freq.mean())
    assert chance < 0.03  # ~0.016: liver 4%, kidneys 0.5%, lesions 0.03% of the voxels
    # 40 steps learn the liver (Dice 0.39 measured, while chance for it is 0.04; 0.95 before the phantoms had a
    # contrast phase that decides whether the liver is brighter or darker than the body); kidneys and lesions need
    # longer runs
    assert res["test_dice_per_class"][0] > 0.2
    assert res["test_dice_mean"] > 5 * chance, (res["test_dice_mean"], chance)  # measured: 0.17 (0.32 before phases)

    # predictions: NIfTI on the input's grid, with its affine, and they agree with the label file voxel by voxel
    for t, lab, row in zip(test, labels, res["test_cases"]):
        pred = nib.load(row["prediction"])
        np.testing.assert_allclose(pred.affine, affine)
        assert pred.shape == lab.shape
        assert metrics.dice(np.asarray(pred.dataobj), lab, 4)[0] == pytest.approx(row["dice"][0], abs=1e-6)


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_weights(tmp_path):
    common = ["configs/seg_synthetic.py", "--synthetic_cases=(3, 1, 1)", "--synthetic_shape=(36, 32, 34)",
              "--max_iters=6", "--eval_interval=3", "--save_predictions=False"]
    _run(*common, f"--out_dir={tmp_path / 'a'}", "--stop_at=4")  # "killed" after step 4 (between evaluations)
    assert not (tmp_path / "a" / "results.json").exists()
    assert torch.load(tmp_path / "a" / "ckpt.pt", weights_only=True)["iter_num"] == 4
    p = _run(*common, f"--out_dir={tmp_path / 'a'}", "--resume=True")
    assert "at iteration 4" in p.stdout  # it did continue (a fresh start would reach the same weights)
    _run(*common, f"--out_dir={tmp_path / 'b'}")
    a = torch.load(tmp_path / "a" / "ckpt.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "ckpt.pt", weights_only=True)
    assert a["iter_num"] == b["iter_num"] == 6
    for k in b["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert a["history"] == b["history"]  # validation Dice and the running train loss, step for step
    ra = json.loads((tmp_path / "a" / "results.json").read_text())
    rb = json.loads((tmp_path / "b" / "results.json").read_text())
    assert ra["test_dice_per_class"] == rb["test_dice_per_class"]


@pytest.mark.slow
def test_bad_datalist_is_rejected_before_training(tmp_path):
    affine = np.eye(4)
    img = _write(tmp_path / "ok_img.nii.gz", np.random.default_rng(0).normal(size=(20, 20, 20)).astype(np.float32),
                 affine)
    lab = np.zeros((20, 20, 20), np.uint8)
    lab[5:10, 5:10, 5:10] = 1
    ok_lab = _write(tmp_path / "ok_lab.nii.gz", lab, affine)
    _write(tmp_path / "bad_shape_lab.nii.gz", lab[:, :, :18], affine)
    _write(tmp_path / "bad_value_lab.nii.gz", lab * 7, affine)  # 7 >= num_classes = 4
    for name in ("bad_shape_img", "bad_value_img", "two_chans_img"):
        os.link(img, tmp_path / f"{name}.nii.gz")
    dl = {"training": [{"image": "ok_img.nii.gz", "label": "ok_lab.nii.gz"},
                       {"image": "bad_shape_img.nii.gz", "label": "bad_shape_lab.nii.gz"},
                       {"image": "bad_value_img.nii.gz", "label": "bad_value_lab.nii.gz"}],
          "validation": [{"image": "missing_img.nii.gz", "label": "ok_lab.nii.gz"}],
          "test": [{"image": ["two_chans_img.nii.gz", "ok_img.nii.gz"], "label": "ok_lab.nii.gz"}]}
    (tmp_path / "dl.json").write_text(json.dumps(dl))
    out = tmp_path / "run"
    p = _run("configs/seg_synthetic.py", f"--datalist={tmp_path / 'dl.json'}", f"--out_dir={out}", check=False)
    assert p.returncode == 1
    err = p.stderr
    assert "Traceback" not in err and "4 bad case(s)" in err  # an input error: the message alone
    assert "case bad_shape_img" in err and "shape" in err
    assert "case bad_value_img" in err and "[7]" in err and "num_classes=4" in err
    assert "case missing_img" in err and "not found" in err
    assert "case two_chans_img" in err and "2 channel(s)" in err and "in_chans=1" in err
    assert "case ok_img" not in err
    assert not (out / "ckpt.pt").exists()  # nothing trained


# the linear decoder on a trained backbone (a random init of a tiny checkpoint's architecture), 3 steps: its float32
# run serves both the any-head test (a config written for another head) and the bf16 test (float32's losses)
def _linear_args(ckpt, out, dtype):
    return ["configs/seg_synthetic.py", "--synthetic_cases=(2, 1, 1)", "--synthetic_shape=(32, 32, 32)",
            "--max_iters=3", "--eval_interval=3", "--log_interval=1", "--save_predictions=False", "--head=linear",
            "--freeze_backbone=False", f"--pretrained={ckpt}", "--random_init=True", f"--dtype={dtype}",
            f"--out_dir={out}"]


@pytest.fixture(scope="module")
def linear_float32(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("linear")
    ckpt = tmp / "teacher_backbone.pt"
    _tiny_checkpoint(ckpt)
    p = _run(*_linear_args(ckpt, tmp / "float32", "float32"))
    return ckpt, p, tmp / "float32"


@pytest.mark.slow
def test_any_head_runs_with_a_config_written_for_another(tmp_path, linear_float32):
    # configs/seg_synthetic.py sets the ViT-Adapter's head_kwargs; --head=linear used to fail on feature_size.
    # Here from --random_init=True of a checkpoint: the description names it; UNETR with a trained backbone too.
    ckpt, p, linear_out = linear_float32
    common = ["configs/seg_synthetic.py", "--synthetic_cases=(2, 1, 1)", "--synthetic_shape=(32, 32, 32)",
              "--max_iters=2", "--eval_interval=2", "--save_predictions=False", f"--pretrained={ckpt}",
              "--random_init=True"]
    assert "head 'linear' does not take head_kwargs ['deform_num_heads', 'feature_size']" in p.stdout
    assert f"random init of {ckpt}'s architecture" in p.stdout
    res = json.loads((linear_out / "results.json").read_text())
    assert res["backbone"] == f"random init of {ckpt}'s architecture" and res["test_dice_mean"] is not None
    p = _run(*common, "--head=unetr", "--freeze_backbone=False", f"--out_dir={tmp_path / 'unetr'}")
    assert "head 'unetr' does not take head_kwargs ['deform_num_heads']" in p.stdout and "backbone trained" in p.stdout
    assert (tmp_path / "unetr" / "results.json").exists()
    # random_init needs a checkpoint: a one-line error before any work
    p = _run("configs/seg_synthetic.py", "--random_init=True", f"--out_dir={tmp_path / 'bad'}", check=False)
    assert p.returncode != 0 and "random_init=True needs pretrained=" in p.stderr


@pytest.mark.slow
def test_bf16_autocast_runs_on_cpu(tmp_path, linear_float32):
    """dtype="bfloat16" takes effect on CPU (torch's CPU autocast): a few steps of a trained backbone under the
    linear decoder give finite losses close to float32's, not identical. (The UNETR / adapter decoders work too,
    but CPU bf16 3D convolutions ran 6-18x slower than fp32 here: for testing the path, not for training.)"""
    ckpt, _, f32_out = linear_float32
    _run(*_linear_args(ckpt, tmp_path / "bfloat16", "bfloat16"))
    losses = {}
    for dt, out in (("float32", f32_out), ("bfloat16", tmp_path / "bfloat16")):
        rows = [json.loads(line) for line in open(out / "log.jsonl")]
        losses[dt] = [r["loss"] for r in rows if "loss" in r]
        assert json.loads((out / "results.json").read_text())["test_dice_mean"] is not None
    f, b = losses["float32"], losses["bfloat16"]
    assert len(f) == len(b) == 3
    assert all(np.isfinite(y) and abs(y - x) < 0.02 * abs(x) for x, y in zip(f, b)), (f, b)
    assert f != b, "bf16 gave float32's losses exactly: autocast did not run"


@pytest.mark.slow
def test_grad_checkpoint_sets_with_cp_and_keeps_the_losses(tmp_path):
    """grad_checkpoint=True recomputes the adapter and decoder activations in backward (adapter.ViTAdapter with_cp):
    the head is built with it, and the training losses are those of the plain run."""
    losses = {}
    for cp in (False, True):
        out = tmp_path / f"cp{cp}"
        _run("configs/seg_synthetic.py", "--synthetic_cases=(2, 1, 1)", "--synthetic_shape=(32, 32, 32)",
             "--max_iters=3", "--eval_interval=3", "--log_interval=1", "--save_predictions=False",
             f"--grad_checkpoint={cp}", f"--out_dir={out}")
        rows = [json.loads(line) for line in open(out / "log.jsonl")]
        assert rows[0]["head_kwargs_used"].get("with_cp", False) is cp
        losses[cp] = [r["loss"] for r in rows if "loss" in r]
    assert len(losses[True]) == 3
    np.testing.assert_allclose(losses[True], losses[False], rtol=1e-4)


# ---- input errors: named before training, without a traceback ------------------------------------------------------

def test_constant_and_all_nan_cases_are_reported(tmp_path):
    """finetune_seg.py reads every file whole before training: an all-NaN or truncated image is an error that
    names the case (all of them in one message), a constant one a warning."""
    ok = np.random.default_rng(0).random((12, 12, 12)).astype(np.float32)
    for name, arr in (("ok", ok), ("const", np.full((12, 12, 12), 3.0, np.float32)),
                      ("nan", np.full((12, 12, 12), np.nan, np.float32))):
        nib.save(nib.Nifti1Image(arr, np.eye(4)), tmp_path / f"{name}.nii.gz")
    nib.save(nib.Nifti1Image(np.zeros((12, 12, 12), np.uint8), np.eye(4)), tmp_path / "lab.nii.gz")
    (tmp_path / "cut.nii.gz").write_bytes((tmp_path / "ok.nii.gz").read_bytes()[:100])
    items = [{"image": f"{n}.nii.gz", "label": "lab.nii.gz"} for n in ("ok", "const", "nan", "cut")]
    (tmp_path / "dl.json").write_text(json.dumps({"training": items[:2], "validation": items[2:3], "test": items[3:]}))
    p = run_here(ROOT / "finetune_seg.py", "configs/seg_synthetic.py", f"--datalist={tmp_path / 'dl.json'}",
                 f"--out_dir={tmp_path / 'run'}")
    assert_input_error(p, "2 bad case(s)", "case nan:", "without a single finite voxel", "case cut:", "unreadable")
    assert "warning: case const:" in p.stdout and "is constant" in p.stdout
    assert "case ok" not in p.stderr


def test_finetune_input_errors_print_the_message_alone(tmp_path):
    (tmp_path / "empty.json").write_text(json.dumps({"training": [], "validation": [{"image": "x.nii.gz"}]}))
    p = script(ROOT / "finetune_seg.py", "configs/seg_synthetic.py", f"--datalist={tmp_path / 'empty.json'}",
               f"--out_dir={tmp_path / 'a'}")
    assert_input_error(p, "no training cases")
    for bad in ("--max_iters=0", "--max_iters=-5", "--max_iters=None"):
        p = run_here(ROOT / "finetune_seg.py", "configs/seg_synthetic.py", bad, f"--out_dir={tmp_path / 'b'}")
        assert_input_error(p, "max_iters must be a positive int")
    if not torch.cuda.is_available():
        p = run_here(ROOT / "finetune_seg.py", "configs/seg_synthetic.py", "--device=cuda",
                     f"--out_dir={tmp_path / 'c'}")
        assert_input_error(p, "torch sees no CUDA GPU")
