"""What a first-time user hits: no silent data loss, and every input error clear, early and without a traceback.

Each test runs the real script or CLI the way a user would and reads what it prints. Input errors
must name the file or key, exit with code 1, and print no Python traceback. One run per script (pretrain.py,
finetune_seg.py, cache.py, linear_probe.py) starts a new interpreter (`script`); the others run the script inside
the test process (conftest.run_here), which ends it the way the interpreter would."""
import json
import os
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import torch

import augment
import cache
import data
import model
from conftest import ROOT, requires_shared, run_here

TINY_PRETRAIN = ["--embed_dim=32", "--depth=4", "--num_heads=2", "--patch_size=8", "--global_crops_size=16",
                 "--local_crops_size=8", "--n_local_crops=2", "--head_n_prototypes=64", "--head_hidden_dim=32",
                 "--head_bottleneck_dim=16", "--batch_size=4", "--num_workers=0", "--min_axis_size=8",
                 "--warmup_iters=1", "--warmup_teacher_temp_iters=1", "--freeze_last_layer_iters=0"]


def script(*args, cwd=ROOT):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600)


def assert_input_error(p, *needles):
    """Exit code 1, the message (each needle) on stderr, and no traceback."""
    assert p.returncode == 1, (p.returncode, p.stdout[-2000:], p.stderr[-2000:])
    assert "Traceback" not in p.stderr, p.stderr[-3000:]
    for n in needles:
        assert n in p.stderr, (n, p.stderr[-2000:])


# ---- no silent loss --------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_a_second_run_into_a_used_out_dir_is_refused(tmp_path):
    out = tmp_path / "run"
    first = script(ROOT / "pretrain.py", *TINY_PRETRAIN, "--max_iters=2", f"--out_dir={out}")
    assert first.returncode == 0, first.stderr[-2000:]
    log = (out / "log.jsonl").read_text()
    ckpt_bytes = (out / "ckpt.pt").read_bytes()
    again = script(ROOT / "pretrain.py", *TINY_PRETRAIN, "--max_iters=2", f"--out_dir={out}")
    assert_input_error(again, str(out), "already holds a run", "--resume=True", "--overwrite=True")
    assert (out / "log.jsonl").read_text() == log and (out / "ckpt.pt").read_bytes() == ckpt_bytes  # untouched
    # every log row carries the elapsed time and peak memory
    rows = [json.loads(line) for line in log.splitlines()[1:]]
    assert rows and all("elapsed_s" in r and r["peak_rss_mb"] > 0 for r in rows)
    # on purpose: --overwrite=True replaces it
    over = script(ROOT / "pretrain.py", *TINY_PRETRAIN, "--max_iters=2", f"--out_dir={out}", "--overwrite=True")
    assert over.returncode == 0, over.stderr[-2000:]


def test_resume_without_a_checkpoint_is_an_error_not_a_fresh_start(tmp_path):
    p = run_here(ROOT / "pretrain.py", *TINY_PRETRAIN, f"--out_dir={tmp_path / 'none'}", "--resume=True")
    assert_input_error(p, "resume=True but there is no checkpoint", str(tmp_path / "none" / "ckpt.pt"))
    p = run_here(ROOT / "finetune_seg.py", "configs/seg_synthetic.py", f"--out_dir={tmp_path / 'none'}",
                 "--resume=True")
    assert_input_error(p, "resume=True but there is no checkpoint")


@pytest.mark.slow
def test_resume_with_a_changed_architecture_names_the_keys(tmp_path):
    out = tmp_path / "run"
    assert script(ROOT / "pretrain.py", *TINY_PRETRAIN, "--max_iters=2", f"--out_dir={out}").returncode == 0
    p = script(ROOT / "pretrain.py", *TINY_PRETRAIN, "--max_iters=4", f"--out_dir={out}", "--resume=True",
               "--depth=6", "--head_n_prototypes=128")
    assert_input_error(p, "another architecture", "depth: checkpoint 4, now 6", "head_n_prototypes: checkpoint 64")
    assert "size mismatch" not in p.stderr


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


# ---- clear errors ----------------------------------------------------------------------------------------------

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


def test_pretrain_input_errors_print_the_message_alone(tmp_path):
    (tmp_path / "list.json").write_text("{not json")
    p = script(ROOT / "pretrain.py", *TINY_PRETRAIN, f"--data_path={tmp_path / 'list.json'}",
               f"--out_dir={tmp_path / 'a'}")
    assert_input_error(p, str(tmp_path / "list.json"), "not a prepared cache", "python cache.py prepare")
    p = script(ROOT / "cache.py", "prepare", "--datalist", tmp_path / "list.json", "--out", tmp_path / "c")
    assert_input_error(p, str(tmp_path / "list.json"), "not a readable JSON datalist")
    p = run_here(ROOT / "pretrain.py", "--max_iter=3", f"--out_dir={tmp_path / 'b'}")
    assert_input_error(p, "unknown config key 'max_iter'", "did you mean 'max_iters'")


def test_checkpoint_errors_say_what_the_file_is(tmp_path):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(os.urandom(300))
    with pytest.raises(model.CheckpointError, match="junk.pt: not a checkpoint") as e:
        model.vit_from_checkpoint(junk)
    assert "weights_only=False" not in str(e.value)  # torch's advice would unpickle an untrusted file
    seg = tmp_path / "best.pt"
    torch.save({"model": {"vit.pos_embed": torch.zeros(1), "decoder.w": torch.zeros(1)}, "iter": 3}, seg)
    with pytest.raises(model.CheckpointError, match="no ViT backbone in it"):
        model.vit_from_checkpoint(seg)
    p = run_here(ROOT / "finetune_seg.py", "configs/seg_synthetic.py", f"--pretrained={junk}",
                 f"--out_dir={tmp_path / 'a'}", "--synthetic_cases=(2, 1, 1)", "--synthetic_shape=(32, 32, 32)")
    assert_input_error(p, "junk.pt: not a checkpoint")


def test_help_lists_the_keys_with_their_comments():
    for name in ("pretrain.py", "finetune_seg.py", "linear_probe.py"):
        p = run_here(ROOT / name, "--help")
        assert p.returncode == 0, p.stderr[-2000:]
        assert "config keys" in p.stdout and "out_dir = " in p.stdout and "threads = 0  # torch CPU threads" in p.stdout


def test_augment_plans_take_the_one_of_choice():
    """linear_probe.py's augment_train=True passes OneOf's choice to each intensity transform (`apply=`): the old
    wrappers had lost that argument and the probe configs that set augment_train crashed with a TypeError."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand(4, 1, 8, 8, 8) * 2 - 1
    apply = torch.tensor([True, False, True, False])
    for plan_fn in (augment.plan_gamma, augment.plan_sharpen, augment.plan_smooth, augment.plan_noise):
        y = augment.run_plan(x.clone(), plan_fn(4, 1.0, g, apply=apply))
        assert torch.equal(y[1], x[1]) and torch.equal(y[3], x[3]), plan_fn.__name__  # not chosen: untouched
        assert not torch.equal(y[0], x[0]), plan_fn.__name__


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


# ---- label maps are never pretraining images -------------------------------------------------------------------

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


# ---- crashes and wrong advice ----------------------------------------------------------------------------------

@pytest.mark.parametrize("argv, key", [
    (["pretrain.py", *TINY_PRETRAIN], "log_interval"),
    (["pretrain.py", *TINY_PRETRAIN], "ckpt_interval"),
    (["pretrain.py", *TINY_PRETRAIN], "export_interval"),
    (["finetune_seg.py", "configs/seg_synthetic.py"], "eval_interval"),
    (["finetune_seg.py", "configs/seg_synthetic.py"], "log_interval"),
    (["linear_probe.py", "configs/probe_synthetic.py"], "eval_interval"),
    (["linear_probe.py", "configs/probe_synthetic.py"], "n_runs"),
])
def test_zero_intervals_and_counts_are_input_errors(tmp_path, argv, key):
    """Each used to crash after the set-up (ZeroDivisionError; the probe's n_runs=0: 'need at least one array')."""
    p = run_here(ROOT / argv[0], *argv[1:], "--max_iters=2", f"--{key}=0", f"--out_dir={tmp_path / 'run'}")
    assert_input_error(p, f"{key} must be a positive int, got 0")
    assert not (tmp_path / "run").exists()  # refused before any work: nothing written


@pytest.mark.parametrize("argv", [["pretrain.py", *TINY_PRETRAIN], ["finetune_seg.py", "configs/seg_synthetic.py"],
                                  ["linear_probe.py", "configs/probe_synthetic.py"]])
def test_an_empty_out_dir_is_an_input_error(argv):
    p = run_here(ROOT / argv[0], *argv[1:], "--out_dir=")  # used to end in FileNotFoundError: ''
    assert_input_error(p, "out_dir is empty")


def test_the_probe_does_not_advise_a_resume_it_lacks(tmp_path):
    (tmp_path / "results.json").write_text("{}")
    p = script(ROOT / "linear_probe.py", "configs/probe_synthetic.py", f"--out_dir={tmp_path}")
    assert_input_error(p, "already holds a run (results.json)", "--overwrite=True")
    assert "resume" not in p.stderr


def test_a_run_that_failed_before_its_first_step_does_not_block_its_folder(tmp_path, capsys):
    """The guard used to refuse it and advise --resume=True, which then failed (no checkpoint)."""
    from configurator import ConfigError, check_out_dir

    files = ("log.jsonl", "ckpt.pt", "teacher_backbone.pt")
    (tmp_path / "log.jsonl").write_text(json.dumps({"config": {}, "git_sha": None}) + "\n")
    check_out_dir(str(tmp_path), False, False, files, "ckpt.pt")  # only the header: nothing to keep or resume
    assert "failed before its first step; starting afresh" in capsys.readouterr().out
    # a run that logged steps but saved no checkpoint is kept; the advice is --overwrite, not --resume
    with open(tmp_path / "log.jsonl", "a") as f:
        f.write(json.dumps({"step": 10, "loss": 9.0}) + "\n")
    with pytest.raises(ConfigError) as e:
        check_out_dir(str(tmp_path), False, False, files, "ckpt.pt")
    assert "saved no checkpoint (ckpt.pt), so there is nothing to resume" in str(e.value)
    assert "--overwrite=True" in str(e.value) and "--resume=True" not in str(e.value)
    (tmp_path / "ckpt.pt").write_bytes(b"x")  # with a checkpoint, a resume is the first advice
    with pytest.raises(ConfigError, match="continue it with --resume=True, replace it with --overwrite=True"):
        check_out_dir(str(tmp_path), False, False, files, "ckpt.pt")


@pytest.mark.slow
def test_a_pretraining_that_failed_at_the_start_can_be_rerun_in_its_folder(tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "a.npy").write_text("not an array")
    out = tmp_path / "run"
    p = script(ROOT / "pretrain.py", *TINY_PRETRAIN, "--max_iters=1", f"--data_path={bad}", f"--out_dir={out}",
               "--threads=1")
    assert p.returncode != 0 and (out / "log.jsonl").is_file() and not (out / "ckpt.pt").exists()
    p = script(ROOT / "pretrain.py", *TINY_PRETRAIN, "--max_iters=1", f"--out_dir={out}", "--threads=1")
    assert p.returncode == 0, p.stderr[-2000:]
    assert (out / "ckpt.pt").is_file() and not (out / ".lock").exists()
