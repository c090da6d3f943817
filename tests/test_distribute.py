"""tf.distribute: two CPU replicas train like one device; two worker processes train together; a killed job
started again with the same command continues."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf
from conftest import ROOT, TINY, compose

from segnet import data
from segnet.train import worker_input

ONE_EPOCH = [*TINY, "trainer.epochs=1", "trainer.deterministic=true"]


def run_python(code, tmp_path, timeout=600):
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=timeout)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


@pytest.mark.slow
def test_mirrored_over_two_cpu_replicas_gives_the_loss_of_one_device(tmp_path):
    """The same global batch of 4, split over two replicas or not: one epoch ends at the same loss."""
    code = f"""
import json, sys
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
sys.path.insert(0, {str(ROOT / "tests")!r})
from conftest import compose
from segnet.train import train
common = {ONE_EPOCH!r} + ["dataset.root={tmp_path / "synthetic"}", "outputs={tmp_path / "out"}", "trainer.backup=false"]
one = train(compose(common + ["trainer.strategy=one_device", "trainer.batch_size=4"]), __import__("pathlib").Path("{tmp_path}/one"))
two = train(compose(common + ["trainer.strategy=mirrored", "trainer.batch_size=2"]), __import__("pathlib").Path("{tmp_path}/two"))
print("LOSSES", json.dumps([one["loss"], two["loss"]]))
"""
    out = run_python(code, tmp_path)
    assert "2 replica(s), batch 4" in out
    one, two = json.loads(out.split("LOSSES")[1])
    assert two == pytest.approx(one, rel=0.05)


def test_each_worker_reads_its_own_share_of_the_frames_reproducibly(tmp_path):
    cfg = compose([*TINY, f"dataset.root={tmp_path / 'synthetic'}"])
    train_s, _ = data.split_samples(data.list_samples(data.prepare(cfg.dataset)), cfg.dataset)
    _, labels = data.training_set(train_s, cfg.dataset)
    input_fn = worker_input(train_s, cfg, global_batch=4, skip_steps=0)

    def batches(worker):
        ctx = tf.distribute.InputContext(num_input_pipelines=2, input_pipeline_id=worker, num_replicas_in_sync=2)
        return [(x.numpy(), y.numpy()) for x, y, _ in input_fn(ctx).take(12)]

    def frames_seen(worker):  # which training frames a worker's (possibly flipped) labels come from
        seen = [lb for _, y in batches(worker) for lb in y]
        return {next(i for i, t in enumerate(labels) if (lb == t).all() or (lb == t[:, ::-1]).all()) for lb in seen}

    assert batches(0)[0][0].shape[0] == 2  # trainer.batch_size per replica: the global 4 over two replicas
    first, second = frames_seen(0), frames_seen(1)
    assert first.isdisjoint(second) and first | second == set(range(len(train_s)))
    np.testing.assert_array_equal(batches(1)[0][0], batches(1)[0][0])  # seeded: the same batches every time


def test_the_cluster_comes_from_tf_config_or_from_slurm(monkeypatch):
    from segnet.distribute import cluster_resolver

    monkeypatch.delenv("TF_CONFIG", raising=False)
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    monkeypatch.delenv("SLURM_GPUS_ON_NODE", raising=False)
    with pytest.raises(ValueError, match="TF_CONFIG"):
        cluster_resolver()
    # Three Slurm tasks, two on node1 and one on node2, on nodes without GPUs; this process is task 1.
    slurm = {"SLURM_JOB_ID": "7", "SLURM_PROCID": "1", "SLURM_STEP_NUM_TASKS": "3",
             "SLURM_STEP_NODELIST": "node[1-2]", "SLURM_STEP_TASKS_PER_NODE": "2,1"}  # fmt: skip
    for k, v in slurm.items():
        monkeypatch.setenv(k, v)
    r = cluster_resolver()
    assert r.cluster_spec().as_dict() == {"worker": ["node1:8888", "node1:8889", "node2:8888"]}
    assert (r.task_type, r.task_id) == ("worker", 1)
    # With 4 GPUs per node, task 1 (the second on node1) gets GPUs 2 and 3.
    monkeypatch.setenv("SLURM_GPUS_ON_NODE", "4")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # restored after the test; the resolver sets it
    cluster_resolver().cluster_spec()
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "2,3"
    tf_config = {"cluster": {"worker": ["a:1", "b:2"]}, "task": {"type": "worker", "index": 0}}
    monkeypatch.setenv("TF_CONFIG", json.dumps(tf_config))  # TF_CONFIG wins when both are there
    r = cluster_resolver()
    assert r.cluster_spec().as_dict() == {"worker": ["a:1", "b:2"]} and r.task_id == 0


def free_ports(n):
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("localhost", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def start_workers(tmp_path, workers, *extra):
    """One train.py process per worker of a TF_CONFIG cluster on localhost, sharing outputs/ as on a cluster."""
    procs = []
    for i in range(len(workers)):
        tf_config = {"cluster": {"worker": workers}, "task": {"type": "worker", "index": i}}
        cmd = [
            sys.executable, str(ROOT / "train.py"), *TINY, "trainer.strategy=multi_worker", *extra,
            f"dataset.root={tmp_path / 'synthetic'}", f"outputs={tmp_path / 'out'}", f"hydra.run.dir={tmp_path / 'out' / f'w{i}'}",
        ]  # fmt: skip
        env = {**os.environ, "TF_CONFIG": json.dumps(tf_config)}
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    return procs


def finish(procs, timeout=300):
    try:
        return [p.communicate(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            p.kill()
            p.wait()


@pytest.mark.slow
def test_two_workers_train_only_the_chief_writes_and_a_killed_job_continues(tmp_path):
    """MultiWorkerMirroredStrategy over two processes on localhost ports, killed mid-run and started again."""
    workers = [f"localhost:{p}" for p in free_ports(2)]
    extra = ["trainer.epochs=6", "trainer.steps_per_epoch=3"]
    run = [tmp_path / "out" / f"w{i}" for i in range(2)]
    state = run[0] / "checkpoints" / "state.json"
    procs = start_workers(tmp_path, workers, *extra)
    try:
        deadline = time.time() + 300
        while not state.exists():
            assert time.time() < deadline and all(p.poll() is None for p in procs), "no epoch finished"
            time.sleep(0.05)
        procs[1].send_signal(signal.SIGKILL)  # one machine lost: the chief must stop too, not hang
        _, err = procs[0].communicate(timeout=120)
    finally:
        finish(procs)
    assert procs[0].returncode == 4 and "lost contact with another worker" in err and "same command" in err
    killed_at = json.loads(state.read_text())["epoch"]
    assert killed_at < 6

    results = finish(start_workers(tmp_path, workers, *extra))  # the same command again
    for out, err in results:
        assert "Epoch 6/6" in out, err[-3000:]
        assert f"continuing an interrupted run of this config from {run[0]} after epoch {killed_at}" in out
        assert "Epoch 1/6" not in out
        assert f"2 replica(s), batch {2 * 4}" in out  # trainer.batch_size is per replica
    final = json.loads(state.read_text())
    assert final["epoch"] == 6 and final["finished"]
    assert (run[0] / "checkpoints" / "best.keras").is_file() and (run[0] / "logs").is_dir()
    # The second worker trained every step with the chief but wrote nothing of its own.
    assert not (run[1] / "checkpoints").exists() and not (run[1] / "logs").exists()


def test_a_killed_job_started_again_with_the_same_command_continues(tmp_path):
    cmd = [
        sys.executable, str(ROOT / "train.py"), *TINY, "trainer.epochs=4", "trainer.steps_per_epoch=3",
        f"dataset.root={tmp_path / 'synthetic'}", f"outputs={tmp_path / 'out'}",
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        while not list((tmp_path / "out").glob("*/*/checkpoints/state.json")):
            assert time.time() < deadline and proc.poll() is None
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    again = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "continuing an interrupted run" in again.stdout
    assert "Epoch 1/4" not in again.stdout and "Epoch 4/4" in again.stdout
    third = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert third.returncode == 0 and "Epoch 1/4" in third.stdout  # a finished run is not continued: a new one
