"""Every script behaves alike: --threads everywhere, input errors as one `error: ...` line naming the file (no
traceback) in data.py's CLI, visualize.py and evaluate.py too, a warning for reduced precision on CPU, and clear
errors for a missing data folder, an all-NaN image and a broken orientation matrix. visualize.py and evaluate.py
run once each in a new interpreter (`script`); the other runs are in the test process (conftest.run_here)."""
import nibabel as nib
import numpy as np
import pytest
import torch

import data
import model
import conftest
from conftest import ROOT, run_here, script

TINY_PRETRAIN = [*conftest.TINY_PRETRAIN, "--threads=1"]


def assert_input_error(p, *needles):
    """conftest's check (exit code 1, each needle on stderr, no traceback), and the message is the last line."""
    conftest.assert_input_error(p, *needles)
    assert p.stderr.strip().splitlines()[-1].startswith("error: "), p.stderr[-2000:]


def broken_orientation(path, srow_x):
    """A NIfTI whose sform (the one nibabel uses) has `srow_x` as its first row: a zero or repeated column makes
    the orientation matrix singular."""
    x = np.random.default_rng(0).random((16, 16, 16)).astype(np.float32)
    hdr = nib.Nifti1Image(x, np.eye(4)).header
    hdr["srow_x"], hdr["sform_code"], hdr["qform_code"] = srow_x, 1, 0
    nib.Nifti1Image(x, None, header=hdr).to_filename(path)
    return path


@pytest.mark.parametrize("srow_x", [[0, 0, 0, 0], [0, 1, 0, 0]], ids=["zero-column", "repeated-column"])
def test_a_singular_orientation_matrix_is_named(tmp_path, srow_x):
    """Before: 'unreadable (OrientationError: Cannot drop coordinates when applying orientation to data)'."""
    path = broken_orientation(tmp_path / "broken.nii.gz", srow_x)
    with pytest.raises(data.VolumeError, match="singular orientation matrix") as e:
        data.load_volume(path)
    assert str(e.value).startswith(str(path))


def test_data_cli_takes_threads_and_prints_input_errors_alone(tmp_path):
    good = tmp_path / "good.nii.gz"
    nib.save(nib.Nifti1Image(np.random.default_rng(0).random((8, 8, 8)).astype(np.float32), np.eye(4)), good)
    p = run_here(ROOT / "data.py", "show", good, "--threads=1")
    assert p.returncode == 0 and "(C, H, W, D) = [1, 8, 8, 8]" in p.stdout, p.stderr[-2000:]
    (tmp_path / "bad.json").write_text('{"train": []}')  # item lists under a name nobody reads
    p = run_here(ROOT / "cache.py", "prepare", "--datalist", tmp_path / "bad.json", "--out", tmp_path / "cache",
                 "--threads=1")
    assert_input_error(p, str(tmp_path / "bad.json"), "item lists under ['train']")


@pytest.fixture
def export(tmp_path):
    vit = model.ViT3D(img_size=16, patch_size=8, embed_dim=32, depth=2, num_heads=2)
    path = tmp_path / "teacher.pt"
    torch.save({"teacher": {f"backbone.{k}": v for k, v in vit.state_dict().items()}, "model_args": vit.args,
                "config": {"seed": 0}}, path)
    return path


def test_visualize_takes_threads_and_names_bad_images(tmp_path, export):
    nan = tmp_path / "nan.nii.gz"
    nib.save(nib.Nifti1Image(np.full((16, 16, 16), np.nan, np.float32), np.eye(4)), nan)
    p = script(ROOT / "visualize.py", "--ckpt", export, "--image", nan, "--out", tmp_path / "vis", "--threads=1")
    assert_input_error(p, f"{nan}: frame 0 has no finite voxel")  # before: ValueError traceback "no finite voxels"
    broken = broken_orientation(tmp_path / "broken.nii.gz", [0, 0, 0, 0])
    p = run_here(ROOT / "visualize.py", "--ckpt", export, "--image", broken, "--out", tmp_path / "vis",
                 "--threads=1")
    assert_input_error(p, f"{broken}: singular orientation matrix")


def test_evaluate_takes_threads(tmp_path):
    p = script(ROOT / "evaluate.py", tmp_path / "missing.pt", "--threads=1")
    assert p.returncode == 1 and f"{tmp_path / 'missing.pt'}: no such file" in p.stderr, p.stderr[-2000:]


def test_pretrain_names_a_missing_data_folder(tmp_path):
    """Before: 10 'file not found' retries in the data loader, then a RuntimeError traceback."""
    missing = tmp_path / "no_such_folder"
    p = run_here(ROOT / "pretrain.py", *TINY_PRETRAIN, "--max_iters=1", f"--data_path={missing}",
                 f"--out_dir={tmp_path / 'run'}")
    assert_input_error(p, f"data_path {missing}: no such file or folder")
    assert not (tmp_path / "run").exists()  # refused before anything is written


@pytest.mark.parametrize("what, args", [
    ("finetune_seg.py", ["--dtype=bfloat16"]),
    ("linear_probe.py", ["--dtype=bfloat16"]),
])
def test_reduced_precision_on_cpu_warns(tmp_path, what, args):
    """The warning comes with the device set-up, before the data: a missing datalist then stops the run."""
    p = run_here(ROOT / what, *args, "--device=cpu", "--threads=1", f"--datalist={tmp_path / 'none.json'}",
                 f"--out_dir={tmp_path / 'run'}")
    assert p.returncode == 1, p.stderr[-2000:]
    assert "warning: dtype=bfloat16 on CPU" in p.stdout and "slower than --dtype=float32" in p.stdout, p.stdout


@pytest.mark.parametrize("what", ["pretrain.py", "finetune_seg.py", "linear_probe.py"])
def test_float16_is_refused_alike(tmp_path, what):
    """One dtype policy in the three scripts: bfloat16 or float32 (float16 would need loss scaling), one message."""
    p = script(ROOT / what, "--dtype=float16", "--device=cpu", "--threads=1", f"--out_dir={tmp_path / 'run'}")
    assert_input_error(p, "dtype must be 'auto', 'bfloat16' or 'float32', got 'float16'")


@pytest.mark.slow
def test_reduced_precision_on_cpu_warns_in_pretrain(tmp_path):
    p = script(ROOT / "pretrain.py", *TINY_PRETRAIN, "--max_iters=1", "--dtype=bfloat16", "--device=cpu",
               f"--out_dir={tmp_path / 'run'}")
    assert p.returncode == 0, p.stderr[-2000:]
    assert "warning: dtype=bfloat16 on CPU" in p.stdout, p.stdout
    quiet = script(ROOT / "pretrain.py", *TINY_PRETRAIN, "--max_iters=1", "--device=cpu",
                   f"--out_dir={tmp_path / 'run2'}")
    assert quiet.returncode == 0 and "warning: dtype" not in quiet.stdout
