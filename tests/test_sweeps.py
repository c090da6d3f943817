"""Experiments: Hydra multiruns, an Optuna search and a Submitit sweep on tiny data; HParams, early stopping, EMA."""

import json
import sqlite3
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
import yaml
from conftest import ROOT, TINY, compose

from segnet.train import compiled_model, inference_weights, out_of_patience, train_step

ONE_EPOCH = [*TINY, "trainer.epochs=1"]


def sweep(tmp_path, *args):
    command = [sys.executable, str(ROOT / "train.py"), "-m", *ONE_EPOCH, f"dataset.root={tmp_path / 'data'}",
               f"outputs={tmp_path / 'out'}", *args]  # fmt: skip
    out = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def session_hparams(run_dir) -> dict:
    """The hyperparameters a run wrote for TensorBoard's HParams table."""
    from tensorboard.plugins.hparams import plugin_data_pb2

    for f in (run_dir / "logs").glob("events*"):
        for e in tf.compat.v1.train.summary_iterator(str(f)):
            for v in e.summary.value:
                if v.tag == "_hparams_/session_start_info":
                    data = plugin_data_pb2.HParamsPluginData.FromString(v.metadata.plugin_data.content)
                    return {k: getattr(x, x.WhichOneof("kind")) for k, x in data.session_start_info.hparams.items()}
    return {}


def scalars(run_dir, tag) -> list[float]:
    return [float(tf.make_ndarray(v.tensor)) for f in (run_dir / "logs").glob("events*")
            for e in tf.compat.v1.train.summary_iterator(str(f)) for v in e.summary.value if v.tag == tag]  # fmt: skip


def test_a_multirun_gives_each_job_its_folder_and_a_sweep_started_again_skips_what_finished(tmp_path):
    out = sweep(tmp_path, "trainer.lr=1e-3,3e-4")
    jobs = sorted((tmp_path / "out" / "multirun").glob("*/*/[0-9]"))
    assert [j.name for j in jobs] == ["0", "1"] and out.count("Epoch 1/1") == 2
    states = [json.loads((j / "checkpoints" / "state.json").read_text()) for j in jobs]
    assert states[0]["config"] != states[1]["config"] and all(s["finished"] for s in states)
    assert [session_hparams(j)["trainer.lr"] for j in jobs] == pytest.approx([1e-3, 3e-4])
    assert scalars(jobs[0], "hparams/best_maxf") == pytest.approx([states[0]["best"]])
    # Job 1 was killed before it finished: the same sweep, started again, trains only job 1, from its epoch.
    states[1]["finished"] = False
    (jobs[1] / "checkpoints" / "state.json").write_text(json.dumps(states[1]))
    again = sweep(tmp_path, "trainer.lr=1e-3,3e-4", "trainer.epochs=1")
    assert again.count("already trained") == 1 and f"from {jobs[1]} after epoch 1" in again
    assert "Epoch 1/1" not in again


def test_an_optuna_search_returns_the_best_maxf_and_its_study_resumes(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper", reason="the sweep extra: pip install -e '.[sweep]'")
    sweep(tmp_path, "hparams_search=kitti_optuna", "hydra.sweeper.n_trials=2")
    (results,) = (tmp_path / "out" / "multirun").glob("*/*/optimization_results.yaml")
    best = yaml.safe_load(results.read_text())["best_value"]
    trials = sorted(results.parent.glob("[0-9]"))
    maxf = [json.loads((t / "checkpoints" / "best.json").read_text())["maxf"] for t in trials]
    assert len(trials) == 2 and best == pytest.approx(max(maxf))
    assert session_hparams(trials[0])["trainer.lr"] != session_hparams(trials[1])["trainer.lr"]
    study = tmp_path / "out" / "optuna.db"
    count = "SELECT COUNT(*) FROM trials WHERE state = 'COMPLETE'"
    assert sqlite3.connect(study).execute(count).fetchone()[0] == 2
    sweep(tmp_path, "hparams_search=kitti_optuna", "hydra.sweeper.n_trials=1")  # the same study, continued
    assert sqlite3.connect(study).execute(count).fetchone()[0] == 3


def test_a_submitit_local_sweep_runs_both_jobs(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="the sweep extra: pip install -e '.[sweep]'")
    sweep(tmp_path, "hydra/launcher=submitit_local", "trainer.lr=1e-3,3e-4")
    jobs = sorted((tmp_path / "out" / "multirun").glob("*/*/[0-9]"))
    assert [j.name for j in jobs] == ["0", "1"]
    assert all((j / "checkpoints" / "best.keras").is_file() for j in jobs)


def test_early_stopping_counts_validations_without_a_better_maxf():
    state = {"best_epoch": 4}
    assert not out_of_patience(state, 5, patience=2, val_every=1)
    assert out_of_patience(state, 6, patience=2, val_every=1)
    assert not out_of_patience(state, 6, patience=2, val_every=2) and out_of_patience(state, 8, 2, 2)
    assert not out_of_patience(state, 100, patience=None, val_every=1) and not out_of_patience({}, 9, 1, 1)


def test_ema_validates_the_moving_average_and_plain_training_the_weights(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 255, (2, 64, 96, 3)).astype("float32")
    y = (rng.uniform(size=(2, 64, 96)) > 0.5).astype(np.uint8)
    batches = iter(tf.data.Dataset.from_tensors((x, y)).repeat())
    for ema, same in ((None, True), (0.9, False)):
        model = compiled_model(compose([*TINY, "trainer.lr=1e-2", f"trainer.ema={ema or 'null'}"]), 10)
        step = train_step(tf.distribute.get_strategy(), model)
        for _ in range(3):
            step(batches)
        current, validated = model.get_weights(), inference_weights(model)
        assert len(current) == len(validated)
        assert all(np.array_equal(a, b) for a, b in zip(current, validated, strict=True)) == same


def test_early_stopping_ends_a_run_that_stopped_improving(tmp_path):
    from segnet.train import train

    cfg = compose([*TINY, "trainer.epochs=6", "trainer.patience=1", "trainer.lr=1e-7", "trainer.warmup_epochs=0",
                   f"dataset.root={tmp_path / 'data'}", f"outputs={tmp_path / 'out'}"])  # fmt: skip
    state = train(cfg, tmp_path / "run")
    assert state["finished"] and state["epoch"] < 6 and state["epoch"] - state["best_epoch"] == 1
