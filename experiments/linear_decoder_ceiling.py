"""
experiments/linear_decoder_ceiling.py — can a linear decoder on a patch grid segment these structures at all?

The paper's linear decoder predicts one logit vector per patch token and upsamples the logits trilinearly. Its
best possible output is therefore bounded by the token grid, whatever the features: here every token is given
the *true* fraction of each class inside its patch (a perfect per-token predictor), the fractions are upsampled
trilinearly as LinearHead upsamples its logits, and each voxel takes the argmax after weighting background by w
(w < 1 favours foreground, as a Dice-trained head can learn through its bias). The mean foreground Dice of that
oracle on the validation cases is the ceiling for any linear decoder at that patch size and spacing.

    python experiments/linear_decoder_ceiling.py --data_root=data/Task04_Hippocampus   # patch 8, 1 mm and 0.5 mm
    python experiments/linear_decoder_ceiling.py --data_root=... --spacings 1 0.5 0.33 --patch 8

Validation split only (data_splits/msd_hippocampus.json); nothing here looks at the test cases.
"""
import argparse
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import data  # noqa: E402
import metrics  # noqa: E402

ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
ap.add_argument("--datalist", default=os.path.join(ROOT, "data_splits/msd_hippocampus.json"))
ap.add_argument("--data_root", default="data/Task04_Hippocampus",
                help="the MSD Task04_Hippocampus folder (docs/datasets.md)")
ap.add_argument("--num_classes", type=int, default=3)
ap.add_argument("--patch", type=int, default=8)
ap.add_argument("--spacings", type=float, nargs="+", default=[1.0, 0.5], help="isotropic target spacings (mm)")
ap.add_argument("--bg_weights", type=float, nargs="+", default=[1.0, 0.5, 0.3, 0.2])
args = ap.parse_args()

K, P = args.num_classes, args.patch
items = data.read_datalist(args.datalist, root=args.data_root)["validation"]
print(f"{len(items)} validation cases, patch {P}; mean foreground Dice of the per-token oracle")
print(f"{'spacing':>8s} {'tokens/case':>12s} {'fg voxels/token':>16s} " + " ".join(f"{'w=' + str(w):>7s}" for w in args.bg_weights))
for sp in args.spacings:
    dice = {w: [] for w in args.bg_weights}
    n_tokens, fg_per_token = [], []
    for it in items:
        lab = torch.as_tensor(data.load_case(it["image"], it["label"], target_spacing=(sp, sp, sp))["label"])
        pad = [(-s) % P for s in lab.shape]
        padded = F.pad(lab, (0, pad[2], 0, pad[1], 0, pad[0]))  # background beyond the case, as the padded input
        onehot = F.one_hot(padded, K).permute(3, 0, 1, 2)[None].float()  # (1, K, H, W, D)
        frac = F.avg_pool3d(onehot, P)  # (1, K, h, w, d): the perfect per-token prediction
        up = F.interpolate(frac, size=padded.shape, mode="trilinear", align_corners=False)[0]
        up = up[:, :lab.shape[0], :lab.shape[1], :lab.shape[2]]
        n_tokens.append(frac[0, 0].numel())
        fg_per_token.append((1 - frac[0, 0][frac[0, 0] < 1]).mean().item() * P ** 3)  # in tokens touching fg
        for w in args.bg_weights:
            pred = torch.cat([up[:1] * w, up[1:]]).argmax(0)
            dice[w].append(np.mean(metrics.dice(pred.numpy(), lab.numpy(), K)))
    row = " ".join(f"{np.mean(dice[w]):7.3f}" for w in args.bg_weights)
    print(f"{sp:6.2f}mm {np.mean(n_tokens):12.0f} {np.mean(fg_per_token):16.1f} {row}")
