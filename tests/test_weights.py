"""The authors' released 3DINO-ViT weights (`AICONSlab/3DINO-ViT` on the Hugging Face hub) and every other layout
the loader accepts, end to end: small checkpoints written here in each layout, read back by
`model.vit_from_checkpoint` (all layouts) and by each script's loading path (one layout, one tiny run per script),
the loaded tensors compared with the written ones. The authors' file is a reference teacher checkpoint
{"teacher": {"backbone.blocks.{chunk}.{i}.…", "dino_head.…", "ibot_head.…"}} of a ViT-L/16 at 112^3; here the
same layout holds a ViT of width 128 (heads of width 64, as ViT-L's), depth 4, patch 16, 32^3 input.
A file that leaves backbone weights unfilled (missing key, wrong shape, truncated file) must fail naming the file.
"""
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from conftest import ROOT, assert_input_error, run_here

import model

ARGS = dict(img_size=32, patch_size=16, in_chans=1, embed_dim=128, depth=4, num_heads=2)
HEAD = dict(in_dim=128, out_dim=64, hidden_dim=32, bottleneck_dim=16)


def reference_weights():
    """Backbone and head state dicts whose every tensor is random (LayerScale too), so a tensor left at its
    init, or swapped with another of the same shape, cannot pass for loaded."""
    g = torch.Generator().manual_seed(0)
    parts = {"backbone": model.ViT3D(**ARGS).state_dict(), "dino_head": model.DINOHead(**HEAD).state_dict(),
             "ibot_head": model.DINOHead(**HEAD).state_dict()}
    return {part: {k: torch.randn(v.shape, generator=g) for k, v in sd.items()} for part, sd in parts.items()}


def chunked(key, chunks=2):
    """blocks.{i}.… -> blocks.{chunk}.{i}.…, as the reference's FSDP block chunks store them (each chunk of
    depth/chunks blocks keeps the global index i)."""
    if not key.startswith("blocks."):
        return key
    i = int(key.split(".")[1])
    return f"blocks.{i // (ARGS['depth'] // chunks)}.{key[len('blocks.'):]}"


def layout(w, teacher=True, module=False, backbone_prefix=True, chunks=0, heads=True, wrapper="teacher"):
    """One checkpoint dict in a layout the loader accepts."""
    sd = {}
    for k, v in w["backbone"].items():
        k = chunked(k, chunks) if chunks else k
        sd[("backbone." if backbone_prefix else "") + k] = v
    if heads:
        for part in ("dino_head", "ibot_head"):
            sd.update({f"{part}.{k}": v for k, v in w[part].items()})
    if module:
        sd = {f"module.{k}": v for k, v in sd.items()}
    return {wrapper: sd} if teacher else sd


AUTHORS = dict(teacher=True, module=False, backbone_prefix=True, chunks=2, heads=True)  # the released file's layout
LAYOUTS = {
    "authors (teacher, backbone., chunked, heads)": AUTHORS,
    "teacher, flat blocks": dict(AUTHORS, chunks=0),
    "teacher, 4 chunks of 1 block": dict(AUTHORS, chunks=4),
    "no teacher entry": dict(AUTHORS, teacher=False),
    "module. prefix": dict(AUTHORS, module=True),
    "module. prefix, no teacher entry": dict(AUTHORS, module=True, teacher=False),
    "no backbone. prefix, heads present": dict(AUTHORS, backbone_prefix=False),
    "no backbone. prefix, no teacher, chunked": dict(AUTHORS, backbone_prefix=False, teacher=False),
    "bare backbone state dict": dict(teacher=False, backbone_prefix=False, heads=False),
    "bare, module. prefix": dict(teacher=False, backbone_prefix=False, heads=False, module=True),
    "{'model': sd}": dict(AUTHORS, wrapper="model"),
    "{'state_dict': sd}": dict(AUTHORS, wrapper="state_dict", backbone_prefix=False, heads=False),
}


def assert_loaded(vit, w):
    assert all(vit.args[k] == v for k, v in ARGS.items()), vit.args  # the architecture, inferred
    got = vit.state_dict()
    assert set(got) == set(w["backbone"])
    for k, v in w["backbone"].items():
        assert torch.equal(got[k], v), k


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_every_layout_loads_the_written_tensors(tmp_path, name):
    w = reference_weights()
    path = tmp_path / "weights.pth"
    torch.save(layout(w, **LAYOUTS[name]), path)
    vit = model.vit_from_checkpoint(str(path))  # architecture inferred from the shapes (heads of width 64)
    assert_loaded(vit, w)
    # into a given model (pretrain.py's init_from, random_init_like's architecture) with the heads where present
    if LAYOUTS[name].get("heads", True):
        dino, ibot = model.DINOHead(**HEAD), model.DINOHead(**HEAD)
        model.load_pretrained(model.ViT3D(**ARGS), path, dino_head=dino, ibot_head=ibot)
        for head, part in ((dino, "dino_head"), (ibot, "ibot_head")):
            assert all(torch.equal(head.state_dict()[k], v) for k, v in w[part].items())


def test_our_exports_and_the_112_cube_grid(tmp_path):
    w = reference_weights()
    # pretrain.py's teacher export: {"teacher", "model_args"} (the architecture is stored, not inferred)
    path = tmp_path / "teacher_backbone.pt"
    torch.save({"teacher": layout(w, chunks=0, heads=False, teacher=False), "model_args": model.ViT3D(**ARGS).args},
               path)
    assert_loaded(model.vit_from_checkpoint(path), w)
    # the authors' position grid: 112^3 / patch 16 = 7^3 tokens + CLS -> img_size 112 is read from pos_embed
    big = dict(w, backbone=dict(w["backbone"], pos_embed=torch.randn(1, 7 ** 3 + 1, ARGS["embed_dim"])))
    vit = model.vit_from_checkpoint(layout(big, **AUTHORS))
    assert vit.args["img_size"] == 112 and vit.patch_size == 16 and vit.pos_embed.shape[1] == 344
    assert torch.equal(vit.pos_embed.detach(), big["backbone"]["pos_embed"])
    with torch.no_grad():
        assert vit(torch.randn(1, 1, 32, 32, 32)).shape == (1, ARGS["embed_dim"])  # other sizes interpolate


@pytest.mark.parametrize("damage", ["missing key", "missing block (chunked)", "wrong shape", "unknown key",
                                    "truncated file", "no backbone"])
def test_unfilled_backbone_is_an_error_naming_the_file(tmp_path, damage):
    w = reference_weights()
    sd = layout(w, **AUTHORS)["teacher"]
    if damage == "missing key":
        del sd["backbone.blocks.1.3.mlp.fc2.weight"]
        match = r"missing keys \['blocks\.3\.mlp\.fc2\.weight'\]"
    elif damage == "missing block (chunked)":  # blocks 0, 1, 3: depth 4 is inferred, block 2 would stay random
        sd = {k: v for k, v in sd.items() if not k.startswith("backbone.blocks.1.2.")}
        match = r"missing keys \['blocks\.2\."
    elif damage == "wrong shape":
        sd["backbone.norm.weight"] = torch.randn(64)
        match = r"shape mismatch for norm\.weight: checkpoint \(64,\) vs model \(128,\)"
    elif damage == "unknown key":
        sd["backbone.blocks.0.attn.rel_pos"] = torch.randn(3)
        match = r"unexpected keys \['blocks\.0\.attn\.rel_pos'\]"
    elif damage == "no backbone":
        sd = {k: v for k, v in sd.items() if not k.startswith("backbone.")}
        match = "no ViT backbone in it"
    path = tmp_path / "3dino_vit_weights.pth"
    torch.save({"teacher": sd}, path)
    if damage == "truncated file":  # an interrupted download
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
        match = "not a checkpoint"
    with pytest.raises(model.CheckpointError, match=match) as e:
        model.vit_from_checkpoint(str(path))
    assert str(e.value).startswith(str(path)), str(e.value)
    if damage not in ("truncated file", "no backbone"):  # the same file into a given model
        with pytest.raises(model.CheckpointError, match=match) as e:
            model.load_pretrained(model.ViT3D(**ARGS), str(path))
        assert str(e.value).startswith(str(path))


# -----------------------------------------------------------------------------
# each script's loading path, once, on the authors' layout: the script runs under a spy on
# model.vit_from_checkpoint that saves what it returned, so the test sees the very weights the script used

SPY = textwrap.dedent("""
    import runpy, sys, torch
    sys.path.insert(0, {root!r})
    import model
    load, calls = model.vit_from_checkpoint, []
    def spy(src, **kw):
        vit = load(src, **kw)
        calls.append({{"src": src if isinstance(src, str) else "dict", "state": vit.state_dict()}})
        torch.save(calls, {out!r})
        return vit
    model.vit_from_checkpoint = spy
    sys.argv = {argv!r}
    runpy.run_path(sys.argv[0], run_name="__main__")
""")


def run_spied(tmp_path, *argv):
    out = tmp_path / "calls.pt"
    code = SPY.format(root=str(ROOT), out=str(out), argv=list(argv))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, f"{' '.join(argv)} failed:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    assert out.exists(), f"{argv[0]} never called model.vit_from_checkpoint"
    return torch.load(out, weights_only=True), p.stdout


@pytest.fixture(scope="module")
def authors_file(tmp_path_factory):
    w = reference_weights()
    path = tmp_path_factory.mktemp("hub") / "3dino_vit_weights.pth"
    torch.save(layout(w, **AUTHORS), path)
    return str(path), w


def check_first_call(calls, path, w):
    assert calls[0]["src"] == path
    assert set(calls[0]["state"]) == set(w["backbone"])
    for k, v in w["backbone"].items():
        assert torch.equal(calls[0]["state"][k], v), k


@pytest.mark.slow
def test_finetune_seg_pretrained_uses_the_authors_weights(tmp_path, authors_file):
    path, w = authors_file
    calls, stdout = run_spied(tmp_path, "finetune_seg.py", "configs/seg_synthetic.py", f"--pretrained={path}",
                              f"--out_dir={tmp_path / 'seg'}", "--synthetic_cases=(2, 1, 1)",
                              "--synthetic_shape=(32, 32, 32)", "--crop_size=32", "--max_iters=2",
                              "--eval_interval=2", "--save_predictions=False", "--threads=1")
    check_first_call(calls, path, w)
    assert (tmp_path / "seg" / "results.json").exists()


@pytest.mark.slow
def test_linear_probe_pretrained_uses_the_authors_weights(tmp_path, authors_file):
    path, w = authors_file
    calls, stdout = run_spied(tmp_path, "linear_probe.py", "configs/probe_synthetic.py", f"--pretrained={path}",
                              f"--out_dir={tmp_path / 'probe'}", "--synthetic_n=(8, 6, 6)", "--split=(8, 6, 6)",
                              "--n_runs=1", "--max_iters=10", "--image_size=32", "--feature_batch=4", "--threads=1",
                              "--device=cpu")
    check_first_call(calls, path, w)
    assert "depth 4, embed_dim 128, patch 16" in stdout
    assert json.loads((tmp_path / "probe" / "results.json").read_text())


@pytest.mark.slow
def test_visualize_and_evaluate_read_the_authors_weights(tmp_path, authors_file):
    path, w = authors_file
    vol = tmp_path / "vol.npy"
    np.save(vol, np.random.default_rng(0).normal(size=(32, 32, 32)).astype(np.float32))
    calls, _ = run_spied(tmp_path, "visualize.py", "--ckpt", path, "--image", str(vol), "--out", str(tmp_path / "vis"),
                         "--device", "cpu")
    check_first_call(calls, path, w)
    assert any(f.suffix == ".png" for f in (tmp_path / "vis").iterdir())
    calls, stdout = run_spied(tmp_path, "evaluate.py", path, "--n_train=2", "--n_test=2", "--size=32",
                              f"--out={tmp_path / 'eval.json'}")
    check_first_call(calls, path, w)
    assert "eval:" in stdout and (tmp_path / "eval.json").exists()


def test_scripts_load_pretrained_weights_through_the_tested_loader():
    """Every script that takes a checkpoint reads it with model.vit_from_checkpoint (tested on every layout above)
    or model.load_pretrained (pretrain.py's init_from, which also fills the heads)."""
    for script, call in (("finetune_seg.py", "model.vit_from_checkpoint(pretrained)"),
                         ("linear_probe.py", "model.vit_from_checkpoint(pretrained)"),
                         ("visualize.py", "vit_from_checkpoint(ckpt)"),
                         ("evaluate.py", "model.vit_from_checkpoint("),
                         ("pretrain.py", "model.load_pretrained(")):
        assert call in (ROOT / script).read_text(), f"{script} no longer loads checkpoints with {call}"


def test_a_damaged_file_stops_the_script_with_its_name(tmp_path):
    """The scripts print a CheckpointError as `error: <message>` (no traceback) before any training."""
    sd = layout(reference_weights(), **AUTHORS)["teacher"]
    del sd["backbone.blocks.1.3.mlp.fc2.weight"]
    path = tmp_path / "3dino_vit_weights.pth"
    torch.save({"teacher": sd}, path)
    p = run_here("finetune_seg.py", "configs/seg_synthetic.py", f"--pretrained={path}", f"--out_dir={tmp_path / 'seg'}",
                 "--synthetic_cases=(2, 1, 1)", "--synthetic_shape=(32, 32, 32)", "--threads=1")
    assert p.returncode != 0 and "Traceback" not in p.stderr, p.stderr[-2000:]
    assert f"error: {path} (backbone): checkpoint does not fit the model — missing keys ['blocks.3.mlp.fc2.weight']" \
        in p.stderr
    assert not (tmp_path / "seg" / "ckpt.pt").exists()


def test_load_case_default_is_the_authors_intensity_mapping(tmp_path):
    """The authors' weights expect each volume's 0.05th / 99.95th percentiles mapped to [-1, 1], clipped: what
    data.load_case does without ct_window (docs/pretrained_weights.md relies on it)."""
    import nibabel as nib

    import data

    x = np.random.default_rng(0).gamma(2.0, 300.0, size=(20, 24, 28)).astype(np.float32)  # skewed, MRI-like
    path = tmp_path / "scan.nii.gz"
    nib.save(nib.Nifti1Image(x, np.eye(4)), path)  # RAS already: the loader keeps the array as it is
    a, b = np.percentile(x, [0.05, 99.95])
    expected = np.clip(2 * (x - a) / (b - a) - 1, -1, 1)
    got = data.load_case(path)["image"]
    assert got.shape == (1, *x.shape)
    np.testing.assert_allclose(got[0], expected, atol=1e-5)
    assert (got == -1).any() and (got == 1).any()  # the tails beyond the percentiles are clipped


def test_checkpoint_errors_say_what_the_file_is(tmp_path):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(os.urandom(300))
    with pytest.raises(model.CheckpointError, match="junk.pt: not a checkpoint") as e:
        model.vit_from_checkpoint(junk)
    assert "weights_only=False" not in str(e.value)  # torch's advice would unpickle an untrusted file
    seg = tmp_path / "best.pt"
    torch.save({"model": {"vit.pos_embed": torch.zeros(1), "decoder.w": torch.zeros(1)}, "iter": 3}, seg)
    with pytest.raises(model.CheckpointError, match="no ViT backbone in it"):
        model.vit_from_checkpoint(seg)
    p = run_here(ROOT / "finetune_seg.py", "configs/seg_synthetic.py", f"--pretrained={junk}",
                 f"--out_dir={tmp_path / 'a'}", "--synthetic_cases=(2, 1, 1)", "--synthetic_shape=(32, 32, 32)")
    assert_input_error(p, "junk.pt: not a checkpoint")
