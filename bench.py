"""
bench.py — speed and memory, measured side by side in one run (never asserted in tests).

    python bench.py augment [--image PATH] [--threads N] [--device cpu|cuda]
    python bench.py msda    [--device cuda] [--batch 1]
    python bench.py msda --compile-only   [--arch 80 90] [--dtypes float32 bfloat16 float16]   (no GPU needed)
    python bench.py step    [--config configs/pretrain_demo.py] [--device cpu|cuda] [--iters 5]

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


def bench_step(args, rest):
    """Step time and samples/s of the real training script: runs `pretrain.py <config>` for warm-up + timed
    steps in a temporary out_dir and reads its log.jsonl (one log line per step), so what is measured is exactly
    what training runs (data loading, batched augmentation, teacher, student, EMA). On a GPU the log also carries
    the bf16 MFU estimate (pretrain.py's documented FLOP count / the device's dense bf16 peak) and peak memory.
    Extra `--key=value` arguments are passed to pretrain.py (e.g. --batch_size=64 --compile=True)."""
    import os
    import subprocess
    import tempfile

    config = args.config or "configs/pretrain_demo.py"
    warmup, timed = 2, args.iters or 5
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "pretrain.py", config, f"--out_dir={tmp}", f"--max_iters={warmup + timed}",
               "--log_interval=1", "--ckpt_interval=100000", "--export_interval=100000",
               "--visualize_at_end=False", f"--device={args.device}"]
        if args.batch:
            cmd.append(f"--batch_size={args.batch}")
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
           "mfu": mean("mfu"), "peak_mem_gb": mean("peak_mem_gb"), "timed_steps": len(steps)}
    print(f"{config}: batch {cfg['batch_size']}, {out['step_ms']:.0f} ms/step, {sps:.2f} samples/s, "
          f"data wait {out['data_wait_frac']:.0%}" + (f", MFU {out['mfu']:.1%}" if out["mfu"] else ""))
    return out


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["augment", "msda", "step"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--image", default=None, help="augment: benchmark on this volume instead of a synthetic one")
    p.add_argument("--batch", type=int, default=None, help="batch size (default: per subcommand)")
    p.add_argument("--iters", type=int, default=None, help="timed iterations (default: per subcommand)")
    p.add_argument("--config", default=None, help="step: a pretrain config file (default: the demo config)")
    args, rest = p.parse_known_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    result = globals()[f"bench_{args.what}"](args, rest)
    result.setdefault("device", args.device)
    result.setdefault("threads", torch.get_num_threads())
    print(json.dumps(result))
