"""Install for every user: the core package (no extras) works on JAX without TensorFlow.

Needs pip with access to the package index (CI has it): a fresh virtual environment gets
``pip install <copy of the repository> jax[cpu]``, then builds Newton-CGNet-10 with the
released CIFAR-10 weights (installed under ``<prefix>/share/keras-newton/zoo``) and
reproduces their golden logits.
"""

import json
import os
import shutil
import subprocess
import sys

import pytest
from helpers import REPO

CHECK = """
import json, sys
import numpy as np
import keras_newton as kn
from keras_newton import cli

model = kn.NewtonCGNet10(weights="cifar10", classifier_activation=None)
x = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype("float32")
logits = np.asarray(model(x)).ravel()[:10]
golden = json.loads(sys.argv[1])
np.testing.assert_allclose(logits, golden, rtol=1e-3, atol=1e-3)
try:
    cli.main(["--help"])
except SystemExit as e:
    assert e.code == 0
heavy = ("tensorflow", "tensorflow_text", "tf2onnx", "onnx", "keras_tuner")
print("LOADED", [m for m in heavy if m in sys.modules])
print("WEIGHTS", kn.zoo.weights_path("newton_cgnet10", "cifar10"))
"""


@pytest.mark.slow  # a few minutes: pip installs Keras, JAX, SciPy, Matplotlib into a venv
@pytest.mark.heavy
def test_jax_only_install_loads_released_weights(tmp_path):
    source = tmp_path / "src"  # a copy: no in-tree build/ or egg-info in the repository
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(
        ".*", "build", "runs", "*.egg-info", "__pycache__", "tests", "in_progress"))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    env = {k: v for k, v in os.environ.items()
           if k not in ("KERAS_NEWTON_ZOO", "PYTHONPATH", "VIRTUAL_ENV")}
    env.update(KERAS_BACKEND="jax", KERAS_NEWTON_HOME=str(tmp_path / "home"))
    install = subprocess.run(
        [str(python), "-m", "pip", "install", "--quiet", str(source), "jax[cpu]==0.10.*"],
        capture_output=True, text=True, timeout=1500, cwd=tmp_path, env=env)
    assert install.returncode == 0, install.stdout[-3000:] + install.stderr[-3000:]
    pip_list = subprocess.run([str(python), "-m", "pip", "list", "--format=json"],
                              capture_output=True, text=True, check=True, env=env).stdout
    installed = {p["name"].lower() for p in json.loads(pip_list)}
    assert {"keras-newton", "keras", "jax"} <= installed
    assert not installed & {"tensorflow", "tensorflow-cpu", "tf2onnx", "onnx", "keras-tuner"}

    golden = json.loads((REPO / "zoo" / "golden.json").read_text())["newton_cgnet10.cifar10"]
    run = subprocess.run([str(python), "-c", CHECK, json.dumps(golden)], capture_output=True,
                         text=True, timeout=600, cwd=tmp_path, env=env)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "LOADED []" in run.stdout, run.stdout
    assert f"{venv}/share/keras-newton/zoo/" in run.stdout, run.stdout
