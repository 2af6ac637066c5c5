"""
experiments/data_check.py — does the DINO pretext task have a signal? View retrieval on the training views.

For n volumes, two global views each (the training pipeline: PretrainDataset crops + augment.make_views), query
view 0 of volume i among view 1 of all n volumes and count how often the nearest (cosine) is volume i's own.
Chance is 1/n. Descriptors: the raw view pooled to 4^3, and the CLS / mean patch token of a random-init ViT (the
pretraining's starting point) — if views of one volume are no closer than views of different volumes, the
DINO targets cannot be predicted across views and the run sits at the uniform fixed point.

    python experiments/data_check.py                      # phantoms (the demo's data)
    python experiments/data_check.py --data out/label_efficiency/cache --layerscale 0.1
"""
import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import augment  # noqa: E402
import cache  # noqa: E402
import model  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("--data", default="")
ap.add_argument("--n", type=int, default=32)
ap.add_argument("--layerscale", type=float, default=0.1)
ap.add_argument("--ckpt", default=None, help="a teacher export to test instead of the random init")
ap.add_argument("--global_scale", type=float, nargs=2, default=(0.48, 1.0))
a = ap.parse_args()

ds = cache.PretrainDataset(a.data or None, 48, 24, 2, global_in_slice_scale=tuple(a.global_scale), seed=1,
                          min_axis_size=16)
batch = cache.collate_pretrain([ds[k] for k in range(a.n)])
g = torch.Generator().manual_seed(0)
v = augment.make_views(batch, 48, 24, 8, g, "cpu")
x0, x1 = v["global_crops"][:a.n], v["global_crops"][a.n:]


def retrieval(f0, f1):
    f0, f1 = F.normalize(f0 - f0.mean(0), dim=-1), F.normalize(f1 - f1.mean(0), dim=-1)
    return float((f0 @ f1.t()).argmax(1).eq(torch.arange(len(f0))).float().mean())


torch.manual_seed(0)
vit = model.vit_from_checkpoint(a.ckpt) if a.ckpt else model.ViT3D(img_size=48, patch_size=8, embed_dim=192,
                                                                   depth=4, num_heads=3, layerscale_init=a.layerscale)
vit.eval()
with torch.no_grad():
    o0, o1 = vit.forward_features(x0), vit.forward_features(x1)
pool = lambda x: F.adaptive_avg_pool3d(x, 4).flatten(1)  # noqa: E731
descriptors = {"raw views pooled to 4^3": (pool(x0), pool(x1)),
               "ViT CLS": (o0["x_norm_clstoken"], o1["x_norm_clstoken"]),
               "ViT mean patch token": (o0["x_norm_patchtokens"].mean(1), o1["x_norm_patchtokens"].mean(1))}
print(f"view retrieval top-1 over {a.n} volumes (chance {1 / a.n:.3f}):")
for name, (f0, f1) in descriptors.items():
    print(f"  {name:<26}{retrieval(f0, f1):.3f}")
if ds.kind == "dataset" and hasattr(ds.volumes, "PHASE_LEVELS"):  # phantoms: is the nearest other volume's view
    phase = torch.tensor([ds.volumes[int(i)]["phase"] for i in batch["index"]])  # of the same contrast phase?

    def same_phase(f0, f1):
        f0, f1 = F.normalize(f0 - f0.mean(0), dim=-1), F.normalize(f1 - f1.mean(0), dim=-1)
        s = f0 @ f1.t()
        s.fill_diagonal_(-2)  # another volume
        return float(phase[s.argmax(1)].eq(phase).float().mean())

    chance = float(sum((phase == k).float().mean() ** 2 for k in phase.unique()))
    print(f"nearest other volume of the same contrast phase (chance {chance:.3f}):")
    for name, (f0, f1) in descriptors.items():
        print(f"  {name:<26}{same_phase(f0, f1):.3f}")
