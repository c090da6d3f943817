"""Training on several devices and machines with tf.distribute.

    trainer.strategy=auto          MirroredStrategy when more than one GPU is visible, else the default
    trainer.strategy=mirrored      all local GPUs (or the logical CPUs the process was given)
    trainer.strategy=one_device    the first GPU, else the CPU
    trainer.strategy=multi_worker  MultiWorkerMirroredStrategy: the cluster from TF_CONFIG, or Slurm's environment

trainer.batch_size is per replica. segnet.train drives the strategy itself (strategy.run and explicit
all-reduces) rather than through Keras' fit, which fails under MultiWorkerMirroredStrategy with more than one
worker in Keras 3 (it reduces scalar metrics over axis 0 across workers:
https://github.com/tensorflow/tensorflow/issues/72388).
"""

import os

import tensorflow as tf

from segnet.errors import ConfigError


def make_strategy(name: str) -> tf.distribute.Strategy:
    """The strategy named by trainer.strategy (its choices are checked by the config schema)."""
    if name == "multi_worker":
        return tf.distribute.MultiWorkerMirroredStrategy(cluster_resolver=cluster_resolver())
    gpus = tf.config.list_logical_devices("GPU")
    if name == "mirrored" or (name == "auto" and len(gpus) > 1):
        devices = [d.name for d in gpus or tf.config.list_logical_devices("CPU")]
        return tf.distribute.MirroredStrategy(devices)
    if name == "one_device":
        return tf.distribute.OneDeviceStrategy(gpus[0].name if gpus else "/cpu:0")
    return tf.distribute.get_strategy()  # the default: one device, no wrapping


def cluster_resolver() -> tf.distribute.cluster_resolver.ClusterResolver:
    """The cluster of a multi-worker job: from TF_CONFIG when it is set, else from Slurm's environment."""
    if "TF_CONFIG" in os.environ:
        return tf.distribute.cluster_resolver.TFConfigClusterResolver()
    if "SLURM_JOB_ID" in os.environ:
        slurm = tf.distribute.cluster_resolver.SlurmClusterResolver
        # Slurm's count, not TensorFlow's: the resolver must set CUDA_VISIBLE_DEVICES before CUDA starts.
        if gpus := int(os.environ.get("SLURM_GPUS_ON_NODE") or 0):
            return slurm(gpus_per_node=gpus)  # the node's GPUs shared out among its tasks
        # Without GPUs TensorFlow's resolver steps through the GPUs per task, zero here; a nominal GPU
        # slot per task (and CUDA left alone) gives each task its own port instead.
        return slurm(gpus_per_node=64, gpus_per_task=1, auto_set_gpu=False)
    raise ConfigError("trainer.strategy=multi_worker needs TF_CONFIG (or a Slurm job) to describe the cluster")
