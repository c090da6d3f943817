"""Interruptions and reproducibility: a killed or stopped run loses at most the epoch it was in."""

import json
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest
from conftest import ROOT, TINY

from segnet.train import NonFiniteLoss, check_finite

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


def test_a_non_finite_loss_stops_training_with_a_clear_message(tmp_path):
    check_finite(0.7, finished=4, batch=0)  # a finite loss passes
    with pytest.raises(NonFiniteLoss, match="epoch 5, batch 4.*epochs 1-4 are saved.*trainer.lr"):
        check_finite(float("nan"), finished=4, batch=3)

    # A NaN class weight makes the very first loss NaN: exit 3, and no broken weights on disk.
    out = subprocess.run(train_cmd(tmp_path, "nan", "trainer.class_weights=[nan,nan]"), capture_output=True, text=True)
    assert out.returncode == 3
    assert "the loss became nan in epoch 1, batch 1" in out.stderr and "no epoch had finished" in out.stderr
    assert "Traceback" not in out.stderr
    assert not list((tmp_path / "outputs" / "nan").glob("checkpoints/*.h5"))
