"""CGBlock / NewtonCGBlock against the NumPy reference of Algorithm 2, and layer contracts."""

import keras
import numpy as np
import pytest
from helpers import arr, reference_params, run_python
from reference import newton_cg_block

from keras_newton.layers import CGBlock, NewtonCGBlock

pytestmark = pytest.mark.backend_agnostic


def randomize(layer, rng):
    """Gives every weight (BN moving statistics included) non-trivial random values."""
    for w in layer.weights:
        if w.path.endswith("moving_variance"):
            value = rng.uniform(0.5, 2.0, w.shape)
        elif w.path.endswith(("alpha", "beta")) and len(w.shape) == 0:
            value = rng.uniform(0.3, 1.2)
        else:
            scale = 0.3 if len(w.shape) == 4 else 0.5
            value = rng.normal(0.0, scale, w.shape)
        w.assign(np.asarray(value, dtype="float32"))


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("num_cg_blocks", [1, 2, 3])
@pytest.mark.parametrize("in_channels,filters,strides", [(8, 8, 1), (4, 8, 2)])
def test_matches_numpy_algorithm2(num_cg_blocks, in_channels, filters, strides, fused, rng):
    block = NewtonCGBlock(num_cg_blocks, filters, strides=strides, dropout_rate=0.3,
                          fused=fused)
    x = rng.normal(size=(2, 8, 8, in_channels)).astype("float32")
    block.build(x.shape)
    randomize(block, rng)
    got = arr(block(x, training=False))
    blocks, proj = reference_params(block)
    want = newton_cg_block(x.astype("float64"), blocks, proj, strides)
    assert got.shape == (2, 8 // strides, 8 // strides, filters)
    assert (proj is not None) == (strides != 1)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("in_channels,strides", [(8, 1), (4, 2)])
def test_concatenated_gradient_matches_numpy_eq18(in_channels, strides, fused, rng):
    """branch_filters=(f1, f2, f4): g = y + [g1, g2, g3] (eq. 18, Newton-CGNet-34)."""
    block = NewtonCGBlock(3, 8, strides=strides, fused=fused, branch_filters=(2, 2, 4))
    x = rng.normal(size=(2, 8, 8, in_channels)).astype("float32")
    block.build(x.shape)
    randomize(block, rng)
    blocks, proj = reference_params(block)
    assert [blocks[0][k].shape[-1] for k in ("w1_w", "w2_w", "w3_w", "w4_w")] == [2, 2, 8, 4]
    got = arr(block(x, training=False))
    want = newton_cg_block(x.astype("float64"), blocks, proj, strides, concat=True)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # The sum form on the same weights would not even have matching shapes.
    assert got.shape == (2, 8 // strides, 8 // strides, 8)


@pytest.mark.parametrize("branch_filters", [(2, 2), (2, 2, 2), (0, 4, 4), [2.0, 2, 4], "224"])
def test_bad_branch_filters(branch_filters):
    with pytest.raises(ValueError, match="branch_filters="):
        NewtonCGBlock(1, 8, branch_filters=branch_filters)


def test_scalars_per_algorithm2():
    block = NewtonCGBlock(4, 8)
    block.build((None, 8, 8, 8))
    names = [w.path.rsplit("/", 1)[-1] for w in block.trainable_weights if len(w.shape) == 0]
    assert names.count("alpha") == 4 and names.count("beta") == 3  # N alphas, N-1 betas
    assert all(float(arr(w)) == 1.0 for w in block.trainable_weights if len(w.shape) == 0)


def test_dropout_acts_only_in_training(rng):
    x = rng.normal(size=(4, 8, 8, 8)).astype("float32")
    plain, dropped = NewtonCGBlock(2, 8, dropout_rate=0.0), NewtonCGBlock(2, 8, dropout_rate=0.5)
    for block in (plain, dropped):
        block.build(x.shape)
    randomize(plain, rng)
    for a, b in zip(plain.weights, dropped.weights, strict=True):
        b.assign(a)
    np.testing.assert_allclose(arr(dropped(x, training=False)), arr(plain(x, training=False)),
                               rtol=1e-6, atol=1e-6)
    # Training mode: BN uses batch statistics in both, dropout only in `dropped`.
    diff = np.abs(arr(dropped(x, training=True)) - arr(plain(x, training=True))).max()
    assert diff > 1e-2


def test_every_scalar_gets_a_gradient(rng):
    """One plain-SGD step moves every alpha and beta, i.e. each has a non-zero gradient."""
    inputs = keras.Input((8, 8, 4))
    x = NewtonCGBlock(3, 8, strides=2, name="ncg")(inputs)
    x = keras.layers.GlobalAveragePooling2D()(x)
    model = keras.Model(inputs, keras.layers.Dense(3)(x))
    model.compile(keras.optimizers.SGD(0.1),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    scalars = [w for w in model.trainable_weights if len(w.shape) == 0]
    assert len(scalars) == 3 + 2
    before = [float(arr(w)) for w in scalars]
    model.fit(rng.normal(size=(16, 8, 8, 4)), rng.integers(0, 3, 16), batch_size=16, verbose=0)
    for w, b in zip(scalars, before, strict=True):
        assert abs(float(arr(w)) - b) > 1e-7, w.path


def _one_sgd_step(fused, x, y, weights):
    inputs = keras.Input(x.shape[1:])
    h = NewtonCGBlock(3, 8, strides=2, fused=fused, name="ncg")(inputs)
    model = keras.Model(inputs, keras.layers.Dense(3)(keras.layers.GlobalAveragePooling2D()(h)))
    if weights is not None:
        model.set_weights(weights)
    model.compile(keras.optimizers.SGD(1.0),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    start = model.get_weights()
    infer = keras.ops.convert_to_numpy(model(x, training=False))
    model.fit(x, y, batch_size=len(x), shuffle=False, verbose=0)
    return start, infer, [a - b for a, b in zip(start, model.get_weights(), strict=True)]


def test_fused_path_same_outputs_gradients_and_weights(rng):
    """Fused convolutions: same weights, outputs (inference) and gradients (training)."""
    x = rng.normal(size=(8, 8, 8, 4)).astype("float32")
    y = rng.integers(0, 3, 8)
    weights, infer_f, grads_f = _one_sgd_step(True, x, y, None)
    _, infer_p, grads_p = _one_sgd_step(False, x, y, weights)
    np.testing.assert_allclose(infer_f, infer_p, rtol=1e-5, atol=1e-5)
    for gf, gp in zip(grads_f, grads_p, strict=True):  # lr = 1: update = gradient
        np.testing.assert_allclose(gf, gp, rtol=1e-5, atol=1e-5)
    assert max(np.abs(g).max() for g in grads_f) > 1e-3


def test_dropout_conv_is_inverted_dropout(rng):
    """With a centre-tap identity kernel the convolution returns the dropped input."""
    block = CGBlock(16, dropout_rate=0.3)
    x = rng.uniform(1.0, 2.0, size=(8, 8, 8, 16)).astype("float32")
    block.build(x.shape)
    kernel = np.zeros((3, 3, 16, 16), "float32")
    kernel[1, 1] = np.eye(16)
    block.conv2.kernel.assign(kernel)
    out = arr(block._dropout_conv(x, block.dropout2, block.conv2, training=True))
    kept = out != 0
    assert abs(1 - kept.mean() - 0.3) < 0.02, kept.mean()
    np.testing.assert_allclose(out[kept], x[kept] / 0.7, rtol=1e-6)
    np.testing.assert_allclose(arr(block._dropout_conv(x, block.dropout2, block.conv2,
                                                       training=False)), x, rtol=1e-6)


def _dropout_sgd_step(x, y):
    keras.utils.set_random_seed(0)  # same init and same dropout seeds in every call
    inputs = keras.Input(x.shape[1:])
    h = NewtonCGBlock(3, 8, strides=2, dropout_rate=0.3, name="ncg")(inputs)
    model = keras.Model(inputs, keras.layers.Dense(3)(keras.layers.GlobalAveragePooling2D()(h)))
    model.compile(keras.optimizers.SGD(1.0),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    start = model.get_weights()
    model.fit(x, y, batch_size=len(x), shuffle=False, verbose=0)
    return [a - b for a, b in zip(start, model.get_weights(), strict=True)]


@pytest.mark.jax_heavy
def test_recomputed_dropout_gives_autodiff_gradients(rng, monkeypatch):
    """The backward pass recomputes the dropped tensors with the forward pass's masks:
    same gradients as plain autodiff that stores them (``keras.remat`` disabled)."""
    x = rng.normal(size=(8, 8, 8, 4)).astype("float32")
    y = rng.integers(0, 3, 8)
    grads = _dropout_sgd_step(x, y)
    monkeypatch.setattr(keras, "remat", lambda f: f)
    plain = _dropout_sgd_step(x, y)
    for a, b in zip(grads, plain, strict=True):  # lr = 1: update = gradient
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    assert max(np.abs(g).max() for g in grads) > 1e-3


@pytest.mark.parametrize("cls,kwargs", [
    (CGBlock, {"filters": 8, "strides": 2, "dropout_rate": 0.1, "first_step": False,
               "kernel_regularizer": keras.regularizers.L2(1e-4)}),
    (NewtonCGBlock, {"num_cg_blocks": 2, "filters": 8, "strides": 2, "dropout_rate": 0.1}),
    (NewtonCGBlock, {"num_cg_blocks": 2, "filters": 8, "branch_filters": (2, 2, 4)}),
])
def test_config_round_trip(cls, kwargs):
    layer = cls(**kwargs, name="blk")
    config = layer.get_config()
    clone = cls.from_config(config)
    assert clone.get_config() == config
    for key, value in kwargs.items():
        if key != "kernel_regularizer":
            assert config[key] == value
    assert keras.saving.get_registered_name(cls) == f"keras_newton>{cls.__name__}"


@pytest.mark.jax_heavy
def test_keras_file_round_trip_in_fresh_process(tmp_path, rng):
    inputs = keras.Input((16, 16, 3))
    x = NewtonCGBlock(2, 8, strides=2, dropout_rate=0.2)(inputs)
    model = keras.Model(inputs, keras.layers.GlobalAveragePooling2D()(x))
    randomize(model.layers[1], rng)
    x = rng.normal(size=(3, 16, 16, 3)).astype("float32")
    path, inp = tmp_path / "m.keras", tmp_path / "x.npy"
    model.save(path)
    np.save(inp, x)
    out = run_python(
        "import sys, numpy as np, keras, keras_newton\n"
        "m = keras.saving.load_model(sys.argv[1])\n"
        "np.save(sys.argv[3], keras.ops.convert_to_numpy(m(np.load(sys.argv[2]))))\n"
        "print(type(m.layers[1]).__name__)",
        path, inp, tmp_path / "y.npy",
    )
    assert out.strip() == "NewtonCGBlock"
    np.testing.assert_allclose(np.load(tmp_path / "y.npy"), arr(model(x)), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kwargs,param", [
    ({"num_cg_blocks": 0, "filters": 8}, "num_cg_blocks"),
    ({"num_cg_blocks": 2.5, "filters": 8}, "num_cg_blocks"),
    ({"num_cg_blocks": 1, "filters": 0}, "filters"),
    ({"num_cg_blocks": 1, "filters": -4}, "filters"),
    ({"num_cg_blocks": 1, "filters": 8, "dropout_rate": 1.0}, "dropout_rate"),
    ({"num_cg_blocks": 1, "filters": 8, "dropout_rate": -0.1}, "dropout_rate"),
    ({"num_cg_blocks": 1, "filters": 8, "data_format": "NHWC"}, "data_format"),
])
def test_bad_arguments(kwargs, param):
    with pytest.raises(ValueError, match=f"{param}="):
        NewtonCGBlock(**kwargs)


@pytest.mark.parametrize("shape,match", [
    ((None, 8, 8), "rank-4"),
    ((None, 8, 8, None), "known number of input channels"),
])
def test_bad_input_shape(shape, match):
    with pytest.raises(ValueError, match=match):
        NewtonCGBlock(1, 8).build(shape)


@pytest.mark.skipif(keras.backend.backend() != "tensorflow",
                    reason="the warning is TensorFlow's (tf.recompute_grad)")
def test_training_with_dropout_logs_no_uint8_watch_warning():
    """The dropout mask is uint8 and TensorFlow warns when remat watches it: filtered.

    Fresh process: TensorFlow logs that warning only for its first 5 occurrences.
    """
    out = run_python("""
import json, logging
import numpy as np, keras
from keras_newton.layers import NewtonCGBlock
seen = []
handler = logging.Handler()
handler.emit = lambda record: seen.append(record.getMessage())
logging.getLogger("tensorflow").addHandler(handler)
inputs = keras.Input((8, 8, 4))
x = NewtonCGBlock(2, 8, dropout_rate=0.2)(inputs)
model = keras.Model(inputs, keras.layers.Dense(3)(keras.layers.Flatten()(x)))
model.compile("sgd", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
model.train_on_batch(np.ones((4, 8, 8, 4), "float32"), np.zeros(4, "int32"))
logging.getLogger("tensorflow").warning("an unrelated warning")
print(json.dumps(seen))
""")
    import json

    seen = json.loads(out.strip().splitlines()[-1])
    assert "an unrelated warning" in seen  # the filter keeps the logger's other messages
    assert not [m for m in seen if "watched tensor" in m], seen
