"""FCN-32s, FCN-16s and FCN-8s (Long, Shelhamer, Darrell 2015) on a VGG16 encoder.

    image -> VGG16 blocks 1-5 -> fc6 (7x7 conv) -> fc7 (1x1 conv) -> score_fr (1x1 conv)   [1/32 scale]
    FCN-32s: score_fr -> upsample x32
    FCN-16s: score_fr -> x2 -> + score_pool4 -> x16
    FCN-8s:  score_fr -> x2 -> + score_pool4 -> x2 -> + score_pool3 -> x8

fc6/fc7 are VGG16's dense layers rewritten as convolutions (segnet/layers.py explains why that is exact),
so the network takes an image of any size and returns a score map instead of one label. The upsampling
layers are transposed convolutions initialised to bilinear interpolation, then learned (or kept bilinear,
learn_upsampling=False, as the reference Caffe FCNs do).

The model takes raw RGB in [0, 255] and returns float32 logits of shape (B, H, W, num_classes) for any H and
W: it pads the input to a multiple of 32 (so every pooling halves exactly and every skip lines up) and crops
the scores back to the input size.
"""

from pathlib import Path

import keras
import numpy as np
import tensorflow as tf
from keras import layers, ops

from segnet import runs
from segnet.errors import ConfigError
from segnet.layers import PatchConv2D, transposed_output_size, upsample, vgg16_fc_to_conv

VGG16_BLOCKS = [(64, 2), (128, 2), (256, 3), (512, 3), (512, 3)]  # (channels, convs) per block
FC_CHANNELS = 4096
# Caffe VGG16 preprocessing (BGR, mean subtracted, no scaling): ImageNet weights expect exactly this.
BGR_MEAN = np.array([103.939, 116.779, 123.68], dtype="float32")
STRIDE = 32  # five 2x2 poolings
ROAD_CLASSES = (("non-road", (255, 0, 0)), ("road", (255, 0, 255)))  # KITTI's two, in its ground-truth colours


def scaled_size(x, scale):
    """(H, W) of image batch x after scaling by scale = (sy, sx), as int32 tensors."""
    h, w = ops.shape(x)[1], ops.shape(x)[2]
    return tuple(ops.cast(ops.round(ops.cast(n, "float32") * s), "int32") for n, s in ((h, scale[0]), (w, scale[1])))


def resize_weights(n_in, n_out):
    """(n_out, n_in) triangle-filter weights: bilinear when enlarging, antialiased when shrinking.

    The same filter as PIL's BILINEAR resize, which made the training frames, and as tf.image.resize with
    antialias=True; written as two matrix products so that ONNX and TFLite can run it.
    """
    n_in_f, n_out_f = ops.cast(n_in, "float32"), ops.cast(n_out, "float32")
    scale = n_out_f / n_in_f
    support = ops.maximum(1.0 / scale, 1.0)  # the filter's half-width, in input pixels
    centre = (ops.cast(ops.arange(n_out), "float32") + 0.5) / scale - 0.5
    dist = ops.abs(ops.cast(ops.arange(n_in), "float32")[None, :] - centre[:, None])
    w = ops.relu(1.0 - dist / support)
    return w / ops.sum(w, axis=1, keepdims=True)


def resize(x, size):
    """Resize a (B, H, W, C) batch to size = (h, w) with resize_weights along each axis."""
    wy, wx = resize_weights(ops.shape(x)[1], size[0]), resize_weights(ops.shape(x)[2], size[1])
    return ops.einsum("pw,bowc->bopc", wx, ops.einsum("oh,bhwc->bowc", wy, x))


@keras.saving.register_keras_serializable(package="segnet")
class Preprocess(layers.Layer):
    """RGB [0, 255] -> scaled to the training scale -> mean-subtracted BGR, zero-padded to a multiple of 32.

    `scale` (sy, sx) is the factor the training frames were resized by (1, 1 when trained at native scale),
    so a model trained on 160x576 resized KITTI frames sees a full 375x1242 frame at the scale it learned.
    Zero after mean subtraction is the mean colour, the most neutral padding for the encoder.
    """

    def __init__(self, scale=(1.0, 1.0), **kwargs):
        super().__init__(**kwargs)
        self.scale = tuple(float(s) for s in scale)

    def call(self, x):
        x = ops.cast(x, self.compute_dtype)
        if self.scale != (1.0, 1.0):
            x = resize(x, scaled_size(x, self.scale))
        x = ops.flip(x, axis=-1) - BGR_MEAN
        h, w = ops.shape(x)[1], ops.shape(x)[2]
        # (STRIDE - n % STRIDE) % STRIDE, not (-n) % STRIDE: ONNX's Mod differs from Python's on negatives.
        ph, pw = (STRIDE - h % STRIDE) % STRIDE, (STRIDE - w % STRIDE) % STRIDE
        x = ops.pad(x, [[0, 0], [0, ph], [0, pw], [0, 0]])
        return ops.reshape(x, (-1, h + ph, w + pw, 3))  # a dynamic pad forgets the channels; TFLite needs them

    def compute_output_shape(self, shape):
        if self.scale != (1.0, 1.0):
            return (shape[0], None, None, shape[3])
        up = lambda n: None if n is None else -(-n // STRIDE) * STRIDE  # noqa: E731
        return (shape[0], up(shape[1]), up(shape[2]), shape[3])

    def get_config(self):
        return {**super().get_config(), "scale": self.scale}


@keras.saving.register_keras_serializable(package="segnet")
class CropLike(layers.Layer):
    """Crop the scores computed on the padded image, and scale them back to the input's exact pixel grid.

    It also keeps what its channels mean, `classes` ((name, RGB colour) per class), so that a model file
    alone tells infer.py how to name and draw its outputs.
    """

    def __init__(self, scale=(1.0, 1.0), classes=ROAD_CLASSES, **kwargs):
        super().__init__(**kwargs)
        self.scale = tuple(float(s) for s in scale)
        self.classes = tuple((str(name), tuple(int(v) for v in colour)) for name, colour in classes)

    def call(self, scores, image):
        h, w = ops.shape(image)[1], ops.shape(image)[2]
        if self.scale == (1.0, 1.0):
            return scores[:, :h, :w, :]
        sh, sw = scaled_size(image, self.scale)
        return tf.image.resize(scores[:, :sh, :sw, :], (h, w))

    def compute_output_shape(self, scores_shape, image_shape):
        return (scores_shape[0], image_shape[1], image_shape[2], scores_shape[3])

    def get_config(self):
        return {**super().get_config(), "scale": self.scale, "classes": [[n, list(c)] for n, c in self.classes]}


@keras.saving.register_keras_serializable(package="segnet")
class RowPrior(layers.Layer):
    """Adds to every pixel's class scores a learned offset that depends only on its height in the frame.

    The camera is fixed, so a pixel's row says something that its neighbourhood cannot: KITTI's road polygons
    stop two or three rows above the frame's bottom edge, which are labelled non-road under plain asphalt
    (docs/kitti.md, "Where the errors are"). A convolution sees only the edge of its input, and a training crop
    cut from a scaled frame puts that edge anywhere, so the network never learns where the frame ends. This
    layer is told: `rows` is each output row's height as a fraction of its frame (0 top, 1 bottom), given by
    the data pipeline for a training crop and, when omitted, that of a whole frame (what inference sees). The
    offset is a piecewise-linear function of it with KNOTS knots per class, zero at the start.
    """

    KNOTS = 128  # 3 native KITTI rows apart: the bottom edge's band is two or three rows high
    GAIN = 10.0  # Adam moves a weight about lr a step; a few logits in a few thousand steps need this

    def build(self, logits_shape, rows_shape=None):
        self.row_bias = self.add_weight(shape=(self.KNOTS, logits_shape[-1]), initializer="zeros", name="row_bias")

    def call(self, logits, rows=None):
        if rows is None:
            h = ops.shape(logits)[1]
            rows = ((ops.cast(ops.arange(h), "float32") + 0.5) / ops.cast(h, "float32"))[None, :]
        t = ops.clip(ops.cast(rows, "float32"), 0.0, 1.0) * (self.KNOTS - 1)
        hats = ops.relu(1.0 - ops.abs(t[..., None] - ops.cast(ops.arange(self.KNOTS), "float32")))  # (B, H, KNOTS)
        offset = ops.einsum("bhk,kc->bhc", hats, self.row_bias) * self.GAIN
        return logits + offset[:, :, None, :]

    def compute_output_shape(self, logits_shape, rows_shape=None):
        return logits_shape


@keras.saving.register_keras_serializable(package="segnet")
class BatchNorm(layers.BatchNormalization):
    """Keras' BatchNormalization, computed in training by TensorFlow's fused kernel: the same numbers, faster.

    Keras casts a bfloat16 map to float32 and takes its moments, normalises and casts back in separate
    passes; on the full-resolution maps of blocks 1 and 2 that was a fifth of a CPU training step. The fused
    kernel reads bfloat16 and keeps its statistics in float32 in one pass each way. Inference and export use
    Keras' own path, so a saved model computes exactly what a BatchNormalization would.
    """

    def call(self, inputs, training=None, mask=None):
        if not (training and self.trainable) or mask is not None or self.axis not in (-1, len(inputs.shape) - 1):
            return super().call(inputs, training=training, mask=mask)
        y, mean, variance = tf.compat.v1.nn.fused_batch_norm(
            inputs, self.gamma, self.beta, epsilon=self.epsilon, is_training=True
        )
        # The fused kernel returns the unbiased (n - 1) variance; Keras keeps the batch's biased one.
        n = ops.cast(ops.size(inputs) // ops.shape(inputs)[-1], "float32")
        variance = variance * (n - 1.0) / n
        self.moving_mean.assign(self.moving_mean * self.momentum + mean * (1.0 - self.momentum))
        self.moving_variance.assign(self.moving_variance * self.momentum + variance * (1.0 - self.momentum))
        return ops.cast(y, self.compute_dtype)


def fcn(
    name: str = "fcn8",
    classes=ROAD_CLASSES,
    width: float = 1.0,
    fc6_kernel: int = 7,
    batch_norm: bool = True,
    dropout: float = 0.5,
    learn_upsampling: bool = True,
    skip_scale: float = 1.0,
    row_prior: bool = False,
    global_context: bool = False,
    weights: str | None = None,
    input_scale: tuple[float, float] = (1.0, 1.0),
) -> keras.Model:
    if name not in ("fcn8", "fcn16", "fcn32"):
        raise ConfigError(f"model.name={name!r}: use fcn8, fcn16 or fcn32")
    num_classes = len(classes)
    ch = lambda n: max(1, round(n * width))  # noqa: E731

    image = keras.Input((None, None, 3), name="image")
    x = Preprocess(input_scale, dtype="float32", name="preprocess")(image)
    pools = []
    for b, (channels, convs) in enumerate(VGG16_BLOCKS, start=1):
        for i in range(1, convs + 1):
            # With batch norm the conv bias is redundant (BN's beta takes its role).
            x = layers.Conv2D(ch(channels), 3, padding="same", use_bias=not batch_norm, name=f"block{b}_conv{i}")(x)
            if batch_norm:
                x = BatchNorm(name=f"block{b}_bn{i}")(x)
            x = layers.ReLU(name=f"block{b}_relu{i}")(x)
        x = layers.MaxPooling2D(2, name=f"block{b}_pool")(x)
        pools.append(x)
    pool3, pool4, pool5 = pools[2], pools[3], pools[4]

    # fc6/fc7: VGG16's classifier as convolutions, so it slides over the image instead of seeing one crop.
    # They and the 1x1 score layers run as matrix products (PatchConv2D): on a CPU several times faster, and
    # on AMX oneDNN's 1x1 convolution from 4096 channels to 2 (score_fr at width 1.0) corrupts the heap.
    fc6_activation = None if global_context else "relu"
    x = PatchConv2D(ch(FC_CHANNELS), fc6_kernel, padding="same", activation=fc6_activation, name="fc6")(pool5)
    if global_context:
        # ParseNet's global context: a frame's mean pool5 feature, through a dense layer (a 1x1 convolution on a
        # 1x1 map), joins every position's fc6 before its ReLU, since a convolution's effective receptive field
        # is far smaller than its nominal one. Zero at the start, so training begins from the plain network.
        g = layers.GlobalAveragePooling2D(keepdims=True, name="context_pool")(pool5)
        g = PatchConv2D(ch(FC_CHANNELS), 1, use_bias=False, kernel_initializer="zeros", name="context")(g)
        x = layers.ReLU(name="fc6_relu")(layers.Add(name="fc6_context")([x, g]))
    x = layers.Dropout(dropout, name="drop6")(x)
    x = PatchConv2D(ch(FC_CHANNELS), 1, activation="relu", name="fc7")(x)
    x = layers.Dropout(dropout, name="drop7")(x)
    scores = PatchConv2D(num_classes, 1, name="score_fr")(x)

    # Skip scores start at zero, so training begins from the coarser net and learns to add detail,
    # as in the paper's staged FCN-32s -> 16s -> 8s training.
    # `side` follows a nominal 224-pixel input through the decoder: every transposed convolution must
    # land exactly on the pooled map it is fused with, and the last one on the input.
    side = {8: 224 // 8, 16: 224 // 16, 32: 224 // 32, 1: 224}

    def up(x, stride, scale, layer_name):
        layer = upsample(num_classes, stride, name=layer_name, trainable=learn_upsampling)
        got = transposed_output_size(side[scale], layer.kernel_size[0], stride, layer.padding)
        if got != side[scale // stride]:
            raise AssertionError(
                f"{layer_name}: {side[scale]} -> {got}, but the map it meets is {side[scale // stride]}"
            )
        return layer(x)

    def fuse(x, pool, layer_name):
        if skip_scale != 1:
            # Under Adam a weight's step does not depend on its gradient's scale, so a skip fed c times its
            # features moves its scores c times slower: the reference FCN-8s's 0.01 (pool4) and 1e-4 (pool3)
            # were tuned for SGD, where the step shrinks with c too (docs/kitti.md, "The skips' starting scale").
            pool = layers.Rescaling(skip_scale, name=f"scale_{layer_name}")(pool)
        skip = PatchConv2D(num_classes, 1, kernel_initializer="zeros", name=f"score_{layer_name}")(pool)
        return layers.Add(name=f"fuse_{layer_name}")([x, skip])

    if name == "fcn32":
        scores = up(scores, 32, 32, "upscore32")
    elif name == "fcn16":
        scores = fuse(up(scores, 2, 32, "upscore2"), pool4, "pool4")
        scores = up(scores, 16, 16, "upscore16")
    else:
        scores = fuse(up(scores, 2, 32, "upscore2"), pool4, "pool4")
        scores = fuse(up(scores, 2, 16, "upscore_pool4"), pool3, "pool3")
        scores = up(scores, 8, 8, "upscore8")
    logits = CropLike(input_scale, classes, dtype="float32", name="logits")(scores, image)
    if row_prior:
        logits = RowPrior(dtype="float32", name="row_prior")(logits)
    model = keras.Model(image, logits, name=name)
    if weights:
        load_vgg16_weights(model, weights)
    return model


def load_vgg16_weights(model: keras.Model, weights: str) -> None:
    """Fill the encoder (and fc6/fc7 where the source has them) from keras.applications.VGG16.

    `weights` is "imagenet" (downloaded by Keras) or a path to a VGG16 .h5 file, with or without the top.
    """
    if model.get_layer("block1_conv1").filters != 64:
        raise ConfigError("VGG16 weights need model.width=1.0")
    vgg = None
    for include_top in (True, False):
        try:
            vgg = keras.applications.VGG16(include_top=include_top, weights=weights)
            break
        except ValueError:
            continue
    if vgg is None:
        raise ConfigError(f"model.weights={weights!r}: not 'imagenet' nor a readable VGG16 .h5 file")
    for b, (_, convs) in enumerate(VGG16_BLOCKS, start=1):
        for i in range(1, convs + 1):
            src, dst = vgg.get_layer(f"block{b}_conv{i}"), model.get_layer(f"block{b}_conv{i}")
            kernel, bias = src.get_weights()
            dst.set_weights([kernel, bias] if dst.use_bias else [kernel])
            if not dst.use_bias:  # batch norm follows: carry the bias over as its beta
                bn = model.get_layer(f"block{b}_bn{i}")
                gamma, _, mean, var = bn.get_weights()
                bn.set_weights([gamma, bias, mean, var])
    if any(layer.name == "fc1" for layer in vgg.layers):
        if model.get_layer("fc6").kernel_size != (7, 7):
            raise ConfigError("ImageNet fc6 weights need model.fc6_kernel=7")
        for name, (kernel, bias) in vgg16_fc_to_conv(vgg).items():
            model.get_layer(name).set_weights([kernel, bias])


HEADS = ("score_", "upscore")  # the layers whose shapes follow the number of classes


def init_from(model: keras.Model, source) -> tuple[list[str], list[str]]:
    """Start from a trained model (model.init): every layer whose name and weight shapes match is copied.

    source is a run folder or a .keras file. The class-score layers (HEADS) of another class count, or that
    the source lacks (FCN-32s into FCN-8s), keep their fresh initialisation; any other layer that does not
    match means another architecture, an error naming those layers. Returns (loaded, re-initialised) names.
    """
    path = runs.model_path(source)
    if path.suffix != ".keras":
        raise ConfigError(f"model.init={source}: give a run folder or a .keras checkpoint, not an export")
    try:
        src = keras.models.load_model(path, compile=False)
    except Exception as e:  # a damaged file or another program's model fails inside Keras
        raise ConfigError(f"model.init={source}: {path} is not a readable segnet model ({e})") from None
    shapes = lambda layer: [tuple(w.shape) for w in layer.weights]  # noqa: E731
    theirs = {layer.name: layer for layer in src.layers}
    loaded, fresh, unmatched = [], [], []
    for layer in (layer for layer in model.layers if layer.weights):
        other = theirs.get(layer.name)
        if other is not None and shapes(other) == shapes(layer):
            layer.set_weights(other.get_weights())
            loaded.append(layer.name)
        elif layer.name.startswith(HEADS):
            fresh.append(layer.name)
        else:
            unmatched.append(f"{layer.name} {shapes(layer)} vs {shapes(other) if other else 'none'}")
    if unmatched:
        raise ConfigError(
            f"model.init={source}: {path} is another architecture; {len(unmatched)} layer(s) could not be matched "
            f"(this model's weight shapes vs the file's): {'; '.join(unmatched[:4])}"
            f"{' ...' if len(unmatched) > 4 else ''}. Use the model.width, fc6_kernel and batch_norm it was trained with"
        )
    print(f"model.init: {len(loaded)} layers loaded from {path} ({', '.join(loaded)}); "
          f"re-initialised: {', '.join(fresh) or 'none'}")  # fmt: skip
    return loaded, fresh


def auto_precision() -> str:
    """bfloat16 on CPUs that run it natively (AVX512-BF16, AMX), float16 on GPUs from Volta on, else float32."""
    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        cc = tf.config.experimental.get_device_details(gpus[0]).get("compute_capability", (0, 0))
        return "float16" if cc >= (7, 0) else "float32"
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    return "bfloat16" if ("avx512_bf16" in flags or "amx_bf16" in flags) else "float32"


POLICIES = {"float32": "float32", "bfloat16": "mixed_bfloat16", "float16": "mixed_float16"}


def with_precision(model: keras.Model, precision: str) -> keras.Model:
    """The same network and weights computing in another precision, for inference: float32 for exports,
    bfloat16 for speed.

    Preprocessing, the upsampling and the logits stay float32 whatever the rest does, and so do batch norm's
    statistics. In bfloat16 the convolutions keep their kernels in bfloat16: mixed precision would round them
    so at every call (fc6's 26 M weights: a quarter of a frame's time), which gives the same numbers.
    """
    config = model.get_config()
    for layer in config["layers"]:
        dtype = layer["config"].get("dtype")
        if not isinstance(dtype, dict) or layer["name"] in ("preprocess", "logits", "row_prior"):
            continue
        if layer["class_name"] == "Conv2DTranspose":  # segnet.layers.upsample says why
            dtype["config"]["name"] = "float32"
        else:
            mixed = layer["class_name"] in ("BatchNorm", "BatchNormalization") or precision == "float32"
            dtype["config"]["name"] = POLICIES[precision] if mixed else precision
    copy = keras.Model.from_config(config)
    copy.set_weights(model.get_weights())
    return copy


def classes_of(model: keras.Model) -> tuple:
    """((name, colour), ...) of the classes a segnet model predicts, in the order of its outputs."""
    return model.get_layer("logits").classes


def build(cfg, classes=ROAD_CLASSES, input_scale=(1.0, 1.0)) -> keras.Model:
    """The model named by the config's `model` group, for these classes; input_scale as in Preprocess."""
    return fcn(
        str(cfg.name),  # a plain string: the model's name is saved in its files
        classes,
        width=cfg.width,
        fc6_kernel=cfg.fc6_kernel,
        batch_norm=cfg.batch_norm,
        dropout=cfg.dropout,
        learn_upsampling=cfg.learn_upsampling,
        skip_scale=cfg.skip_scale,
        row_prior=cfg.row_prior,
        global_context=cfg.global_context,
        weights=cfg.weights,
        input_scale=input_scale,
    )
