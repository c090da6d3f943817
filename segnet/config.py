"""Typed schema of the Hydra config: a misspelled key, a wrong type or an unknown choice fails at start.

The values live in the YAML files of configs/ and nowhere else; these dataclasses hold the names, the types
and the closed choices (Enums). Every field is MISSING here, so a value that no YAML file sets is an error,
never a silent default. `check_overrides` catches a misspelled key on the command line before Hydra starts,
to name the key it probably meant.
"""

import difflib
from dataclasses import dataclass, field, fields, is_dataclass
from enum import Enum
from pathlib import Path
from typing import get_args, get_type_hints

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, ListConfig


class Choice(str, Enum):
    """A closed set of strings: compares equal to its value and prints as it (`f"{Precision.auto}"` is "auto")."""

    def __str__(self) -> str:
        return self.value


Precision = Choice("Precision", {n: n for n in ("auto", "float32", "bfloat16", "float16")})
Strategy = Choice("Strategy", {n: n for n in ("auto", "one_device", "mirrored", "multi_worker")})
TrainMode = Choice("TrainMode", {n: n for n in ("resize", "crop")})
Cache = Choice("Cache", {n: n for n in ("memory", "disk")})
Task = Choice("Task", {n: n for n in ("road", "lane")})
Space = Choice("Space", {n: n for n in ("perspective", "bev")})
ModelName = Choice("ModelName", {n: n for n in ("fcn8", "fcn16", "fcn32")})
Layout = Choice("Layout", {n: n for n in ("kitti", "folder")})
Masks = Choice("Masks", {n: n for n in ("index", "colour")})
Anchor = Choice("Anchor", {n: n for n in ("random", "bottom")})
Optimizer = Choice("Optimizer", {n: n for n in ("adamw", "sgd")})

MIN_SIDE = 32  # image sides: the encoder halves them five times


def bounds(lo=None, hi=None, *, open_lo=False, open_hi=False, length=None):
    """A field whose value (each value, for a list; of `length` values if given) lies between lo and hi."""
    return field(default=MISSING, metadata={"bounds": (lo, hi, open_lo, open_hi), "length": length})


@dataclass
class SyntheticConfig:
    num_train: int = bounds(1)
    num_test: int = bounds(0)
    height: int = bounds(MIN_SIDE)
    width: int = bounds(MIN_SIDE)
    seed: int = MISSING


@dataclass
class AugmentConfig:
    flip: bool = MISSING
    scale: list[float] = bounds(0, 10, open_lo=True, length=2)  # [min, max]; [1, 1] switches it off
    anchor: Anchor = MISSING  # where the crop of a scaled frame sits vertically: random | bottom
    brightness: float = bounds(0, 1)  # max delta on [0, 1] intensities
    contrast: float = bounds(0, 1, open_hi=True)  # max relative change
    saturation: float = bounds(0, 1, open_hi=True)
    hue: float = bounds(0, 0.5)
    shadow: float = bounds(0, 1)  # probability of a random shadow on a training frame


@dataclass
class ClassConfig:
    name: str = MISSING
    colour: list[int] = bounds(0, 255, length=3)  # RGB: in colour masks, and how infer.py draws the class


@dataclass
class DatasetConfig:
    name: str = MISSING
    root: str = MISSING
    layout: Layout = MISSING  # kitti: data_road folders | folder: images/ and masks/ of the same stems
    classes: list[ClassConfig] = MISSING  # the network's outputs, in order
    masks: Masks = MISSING  # folder layout: index (PNG values 0..N-1) | colour (each class's RGB)
    ignore_index: int | None = bounds(0, 255)  # index masks: the value that marks pixels to ignore
    ignore_colour: list[int] | None = bounds(0, 255, length=3)  # colour masks: the colour to ignore
    synthetic: SyntheticConfig | None = MISSING  # set: generate the dataset at root first
    task: Task = MISSING  # kitti layout: lane is um_lane ground truth (um only)
    categories: list[str] = MISSING  # kitti layout
    val_per_category: int = bounds(0)  # the last N of each category (at most a third)
    val_fraction: float | None = bounds(0, 1, open_hi=True)  # instead: this fraction of each category, the last ones
    val_list: str | None = MISSING  # instead: a text file of validation names (um_000079, ...)
    train_size: list[int] = bounds(MIN_SIDE, length=2)  # [H, W] the network trains at
    train_mode: TrainMode = MISSING  # resize: whole frame scaled to train_size | crop: random crops at native scale
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    cache: Cache = MISSING  # memory: decoded once per run | disk: memory-mapped, reused by later runs
    cache_dir: str = MISSING


@dataclass
class ModelConfig:
    name: ModelName = MISSING
    width: float = bounds(0, 4, open_lo=True)  # multiplies every VGG16 channel count (1.0 is the real VGG16)
    fc6_kernel: int = bounds(1, 7)  # pool5 is 1/32 of the image: 7 already sees 224 pixels
    batch_norm: bool = MISSING
    dropout: float = bounds(0, 1, open_hi=True)
    learn_upsampling: bool = MISSING  # false: the transposed convolutions stay bilinear
    skip_scale: float = bounds(0, 1, open_lo=True)  # pool4/pool3 times this before their score layers
    row_prior: bool = MISSING  # a learned offset of the scores by the pixel's height in the frame
    global_context: bool = MISSING  # fc6 also sees the frame's mean pool5 feature (ParseNet)
    weights: str | None = MISSING  # null | imagenet | path to a VGG16 .h5
    init: str | None = MISSING  # a run folder or .keras file to start from (fine-tuning): model.init_from


@dataclass
class TrainerConfig:
    epochs: int = bounds(1)
    batch_size: int = bounds(1)  # per replica
    steps_per_epoch: int | None = bounds(1)  # null: one pass over the training images
    optimizer: Optimizer = MISSING  # adamw | sgd (momentum 0.9, the FCN paper's)
    lr: float = bounds(0, 1, open_lo=True)
    warmup_epochs: float = bounds(0)
    weight_decay: float = bounds(0, 1)
    class_weights: list[float] | None = bounds(0)  # one per class of dataset.classes
    dice: float = bounds(0)  # weight of a soft Dice term beside the cross-entropy; 0: off
    aux: float = bounds(0)  # weight of the cross-entropy of the decoder's coarser stages; 0: off
    hard_pixels: float = bounds(0, 1, open_lo=True)  # the cross-entropy keeps this fraction, the hardest pixels
    precision: Precision = MISSING
    jit_compile: bool = MISSING
    resume: bool = MISSING
    strategy: Strategy = MISSING
    scale_lr: bool = MISSING
    backup: bool = MISSING
    deterministic: bool = MISSING
    val_every: int = bounds(1)
    log_images: int = bounds(0)
    patience: int | None = bounds(1)  # stop after this many validations without a better score; null: never
    ema: float | None = bounds(0, 1, open_lo=True, open_hi=True)  # validate and save an EMA of the weights


@dataclass
class Config:
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    seed: int = MISSING
    outputs: str = MISSING  # where runs live (segnet/runs.py)


@dataclass
class EvalConfig:
    run: str | None = MISSING  # run folder or .keras file; null: the newest run under outputs/
    space: Space = MISSING
    precision: Precision = MISSING  # of a .keras model; auto: bfloat16 where the CPU has it (exports: float32)
    flip: bool = MISSING  # average with the mirror image (test-time augmentation, twice the time)
    pred_dir: str | None = MISSING  # score these 8-bit maps (any method's) instead of running a model
    gt_dir: str | None = MISSING  # null: <dataset.root>/training/gt_image_2


@dataclass
class EvaluateConfig(Config):
    """`python evaluate.py`: the training config (which dataset, which outputs) and the eval node."""

    eval: EvalConfig = field(default_factory=EvalConfig)


CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def register() -> None:
    store = ConfigStore.instance()
    store.store(name="schema", node=Config)
    store.store(name="evaluate_schema", node=EvaluateConfig)


def compose(overrides=(), name: str = "config"):
    """The config `python train.py <overrides>` would run with, for code that is not a Hydra app."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    register()
    with initialize_config_dir(str(CONFIGS), version_base="1.3"):
        return hydra_compose(name, overrides=list(overrides))


GROUPS = ("dataset", "model", "trainer", "experiment", "hparams_search")  # `dataset=kitti` picks a file, not a key


def check_values(cfg, schema=Config, path: str = "") -> list[str]:
    """Every value of cfg outside the bounds its schema field gives, as "key=value: must be ..." lines."""
    problems = []
    for f in fields(schema):
        key, value = path + f.name, cfg[f.name]
        hint = get_type_hints(schema)[f.name]
        node = next((t for t in (hint, *get_args(hint)) if is_dataclass(t)), None)
        if node is not None and isinstance(value, ListConfig):  # a list of nodes: dataset.classes
            problems += [p for i, item in enumerate(value) for p in check_values(item, node, f"{key}.{i}.")]
        elif node is not None and value is not None:
            problems += check_values(value, node, f"{key}.")
        if "bounds" not in f.metadata or value is None:
            continue
        (lo, hi, open_lo, open_hi), length = f.metadata["bounds"], f.metadata["length"]
        many = isinstance(value, list | ListConfig)
        values = list(value) if many else [value]
        shown = f"[{','.join(map(str, values))}]" if many else str(value)
        if length and len(values) != length:
            problems.append(f"{key}={shown}: give {length} values")
            continue
        for v in values:
            # Negated comparisons, so that NaN fails them too.
            if lo is not None and not (v > lo if open_lo else v >= lo):
                problems.append(f"{key}={shown}: must be {'above' if open_lo else 'at least'} {lo}")
            elif hi is not None and not (v < hi if open_hi else v <= hi):
                problems.append(f"{key}={shown}: must be {'below' if open_hi else 'at most'} {hi}")
            else:
                continue
            break
    if path == "" and "dataset" in cfg:
        scale = list(cfg.dataset.augment.scale)
        if len(scale) == 2 and scale[0] > scale[1]:
            problems.append(f"dataset.augment.scale=[{scale[0]},{scale[1]}]: give [min, max], min first")
        if not cfg.dataset.categories:
            problems.append("dataset.categories=[]: name at least one category (um, umm, uu)")
        problems += check_classes(cfg.dataset)
        weights = cfg.trainer.class_weights if "trainer" in cfg else None
        if weights is not None and len(weights) != len(cfg.dataset.classes):
            names = ", ".join(c.name for c in cfg.dataset.classes)
            problems.append(f"trainer.class_weights: give {len(cfg.dataset.classes)} values, one per class ({names})")
        if "trainer" in cfg and cfg.trainer.aux and cfg.model.name == "fcn32":
            problems.append(f"trainer.aux={cfg.trainer.aux}: FCN-32s has no coarser stage; use model=fcn8 or fcn16")
    return problems


def check_classes(d) -> list[str]:
    """A class list that cannot label a mask unambiguously: too few classes, a name or colour twice,
    an ignore value that is also a class."""
    names, colours = [c.name for c in d.classes], [tuple(c.colour) for c in d.classes]
    problems = []
    if not 2 <= len(names) <= 255:
        problems.append(f"dataset.classes: {len(names)} given, give 2 to 255")
    if d.layout == "kitti" and len(names) != 2:
        problems.append("dataset.classes: the kitti layout has two classes, [non-road, road]")
    for kind, values in (("name", names), ("colour", colours)):
        if twice := sorted({str(v) for v in values if values.count(v) > 1}):
            problems.append(f"dataset.classes: the {kind} {twice[0]} is given to two classes; give each its own")
    if d.ignore_index is not None and 0 <= d.ignore_index < len(names):
        problems.append(
            f"dataset.ignore_index={d.ignore_index} is also the index of class {names[d.ignore_index]!r}; "
            f"index masks hold classes 0..{len(names) - 1}, pick another ignore value (e.g. 255)"
        )
    if d.ignore_colour is not None and tuple(d.ignore_colour) in colours:
        clash = names[colours.index(tuple(d.ignore_colour))]
        problems.append(f"dataset.ignore_colour={list(d.ignore_colour)} is also the colour of class {clash!r}")
    return problems


def validate(cfg, schema=Config) -> None:
    """Refuse a config with values out of range, all of them named, before any work starts."""
    from segnet.errors import ConfigError

    if problems := check_values(cfg, schema):
        raise ConfigError("; ".join(problems))


def check_overrides(args: list[str], schema=Config) -> str | None:
    """An error message for the first command-line override whose key is not in the schema, else None."""
    for arg in args:
        key = arg.split("=", 1)[0]
        if "=" not in arg or arg.startswith(("-", "+", "~")) or key in GROUPS or key.startswith(("hydra.", "hydra/")):
            continue
        node, path = schema, []
        for part in key.split("."):
            if part.isdigit():  # an item of a list of nodes: dataset.classes.0.name
                continue
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
