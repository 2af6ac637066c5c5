"""model.py: shapes, masking, multi-crop, intermediate layers, checkpoints, random init of a checkpoint's
architecture, bad input, and the golden outputs of the reference implementation (../shared/golden/vit_ref_small.pt)."""
import pytest
import torch
import torch.nn.functional as F

import model
from conftest import GOLDEN, requires_shared


def tiny(**kw):
    args = dict(img_size=32, patch_size=16, embed_dim=64, depth=4, num_heads=2)
    args.update(kw)
    return model.ViT3D(**args)


@pytest.mark.parametrize("name,E", [("vit_tiny", 192), ("vit_small", 384), ("vit_base", 768), ("vit_large", 1024),
                                    ("vit_giant", 1536)])
def test_constructor_shapes_cubic_and_noncubic(name, E):
    if name == "vit_giant":  # 1.1B parameters: build it on the meta device (shapes only, no memory, no init)
        with torch.device("meta"):
            m = model.vit_giant(img_size=96)
            t = m.prepare_tokens_with_masks(torch.randn(1, 1, 48, 32, 64))
            assert t.shape == (1, 1 + 3 * 2 * 4, E) and m.blocks[0](t).shape == t.shape
        return
    if name == "vit_large":
        # a full forward of the big ones is slow on 2 CPU cores: check the token path and one block instead, on the
        # meta device (shapes only: initialising 300M parameters on the CPU took ~10 s)
        with torch.device("meta"), torch.no_grad():
            m = model.ARCHS[name](img_size=96).eval()
            assert m.embed_dim == E and m.pos_embed.shape == (1, 1 + 6 ** 3, E)
            t = m.prepare_tokens_with_masks(torch.randn(1, 1, 96, 96, 96))
            assert t.shape == (1, 217, E)
            assert m.blocks[0](t).shape == t.shape
            t = m.prepare_tokens_with_masks(torch.randn(1, 1, 48, 32, 64))
            assert t.shape == (1, 1 + 3 * 2 * 4, E)
        return
    m = model.ARCHS[name](img_size=96).eval()
    assert m.embed_dim == E and m.pos_embed.shape == (1, 1 + 6 ** 3, E)
    with torch.no_grad():
        out = m.forward_features(torch.randn(2, 1, 96, 96, 96))
        assert out["x_norm_clstoken"].shape == (2, E)
        assert out["x_norm_patchtokens"].shape == (2, 216, E)
        assert out["x_prenorm"].shape == (2, 217, E)
        out = m.forward_features(torch.randn(1, 1, 48, 32, 64))  # non-cubic: pos-embed re-interpolated
        assert out["x_norm_patchtokens"].shape == (1, 24, E)
        assert m(torch.randn(1, 1, 96, 96, 96)).shape == (1, E)


def test_parameter_counts_match_reference():
    # the reference's count: ViT-L/16 backbone with a 112^3 pos-embed grid has 306,910,208 parameters
    with torch.device("meta"):  # counting needs shapes only
        assert sum(p.numel() for p in model.vit_large(img_size=112).parameters()) == 306_910_208
        assert sum(p.numel() for p in model.vit_large(img_size=96).parameters()) == 306_780_160
        assert sum(p.numel() for p in model.DINOHead(1024).parameters()) == 23_662_848


def test_masking_replaces_exactly_the_masked_tokens():
    torch.manual_seed(0)
    m = tiny().eval()
    with torch.no_grad():
        m.mask_token.normal_()
    x = torch.randn(2, 1, 32, 32, 32)
    masks = torch.tensor([[1, 0, 0, 1, 0, 0, 1, 0], [0, 0, 0, 0, 0, 0, 0, 1]], dtype=torch.bool)
    with torch.no_grad():
        plain = m.prepare_tokens_with_masks(x)
        masked = m.prepare_tokens_with_masks(x, masks)
    changed = (plain - masked).abs().amax(-1)[:, 1:] > 0  # CLS excluded
    assert torch.equal(changed, masks)
    # masked tokens = mask_token + their position code (replaced before the position embedding)
    expected = m.mask_token + m.pos_embed[0, 1:][masks[0]]
    torch.testing.assert_close(masked[0, 1:][masks[0]], expected.detach())
    assert torch.equal(masked[:, 0], plain[:, 0])


def test_multicrop_list_equals_separate_calls():
    torch.manual_seed(0)
    m = tiny().eval()
    g, l = torch.randn(4, 1, 32, 32, 32), torch.randn(6, 1, 16, 16, 16)
    masks = torch.rand(4, 8) > 0.5
    with torch.no_grad():
        both = m.forward_features_list([g, l], [masks, None])
        sep_g, sep_l = m.forward_features(g, masks), m.forward_features(l)
    for a, b in ((both[0], sep_g), (both[1], sep_l)):
        for k in ("x_norm_clstoken", "x_norm_patchtokens", "x_prenorm"):
            torch.testing.assert_close(a[k], b[k])


def test_intermediate_layers():
    torch.manual_seed(0)
    m = tiny().eval()
    x = torch.randn(2, 1, 32, 48, 16)
    with torch.no_grad():
        last = m.get_intermediate_layers(x, n=1)
        assert len(last) == 1 and last[0].shape == (2, 2 * 3 * 1, 64)
        torch.testing.assert_close(last[0], m.forward_features(x)["x_norm_patchtokens"])
        two = m.get_intermediate_layers(x, n=[0, 2], reshape=True, return_class_token=True)
        assert two[0][0].shape == (2, 64, 2, 3, 1) and two[0][1].shape == (2, 64)
        # the list form picks those 0-based blocks: compare with running the blocks by hand
        t = m.prepare_tokens_with_masks(x)
        t = m.blocks[0](t)
        torch.testing.assert_close(two[0][1], m.norm(t)[:, 0])
        # reshape is the C-order token layout over (h, w, d)
        flat = m.get_intermediate_layers(x, n=[2])[0]
        torch.testing.assert_close(two[1][0].flatten(2).transpose(1, 2), flat)
        raw = m.get_intermediate_layers(x, n=1, norm=False)[0]
        torch.testing.assert_close(raw, m.forward_features(x)["x_prenorm"][:, 1:])
    with pytest.raises(ValueError, match="out of range"):
        m.get_intermediate_layers(x, n=[7])


def test_last_self_attention_rows_sum_to_one():
    m = tiny().eval()
    a = m.get_last_self_attention(torch.randn(2, 1, 32, 32, 32))
    assert a.shape == (2, 2, 9, 9)
    torch.testing.assert_close(a.sum(-1), torch.ones(2, 2, 9))


def test_flops_match_torch_flop_counter():
    """ViT3D.flops / DINOHead.flops (behind pretrain.py's MFU) against torch's own count of the same forward pass,
    less the patch-embedding convolution that the nanoGPT-style count leaves out."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    vit = model.ViT3D(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, mlp_ratio=3.0)
    x = torch.randn(2, 1, 32, 32, 32)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:  # the counter sees math attention
        vit.forward_features(x)
    conv = 2 * 2 * 64 * 48 * 8 ** 3  # the patch embedding: 2 images × 64 patches × E outputs × P³ inputs
    assert fc.get_total_flops() - conv == 2 * vit.flops(1 + 64)
    head = model.DINOHead(48, 100, hidden_dim=40, bottleneck_dim=16)
    with FlopCounterMode(display=False) as fc:
        head(torch.randn(5, 48))
    assert fc.get_total_flops() == 5 * head.flops()
    assert model.estimate_mfu(1e9, 10.0, "cpu") is None  # no known peak off CUDA


def test_pos_embed_interpolation_matches_torch_cpu_trilinear():
    # our separable matrices reproduce F.interpolate(scale_factor=(n+0.1)/g) on CPU, incl. the copy on equal axes
    torch.manual_seed(0)
    pe = torch.randn(1, 1 + 6 ** 3, 8)
    for grid in [(7, 7, 7), (3, 6, 9), (12, 4, 6), (6, 6, 6)]:
        ours = model.resize_pos_embed(pe, grid)
        cube = pe[:, 1:].reshape(1, 6, 6, 6, 8).permute(0, 4, 1, 2, 3)
        s = tuple((n + 0.1) / 6 for n in grid)
        ref = F.interpolate(cube, scale_factor=s, mode="trilinear").permute(0, 2, 3, 4, 1).reshape(1, -1, 8)
        torch.testing.assert_close(ours[:, 1:], ref, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ours[:, :1], pe[:, :1])


def test_drop_path_and_grad_checkpointing_train():
    torch.manual_seed(0)
    m = tiny(drop_path_rate=0.3, grad_checkpointing=True).train()
    x = torch.randn(3, 1, 32, 32, 32)
    out = m.forward_features(x)["x_norm_clstoken"].sum()
    out.backward()
    assert m.blocks[0].attn.qkv.weight.grad is not None
    m.eval()  # no drop path in eval: deterministic
    with torch.no_grad():
        torch.testing.assert_close(m(x), m(x))


def test_bad_input_errors():
    m = tiny()
    with pytest.raises(ValueError, match="multiple of the patch size"):
        m(torch.randn(1, 1, 32, 30, 32))
    with pytest.raises(ValueError, match="input channel"):
        m(torch.randn(1, 2, 32, 32, 32))
    with pytest.raises(ValueError, match=r"\(B, C, H, W, D\)"):
        m(torch.randn(1, 32, 32, 32))
    with pytest.raises(ValueError, match="multiple of patch_size"):
        model.ViT3D(img_size=40, patch_size=16)


def test_checkpoint_roundtrip_and_errors(tmp_path):
    torch.manual_seed(0)
    m = tiny().eval()
    head = model.DINOHead(64, 32, 16, 8)
    path = tmp_path / "export.pt"
    sd = {f"backbone.{k}": v for k, v in m.state_dict().items()}
    sd.update({f"dino_head.{k}": v for k, v in head.state_dict().items()})
    torch.save({"teacher": sd, "model_args": m.args}, path)
    m2 = model.vit_from_checkpoint(path).eval()
    head2 = model.DINOHead(64, 32, 16, 8)
    model.load_pretrained(tiny(), path, dino_head=head2)
    x = torch.randn(1, 1, 32, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(m2(x), m(x))
        torch.testing.assert_close(head2(m(x)), head(m(x)))
    # a bare state dict with DDP / compile prefixes loads too
    bare = {f"module._orig_mod.{k}": v for k, v in m.state_dict().items()}
    model.load_pretrained(tiny(), bare)
    # unexpected keys are reported by name, never silently ignored
    bad = dict(m.state_dict(), **{"blocks.0.attn.extra": torch.zeros(1)})
    with pytest.raises(ValueError, match="blocks.0.attn.extra"):
        model.load_pretrained(tiny(), bad)
    missing = {k: v for k, v in m.state_dict().items() if k != "norm.weight"}
    with pytest.raises(ValueError, match="norm.weight"):
        model.load_pretrained(tiny(), missing)
    with pytest.raises(ValueError, match="shape mismatch"):
        model.load_pretrained(tiny(embed_dim=32, num_heads=2), m.state_dict())
    weird = {"teacher": dict(sd, **{"projector.weight": torch.zeros(2)})}
    with pytest.raises(ValueError, match="projector.weight"):
        model.load_pretrained(tiny(), weird)


def _tiny_checkpoint(path, layerscale_init=0.1, img_size=32):
    """A teacher export as pretrain.py writes it ({"teacher", "model_args", "config"}) of a tiny ViT built with
    layerscale_init, whose weights then moved away from their init (as training would move them)."""
    torch.manual_seed(123)
    vit = model.ViT3D(img_size=img_size, patch_size=8, embed_dim=48, depth=4, num_heads=2,
                      layerscale_init=layerscale_init)
    with torch.no_grad():
        for p in vit.parameters():
            p.add_(0.05 * torch.randn_like(p))
    torch.save({"teacher": {f"backbone.{k}": v for k, v in vit.state_dict().items()}, "model_args": vit.args,
                "config": {"layerscale_init": layerscale_init, "seed": 0}, "step": 10}, path)
    return vit


def test_random_init_is_the_checkpoints_architecture_with_pretrainings_init(tmp_path):
    ckpt = tmp_path / "teacher_backbone.pt"
    trained = _tiny_checkpoint(ckpt, layerscale_init=0.1).state_dict()
    fresh = model.random_init_like(str(ckpt), seed=3).state_dict()
    # the same architecture: the same keys and shapes (patch 8, 4^3 grid, 48 wide, 4 blocks)
    assert list(fresh) == list(trained)
    assert all(fresh[k].shape == trained[k].shape for k in trained)
    # LayerScale starts at the pretraining's layerscale_init (0.1 here, not ViT3D's default 1e-5) ...
    gammas = [k for k in fresh if k.endswith(".gamma")]
    assert len(gammas) == 8 and all(torch.equal(fresh[k], torch.full_like(fresh[k], 0.1)) for k in gammas)
    # ... and every tensor differs from the checkpoint's (the trained gammas moved away from 0.1)
    for k in trained:
        assert not torch.equal(fresh[k], trained[k]), k
    # seeded: the same seed gives the same weights, another seed others
    again = model.random_init_like(str(ckpt), seed=3).state_dict()
    assert all(torch.equal(fresh[k], again[k]) for k in fresh)
    other = model.random_init_like(str(ckpt), seed=4).state_dict()
    assert not torch.equal(fresh["blocks.0.attn.qkv.weight"], other["blocks.0.attn.qkv.weight"])
    # exactly pretrain.py's student init: torch.manual_seed(seed), then ViT3D with the run's arguments
    torch.manual_seed(3)
    want = model.ViT3D(**{**torch.load(ckpt, weights_only=True)["model_args"], "layerscale_init": 0.1}).state_dict()
    assert all(torch.equal(fresh[k], want[k]) for k in want)
    # the caller's RNG goes on as after loading the checkpoint: the head then starts alike in both arms
    torch.manual_seed(0)
    model.vit_from_checkpoint(str(ckpt))
    after_pretrained = torch.rand(4)
    torch.manual_seed(0)
    model.random_init_like(str(ckpt), seed=3)
    assert torch.equal(torch.rand(4), after_pretrained)


def test_load_resizes_pos_embed_to_new_grid():
    torch.manual_seed(0)
    m32 = tiny(img_size=32)
    m48 = tiny(img_size=48)
    model.load_pretrained(m48, m32.state_dict())
    g = m48.pos_embed.detach()
    torch.testing.assert_close(g, model.resize_pos_embed(m32.pos_embed.detach(), (3, 3, 3)))


# -----------------------------------------------------------------------------
# golden outputs of the reference implementation


@requires_shared
def test_golden_reference_outputs():
    d = torch.load(GOLDEN / "vit_ref_small.pt", weights_only=True)
    c = d["config"]
    m = model.ViT3D(img_size=c["img_size"], patch_size=c["patch_size"], in_chans=c["in_chans"],
                    embed_dim=c["embed_dim"], depth=c["depth"], num_heads=c["num_heads"],
                    mlp_ratio=c["mlp_ratio"]).eval()
    head_args = (c["head_in_dim"], c["head_out_dim"], c["head_hidden_dim"], c["head_bottleneck_dim"],
                 c["head_nlayers"])
    dino_head, ibot_head = model.DINOHead(*head_args), model.DINOHead(*head_args)
    # the reference format: {"teacher": {"backbone.blocks.{c}.{i}…", "dino_head.…", "ibot_head.…"}}
    model.load_pretrained(m, d["checkpoint"], dino_head=dino_head, ibot_head=ibot_head)
    close = lambda a, b: torch.testing.assert_close(a, b, rtol=0, atol=1e-4)  # issue: max abs error <= 1e-4
    with torch.no_grad():
        close(m.prepare_tokens_with_masks(d["x1"], d["masks1"]), d["x1_tokens"])
        o = m.forward_features(d["x1"], masks=d["masks1"])
        close(o["x_norm_clstoken"], d["x1_cls"])
        close(o["x_norm_patchtokens"], d["x1_patch"])
        close(o["x_prenorm"], d["x1_prenorm"])
        o = m.forward_features(d["x1"])
        close(o["x_norm_clstoken"], d["x1_nomask_cls"])
        close(o["x_norm_patchtokens"], d["x1_nomask_patch"])
        close(m.interpolate_pos_encoding((3, 2, 4)), d["x2_pos_embed"])
        o = m.forward_features(d["x2"])
        close(o["x_norm_clstoken"], d["x2_cls"])
        close(o["x_norm_patchtokens"], d["x2_patch"])
        close(o["x_prenorm"], d["x2_prenorm"])
        inter = m.get_intermediate_layers(d["x1"], n=c["inter_n"], return_class_token=True)
        close(torch.stack([p for p, _ in inter]), d["x1_inter"])
        close(torch.stack([t for _, t in inter]), d["x1_inter_cls"])
        close(m.get_last_self_attention(d["x1"]), d["x1_attn_last"])
        close(dino_head(d["x1_cls"]), d["dino_head_out"])
        close(ibot_head(d["x1_patch"]), d["ibot_head_out"])
    # vit_from_checkpoint infers the architecture of a reference checkpoint from its shapes (head width 64)
    m2 = model.vit_from_checkpoint(d["checkpoint"]).eval()
    with torch.no_grad():
        close(m2.forward_features(d["x2"])["x_norm_clstoken"], d["x2_cls"])
