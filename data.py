"""
data.py — files in, arrays out: reading volumes, preprocessing, datalists, seeds and segmentation cases.

    python data.py show /data/mri/sub-01_T1w.nii.gz               # shape, spacing, orientation, value range

The pretraining cache that stores `preprocess`'s output once is cache.py (`python cache.py prepare ...`); the
synthetic phantoms are phantoms.py.

Layout (STYLE.md): every array is (C, H, W, D) — the array axes of the file after reorientation to the closest
canonical (RAS+) orientation; after `inplane_first` H and W are the in-plane (equal-spacing) pair and D the
through-plane (slice) axis. A 3D file gives C = 1; a 4D file (time series, multi-channel) gives C = frames.

What differs from the reference, on purpose:
- We reorient to RAS+ (the reference pretrains on raw file order); it only changes which axis is which,
  and `inplane_first` decides the slice axis from the spacing either way.
"""
import argparse
import glob
import json
import logging
import os
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm


class _AboveProgressBars(logging.Handler):
    def emit(self, record):
        tqdm.write(self.format(record), file=sys.stderr)


# The one channel for bad input met while working (a skipped file, a bad cache file) and for the summaries of
# cache.prepare: this logger, whose lines go to stderr above any progress bar (and to any handler a user adds).
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
        ornt = nib.io_orientation(affine)  # rows: (target axis, flip ±1) for each array axis
    except Exception as e:  # a degenerate (singular) affine
        raise VolumeError(f"{path}: cannot orient affine ({e})") from None
    if np.isnan(ornt).any():  # io_orientation marks an array axis with no direction of its own with NaN
        raise VolumeError(f"{path}: singular orientation matrix {np.round(affine[:3, :3], 4).tolist()} (a voxel axis "
                          "of length 0, or two along one line): a broken qform/sform header")
    return ornt


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
        dl = read_datalist(spec)  # a pretraining JSON list reads as its "training" split
        out = []
        for split in SPLITS:
            for item in dl[split]:
                images = item["image"] if isinstance(item["image"], list) else [item["image"]]
                out += [{**item, "image": p} for p in images]  # "shape" (prepare's size filter) is kept
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


def read_datalist(path, root=None) -> dict:
    """A finetuning datalist as {"training": [...], "validation": [...], "test": [...]} with absolute paths.

    Accepts: the reference's JSON (items {"image": path | [channel paths], "label": path | int, ...}; BraTS-style
    "image1".."image4" keys are merged into an "image" list), an MSD dataset.json (items with "./imagesTr/...",
    "test" as a list of plain paths; a path that is not on disk is looked up by file name in the JSON's
    "image_dir"/"label_dir" or images/, labels/, imagesTr/, labelsTr/), a dataset.json without item lists (pairs
    image_dir/x with label_dir/x), a folder (its dataset.json, else images/ + labels/ pairs, else all volumes),
    or a pretraining JSON list (unlabeled training items). Relative paths are relative to `root` (the dataset's
    folder, e.g. a downloaded MSD Task04_Hippocampus), by default to the JSON's folder: a split file that lists
    "imagesTr/x.nii.gz" then serves any copy of the dataset; a folder is its own root (`root` is ignored). Every
    item gets a "label" key (None when unlabeled); other keys (e.g. "age") are kept.
    """
    path = Path(path)
    if path.is_dir():  # a dataset folder is its own root: a config's data_root for its split file does not apply
        root = None
    if root is not None and not Path(root).is_dir():
        raise VolumeError(f"{root}: data_root not found (the dataset folder that {path}'s relative paths "
                          "are under; docs/datasets.md says where to download each dataset)")
    if path.is_dir():
        if (path / "dataset.json").is_file():
            return read_datalist(path / "dataset.json", root)
        return _pair_folder(path)
    if not path.is_file():
        raise VolumeError(f"{path}: datalist not found")
    try:
        meta = json.loads(path.read_text())
    except Exception as e:
        raise VolumeError(f"{path}: not a readable JSON datalist ({e})") from None
    root = Path(root) if root is not None else path.parent
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


def seeded_generator(*ints: int) -> torch.Generator:
    """A torch.Generator seeded by mix_seed(*ints) (crop draws, phantoms)."""
    return torch.Generator().manual_seed(mix_seed(*ints))


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


def cases_in_two_lists(dl: dict) -> list[str]:
    """A warning for each case (same image file, links resolved) listed in two of a datalist's splits: its score
    in the later split is not held out. Items whose image is an array (phantoms) are distinct by construction."""
    seen, warnings = {}, []  # image paths -> the first split that lists them
    for split in SPLITS:
        for item in dl.get(split, []):
            if not isinstance(item["image"], (str, list)):
                continue
            key = tuple(os.path.realpath(p) for p in (item["image"] if isinstance(item["image"], list)
                                                      else [item["image"]]))
            if seen.setdefault(key, split) != split:
                warnings.append(f"warning: case {case_name(item)} ({key[0]}) is in both the {seen[key]} and the "
                                f"{split} list: its {split} score is not held out")
    return warnings


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
    back, affine = file_grid(case["source"], case["affine"])
    return (pred if back is None else nib.apply_orientation(pred, back)), affine


def file_grid(path, canonical_affine: np.ndarray, canonical_shape=None) -> tuple[np.ndarray, np.ndarray]:
    """(back, affine): the orientation transform from load_volume's RAS+ arrays back to the file's own axis
    order (None for .npy, which is not reoriented) and the file's affine. Writing `nib.apply_orientation(a, back)`
    with that affine gives a volume with exactly the input file's shape and affine (checked here when the RAS+
    grid's shape is given: canonical_affine must then be that grid's affine)."""
    if _suffix(path) == ".npy":
        return None, canonical_affine
    img = nib.load(str(path))
    ornt = _canonical_ornt(img.affine, path)  # file axes -> RAS+, what load_volume applied
    back = nib.orientations.ornt_transform(nib.orientations.axcodes2ornt("RAS"), ornt)
    if canonical_shape is not None:
        affine = canonical_affine @ nib.orientations.inv_ornt_aff(back, canonical_shape)
        if not np.allclose(affine, img.affine, atol=1e-4):  # would mean load_volume changed its reorientation
            raise RuntimeError(f"{path}: cannot map the RAS+ grid back to the file's grid")
    return back, img.affine


# ----------------------------------------------------------------------------------------------------------------
# CLI


if __name__ == "__main__":
    import configurator

    sys.excepthook = configurator._excepthook  # input errors (VolumeError) print their message, no traceback
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common = argparse.ArgumentParser(add_help=False)  # options every subcommand takes, after its name
    common.add_argument("--threads", type=int, default=0, help="torch CPU threads; 0 = torch's default (all cores)")
    sub = ap.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("show", parents=[common], help="print shape, spacing, orientation and value range of volumes")
    a.add_argument("files", nargs="+")
    args = ap.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)

    if args.cmd == "show":
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
