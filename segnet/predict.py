"""Run a trained model: find it, load it once, predict class probabilities at each image's own size.

A model is a run folder, a .keras checkpoint, or an export of segnet.export (SavedModel folder, .tflite,
.onnx). Whatever it is, `load` returns a function from a uint8 RGB batch (B, H, W, 3) to class
probabilities (B, H, W, N), so every kind gives the same masks; its `classes` attribute names them.
For KITTI's two classes, [..., 1] is the road probability the benchmark scores.
"""

import json
from pathlib import Path

import keras
import numpy as np

import segnet.model  # noqa: F401  (registers the custom layers that load_model needs)
from segnet import runs
from segnet.errors import MissingExtra, UserError, first_line


def probabilities(logits: np.ndarray) -> np.ndarray:
    """Softmax over the last axis. For two classes in the form 1 / (1 + exp(l_0 - l_1)), which the road
    maps of every earlier segnet version were computed with, so that KITTI scores stay bit for bit."""
    if logits.shape[-1] == 2:
        road = 1.0 / (1.0 + np.exp(np.clip(logits[..., 0] - logits[..., 1], -80, 80)))  # clip: no overflow
        return np.stack([1.0 - road, road], axis=-1)
    e = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def keras_function(model: keras.Model):
    fn = lambda batch: probabilities(np.asarray(model.predict_on_batch(batch.astype("float32")), "float32"))  # noqa: E731
    fn.classes = segnet.model.classes_of(model)
    return fn


def road_index(classes) -> int | None:
    """The output that is road: the class named road (KITTI's second), if there is one."""
    names = [name for name, _ in classes]
    return names.index("road") if "road" in names else None


def sidecar(path: Path) -> Path:
    """An export's class list lives beside it: model.onnx -> model.onnx.json."""
    return path.with_name(path.name + ".json")


def load(model=None, outputs="outputs", precision: str = "auto"):
    """A function uint8 (B, H, W, 3) -> class probabilities (B, H, W, N) float32, for any kind of model.

    precision (for .keras checkpoints): auto is the fastest this machine runs (bfloat16 on AVX512-BF16/AMX);
    exports always compute in float32. The function's `precision` attribute says which one runs.
    """
    path = runs.model_path(model, outputs)
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
    if not hasattr(fn, "classes"):  # an export: its class list is the file beside it
        classes = json.loads(sidecar(path).read_text())["classes"] if sidecar(path).is_file() else None
        fn.classes = tuple((c["name"], tuple(c["colour"])) for c in classes) if classes else segnet.model.ROAD_CLASSES
    return fn


def _load(path: Path, precision: str):
    if path.suffix == ".keras":
        model = keras.models.load_model(path, compile=False)
        if model.inputs[0].shape[-1] != 3 or "logits" not in [layer.name for layer in model.layers]:
            raise UserError(f"{path}: a Keras model, but not segnet's (it wants RGB in, class scores out)")
        precision = segnet.model.auto_precision() if str(precision) == "auto" else str(precision)
        fn = keras_function(segnet.model.with_precision(model, precision))
        fn.precision = precision
        return fn
    if path.is_dir():
        import tensorflow as tf

        serve = tf.saved_model.load(str(path)).signatures["serving_default"]
        return lambda batch: class_probabilities({k: v.numpy() for k, v in serve(image=tf.constant(batch)).items()})
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
        names = [o.name for o in session.get_outputs()]
        return lambda batch: class_probabilities(dict(zip(names, session.run(None, {"image": batch}), strict=True)))
    raise UserError(f"{path}: not a model segnet can load (.keras, SavedModel folder, .tflite, .onnx)")


def class_probabilities(outputs: dict) -> np.ndarray:
    """(B, H, W, N) from an export's named outputs; an export of an earlier segnet has road's alone."""
    if "probabilities" in outputs:
        return np.asarray(outputs["probabilities"])
    road = np.asarray(outputs["road_probability"])
    return np.stack([1 - road, road], axis=-1)


def tflite_function(path: Path):
    import tensorflow as tf

    interpreter = tf.lite.Interpreter(model_path=str(path), num_threads=None)
    runner = interpreter.get_signature_runner()  # outputs by name; resizes its tensors to each batch's size
    details = runner.get_input_details()
    if list(details) != ["image"] or details["image"]["dtype"] != np.uint8:
        raise UserError(f"{path}: a TFLite model, but not segnet's (it wants one uint8 image in)")
    return lambda batch: class_probabilities(runner(image=batch))


def predict(
    model, images: list[np.ndarray], batch_size: int = 4, max_side: int | None = None, flip: bool = False
) -> list[np.ndarray]:
    """Class probabilities (float32, HxWxN) for each uint8 RGB image, each at its own resolution.

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
    """Bilinear resize of an RGB uint8 image or of float32 maps (HxW or HxWxN) to size = (H, W)."""
    from PIL import Image

    if array.dtype == np.float32 and array.ndim == 3:
        return np.stack([resize(array[..., c], size) for c in range(array.shape[-1])], axis=-1)
    return np.asarray(Image.fromarray(array).resize(size[::-1], Image.BILINEAR))


def blend(image: np.ndarray, colours: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """The image with a colour map laid over it (a class map drawn by colour_map)."""
    return ((1 - alpha) * image.astype("float32") + alpha * colours.astype("float32")).round().astype("uint8")


def colour_map(classes, label: np.ndarray) -> np.ndarray:
    """HxWx3 uint8: each pixel in its class's colour (class numbers beyond the list black)."""
    palette = np.zeros((256, 3), np.uint8)
    palette[: len(classes)] = [colour for _, colour in classes]
    return palette[label]


def overlay(image: np.ndarray, road: np.ndarray, color=(0, 255, 0), alpha: float = 0.45, uncertain=None) -> np.ndarray:
    """Road tinted over the image; everything else untouched, except an optional `uncertain` mask (amber)."""
    out = image.astype("float32")
    for mask, tint in ((road, color), (uncertain, (255, 176, 0))):
        if mask is not None:
            out[mask] = (1 - alpha) * out[mask] + alpha * np.asarray(tint, "float32")
    return out.round().astype("uint8")
