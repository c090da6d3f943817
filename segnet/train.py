"""Training: the masked loss, precision policy, validation at native resolution, checkpoints, TensorBoard.

A run folder (Hydra's output dir) holds everything about one run:
    .hydra/config.yaml            the composed config
    checkpoints/best.keras        the model with the best validation MaxF (architecture + weights)
    checkpoints/best.json         its validation scores and epoch
    checkpoints/last-eNNNN.weights.h5, checkpoints/state.json
                                  the last finished epoch with optimizer state, for trainer.resume=true;
                                  state.json is written last, so it always names a complete weights file
    logs/train, logs/validation   TensorBoard
"""

import json
import os
import shutil
import time
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf
from keras import ops
from tensorboard.plugins.pr_curve import metadata as pr_curve_metadata

from segnet import data, distribute, metrics, predict
from segnet.model import POLICIES, auto_precision, build

CKPT = "checkpoints"


def set_precision(name: str = "auto") -> str:
    """Set Keras' global dtype policy (auto: see segnet.model.auto_precision); logits and loss stay float32."""
    name = auto_precision() if name == "auto" else name
    if name not in POLICIES:
        raise ValueError(f"trainer.precision={name!r}: use auto, float32, bfloat16 or float16")
    keras.mixed_precision.set_global_policy(POLICIES[name])
    return name


class MaskedCrossEntropy(keras.losses.Loss):
    """Softmax cross-entropy averaged over the pixels inside the evaluation area; IGNORE pixels count for nothing."""

    def __init__(self, class_weights=None, name="masked_cross_entropy"):
        super().__init__(name=name)
        # A plain list: Hydra hands over a ListConfig, which TensorFlow cannot turn into a tensor.
        self.class_weights = None if class_weights is None else [float(w) for w in class_weights]
        if self.class_weights is not None and len(self.class_weights) != 2:
            raise ValueError(f"trainer.class_weights={class_weights}: give two, [non-road, road]")

    def call(self, labels, logits):
        labels = ops.cast(labels, "int32")
        valid = labels != data.IGNORE
        safe = ops.where(valid, labels, 0)
        ce = ops.sparse_categorical_crossentropy(safe, ops.cast(logits, "float32"), from_logits=True)
        w = ops.cast(valid, "float32")
        if self.class_weights is not None:
            w = w * ops.take(ops.convert_to_tensor(self.class_weights, "float32"), safe)
        # One value per image whose batch mean is sum(ce * w) / sum(w): Keras averages per-image losses,
        # also across replicas, so a single scalar would be counted once per replica.
        per_image = ops.sum(ce * w, axis=(1, 2))
        mean_weight = ops.maximum(ops.sum(w), 1.0) / ops.cast(ops.shape(w)[0], "float32")
        return per_image / mean_weight


class RoadMetric(keras.metrics.Metric):
    """Road IoU, precision, recall or F1 at p > 0.5 over the valid pixels seen so far."""

    def __init__(self, kind: str, **kwargs):
        super().__init__(name=kind, **kwargs)
        self.kind = kind
        self.counts = self.add_variable(shape=(3,), initializer="zeros", name="tp_fp_fn")

    def update_state(self, labels, logits, sample_weight=None):
        labels = ops.cast(labels, "int32")
        valid = labels != data.IGNORE
        pred = ops.argmax(logits, axis=-1) == 1
        road = labels == 1
        count = lambda m: ops.sum(ops.cast(m & valid, "float32"))  # noqa: E731
        self.counts.assign_add(ops.stack([count(pred & road), count(pred & ~road), count(~pred & road)]))

    def result(self):
        tp, fp, fn = self.counts[0], self.counts[1], self.counts[2]
        ratio = lambda a, b: a / ops.maximum(b, 1.0)  # noqa: E731
        return {
            "road_iou": lambda: ratio(tp, tp + fp + fn),
            "precision": lambda: ratio(tp, tp + fp),
            "recall": lambda: ratio(tp, tp + fn),
            "f1": lambda: ratio(2 * tp, 2 * tp + fp + fn),
        }[self.kind]()

    def reset_state(self):
        self.counts.assign(ops.zeros((3,)))


def validate(model, images, labels, batch_size: int = 4) -> tuple[dict, list[np.ndarray], metrics.Counts]:
    """Scores on the validation images at native resolution, computed the way the KITTI devkit does."""
    probs = predict.predict(model, images, batch_size)
    counts, loss, n = metrics.Counts.zero(), 0.0, 0
    for p, lb in zip(probs, labels, strict=True):
        valid, road = lb != data.IGNORE, lb == 1
        counts = counts + metrics.image_counts(metrics.to_uint8_prob(p), valid, road)
        p_true = np.where(road, p, 1 - p)[valid]
        loss += float(-np.log(np.clip(p_true, 1e-7, 1)).sum())
        n += int(valid.sum())
    s = metrics.scores(counts)
    at_half = metrics.scores_at(counts, 128)  # 8-bit 128 = p >= 0.502: the argmax cut
    out = {"loss": loss / max(n, 1), "maxf": s["MaxF"] / 100, "ap": s["AP"] / 100, "best_thresh": s["BestThresh"]}
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


def panel(image, label, prob) -> np.ndarray:
    """image | ground truth | prediction, stacked vertically (KITTI frames are wide)."""
    gt = predict.overlay(image, label == 1)
    gt[label == data.IGNORE] //= 3  # outside the evaluation area: darkened
    return np.concatenate([image, gt, predict.overlay(image, prob >= 0.5)], axis=0)


def save_atomic(path: Path, write) -> None:
    """Write through a temporary name and rename, so a kill never leaves a half-written file under `path`."""
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    write(tmp)
    os.replace(tmp, path)


class Epoch(keras.callbacks.Callback):
    """Per epoch: validate, log to TensorBoard, keep the best and the last checkpoint."""

    def __init__(self, run_dir: Path, val, inference_model, cfg, state: dict):
        super().__init__()
        self.run_dir, self.cfg, self.state = run_dir, cfg, state
        self.val_images, self.val_labels = val
        self.inference_model = inference_model
        self.writers = {k: tf.summary.create_file_writer(str(run_dir / "logs" / k)) for k in ("train", "validation")}
        (run_dir / CKPT).mkdir(parents=True, exist_ok=True)

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        done = epoch + 1
        lr = float(ops.convert_to_numpy(self.model.optimizer.learning_rate))
        with self.writers["train"].as_default(step=done):
            for k, v in logs.items():
                tf.summary.scalar(k, v)
            tf.summary.scalar("learning_rate", lr)
        self.writers["train"].flush()
        if self.val_images and (done % self.cfg.trainer.val_every == 0 or done == self.cfg.trainer.epochs):
            self.inference_model.set_weights(self.model.get_weights())
            scores, probs, counts = validate(
                self.inference_model, self.val_images, self.val_labels, self.cfg.trainer.batch_size
            )
            logs.update({f"val_{k}": v for k, v in scores.items()})
            with self.writers["validation"].as_default(step=done):
                for k, v in scores.items():
                    tf.summary.scalar(k, v)
                for i in range(min(self.cfg.trainer.log_images, len(probs))):
                    p = panel(self.val_images[i], self.val_labels[i], probs[i])
                    tf.summary.image(f"panel/{i}", p[None], step=done)
                log_pr_curve(counts, done)
            self.writers["validation"].flush()
            if scores["maxf"] > self.state.get("best", -1.0):
                self.state.update(best=scores["maxf"], best_epoch=done)
                save_atomic(self.run_dir / CKPT / "best.keras", self.inference_model.save)
                info = {"epoch": done, **scores}
                save_atomic(self.run_dir / CKPT / "best.json", lambda p: p.write_text(json.dumps(info, indent=1)))
        weights = f"last-e{done:04d}.weights.h5"
        save_atomic(self.run_dir / CKPT / weights, self.model.save_weights)
        rng = [v.numpy().tolist() for v in seed_states(self.model)]
        self.state.update(epoch=done, weights=weights, loss=float(logs.get("loss", np.nan)), rng=rng)
        save_atomic(self.run_dir / CKPT / "state.json", lambda p: p.write_text(json.dumps(self.state, indent=1)))
        for old in (self.run_dir / CKPT).glob("last-e*.weights.h5"):
            if old.name != weights:
                old.unlink()


def seed_states(model) -> list:
    """Dropout's random generator states: save_weights leaves them out, but an exact resume needs them."""
    return [v for v in model.variables if v.path.endswith("seed_generator_state")]


class NonFiniteLoss(RuntimeError):
    pass


class StopOnNonFiniteLoss(keras.callbacks.Callback):
    """Stop at the first NaN or Inf loss, before the epoch's end would checkpoint the broken weights."""

    def __init__(self, state: dict):
        super().__init__()
        self.state = state  # shared with Epoch: the last finished epoch

    def on_train_batch_end(self, batch, logs=None):
        loss = (logs or {}).get("loss")
        if loss is not None and not np.isfinite(float(loss)):
            done = self.state.get("epoch", 0)
            kept = f"epochs 1-{done} are saved (trainer.resume=true continues)" if done else "no epoch had finished"
            raise NonFiniteLoss(
                f"the loss became {float(loss)} in epoch {done + 1}, batch {batch + 1}; nothing of this epoch "
                f"was saved, {kept}. Lower trainer.lr, or try trainer.precision=float32"
            )


def previous_run(outputs: str, current: Path) -> Path | None:
    """The newest run under outputs/ other than this one that finished at least one epoch."""
    runs = [p.parents[1] for p in Path(outputs).glob(f"**/{CKPT}/state.json")]
    runs = [r for r in runs if r.resolve() != current.resolve()]
    return max(runs, key=lambda r: (r / CKPT / "state.json").stat().st_mtime, default=None)


def compiled_model(cfg, steps_per_epoch: int, lr: float | None = None) -> keras.Model:
    t = cfg.trainer
    model = build(cfg.model)
    total = max(1, t.epochs * steps_per_epoch)
    warmup = min(total - 1, round(t.warmup_epochs * steps_per_epoch))
    schedule = keras.optimizers.schedules.CosineDecay(
        0.0, decay_steps=max(1, total - warmup), warmup_target=lr or t.lr, warmup_steps=warmup
    )
    optimizer = keras.optimizers.AdamW(schedule, weight_decay=t.weight_decay)
    # Decay the convolution kernels only: shrinking biases and batch-norm scales only hurts.
    optimizer.exclude_from_weight_decay(var_names=["bias", "gamma", "beta"])
    model.compile(
        optimizer=optimizer,
        loss=MaskedCrossEntropy(t.class_weights),
        metrics=[RoadMetric(k) for k in ("road_iou", "precision", "recall", "f1")],
        jit_compile=t.jit_compile,
    )
    return model


def train(cfg, run_dir: Path) -> dict:
    """Train per the config, writing into run_dir; return the final state (epoch, best MaxF, ...)."""
    start = time.time()
    keras.utils.set_random_seed(cfg.seed)
    if cfg.trainer.deterministic:
        tf.config.experimental.enable_op_determinism()  # same seed, same config: the same numbers
    precision = set_precision(cfg.trainer.precision)
    t = cfg.trainer
    strategy = distribute.make_strategy(t.strategy)
    if distribute.workers(strategy) > 1:
        raise NotImplementedError(
            "training on several workers: Keras 3's fit fails under MultiWorkerMirroredStrategy "
            "(https://github.com/tensorflow/tensorflow/issues/72388); use trainer.strategy=mirrored on one machine"
        )

    root = data.prepare(cfg.dataset)
    samples = data.list_samples(root, "training", cfg.dataset.categories, cfg.dataset.task)
    train_s, val_s = data.split_samples(samples, cfg.dataset)
    x, y, scale = data.training_set(train_s, cfg.dataset)
    val = data.load(val_s)
    replicas = strategy.num_replicas_in_sync
    global_batch = t.batch_size * replicas  # trainer.batch_size is per replica
    steps = t.steps_per_epoch or max(1, len(x) // global_batch)
    lr = t.lr * replicas if t.scale_lr else t.lr  # the linear scaling rule, when asked for
    print(
        f"data: {len(train_s)} training, {len(val_s)} validation images from {root} | "
        f"model: {cfg.model.name} width {cfg.model.width}, predicts at scale {scale[0]:.3g} x {scale[1]:.3g} | "
        f"precision: {precision} | {replicas} replica(s), batch {global_batch}"
    )

    with strategy.scope():
        model = compiled_model(cfg, steps, lr)
    state = {}
    if t.resume:
        prev = previous_run(cfg.outputs, run_dir)
        if prev is None:
            raise FileNotFoundError(f"trainer.resume=true but no run under {cfg.outputs}/ has a checkpoint")
        state = json.loads((prev / CKPT / "state.json").read_text())
        with strategy.scope():
            model.optimizer.build(model.trainable_variables)
        model.load_weights(prev / CKPT / state["weights"])
        for v, value in zip(seed_states(model), state.get("rng", []), strict=False):
            v.assign(np.asarray(value, v.dtype))
        (run_dir / CKPT).mkdir(parents=True, exist_ok=True)
        for name in ("best.keras", "best.json"):  # this run's folder holds the best so far too
            if (prev / CKPT / name).exists():
                shutil.copy2(prev / CKPT / name, run_dir / CKPT / name)
        print(f"resumed from {prev} after epoch {state['epoch']}")
    done = state.get("epoch", 0)

    # Batches of the global size, which Keras splits over the replicas. Skipping the batches already trained
    # on puts data order and augmentation where an uninterrupted run would be.
    dataset = data.train_dataset(x, y, cfg.dataset, global_batch, cfg.seed).skip(done * steps)
    callbacks = [StopOnNonFiniteLoss(state)]
    if t.backup and not t.resume:
        # The same command, started again after a kill or a preemption, continues from the last epoch.
        backup = distribute.backup_dir(cfg)
        if (backup / "training_metadata.json").exists():
            print(f"continuing an interrupted run of this config from its backup in {backup}")
        callbacks.append(keras.callbacks.BackupAndRestore(str(backup), double_checkpoint=True))
    # The network trains on train_size frames; its twin takes native frames, resizes them the same way and
    # scales the scores back. It validates, and it is what best.keras holds (no optimizer state).
    inference_model = build(cfg.model, input_scale=scale)
    callbacks.append(Epoch(run_dir, val, inference_model, cfg, state))
    model.fit(
        dataset,
        epochs=t.epochs,
        initial_epoch=done,
        steps_per_epoch=steps,
        callbacks=callbacks,
        shuffle=False,  # the dataset shuffles itself, reproducibly from the seed
        verbose=2 if os.environ.get("CI") else 1,
    )
    minutes = (time.time() - start) / 60
    best = state.get("best", float("nan"))
    print(
        f"done in {minutes:.1f} min: best val MaxF {best:.4f} at epoch {state.get('best_epoch', '-')} | run: {run_dir}"
    )
    return {**state, "minutes": minutes}
