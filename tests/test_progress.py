"""Long phases show progress, and the rates a run reports count the work they name.

finetune_seg.py's log rows (crops_per_s) and its bar (rate, ETA) measure training steps only, not the validations
between them; evaluate.py (also the demo's last step) says which stage runs as it starts it."""
import json
import os
import re
import subprocess
import sys

import pytest
import torch

import evaluate
import model
from conftest import ROOT

SLOW_VALIDATION_S = 2.0
# each sliding-window pass over a validation case sleeps first: a validation far slower than a training step
SLOW_EVAL = f"""
import runpy, sys, time
sys.path.insert(0, {str(ROOT)!r})
import adapter
_sw = adapter.sliding_window_inference
def slow(*a, **k):
    time.sleep({SLOW_VALIDATION_S})
    return _sw(*a, **k)
adapter.sliding_window_inference = slow
sys.argv = ["finetune_seg.py"] + sys.argv[1:]
runpy.run_path({str(ROOT / "finetune_seg.py")!r}, run_name="__main__")
"""
TINY_SEG = ["--embed_dim=32", "--depth=4", "--num_heads=2", "--patch_size=8", "--crop_size=16", "--head=linear",
            "--batch_size=1", "--samples_per_volume=1", "--warmup_iters=0", "--num_workers=0", "--threads=1",
            "--save_predictions=False", "--num_classes=4", "--synthetic_cases=(2, 1, 1)",
            "--synthetic_shape=(16, 16, 16)"]


@pytest.mark.slow
def test_finetune_rates_leave_the_validation_out(tmp_path):
    """Validations (each made to take >= 2 s) at iterations 0, 3 and 6: the log rows after them and the bar's
    elapsed time still measure the six training steps alone (before: each row after a validation, and the bar,
    counted its 2 s as training time)."""
    out = tmp_path / "seg"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, "-c", SLOW_EVAL, *TINY_SEG, "--max_iters=6", "--eval_interval=3",
                        "--log_interval=1", f"--out_dir={out}"], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()[1:]]
    steps = [r for r in rows if "crops_per_s" in r]
    assert [r["iter"] for r in steps] == [1, 2, 3, 4, 5, 6]
    seconds = [1 / r["crops_per_s"] for r in steps]  # one crop per step: seconds per step
    assert max(seconds) < SLOW_VALIDATION_S / 2, seconds  # rows 1 and 4 follow a validation
    # the bar's last state: "finetune: 100%|...| 6/6 [MM:SS<00:00, ...]": its elapsed time is the training's
    bars = re.findall(r"finetune: 100%\|[^|]*\| 6/6 \[(\d+):(\d+)<", p.stderr)
    assert bars, p.stderr[-2000:]
    minutes, secs = map(int, bars[-1])
    assert 60 * minutes + secs < SLOW_VALIDATION_S, (bars[-1], p.stderr[-1500:])


def test_evaluate_announces_each_stage(tmp_path, capsys):
    """Before: evaluate.run (and so the demo's final step) printed nothing for its 40-60 s."""
    torch.manual_seed(0)
    vit = model.ViT3D(img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=2)
    torch.save({"teacher": {f"backbone.{k}": v for k, v in vit.state_dict().items()}, "model_args": vit.args,
                "config": {"seed": 0}}, tmp_path / "t.pt")
    evaluate.run(str(tmp_path / "t.pt"), None, n_train=2, n_test=2, size=32)
    lines = capsys.readouterr().out.splitlines()
    for arm in ("pretrained backbone", "random init"):
        for step in ("features of 2 training + 2 test phantoms", "fitting the linear decoder", "scoring 2 test"):
            assert any(arm in line and step in line for line in lines), (arm, step, lines)
    assert all(re.match(r"eval \d+s: ", line) for line in lines), lines  # each with the time since the start
    capsys.readouterr()
    evaluate.run(str(tmp_path / "t.pt"), None, n_train=2, n_test=2, size=32, log=None)
    assert capsys.readouterr().out == ""  # log=None: silent
