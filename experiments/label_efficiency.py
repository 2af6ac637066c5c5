"""
experiments/label_efficiency.py — the paper's Fig. 2 protocol at laptop scale, on real data (MSD hippocampus).

    python experiments/label_efficiency.py              # every stage, about an hour on 2 CPU cores
    python experiments/label_efficiency.py --fractions 0.1 1.0 --seg_iters 200    # a shorter variant

1. prepare the *training* images of the fixed split (data_splits/msd_hippocampus.json) — labels unused;
2. pretrain the demo-sized ViT on them (configs/pretrain_hippocampus.py);
3. finetune the ViT-Adapter segmenter (configs/seg_hippocampus.py) at each label fraction from (a) the pretrained
   teacher and (b) random init of the same architecture — same split, same label subsets, same seeds;
4. linear-probe the same two backbones on the derived classification task (configs/probe_hippocampus.py);
5. print and save (out/label_efficiency/summary.{json,md}) per-class test Dice with 95% bootstrap CIs, the paired
   Wilcoxon p-value of per-case mean Dice (pretrained vs random, the same test cases), and probe AUC / F1.
Every stage is skipped when its output already exists, so an interrupted experiment continues where it stopped.
Nothing here is tuned on the test split: the settings are the configs' and the best checkpoint is chosen on
validation by finetune_seg.py / linear_probe.py.
"""
import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import data  # noqa: E402
import metrics  # noqa: E402

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("--out", default="out/label_efficiency")
p.add_argument("--fractions", type=float, nargs="+", default=[0.1, 0.25, 1.0])
p.add_argument("--pretrain_iters", type=int, default=None, help="override configs/pretrain_hippocampus.py")
p.add_argument("--seg_iters", type=int, default=None, help="override configs/seg_hippocampus.py's max_iters")
p.add_argument("--seed", type=int, default=0)
args = p.parse_args()
os.chdir(ROOT)
out = args.out
os.makedirs(out, exist_ok=True)
t_start = time.time()
timings = {}


def run(name, cmd, done_file):
    """Run one stage as its own script (the very commands a user would type), unless it already finished."""
    if os.path.exists(done_file):
        print(f"[{name}] done already ({done_file})")
        return
    print(f"[{name}] {' '.join(cmd)}", flush=True)
    t0 = time.time()
    subprocess.run([sys.executable] + cmd, check=True)
    timings[name] = time.time() - t0
    print(f"[{name}] {timings[name]:.0f} s", flush=True)


# --- 1. the unlabeled training images -> prepared cache ---------------------------------------------------------
split = data.read_datalist("data_splits/msd_hippocampus.json")
train_images = os.path.join(out, "pretrain_images.json")
with open(train_images, "w") as f:  # the training images only: validation and test cases stay unseen
    json.dump([{"image": os.path.abspath(c["image"])} for c in split["training"]], f)
cache = os.path.join(out, "cache")
run("prepare", ["data.py", "prepare", "--datalist", train_images, "--out", cache, "--min_axis_size", "16"],
    os.path.join(cache, "index.json"))

# --- 2. pretraining ---------------------------------------------------------------------------------------------
pre_dir = os.path.join(out, "pretrain")
teacher = os.path.join(pre_dir, "teacher_backbone.pt")
cmd = ["pretrain.py", "configs/pretrain_hippocampus.py", f"--out_dir={pre_dir}", f"--data={cache}",
       f"--seed={args.seed}"]
if args.pretrain_iters:
    cmd.append(f"--max_iters={args.pretrain_iters}")
if os.path.exists(os.path.join(pre_dir, "ckpt.pt")) and not os.path.exists(teacher):
    cmd.append("--resume=True")
run("pretrain", cmd, teacher)

# --- 3. segmentation at each label fraction, pretrained vs random -----------------------------------------------
seg = {}
for frac in args.fractions:
    for init in ("pretrained", "random"):
        d = os.path.join(out, f"seg_{init}_{frac:g}")
        cmd = ["finetune_seg.py", "configs/seg_hippocampus.py", f"--out_dir={d}", f"--label_fraction={frac}",
               f"--seed={args.seed}"] + ([f"--pretrained={teacher}"] if init == "pretrained" else [])
        if args.seg_iters:
            cmd.append(f"--max_iters={args.seg_iters}")
        run(f"seg {init} {frac:g}", cmd, os.path.join(d, "results.json"))
        seg[(frac, init)] = json.load(open(os.path.join(d, "results.json")))

# --- 4. linear probe, pretrained vs random ----------------------------------------------------------------------
probe = {}
for init in ("pretrained", "random"):
    d = os.path.join(out, f"probe_{init}")
    cmd = ["linear_probe.py", "configs/probe_hippocampus.py", f"--out_dir={d}", f"--pretrained={teacher}",
           f"--seed={args.seed}"] + (["--random_init=True"] if init == "random" else [])
    run(f"probe {init}", cmd, os.path.join(d, "results.json"))
    probe[init] = json.load(open(os.path.join(d, "results.json")))

# --- 5. the tables ----------------------------------------------------------------------------------------------


def fmt(mean, ci):
    return "n/a" if mean is None else f"{mean:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]"


def case_means(res):
    """Per-case mean foreground Dice, keyed by case, for the paired test."""
    return {c["case"]: float(np.nanmean(c["dice"])) for c in res["test_cases"] if c["dice"] is not None}


names = seg[(args.fractions[0], "pretrained")]["config"].get("class_names") or ["class 1", "class 2"]
lines = ["| labels | init | " + " | ".join(f"Dice {n}" for n in names) + " | Dice mean | HD95 mean (mm) | Wilcoxon p |",
         "|---|---|" + "---|" * (len(names) + 3)]
summary = {"segmentation": [], "probe": {}, "timings_s": timings}
for frac in args.fractions:
    a, b = case_means(seg[(frac, "pretrained")]), case_means(seg[(frac, "random")])
    common = sorted(set(a) & set(b))
    pval = metrics.wilcoxon(np.array([a[c] for c in common]), np.array([b[c] for c in common]))
    for init in ("pretrained", "random"):
        r = seg[(frac, init)]
        per_class = [fmt(m, ci) for m, ci in zip(r["test_dice_per_class"], r["test_dice_per_class_ci"])]
        lines.append(f"| {frac:.0%} | {init} | " + " | ".join(per_class) + f" | {fmt(r['test_dice_mean'], r['test_dice_ci'])}"
                     f" | {fmt(r['test_hd95_mean'], r['test_hd95_ci'])} | {pval:.3g} |")
        summary["segmentation"].append({"fraction": frac, "init": init, "wilcoxon_p_vs_other": pval,
                                        **{k: r[k] for k in r if k.startswith("test_") and k != "test_cases"}})
lines += ["", "| probe | init | AUC | F1 | accuracy |", "|---|---|---|---|---|"]
for init in ("pretrained", "random"):
    s = probe[init]["summary"]
    lines.append(f"| hippocampus posterior > median | {init} | {fmt(s['auc']['mean'], s['auc']['ci95'])} | "
                 f"{fmt(s['f1']['mean'], s['f1']['ci95'])} | {fmt(s['accuracy']['mean'], s['accuracy']['ci95'])} |")
    summary["probe"][init] = s
summary["total_wall_s_this_invocation"] = time.time() - t_start
table = "\n".join(lines)
print(table)
with open(os.path.join(out, "summary.md"), "w") as f:
    f.write(table + "\n")
with open(os.path.join(out, "summary.json"), "w") as f:
    json.dump(summary, f, indent=1)
print(f"wrote {out}/summary.md and summary.json ({time.time() - t_start:.0f} s this invocation)")
