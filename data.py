"""
data.py — volumes in, crops out: reading, the preprocessing cache, synthetic phantoms, the pretraining dataset.

    python data.py make-datalist /data/mri --out list.json        # pretraining JSON: [{"image","shape","spacing"}]
    python data.py prepare --datalist list.json --out cache/      # one pass: load, normalise, crop, store .npy
    python data.py prepare --datalist "/data/**/*.nii.gz" --out cache/ --workers 16   # a folder or glob works too
    python data.py show /data/mri/sub-01_T1w.nii.gz               # shape, spacing, orientation, value range

The reference re-runs "load → pick a 4D frame → NaN fill → percentile scaling → axis permutation
→ foreground crop" through MONAI's disk cache and then loads the *whole* cached volume for every sample, only to
cut a box out of it. Here the deterministic part runs once (`prepare`) and writes each volume as an uncompressed
`.npy`; the training dataset memory-maps it and reads only the voxels of the crop boxes. Resizing, flips,
intensity transforms and iBOT masks happen batched in the training process (augment.make_views).

Layout (STYLE.md): every array is (C, H, W, D) — the array axes of the file after reorientation to the closest
canonical (RAS+) orientation; after `inplane_first` H and W are the in-plane (equal-spacing) pair and D the
through-plane (slice) axis. A 3D file gives C = 1; a 4D file (time series, multi-channel) gives C = frames.

What differs from the reference, on purpose:
- #6: the reference picks one random frame of a 4D series *before* its cache, freezing it forever. `prepare`
  stores every frame as its own volume, so all of them are used.
- #21: the reference's cache key ignores the transforms. Our index carries a hash of the preprocessing
  (`prep_version`); a cache made by other settings is rebuilt by `prepare` and flagged by `PretrainDataset`.
- #5: the reference's 32 workers replay identical crop draws. `PretrainDataset[k]` seeds its own generator from
  (seed, rank, k), so every worker and every rank gets its own reproducible stream, whatever the worker count.
- We reorient to RAS+ (the reference pretrains on raw file order); it only changes which axis is which,
  and `inplane_first` decides the slice axis from the spacing either way.
"""
import argparse
import glob
import hashlib
import itertools
import json
import logging
import os
import sys
import time
import warnings
from functools import partial
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from augment import sample_crop_box  # the RRC3D box lives with the rest of the augmentation
from configurator import save_atomic  # the one atomic write of every script (full disk: a clear error)



class _AboveProgressBars(logging.Handler):
    def emit(self, record):
        tqdm.write(self.format(record), file=sys.stderr)


# The one channel for bad input met while working (a skipped file, a stale cache) and for the summaries of
# `prepare`: this logger, whose lines go to stderr above any progress bar (and to any handler a user adds).
log = logging.getLogger("data")
log.addHandler(_AboveProgressBars())
log.setLevel(logging.INFO)

VOLUME_SUFFIXES = (".nii.gz", ".nii", ".mgz", ".npy")  # what load_volume reads (longest first for matching)
SPLITS = ("training", "validation", "test")  # the finetuning datalist keys (reference and MSD)


class VolumeError(ValueError):
    """A volume that cannot be used. The message always starts with the file's path, so logs name the culprit."""

    input_error = True  # a script that ran configurator.configure prints the message without a traceback


# ----------------------------------------------------------------------------------------------------------------
# Reading one file -> (C, H, W, D) float32, spacing (3,), affine (4, 4)


def _suffix(path) -> str:
    name = str(path).lower()
    return next((s for s in VOLUME_SUFFIXES if name.endswith(s)), "")


def _canonical_ornt(affine: np.ndarray, path) -> np.ndarray:
    """nibabel's orientation table that takes the array to the closest RAS+ axes (as nib.as_closest_canonical)."""
    if not np.isfinite(affine).all():
        raise VolumeError(f"{path}: non-finite affine (broken header: no usable qform/sform or pixdim)")
    try:
        return nib.io_orientation(affine)  # rows: (target axis, flip ±1) for each array axis
    except Exception as e:  # a degenerate (singular) affine
        raise VolumeError(f"{path}: cannot orient affine ({e})") from None


def _check_spacing(spacing, path) -> np.ndarray:
    spacing = np.asarray(spacing, dtype=np.float64)
    if spacing.shape != (3,) or not np.isfinite(spacing).all() or (spacing <= 0).any():
        raise VolumeError(f"{path}: non-finite or non-positive voxel spacing {spacing.tolist()}")
    return spacing


def _check_raw_pixdim(img, path, suffix) -> None:
    """nibabel sets a zero pixdim to 1 on load (HD95 in mm would then be wrong without a word): read the header
    as written and refuse a zero or non-finite voxel size (a negative one nibabel reads as its absolute value)."""
    if suffix not in (".nii", ".nii.gz"):
        return
    with nib.openers.ImageOpener(path) as f:
        raw = type(img.header).from_fileobj(f, check=False)["pixdim"][1:4]
    if not (np.isfinite(raw).all() and (raw != 0).all()):
        raise VolumeError(f"{path}: voxel spacing {[float(v) for v in raw]} in the header (pixdim); a zero would "
                          "be read as 1 mm — fix the header")


def load_volume(path, reject_nonfinite: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Read a NIfTI (.nii, .nii.gz), FreeSurfer .mgz or .npy volume as `(x, spacing, affine)`.

    x: (C, H, W, D) float32, C = 1 for a 3D file, C = frames for a 4D file (NIfTI time/channel axis 3; extra
       singleton axes, as in 5D "vector" NIfTIs (X, Y, Z, 1, C), are squeezed). NIfTI/MGZ arrays are reoriented
       to the closest canonical RAS+ orientation (flips/transposes only, no resampling — what
       `nib.as_closest_canonical` does) and `spacing` (header zooms, mm) and `affine` follow the new axis order.
       `.npy` is taken as is — 3D (H, W, D) or channel-first 4D (C, H, W, D), our own layout — with spacing 1
       and an identity affine.
    Voxel values are returned raw: NaN/±Inf stay (preprocessing fills them, `fill_nonfinite`) unless
    `reject_nonfinite`, which raises instead.
    Raises VolumeError (message starts with the path): missing file, unknown suffix, unreadable/corrupt file,
    fewer than 3 spatial axes or a spatial axis of length 1 (a 2D image), more than one non-singleton extra
    axis, non-finite/non-positive spacing or affine.
    """
    path = str(path)
    if not os.path.isfile(path):
        raise VolumeError(f"{path}: file not found")
    suffix = _suffix(path)
    if not suffix:
        raise VolumeError(f"{path}: unsupported file type (expected one of {', '.join(VOLUME_SUFFIXES)})")
    try:
        if suffix == ".npy":
            x = np.load(path, allow_pickle=False)
            if x.ndim == 3:
                x = x[None]
            spacing, affine = np.ones(3), np.eye(4)
        else:
            img = nib.load(path)
            if len(img.shape) < 3:
                raise VolumeError(f"{path}: 2D image, shape {list(img.shape)} (need 3 spatial axes)")
            # zooms of the file as written: a NaN pixdim stays visible here even when the sform is fine
            _check_spacing(img.header.get_zooms()[:3], path)
            _check_raw_pixdim(img, path, suffix)
            ornt = _canonical_ornt(img.affine, path)
            x = np.asarray(img.dataobj, dtype=np.float32)  # applies scl_slope/inter; reads the whole file
            extra = [s for s in x.shape[3:] if s != 1]
            if len(extra) > 1:
                raise VolumeError(f"{path}: {x.ndim}D array {list(x.shape)}; at most one channel/time axis")
            x = x.reshape(x.shape[:3] + (extra[0] if extra else 1,))  # (X, Y, Z, C)
            x = nib.apply_orientation(x, ornt)  # flips/transposes the first 3 axes to RAS+
            x = np.moveaxis(x, 3, 0)  # (H, W, D, C) -> (C, H, W, D)
            affine = img.affine @ nib.orientations.inv_ornt_aff(ornt, img.shape[:3])
            zooms = np.asarray(img.header.get_zooms()[:3], dtype=np.float64)
            spacing = np.empty(3)
            spacing[ornt[:, 0].astype(int)] = zooms  # array axis i becomes canonical axis ornt[i, 0]
    except VolumeError:
        raise
    except Exception as e:  # gzip/zlib errors, truncated files, bad headers, pickled .npy, ...
        raise VolumeError(f"{path}: unreadable ({type(e).__name__}: {e})") from None
    if x.ndim != 4:
        raise VolumeError(f"{path}: {x.ndim}D array {list(x.shape)}; expected (H, W, D) or (C, H, W, D)")
    if min(x.shape[1:]) < 2:
        raise VolumeError(f"{path}: 2D image, spatial shape {list(x.shape[1:])} has an axis of length 1")
    spacing = _check_spacing(spacing, path)
    if reject_nonfinite and not np.isfinite(x).all():
        raise VolumeError(f"{path}: {int((~np.isfinite(x)).sum())} non-finite voxels")
    return np.ascontiguousarray(x, dtype=np.float32), spacing, np.asarray(affine, dtype=np.float64)


def describe_volume(path) -> dict:
    """Header-only `{"image", "shape", "spacing"}` (a pretraining-datalist item) in load_volume's axis order.

    shape is spatial-first like the reference's JSON, `[H, W, D]` or `[H, W, D, C]` for 4D; spacing (3,).
    Reads no voxel data (a .npy is memory-mapped), so listing 100k files is quick.
    """
    path = str(path)
    if not os.path.isfile(path):
        raise VolumeError(f"{path}: file not found")
    suffix = _suffix(path)
    try:
        if suffix == ".npy":
            shape = list(np.load(path, mmap_mode="r", allow_pickle=False).shape)
            shape = shape if len(shape) == 3 else shape[1:] + shape[:1]  # (C, H, W, D) -> [H, W, D, C]
            spacing = np.ones(3)
        elif suffix:
            img = nib.load(path)
            if len(img.shape) < 3:
                raise VolumeError(f"{path}: 2D image, shape {list(img.shape)}")
            _check_raw_pixdim(img, path, suffix)
            ornt = _canonical_ornt(img.affine, path)
            axes = ornt[:, 0].astype(int)
            shape3, zooms = [0, 0, 0], np.empty(3)
            for i, ax in enumerate(axes):
                shape3[ax], zooms[ax] = int(img.shape[i]), float(img.header.get_zooms()[i])
            shape = shape3 + [int(s) for s in img.shape[3:] if s != 1]
            spacing = zooms
        else:
            raise VolumeError(f"{path}: unsupported file type")
    except VolumeError:
        raise
    except Exception as e:
        raise VolumeError(f"{path}: unreadable ({type(e).__name__}: {e})") from None
    if len(shape) < 3 or min(shape[:3]) < 2:
        raise VolumeError(f"{path}: 2D image, shape {shape}")
    return {"image": path, "shape": shape, "spacing": _check_spacing(spacing, path).tolist()}


# ----------------------------------------------------------------------------------------------------------------
# Preprocessing: fill -> percentile scaling -> in-plane axes first -> foreground crop


def fill_nonfinite(x: np.ndarray) -> np.ndarray:
    """Replace NaN and ±Inf by the mean of the finite voxels.

    The reference fills NaN with the nan-mean; ±Inf (e.g. a division by zero in a derived map) would survive it
    and make every percentile, and then the whole volume, NaN. We treat ±Inf as missing too rather than clipping
    it to the largest finite value, which would invent a bright structure. All non-finite -> ValueError.
    """
    finite = np.isfinite(x)
    if finite.all():
        return x
    if not finite.any():
        raise ValueError("no finite voxels")
    x = x.copy()
    x[~finite] = x[finite].mean(dtype=np.float64)
    return x


def normalize_percentile(x: np.ndarray, lo: float = 0.05, hi: float = 99.95) -> np.ndarray:
    """y = clip(2·(x − a)/(b − a) − 1, −1, 1) with a, b the lo-th and hi-th percentiles (percent), float32.

    Degenerate ranges never divide by zero: if a == b (a sparse volume, >99.9% one value) we fall back to the
    min/max range; a constant volume becomes all zeros (MONAI would return x − a − 1; `prepare` rejects such
    volumes before they get here, `is_constant` tells them apart).
    """
    a, b = (float(v) for v in np.percentile(x, [lo, hi]))
    if not b > a:
        a, b = float(x.min()), float(x.max())
        if not b > a:
            return np.zeros(x.shape, dtype=np.float32)
    y = (x.astype(np.float32, copy=False) - a) * (2.0 / (b - a)) - 1.0  # python floats keep float32
    return np.clip(y, -1.0, 1.0, out=y)


def window(x: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """CT window (e.g. (−175, 250) HU for BTCV): [lo, hi] -> [−1, 1], clipped, float32."""
    y = (x.astype(np.float32, copy=False) - float(lo)) * (2.0 / (float(hi) - float(lo))) - 1.0
    return np.clip(y, -1.0, 1.0, out=y)


def is_constant(x: np.ndarray) -> bool:
    return not float(x.max()) > float(x.min())


def inplane_first(x: np.ndarray, spacing, tol: float = 1e-2) -> tuple[np.ndarray, np.ndarray]:
    """Permute the spatial axes so the two with equal spacing come first.

    With spacing (s0, s1, s2) and |si − sj| <= tol meaning "equal": s0≈s1 keep (0, 1, 2); elif s0≈s2 use
    (0, 2, 1); elif s1≈s2 use (1, 2, 0). Isotropic data keeps its order. If no pair matches the reference
    raises (crashing the run); we instead put the pair with the smallest relative difference in-plane.
    x is (C, H, W, D) or (H, W, D); returns the permuted array (a view) and spacing.
    """
    s = np.asarray(spacing, dtype=np.float64)
    orders = {(0, 1): (0, 1, 2), (0, 2): (0, 2, 1), (1, 2): (1, 2, 0)}
    pair = next((p for p in orders if abs(s[p[0]] - s[p[1]]) <= tol), None)
    if pair is None:
        pair = min(orders, key=lambda p: abs(s[p[0]] - s[p[1]]) / max(s[p[0]], s[p[1]]))
    order = orders[pair]
    lead = x.ndim - 3  # 1 for (C, H, W, D), 0 for (H, W, D)
    x = x.transpose(*range(lead), *(lead + o for o in order))
    return x, s[list(order)]


def foreground_box(x: np.ndarray, threshold: float = -1.0) -> tuple[slice, slice, slice]:
    """Bounding box (margin 0) of the voxels > threshold over the last 3 axes (any channel); all if none."""
    mask = x > threshold
    if mask.ndim == 4:
        mask = mask.any(0)
    box = []
    for axis in range(3):
        hit = np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != axis)))
        box.append(slice(int(hit[0]), int(hit[-1]) + 1) if hit.size else slice(0, mask.shape[axis]))
    return tuple(box)


def crop_foreground(x: np.ndarray, threshold: float = -1.0) -> np.ndarray:
    """x cropped to `foreground_box(x, threshold)` ((C, H, W, D) or (H, W, D); a view)."""
    return x[(..., *foreground_box(x, threshold))]


def preprocess(x: np.ndarray, spacing):
    """The cached pretraining preprocessing of one (H, W, D) frame -> (y (h, w, d) float32 in [−1, 1], spacing).

    fill NaN/Inf -> percentile scaling (0.05, 99.95) -> in-plane axes first -> foreground crop (voxels > −1).
    Raises ValueError for a constant frame (nothing to learn; its normalised crop would be empty).
    """
    x = fill_nonfinite(x)
    if is_constant(x):
        raise ValueError("constant volume")
    y, spacing = inplane_first(normalize_percentile(x), spacing)
    return np.ascontiguousarray(crop_foreground(y)), spacing


# ----------------------------------------------------------------------------------------------------------------
# Datalists: the reference's pretraining JSON, the finetuning JSON (and MSD dataset.json), folders and globs


def find_volumes(spec) -> list[str]:
    """All volume files under a folder (recursively), matching a glob (`**` allowed), or a single file; sorted.

    macOS "._" resource-fork files (shipped inside the MSD tarballs) are skipped.
    """
    spec = str(spec)
    if os.path.isdir(spec):
        paths = glob.glob(os.path.join(spec, "**", "*"), recursive=True)
    elif any(c in spec for c in "*?["):
        paths = glob.glob(spec, recursive=True)
    else:
        return [spec]  # a single file (missing ones are reported when loaded)
    return sorted(p for p in paths if _suffix(p) and os.path.isfile(p) and not os.path.basename(p).startswith("._"))


LABEL_DIRS = ("labels", "labelsTr", "labelsTs")  # label-map folders (MSD, nnU-Net): never pretraining images


def skip_label_maps(paths: list[str], spec) -> list[str]:
    """The volumes of `paths` (found under the folder or glob `spec`) that are images: label maps are dropped,
    with one summary line on the `data` logger. A label map is a file below a folder named as in LABEL_DIRS
    (below `spec`'s own folder, so pointing at a label folder itself still reads it) or below the label_dir of a
    dataset.json found beside or above it, or a file that dataset.json lists as a "label". Pretraining on label
    maps would teach the ViT integer masks as if they were scans, and their foreground crop makes most of them
    "too small", which hides the cause."""
    spec = str(spec)
    if os.path.isdir(spec):
        root = Path(spec)
    else:  # a glob: its folder part before the first wildcard
        parts = Path(spec).parts
        root = Path(*parts[: next((i for i, p in enumerate(parts) if any(c in p for c in "*?[")), len(parts))])
    root = root.resolve()
    label_names = {d.lower() for d in LABEL_DIRS}
    label_dirs, label_files = {}, {}  # resolved path -> where it was declared
    folders = {root} | {a for p in paths for a in Path(p).resolve().parents if a.is_relative_to(root)}
    for folder in folders:
        desc = folder / "dataset.json"
        if not desc.is_file():
            continue
        try:
            meta = json.loads(desc.read_text())
        except Exception:
            continue  # an unreadable description says nothing about labels; the folder rules still apply
        if not isinstance(meta, dict):
            continue
        if isinstance(meta.get("label_dir"), str):
            label_dirs[(folder / meta["label_dir"]).resolve()] = f"{meta['label_dir']}/ (label_dir of {desc})"
        alts = [a for a in (meta.get("label_dir"), "labels", "labelsTr") if isinstance(a, str)]
        for split in SPLITS:
            for item in meta.get(split) or []:
                if isinstance(item, dict) and isinstance(item.get("label"), str):
                    label_files[Path(_resolve(item["label"], folder, alts)).resolve()] = f"listed as labels in {desc}"
    images, skipped = [], {}
    for p in paths:
        full = Path(p).resolve()
        rel = full.relative_to(root).parts[:-1] if full.is_relative_to(root) else ()
        why = next((f"{d}/" for d in rel if d.lower() in label_names), None)
        why = why or next((w for d, w in label_dirs.items() if full.is_relative_to(d)), None)
        why = why or label_files.get(full)
        if why:
            skipped[why] = skipped.get(why, 0) + 1
        else:
            images.append(p)
    if skipped:
        where = ", ".join(f"{n} under {w}" if w.endswith("/") or "label_dir" in w else f"{n} {w}"
                          for w, n in skipped.items())
        log.info(f"skipped {sum(skipped.values())} label maps in {spec}: {where} (label maps are never "
                 f"pretrained on)")
    return images


def make_datalist(spec) -> tuple[list[dict], list[tuple[str, str]]]:
    """The reference's pretraining datalist for a folder/glob: ([{"image","shape","spacing"}], [(path, why)]).
    Label maps (`skip_label_maps`) are left out."""
    items, bad = [], []
    for path in skip_label_maps(find_volumes(spec), spec):
        try:
            items.append(describe_volume(path))
        except VolumeError as e:
            bad.append((path, str(e)))
    return items, bad


def pretrain_sources(spec) -> list[dict]:
    """What to pretrain on: a list of `{"image": path, ...}` (optionally "shape"/"spacing") from any of
    a pretraining JSON (list of {"image", "shape", "spacing"}), a finetuning JSON (the images of all splits),
    a folder, a glob, or a list of paths. Multi-channel items (a list of paths) give one source per channel.
    A folder or glob gives its images: label maps (label folders, dataset.json labels) are skipped with a note.
    """
    if isinstance(spec, (list, tuple)):
        return [{"image": str(p)} for p in spec]
    spec = str(spec)
    if spec.lower().endswith(".json") and os.path.isfile(spec):
        try:
            meta = json.loads(Path(spec).read_text())
        except Exception as e:
            raise VolumeError(f"{spec}: not a readable JSON datalist ({e})") from None
        if isinstance(meta, list):  # pretraining JSON; relative paths are relative to the JSON's folder
            root = Path(spec).parent
            out = []
            for n, item in enumerate(meta):
                item = {"image": item} if isinstance(item, str) else dict(item) if isinstance(item, dict) else {}
                if "image" not in item:
                    raise VolumeError(f"{spec}: item {n} has no \"image\" (a pretraining datalist is a list of "
                                      f"paths or {{\"image\": path}})")
                images = item["image"] if isinstance(item["image"], list) else [item["image"]]
                for p in images:
                    out.append({**item, "image": str(root / p)})  # root / absolute == absolute
            return out
        dl = read_datalist(spec)
        out = []
        for split in SPLITS:
            for item in dl[split]:
                images = item["image"] if isinstance(item["image"], list) else [item["image"]]
                out += [{"image": p} for p in images]
        return out
    return [{"image": p} for p in skip_label_maps(find_volumes(spec), spec)]


def _resolve(p, root: Path, alternatives) -> str:
    """Absolute path for a datalist entry; if it does not exist, try its file name in the alternative folders
    (MSD's dataset.json says ./imagesTr/x.nii.gz, redistributions often rename the folder)."""
    full = root / p
    if full.exists():
        return str(full)
    for alt in alternatives:
        cand = root / alt / Path(p).name
        if cand.exists():
            return str(cand)
    return str(full)  # missing: the loader names it


def _pair_folder(root: Path, image_dir=None, label_dir=None) -> dict:
    """Pair images/x with labels/x (same file name) in a folder; no label folder -> unlabeled items."""
    image_dir = image_dir or next((d for d in ("imagesTr", "images") if (root / d).is_dir()), None)
    label_dir = label_dir or next((d for d in ("labelsTr", "labels") if (root / d).is_dir()), None)
    dl = {s: [] for s in SPLITS}
    if image_dir is None:  # just volumes
        dl["training"] = [{"image": p, "label": None} for p in find_volumes(root)]
        return dl
    for p in find_volumes(root / image_dir):
        lab = root / label_dir / Path(p).name if label_dir else None
        dl["training"].append({"image": p, "label": str(lab) if lab is not None and lab.exists() else None})
    if (root / "imagesTs").is_dir():
        dl["test"] = [{"image": p, "label": None} for p in find_volumes(root / "imagesTs")]
    return dl


def read_datalist(path) -> dict:
    """A finetuning datalist as {"training": [...], "validation": [...], "test": [...]} with absolute paths.

    Accepts: the reference's JSON (items {"image": path | [channel paths], "label": path | int, ...}; BraTS-style
    "image1".."image4" keys are merged into an "image" list), an MSD dataset.json (items with "./imagesTr/...",
    "test" as a list of plain paths; a path that is not on disk is looked up by file name in the JSON's
    "image_dir"/"label_dir" or images/, labels/, imagesTr/, labelsTr/), a dataset.json without item lists (pairs
    image_dir/x with label_dir/x), a folder (its dataset.json, else images/ + labels/ pairs, else all volumes),
    or a pretraining JSON list (unlabeled training items). Relative paths are relative to the JSON's folder.
    Every item gets a "label" key (None when unlabeled); other keys (e.g. "age") are kept.
    """
    path = Path(path)
    if path.is_dir():
        if (path / "dataset.json").is_file():
            return read_datalist(path / "dataset.json")
        return _pair_folder(path)
    if not path.is_file():
        raise VolumeError(f"{path}: datalist not found")
    try:
        meta = json.loads(path.read_text())
    except Exception as e:
        raise VolumeError(f"{path}: not a readable JSON datalist ({e})") from None
    root = path.parent
    if isinstance(meta, list):
        meta = {"training": meta}
    if not isinstance(meta, dict):
        raise VolumeError(f"{path}: a datalist is a JSON object or list, got {type(meta).__name__}")
    if not any(s in meta for s in SPLITS):
        lists = [k for k, v in meta.items() if isinstance(v, list)]
        if lists:  # e.g. "train"/"val": item lists under names nobody reads would be silently ignored
            raise VolumeError(f"{path}: item lists under {lists}; a datalist names them {list(SPLITS)}")
        return _pair_folder(root, meta.get("image_dir"), meta.get("label_dir"))  # a bare MSD-style description
    for split in SPLITS:
        if not isinstance(meta.get(split, []), list):
            raise VolumeError(f"{path}: \"{split}\" must be a list of items, got {type(meta[split]).__name__}")
    image_alts = [meta.get("image_dir"), "images", "imagesTr", "imagesTs"]
    label_alts = [meta.get("label_dir"), "labels", "labelsTr"]
    image_alts, label_alts = [a for a in image_alts if a], [a for a in label_alts if a]
    dl = {}
    for split in SPLITS:
        items = []
        for n, item in enumerate(meta.get(split, [])):
            if not isinstance(item, (str, list, dict)):
                raise VolumeError(f"{path}: {split}[{n}] is {item!r}; an item is a path or {{\"image\": ...}}")
            item = {"image": item} if isinstance(item, (str, list)) else dict(item)
            if "image" not in item:  # BraTS: image1..image4
                keys = sorted((k for k in item if k.startswith("image") and k[5:].isdigit()), key=lambda k: int(k[5:]))
                if not keys:
                    raise VolumeError(f"{path}: {split}[{n}] has no \"image\" key (its keys: {sorted(item)}); "
                                      f"items are {{\"image\": path, \"label\": path or int}}")
                item["image"] = [item.pop(k) for k in keys]
            img = item["image"]
            item["image"] = [_resolve(p, root, image_alts) for p in img] if isinstance(img, list) \
                else _resolve(img, root, image_alts)
            lab = item.get("label")
            item["label"] = _resolve(lab, root, label_alts) if isinstance(lab, str) else lab
            items.append(item)
        dl[split] = items
    return dl


# ----------------------------------------------------------------------------------------------------------------
# Finetuning / linear-probe loader: one case -> normalised image (+ label map), optionally resampled


def resample(x: np.ndarray, spacing, target_spacing, affine=None, nearest: bool = False):
    """Resample (C, H, W, D) to `target_spacing` -> (x, spacing, affine).

    Output size n' = max(1, round(n·s/t)) per axis; voxel centres follow torch's align_corners=False grid, so
    the actual new spacing is s·n/n' (within half a voxel of t; we report the actual one). Trilinear for
    images, "nearest-exact" (the same half-voxel grid) for label maps. The affine maps new voxel i to the old
    continuous index i·r + (r − 1)/2, r = n/n', so world coordinates are preserved.
    """
    spacing = np.asarray(spacing, dtype=np.float64)
    n = np.array(x.shape[1:])
    n_new = np.maximum(1, np.round(n * spacing / np.asarray(target_spacing, dtype=np.float64))).astype(int)
    t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))[None]  # (1, C, H, W, D)
    mode = "nearest-exact" if nearest else "trilinear"
    y = F.interpolate(t, size=tuple(int(v) for v in n_new), mode=mode, **({} if nearest else {"align_corners": False}))
    r = n / n_new
    m = np.eye(4)
    m[:3, :3] = np.diag(r)
    m[:3, 3] = (r - 1) / 2
    affine = (np.eye(4) if affine is None else np.asarray(affine, dtype=np.float64)) @ m
    return y[0].numpy(), spacing * r, affine


def load_case(image, label=None, target_spacing=None, ct_window=None, crop_to_foreground: bool = False) -> dict:
    """Load one finetuning case -> dict(image, label, spacing, affine).

    image: a path (3D, or 4D -> C channels) or a list of paths concatenated as channels (BraTS modalities).
        All channels must share the spatial shape and spacing. NaN/±Inf are filled per channel (`fill_nonfinite`).
    label: None; an int (a class label, returned unchanged); or a path to a label map that must be 3D (one
        channel), integer-valued, finite and of the image's spatial shape — errors name both files.
    target_spacing: resample image (trilinear) and label (nearest) to this spacing first.
    ct_window: (lo, hi) -> [−1, 1] clipped (CT); otherwise per-channel percentile scaling (0.05, 99.95).
    crop_to_foreground: crop image and label to the box of image > −1 (any channel); the affine follows.
    Returns image (C, H, W, D) float32 in [−1, 1], label (H, W, D) int64 | int | None, spacing (3,), affine.
    """
    paths = [str(p) for p in image] if isinstance(image, (list, tuple)) else [str(image)]
    name = paths[0] if len(paths) == 1 else f"{paths[0]} (+{len(paths) - 1} channels)"
    chans, spacing, affine = [], None, None
    for p in paths:
        x, sp, aff = load_volume(p)
        if chans and x.shape[1:] != chans[0].shape[1:]:
            raise VolumeError(f"{p}: shape {list(x.shape[1:])} differs from {paths[0]} {list(chans[0].shape[1:])}")
        if spacing is not None and not np.allclose(sp, spacing, rtol=1e-3, atol=1e-4):
            raise VolumeError(f"{p}: spacing {sp.tolist()} differs from {paths[0]} {spacing.tolist()}")
        spacing = sp if spacing is None else spacing
        affine = aff if affine is None else affine
        for c in range(x.shape[0]):
            try:
                chans.append(fill_nonfinite(x[c])[None])
            except ValueError as e:
                raise VolumeError(f"{p}: channel {c}: {e}") from None
    img = np.concatenate(chans, 0)

    lab = label
    if isinstance(label, (str, os.PathLike)):
        lx, _, _ = load_volume(label)
        if lx.shape[0] != 1:
            raise VolumeError(f"{label}: label map has {lx.shape[0]} channels, expected 1 (case {name})")
        lab = lx[0]
        if lab.shape != img.shape[1:]:
            raise VolumeError(f"{label}: label shape {list(lab.shape)} != image shape {list(img.shape[1:])} "
                              f"of {name}")
        if not np.isfinite(lab).all() or not (lab == np.round(lab)).all():
            raise VolumeError(f"{label}: label values must be finite integers (case {name})")
        lab = lab.astype(np.int64)

    if target_spacing is not None:
        img, new_spacing, new_affine = resample(img, spacing, target_spacing, affine)
        if isinstance(lab, np.ndarray):
            lab = resample(lab[None].astype(np.float32), spacing, target_spacing, nearest=True)[0][0]
            lab = np.rint(lab).astype(np.int64)
        spacing, affine = new_spacing, new_affine

    if ct_window is not None:
        img = window(img, *ct_window)
    else:
        img = np.stack([normalize_percentile(c) for c in img])

    if crop_to_foreground:
        box = foreground_box(img, -1.0)
        img = img[(slice(None), *box)]
        lab = lab[box] if isinstance(lab, np.ndarray) else lab
        affine = affine.copy()
        affine[:3, 3] += affine[:3, :3] @ np.array([b.start for b in box], dtype=np.float64)
    return {"image": np.ascontiguousarray(img, dtype=np.float32),
            "label": np.ascontiguousarray(lab) if isinstance(lab, np.ndarray) else lab,
            "spacing": np.asarray(spacing, dtype=np.float64), "affine": affine}


# ----------------------------------------------------------------------------------------------------------------
# Seeds: one integer from a tuple of integers (numpy's SeedSequence hashes them well and never changes)


def mix_seed(*ints: int) -> int:
    """A 63-bit seed from non-negative integers, e.g. (seed, rank, k): neighbouring tuples give unrelated streams."""
    lo, hi = np.random.SeedSequence([int(i) for i in ints]).generate_state(2, np.uint32)
    return (int(hi) << 32 | int(lo)) & (2**63 - 1)


def _generator(*ints: int) -> torch.Generator:
    return torch.Generator().manual_seed(mix_seed(*ints))


# ----------------------------------------------------------------------------------------------------------------
# SyntheticVolumes: seeded phantoms, the default dataset for demos and tests (no files needed)


class SyntheticVolumes(torch.utils.data.Dataset):
    """Procedural 3D "abdomen" phantoms, a pure function of (seed, i), already normalised like prepared data.

    Each volume: background −1 outside a body ellipsoid; body tissue with smooth texture; then
      class 1 "liver"   one large rotated ellipsoid, smooth low-frequency texture;
      class 2 "kidneys" two smaller elongated ellipsoids mirrored across the W axis, grainy texture;
      class 3 "lesion"  (in half of the volumes) 1–3 small spheres inside the liver, darker than it.
    Random positions, sizes, rotations and per-organ intensities; a smooth multiplicative bias field and
    Gaussian noise inside the body; a random global contrast (gamma). Then percentile scaling to [−1, 1] (as
    `prepare` does), so the air is exactly −1 and `crop_foreground` finds the body.
    Each volume has a latent contrast phase (as a CT series does: native, arterial, portal venous, delayed), drawn
    from its own generator, that sets the organs' brightness relative to the body (PHASE_LEVELS): which organ is
    brightest differs between phases, so intensity alone does not tell the classes apart, and volumes differ in a
    property that every crop and augmented view of one volume shares (the signal a DINO teacher can pick up).
    A second latent, the body tissue's texture (TEXTURES: smooth to blotchy), is visible in every crop, local ones
    too. Without them (every phantom "portal", smooth) views of one phantom were no closer than views of
    different phantoms, and every recipe tried stayed at the uniform fixed point (experiments/README.md).
    item: {"image": (1, H, W, D) float32 tensor, "label": (H, W, D) int64 tensor (if with_labels; 0 = air or
    body tissue; later organs overwrite earlier ones), "label_cls": int, "phase" and "texture": ints (indices
    into PHASE_LEVELS, TEXTURES), "spacing": (3,) float64 tensor of ones}.
    label_cls = 1 if the volume has lesions, else 0: a synthetic classification task (linear probe) whose answer
    is a small structure, not the global intensity. ~10–20 ms for 64³ on one core (organs are drawn in their
    bounding boxes only).
    """

    num_classes = 4  # background/body, liver, kidneys, lesion
    class_names = ("background", "liver", "kidneys", "lesion")
    # contrast phase -> (liver, kidneys) mean level; body tissue ~0.3, lesions 0.2-0.4 x the liver's level
    PHASE_LEVELS = {"native": (0.45, 0.38), "arterial": (0.5, 1.0), "portal": (0.92, 0.55), "delayed": (0.15, 0.7)}
    # body-tissue texture -> (amplitude, coarse grid) of an extra smooth-noise field: from smooth to blotchy
    TEXTURES = ((0.0, 4), (0.1, 5), (0.1, 10), (0.1, 16))

    def __init__(self, n: int = 64, shape=(64, 64, 64), seed: int = 0, with_labels: bool = False):
        self.n, self.shape, self.seed, self.with_labels = int(n), tuple(int(s) for s in shape), int(seed), with_labels
        self._axes = [torch.linspace(-1, 1, s) for s in self.shape]  # voxel centres in [−1, 1] per axis

    def __len__(self) -> int:
        return self.n

    @staticmethod
    def _smooth_noise(g, coarse: int, size) -> torch.Tensor:
        """Zero-mean, roughly unit smooth field: coarse³ Gaussian noise upsampled trilinearly to `size`."""
        z = torch.randn(1, 1, coarse, coarse, coarse, generator=g)
        return F.interpolate(z, size=tuple(size), mode="trilinear", align_corners=False)[0, 0]

    def _ellipsoid(self, g, center, radii, rotate: bool = True, sharpness: float = 6.0):
        """Soft indicator of an ellipsoid inside its bounding box -> (box slices, (h, w, d) tensor in [0, 1]).

        soft = clamp(½ + sharpness · (1 − Σ_k (p_k / r_k)²), 0, 1), p = R (x − c), R a random rotation (QR of a
        Gaussian): a linear ramp a few voxels wide (partial volume) that is exactly 0 outside, so air stays air.
        """
        center, radii = torch.as_tensor(center, dtype=torch.float32), torch.as_tensor(radii, dtype=torch.float32)
        reach = float(radii.max()) * 1.25  # covers the rotated ellipsoid and its soft edge
        box, d = [], []
        for ax, c in zip(self._axes, center.tolist()):
            idx = torch.nonzero((ax - c).abs() <= reach).flatten()
            if idx.numel() == 0:
                return None, None
            box.append(slice(int(idx[0]), int(idx[-1]) + 1))
            d.append(ax[box[-1]] - c)
        dx, dy, dz = d[0][:, None, None], d[1][None, :, None], d[2][None, None, :]
        rot = torch.linalg.qr(torch.randn(3, 3, generator=g))[0] if rotate else torch.eye(3)
        dist = sum(((rot[k, 0] * dx + rot[k, 1] * dy + rot[k, 2] * dz) / radii[k]) ** 2 for k in range(3))
        return tuple(box), (0.5 + sharpness * (1 - dist)).clamp(0, 1)

    def __getitem__(self, i: int) -> dict:
        if not 0 <= i < self.n:
            raise IndexError(i)
        g = _generator(self.seed, 0x5EED, i)

        def u(a, b, k=1):  # uniform draws from this volume's generator
            return a + (b - a) * torch.rand(k, generator=g)

        g_latent = _generator(self.seed, 0xFA5E, i)  # the latent draws have their own stream
        phase = int(torch.randint(len(self.PHASE_LEVELS), (1,), generator=g_latent))
        texture = int(torch.randint(len(self.TEXTURES), (1,), generator=g_latent))
        liver_level, kidney_level = list(self.PHASE_LEVELS.values())[phase]
        img = torch.zeros(self.shape)
        label = torch.zeros(self.shape, dtype=torch.int64)
        body_box, body = self._ellipsoid(g, u(-0.05, 0.05, 3), u(0.75, 0.95, 3), rotate=False)
        amp, coarse = self.TEXTURES[texture]
        tissue = 0.3 + 0.05 * self._smooth_noise(g, 4, body.shape)
        if amp:
            tissue = tissue + amp * self._smooth_noise(g_latent, coarse, body.shape)
        img[body_box] = body * tissue.clamp_min(0.05)

        def paint(cls, center, radii, level, texture, rotate=True):
            """Blend one organ into img (partial volume at the soft edge) and claim its voxels in label."""
            box, soft = self._ellipsoid(g, center, radii, rotate)
            if box is None:
                return
            soft = soft * (img[box] > 0)  # organs live inside the body
            amp, coarse = texture  # coarse 0: per-voxel (grainy) noise
            tex = self._smooth_noise(g, coarse, soft.shape) if coarse else torch.randn(soft.shape, generator=g)
            img[box] = img[box] * (1 - soft) + soft * (level + amp * tex).clamp_min(0.02)
            label[box][soft > 0.5] = cls

        c_liver, r_liver = u(-0.2, 0.2, 3), u(0.35, 0.5, 3)
        liver = liver_level + u(-0.075, 0.075)
        paint(1, c_liver, r_liver, liver, (0.05, 6))  # liver: smooth
        c_kid = u(-0.35, 0.35, 3)
        c_kid[1] = u(0.4, 0.55).item()
        r_kid = torch.cat([u(0.12, 0.18), u(0.16, 0.25), u(0.12, 0.18)])
        level = kidney_level + u(-0.05, 0.05)
        for side in (1.0, -1.0):  # kidneys: a mirrored pair along W, grainy (per-voxel noise)
            paint(2, c_kid * torch.tensor([1.0, side, 1.0]), r_kid, level, (0.12, 0))
        label_cls = int(torch.rand(1, generator=g) < 0.5)
        if label_cls:  # lesions: 1-3 dark spheres inside the liver
            level = 2 * liver * u(0.1, 0.2)
            for _ in range(int(torch.randint(1, 4, (1,), generator=g))):
                paint(3, c_liver + u(-0.5, 0.5, 3) * r_liver, [u(0.06, 0.11).item()] * 3, level, (0.03, 4), False)

        # acquisition: bias field, noise (inside the body: the air stays at the minimum), contrast
        inside = img > 0
        img = img * torch.exp(0.15 * self._smooth_noise(g, 3, self.shape))
        img = img + inside * u(0.005, 0.03) * torch.randn(self.shape, generator=g)
        img = torch.where(inside, img.clamp_min(0.01), 0) ** u(0.7, 1.4)  # tissue stays above air; random gamma
        out = {"image": torch.from_numpy(normalize_percentile(img.numpy()))[None], "label_cls": label_cls,
               "phase": phase, "texture": texture, "spacing": torch.ones(3, dtype=torch.float64)}
        if self.with_labels:
            out["label"] = label
        return out


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


def _prepare_one(source: str, out_dir: str, min_axis_size: int) -> tuple[list[dict], list[tuple[str, str]]]:
    """Worker: one source file -> (cache entries, rejected (name, reason)). Never raises for bad data."""
    entries, rejected = [], []
    try:
        x, spacing, _ = load_volume(source)
    except VolumeError as e:
        return entries, [(source, str(e))]  # (source, reason); reasons start with the file's name
    except Exception as e:  # e.g. MemoryError on a huge file: still that file's problem, not the run's
        return entries, [(source, f"{source}: {type(e).__name__}: {e}")]
    stem = os.path.basename(source)
    stem = stem[: -len(_suffix(stem))] if _suffix(stem) else stem
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
      a datalist/folder/glob  -> raw files, loaded and preprocessed per sample (slow: run `prepare`);
      a dataset object         -> items with "image" (1, H, W, D), e.g. SyntheticVolumes(...).
    Volumes with min(shape) <= min_axis_size are dropped (cache/known shapes; reference: strict >).

    Seeding: k is a global sample counter per rank (use StepSampler). Volume choice: the
    position g = k·world_size + rank walks through per-pass permutations of all volumes (pass p = g // n seeded by
    (seed, p)), so within a pass ranks see disjoint volumes and every volume is seen once. Crop boxes (and a 4D
    frame on the raw path) come from a generator seeded by (seed, rank, k). Any worker count, any resume point,
    gives the same samples.
    Small volumes: each axis is virtually padded with −1 to at least `pad_to` voxels (default min_axis_size;
    pad_to=global_crops_size never upsamples a volume); the box is drawn on the padded shape.
    Bad volumes (unreadable, wrong shape, too small on the raw path): a warning naming the file, then another
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
        elif os.path.isfile(os.path.join(str(source), "index.json")):
            self.kind, self.cache_dir = "cache", Path(source)
            index = load_index(source)
            p = index.get("params", {})
            if p.get("dtype", "float16") != "float16":
                raise VolumeError(f"{source}: a {p['dtype']} cache of an older version; re-run "
                                  f"`python data.py prepare`")
            expected = prep_version()
            if index.get("version") != expected:
                log.warning(f"{source}: made by preprocessing version {index.get('version')}, this code writes "
                            f"{expected}; re-run `python data.py prepare`")
            self.entries = [e for e in index["entries"] if min(e["shape"]) > min_axis_size]
            self.names = [str(self.cache_dir / e["file"]) for e in self.entries]
        else:
            self.kind = "raw"
            items = pretrain_sources(source)
            self.entries = [it for it in items if not it.get("shape") or min(it["shape"][:3]) > min_axis_size]
            self.names = [it["image"] for it in self.entries]
            if self.names:
                    warnings.warn(f"PretrainDataset: reading {len(self.entries)} raw volumes on the fly (each sample "
                              f"loads and normalises a whole file); `python data.py prepare` once is much faster")
        if len(self.names) == 0:
            raise ValueError(f"PretrainDataset: no usable volumes in {source!r}")

    def __len__(self) -> int:
        return len(self.names)  # volumes; the sampler (StepSampler) is what makes the stream infinite

    def volume_for(self, k: int) -> int:
        """The volume of sample counter k on this rank (per-pass permutation, ranks strided)."""
        n = len(self.names)
        p, pos = divmod(k * self.world_size + self.rank, n)
        if self._perm_cache is None or self._perm_cache[0] != p:
            self._perm_cache = (p, torch.randperm(n, generator=_generator(self.seed, 0xA55, p)))
        return int(self._perm_cache[1][pos])

    def _open(self, v: int, g: torch.Generator):
        """Volume v -> (spatial shape, (H, W, D) array). For the cache the array is a memory map (nothing read
        yet); mode "c" (copy-on-write: writes, which we never make, would stay private) gives a writable array,
        which torch.from_numpy takes without a warning."""
        if self.kind == "cache":
            e = self.entries[v]
            arr = np.load(self.cache_dir / e["file"], mmap_mode="c", allow_pickle=False)  # header only
            if tuple(arr.shape) != tuple(e["shape"]):
                raise VolumeError(f"{self.names[v]}: shape {list(arr.shape)} != index {e['shape']} (stale cache)")
            return arr.shape, arr
        if self.kind == "dataset":
            x = self.volumes[v]["image"]
            x = np.asarray(x.numpy() if torch.is_tensor(x) else x, dtype=np.float32)
            x = x[0] if x.ndim == 4 else x
        else:  # raw file: load, pick a frame fresh for every sample, preprocess
            x4, spacing, _ = load_volume(self.names[v])
            c = int(torch.randint(x4.shape[0], (1,), generator=g))
            try:
                x, _ = preprocess(x4[c], spacing)
            except ValueError as e:
                raise VolumeError(f"{self.names[v]}: {e}") from None
            if min(x.shape) <= self.min_axis_size:
                raise VolumeError(f"{self.names[v]}: too small after foreground crop, shape {list(x.shape)}")
        if x.ndim != 3:
            raise VolumeError(f"{self.names[v]}: expected a (1, H, W, D) volume, got {list(x.shape)}")
        return x.shape, (x if x.flags.writeable else x.copy())  # torch.from_numpy warns on read-only arrays

    def _read_box(self, shape, arr, box) -> torch.Tensor:
        """The box (h0, w0, d0, ch, cw, cd) of the padded volume as (1, ch, cw, cd) float32: only the in-volume
        part is read, the rest is −1.
        The read is one torch copy_ from the (memory-mapped) array into the output: it converts float16 ->
        float32 vectorised while it reads. numpy's float16 -> float32 cast is ~8× slower and was most of the cost
        of a sample (bench.py augment: 35 of 40 ms for the 10 boxes of a sample)."""
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
        shape, arr = self._open(v, g)
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
                v = int(torch.randint(len(self.names), (1,), generator=_generator(self.seed, self.rank, k, attempt, 1)))
            if v in self._bad:
                continue
            try:
                out = self._crops(v, _generator(self.seed, self.rank, k, attempt))
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
# Segmentation cases: unique names, one case loaded and padded for sliding windows, and the way back to the
# input file's grid (finetune_seg.py)


def case_name(item) -> str:
    """hippocampus_001 for .../hippocampus_001.nii.gz (the first channel's file for multi-channel images)."""
    if "name" in item:
        return item["name"]
    p = item["image"][0] if isinstance(item["image"], list) else item["image"]
    base = os.path.basename(str(p))
    return next((base[: -len(s)] for s in VOLUME_SUFFIXES if base.lower().endswith(s)), base)


def unique_names(items: list) -> None:
    """Give every item a distinct "name" in place (prediction files and results rows are keyed by it): cases whose
    files share a name (in different folders) get their folder's name in front, then a number if still equal."""
    names = [case_name(it) for it in items]
    for k, it in enumerate(items):
        if names.count(names[k]) > 1:
            p = it["image"][0] if isinstance(it["image"], list) else it["image"]
            it["name"] = f"{os.path.basename(os.path.dirname(os.path.abspath(str(p))))}_{names[k]}"
    names = [case_name(it) for it in items]
    for k, it in enumerate(items):
        if names.count(names[k]) > 1:
            it["name"] = f"{names[k]}_{k}"


def prepare_case(item, crop_size: int, target_spacing=None, ct_window=None, crop_foreground: bool = False) -> dict:
    """Load and normalise one case (load_case: RAS orientation, optional resampling, CT window or
    percentile scaling), optionally crop it to the foreground box (image > −1), and pad every axis
    to >= crop_size, centred, with −1 (the normalised background) for the image and 0 for the label.
    Returns name, image (C, H', W', D') float32, label (H', W', D') int16 or None, inner (the slices of the
    unpadded volume), spacing, affine, and what `to_input_grid` needs to undo it all."""
    if isinstance(item["image"], np.ndarray):  # synthetic phantoms: arrays that are already normalised
        img, lab, spacing, affine, source = item["image"], item["label"], np.ones(3), np.eye(4), None
        canon_shape = img.shape[1:]
    else:
        c = load_case(item["image"], item.get("label"), target_spacing=target_spacing, ct_window=ct_window)
        img, lab, spacing, affine = c["image"], c["label"], c["spacing"], c["affine"]
        source = item["image"][0] if isinstance(item["image"], list) else item["image"]
        canon_shape = tuple(describe_volume(source)["shape"][:3])  # RAS grid before resampling
    lab = lab if isinstance(lab, np.ndarray) else None
    box, grid_shape = None, img.shape[1:]
    if crop_foreground:
        box = foreground_box(img, -1.0)
        img = img[(slice(None), *box)]
        lab = lab[box] if lab is not None else None
    shape = img.shape[1:]
    before = [max(crop_size - n, 0) // 2 for n in shape]
    after = [max(crop_size - n, 0) - b for n, b in zip(shape, before)]
    img = np.pad(img, [(0, 0)] + list(zip(before, after)), constant_values=-1.0)
    if lab is not None:
        lab = np.pad(lab.astype(np.int16), list(zip(before, after)), constant_values=0)
    return {"name": case_name(item), "image": np.ascontiguousarray(img, dtype=np.float32), "label": lab,
            "inner": tuple(slice(b, b + n) for b, n in zip(before, shape)), "spacing": np.asarray(spacing),
            "affine": affine, "source": source, "canon_shape": canon_shape, "grid_shape": grid_shape, "fg_box": box,
            "resampled": target_spacing is not None}


def to_input_grid(pred: np.ndarray, case: dict):
    """A prediction on the processed grid (H, W, D) or (H, W, D, R) -> (array on the input file's voxel grid,
    that file's affine): undo the foreground crop (zeros around), the resampling (nearest neighbour) and the
    reorientation to RAS, so the file lies exactly over the input in any viewer."""
    if case["fg_box"] is not None:
        full = np.zeros(tuple(case["grid_shape"]) + pred.shape[3:], pred.dtype)
        full[case["fg_box"]] = pred
        pred = full
    if case["resampled"] and tuple(pred.shape[:3]) != tuple(case["canon_shape"]):
        t = torch.from_numpy(np.ascontiguousarray(np.moveaxis(pred.reshape(pred.shape[:3] + (-1,)), 3, 0)))
        t = F.interpolate(t[None].float(), size=tuple(case["canon_shape"]), mode="nearest-exact")[0]
        pred = np.moveaxis(t.numpy().astype(pred.dtype), 0, 3).reshape(tuple(case["canon_shape"]) + pred.shape[3:])
    if case["source"] is None:
        return pred, case["affine"]
    img = nib.load(case["source"])
    ornt = nib.io_orientation(img.affine)  # how the file's axes were turned into RAS by load_volume
    back = nib.orientations.ornt_transform(nib.orientations.axcodes2ornt("RAS"), ornt)
    return nib.apply_orientation(pred, back), img.affine


# ----------------------------------------------------------------------------------------------------------------
# CLI


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("make-datalist", help="write the pretraining JSON [{image, shape, spacing}] for a folder/glob")
    a.add_argument("dir", help="folder (searched recursively) or glob")
    a.add_argument("--out", required=True, help="output JSON path")
    a = sub.add_parser("prepare", help="preprocess volumes once into a memory-mappable cache")
    a.add_argument("--datalist", required=True, help="datalist JSON (pretraining or finetuning), folder or glob")
    a.add_argument("--out", required=True, help="cache folder (index.json + .npy files)")
    a.add_argument("--min_axis_size", type=int, default=24, help="drop volumes with min(shape) <= this (ref: 24)")
    a.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="parallel processes")
    a.add_argument("--retry", action="store_true", help="retry files rejected by a previous run")
    a = sub.add_parser("show", help="print shape, spacing, orientation and value range of volumes")
    a.add_argument("files", nargs="+")
    args = ap.parse_args()

    if args.cmd == "make-datalist":
        items, bad = make_datalist(args.dir)
        for path, why in bad:
            log.warning(f"make-datalist: skipped {why}")
        # every datalist reader resolves a relative path against the JSON's folder: write paths below that
        # folder relative to it (the pair can move together), all others absolute
        root = Path(args.out).resolve().parent
        for item in items:
            p = Path(item["image"]).resolve()
            item["image"] = str(p.relative_to(root)) if p.is_relative_to(root) else str(p)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(items, indent=1))
        print(f"make-datalist: {len(items)} volumes -> {args.out} ({len(bad)} skipped)")
        sys.exit(0 if items else 1)
    elif args.cmd == "prepare":
        summary = prepare(args.datalist, args.out, min_axis_size=args.min_axis_size, workers=args.workers,
                          retry_rejected=args.retry)
        summary["rejected"] = len(summary["rejected"])  # names went to stderr
        print(json.dumps(summary))
        if not load_index(args.out).get("entries"):
            sys.exit(f"prepare: {args.out} holds no usable volume (see the messages above)")
    elif args.cmd == "show":
        n_bad = 0
        for f in args.files:
            try:
                x, spacing, affine = load_volume(f)
            except VolumeError as e:
                print(e)
                n_bad += 1
                continue
            finite = x[np.isfinite(x)]
            own = "".join(nib.aff2axcodes(nib.load(f).affine)) if _suffix(f) != ".npy" else "none (.npy)"
            value_range = f"[{finite.min():.4g}, {finite.max():.4g}]" if finite.size else "none (no finite voxel)"
            print(f"{f}: (C, H, W, D) = {list(x.shape)} after reorienting to RAS, file orientation {own}, "
                  f"spacing {np.round(spacing, 4).tolist()}, range {value_range}, non-finite voxels "
                  f"{x.size - finite.size}")
            n_bad += finite.size == 0
        sys.exit(1 if n_bad else 0)
