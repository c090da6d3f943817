"""Run a trained model: find it, load it once, predict road probabilities at each image's own size.

A model is a run folder, a .keras checkpoint, or an export of segnet.export (SavedModel folder, .tflite,
.onnx). Whatever it is, `load` returns a function from a uint8 RGB batch (B, H, W, 3) to road
probabilities (B, H, W), so every kind gives the same masks.
"""

import json
from pathlib import Path

import keras
import numpy as np

import segnet.model  # noqa: F401  (registers the custom layers that load_model needs)

BEST = "checkpoints/best.keras"


def newest_run(outputs="outputs") -> Path:
    """The most recent run folder under outputs/ that holds a best checkpoint."""
    runs = sorted(Path(outputs).glob(f"**/{BEST}"), key=lambda p: p.stat().st_mtime)
    if not runs:
        raise FileNotFoundError(
            f"no trained run under {Path(outputs).resolve()}: train one with `python train.py`, "
            "or pass --model RUN_DIR or a .keras file"
        )
    return runs[-1].parents[1]


def model_path(model=None, outputs="outputs") -> Path:
    """The model file or folder: a run's best checkpoint, a given file or export, or the newest run."""
    path = newest_run(outputs) if model is None else Path(model)
    if path.is_dir() and not (path / "saved_model.pb").exists():
        path = path / BEST
    if not path.exists():
        raise FileNotFoundError(
            f"{path} does not exist: pass a run folder holding {BEST}, a .keras file, "
            "or an export (SavedModel folder, .tflite, .onnx)"
        )
    return path


def best_threshold(path: Path) -> float | None:
    """The validation BestThresh recorded beside a checkpoint (best.json), if any."""
    info = path.with_name("best.json")
    return json.loads(info.read_text()).get("best_thresh") if path.suffix == ".keras" and info.exists() else None


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
            raise FileNotFoundError(f"{path}: running .onnx models needs pip install -e '.[export]'") from None
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return lambda batch: session.run(["road_probability"], {"image": batch})[0]
    raise FileNotFoundError(f"{path}: not a model segnet can load (.keras, SavedModel folder, .tflite, .onnx)")


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
