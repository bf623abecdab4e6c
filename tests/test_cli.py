"""The front door: bad input is one line and exit status 2 for every command; light imports.

Each command is called in-process (``keras_newton.cli.main``) with a corrupt or missing
file (garbage bytes) or a wrong flag value, and must answer with exactly one stderr line
``keras-newton <command>: error: ...`` and status 2, never a traceback. ``predict`` (and
``serve``) are tested with their own modules.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from helpers import REPO

from keras_newton.cli import main

GARBAGE = np.random.default_rng(0).integers(0, 256, 3000, dtype=np.uint8).tobytes()


def garbage(path):
    path.write_bytes(GARBAGE)
    return path


def assert_clean_error(capsys, command, argv, *expect):
    """``main(argv)`` returns 2 and prints one ``keras-newton <command>: error:`` line."""
    try:
        code = main(argv)
    except SystemExit as e:  # argparse: the console script exits with this status
        code = e.code
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert code == 2, captured.err
    assert len(lines) == 1, captured.err
    assert lines[0].startswith(f"keras-newton {command}: error: ".replace(" :", ":")), lines[0]
    assert "Traceback" not in captured.err + captured.out
    for text in expect:
        assert text in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def images(tmp_path):
    """A tiny ``train/<class>/<image>`` folder of 3 classes."""
    from test_data import make_image_tree

    make_image_tree(tmp_path / "images", per_class={"train": 4})
    return tmp_path / "images"


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_NEWTON_HOME", str(tmp_path / "home"))


def test_unknown_command_and_flag(capsys):
    assert_clean_error(capsys, "", ["no-such-command"], "invalid choice")
    assert_clean_error(capsys, "train", ["train", "--model", "newton_cgnet10", "--epochs", "x"],
                       "--epochs", "invalid int value")


def test_models_wrong_flag(capsys):
    assert_clean_error(capsys, "models", ["models", "--forward=yes"], "--forward")


@pytest.mark.parametrize("argv,expect", [
    (["--runs", "ten"], "invalid int value"),
    (["--runs", "0"], "runs=0"),
    (["--json", "/no/such/folder/table2.json"], "json="),
])
def test_table2_wrong_flag_values(argv, expect, capsys):
    assert_clean_error(capsys, "table2", ["table2", *argv], expect)


def test_train_corrupt_archive(tmp_path, capsys):
    archive = garbage(tmp_path / "train.tar.xz")
    assert_clean_error(capsys, "train", [
        "train", "--model", "newton_cgnet10", "--dataset", "cifar10", "--data", archive,
        "--epochs", "1", "--out", tmp_path / "run", "--distribute", "none"],
        "corrupt", str(archive))


def test_evaluate_corrupt_files(tmp_path, images, capsys):
    prep = tmp_path / "preprocessing.json"
    prep.write_text(json.dumps({"mean": [127.0] * 3, "std": [64.0] * 3}))
    weights = garbage(tmp_path / "net.weights.h5")
    base = ["evaluate", "--model", "newton_cgnet10", "--dataset", "folder", "--val-size", "3"]
    # A weights file that is not HDF5 (h5py: OSError), named in the message.
    assert_clean_error(capsys, "evaluate", [
        *base, "--weights", weights, "--preprocessing", prep, "--data", images],
        str(weights), ".weights.h5")
    # A corrupt or missing preprocessing JSON, a corrupt archive.
    assert_clean_error(capsys, "evaluate", [
        *base, "--weights", weights, "--preprocessing", garbage(tmp_path / "bad.json"),
        "--data", images], "bad.json", "not valid JSON")
    assert_clean_error(capsys, "evaluate", [
        *base, "--weights", weights, "--preprocessing", tmp_path / "none.json",
        "--data", images], "none.json", "does not exist")
    assert_clean_error(capsys, "evaluate", [
        *base, "--weights", weights, "--preprocessing", prep,
        "--data", garbage(tmp_path / "data.zip")], "data.zip", "corrupt")


def test_zoo_add_corrupt_run(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    garbage(run / "config.json")
    add = ["zoo", "add", "--run", run, "--tag", "test"]
    assert_clean_error(capsys, "zoo", add, "config.json", "not valid JSON")
    # Valid cards, a corrupt best.weights.h5 (nothing is registered).
    (run / "config.json").write_text(json.dumps({"model": "newton_cgnet10"}))
    for name in ("summary.json", "preprocessing.json"):
        (run / name).write_text("{}")
    garbage(run / "best.weights.h5")
    assert_clean_error(capsys, "zoo", add, "best.weights.h5")
    assert_clean_error(capsys, "zoo", ["zoo", "add", "--run", tmp_path / "none", "--tag", "t"],
                       "--out folder")


def test_export_corrupt_files(tmp_path, capsys):
    weights = garbage(tmp_path / "net.weights.h5")
    base = ["export", "--model", "newton_cgnet10", "--format", "onnx",
            "--mean", "127", "127", "127", "--std", "64", "64", "64"]
    assert_clean_error(capsys, "export", [*base, "--weights", weights,
                                          "--out", tmp_path / "out"], str(weights))
    assert_clean_error(capsys, "export", [
        *base, "--weights", weights, "--out", tmp_path / "out2",
        "--parity-data", garbage(tmp_path / "parity.tar.gz")], "parity.tar.gz", "corrupt")
    assert_clean_error(capsys, "export", [*base, "--weights", tmp_path / "none.weights.h5",
                                          "--out", tmp_path / "out3"], "none.weights.h5")
    assert_clean_error(capsys, "export", [*base, "--weights", weights, "--opset", "x",
                                          "--out", tmp_path / "out4"], "--opset")
    assert not any(p.name.startswith(("out", ".out")) for p in tmp_path.iterdir())


def test_tune_corrupt_archive(tmp_path, capsys):
    pytest.importorskip("keras_tuner")
    archive = garbage(tmp_path / "data.tar")
    assert_clean_error(capsys, "tune", [
        "tune", "--dataset", "folder", "--data", archive, "--max-trials", "1",
        "--epochs", "1", "--directory", tmp_path / "search", "--distribute", "none"],
        str(archive))


def test_bugs_still_raise(monkeypatch):
    """Only input errors are caught: a bug keeps its traceback."""
    from keras_newton.commands import models

    def broken(args):
        raise TypeError("a bug")

    monkeypatch.setattr(models, "run", broken)
    with pytest.raises(TypeError, match="a bug"):
        main(["models"])


# ------------------------------------------------------------------ light imports

def run_fresh(code, **env):
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=600, cwd=REPO, env={**os.environ, **env})
    assert result.returncode == 0, result.stderr[-4000:]
    return result.stdout


def test_help_imports_no_keras():
    out = run_fresh(
        "import sys\n"
        "from keras_newton import cli\n"
        "try:\n"
        "    cli.main(['--help'])\n"
        "except SystemExit as e:\n"
        "    assert e.code == 0, e.code\n"
        "heavy = ('tensorflow', 'keras', 'jax', 'tf2onnx', 'onnx', 'keras_tuner')\n"
        "print('LOADED', [m for m in heavy if m in sys.modules])\n",
        KERAS_BACKEND="tensorflow")
    assert "LOADED []" in out, out
    for command in ("models", "train", "export", "tune", "table2"):
        assert command in out


@pytest.mark.slow  # a fresh process imports JAX and builds a model
def test_import_registers_layers_and_stays_light():
    """``import keras_newton`` imports no Keras; the layers are registered once Keras is
    imported (FoldedNewtonCGBlock and CharTokenizer included); building a model imports
    none of the export, tuning or text packages."""
    out = run_fresh(
        "import sys\n"
        "import keras_newton as kn\n"
        "assert 'keras' not in sys.modules\n"
        "import keras\n"
        "names = ['CGBlock', 'NewtonCGBlock', 'KMaxPooling', 'FoldedNewtonCGBlock',\n"
        "         'CharTokenizer']\n"
        "missing = [n for n in names\n"
        "           if keras.saving.get_registered_object('keras_newton>' + n) is None]\n"
        "assert not missing, missing\n"
        "model = kn.NewtonCGNet10()\n"
        "heavy = ('tensorflow', 'tf2onnx', 'onnx', 'keras_tuner', 'tensorflow_text')\n"
        "print('LOADED', [m for m in heavy if m in sys.modules], model.count_params())\n",
        KERAS_BACKEND="jax")
    assert "LOADED [] 284671" in out, out


def test_import_after_keras_registers_at_once():
    run_fresh(
        "import keras, keras_newton\n"
        "assert keras.saving.get_registered_object('keras_newton>FoldedNewtonCGBlock')\n",
        KERAS_BACKEND="jax")
