"""Run a trained model: find it, load it once, predict road probabilities at each image's own size.

A model is a run folder, a .keras checkpoint, or an export of segnet.export (SavedModel folder, .tflite,
.onnx). Whatever it is, `load` returns a function from a uint8 RGB batch (B, H, W, 3) to road
probabilities (B, H, W), so every kind gives the same masks.
"""

from pathlib import Path

import keras
import numpy as np

import segnet.model  # noqa: F401  (registers the custom layers that load_model needs)
from segnet import runs
from segnet.errors import MissingExtra, UserError


def model_path(model=None, outputs="outputs") -> Path:
    """The model file or folder: a run's best checkpoint, a given file or export, or the newest run's best."""
    if model is None:
        return runs.best_model(outputs)
    path = Path(model)
    if path.is_dir() and not (path / "saved_model.pb").exists():
        path = path / runs.BEST
    if not path.exists():
        raise FileNotFoundError(
            f"{path} does not exist: pass a run folder holding {runs.BEST}, a .keras file, "
            "or an export (SavedModel folder, .tflite, .onnx)"
        )
    return path


def road_probability(logits: np.ndarray) -> np.ndarray:
    """Softmax over two classes, road's share: 1 / (1 + exp(l_nonroad - l_road))."""
    return 1.0 / (1.0 + np.exp(np.clip(logits[..., 0] - logits[..., 1], -80, 80)))  # clip: no overflow


def keras_function(model: keras.Model):
    return lambda batch: road_probability(np.asarray(model.predict_on_batch(batch.astype("float32")), "float32"))


def load(model=None, outputs="outputs"):
    """A function uint8 (B, H, W, 3) -> road probability (B, H, W) float32, for any kind of model."""
    path = model_path(model, outputs)
    if path.suffix == ".keras":
        # In the precision this machine runs fastest (the checkpoint keeps the one it was trained in).
        model = keras.models.load_model(path, compile=False)
        return keras_function(segnet.model.with_precision(model, segnet.model.auto_precision()))
    if path.is_dir():
        import tensorflow as tf

        serve = tf.saved_model.load(str(path)).signatures["serving_default"]
        return lambda batch: serve(image=tf.constant(batch))["road_probability"].numpy()
    if path.suffix == ".tflite":
        return tflite_function(path)
    if path.suffix == ".onnx":
        try:
            import onnxruntime
        except ImportError:
            raise MissingExtra(f"{path}: running .onnx models", "export") from None
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return lambda batch: session.run(["road_probability"], {"image": batch})[0]
    raise UserError(f"{path}: not a model segnet can load (.keras, SavedModel folder, .tflite, .onnx)")


def tflite_function(path: Path):
    import tensorflow as tf

    interpreter = tf.lite.Interpreter(model_path=str(path), num_threads=None)
    (inp,), (out,) = interpreter.get_input_details(), interpreter.get_output_details()
    shape = None

    def run(batch):
        nonlocal shape
        if batch.shape != shape:  # the model takes any size: re-plan its tensors when the size changes
            interpreter.resize_tensor_input(inp["index"], batch.shape)
            interpreter.allocate_tensors()
            shape = batch.shape
        interpreter.set_tensor(inp["index"], batch)
        interpreter.invoke()
        return interpreter.get_tensor(out["index"])

    return run


def predict(model, images: list[np.ndarray], batch_size: int = 4) -> list[np.ndarray]:
    """Road probability (float32, HxW) for each uint8 RGB image, each at its own resolution.

    `model` is a keras.Model or a function from `load`. Images of one size go through together; the model
    pads and crops, so any size works.
    """
    fn = keras_function(model) if isinstance(model, keras.Model) else model
    out = [None] * len(images)
    by_size = {}
    for i, im in enumerate(images):
        by_size.setdefault(im.shape, []).append(i)
    for idx in by_size.values():
        for k in range(0, len(idx), batch_size):
            chunk = idx[k : k + batch_size]
            probs = fn(np.stack([images[i] for i in chunk]).astype("uint8"))
            for i, p in zip(chunk, probs, strict=True):
                out[i] = np.asarray(p, "float32")
    return out


def overlay(image: np.ndarray, road: np.ndarray, color=(0, 255, 0), alpha: float = 0.45, uncertain=None) -> np.ndarray:
    """Road tinted over the image; everything else untouched, except an optional `uncertain` mask (amber)."""
    out = image.astype("float32")
    for mask, tint in ((road, color), (uncertain, (255, 176, 0))):
        if mask is not None:
            out[mask] = (1 - alpha) * out[mask] + alpha * np.asarray(tint, "float32")
    return out.round().astype("uint8")
