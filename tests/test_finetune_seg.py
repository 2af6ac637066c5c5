"""Segmentation: sliding-window inference and head options (adapter.py), the Dice losses (losses.py), the way back
to the input file's grid (data.py), the backbone and head choices (random init of a checkpoint's architecture, head options of another head), and the script itself run
end to end (learns on synthetic phantoms stored as NIfTI, resumes exactly, rejects bad datalists, any head with any
config)."""
import json
import math
import os
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import torch

from conftest import ROOT

import adapter
import data
import losses
import metrics
import model

# -----------------------------------------------------------------------------
# sliding window


@pytest.mark.parametrize("blend", ["constant", "gaussian"])
@pytest.mark.parametrize("overlap", [0.0, 0.5, 0.75])
def test_sliding_window_equals_whole_volume_forward(blend, overlap):
    # 1x1x1 convolutions are exactly translation-equivariant, so however the windows tile the volume (here not a
    # multiple of the window, one axis shorter than it: padded), the blended result is the whole-volume forward
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv3d(2, 8, 1), torch.nn.GELU(), torch.nn.Conv3d(8, 3, 1))
    x = torch.randn(2, 2, 23, 17, 9)
    with torch.no_grad():
        want = net(x)
    got = adapter.sliding_window_inference(x, (8, 8, 12), net, overlap=overlap, blend=blend, sw_batch_size=3)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_window_starts_cover_the_axis():
    for size, roi, overlap in [(23, 8, 0.0), (23, 8, 0.5), (112, 112, 0.75), (300, 112, 0.75), (9, 8, 0.25)]:
        starts = adapter.window_starts(size, roi, overlap)
        covered = np.zeros(size, bool)
        for s in starts:
            covered[s:s + roi] = True
        assert covered.all() and starts[0] == 0 and starts[-1] == size - roi
        assert all(b - a <= max(int(roi * (1 - overlap)), 1) for a, b in zip(starts, starts[1:]))
    assert adapter.window_starts(300, 112, 0.75) == [0, 28, 56, 84, 112, 140, 168, 188]  # step 28, last one moved back


def test_gaussian_blending_weights_the_window_centre():
    w = adapter.importance_map((9, 9, 9), "gaussian")
    assert w[4, 4, 4] == 1 and w.min() > 0 and w[0, 0, 0] < 1e-3
    # the constant blend of two windows that disagree is their mean, the Gaussian one favours the nearer centre
    x = torch.zeros(1, 1, 12, 8, 8)

    def run(blend):
        calls = iter([0.0, 1.0])  # window 0 (rows 0-7) says 0, window 1 (rows 4-11) says 1
        return adapter.sliding_window_inference(x, 8, lambda xb: torch.full_like(xb, next(calls)), 0.5, blend)[0, 0, :, 4, 4]

    const, gauss = run("constant"), run("gaussian")
    assert const[:4].eq(0).all() and const[4:8].eq(0.5).all() and const[8:].eq(1).all()
    assert gauss[:4].eq(0).all() and gauss[8:].eq(1).all()
    assert 0 < gauss[4] < 0.1 and 0.9 < gauss[7] < 1 and gauss[5] < 0.5 < gauss[6]  # the nearer centre wins


# -----------------------------------------------------------------------------
# losses


def test_dice_loss_hand_cases():
    p = torch.tensor([1.0, 1.0, 0.0, 0.0]).view(1, 1, 4, 1, 1)
    g = torch.tensor([1.0, 0.0, 0.0, 0.0]).view(1, 1, 4, 1, 1)
    assert math.isclose(losses.dice_loss(p, g).item(), 1 - (2 + 1e-5) / (3 + 1e-5), rel_tol=1e-6)  # 1/3
    assert losses.dice_loss(g, g).item() < 1e-6
    assert losses.dice_loss(torch.zeros_like(g), torch.zeros_like(g)).item() < 1e-6  # empty in both: no penalty
    # squared_pred (BraTS): Σp² in the denominator
    q = torch.full((1, 1, 4, 1, 1), 0.5)
    assert math.isclose(losses.dice_loss(q, g, squared=True, smooth_nr=0.0).item(), 1 - 1.0 / (1.0 + 1.0 + 1e-5),
                        rel_tol=1e-5)


def test_dice_ce_perfect_and_uniform():
    torch.manual_seed(0)
    label = torch.randint(0, 4, (2, 6, 5, 7))
    onehot = torch.nn.functional.one_hot(label, 4).permute(0, 4, 1, 2, 3).float()
    assert losses.seg_loss(50 * onehot, label, "dice_ce").item() < 1e-4  # perfect prediction -> ~0
    assert losses.seg_loss(50 * onehot, label, "dice").item() < 1e-4
    assert losses.seg_loss(-50 * onehot, label, "dice").item() > 0.99  # every voxel wrong -> ~1
    uniform = torch.zeros(2, 4, 6, 5, 7)
    ce = losses.seg_loss(uniform, label, "dice_ce").item() - losses.seg_loss(uniform, label, "dice").item()
    assert math.isclose(ce, math.log(4), rel_tol=1e-5)  # CE of a uniform softmax = log K


def test_sigmoid_dice_on_brats_regions():
    regions = [[1, 3], [1, 2, 3], [3]]  # TC, WT, ET
    label = torch.tensor([0, 1, 2, 3]).view(1, 4, 1, 1)
    r = losses.label_to_regions(label, regions)[0, :, :, 0, 0]  # (R, 4)
    assert r.tolist() == [[0, 1, 0, 1], [0, 1, 1, 1], [0, 0, 0, 1]]
    logits = 50 * (2 * losses.label_to_regions(label, regions) - 1)
    assert losses.seg_loss(logits, label, "sigmoid_dice", regions).item() < 1e-4


# -----------------------------------------------------------------------------
# cases: padding, and predictions back on the input file's grid


def _write(path, arr, affine):
    nib.save(nib.Nifti1Image(np.asarray(arr), affine), str(path))
    return str(path)


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
    img_p, lab_p = _write(tmp_path / "img.nii.gz", image, affine), _write(tmp_path / "lab.nii.gz", label, affine)
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
# backbone and head choices


def _tiny_checkpoint(path, layerscale_init=0.1, img_size=32):
    """A teacher export as pretrain.py writes it ({"teacher", "model_args", "config"}) of a tiny ViT built with
    layerscale_init, whose weights then moved away from their init (as training would move them)."""
    torch.manual_seed(123)
    vit = model.ViT3D(img_size=img_size, patch_size=8, embed_dim=48, depth=4, num_heads=2,
                      layerscale_init=layerscale_init)
    with torch.no_grad():
        for p in vit.parameters():
            p.add_(0.05 * torch.randn_like(p))
    torch.save({"teacher": {f"backbone.{k}": v for k, v in vit.state_dict().items()}, "model_args": vit.args,
                "config": {"layerscale_init": layerscale_init, "seed": 0}, "step": 10}, path)
    return vit


def test_random_init_is_the_checkpoints_architecture_with_pretrainings_init(tmp_path):
    ckpt = tmp_path / "teacher_backbone.pt"
    trained = _tiny_checkpoint(ckpt, layerscale_init=0.1).state_dict()
    fresh = model.random_init_like(str(ckpt), seed=3).state_dict()
    # the same architecture: the same keys and shapes (patch 8, 4^3 grid, 48 wide, 4 blocks)
    assert list(fresh) == list(trained)
    assert all(fresh[k].shape == trained[k].shape for k in trained)
    # LayerScale starts at the pretraining's layerscale_init (0.1 here, not ViT3D's default 1e-5) ...
    gammas = [k for k in fresh if k.endswith(".gamma")]
    assert len(gammas) == 8 and all(torch.equal(fresh[k], torch.full_like(fresh[k], 0.1)) for k in gammas)
    # ... and every tensor differs from the checkpoint's (the trained gammas moved away from 0.1)
    for k in trained:
        assert not torch.equal(fresh[k], trained[k]), k
    # seeded: the same seed gives the same weights, another seed others
    again = model.random_init_like(str(ckpt), seed=3).state_dict()
    assert all(torch.equal(fresh[k], again[k]) for k in fresh)
    other = model.random_init_like(str(ckpt), seed=4).state_dict()
    assert not torch.equal(fresh["blocks.0.attn.qkv.weight"], other["blocks.0.attn.qkv.weight"])
    # exactly pretrain.py's student init: torch.manual_seed(seed), then ViT3D with the run's arguments
    torch.manual_seed(3)
    want = model.ViT3D(**{**torch.load(ckpt, weights_only=True)["model_args"], "layerscale_init": 0.1}).state_dict()
    assert all(torch.equal(fresh[k], want[k]) for k in want)
    # the caller's RNG goes on as after loading the checkpoint: the head then starts alike in both arms
    torch.manual_seed(0)
    model.vit_from_checkpoint(str(ckpt))
    after_pretrained = torch.rand(4)
    torch.manual_seed(0)
    model.random_init_like(str(ckpt), seed=3)
    assert torch.equal(torch.rand(4), after_pretrained)


def test_head_options_of_another_head_are_dropped():
    kw = {"feature_size": 8, "deform_num_heads": 2}  # configs/seg_synthetic.py: the ViT-Adapter's options
    assert adapter.head_options("vit_adapter_unetr", kw) == (kw, [])  # deform_num_heads reaches ViTAdapter
    assert adapter.head_options("unetr", kw) == ({"feature_size": 8}, ["deform_num_heads"])
    assert adapter.head_options("linear", kw) == ({}, ["deform_num_heads", "feature_size"])
    assert adapter.head_options("linear", {"mix_single_channel": True}) == ({"mix_single_channel": True}, [])
    with pytest.raises(ValueError, match="feature_sze"):  # an option of no head is a typo, not dropped
        adapter.head_options("linear", {"feature_sze": 8})
    with pytest.raises(ValueError, match="unknown segmentation head"):
        adapter.head_options("unet", {})


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
        vols = data.SyntheticVolumes(k, shape, seed=100 + s, with_labels=True)
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


@pytest.mark.slow
def test_any_head_runs_with_a_config_written_for_another(tmp_path):
    # configs/seg_synthetic.py sets the ViT-Adapter's head_kwargs; --head=linear used to fail on feature_size.
    # Here from --random_init=True of a checkpoint: the description names it; UNETR with a trained backbone too.
    ckpt = tmp_path / "teacher_backbone.pt"
    _tiny_checkpoint(ckpt)
    common = ["configs/seg_synthetic.py", "--synthetic_cases=(2, 1, 1)", "--synthetic_shape=(32, 32, 32)",
              "--max_iters=2", "--eval_interval=2", "--save_predictions=False", f"--pretrained={ckpt}",
              "--random_init=True"]
    p = _run(*common, "--head=linear", f"--out_dir={tmp_path / 'linear'}")
    assert "head 'linear' does not take head_kwargs ['deform_num_heads', 'feature_size']" in p.stdout
    assert f"random init of {ckpt}'s architecture" in p.stdout
    res = json.loads((tmp_path / "linear" / "results.json").read_text())
    assert res["backbone"] == f"random init of {ckpt}'s architecture" and res["test_dice_mean"] is not None
    p = _run(*common, "--head=unetr", "--freeze_backbone=False", f"--out_dir={tmp_path / 'unetr'}")
    assert "head 'unetr' does not take head_kwargs ['deform_num_heads']" in p.stdout and "backbone trained" in p.stdout
    assert (tmp_path / "unetr" / "results.json").exists()
    # random_init needs a checkpoint: a one-line error before any work
    p = _run("configs/seg_synthetic.py", "--random_init=True", f"--out_dir={tmp_path / 'bad'}", check=False)
    assert p.returncode != 0 and "random_init=True needs pretrained=" in p.stderr


@pytest.mark.slow
def test_bf16_autocast_runs_on_cpu(tmp_path):
    """dtype="bfloat16" takes effect on CPU (torch's CPU autocast): a few steps of a trained backbone under the
    linear decoder give finite losses close to float32's, not identical. (The UNETR / adapter decoders work too,
    but CPU bf16 3D convolutions ran 6-18x slower than fp32 here: for testing the path, not for training.)"""
    losses = {}
    for dt in ("float32", "bfloat16"):
        out = tmp_path / dt
        _run("configs/seg_synthetic.py", "--synthetic_cases=(2, 1, 1)", "--synthetic_shape=(32, 32, 32)",
             "--max_iters=3", "--eval_interval=3", "--log_interval=1", "--save_predictions=False", "--head=linear",
             "--freeze_backbone=False", f"--dtype={dt}", f"--out_dir={out}")
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
