"""A run folder has one writer, and what a run saves is all there or not at all.

configurator.hold_out_dir: the master process holds out_dir/.lock (flock, its pid and host inside) for the run's
life; a second writer is refused naming them; a lock left by a killed run is taken over; torchrun workers die with
their launcher. configurator.save_atomic: the one temp-file-and-rename save of every script; a full disk raises
DiskFullError naming the file, keeps the previous file and removes the temp file."""
import errno
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
from conftest import ROOT, run_here
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
