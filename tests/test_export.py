"""Exports (SavedModel, TFLite, ONNX) give the Keras model's probabilities; infer.py runs every kind."""

import json
import subprocess
import sys

import imageio.v2 as imageio
import keras
import numpy as np
import pytest
from conftest import ROOT
from PIL import Image

from segnet import export, predict
from segnet.model import fcn, with_precision

SIZES = [(70, 90), (37, 101)]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A run folder as training leaves it, with a small model trained on resized frames (scale < 1)."""
    run = tmp_path_factory.mktemp("run")
    (run / "checkpoints").mkdir()
    keras.utils.set_random_seed(0)
    model = fcn("fcn8", width=1 / 16, input_scale=(0.6, 0.55), row_prior=True, global_context=True)
    # Every export must carry the row prior and the global context (the KITTI default's): non-zero ones show if
    # one does not.
    for name, sigma in (("row_prior", 0.3), ("context", 0.1)):
        layer = model.get_layer(name)
        layer.set_weights([np.random.default_rng(0).normal(0, sigma, layer.get_weights()[0].shape)])
    # An untrained net scores everything near p = 0.5, where any rounding flips the mask; a trained one is
    # confident. Scaling the class scores gives this one a trained net's range of logits.
    kernel, bias = model.get_layer("score_fr").get_weights()
    model.get_layer("score_fr").set_weights([kernel * 30, bias])
    model.save(run / "checkpoints" / "best.keras")
    (run / "checkpoints" / "best.json").write_text(json.dumps({"best_thresh": 0.5}))
    return run


def float32_keras(run):
    """The reference: the checkpoint in float32 (predict.load may pick bfloat16 on this CPU)."""
    model = keras.models.load_model(run / "checkpoints" / "best.keras", compile=False)
    return predict.keras_function(with_precision(model, "float32"))


def batches():
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (2, h, w, 3), dtype=np.uint8) for h, w in SIZES]


@pytest.mark.parametrize("fmt,name", [("savedmodel", "sm"), ("tflite", "m.tflite"), ("onnx", "m.onnx")])
def test_export_matches_the_keras_model_at_any_size(run, tmp_path, fmt, name):
    keras_fn = float32_keras(run)
    exported = predict.load(export.export_run(run, fmt, tmp_path / name))
    for batch in batches():
        expected = keras_fn(batch)
        got = exported(batch)
        assert got.shape == expected.shape == (*batch.shape[:3], 2)
        np.testing.assert_allclose(got, expected, atol=1e-4)


def test_exports_keep_road_probability_for_existing_consumers(run, tmp_path):
    import tensorflow as tf

    serve = tf.saved_model.load(str(export.export_run(run, "savedmodel", tmp_path / "sm"))).signatures[
        "serving_default"
    ]
    out = serve(image=tf.constant(batches()[0]))
    np.testing.assert_allclose(out["road_probability"].numpy(), out["probabilities"].numpy()[..., 1], atol=1e-7)
    assert json.loads((tmp_path / "sm.json").read_text())["classes"][1] == {"name": "road", "colour": [255, 0, 255]}


def test_mirror_averaging_is_the_same_in_predict_and_in_an_export(run, tmp_path):
    keras_fn = float32_keras(run)
    exported = predict.load(export.export_run(run, "savedmodel", tmp_path / "sm", flip=True))
    for batch in batches():
        plain, mirror = keras_fn(batch), keras_fn(batch[:, :, ::-1].copy())[:, :, ::-1]
        averaged = predict.predict(keras_fn, list(batch), flip=True)
        np.testing.assert_allclose(np.stack(averaged), (plain + mirror) / 2, atol=1e-6)
        np.testing.assert_allclose(exported(batch), (plain + mirror) / 2, atol=1e-4)
        assert not np.allclose(plain, mirror, atol=1e-3)  # the model is not symmetric: the test can fail


def test_an_export_of_an_earlier_segnet_with_road_probability_alone_still_runs(run, tmp_path):
    import tensorflow as tf

    model = keras.models.load_model(run / "checkpoints" / "best.keras", compile=False)
    road = lambda image: {"road_probability": export.serving_function(model)(image)["road_probability"]}  # noqa: E731
    export.saved_model(model, road, tmp_path / "old")
    assert list(tf.saved_model.load(str(tmp_path / "old")).signatures["serving_default"].structured_outputs) == [
        "road_probability"
    ]
    batch = batches()[0]
    np.testing.assert_allclose(predict.load(tmp_path / "old")(batch), float32_keras(run)(batch), atol=1e-4)


@pytest.mark.parametrize("quantize", ["dynamic", "float16"])
def test_quantised_tflite_agrees_on_the_mask(run, tmp_path, quantize):
    keras_fn = float32_keras(run)
    exported = predict.load(export.export_run(run, "tflite", tmp_path / "q.tflite", quantize))
    for batch in batches():
        assert np.mean((exported(batch)[..., 1] >= 0.5) == (keras_fn(batch)[..., 1] >= 0.5)) >= 0.99


def infer(*args):
    return subprocess.run([sys.executable, str(ROOT / "infer.py"), *map(str, args)], capture_output=True, text=True)


def test_export_command_and_infer_with_the_export_on_mixed_sizes_and_a_video(run, tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "segnet.export", str(run), "--format", "tflite"], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    tflite = run / "exports" / "model.tflite"
    assert tflite.is_file() and str(tflite) in out.stdout
    again = subprocess.run(
        [sys.executable, "-m", "segnet.export", str(run), "--format", "tflite"], capture_output=True, text=True
    )
    assert again.returncode == 2 and "exists" in again.stderr

    frames = tmp_path / "frames"
    frames.mkdir()
    for i, (h, w) in enumerate([*SIZES, SIZES[0]]):
        Image.fromarray(np.full((h, w, 3), 90 + 40 * i, np.uint8)).save(frames / f"f{i}.png")
    video = tmp_path / "drive.mp4"
    with imageio.get_writer(video, fps=5) as writer:
        for i in range(6):
            writer.append_data(np.full((64, 96, 3), 30 * i, np.uint8))
    result = infer(frames, video, "--model", tflite, "--out", tmp_path / "out", "--write", "mask,overlay,prob")
    assert result.returncode == 0, result.stderr
    for i, (h, w) in enumerate([*SIZES, SIZES[0]]):
        for kind in ("mask", "overlay", "prob"):
            assert Image.open(tmp_path / "out" / f"f{i}_{kind}.png").size == (w, h)
    assert imageio.get_reader(tmp_path / "out" / "drive_overlay.mp4").count_frames() == 6
    assert "images/s" in result.stdout and "ms/image" in result.stdout
