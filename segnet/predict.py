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
from segnet.errors import MissingExtra, UserError, first_line


def model_path(model=None, outputs="outputs") -> Path:
    """The model file or folder: a run's best checkpoint, a given file or export, or the newest run's best."""
    if model is None:
        return runs.best_model(outputs)
    path = Path(model)
    if path.is_dir() and not (path / "saved_model.pb").exists():
        if not (path / runs.BEST).exists():
            raise UserError(
                f"{path}: a folder that is neither a run (no {runs.BEST}) nor a SavedModel (no saved_model.pb); "
                "pass a run folder, a .keras file or an export of segnet.export"
            )
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


def load(model=None, outputs="outputs", precision: str = "auto"):
    """A function uint8 (B, H, W, 3) -> road probability (B, H, W) float32, for any kind of model.

    precision (for .keras checkpoints): auto is the fastest this machine runs (bfloat16 on AVX512-BF16/AMX);
    exports always compute in float32. The function's `precision` attribute says which one runs.
    """
    path = model_path(model, outputs)
    if str(precision) != "auto" and str(precision) != "float32" and path.suffix != ".keras":
        raise UserError(f"{path}: exports compute in float32 only; drop the precision or pass a .keras model")
    try:
        fn = _load(path, precision)
    except (MissingExtra, UserError):
        raise
    except Exception as e:  # each runtime fails its own way on a damaged file or another program's model
        raise UserError(
            f"{path}: not a segnet model, or damaged ({first_line(e)}); pass a run folder, a .keras checkpoint or an "
            "export that segnet wrote (python -m segnet.export)"
        ) from None
    fn.precision = getattr(fn, "precision", "float32")
    return fn


def _load(path: Path, precision: str):
    if path.suffix == ".keras":
        model = keras.models.load_model(path, compile=False)
        if model.inputs[0].shape[-1] != 3 or model.outputs[0].shape[-1] != 2:
            raise UserError(f"{path}: a Keras model, but not segnet's (it wants RGB in, two class scores out)")
        precision = segnet.model.auto_precision() if str(precision) == "auto" else str(precision)
        fn = keras_function(segnet.model.with_precision(model, precision))
        fn.precision = precision
        return fn
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
        if [i.name for i in session.get_inputs()] != ["image"]:
            raise UserError(f"{path}: an ONNX model, but not segnet's (no input named 'image')")
        return lambda batch: session.run(["road_probability"], {"image": batch})[0]
    raise UserError(f"{path}: not a model segnet can load (.keras, SavedModel folder, .tflite, .onnx)")


def tflite_function(path: Path):
    import tensorflow as tf

    interpreter = tf.lite.Interpreter(model_path=str(path), num_threads=None)
    inputs, outputs = interpreter.get_input_details(), interpreter.get_output_details()
    if len(inputs) != 1 or len(outputs) != 1 or inputs[0]["dtype"] != np.uint8:
        raise UserError(f"{path}: a TFLite model, but not segnet's (it wants one uint8 image in, one map out)")
    (inp,), (out,) = inputs, outputs
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


def predict(
    model, images: list[np.ndarray], batch_size: int = 4, max_side: int | None = None, flip: bool = False
) -> list[np.ndarray]:
    """Road probability (float32, HxW) for each uint8 RGB image, each at its own resolution.

    `model` is a keras.Model or a function from `load`. Images of one size go through together; the model
    pads and crops, so any size works. An image whose longer side exceeds max_side is predicted shrunk to it
    and its probabilities brought back to full size, which bounds memory and time on huge photos. flip: the
    mean of the image's and its mirror image's probabilities (test-time augmentation, twice the time).
    """
    fn = keras_function(model) if isinstance(model, keras.Model) else model
    if flip:
        fn = mirrored(fn)
    out = [None] * len(images)
    by_size = {}
    for i, im in enumerate(images):
        by_size.setdefault(im.shape, []).append(i)
    for (h, w, _), idx in by_size.items():
        f = min(1.0, max_side / max(h, w)) if max_side else 1.0
        small = (max(1, round(h * f)), max(1, round(w * f)))
        for k in range(0, len(idx), batch_size):
            chunk = idx[k : k + batch_size]
            batch = np.stack([images[i] if f == 1.0 else resize(images[i], small) for i in chunk]).astype("uint8")
            for i, p in zip(chunk, fn(batch), strict=True):
                p = np.asarray(p, "float32")
                out[i] = p if f == 1.0 else resize(p, (h, w))
    return out


def mirrored(fn):
    """fn averaged with fn on the left-right mirror image: roads are as likely mirrored as not."""
    return lambda batch: (np.asarray(fn(batch)) + np.asarray(fn(batch[:, :, ::-1].copy()))[:, :, ::-1]) / 2


def resize(array: np.ndarray, size) -> np.ndarray:
    """Bilinear resize of an RGB uint8 image or a float32 map to size = (H, W)."""
    from PIL import Image

    return np.asarray(Image.fromarray(array).resize(size[::-1], Image.BILINEAR))


def overlay(image: np.ndarray, road: np.ndarray, color=(0, 255, 0), alpha: float = 0.45, uncertain=None) -> np.ndarray:
    """Road tinted over the image; everything else untouched, except an optional `uncertain` mask (amber)."""
    out = image.astype("float32")
    for mask, tint in ((road, color), (uncertain, (255, 176, 0))):
        if mask is not None:
            out[mask] = (1 - alpha) * out[mask] + alpha * np.asarray(tint, "float32")
    return out.round().astype("uint8")
