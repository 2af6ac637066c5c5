"""A run folder has one writer, and what a run saves is all there or not at all.

configurator.hold_out_dir: the master process holds out_dir/.lock (flock, its pid and host inside) for the run's
life; a second writer is refused naming them; a lock left by a killed run is taken over; torchrun workers die with
their launcher. configurator.save_atomic: the one temp-file-and-rename save of every script; a full disk raises
DiskFullError naming the file, keeps the previous file and removes the temp file. configurator.check_out_dir: a
folder that holds a run is refused unless resumed or overwritten, a resume needs a checkpoint, and a run that
failed before its first step does not block its folder."""
import errno
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import nibabel as nib
import numpy as np
import pytest
import torch

import cache
from conftest import ROOT, TINY_PRETRAIN, assert_input_error, run_here, script
from configurator import ConfigError, DiskFullError, hold_out_dir, save_atomic


def holder(out_dir, rank=-1):
    """A second process that holds out_dir (as a running script does) until it is killed; waits for the lock."""
    code = f"import sys, time; sys.path.insert(0, {str(ROOT)!r}); import configurator; " \
           f"configurator.hold_out_dir({str(out_dir)!r}, {rank}); print('held', flush=True); time.sleep(600)"
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "held"
    return p


# ---- one writer per run folder ---------------------------------------------------------------------------------

def test_a_second_writer_on_a_held_folder_is_refused(tmp_path):
    out = tmp_path / "run"
    p = holder(out)
    try:
        assert (out / ".lock").read_text().split() == [str(p.pid), socket.gethostname()]
        with pytest.raises(ConfigError, match="is in use") as e:
            hold_out_dir(str(out))
        assert f"pid {p.pid} on host {socket.gethostname()}" in str(e.value) and str(out) in str(e.value)
    finally:
        p.kill()
        p.wait()
    # the OS dropped the killed holder's lock: its .lock file is taken over, with a note
    release = hold_out_dir(str(out))
    assert (out / ".lock").read_text().split() == [str(os.getpid()), socket.gethostname()]
    release()
    assert not (out / ".lock").exists()  # a clean exit leaves no lock file


def test_a_stale_lock_is_taken_over_with_a_note(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / ".lock").write_text("4194300 elsewhere\n")  # written by a run that was killed: no flock on it
    release = hold_out_dir(str(out))
    assert "taking over the lock of pid 4194300 on host elsewhere (no longer running)" in capsys.readouterr().out
    release()
    assert out.is_dir()  # the folder was not made for the lock: it stays


def test_a_folder_made_only_for_the_lock_is_removed_again(tmp_path):
    out = tmp_path / "new" / "run"
    release = hold_out_dir(str(out))
    assert (out / ".lock").is_file()
    release()
    assert not out.exists()  # e.g. a start refused by check_out_dir leaves no empty folder behind


def test_torchrun_ranks_other_than_0_do_not_lock(tmp_path):
    out = tmp_path / "run"
    p = holder(out, rank=1)  # rank 1 only asks to die with its parent
    try:
        hold_out_dir(str(out))()  # rank 1 holds nothing: the master can take the folder
    finally:
        p.kill()
        p.wait()


@pytest.mark.parametrize("argv", [
    ["pretrain.py", "configs/pretrain_demo.py", "--resume=True"],
    ["finetune_seg.py", "configs/seg_synthetic.py", "--resume=True"],
    ["linear_probe.py", "configs/probe_synthetic.py"],
])
def test_a_script_started_on_a_folder_in_use_is_refused(tmp_path, argv):
    """A `--resume=True` while the run still writes used to go on (the log then had steps 15 and 20 twice)."""
    out = tmp_path / "run"
    p = holder(out)
    try:
        r = run_here(*argv, f"--out_dir={out}", "--threads=1")  # in this process: the holder is another one
    finally:
        p.kill()
        p.wait()
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert f"{out} is in use" in r.stderr and f"pid {p.pid} on host {socket.gethostname()}" in r.stderr


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux only")
def test_torchrun_workers_die_with_their_launcher(tmp_path):
    """Killing the launcher alone used to leave the workers training and writing checkpoints. A stand-in
    launcher starts a worker (RANK=0, as torchrun does) that holds the folder and keeps writing; the launcher is
    SIGKILLed (it can run no cleanup) and the worker must stop on its own, freeing the folder."""
    out = tmp_path / "run"
    worker = textwrap.dedent(f"""
        import os, sys, time
        sys.path.insert(0, {str(ROOT)!r})
        import configurator
        configurator.hold_out_dir({str(out)!r}, int(os.environ["RANK"]))
        print(os.getpid(), flush=True)
        while True:  # "training": a checkpoint every 0.1 s
            configurator.save_atomic(b"step", {str(out / "ckpt.pt")!r}, write=lambda b, f: f.write(b))
            time.sleep(0.1)
    """)
    launcher = textwrap.dedent(f"""
        import os, subprocess, sys, time
        w = subprocess.Popen([sys.executable, "-c", {worker!r}], env={{**os.environ, "RANK": "0"}})
        time.sleep(600)
    """)
    pl = subprocess.Popen([sys.executable, "-c", launcher], stdout=subprocess.PIPE, text=True)
    worker_pid = int(pl.stdout.readline())
    os.kill(pl.pid, signal.SIGKILL)
    pl.wait()
    deadline = time.time() + 20
    while time.time() < deadline:
        try:
            os.kill(worker_pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        os.kill(worker_pid, signal.SIGKILL)
        pytest.fail("the worker kept running after its launcher died")
    hold_out_dir(str(out))()  # the folder is free again


# ---- atomic saves and a full disk ------------------------------------------------------------------------------

def test_a_full_disk_keeps_the_previous_checkpoint_and_names_the_cause(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    save_atomic({"step": torch.tensor(1)}, path)
    before = path.read_bytes()

    def full_disk(obj, f):  # torch.save that runs out of space half-way
        f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(DiskFullError) as e:
        save_atomic({"step": torch.tensor(2)}, path)
    assert str(e.value) == (f"[Errno 28] no space left on device writing {path}; the previous {path} is intact")
    assert e.value.input_error and e.value.errno == errno.ENOSPC
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["ckpt.pt"]  # no .tmp left behind
    # torch's own writer reports a failed write as a RuntimeError; the ENOSPC in its chain still names the cause
    def torch_full_disk(obj, f):
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")

    monkeypatch.setattr(torch, "save", torch_full_disk)
    with pytest.raises(DiskFullError, match="no space left on device writing"):
        save_atomic({"step": torch.tensor(2)}, tmp_path / "new.pt")
    assert sorted(os.listdir(tmp_path)) == ["ckpt.pt"]


def test_other_write_errors_pass_through_and_leave_no_temp_file(tmp_path):
    def broken(obj, f):
        f.write(b"x")
        raise ValueError("not serialisable")

    with pytest.raises(ValueError, match="not serialisable"):
        save_atomic(object(), tmp_path / "a.pt", write=broken)
    assert os.listdir(tmp_path) == []


def test_prepare_on_a_full_disk_raises_the_clear_error(tmp_path, monkeypatch):
    nib.save(nib.Nifti1Image(np.random.rand(20, 20, 20).astype(np.float32), np.eye(4)), tmp_path / "v.nii.gz")

    def full_disk(f, arr, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(np, "save", full_disk)
    with pytest.raises(DiskFullError, match="no space left on device writing .*v-.*-f0.npy"):
        cache.prepare([str(tmp_path / "v.nii.gz")], tmp_path / "cache", min_axis_size=8, workers=1, progress=False)
    assert not [f for f in os.listdir(tmp_path / "cache") if ".tmp" in f]


def test_every_script_saves_through_the_one_helper():
    """pretrain, finetune_seg, linear_probe, evaluate and cache write their checkpoints, exports, results and cache
    files with configurator.save_atomic: no script has its own torch.save or rename any more."""
    for name in ("pretrain.py", "finetune_seg.py", "linear_probe.py", "evaluate.py", "cache.py"):
        src = (ROOT / name).read_text()
        assert "torch.save(" not in src and "os.replace(" not in src, name
        assert "save_atomic(" in src, name


# ---- no run is lost or resumed by mistake (configurator.check_out_dir) ---------------------------------------------

@pytest.mark.slow
def test_a_second_run_into_a_used_out_dir_is_refused(tmp_path):
    out = tmp_path / "run"
    first = script(ROOT / "pretrain.py", *TINY_PRETRAIN, "--max_iters=2", f"--out_dir={out}")
    assert first.returncode == 0, first.stderr[-2000:]
    log = (out / "log.jsonl").read_text()
    ckpt_bytes = (out / "ckpt.pt").read_bytes()
    again = run_here(ROOT / "pretrain.py", *TINY_PRETRAIN, "--max_iters=2", f"--out_dir={out}")
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
    # a cache whose one volume file is damaged: the run starts (log.jsonl holds its config row), then fails
    # reading its first batch, before step 1
    nib.save(nib.Nifti1Image(np.random.default_rng(0).random((20, 20, 20)).astype(np.float32), np.eye(4)),
             tmp_path / "v.nii.gz")
    bad = tmp_path / "bad"
    cache.prepare([str(tmp_path / "v.nii.gz")], bad, min_axis_size=8, workers=1, progress=False)
    for f in bad.glob("*.npy"):
        f.write_bytes(b"not an array")
    out = tmp_path / "run"
    p = script(ROOT / "pretrain.py", *TINY_PRETRAIN, "--max_iters=1", f"--data_path={bad}", f"--out_dir={out}",
               "--threads=1")
    assert p.returncode != 0 and (out / "log.jsonl").is_file() and not (out / "ckpt.pt").exists()
    p = script(ROOT / "pretrain.py", *TINY_PRETRAIN, "--max_iters=1", f"--out_dir={out}", "--threads=1")
    assert p.returncode == 0, p.stderr[-2000:]
    assert (out / "ckpt.pt").is_file() and not (out / ".lock").exists()
