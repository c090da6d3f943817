import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from conftest import ROOT, TINY, compose

from segnet import data
from segnet.config import validate
from segnet.errors import ConfigError
from segnet.train import train


def event_tags(log_dir: Path) -> dict[str, set[str]]:
    """{'scalars': {...}, 'images': {...}} as TensorBoard would show them."""
    tags = {"scalars": set(), "images": set()}
    for f in log_dir.glob("events.out.tfevents.*"):
        for e in tf.compat.v1.train.summary_iterator(str(f)):
            for v in e.summary.value:
                kind = v.metadata.plugin_data.plugin_name
                tags.setdefault(kind if kind in ("images", "pr_curves") else "scalars", set()).add(v.tag)
    return tags


def test_training_writes_checkpoints_and_state(run):
    _, run_dir, state = run
    ck = run_dir / "checkpoints"
    assert (ck / "best.keras").is_file()
    assert json.loads((ck / "state.json").read_text())["epoch"] == 2 == state["epoch"]
    assert (ck / state["weights"]).is_file()
    assert len(list(ck.glob("last-e*.weights.h5"))) == 1  # older epochs are cleaned up
    best = json.loads((ck / "best.json").read_text())
    assert {"maxf", "ap", "f1", "road_iou", "precision", "recall", "loss"} <= set(best)
    assert not list(ck.glob(".tmp-*"))


def test_tensorboard_holds_scalars_and_image_panels(run):
    _, run_dir, _ = run
    train_tags = event_tags(run_dir / "logs" / "train")
    val_tags = event_tags(run_dir / "logs" / "validation")
    wanted = {"loss", "road/iou", "road/precision", "road/recall", "road/f1"}
    assert wanted | {"schedule/learning_rate"} <= train_tags["scalars"]
    assert wanted | {"road/maxf", "road/ap"} <= val_tags["scalars"]
    # Panels from frames spread over the split (its first and last), named after them.
    assert val_tags["images"] == {"panel/um_000004", "panel/uu_000005"}
    assert val_tags["pr_curves"] == {"road/pr_curves"}
    (events,) = (run_dir / "logs" / "train").glob("events*")
    lr = {e.step: float(tf.make_ndarray(v.tensor)) for e in tf.compat.v1.train.summary_iterator(str(events))
          for v in e.summary.value if v.tag == "schedule/learning_rate"}  # fmt: skip
    assert sorted(lr) == [0, 1, 2] and lr[0] == 0 < lr[1]  # from step 0: the warm-up shows
    (events,) = (run_dir / "logs" / "validation").glob("events*")
    tables = [tf.make_ndarray(v.tensor) for e in tf.compat.v1.train.summary_iterator(str(events))
              for v in e.summary.value if v.tag == "road/pr_curves"]  # fmt: skip
    assert len(tables) == 2 and tables[0].shape == (6, 256)  # TP, FP, TN, FN, precision, recall per threshold
    assert np.all((tables[0][4:] >= 0) & (tables[0][4:] <= 1)) and tables[0][5, 0] == 1  # recall 1 at p >= 0


def test_panel_rows_are_labelled_and_errors_have_their_own_colours():
    from segnet.model import ROAD_CLASSES
    from segnet.train import FN, FP, TP, panel

    image = np.full((40, 200, 3), 100, np.uint8)
    label = np.zeros((40, 200), np.uint8)
    label[:, :100] = 1  # road on the left
    label[:5] = data.IGNORE
    prob = np.zeros((40, 200), np.float32)
    prob[:, 50:150] = 0.9  # right on 50..99, false road on 100..149, missed on 0..49
    p = panel(image, label, np.stack([1 - prob, prob], -1), ROAD_CLASSES, "um_000001")
    assert p.shape == (3 * (12 + 40), 200, 3)
    errors = p[2 * 52 + 12 :].astype(int)
    for x, colour in ((75, TP), (125, FP), (25, FN)):
        assert np.argmax(errors[20, x]) == np.argmax(colour), (x, errors[20, x])
    assert (errors[20, 175] == 100).all()  # right non-road: untouched
    assert p[:12].max() > 200 and p[52 : 52 + 12].max() > 200  # label bars carry white text


def test_resume_continues_from_the_last_epoch(run, tmp_path):
    cfg, run_dir, state = run
    cfg = compose([*TINY, f"dataset.root={cfg.dataset.root}", f"outputs={cfg.outputs}",
                   "trainer.epochs=3", "trainer.resume=true"])  # fmt: skip
    resumed = train(cfg, tmp_path / "second")
    assert resumed["epoch"] == 3
    log = list((tmp_path / "second" / "logs" / "train").glob("events*"))
    steps = {e.step for f in log for e in tf.compat.v1.train.summary_iterator(str(f)) if e.summary.value}
    assert steps == {3}  # epochs 1 and 2 were not trained again


def test_config_typo_fails_at_start_with_the_key_named(tmp_path):
    out = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "trainer.epoch=3"], capture_output=True, text=True, cwd=tmp_path,
        timeout=300,
    )  # fmt: skip
    assert out.returncode != 0
    assert "unknown config key 'trainer.epoch': did you mean trainer.epochs?" in out.stderr
    assert not (tmp_path / "data").exists()  # failed before any work
    wrong_type = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "trainer.epochs=abc"], capture_output=True, text=True, cwd=tmp_path,
        timeout=300,
    )  # fmt: skip
    assert wrong_type.returncode != 0 and "full_key: trainer.epochs" in wrong_type.stderr
    assert "could not be converted to Integer" in wrong_type.stderr and not (tmp_path / "data").exists()


def test_wrong_dataset_root_is_one_clear_error(tmp_path):
    out = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "dataset=kitti", f"dataset.root={tmp_path / 'nope'}",
         f"outputs={tmp_path / 'out'}"],
        capture_output=True, text=True, cwd=tmp_path, timeout=300,
    )  # fmt: skip
    assert out.returncode == 2
    assert "nope" in out.stderr and "dataset.root" in out.stderr and "Traceback" not in out.stderr


@pytest.mark.slow
def test_a_small_run_learns_the_road(tmp_path):
    """Validation F1 well above what predicting all-road would give."""
    cfg = compose([
        f"dataset.root={tmp_path / 'synthetic'}", f"outputs={tmp_path / 'out'}",
        "dataset.synthetic.num_train=96", "dataset.synthetic.height=64", "dataset.synthetic.width=160",
        "dataset.train_size=[64,160]", "dataset.val_per_category=6", "model.width=0.125",
        "trainer.epochs=8", "trainer.batch_size=8",
    ])  # fmt: skip
    state = train(cfg, tmp_path / "run")
    best = json.loads((tmp_path / "run" / "checkpoints" / "best.json").read_text())
    val = data.split_samples(data.list_samples(tmp_path / "synthetic"), cfg.dataset)[1]
    labels = np.concatenate([data.read_label(s.gt).ravel() for s in val])
    p = (labels == 1).sum() / (labels != data.IGNORE).sum()
    all_road_f1 = 2 * p / (1 + p)
    assert best["f1"] > all_road_f1 + 0.2, (best, all_road_f1, state)


def test_loss_ignores_pixels_outside_the_evaluation_area_and_weights_classes():
    from omegaconf import OmegaConf

    from segnet.train import loss_sums

    labels = np.array([[[1, 0, data.IGNORE]]], np.uint8)
    logits = np.array([[[[0.0, 2.0], [0.0, 2.0], [50.0, -50.0]]]], np.float32)  # the ignored pixel is very wrong
    ce_road, ce_non = np.log1p(np.exp(-2.0)), np.log1p(np.exp(2.0))
    ce, n = loss_sums(labels, logits)
    assert (float(ce), float(n)) == pytest.approx((ce_road + ce_non, 2), rel=1e-5)
    ce, n = loss_sums(labels, logits, OmegaConf.create([1.0, 3.0]))  # as Hydra passes it
    assert (float(ce), float(n)) == pytest.approx((3 * ce_road + ce_non, 4), rel=1e-5)
    ce, n = loss_sums(labels, logits, hard=0.5)  # the harder half of the two valid pixels: the missed non-road
    assert (float(ce), float(n)) == pytest.approx((ce_non, 1), rel=1e-5)


def test_dice_loss_is_one_minus_the_soft_overlap_per_class_inside_the_evaluation_area():
    from segnet.train import dice_loss

    labels = np.array([[[1, 0, data.IGNORE]]], np.uint8)
    logits = np.array([[[[0.0, 2.0], [0.0, 2.0], [50.0, -50.0]]]], np.float32)  # the ignored pixel is very wrong
    p = 1 / (1 + np.exp(-2.0))  # road's probability on both valid pixels
    road = (2 * p + 1) / (2 * p + 1 + 1)  # overlap p, sums 2p + 1, the +1 smoothing on both sides
    non_road = (2 * (1 - p) + 1) / (2 * (1 - p) + 1 + 1)
    assert float(dice_loss(labels, logits)) == pytest.approx(1 - (road + non_road) / 2, rel=1e-5)
    right = np.array([[[[-50.0, 50.0], [50.0, -50.0], [0.0, 0.0]]]], np.float32)
    assert float(dice_loss(labels, right)) == pytest.approx(0.0, abs=1e-6)


def test_the_coarse_stages_are_the_decoders_own_score_maps_and_their_loss_covers_the_labels_grid():
    from segnet.model import fcn
    from segnet.train import coarse_loss_sums, with_coarse_outputs

    model = fcn("fcn8", width=1 / 16, fc6_kernel=1)
    x = np.random.default_rng(0).uniform(0, 255, (1, 40, 70, 3)).astype("float32")  # padded to 64x96 inside
    logits, s32, s16 = with_coarse_outputs(model)(x)
    np.testing.assert_allclose(logits, model(x), atol=1e-5)  # the same network, not a copy
    assert (s32.shape[1:3], s16.shape[1:3]) == ((2, 3), (4, 6))
    labels = np.ones((1, 40, 70), np.uint8)
    labels[:, :5] = data.IGNORE
    flat = np.tile(np.float32([0.0, 2.0]), (1, 2, 3, 1))  # road at 2 everywhere: the upsampled map is the same
    ce, n = coarse_loss_sums(labels, flat, 32)
    assert (float(ce), float(n)) == pytest.approx((35 * 70 * np.log1p(np.exp(-2.0)), 35 * 70), rel=1e-5)
    with pytest.raises(ConfigError, match="trainer.aux=0.4: FCN-32s has no coarser stage"):
        validate(compose(["model=fcn32", "trainer.aux=0.4"]))


@pytest.mark.parametrize(
    "jit_compile,dice,aux,optimizer,hard",
    [(False, 0.0, 0.0, "adamw", 1.0), (True, 0.0, 0.0, "adamw", 1.0), (False, 1.0, 0.0, "adamw", 1.0),
     (False, 0.0, 0.4, "adamw", 1.0), (False, 0.0, 0.0, "sgd", 1.0), (False, 0.0, 0.4, "adamw", 0.25)],
)  # fmt: skip
def test_a_training_step_lowers_the_loss_on_a_batch_also_under_xla_with_dice_aux_sgd_and_hard_pixels(
    jit_compile, dice, aux, optimizer, hard
):
    from segnet.train import compiled_model, train_step

    lr = {"adamw": 3e-3, "sgd": 3e-2}[optimizer]
    model = compiled_model(compose([*TINY, f"trainer.lr={lr}", f"trainer.optimizer={optimizer}"]), steps_per_epoch=10)
    assert type(model.optimizer).__name__ == {"adamw": "AdamW", "sgd": "SGD"}[optimizer]
    assert optimizer == "adamw" or model.optimizer.momentum == 0.9
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 255, (2, 64, 96, 3)).astype("float32")
    y = np.zeros((2, 64, 96), np.uint8)
    y[:, 32:] = 1  # road in the lower half
    y[:, :4] = data.IGNORE
    batches = iter(tf.data.Dataset.from_tensors((x, y)).repeat())
    step = train_step(tf.distribute.get_strategy(), model, jit_compile=jit_compile, dice=dice, aux=aux, hard=hard)
    losses = [float(step(batches)[0]) for _ in range(8)]
    assert np.isfinite(losses).all() and losses[-1] < losses[0]
    cm = step(batches)[1].numpy()  # rows: the true class
    assert cm[1].sum() == 2 * 32 * 96 and cm.sum() == 2 * 60 * 96  # counts come from the valid pixels only


def test_fixed_upsampling_stays_bilinear_while_the_rest_trains():
    from segnet.layers import bilinear_kernel
    from segnet.train import compiled_model, train_step

    model = compiled_model(compose([*TINY, "model.learn_upsampling=false"]), steps_per_epoch=10)
    ups = [layer for layer in model.layers if layer.name.startswith("upscore")]
    assert len(ups) == 3 and not any(v.trainable for layer in ups for v in layer.weights)
    x = np.random.default_rng(0).uniform(0, 255, (2, 64, 96, 3)).astype("float32")
    y = np.zeros((2, 64, 96), np.uint8)
    y[:, 32:] = 1
    score = model.get_layer("score_fr").get_weights()[0]
    step = train_step(tf.distribute.get_strategy(), model)
    batches = iter(tf.data.Dataset.from_tensors((x, y)).repeat())
    for _ in range(2):
        step(batches)
    for layer in ups:
        np.testing.assert_array_equal(layer.get_weights()[0], bilinear_kernel(layer.kernel_size[0], 2))
    assert not np.allclose(model.get_layer("score_fr").get_weights()[0], score)


def test_the_row_prior_learns_from_the_rows_what_the_pixels_cannot_tell():
    """Two crops of the same pixels: one ends at its frame's bottom edge, labelled non-road there (KITTI's
    convention), the other higher up, all road. Only the rows the pipeline gives can set them apart: without
    the prior one of each pair of pixels is wrong (384 pixels), with it none is."""
    from segnet.train import compiled_model, train_step

    x = np.random.default_rng(0).uniform(0, 255, (1, 64, 96, 3)).astype("float32").repeat(2, axis=0)
    y = np.ones((2, 64, 96), np.uint8)
    y[0, -4:] = 0
    rows = np.stack([(np.arange(64) + 36.5) / 100, (np.arange(64) + 10.5) / 100]).astype("float32")
    errors = {}
    for prior in (False, True):
        overrides = [*TINY, f"model.row_prior={prior}", "trainer.lr=1e-2", "trainer.warmup_epochs=0"]
        step = train_step(tf.distribute.get_strategy(), compiled_model(compose(overrides), 20))
        batches = iter(tf.data.Dataset.from_tensors((x, y, rows)).repeat())
        for _ in range(30):
            cm = step(batches)[1].numpy()
        errors[prior] = cm[0, 1] + cm[1, 0]
    assert errors[False] > 100 and errors[True] == 0


def test_fused_adamw_takes_keras_adamw_steps_with_weight_decay():
    """segnet's AdamW (one fused kernel per variable) moves weights exactly as Keras' AdamW, decay included.
    Mirrored variables take Keras' own update: test_distribute's two replicas train like one device."""
    import keras

    from segnet.train import AdamW

    rng = np.random.default_rng(0)
    start = rng.normal(size=(30, 7)).astype("float32")
    grads = [tf.constant(rng.normal(size=(30, 7)).astype("float32")) for _ in range(4)]

    def trained(optimizer_class):
        w = keras.Variable(start)
        optimizer = optimizer_class(1e-2, weight_decay=0.5)
        step = tf.function(lambda g: optimizer.apply_gradients([(g, w)]))
        for g in grads:
            step(g)
        return keras.ops.convert_to_numpy(w)

    reference = trained(keras.optimizers.AdamW)
    assert np.abs(reference - start).max() > 0.03  # four steps of lr 1e-2 did move it
    np.testing.assert_allclose(trained(AdamW), reference, atol=1e-6)


@pytest.mark.slow
def test_the_full_width_model_trains_in_its_fastest_precision():
    """Real VGG16 width, bfloat16 where the CPU has it. On an AMX Xeon (TF 2.21), score_fr as a Conv2D (a 1x1
    convolution from 4096 channels to 2) corrupted the heap in the first steps, even at 64x192: the process
    died, so it runs in a child process, whose exit code is the verdict."""
    overrides = ["dataset=kitti", "model.width=1.0", "dataset.train_size=[64,192]"]
    code = f"from segnet.bench import kernel_steps; kernel_steps({overrides!r}, 3)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
