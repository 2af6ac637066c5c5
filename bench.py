"""
bench.py — speed and memory, measured side by side in one run (never asserted in tests).

    python bench.py augment [--image PATH] [--threads N] [--device cpu|cuda]
    python bench.py msda    [--device cuda] [--batch 1]
    python bench.py msda --compile-only   [--arch 80 90] [--dtypes float32 bfloat16 float16]   (no GPU needed)
    python bench.py step    [--config configs/pretrain_demo.py] [--device cpu|cuda] [--iters 5] [--profile] [--k=v]
    python bench.py input   [--out CACHE | --data_path CACHE]   (crop-box reads per worker; workers per GPU)
    python bench.py finetune_memory [--device cuda] [--batch 1] [--dtypes float32 bfloat16]   (saved-for-backward bytes)

Methods and results: docs/performance.md.

Every subcommand prints a human-readable table and ends with ONE line holding a JSON object, so runs can be
compared by script (`python bench.py augment | tail -1 | python -m json.tool`).
"""
import argparse
import json
import sys
import time

import torch


def timeit(fn, warmup=1, iters=5, device="cpu", mean=False):
    """Median (or mean) wall time of fn() in milliseconds (synchronising CUDA around each call). The mean is for
    random work (augmentation: each call draws different transforms), where it is the expected cost."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    if mean:
        return sum(times) / len(times)
    times.sort()
    return times[len(times) // 2]


def reference_views(volume, g, global_size=96, local_size=48, n_local=8,
                    global_scale=((0.48, 1.0), (0.5, 1.0)), local_scale=((0.16, 0.48), (0.2, 0.5))):
    """All 10 views of one whole volume (C, H, W, D), cropped, resized and augmented one crop at a time on CPU,
    like a reference DataLoader worker (which first loads the whole volume; the benchmark times that too).
    The same augment.py plans with B = 1, so it measures per-sample *structure*, not a different maths."""
    import augment

    def view(scale, size, plan):
        h0, w0, d0, ch, cw, cd = augment.sample_crop_box(tuple(volume.shape[1:]), scale[0], scale[1], g)
        x = augment.resize_crops([volume[:, h0:h0 + ch, w0:w0 + cw, d0:d0 + cd]], size)
        return augment.run_plan(x, plan(1, g))[0]

    return {"global_crops": [view(global_scale, global_size, augment.plan_global_view_1),
                             view(global_scale, global_size, augment.plan_global_view_2)],
            "local_crops": [view(local_scale, local_size, augment.plan_local_views) for _ in range(n_local)]}


def bench_augment(args, rest):
    """Samples/s of the batched augmentation pipeline vs the reference's per-sample structure.

    One sample = 2 global (96³) + 8 local (48³) views of one volume, with iBOT masks (patch 16).
    batched   : PretrainDataset reads only the 10 crop boxes from the prepared, memory-mapped cache; collate;
                augment.make_views resizes + augments + masks a whole batch on --device. Timed per batch / B.
    per-sample: the reference's worker structure — load the whole volume, then crop, resize and augment the 10
                views one at a time (reference_views, i.e. the same maths with B = 1) on CPU.
    Both run in this one process on the same cores (no DataLoader workers), so the ratio is work, not parallelism.
    The volume: --image PATH, else a synthetic 256×256×128 phantom saved as int16 .nii.gz (spacing 0.8×0.8×2 mm).
    """
    import itertools
    import os
    import tempfile

    import nibabel as nib
    import numpy as np

    import augment
    import data
    from cache import PretrainDataset, collate_pretrain, load_index, prepare
    from phantoms import SyntheticVolumes

    kept = augment.keep_freed_memory()  # as pretrain.py does; both pipelines below run under it
    S, s, P, n_local = 96, 48, 16, 8  # the paper's global/local crop sizes, patch size, local crops per sample
    B = args.batch or 8
    iters = args.iters or 12  # batches; timings below are means: every batch draws different transforms
    devices = ["cpu"] + (["cuda"] if args.device.startswith("cuda") and torch.cuda.is_available() else [])

    # ---------------------------------------------------------------------------------------------- the volume
    tmp = tempfile.TemporaryDirectory()
    path = args.image
    if path is None:
        vol = SyntheticVolumes(1, (256, 256, 128), seed=0)[0]["image"][0].numpy()  # (H, W, D) in [-1, 1]
        path = os.path.join(tmp.name, "synthetic.nii.gz")
        # int16 "HU-like" values, as most CT files are stored (float32 noise would make gzip slower than reality)
        nib.save(nib.Nifti1Image(np.rint(vol * 1000).astype(np.int16), np.diag([0.8, 0.8, 2.0, 1.0])), path)
    cache = os.path.join(tmp.name, "cache")
    prepare([path], cache, workers=1, progress=False)
    entry = load_index(cache)["entries"][0]
    npy = os.path.join(cache, entry["file"])
    ds = PretrainDataset(cache, global_crops_size=S, local_crops_size=s, n_local=n_local, seed=0)
    print(f"volume {path}: file shape {list(data.load_volume(path)[0].shape[1:])}, prepared (foreground crop) "
          f"{entry['shape']}, batch {B}, threads {torch.get_num_threads()}, malloc keeps freed memory: {kept}")

    # ------------------------------------------------------------------------------------------- loading alone
    t_nii = timeit(lambda: data.load_volume(path), warmup=1, iters=3)
    t_npy = timeit(lambda: np.load(npy).astype(np.float32), warmup=1, iters=3)  # whole prepared volume
    ks = itertools.count()
    t_boxes = timeit(lambda: ds[next(ks)], warmup=1, iters=5)  # the 10 crop boxes of one sample, memory-mapped
    print(f"\n{'load one volume / sample':<44}{'ms':>10}")
    print(f"{'whole .nii.gz (load_volume)':<44}{t_nii:>10.1f}")
    print(f"{'whole prepared .npy (np.load)':<44}{t_npy:>10.1f}")
    print(f"{'10 crop boxes from the mmap cache':<44}{t_boxes:>10.1f}")

    # --------------------------------------------------------------------------------------- batched pipeline
    def batch_of_crops():
        return collate_pretrain([ds[next(ks)] for _ in range(B)])

    res = {}
    for dev in devices:
        g = torch.Generator().manual_seed(0)  # small per-sample draws on CPU; noise voxels are drawn on `dev`
        # warm-up 3 batches: the first batches grow the heap (page faults) — training pays that once, not per step
        t_all = timeit(lambda: augment.make_views(batch_of_crops(), S, s, P, g, dev), warmup=3, iters=iters, device=dev,
                       mean=True)
        fixed = batch_of_crops()
        t_views = timeit(lambda: augment.make_views(fixed, S, s, P, g, dev), warmup=1, iters=iters, device=dev,
                         mean=True)
        res[dev] = (t_all / B, t_views / B)

    # ------------------------------------------------------------------------------------ per-sample pipeline
    g = torch.Generator().manual_seed(0)
    n_ps = 3 * iters  # samples (means over draws, like the batched side's iters · B samples)
    t_ps_nii = timeit(lambda: reference_views(torch.from_numpy(data.load_volume(path)[0]), g),
                      warmup=1, iters=n_ps, mean=True)
    t_ps_npy = timeit(lambda: reference_views(torch.from_numpy(np.load(npy).astype(np.float32))[None], g),
                      warmup=1, iters=n_ps, mean=True)
    vol_mem = torch.from_numpy(np.load(npy).astype(np.float32))[None]
    t_ps_views = timeit(lambda: reference_views(vol_mem, g), warmup=1, iters=n_ps, mean=True)

    dev = devices[-1]
    batched, batched_views = res[dev]
    print(f"\n{'ms per sample (2×96³ + 8×48³ views)':<44}{'ms':>10}{'samples/s':>12}")
    for d, (a, v) in res.items():
        print(f"{f'batched on {d}: boxes + views + masks':<44}{a:>10.1f}{1e3 / a:>12.1f}")
        print(f"{f'  of which make_views on {d}':<44}{v:>10.1f}{1e3 / v:>12.1f}")
    print(f"{'per-sample: whole .nii.gz + views':<44}{t_ps_nii:>10.1f}{1e3 / t_ps_nii:>12.1f}")
    print(f"{'per-sample: whole prepared .npy + views':<44}{t_ps_npy:>10.1f}{1e3 / t_ps_npy:>12.1f}")
    print(f"{'per-sample: views only (volume in memory)':<44}{t_ps_views:>10.1f}{1e3 / t_ps_views:>12.1f}")
    ratio = t_ps_nii / batched
    print(f"\nbatched ({dev}) vs per-sample (.nii.gz): {ratio:.2f}× the samples/s"
          f"  | vs per-sample from the prepared .npy: {t_ps_npy / batched:.2f}×"
          f"  | views only: {t_ps_views / batched_views:.2f}×")
    tmp.cleanup()
    return {
        "batched_ms_per_sample": round(batched, 2),
        "per_sample_ms_per_sample": round(t_ps_nii, 2),
        "ratio": round(ratio, 3),
        "device": dev,
        "threads": torch.get_num_threads(),
        "batch": B,
        "batched_cpu_ms_per_sample": round(res["cpu"][0], 2),
        "batched_views_ms_per_sample": round(batched_views, 2),
        "per_sample_npy_ms_per_sample": round(t_ps_npy, 2),
        "per_sample_views_ms_per_sample": round(t_ps_views, 2),
        "ratio_vs_npy": round(t_ps_npy / batched, 3),
        "ratio_views_only": round(t_ps_views / batched_views, 3),
        "load_nii_ms": round(t_nii, 2),
        "load_npy_ms": round(t_npy, 2),
        "read_boxes_ms": round(t_boxes, 2),
        "keep_freed_memory": kept,
    }

def bench_msda(args, rest):
    """MSDA: the Triton kernel vs the grid_sample reference at the 3D ViT-Adapter's shapes.

    injector: the 7^3 ViT tokens query the 3 SPM levels 28^3/14^3/7^3; extractor: the 25,039 SPM tokens query the
    7^3 ViT grid (the contention case: ~2,300 gradient contributions per value voxel). nH=8, Dh=32, P=4.
    Sampling points are the adapter's at init: query-grid centres + one octant direction per head, (p+1) voxels
    out, plus noise. `--dtype bfloat16` times both paths in bf16. On CPU only the reference is timed.
    """
    import msda_triton

    p = argparse.ArgumentParser(prog="bench.py msda")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--compile-only", action="store_true",
                   help="no GPU needed: build every kernel launch for real GPUs and report registers/spills/smem")
    p.add_argument("--arch", type=int, nargs="+", default=[80, 90], help="--compile-only targets (sm_XX)")
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16", "float16"], help="--compile-only dtypes")
    opt = p.parse_args(rest)
    if opt.compile_only:
        return compile_msda(opt.arch, opt.dtypes)
    dev, dtype, B = args.device, getattr(torch, opt.dtype), args.batch or 1
    iters = args.iters or (20 if dev.startswith("cuda") else 3)
    nH, Dh, P = 8, 32, 4
    run_triton = dev.startswith("cuda") and msda_triton.HAS_TRITON
    note = None if run_triton else (
        "triton kernel skipped: it needs a CUDA device (the CPU interpreter is a correctness tool, see tests/)"
        if msda_triton.HAS_TRITON else f"triton kernel skipped: triton not importable ({msda_triton._TRITON_ERROR})")
    gen = torch.Generator().manual_seed(0)

    def centres(shapes):  # voxel centres of each grid, flattened in C order over (h, w, d): (N, 3) in [0, 1]
        axes = lambda s: torch.meshgrid(*[(torch.arange(n) + 0.5) / n for n in s], indexing="ij")  # noqa: E731
        return torch.cat([torch.stack(axes(s), -1).reshape(-1, 3) for s in shapes])

    def inputs(query_shapes, value_shapes):
        spatial_shapes = torch.tensor(value_shapes, device=dev)
        sizes = spatial_shapes.prod(1)
        starts = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])
        ref = centres(query_shapes)  # (Q, 3)
        Q, L, S = len(ref), len(value_shapes), int(sizes.sum())
        octant = torch.tensor([[i >> 2 & 1, i >> 1 & 1, i & 1] for i in range(nH)]) * 2.0 - 1  # one direction per head
        radius = torch.arange(1, P + 1, dtype=torch.float32)  # point p sits p+1 voxels out
        offset = octant[:, None, None, :] * radius[None, None, :, None]  # (nH, 1, P, 3) in voxels
        offset = offset + 0.5 * torch.randn(B, Q, nH, L, P, 3, generator=gen)
        loc = ref[None, :, None, None, None, :] + offset / torch.tensor(value_shapes, dtype=torch.float32)[:, None, :]
        attn = torch.randn(B, Q, nH, L * P, generator=gen).softmax(-1).view(B, Q, nH, L, P)
        value = torch.randn(B, S, nH, Dh, generator=gen)
        cast = lambda t: t.to(dev, dtype).requires_grad_()  # noqa: E731
        grad_out = torch.randn(B, Q, nH * Dh, generator=gen).to(dev, dtype)
        return cast(value), spatial_shapes, starts, cast(loc), cast(attn), grad_out

    def peak_mb(fn):  # peak memory above what the inputs already hold
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return round((torch.cuda.max_memory_allocated() - base) / 2**20, 1)

    cases = MSDA_CASES
    result = {"batch": B, "dtype": opt.dtype, "nH": nH, "Dh": Dh, "P": P}
    print(f"MSDA on {dev}, batch {B}, {opt.dtype}, nH={nH} Dh={Dh} P={P}" + (f"  [{note}]" if note else ""))
    print(f"{'case':10s} {'Q':>6s} {'S':>6s} {'backend':8s} {'fwd ms':>9s} {'fwd+bwd ms':>11s} {'peak MB':>8s}")
    for name, (qs, vs) in cases.items():
        value, shapes, starts, loc, attn, grad_out = inputs(qs, vs)
        Q, S = loc.shape[1], value.shape[1]
        row = {"Q": Q, "S": S}
        for backend in (["triton"] if run_triton else []) + ["torch"]:
            fwd = lambda: msda_triton.msda(value, shapes, starts, loc, attn, backend=backend)  # noqa: E731
            fwdbwd = lambda: torch.autograd.grad(fwd(), (value, loc, attn), grad_out)  # noqa: E731
            with torch.no_grad():
                row[f"fwd_ms_{backend}"] = round(timeit(fwd, warmup=2, iters=iters, device=dev), 3)
            row[f"fwdbwd_ms_{backend}"] = round(timeit(fwdbwd, warmup=2, iters=iters, device=dev), 3)
            if dev.startswith("cuda"):
                row[f"peak_mb_{backend}"] = peak_mb(fwdbwd)
            print(f"{name:10s} {Q:6d} {S:6d} {backend:8s} {row[f'fwd_ms_{backend}']:9.2f} "
                  f"{row[f'fwdbwd_ms_{backend}']:11.2f} {row.get(f'peak_mb_{backend}', '-'):>8}")
        if run_triton:
            row["speedup_fwd"] = round(row["fwd_ms_torch"] / row["fwd_ms_triton"], 2)
            row["speedup_fwdbwd"] = round(row["fwdbwd_ms_torch"] / row["fwdbwd_ms_triton"], 2)
            row["mem_ratio"] = round(row["peak_mb_torch"] / max(row["peak_mb_triton"], 0.1), 2)
            print(f"{name:10s} kernel vs reference: fwd x{row['speedup_fwd']}, fwd+bwd x{row['speedup_fwdbwd']}, "
                  f"peak memory / {row['mem_ratio']}")
        result[name] = row
    if note:
        result["note"] = note
    return result

MSDA_CASES = {  # the 3D ViT-Adapter at ViT-L/16 on 112^3 inputs: (query grids, value grids); nH=8, Dh=32, P=4
    "injector": ([(7, 7, 7)], [(28, 28, 28), (14, 14, 14), (7, 7, 7)]),
    "extractor": ([(28, 28, 28), (14, 14, 14), (7, 7, 7)], [(7, 7, 7)]),
}


def compile_msda(archs, dtypes):
    """Ahead-of-time builds of every kernel launch msda's forward and backward make at the adapter's shapes, for
    each target and input dtype, on a machine without a GPU (msda_triton.planned_launches / compile_launch).
    Launches that build the same binary (same kernel, dtypes, block sizes, hints) are compiled once."""
    import os

    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("bench.py msda --compile-only: unset TRITON_INTERPRET (the interpreter does not compile)")
    import msda_triton

    if not msda_triton.HAS_TRITON:
        raise SystemExit(f"bench.py msda --compile-only needs triton ({msda_triton._TRITON_ERROR})")
    rows, seen = [], {}
    print(f"{'kernel':30s} {'arch':6s} {'dtype':9s} {'cases':19s} {'regs':>5s} {'spills':>7s} {'smem B':>7s}  meta")
    for arch in archs:
        for dt in dtypes:
            for case, (qs, vs) in MSDA_CASES.items():
                launches = msda_triton.planned_launches(qs, vs, 8, 32, 4, getattr(torch, dt))
                for kernel, grid, args, meta in launches:
                    spec = tuple(str(a.dtype) if isinstance(a, torch.Tensor) else (a == 1, a % 16 == 0) for a in args)
                    key = (kernel.__name__, arch, dt, spec, tuple(sorted((k, str(v)) for k, v in meta.items())))
                    if key in seen:
                        seen[key]["cases"].append(case)
                        continue
                    r = msda_triton.compile_launch(kernel, args, meta, arch)
                    row = {"name": kernel.__name__, "arch": f"sm_{arch}", "dtype": dt, "cases": [case], **r,
                           "meta": {k: (v if isinstance(v, int) else str(v)) for k, v in meta.items()}}
                    seen[key] = row
                    rows.append(row)
    for r in rows:
        meta = " ".join(f"{k}={v}" for k, v in r["meta"].items() if k != "ACC")
        res = f"{r['regs']:5d} {r['spills']:7d} {r['shared_bytes']:7d}" if r["ok"] else f"FAILED: {r['error']}"
        print(f"{r['name']:30s} {r['arch']:6s} {r['dtype']:9s} {','.join(r['cases']):19s} {res}  {meta}")
    ok = all(r["ok"] for r in rows)
    spills = sum(r["spills"] or 0 for r in rows)
    print(f"{len(rows)} builds: {'all ok' if ok else 'FAILURES'}, {spills} bytes of spills in total")
    return {"kernels": [{k: r[k] for k in ("name", "arch", "dtype", "ok", "regs", "spills", "shared_bytes",
                                          "cases", "meta", "error")} for r in rows]}


class SyncCounter:
    """Count the ops that make the host wait for the device (a "host sync"), by phase of pretrain.py's step and by
    call site. A TorchDispatchMode sees every aten op whatever the device, so the count is the same on CPU as on a
    GPU for what it can see: a tensor read into Python (`.item()`, `float(t)`, `if t:` -> aten._local_scalar_dense),
    ops whose output size depends on the data (nonzero, masked_select, boolean-mask indexing, unique,
    repeat_interleave without output_size) and, on a GPU, blocking copies between the device and the host; on a GPU
    a read of a host tensor is marked kind "host" (no stall). On CPU no op runs for `.tolist()`, `.numpy()`,
    `.cpu()` or a copy to the run's device: a TorchFunctionMode counts those calls instead (kinds "to_host" and
    "to_device"; the latter only from the repository's code, `.to(device)` without non_blocking=True). The phase
    is read from metrics.PhaseTimer.current (pretrain.py --profile=True); events before the first mark: "setup".
    Each event: (step, phase, op, call site, kind)."""

    SYNC_OPS = ("_local_scalar_dense", "nonzero", "masked_select", "is_nonzero", "equal", "_unique2", "unique_dim",
                "unique_consecutive", "repeat_interleave", "allclose", "masked_scatter_")

    def __init__(self, device=None, root=None):
        import os

        from torch.overrides import TorchFunctionMode
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_leaves

        self.root = root or os.path.dirname(os.path.abspath(__file__))
        self.device = None if device is None else torch.device(device)  # copies to it are counted (kind to_device)
        self.events = []  # (step, phase, op, site, kind)
        counter, on_gpu = self, self.device is not None and self.device.type != "cpu"

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                op = func.overloadpacket.__name__
                sync = op in SyncCounter.SYNC_OPS and not (op == "repeat_interleave" and kwargs.get("output_size"))
                if op in ("index", "index_put_", "index_put") and any(
                        isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in args[1] or ()):
                    sync = True  # a boolean mask as an index: its nonzero count sets the output size
                kind = "read"
                if op in ("_to_copy", "copy_"):
                    src = args[1] if op == "copy_" else args[0]
                    dst = torch.device(args[0].device if op == "copy_" else kwargs.get("device") or src.device)
                    sync = src.device.type != dst.type and not kwargs.get("non_blocking", False)
                    kind = "to_host" if dst.type == "cpu" else "to_device"
                elif sync and on_gpu and not any(isinstance(a, torch.Tensor) and a.device.type != "cpu"
                                                 for a in tree_leaves((args, kwargs))):
                    kind = "host"  # a read of a host tensor: no stall
                if sync:
                    counter.record(op, kind, filter_callers=False)
                return func(*args, **kwargs)

        class FunctionMode(TorchFunctionMode):
            # what the dispatcher does not see on CPU: reads into Python and copies to the run's device
            def __torch_function__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                name = getattr(func, "__name__", "")
                if on_gpu:  # the dispatcher sees the real copies
                    pass
                elif name in ("tolist", "numpy", "cpu"):
                    counter.record(name, kind="to_host")
                elif name in ("to", "tensor", "as_tensor") and not kwargs.get("non_blocking", False):
                    dev = kwargs.get("device", next((a for a in args[1:] if isinstance(a, (str, torch.device))), None))
                    if dev is not None and counter.device is not None and torch.device(dev) == counter.device:
                        counter.record(name, kind="to_device")
                return func(*args, **kwargs)

        self.mode, self.function_mode = Mode(), FunctionMode()

    def record(self, op, kind="read", filter_callers=True):
        import os

        import metrics

        def ours(frame):  # a frame of the repo's code, bench.py excepted
            name = frame.f_code.co_filename
            return name.startswith(self.root) and os.path.basename(name) != "bench.py"

        f = sys._getframe(2)
        if kind == "to_device" and filter_callers and not ours(f):
            return  # torch's own .to(device) calls (clip_grad_norm_, optimizers) move device tensors to the device
        while f is not None and not ours(f):
            f = f.f_back
        site = f"{f.f_code.co_filename[len(self.root) + 1:]}:{f.f_lineno}" if f else "?"
        g, in_optim = sys._getframe(2), False  # torch.optim's own reads of its per-parameter step counters
        while g is not None and g is not f:
            in_optim |= f"torch{os.sep}optim{os.sep}" in g.f_code.co_filename
            g = g.f_back
        timer = metrics.PhaseTimer.current
        step, phase = (timer.steps, timer.phase or "setup") if timer else (0, "setup")
        self.events.append((step, phase, op, site + (" (torch.optim)" if in_optim else ""), kind))

    def __enter__(self):
        self.function_mode.__enter__()
        self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        self.mode.__exit__(*exc)
        return self.function_mode.__exit__(*exc)


def count_pretrain_syncs(config, steps, extra):
    """Run pretrain.py in this process under a SyncCounter for `steps` steps (log_interval = steps, so the last
    step is the only log step) and return the events of the steps, by phase and site."""
    import os
    import runpy
    import tempfile

    import metrics

    with tempfile.TemporaryDirectory() as tmp:
        argv = ["pretrain.py", config] + extra + [  # last: these win over the same keys in extra
            f"--out_dir={tmp}", f"--max_iters={steps}", f"--log_interval={steps}", "--ckpt_interval=100000",
            "--export_interval=100000", "--visualize_at_end=False", "--eval_at_end=False", "--profile=True",
            "--compile=False"]  # the dispatch mode would see compiled code's ops only at tracing
        old_argv, old_cwd = sys.argv, os.getcwd()
        sys.argv = argv
        os.chdir(os.path.dirname(os.path.abspath(__file__)))
        try:
            dev = next((a.split("=", 1)[1] for a in extra if a.startswith("--device=")), "cpu")
            with SyncCounter("cuda" if dev == "auto" and torch.cuda.is_available() else dev) as counter:
                runpy.run_path(os.path.abspath("pretrain.py"), run_name="__main__")
        finally:
            sys.argv = old_argv
            os.chdir(old_cwd)
            metrics.PhaseTimer.current = None
    return [e for e in counter.events if 1 <= e[0] <= steps]


HOST_PHASES = ("data", "views")  # their tensors are on the host in a GPU run too (see count_pretrain_syncs)


def summarise_syncs(events, steps, device="cpu"):
    """Syncs per ordinary step and in the log step, by phase, and the call sites of the ordinary steps'.
    On a GPU the counter saw each tensor's device: every event but kind "host" is a sync. On CPU, counted as device
    syncs: copies to the device, and the other events outside HOST_PHASES except torch.optim's reads of its step
    counters (host tensors of the unfused CPU AdamW; on CUDA pretrain.py's AdamW is fused and keeps them on the
    device without reading them). The rest is listed as "host" (item() of a CPU tensor costs ~1 us, no stall)."""
    from collections import Counter

    def host(e):
        if e[4] in ("host", "to_device"):  # a copy from pageable host memory waits for the device's queue
            return e[4] == "host"
        if str(device).startswith("cuda"):  # the counter saw the tensors' devices
            return False
        return e[1] in HOST_PHASES or (not str(device).startswith("cuda") and e[3].endswith("(torch.optim)"))

    host_events = [e for e in events if e[0] < steps and host(e)]
    events = [e for e in events if not host(e)]
    plain = [e for e in events if e[0] < steps]  # steps 1 .. steps-1 are not log steps
    n_plain = max(steps - 1, 1)
    by_phase = Counter(e[1] for e in plain)
    sites = Counter(f"{e[1]} {e[3]} {e[2]}" for e in plain)
    log_step = [e for e in events if e[0] == steps]
    return {"per_step": len(plain) / n_plain,
            "per_step_by_phase": {k: v / n_plain for k, v in sorted(by_phase.items())},
            "log_step": len(log_step),
            "log_step_by_phase": dict(sorted(Counter(e[1] for e in log_step).items())),
            "sites_per_step": {k: v / n_plain for k, v in sites.most_common()},
            "host_per_step": len(host_events) / n_plain,
            "host_sites_per_step": {k: v / n_plain for k, v in
                                    Counter(f"{e[1]} {e[3]} {e[2]}" for e in host_events).most_common()}}


PHASES = ("data", "views", "teacher", "targets", "student", "heads_losses", "backward", "clip_optim", "ema", "log")


def bench_step(args, rest):
    """Step time and samples/s of the real training script: runs `pretrain.py <config>` for warm-up + timed
    steps in a temporary out_dir and reads its log.jsonl, so what is measured is exactly what training runs (data
    loading, batched augmentation, teacher, student, EMA). On a GPU the log also carries the bf16 MFU estimate
    (pretrain.py's documented FLOP count / the device's dense bf16 peak) and peak memory. Extra `--key=value`
    arguments are passed to pretrain.py (e.g. --batch_size=64 --compile=True --data_path=cache/).

    --profile: pretrain.py runs with profile=True and log_interval = --iters, after as many warm-up steps, so the
    timed row holds one log step in --iters steps, as a run with that log_interval does. Its "phase_ms" (one
    metrics.PhaseTimer mark per phase in pretrain.py's loop: wall clock on CPU, CUDA events on a GPU) is printed
    as a table with each phase's share of the step. Then pretrain.py runs 3 more steps in this process under a
    SyncCounter: the host syncs of an ordinary step and of a log step, by phase and call site."""
    import os
    import subprocess
    import tempfile

    config = args.config or "configs/pretrain_demo.py"
    timed = args.iters or 5
    warmup = timed if args.profile else 2
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "pretrain.py", config, f"--out_dir={tmp}", f"--max_iters={warmup + timed}",
               f"--log_interval={timed if args.profile else 1}", "--ckpt_interval=100000", "--export_interval=100000",
               "--visualize_at_end=False", "--eval_at_end=False", f"--device={args.device}"]
        if args.batch:
            cmd.append(f"--batch_size={args.batch}")
        if args.profile:
            cmd.append("--profile=True")
        cmd += rest
        env = dict(os.environ)
        if args.threads:
            env["OMP_NUM_THREADS"] = str(args.threads)
        print(" ".join(cmd))
        res = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=os.path.dirname(os.path.abspath(__file__)))
        if res.returncode != 0:
            raise SystemExit(res.stderr[-3000:])
        lines = [json.loads(l) for l in open(os.path.join(tmp, "log.jsonl"))]
    cfg = lines[0]["config"]
    steps = [r for r in lines[1:] if "step" in r and r["step"] > warmup]
    mean = lambda k: sum(r[k] for r in steps) / len(steps) if steps and k in steps[0] else None  # noqa: E731
    sps = mean("samples_per_s")
    out = {"config": config, "batch_size": cfg["batch_size"], "samples_per_s": sps,
           "step_ms": 1e3 * cfg["batch_size"] / sps, "data_wait_frac": mean("data_wait_frac"),
           "mfu": mean("mfu"), "peak_mem_gb": mean("peak_mem_gb"), "timed_steps": timed}
    print(f"{config}: batch {cfg['batch_size']}, {out['step_ms']:.0f} ms/step, {sps:.2f} samples/s, "
          f"data wait {out['data_wait_frac']:.0%}" + (f", MFU {out['mfu']:.1%}" if out["mfu"] else ""))
    if not args.profile:
        return out

    # ------------------------------------------------------------------------------------ where a step goes
    phase_ms = steps[-1]["phase_ms"]
    total = phase_ms.pop("step_ms")
    out["phase_ms"] = {k: round(phase_ms[k], 2) for k in PHASES if k in phase_ms}
    out["phase_sum_ms"] = round(total, 2)
    timing = "CUDA events" if str(args.device).startswith("cuda") else "wall clock"
    print(f"\nwhere a step goes ({timing}, mean of {timed} steps, one of them a log step; threads "
          f"{args.threads or 'default'})")
    print(f"{'phase':<14}{'ms':>10}{'share':>8}")
    for k, v in out["phase_ms"].items():
        print(f"{k:<14}{v:>10.1f}{v / total:>8.1%}")
    print(f"{'sum of phases':<14}{total:>10.1f}   measured step (log rows' wall clock): {out['step_ms']:.1f} ms")

    # ------------------------------------------------------------------------------------------- host syncs
    if args.no_syncs:
        return out
    n = 3
    extra = [f"--device={args.device}"] + ([f"--batch_size={args.batch}"] if args.batch else []) + rest
    events = count_pretrain_syncs(config, n, extra)
    syncs = summarise_syncs(events, n, args.device)
    out["syncs_per_step"] = syncs["per_step"]
    out["syncs"] = syncs
    print(f"\nhost syncs (bench.SyncCounter over {n} steps): {syncs['per_step']:g} per ordinary step "
          f"{syncs['per_step_by_phase']}, {syncs['log_step']} in a log step {syncs['log_step_by_phase']}")
    for site, k in syncs["sites_per_step"].items():
        print(f"  {k:5g} x per step  {site}")
    print(f"reads of host tensors (no GPU stall; data/views phases, CPU AdamW counters): {syncs['host_per_step']:g} "
          f"per step, the largest: " + ", ".join(f"{s} x{k:g}" for s, k in
                                                 list(syncs["host_sites_per_step"].items())[:4]))
    return out


H100_BF16_FLOPS = 989e12  # dense bf16 peak of an H100 / H200 SXM
SAMPLE_FLOPS_VITL = 1.5e12  # one sample's training FLOPs (fwd + bwd) at the paper's crops: pretrain.flops_per_image


def prepare_phantom_cache(out, n, shape):
    """n phantoms (phantoms.SyntheticVolumes) written as int16 .nii.gz, as CT files are stored, then prepared
    (`cache.prepare`) into the cache folder `out`, as a real dataset would be. Returns the index."""
    import os

    import nibabel as nib
    import numpy as np

    from cache import load_index, prepare
    from phantoms import SyntheticVolumes

    raw = os.path.join(out, "nifti")
    os.makedirs(raw, exist_ok=True)
    vols = SyntheticVolumes(n, tuple(shape), seed=0)
    for i in range(n):
        path = os.path.join(raw, f"phantom_{i:03d}.nii.gz")
        if not os.path.exists(path):
            vol = vols[i]["image"][0].numpy()  # (H, W, D) in [-1, 1]
            nib.save(nib.Nifti1Image(np.rint(vol * 1000).astype(np.int16), np.diag([0.8, 0.8, 2.0, 1.0])), path)
    prepare(raw, out, workers=min(8, os.cpu_count() or 1), progress=False)
    return load_index(out)


def bench_input(args, rest):
    """The real-data input path: what one DataLoader worker process delivers. The workers of pretrain.py only read
    the 2 global + n_local local crop boxes of a sample from the prepared, memory-mapped cache (float16 -> float32;
    resizing, augmentation and masks run batched on the device, augment.make_views). Timed here in one process =
    one worker = one core, warm page cache, at the ViT-L crops (2 x 96^3 + 8 x 48^3) and at the demo's
    (2 x 48^3 + 4 x 24^3); then the workers per GPU that a step at 40% MFU needs.

    The cache: --data_path DIR (a prepared cache, e.g. real volumes from `python cache.py prepare`), else --volumes
    phantoms of --shape written as .nii.gz and prepared into --out (kept, for `bench.py step --data_path=...`) or
    a temporary folder."""
    import math
    import tempfile

    from cache import PretrainDataset, load_index

    p = argparse.ArgumentParser(prog="bench.py input")
    p.add_argument("--data_path", default=None, help="an existing prepared cache folder")
    p.add_argument("--out", default=None, help="where to prepare the phantom cache (kept)")
    p.add_argument("--volumes", type=int, default=8)
    p.add_argument("--shape", type=int, nargs=3, default=[256, 256, 128], help="phantom (H, W, D)")
    p.add_argument("--mfu", type=float, default=0.40)
    opt = p.parse_args(rest)
    tmp = None
    cache = opt.data_path
    if cache is None:
        cache = opt.out or (tmp := tempfile.TemporaryDirectory()).name
        t0 = time.perf_counter()
        prepare_phantom_cache(cache, opt.volumes, opt.shape)
        print(f"prepared {opt.volumes} phantoms {opt.shape} into {cache} in {time.perf_counter() - t0:.0f} s")
    index = load_index(cache)
    shapes = [e["shape"] for e in index["entries"]]
    print(f"cache {cache}: {len(shapes)} volumes, e.g. {shapes[0]} (float16 .npy, memory-mapped)")
    iters = args.iters or 50
    res = {"cache": cache, "volumes": len(shapes)}
    print(f"\n{'crops per sample':<34}{'ms/sample':>10}{'samples/s per worker':>22}{'MB read':>9}")
    for name, S, s, n_local in (("vitl", 96, 48, 8), ("demo", 48, 24, 4)):
        ds = PretrainDataset(cache, global_crops_size=S, local_crops_size=s, n_local=n_local, seed=0)
        for k in range(3):  # warm-up: page cache, first mmaps
            ds[k]
        passes = []  # the same samples 3 times, the fastest pass: the machine's other load only slows a pass down
        for _ in range(3):
            t0, mb = time.perf_counter(), 0.0
            for k in range(3, 3 + iters):
                item = ds[k]
                mb += sum(c.numel() * 2 for c in item["global_crops"] + item["local_crops"]) / 2**20  # float16 read
            passes.append((time.perf_counter() - t0) * 1e3 / iters)
        ms = min(passes)
        res[f"{name}_ms_per_sample"] = round(ms, 2)
        res[f"{name}_passes_ms"] = [round(t, 2) for t in passes]
        res[f"{name}_mb_per_sample"] = round(mb / iters, 2)
        res[f"{name}_samples_per_s_per_worker"] = round(1e3 / ms, 1)
        label = f"{name}: 2 x {S}^3 + {n_local} x {s}^3 boxes"
        print(f"{label:<34}{ms:>10.2f}{1e3 / ms:>22.1f}{mb / iters:>9.1f}")
    need = opt.mfu * H100_BF16_FLOPS / SAMPLE_FLOPS_VITL  # samples/s one GPU consumes at that MFU
    workers = need / res["vitl_samples_per_s_per_worker"]
    res.update({"target_mfu": opt.mfu, "gpu_samples_per_s_at_target": round(need, 1),
                "workers_per_gpu_needed": round(workers, 2)})
    print(f"\nViT-L at {opt.mfu:.0%} MFU: {opt.mfu:.2f} x {H100_BF16_FLOPS / 1e12:.0f} TFLOP/s (H100/H200 dense bf16)"
          f" / "
          f"{SAMPLE_FLOPS_VITL / 1e12:.1f} TFLOP per sample = {need:.0f} samples/s per GPU; / "
          f"{res['vitl_samples_per_s_per_worker']:.0f} samples/s per worker = {workers:.2f} -> "
          f"{math.ceil(workers)} worker process(es) per GPU (box reads only; cold disk reads are slower)")
    gbs = need * res["vitl_mb_per_sample"] / 1024
    res["read_gb_per_s_per_gpu"] = round(gbs, 2)
    print(f"and {need:.0f} x {res['vitl_mb_per_sample']:.1f} MB = {gbs:.1f} GB/s of float16 boxes per GPU from the "
          f"page cache or disk (the boxes are fractions of the volume: larger volumes read more per sample)")
    if tmp:
        tmp.cleanup()
    return res


def saved_bytes_by_group(net, x, groups, autocast_dtype=None):
    """Bytes autograd keeps for backward after one forward + loss of `net` on x, by module group: a
    torch.autograd.graph.saved_tensors_hooks pack hook sees every tensor an op saves and charges its storage
    (counted once, parameters excluded: they are held anyway) to the innermost module on the forward-hook stack
    that `groups` ({module: name}) names ("other" if none). Regions under torch.utils.checkpoint save nothing the
    hook sees; the inputs each region keeps for its recomputation are charged to "checkpoint_inputs" (the
    checkpoint call is wrapped for that). Under autocast, the bf16 copies of the weights that ops save (a saved
    non-fp32 tensor of a parameter's shape) go to "weight_casts": they do not grow with the batch.
    Device-independent: the same tensors are saved on a GPU."""
    import torch.utils.checkpoint as tuc

    stack, seen, out = [], set(), {}
    params = {p.untyped_storage().data_ptr() for p in net.parameters()}
    param_shapes = {tuple(p.shape) for p in net.parameters()}

    def charge(t, name=None):
        s = t.untyped_storage()
        if s.data_ptr() in seen or s.data_ptr() in params:
            return
        seen.add(s.data_ptr())
        if name is None and t.dtype != torch.float32 and tuple(t.shape) in param_shapes:
            name = "weight_casts"  # autocast's bf16 copy of a weight: one per forward, whatever the batch
        name = name or next((groups[m] for m in reversed(stack) if m in groups), "other")
        out[name] = out.get(name, 0) + s.nbytes()

    def pack(t):
        charge(t)
        return t

    hooks = [m.register_forward_pre_hook(lambda m, a: stack.append(m)) for m in net.modules()]
    hooks += [m.register_forward_hook(lambda m, a, o: (stack.pop(), None)[1]) for m in net.modules()]
    real_cp = tuc.checkpoint

    def counting_cp(fn, *args, **kw):
        for a in args:
            if isinstance(a, torch.Tensor):
                charge(a, "checkpoint_inputs")
        return real_cp(fn, *args, **kw)

    tuc.checkpoint = counting_cp
    try:
        dev = x.device.type
        ctx = torch.autocast(dev, dtype=autocast_dtype) if autocast_dtype else torch.autocast(dev, enabled=False)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), ctx:
            y = net(x)
            loss = y.float().square().mean()  # stands in for Dice + CE: (B, K, H, W, D) -> scalar
    finally:
        tuc.checkpoint = real_cp
        for h in hooks:
            h.remove()
    return out, loss


def bench_finetune_memory(args, rest):
    """Bytes saved for backward by one ViT-L + ViT-Adapter + UNETR training step at 112^3 with the ViT frozen
    (finetune_seg.py's default: the paper's setting), per module group, fp32 and under bf16 autocast, without
    and with activation checkpointing (adapter.ViTAdapter with_cp / finetune_seg.py grad_checkpoint). Measured at
    --batch (default 1) on CPU: saved activations scale linearly with the batch (every saved tensor has the batch
    as its leading dimension), so batch 8 is 8x. --arch/--crop for a smaller check.
    On CUDA (--device cuda, default batch 8) it also times forward + backward and reads the peak memory of the
    step (the model, its activations and gradients; finetune_seg.py adds the AdamW state of the trained part)."""
    import adapter
    import model

    p = argparse.ArgumentParser(prog="bench.py finetune_memory")
    p.add_argument("--arch", default="vit_large")
    p.add_argument("--crop", type=int, default=112)
    p.add_argument("--num_classes", type=int, default=14)
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    p.add_argument("--with_cp", nargs="+", default=["False", "True"], choices=["False", "True"])
    opt = p.parse_args(rest)
    cuda = str(args.device).startswith("cuda")
    B = args.batch or (8 if cuda else 1)
    S, scale = opt.crop, 8 / B
    torch.manual_seed(0)
    vit = model.ARCHS[opt.arch](img_size=S).requires_grad_(False).eval()  # frozen, as finetune_seg.py runs it
    x = torch.randn(B, 1, S, S, S, device=args.device)
    result = {"arch": opt.arch, "crop": S, "batch": B, "frozen_backbone": True}
    print(f"{opt.arch} + ViT-Adapter + UNETR at {S}^3, batch {B}, ViT frozen: bytes saved for backward "
          f"(GiB; batch 8 = {scale:g} x the batch-{B} bytes, autocast weight copies once)")
    for dt in opt.dtypes:
        for cp in [c == "True" for c in opt.with_cp]:
            net = adapter.ViTAdapterUNETR(vit, 1, opt.num_classes, with_cp=cp).to(args.device).train()
            net.vit.eval()
            a = net.adapter
            groups = {**{b: "vit_blocks" for b in vit.blocks}, vit.patch_embed: "vit_embed", a.spm: "spm",
                      **{i.injector: "injector" for i in a.interactions},
                      **{e: "extractor" for i in a.interactions for e in [i.extractor, *i.extra_extractors]},
                      **{m: "adapter_out" for m in [a.up, *a.norms, *a.channel_mix]}}
            groups.update({m: "decoder" for n, m in net.named_children() if n != "adapter"})
            t0 = time.perf_counter()
            by, loss = saved_bytes_by_group(net, x, groups, None if dt == "float32" else getattr(torch, dt))
            del loss
            total = sum(by.values())
            fixed = by.get("weight_casts", 0)
            key = f"{dt}_{'checkpoint' if cp else 'plain'}"
            result[key] = {k: v for k, v in sorted(by.items(), key=lambda kv: -kv[1])}
            result[key]["total"] = total
            result[key]["batch8_estimate"] = int((total - fixed) * scale + fixed)
            print(f"\n{dt}, with_cp={cp}: {total / 2**30:.3f} GiB at batch {B} -> "
                  f"{result[key]['batch8_estimate'] / 2**30:.1f} GiB at batch 8 (weight casts once)  "
                  f"({time.perf_counter() - t0:.0f} s)")
            for k, v in result[key].items():
                if k not in ("total", "batch8_estimate"):
                    print(f"  {k:<18}{v / 2**30:>9.3f} GiB {v / total:>6.1%}")
            if cuda:  # the real step: forward + backward, its time and the allocator's peak
                ctx = torch.autocast("cuda", dtype=getattr(torch, dt), enabled=dt != "float32")

                def step(net=net):
                    with ctx:
                        loss = net(x).float().square().mean()
                    loss.backward()
                    net.zero_grad(set_to_none=True)

                step()
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                ms = timeit(step, warmup=0, iters=3, device="cuda")
                peak = torch.cuda.max_memory_allocated() / 2**30
                result[key].update({"fwd_bwd_ms": round(ms, 1), "peak_gib": round(peak, 2)})
                print(f"  CUDA forward + backward at batch {B}: {ms:.0f} ms, peak {peak:.1f} GiB")
            del net
    return result


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["augment", "msda", "step", "finetune_memory", "input"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--image", default=None, help="augment: benchmark on this volume instead of a synthetic one")
    p.add_argument("--batch", type=int, default=None, help="batch size (default: per subcommand)")
    p.add_argument("--iters", type=int, default=None, help="timed iterations (default: per subcommand)")
    p.add_argument("--config", default=None, help="step: a pretrain config file (default: the demo config)")
    p.add_argument("--profile", action="store_true", help="step: per-phase times and host syncs of the step")
    p.add_argument("--no_syncs", action="store_true", help="step --profile: skip the host-sync count")
    args, rest = p.parse_known_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    result = globals()[f"bench_{args.what}"](args, rest)
    result.setdefault("device", args.device)
    result.setdefault("threads", torch.get_num_threads())
    print(json.dumps(result))
