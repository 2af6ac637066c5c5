"""The measuring tools of bench.py and pretrain.py's profile: the phase timer (metrics.PhaseTimer), the host-sync
counter (bench.SyncCounter) and the saved-for-backward byte counter (bench.saved_bytes_by_group), each against a
case whose answer is known; and pretrain.py's step, which must make exactly one host sync outside its log steps."""
import time

import torch

import bench
import metrics
from adapter import ViTAdapterUNETR
from model import ViT3D


def test_phase_timer_reads_ms_per_step_and_carries_the_open_step():
    t = metrics.PhaseTimer(True, "cpu")
    for _ in range(3):
        t.mark("a", new_step=True)
        time.sleep(0.02)
        t.mark("b")
        time.sleep(0.01)
    out = t.read()  # steps 1 and 2 are complete; step 3 is open and carries over
    assert set(out) == {"a", "b", "step_ms"}
    assert 18 < out["a"] < 60 and 8 < out["b"] < 40
    assert abs(out["step_ms"] - out["a"] - out["b"]) < 1e-6
    t.mark("a", new_step=True)
    again = t.read()  # step 3 only
    assert 25 < again["step_ms"] < 100 and t.steps == 4
    off = metrics.PhaseTimer(False, "cpu")
    off.mark("a", new_step=True)
    assert off.marks == [] and off.read() == {}


def test_sync_counter_counts_reads_and_data_dependent_shapes_only():
    x = torch.randn(64)
    with bench.SyncCounter("cpu") as c:
        y = (x * 2 + 1).exp().sum()  # device work only: no sync
        n_plain = len(c.events)
        float(y)  # read into Python
        if torch.isfinite(y):  # a tensor in an `if`
            pass
        x[x > 0]  # boolean-mask index: output size depends on the data
        x.nonzero()
        x.tolist()  # a read the dispatcher does not see on CPU
        x.to("cpu")  # a copy to the run's device from pageable memory
        x.to("cpu", non_blocking=True)  # not a sync
    assert n_plain == 0
    kinds = [(e[2], e[4]) for e in c.events]
    assert ("_local_scalar_dense", "read") in kinds and ("tolist", "to_host") in kinds and ("to", "to_device") in kinds
    assert sum(k == "_local_scalar_dense" for k, _ in kinds) >= 2  # float(y) and `if tensor`
    assert any(k in ("index", "nonzero") for k, _ in kinds[2:4]) and ("nonzero", "read") in kinds
    assert sum(k == "to" for k, _ in kinds) == 1
    assert all(e[3].startswith("tests/test_bench.py:") for e in c.events)  # call sites are named


def test_sync_counter_on_a_device_tells_host_reads_from_copies():
    # a run on a device (here "meta", which needs no GPU): reads of host tensors stall nothing (kind "host"), a
    # blocking copy to the device is a sync wherever it happens, a non_blocking one is not
    x = torch.randn(8)
    with bench.SyncCounter("meta") as c:
        float(x.sum())
        x.to("meta")
        x.to("meta", non_blocking=True)
    assert [(e[2], e[4]) for e in c.events] == [("_local_scalar_dense", "host"), ("_to_copy", "to_device")]
    s = bench.summarise_syncs([(1, "views", *e[2:]) for e in c.events], 2, "cuda")
    assert s["per_step"] == 1 and s["host_per_step"] == 1


def test_pretrain_step_makes_one_host_sync_outside_log_steps():
    # the tiny model of test_pretrain; 3 steps, the last one a log step
    tiny = ["--embed_dim=32", "--depth=4", "--num_heads=2", "--patch_size=8", "--global_crops_size=16",
            "--local_crops_size=8", "--n_local_crops=2", "--head_n_prototypes=64", "--head_hidden_dim=32",
            "--head_bottleneck_dim=16", "--batch_size=4", "--num_workers=0", "--min_axis_size=8", "--device=cpu",
            "--threads=1", "--warmup_iters=1"]
    events = bench.count_pretrain_syncs("configs/pretrain_demo.py", 3, tiny)
    s = bench.summarise_syncs(events, 3, "cpu")
    # pretrain.py's own: the one fused check of the loss and the grad norms before the optimizer step
    own = {k: v for k, v in s["sites_per_step"].items() if " pretrain.py:" in k}
    assert own == {next(iter(own)): 1.0} and next(iter(own)).startswith("clip_optim pretrain.py:")
    assert s["log_step_by_phase"].get("log", 0) > 0  # the monitors are read at the log step only
    assert s["host_per_step"] > 0  # the loader and augmentation's draws on host tensors are listed apart


def tiny_segmenter(with_cp):
    torch.manual_seed(0)
    vit = ViT3D(img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=2).requires_grad_(False).eval()
    net = ViTAdapterUNETR(vit, 1, 3, feature_size=8, with_cp=with_cp).train()
    net.vit.eval()
    return net


def test_saved_bytes_by_group_sees_checkpointing_drop_the_frozen_blocks():
    x = torch.randn(1, 1, 32, 32, 32)
    groups = lambda n: {**{b: "vit_blocks" for b in n.vit.blocks}, n.adapter.spm: "spm"}  # noqa: E731
    plain, loss = bench.saved_bytes_by_group((n := tiny_segmenter(False)), x, groups(n))
    loss.backward()  # the hook leaves the graph usable
    cp, _ = bench.saved_bytes_by_group((m := tiny_segmenter(True)), x, groups(m))
    assert plain["vit_blocks"] > 0 and "vit_blocks" not in cp and cp["checkpoint_inputs"] > 0
    assert plain["spm"] == cp["spm"]  # not checkpointed: the same tensors
    assert sum(cp.values()) < sum(plain.values())


def test_input_bench_prepares_phantoms_and_reads_their_boxes(tmp_path, capsys):
    """bench.py input: phantoms written as NIfTI, prepared into a cache, crop boxes read back at both crop sets."""
    import argparse
    import json

    index = bench.prepare_phantom_cache(str(tmp_path), 1, (40, 40, 32))
    assert len(index["entries"]) == 1
    res = bench.bench_input(argparse.Namespace(iters=2), ["--data_path", str(tmp_path)])
    assert res["volumes"] == 1 and res["vitl_samples_per_s_per_worker"] > 0 and res["demo_samples_per_s_per_worker"] > 0
    assert res["workers_per_gpu_needed"] > 0
    json.dumps(res)  # the one JSON line
