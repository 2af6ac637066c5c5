"""
experiments/summarize_runs.py — one line per pretraining run: the DINO / iBOT loss against their no-information
values and the collapse monitors, read from each run's log.jsonl.

    python experiments/summarize_runs.py out/arms/*/            # any number of pretrain.py out_dirs
    python experiments/summarize_runs.py out/arms/*/ --window 25 35   # also the means over steps 25..35
    python experiments/summarize_runs.py out/demo --curve         # and the logged rows of each run

"last 10%" is the mean over the last 10% of the logged rows (at least one): the criterion for having left the
uniform fixed point is DINO <= 0.8 ln K and iBOT clearly below p_mask ln K (p_mask = 0.5). --window compares runs
of different lengths at the same steps.
"""
import json
import math
import os
import sys

CURVE_KEYS = ("dino_loss", "ibot_loss", "koleo_loss", "dino_target_entropy", "dino_kl", "teacher_cls_std",
              "teacher_logit_spread", "cls_effective_rank", "layerscale_gamma")


def read(run):
    rows = [json.loads(line) for line in open(os.path.join(run, "log.jsonl"))]
    cfg = next(r["config"] for r in rows if "config" in r)
    return cfg, [r for r in rows if "dino_loss" in r]


def summary(run, window=None):
    cfg, rows = read(run)
    s = {"run": run.rstrip("/"), "steps": rows[-1]["step"] if rows else 0, "K": cfg["head_n_prototypes"]}
    ln_k, p_mask = math.log(cfg["head_n_prototypes"]), cfg["mask_sample_probability"]
    ln_k_ibot = math.log(cfg.get("ibot_head_n_prototypes") or cfg["head_n_prototypes"])

    def means(rr, tag):
        if not rr:
            return
        m = {k: sum(r.get(k, float("nan")) for r in rr) / len(rr) for k in CURVE_KEYS}
        s[f"dino/lnK{tag}"] = m["dino_loss"] / ln_k
        s[f"ibot/(p lnK){tag}"] = m["ibot_loss"] / (p_mask * ln_k_ibot)
        s[f"H/lnK{tag}"] = m["dino_target_entropy"] / ln_k
        s[f"spread{tag}"] = m["teacher_logit_spread"]
        if not tag:
            s.update({k: m[k] for k in ("dino_loss", "ibot_loss", "dino_kl", "teacher_cls_std", "cls_effective_rank")})

    if window:
        means([r for r in rows if window[0] <= r["step"] <= window[1]], f"@{window[0]}-{window[1]}")
    means(rows[-max(1, len(rows) // 10):], "")
    s["collapse_rows"] = sum(1 for r in rows if r.get("collapse"))
    return s


if __name__ == "__main__":
    args = sys.argv[1:]
    window = None
    if "--window" in args:
        i = args.index("--window")
        window = (int(args[i + 1]), int(args[i + 2]))
        del args[i:i + 3]
    for run in [a for a in args if not a.startswith("--")]:
        print(" ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in summary(run, window).items()))
        if "--curve" in args:
            _, rows = read(run)
            print("step " + " ".join(CURVE_KEYS))
            for r in rows:
                print(r["step"], " ".join(f"{r.get(k, float('nan')):.4g}" for k in CURVE_KEYS))
