"""Run a trained model: find it, load it once, predict road probabilities at each image's own size."""

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
    """A .keras file from a run folder, a checkpoint path, or the newest run."""
    path = newest_run(outputs) if model is None else Path(model)
    if path.is_dir():
        path = path / BEST
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: pass a run folder holding {BEST} or a .keras file")
    return path


def load(model=None, outputs="outputs") -> keras.Model:
    return keras.models.load_model(model_path(model, outputs), compile=False)


def road_probability(logits: np.ndarray) -> np.ndarray:
    """Softmax over two classes, road's share: 1 / (1 + exp(l_nonroad - l_road))."""
    return 1.0 / (1.0 + np.exp(np.clip(logits[..., 0] - logits[..., 1], -80, 80)))  # clip: no overflow


def predict(model: keras.Model, images: list[np.ndarray], batch_size: int = 4) -> list[np.ndarray]:
    """Road probability (float32, HxW) for each uint8 RGB image, each at its own resolution.

    Images of the same size go through together; the model pads and crops, so any size works.
    """
    out = [None] * len(images)
    by_size = {}
    for i, im in enumerate(images):
        by_size.setdefault(im.shape, []).append(i)
    for idx in by_size.values():
        for k in range(0, len(idx), batch_size):
            chunk = idx[k : k + batch_size]
            logits = model.predict_on_batch(np.stack([images[i] for i in chunk]).astype("float32"))
            for i, p in zip(chunk, road_probability(np.asarray(logits, "float32")), strict=True):
                out[i] = p
    return out


def overlay(image: np.ndarray, road: np.ndarray, color=(0, 255, 0), alpha: float = 0.45) -> np.ndarray:
    """Road tinted over the image; everything else untouched."""
    out = image.astype("float32")
    out[road] = (1 - alpha) * out[road] + alpha * np.asarray(color, "float32")
    return out.round().astype("uint8")
