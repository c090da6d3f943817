"""Run folders: one rule for the newest run, so that infer.py and trainer.resume never disagree."""

import json
import os

import pytest
from conftest import TINY, compose

from segnet import runs
from segnet.errors import UserError


def fake_run(outputs, name, state_time, best_time=None, **state):
    run = outputs / name
    (run / runs.CKPT).mkdir(parents=True)
    (run / runs.STATE).write_text(json.dumps({"epoch": 1, "weights": "last-e0001.weights.h5", **state}))
    os.utime(run / runs.STATE, (state_time, state_time))
    if best_time is not None:
        (run / runs.BEST).write_bytes(b"a model")
        os.utime(run / runs.BEST, (best_time, best_time))
    return run


def config(outputs, *extra):
    return compose([*TINY, f"outputs={outputs}", *extra])


def test_infer_and_resume_take_the_same_newest_run(tmp_path):
    # a: trained last; b: validated (best.keras written) after a's last best, but its last epoch is older.
    a = fake_run(tmp_path, "a", state_time=2000, best_time=1000)
    fake_run(tmp_path, "b", state_time=1500, best_time=1600)
    assert runs.newest(tmp_path) == a
    assert runs.best_model(tmp_path) == a / runs.BEST
    assert runs.to_continue(config(tmp_path, "trainer.resume=true"), tmp_path / "new") == a


def test_the_newest_run_without_a_best_model_is_named_not_skipped(tmp_path):
    fake_run(tmp_path, "validated", state_time=1000, best_time=1000)
    fake_run(tmp_path, "unvalidated", state_time=2000)
    with pytest.raises(FileNotFoundError, match="unvalidated, has no checkpoints/best.keras"):
        runs.best_model(tmp_path)
    with pytest.raises(FileNotFoundError, match="python train.py"):
        runs.best_model(tmp_path / "nothing")


def test_backup_continues_only_an_unfinished_run_of_the_same_config(tmp_path):
    cfg = config(tmp_path)
    key = runs.config_key(cfg)
    assert runs.to_continue(cfg, tmp_path / "new") is None  # nothing to continue
    other = fake_run(tmp_path, "other", state_time=3000, config="another config")
    mine = fake_run(tmp_path, "mine", state_time=2000, config=key)
    assert runs.to_continue(cfg, tmp_path / "new") == mine
    assert runs.to_continue(config(tmp_path, "trainer.backup=false"), tmp_path / "new") is None
    (mine / runs.STATE).write_text(json.dumps({"epoch": 2, "config": key, "finished": True}))
    assert runs.to_continue(cfg, tmp_path / "new") is None  # finished: the same command trains anew
    assert runs.to_continue(config(tmp_path, "trainer.resume=true"), tmp_path / "new") == mine  # written last
    os.utime(other / runs.STATE)
    assert runs.to_continue(config(tmp_path, "trainer.resume=true"), tmp_path / "new") == other


def test_a_run_folder_outside_outputs_is_the_first_place_to_look(tmp_path):
    cfg = config(tmp_path / "outputs")
    scratch = fake_run(tmp_path, "scratch", state_time=1000, config=runs.config_key(cfg))
    assert runs.to_continue(cfg, scratch) == scratch  # hydra.run.dir=/scratch/run1, started again
    assert runs.to_continue(config(tmp_path / "outputs", "trainer.resume=true"), scratch) == scratch
    with pytest.raises(FileNotFoundError, match="trainer.resume=true but neither"):
        runs.to_continue(config(tmp_path / "outputs", "trainer.resume=true"), tmp_path / "fresh")


def test_atomic_write_leaves_the_old_file_when_the_write_fails(tmp_path):
    path = tmp_path / "state.json"
    runs.write_json(path, {"epoch": 1})

    def broken(tmp):
        tmp.write_text('{"epo')
        raise OSError("disk full")

    with pytest.raises(UserError, match="state.json: could not write it \\(disk full\\); the earlier version is kept"):
        runs.save_atomic(path, broken)
    assert json.loads(path.read_text()) == {"epoch": 1} and list(tmp_path.iterdir()) == [path]


def test_resuming_into_a_model_the_weights_do_not_fit_is_one_clear_error(tmp_path):
    """Keras files a run's weights by layer class: an FCN-32s run (or one of an earlier segnet, whose fc6 was a
    plain Conv2D) does not load into this FCN-8s. The error names the file and both ways on; nothing is written."""
    from segnet.model import fcn

    ck = tmp_path / "run" / runs.CKPT
    ck.mkdir(parents=True)
    fcn("fcn32", width=1 / 16).save_weights(ck / "last-e0001.weights.h5")
    runs.write_json(tmp_path / "run" / runs.STATE, {"epoch": 1, "weights": "last-e0001.weights.h5"})
    before = sorted(p.name for p in ck.iterdir())
    with pytest.raises(UserError, match=r"last-e0001.weights.h5 does not fit.*trainer.resume=false.*model.init="):
        runs.restore(fcn("fcn8", width=1 / 16), tmp_path / "run", tmp_path / "new")
    assert sorted(p.name for p in ck.iterdir()) == before and not (tmp_path / "new").exists()
