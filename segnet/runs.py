"""Run folders: what one training run writes, how it is written, which run is "the newest", and which
model file a path given on the command line names (model_path).

    <outputs>/2026-11-25/10-00-00/    one run (Hydra's output dir; hydra.run.dir may put it anywhere)
        .hydra/config.yaml            the composed config
        checkpoints/best.keras        the model with the best validation MaxF or mIoU (architecture + weights)
        checkpoints/best.json         its validation scores and epoch
        checkpoints/last-eNNNN.weights.h5
                                      the last finished epoch, optimizer state included
        checkpoints/state.json        epoch, that weights file, dropout's random states, the config's key,
                                      finished or not; written last, so it always names a complete weights file
        logs/train, logs/validation   TensorBoard
        exports/                      segnet.export's models

Every file goes through a temporary name and a rename: a kill never leaves half a file under a real name.
The newest run is the one whose state.json was written last: `infer.py` without --model and
`trainer.resume=true` both take it, so they never disagree.
"""

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
from omegaconf import OmegaConf

from segnet.errors import UserError, first_line

CKPT = "checkpoints"
BEST = f"{CKPT}/best.keras"
BEST_JSON = f"{CKPT}/best.json"
STATE = f"{CKPT}/state.json"
EXPORTS = "exports"


def save_atomic(path: Path, write) -> None:
    """write(tmp) then rename onto path, so that path holds the old file or the whole new one.

    A failed write (a full disk, Ctrl-C) removes its temporary file; a full disk says what is kept.
    """
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if not isinstance(e, OSError):
            raise
        kept = "the earlier version is kept" if path.exists() else "nothing was written under that name"
        raise UserError(
            f"{path}: could not write it ({e.strerror or e}); {kept}. Free some space or choose another folder"
        ) from None


def writable_folder(path, what: str) -> None:
    """Refuse, before any work, a folder that cannot hold outputs: a file in its way, or no write permission."""
    path = Path(path).absolute()
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir():
        raise UserError(f"{what}={path}: {existing} is a file, not a folder; choose another {what}")
    if not os.access(existing, os.W_OK):
        raise UserError(f"{what}={path}: {existing} is not writable; choose another {what}")


def check_outputs(args: list[str]) -> None:
    """Before Hydra makes the run folder: outputs= and hydra.run.dir= of a command line must be writable folders."""
    given = dict(a.split("=", 1) for a in args if "=" in a and not a.startswith(("+", "~")))
    writable_folder(given.get("outputs", "outputs"), "outputs")
    Path(given.get("outputs", "outputs")).mkdir(parents=True, exist_ok=True)  # an Optuna study is stored there
    if "${" not in given.get("hydra.run.dir", "${"):
        writable_folder(given["hydra.run.dir"], "hydra.run.dir")


def check_space(run_dir: Path, model) -> None:
    """Before the first epoch: the run folder takes a file, and has room for the checkpoints of this model."""
    probe = run_dir / CKPT / ".write-test"
    try:
        probe.parent.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"segnet")
        probe.unlink()
    except OSError as e:
        raise UserError(f"{run_dir}: cannot write there ({e.strerror or e}); choose another outputs=...") from None
    # Two last-epoch files (weights and Adam's two moments, old and new) and the best model, in float32.
    need = 7 * 4 * model.count_params()
    free = shutil.disk_usage(run_dir).free
    if free < need:
        raise UserError(
            f"{run_dir}: {free >> 20} MiB free, but this model's checkpoints need about {need >> 20} MiB; "
            "free some space or choose another outputs=..."
        )


def write_json(path: Path, obj) -> None:
    save_atomic(path, lambda p: p.write_text(json.dumps(obj, indent=1)))


def read_state(run: Path) -> dict:
    return json.loads((Path(run) / STATE).read_text())


def config_key(cfg) -> str:
    """Names a training config, so that the same command started again finds its interrupted run."""
    return hashlib.sha1(json.dumps(OmegaConf.to_container(cfg, resolve=True), sort_keys=True).encode()).hexdigest()


def newest(outputs, where=lambda state: True) -> Path | None:
    """The run under outputs/ whose state.json was written last, among those whose state satisfies `where`."""
    runs = [p.parents[1] for p in Path(outputs).glob(f"**/{STATE}")]
    return max((r for r in runs if where(read_state(r))), key=lambda r: (r / STATE).stat().st_mtime, default=None)


def finished(cfg) -> Path | None:
    """The newest finished run of this very config under outputs/ (a sweep started again skips it)."""
    key = config_key(cfg)
    return newest(cfg.outputs, lambda state: state.get("config") == key and state.get("finished"))


def best_model(outputs) -> Path:
    """The best checkpoint of the newest run, for commands given no model."""
    run = newest(outputs)
    if run is None:
        raise FileNotFoundError(
            f"no trained run under {Path(outputs).resolve()}: train one with `python train.py`, "
            "or pass --model RUN_DIR or a .keras file"
        )
    if not (run / BEST).exists():
        raise FileNotFoundError(f"the newest run, {run}, has no {BEST} yet (no validation ran); pass --model")
    return run / BEST


def to_continue(cfg, run_dir: Path) -> Path | None:
    """The run this training continues, or None for a fresh start.

    trainer.resume=true: the run folder itself if it holds a state, else the newest run, whatever its config.
    trainer.backup (the default): the newest unfinished run of this very config, so that the same command,
    started again after a kill or a preemption, carries on.
    """
    own = run_dir if (run_dir / STATE).exists() else None
    if cfg.trainer.resume:
        prev = own or newest(cfg.outputs)
        if prev is None:
            raise FileNotFoundError(
                f"trainer.resume=true but neither {run_dir} nor any run under {cfg.outputs}/ has a checkpoint"
            )
        return prev
    if cfg.trainer.backup:
        key = config_key(cfg)
        same = lambda state: state.get("config") == key  # noqa: E731
        prev = own if own is not None and same(read_state(own)) else newest(cfg.outputs, same)
        if prev is not None and not read_state(prev).get("finished"):
            return prev
    return None


def seed_states(model) -> list:
    """Dropout's random generator states: save_weights leaves them out, but an exact resume needs them."""
    return [v for v in model.variables if v.path.endswith("seed_generator_state")]


def restore(model, prev: Path, run_dir: Path, chief: bool = True) -> dict:
    """Load the last epoch of run `prev` into model (weights, optimizer, random states); return its state.

    When the run continues into a new folder, the best checkpoint so far is copied there too, so that
    every run folder holds the best model of its whole training.
    """
    state = read_state(prev)
    try:
        model.load_weights(prev / CKPT / state["weights"])
    except ValueError as e:  # Keras files weights by layer class: another segnet version or another model
        raise UserError(
            f"{prev / CKPT / state['weights']} does not fit this model ({first_line(e)}): it was written by "
            f"another model or an earlier segnet. Start a new run (trainer.resume=false), or start one from its "
            f"best weights by layer name: model.init={prev}"
        ) from None
    saved, ours = state.get("rng", []), seed_states(model)
    if len(saved) != len(ours):
        raise UserError(
            f"{prev / STATE} holds {len(saved)} random states, this model has {len(ours)}: "
            "it is another model's run; start a new run (trainer.resume=false)"
        )
    for v, value in zip(ours, saved, strict=True):
        v.assign(np.asarray(value, v.dtype))
    if chief and prev.resolve() != run_dir.resolve():
        (run_dir / CKPT).mkdir(parents=True, exist_ok=True)
        for name in (BEST, BEST_JSON):
            if (prev / name).exists():
                shutil.copy2(prev / name, run_dir / name)
    return state


def save_best(run_dir: Path, model, info: dict) -> None:
    save_atomic(run_dir / BEST, model.save)
    write_json(run_dir / BEST_JSON, info)


def save_last(run_dir: Path, model, state: dict) -> None:
    """The epoch just finished: its weights, then the state naming them, then the older weights go."""
    weights = f"last-e{state['epoch']:04d}.weights.h5"
    save_atomic(run_dir / CKPT / weights, model.save_weights)
    state.update(weights=weights, rng=[v.numpy().tolist() for v in seed_states(model)])
    write_json(run_dir / STATE, state)
    for old in (run_dir / CKPT).glob("last-e*.weights.h5"):
        if old.name != weights:
            old.unlink()


def model_path(model=None, outputs="outputs") -> Path:
    """The model file or folder: a run's best checkpoint, a given file or export, or the newest run's best."""
    if model is None:
        return best_model(outputs)
    path = Path(model)
    if path.is_dir() and not (path / "saved_model.pb").exists():
        if not (path / BEST).exists():
            raise UserError(
                f"{path}: a folder that is neither a run (no {BEST}) nor a SavedModel (no saved_model.pb); "
                "pass a run folder, a .keras file or an export of segnet.export"
            )
        path = path / BEST
    if not path.exists():
        raise FileNotFoundError(
            f"{path} does not exist: pass a run folder holding {BEST}, a .keras file, "
            "or an export (SavedModel folder, .tflite, .onnx)"
        )
    return path


def best_threshold(model_path: Path) -> float | None:
    """The validation BestThresh recorded beside a checkpoint (best.json), if any."""
    info = model_path.with_name(Path(BEST_JSON).name)
    if model_path.suffix != ".keras" or not info.exists():
        return None
    return json.loads(info.read_text()).get("best_thresh")
