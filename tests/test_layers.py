"""The teaching core, proven: transposed convolution shapes and adjointness, bilinear init, dense as conv (and back)."""

import re
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import ROOT

from segnet.layers import (
    PatchConv2D,
    bilinear_kernel,
    conv_output_size,
    dense_to_conv_kernel,
    format_table,
    shape_table,
    transposed_output_size,
    upsample,
)

# --- the tutorial's shape table ------------------------------------------------------------------------


def test_same_transposed_conv_doubles_and_strided_conv_takes_it_back():
    x = tf.ones((64, 7, 7, 256))
    assert keras.layers.Conv2DTranspose(128, 3, strides=2, padding="same")(x).shape == (64, 14, 14, 128)
    k = tf.ones((3, 3, 128, 256))
    y = tf.nn.conv2d_transpose(x, k, output_shape=(64, 14, 14, 128), strides=2, padding="SAME")
    assert y.shape == (64, 14, 14, 128)
    assert tf.nn.conv2d(y, k, strides=2, padding="SAME").shape == (64, 7, 7, 256)


def test_one_input_size_maps_back_to_several_which_is_why_output_shape_exists():
    image = tf.ones((64, 14, 14, 128))
    k = tf.ones((3, 3, 128, 256))
    small = tf.nn.conv2d(image, k, strides=3, padding="VALID")
    assert small.shape == (64, 4, 4, 256)
    assert keras.layers.Conv2DTranspose(128, 3, strides=3, padding="valid")(small).shape == (64, 12, 12, 128)
    back = tf.nn.conv2d_transpose(small, k, output_shape=(64, 14, 14, 128), strides=3, padding="VALID")
    assert back.shape == (64, 14, 14, 128)
    # 12, 13 and 14 all convolve down to 4: the transpose has to be told which one to give back.
    assert {conv_output_size(n, 3, 3, "valid") for n in (12, 13, 14)} == {4}
    for n in (12, 13, 14):
        shape = (64, n, n, 128)
        assert tf.nn.conv2d_transpose(small, k, output_shape=shape, strides=3, padding="VALID").shape == shape


@pytest.mark.parametrize("n", [1, 4, 7])
@pytest.mark.parametrize("k", [1, 2, 3, 4, 16])
@pytest.mark.parametrize("s", [1, 2, 3, 8])
@pytest.mark.parametrize("padding", ["same", "valid"])
def test_output_size_formula_matches_keras(n, k, s, padding):
    y = keras.layers.Conv2DTranspose(1, k, strides=s, padding=padding)(tf.ones((1, n, n, 1)))
    assert y.shape[1] == transposed_output_size(n, k, s, padding)


@pytest.mark.parametrize("k,s,p", [(3, 2, 0), (3, 2, 1), (4, 2, 1), (3, 3, 2), (5, 3, 1)])
@pytest.mark.parametrize("padding", ["same", "valid"])
def test_output_size_formula_with_output_padding_matches_keras(k, s, p, padding):
    layer = keras.layers.Conv2DTranspose(1, k, strides=s, padding=padding, output_padding=p)
    assert layer(tf.ones((1, 5, 5, 1))).shape[1] == transposed_output_size(5, k, s, padding, output_padding=p)


def test_doc_shows_the_numbers_the_command_prints():
    printed = subprocess.run(
        [sys.executable, "-m", "segnet.layers"], capture_output=True, text=True, check=True, cwd=ROOT
    ).stdout
    assert printed.strip() == format_table(shape_table())
    doc = (ROOT / "docs" / "transposed_convolution.md").read_text()
    for line in printed.strip().splitlines():
        assert line in doc, f"docs/transposed_convolution.md is missing or has other numbers for:\n{line}"
    shapes = re.findall(r"\(\d+(?:, \d+)+\)$", printed, flags=re.M)
    assert shapes == [
        "(64, 14, 14, 128)", "(64, 14, 14, 128)", "(64, 7, 7, 256)", "(64, 4, 4, 256)",
        "(64, 12, 12, 128)", "(64, 14, 14, 128)", "(1, 8, 8, 1)", "(1, 9, 9, 1)",
    ]  # fmt: skip


# --- transpose means adjoint ---------------------------------------------------------------------------


@pytest.mark.parametrize("stride", [1, 2, 3])
@pytest.mark.parametrize("padding", ["SAME", "VALID"])
def test_transposed_conv_is_the_adjoint_and_the_gradient_of_conv(stride, padding):
    rng = np.random.default_rng(stride)
    x = tf.constant(rng.normal(size=(2, 11, 13, 3)), tf.float64)
    kernel = tf.constant(rng.normal(size=(3, 3, 3, 5)), tf.float64)  # (h, w, in, out) for conv2d
    cx = tf.nn.conv2d(x, kernel, stride, padding)
    y = tf.constant(rng.normal(size=cx.shape), tf.float64)
    # The same kernel read as (h, w, out, in) by conv2d_transpose: small y (5 channels) -> big (3 channels).
    ct_y = tf.nn.conv2d_transpose(y, kernel, x.shape, stride, padding)
    lhs, rhs = tf.reduce_sum(cx * y), tf.reduce_sum(x * ct_y)
    assert abs(float(lhs - rhs)) <= 1e-4 * abs(float(lhs))

    with tf.GradientTape() as tape:
        tape.watch(x)
        inner = tf.reduce_sum(tf.nn.conv2d(x, kernel, stride, padding) * y)
    np.testing.assert_allclose(tape.gradient(inner, x), ct_y, rtol=1e-10, atol=1e-10)


# --- bilinear upsampling -------------------------------------------------------------------------------


def test_bilinear_kernel_values():
    k = bilinear_kernel(4, 1)[:, :, 0, 0]
    np.testing.assert_allclose(k[0], np.outer([0.25, 0.75, 0.75, 0.25], [0.25, 0.75, 0.75, 0.25])[0])
    assert k.shape == (4, 4)
    two = bilinear_kernel(4, 2)
    assert not two[:, :, 0, 1].any() and not two[:, :, 1, 0].any()  # channels do not mix


@pytest.mark.parametrize("stride", [2, 8, 32])
def test_upsample_layer_starts_as_bilinear_interpolation_of_a_ramp(stride):
    n = 8
    yy, xx = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    ramp = np.stack([3.0 * yy + 1.5 * xx, -2.0 * xx + 0.5 * yy + 7], -1)[None].astype("float32")
    up = upsample(2, stride, name="up")(ramp)
    assert up.shape == (1, n * stride, n * stride, 2)
    ref = tf.image.resize(ramp, (n * stride, n * stride), method="bilinear")
    # Away from the border (where the transposed conv sees zeros beyond the image) the two agree exactly.
    inner = slice(stride, (n - 1) * stride)
    np.testing.assert_allclose(np.asarray(up)[:, inner, inner], np.asarray(ref)[:, inner, inner], atol=1e-4)


# --- dense as conv -------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape,units", [((1, 4, 4, 1), 1), ((2, 5, 6, 64), 32)])
def test_dense_on_every_pixel_is_a_1x1_conv(shape, units):
    x = np.random.default_rng(0).normal(size=shape).astype("float32")
    dense = keras.layers.Dense(units)
    dense.build((None, shape[-1]))
    kernel, bias = dense.get_weights()
    conv = keras.layers.Conv2D(units, 1)
    conv.build(shape)
    conv.set_weights([dense_to_conv_kernel(kernel), bias])
    per_pixel = np.asarray(dense(x.reshape(-1, shape[-1]))).reshape(*shape[:3], units)
    np.testing.assert_allclose(np.asarray(conv(x)), per_pixel, atol=1e-6)


def test_convolutionalized_classifier_gives_the_same_logits_and_slides_on_bigger_images():
    rng = np.random.default_rng(0)
    features = keras.Sequential(
        [keras.Input((224, 224, 3)), keras.layers.Conv2D(8, 3, 4), keras.layers.MaxPooling2D(8)]
    )
    assert features.output_shape == (None, 7, 7, 8)
    dense = keras.Sequential(
        [keras.Input((7, 7, 8)), keras.layers.Flatten(), keras.layers.Dense(16, "relu"), keras.layers.Dense(10)]
    )
    fc1, fc2 = dense.layers[1], dense.layers[2]
    conv = keras.Sequential(
        [keras.Input((None, None, 8)), keras.layers.Conv2D(16, 7, activation="relu"), keras.layers.Conv2D(10, 1)]
    )
    conv.layers[0].set_weights([dense_to_conv_kernel(fc1.kernel.numpy(), (7, 7)), fc1.bias.numpy()])
    conv.layers[1].set_weights([dense_to_conv_kernel(fc2.kernel.numpy()), fc2.bias.numpy()])

    image = rng.uniform(size=(3, 224, 224, 3)).astype("float32")
    f = features(image)
    np.testing.assert_allclose(np.asarray(conv(f))[:, 0, 0], np.asarray(dense(f)), rtol=1e-5, atol=1e-5)
    # On a wider map the same weights slide: one class score per 7x7 window.
    assert conv(tf.ones((1, 9, 12, 8))).shape == (1, 3, 6, 10)
    assert dense_to_conv_kernel(np.zeros((392, 16)), (7, 7)).shape == (7, 7, 8, 16)
    with pytest.raises(ValueError, match="7x7"):
        dense_to_conv_kernel(np.zeros((100, 16)), (7, 7))


@pytest.mark.parametrize("kernel", [1, 2, 3, 7])
@pytest.mark.parametrize("shape", [(2, 5, 18, 6), (1, 3, 2, 4), (1, 1, 1, 3)])
def test_a_convolution_is_a_dense_layer_over_each_pixels_patch(kernel, shape):
    """PatchConv2D (im2col + one matrix product) computes Conv2D's outputs and gradients with Conv2D's weights,
    also where the kernel is larger than the map (fc6's 7x7 on a pool5 of a few pixels) and for even kernels."""
    x = tf.constant(np.random.default_rng(kernel).normal(size=shape).astype("float32"))
    conv, patch = keras.layers.Conv2D(5, kernel, padding="same"), PatchConv2D(5, kernel, padding="same")
    conv.build(shape)
    patch.build(shape)
    weights = [np.random.default_rng(1).normal(size=w.shape).astype("float32") for w in conv.get_weights()]
    results = []
    for layer in (conv, patch):
        layer.set_weights(weights)
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x)
            loss = tf.reduce_sum(y * tf.range(5, dtype=tf.float32))
        results.append([y, *tape.gradient(loss, [x, layer.kernel])])
    for a, b in zip(*results, strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)


def test_patch_conv_refuses_what_it_does_not_compute():
    for kwargs in ({"strides": 2}, {"dilation_rate": 2}, {"padding": "valid"}):
        with pytest.raises(ValueError, match="PatchConv2D"):
            PatchConv2D(4, 3, **({"padding": "same"} | kwargs))
    assert PatchConv2D(4, 1, padding="valid").kernel_size == (1, 1)  # a 1x1 kernel pads nothing either way
