"""`keras-newton demo`, its packaged sample images, and the quiet TensorFlow import."""

import configparser
import fnmatch
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import REPO, sha256_hex

from keras_newton import _quiet
from keras_newton.commands import demo
from keras_newton.data import CIFAR10_CLASSES

ARCHIVE = Path(os.environ.get("KERAS_NEWTON_DATA", REPO.parent / "shared" / "datasets")) / (
    "cifar10-jpeg/train.tar.xz")
# A line of TensorFlow's / absl's C++ logging, or a word that only such lines contain.
NATIVE_LOG = re.compile(r"^[IWEF]\d{4} |^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+: [IWEF] |absl|"
                        r"cuda|cuInit|cpu_feature_guard|oneDNN|TensorFlow binary", re.M)
TOP3_LINE = re.compile(r"^  (\S) (\w+) +-> (\w+) ([\d.]+), (\w+) ([\d.]+), (\w+) ([\d.]+)$",
                       re.M)
PARITY_LINE = re.compile(r"max \|logit diff\| (\S+) vs Keras, top-1 agreement (\d+)/(\d+)")


def test_samples_are_ten_held_out_cifar10_images_one_per_class():
    images, manifest = demo.load_samples()
    files = sorted(p.name for p in demo.SAMPLES_DIR.iterdir() if p.suffix == ".jpg")
    assert images.shape == (10, 32, 32, 3) and images.dtype == np.uint8
    assert manifest["class_names"] == list(CIFAR10_CLASSES)
    assert (manifest["val_size"], manifest["seed"]) == (5000, 0)  # the zoo's hold-out
    assert [s["class"] for s in manifest["samples"]] == list(CIFAR10_CLASSES)
    assert files == sorted(s["file"] for s in manifest["samples"])  # nothing else shipped
    for sample in manifest["samples"]:
        path = demo.SAMPLES_DIR / sample["file"]
        assert sha256_hex(path) == sample["sha256"], sample
        assert path.read_bytes()[:3] == b"\xff\xd8\xff", sample  # JPEG, as in the archive
        assert sample["member"] == f"train/{sample['class']}/{Path(sample['member']).name}"


def test_samples_are_package_data():
    """setup.cfg's package_data covers every sample (a wheel carries them)."""
    config = configparser.ConfigParser()
    config.read(REPO / "setup.cfg")
    patterns = [p.strip() for p in
                config["options.package_data"]["keras_newton"].replace(",", "\n").split()]
    for path in demo.SAMPLES_DIR.iterdir():
        rel = path.relative_to(REPO / "keras_newton").as_posix()
        assert any(fnmatch.fnmatch(rel, p) for p in patterns), rel


@pytest.mark.slow
@pytest.mark.skipif(not ARCHIVE.is_file(), reason=f"CIFAR-10 archive not found: {ARCHIVE}")
def test_write_samples_regenerates_the_packaged_files(tmp_path):
    from keras_newton.data import holdout_split, load_dataset

    manifest = demo.write_samples(ARCHIVE, tmp_path)
    assert manifest == json.loads((demo.SAMPLES_DIR / demo.SAMPLES_JSON).read_text())
    for sample in manifest["samples"]:
        assert (tmp_path / sample["file"]).read_bytes() == (
            demo.SAMPLES_DIR / sample["file"]).read_bytes()
    # The same images, labels and hold-out as the training pipeline's (decoded, cached).
    train = load_dataset("cifar10", ARCHIVE, "train")
    _, val_idx = holdout_split(train.labels, manifest["val_size"], manifest["seed"])
    index = [s["index"] for s in manifest["samples"]]
    assert set(index) <= set(val_idx.tolist())
    np.testing.assert_array_equal(train.labels[index], np.arange(10))
    np.testing.assert_array_equal(train.images[index], demo.load_samples()[0])


def test_native_log_lines_are_filtered():
    text = (
        "WARNING: All log messages before absl::InitializeLog() is called are written to "
        "STDERR\n"
        "I0000 00:00:1796309850.732246    5894 cudart_stub.cc:31] Could not find cuda drivers"
        " on your machine, GPU will not be used.\n"
        "E0000 00:00:1796309782.246787    5282 cuda_platform.cc:52] failed call to cuInit\n"
        "2024-06-28 00:03:52.491725: I tensorflow/core/util/port.cc:110] oneDNN custom ops\n"
        "To enable the following instructions: AVX2 FMA, in other operations, rebuild "
        "TensorFlow with the appropriate compiler flags.\n"
        "UserWarning: a real warning\n"
        "Traceback (most recent call last):\n"
    )
    assert _quiet.filter_native_logs(text) == (
        "UserWarning: a real warning\nTraceback (most recent call last):\n")


def test_quiet_import_drops_native_logs_and_keeps_the_rest(capfd):
    def exec_module(module):
        os.write(2, b"I0000 00:00:1.5    7 cudart_stub.cc:31] Could not find cuda drivers\n"
                    b"kept: not a log line\n")
        sys.stderr.write("kept: written by Python\n")

    _quiet._QuietImport(exec_module)(None)
    # (capfd writes sys.stderr past fd 2, so only the set of lines is compared)
    assert sorted(capfd.readouterr().err.splitlines()) == [
        "kept: not a log line", "kept: written by Python"]

    def failing(module):
        os.write(2, b"W0000 00:00:1.5    7 x.cc:1] noise\n")
        raise ImportError("broken")

    with pytest.raises(ImportError, match="broken"):
        _quiet._QuietImport(failing)(None)
    assert capfd.readouterr().err == ""
    os.write(2, b"fd 2 is restored\n")
    assert capfd.readouterr().err == "fd 2 is restored\n"


def test_retracing_warning_is_dropped_from_commands(monkeypatch, caplog):
    """The commands' quiet set-up drops TensorFlow's retracing warning (the demo runs two
    models at two batch sizes) and nothing else TensorFlow's Python logger says."""
    import logging

    logger = logging.getLogger("tensorflow")
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "0")  # restored after the test
    monkeypatch.delenv("TF_CPP_MIN_LOG_LEVEL")
    monkeypatch.setattr(logger, "filters", [])
    _quiet.quiet_native_logs()
    with caplog.at_level(logging.WARNING):
        logger.warning("5 out of the last 10 calls to <function f at 0x1> triggered "
                       "tf.function retracing. Tracing is expensive ...")
        logger.warning("kept: another warning")
    assert [r.getMessage() for r in caplog.records] == ["kept: another warning"]


@pytest.mark.slow
def test_demo_command(tmp_path):
    """`keras-newton demo` as a user runs it: top-3 of every sample, ONNX Runtime parity,
    demo.png, and no line of TensorFlow's C++ logging (TF_CPP_MIN_LOG_LEVEL unset)."""
    from PIL import Image

    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    env["PYTHONIOENCODING"] = "utf-8"
    result = subprocess.run(
        [sys.executable, "-m", "keras_newton", "demo", "--out", str(tmp_path / "demo"),
         "--batch-size", "32", "--repeats", "1"],
        capture_output=True, text=True, encoding="utf-8", env=env, cwd=tmp_path, timeout=600)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert not NATIVE_LOG.search(output), output
    assert result.stderr == "", result.stderr

    from keras_newton import zoo

    rows = TOP3_LINE.findall(result.stdout)
    assert len(rows) == 10 * len(zoo.available()), result.stdout
    for mark, true, *top3 in rows:
        names = top3[0::2]
        probs = [float(p) for p in top3[1::2]]
        assert true in CIFAR10_CLASSES and set(names) <= set(CIFAR10_CLASSES), rows
        assert len(set(names)) == 3 and probs == sorted(probs, reverse=True)
        assert mark in (("\u2713", "+") if names[0] == true else ("\u2717", "x")), rows
    checks = PARITY_LINE.findall(result.stdout)
    assert len(checks) == len(zoo.available()), result.stdout
    for diff, agree, total in checks:
        assert float(diff) < 1e-3 and agree == total == "10", checks
    picture = tmp_path / "demo" / "demo.png"
    assert f"picture: {picture}" in result.stdout
    assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(picture) as image:
        image.verify()
    for key in zoo.available():
        assert (tmp_path / "demo" / key / "model.onnx").is_file()
