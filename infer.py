"""Predict road masks for images, folders or globs with a trained run.

python infer.py image.png                         # newest run under outputs/, writes to outputs/predictions
python infer.py frames/ "more/*.png" --model outputs/2026-11-25/10-00-00 --out preds/
python infer.py data_road/testing/image_2 --kitti-submission submission/    # 8-bit maps, benchmark names
python infer.py data_road/testing/image_2 --kitti-submission submission/ --bev   # the same in bird's-eye view
"""

import argparse
import glob
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp"}
KINDS = ("mask", "overlay", "prob")


def collect(inputs: list[str]) -> list[Path]:
    """Files, folders (their images) and globs, in order, each once."""
    paths = []
    for arg in inputs:
        p = Path(arg)
        if p.is_dir():
            paths += sorted(q for q in p.iterdir() if q.suffix.lower() in IMAGE_SUFFIXES)
        elif p.exists():
            paths.append(p)
        elif matches := sorted(glob.glob(arg)):
            paths += [Path(m) for m in matches]
        else:
            raise FileNotFoundError(f"{arg}: no such file, folder or glob match")
    return list(dict.fromkeys(paths))


def kitti_name(path: Path) -> str:
    """um_000000.png -> um_road_000000.png, the name the benchmark expects for a road probability map."""
    cat, _, idx = path.stem.rpartition("_")
    return f"{cat}_road_{idx}.png"


def bev_homography(image: Path, calib_dir: Path | None, metrics):
    calib = (calib_dir or image.parent.parent / "calib") / f"{image.stem}.txt"
    if not calib.is_file():
        raise FileNotFoundError(f"{calib}: no calib file for {image.name}, which --bev needs; pass --calib DIR")
    return metrics.bev_homography(metrics.read_calib(calib))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("inputs", nargs="+", help="images, folders of images, or globs")
    ap.add_argument("--model", help="run folder or .keras file (default: the newest run under outputs/)")
    ap.add_argument("--out", type=Path, default=Path("outputs/predictions"), help="output folder")
    ap.add_argument("--write", default="mask,overlay", help=f"comma-separated, of {', '.join(KINDS)}")
    ap.add_argument("--threshold", type=float, default=0.5, help="road probability cut for mask and overlay")
    ap.add_argument("--kitti-submission", type=Path, help="also write 8-bit road maps named for the benchmark")
    ap.add_argument("--bev", action="store_true", help="write every output in KITTI's bird's-eye view (needs calib)")
    ap.add_argument("--calib", type=Path, help="folder of KITTI calib files (default: ../calib beside the images)")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--overwrite", action="store_true", help="replace outputs written earlier")
    ap.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    args = ap.parse_args(argv)
    kinds = args.write.split(",") if args.write else []
    if unknown := set(kinds) - set(KINDS):
        ap.error(f"--write {args.write}: unknown {sorted(unknown)}, choose from {', '.join(KINDS)}")

    import numpy as np
    from PIL import Image

    from segnet import data, metrics, predict

    try:
        paths = collect(args.inputs)
        outs = [(args.out, kinds)] + ([(args.kitti_submission, ["kitti"])] if args.kitti_submission else [])
        targets = {}
        for p in paths:
            for folder, ks in outs:
                for k in ks:
                    name = kitti_name(p) if k == "kitti" else f"{p.stem}_{k}.png"
                    targets[(p, k)] = folder / name
        for p in paths:
            if p.parent.resolve() in {folder.resolve() for folder, _ in outs}:
                raise FileExistsError(f"{p}: the output folder is the input folder; choose another --out")
        if not args.overwrite and (old := [t for t in targets.values() if t.exists()]):
            raise FileExistsError(f"{old[0]} exists ({len(old)} outputs would be replaced); pass --overwrite")
        images = [data.read_image(p) for p in paths]
        homographies = [bev_homography(p, args.calib, metrics) for p in paths] if args.bev else None
        model = predict.load(args.model)
    except (data.DatasetError, FileNotFoundError, FileExistsError) as e:
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2

    predict.predict(model, images[:1])  # warm-up: the first call traces the graph
    start = time.perf_counter()
    probs = predict.predict(model, images, args.batch_size)
    seconds = time.perf_counter() - start
    for folder, _ in outs:
        folder.mkdir(parents=True, exist_ok=True)
    for i, (p, image, prob) in enumerate(zip(paths, images, probs, strict=True)):
        road = prob >= args.threshold
        arrays = {
            "mask": (road * 255).astype(np.uint8),
            "overlay": predict.overlay(image, road),
            "prob": metrics.to_uint8_prob(prob),
        }
        arrays["kitti"] = arrays["prob"]
        if args.bev:
            arrays = {k: metrics.to_bev(a, homographies[i]) for k, a in arrays.items()}
        written = []
        for k in [k for _, ks in outs for k in ks]:
            Image.fromarray(arrays[k]).save(targets[(p, k)])
            written.append(str(targets[(p, k)]))
        print(f"{p}: {road.mean():.1%} road -> {', '.join(written)}")
    n = len(images)
    print(f"{n} image(s) in {seconds:.2f} s: {n / seconds:.2f} images/s, {1000 * seconds / n:.0f} ms/image")
    return 0


if __name__ == "__main__":
    sys.exit(main())
