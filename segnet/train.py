"""Training: the masked loss, the distributed training step, validation at native resolution, TensorBoard.

`train` reads as its steps: set up the strategy and precision, get the data, build or restore the model,
then per epoch train_one_epoch and Records.epoch_end (log, validate, checkpoint). What a run folder holds and
how a run is continued: segnet/runs.py.
"""

import os
import signal
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf
from keras import ops
from omegaconf import OmegaConf
from tensorboard.plugins.hparams import api as hp
from tensorboard.plugins.pr_curve import metadata as pr_curve_metadata

from segnet import config, data, distribute, metrics, predict, runs
from segnet.errors import Interrupted, LostWorker, NonFiniteLoss, UserError
from segnet.model import POLICIES, auto_precision, build, init_from


def set_precision(name: str = "auto") -> str:
    """Set Keras' global dtype policy (auto: see segnet.model.auto_precision); logits and loss stay float32."""
    name = auto_precision() if name == "auto" else str(name)
    keras.mixed_precision.set_global_policy(POLICIES[name])
    return name


def loss_sums(labels, logits, class_weights=None, hard: float = 1.0):
    """Softmax cross-entropy summed over the pixels inside the evaluation area, and their (weighted) count.

    A batch's loss is the ratio; IGNORE pixels count for nothing. The two are returned apart so that the
    replicas of a distributed step can all divide by the count of the whole global batch (see train_step).
    hard < 1 (trainer.hard_pixels) keeps only that fraction of the valid pixels, those of highest loss
    (bootstrapped cross-entropy, "OHEM"): once the bulk of asphalt and sky is learned, the loss stays on the
    road's edges and the regions still mistaken, where the errors are.
    """
    labels = ops.cast(labels, "int32")
    valid = labels != data.IGNORE
    safe = ops.where(valid, labels, 0)
    ce = ops.sparse_categorical_crossentropy(safe, ops.cast(logits, "float32"), from_logits=True)
    w = ops.cast(valid, "float32")
    if class_weights is not None:  # one per class (config.check_values)
        # float(): Hydra hands over a ListConfig, which TensorFlow cannot turn into a tensor.
        w = w * ops.take(ops.convert_to_tensor([float(c) for c in class_weights], "float32"), safe)
    if hard < 1:
        k = ops.maximum(1, ops.cast(hard * ops.sum(ops.cast(valid, "float32")), "int32"))
        kth = tf.math.top_k(ops.reshape(ops.where(valid, ce, -1.0), [-1]), k).values[-1]
        w = w * ops.cast(ce >= ops.stop_gradient(kth), "float32")
    return ops.sum(ce * w), ops.sum(w)


def dice_loss(labels, logits):
    """1 - soft Dice, the mean over the classes, over the batch's pixels inside the evaluation area.

    Cross-entropy counts every pixel alike, so the frame's bulk outweighs road edges; Dice scores each class
    by its overlap with the truth (a soft F1, what MaxF measures), so the boundary pixels weigh more.
    trainer.dice sets its weight beside the cross-entropy.
    """
    labels = ops.cast(labels, "int32")
    valid = labels != data.IGNORE
    mask = ops.cast(valid, "float32")[..., None]
    probs = ops.softmax(ops.cast(logits, "float32"), axis=-1) * mask
    truth = ops.one_hot(ops.where(valid, labels, 0), ops.shape(logits)[-1]) * mask
    overlap = ops.sum(probs * truth, axis=(0, 1, 2))
    total = ops.sum(probs + truth, axis=(0, 1, 2))
    return 1.0 - ops.mean((2.0 * overlap + 1.0) / (total + 1.0))  # +1: a class absent from the batch scores 1


# The decoder's coarser stages (their score maps and strides) that trainer.aux supervises: each is a
# prediction of its own before the finer skips add detail (FCN-32s has none, its only stage is the output).
COARSE = {"fcn8": (("score_fr", 32), ("fuse_pool4", 16)), "fcn16": (("score_fr", 32),), "fcn32": ()}


def with_coarse_outputs(model):
    """The same network (shared layers and weights) also returning its coarser stages' score maps."""
    stages = COARSE[model.name]
    return keras.Model(model.inputs, [model.outputs[0], *(model.get_layer(n).output for n, _ in stages)])


def without_row_prior(model):
    """The same network returning its scores before the row prior, and the prior (None if it has none).

    A training crop's rows are not its frame's (segnet.model.RowPrior), so train_step applies the prior
    itself, with the rows the data pipeline computed.
    """
    names = [layer.name for layer in model.layers]
    if "row_prior" not in names:
        return model, None
    return keras.Model(model.input, model.get_layer("logits").output, name=model.name), model.get_layer("row_prior")


def coarse_loss_sums(labels, coarse, stride: int, class_weights=None, hard: float = 1.0):
    """loss_sums of a coarse score map, upsampled bilinearly to the labels' grid.

    The map covers the input padded to a multiple of 32 (segnet.model.Preprocess): upsampled by its
    stride it lines up with the labels from the top-left corner, and the padding is cropped off.
    """
    h, w = ops.shape(labels)[1], ops.shape(labels)[2]
    size = (ops.shape(coarse)[1] * stride, ops.shape(coarse)[2] * stride)
    up = tf.image.resize(ops.cast(coarse, "float32"), size)[:, :h, :w, :]
    return loss_sums(labels, up, class_weights, hard)


def confusion_counts(labels, logits, num_classes: int):
    """The num_classes x num_classes confusion matrix (row: truth) at the argmax, over the valid pixels."""
    labels = ops.reshape(ops.cast(labels, "int32"), [-1])
    valid = labels != data.IGNORE
    pred = ops.reshape(ops.cast(ops.argmax(logits, axis=-1), "int32"), [-1])
    return tf.math.confusion_matrix(
        ops.where(valid, labels, 0), pred, num_classes, weights=ops.cast(valid, "float32"), dtype=tf.float32
    )


def train_scores(cm) -> dict[str, float]:
    """The epoch's scores at the argmax: road's IoU, precision, recall and F1 for two classes, else mIoU."""
    if len(cm) > 2:
        s = metrics.class_scores(cm, range(len(cm)))
        return {"miou": s["mIoU"] / 100, "pixel_accuracy": s["PixelAcc"] / 100}
    tp, fp, fn = float(cm[1, 1]), float(cm[0, 1]), float(cm[1, 0])
    ratio = lambda a, b: a / max(b, 1.0)  # noqa: E731
    return {
        "road_iou": ratio(tp, tp + fp + fn),
        "precision": ratio(tp, tp + fp),
        "recall": ratio(tp, tp + fn),
        "f1": ratio(2 * tp, 2 * tp + fp + fn),
    }


def main_score(classes) -> str:
    """What picks the best epoch: KITTI's MaxF for two classes, mean IoU for more."""
    return "maxf" if len(classes) == 2 else "miou"


def validate(model, images, labels, classes, batch_size: int = 4) -> tuple[dict, list[np.ndarray], object]:
    """Scores on the validation images at native resolution, with their probabilities and pooled counts.

    Two classes: the KITTI devkit's measures of class 1 (metrics.Counts). More: per-class IoU, mIoU and
    pixel accuracy at the argmax (a confusion matrix).
    """
    probs = predict.predict(model, images, batch_size)
    n_cls = len(classes)
    counts, cm, loss, n = metrics.Counts(), np.zeros((n_cls, n_cls), np.int64), 0.0, 0
    for p, lb in zip(probs, labels, strict=True):
        valid = lb != data.IGNORE
        if n_cls == 2:
            counts = counts + metrics.image_counts(metrics.to_uint8_prob(p[..., 1]), valid, lb == 1)
        else:
            cm += metrics.confusion(lb, p.argmax(-1), n_cls)
        p_true = np.take_along_axis(p, np.where(valid, lb, 0)[..., None].astype(np.int64), -1)[..., 0][valid]
        loss += float(-np.log(np.clip(p_true, 1e-7, 1)).sum())
        n += int(valid.sum())
    out = {"loss": loss / max(n, 1)}
    if n_cls > 2:
        s = metrics.class_scores(cm, [name for name, _ in classes])
        out.update(miou=s["mIoU"] / 100, pixel_accuracy=s["PixelAcc"] / 100)
        out.update({f"iou_{name}": s[f"IoU_{name}"] / 100 for name, _ in classes})
        return out, probs, cm
    s = metrics.scores(counts)
    at_half = metrics.scores_at(counts, 128)  # 8-bit 128 = p >= 0.502: the argmax cut
    out.update(maxf=s["MaxF"] / 100, ap=s["AP"] / 100, best_thresh=s["BestThresh"])
    keys = {"road_iou": "IoU", "precision": "PRE", "recall": "REC", "f1": "F1"}
    out.update({ours: at_half[kit] / 100 for ours, kit in keys.items()})
    return out, probs, counts


def log_pr_curve(counts: metrics.Counts, step: int) -> None:
    """The validation precision-recall curve at the devkit's 256 thresholds, for TensorBoard's PR-curve tab."""
    tp, fp = counts.pos - counts.fn, counts.fp
    pre = tp / np.maximum(tp + fp, 1)
    rec = tp / max(counts.pos, 1)
    table = np.stack([tp, fp, counts.neg - fp, counts.fn, pre, rec]).astype("float32")  # the plugin's layout
    meta = pr_curve_metadata.create_summary_metadata("road", "validation, all categories pooled", metrics.NUM_THRESH)
    tf.summary.write("road/pr_curves", table, step=step, metadata=meta.SerializeToString())


# TensorBoard tags: the loss first, then the road measures (or the classes'), then the schedule.
TAGS = {"loss": "loss", "maxf": "road/maxf", "ap": "road/ap", "best_thresh": "road/best_thresh",
        "road_iou": "road/iou", "f1": "road/f1", "precision": "road/precision", "recall": "road/recall"}  # fmt: skip
tag = lambda key: TAGS.get(key, f"classes/{key}")  # noqa: E731  (miou, pixel_accuracy, iou_<class>)
TP, FP, FN = (0, 200, 0), (230, 30, 30), (40, 90, 255)
KITTI_ROAD = (255, 0, 255)


def panel(image, label, prob, classes, name: str = "") -> np.ndarray:
    """Three labelled rows: the image, the ground truth and the prediction (outside the evaluation area dark).

    Two classes: the ground truth in KITTI's magenta, and the prediction's errors: true positives green, false
    positives red, false negatives blue. More: both in the classes' colours (the dataset config's).
    """
    from PIL import Image, ImageDraw

    valid = label != data.IGNORE
    if len(classes) == 2:
        road, pred = label == 1, prob[..., 1] >= 0.5
        gt = predict.overlay(image, road, color=KITTI_ROAD)
        errors = predict.overlay(image, pred & road & valid, color=TP)
        errors = predict.overlay(errors, pred & ~road & valid, color=FP)
        errors = predict.overlay(errors, ~pred & road & valid, color=FN)
        texts = ("ground truth: road magenta, outside the evaluation area dark",
                 "prediction at p >= 0.5: right green, false road red, missed road blue")  # fmt: skip
    else:
        gt = predict.blend(image, predict.colour_map(classes, label))
        errors = predict.blend(image, predict.colour_map(classes, prob.argmax(-1)))
        errors[~valid] //= 3
        texts = ("ground truth in the classes' colours, outside the evaluation area dark", "prediction (argmax)")
    gt[~valid] //= 3
    rows = []
    for row, text in ((image, name), (gt, texts[0]), (errors, texts[1])):
        bar = Image.new("RGB", (row.shape[1], 12), (0, 0, 0))
        ImageDraw.Draw(bar).text((2, 0), text, fill=(255, 255, 255))
        rows += [np.asarray(bar), row]
    return np.concatenate(rows, axis=0)


def confusion_image(cm: np.ndarray, names, cell: int = 40) -> np.ndarray:
    """The confusion matrix as a picture: a row per true class, normalised, a column per predicted class."""
    from PIL import Image, ImageDraw

    n, left, top = len(names), 6 * max(len(str(name)) for name in names) + 8, 28
    share = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    im = Image.new("RGB", (left + n * cell, top + n * cell), (255, 255, 255))
    draw = ImageDraw.Draw(im)
    draw.text((2, 2), "rows: truth, columns: prediction", fill=(0, 0, 0))
    for i, name in enumerate(names):
        draw.text((2, top + i * cell + cell // 3), str(name), fill=(0, 0, 0))
        draw.text((left + i * cell + 2, 16), str(name)[: cell // 6], fill=(0, 0, 0))
        for j in range(n):
            v = int(255 * (1 - share[i, j]))
            box = [left + j * cell, top + i * cell, left + (j + 1) * cell - 1, top + (i + 1) * cell - 1]
            draw.rectangle(box, fill=(v, v, 255))
            draw.text((box[0] + 4, box[1] + cell // 3), f"{share[i, j]:.2f}", fill=(0, 0, 0) if v > 128 else (255,) * 3)
    return np.asarray(im)


def spread(n: int, k: int) -> list[int]:
    """k indices spread evenly over n items: validation frames from every category, not k neighbours."""
    return sorted({round(i) for i in np.linspace(0, n - 1, min(k, n))}) if n and k else []


class Records:
    """What the chief writes after each epoch: TensorBoard logs, validation scores, the best and the last checkpoint."""

    def __init__(self, run_dir: Path, model, val, inference_model, cfg, state: dict):
        self.run_dir, self.model, self.cfg, self.state = run_dir, model, cfg, state
        self.classes = data.class_list(cfg.dataset)
        self.main = main_score(self.classes)
        self.best_keys = ("maxf", "ap", "road_iou") if self.main == "maxf" else ("miou", "pixel_accuracy")
        self.val_names, self.val_images, self.val_labels = val
        self.inference_model = inference_model
        self.start = time.time() - 60 * state.get("minutes", 0.0)
        logs = run_dir / "logs"
        self.writers = {k: tf.summary.create_file_writer(str(logs / k)) for k in ("train", "validation")}
        # The run's hyperparameters, and the best scores so far, for TensorBoard's HParams table: one row per run.
        self.writers["hparams"] = tf.summary.create_file_writer(str(logs))
        with self.writers["hparams"].as_default():
            hp.hparams(hparams(cfg), trial_id=trial_id(run_dir, cfg.outputs))
        if not state.get("epoch"):  # the schedule from its first step, so that the warm-up shows
            with self.writers["train"].as_default(step=0):
                tf.summary.scalar("schedule/learning_rate", self.learning_rate())
        (run_dir / runs.CKPT).mkdir(parents=True, exist_ok=True)

    def learning_rate(self) -> float:
        return float(ops.convert_to_numpy(self.model.optimizer.learning_rate))

    def epoch_end(self, done: int, logs: dict) -> dict:
        """Log, validate and checkpoint the epoch just finished; return the validation scores."""
        with self.writers["train"].as_default(step=done):
            for k, v in logs.items():
                tf.summary.scalar(tag(k), v)
            tf.summary.scalar("schedule/learning_rate", self.learning_rate())
        self.writers["train"].flush()
        scores, every = {}, self.cfg.trainer.val_every
        if not self.val_images or done % every == 0 or done == self.cfg.trainer.epochs:
            self.inference_model.set_weights(inference_weights(self.model))
        if self.val_images and (done % every == 0 or done == self.cfg.trainer.epochs):
            scores = self.validate_and_log(done)
        elif not self.val_images:  # nothing to choose by: the last epoch is the model infer.py will find
            runs.save_best(self.run_dir, self.inference_model, {"epoch": done, "note": "no validation images"})
        self.state.update(epoch=done, loss=logs["loss"], minutes=(time.time() - self.start) / 60)
        with self.writers["hparams"].as_default(step=done):
            for k in self.best_keys:
                if f"best_{k}" in self.state:
                    tf.summary.scalar(f"hparams/best_{k}", self.state[f"best_{k}"])
            tf.summary.scalar("hparams/minutes", self.state["minutes"])
        self.writers["hparams"].flush()
        runs.save_last(self.run_dir, self.model, self.state)
        return scores

    def validate_and_log(self, done: int) -> dict:
        """Validation scores, TensorBoard panels and the PR curve (two classes) or the confusion matrix (more);
        a new best score (MaxF or mIoU, see main_score) is saved as best.keras."""
        scores, probs, counts = validate(
            self.inference_model, self.val_images, self.val_labels, self.classes, self.cfg.trainer.batch_size
        )
        with self.writers["validation"].as_default(step=done):
            for k, v in scores.items():
                tf.summary.scalar(tag(k), v)
            for i in spread(len(probs), self.cfg.trainer.log_images):
                p = panel(self.val_images[i], self.val_labels[i], probs[i], self.classes, self.val_names[i])
                tf.summary.image(f"panel/{self.val_names[i]}", p[None], step=done)
            if self.main == "maxf":
                log_pr_curve(counts, done)
            else:
                tf.summary.image("classes/confusion", confusion_image(counts, [n for n, _ in self.classes])[None])
        self.writers["validation"].flush()
        if scores[self.main] > self.state.get("best", -1.0):
            self.state.update(best=scores[self.main], best_epoch=done)
            self.state.update({f"best_{k}": scores[k] for k in self.best_keys})
            runs.save_best(self.run_dir, self.inference_model, {"epoch": done, **scores})
        return scores

    def should_stop(self, done: int) -> bool:
        return out_of_patience(self.state, done, self.cfg.trainer.patience, self.cfg.trainer.val_every)

    def finish(self) -> None:
        self.state["finished"] = True  # the same command, started again, now trains a new run
        runs.write_json(self.run_dir / runs.STATE, self.state)


def out_of_patience(state: dict, done: int, patience: int | None, val_every: int) -> bool:
    """Early stopping (trainer.patience): this many validations in a row without a better main score."""
    return bool(patience and "best_epoch" in state and (done - state["best_epoch"]) // val_every >= patience)


def trial_id(run_dir: Path, outputs) -> str:
    """The run as the HParams table names it: its folder under outputs/ (a sweep's job: its number)."""
    run, parent = Path(run_dir).resolve(), Path(outputs).resolve()
    return str(run.relative_to(parent)) if run.is_relative_to(parent) else str(run)


def hparams(cfg) -> dict:
    """The config's values as flat "group.key" columns (paths left out: they differ between machines)."""
    flat = flatten(OmegaConf.to_container(cfg, resolve=True))
    return {k: v if isinstance(v, bool | int | float | str) else str(v) for k, v in flat.items()
            if not k.endswith(("root", "cache_dir", "outputs", "val_list")) and v is not None}  # fmt: skip


def flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        out.update(flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def inference_weights(model) -> list:
    """The weights to validate and save: with trainer.ema, the moving average of the trainable ones."""
    opt = model.optimizer
    if not getattr(opt, "use_ema", False):
        return model.get_weights()
    # Keras keeps the averages in the order of the variables the optimizer was built with (compiled_model).
    average = {v.path: a for v, a in zip(model.trainable_variables, opt._model_variables_moving_average, strict=True)}
    return [ops.convert_to_numpy(average.get(v.path, v)) for v in model.weights]


def check_finite(loss: float, finished: int, batch: int) -> None:
    """Stop at the first NaN or Inf loss, before the epoch's end could checkpoint the broken weights."""
    if not np.isfinite(loss):
        kept = f"epochs 1-{finished} are saved (trainer.resume=true continues)" if finished else "no epoch had finished"
        raise NonFiniteLoss(
            f"the loss became {loss} in epoch {finished + 1}, batch {batch + 1}; nothing of this epoch "
            f"was saved, {kept}. Lower trainer.lr, or try trainer.precision=float32"
        )


@keras.saving.register_keras_serializable(package="segnet")
class AdamW(keras.optimizers.AdamW):
    """Keras' AdamW with each variable's Adam update in TensorFlow's fused kernel: the same step, faster.

    Keras writes the update as a dozen elementwise ops, each a pass over the variable; over the 34 M
    weights of the KITTI model that was a quarter of a CPU training step. ResourceApplyAdam is one pass
    of the same formula. Mirrored variables (several replicas) keep Keras' own path.
    """

    def update_step(self, gradient, variable, learning_rate):
        index = self._get_variable_index(variable)
        slots = (variable, self._momentums[index], self._velocities[index])
        tf_vars = [w.value if isinstance(w, keras.Variable) else w for w in slots]
        if self.amsgrad or any(isinstance(w, tf.distribute.DistributedValues) for w in tf_vars):
            return super().update_step(gradient, variable, learning_rate)
        dtype = variable.dtype
        step = ops.cast(self.iterations + 1, dtype)
        tf.raw_ops.ResourceApplyAdam(
            var=tf_vars[0].handle,
            m=tf_vars[1].handle,
            v=tf_vars[2].handle,
            beta1_power=ops.power(ops.cast(self.beta_1, dtype), step),
            beta2_power=ops.power(ops.cast(self.beta_2, dtype), step),
            lr=ops.cast(learning_rate, dtype),
            beta1=ops.cast(self.beta_1, dtype),
            beta2=ops.cast(self.beta_2, dtype),
            epsilon=ops.cast(self.epsilon, dtype),
            grad=ops.cast(gradient, dtype),
        )


def compiled_model(cfg, steps_per_epoch: int, lr: float | None = None) -> keras.Model:
    """The model with its optimizer (AdamW or SGD, warm-up then cosine decay), as train_step and save_weights use it."""
    t = cfg.trainer
    model = build(cfg.model, data.class_list(cfg.dataset))
    if cfg.model.init:
        init_from(model, cfg.model.init)
    total = max(1, t.epochs * steps_per_epoch)
    warmup = min(total - 1, round(t.warmup_epochs * steps_per_epoch))
    schedule = keras.optimizers.schedules.CosineDecay(
        0.0, decay_steps=max(1, total - warmup), warmup_target=lr or t.lr, warmup_steps=warmup
    )
    # Keras decays weights decoupled for both (w -= lr * weight_decay * w each step), as AdamW defines it.
    common = dict(weight_decay=t.weight_decay, use_ema=t.ema is not None, ema_momentum=t.ema or 0.99)
    if t.optimizer == "sgd":
        optimizer = keras.optimizers.SGD(schedule, momentum=0.9, **common)
    else:
        optimizer = AdamW(schedule, **common)
    # Decay the convolution kernels only: shrinking biases and batch-norm scales only hurts.
    optimizer.exclude_from_weight_decay(var_names=["bias", "gamma", "beta"])
    # compile() makes the optimizer part of the model's weights (for resuming) and, under float16, wraps it
    # for loss scaling; the loss and the step are ours (train_step).
    model.compile(optimizer=optimizer)
    model.optimizer.build(model.trainable_variables)
    return model


def train_step(
    strategy,
    model,
    class_weights=None,
    jit_compile: bool = False,
    dice: float = 0.0,
    aux: float = 0.0,
    hard: float = 1.0,
):
    """A function that makes one optimizer step on the next batch of a distributed iterator.

    It returns the batch's loss and confusion matrix. Every replica divides its summed loss by the valid
    pixels of the whole global batch (an all-reduce), so the gradients the optimizer sums over replicas and
    workers are those of one pixel mean: the same step on one device or split over several machines.
    A Dice term (trainer.dice) is each replica's own batch's, divided by the replicas: their mean. With
    trainer.aux, the cross-entropy of each coarser decoder stage, times aux, joins the pixel sum; with
    trainer.hard_pixels every stage sums over its own hardest pixels, as many as the output's.
    """
    optimizer = model.optimizer
    net, row_prior = without_row_prior(model)
    net = with_coarse_outputs(net) if aux else net
    strides = [stride for _, stride in COARSE[model.name]] if aux else []

    def replica_step(x, y, rows=None):  # rows: the frame rows of a pipeline's crops (data.augment)
        with tf.GradientTape() as tape:
            logits, *coarse = net(x, training=True) if aux else [net(x, training=True)]
            if row_prior is not None:
                logits = row_prior(logits, rows)
            ce, n = loss_sums(y, logits, class_weights, hard)
            for c, stride in zip(coarse, strides, strict=True):
                ce += aux * coarse_loss_sums(y, c, stride, class_weights, hard)[0]
            replicas = tf.distribute.get_replica_context()
            loss = ce / ops.maximum(replicas.all_reduce("SUM", n), 1.0)
            if dice:
                loss += dice * dice_loss(y, logits) / replicas.num_replicas_in_sync
            scaled = optimizer.scale_loss(loss)  # float16 loss scaling; the loss itself otherwise
        grads = tape.gradient(scaled, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables, strict=True))
        return loss, confusion_counts(y, logits, model.output_shape[-1])

    @tf.function(jit_compile=jit_compile)
    def on_batch(batch):
        loss, counts = strategy.run(replica_step, args=batch)
        return strategy.reduce("SUM", loss, axis=None), strategy.reduce("SUM", counts, axis=None)

    @tf.function  # reading the iterator stays outside XLA, which has no kernel for it
    def step(iterator):
        return on_batch(next(iterator))

    return step


def worker_input(samples, cfg, global_batch: int, skip_steps: int):
    """The input function for strategy.distribute_datasets_from_function, called once on each worker.

    Each worker reads its own share of the frames and augments it with its own seed (the seed plus its
    index), and every replica gets batches of trainer.batch_size. Skipping the steps already trained puts data
    order and augmentation where an uninterrupted run would be.
    """

    def per_worker(ctx: tf.distribute.InputContext) -> tf.data.Dataset:
        x, y = data.training_set(samples[ctx.input_pipeline_id :: ctx.num_input_pipelines], cfg.dataset)
        seed = cfg.seed + ctx.input_pipeline_id
        ds = data.train_dataset(x, y, cfg.dataset, ctx.get_per_replica_batch_size(global_batch), seed)
        return ds.skip(skip_steps * ctx.num_replicas_in_sync // ctx.num_input_pipelines)

    return per_worker


def replica_sum(strategy, value: float) -> float:
    """The sum of this value over every replica of every worker (an all-reduce; the value itself on one device)."""
    mine = tf.constant(float(value))

    @tf.function
    def total():
        return strategy.reduce("SUM", strategy.run(tf.identity, args=(mine,)), axis=None)

    return float(total())


def same_everywhere(strategy, value: int) -> bool:
    """Whether every worker holds this value."""
    return replica_sum(strategy, value) == value * strategy.num_replicas_in_sync


def setup(cfg):
    """The distribution strategy (first: a multi-worker one must exist before TensorFlow touches a device),
    seeds, determinism and precision."""
    t = cfg.trainer
    strategy = distribute.make_strategy(t.strategy)
    keras.utils.set_random_seed(cfg.seed)
    if t.deterministic:
        tf.config.experimental.enable_op_determinism()  # same seed, same config: the same numbers
    return strategy, set_precision(t.precision)


def get_data(cfg):
    """The training and validation samples, and the scale the network sees native frames at."""
    root = data.prepare(cfg.dataset)
    samples = data.training_samples(root, cfg.dataset)
    train_s, val_s = data.split_samples(samples, cfg.dataset)
    # From the image headers of the whole training split, so that every worker's best.keras is the same.
    scale = data.input_scale([data.image_size(s.image) for s in train_s], cfg.dataset)
    return root, train_s, val_s, scale


def start_state(cfg, run_dir: Path, model, chief: bool) -> dict:
    """A fresh state, or the state of the run this one continues (see runs.to_continue), loaded into model."""
    key = runs.config_key(cfg)
    prev = runs.to_continue(cfg, run_dir)
    if prev is None:
        return {"config": key}
    state = {**runs.restore(model, prev, run_dir, chief), "config": key, "finished": False}
    how = "resumed from" if cfg.trainer.resume else "continuing an interrupted run of this config from"
    print(f"{how} {prev} after epoch {state['epoch']}")
    return state


@contextmanager
def ctrl_c_between_batches():
    """Ctrl-C sets the event the training loop checks between batches; a second Ctrl-C stops at once.

    Python raises KeyboardInterrupt wherever the main thread happens to be, and inside a finaliser (TensorFlow
    frees its tensors and iterators in __del__) the exception is printed and swallowed: the run would go on.
    """
    stop = threading.Event()
    if threading.current_thread() is not threading.main_thread():  # signal handlers live in the main thread
        yield stop
        return

    def handler(signum, frame):
        stop.set()
        signal.signal(signal.SIGINT, signal.default_int_handler)

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield stop
    finally:
        signal.signal(signal.SIGINT, previous)


def train_one_epoch(step, batches, steps: int, epoch: int, verbose: int, stop: threading.Event) -> dict:
    """`steps` optimizer steps; the epoch's mean loss and scores at the argmax (train_scores)."""
    bar = keras.utils.Progbar(steps, verbose=verbose, stateful_metrics=["loss"])
    total, counts = 0.0, 0
    for b in range(steps):
        if stop.is_set():
            raise KeyboardInterrupt
        try:
            loss, c = step(batches)
        except tf.errors.UnavailableError as e:
            # Another worker died (killed, preempted, its machine lost): tf.distribute aborts the collectives
            # here too, so the whole job stops and can be started again.
            lines = e.message.strip().splitlines()
            reason = next((line for line in lines if "aborted by" in line), lines[0])
            raise LostWorker(
                f"lost contact with another worker ({reason}); finished epochs are saved by the chief; "
                "start every worker again with the same command to continue"
            ) from None
        check_finite(loss := float(loss), epoch, b)
        total += loss
        counts += c.numpy()
        bar.update(b + 1, [("loss", total / (b + 1))])
    return {"loss": total / steps, **train_scores(counts)}


def train(cfg, run_dir: Path, skip_finished: bool = False) -> dict:
    """Train per the config, writing into run_dir; return the final state (epoch, best MaxF, ...).

    On several workers (MultiWorkerMirroredStrategy) every worker runs this; only the chief validates and
    writes, the others write nothing. skip_finished: if a run of this config has finished, return its state.
    """
    start = time.time()
    config.validate(cfg)
    if skip_finished and (done := runs.finished(cfg)) is not None:
        print(f"already trained: {done} holds a finished run of this config")
        return runs.read_state(done)
    t = cfg.trainer
    strategy, precision = setup(cfg)
    chief = strategy.extended.should_checkpoint
    root, train_s, val_s, scale = get_data(cfg)
    replicas = strategy.num_replicas_in_sync
    global_batch = t.batch_size * replicas  # trainer.batch_size is per replica
    steps = t.steps_per_epoch or max(1, len(train_s) // global_batch)
    lr = t.lr * replicas if t.scale_lr else t.lr  # the linear scaling rule, when asked for
    print(
        f"data: {len(train_s)} training, {len(val_s)} validation images from {root} | "
        f"model: {cfg.model.name} width {cfg.model.width}, predicts at scale {scale[0]:.3g} x {scale[1]:.3g} | "
        f"precision: {precision} | {replicas} replica(s), batch {global_batch}"
    )

    with strategy.scope():
        model = compiled_model(cfg, steps, lr)
    state = start_state(cfg, run_dir, model, chief)
    if chief:
        runs.check_space(run_dir, model)
    done = state.get("epoch", 0)
    if not same_everywhere(strategy, done):
        raise UserError(
            f"the workers would resume from different epochs (this one: {done}); put outputs={cfg.outputs} "
            "on a filesystem that every worker sees"
        )

    batches = iter(strategy.distribute_datasets_from_function(worker_input(train_s, cfg, global_batch, done * steps)))
    step = train_step(strategy, model, t.class_weights, t.jit_compile, t.dice, t.aux, t.hard_pixels)
    if chief:
        # The network trains on train_size frames; its twin takes native frames, resizes them the same way
        # and scales the scores back. It validates, and it is what best.keras holds (no optimizer state).
        val = ([s.name for s in val_s], *data.load(val_s, cfg.dataset))
        twin = build(cfg.model, data.class_list(cfg.dataset), input_scale=scale)
        records = Records(run_dir, model, val, twin, cfg, state)
    verbose = 2 if os.environ.get("CI") else 1
    try:
        with ctrl_c_between_batches() as stop:
            for epoch in range(done, t.epochs):
                print(f"Epoch {epoch + 1}/{t.epochs}")
                logs = train_one_epoch(step, batches, steps, epoch, verbose, stop)
                scores = records.epoch_end(epoch + 1, logs) if chief else {}
                val = {f"val_{k}": v for k, v in scores.items()}
                print(" - ".join(f"{k}: {v:.4f}" for k, v in {**logs, **val}.items()))
                state["epoch"] = epoch + 1
                if t.patience and replica_sum(strategy, chief and records.should_stop(epoch + 1)):  # chief decides
                    print(f"early stop: no better validation MaxF since epoch {state['best_epoch']} (trainer.patience)")
                    break
    except KeyboardInterrupt:
        # Every finished epoch is already on disk (written atomically); only the current one is lost.
        raise Interrupted(
            f"finished epochs are saved in {run_dir}; the same command continues from there "
            "(trainer.backup), or add trainer.resume=true"
        ) from None
    minutes = (time.time() - start) / 60
    if chief:
        records.finish()
        if "best" in state:
            name = {"maxf": "MaxF", "miou": "mIoU"}[records.main]
            print(
                f"done in {minutes:.1f} min: best val {name} {state['best']:.4f} at epoch {state['best_epoch']} | run: {run_dir}"
            )
        else:
            print(f"done in {minutes:.1f} min: no validation images, best.keras is the last epoch | run: {run_dir}")
    else:
        print(f"done in {minutes:.1f} min; this worker writes nothing, the chief writes the run")
    return {**state, "minutes": minutes}
