"""
experiments/label_efficiency.py — the paper's Fig. 2 protocol at laptop scale, on real data (MSD hippocampus).

    python experiments/label_efficiency.py --data_root=data/Task04_Hippocampus   # every stage: 18 finetuning runs,
                                                                                 # a few hours on 2 CPU cores
    python experiments/label_efficiency.py --fractions 0.1 1.0 --seg_iters 200    # a shorter variant
    python experiments/label_efficiency.py --protocols adapter                    # one protocol (the old experiment)

1. prepare the *training* images of the fixed split (data_splits/msd_hippocampus.json) — labels unused;
2. pretrain the demo-sized ViT on them (configs/pretrain_hippocampus.py);
3. finetune segmenters (configs/seg_hippocampus.py) with the paper's three protocols, each at each label fraction,
   from (a) the pretrained teacher and (b) random init of its architecture (`--pretrained=<teacher>
   --random_init=True`: the same ViT, initialised as the pretraining's student was at step 0, the same head init)
   — same split, same label subsets, same seeds:
     linear   the frozen backbone + the paper's linear decoder        (configs/seg_hippocampus_linear.py: 0.5 mm)
     adapter  the frozen backbone + ViT-Adapter + UNETR decoder       (the config's head)
     unetr    UNETR, backbone and decoder tuned end to end            (--head=unetr --freeze_backbone=False)
   (adapter and UNETR with the config's optimiser settings: 300 steps, lr 1e-3, chosen for the adapter and not
   re-tuned; the linear decoder with its own, chosen on validation Dice in experiments/README.md);
4. linear-probe the same two backbones on the derived classification task (configs/probe_hippocampus.py);
5. print and save (out/label_efficiency/summary.{json,md}) one row per (protocol, label fraction): test Dice
   (mean over cases of the foreground classes) with 95% bootstrap CIs for pretrained and random init, and the
   paired Wilcoxon p-value of per-case mean Dice (the same test cases); per-class Dice and HD95 go to summary.json;
   then probe AUC / F1.
Every stage is skipped when its output already exists, and a finetuning run killed midway resumes from its
ckpt.pt, so an interrupted experiment continues where it stopped. (Runs are in seg_<protocol>_<init>_<fraction>;
the seg_<init>_<fraction> folders of the older single-protocol version, whose random arm was another ViT, are
not read.) Nothing here is tuned on the test split: the settings are the configs' and the best checkpoint is
chosen on validation by finetune_seg.py / linear_probe.py.
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

PROTOCOLS = {  # name -> (what, finetune_seg.py options on top of configs/seg_hippocampus.py); the paper's three
    # the linear decoder at 0.5 mm, Dice loss, lr 1e-2, 1000 steps (why: configs/seg_hippocampus_linear.py)
    "linear": ("frozen ViT + linear decoder (0.5 mm)", ["configs/seg_hippocampus_linear.py"]),
    "adapter": ("frozen ViT + ViT-Adapter/UNETR decoder", []),  # the config's head (vit_adapter_unetr)
    "unetr": ("UNETR tuned end to end", ["--head=unetr", "--freeze_backbone=False"]),
}

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("--out", default="out/label_efficiency")
p.add_argument("--data_root", default="data/Task04_Hippocampus",
               help="the MSD Task04_Hippocampus folder (docs/datasets.md)")
p.add_argument("--fractions", type=float, nargs="+", default=[0.1, 0.25, 1.0])
p.add_argument("--protocols", nargs="+", default=list(PROTOCOLS), choices=list(PROTOCOLS),
               help="segmentation protocols to run, a subset of %(choices)s (default: all three)")
p.add_argument("--pretrain_iters", type=int, default=None, help="override configs/pretrain_hippocampus.py")
p.add_argument("--seg_iters", type=int, default=None, help="override configs/seg_hippocampus.py's max_iters")
p.add_argument("--seed", type=int, default=0)
args = p.parse_args()
args.protocols = list(dict.fromkeys(args.protocols))  # each once, in the order given
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
split = data.read_datalist("data_splits/msd_hippocampus.json", root=args.data_root)
train_images = os.path.join(out, "pretrain_images.json")
with open(train_images, "w") as f:  # the training images only: validation and test cases stay unseen
    json.dump([{"image": os.path.abspath(c["image"])} for c in split["training"]], f)
cache = os.path.join(out, "cache")
run("prepare", ["cache.py", "prepare", "--datalist", train_images, "--out", cache, "--min_axis_size", "16"],
    os.path.join(cache, "index.json"))

# --- 2. pretraining ---------------------------------------------------------------------------------------------
pre_dir = os.path.join(out, "pretrain")
teacher = os.path.join(pre_dir, "teacher_backbone.pt")
cmd = ["pretrain.py", "configs/pretrain_hippocampus.py", f"--out_dir={pre_dir}", f"--data_path={cache}",
       f"--seed={args.seed}"]
if args.pretrain_iters:
    cmd.append(f"--max_iters={args.pretrain_iters}")
if os.path.exists(os.path.join(pre_dir, "ckpt.pt")) and not os.path.exists(teacher):
    cmd.append("--resume=True")
elif os.path.isdir(pre_dir) and not os.path.exists(teacher):
    cmd.append("--overwrite=True")  # killed before its first checkpoint: nothing to keep
run("pretrain", cmd, teacher)

# --- 3. segmentation: each protocol at each label fraction, pretrained vs random init of the same ViT --------------
INITS = {"pretrained": [f"--pretrained={teacher}"], "random": [f"--pretrained={teacher}", "--random_init=True"]}
seg = {}
for proto in args.protocols:
    for frac in args.fractions:
        for init, init_opts in INITS.items():
            d = os.path.join(out, f"seg_{proto}_{init}_{frac:g}")
            cmd = (["finetune_seg.py", "configs/seg_hippocampus.py", f"--out_dir={d}", f"--label_fraction={frac}",
                    f"--data_root={args.data_root}", f"--seed={args.seed}"] + PROTOCOLS[proto][1] + init_opts)
            if args.seg_iters:
                cmd.append(f"--max_iters={args.seg_iters}")
            if os.path.exists(os.path.join(d, "ckpt.pt")) and not os.path.exists(os.path.join(d, "results.json")):
                cmd.append("--resume=True")  # killed midway: go on from its last evaluation
            elif os.path.isdir(d) and not os.path.exists(os.path.join(d, "results.json")):
                cmd.append("--overwrite=True")  # killed before its first checkpoint: nothing to keep
            run(f"seg {proto} {init} {frac:g}", cmd, os.path.join(d, "results.json"))
            seg[(proto, frac, init)] = json.load(open(os.path.join(d, "results.json")))

# --- 4. linear probe, pretrained vs random ----------------------------------------------------------------------
probe = {}
for init in ("pretrained", "random"):
    d = os.path.join(out, f"probe_{init}")
    cmd = ["linear_probe.py", "configs/probe_hippocampus.py", f"--out_dir={d}", f"--pretrained={teacher}",
           f"--data_root={args.data_root}", f"--seed={args.seed}"]
    cmd += ["--random_init=True"] if init == "random" else []
    run(f"probe {init}", cmd, os.path.join(d, "results.json"))
    probe[init] = json.load(open(os.path.join(d, "results.json")))

# --- 5. the tables ----------------------------------------------------------------------------------------------


def fmt(mean, ci):
    return "n/a" if mean is None else f"{mean:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]"


def case_means(res):
    """Per-case mean foreground Dice, keyed by case, for the paired test."""
    return {c["case"]: float(np.nanmean(c["dice"])) for c in res["test_cases"] if c["dice"] is not None}


lines = ["| protocol | labels | pretrained Dice [95% CI] | random init Dice [95% CI] | per-case difference [95% CI] "
         "| pretrained better in | Wilcoxon p (n) |", "|---|---|---|---|---|---|---|"]
summary = {"segmentation": [], "probe": {}, "timings_s": timings}
for proto in args.protocols:
    for frac in args.fractions:
        r = {init: seg[(proto, frac, init)] for init in INITS}
        a, b = case_means(r["pretrained"]), case_means(r["random"])
        common = sorted(set(a) & set(b))  # the same test cases; paired per case
        x, y = np.array([a[c] for c in common]), np.array([b[c] for c in common])
        pval = metrics.wilcoxon(x, y)
        diff, lo, hi = metrics.bootstrap_ci(x - y)  # the paired difference, resampled over the test cases
        lines.append(f"| {PROTOCOLS[proto][0]} | {frac:.0%} | "
                     + " | ".join(fmt(r[i]["test_dice_mean"], r[i]["test_dice_ci"]) for i in INITS)
                     + f" | {diff:+.4f} [{lo:+.4f}, {hi:+.4f}] | {int((x > y).sum())} of {len(common)} "
                     + f"| {pval:.3g} ({len(common)}) |")
        summary["segmentation"].append({
            "protocol": proto, "what": PROTOCOLS[proto][0], "fraction": frac, "wilcoxon_p": pval,
            "diff": diff, "diff_ci": [lo, hi], "pretrained_better": int((x > y).sum()),
            "n_paired_cases": len(common), "class_names": r["pretrained"]["config"].get("class_names"),
            **{init: {k: v for k, v in r[init].items() if k.startswith("test_") and k != "test_cases"}
               for init in INITS}})
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
