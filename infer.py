"""Predict road masks (or class maps) for images, folders, globs and videos with a trained model.

python infer.py image.png                         # newest run under outputs/, writes to outputs/predictions
python infer.py frames/ "more/*.png" --model outputs/2026-11-25/10-00-00 --out preds/
python infer.py drive.mp4                         # an overlay video (pip install -e ".[video]")
python infer.py frames/ --model outputs/.../exports/model.tflite   # any export of segnet.export
python infer.py data_road/testing/image_2 --kitti-submission submission/    # 8-bit maps, benchmark names
python infer.py data_road/testing/image_2 --kitti-submission submission/ --bev   # the same in bird's-eye view

A model of two classes (KITTI's) writes the road mask at a threshold. A model of more classes writes the class
map in the classes' colours (mask), the image with it and a legend (overlay), and with --write prob one 8-bit
probability map per class (<stem>_prob_<class>.png).
"""

import argparse
import glob
import itertools
import sys
import time
from pathlib import Path

from segnet import errors, runs

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp"}
VIDEO_SUFFIXES = {".mp4", ".avi", ".mov", ".mkv", ".webm"}
KINDS = ("mask", "overlay", "prob")
CHUNK = 32  # images read, predicted and written together: memory stays flat on long folders
MAX_SIDE = 2560  # a 4K frame or a 12-megapixel photo is predicted at this size: README, "Reliability"


def collect(inputs: list[str]) -> list[Path]:
    """Files, folders (their images and videos) and globs, in order, each once; a folder or glob with nothing
    to predict is an error, never a silent success that wrote nothing."""
    known = IMAGE_SUFFIXES | VIDEO_SUFFIXES
    paths = []
    for arg in inputs:
        p = Path(arg)
        if p.is_file():
            paths.append(p)
            continue
        if not p.is_dir() and not (matches := sorted(Path(m) for m in glob.glob(arg))):
            raise FileNotFoundError(f"{arg}: no such file, folder or glob match")
        found = sorted(p.iterdir()) if p.is_dir() else matches
        if not (usable := [q for q in found if q.is_file() and q.suffix.lower() in known]):
            raise errors.UserError(
                f"{arg}: {len(found)} entries, none an image or a video ({', '.join(sorted(known))}); nothing to predict"
            )
        paths += usable
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


def imageio():
    try:
        import imageio.v2 as imageio
        import imageio_ffmpeg  # noqa: F401  (the ffmpeg binary imageio reads and writes videos with)
    except ImportError:
        raise errors.MissingExtra("videos", "video") from None
    return imageio


def parse(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("inputs", nargs="+", help="images, videos, folders of them, or globs")
    ap.add_argument("--model", help="run folder, .keras, SavedModel folder, .tflite or .onnx (default: newest run)")
    ap.add_argument("--out", type=Path, default=Path("outputs/predictions"), help="output folder")
    ap.add_argument("--write", default="mask,overlay", help=f"comma-separated, of {', '.join(KINDS)}")
    ap.add_argument("--threshold", type=float, help="road probability cut (default: the run's BestThresh, else 0.5)")
    ap.add_argument("--uncertain", type=float, default=0.0, help="tint pixels this close to the cut amber")
    ap.add_argument("--kitti-submission", type=Path, help="also write 8-bit road maps named for the benchmark")
    ap.add_argument("--bev", action="store_true", help="write every output in KITTI's bird's-eye view (needs calib)")
    ap.add_argument("--calib", type=Path, help="folder of KITTI calib files (default: ../calib beside the images)")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--precision", default="auto", choices=["auto", "float32", "bfloat16"],
                    help=".keras models: auto runs bfloat16 where the CPU has it (exports: float32)")  # fmt: skip
    ap.add_argument("--max-side", type=int, default=MAX_SIDE,
                    help="predict larger images shrunk to this longer side, masks at full size (bounds memory)")  # fmt: skip
    ap.add_argument("--flip", action="store_true", help="average with the mirror image (twice the time)")
    ap.add_argument("--overwrite", action="store_true", help="replace outputs written earlier")
    ap.add_argument("--resume", action="store_true", help="skip inputs whose outputs all exist (after a stop)")
    ap.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    args = ap.parse_args(argv)
    args.kinds = args.write.split(",") if args.write else []
    if unknown := set(args.kinds) - set(KINDS):
        ap.error(f"--write {args.write}: unknown {sorted(unknown)}, choose from {', '.join(KINDS)}")
    return args


def plan(args, images: list[Path], videos: list[Path], classes) -> dict:
    """Every output file, keyed (input, kind); refuses to write into an input folder or over earlier outputs.

    For more than two classes "prob" is one map per class, kinds prob_<class>.

    With --resume, inputs whose outputs all exist are left out (outputs are written whole or not at all), and
    the outputs of a half-done input are written again.
    """
    kinds = args.kinds
    if len(classes) > 2 and "prob" in kinds:
        kinds = [k for k in kinds if k != "prob"] + [f"prob_{name}" for name, _ in classes]
    folders = {args.out: kinds, **({args.kitti_submission: ["kitti"]} if args.kitti_submission else {})}
    for folder, flag in ((args.out, "--out"), (args.kitti_submission, "--kitti-submission")):
        if folder is not None:
            runs.writable_folder(folder, flag)
    targets = {}
    for p in images:
        for folder, kinds in folders.items():
            for k in kinds:
                targets[(p, k)] = folder / (kitti_name(p) if k == "kitti" else f"{p.stem}_{k}.png")
    for p in videos:
        targets[(p, "video")] = args.out / f"{p.stem}_overlay.mp4"
    for p in images + videos:
        if p.parent.resolve() in {folder.resolve() for folder in folders}:
            raise FileExistsError(f"{p}: the output folder is the input folder; choose another --out")
    if args.resume:
        done = {p for p in images + videos if all(t.exists() for (q, _), t in targets.items() if q == p)}
        targets = {key: t for key, t in targets.items() if key[0] not in done}
        print(f"--resume: {len(done)} input(s) already done, {len(images) + len(videos) - len(done)} to go")
    if not (args.overwrite or args.resume) and (old := [t for t in targets.values() if t.exists()]):
        raise FileExistsError(f"{old[0]} exists ({len(old)} outputs would be replaced); pass --overwrite or --resume")
    return targets


class Timer:
    """Predicts and times it; the first call for each image size (it builds the graph) goes before, untimed."""

    def __init__(self, model, batch_size: int, max_side: int, flip: bool = False):
        self.model, self.batch_size, self.max_side, self.flip = model, batch_size, max_side, flip
        self.seconds, self.count, self.warm = 0.0, 0, set()

    def predict(self, images):
        from segnet import predict

        for shape, image in {im.shape: im for im in images if im.shape not in self.warm}.items():
            predict.predict(self.model, [image], max_side=self.max_side, flip=self.flip)
            self.warm.add(shape)
        start = time.perf_counter()
        probs = predict.predict(self.model, images, self.batch_size, self.max_side, self.flip)
        self.seconds, self.count = self.seconds + time.perf_counter() - start, self.count + len(images)
        return probs

    def report(self) -> None:
        if self.count:
            print(f"{self.count} images in {self.seconds:.2f} s (warm-up excluded): "
                  f"{self.count / self.seconds:.2f} images/s, {1000 * self.seconds / self.count:.0f} ms/image")  # fmt: skip


def render(image, prob, threshold: float, uncertain: float, classes):
    """The mask and the overlay. Two classes: road at the threshold (white), tinted over the image with the
    amber band if asked for. More: the argmax in the classes' colours, blended over the image with a legend."""
    from segnet import predict

    if len(classes) == 2:
        road = prob[..., 1] >= threshold
        band = abs(prob[..., 1] - threshold) < uncertain if uncertain else None
        return (road * 255).astype("uint8"), predict.overlay(image, road, uncertain=band)
    colours = predict.colour_map(classes, prob.argmax(-1))
    return colours, legend(predict.blend(image, colours), classes)


def legend(image, classes):
    """Each class's colour and name in a column at the top left (as many as fit the image's height)."""
    import numpy as np
    from PIL import Image, ImageDraw

    im = Image.fromarray(image)
    draw = ImageDraw.Draw(im)
    width = 16 + 6 * max(len(name) for name, _ in classes)
    for k, (name, colour) in enumerate(classes[: max(1, (im.height - 4) // 12)]):
        draw.rectangle([2, 2 + 12 * k, 2 + width, 13 + 12 * k], fill=(0, 0, 0))
        draw.rectangle([4, 4 + 12 * k, 12, 11 + 12 * k], fill=tuple(colour), outline=(255, 255, 255))
        draw.text((15, 2 + 12 * k), name, fill=(255, 255, 255))
    return np.asarray(im)


def predict_images(args, images, targets, timer, threshold, homographies, classes) -> None:
    """Chunk by chunk: read, predict, write every asked-for output; a bad image stops with what is written kept."""
    import keras
    from PIL import Image

    from segnet import data, metrics, predict

    written = [kind for kind in dict.fromkeys(kind for _, kind in targets) if kind != "video"]
    channel = {f"prob_{name}": c for c, (name, _) in enumerate(classes)}  # the class each 8-bit map shows
    if (road := predict.road_index(classes)) is not None:
        channel["prob"] = channel["kitti"] = road
    bar = keras.utils.Progbar(len(images), unit_name="image") if len(images) > 1 else None
    for k in range(0, len(images), CHUNK):
        chunk = images[k : k + CHUNK]
        arrays = [data.read_image(p) for p in chunk]
        for p, image, prob in zip(chunk, arrays, timer.predict(arrays), strict=True):
            mask, over = render(image, prob, threshold, args.uncertain, classes)
            out = {"mask": mask, "overlay": over}
            out = {
                kind: out[kind] if kind in out else metrics.to_uint8_prob(prob[..., channel[kind]]) for kind in written
            }
            if args.bev:
                out = {kind: metrics.to_bev(a, homographies[p]) for kind, a in out.items()}
            for kind in written:  # whole files only: a stop never leaves a truncated PNG under a final name
                runs.save_atomic(targets[(p, kind)], lambda t, a=out[kind]: Image.fromarray(a).save(t, format="PNG"))
            if bar is None:
                share = f"{(mask > 0).mean():.1%} road " if len(classes) == 2 else ""
                print(f"{p}: {share}-> {', '.join(str(targets[(p, kind)]) for kind in written)}")
        if bar is not None:
            bar.add(len(chunk))
    if bar is not None:
        print(f"{len(images)} images -> {args.out}")


def predict_videos(videos, targets, timer, threshold, uncertain, video_io, classes) -> None:
    """Each video into an overlay video, CHUNK frames at a time."""
    import keras
    import numpy as np

    def overlay_video(video, tmp):
        try:
            reader = video_io.get_reader(video)
            fps = reader.get_meta_data().get("fps", 25)
        except Exception as e:  # ffmpeg's own words on an empty, truncated or foreign file
            raise errors.UserError(f"{video}: not a readable video ({errors.first_line(e)})") from None
        bar, frames = keras.utils.Progbar(None, unit_name="frame"), 0
        with reader, video_io.get_writer(tmp, fps=fps) as writer:
            frames_left = iter(reader)  # one iterator: iterating the reader again would start over
            while batch := [np.asarray(f)[..., :3] for f in itertools.islice(frames_left, CHUNK)]:
                for image, prob in zip(batch, timer.predict(batch), strict=True):
                    writer.append_data(render(image, prob, threshold, uncertain, classes)[1])
                bar.add(len(batch))
                frames += len(batch)
            if not frames:
                raise errors.UserError(f"{video}: no frame could be read; is it a video, and complete?")

    for video in [v for v in videos if (v, "video") in targets]:
        runs.save_atomic(targets[(video, "video")], lambda tmp, video=video: overlay_video(video, tmp))
        print(f"\n{video} -> {targets[(video, 'video')]}")


def main(argv=None) -> int:
    args = parse(argv)
    with errors.reported(args.debug):
        from segnet import metrics, predict

        paths = collect(args.inputs)
        videos = [p for p in paths if p.suffix.lower() in VIDEO_SUFFIXES]
        images = [p for p in paths if p not in videos]
        video_io = imageio() if videos else None
        path = runs.model_path(args.model)
        model = predict.load(path, precision=args.precision)
        if args.kitti_submission and predict.road_index(model.classes) is None:
            raise errors.UserError(f"{path}: --kitti-submission needs a class named road; this model has none")
        targets = plan(args, images, videos, model.classes)
        images = [p for p in images if any(key[0] == p for key in targets)]
        homographies = {p: bev_homography(p, args.calib, metrics) for p in images} if args.bev else {}
        threshold = args.threshold if args.threshold is not None else runs.best_threshold(path) or 0.5
        for folder in {t.parent for t in targets.values()}:
            folder.mkdir(parents=True, exist_ok=True)
        print(f"model {path} in {model.precision}, threshold {threshold:.3f}")
        timer = Timer(model, args.batch_size, args.max_side, args.flip)
        predict_images(args, images, targets, timer, threshold, homographies, model.classes)
        predict_videos(videos, targets, timer, threshold, args.uncertain, video_io, model.classes)
        timer.report()
    return 0


if __name__ == "__main__":
    sys.exit(main())
