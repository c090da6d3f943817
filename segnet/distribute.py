"""Training on several devices with tf.distribute.

    trainer.strategy=auto          MirroredStrategy when more than one GPU is visible, else the default
    trainer.strategy=mirrored      all local GPUs (or the logical CPUs the process was given)
    trainer.strategy=one_device    the first GPU, else the CPU
    trainer.strategy=multi_worker  MultiWorkerMirroredStrategy (cluster from TF_CONFIG, or Slurm's environment);
                                   refused for more than one worker, see below

trainer.batch_size is per replica. Several machines: Keras 3's fit fails under MultiWorkerMirroredStrategy
with more than one worker (it reduces scalar metrics over axis 0 across workers:
https://github.com/tensorflow/tensorflow/issues/72388), so segnet stops with that message instead of a
traceback from deep inside Keras.
"""

import hashlib
import json
import os
from pathlib import Path

import tensorflow as tf

STRATEGIES = ("auto", "one_device", "mirrored", "multi_worker")


def make_strategy(name: str) -> tf.distribute.Strategy:
    if name not in STRATEGIES:
        raise ValueError(f"trainer.strategy={name!r}: use {', '.join(STRATEGIES)}")
    if name == "multi_worker":
        resolver = None
        if "TF_CONFIG" not in os.environ and "SLURM_JOB_ID" in os.environ:
            resolver = tf.distribute.cluster_resolver.SlurmClusterResolver()
        elif "TF_CONFIG" not in os.environ:
            raise ValueError("trainer.strategy=multi_worker needs TF_CONFIG (or Slurm) to describe the cluster")
        return tf.distribute.MultiWorkerMirroredStrategy(cluster_resolver=resolver)
    gpus = tf.config.list_logical_devices("GPU")
    if name == "mirrored" or (name == "auto" and len(gpus) > 1):
        devices = [d.name for d in gpus or tf.config.list_logical_devices("CPU")]
        return tf.distribute.MirroredStrategy(devices)
    if name == "one_device":
        return tf.distribute.OneDeviceStrategy(gpus[0].name if gpus else "/cpu:0")
    return tf.distribute.get_strategy()  # the default: one device, no wrapping


def workers(strategy: tf.distribute.Strategy) -> int:
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.task_type:
        return 1
    return sum(len(tasks) for kind, tasks in resolver.cluster_spec().as_dict().items() if kind in ("chief", "worker"))


def backup_dir(cfg) -> Path:
    """A folder that depends only on the training config, so the same command finds its interrupted run."""
    from omegaconf import OmegaConf

    key = hashlib.sha1(json.dumps(OmegaConf.to_container(cfg, resolve=True), sort_keys=True).encode()).hexdigest()
    return Path(cfg.outputs) / "backup" / key[:16]
