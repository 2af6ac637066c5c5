"""
cache.py — the on-disk pretraining cache: `prepare` writes it once, `PretrainDataset` reads crop boxes from it.

    python cache.py prepare --datalist list.json --out cache/      # one pass: load, normalise, crop, store .npy
    python cache.py prepare --datalist "/data/**/*.nii.gz" --out cache/ --workers 16   # a folder or glob works too
    python pretrain.py configs/pretrain_vitl.py --data_path=cache/

The reference re-runs "load → pick a 4D frame → NaN fill → percentile scaling → axis permutation
→ foreground crop" through MONAI's disk cache and then loads the *whole* cached volume for every sample, only to
cut a box out of it. Here the deterministic part runs once (`prepare`, with data.load_volume and data.preprocess)
and writes each volume as an uncompressed `.npy`; the training dataset memory-maps it and reads only the voxels of
the crop boxes. Resizing, flips, intensity transforms and iBOT masks happen batched in the training process
(augment.make_views). Pretraining reads a cache only (or a dataset object such as phantoms.SyntheticVolumes): a
datalist, folder or glob is refused with the `prepare` command to run.

Layout (STYLE.md): a cached volume is one (H, W, D) float16 frame in [−1, 1], H and W the in-plane pair and D the
through-plane axis (data.inplane_first), cropped to its foreground.

What differs from the reference, on purpose:
- #6: the reference picks one random frame of a 4D series *before* its cache, freezing it forever. `prepare`
  stores every frame as its own volume, so all of them are used.
- #21: the reference's cache key ignores the transforms. Our index carries a hash of the preprocessing
  (`prep_version`); a cache made by other settings is rebuilt by `prepare` and refused by `PretrainDataset`.
- #5: the reference's 32 workers replay identical crop draws. `PretrainDataset[k]` seeds its own generator from
  (seed, rank, k), so every worker and every rank gets its own reproducible stream, whatever the worker count.
"""
import argparse
import hashlib
import itertools
import json
import os
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from augment import sample_crop_box  # the RRC3D box lives with the rest of the augmentation
from configurator import save_atomic  # the one atomic write of every script (full disk: a clear error)
from data import VolumeError, case_name, load_volume, log, preprocess, pretrain_sources, seeded_generator
from phantoms import SyntheticVolumes


# ----------------------------------------------------------------------------------------------------------------
# The preprocessing cache: `prepare` writes cache/index.json + one .npy per volume frame


PREP_VERSION = 1  # bump whenever preprocess() changes what it writes: the index hash then invalidates old caches


def prep_version() -> str:
    """Hash of everything that determines the cached voxels (the reference keys its cache on the item only)."""
    desc = {"version": PREP_VERSION, "orient": "RAS+", "steps": "fill_nonfinite,percentile,inplane_first,crop",
            "lo": 0.05, "hi": 99.95, "threshold": -1.0, "dtype": "float16"}
    return hashlib.sha1(json.dumps(desc, sort_keys=True).encode()).hexdigest()[:12]


def load_index(cache_dir) -> dict:
    return json.loads((Path(cache_dir) / "index.json").read_text())


def is_cache(source) -> bool:
    """Whether `source` is a folder that `prepare` wrote (the one test of "cache or not" for every reader)."""
    return isinstance(source, (str, os.PathLike)) and os.path.isfile(os.path.join(str(source), "index.json"))


def open_cache(source) -> dict:
    """The index of the cache folder `source`, checked against this code: a datalist, folder or glob, or a cache
    that other preprocessing settings or an older version wrote, raises VolumeError with the command to run."""
    if not is_cache(source):
        raise VolumeError(f"{source}: not a prepared cache (no index.json); pretraining reads a cache only: run "
                          f"`python cache.py prepare --datalist {source} --out <cache folder>` once and pass that "
                          f"folder")
    index = load_index(source)
    made = (index.get("version"), index.get("params", {}).get("dtype", "float16"))
    if made != (prep_version(), "float16"):
        raise VolumeError(f"{source}: made by preprocessing version {made[0]} ({made[1]}), this code writes "
                          f"{prep_version()} (float16); re-run `python cache.py prepare --datalist <its datalist> "
                          f"--out {source}` (it rebuilds the cache)")
    return index


def _prepare_one(source: str, out_dir: str, min_axis_size: int) -> tuple[list[dict], list[tuple[str, str]]]:
    """Worker: one source file -> (cache entries, rejected (name, reason)). Never raises for bad data."""
    entries, rejected = [], []
    try:
        x, spacing, _ = load_volume(source)
    except VolumeError as e:
        return entries, [(source, str(e))]  # (source, reason); reasons start with the file's name
    except Exception as e:  # e.g. MemoryError on a huge file: still that file's problem, not the run's
        return entries, [(source, f"{source}: {type(e).__name__}: {e}")]
    stem = case_name({"image": source})  # the file name without its volume suffix
    tag = hashlib.sha1(os.path.abspath(source).encode()).hexdigest()[:10]  # same stem in two folders: no clash
    for c in range(x.shape[0]):
        name = source if x.shape[0] == 1 else f"{source} [frame {c}]"
        try:
            y, sp = preprocess(x[c], spacing)
        except Exception as e:  # constant / all-NaN frame (ValueError) or worse; writing errors below do raise
            rejected.append((source, f"{name}: {e}" if isinstance(e, ValueError) else f"{name}: {e!r}"))
            continue
        if min(y.shape) <= min_axis_size:  # the reference keeps min(shape) > data_min_axis_size (strict)
            rejected.append((source, f"{name}: too small after foreground crop, shape {list(y.shape)} "
                                   f"(min_axis_size {min_axis_size})"))
            continue
        fname = f"{stem}-{tag}-f{c}.npy"
        save_atomic(y.astype(np.float16), Path(out_dir) / fname, write=lambda a, f: np.save(f, a))
        entries.append({"file": fname, "shape": list(y.shape), "spacing": [float(s) for s in sp],
                        "source": source, "frame": c, "n_frames": int(x.shape[0])})
    return entries, rejected


def prepare(sources, out_dir, min_axis_size: int = 24, workers: int = 2,
            retry_rejected: bool = False, progress: bool = True) -> dict:
    """Preprocess every volume of `sources` once into `out_dir` (all frames of 4D series).

    sources: a datalist JSON, folder, glob or list of paths (see `pretrain_sources`).
    Each frame -> `out_dir/<stem>-<hash>-f<frame>.npy` ((h, w, d) float16: values in [−1, 1], steps ≤ 5e-4),
    entry in `out_dir/index.json` = {"version", "params", "entries": [{file, shape, spacing, source, frame,
    n_frames}], "rejected": [{source, reason}]}; entries are sorted, so the dataset's volume order does not
    depend on the worker count.
    Resumable: sources already in an index of the same version (whose file still exists) are skipped, as are
    previously rejected ones (unless `retry_rejected` or min_axis_size changed). A different version (other
    settings, newer code) starts a fresh index. Bad files (missing, corrupt, 2D, constant, all-NaN, non-finite
    spacing, too small) are reported by name on stderr, recorded and skipped; the rest finishes.
    Returns {"index", "entries", "new", "skipped", "rejected": [(name, reason)], "seconds"}.
    """

    t0 = time.time()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    index_path = out_dir / "index.json"
    version = prep_version()
    params = {"dtype": "float16", "min_axis_size": min_axis_size}

    entries, rejected_old = [], []
    if index_path.is_file():
        try:
            old = load_index(out_dir)
        except Exception as e:
            old = {}
            log.warning(f"prepare: {index_path} unreadable ({e}); starting a fresh index")
        if old and old.get("version") == version:
            entries = [e for e in old["entries"] if (out_dir / e["file"]).is_file()]
            same_min = old.get("params", {}).get("min_axis_size") == min_axis_size
            rejected_old = [] if retry_rejected or not same_min else old.get("rejected", [])
        elif old:
            log.warning(f"prepare: {index_path} was made with preprocessing version {old.get('version')} != "
                        f"{version}; rebuilding")

    items = pretrain_sources(sources)
    done = {e["source"] for e in entries} | {r["source"] for r in rejected_old}
    rejected = [(r["source"], r["reason"]) for r in rejected_old]
    n_rejected_before = len(rejected)  # the summary reports this run's rejections only
    todo = []
    for item in items:
        src = item["image"]
        if src in done:
            continue
        done.add(src)  # duplicates in a datalist are prepared once
        shape = item.get("shape")
        if shape and min(shape[:3]) <= min_axis_size:  # the reference's filter, from the datalist alone
            rejected.append((src, f"{src}: too small, datalist shape {shape} (min_axis_size {min_axis_size})"))
            log.warning(f"prepare: skipped {rejected[-1][1]}")
            continue
        todo.append(src)
    n_skipped = len(items) - len(todo)

    def save():
        entries.sort(key=lambda e: (e["source"], e["frame"]))
        index = {"format": "nano3dino-cache", "version": version, "params": params, "entries": entries,
                 "rejected": [{"source": s, "reason": r} for s, r in rejected]}
        save_atomic(json.dumps(index, indent=1).encode(), index_path, write=lambda b, f: f.write(b))

    n_new, last_save = 0, time.time()
    job = partial(_prepare_one, out_dir=str(out_dir), min_axis_size=min_axis_size)
    pool = None
    if workers > 1 and len(todo) > 1:
        import multiprocessing as mp

        # the platform's default start method (fork on Linux, as torch's DataLoader); workers use numpy/nibabel only
        pool = mp.Pool(workers)
        results = pool.imap_unordered(job, todo, chunksize=1)
    else:
        results = map(job, todo)
    try:
        for new, bad in tqdm(results, total=len(todo), desc="prepare", unit="file", disable=not progress,
                             file=sys.stderr):
            entries += new
            n_new += len(new)
            for src, reason in bad:
                rejected.append((src, reason))
                log.warning(f"prepare: skipped {reason}")
            if time.time() - last_save > 30:  # a killed run resumes from here
                save()
                last_save = time.time()
    finally:
        if pool is not None:
            pool.terminate()
        save()
    n_bad = len(rejected) - n_rejected_before
    log.info(f"prepare: {n_new} volumes written, {n_skipped} sources skipped (already done or rejected before), "
             f"{n_bad} rejected, {len(entries)} in {index_path}")
    return {"index": str(index_path), "entries": len(entries), "new": n_new, "skipped": n_skipped,
            "rejected": rejected[n_rejected_before:], "seconds": time.time() - t0}


# ----------------------------------------------------------------------------------------------------------------
# Pretraining dataset: sample counter k -> (volume, 2 global + n_local local crop boxes) -> the box voxels


class StepSampler(torch.utils.data.Sampler):
    """Infinite sample counters start, start + 1, ... A resumed run passes start = step · batch_size and gets the
    very same samples as an uninterrupted one (each PretrainDataset[k] is a pure function of (seed, rank, k))."""

    def __init__(self, start: int = 0):
        self.start = int(start)

    def __iter__(self):
        return itertools.count(self.start)


class PretrainDataset(torch.utils.data.Dataset):
    """`ds[k]` -> {"global_crops": [2 × (1, h, w, d)], "local_crops": [n_local × (1, h, w, d)], "index", "k"}.

    The crops are the raw voxels of RandomResizedCrop3d boxes (augment.sample_crop_box) — box sizes
    are fractions of the volume, so they differ per crop; augment.make_views resizes them to
    global_crops_size³ / local_crops_size³ on the training device (both sizes are kept here as attributes).

    source:
      None or ""              -> SyntheticVolumes(1000, (64, 64, 64), seed) (demos, tests);
      a folder with index.json -> the `prepare` cache, memory-mapped; only the box voxels are read;
      a dataset object         -> items with "image" (1, H, W, D), e.g. SyntheticVolumes(...).
    Anything else (a datalist, folder or glob) and a stale cache raise VolumeError naming the `prepare` command.
    Volumes with min(shape) <= min_axis_size are dropped (cache shapes; reference: strict >).

    Seeding: k is a global sample counter per rank (use StepSampler). Volume choice: the
    position g = k·world_size + rank walks through per-pass permutations of all volumes (pass p = g // n seeded by
    (seed, p)), so within a pass ranks see disjoint volumes and every volume is seen once. Crop boxes come from a
    generator seeded by (seed, rank, k). Any worker count, any resume point, gives the same samples.
    Small volumes: each axis is virtually padded with −1 to at least `pad_to` voxels (default min_axis_size;
    pad_to=global_crops_size never upsamples a volume); the box is drawn on the padded shape.
    Bad volumes (unreadable, wrong shape): a warning naming the file, then another
    volume drawn deterministically from (seed, rank, k, attempt); after MAX_TRIES failures in a row, an error.
    """

    MAX_TRIES = 10  # bad volumes in a row before a sample gives up

    def __init__(self, source=None, global_crops_size: int = 96, local_crops_size: int = 48, n_local: int = 8,
                 global_in_slice_scale=(0.48, 1.0), global_cross_slice_scale=(0.5, 1.0),
                 local_in_slice_scale=(0.16, 0.48), local_cross_slice_scale=(0.2, 0.5),
                 min_axis_size: int = 24, seed: int = 0, rank: int = 0, world_size: int = 1,
                 pad_to: int | None = None):
        self.global_crops_size, self.local_crops_size, self.n_local = global_crops_size, local_crops_size, n_local
        self.global_scales = (tuple(global_in_slice_scale), tuple(global_cross_slice_scale))
        self.local_scales = (tuple(local_in_slice_scale), tuple(local_cross_slice_scale))
        self.min_axis_size, self.seed, self.rank, self.world_size = min_axis_size, seed, rank, world_size
        self.pad_to = min_axis_size if pad_to is None else pad_to
        self._bad: set[int] = set()  # per worker process: known-bad volumes are not re-read (nor re-logged)
        self._perm_cache: tuple[int, torch.Tensor] | None = None

        if source is None or source == "":
            source = SyntheticVolumes(1000, (64, 64, 64), seed=seed)
        if not isinstance(source, (str, os.PathLike, list, tuple)):
            self.kind, self.volumes = "dataset", source
            self.names = [f"{type(source).__name__}[{i}]" for i in range(len(source))]
        else:
            index = open_cache(source)
            self.kind, self.cache_dir = "cache", Path(source)
            self.entries = [e for e in index["entries"] if min(e["shape"]) > min_axis_size]
            self.names = [str(self.cache_dir / e["file"]) for e in self.entries]
        if len(self.names) == 0:
            raise ValueError(f"PretrainDataset: no usable volumes in {source!r}")

    def __len__(self) -> int:
        return len(self.names)  # volumes; the sampler (StepSampler) is what makes the stream infinite

    def volume_for(self, k: int) -> int:
        """The volume of sample counter k on this rank (per-pass permutation, ranks strided)."""
        n = len(self.names)
        p, pos = divmod(k * self.world_size + self.rank, n)
        if self._perm_cache is None or self._perm_cache[0] != p:
            self._perm_cache = (p, torch.randperm(n, generator=seeded_generator(self.seed, 0xA55, p)))
        return int(self._perm_cache[1][pos])

    def _open(self, v: int):
        """Volume v -> (spatial shape, (H, W, D) array). For the cache the array is a memory map (nothing read
        yet); mode "c" (copy-on-write: writes, which we never make, would stay private) gives a writable array,
        which torch.from_numpy takes without a warning."""
        if self.kind == "cache":
            e = self.entries[v]
            arr = np.load(self.cache_dir / e["file"], mmap_mode="c", allow_pickle=False)  # header only
            if tuple(arr.shape) != tuple(e["shape"]):
                raise VolumeError(f"{self.names[v]}: shape {list(arr.shape)} != index {e['shape']} (stale cache)")
            return arr.shape, arr
        x = self.volumes[v]["image"]  # a dataset object
        x = np.asarray(x.numpy() if torch.is_tensor(x) else x, dtype=np.float32)
        x = x[0] if x.ndim == 4 else x
        if x.ndim != 3:
            raise VolumeError(f"{self.names[v]}: expected a (1, H, W, D) volume, got {list(x.shape)}")
        return x.shape, (x if x.flags.writeable else x.copy())  # torch.from_numpy warns on read-only arrays

    def _read_box(self, shape, arr, box) -> torch.Tensor:
        """The box (h0, w0, d0, ch, cw, cd) of the padded volume as (1, ch, cw, cd) float32: only the in-volume
        part is read, the rest is −1.
        The read is one torch copy_ from the (memory-mapped) array into the output: it converts float16 ->
        float32 vectorised while it reads; numpy's float16 -> float32 cast is ~8× slower and would dominate a
        sample's cost (`bench.py augment`)."""
        out = torch.empty(tuple(box[3:]), dtype=torch.float32)
        src, dst = [], []
        for n, b0, cb in zip(shape, box[:3], box[3:]):
            off = max(self.pad_to - n, 0) // 2  # the volume sits centred in its padded extent
            lo, hi = max(b0, off), min(b0 + cb, off + n)
            if hi <= lo:
                return out.fill_(-1.0)[None]  # box entirely in the padding
            src.append(slice(lo - off, hi - off))
            dst.append(slice(lo - b0, hi - b0))
        if any(d.stop - d.start < cb for d, cb in zip(dst, box[3:])):
            out.fill_(-1.0)  # part of the box is padding (only then: a fill is one more pass over the box)
        region = out[tuple(dst)]
        region.copy_(torch.from_numpy(arr[tuple(src)]))
        return out[None]

    def _crops(self, v: int, g: torch.Generator) -> dict:
        shape, arr = self._open(v)
        padded = tuple(max(n, self.pad_to) for n in shape)
        boxes = [sample_crop_box(padded, *self.global_scales, generator=g) for _ in range(2)]
        boxes += [sample_crop_box(padded, *self.local_scales, generator=g) for _ in range(self.n_local)]
        crops = [self._read_box(shape, arr, b) for b in boxes]
        return {"global_crops": crops[:2], "local_crops": crops[2:], "index": v}

    def __getitem__(self, k: int) -> dict:
        k = int(k)
        v, last = self.volume_for(k), None
        for attempt in range(self.MAX_TRIES):
            if attempt:  # another volume, a pure function of (seed, rank, k, attempt)
                g = seeded_generator(self.seed, self.rank, k, attempt, 1)
                v = int(torch.randint(len(self.names), (1,), generator=g))
            if v in self._bad:
                continue
            try:
                out = self._crops(v, seeded_generator(self.seed, self.rank, k, attempt))
                out["k"] = k
                return out
            except (VolumeError, OSError, ValueError, EOFError) as e:  # bugs (TypeError, ...) still crash
                last = e
                self._bad.add(v)
                log.warning(f"PretrainDataset: skipping bad volume {self.names[v]} ({type(e).__name__}: {e}); "
                            f"drawing another")
        raise RuntimeError(f"PretrainDataset: {self.MAX_TRIES} bad volumes in a row at k={k}; last error: {last}")


def collate_pretrain(samples: list[dict]) -> dict:
    """Samples -> {"global_crops": [view0: B tensors, view1: B tensors], "local_crops": [n_local lists of B],
    "index": (B,) long, "k": (B,) long}. Crops differ in size, so they stay lists; augment.make_views resizes them
    into the reference's (2B, 1, S, S, S) / (n_local·B, 1, s, s, s) layout (view-major, then image)."""
    n_local = len(samples[0]["local_crops"])
    return {"global_crops": [[s["global_crops"][i] for s in samples] for i in range(2)],
            "local_crops": [[s["local_crops"][j] for s in samples] for j in range(n_local)],
            "index": torch.tensor([s["index"] for s in samples], dtype=torch.long),
            "k": torch.tensor([s.get("k", -1) for s in samples], dtype=torch.long)}


# ----------------------------------------------------------------------------------------------------------------
# CLI


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("prepare", help="preprocess volumes once into a memory-mappable cache")
    a.add_argument("--datalist", required=True, help="datalist JSON (pretraining or finetuning), folder or glob")
    a.add_argument("--out", required=True, help="cache folder (index.json + .npy files)")
    a.add_argument("--min_axis_size", type=int, default=24, help="drop volumes with min(shape) <= this (ref: 24)")
    a.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="parallel processes")
    a.add_argument("--retry", action="store_true", help="retry files rejected by a previous run")
    a.add_argument("--threads", type=int, default=0, help="torch CPU threads; 0 = torch's default (all cores)")
    args = ap.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)

    if args.cmd == "prepare":
        try:
            summary = prepare(args.datalist, args.out, min_axis_size=args.min_axis_size, workers=args.workers,
                              retry_rejected=args.retry)
        except VolumeError as e:  # an unreadable datalist: the message names it
            sys.exit(f"error: {e}")
        summary["rejected"] = len(summary["rejected"])  # names went to stderr
        print(json.dumps(summary))
        if not load_index(args.out).get("entries"):
            sys.exit(f"prepare: {args.out} holds no usable volume (see the messages above)")
