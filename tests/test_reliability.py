"""Reliability: a killed or stopped run loses at most its current epoch; bad config values, unwritable places,
damaged models, empty inputs and huge images are each one clear error or a bounded success."""

import dataclasses
import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import typing
from pathlib import Path

import h5py
import keras
import numpy as np
import pytest
from conftest import ROOT, TINY, compose
from PIL import Image

from segnet import config, predict, runs
from segnet.errors import UserError
from segnet.train import NonFiniteLoss, check_finite, ctrl_c_between_batches, train

DETERMINISTIC = [*TINY, "trainer.deterministic=true", "trainer.epochs=3", "trainer.steps_per_epoch=4"]


def train_cmd(tmp_path, run, *extra):
    return [
        sys.executable, str(ROOT / "train.py"), *DETERMINISTIC, f"dataset.root={tmp_path / 'synthetic'}",
        f"outputs={tmp_path / 'outputs'}", f"hydra.run.dir={tmp_path / 'outputs' / run}", *extra,
    ]  # fmt: skip


def weights(path) -> list[np.ndarray]:
    out = []
    with h5py.File(path, "r") as f:
        f.visititems(lambda name, obj: out.append(obj[()]) if isinstance(obj, h5py.Dataset) else None)
    return out


def wait_for_epoch(path, epoch, proc, timeout=300):
    start = time.time()
    while time.time() - start < timeout:
        if path.exists() and json.loads(path.read_text() or "{}").get("epoch", 0) >= epoch:
            return
        if proc.poll() is not None:
            raise AssertionError(f"training ended early: {proc.stderr.read()}")
        time.sleep(0.05)
    raise AssertionError("timed out")


@pytest.mark.slow
def test_killed_run_resumes_and_ends_where_an_uninterrupted_run_ends(tmp_path):
    full = subprocess.run(train_cmd(tmp_path, "full"), capture_output=True, text=True, timeout=600)
    assert full.returncode == 0, full.stderr

    proc = subprocess.Popen(train_cmd(tmp_path, "killed"), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_epoch(tmp_path / "outputs" / "killed" / "checkpoints" / "state.json", 1, proc)
        proc.send_signal(signal.SIGKILL)  # during epoch 2
    finally:
        proc.kill()
        proc.wait()
    state = json.loads((tmp_path / "outputs" / "killed" / "checkpoints" / "state.json").read_text())
    assert state["epoch"] in (1, 2) and (tmp_path / "outputs" / "killed" / "checkpoints" / state["weights"]).exists()

    resumed = subprocess.run(
        train_cmd(tmp_path, "resumed", "trainer.resume=true"), capture_output=True, text=True, timeout=600
    )
    assert resumed.returncode == 0, resumed.stderr
    assert f"after epoch {state['epoch']}" in resumed.stdout
    ck = tmp_path / "outputs"
    a, b = (
        weights(ck / "full/checkpoints/last-e0003.weights.h5"),
        weights(ck / "resumed/checkpoints/last-e0003.weights.h5"),
    )
    assert len(a) == len(b) > 0
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)
    # Deterministic mode: two runs of one config give identical validation scores.
    best = [json.loads((ck / r / "checkpoints/best.json").read_text()) for r in ("full", "resumed")]
    assert best[0] == best[1]


def test_ctrl_c_keeps_finished_epochs_and_says_how_to_resume(tmp_path):
    proc = subprocess.Popen(
        train_cmd(tmp_path, "run", "trainer.epochs=50"), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    state = tmp_path / "outputs" / "run" / "checkpoints" / "state.json"
    try:
        wait_for_epoch(state, 1, proc)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130
    assert "trainer.resume=true" in err and "Traceback" not in err
    assert json.loads(state.read_text())["epoch"] >= 1


def test_ctrl_c_is_taken_between_batches_and_twice_stops_at_once():
    """The first Ctrl-C only sets the flag the loop checks (an exception raised inside a finaliser would be
    swallowed and the run go on); the second raises at once; the previous handler comes back afterwards."""
    before = signal.getsignal(signal.SIGINT)
    with ctrl_c_between_batches() as stop:
        assert not stop.is_set()
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.1)  # the handler runs at the next bytecode; the sleep gives it one
        assert stop.is_set()
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
    assert signal.getsignal(signal.SIGINT) is before


def test_a_non_finite_loss_stops_training_with_a_clear_message(tmp_path):
    check_finite(0.7, finished=4, batch=0)  # a finite loss passes
    with pytest.raises(NonFiniteLoss, match="epoch 5, batch 4.*epochs 1-4 are saved.*trainer.lr"):
        check_finite(float("nan"), finished=4, batch=3)

    # A loss that turns NaN at the first batch (a diverged run): exit 3, and no broken weights on disk.
    nan_loss = (
        "import runpy, sys; sys.argv = sys.argv[1:]; sys.path.insert(0, sys.argv[0].rpartition('/')[0]); "
        "import segnet.train as t; real = t.loss_sums; "
        "t.loss_sums = lambda *a, **k: tuple(v * float('nan') for v in real(*a, **k)); "
        "runpy.run_path(sys.argv[0], run_name='__main__')"
    )
    out = subprocess.run(
        [sys.executable, "-c", nan_loss, *train_cmd(tmp_path, "nan")[1:]], capture_output=True, text=True
    )
    assert out.returncode == 3
    assert "the loss became nan in epoch 1, batch 1" in out.stderr and "no epoch had finished" in out.stderr
    assert "Traceback" not in out.stderr
    assert not list((tmp_path / "outputs" / "nan").glob("checkpoints/*.h5"))


# --- every config value checked at start ---------------------------------------------------------------


def bounded_fields(node=config.Config, path=""):
    """(key, an out-of-range value) for every field of the schema that has bounds."""
    for f in dataclasses.fields(node):
        hint = typing.get_type_hints(node)[f.name]
        types = (hint, *typing.get_args(hint))
        sub = next((t for t in (*types, *typing.get_args(types[-1])) if dataclasses.is_dataclass(t)), None)
        if sub is not None:  # a node, or a list of them (dataset.classes: its first item)
            yield from bounded_fields(sub, f"{path}{f.name}.{'0.' if list in map(typing.get_origin, types) else ''}")
        if "bounds" in f.metadata:
            lo, hi, open_lo, _ = f.metadata["bounds"]
            bad = (lo if open_lo else lo - 1) if lo is not None else hi + 1
            many = f.metadata["length"] or (2 if list in map(typing.get_origin, types) else 0)  # 2: one per class
            yield path + f.name, f"[{','.join([str(bad)] * many)}]" if many else str(bad)


@pytest.mark.parametrize("key,bad", list(bounded_fields()))
def test_every_bounded_value_of_the_schema_is_refused_out_of_range(key, bad):
    overrides = ["dataset=synthetic"] + (["dataset.val_fraction=0.2"] if key == "dataset.val_fraction" else [])
    if key.startswith("trainer.") and key.endswith(("steps_per_epoch", "class_weights")):
        overrides.append(f"{key}=null")  # nullable: first show that null passes
        assert not config.check_values(compose(overrides))
    problems = config.check_values(compose([*overrides, f"{key}={bad}"]))
    assert len(problems) == 1 and problems[0].startswith(f"{key}=") and "must be" in problems[0], problems


def test_out_of_range_values_stop_train_py_before_any_work(tmp_path):
    out = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "trainer.epochs=0", "trainer.lr=nan", "dataset.augment.scale=[1.2,0.8]",
         f"dataset.root={tmp_path / 'data'}", f"outputs={tmp_path / 'out'}"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "trainer.epochs=0: must be at least 1" in out.stderr and "trainer.lr=nan: must be above 0" in out.stderr
    assert "dataset.augment.scale=[1.2,0.8]: give [min, max], min first" in out.stderr
    assert not (tmp_path / "data").exists()


# --- places that cannot be written ---------------------------------------------------------------------


def test_outputs_that_cannot_be_written_are_refused_before_hydra_starts(tmp_path, run):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    for args in (["train.py", f"outputs={blocker}"], ["train.py", f"hydra.run.dir={blocker}/run"],
                 ["evaluate.py", f"outputs={blocker / 'x'}"]):  # fmt: skip
        out = subprocess.run([sys.executable, str(ROOT / args[0]), *args[1:]], capture_output=True, text=True)
        assert out.returncode == 2 and f"{blocker} is a file, not a folder" in out.stderr, out.stderr
    image = tmp_path / "x.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(image)
    out = subprocess.run([sys.executable, str(ROOT / "infer.py"), str(image), "--model", str(run[1]),
                          "--out", str(blocker)], capture_output=True, text=True)  # fmt: skip
    assert out.returncode == 2 and "--out=" in out.stderr and "is a file, not a folder" in out.stderr


def test_a_disk_too_small_for_the_checkpoints_is_refused_before_the_first_epoch(tmp_path, monkeypatch):
    monkeypatch.setattr(runs.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10 << 30, 10 << 30, 5 << 20))
    cfg = compose([*TINY, f"dataset.root={tmp_path / 'synthetic'}", f"outputs={tmp_path / 'out'}"])
    with pytest.raises(UserError, match=r"5 MiB free, but this model's checkpoints need about \d+ MiB"):
        train(cfg, tmp_path / "out" / "run")
    assert not list((tmp_path / "out" / "run").glob("logs/*"))  # stopped before training


def test_a_disk_that_fills_up_during_a_checkpoint_keeps_the_last_complete_one(tmp_path, monkeypatch):
    real, calls = keras.Model.save_weights, []

    def full_disk_on_epoch_2(self, path, *args, **kwargs):
        calls.append(path)
        if len(calls) == 2:
            Path(path).write_bytes(b"half a checkpoint")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, path, *args, **kwargs)

    monkeypatch.setattr(keras.Model, "save_weights", full_disk_on_epoch_2)
    cfg = compose([*TINY, f"dataset.root={tmp_path / 'synthetic'}", f"outputs={tmp_path / 'out'}"])
    run_dir = tmp_path / "out" / "run"
    with pytest.raises(UserError, match="last-e0002.weights.h5: could not write it \\(No space left on device\\)"):
        train(cfg, run_dir)
    state = json.loads((run_dir / "checkpoints" / "state.json").read_text())
    assert state["epoch"] == 1 and (run_dir / "checkpoints" / state["weights"]).stat().st_size > 1000
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == [
        "best.json", "best.keras", "last-e0001.weights.h5", "state.json"]  # fmt: skip


# --- damaged models, nothing to predict, interrupted inference, huge images -----------------------------


def test_a_model_file_that_is_not_a_model_is_named_damaged_or_foreign(tmp_path, run):
    best = run[1] / "checkpoints" / "best.keras"
    (tmp_path / "truncated.keras").write_bytes(best.read_bytes()[:5000])
    foreign = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    foreign.save(tmp_path / "foreign.keras")
    for name in ("garbage.onnx", "garbage.tflite"):
        (tmp_path / name).write_bytes(b"\x00 not a model " * 100)
    (tmp_path / "some_folder").mkdir()
    cases = {
        "truncated.keras": "not a segnet model, or damaged",
        "foreign.keras": "a Keras model, but not segnet's",
        "garbage.onnx": "not a segnet model, or damaged",
        "garbage.tflite": "not a segnet model, or damaged",
        "some_folder": "neither a run (no checkpoints/best.keras) nor a SavedModel",
    }
    for name, message in cases.items():
        with pytest.raises(UserError, match=re.escape(message)):
            predict.load(tmp_path / name)
    image = tmp_path / "x.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(image)
    out = subprocess.run([sys.executable, str(ROOT / "infer.py"), str(image), "--model", str(tmp_path / "truncated.keras"),
                          "--out", str(tmp_path / "out")], capture_output=True, text=True)  # fmt: skip
    assert out.returncode == 2 and "truncated.keras: not a segnet model, or damaged" in out.stderr
    assert "Traceback" not in out.stderr and "does not exist" not in out.stderr


def test_inputs_with_nothing_to_predict_fail_instead_of_succeeding_silently(tmp_path, run):
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("hello")
    (tmp_path / "empty.mp4").write_bytes(b"")
    cases = [
        (tmp_path / "empty", "empty: 0 entries, none an image or a video"),
        (f"{tmp_path}/notes/*", "notes/*: 1 entries, none an image or a video"),
        (tmp_path / "empty.mp4", "empty.mp4: not a readable video"),
    ]
    for arg, message in cases:
        out = subprocess.run([sys.executable, str(ROOT / "infer.py"), str(arg), "--model", str(run[1]),
                              "--out", str(tmp_path / "out")], capture_output=True, text=True)  # fmt: skip
        assert out.returncode == 2 and message in out.stderr and "Traceback" not in out.stderr, out.stderr
    assert not list((tmp_path / "out").glob("*"))


def test_an_interrupted_folder_leaves_whole_files_and_resume_does_the_rest(tmp_path, run, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(ROOT))
    import infer

    frames = tmp_path / "frames"
    frames.mkdir()
    for i in range(5):
        Image.fromarray(np.full((16, 24, 3), 40 * i, np.uint8)).save(frames / f"f{i}.png")
    real_save, saved = Image.Image.save, []

    def ctrl_c_on_the_fourth_file(self, fp, *args, **kwargs):
        if len(saved) == 3:
            Path(fp).write_bytes(b"\x89PNG half")
            raise KeyboardInterrupt
        saved.append(fp)
        return real_save(self, fp, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", ctrl_c_on_the_fourth_file)
    args = [str(frames), "--model", str(run[1]), "--out", str(tmp_path / "out")]
    with pytest.raises(SystemExit) as exit:
        infer.main(args)
    assert exit.value.code == 130
    written = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert written == ["f0_mask.png", "f0_overlay.png", "f1_mask.png"]  # whole files only, no temporary left
    for p in (tmp_path / "out").iterdir():
        assert np.asarray(Image.open(p)).shape[:2] == (16, 24)
    monkeypatch.setattr(Image.Image, "save", real_save)
    with pytest.raises(SystemExit):
        infer.main(args)  # the same command again: refuses to overwrite
    capsys.readouterr()
    assert infer.main([*args, "--resume"]) == 0
    assert "--resume: 1 input(s) already done, 4 to go" in capsys.readouterr().out
    assert len(list((tmp_path / "out").iterdir())) == 10


def test_a_huge_image_is_predicted_within_the_stated_memory_bound(tmp_path, run):
    """A 12-megapixel photo: mask at full size, peak memory of the whole infer.py process under 2 GiB."""
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (3000, 4000, 3), dtype=np.uint8)).save(tmp_path / "photo.png")
    code = (
        "import sys, runpy; sys.argv = sys.argv[1:]; sys.path.insert(0, sys.argv[0].rpartition('/')[0]); "
        "exit = 0\ntry:\n runpy.run_path(sys.argv[0], run_name='__main__')\nexcept SystemExit as e:\n exit = e.code\n"
        # VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the parent (pytest) through fork and exec.
        "hwm = next(l for l in open('/proc/self/status') if l.startswith('VmHWM'))\n"
        "print('PEAK_MIB', int(hwm.split()[1]) / 1024); sys.exit(exit)"
    )
    out = subprocess.run([sys.executable, "-c", code, str(ROOT / "infer.py"), str(tmp_path / "photo.png"),
                          "--model", str(run[1]), "--out", str(tmp_path / "out"), "--write", "mask"],
                         capture_output=True, text=True, timeout=600)  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert np.asarray(Image.open(tmp_path / "out" / "photo_mask.png")).shape == (3000, 4000)
    assert float(out.stdout.split("PEAK_MIB")[1]) < 2048


def test_precision_is_chosen_and_said(tmp_path, run):
    image = sorted((Path(run[0].dataset.root) / "testing" / "image_2").glob("*.png"))[0]
    masks = {}
    for precision in ("float32", "bfloat16"):
        out = subprocess.run([sys.executable, str(ROOT / "infer.py"), str(image), "--model", str(run[1]),
                              "--precision", precision, "--out", str(tmp_path / precision), "--write", "prob"],
                             capture_output=True, text=True)  # fmt: skip
        assert out.returncode == 0 and f"in {precision}," in out.stdout, out.stderr
        masks[precision] = np.asarray(Image.open(tmp_path / precision / f"{image.stem}_prob.png"), np.int32)
    assert np.abs(masks["float32"] - masks["bfloat16"]).max() <= 8  # the same model, within bfloat16 rounding
    out = subprocess.run([sys.executable, str(ROOT / "evaluate.py"), *TINY, f"dataset.root={run[0].dataset.root}",
                          f"outputs={tmp_path}", f"eval.run={run[1]}", "eval.precision=float32"],
                         capture_output=True, text=True)  # fmt: skip
    assert out.returncode == 0 and "in float32" in out.stdout, out.stderr


def test_a_run_folder_outside_outputs_is_continued_by_the_same_command(tmp_path):
    command = [sys.executable, str(ROOT / "train.py"), *TINY, "trainer.epochs=1", f"dataset.root={tmp_path / 'data'}",
               f"outputs={tmp_path / 'outputs'}", f"hydra.run.dir={tmp_path / 'scratch' / 'run1'}"]  # fmt: skip
    first = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr
    again = subprocess.run([*command, "trainer.epochs=2", "trainer.resume=true"], capture_output=True, text=True)
    assert again.returncode == 0, again.stderr
    assert f"resumed from {tmp_path / 'scratch' / 'run1'} after epoch 1" in again.stdout
    assert json.loads((tmp_path / "scratch/run1/checkpoints/state.json").read_text())["epoch"] == 2
