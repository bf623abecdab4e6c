"""Pretrained-weights registry: schema against the built models, hash checks, loading."""

import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import h5py
import keras
import numpy as np
import pytest
from helpers import sha256_hex

import keras_newton as kn
from keras_newton import models, zoo

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def fake_entry(tmp_path, monkeypatch, rng):
    """A temporary registry entry `newton_cgnet10.test` backed by random weights."""
    model = kn.NewtonCGNet10()
    for w in model.weights:
        w.assign(rng.normal(0, 0.1, w.shape).astype("float32") + (
            1.0 if w.path.endswith("variance") else 0.0))
    path = tmp_path / "newton_cgnet10.test.weights.h5"
    model.save_weights(path)
    entry = {
        "file": path.name, "sha256": sha256_hex(path), "num_params": model.count_params(),
        "classes": 10, "dataset": "test", "split": "test", "metrics": {"val_accuracy": 0.1},
        "epochs": 0, "recipe": {"command": "none", "commit": "none"},
        "preprocessing": {"mean": [125.0, 123.0, 114.0], "std": [63.0, 62.0, 66.0]},
        "class_names": list(zoo.CIFAR10_CLASSES), "date": "2026-11-27", "license": "Apache-2.0",
        "paper": zoo.PAPER,
    }
    monkeypatch.setitem(zoo.REGISTRY, "newton_cgnet10.test", entry)
    monkeypatch.setenv("KERAS_NEWTON_ZOO", str(tmp_path))
    return model, path


def test_registry_schema_matches_models():
    """torchvision-style meta check: every entry against the model it claims to be."""
    if not zoo.REGISTRY:
        pytest.skip("no pretrained weights registered yet")
    for key, entry in zoo.REGISTRY.items():
        arch, _ = key.split(".", 1)
        assert set(zoo.REQUIRED_FIELDS) <= set(entry), key
        assert entry["num_params"] == models.get_model(arch).count_params(), key
        assert sha256_hex(zoo.weights_path(*key.split(".", 1))) == entry["sha256"], key
        assert len(entry["class_names"]) == entry["classes"], key
        with h5py.File(zoo.weights_path(*key.split(".", 1))) as f:  # layers only
            assert "optimizer" not in f and "layers" in f, key


@pytest.mark.slow
def test_wheel_ships_registry_and_weights(tmp_path):
    """A non-editable install finds the registry and every released weights file."""
    source = tmp_path / "src"  # a copy: an in-tree build/ folder would mask what setup.cfg says
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(
        ".*", "build", "runs", "*.egg-info", "__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(tmp_path), str(source)], check=True, cwd=tmp_path)
    (wheel,) = tmp_path.glob("keras_newton-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "keras_newton/zoo_registry.json" in names
    installed = zoo.INSTALLED_ZOO.relative_to(sys.prefix).as_posix()
    for entry in zoo.REGISTRY.values():
        assert any(n.endswith(f".data/data/{installed}/{entry['file']}") for n in names), entry


def test_installed_zoo_is_searched(fake_entry, tmp_path, monkeypatch):
    _, path = fake_entry
    monkeypatch.delenv("KERAS_NEWTON_ZOO")
    monkeypatch.setattr(zoo, "INSTALLED_ZOO", tmp_path / "share")
    with pytest.raises(ValueError, match="newton_cgnet10.test.weights.h5 of .* not found"):
        zoo.weights_path("newton_cgnet10", "test")
    zoo.INSTALLED_ZOO.mkdir()
    path.rename(zoo.INSTALLED_ZOO / path.name)
    assert zoo.weights_path("newton_cgnet10", "test") == zoo.INSTALLED_ZOO / path.name


def test_keras_home_cache_is_searched(fake_entry, tmp_path, monkeypatch):
    """Without KERAS_NEWTON_HOME the cache is keras_newton/ in Keras' own $KERAS_HOME."""
    model, path = fake_entry
    monkeypatch.delenv("KERAS_NEWTON_ZOO")
    monkeypatch.delenv("KERAS_NEWTON_HOME", raising=False)
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras_home"))
    cache = tmp_path / "keras_home" / "keras_newton" / "models"
    with pytest.raises(ValueError, match=f"not found in .*{re.escape(str(cache))}"):
        zoo.weights_path("newton_cgnet10", "test")
    cache.mkdir(parents=True)
    path.rename(cache / path.name)
    assert zoo.weights_path("newton_cgnet10", "test") == cache / path.name
    x = np.random.default_rng(2).normal(size=(2, 32, 32, 3)).astype("float32")
    np.testing.assert_allclose(keras.ops.convert_to_numpy(kn.NewtonCGNet10(weights="test")(x)),
                               keras.ops.convert_to_numpy(model(x)), rtol=1e-6, atol=1e-6)


def test_strip_optimizer(tmp_path, rng):
    """A compiled, trained model's weights file loses only the optimizer's state."""
    model = kn.NewtonCGNet10(classes=3, input_shape=(16, 16, 3))
    model.compile(keras.optimizers.SGD(0.1, momentum=0.9), "sparse_categorical_crossentropy")
    model.fit(rng.normal(size=(8, 16, 16, 3)), rng.integers(0, 3, 8), verbose=0)
    full, small = tmp_path / "full.weights.h5", tmp_path / "small.weights.h5"
    model.save_weights(full)
    zoo.strip_optimizer(full, small)
    with h5py.File(full) as f, h5py.File(small) as g:
        assert "optimizer" in f and "optimizer" not in g
    assert small.stat().st_size < 0.7 * full.stat().st_size
    fresh = kn.NewtonCGNet10(classes=3, input_shape=(16, 16, 3), weights=str(small))
    for a, b in zip(model.weights, fresh.weights, strict=True):
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(a), keras.ops.convert_to_numpy(b))


def test_registry_golden_logits():
    """Stored logits (first 10 values, fixed seeded input) guard layer names and order."""
    golden = zoo.REPO_ZOO / "golden.json"
    if not zoo.REGISTRY:
        pytest.skip("no pretrained weights registered yet")
    stored = json.loads(golden.read_text())
    for key in zoo.REGISTRY:
        arch, tag = key.split(".", 1)
        model = models.get_model(arch, weights=tag, classes=zoo.REGISTRY[key]["classes"],
                                 classifier_activation=None)
        x = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype("float32")
        logits = keras.ops.convert_to_numpy(model(x)).ravel()[:10]
        np.testing.assert_allclose(logits, stored[key], atol=1e-4, rtol=0)


def test_load_by_tag_and_backbone(fake_entry):
    model, _ = fake_entry
    x = np.random.default_rng(1).normal(size=(2, 32, 32, 3)).astype("float32")
    loaded = kn.NewtonCGNet10(weights="test")
    np.testing.assert_allclose(keras.ops.convert_to_numpy(loaded(x)),
                               keras.ops.convert_to_numpy(model(x)), rtol=1e-6, atol=1e-6)
    notop = kn.NewtonCGNet10(weights="test", include_top=False, pooling="avg",
                             input_shape=(48, 48, 3))
    for layer in notop.layers:
        for a, b in zip(layer.get_weights(), model.get_layer(layer.name).get_weights(),
                        strict=True):
            np.testing.assert_array_equal(a, b)


def test_corrupted_file_is_detected(fake_entry):
    _, path = fake_entry
    path.write_bytes(path.read_bytes()[:-100])  # truncated
    with pytest.raises(ValueError, match=r"cgnet10.test.weights.h5 is corrupted or truncated"):
        kn.NewtonCGNet10(weights="test")


@pytest.mark.parametrize("kwargs,match", [
    ({"weights": "imagenet"}, r"Available for newton_cgnet10: \[.*'test'.*weights='imagenet'"),
    ({"weights": "test", "classes": 100}, "include_top=False.*classes=100"),
    ({"weights": "test", "classifier_activation": "sigmoid"}, "classifier_activation"),
])
def test_bad_weights_arguments(fake_entry, kwargs, match):
    with pytest.raises(ValueError, match=match):
        kn.NewtonCGNet10(**kwargs)


def test_registered_file_is_checked_like_its_tag(fake_entry, tmp_path):
    """A weights file whose sha256 is an entry's is that entry, wherever it lies."""
    model, path = fake_entry
    copy = tmp_path / "elsewhere" / "mine.weights.h5"
    copy.parent.mkdir()
    copy.write_bytes(path.read_bytes())
    info = zoo.resolve_weights("newton_cgnet10", copy)  # os.PathLike is fine
    assert (info["key"], info["tag"], info["path"]) == ("newton_cgnet10.test", "test", str(copy))
    assert info["entry"] is zoo.REGISTRY["newton_cgnet10.test"]
    with pytest.raises(ValueError, match="newton_cgnet10.test have 10 classes.*classes=100"):
        kn.NewtonCGNet10(weights=str(copy), classes=100)
    with pytest.raises(ValueError, match="classifier_activation='sigmoid'"):
        kn.NewtonCGNet10(weights=str(copy), classifier_activation="sigmoid")
    x = np.random.default_rng(1).normal(size=(2, 32, 32, 3)).astype("float32")
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(kn.NewtonCGNet10(weights=copy, classes=np.int64(10))(x)),
        keras.ops.convert_to_numpy(model(x)), rtol=1e-6, atol=1e-6)
    # evaluate finds the entry's preprocessing (no preprocessing.json next to the copy)
    from keras_newton.commands.evaluate import preprocessing_for

    assert preprocessing_for("newton_cgnet10", str(copy)) == \
        zoo.REGISTRY["newton_cgnet10.test"]["preprocessing"]
    # an unregistered file stays a plain file
    fresh = kn.NewtonCGNet10()
    fresh.save_weights(tmp_path / "other.weights.h5")
    other = zoo.resolve_weights("newton_cgnet10", tmp_path / "other.weights.h5")
    assert other["entry"] is None and other["key"] is None
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(kn.NewtonCGNet10(weights=tmp_path / "other.weights.h5")(x)),
        keras.ops.convert_to_numpy(fresh(x)), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kwargs,match", [
    ({"weights": "test", "input_shape": (32, 32, 1)},
     r"3 channels.*Received: weights='test', input_shape=\(32, 32, 1\)"),
    ({"weights": "test", "input_shape": (4, 32, 32), "data_format": "channels_first"},
     r"3 channels.*input_shape=\(4, 32, 32\)"),
    ({"weights": "test", "include_top": False, "input_shape": (32, 32, 1)}, "3 channels"),
    ({"weights": "missing/file.weights.h5"},
     r"No such weights file\. Available for newton_cgnet10: \[.*'test'.*"
     r"Received: weights='missing/file.weights.h5'$"),
    ({"weights": "."}, r"must be a file, not a folder\. Received: weights='\.'"),
    ({"weights": 3}, r"Received: weights=3$"),
    ({"weights": "test", "classes": np.float64(10)}, r"Received: classes=np\.float64"),
])
def test_weights_errors(fake_entry, kwargs, match):
    with pytest.raises(ValueError, match=match):
        kn.NewtonCGNet10(**kwargs)


def test_weights_key_and_numpy_classes(fake_entry):
    model, _ = fake_entry
    x = np.random.default_rng(2).normal(size=(1, 32, 32, 3)).astype("float32")
    for weights in ("test", "newton_cgnet10.test"):
        loaded = kn.NewtonCGNet10(weights=weights, classes=np.int64(10))
        np.testing.assert_allclose(keras.ops.convert_to_numpy(loaded(x)),
                                   keras.ops.convert_to_numpy(model(x)), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match=r"exist only for the named.*Received: weights='test'"):
        kn.newton_cgnet((1, 1, 2), width_multiplier=0.5, weights="test")


def test_preprocess_and_decode(fake_entry):
    x = np.full((1, 2, 2, 3), 128, dtype="uint8")
    out = zoo.preprocess_input(x, "newton_cgnet10", "test")
    np.testing.assert_allclose(out[0, 0, 0], [(128 - 125) / 63, (128 - 123) / 62,
                                              (128 - 114) / 66], rtol=1e-6)
    preds = np.eye(10)[[3, 8]] * 0.9 + 0.01
    decoded = zoo.decode_predictions(preds, top=2)
    assert decoded[0][0][:2] == (3, "cat") and decoded[1][0][:2] == (8, "ship")
    with pytest.raises(ValueError, match="preds.shape"):
        zoo.decode_predictions(np.zeros((2, 5)))


CIFAR_ARCHIVE = (Path(os.environ.get("KERAS_NEWTON_DATA", REPO.parent / "shared" / "datasets"))
                 / "cifar10-jpeg" / "train.tar.xz")


@pytest.mark.skipif(not CIFAR_ARCHIVE.exists(), reason=f"CIFAR-10 archive not found at "
                    f"{CIFAR_ARCHIVE} (set KERAS_NEWTON_DATA)")
@pytest.mark.parametrize("key", [
    pytest.param(key, marks=[pytest.mark.heavy] if zoo.REGISTRY[key]["num_params"] > 1_000_000
                 else [])
    for key in sorted(k for k in zoo.REGISTRY if k.endswith(".cifar10"))])
def test_card_accuracy_is_reproduced(key):
    """`evaluate` on the card's validation split gives the card's accuracy (to 0.1%).

    Heavy for the entries over 1M parameters (NCG-82: 114 s on 2 cores): the smaller
    entries check the evaluation pipeline, and `test_registry_golden_logits` each entry's
    weights."""
    from keras_newton.commands.evaluate import evaluate_model, load_split

    arch, tag = key.split(".", 1)
    entry = zoo.REGISTRY[key]
    images, labels, _ = load_split("cifar10", CIFAR_ARCHIVE, "val",
                                   entry["eval"]["val_size"], entry["eval"]["seed"])
    metrics = evaluate_model(arch, tag, images, labels, entry["preprocessing"],
                             entry["classes"])
    assert metrics["num_images"] == entry["metrics"]["val_images"]
    assert abs(metrics["top1"] - entry["metrics"]["val_top1"]) <= 0.001
    confusion = np.asarray(metrics["confusion"])
    assert confusion.sum() == len(labels)
    assert abs(np.trace(confusion) / len(labels) - metrics["top1"]) < 1e-12


def test_zoo_add_registers_a_time_budgeted_run(tmp_path, monkeypatch, capsys):
    """`keras-newton zoo add`: the epochs trained (not asked for), the accuracy measured on
    the hold-out, the stripped file, its card and golden logits."""
    from test_data import make_image_tree

    from keras_newton import cli
    from keras_newton.data import holdout_split, load_dataset
    from keras_newton.training import train

    monkeypatch.setenv("KERAS_NEWTON_HOME", str(tmp_path / "home"))
    data = tmp_path / "images"
    make_image_tree(data, per_class={"train": 12})
    run = tmp_path / "run"
    # A budget used up by the first epoch: the two timed epochs of the four asked for.
    train(model="newton_cgnet10", dataset="folder", data=data, out=run, epochs=4,
          batch_size=8, val_size=6, verbose=0, distribute="none", time_budget=0.001)
    monkeypatch.setattr(zoo, "REPO_ZOO", tmp_path / "zoo")
    monkeypatch.setattr(zoo, "REGISTRY_FILE", tmp_path / "registry.json")
    monkeypatch.setattr(zoo, "REGISTRY", {})
    # The source moved (a run trained on another machine): --data, checked by content.
    moved = data.rename(tmp_path / "moved")
    add = ["zoo", "add", "--run", str(run), "--tag", "tiny", "--commit", "abc1234",
           "--dataset-label", "tiny folder"]
    assert cli.main(add) == 2
    assert "Pass --data, the run's source" in capsys.readouterr().err
    other = tmp_path / "other"
    make_image_tree(other, per_class={"train": 11})
    assert cli.main([*add, "--data", str(other)]) == 2
    assert "not the source this run was trained on" in capsys.readouterr().err
    assert cli.main([*add, "--data", str(moved)]) == 0
    data = moved

    entry = json.loads((tmp_path / "registry.json").read_text())["newton_cgnet10.tiny"]
    assert set(zoo.REQUIRED_FIELDS) <= set(entry)
    assert entry["epochs"] == 2 and entry["classes"] == 3
    assert entry["num_params"] == kn.NewtonCGNet10(classes=3).count_params()
    weights = tmp_path / "zoo" / entry["file"]
    assert entry["sha256"] == sha256_hex(weights)
    with h5py.File(weights) as f:
        assert "optimizer" not in f

    # The hold-out accuracy, recomputed from the images with the run's mean/std.
    source = load_dataset("folder", data=data)
    _, val_idx = holdout_split(source.labels, 6, seed=0)
    prep = json.loads((run / "preprocessing.json").read_text())
    x = (source.images[val_idx].astype("float32") - prep["mean"]) / prep["std"]
    model = kn.NewtonCGNet10(weights=str(weights), classes=3)
    accuracy = np.mean(np.argmax(model.predict(x, verbose=0), -1) == source.labels[val_idx])
    assert entry["metrics"]["val_top1"] == pytest.approx(accuracy, abs=1e-4)
    assert entry["metrics"]["val_images"] == 6

    card = (tmp_path / "zoo" / "newton_cgnet10.tiny.md").read_text()
    assert f"trained with {keras.backend.backend()}, float32, time budget 0.001 s" in card
    assert "commit `abc1234`" in card and "| epochs | 2 |" in card
    golden = json.loads((tmp_path / "zoo" / "golden.json").read_text())
    assert len(golden["newton_cgnet10.tiny"]) == 6  # 2 inputs x 3 classes

    # A warm start from these weights, registered under the same key: the entry counts
    # their epochs and keeps their recipe, which the registration replaces.
    run2 = tmp_path / "run2"
    train(model="newton_cgnet10", dataset="folder", data=data, out=run2, epochs=1,
          batch_size=8, val_size=6, verbose=0, distribute="none",
          init_weights="newton_cgnet10.tiny", schedule="constant", lr=0.01)
    assert cli.main([*add, "--data", str(data), "--run", str(run2)]) == 0
    warm_entry = json.loads((tmp_path / "registry.json").read_text())["newton_cgnet10.tiny"]
    assert warm_entry["sha256"] != entry["sha256"] and warm_entry["epochs"] == 3
    warm = warm_entry["recipe"]["warm_start"]
    assert (warm["zoo"], warm["sha256"], warm["epochs"]) == (
        "newton_cgnet10.tiny", entry["sha256"], 2)
    assert warm["val_top1"] == entry["metrics"]["val_top1"]
    assert warm["recipe"] == entry["recipe"]
    card = (tmp_path / "zoo" / "newton_cgnet10.tiny.md").read_text()
    assert "| epochs | 3 (2 of the warm start, then 1) |" in card
    assert "Warm start: the run began from `newton_cgnet10.tiny`" in card
    assert card.index(warm_entry["recipe"]["command"]) < card.index(entry["recipe"]["command"])


def test_trained_with_gives_each_machine_its_median_epoch_time():
    """A run trained on a CPU, then a GPU: the card gives each kind of leg its own median
    epoch time and the total (one average over both would describe neither machine)."""
    from keras_newton.commands.zoo import _trained_with

    cpu = {"backend": "tensorflow", "device": "cpu", "mixed_precision": False}
    gpu = {"backend": "jax", "device": "gpu", "mixed_precision": True, "on_device": True}
    legs = [{**cpu, "first_epoch": 1, "resumed_from": "start"},
            {**cpu, "first_epoch": 2, "resumed_from": "light"},
            {**gpu, "first_epoch": 3, "resumed_from": "light"}]
    seconds = [4000.0, 5000.0, 90.0, 5.0, 5.0, 6.0]
    summary = {"backend": "jax", "mixed_precision": True, "epochs": 6, "legs": legs,
               "epoch_seconds": seconds, "seconds_per_epoch": sum(seconds) / 6}
    text = _trained_with(summary)
    assert f"(epochs 1-2, median {np.median(seconds[:2]):.1f} s per epoch)" in text
    assert f"(epochs 3-6, median {np.median(seconds[2:]):.1f} s per epoch)" in text
    assert f"{sum(seconds) / 3600:.1f} h of epochs in all" in text
    assert f"{sum(seconds) / 6:.1f} s per epoch" not in text
    assert "resumed at epochs 2, 3 from the last epoch's weights" in text
