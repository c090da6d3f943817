import keras
import numpy as np
import pytest
import tensorflow as tf
from keras import ops

from segnet.layers import PatchConv2D
from segnet.model import BatchNorm, RowPrior, fcn


@pytest.mark.parametrize("name", ["fcn8", "fcn16", "fcn32"])
@pytest.mark.parametrize("hw", [(37, 101), (64, 96), (70, 33)])
def test_any_input_size_gives_scores_of_that_size(name, hw):
    model = fcn(name, width=1 / 16)
    x = np.random.default_rng(0).uniform(0, 255, (2, *hw, 3)).astype("float32")
    out = model.predict_on_batch(x)
    assert out.shape == (2, *hw, 2)
    assert out.dtype == np.float32
    assert np.isfinite(out).all()


def test_fcn8_wiring():
    model = fcn("fcn8", width=1 / 16)
    ups = [layer for layer in model.layers if isinstance(layer, keras.layers.Conv2DTranspose)]
    assert [u.strides[0] for u in ups] == [2, 2, 8]
    assert model.get_layer("fc6").kernel_size == (7, 7)
    assert model.get_layer("fc7").kernel_size == (1, 1)
    assert isinstance(model.get_layer("fc6"), PatchConv2D) and isinstance(model.get_layer("fc7"), PatchConv2D)
    assert model.get_layer("score_fr").kernel_size == (1, 1)
    names = {layer.name for layer in model.layers}
    assert {"score_pool4", "score_pool3", "fuse_pool4", "fuse_pool3"} <= names


def test_fused_batch_norm_trains_as_keras_batch_norm_does():
    """BatchNorm's fused training path: Keras' outputs, gradients and moving statistics (the biased variance)."""
    x = tf.constant(np.random.default_rng(0).normal(3.0, 2.0, (2, 6, 7, 5)).astype("float32"))
    results = []
    for layer in (keras.layers.BatchNormalization(momentum=0.5), BatchNorm(momentum=0.5)):
        layer.build(x.shape)
        layer.gamma.assign(np.linspace(0.5, 2.0, 5))
        layer.beta.assign(np.linspace(-1.0, 1.0, 5))
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x, training=True)
            loss = tf.reduce_sum(y * y * tf.range(5, dtype=tf.float32))
        grads = tape.gradient(loss, [x, layer.gamma, layer.beta])
        results.append([y, *grads, layer.moving_mean, layer.moving_variance, layer(x, training=False)])
    for a, b in zip(*results, strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("num_classes", [2, 4, 6, 8])
def test_bfloat16_gradients_follow_float32_for_any_number_of_classes(num_classes):
    """Mixed bfloat16 training computes the float32 gradients, to bfloat16's precision. On an AMX Xeon (TF 2.21)
    oneDNN's bfloat16 stride-8 convolution, upscore8's gradient, was wrong for 4, 6 and 8 channels: every
    weight upstream of it got a gradient off by about 100% (the upsampling now computes in float32)."""
    classes = [(str(i), (i, i, i)) for i in range(num_classes)]
    x = np.random.default_rng(0).uniform(0, 255, (2, 64, 96, 3)).astype("float32")
    grads = []
    for policy in ("float32", "mixed_bfloat16"):
        keras.mixed_precision.set_global_policy(policy)
        try:
            model = fcn("fcn8", classes, width=1 / 16)
        finally:
            keras.mixed_precision.set_global_policy("float32")
        if not grads:
            rng = np.random.default_rng(1)
            weights = [w + rng.normal(0, 0.05, w.shape).astype("float32") for w in model.get_weights()]  # skips on
        model.set_weights(weights)
        with tf.GradientTape() as tape:
            loss = ops.sum(ops.cast(model(x), "float32") * ops.arange(num_classes, dtype="float32"))
        kernels = [model.get_layer(n).kernel for n in ("score_pool3", "score_pool4", "upscore2")]
        grads.append([np.asarray(g, "float32") for g in tape.gradient(loss, kernels)])
    for g32, g16 in zip(*grads, strict=True):
        assert np.abs(g16 - g32).max() < 0.05 * np.abs(g32).max()


def test_skips_start_at_zero_so_fcn8_starts_as_fcn32_would():
    """Zero-initialised skip scores: at init FCN-8s adds nothing from pool3/pool4."""
    model = fcn("fcn8", width=1 / 16)
    for name in ("score_pool4", "score_pool3"):
        assert not np.any(model.get_layer(name).get_weights()[0])


def test_skip_scale_is_the_skip_kernels_times_that_scale():
    """skip_scale=c scales pool4/pool3 before their 1x1 score layers: the same function as kernels times c."""
    rng = np.random.default_rng(2)
    scaled, plain = fcn("fcn8", width=1 / 16, skip_scale=0.1), fcn("fcn8", width=1 / 16)
    plain.set_weights(scaled.get_weights())  # Rescaling has no weights: the lists line up
    for name in ("score_pool4", "score_pool3"):
        kernel, bias = scaled.get_layer(name).get_weights()
        kernel = rng.normal(size=kernel.shape).astype("float32")
        scaled.get_layer(name).set_weights([kernel, bias])
        plain.get_layer(name).set_weights([0.1 * kernel, bias])
    x = rng.uniform(0, 255, (1, 64, 96, 3)).astype("float32")
    np.testing.assert_allclose(scaled.predict_on_batch(x), plain.predict_on_batch(x), rtol=1e-4, atol=1e-4)


def test_under_adam_a_scaled_skip_takes_the_same_step_so_its_scores_move_that_much_slower():
    """Adam divides the gradient by its own size: pool4 times 0.1 gives a 10x smaller gradient and the same
    kernel step, so the skip's scores (0.1 x kernel x pool4) move 10x slower. Under SGD the step shrinks too."""
    rng = np.random.default_rng(3)
    x = rng.uniform(0, 255, (2, 64, 96, 3)).astype("float32")
    y = (rng.uniform(size=(2, 64, 96)) < 0.5).astype("int32")
    grad, steps = {}, {}
    for c in (1.0, 0.1):
        keras.utils.set_random_seed(0)
        model = fcn("fcn8", width=1 / 16, dropout=0.0, skip_scale=c)
        with tf.GradientTape() as tape:
            loss = ops.mean(keras.losses.sparse_categorical_crossentropy(y, model(x, training=True), from_logits=True))
        grads = tape.gradient(loss, model.trainable_variables)
        grad[c] = grads[[v.path for v in model.trainable_variables].index("score_pool4/kernel")].numpy()
        keras.optimizers.Adam(1e-3).apply_gradients(zip(grads, model.trainable_variables, strict=True))
        steps[c] = model.get_layer("score_pool4").get_weights()[0]  # from zero: this is the step
    np.testing.assert_allclose(grad[0.1], 0.1 * grad[1.0], rtol=1e-3, atol=1e-9)
    assert np.abs(steps[1.0]).max() > 5e-4
    np.testing.assert_allclose(steps[0.1], steps[1.0], atol=1e-5)


def test_padding_is_the_mean_colour_and_the_crop_is_exact():
    """A 50x50 image scores exactly like itself padded by hand with VGG's mean colour to 64x64, then cropped."""
    from segnet.model import BGR_MEAN

    model = fcn("fcn8", width=1 / 16)
    x = np.random.default_rng(1).uniform(0, 255, (1, 50, 50, 3)).astype("float32")
    padded = np.broadcast_to(BGR_MEAN[::-1], (1, 64, 64, 3)).copy()
    padded[:, :50, :50] = x
    np.testing.assert_allclose(model.predict_on_batch(x), model.predict_on_batch(padded)[:, :50, :50], atol=1e-4)


def test_unknown_variant_is_refused():
    with pytest.raises(ValueError, match="fcn8, fcn16 or fcn32"):
        fcn("fcn4")


def test_local_vgg16_h5_fills_encoder_and_fc_layers(tmp_path):
    vgg = keras.applications.VGG16(weights=None, include_top=True)
    path = tmp_path / "vgg16.weights.h5"
    vgg.save_weights(path)
    model = fcn("fcn8", width=1.0, batch_norm=False, weights=str(path))
    np.testing.assert_array_equal(
        model.get_layer("block3_conv2").get_weights()[0], vgg.get_layer("block3_conv2").get_weights()[0]
    )
    np.testing.assert_array_equal(model.get_layer("fc7").get_weights()[0][0, 0], vgg.get_layer("fc2").get_weights()[0])
    np.testing.assert_array_equal(
        model.get_layer("fc6").get_weights()[0].reshape(-1, 4096), vgg.get_layer("fc1").get_weights()[0]
    )


def test_vgg16_weights_refuse_a_narrow_model():
    with pytest.raises(ValueError, match="width=1.0"):
        fcn("fcn8", width=0.5, weights="imagenet")


def test_a_model_trained_on_resized_frames_predicts_native_frames_on_their_own_grid(tmp_path):
    """KITTI frames trained at 160x576 come back at 1226x370, 1242x375, ... exactly; the scale is saved."""
    scale = (160 / 375, 576 / 1242)
    model = fcn("fcn8", width=1 / 16, input_scale=scale)
    for h, w in [(370, 1226), (375, 1242), (374, 1238)]:
        x = np.random.default_rng(0).uniform(0, 255, (1, h, w, 3)).astype("float32")
        assert model.predict_on_batch(x).shape == (1, h, w, 2)
    model.save(tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras", compile=False)
    assert loaded.get_layer("preprocess").scale == loaded.get_layer("logits").scale == scale
    np.testing.assert_allclose(loaded.predict_on_batch(x), model.predict_on_batch(x), atol=1e-5)


def test_the_row_prior_is_a_function_of_the_frame_row_and_defaults_to_the_whole_frames_rows():
    """Zero at the start; at knot k (row fraction k / (KNOTS - 1)) it adds GAIN x its k-th weights to every
    pixel of that row; linear between knots; and without rows it reads the input as a whole frame."""
    logits = np.random.default_rng(0).normal(size=(2, 40, 7, 3)).astype("float32")
    prior = RowPrior()
    np.testing.assert_array_equal(prior(logits), logits)
    table = np.random.default_rng(1).normal(size=(RowPrior.KNOTS, 3)).astype("float32")
    prior.set_weights([table])
    k = np.array([0, 5, 127, 126])
    rows = np.stack([k / (RowPrior.KNOTS - 1), (k + 0.5) / (RowPrior.KNOTS - 1)]).astype("float32")  # (2, 4)
    out = prior(logits[:, :4], rows).numpy() - logits[:, :4]
    np.testing.assert_allclose(out[0], np.repeat(RowPrior.GAIN * table[k][:, None], 7, axis=1), rtol=1e-5)
    between = (table[k] + table[np.minimum(k + 1, RowPrior.KNOTS - 1)]) / 2
    between[2] = table[127]  # past the last knot: clipped to it
    np.testing.assert_allclose(out[1, :, 0], RowPrior.GAIN * between, rtol=1e-5, atol=1e-6)
    whole = ((np.arange(40) + 0.5) / 40)[None].repeat(2, 0).astype("float32")
    np.testing.assert_allclose(prior(logits), prior(logits, whole), atol=1e-6)


def test_the_row_prior_survives_saving_loading_and_a_precision_copy(tmp_path):
    from segnet.model import with_precision

    model = fcn("fcn8", width=1 / 16, row_prior=True, input_scale=(0.5, 0.5))
    prior = model.get_layer("row_prior")
    prior.set_weights([np.random.default_rng(0).normal(size=prior.get_weights()[0].shape)])
    x = np.random.default_rng(0).uniform(0, 255, (1, 70, 90, 3)).astype("float32")
    model.save(tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras", compile=False)
    np.testing.assert_allclose(loaded.predict_on_batch(x), model.predict_on_batch(x), atol=1e-5)
    fast = with_precision(loaded, "bfloat16")
    assert fast.get_layer("row_prior").dtype_policy.name == "float32"
    np.testing.assert_allclose(fast.predict_on_batch(x), model.predict_on_batch(x), atol=0.1)


def test_global_context_starts_at_zero_and_then_reaches_beyond_the_receptive_field(tmp_path):
    """At the start the network computes what the plain one does; once the context layer has weights, a pixel's
    scores change with a part of the frame its convolutions cannot see (fc6 1x1: pool5's 212 pixels)."""
    plain = fcn("fcn8", width=1 / 16, fc6_kernel=1)
    model = fcn("fcn8", width=1 / 16, fc6_kernel=1, global_context=True)
    for layer in plain.layers:
        model.get_layer(layer.name).set_weights(layer.get_weights())
    x = np.random.default_rng(0).uniform(0, 255, (1, 32, 640, 3)).astype("float32")
    far = x.copy()
    far[:, :, 400:] = 255 - far[:, :, 400:]  # 400 pixels from column 0, beyond its receptive field
    np.testing.assert_allclose(model.predict_on_batch(x), plain.predict_on_batch(x), atol=1e-5)
    np.testing.assert_array_equal(plain.predict_on_batch(far)[:, :, :32], plain.predict_on_batch(x)[:, :, :32])
    context = model.get_layer("context")
    context.set_weights([np.random.default_rng(1).normal(0, 0.1, context.get_weights()[0].shape)])
    assert np.abs(model.predict_on_batch(far)[:, :, :32] - model.predict_on_batch(x)[:, :, :32]).max() > 1e-3
    model.save(tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras", compile=False)
    np.testing.assert_allclose(loaded.predict_on_batch(far), model.predict_on_batch(far), atol=1e-5)


def test_precision_copy_keeps_weights_and_float32_ends():
    from segnet.model import with_precision

    model = fcn("fcn8", width=1 / 16)
    fast = with_precision(model, "bfloat16")
    assert fast.get_layer("block3_conv1").dtype_policy.name == fast.get_layer("fc6").dtype_policy.name == "bfloat16"
    assert fast.get_layer("block3_bn1").dtype_policy.name == "mixed_bfloat16"  # statistics stay float32
    assert fast.get_layer("logits").dtype_policy.name == fast.get_layer("preprocess").dtype_policy.name == "float32"
    x = np.random.default_rng(0).uniform(0, 255, (1, 64, 96, 3)).astype("float32")
    np.testing.assert_allclose(fast.predict_on_batch(x), model.predict_on_batch(x), atol=0.05)
    assert fast.get_layer("upscore8").dtype_policy.name == "float32"  # segnet.layers.upsample says why
    # Mixed precision rounds each kernel to bfloat16 at every call: kernels stored rounded give the same numbers.
    config = model.get_config()
    for layer in config["layers"]:
        kept = layer["class_name"] == "Conv2DTranspose" or layer["name"] in ("preprocess", "logits", "row_prior")
        if isinstance(layer["config"].get("dtype"), dict) and not kept:
            layer["config"]["dtype"]["config"]["name"] = "mixed_bfloat16"
    mixed = keras.Model.from_config(config)
    mixed.set_weights(model.get_weights())
    np.testing.assert_array_equal(fast.predict_on_batch(x), mixed.predict_on_batch(x))
    exact = with_precision(model, "float32")
    np.testing.assert_allclose(exact.predict_on_batch(x), model.predict_on_batch(x), atol=1e-5)


def test_in_model_resize_is_the_antialiased_bilinear_of_tensorflow():
    import tensorflow as tf

    from segnet.model import resize

    x = np.random.default_rng(0).uniform(0, 255, (1, 75, 124, 3)).astype("float32")
    for size in [(32, 58), (150, 248)]:  # shrinking (antialiased) and enlarging
        expected = tf.image.resize(x, size, antialias=True).numpy()
        np.testing.assert_allclose(resize(tf.constant(x), size).numpy(), expected, atol=1e-3)
