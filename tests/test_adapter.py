"""adapter.py: pyramid shapes (single/multi-channel, non-cubic, patch 8 and 16), every head's logits and
gradients (frozen and trainable ViT), the octant offset init of paper Eq. 4, the MSDA coordinate convention
(each query samples its own voxel centre; the reference's permuted convention does not), channel mixing
(C = 1 is the plain path; duplicated channels reduce to one), activation checkpointing, sliding-window
inference and its blending, which head takes which options, and the errors.

Tiny ViTs (E 64-128, depth 4-8) on 32-64 voxel inputs keep the file fast on 2 CPU cores.
"""
import numpy as np
import pytest
import torch

import adapter
from adapter import ChannelMix, LinearHead, UNETR, ViTAdapter, build_segmenter, layer_indices, octant_offsets
from model import ViT3D


def tiny_vit(patch_size=16, embed_dim=64, depth=4, seed=0):
    torch.manual_seed(seed)
    return ViT3D(img_size=32, patch_size=patch_size, embed_dim=embed_dim, depth=depth, num_heads=2)


# ============ pyramid shapes ============


@pytest.mark.parametrize("B,C,p,size", [(2, 1, 16, (32, 48, 64)), (1, 2, 8, (48, 32, 48)), (1, 3, 16, (64, 32, 32))])
def test_pyramid_shapes_single_and_multichannel(B, C, p, size):
    torch.manual_seed(0)
    a = ViTAdapter(tiny_vit(p), in_chans=C).eval()
    with torch.no_grad():
        feats = a(torch.randn(B, C, *size))
    assert len(feats) == 4
    for f, s in zip(feats, (2, 4, 8, 16)):
        assert f.shape == (B, 64, *(n // s for n in size))
        assert torch.isfinite(f).all()


def test_vit_path_is_the_backbone_when_nothing_is_injected():
    # with gamma = 0 the injector adds nothing, so the recorded ViT outputs of the four groups must be exactly the
    # backbone's own block outputs at d/4-1, d/2-1, 3d/4-1, d-1 — per input channel (folded into the batch)
    vit = tiny_vit(16, depth=8).eval()
    a = ViTAdapter(vit, in_chans=2, init_values=0.0).eval()
    x = torch.randn(1, 2, 32, 48, 32)
    with torch.no_grad():
        _, _, outs, (grid, _) = a.forward_interactions(x)
        ref = vit.get_intermediate_layers(x.reshape(2, 1, 32, 48, 32), n=[1, 3, 5, 7], reshape=True, norm=False)
    assert grid == (2, 3, 2)
    for o, r in zip(outs, ref):
        assert o.shape == (2, 64, 2, 3, 2)
        torch.testing.assert_close(o, r, rtol=1e-5, atol=1e-5)


# ============ heads ============


@pytest.mark.parametrize("head,C,p", [("vit_adapter_unetr", 2, 16), ("vit_adapter_unetr", 1, 8), ("unetr", 2, 16),
                                      ("unetr", 1, 8), ("linear", 2, 16), ("linear", 1, 8)])
def test_heads_logits_and_frozen_backbone_gradients(head, C, p):
    vit = tiny_vit(p)
    kw = {} if head == "linear" else {"feature_size": 4}
    seg = build_segmenter(head, vit, C, num_classes=3, **kw)
    assert seg.vit is vit
    for q in seg.vit.parameters():  # how finetune_seg.py freezes the backbone
        q.requires_grad = False
    seg.train()
    seg.vit.eval()
    x = torch.randn(2, C, 32, 32, 48)
    y = seg(x)
    assert y.shape == (2, 3, 32, 32, 48)
    y.square().mean().backward()
    assert all(q.grad is None for q in vit.parameters())
    trainable = [(n, q) for n, q in seg.named_parameters() if q.requires_grad]
    assert trainable
    missing = [n for n, q in trainable if q.grad is None or not torch.isfinite(q.grad).all()]
    assert not missing, f"no/invalid gradient for {missing[:5]}"
    assert any(q.grad.abs().sum() > 0 for _, q in trainable)


def test_unetr_trains_the_backbone_end_to_end():
    # the paper's "Random" baseline: the whole UNETR, ViT included, is tuned
    vit = tiny_vit(16)
    seg = UNETR(vit, 1, 2, feature_size=4)
    seg(torch.randn(1, 1, 32, 32, 32)).mean().backward()
    used = [q for n, q in vit.named_parameters() if n != "mask_token"]  # no masking in segmentation
    assert all(q.grad is not None for q in used)


def test_layer_indices_derive_from_depth():
    assert layer_indices(24) == [5, 11, 17, 23]  # the reference's hard-coded ViT-L choice
    assert layer_indices(12) == [2, 5, 8, 11]
    assert UNETR(tiny_vit(16, depth=8), 1, 2, feature_size=4).layers == [1, 3, 5, 7]
    assert LinearHead(tiny_vit(16, depth=8), 1, 2).layers == [4, 5, 6, 7]
    a = ViTAdapter(tiny_vit(16, depth=8))
    assert a.interaction_indexes == [(0, 2), (2, 4), (4, 6), (6, 8)]
    assert [len(i.extra_extractors) for i in a.interactions] == [0, 0, 0, 2]


# ============ MSDA initialisation and coordinate convention ============


def test_octant_init_points_each_head_to_its_octant():
    a = ViTAdapter(tiny_vit(16, embed_dim=128))
    expected = octant_offsets(8, 3, 4)
    for msda_mod in (a.interactions[0].injector.attn, a.interactions[3].extra_extractors[1].attn):
        L = msda_mod.n_levels
        query = torch.randn(2, 5, 128)  # any query: the offset weights are zero at init
        off = msda_mod.offsets(query)  # (B, Q, nH, L, P, 3) in voxels
        assert off.shape == (2, 5, 8, L, 4, 3)
        signs = set()
        for m in range(8):
            s = off[0, 0, m, 0, 0].sign()
            assert (off[0, 0, m, 0, 0].abs() == 1).all()
            signs.add(tuple(s.tolist()))
            for p in range(4):  # point p at radius p+1 along the head's sign vector, on every level, every query
                torch.testing.assert_close(off[:, :, m, :, p], ((p + 1) * s).expand(2, 5, L, 3))
        assert len(signs) == 8  # the 8 heads cover the 8 octants
        torch.testing.assert_close(off[0, 0], expected[:, :L])
        # Eq. 4's order: (-,-,-), (-,-,+), (-,+,-), ... , (+,+,+)
        assert off[0, 0, 1, 0, 0].tolist() == [-1, -1, 1] and off[0, 0, 6, 0, 0].tolist() == [1, 1, -1]
        # attention starts uniform over the L*P points of a head
        assert (msda_mod.attention_weights.weight == 0).all() and (msda_mod.attention_weights.bias == 0).all()
    assert (a.interactions[0].injector.gamma == 1e-6).all()


def _coordinate_probe(attn, level, point=None):
    """Rig an MSDA module so that its output is the sampled *voxel coordinates* of one value level: all attention
    on `level` (and on one `point` if given, keeping the init offsets; else zero offsets), value_proj copies input
    channels 0..2 into channels 0..2 of every head, output_proj copies head m's channels 0..2 to output channels
    3m..3m+2."""
    nH, Dh, L, P = attn.n_heads, attn.head_dim, attn.n_levels, attn.n_points
    with torch.no_grad():
        b = torch.full((nH, L, P), -1e4)
        if point is None:
            attn.sampling_offsets.bias.zero_()
            b[:, level] = 0
        else:
            b[:, level, point] = 0
        attn.attention_weights.bias.copy_(b.flatten())
        attn.value_proj.weight.zero_(), attn.value_proj.bias.zero_()
        attn.output_proj.weight.zero_(), attn.output_proj.bias.zero_()
        for m in range(nH):
            for k in range(3):
                attn.value_proj.weight[m * Dh + k, k] = 1
                attn.output_proj.weight[3 * m + k, m * Dh + k] = 1


def _coordinate_values(shapes, E):
    """Value tokens whose channels 0..2 hold each voxel's own (i, j, k) index, level after level."""
    toks = []
    for H, W, D in shapes:
        ijk = torch.stack(torch.meshgrid(torch.arange(H), torch.arange(W), torch.arange(D), indexing="ij"), -1)
        t = torch.zeros(H * W * D, E)
        t[:, :3] = ijk.reshape(-1, 3).float()  # (H, W, D, 3) -> (HWD, 3), C order as the tokens
        toks.append(t)
    return torch.cat(toks)[None]


def _query_coords(grid, target):
    """Continuous voxel coordinates, in a level of shape `target`, of the centres of the voxels of `grid`:
    centre (i + .5)/n in [0, 1] -> (i + .5) * N / n - .5 in the other grid. (Q, 3)."""
    ijk = torch.stack(torch.meshgrid(*[torch.arange(n) for n in grid], indexing="ij"), -1).reshape(-1, 3).float()
    n, N = torch.tensor(grid).float(), torch.tensor(target).float()
    return (ijk + 0.5) * N / n - 0.5


@pytest.mark.parametrize("size", [(32, 48, 64), (64, 32, 48)])
def test_injector_query_samples_its_own_voxel_centre(size):
    E = 128  # value width 32 over 8 heads: 4 channels per head, room for 3 coordinates
    a = ViTAdapter(tiny_vit(16, embed_dim=E))
    grid, c_shapes, (ref, shapes, starts), _ = a.deform_inputs(size)
    attn = a.interactions[0].injector.attn
    value = _coordinate_values(c_shapes, E)
    query = torch.randn(1, ref.shape[1], E)
    for level in range(3):
        _coordinate_probe(attn, level)
        with torch.no_grad():
            out = attn(query, ref, value, shapes, starts)[0, :, :24].view(-1, 8, 3)  # (Q, nH, 3)
        expected = _query_coords(grid, c_shapes[level])  # interior by construction (levels are finer than 1/p)
        torch.testing.assert_close(out, expected[:, None].expand_as(out), rtol=0, atol=1e-4)


def test_init_offsets_move_each_head_into_its_octant_in_voxels_of_the_level():
    # with the Eq. 4 offsets kept, head m's point 0 reads its own voxel + sign(m) voxels (h, w, d) of the level
    E, size = 128, (32, 48, 64)
    a = ViTAdapter(tiny_vit(16, embed_dim=E))
    grid, c_shapes, (ref, shapes, starts), _ = a.deform_inputs(size)
    attn = a.interactions[1].injector.attn
    _coordinate_probe(attn, 0, point=0)  # level 1/4: own voxel +-1 stays inside the volume
    with torch.no_grad():
        out = attn(torch.randn(1, ref.shape[1], E), ref, _coordinate_values(c_shapes, E), shapes, starts)
    out = out[0, :, :24].view(-1, 8, 3)  # (Q, nH, 3)
    own = _query_coords(grid, c_shapes[0])
    signs = octant_offsets(8, 1, 1)[:, 0, 0]  # (nH, 3)
    torch.testing.assert_close(out, own[:, None] + signs[None], rtol=0, atol=1e-4)


def test_extractor_query_samples_its_own_voxel_centre():
    E, size = 128, (32, 64, 48)
    a = ViTAdapter(tiny_vit(8, embed_dim=E))  # patch 8: ViT grid (4, 8, 6) is finer than the 1/16 level
    grid, c_shapes, _, (ref, shapes, starts) = a.deform_inputs(size)
    attn = a.interactions[3].extra_extractors[0].attn
    _coordinate_probe(attn, 0)
    with torch.no_grad():
        out = attn(torch.randn(1, ref.shape[1], E), ref, _coordinate_values([grid], E), shapes, starts)
    out = out[0, :, :24].view(-1, 8, 3)
    expected = torch.cat([_query_coords(s, grid) for s in c_shapes])  # (Nc, 3)
    # queries whose centre falls outside the outermost ViT voxel centres see the zero padding: check the rest
    inside = ((expected >= 0) & (expected <= torch.tensor(grid).float() - 1)).all(-1)
    assert inside.sum() > 100
    torch.testing.assert_close(out[inside], expected[inside, None].expand(-1, 8, 3), rtol=0, atol=1e-4)


def test_reference_axis_order_anchors_queries_at_permuted_voxels():
    # the reference's convention: on a cubic grid, query (i, j, k) reads voxel (h=k, w=i, d=j)
    E, size = 128, (64, 64, 64)
    a = ViTAdapter(tiny_vit(16, embed_dim=E), reference_axis_order=True)
    grid, c_shapes, (ref, shapes, starts), _ = a.deform_inputs(size)
    attn = a.interactions[0].injector.attn
    _coordinate_probe(attn, 0)
    with torch.no_grad():
        out = attn(torch.randn(1, ref.shape[1], E), ref, _coordinate_values(c_shapes, E), shapes, starts)
    out = out[0, :, :24].view(-1, 8, 3)
    own = _query_coords(grid, c_shapes[0])  # (Q, 3) = the query's own (h, w, d)
    permuted = own[:, [2, 0, 1]]  # (h, w, d) <- (k, i, j)
    torch.testing.assert_close(out, permuted[:, None].expand_as(out), rtol=0, atol=1e-4)
    assert not torch.allclose(out[:, 0], own)


# ============ channel mixing ============


def test_channel_mix_is_channel_major_and_absent_for_one_channel():
    x = torch.randn(2 * 3, 5, 2, 2, 2)  # (B*C, E, h, w, d) with B = 2, C = 3
    mix = ChannelMix(3, 5, act=False)
    with torch.no_grad():  # select channel 1's block [5, 10) of the concatenated (B, C*E) features
        mix.proj.weight.zero_(), mix.proj.bias.zero_()
        mix.proj.weight[:, 5:10, 0, 0, 0] = torch.eye(5)
    torch.testing.assert_close(mix(x), x.view(2, 3, 5, 2, 2, 2)[:, 1])
    one = ChannelMix(1, 5, act=True)
    assert one.proj is None and not list(one.parameters())
    y = torch.randn(2, 5, 2, 2, 2)
    assert torch.equal(one(y), y)  # C = 1: no layer, no GELU — the plain single-channel path
    assert ChannelMix(1, 5, act=True, mix_single_channel=True).proj is not None  # the reference's variant
    assert not [n for n, _ in ViTAdapter(tiny_vit()).named_parameters() if n.startswith("channel_mix")]
    assert not [n for n, _ in UNETR(tiny_vit(), 1, 2, 4).named_parameters() if n.startswith("mix")]


def test_duplicated_channels_reduce_to_the_single_channel_adapter():
    # C = 2 with both channels equal, the SPM stem split in halves and the merge convs averaging [I/2, I/2]:
    # channel averaging, broadcasting, folding and merging must then reproduce the C = 1 adapter exactly
    vit = tiny_vit(16).eval()
    a1 = ViTAdapter(vit, in_chans=1, init_values=1.0).eval()  # gamma = 1: the injection must visibly matter
    a2 = ViTAdapter(vit, in_chans=2, init_values=1.0).eval()
    sd = a1.state_dict()
    sd["spm.stem.0.0.weight"] = torch.cat([sd["spm.stem.0.0.weight"] / 2] * 2, dim=1)
    eye = torch.eye(64)[:, :, None, None, None]
    for i in range(4):
        sd[f"channel_mix.{i}.proj.weight"] = torch.cat([eye / 2, eye / 2], dim=1)  # (E, 2E, 1, 1, 1)
        sd[f"channel_mix.{i}.proj.bias"] = torch.zeros(64)
    a2.load_state_dict(sd, strict=True)
    x = torch.randn(1, 1, 32, 48, 32)
    with torch.no_grad():
        f1, f2 = a1(x), a2(torch.cat([x, x], dim=1))
    for u, v in zip(f1, f2):
        torch.testing.assert_close(u, v, rtol=1e-4, atol=1e-4)


def test_channel_order_is_a_relabelling():
    # averaging and broadcasting treat channels symmetrically: swapping the two input channels together with the
    # SPM stem's input weights and the merge convs' channel blocks must give the same pyramid. (An adapter that
    # let one channel drive the injector or extractor would fail this; equal channels above cannot tell.)
    vit = tiny_vit(16).eval()
    a = ViTAdapter(vit, in_chans=2, init_values=1.0).eval()
    with torch.no_grad():  # at init offsets and attention ignore the query: make them depend on it
        for m in a.modules():
            if isinstance(m, adapter.MSDeformAttn3D):
                m.sampling_offsets.weight.normal_(std=0.1), m.attention_weights.weight.normal_(std=0.1)
    b = ViTAdapter(vit, in_chans=2, init_values=1.0).eval()
    sd = a.state_dict()
    sd["spm.stem.0.0.weight"] = sd["spm.stem.0.0.weight"].flip(1)  # (w, 2, 3, 3, 3): swap input channels
    for i in range(4):
        w = sd[f"channel_mix.{i}.proj.weight"]  # (E, 2E, 1, 1, 1), channel-major blocks
        sd[f"channel_mix.{i}.proj.weight"] = torch.cat([w[:, 64:], w[:, :64]], dim=1)
    b.load_state_dict(sd, strict=True)
    x = torch.randn(1, 2, 32, 32, 48)
    with torch.no_grad():
        for u, v in zip(a(x), b(x.flip(1))):
            torch.testing.assert_close(u, v, rtol=1e-4, atol=1e-4)


# ============ activation checkpointing ============


def test_with_cp_gives_the_same_outputs_and_gradients():
    a = ViTAdapter(tiny_vit(16), in_chans=2, with_cp=False).train()  # drop path 0.2 active in the extractors
    a_cp = ViTAdapter(tiny_vit(16), in_chans=2, with_cp=True).train()
    a_cp.load_state_dict(a.state_dict())
    x = torch.randn(1, 2, 32, 32, 48)
    results = []
    for m in (a, a_cp):
        torch.manual_seed(1)  # same drop-path masks; checkpoint restores the RNG for the recomputation
        feats = m(x)
        sum(f.square().mean() for f in feats).backward()
        results.append(([f.detach() for f in feats],
                        {n: q.grad.clone() for n, q in m.named_parameters() if q.grad is not None}))
    (f0, g0), (f1, g1) = results
    for u, v in zip(f0, f1):
        torch.testing.assert_close(u, v)
    # the ViT is trainable here, so its blocks (checkpointed too) must get the same gradients as well
    assert g0.keys() == g1.keys() and any(k.startswith("vit.blocks") for k in g0) and "spm.stem.0.0.weight" in g0
    for k in g0:
        torch.testing.assert_close(g0[k], g1[k], rtol=1e-4, atol=1e-6, msg=k)


def test_with_cp_on_a_frozen_vit_gives_the_segmenter_the_same_gradients():
    # finetune_seg.py's default: the ViT frozen (eval, no grads), the adapter and decoder trained. Checkpointing
    # recomputes the frozen blocks, the interactions and the decoder stages in backward; the gradients that flow
    # through the frozen blocks to the injectors must be those of the plain run, and it must save fewer bytes
    import bench

    nets = []
    for cp in (False, True):
        vit = tiny_vit(8).requires_grad_(False)
        torch.manual_seed(2)
        net = adapter.ViTAdapterUNETR(vit, 1, 3, feature_size=8, with_cp=cp).train()
        net.vit.eval()
        nets.append(net)
    with torch.no_grad():  # the injectors' and extractors' scales start at 1e-6 / 0: open them, so the gradients
        for n, q in nets[0].named_parameters():  # that reach the injectors through the frozen blocks are not ~0
            if n.endswith("gamma"):
                q.fill_(0.5)
    nets[1].load_state_dict(nets[0].state_dict())
    x = torch.randn(1, 1, 32, 32, 32)
    grads, saved = [], []
    for net in nets:
        torch.manual_seed(1)  # same drop-path masks in the extractors
        by, loss = bench.saved_bytes_by_group(net, x, {net.adapter.spm: "spm"})
        loss.backward()
        saved.append(sum(by.values()))
        grads.append({n: q.grad.clone() for n, q in net.named_parameters() if q.requires_grad})
    g0, g1 = grads
    assert all(q.grad is None for q in nets[1].vit.parameters())  # frozen: no ViT gradients in either run
    assert any(k.startswith("adapter.interactions.0.injector") for k in g0) and "dec0.block.conv1.weight" in g0
    assert g0.keys() == g1.keys()
    # the first injector's gradients all come through the frozen block groups (its query_norm has none at init:
    # the zero-initialised offset and weight projections make the output independent of the query)
    for k in ("gamma", "attn.value_proj.weight", "attn.sampling_offsets.weight", "attn.output_proj.weight"):
        assert g0[f"adapter.interactions.0.injector.{k}"].abs().sum() > 0, k
    for k in g0:
        torch.testing.assert_close(g0[k], g1[k], rtol=1e-4, atol=1e-6, msg=k)
    assert saved[1] < 0.6 * saved[0]


# ============ sliding-window inference ============


@pytest.mark.parametrize("blend", ["constant", "gaussian"])
@pytest.mark.parametrize("overlap", [0.0, 0.5, 0.75])
def test_sliding_window_equals_whole_volume_forward(blend, overlap):
    # 1x1x1 convolutions are exactly translation-equivariant, so however the windows tile the volume (here not a
    # multiple of the window, one axis shorter than it: padded), the blended result is the whole-volume forward
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv3d(2, 8, 1), torch.nn.GELU(), torch.nn.Conv3d(8, 3, 1))
    x = torch.randn(2, 2, 23, 17, 9)
    with torch.no_grad():
        want = net(x)
    got = adapter.sliding_window_inference(x, (8, 8, 12), net, overlap=overlap, blend=blend, sw_batch_size=3)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_window_starts_cover_the_axis():
    for size, roi, overlap in [(23, 8, 0.0), (23, 8, 0.5), (112, 112, 0.75), (300, 112, 0.75), (9, 8, 0.25)]:
        starts = adapter.window_starts(size, roi, overlap)
        covered = np.zeros(size, bool)
        for s in starts:
            covered[s:s + roi] = True
        assert covered.all() and starts[0] == 0 and starts[-1] == size - roi
        assert all(b - a <= max(int(roi * (1 - overlap)), 1) for a, b in zip(starts, starts[1:]))
    assert adapter.window_starts(300, 112, 0.75) == [0, 28, 56, 84, 112, 140, 168, 188]  # step 28, last one moved back


def test_gaussian_blending_weights_the_window_centre():
    w = adapter.importance_map((9, 9, 9), "gaussian")
    assert w[4, 4, 4] == 1 and w.min() > 0 and w[0, 0, 0] < 1e-3
    # the constant blend of two windows that disagree is their mean, the Gaussian one favours the nearer centre
    x = torch.zeros(1, 1, 12, 8, 8)

    def run(blend):
        calls = iter([0.0, 1.0])  # window 0 (rows 0-7) says 0, window 1 (rows 4-11) says 1
        out = adapter.sliding_window_inference(x, 8, lambda xb: torch.full_like(xb, next(calls)), 0.5, blend)
        return out[0, 0, :, 4, 4]

    const, gauss = run("constant"), run("gaussian")
    assert const[:4].eq(0).all() and const[4:8].eq(0.5).all() and const[8:].eq(1).all()
    assert gauss[:4].eq(0).all() and gauss[8:].eq(1).all()
    assert 0 < gauss[4] < 0.1 and 0.9 < gauss[7] < 1 and gauss[5] < 0.5 < gauss[6]  # the nearer centre wins


# ============ head options ============


def test_head_options_of_another_head_are_dropped():
    kw = {"feature_size": 8, "deform_num_heads": 2}  # configs/seg_synthetic.py: the ViT-Adapter's options
    assert adapter.head_options("vit_adapter_unetr", kw) == (kw, [])  # deform_num_heads reaches ViTAdapter
    assert adapter.head_options("unetr", kw) == ({"feature_size": 8}, ["deform_num_heads"])
    assert adapter.head_options("linear", kw) == ({}, ["deform_num_heads", "feature_size"])
    assert adapter.head_options("linear", {"mix_single_channel": True}) == ({"mix_single_channel": True}, [])
    with pytest.raises(ValueError, match="feature_sze"):  # an option of no head is a typo, not dropped
        adapter.head_options("linear", {"feature_sze": 8})
    with pytest.raises(ValueError, match="unknown segmentation head"):
        adapter.head_options("unet", {})


# ============ bad inputs ============


def test_clear_errors():
    with pytest.raises(ValueError, match="divisible by 4"):
        ViTAdapter(tiny_vit(16, depth=6))
    a = ViTAdapter(tiny_vit(8))
    with pytest.raises(ValueError, match="divisible by 16"):
        a(torch.randn(1, 1, 40, 32, 32))  # a multiple of the patch (8) but not of 16
    with pytest.raises(ValueError, match=r"expected \(B, 1"):
        a(torch.randn(1, 2, 32, 32, 32))
    with pytest.raises(ValueError, match="power-of-two patch"):
        UNETR(ViT3D(img_size=24, patch_size=12, embed_dim=32, depth=4, num_heads=2), 1, 2)
    with pytest.raises(ValueError, match="unknown segmentation head"):
        build_segmenter("swin", tiny_vit(), 1, 2)
    with pytest.raises(ValueError, match="not divisible"):
        adapter.MSDeformAttn3D(60, 1, n_heads=8)  # value width 15 over 8 heads
