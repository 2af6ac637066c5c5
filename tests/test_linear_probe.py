"""linear_probe.py end to end on tiny .npy volumes: features once, 52 classifiers, selection, metrics, bad input."""
import json
import runpy
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import data
import model

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--arch=vit_tiny", "--patch_size=8", "--image_size=16", "--feature_batch=1", "--device=cpu",
        "--batch_size=4", "--eval_interval=10"]


def volume(i: int) -> np.ndarray:
    """A distinct 16^3 test volume: noise plus a bright cube whose place depends on i."""
    rng = np.random.default_rng(i)
    x = rng.normal(size=(16, 16, 16)).astype(np.float32)
    a = 2 + (i * 3) % 9
    x[a:a + 5, 4:9, a // 2:a // 2 + 5] += 4.0
    return x


def write_datalist(folder: Path, splits: dict) -> str:
    """splits: {split: [(volume id, label)]} -> a datalist JSON with relative .npy paths; returns its path."""
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for split, items in splits.items():
        out[split] = []
        for vid, label in items:
            np.save(folder / f"v{vid:02d}.npy", volume(vid))
            out[split].append({"image": f"v{vid:02d}.npy", "label": label})
    path = folder / "datalist.json"
    path.write_text(json.dumps(out))
    return str(path)


def run_probe(*args):
    """Run the script in this process (so tests can count backbone calls); returns (its globals, images encoded)."""
    encoded = []
    original = model.ViT3D.get_intermediate_layers

    def counting(self, x, *a, **kw):
        encoded.append(x.shape[0])
        return original(self, x, *a, **kw)

    argv, threads = sys.argv, torch.get_num_threads()
    model.ViT3D.get_intermediate_layers = counting
    sys.argv = ["linear_probe.py", *args]
    try:
        g = runpy.run_path(str(ROOT / "linear_probe.py"), run_name="__main__")
    finally:
        model.ViT3D.get_intermediate_layers = original
        sys.argv = argv
        torch.set_num_threads(threads)  # the script drops to 1 thread for the classifier steps
    return g, sum(encoded)


# train: 8 distinct volumes; val: 4 more; test: volumes 20 and 21, each listed twice, once per class. The two
# copies of a volume get identical features, hence identical scores: every positive ties with one negative.
SPLITS = {"training": [(i, i % 2) for i in range(8)], "validation": [(10, 0), (11, 1), (12, 0), (13, 1)],
          "test": [(20, 0), (20, 1), (21, 0), (21, 1)]}


@pytest.fixture(scope="module")
def probe(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("probe")
    dl = write_datalist(tmp / "vols", SPLITS)
    g, n_encoded = run_probe(f"--datalist={dl}", f"--out_dir={tmp / 'out'}", "--n_runs=2", "--max_iters=60", *TINY)
    results = json.loads((tmp / "out" / "results.json").read_text())
    return g, n_encoded, results


def test_features_are_computed_once(probe):
    g, n_encoded, results = probe
    # 16 listed cases, one deterministic view each: 16 images through the backbone for 2 runs x 60 iterations
    assert n_encoded == 16
    assert g["cls_det"].shape == (16, 1, 4, 192) and g["avg_det"].shape == (16, 1, 192)
    assert results["feature_dims"] == [192, 384, 768, 960]  # E, E + E, 4E, 4E + E


def test_52_heads_train_and_the_best_validation_head_is_selected(probe):
    g, _, results = probe
    heads = results["heads"]
    assert len(heads) == 52
    assert {(h["n_blocks"], h["avgpool"]) for h in heads} == {(1, False), (1, True), (4, False), (4, True)}
    assert sorted({h["lr"] for h in heads}) == pytest.approx([lr * 4 / 256 for lr in g["lrs"]])  # batch 4
    for run in results["runs"]:
        moved = np.abs(np.array(run["train_loss_final"]) - np.array(run["train_loss_init"]))
        assert (moved > 0).all()  # every classifier was updated
        scores = np.array(run["val_scores"])
        assert len(scores) == 52
        assert run["best_head"]["index"] == int(np.argmax(scores))
        assert run["val_metric"] == scores.max()
        assert heads[run["best_head"]["index"]]["lr"] == run["best_head"]["lr"]
    # the scores are the restored classifiers' validation accuracies, recomputed here from the last run's heads
    tr, va, te = g["run_splits"][-1]
    with torch.no_grad():
        z = g["all_logits"](g["heads"], [x[va] for x in g["X_det"]])
    acc = (z.argmax(-1) == g["labels"][va]).double().mean(1).numpy()
    np.testing.assert_allclose(acc, results["runs"][-1]["val_scores"])


def mann_whitney_auc(scores, labels):
    """Brute force: P(score of a positive > score of a negative) + 1/2 P(tie), over all pairs."""
    pos, neg = scores[labels == 1], scores[labels == 0]
    return np.mean([(p > n) + 0.5 * (p == n) for p in pos for n in neg])


def test_test_metrics_with_tied_scores(probe):
    _, _, results = probe
    for run in results["runs"]:
        probs, y = np.array(run["test_probs"]), np.array(run["test_labels"])
        assert y.tolist() == [0, 1, 0, 1]
        assert (probs[0] == probs[1]).all() and (probs[2] == probs[3]).all()  # the ties are there
        # hand case: each positive ties with the negative copy of its volume (1/2) and beats or loses to the other
        # volume's negative, one win and one loss between the two positives: AUC = (1/2 + 1/2 + 1 + 0) / 4
        assert run["test_auc"] == 0.5 == mann_whitney_auc(probs[:, 1], y)
        assert run["test_accuracy"] == 0.5  # each volume is right for exactly one of its two copies
        pred = probs.argmax(1)
        f1 = [2 * ((pred == k) & (y == k)).sum() / ((pred == k).sum() + (y == k).sum()) for k in (0, 1)]
        assert run["test_f1"] == pytest.approx(np.mean(f1))
        assert np.array(run["test_confusion_matrix"]).sum(1).tolist() == [2, 2]
    s = results["summary"]["auc"]
    assert s["mean"] == 0.5 and s["ci95"] == [0.5, 0.5] and s["values"] == [0.5, 0.5]
    assert {"seed", "best_head", "val_metric", "test_auc", "test_f1", "test_accuracy", "test_confusion_matrix"} \
        <= set(results["runs"][0])
    assert results["config"]["n_runs"] == 2


def test_lrs_as_loss_weights_equal_param_groups():
    """The script steps sum_j lr_j CE_j with lr = schedule(t); plain SGD param groups with lr_j schedule(t) must
    give the same classifiers (momentum 0.9, no weight decay, a schedule that changes every step)."""
    torch.manual_seed(0)
    x, y = torch.randn(12, 5), torch.randint(0, 3, (12,))
    lrs, sched = [0.5, 0.01], [1.0, 0.7, 0.3, 0.05]
    a = [torch.nn.Linear(5, 3) for _ in lrs]
    b = torch.nn.Linear(5, 6)
    with torch.no_grad():  # same start: b's output block j is classifier j
        b.weight.copy_(torch.cat([h.weight for h in a])), b.bias.copy_(torch.cat([h.bias for h in a]))
    opt_a = torch.optim.SGD([{"params": h.parameters(), "lr": lr} for h, lr in zip(a, lrs)], momentum=0.9)
    opt_b = torch.optim.SGD(b.parameters(), lr=1.0, momentum=0.9)
    for s in sched:
        for group, lr in zip(opt_a.param_groups, lrs):
            group["lr"] = lr * s
        opt_a.zero_grad(), sum(F.cross_entropy(h(x), y) for h in a).backward(), opt_a.step()
        opt_b.param_groups[0]["lr"] = s
        z = b(x).view(12, 2, 3).transpose(0, 1)  # (2, n, K)
        ce = torch.stack([F.cross_entropy(zj, y) for zj in z])
        opt_b.zero_grad(), (ce * torch.tensor(lrs)).sum().backward(), opt_b.step()
    torch.testing.assert_close(b.weight, torch.cat([h.weight for h in a]).detach(), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(b.bias, torch.cat([h.bias for h in a]).detach(), atol=1e-6, rtol=1e-5)


def test_label_from_map_derives_above_median(tmp_path):
    # six cases whose label maps hold 10, 20, ..., 60 voxels of value 2 (and some 1s): median 35 -> 0,0,0,1,1,1
    dl = {"training": [], "validation": [], "test": []}
    where = ["training", "validation", "test", "training", "validation", "test"]
    for i, split in enumerate(where):
        np.save(tmp_path / f"img{i}.npy", volume(i))
        lab = np.zeros((16, 16, 16), dtype=np.float32)
        lab.flat[: 10 * (i + 1)] = 2
        lab.flat[-50:] = 1
        np.save(tmp_path / f"lab{i}.npy", lab)
        dl[split].append({"image": f"img{i}.npy", "label": f"lab{i}.npy"})
    (tmp_path / "dl.json").write_text(json.dumps(dl))
    g, _ = run_probe(f"--datalist={tmp_path / 'dl.json'}", "--label_from_map=2", f"--out_dir={tmp_path / 'out'}",
                     "--n_runs=1", "--max_iters=10", *TINY)
    # cases are listed training, validation, test: img0, img3 | img1, img4 | img2, img5
    assert g["labels"].tolist() == [0, 1, 0, 1, 0, 1]


# -----------------------------------------------------------------------------
# bad input: clear errors naming the case, before any backbone work


def fails_before_backbone(tmp_path, splits, match, exc=ValueError, edit=None):
    dl = write_datalist(tmp_path / "vols", splits)
    if edit:
        edit(tmp_path / "vols")
    calls = []
    original = model.ViT3D.get_intermediate_layers
    model.ViT3D.get_intermediate_layers = lambda *a, **k: calls.append(1)
    try:
        with pytest.raises(exc, match=match):
            run_probe(f"--datalist={dl}", f"--out_dir={tmp_path / 'out'}", *TINY)
    finally:
        model.ViT3D.get_intermediate_layers = original
    assert not calls


def test_label_outside_the_classes(tmp_path):
    bad = dict(SPLITS, training=SPLITS["training"][:-1] + [(7, 2)])  # class 2 with num_classes = 2
    fails_before_backbone(tmp_path, bad, r"v07\.npy: label 2 is not a class index in \[0, 2\)")


def test_class_without_validation_example(tmp_path):
    bad = dict(SPLITS, validation=[(10, 0), (12, 0)])
    fails_before_backbone(tmp_path, bad, r"no validation example of class\(es\) \['1'\]")


def test_unreadable_volume(tmp_path):
    def corrupt(folder):
        (folder / "v05.npy").write_bytes(b"this is not a volume")

    fails_before_backbone(tmp_path, SPLITS, r"v05\.npy: unreadable", exc=data.VolumeError, edit=corrupt)


def test_augment_train_runs(tmp_path):
    """augment_train=True (set by configs/probe_covid.py and probe_icbm.py) draws random training views through
    augment.py's intensity transforms; it crashed with a TypeError when their wrappers lost `apply=`."""
    dl = write_datalist(tmp_path / "vols", SPLITS)
    g, n_encoded = run_probe(f"--datalist={dl}", f"--out_dir={tmp_path / 'out'}", "--n_runs=1", "--max_iters=20",
                             "--augment_train=True", "--n_aug_views=2", *TINY)
    assert json.loads((tmp_path / "out" / "results.json").read_text())["config"]["augment_train"] is True
    assert n_encoded == 16 + 8 * 2  # the fixed view of all 16 cases, and two random views of the 8 training ones


def test_mixed_channel_counts_are_named_before_any_feature(tmp_path):
    from configurator import ConfigError

    dl = json.loads(Path(write_datalist(tmp_path / "vols", SPLITS)).read_text())
    np.save(tmp_path / "vols" / "two.npy", np.stack([volume(30), volume(31)]))  # (2, 16, 16, 16): 2 channels
    dl["training"][0]["image"] = "two.npy"
    (tmp_path / "vols" / "mixed.json").write_text(json.dumps(dl))
    with pytest.raises(ConfigError, match=r"different channel counts \[1, 2\].*two.npy \(2\)"):
        run_probe(f"--datalist={tmp_path / 'vols' / 'mixed.json'}", f"--out_dir={tmp_path / 'out'}", *TINY)
