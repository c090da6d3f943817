"""Your own data: a folder of images and masks, more than two classes, and fine-tuning from a trained run."""

import json
import subprocess
import sys

import keras
import numpy as np
import pytest
from conftest import ROOT, TINY, compose
from PIL import Image
from test_train import event_tags

from segnet import config, data, export, predict
from segnet.data import synthetic
from segnet.errors import ConfigError, DatasetError
from segnet.model import fcn, init_from

CLASSES = (("background", (0, 0, 0)), ("road", (255, 0, 255)), ("car", (0, 0, 255)))


def folder_config(root, *overrides):
    return compose(["dataset=folder", f"dataset.root={root}", *overrides]).dataset


def write_folder(root, masks: dict, sizes: dict | None = None):
    """images/<stem>.png (random pixels) and masks/<stem>.png for each stem of masks."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for stem, mask in masks.items():
        h, w = (sizes or {}).get(stem, mask.shape[:2])
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / "images" / f"{stem}.png")
        Image.fromarray(mask).save(root / "masks" / f"{stem}.png")
    return root


# -----------------------------------------------------------------------------
# the class list and the masks: each bad input one error that names the file or key and the fix


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["dataset.classes=[{name:a,colour:[1,2,3]},{name:b,colour:[1,2,3]}]"], "the colour (1, 2, 3) is given to two"),
        (["dataset.classes=[{name:a,colour:[1,2,3]},{name:a,colour:[4,5,6]}]"], "the name a is given to two"),
        (["dataset.ignore_index=1"], "dataset.ignore_index=1 is also the index of class 'road'"),
        (["dataset.masks=colour", "dataset.ignore_colour=[255,0,255]"], "is also the colour of class 'road'"),
        (["trainer.class_weights=[1,2,3]"], "trainer.class_weights: give 2 values, one per class (background, road)"),
        (["dataset.classes=[{name:a,colour:[1,2,3]}]"], "dataset.classes: 1 given, give 2 to 255"),
    ],
)
def test_a_class_list_that_cannot_label_a_mask_is_refused(overrides, message):
    cfg = compose(["dataset=folder", "dataset.root=x", *overrides])
    with pytest.raises(ConfigError, match="^.*" + message.replace("(", r"\(").replace(")", r"\)")):
        config.validate(cfg)


def test_masks_read_as_class_numbers_or_colours(tmp_path):
    index = np.array([[0, 1, 2, 255]], np.uint8)
    write_folder(tmp_path / "index", {"a": index})
    d = folder_config(tmp_path / "index", "dataset.classes=" + classes_override())
    np.testing.assert_array_equal(data.read_mask(tmp_path / "index/masks/a.png", d), [[0, 1, 2, data.IGNORE]])

    colours = np.array([[[0, 0, 0], [255, 0, 255], [0, 0, 255], [9, 9, 9]]], np.uint8)
    write_folder(tmp_path / "colour", {"a": colours})
    d = folder_config(tmp_path / "colour", "dataset.classes=" + classes_override(), "dataset.masks=colour",
                      "dataset.ignore_index=null", "dataset.ignore_colour=[9,9,9]")  # fmt: skip
    np.testing.assert_array_equal(data.read_mask(tmp_path / "colour/masks/a.png", d), [[0, 1, 2, data.IGNORE]])
    palette = Image.fromarray(index, mode="L").convert("P")  # a palette PNG's indices are the classes
    palette.save(tmp_path / "p.png")
    d = folder_config(tmp_path, "dataset.classes=" + classes_override())
    np.testing.assert_array_equal(data.read_mask(tmp_path / "p.png", d), [[0, 1, 2, data.IGNORE]])


def classes_override(classes=CLASSES):
    return "[" + ",".join(f"{{name:{n},colour:[{c[0]},{c[1]},{c[2]}]}}" for n, c in classes) + "]"


def test_bad_folders_and_masks_are_one_error_naming_the_file(tmp_path):
    ok = np.zeros((4, 6), np.uint8)
    root = write_folder(tmp_path / "d", {"a": ok, "b": ok})
    d = folder_config(root)
    assert [s.name for s in data.training_samples(root, d)] == ["a", "b"]

    (root / "masks" / "b.png").unlink()
    with pytest.raises(DatasetError, match=r"images/b.png: no mask .*masks/b.png; add the mask or remove the image"):
        data.training_samples(root, d)
    (root / "images" / "b.png").unlink()
    Image.fromarray(ok).save(root / "masks" / "c.png")
    with pytest.raises(DatasetError, match=r"masks/c.png: a mask without its image .*; add the image or remove"):
        data.training_samples(root, d)
    (root / "masks" / "c.png").unlink()

    bad = ok.copy()
    bad[0, :3], bad[1, :1] = 7, 9
    Image.fromarray(bad).save(root / "masks" / "a.png")
    with pytest.raises(DatasetError, match=r"a.png: 4 pixels have values of no class \(commonest: 7 x3, 9 x1\)"):
        data.load(data.training_samples(root, d), d)
    Image.fromarray(np.zeros((4, 5), np.uint8)).save(root / "masks" / "a.png")
    with pytest.raises(DatasetError, match=r"masks/a.png: the mask is 5x4 but its image .*a.png is 6x4"):
        data.load(data.training_samples(root, d), d)
    Image.fromarray(np.zeros((4, 6, 3), np.uint8)).save(root / "masks" / "a.png")
    with pytest.raises(DatasetError, match=r"a.png: a RGB image, but dataset.masks=index .* set dataset.masks=colour"):
        data.load(data.training_samples(root, d), d)

    (root / "images" / "a.png").unlink()
    (root / "masks" / "a.png").unlink()
    with pytest.raises(DatasetError, match=r"images holds no images .*nothing to train on"):
        data.training_samples(root, d)
    with pytest.raises(DatasetError, match=r"nowhere/images does not exist: the folder layout wants dataset.root"):
        data.training_samples(tmp_path / "nowhere", d)


def test_the_validation_split_takes_the_last_of_each_name_prefix(tmp_path):
    stems = [f"{cat}_{i:03d}" for cat in ("day", "night") for i in range(5)] + ["IMG1", "IMG2"]
    root = write_folder(tmp_path, {s: np.zeros((2, 2), np.uint8) for s in stems})
    d = folder_config(root, "dataset.val_fraction=0.4")
    train, val = data.split_samples(data.training_samples(root, d), d)
    assert [s.name for s in val] == ["IMG2", "day_003", "day_004", "night_003", "night_004"]
    assert len(train) == 7


def test_two_classes_give_the_road_probability_and_counts_of_before():
    """The KITTI path bit for bit: road's probability in the form every earlier version computed it, and
    the training step's confusion matrix holding the road TP, FP, FN it counted."""
    from segnet.train import confusion_counts

    rng = np.random.default_rng(0)
    logits = (rng.standard_normal((3, 17, 29, 2)) * 8).astype("float32")
    road = 1.0 / (1.0 + np.exp(np.clip(logits[..., 0] - logits[..., 1], -80, 80)))
    np.testing.assert_array_equal(predict.probabilities(logits)[..., 1], road)
    labels = rng.choice(np.array([0, 1, data.IGNORE], np.uint8), (3, 17, 29))
    cm = confusion_counts(labels, logits, 2).numpy()
    valid, pred, truth = labels != data.IGNORE, logits.argmax(-1) == 1, labels == 1
    expected = [(pred & truth & valid).sum(), (pred & ~truth & valid).sum(), (~pred & truth & valid).sum()]
    assert [cm[1, 1], cm[0, 1], cm[1, 0]] == expected and cm.sum() == valid.sum()


def test_images_of_mixed_sizes_train_at_train_size_and_predict_at_their_own(tmp_path):
    sizes = {"a": (40, 60), "b": (30, 90), "c": (40, 60)}
    root = write_folder(tmp_path, {s: np.ones(hw, np.uint8) for s, hw in sizes.items()})
    d = folder_config(root, "dataset.train_size=[32,64]")
    samples = data.training_samples(root, d)
    x, y = data.training_set(samples, d)
    assert x.shape == (3, 32, 64, 3) and y.shape == (3, 32, 64) and (y == 1).all()
    scale = data.input_scale([data.image_size(s.image) for s in samples], d)
    model = fcn("fcn8", width=1 / 16, input_scale=scale)
    images = data.load(samples, d)[0]
    assert [p.shape for p in predict.predict(model, images)] == [(*hw, 2) for hw in sizes.values()]


# -----------------------------------------------------------------------------
# model.init


def saved(tmp_path, model, name="m.keras"):
    model.save(tmp_path / name)
    return tmp_path / name


def test_init_loads_every_matching_layer_and_starts_a_new_head_fresh(tmp_path, capsys):
    keras.utils.set_random_seed(0)
    source = fcn("fcn8", width=1 / 16)  # two classes
    new = fcn("fcn8", CLASSES, width=1 / 16)
    before = new.get_layer("upscore8").get_weights()
    loaded, fresh = init_from(new, saved(tmp_path, source))
    assert sorted(fresh) == ["score_fr", "score_pool3", "score_pool4", "upscore2", "upscore8", "upscore_pool4"]
    assert {"block1_conv1", "block5_bn3", "fc6", "fc7"} <= set(loaded)
    for name in ("block1_conv1", "block3_bn2", "fc7"):
        for a, b in zip(new.get_layer(name).get_weights(), source.get_layer(name).get_weights(), strict=True):
            np.testing.assert_array_equal(a, b)
    for a, b in zip(new.get_layer("upscore8").get_weights(), before, strict=True):  # still bilinear, not loaded
        np.testing.assert_array_equal(a, b)
    assert "re-initialised: score_fr" in capsys.readouterr().out

    fcn32 = fcn("fcn32", width=1 / 16)  # a coarser net's encoder into FCN-8s: its skips start fresh
    assert "score_pool4" in init_from(fcn("fcn8", width=1 / 16), saved(tmp_path, fcn32, "32.keras"))[1]


def test_init_from_another_architecture_names_the_layers_that_do_not_match(tmp_path):
    with pytest.raises(ConfigError, match=r"another architecture; 2\d layer\(s\) could not be matched .*block1_conv1"):
        init_from(fcn("fcn8", width=1 / 8), saved(tmp_path, fcn("fcn8", width=1 / 16)))
    with pytest.raises(ConfigError, match=r"fc6 \[\(3, 3, "):
        init_from(fcn("fcn8", width=1 / 16, fc6_kernel=3), saved(tmp_path, fcn("fcn8", width=1 / 16)))
    with pytest.raises(FileNotFoundError, match="nowhere.keras does not exist"):
        init_from(fcn("fcn8", width=1 / 16), tmp_path / "nowhere.keras")


# -----------------------------------------------------------------------------
# six classes end to end: the synthetic scenes as a folder dataset

MULTI = [*TINY, "dataset=synthetic_multiclass", "trainer.epochs=6", "trainer.steps_per_epoch=4"]


@pytest.fixture(scope="module")
def multi(tmp_path_factory):
    from segnet.train import train

    tmp = tmp_path_factory.mktemp("multi")
    cfg = compose([*MULTI, f"dataset.root={tmp / 'data'}", f"outputs={tmp / 'outputs'}"])
    state = train(cfg, tmp / "outputs" / "run")
    return cfg, tmp / "outputs" / "run", state


def chance_miou(cfg) -> float:
    """The mean IoU of predicting the commonest validation class everywhere."""
    root = data.prepare(cfg.dataset)
    _, val = data.split_samples(data.training_samples(root, cfg.dataset), cfg.dataset)
    labels = np.concatenate([lb.ravel() for lb in data.load(val, cfg.dataset)[1]])
    counts = np.bincount(labels[labels != data.IGNORE], minlength=len(cfg.dataset.classes))
    return counts.max() / counts.sum() / (counts > 0).sum()


@pytest.mark.slow
def test_six_classes_train_above_chance_and_log_their_confusion(multi):
    cfg, run_dir, state = multi
    assert [n for n, _ in predict.load(run_dir).classes] == list(synthetic.CLASSES)
    best = json.loads((run_dir / "checkpoints" / "best.json").read_text())
    assert {"miou", "pixel_accuracy", "iou_road", "iou_sky"} <= set(best) and "maxf" not in best
    assert state["best"] == best["miou"] > 1.5 * chance_miou(cfg)
    tags = event_tags(run_dir / "logs" / "validation")
    assert "classes/confusion" in tags["images"] and {"classes/miou", "classes/iou_car"} <= tags["scalars"]


@pytest.mark.slow
def test_evaluate_and_infer_report_and_draw_every_class(multi, tmp_path):
    cfg, run_dir, _ = multi
    overrides = [*MULTI, f"dataset.root={cfg.dataset.root}", f"eval.run={run_dir}", f"hydra.run.dir={tmp_path / 'e'}"]
    out = subprocess.run([sys.executable, str(ROOT / "evaluate.py"), *overrides], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    scores = json.loads((tmp_path / "e" / "scores.json").read_text())
    assert "mean IoU" in out.stdout and "lane_marking" in out.stdout
    best = json.loads((run_dir / "checkpoints" / "best.json").read_text())
    assert scores["classes"]["mIoU"] == pytest.approx(100 * best["miou"], abs=0.05)  # the same frames, same model

    frames = tmp_path / "frames"
    frames.mkdir()
    for (h, w), name in (((64, 96), "a"), ((50, 120), "b")):
        Image.fromarray(np.full((h, w, 3), 120, np.uint8)).save(frames / f"{name}.png")
    cmd = [sys.executable, str(ROOT / "infer.py"), str(frames), "--model", str(run_dir), "--out", str(tmp_path / "o")]
    out = subprocess.run([*cmd, "--write", "mask,overlay,prob"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    palette = {tuple(c) for _, c in data.class_list(cfg.dataset)}
    for (h, w), name in (((64, 96), "a"), ((50, 120), "b")):
        mask = np.asarray(Image.open(tmp_path / "o" / f"{name}_mask.png"))
        assert mask.shape == (h, w, 3) and {tuple(c) for c in mask.reshape(-1, 3)} <= palette
        assert Image.open(tmp_path / "o" / f"{name}_overlay.png").size == (w, h)
        for cls in synthetic.CLASSES:
            assert Image.open(tmp_path / "o" / f"{name}_prob_{cls}.png").size == (w, h)


@pytest.mark.slow
def test_exports_of_a_six_class_model_agree_with_it(multi, tmp_path):
    _, run_dir, _ = multi
    model = predict.load(run_dir, precision="float32")
    batch = np.random.default_rng(0).integers(0, 256, (2, 40, 72, 3), dtype=np.uint8)
    for fmt, name in (("tflite", "m.tflite"), ("onnx", "m.onnx")):
        exported = predict.load(export.export_run(run_dir, fmt, tmp_path / name))
        assert [n for n, _ in exported.classes] == list(synthetic.CLASSES)  # from the file beside it
        got, expected = exported(batch), model(batch)
        assert got.shape == expected.shape == (2, 40, 72, 6)
        np.testing.assert_allclose(got, expected, atol=1e-4)


@pytest.mark.slow
def test_fine_tuning_a_two_class_run_from_the_six_class_one(multi, tmp_path, capsys):
    from segnet.train import train

    _, run_dir, _ = multi
    cfg = compose([*TINY, f"dataset.root={tmp_path / 'syn'}", f"outputs={tmp_path / 'o'}", f"model.init={run_dir}"])
    train(cfg, tmp_path / "o" / "run")
    log = capsys.readouterr().out
    assert f"layers loaded from {run_dir / 'checkpoints' / 'best.keras'}" in log
    assert "(block1_conv1, block1_bn1," in log and "re-initialised: score_fr, upscore2, score_pool4" in log
