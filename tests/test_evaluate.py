"""evaluate.py: the teacher-vs-random-init test on held-out phantoms (eval.json, its CI, the random twin)."""
import json

import pytest
import torch

import evaluate
import model


def export(path, seed, layerscale_init=0.1, perturb=0.0):
    """A teacher export as pretrain.py writes it, of the tiny ViT pretrain.py would build with `seed`."""
    torch.manual_seed(seed)
    vit = model.ViT3D(img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=2, layerscale_init=layerscale_init)
    if perturb:
        with torch.no_grad():
            for p in vit.parameters():
                p.add_(perturb * torch.randn_like(p))
    torch.save({"teacher": {f"backbone.{k}": v for k, v in vit.state_dict().items()}, "model_args": vit.args,
                "config": {"seed": seed, "layerscale_init": layerscale_init}}, path)
    return vit


def test_random_twin_is_the_pretraining_start_and_eval_json(tmp_path):
    # an export that *is* its run's step-0 backbone: both arms are the same network, so every difference is 0
    export(tmp_path / "t.pt", seed=5)
    res = evaluate.run(str(tmp_path / "t.pt"), str(tmp_path / "eval.json"), n_train=2, n_test=3, size=32)
    saved = json.loads((tmp_path / "eval.json").read_text())
    assert set(saved) >= {"task", "metric", "pretrained", "random", "diff_ci", "p_wilcoxon"}
    assert saved["pretrained"] == saved["random"] == res["pretrained"] and saved["diff_ci"] == [0.0, 0.0]
    assert 0 <= saved["pretrained"] <= 1 and set(saved["per_class"]) == {"liver", "kidneys", "lesion"}
    # trained weights: the arms differ, and the CI brackets the mean difference
    export(tmp_path / "moved.pt", seed=5, perturb=0.05)
    res = evaluate.run(str(tmp_path / "moved.pt"), None, n_train=2, n_test=3, size=32)
    assert res["pretrained"] != res["random"]
    assert res["diff_ci"][0] <= res["diff"] <= res["diff_ci"][1]
    assert res["diff"] == pytest.approx(res["pretrained"] - res["random"], abs=1e-9)
    assert "random init" in evaluate.summary_line(res)
