from types import SimpleNamespace

import numpy as np
import pytest
import tensorflow as tf
from conftest import augment_config, augment_overrides, dataset_config
from PIL import Image

from segnet import data


def write(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def test_labels_are_read_as_the_benchmark_reads_them(tmp_path):
    """valid = red > 0, road = blue > 0; black and (0,0,255) are ignored, never "not red means road"."""
    gt = np.array([[[255, 0, 255], [255, 0, 0], [0, 0, 0], [0, 0, 255]]], dtype=np.uint8)
    write(tmp_path / "gt.png", gt)
    np.testing.assert_array_equal(data.read_label(tmp_path / "gt.png"), [[1, 0, data.IGNORE, data.IGNORE]])


def test_real_masks_map_colour_counts_to_label_counts(kitti_sample):
    for path in sorted((kitti_sample / "training" / "gt_image_2").glob("*_road_*.png"))[::6]:
        rgb = np.asarray(Image.open(path).convert("RGB")).reshape(-1, 3)
        label = data.read_label(path).ravel()
        colours, counts = np.unique(rgb, axis=0, return_counts=True)
        n = {tuple(c): k for c, k in zip(colours.tolist(), counts, strict=True)}
        assert (label == 1).sum() == n.get((255, 0, 255), 0)
        assert (label == 0).sum() == n.get((255, 0, 0), 0)
        assert (label == data.IGNORE).sum() == n.get((0, 0, 0), 0) + n.get((0, 0, 255), 0)
        assert set(n) <= {(255, 0, 255), (255, 0, 0), (0, 0, 0), (0, 0, 255)}


def fake_samples(counts):
    return [data.Sample(f"{cat}_{i:06d}", None, None, None) for cat, n in counts.items() for i in range(n)]


def test_default_split_is_the_last_16_of_each_category():
    samples = fake_samples({"um": 95, "umm": 96, "uu": 98})
    train, val = data.split_samples(samples, dataset_config())
    names = {s.name for s in val}
    assert len(train) == 241 and len(val) == 48
    assert {f"um_{i:06d}" for i in range(79, 95)} <= names
    assert {f"umm_{i:06d}" for i in range(80, 96)} <= names
    assert {f"uu_{i:06d}" for i in range(82, 98)} <= names


def test_split_fraction_list_and_small_datasets(tmp_path):
    samples = fake_samples({"um": 10, "uu": 3})
    _, val = data.split_samples(samples, dataset_config("dataset.val_fraction=0.2"))
    assert [s.name for s in val] == ["um_000008", "um_000009", "uu_000002"]
    _, val = data.split_samples(samples, dataset_config())  # 16 per category, but at most a third
    assert [s.name for s in val] == ["um_000007", "um_000008", "um_000009", "uu_000002"]
    (tmp_path / "val.txt").write_text("um_000001\nuu_000000\n")
    train, val = data.split_samples(samples, dataset_config(f"dataset.val_list={tmp_path / 'val.txt'}"))
    assert [s.name for s in val] == ["um_000001", "uu_000000"] and len(train) == 11
    (tmp_path / "bad.txt").write_text("um_000099\n")
    with pytest.raises(data.DatasetError, match="um_000099"):
        data.split_samples(samples, dataset_config(f"dataset.val_list={tmp_path / 'bad.txt'}"))


def test_missing_ground_truth_names_the_file(tmp_path):
    write(tmp_path / "training/image_2/um_000003.png", np.zeros((4, 4, 3), np.uint8))
    with pytest.raises(data.DatasetError, match="um_road_000003.png"):
        data.list_samples(tmp_path)
    with pytest.raises(data.DatasetError, match="dataset.root"):
        data.list_samples(tmp_path / "nowhere")
    (tmp_path / "empty" / "training" / "image_2").mkdir(parents=True)
    with pytest.raises(data.DatasetError, match="image_2 holds no images"):
        data.list_samples(tmp_path / "empty")


def aligned_pair(h=40, w=64):
    """An image whose red channel encodes its label, so alignment can be checked after augmentation."""
    rng = np.random.default_rng(0)
    label = (rng.uniform(size=(h // 8, w // 8)) > 0.5).repeat(8, 0).repeat(8, 1).astype(np.uint8)
    image = np.zeros((h, w, 3), np.uint8)
    image[..., 0] = label * 200 + 20
    image[..., 1] = np.arange(w, dtype=np.uint8)[None] * 3  # an asymmetric pattern, so a flip is visible
    return image, label


def run_augment(image, label, aug, seed, size):
    return [t.numpy() for t in data.augment(image, label, tf.constant(seed, tf.int64), size, aug)[:2]]


def test_flip_and_crop_keep_image_and_label_aligned_pixel_for_pixel():
    image, label = aligned_pair()
    aug = augment_config("flip=true")
    flipped = 0
    for seed in range(8):
        x, y = run_augment(image, label, aug, [seed, 1], (32, 48))
        assert x.shape == (32, 48, 3) and y.shape == (32, 48)
        np.testing.assert_array_equal((x[..., 0] > 110).astype(np.uint8), y)
        flipped += x[0, 0, 1] > x[0, -1, 1]
    assert 0 < flipped < 8  # both outcomes happen


def test_scale_keeps_alignment_and_pads_with_ignore():
    image, label = aligned_pair()
    aug = augment_config("scale=[0.5,0.7]")
    x, y = run_augment(image, label, aug, [3, 4], (40, 64))
    inside = y != data.IGNORE
    assert 0 < inside.mean() < 0.6  # scaled down: the rest is padding, ignored
    agree = ((x[..., 0] > 110) == (y == 1))[inside].mean()
    assert agree > 0.97  # bilinear image vs nearest label differ only on block edges


def test_bottom_anchor_keeps_the_frames_bottom_edge_at_the_bottom():
    """anchor=bottom: a scaled-up frame is cropped from its bottom, a scaled-down one padded above."""
    image, label = aligned_pair()
    label[:] = 0
    label[-8:] = 1  # the bottom 8 rows: 12 after scaling by 1.5
    image[..., 0] = label * 200 + 20
    ups = {tuple(run_augment(image, label, augment_config("scale=[1.5,1.5]", f"anchor={a}"), [s, 2], (40, 64))[1][:, 0])
           for a in ("bottom", "random") for s in range(6)}  # fmt: skip
    bottom = run_augment(image, label, augment_config("scale=[1.5,1.5]", "anchor=bottom"), [0, 2], (40, 64))[1]
    assert (bottom[-12:] == 1).all() and (bottom[:-12] == 0).all()
    assert len(ups) > 1  # random crops land elsewhere
    x, y = run_augment(image, label, augment_config("scale=[0.5,0.5]", "anchor=bottom"), [0, 2], (40, 64))
    assert (y[:20] == data.IGNORE).all() and (y[20:, :32] != data.IGNORE).all() and (y[-4:, :32] == 1).all()
    np.testing.assert_array_equal((x[20:, :32, 0] > 110), y[20:, :32] == 1)


def test_rows_tell_each_crop_row_its_height_in_the_frame():
    """Whatever the flip, scale and crop, `rows` is the row's place in its frame (segnet.model.RowPrior):
    a label that numbers the frame's rows comes out of the crop where rows says; padding lies outside [0, 1]."""
    h = 50
    label = np.repeat(np.arange(h, dtype=np.uint8)[:, None], 80, axis=1)
    image = np.zeros((h, 80, 3), np.uint8)
    for anchor in ("random", "bottom"):
        aug = augment_config("flip=true", "scale=[0.5,1.6]", f"anchor={anchor}")
        for seed in range(12):
            _, y, rows = (
                t.numpy() for t in data.augment(image, label, tf.constant([seed, 3], tf.int64), (40, 64), aug)
            )
            row = y[:, 0].astype(float)
            valid = row != data.IGNORE
            assert np.abs(rows[valid] * h - (row[valid] + 0.5)).max() <= 1.0  # nearest-neighbour labels
            assert ((rows[~valid] > 1) | (rows[~valid] < 0)).all()


def test_colour_jitter_changes_the_image_not_the_label():
    image, label = aligned_pair()
    aug = augment_config("brightness=0.2", "contrast=0.2", "saturation=0.2", "hue=0.05")
    x, y = run_augment(image, label, aug, [5, 6], (40, 64))
    np.testing.assert_array_equal(y, label)
    assert np.abs(x - image).mean() > 1.0


def test_shadows_darken_parts_of_the_image_and_leave_the_label():
    """shadow=1: soft blobs of varying extent and strength, never below 30% brightness, grey stays grey;
    the label is untouched, and shadow=0 leaves the image as it was."""
    image = np.full((64, 192, 3), 200, np.uint8)
    label = np.ones((64, 192), np.uint8)
    darkest, covered = [], []
    for s in range(6):
        x, y = run_augment(image, label, augment_config("shadow=1.0"), [s, 7], (64, 192))
        np.testing.assert_array_equal(y, label)
        ratio = x[..., 0] / 200.0
        assert np.allclose(x[..., 0], x[..., 2]) and ratio.max() <= 1 + 1e-6
        assert ratio.min() >= 0.3 - 1e-6
        darkest.append(ratio.min())
        covered.append((ratio < 0.999).mean())
    assert max(covered) > 0.05 and min(covered) < max(covered)  # shadows happen, of different extents
    assert min(darkest) < 0.6 and max(darkest) > min(darkest)  # of different strengths
    off = run_augment(image, label, augment_config("shadow=0.0"), [0, 7], (64, 192))[0]
    np.testing.assert_allclose(off, 200, atol=1e-3)


def test_training_arrays_resize_and_crop_modes():
    images = [np.zeros((30, 50, 3), np.uint8), np.zeros((30, 50, 3), np.uint8), np.zeros((31, 49, 3), np.uint8)]
    labels = [np.zeros(im.shape[:2], np.uint8) for im in images]
    x, y = data.training_arrays(images, labels, SimpleNamespace(train_mode="resize", train_size=[16, 32]))
    assert x.shape == (3, 16, 32, 3) and y.shape == (3, 16, 32)
    x, y = data.training_arrays(images, labels, SimpleNamespace(train_mode="crop", train_size=[16, 32]))
    assert x.shape == (3, 30, 50, 3)  # the most common native size


def test_train_dataset_is_deterministic_from_the_seed():
    image, label = aligned_pair()
    x, y = np.stack([image] * 4), np.stack([label] * 4)
    cfg = dataset_config(
        "dataset.train_size=[32,48]", *augment_overrides("flip=true", "scale=[0.8,1.2]", "brightness=0.1")
    )
    a = next(iter(data.train_dataset(x, y, cfg, 2, seed=7)))
    b = next(iter(data.train_dataset(x, y, cfg, 2, seed=7)))
    c = next(iter(data.train_dataset(x, y, cfg, 2, seed=8)))
    np.testing.assert_array_equal(a[0].numpy(), b[0].numpy())
    assert not np.array_equal(a[0].numpy(), c[0].numpy())
    assert a[0].shape == (2, 32, 48, 3) and a[1].dtype == tf.uint8


def test_input_scale_follows_the_training_resize():
    sizes = [(375, 1242), (370, 1226)]
    sy, sx = data.input_scale(sizes, dataset_config("dataset.train_size=[160,576]"))
    assert sy == pytest.approx((160 / 375 + 160 / 370) / 2, abs=1e-6)
    assert sx == pytest.approx((576 / 1242 + 576 / 1226) / 2, abs=1e-6)
    assert data.input_scale(sizes, dataset_config("dataset.train_mode=crop")) == (1.0, 1.0)


def test_grey_rgba_and_16_bit_images_are_converted(tmp_path):
    grey = np.arange(48, dtype=np.uint8).reshape(6, 8)
    Image.fromarray(grey).save(tmp_path / "grey.png")
    Image.fromarray(np.dstack([grey, grey, grey, np.full_like(grey, 7)])).save(tmp_path / "rgba.png")
    Image.fromarray(grey.astype(np.uint16) * 257).save(tmp_path / "deep.png")  # 16-bit, same brightness
    for name in ("grey.png", "rgba.png", "deep.png"):
        image = data.read_image(tmp_path / name)
        assert image.shape == (6, 8, 3) and image.dtype == np.uint8, name
        np.testing.assert_array_equal(image[..., 1], grey)
    Image.fromarray(grey.astype(np.float32)).save(tmp_path / "float.tiff")
    with pytest.raises(data.DatasetError, match="float.tiff.*8-bit RGB"):
        data.read_image(tmp_path / "float.tiff")


@pytest.mark.parametrize("content", [b"not an image at all", b"\x89PNG\r\n\x1a\n\x00\x00"])
def test_a_broken_png_is_one_error_naming_the_file(tmp_path, content):
    (tmp_path / "um_000000.png").write_bytes(content)
    with pytest.raises(data.DatasetError, match="um_000000.png: not a readable image.*replace or remove"):
        data.read_image(tmp_path / "um_000000.png")


def test_masks_with_colours_outside_the_code_are_refused(tmp_path):
    gt = np.zeros((4, 4, 3), np.uint8)
    gt[:2] = (255, 0, 255)
    gt[0, 0] = (250, 3, 251)  # a JPEG or smoothing artefact
    write(tmp_path / "um_road_000000.png", gt)
    with pytest.raises(data.DatasetError, match=r"1 pixels have colours outside the KITTI code.*nearest-neighbour"):
        data.read_label(tmp_path / "um_road_000000.png")


def test_ground_truth_without_its_image_is_one_error(tmp_path):
    write(tmp_path / "training/image_2/um_000000.png", np.zeros((4, 4, 3), np.uint8))
    write(tmp_path / "training/gt_image_2/um_road_000000.png", np.zeros((4, 4, 3), np.uint8))
    write(tmp_path / "training/gt_image_2/um_road_000001.png", np.zeros((4, 4, 3), np.uint8))
    with pytest.raises(data.DatasetError, match="um_road_000001.png: ground truth without its image"):
        data.list_samples(tmp_path)


def test_ground_truth_of_another_size_than_its_image_is_one_error(tmp_path):
    write(tmp_path / "training/image_2/um_000000.png", np.zeros((4, 6, 3), np.uint8))
    write(tmp_path / "training/gt_image_2/um_road_000000.png", np.zeros((4, 5, 3), np.uint8))
    with pytest.raises(data.DatasetError, match=r"um_road_000000.png: the mask is 5x4 but its image .* is 6x4"):
        data.load(data.list_samples(tmp_path))


def test_disk_cache_gives_the_same_batches_and_is_reused_until_the_data_change(tmp_path):
    for i in range(4):
        image = np.random.default_rng(i).integers(0, 255, (20, 30, 3), dtype=np.uint8)
        write(tmp_path / f"training/image_2/um_{i:06d}.png", image)
        write(tmp_path / f"training/gt_image_2/um_road_{i:06d}.png", np.full((20, 30, 3), (255, 0, 255), np.uint8))
    samples = data.list_samples(tmp_path)
    memory = dataset_config("dataset.train_size=[16,24]", "dataset.cache=memory")
    disk = dataset_config("dataset.train_size=[16,24]", "dataset.cache=disk", f"dataset.cache_dir={tmp_path / 'cache'}")
    xm, ym = data.training_set(samples, memory)
    xd, yd = data.training_set(samples, disk)
    assert isinstance(xd, np.memmap)
    np.testing.assert_array_equal(xd, xm)
    a = next(iter(data.train_dataset(xm, ym, memory, 2, seed=3)))
    b = next(iter(data.train_dataset(xd, yd, disk, 2, seed=3)))
    for u, v in zip(a, b, strict=True):
        np.testing.assert_array_equal(u.numpy(), v.numpy())

    (folder,) = (tmp_path / "cache").iterdir()
    stamp = (folder / "x.npy").stat().st_mtime_ns
    data.training_set(samples, disk)
    assert (folder / "x.npy").stat().st_mtime_ns == stamp  # reused
    write(tmp_path / "training/image_2/um_000001.png", np.zeros((20, 30, 3), np.uint8))
    data.training_set(data.list_samples(tmp_path), disk)
    assert len(list((tmp_path / "cache").iterdir())) == 2  # an edited image means a new cache
