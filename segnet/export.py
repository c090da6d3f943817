"""Export a trained model for deployment: SavedModel, TFLite or ONNX.

    python -m segnet.export outputs/2026-11-25/10-00-00 --format savedmodel
    python -m segnet.export RUN --format tflite --quantize float16     # or dynamic (int8 weights)
    python -m segnet.export RUN --format onnx                          # needs pip install -e ".[export]"

Every export takes a uint8 RGB batch of any height and width, named "image", and returns "probabilities"
(batch, height, width, classes) in [0, 1], and "road_probability" (batch, height, width) when a class is named
road: the preprocessing (scale, mean, padding) and the softmax are inside, so a consumer feeds camera frames
as they are. The class names and colours go beside it (model.onnx.json). `infer.py --model` runs any of them.
"""

import argparse
import json
import sys
import tempfile
from pathlib import Path

import keras
import tensorflow as tf

from segnet import errors, predict, runs
from segnet.errors import ConfigError, MissingExtra, UserError
from segnet.model import classes_of, with_precision

SUFFIX = {"savedmodel": "", "tflite": ".tflite", "onnx": ".onnx"}
SIGNATURE = [tf.TensorSpec([None, None, None, 3], tf.uint8, name="image")]


def serving_function(model: keras.Model, flip: bool = False):
    road = predict.road_index(classes_of(model))

    def probability(image):
        return tf.nn.softmax(tf.cast(model(tf.cast(image, tf.float32), training=False), tf.float32))

    def serve(image):
        p = probability(image)
        if flip:
            p = (p + tf.reverse(probability(tf.reverse(image, axis=[2])), axis=[2])) / 2  # as predict.mirrored
        return {"probabilities": p} | ({} if road is None else {"road_probability": p[..., road]})

    return serve


def saved_model(model: keras.Model, fn, out: Path) -> None:
    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint("serving_default", fn, input_signature=SIGNATURE)
    archive.write_out(str(out), verbose=False)


def export(model: keras.Model, fmt: str, out: Path, quantize: str = "none", flip: bool = False) -> Path:
    if quantize != "none" and fmt != "tflite":
        raise ConfigError(f"--quantize {quantize} applies to tflite only")
    fn = serving_function(model, flip)
    if fmt == "savedmodel":
        saved_model(model, fn, out)
    elif fmt == "tflite":
        # Through a SavedModel: converting the Keras 3 model's function directly gave garbage weights.
        with tempfile.TemporaryDirectory() as tmp:
            saved_model(model, fn, Path(tmp) / "model")
            converter = tf.lite.TFLiteConverter.from_saved_model(str(Path(tmp) / "model"))
            if quantize in ("dynamic", "float16"):
                converter.optimizations = [tf.lite.Optimize.DEFAULT]  # dynamic range: int8 weights, float compute
                if quantize == "float16":
                    converter.target_spec.supported_types = [tf.float16]
            elif quantize != "none":
                raise ConfigError(f"--quantize {quantize}: use none, dynamic or float16")
            out.write_bytes(converter.convert())
    elif fmt == "onnx":
        try:
            import tf2onnx
        except ImportError:
            raise MissingExtra("ONNX export", "export") from None
        tf2onnx.convert.from_function(tf.function(fn), input_signature=SIGNATURE, opset=17, output_path=str(out))
    else:
        raise ConfigError(f"--format {fmt}: use savedmodel, tflite or onnx")
    return out


def export_run(model, fmt: str, out: Path | None = None, quantize: str = "none", flip: bool = False) -> Path:
    """Export a run folder's best checkpoint (or a .keras file); default place: <run>/exports/."""
    path = runs.model_path(model)
    if path.suffix != ".keras":
        raise UserError(f"{path}: export reads a run folder or a .keras checkpoint")
    name = "model" + ("" if quantize == "none" else f"-{quantize}") + ("-flip" if flip else "") + SUFFIX[fmt]
    out = Path(out) if out else path.parents[1] / runs.EXPORTS / name
    if out.exists():
        raise FileExistsError(f"{out} exists; remove it or pass another --out")
    out.parent.mkdir(parents=True, exist_ok=True)
    model = with_precision(keras.models.load_model(path, compile=False), "float32")  # what every runtime runs
    export(model, fmt, out, quantize, flip)
    classes = [{"name": n, "colour": list(c)} for n, c in classes_of(model)]
    predict.sidecar(out).write_text(json.dumps({"classes": classes}, indent=1) + "\n")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", help="run folder or .keras checkpoint")
    ap.add_argument("--format", required=True, choices=sorted(SUFFIX))
    ap.add_argument("--quantize", default="none", choices=["none", "dynamic", "float16"], help="TFLite only")
    ap.add_argument("--out", type=Path, help="default: exports/model[-QUANTIZE][.tflite|.onnx] in the run folder")
    ap.add_argument("--flip", action="store_true", help="average with the mirror image inside (twice the time)")
    ap.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    args = ap.parse_args(argv)
    with errors.reported(args.debug):
        out = export_run(args.model, args.format, args.out, args.quantize, args.flip)
    print(f"{args.format} model: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
