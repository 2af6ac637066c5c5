"""metrics.py against hand-built cases, brute-force definitions and scipy."""
import math

import numpy as np
import pytest

from scipy import ndimage, stats
from scipy.spatial.distance import cdist

import metrics
from metrics import (accuracy, bootstrap_ci, confusion_matrix, dice, f1_macro, hd95, macro_auc, roc_auc,
                     wilcoxon)


def cube(shape, start, size, value=1):
    """An int label map with a cube of `value` at `start` (corner) of edge `size`."""
    m = np.zeros(shape, dtype=np.int64)
    m[tuple(slice(s, s + size) for s in start)] = value
    return m


# -----------------------------------------------------------------------------
# Dice


def test_dice_identical_and_disjoint():
    a = cube((12, 12, 12), (2, 2, 2), 4)
    assert dice(a, a, 2).tolist() == [1.0]
    b = cube((12, 12, 12), (7, 7, 7), 4)
    assert dice(a, b, 2).tolist() == [0.0]


def test_dice_hand_computed_overlap_per_class():
    # class 1: a 4x4x4 cube shifted by 1 along axis 0 -> overlap 3*4*4 = 48 of 64 + 64 voxels
    # class 2: pred has 2 voxels, label 1 voxel, one shared -> 2*1/(2+1)
    pred = cube((10, 10, 10), (1, 1, 1), 4)
    label = cube((10, 10, 10), (2, 1, 1), 4)
    pred[9, 9, 9] = pred[9, 9, 8] = 2
    label[9, 9, 9] = 2
    np.testing.assert_allclose(dice(pred, label, 3), [2 * 48 / 128, 2 / 3])


def test_dice_empty_conventions():
    empty = np.zeros((6, 6, 6), dtype=np.int64)
    some = cube((6, 6, 6), (1, 1, 1), 2)
    d = dice(empty, empty, 3)
    assert np.isnan(d).all() and d.shape == (2,)  # both empty: undefined
    assert dice(some, empty, 2).tolist() == [0.0]  # label empty, pred not
    assert dice(empty, some, 2).tolist() == [0.0]  # pred empty, label not
    assert dice(some, some, 3)[0] == 1.0 and np.isnan(dice(some, some, 3)[1])  # class 2 absent from both


def test_dice_accepts_whole_float_labels_and_rejects_bad_input():
    a = cube((5, 5, 5), (1, 1, 1), 2)
    assert dice(a.astype(np.float32), a, 2).tolist() == [1.0]  # as nibabel's get_fdata returns label maps
    with pytest.raises(ValueError, match="same shape"):
        dice(a, a[:4], 2)
    with pytest.raises(ValueError, match="outside"):
        dice(a * 3, a, 2)
    with pytest.raises(ValueError, match="whole-number"):
        dice(a + 0.5, a, 2)


# -----------------------------------------------------------------------------
# HD95


def brute_hd95(p, l, spacing):
    """The definition, with no distance transform and no cropping: all pairwise surface distances."""
    sp = np.argwhere(p & ~ndimage.binary_erosion(p)) * spacing
    sl = np.argwhere(l & ~ndimage.binary_erosion(l)) * spacing
    d = cdist(sp, sl)
    return max(np.percentile(d.min(1), 95), np.percentile(d.min(0), 95))


def test_hd95_identical_is_zero():
    a = cube((16, 16, 16), (3, 4, 5), 6)
    assert hd95(a, a, 2, spacing=(0.7, 1.3, 2.5)).tolist() == [0.0]


@pytest.mark.parametrize("axis", [0, 1, 2])
@pytest.mark.parametrize("k", [1, 3])
def test_hd95_shifted_cube_is_shift_times_spacing(axis, k):
    # Every voxel of one cube's surface is within k voxels along `axis` of the other surface, and a whole face
    # (more than 5% of the surface) is exactly k away, so the 95th percentile is exactly k * spacing[axis].
    spacing = (0.8, 1.5, 3.0)
    start = [4, 4, 4]
    a = cube((24, 24, 24), start, 8)
    start[axis] += k
    b = cube((24, 24, 24), start, 8)
    np.testing.assert_allclose(hd95(a, b, 2, spacing=spacing), [k * spacing[axis]], rtol=1e-12)
    np.testing.assert_allclose(hd95(b, a, 2, spacing=spacing), [k * spacing[axis]], rtol=1e-12)


def test_hd95_matches_brute_force_on_random_blobs():
    # smoothed noise thresholded into irregular blobs, some touching the array border (the crop must clip there)
    rng = np.random.default_rng(0)
    spacing = np.array([0.9, 1.1, 2.0])
    for _ in range(3):
        field = ndimage.gaussian_filter(rng.standard_normal((3, 20, 22, 18)), sigma=(0, 2, 2, 2))
        pred = (field[0] > 0.05).astype(np.int64) + 2 * (field[1] > 0.1)
        label = (field[0] > -0.02).astype(np.int64) + 2 * (field[2] > 0.1)
        pred[pred == 3], label[label == 3] = 2, 2
        got = hd95(pred, label, 3, spacing=spacing)
        want = [brute_hd95(pred == c, label == c, spacing) for c in (1, 2)]
        np.testing.assert_allclose(got, want, rtol=1e-10)
    # and a case where the union's bounding box is much smaller than the volume
    a, b = cube((40, 40, 40), (5, 6, 7), 5), cube((40, 40, 40), (7, 5, 9), 6)
    b[12, 11, 14] = 0  # dent one so it is not a pure shift
    np.testing.assert_allclose(hd95(a, b, 2, spacing=spacing), [brute_hd95(a == 1, b == 1, spacing)])


def test_hd95_empty_conventions_and_spacing_check():
    empty = np.zeros((8, 8, 8), dtype=np.int64)
    some = cube((8, 8, 8), (2, 2, 2), 3)
    assert np.isnan(hd95(empty, empty, 2)).all()
    assert np.isnan(hd95(some, empty, 2)).all() and np.isnan(hd95(empty, some, 2)).all()
    assert hd95(some, empty, 2, empty=np.inf).tolist() == [np.inf]
    assert hd95(some, some, 2).tolist() == [0.0]  # default spacing 1
    with pytest.raises(ValueError, match="spacing"):
        hd95(some, some, 2, spacing=(1.0, 1.0))


# -----------------------------------------------------------------------------
# classification


def brute_auc(scores, labels):
    """Mann-Whitney U / (n_pos n_neg) by the double loop: each (positive, negative) pair scores 1, 1/2 or 0."""
    pos, neg = scores[labels == 1], scores[labels == 0]
    u = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in pos for n in neg)
    return u / (len(pos) * len(neg))


def test_roc_auc_matches_double_loop_and_mannwhitneyu_with_ties():
    rng = np.random.default_rng(0)
    for n in (5, 37, 200):
        labels = rng.integers(0, 2, n)
        labels[:2] = [0, 1]
        scores = rng.integers(0, 6, n) + labels  # small integers: many ties, informative
        auc = roc_auc(scores, labels)
        assert auc == pytest.approx(brute_auc(scores, labels), abs=1e-12)
        u = stats.mannwhitneyu(scores[labels == 1], scores[labels == 0]).statistic
        assert auc == pytest.approx(u / (labels.sum() * (n - labels.sum())), abs=1e-12)


def test_roc_auc_perfect_constant_and_errors():
    labels = np.array([0, 0, 1, 1, 1])
    assert roc_auc([0.1, 0.2, 0.3, 0.8, 0.9], labels) == 1.0
    assert roc_auc([0.9, 0.8, 0.3, 0.2, 0.1], labels) == 0.0
    assert roc_auc(np.full(5, 0.3), labels) == 0.5
    with pytest.raises(ValueError, match="both classes"):
        roc_auc([0.1, 0.2], [1, 1])
    with pytest.raises(ValueError, match="outside"):
        roc_auc([0.1, 0.2], [0, 2])


def test_macro_auc_three_class_hand_case():
    probs = np.array([[0.8, 0.1, 0.1],
                      [0.6, 0.3, 0.6],
                      [0.1, 0.5, 0.1],
                      [0.3, 0.2, 0.5],
                      [0.7, 0.3, 0.6],
                      [0.2, 0.1, 0.2]])
    labels = np.array([0, 0, 1, 1, 2, 2])
    # one-vs-rest, column by column, counting (positive, negative) pairs won (ties 1/2) out of 2 * 4:
    # col 0: pos {0.8, 0.6} vs neg {0.1, 0.3, 0.7, 0.2}: 0.8 wins 4, 0.6 wins 3 -> 7/8
    # col 1: pos {0.5, 0.2} vs neg {0.1, 0.3, 0.3, 0.1}: 0.5 wins 4, 0.2 wins 2 -> 6/8
    # col 2: pos {0.6, 0.2} vs neg {0.1, 0.6, 0.1, 0.5}: 0.6 wins 3 and ties 1, 0.2 wins 2 -> 5.5/8
    assert macro_auc(probs, labels) == pytest.approx((7 / 8 + 6 / 8 + 5.5 / 8) / 3)
    # a class with no sample is skipped: drop the class-2 samples, the 3rd column is ignored
    assert macro_auc(probs[:4], labels[:4]) == pytest.approx(
        (roc_auc(probs[:4, 0], labels[:4] == 0) + roc_auc(probs[:4, 1], labels[:4] == 1)) / 2)
    with pytest.raises(ValueError, match="two classes"):
        macro_auc(probs[:2], labels[:2])


def test_confusion_matrix_accuracy_and_f1_by_hand():
    labels = np.array([0, 0, 0, 1, 1, 2, 2, 2])
    pred = np.array([0, 1, 0, 1, 2, 2, 2, 0])
    cm = confusion_matrix(pred, labels, 4)
    want = np.zeros((4, 4), dtype=np.int64)
    want[:3, :3] = [[2, 1, 0],  # rows: true class, columns: predicted class
                    [0, 1, 1],
                    [1, 0, 2]]
    np.testing.assert_array_equal(cm, want)
    assert accuracy(pred, labels) == 5 / 8
    # F1 = 2TP / (2TP + FP + FN): class 0: 4/(4+1+1); class 1: 2/(2+1+1); class 2: 4/(4+1+1);
    # class 3 is absent from labels and pred and is left out of the mean
    assert f1_macro(pred, labels, 4) == pytest.approx((4 / 6 + 2 / 4 + 4 / 6) / 3)
    # a class predicted but never present scores 0 and counts
    pred2 = pred.copy()
    pred2[0] = 3  # class 0 now: TP 1, FN 2, FP 1 -> 2/5; class 3: TP 0, FP 1 -> 0
    assert f1_macro(pred2, labels, 4) == pytest.approx((2 / 5 + 2 / 4 + 4 / 6 + 0) / 4)
    with pytest.raises(ValueError, match="outside"):
        confusion_matrix(pred, labels, 2)


# -----------------------------------------------------------------------------
# statistics


def test_bootstrap_ci_contains_mean_is_seeded_and_narrows():
    rng = np.random.default_rng(1)
    small, large = rng.normal(0.8, 0.1, 20), rng.normal(0.8, 0.1, 500)
    m, lo, hi = bootstrap_ci(small)
    assert m == pytest.approx(small.mean()) and lo < m < hi
    assert bootstrap_ci(small, seed=3) == bootstrap_ci(small, seed=3)
    assert bootstrap_ci(small, seed=3) != bootstrap_ci(small, seed=4)
    _, lo2, hi2 = bootstrap_ci(large)
    assert hi2 - lo2 < (hi - lo) / 2  # width ~ 1/sqrt(n): 5x narrower here
    # the NaNs of undefined cases are dropped, not propagated
    assert bootstrap_ci(np.append(small, np.nan)) == bootstrap_ci(small)


def test_bootstrap_ci_degenerate_inputs():
    assert bootstrap_ci([0.7]) == (0.7, 0.7, 0.7)
    assert bootstrap_ci([0.7, np.nan]) == (0.7, 0.7, 0.7)
    assert all(np.isnan(bootstrap_ci([])))
    assert all(np.isnan(bootstrap_ci([np.nan, np.nan])))


def test_wilcoxon_small_p_for_a_shift_and_matches_scipy():
    rng = np.random.default_rng(2)
    a = rng.normal(0.80, 0.05, 30)
    b = a - 0.05 + rng.normal(0, 0.01, 30)  # b clearly worse on every case
    p = wilcoxon(a, b)
    assert p < 1e-6 and p == stats.wilcoxon(a, b).pvalue
    c = a + rng.normal(0, 0.05, 30)  # no shift: not significant here
    assert wilcoxon(a, c) == stats.wilcoxon(a, c).pvalue and wilcoxon(a, c) > 0.05
    # NaN pairs are dropped
    a2, b2 = np.append(a, np.nan), np.append(b, 0.5)
    assert wilcoxon(a2, b2) == p


def test_wilcoxon_degenerate_inputs():
    assert np.isnan(wilcoxon([0.5], [0.4]))
    assert np.isnan(wilcoxon([0.5, np.nan, 0.3], [0.4, 0.2, np.nan]))
    assert np.isnan(wilcoxon([0.5, 0.6], [0.5, 0.6]))  # all differences zero
    with pytest.raises(ValueError, match="same shape"):
        wilcoxon([1, 2, 3], [1, 2])


# -----------------------------------------------------------------------------
# collapse monitors (pretraining health)


def test_collapse_monitors_on_the_two_fixed_points_and_a_healthy_batch():
    import math

    import torch

    from metrics import collapse_monitors, collapse_state, effective_rank

    n, K, E = 8, 64, 16
    torch.manual_seed(0)
    cls = torch.randn(n, E)
    logits = torch.randn(n, K)
    # uniform targets: entropy ln K, KL = loss - ln K
    uniform = torch.full((n, K), 1 / K)
    m = collapse_monitors(cls, logits, uniform, cls, teacher_temp=0.04, dino_loss=torch.tensor(math.log(K) + 0.1))
    assert m["dino_target_entropy"] == pytest.approx(math.log(K), abs=1e-5)
    assert m["dino_marginal_entropy"] == pytest.approx(math.log(K), abs=1e-5)
    assert m["dino_kl"] == pytest.approx(0.1, abs=1e-5)
    assert collapse_state(m, K) == "uniform"
    # every image on the same prototype: marginal entropy 0 -> one-hot
    same = torch.zeros(n, K)
    same[:, 3] = 1
    m = collapse_monitors(cls, logits, same, cls)
    assert m["dino_target_entropy"] == pytest.approx(0, abs=1e-6) and m["dino_marginal_entropy"] < 1e-6
    assert collapse_state(m, K) == "one-hot"
    # healthy: each image its own prototype -> entropy 0, marginal ln n
    own = torch.eye(K)[:n]
    m = collapse_monitors(cls, logits, own, cls)
    assert m["dino_marginal_entropy"] == pytest.approx(math.log(n), abs=1e-5)
    assert collapse_state(m, K) is None
    # teacher_cls_std: identical rows -> 0; isotropic Gaussian rows -> ~1/sqrt(E)
    assert collapse_monitors(torch.ones(n, E), logits, own, cls)["teacher_cls_std"] == pytest.approx(0, abs=1e-7)
    wide = collapse_monitors(torch.randn(4096, E), torch.randn(4096, K), torch.full((4096, K), 1 / K), cls)
    assert wide["teacher_cls_std"] == pytest.approx(1 / math.sqrt(E), rel=0.05)
    # logit spread: std over rows / temperature
    m = collapse_monitors(cls, logits, own, cls, teacher_temp=0.5)
    assert m["teacher_logit_spread"] == pytest.approx(float(logits.std(0).mean()) / 0.5, rel=1e-6)
    # effective rank: one line -> 1; a centred simplex of 4 points in 3 directions -> 3 equal singular values
    line = torch.arange(6.0)[:, None] * torch.randn(1, E)
    assert effective_rank(line) == pytest.approx(1.0, abs=1e-3)
    assert effective_rank(torch.eye(4)) == pytest.approx(3.0, abs=1e-4)
    assert effective_rank(torch.ones(5, E)) == 0.0


def test_ibot_kl_subtracts_the_loss_weighting_of_the_target_entropy():
    import math

    import torch

    from metrics import collapse_monitors

    K = 32
    targets = torch.full((6, K), 1 / K)  # 6 masked tokens, uniform
    w = torch.tensor([1 / 2, 1 / 2, 1 / 4, 1 / 4, 1 / 4, 1 / 4])  # two masked images (of 4 rows)
    loss = torch.tensor(2 * math.log(K) / 4 + 0.3)  # sum_j w_j CE_j / n_crops with CE = ln K, plus 0.3
    m = collapse_monitors(torch.randn(4, 8), torch.randn(4, K), torch.full((4, K), 1 / K), torch.randn(4, 8),
                          ibot_targets=targets, ibot_weights=w, ibot_loss=loss, n_crops=4)
    assert m["ibot_target_entropy"] == pytest.approx(math.log(K), abs=1e-5)
    assert m["ibot_kl"] == pytest.approx(0.3, abs=1e-5)


def test_pretrain_summary_reads_the_last_tenth_of_the_rows_against_ln_k():
    K = 256
    ln_k = math.log(K)
    rows = [{"config": {}}] + [{"step": i, "dino_loss": ln_k, "ibot_loss": 0.5 * ln_k} for i in range(19)]
    assert "still near the uniform fixed point" in metrics.pretrain_summary(rows, K, 0.5)
    rows += [{"step": 19, "dino_loss": 0.7 * ln_k, "ibot_loss": 0.25 * ln_k},
             {"step": 20, "dino_loss": 0.78 * ln_k, "ibot_loss": 0.25 * ln_k}]
    line = metrics.pretrain_summary(rows, K, 0.5)  # 21 rows: the last 2 count
    assert "= 0.740 ln K over the last 2 of 21" in line and "left the uniform fixed point" in line
    assert "0.50 x its no-information value" in line
    rows[-1]["dino_loss"] = 0.95 * ln_k
    assert "above the 0.8 ln K criterion" in metrics.pretrain_summary(rows, K, 0.5)
