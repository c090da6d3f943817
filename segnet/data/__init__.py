"""Datasets: KITTI's data_road layout (real or synthetic), and a folder of images and masks (your own data).

    <root>/training/image_2/um_000000.png          camera image
    <root>/training/gt_image_2/um_road_000000.png  ground truth: (255,0,255) road, (255,0,0) non-road,
                                                   black outside the evaluation area
    <root>/training/calib/um_000000.txt            camera calibration (bird's-eye view scoring)
    <root>/testing/image_2/...                     test images, no ground truth

Labels are read as the benchmark reads them: valid = red > 0, road = blue > 0 inside it, everything else
IGNORE (the loss and the metrics skip it). Never "not red means road".

    <root>/images/frame_0001.jpg    the folder layout (dataset=folder): any names, .png or .jpg
    <root>/masks/frame_0001.png     the same stem: class numbers 0..N-1 (dataset.masks=index, an ignore value
                                    besides) or the classes' RGB colours (dataset.masks=colour)

Either way a label is an HxW uint8 array of class numbers 0..N-1 (KITTI: 0 non-road, 1 road), IGNORE elsewhere.
"""

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tensorflow as tf
from PIL import Image

from segnet.errors import DatasetError
from segnet.metrics import gt_masks

IGNORE = 255  # label of pixels outside the evaluation area
CATEGORIES = ("um", "umm", "uu")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


@dataclass
class Sample:
    name: str  # "um_000000"
    image: Path
    gt: Path | None
    calib: Path | None

    @property
    def category(self) -> str:
        """The name's prefix ("um" of um_000000, "" of IMG1234): the validation split takes the last of each."""
        return self.name.rpartition("_")[0]


def class_list(d) -> tuple:
    """((name, (r, g, b)), ...) of the dataset config's classes, as segnet.model.fcn takes them."""
    return tuple((str(c.name), tuple(int(v) for v in c.colour)) for c in d.classes)


def training_samples(root, d) -> list[Sample]:
    """The labelled images of the dataset config d, in either layout."""
    if d.layout == "folder":
        return folder_samples(root)
    return list_samples(root, "training", d.categories, d.task)


def folder_samples(root) -> list[Sample]:
    """root/images/<stem>.png|jpg paired with root/masks/<stem>.png; every unpaired file is an error."""
    root = Path(root)
    image_dir, mask_dir = root / "images", root / "masks"
    for folder in (image_dir, mask_dir):
        if not folder.is_dir():
            raise DatasetError(
                f"{folder} does not exist: the folder layout wants dataset.root to hold images/ and masks/ "
                f"(got dataset.root={root}; for KITTI's layout use dataset=kitti)"
            )
    images, masks = {}, {p.stem: p for p in sorted(mask_dir.glob("*.png"))}
    for p in sorted(image_dir.iterdir()):
        if p.suffix.lower() in IMAGE_SUFFIXES:
            if p.stem in images:
                raise DatasetError(f"{p} and {images[p.stem]}: two images of one name; keep one")
            images[p.stem] = p
    if not images:
        raise DatasetError(f"{image_dir} holds no images ({', '.join(IMAGE_SUFFIXES)}); nothing to train on")
    problems = [f"{p}: no mask {mask_dir / p.stem}.png; add the mask or remove the image"
                for stem, p in images.items() if stem not in masks]  # fmt: skip
    problems += [f"{p}: a mask without its image in {image_dir}; add the image or remove the mask"
                 for stem, p in masks.items() if stem not in images]  # fmt: skip
    if problems:
        more = f" ({len(problems) - 1} more like it)" if len(problems) > 1 else ""
        raise DatasetError(problems[0] + more)
    return [Sample(stem, images[stem], masks[stem], None) for stem in sorted(images)]


def list_samples(root, split: str = "training", categories=CATEGORIES, task: str = "road") -> list[Sample]:
    """Every image of the split whose category is selected, with its ground truth and calibration."""
    root = Path(root)
    image_dir = root / split / "image_2"
    if not image_dir.is_dir():
        raise DatasetError(
            f"{image_dir} does not exist: dataset.root must be a KITTI data_road folder holding "
            f"{split}/image_2 (got dataset.root={root})"
        )
    samples = []
    for path in sorted(image_dir.glob("*.png")):
        cat = path.stem.rpartition("_")[0]
        if cat not in categories or (task == "lane" and cat != "um"):
            continue
        gt, calib = gt_path(path, task), root / split / "calib" / f"{path.stem}.txt"
        samples.append(Sample(path.stem, path, gt if gt.exists() else None, calib if calib.exists() else None))
    if not samples:
        raise DatasetError(f"{image_dir} holds no images of categories {list(categories)}")
    if split == "training" and (problems := unpaired(root, task, categories)):
        more = (
            f" ({len(problems) - 1} more: `python -m segnet.data check {root}` lists them)" if len(problems) > 1 else ""
        )
        raise DatasetError(problems[0] + more)
    return samples


def gt_path(image: Path, task: str = "road") -> Path:
    """<root>/training/image_2/um_000000.png -> <root>/training/gt_image_2/um_road_000000.png."""
    cat, _, idx = image.stem.rpartition("_")
    return image.parent.parent / "gt_image_2" / f"{cat}_{task}_{idx}.png"


def unpaired(root, task: str = "road", categories=CATEGORIES, every_mask: bool = False) -> list[str]:
    """Training images without their ground truth and ground truth without its image, one message each.

    every_mask: also masks of other tasks (um_lane_...) and stray files in gt_image_2 must have their image.
    """
    image_dir, gt_dir = Path(root) / "training" / "image_2", Path(root) / "training" / "gt_image_2"
    names = {p.stem for p in image_dir.glob("*.png")}
    problems = []
    for name in sorted(names):
        cat = name.rpartition("_")[0]
        gt = gt_path(image_dir / f"{name}.png", task)
        if cat in categories and (task != "lane" or cat == "um") and not gt.exists():
            problems.append(
                f"{image_dir / name}.png: no ground truth {gt.name} in {gt_dir}; add the mask or remove the image"
            )
    for gt in sorted(gt_dir.glob("*.png" if every_mask else f"*_{task}_*.png")):
        parts = gt.stem.split("_")
        image = image_dir / f"{parts[0]}_{parts[-1]}.png"
        if len(parts) != 3 or (parts[0] in categories or every_mask) and image.stem not in names:
            problems.append(f"{gt}: ground truth without its image {image}; add the image or remove the mask")
    return problems


def split_samples(samples: list[Sample], cfg) -> tuple[list[Sample], list[Sample]]:
    """Deterministic train/validation split: an explicit list, else the last images of each category."""
    if cfg.val_list:
        names = set(Path(cfg.val_list).read_text().split())
        unknown = names - {s.name for s in samples}
        if unknown:
            raise DatasetError(
                f"dataset.val_list={cfg.val_list} names images not in the dataset: {sorted(unknown)[:5]}"
            )
        is_val = lambda s: s.name in names  # noqa: E731
    else:
        val = set()
        for cat in sorted({s.category for s in samples}):
            members = [s.name for s in samples if s.category == cat]
            if cfg.val_fraction is not None:
                n = round(len(members) * cfg.val_fraction)
            else:
                # KITTI's 95-98 per category give the published 16; a small dataset (the 12-per-category
                # sample, a user's own) keeps two thirds for training instead of losing almost all of it.
                n = min(cfg.val_per_category, max(1, len(members) // 3))
            n = min(n, len(members) - 1)  # at least one training image per category
            val.update(members[len(members) - n :] if n > 0 else [])
        is_val = lambda s: s.name in val  # noqa: E731
    return [s for s in samples if not is_val(s)], [s for s in samples if is_val(s)]


def read_image(path) -> np.ndarray:
    """HxWx3 uint8 RGB. Grey, palette and RGBA images are converted; 16-bit ones scaled to 8 bits."""
    try:
        with Image.open(path) as im:
            if im.mode.startswith("I;16") or im.mode == "I":
                grey = (np.asarray(im, dtype=np.uint32) >> 8).clip(0, 255).astype(np.uint8)
                return np.repeat(grey[..., None], 3, axis=-1)
            if im.mode == "F":
                raise DatasetError(f"{path}: a floating-point image; save it as 8-bit RGB PNG")
            return np.asarray(im.convert("RGB"))
    except (OSError, ValueError) as e:
        raise unreadable(path, e) from None


def image_size(path) -> tuple[int, int]:
    """(height, width) from the file's header, without decoding the pixels."""
    try:
        with Image.open(path) as im:
            return im.height, im.width
    except (OSError, ValueError) as e:
        raise unreadable(path, e) from None


def unreadable(path, e) -> DatasetError:
    return DatasetError(f"{path}: not a readable image ({e}); replace or remove the file")


# The benchmark's colour code: road, non-road, outside the evaluation area, road outside it (rare).
GT_COLOURS = {(255, 0, 255), (255, 0, 0), (0, 0, 0), (0, 0, 255)}


def off_code_colours(gt: np.ndarray) -> tuple[int, list]:
    """Pixels of a ground-truth mask outside the KITTI colour code: how many, and the commonest colours."""
    code = (gt[..., 0].astype(np.int32) << 16) | (gt[..., 1].astype(np.int32) << 8) | gt[..., 2]
    allowed = [(r << 16) | (g << 8) | b for r, g, b in GT_COLOURS]
    bad = code[~np.isin(code, allowed)]
    if not bad.size:
        return 0, []
    values, counts = np.unique(bad, return_counts=True)
    top = values[np.argsort(-counts)[:3]]
    return int(bad.size), [(int(v >> 16), int(v >> 8 & 255), int(v & 255)) for v in top]


def read_label(path) -> np.ndarray:
    """HxW uint8: 1 road, 0 non-road, IGNORE outside the evaluation area; refuses colours outside the code."""
    gt = read_image(path)
    n, examples = off_code_colours(gt)
    if n:
        raise DatasetError(
            f"{path}: {n} pixels have colours outside the KITTI code (e.g. {examples}); masks must use only "
            "(255,0,255) road, (255,0,0) non-road and (0,0,0) ignore: save them as PNG and resize them "
            "with nearest-neighbour, never with a smoothing filter or JPEG"
        )
    valid, road = gt_masks(gt)
    return np.where(valid, road.astype(np.uint8), np.uint8(IGNORE))


def read_mask(path, d) -> np.ndarray:
    """HxW uint8 of class numbers and IGNORE from a folder-layout mask; refuses values that are not classes."""
    index = d.masks == "index"
    try:
        with Image.open(path) as im:
            if index and im.mode not in ("L", "P", "I", "I;16"):
                raise DatasetError(
                    f"{path}: a {im.mode} image, but dataset.masks=index wants one channel of class numbers "
                    "(8-bit grey or palette PNG); for masks painted in the classes' colours set dataset.masks=colour"
                )
            pixels = np.asarray(im if index else im.convert("RGB")).astype(np.int64)
    except (OSError, ValueError) as e:
        raise unreadable(path, e) from None
    rgb = lambda c: (c[0] << 16) | (c[1] << 8) | c[2]  # noqa: E731  (one number per colour)
    codes = pixels if index else rgb(np.moveaxis(pixels, -1, 0))
    classes = range(len(d.classes)) if index else [rgb(c.colour) for c in d.classes]
    ignore = d.ignore_index if index else (None if d.ignore_colour is None else rgb(d.ignore_colour))
    lookup = {code: k for k, code in enumerate(classes)} | ({} if ignore is None else {ignore: IGNORE})
    values, inverse, counts = np.unique(codes, return_inverse=True, return_counts=True)
    mapped = np.array([lookup.get(v, -1) for v in values])
    if (mapped < 0).any():
        bad = sorted(zip(counts[mapped < 0], values[mapped < 0], strict=True), reverse=True)
        show = str if index else lambda v: f"({v >> 16},{v >> 8 & 255},{v & 255})"
        key = "ignore_index" if index else "ignore_colour"
        raise DatasetError(
            f"{path}: {sum(c for c, _ in bad)} pixels have {'values' if index else 'colours'} of no class "
            f"(commonest: {', '.join(f'{show(v)} x{c}' for c, v in bad[:3])}); add the class to dataset.classes, "
            f"set dataset.{key}, or save the mask as PNG without smoothing (nearest-neighbour resizing)"
        )
    return mapped[inverse].reshape(codes.shape).astype(np.uint8)


def label_reader(d):
    """path -> label for the dataset config d (None: KITTI's ground truth)."""
    return read_label if d is None or d.layout == "kitti" else lambda path: read_mask(path, d)


def resize(image: np.ndarray, size, label: bool = False) -> np.ndarray:
    """Resize to size=(H, W); labels with nearest neighbour so classes never blend."""
    h, w = size
    if image.shape[:2] == (h, w):
        return image
    resample = Image.NEAREST if label else Image.BILINEAR
    return np.asarray(Image.fromarray(image).resize((w, h), resample))


def load(samples: list[Sample], d=None) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Images and labels at native resolution, with a size check that names the culprit."""
    images, labels = [], []
    read = label_reader(d)
    for s in samples:
        image, label = read_image(s.image), read(s.gt)
        if image.shape[:2] != label.shape:
            raise DatasetError(
                f"{s.gt}: the mask is {label.shape[1]}x{label.shape[0]} but its image {s.image} is "
                f"{image.shape[1]}x{image.shape[0]}; they must be the same size (resize the mask with nearest-neighbour)"
            )
        images.append(image)
        labels.append(label)
    return images, labels


def training_arrays(images, labels, cfg) -> tuple[np.ndarray, np.ndarray]:
    """Decode-and-resize once: stack the training set at the size the pipeline crops from.

    resize mode: every frame scaled to train_size. crop mode: native scale (frames brought to the most
    common native size, a change of at most a few pixels on KITTI), and the pipeline cuts train_size crops.
    """
    if cfg.train_mode == "resize":
        size = tuple(cfg.train_size)
    else:  # crop
        shapes = [im.shape[:2] for im in images]
        size = max(set(shapes), key=shapes.count)
    x = np.stack([resize(im, size) for im in images])
    y = np.stack([resize(lb, size, label=True) for lb in labels])
    return x, y


def training_set(samples: list[Sample], cfg) -> tuple[np.ndarray, np.ndarray]:
    """Training frames and labels, decoded and resized once.

    cache=memory keeps them in RAM. cache=disk writes them to cache_dir as .npy files that this and later
    runs memory-map; the key covers every file's path, size and mtime and the resize settings, so an edited
    dataset is decoded again.
    """
    if cfg.cache == "disk":
        files = [(str(p), p.stat().st_size, p.stat().st_mtime_ns) for s in samples for p in (s.image, s.gt)]
        spec = {"files": files, "mode": str(cfg.train_mode), "size": list(cfg.train_size),
                "labels": [str(cfg.layout), str(cfg.masks), str(cfg.classes), cfg.ignore_index, str(cfg.ignore_colour)]}  # fmt: skip
        folder = Path(cfg.cache_dir) / hashlib.sha1(json.dumps(spec).encode()).hexdigest()[:16]
        if not folder.exists():
            x, y = training_arrays(*load(samples, cfg), cfg)
            tmp = folder.with_name(f"{folder.name}.tmp-{os.getpid()}")
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            np.save(tmp / "x.npy", x)
            np.save(tmp / "y.npy", y)
            try:
                os.replace(tmp, folder)  # appears complete or not at all
            except OSError:  # another process (a second worker) wrote the same cache first
                shutil.rmtree(tmp)
        return np.load(folder / "x.npy", mmap_mode="r"), np.load(folder / "y.npy", mmap_mode="r")
    return training_arrays(*load(samples, cfg), cfg)


def input_scale(sizes, cfg) -> tuple[float, float]:
    """(sy, sx) from native frames of these (height, width) sizes to the scale the network trains at.

    Inference resizes by the same factor, so a model trained on 160x576 resized KITTI frames takes a full frame.
    """
    if cfg.train_mode != "resize":
        return (1.0, 1.0)
    h, w = cfg.train_size
    return (
        round(float(np.mean([h / size[0] for size in sizes])), 6),
        round(float(np.mean([w / size[1] for size in sizes])), 6),
    )


def augment(image, label, seed, train_size, cfg):
    """One training example: random flip, scale, crop (image and label alike), shadows, colour jitter (image only).

    Returns the image, its label and `rows`: each crop row's height as a fraction of the frame it was cut
    from (0 top, 1 bottom; outside [0, 1] on padding), what segnet.model.RowPrior needs to know where the
    frame ends. Stateless ops seeded per example, so a run's augmentation depends only on the config's seed.
    """
    seeds = tf.random.experimental.stateless_split(seed, 7)
    image = tf.image.convert_image_dtype(image, tf.float32)
    label = label[..., None]
    if cfg.flip:
        flip = tf.random.stateless_uniform([], seeds[0]) < 0.5
        image = tf.where(flip, image[:, ::-1], image)
        label = tf.where(flip, label[:, ::-1], label)
    frame_h = tf.shape(image)[0]
    lo, hi = cfg.scale
    if (lo, hi) != (1.0, 1.0):
        s = tf.random.stateless_uniform([], seeds[1], lo, hi)
        new = tf.cast(tf.round(tf.cast(tf.shape(image)[:2], tf.float32) * s), tf.int32)
        image = tf.image.resize(image, new, method="bilinear")
        label = tf.image.resize(label, new, method="nearest")
        frame_h = new[0]
    # Pad (labels with IGNORE, so padding is never learned) then crop to the training size. anchor=bottom
    # keeps the frame's bottom edge at the bottom, where a fixed camera always has it: what lies near the
    # edge (KITTI's ground truth marks the last rows non-road) and the horizon's height stay learnable.
    h, w = train_size
    ph, pw = tf.maximum(h - tf.shape(image)[0], 0), tf.maximum(w - tf.shape(image)[1], 0)
    bottom = cfg.anchor == "bottom"
    top = ph if bottom else 0
    image = tf.pad(image, [[top, ph - top], [0, pw], [0, 0]])
    label = tf.pad(label, [[top, ph - top], [0, pw], [0, 0]], constant_values=IGNORE)
    y_range = tf.shape(image)[0] - h + 1
    y0 = y_range - 1 if bottom else tf.random.stateless_uniform([], seeds[2], 0, y_range, tf.int32)
    x0 = tf.random.stateless_uniform([], seeds[3], 0, tf.shape(image)[1] - w + 1, tf.int32)
    image, label = image[y0 : y0 + h, x0 : x0 + w], label[y0 : y0 + h, x0 : x0 + w]
    rows = (tf.cast(tf.range(h) + y0 - top, tf.float32) + 0.5) / tf.cast(frame_h, tf.float32)
    if cfg.shadow:
        image = cast_shadow(image, tf.random.experimental.stateless_fold_in(seed, 1), cfg.shadow)
    if cfg.brightness:
        image = tf.image.stateless_random_brightness(image, cfg.brightness, seeds[4])
    if cfg.contrast:
        image = tf.image.stateless_random_contrast(image, 1 - cfg.contrast, 1 + cfg.contrast, seeds[5])
    if cfg.saturation:
        image = tf.image.stateless_random_saturation(image, 1 - cfg.saturation, 1 + cfg.saturation, seeds[6])
    if cfg.hue:
        image = tf.image.stateless_random_hue(image, cfg.hue, seeds[6][::-1])
    image = tf.clip_by_value(image, 0.0, 1.0) * 255.0
    image.set_shape([h, w, 3])
    label.set_shape([h, w, 1])
    return image, label[..., 0], rows


def cast_shadow(image, seed, p):
    """With probability p, darken soft-edged random blobs of a [0, 1] image to 30-70% of their brightness.

    Road in shadow is where KITTI models miss most (on the development split, road darker than half the
    frame's road median is 6% of the road and a quarter of the missed road), and global brightness jitter
    does not teach that a dark patch continuing the asphalt is still road. Blobs: coarse uniform noise
    (one value per 32x32 cell, the scale of tree and building shadows here) upsampled bicubically and
    thresholded at a random level, so shadows cover from none to most of the frame. On KITTI it did not
    lower the misses in real shadow (docs/kitti.md, "Cast shadows"), so it is off by default.
    """
    seeds = tf.random.experimental.stateless_split(seed, 4)
    h, w = tf.shape(image)[0], tf.shape(image)[1]
    noise = tf.random.stateless_uniform([1, h // 32 + 2, w // 32 + 2, 1], seeds[0])
    noise = tf.image.resize(noise, [h, w], method="bicubic")[0]
    level = tf.random.stateless_uniform([], seeds[1], 0.4, 0.8)
    mask = tf.clip_by_value((noise - level) * 8.0, 0.0, 1.0)  # soft edges, a few pixels wide
    dark = tf.random.stateless_uniform([], seeds[2], 0.3, 0.7)
    apply = tf.cast(tf.random.stateless_uniform([], seeds[3]) < p, tf.float32)
    return image * (1.0 - apply * mask * (1.0 - dark))


def train_dataset(x: np.ndarray, y: np.ndarray, cfg, batch_size: int, seed: int) -> tf.data.Dataset:
    """Endless shuffled, augmented batches of (float32 RGB in [0, 255], uint8 labels, float32 frame rows)."""
    size = tuple(cfg.train_size)
    if isinstance(x, np.memmap):  # cache=disk: read each frame from the mapped file when it is needed
        ds = tf.data.Dataset.range(len(x)).shuffle(len(x), seed=seed).repeat()
        ds = ds.map(lambda i: tf.numpy_function(lambda i: (x[i], y[i]), [i], (tf.uint8, tf.uint8), stateful=False))
        ds = ds.map(lambda a, b: (tf.ensure_shape(a, x.shape[1:]), tf.ensure_shape(b, y.shape[1:])))
    else:
        ds = tf.data.Dataset.from_tensor_slices((x, y)).shuffle(len(x), seed=seed).repeat()
    seeds = tf.data.Dataset.random(seed=seed).batch(2)
    ds = tf.data.Dataset.zip(ds, seeds).map(
        lambda xy, s: augment(xy[0], xy[1], s, size, cfg.augment), num_parallel_calls=tf.data.AUTOTUNE
    )
    return ds.batch(batch_size, drop_remainder=True).prefetch(tf.data.AUTOTUNE)


def check(root) -> tuple[dict[str, dict[str, int]], list[str]]:
    """Every problem in a data_road folder at once: counts per split and category, and what is wrong.

    Reads every PNG fully (a truncated file fails here, not three hours into training).
    """
    root = Path(root)
    counts, problems = {}, []
    if not (root / "training" / "image_2").is_dir():
        return counts, [f"{root / 'training' / 'image_2'} does not exist: is {root} a data_road folder?"]
    problems += unpaired(root, every_mask=True)
    for split in ("training", "testing"):
        images = {p.stem: p for p in sorted((root / split / "image_2").glob("*.png"))}
        gts = {p.stem: p for p in sorted((root / split / "gt_image_2").glob("*.png"))}
        for name in images:
            cat = name.rpartition("_")[0]
            counts.setdefault(split, {}).setdefault(cat, 0)
            counts[split][cat] += 1
        shapes = {}
        for path in images.values():
            try:
                shapes[path.stem] = read_image(path).shape[:2]
            except DatasetError as e:
                problems.append(str(e))
        for name, path in gts.items():
            try:
                gt = read_image(path)
            except DatasetError as e:
                problems.append(str(e))
                continue
            n, examples = off_code_colours(gt)
            if n:
                problems.append(f"{path}: {n} pixels of colours outside the KITTI code, e.g. {examples}")
            cat, _, idx = name.rpartition("_")
            image_shape = shapes.get(f"{cat.split('_')[0]}_{idx}")
            if image_shape is not None and image_shape != gt.shape[:2]:
                problems.append(
                    f"{path}: {gt.shape[1]}x{gt.shape[0]}, but its image is {image_shape[1]}x{image_shape[0]}"
                )
    return counts, problems


def prepare(cfg) -> Path:
    """The dataset root, generating the synthetic dataset there first when the config asks for it."""
    root = Path(cfg.root)
    if cfg.synthetic is not None:
        from segnet.data import synthetic

        s = cfg.synthetic
        synthetic.generate(root, s.num_train, s.num_test, s.height, s.width, s.seed, layout=str(cfg.layout))
    return root
