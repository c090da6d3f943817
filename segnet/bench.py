"""How close segnet gets to this machine's limits: one process, one table, one JSON file.

    python -m segnet.bench dataset=kitti                   # the KITTI default model at 160x576 and 375x1242
    python -m segnet.bench dataset=kitti model.width=1.0   # the real VGG16 width
    python -m segnet.bench dataset=kitti trainer.jit_compile=true --json bench.json

Measures (a) the machine's peak GFLOP/s (large matmul and 3x3 convolution, float32 and bfloat16), (b) the
input pipeline alone, (c) training steps, (d) inference on a full KITTI frame, (e) the model's FLOPs per
image, counted layer by layer from the built model, and the fraction of peak achieved, (f) peak memory.
Every figure is the median of several repetitions after a warm-up. Arguments other than the flags below are
Hydra overrides of the training config.
"""

import argparse
import collections
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

KITTI_FRAME = (375, 1242)


def median_seconds(fn, repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def peak_rss_mib() -> float:
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return kib / 1024 if sys.platform != "darwin" else kib / 2**20


def gpu_peak_mib() -> float | None:
    gpus = tf.config.list_logical_devices("GPU")
    if not gpus:
        return None
    return tf.config.experimental.get_memory_info(gpus[0].name)["peak"] / 2**20


def machine_peak(repeats: int) -> dict[str, float]:
    """GFLOP/s of a 4096^2 matmul and a 3x3, 256-channel convolution on 56x56x32, in float32 and bfloat16."""
    out = {}
    for dtype in ("float32", "bfloat16"):
        a = tf.random.normal((4096, 4096), dtype=dtype)
        mm = tf.function(lambda a=a: tf.matmul(a, a))
        out[f"matmul_{dtype}"] = 2 * 4096**3 / median_seconds(lambda mm=mm: mm().numpy(), repeats) / 1e9
        x, k = tf.random.normal((32, 56, 56, 256), dtype=dtype), tf.random.normal((3, 3, 256, 256), dtype=dtype)
        conv = tf.function(lambda x=x, k=k: tf.nn.conv2d(x, k, 1, "SAME"))
        flops = 2 * 32 * 56 * 56 * 9 * 256 * 256
        out[f"conv3x3_{dtype}"] = flops / median_seconds(lambda conv=conv: conv().numpy(), repeats) / 1e9
    return out


def count_flops(model: keras.Model, height: int, width: int) -> float:
    """Forward FLOPs (multiply and add counted as two) of convolutions and transposed convolutions.

    Shapes come from the built model on a (1, height, width, 3) input; everything else (batch norm, ReLU,
    pooling, adds) is below 1% for FCN and left out.
    """
    shapes = {}
    convs = (keras.layers.Conv2D, keras.layers.Conv2DTranspose)
    hooks = [layer for layer in model.layers if isinstance(layer, convs)]
    probe = keras.Model(model.input, [layer.input for layer in hooks] + [layer.output for layer in hooks])
    outs = probe(np.zeros((1, height, width, 3), "float32"))
    n = len(hooks)
    for i, layer in enumerate(hooks):
        shapes[layer.name] = (outs[i].shape, outs[n + i].shape)
    total = 0.0
    for layer in hooks:
        (_, hi, wi, ci), (_, ho, wo, co) = shapes[layer.name]
        kh, kw = layer.kernel_size
        # A convolution does its multiply-adds per output pixel, a transposed one per input pixel.
        pixels = hi * wi if isinstance(layer, keras.layers.Conv2DTranspose) else ho * wo
        total += 2.0 * pixels * kh * kw * ci * co
    return total


def run(cfg, repeats: int) -> dict:
    from segnet import config, data
    from segnet.model import build, with_precision
    from segnet.train import compiled_model, set_precision, train_step

    config.validate(cfg)
    keras.utils.set_random_seed(0)
    precision = set_precision(cfg.trainer.precision)
    t = cfg.trainer
    th, tw = cfg.dataset.train_size
    rng = np.random.default_rng(0)
    result = {"precision": precision, "model": f"{cfg.model.name} width {cfg.model.width}", "train_size": [th, tw]}
    result["peak_gflops"] = machine_peak(repeats)

    # (b) the input pipeline alone: augmentation and batching of frames already decoded into memory.
    n = 32
    frames = rng.integers(0, 256, (n, *KITTI_FRAME, 3), dtype=np.uint8)
    labels = rng.integers(0, 2, (n, *KITTI_FRAME), dtype=np.uint8)
    x, y = data.training_arrays(list(frames), list(labels), cfg.dataset)
    it = iter(data.train_dataset(x, y, cfg.dataset, t.batch_size, seed=0))
    batches = 20
    seconds = median_seconds(lambda: [next(it) for _ in range(batches)], repeats)
    result["pipeline_images_per_s"] = batches * t.batch_size / seconds

    # (c) training steps, as train.py makes them, on one fixed batch: the model's speed, not the pipeline's.
    model = compiled_model(cfg, steps_per_epoch=100)
    train = train_step(tf.distribute.get_strategy(), model, t.class_weights, t.jit_compile)
    batch = iter(tf.data.Dataset.from_tensors(next(it)).repeat())
    step = median_seconds(lambda: float(train(batch)[0]), repeats, warmup=2)
    result["train_images_per_s"] = t.batch_size / step
    result["train_step_s"] = step

    # (d) inference on a full KITTI frame, through the twin that resizes it to the training scale, in the
    # precision infer.py runs it.
    scale = data.input_scale([KITTI_FRAME], cfg.dataset)
    classes = data.class_list(cfg.dataset)
    infer = build(cfg.model, classes, input_scale=scale)
    infer.set_weights(model.get_weights())
    infer = with_precision(infer, precision)
    frame = frames[:1].astype("float32")
    result["infer_ms_per_frame"] = 1000 * median_seconds(lambda: infer.predict_on_batch(frame), repeats, warmup=2)

    # (e) counted FLOPs, and the share of the measured convolution peak they reach.
    fwd = count_flops(build(cfg.model, classes), th, tw)
    sh, sw = round(KITTI_FRAME[0] * scale[0]), round(KITTI_FRAME[1] * scale[1])
    infer_flops = count_flops(build(cfg.model, classes), -(-sh // 32) * 32, -(-sw // 32) * 32)
    peak = result["peak_gflops"]["conv3x3_bfloat16" if precision == "bfloat16" else "conv3x3_float32"]
    result["gflop_forward_train_size"] = fwd / 1e9
    result["gflop_infer_frame"] = infer_flops / 1e9
    # A training step costs about three forward passes (forward, and two for the backward).
    result["train_gflops_achieved"] = 3 * fwd * result["train_images_per_s"] / 1e9
    result["train_fraction_of_peak"] = result["train_gflops_achieved"] / peak
    result["infer_gflops_achieved"] = infer_flops / (result["infer_ms_per_frame"] / 1000) / 1e9
    result["infer_fraction_of_peak"] = result["infer_gflops_achieved"] / peak

    # (f) memory.
    result["peak_rss_mib"] = peak_rss_mib()
    result["peak_gpu_mib"] = gpu_peak_mib()
    return result


def table(r: dict) -> str:
    p = r["peak_gflops"]
    rows = [
        ("machine", f"{r.get('cpu', cpu_name())}: {' '.join(r.get('units') or cpu_units()) or 'no AVX2'}"),
        ("model", f"{r['model']}, {r['precision']}, trains at {r['train_size'][0]}x{r['train_size'][1]}"),
        ("peak matmul GFLOP/s", f"float32 {p['matmul_float32']:.0f}, bfloat16 {p['matmul_bfloat16']:.0f}"),
        ("peak conv 3x3 GFLOP/s", f"float32 {p['conv3x3_float32']:.0f}, bfloat16 {p['conv3x3_bfloat16']:.0f}"),
        ("input pipeline", f"{r['pipeline_images_per_s']:.0f} images/s"),
        ("training", f"{r['train_images_per_s']:.2f} images/s ({r['train_step_s']:.2f} s/step)"),
        ("inference, 1242x375 frame", f"{r['infer_ms_per_frame']:.0f} ms"),
        ("forward GFLOP", f"{r['gflop_forward_train_size']:.1f} at train size, {r['gflop_infer_frame']:.1f} per frame"),
        ("achieved, training", f"{r['train_gflops_achieved']:.0f} GFLOP/s, {r['train_fraction_of_peak']:.0%} of peak"),
        ("achieved, inference", f"{r['infer_gflops_achieved']:.0f} GFLOP/s, {r['infer_fraction_of_peak']:.0%} of peak"),
        ("peak memory", f"{r['peak_rss_mib']:.0f} MiB RSS" + (f", GPU {r['peak_gpu_mib']:.0f} MiB" if r["peak_gpu_mib"] else "")),
    ]  # fmt: skip
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


UNITS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8")


def cpu_units() -> list[str]:
    """The vector and matrix units of this CPU that oneDNN's bfloat16 and int8 kernels use."""
    info = Path("/proc/cpuinfo")
    flags = next((line.split(":", 1)[1].split() for line in info.read_text().splitlines() if line.startswith("flags")),
                 []) if info.exists() else []  # fmt: skip
    return [u for u in UNITS if u in flags]


def kernels(overrides: list[str], steps: int = 3) -> list[dict]:
    """The oneDNN kernels that training steps run, and their share of oneDNN's time, from its verbose log.

    A child process runs one warm-up and `steps` training steps with ONEDNN_VERBOSE=1 (it must be set before
    oneDNN starts); each executed primitive is a line "...,exec,cpu,<kind>,<implementation>,<propagation>,
    ...,<ms>". The implementation names the instruction set: avx512_core_amx is AMX, avx512_core_bf16 is
    AVX-512 BF16, ref is a reference (slow) kernel; reorders are layout conversions.
    """
    code = f"import sys; from segnet.bench import kernel_steps; kernel_steps(sys.argv[1:], {steps})"
    env = {**os.environ, "ONEDNN_VERBOSE": "1"}
    out = subprocess.run([sys.executable, "-c", code, *overrides], capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"the oneDNN verbose run failed: {out.stderr[-2000:]}")
    times = collections.Counter()
    for line in out.stdout.splitlines():
        parts = line.split(",")
        if line.startswith("onednn_verbose") and len(parts) > 8 and parts[3] == "exec":
            times[(parts[5], parts[7], parts[6])] += float(parts[-1])
    total = sum(times.values()) or 1.0
    return [{"kind": k, "propagation": p, "kernel": i, "ms": ms, "share": ms / total}
            for (k, p, i), ms in times.most_common()]  # fmt: skip


def kernel_steps(overrides: list[str], steps: int) -> None:
    """The child of `kernels`: training steps of the configured model on one fixed batch."""
    from segnet.config import compose
    from segnet.train import compiled_model, set_precision, train_step

    cfg = compose(overrides)
    set_precision(cfg.trainer.precision)
    model = compiled_model(cfg, steps_per_epoch=100)
    h, w = cfg.dataset.train_size
    batch = (np.zeros((cfg.trainer.batch_size, h, w, 3), "float32"), np.ones((cfg.trainer.batch_size, h, w), "uint8"))
    step = train_step(tf.distribute.get_strategy(), model)
    batches = iter(tf.data.Dataset.from_tensors(batch).repeat())
    for _ in range(steps + 1):
        step(batches)


def kernel_table(rows: list[dict], top: int = 12) -> str:
    lines = [
        f"  {r['share']:5.1%}  {r['ms']:8.1f} ms  {r['kind']} {r['propagation']}: {r['kernel']}" for r in rows[:top]
    ]
    return "\n".join(["oneDNN kernels in training steps (share of oneDNN time):", *lines])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", type=Path, default=Path("outputs/bench.json"))
    ap.add_argument("--kernels", action="store_true", help="also list the oneDNN kernels a training step runs")
    ap.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    args, overrides = ap.parse_known_args(argv)

    from segnet import errors
    from segnet.config import check_overrides, compose
    from segnet.errors import ConfigError

    with errors.reported(args.debug):
        if problem := check_overrides(overrides):
            raise ConfigError(problem)
        result = run(compose(overrides), args.repeats)
    result["cpu"], result["units"] = cpu_name(), cpu_units()
    print(table(result))
    if args.kernels:
        result["kernels"] = kernels(overrides)
        print(kernel_table(result["kernels"]))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1))
    print(f"json: {args.json}")
    return 0


def cpu_name() -> str:
    info = Path("/proc/cpuinfo")
    lines = info.read_text().splitlines() if info.exists() else []
    name = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), "unknown CPU")
    return f"{name}, {os.cpu_count()} cores"


if __name__ == "__main__":
    sys.exit(main())
