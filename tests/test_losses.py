"""
Tests for losses.py: closed forms, the reference's golden values, the 2-process all-reduce, dtypes, gradients,
bad inputs, and the segmentation losses. All on CPU, ~10 s (most of it the two spawned gloo processes).
"""
import math
import os
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import losses
from conftest import GOLDEN, requires_shared
from losses import dino_loss, ibot_loss, koleo_loss, sinkhorn_knopp, softmax_center, update_center


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _masks_weight(masks):
    """(n_crops, N) bool masks -> (M,) weights 1 / #masked(image), in mask_indices order (as the collate does)."""
    per_image = 1.0 / masks.sum(dim=1).clamp(min=1).float()  # (n_crops,)
    return per_image[:, None].expand_as(masks)[masks]  # (n_crops, N) -> (M,)


# ----------------------------------------------------------------------------------------------------------------
# closed forms


def test_dino_uniform_student_and_teacher_is_log_k():
    B, K = 3, 37
    students = [torch.full((B, K), 5.0) for _ in range(10)]  # constant logits: a uniform student softmax
    teachers = [torch.full((B, K), 1.0 / K) for _ in range(2)]
    assert dino_loss(students, teachers).item() == pytest.approx(math.log(K), abs=1e-6)


def test_dino_and_ibot_are_zero_for_a_sharp_student_matching_a_one_hot_teacher():
    B, K = 4, 32
    g = _gen(1)
    target = torch.randint(0, K, (B,), generator=g)
    one_hot = torch.nn.functional.one_hot(target, K).float()
    # a sharp student: the teacher's class leads every other logit by > 4, i.e. by > 40 after / student_temp 0.1,
    # so CE = log(1 + sum_other exp(-margin)) < K exp(-40)
    students = [torch.rand(B, K, generator=g) + 5.0 * one_hot for _ in range(10)]
    assert 0 <= dino_loss(students, [one_hot, one_hot]).item() < K * math.exp(-40)
    loss = ibot_loss(students[0], one_hot, torch.ones(B), n_crops=B)
    assert 0 <= loss.item() < K * math.exp(-40)
    # and the same student against the *wrong* one-hot is far from 0 (the test can fail)
    wrong = torch.nn.functional.one_hot((target + 1) % K, K).float()
    assert dino_loss(students, [wrong, wrong]).item() > 40


def test_dino_is_the_mean_over_the_18_pairs_without_same_view_pairs():
    B, K = 2, 8
    g = _gen(2)
    students = [torch.randn(B, K, generator=g) for _ in range(10)]
    teachers = [torch.softmax(torch.randn(B, K, generator=g), -1) for _ in range(2)]

    def ce(p, s):
        return -(p * torch.log_softmax(s / 0.1, -1)).sum(-1).mean()

    pairs = [(t, s) for t in range(2) for s in range(10) if s != t]
    assert len(pairs) == 18
    expected = sum(ce(teachers[t], students[s]) for t, s in pairs) / 18
    torch.testing.assert_close(dino_loss(students, teachers), expected, rtol=0, atol=1e-6)
    # a student global crop that copies its own teacher view is *not* rewarded: only cross-view pairs count
    cheat = list(students)
    cheat[0] = torch.log(teachers[0]) * 0.1  # student crop 0 == teacher crop 0 exactly
    changed = dino_loss(cheat, teachers) - dino_loss(students, teachers)
    expected_change = (ce(teachers[1], cheat[0]) - ce(teachers[1], students[0])) / 18
    torch.testing.assert_close(changed, expected_change, rtol=0, atol=1e-6)


def test_sinkhorn_rows_sum_to_one_and_prototype_marginals_are_uniform():
    n, K = 12, 8
    T = 0.5 * torch.randn(n, K, generator=_gen(3))
    P = sinkhorn_knopp(T, teacher_temp=0.1, n_iters=500)  # run to the fixed point
    torch.testing.assert_close(P.sum(1), torch.ones(n), rtol=0, atol=1e-5)
    torch.testing.assert_close(P.sum(0), torch.full((K,), n / K), rtol=0, atol=1e-5)
    assert (P >= 0).all()
    # the reference's 3 rounds: rows still exact; prototype marginals far more uniform than a plain softmax
    P3 = sinkhorn_knopp(T, teacher_temp=0.1)
    torch.testing.assert_close(P3.sum(1), torch.ones(n), rtol=0, atol=1e-6)
    plain = torch.softmax(T / 0.1, -1)
    assert (P3.sum(0) - n / K).abs().max() < 0.5 * (plain.sum(0) - n / K).abs().max()


def test_sinkhorn_max_subtraction_is_exact_and_avoids_overflow():
    # Sinkhorn is invariant to adding a constant to every logit. With +5 at teacher_temp 0.04 the reference's
    # exp(T / tau) = exp(~130) overflows fp32; ours must give the same targets as for the unshifted logits
    # (up to the fp32 rounding of T + 5, which /0.04 turns into ~1e-5 relative).
    T = 0.5 * torch.randn(16, 32, generator=_gen(4))
    assert torch.isinf(torch.exp((T + 5.0) / 0.04)).any()  # what the reference would compute
    torch.testing.assert_close(sinkhorn_knopp(T + 5.0, 0.04), sinkhorn_knopp(T, 0.04), rtol=1e-4, atol=1e-5)


def test_sinkhorn_is_permutation_equivariant_over_rows():
    # why the crop swap needs no reordering here: permuting the rows of T permutes the rows of the targets
    T = 0.5 * torch.randn(10, 16, generator=_gen(5))
    perm = torch.randperm(10, generator=_gen(6))
    torch.testing.assert_close(sinkhorn_knopp(T[perm], 0.05), sinkhorn_knopp(T, 0.05)[perm], rtol=0, atol=1e-7)


def test_softmax_center_and_update_center():
    K = 16
    g = _gen(7)
    T = torch.randn(6, K, generator=g)
    for shape in [(1, K), (1, 1, K)]:  # the DINO and the iBOT center of reference checkpoints
        c = 0.1 * torch.randn(shape, generator=g)
        P = softmax_center(T, c, 0.05)
        torch.testing.assert_close(P, torch.softmax((T - c.reshape(1, K)) / 0.05, -1))
        c_before = c.clone()
        new = update_center(c, T, momentum=0.9)
        assert new.shape == c.shape and torch.equal(c, c_before)  # returns a new tensor, input untouched
        torch.testing.assert_close(new.reshape(K), 0.9 * c.reshape(K) + 0.1 * T.mean(0), rtol=0, atol=1e-7)


def test_koleo_is_lower_for_spread_points_and_finite_for_duplicates():
    g = _gen(8)
    spread = torch.randn(16, 32, generator=g)
    clustered = torch.randn(1, 32, generator=g) + 0.05 * torch.randn(16, 32, generator=g)
    assert koleo_loss(spread) < koleo_loss(clustered) - 1.0
    dup = torch.randn(4, 32, generator=g)
    dup[1] = dup[0]
    for x in [dup, dup.half(), dup.bfloat16()]:
        loss = koleo_loss(x)
        assert torch.isfinite(loss) and loss.dtype == torch.float32
    plain = koleo_loss(dup), koleo_loss(spread)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast must not push the Gram matrix into bf16
        torch.testing.assert_close((koleo_loss(dup), koleo_loss(spread)), plain, rtol=0, atol=0)
    x = dup.clone().requires_grad_(True)
    koleo_loss(x).backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_koleo_single_row_is_a_constant_with_zero_gradient():
    x = torch.randn(1, 8, requires_grad=True)
    loss = koleo_loss(x)
    loss.backward()
    assert torch.isfinite(loss) and torch.all(x.grad == 0)


def test_ibot_gives_every_image_the_same_total_weight():
    n_crops, N, K = 4, 16, 12
    g = _gen(9)
    counts = [1, 5, 0, 10]  # masked patches per image; image 2 has none
    masks = torch.zeros(n_crops, N, dtype=torch.bool)
    for i, c in enumerate(counts):
        masks[i, torch.randperm(N, generator=g)[:c]] = True
    w = _masks_weight(masks)
    image_of = torch.arange(n_crops)[:, None].expand_as(masks)[masks]  # (M,) image index of each masked token
    per_image_weight = torch.zeros(n_crops).index_add_(0, image_of, w)
    torch.testing.assert_close(per_image_weight, torch.tensor([1.0, 1.0, 0.0, 1.0]))

    # loss = mean over all 4 images of (mean CE over the image's masked tokens), the unmasked image counting 0
    s = torch.randn(len(w), K, generator=g)
    t = torch.softmax(torch.randn(len(w), K, generator=g) / 0.1, -1)
    ce = -(t * torch.log_softmax(s / 0.1, -1)).sum(-1)
    expected = sum(ce[image_of == i].mean() for i in range(n_crops) if counts[i] > 0) / n_crops
    torch.testing.assert_close(ibot_loss(s, t, w, n_crops=n_crops), expected, rtol=0, atol=1e-6)

    # duplicating every masked token of image 3 (20 instead of 10, weights halve) changes nothing
    dup = image_of == 3
    s2, t2, img2 = torch.cat([s, s[dup]]), torch.cat([t, t[dup]]), torch.cat([image_of, image_of[dup]])
    counts2 = torch.bincount(img2, minlength=n_crops).float()
    w2 = 1.0 / counts2[img2]
    torch.testing.assert_close(ibot_loss(s2, t2, w2, n_crops=n_crops), ibot_loss(s, t, w, n_crops=n_crops))


# ----------------------------------------------------------------------------------------------------------------
# golden values of the reference implementation (../shared/golden/losses_ref.pt, README §2)


@pytest.fixture(scope="module")
def golden():
    return torch.load(GOLDEN / "losses_ref.pt", weights_only=True)


def _close(mine, ref):
    torch.testing.assert_close(mine, ref, rtol=1e-5, atol=1e-5)


@requires_shared
def test_golden_sinkhorn_and_the_crop_swap(golden):
    d, B, tau = golden, golden["config"]["B"], golden["config"]["teacher_temp"]
    _close(sinkhorn_knopp(d["teacher_global_logits_swapped"], tau), d["sk_targets"])
    # natural crop order: the same targets with the two crop halves exchanged (row-permutation equivariance)
    swapped_back = torch.cat([d["sk_targets"][B:], d["sk_targets"][:B]])
    _close(sinkhorn_knopp(d["teacher_global_logits"], tau), swapped_back)
    _close(sinkhorn_knopp(d["teacher_patch_logits"], tau), d["ibot_sk_targets"])


@requires_shared
def test_golden_softmax_centering(golden):
    d, B, tau = golden, golden["config"]["B"], golden["config"]["teacher_temp"]
    T_sw = d["teacher_global_logits_swapped"]
    _close(softmax_center(T_sw, d["center_in"], tau), d["softmax_targets"])
    _close(update_center(d["center_in"], T_sw, momentum=0.9), d["center_after_update"])
    _close(update_center(d["center_in"], d["teacher_global_logits"], 0.9), d["center_after_update"])  # order-free
    _close(softmax_center(d["teacher_patch_logits"], d["ibot_center_in"], tau), d["ibot_softmax_targets"])
    _close(update_center(d["ibot_center_in"], d["teacher_patch_logits"], 0.9), d["ibot_center_after_update"])


@requires_shared
def test_golden_dino_loss(golden):
    d, B, tau = golden, golden["config"]["B"], golden["config"]["teacher_temp"]
    students = list(d["student_global_logits"].chunk(2)) + list(d["student_local_logits"].chunk(8))
    for targets_natural, suffix in [
        (sinkhorn_knopp(d["teacher_global_logits"], tau), ""),
        (softmax_center(d["teacher_global_logits"], d["center_in"], tau), "_centering"),
    ]:
        teachers = list(targets_natural.chunk(2))  # [P(global 0), P(global 1)], natural order
        total = d[f"dino_local_crops_loss{suffix}"] + d[f"dino_global_crops_loss{suffix}"]
        _close(dino_loss(students, teachers), total)
        # the two parts: globals alone average the 2 cross-view pairs; the reference weighs them 2/18
        global_part = dino_loss(students[:2], teachers) * 2 / 18
        _close(global_part, d[f"dino_global_crops_loss{suffix}"])
    _close(dino_loss(students, list(sinkhorn_knopp(d["teacher_global_logits"], tau).chunk(2))), d["dino_loss_sum"])


@requires_shared
def test_golden_ibot_loss(golden):
    d, tau = golden, golden["config"]["teacher_temp"]
    n_crops = d["masks"].shape[0]  # 2B = 8 global-crop rows, 4 of them unmasked
    _close(_masks_weight(d["masks"]), d["masks_weight"])
    targets = sinkhorn_knopp(d["teacher_patch_logits"], tau)
    _close(ibot_loss(d["student_patch_logits"], targets, d["masks_weight"], n_crops), d["ibot_loss"])
    _close(ibot_loss(d["student_patch_logits"], d["ibot_sk_targets"], d["masks_weight"], n_crops),
           d["ibot_forward_masked"])
    targets_c = softmax_center(d["teacher_patch_logits"], d["ibot_center_in"], tau)
    _close(ibot_loss(d["student_patch_logits"], targets_c, d["masks_weight"], n_crops), d["ibot_loss_centering"])


@requires_shared
def test_golden_koleo_and_total(golden):
    d, B, tau = golden, golden["config"]["B"], golden["config"]["teacher_temp"]
    x = d["student_global_cls"]
    per_crop = torch.stack([koleo_loss(x[:B]), koleo_loss(x[B:])])
    _close(per_crop, d["koleo_per_crop"])
    _close(0.1 * per_crop.sum(), d["koleo_loss"])
    _close(koleo_loss(d["koleo_x"]), d["koleo_value"])
    _close(koleo_loss(d["koleo_dup_x"]), d["koleo_dup_value"])
    assert torch.isinf(d["koleo_dup_value_fp16"])  # the reference in fp16 ...
    assert torch.isfinite(koleo_loss(d["koleo_dup_x"].half()))  # ... ours on the same fp16 input
    # the whole training-step objective in the default Sinkhorn-Knopp mode
    students = list(d["student_global_logits"].chunk(2)) + list(d["student_local_logits"].chunk(8))
    total = (
        dino_loss(students, list(sinkhorn_knopp(d["teacher_global_logits"], tau).chunk(2)))
        + 0.1 * per_crop.sum()
        + ibot_loss(d["student_patch_logits"], sinkhorn_knopp(d["teacher_patch_logits"], tau),
                    d["masks_weight"], d["masks"].shape[0])
    )
    _close(total, d["total_loss"])


# ----------------------------------------------------------------------------------------------------------------
# dtypes and gradients


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs_match_the_fp32_path(dtype):
    B, K = 4, 64
    g = _gen(10)
    T32 = 0.5 * torch.randn(2 * B, K, generator=g)
    S32 = 0.5 * torch.randn(10 * B, K, generator=g)
    T, S = T32.to(dtype), S32.to(dtype)
    c = (0.1 * torch.randn(1, K, generator=g)).to(dtype)
    x = torch.randn(B, 32, generator=g).to(dtype)
    w = torch.full((2 * B,), 0.5)
    # the same (rounded) values given in fp32 must give the same result: everything is computed in fp32 inside
    P = sinkhorn_knopp(T, 0.04).to(dtype)  # teacher targets as a low-precision pipeline might hand them over
    fns = {
        "sinkhorn_knopp": lambda T, S: sinkhorn_knopp(T, 0.04),
        "softmax_center": lambda T, S: softmax_center(T, c, 0.04),
        "update_center": lambda T, S: update_center(c.float(), T),
        "dino_loss": lambda T, S: dino_loss(list(S.chunk(10)), list(P.to(T.dtype).chunk(2))),
        "ibot_loss": lambda T, S: ibot_loss(S[: 2 * B], P.to(T.dtype), w, 4),
        "koleo_loss": lambda T, S: koleo_loss(x.to(T.dtype)),
    }
    for name, f in fns.items():
        out = f(T, S)
        assert out.dtype == torch.float32, name
        torch.testing.assert_close(out, f(T.float(), S.float()), rtol=0, atol=1e-6, msg=name)
    # and close to the unrounded fp32 inputs (the only error is the input rounding)
    torch.testing.assert_close(fns["dino_loss"](T, S), fns["dino_loss"](T32, S32), rtol=2e-2, atol=0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        torch.testing.assert_close(fns["dino_loss"](T, S), fns["dino_loss"](T.float(), S.float()))


def test_gradients_reach_the_student_only():
    B, K = 3, 16
    g = _gen(11)
    S = torch.randn(10 * B, K, generator=g, requires_grad=True)
    P = torch.softmax(torch.randn(2 * B, K, generator=g), -1).requires_grad_(True)
    dino_loss(list(S.chunk(10)), list(P.chunk(2))).backward()
    assert S.grad is not None and S.grad.abs().sum() > 0 and P.grad is None
    S.grad = None
    ibot_loss(S[:B], P[:B], torch.ones(B) / B, 2).backward()
    assert S.grad[:B].abs().sum() > 0 and P.grad is None
    T = torch.randn(2 * B, K, requires_grad=True)
    assert not sinkhorn_knopp(T, 0.05).requires_grad and not softmax_center(T, torch.zeros(1, K), 0.05).requires_grad


# ----------------------------------------------------------------------------------------------------------------
# bad inputs


def test_bad_inputs_raise_clear_errors():
    B, K = 2, 8
    S, P = torch.randn(B, K), torch.softmax(torch.randn(B, K), -1)
    with pytest.raises(ValueError, match="losses.py: dino_loss.*K"):
        dino_loss([S, S, torch.randn(B, K + 1)], [P, P])
    with pytest.raises(ValueError, match="losses.py: ibot_loss"):
        ibot_loss(torch.randn(B, K + 1), P, torch.ones(B), 4)
    with pytest.raises(ValueError, match="empty mask set"):
        ibot_loss(torch.randn(0, K), torch.zeros(0, K), torch.zeros(0), 4)
    with pytest.raises(ValueError, match="no rows"):
        sinkhorn_knopp(torch.randn(0, K), 0.05)
    with pytest.raises(ValueError, match="center"):
        softmax_center(torch.randn(B, K), torch.zeros(1, K + 1), 0.05)
    with pytest.raises(ValueError, match="no .*pair"):
        dino_loss([S], [P])
    # NaN/inf are not raised here (that would be a host sync per loss on a GPU): they reach the value, and
    # pretrain.py's check on the total stops the run (tests/test_pretrain.py)
    nan = torch.full((B, K), float("nan"))
    assert torch.isnan(dino_loss([S, nan, S], [P, P]))
    assert torch.isnan(dino_loss([S, S, S], list(sinkhorn_knopp(torch.cat([nan, S]), 0.05).chunk(2))))
    assert torch.isnan(ibot_loss(nan, P, torch.ones(B) / B, 2))
    assert torch.isnan(koleo_loss(torch.cat([nan, S])))


# ----------------------------------------------------------------------------------------------------------------
# segmentation losses (finetuning): Dice, Dice + CE, sigmoid Dice on overlapping regions


def test_dice_loss_hand_cases():
    p = torch.tensor([1.0, 1.0, 0.0, 0.0]).view(1, 1, 4, 1, 1)
    g = torch.tensor([1.0, 0.0, 0.0, 0.0]).view(1, 1, 4, 1, 1)
    assert math.isclose(losses.dice_loss(p, g).item(), 1 - (2 + 1e-5) / (3 + 1e-5), rel_tol=1e-6)  # 1/3
    assert losses.dice_loss(g, g).item() < 1e-6
    assert losses.dice_loss(torch.zeros_like(g), torch.zeros_like(g)).item() < 1e-6  # empty in both: no penalty
    # squared_pred (BraTS): Σp² in the denominator
    q = torch.full((1, 1, 4, 1, 1), 0.5)
    assert math.isclose(losses.dice_loss(q, g, squared=True, smooth_nr=0.0).item(), 1 - 1.0 / (1.0 + 1.0 + 1e-5),
                        rel_tol=1e-5)


def test_dice_ce_perfect_and_uniform():
    torch.manual_seed(0)
    label = torch.randint(0, 4, (2, 6, 5, 7))
    onehot = torch.nn.functional.one_hot(label, 4).permute(0, 4, 1, 2, 3).float()
    assert losses.seg_loss(50 * onehot, label, "dice_ce").item() < 1e-4  # perfect prediction -> ~0
    assert losses.seg_loss(50 * onehot, label, "dice").item() < 1e-4
    assert losses.seg_loss(-50 * onehot, label, "dice").item() > 0.99  # every voxel wrong -> ~1
    uniform = torch.zeros(2, 4, 6, 5, 7)
    ce = losses.seg_loss(uniform, label, "dice_ce").item() - losses.seg_loss(uniform, label, "dice").item()
    assert math.isclose(ce, math.log(4), rel_tol=1e-5)  # CE of a uniform softmax = log K


def test_sigmoid_dice_on_brats_regions():
    regions = [[1, 3], [1, 2, 3], [3]]  # TC, WT, ET
    label = torch.tensor([0, 1, 2, 3]).view(1, 4, 1, 1)
    r = losses.label_to_regions(label, regions)[0, :, :, 0, 0]  # (R, 4)
    assert r.tolist() == [[0, 1, 0, 1], [0, 1, 1, 1], [0, 0, 0, 1]]
    logits = 50 * (2 * losses.label_to_regions(label, regions) - 1)
    assert losses.seg_loss(logits, label, "sigmoid_dice", regions).item() < 1e-4


# ----------------------------------------------------------------------------------------------------------------
# two CPU processes (gloo): the all-reduced Sinkhorn / center of two half-batches == one process on the whole batch

SPLITS = [6, 5, 0]  # rows on rank 0 out of 12: equal halves, unequal halves, one rank with no rows at all


def _ddp_worker(rank, init_file, T, c, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2,
                            timeout=timedelta(seconds=60))
    try:
        result = {}
        for n0 in SPLITS:
            mine = T[:n0] if rank == 0 else T[n0:]
            result[f"sk_{n0}"] = sinkhorn_knopp(mine, 0.04)
            result[f"center_{n0}"] = update_center(c, mine, momentum=0.9)
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_process_sinkhorn_and_center_equal_the_single_process_result(tmp_path):
    T = 0.5 * torch.randn(12, 16, generator=_gen(12))
    c = 0.1 * torch.randn(1, 16, generator=_gen(13))
    mp.spawn(_ddp_worker, args=(str(tmp_path / "pg_init"), T, c, str(tmp_path)), nprocs=2, join=True)
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert not dist.is_initialized()
    whole = sinkhorn_knopp(T, 0.04)
    center = update_center(c, T, momentum=0.9)
    for n0 in SPLITS:
        assert r0[f"sk_{n0}"].shape == (n0, 16) and r1[f"sk_{n0}"].shape == (12 - n0, 16)
        torch.testing.assert_close(torch.cat([r0[f"sk_{n0}"], r1[f"sk_{n0}"]]), whole, rtol=0, atol=1e-6)
        torch.testing.assert_close(r0[f"center_{n0}"], center, rtol=0, atol=1e-6)
        torch.testing.assert_close(r1[f"center_{n0}"], center, rtol=0, atol=1e-6)
    # and it is not trivially so: each half's own single-process Sinkhorn differs from its rows of the whole
    assert (sinkhorn_knopp(T[:6], 0.04) - whole[:6]).abs().max() > 1e-3
