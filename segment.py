"""
segment.py — apply a finetuned segmenter to new scans: one NIfTI label map per input image, on that file's own
voxel grid and affine (it opens over the scan in 3D Slicer / ITK-SNAP). nanoGPT's sample.py for finetune_seg.py.

    python segment.py --ckpt out/seg/best.pt --input scan.nii.gz --out out/pred              # -> out/pred/scan.nii.gz
    python segment.py --ckpt out/seg/best.pt --input /data/Task04_Hippocampus --out out/pred  # its imagesTs/
    python segment.py --ckpt out/seg/best.pt --input datalist.json --out out/pred --device cpu --threads 4
    python segment.py --ckpt out/seg/best.pt --input scans/ --out out/pred --overlap 0.5 --overwrite

Inputs: a volume file (.nii.gz, .nii, .mgz), a glob, a folder (the volumes in its imagesTs/, else images/,
else imagesTr/, else all volumes below it), or a datalist JSON (every image of every split; labels are ignored).
Multi-channel cases (a list of files per case, BraTS) come through a datalist: {"test": [{"image": [t1, t2, ...]}]}.

best.pt (finetune_seg.py) is self-contained: the architecture, the weights and the run's preprocessing
(adapter.segmenter_from_checkpoint); the pretrained backbone it started from is not needed. Each case takes the
path of finetune_seg.py's test pass: data.prepare_case (reorient to RAS, resample to the run's target_spacing,
CT window or percentile scaling, foreground crop, padding to the window) -> adapter.sliding_window_inference
(the run's window and blending, overlap 0.75 unless --overlap) -> argmax (or sigmoid > 0.5 per region, written
as a 4D file (X, Y, Z, R)) -> data.to_input_grid back to the file's grid. bf16 autocast on CUDA, float32 on CPU.

Input errors (a missing or unreadable file, a checkpoint that is not a segmenter's best.pt, a channel count other
than the run's in_chans, outputs that exist already without --overwrite) are reported before any work, as
`error: ...` without a traceback.
"""
import argparse
import os
import sys
from contextlib import nullcontext

import nibabel as nib
import numpy as np
import torch
from tqdm import tqdm

import adapter
import data


class InputError(ValueError):
    """A bad command line: no volumes found, outputs in the way."""

    input_error = True


def find_inputs(spec: str) -> list[dict]:
    """--input -> datalist items {"image": path | [channel paths]} (see the docstring for what is accepted)."""
    if spec.lower().endswith(".json"):
        dl = data.read_datalist(spec)
        items = [{"image": it["image"]} for split in data.SPLITS for it in dl[split]]
    else:
        if os.path.isdir(spec):
            spec = next((os.path.join(spec, d) for d in ("imagesTs", "images", "imagesTr")
                         if os.path.isdir(os.path.join(spec, d))), spec)
        items = [{"image": p} for p in data.find_volumes(spec)]
    if not items:
        raise InputError(f"{spec}: no volumes found (expected {', '.join(data.VOLUME_SUFFIXES)} files)")
    return items


def count_channels(item: dict) -> int:
    """Header-only: every file of the case is there and readable; its channels (files x 4th axis) in all."""
    paths = item["image"] if isinstance(item["image"], list) else [item["image"]]
    for p in paths:
        if str(p).lower().endswith(".npy"):  # the output needs a file grid and affine to go back to
            raise data.VolumeError(f"{p}: a .npy array has no voxel grid or affine to write a label map on; "
                                   "give the scan as NIfTI (.nii.gz) or .mgz")
    return sum(s[3] if len(s) > 3 else 1 for s in (data.describe_volume(p)["shape"] for p in paths))


def predict(logits, regions, n_out):
    """(1, K, H, W, D) logits -> (H, W, D) class map, or (H, W, D, R) region masks; as finetune_seg.py's."""
    if regions:
        return (logits[0] > 0).permute(1, 2, 3, 0).to(torch.uint8).cpu().numpy()  # (R, ...) -> (..., R)
    return logits[0].argmax(0).to(torch.uint8 if n_out <= 256 else torch.int16).cpu().numpy()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", required=True, help="finetune_seg.py's best.pt")
    ap.add_argument("--input", required=True, help="a volume, glob, folder or datalist JSON")
    ap.add_argument("--out", required=True, help="output folder: <case name>.nii.gz per input image")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu, cuda, cuda:1")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads; 0 = torch's default (all cores)")
    ap.add_argument("--overlap", type=float, default=None,
                    help="sliding-window overlap in [0, 1); default: the run's test_overlap (paper: 0.75). A "
                         "large scan needs ~1/(1-overlap)^3 windows per window volume: 0.5 runs ~1/8 and 0 ~1/64 "
                         "of 0.75's windows")
    ap.add_argument("--sw_batch_size", type=int, default=None, help="windows per forward pass (default: the run's)")
    ap.add_argument("--overwrite", action="store_true", help="replace existing output files")
    args = ap.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise InputError(f"--device {args.device}, but torch sees no CUDA GPU; use --device cpu")
    if args.overlap is not None and not 0 <= args.overlap < 1:
        raise InputError(f"--overlap must be in [0, 1), got {args.overlap}")

    # checks before any work: the inputs' headers, the outputs, the checkpoint, the channel counts
    items = find_inputs(args.input)
    chans = [count_channels(it) for it in items]
    data.unique_names(items)  # one output file per case, even for equal file names in different folders
    outs = [os.path.join(args.out, f"{data.case_name(it)}.nii.gz") for it in items]
    existing = [p for p in outs if os.path.exists(p)]
    if existing and not args.overwrite:
        raise InputError(f"{len(existing)} output(s) exist already ({', '.join(existing[:3])}"
                         f"{' ...' if len(existing) > 3 else ''}); pass --overwrite to replace them, or another --out")
    net, meta = adapter.segmenter_from_checkpoint(args.ckpt)
    for it, c in zip(items, chans):
        if c != meta["in_chans"]:
            p = it["image"][0] if isinstance(it["image"], list) else it["image"]
            raise data.VolumeError(f"{p}: {c} channel(s); the segmenter was trained on in_chans={meta['in_chans']} "
                                   "(give a multi-channel case as a list of files in a datalist)")
    os.makedirs(args.out, exist_ok=True)

    device = torch.device(args.device)
    net = net.to(device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    overlap = meta["test_overlap"] if args.overlap is None else args.overlap
    sw_batch_size = args.sw_batch_size or meta["sw_batch_size"]
    print(f"{args.ckpt}: {meta['head']} on a ViT (embed_dim {meta['vit_args']['embed_dim']}, depth "
          f"{meta['vit_args']['depth']}), {meta['n_out']} outputs; {len(items)} case(s) -> {args.out}, window "
          f"{meta['crop_size']}, overlap {overlap}, {args.device}")
    for it, out in zip(tqdm(items, desc="segment", unit="case"), outs):
        case = data.prepare_case({"image": it["image"], "name": data.case_name(it)}, meta["crop_size"],
                                 meta["target_spacing"], meta["ct_window"], meta["crop_foreground"])
        x = torch.from_numpy(case["image"])[None].to(device)  # (1, C, H, W, D)
        with torch.no_grad(), autocast:
            logits = adapter.sliding_window_inference(x, meta["crop_size"], net, overlap, meta["blend"],
                                                      sw_batch_size, progress=True)
        pred = predict(logits, meta["regions"], meta["n_out"])[case["inner"]]  # padding cropped away
        arr, affine = data.to_input_grid(pred, case)
        tmp = os.path.join(args.out, f".{case['name']}.tmp.nii.gz")  # a killed run leaves no half-written file
        nib.save(nib.Nifti1Image(arr, affine), tmp)
        os.replace(tmp, out)
        tqdm.write(f"wrote {out} {list(arr.shape)}, labels {np.unique(arr).tolist()[:8]}")
    return outs


if __name__ == "__main__":
    try:
        main()
    except Exception as e:
        if not getattr(e, "input_error", False):
            raise
        print(f"error: {e}", file=sys.stderr)  # the message names the file and the problem; a traceback buries it
        sys.exit(1)
