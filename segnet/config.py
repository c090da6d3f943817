"""Typed schema of the Hydra config: a misspelled key or a wrong type fails at start, before any work.

The YAML files in configs/ hold the values; these dataclasses hold the names and types. Hydra merges
each YAML onto its schema node, so a misspelled key can never be silently ignored; `check_overrides`
catches it on the command line first, to name the key it probably meant.
"""

import difflib
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import get_args, get_type_hints

from hydra.core.config_store import ConfigStore


@dataclass
class SyntheticConfig:
    num_train: int = 240
    num_test: int = 12
    height: int = 96
    width: int = 320
    seed: int = 0


@dataclass
class AugmentConfig:
    flip: bool = True
    scale: list[float] = field(default_factory=lambda: [1.0, 1.0])  # [min, max]; [1, 1] switches it off
    brightness: float = 0.0  # max delta on [0, 1] intensities
    contrast: float = 0.0  # max relative change
    saturation: float = 0.0
    hue: float = 0.0


@dataclass
class DatasetConfig:
    name: str = "synthetic"
    root: str = "data/synthetic"
    synthetic: SyntheticConfig | None = None  # set: generate the dataset at root first
    task: str = "road"  # road | lane (um only)
    categories: list[str] = field(default_factory=lambda: ["um", "umm", "uu"])
    val_per_category: int = 16  # the last N of each category (at most a third), as published KITTI results use
    val_fraction: float | None = None  # instead: this fraction of each category, the last ones
    val_list: str | None = None  # instead: a text file of validation names (um_000079, ...)
    train_size: list[int] = field(default_factory=lambda: [96, 320])  # [H, W] the network trains at
    train_mode: str = "resize"  # resize: whole frame scaled to train_size | crop: random crops at native scale
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    cache: str = "memory"  # training frames decoded and resized once, kept in RAM | disk: reused by later runs
    cache_dir: str = "data/cache"  # where cache=disk keeps them, memory-mapped


@dataclass
class ModelConfig:
    name: str = "fcn8"  # fcn8 | fcn16 | fcn32
    width: float = 1.0  # multiplies every VGG16 channel count (1.0 is the real VGG16)
    fc6_kernel: int = 7  # 7 is VGG's fc6 as a convolution
    batch_norm: bool = True  # VGG16 from scratch barely trains without it
    dropout: float = 0.5
    weights: str | None = None  # null | imagenet | path to a VGG16 .h5


@dataclass
class TrainerConfig:
    epochs: int = 30
    batch_size: int = 8
    steps_per_epoch: int | None = None  # null: one pass over the training images
    lr: float = 1e-3
    warmup_epochs: float = 1.0
    weight_decay: float = 1e-4
    class_weights: list[float] | None = None  # [non-road, road]
    precision: str = "auto"  # auto | float32 | bfloat16 | float16
    jit_compile: bool = False
    resume: bool = False  # continue the newest run under outputs/ from its last epoch
    strategy: str = "auto"  # auto | one_device | mirrored | multi_worker (segnet/distribute.py)
    scale_lr: bool = False  # multiply lr by the number of replicas (the linear scaling rule)
    backup: bool = True  # the same command restarted after a kill continues from the last finished epoch
    deterministic: bool = False  # deterministic ops: two runs of one config give identical numbers (slower)
    val_every: int = 1
    log_images: int = 3  # validation panels shown in TensorBoard


@dataclass
class EvalConfig:
    run: str | None = None  # run folder or .keras file; null: the newest run under outputs/
    space: str = "perspective"  # perspective | bev (the test server's bird's-eye view; needs calib files)
    pred_dir: str | None = None  # score these 8-bit maps (any method's) instead of running a model
    gt_dir: str | None = None  # null: <dataset.root>/training/gt_image_2


@dataclass
class Config:
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    seed: int = 0
    outputs: str = "outputs"  # where runs live; infer.py and trainer.resume look for the newest one here


CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def register() -> None:
    ConfigStore.instance().store(name="schema", node=Config)


def compose(overrides=(), name: str = "config"):
    """The config `python train.py <overrides>` would run with, for code that is not a Hydra app."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    register()
    with initialize_config_dir(str(CONFIGS), version_base="1.3"):
        return hydra_compose(name, overrides=list(overrides))


GROUPS = ("dataset", "model", "trainer")  # config groups: `dataset=kitti` picks a file, not a key


def check_overrides(args: list[str]) -> str | None:
    """An error message for the first command-line override whose key is not in the schema, else None."""
    for arg in args:
        key = arg.split("=", 1)[0]
        if "=" not in arg or arg.startswith(("-", "+", "~")) or key in GROUPS or key.startswith("hydra."):
            continue
        node, path = Config, []
        for part in key.split("."):
            names = [f.name for f in fields(node)]
            if part not in names:
                where = ".".join(path) or "the top level"
                close = difflib.get_close_matches(part, names, n=1)
                hint = f"did you mean {'.'.join([*path, close[0]])}? " if close else ""
                return f"unknown config key {key!r}: {hint}(keys of {where}: {', '.join(names)})"
            path.append(part)
            hint = get_type_hints(node)[part]
            node = next((t for t in (hint, *get_args(hint)) if is_dataclass(t)), None)
            if node is None:
                break
    return None
