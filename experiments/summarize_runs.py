"""
experiments/summarize_runs.py — one line per pretraining run: the DINO / iBOT loss against their
no-information values and the collapse monitors, read from each run's log.jsonl.

    python experiments/summarize_runs.py out/arms/*/          # any number of pretrain.py out_dirs
    python experiments/summarize_runs.py out/demo --curve     # also the per-row curve of one run

"last 10%" is the mean over the last 10% of the logged rows (at least one), the issue's criterion for having
left the uniform fixed point: DINO <= 0.8 ln K and iBOT clearly below p_mask ln K.
"""
import json
import math
import os
import sys

CURVE_KEYS = ("dino_loss", "ibot_loss", "koleo_loss", "dino_target_entropy", "dino_kl", "teacher_cls_std",
              "teacher_logit_spread", "cls_effective_rank", "layerscale_gamma")


def read(run):
    rows = [json.loads(l) for l in open(os.path.join(run, "log.jsonl"))]
    cfg = next(r["config"] for r in rows if "config" in r)
    return cfg, [r for r in rows if "dino_loss" in r]


def summary(run):
    cfg, rows = read(run)
    if not rows:
        return {"run": run.rstrip("/"), "steps": 0}
    ln_k = math.log(cfg["head_n_prototypes"])
    tail = rows[-max(1, len(rows) // 10):]
    mean = lambda k: sum(r.get(k, float("nan")) for r in tail) / len(tail)  # noqa: E731
    s = {"run": run.rstrip("/"), "steps": rows[-1]["step"] if rows else 0, "K": cfg["head_n_prototypes"],
         "dino_last10": mean("dino_loss"), "dino_over_lnK": mean("dino_loss") / ln_k,
         "ibot_last10": mean("ibot_loss"), "ibot_over_half_lnK": mean("ibot_loss") / (cfg["mask_sample_probability"] * ln_k)}
    for k in CURVE_KEYS[2:]:
        s[k] = mean(k)
    s["collapse_rows"] = sum(1 for r in rows if r.get("collapse"))
    return s


if __name__ == "__main__":
    runs = [a for a in sys.argv[1:] if not a.startswith("--")]
    for run in runs:
        s = summary(run)
        print(" ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in s.items()))
        if "--curve" in sys.argv:
            _, rows = read(run)
            print("step " + " ".join(CURVE_KEYS))
            for r in rows:
                print(r["step"], " ".join(f"{r.get(k, float('nan')):.4g}" for k in CURVE_KEYS))
