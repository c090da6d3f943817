"""tf.distribute: two CPU replicas train like one device; a killed job restarted continues; two workers refused."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
from conftest import ROOT, TINY

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


def free_ports(n):
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("localhost", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def test_several_workers_are_refused_with_the_reason_not_a_keras_traceback(tmp_path):
    """Keras 3's fit cannot run MultiWorkerMirroredStrategy over two workers (tensorflow#72388): say so."""
    workers = [f"localhost:{p}" for p in free_ports(2)]
    procs = []
    for i in range(2):
        env = {
            **os.environ,
            "TF_CONFIG": json.dumps({"cluster": {"worker": workers}, "task": {"type": "worker", "index": i}}),
        }
        cmd = [
            sys.executable, str(ROOT / "train.py"), *TINY, "trainer.strategy=multi_worker",
            f"dataset.root={tmp_path / 'synthetic'}", f"outputs={tmp_path / 'out'}", f"hydra.run.dir={tmp_path / f'w{i}'}",
        ]  # fmt: skip
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    try:
        results = [p.communicate(timeout=300) for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, (_, err) in zip(procs, results, strict=True):
        assert p.returncode == 3, err[-2000:]
        assert "tensorflow/issues/72388" in err and "trainer.strategy=mirrored" in err and "Traceback" not in err
    assert not (tmp_path / "synthetic").exists()  # refused before any work


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
    assert not list((tmp_path / "out" / "backup").glob("*/*.h5"))  # a finished run removes its backup
