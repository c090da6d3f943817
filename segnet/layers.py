"""The two ideas FCN is built from: transposed convolution, and a dense layer as a convolution.

Transposed convolution. A strided convolution is a linear map C from a big image x to a small one,
C x. Its transpose (adjoint) C^T goes the other way, small to big, and is defined by
<C x, y> = <x, C^T y> for all x and y. That is all "transposed convolution" means: not an inverse, and
nothing to do with "deconvolution". It is also the gradient of the convolution with respect to its input,
which is how TensorFlow computes it. Because a stride-s convolution maps several input sizes to the same
output size (with 3x3 VALID and stride 3, 12, 13 and 14 all give 4), the transpose cannot know which size
to return: `tf.nn.conv2d_transpose` asks for `output_shape`, Keras picks a default (see
`transposed_output_size`) and takes `output_padding` to choose another.

Dense as convolution. A Dense layer applied at every pixel is a 1x1 convolution with the same kernel,
reshaped to (1, 1, in, out). A Dense layer applied to a flattened 7x7xC map is a 7x7 VALID convolution:
on a 7x7 input it gives the same numbers, and on a bigger input it slides, giving a map of scores instead of
one. So VGG16's classifier becomes FCN's fc6 (7x7) and fc7 (1x1), and the net accepts any image size.
The converse holds too, and `PatchConv2D` computes fc6, fc7 and the score layers that way: a kxk
convolution is a dense layer applied to every pixel's kxk neighbourhood, flattened (im2col), one matrix
product for the whole map.

`python -m segnet.layers` prints the shape table of docs/transposed_convolution.md, computed live.
"""

import keras
import numpy as np
from keras import ops


def conv_output_size(n: int, kernel: int, stride: int, padding: str) -> int:
    """Size of a convolution's output along one axis, as TensorFlow computes it."""
    if padding == "same":
        return -(-n // stride)
    if padding == "valid":
        return (n - kernel) // stride + 1
    raise ValueError(f"padding={padding!r}: use 'same' or 'valid'")


def transposed_output_size(n: int, kernel: int, stride: int, padding: str, output_padding: int | None = None) -> int:
    """Size of a Keras Conv2DTranspose's output along one axis.

    The transpose of a convolution that maps m -> n. Several m do, so Keras picks one:
      VALID: n * s + max(k - s, 0), i.e. (n - 1) * s + k whenever k >= s (the largest m);
      SAME:  n * s (the largest m with ceil(m / s) == n).
    With output_padding p (0 <= p < s) the size is (n - 1) * s + k - 2 * pad + p, pad = 0 (VALID) or k // 2 (SAME).
    """
    if padding not in ("same", "valid"):
        raise ValueError(f"padding={padding!r}: use 'same' or 'valid'")
    if output_padding is None:
        return n * stride + (max(kernel - stride, 0) if padding == "valid" else 0)
    pad = kernel // 2 if padding == "same" else 0
    return (n - 1) * stride + kernel - 2 * pad + output_padding


def bilinear_kernel(size: int, channels: int) -> np.ndarray:
    """A (size, size, channels, channels) kernel that makes a transposed convolution upsample bilinearly.

    Each channel is upsampled on its own (the kernel is diagonal in channels). With size = 2 * stride and
    SAME padding the weights fall on the half-pixel grid that `tf.image.resize(method="bilinear")` uses.
    """
    factor = (size + 1) // 2
    centre = factor - 1 if size % 2 == 1 else factor - 0.5
    ramp = 1 - np.abs(np.arange(size) - centre) / factor
    kernel = np.zeros((size, size, channels, channels), dtype="float32")
    kernel[:, :, np.arange(channels), np.arange(channels)] = np.outer(ramp, ramp)[..., None]
    return kernel


@keras.saving.register_keras_serializable(package="segnet")
class BilinearUpsampling(keras.initializers.Initializer):
    """Initialiser for a square Conv2DTranspose kernel (k, k, out, in) with out == in: bilinear upsampling."""

    def __call__(self, shape, dtype=None):
        k, k2, out, inp = shape
        if k != k2 or out != inp:
            raise ValueError(f"bilinear init needs a square kernel and as many outputs as inputs, got {shape}")
        return keras.ops.convert_to_tensor(bilinear_kernel(k, out), dtype=dtype)


def upsample(filters: int, stride: int, name: str, trainable: bool = True) -> keras.layers.Conv2DTranspose:
    """FCN's upsampling layer: a stride-s transposed convolution, kernel 2s, starting as bilinear interpolation.

    It computes in float32 whatever the model's precision: it is cheap (one channel per class), and its
    gradient is a stride-s convolution, which oneDNN's AMX bfloat16 kernels (TensorFlow 2.21) get wrong for a
    16x16 kernel of stride 8 on 4, 6 or 8 channels: FCN-8s with that many classes did not learn on AMX.
    """
    return keras.layers.Conv2DTranspose(
        filters,
        2 * stride,
        strides=stride,
        padding="same",
        use_bias=False,
        kernel_initializer=BilinearUpsampling(),
        trainable=trainable,
        dtype="float32",
        name=name,
    )


def dense_to_conv_kernel(kernel: np.ndarray, spatial: tuple[int, int] = (1, 1)) -> np.ndarray:
    """A Dense kernel (in, out) as a Conv2D kernel (h, w, in / (h * w), out).

    (1, 1): the dense layer applied at every pixel. (7, 7): a dense layer that read a Flatten()ed 7x7xC map
    (Keras flattens channels-last maps row by row, so a plain reshape puts every weight at its pixel).
    """
    n_in, n_out = kernel.shape
    h, w = spatial
    if n_in % (h * w):
        raise ValueError(f"a dense kernel with {n_in} inputs cannot read a {h}x{w} map")
    return kernel.reshape(h, w, n_in // (h * w), n_out)


@keras.saving.register_keras_serializable(package="segnet")
class PatchConv2D(keras.layers.Conv2D):
    """A stride-1 SAME Conv2D computed as one matrix product over k x k patches (im2col): a dense layer per pixel.

    Same kernel (k, k, in, out), same numbers, same saved weights as Conv2D. Why: fc6, fc7 and score_fr run on
    pool5, a map of a few dozen pixels with hundreds to thousands of channels, where oneDNN's convolution kernels
    (the backward-weights pass and the kernel's layout reorders above all) run far below the CPU's matrix
    peak, while a matrix product of the same FLOPs runs near it (python -m segnet.bench, README: Performance).
    The patches cost k * k times the input map's memory, which pool5 makes small.
    """

    def __init__(self, filters, kernel_size, **kwargs):
        super().__init__(filters, kernel_size, **kwargs)
        if self.strides != (1, 1) or self.dilation_rate != (1, 1) or self.data_format != "channels_last":
            raise ValueError("PatchConv2D computes stride-1, undilated, channels-last convolutions only")
        if self.padding != "same" and self.kernel_size != (1, 1):
            raise ValueError("PatchConv2D pads SAME (a 1x1 kernel needs no padding)")

    def convolution_op(self, inputs, kernel):
        kh, kw, c, out = kernel.shape
        if (kh, kw) != (1, 1):
            h, w = ops.shape(inputs)[1], ops.shape(inputs)[2]
            # TensorFlow's SAME: the extra row or column of an even kernel goes after the input.
            padded = ops.pad(inputs, [[0, 0], [(kh - 1) // 2, kh // 2], [(kw - 1) // 2, kw // 2], [0, 0]])
            # Offsets in (row, column, channel) order: the order a (kh, kw, in, out) kernel flattens in.
            inputs = ops.concatenate([padded[:, i : i + h, j : j + w, :] for i in range(kh) for j in range(kw)], -1)
        return ops.matmul(inputs, ops.reshape(kernel, (kh * kw * c, out)))


def vgg16_fc_to_conv(vgg: keras.Model) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """VGG16's fc1/fc2 (include_top=True) as the kernels and biases of FCN's fc6 (7x7) and fc7 (1x1)."""
    fc1_kernel, fc1_bias = vgg.get_layer("fc1").get_weights()
    fc2_kernel, fc2_bias = vgg.get_layer("fc2").get_weights()
    return {
        "fc6": (dense_to_conv_kernel(fc1_kernel, (7, 7)), fc1_bias),
        "fc7": (dense_to_conv_kernel(fc2_kernel), fc2_bias),
    }


def shape_table() -> list[tuple[str, tuple[int, ...]]]:
    """The tutorial's shape examples, computed by TensorFlow: (what, output shape)."""
    import tensorflow as tf

    x = tf.ones((64, 7, 7, 256))
    image = tf.ones((64, 14, 14, 128))
    k = tf.ones((3, 3, 128, 256))  # conv2d_transpose kernels are (h, w, out, in)
    small = tf.nn.conv2d(image, k, strides=3, padding="VALID")
    four = tf.ones((1, 4, 4, 1))
    rows = [
        ("Conv2DTranspose(128, 3, strides=2, 'same')(ones(64, 7, 7, 256))", keras.layers.Conv2DTranspose(128, 3, 2, "same")(x)),
        ("conv2d_transpose(ones(64, 7, 7, 256), output_shape=(64, 14, 14, 128), strides=2, 'SAME')",
         tf.nn.conv2d_transpose(x, k, (64, 14, 14, 128), 2, "SAME")),
        ("conv2d(that, strides=2, 'SAME')", tf.nn.conv2d(tf.ones((64, 14, 14, 128)), k, 2, "SAME")),
        ("conv2d(ones(64, 14, 14, 128), 3x3, strides=3, 'VALID')", small),
        ("Conv2DTranspose(128, 3, strides=3, 'valid')(that)", keras.layers.Conv2DTranspose(128, 3, 3, "valid")(small)),
        ("conv2d_transpose(that, output_shape=(64, 14, 14, 128), strides=3, 'VALID')",
         tf.nn.conv2d_transpose(small, k, (64, 14, 14, 128), 3, "VALID")),
        ("Conv2DTranspose(1, 1, strides=2, 'valid')(ones(1, 4, 4, 1))", keras.layers.Conv2DTranspose(1, 1, 2, "valid")(four)),
        ("Conv2DTranspose(1, 3, strides=2, 'valid')(ones(1, 4, 4, 1))", keras.layers.Conv2DTranspose(1, 3, 2, "valid")(four)),
    ]  # fmt: skip
    return [(what, tuple(int(d) for d in y.shape)) for what, y in rows]


def format_table(rows) -> str:
    width = max(len(what) for what, _ in rows)
    return "\n".join(f"{what:<{width}}  ->  {shape}" for what, shape in rows)


if __name__ == "__main__":
    print(format_table(shape_table()))
