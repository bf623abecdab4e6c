"""Distributed training: MirroredStrategy on 2 logical CPUs, JAX DataParallel, multi-worker."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
from test_data import make_image_tree

from keras_newton.training import get_distribution

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
tf_only = pytest.mark.skipif(keras.backend.backend() != "tensorflow",
                             reason="tf.distribute needs the TensorFlow backend")


def run_subprocess(args, env_update, timeout=600):
    env = {**os.environ, **env_update}
    result = subprocess.run([sys.executable, *args], capture_output=True, text=True,
                            timeout=timeout, env=env, cwd=REPO)
    assert result.returncode == 0, result.stderr[-4000:]
    return result.stdout


@pytest.fixture(scope="module")
def mirrored(tmp_path_factory):
    """Runs tests/distribute_check.py once (2 logical CPUs) and returns its results."""
    workdir = tmp_path_factory.mktemp("mirrored")
    make_image_tree(workdir / "images", per_class={"train": 12})
    stdout = run_subprocess(
        [str(TESTS / "distribute_check.py"), str(workdir)],
        {"KERAS_BACKEND": "tensorflow", "KERAS_NEWTON_HOME": str(workdir / "home")},
    )
    line = next(x for x in stdout.splitlines() if x.startswith("RESULTS "))
    return json.loads(line[len("RESULTS "):])


@tf_only
def test_mirrored_matches_one_device_with_the_same_global_batch(mirrored):
    assert mirrored["devices"] == 2 and mirrored["replicas"] == 2
    np.testing.assert_allclose(mirrored["loss_two"], mirrored["loss_one"], rtol=1e-4)
    np.testing.assert_allclose(mirrored["eval_two"], mirrored["eval_one"], rtol=1e-4)
    assert mirrored["max_weight_rel_diff"] < 1e-4
    assert mirrored["loss_one"][-1] < mirrored["loss_one"][0]  # it did learn something


@tf_only
def test_newton_cgnet_trains_under_mirrored_strategy(mirrored):
    assert mirrored["kind"] == "mirrored"
    assert mirrored["ncg_distribute"] == "mirrored" and mirrored["ncg_replicas"] == 2
    assert mirrored["ncg_epochs"] == 2
    best = mirrored["ncg_best"]
    assert (best["swa_epochs"], best["epoch"], best["batch_norm_batches"]) == (1, 2, 3)
    header, *rows = mirrored["ncg_history"].strip().splitlines()
    losses = [float(r.split(",")[header.split(",").index("loss")]) for r in rows]
    assert len(rows) == 2 and all(np.isfinite(losses))


@tf_only
def test_batch_size_must_divide_across_replicas(mirrored):
    assert mirrored["odd_batch_error"] == (
        "`batch_size` (the global batch) must be divisible by the 2 replicas. "
        "Received: batch_size=7"
    )


@tf_only
def test_multiworker_needs_tf_config(monkeypatch):
    monkeypatch.delenv("TF_CONFIG", raising=False)
    with pytest.raises(ValueError, match="Received: TF_CONFIG=None"):
        get_distribution("multiworker")
    monkeypatch.setenv("TF_CONFIG", "{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        get_distribution("multiworker")


def test_unknown_distribute_choice():
    with pytest.raises(ValueError, match=r"Received: distribute='gpus'"):
        get_distribution("gpus")


JAX_RUN = """
import json, sys
from keras_newton.training import train
s = train(model="newton_cgnet10", dataset="folder", data=sys.argv[1] + "/images",
          out=sys.argv[1] + "/run", epochs=1, batch_size=8, val_size=6, verbose=0)
print("RESULTS " + json.dumps({k: s[k] for k in ("distribute", "replicas", "backend", "epochs")}))
"""


@pytest.mark.heavy
@pytest.mark.slow
def test_jax_data_parallel_on_two_devices(tmp_path):
    make_image_tree(tmp_path / "images", per_class={"train": 12})
    stdout = run_subprocess(
        ["-c", JAX_RUN, str(tmp_path)],
        {"KERAS_BACKEND": "jax", "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
         "JAX_PLATFORMS": "cpu", "KERAS_NEWTON_HOME": str(tmp_path / "home")},
    )
    line = next(x for x in stdout.splitlines() if x.startswith("RESULTS "))
    assert json.loads(line[len("RESULTS "):]) == {
        "distribute": "data_parallel", "replicas": 2, "backend": "jax", "epochs": 1}


def free_ports(count):
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


@pytest.mark.heavy
@pytest.mark.slow
@tf_only
def test_multiworker_two_processes_on_localhost(tmp_path):
    make_image_tree(tmp_path / "images", per_class={"train": 12})
    workers = [f"127.0.0.1:{port}" for port in free_ports(2)]
    argv = ["-m", "keras_newton.training.cli", "--model", "newton_cgnet10", "--dataset",
            "folder", "--data", str(tmp_path / "images"), "--epochs", "2", "--batch-size", "8",
            "--val-size", "6", "--distribute", "multiworker", "--out", str(tmp_path / "run"),
            "--verbose", "0"]
    procs = []
    for index in range(2):
        tf_config = {"cluster": {"worker": workers}, "task": {"type": "worker", "index": index}}
        env = {**os.environ, "KERAS_BACKEND": "tensorflow", "TF_CONFIG": json.dumps(tf_config),
               "KERAS_NEWTON_HOME": str(tmp_path / f"home{index}")}
        procs.append(subprocess.Popen([sys.executable, *argv], cwd=REPO, env=env, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    outputs = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=480))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    for proc, (_, err) in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, err[-4000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["distribute"] == "multiworker" and summary["replicas"] == 2
    assert summary["epochs"] == 2
    worker = json.loads((tmp_path / "run" / "workers" / "worker1" / "summary.json").read_text())
    assert worker["best_val_accuracy"] == summary["best_val_accuracy"]  # same model everywhere
