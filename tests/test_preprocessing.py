"""keras.applications habits: `preprocess_input`, `decode_predictions` and `normalize`.

References are computed here by hand in NumPy (per-channel loops, a Python sort), never
with the package's own code.
"""

import json

import keras
import numpy as np
import pytest
from helpers import sha256_hex

import keras_newton as kn
from keras_newton import zoo
from keras_newton.preprocessing import normalize

pytestmark = pytest.mark.backend_agnostic

MEAN, STD = [100.0, 120.0, 140.0], [50.0, 60.0, 70.0]
NAMES = [f"class{i}" for i in range(10)]


@pytest.fixture
def entry(monkeypatch):
    """A registry entry ``newton_cgnet10.test`` (no weights file needed to preprocess)."""
    e = {"file": "none.weights.h5", "sha256": "0" * 64, "classes": 10,
         "preprocessing": {"mean": MEAN, "std": STD}, "class_names": NAMES}
    monkeypatch.setitem(zoo.REGISTRY, "newton_cgnet10.test", e)
    return e


def by_hand(x, mean, std, channel_axis=-1):
    """``(x - mean) / std`` one channel at a time, in float64."""
    x = np.moveaxis(np.asarray(x, "float64"), channel_axis, 0)
    out = np.stack([(x[c] - mean[c]) / std[c] for c in range(len(mean))])
    return np.moveaxis(out, 0, channel_axis)


def images(n=2, size=5, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def test_normalize_numpy_both_layouts_and_single_images():
    x = images()
    want = by_hand(x, MEAN, STD)
    out = normalize(x, MEAN, STD, "channels_last")
    assert isinstance(out, np.ndarray) and out.dtype == np.float32
    np.testing.assert_allclose(out, want, rtol=1e-6)
    first = normalize(x.transpose(0, 3, 1, 2), MEAN, STD, "channels_first")
    np.testing.assert_allclose(first, want.transpose(0, 3, 1, 2), rtol=1e-6)
    np.testing.assert_allclose(normalize(x[0], MEAN, STD, "channels_last"), want[0], rtol=1e-6)
    np.testing.assert_allclose(normalize(x[0].transpose(2, 0, 1), MEAN, STD, "channels_first"),
                               want[0].transpose(2, 0, 1), rtol=1e-6)
    np.testing.assert_allclose(normalize(x.tolist(), MEAN, STD, "channels_last"), want,
                               rtol=1e-6)  # nested lists too


@pytest.mark.parametrize("call,match", [
    (lambda x: normalize(x, MEAN, STD, "channels_first"), r"Received: x\.shape=\(2, 5, 5, 3\)"),
    (lambda x: normalize(x, MEAN, [1.0, 0.0, 1.0]), "std="),
    (lambda x: normalize(x, MEAN[:2], STD), "mean="),
    (lambda x: normalize(x, MEAN, STD, "NHWC"), "data_format='NHWC'"),
    (lambda x: kn.preprocess_input(x, weights="newton_cgnet10.nope"), "weights="),
])
def test_bad_arguments(call, match):
    with pytest.raises(ValueError, match=match):
        call(images())


def test_preprocess_input_defaults_to_the_cifar10_entry():
    key = "newton_cgnet10.cifar10"
    if key not in zoo.REGISTRY:
        pytest.skip(f"{key} is not registered")
    stored = json.loads(zoo.REGISTRY_FILE.read_text())[key]["preprocessing"]
    x = images()
    np.testing.assert_allclose(kn.preprocess_input(x, data_format="channels_last"),
                               by_hand(x, stored["mean"], stored["std"]), rtol=1e-6,
                               atol=1e-6)  # float32 x - mean cancels digits


def test_preprocess_input_takes_the_entrys_mean_std_in_either_layout(entry):
    x = images()
    want = by_hand(x, MEAN, STD)
    np.testing.assert_allclose(
        kn.preprocess_input(x, "channels_last", weights="newton_cgnet10.test"), want, rtol=1e-6)
    np.testing.assert_allclose(
        kn.preprocess_input(x.transpose(0, 3, 1, 2), "channels_first",
                            weights="newton_cgnet10.test"),
        want.transpose(0, 3, 1, 2), rtol=1e-6)
    # the global image data format is the default, as in keras.applications
    previous = keras.config.image_data_format()
    keras.config.set_image_data_format("channels_first")
    try:
        np.testing.assert_allclose(
            kn.preprocess_input(x.transpose(0, 3, 1, 2), weights="newton_cgnet10.test"),
            want.transpose(0, 3, 1, 2), rtol=1e-6)
    finally:
        keras.config.set_image_data_format(previous)
    # the old keras_newton.zoo spelling still works
    np.testing.assert_allclose(zoo.preprocess_input(x, "newton_cgnet10", "test",
                                                    data_format="channels_last"), want,
                               rtol=1e-6)


def test_weights_files_are_known_by_hash_or_sidecar(entry, tmp_path, monkeypatch):
    x = images()
    registered = tmp_path / "a" / "w.weights.h5"
    registered.parent.mkdir()
    registered.write_bytes(b"not really weights")
    monkeypatch.setitem(entry, "sha256", sha256_hex(registered))
    np.testing.assert_allclose(
        kn.preprocess_input(x, "channels_last", weights=str(registered)),
        by_hand(x, MEAN, STD), rtol=1e-6)
    assert kn.decode_predictions(np.eye(10)[[4]], top=1, weights=registered)[0][0][1] == \
        "class4"

    trained = tmp_path / "b" / "best.weights.h5"  # a training run's folder
    trained.parent.mkdir()
    trained.write_bytes(b"other weights")
    sidecar = {"mean": [1.0, 2.0, 3.0], "std": [4.0, 5.0, 6.0], "class_names": NAMES[::-1]}
    (trained.parent / "preprocessing.json").write_text(json.dumps(sidecar))
    np.testing.assert_allclose(kn.preprocess_input(x, "channels_last", weights=str(trained)),
                               by_hand(x, sidecar["mean"], sidecar["std"]), rtol=1e-6)
    assert kn.decode_predictions(np.eye(10)[[4]], top=1, weights=trained)[0][0][1] == "class5"

    (trained.parent / "preprocessing.json").unlink()
    with pytest.raises(ValueError, match="No preprocessing is known.*Received: weights="):
        kn.preprocess_input(x, weights=str(trained))


def test_preprocess_input_on_backend_tensors(entry):
    x = images()
    tensor = keras.ops.convert_to_tensor(x)
    out = kn.preprocess_input(tensor, "channels_last", weights="newton_cgnet10.test")
    assert not isinstance(out, np.ndarray) and keras.ops.is_tensor(out)
    assert keras.backend.standardize_dtype(out.dtype) == "float32"
    np.testing.assert_allclose(keras.ops.convert_to_numpy(out), by_hand(x, MEAN, STD),
                               rtol=1e-6)
    first = kn.preprocess_input(keras.ops.transpose(tensor, (0, 3, 1, 2)), "channels_first",
                                weights="newton_cgnet10.test")
    np.testing.assert_allclose(keras.ops.convert_to_numpy(first),
                               by_hand(x, MEAN, STD).transpose(0, 3, 1, 2), rtol=1e-6)
    # inside a functional model (symbolic Keras tensors)
    inputs = keras.Input((5, 5, 3), dtype="uint8")
    model = keras.Model(inputs, kn.preprocess_input(inputs, "channels_last",
                                                    weights="newton_cgnet10.test"))
    np.testing.assert_allclose(keras.ops.convert_to_numpy(model(x)), by_hand(x, MEAN, STD),
                               rtol=1e-6)


@pytest.mark.skipif(keras.backend.backend() != "jax", reason="JAX backend only")
def test_preprocess_input_on_jax_arrays_and_under_jit(entry):
    import jax
    import jax.numpy as jnp

    x = images()
    fn = jax.jit(lambda a: kn.preprocess_input(a, "channels_last", weights="newton_cgnet10.test"))
    out = fn(jnp.asarray(x))
    assert isinstance(out, jax.Array) and out.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(out), by_hand(x, MEAN, STD), rtol=1e-6)


def test_preprocess_input_in_tf_data_map(entry):
    """In ``tf.data.Dataset.map`` (graph mode), on the TensorFlow backend and on others."""
    tf = pytest.importorskip("tensorflow")
    x = images(n=6)
    ds = tf.data.Dataset.from_tensor_slices((x, np.arange(6))).map(
        lambda image, label: (kn.preprocess_input(image, "channels_last",
                                                  weights="newton_cgnet10.test"), label)
    ).batch(4)
    got = [(a.numpy(), b.numpy()) for a, b in ds]
    assert [a.shape for a, _ in got] == [(4, 5, 5, 3), (2, 5, 5, 3)]
    assert all(a.dtype == np.float32 for a, _ in got)
    np.testing.assert_allclose(np.concatenate([a for a, _ in got]), by_hand(x, MEAN, STD),
                               rtol=1e-6)
    np.testing.assert_array_equal(np.concatenate([b for _, b in got]), np.arange(6))


def test_decode_predictions_against_a_hand_sort(entry):
    preds = np.random.default_rng(3).random((4, 10)).astype("float32")
    decoded = kn.decode_predictions(preds, top=3, weights="newton_cgnet10.test")
    assert len(decoded) == 4
    for row, p in zip(decoded, preds, strict=True):
        best = sorted(range(10), key=lambda i: p[i], reverse=True)[:3]
        assert [r[0] for r in row] == best
        assert [r[1] for r in row] == [f"class{i}" for i in best]
        assert [r[2] for r in row] == [float(p[i]) for i in best]
        assert all(isinstance(r[2], float) for r in row)
    # backend tensors are converted, as keras.applications does
    assert kn.decode_predictions(keras.ops.convert_to_tensor(preds), top=3,
                                 weights="newton_cgnet10.test") == decoded
    assert len(kn.decode_predictions(preds, top=20, weights="newton_cgnet10.test")[0]) == 10
    with pytest.raises(ValueError, match=r"Received: preds\.shape=\(4, 5\)"):
        kn.decode_predictions(preds[:, :5], weights="newton_cgnet10.test")
    with pytest.raises(ValueError, match="Received: top=0"):
        kn.decode_predictions(preds, top=0, weights="newton_cgnet10.test")


def test_decode_predictions_default_names_are_cifar10():
    if "newton_cgnet10.cifar10" not in zoo.REGISTRY:
        pytest.skip("newton_cgnet10.cifar10 is not registered")
    preds = np.eye(10)[[3, 8]] * 0.9 + 0.01
    top = [row[0][:2] for row in kn.decode_predictions(preds, top=2)]
    assert top == [(3, "cat"), (8, "ship")]
    assert zoo.decode_predictions(preds, top=2) == kn.decode_predictions(preds, top=2)
