"""QuasiNewtonBlock and quasi_newton_net: one block is one step of the design solver (eq. 8)."""

import re

import keras
import numpy as np
import pytest
from helpers import arr, run_python
from reference import batch_norm, conv2d, relu

import keras_newton as kn
from keras_newton.design.problem import random_problem
from keras_newton.design.solvers import NewtonCG, QuasiNewton, drive
from keras_newton.layers import QuasiNewtonBlock
from keras_newton.models import parse_quasi_newton_spec

pytestmark = pytest.mark.backend_agnostic


def solver_block(m, n):
    """The block in the solver's form: every product with A the dense map of A, no BN,
    no dropout, the binary terms D the ReLU' mask of ``A x_k``."""
    A, _ = random_problem(n, rng=7)
    block = QuasiNewtonBlock(m, n, kernel_size=1, use_batch_norm=False, relu_mask=True,
                             data_format="channels_last")
    block.build((None, 1, 1, n))  # a 1x1 image with n channels: a 1x1 convolution is x @ K
    for c in block.convs:
        c.kernel.assign(A.reshape(1, 1, n, n).astype("float32"))  # x @ A = A x (symmetric)
    return block, A


@pytest.mark.parametrize("m", [0, 1, 2, 3])
def test_one_block_is_one_quasi_newton_iteration(m, rng):
    n = 32
    block, A = solver_block(m, n)
    x = rng.normal(size=(6, n))  # x_0 as in Section 3.3 (not yet >= 0)
    x[3:] = np.maximum(x[3:], 0.0)  # and iterates x_k >= 0
    got = arr(block(x.reshape(6, 1, 1, n).astype("float32"), training=False)).reshape(6, n)
    want = np.stack([drive(QuasiNewton(m).step(xk, A @ xk), A) for xk in x])
    assert len(block.convs) == m + 1 and not block.use_projection
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_stacked_blocks_are_iterations(rng):
    """Three blocks (m = 2) are three iterations x_0 -> x_3 of the solver."""
    n = 32
    block, A = solver_block(2, n)
    x = rng.normal(size=n)
    got = x.reshape(1, 1, 1, n).astype("float32")
    for _ in range(3):
        got = block(got)
        x = drive(QuasiNewton(2).step(x, A @ x), A)
    np.testing.assert_allclose(arr(got).ravel(), x, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("m", [0, 1, 2, 3])
def test_solver_step_telescopes(m, rng):
    """docs/newton_design.md: ``x_k + H_k A r = (D A)^{m+1} x_k`` (r = -U x_k), so one
    quasi-Newton step is m + 1 masked products with A and Table 2 needs ~72/(m+1) steps."""
    A, _ = random_problem(40, rng=3)
    x = rng.normal(size=40)
    mask, v = A @ x > 0, x
    for _ in range(m + 1):
        v = np.where(mask, A @ v, 0.0)
    np.testing.assert_allclose(drive(QuasiNewton(m).step(x, A @ x), A), relu(v),
                               rtol=1e-12, atol=1e-14)


def test_newton_cg_iteration_is_not_an_algorithm2_block(rng):
    """Why no Newton-CG Block equals a Newton-CG iteration (docs/newton_design.md).

    b = U^T r = -Q x_k, so Algorithm 1 runs CG on ``w = y + x_k`` with gradient ``Q w``:
    the iteration is ``ReLU(w_N)`` from ``w_0 = 2 x_k`` (``x_k`` for y_0 = 0) with no outer
    skip. Algorithm 2 runs the same recursion (no b) from ``y_0 = x_k`` and returns
    ``ReLU(x_k + y_N)``: a different point, even with the solver's own alpha and beta.
    """
    A, _ = random_problem(60, rng=5)
    x = np.abs(rng.normal(size=60))
    mask = A @ x > 0

    def Q(v):  # U^T U v, eq. (17) without b
        u = v - np.where(mask, A @ v, 0.0)
        return u - A @ np.where(mask, u, 0.0)

    def algorithm2(w, N):  # lines 1-10 with g = Q w and the exact alpha_t, beta_t
        g = Q(w)
        d = -g
        for _ in range(N):
            Qd = Q(d)
            alpha = -(g @ d) / (d @ Qd)
            w, g = w + alpha * d, g + alpha * Qd
            d = -g + (g @ Qd) / (d @ Qd) * d
        return w

    for N in (3, 5):
        paper = drive(NewtonCG(N).step(x, A @ x), A)
        zero = drive(NewtonCG(N, zero_start=True).step(x, A @ x), A)
        np.testing.assert_allclose(relu(algorithm2(2 * x, N)), paper, atol=1e-12)
        np.testing.assert_allclose(relu(algorithm2(x, N)), zero, atol=1e-12)
        assert np.abs(relu(x + algorithm2(x, N)) - paper).max() > 0.1  # the block's output


def reference_block(x, block, stride):
    """NumPy (float64) QuasiNewtonBlock in inference mode, from the block's weights."""

    def product(c, bn, v, s):
        out = conv2d(v, arr(c.kernel), s)
        return batch_norm(out, *(arr(w) for w in (bn.gamma, bn.beta, bn.moving_mean,
                                                   bn.moving_variance)))

    z = product(block.convs[0], block.bns[0], x, stride)
    if block.m == 0:
        return relu(z)
    skip = product(block.proj_conv, block.proj_bn, x, stride) if block.use_projection else x
    term = step = relu(z) - skip
    for n in range(1, block.m + 1):
        term = product(block.convs[n], block.bns[n], term, 1)
        if block.relu_mask:
            term = np.where(z > 0, term, 0.0)
        step = step + term
    return relu(skip + step)


@pytest.mark.parametrize("relu_mask", [True, False])
@pytest.mark.parametrize("m", [0, 1, 3])
@pytest.mark.parametrize("in_channels,strides", [(8, 1), (4, 2)])
def test_matches_numpy_reference_with_bn_and_projection(m, relu_mask, in_channels, strides, rng):
    block = QuasiNewtonBlock(m, 8, strides=strides, relu_mask=relu_mask, dropout_rate=0.3)
    x = rng.normal(size=(2, 8, 8, in_channels)).astype("float32")
    block.build(x.shape)
    for w in block.weights:
        low, high = (0.5, 2.0) if w.path.endswith("moving_variance") else (-0.6, 0.6)
        w.assign(rng.uniform(low, high, w.shape).astype("float32"))
    got = arr(block(x, training=False))
    assert got.shape == (2, 8 // strides, 8 // strides, 8)
    assert block.use_projection == (m >= 1 and strides == 2)
    np.testing.assert_allclose(got, reference_block(x.astype("float64"), block, strides),
                               rtol=1e-5, atol=1e-5)


def test_m0_is_the_plainnet_layer_and_m1_has_resnet_weights():
    """m = 0: one convolution + BN + ReLU (PlainNet); m = 1: ResNet's convolutions."""
    assert kn.quasi_newton_net("20-{0}").count_params() == kn.PlainNet20().count_params()
    assert kn.quasi_newton_net("20-{1}").count_params() == kn.ResNet20().count_params()
    block = QuasiNewtonBlock(0, 8, strides=2)
    block.build((None, 8, 8, 4))
    assert [w.path.split("/")[-2] for w in block.trainable_weights] == ["conv0", "bn0", "bn0"]


def test_dropout_acts_only_in_training(rng):
    x = rng.normal(size=(4, 8, 8, 8)).astype("float32")
    block = QuasiNewtonBlock(2, 8, dropout_rate=0.5)
    plain = QuasiNewtonBlock(2, 8)
    for b in (block, plain):
        b.build(x.shape)
    plain.set_weights(block.get_weights())
    np.testing.assert_allclose(arr(block(x)), arr(plain(x)), rtol=1e-6, atol=1e-6)
    assert not np.allclose(arr(block(x, training=True)), arr(plain(x, training=True)))


@pytest.mark.jax_heavy
def test_every_kernel_gets_a_gradient(rng):
    """One plain-SGD step moves every kernel (W0..W3, the projection) and BN parameter."""
    inputs = keras.Input((8, 8, 4))
    x = QuasiNewtonBlock(3, 8, strides=2, dropout_rate=0.1, name="qn")(inputs)
    model = keras.Model(inputs, keras.layers.Dense(3)(keras.layers.GlobalAveragePooling2D()(x)))
    model.compile(keras.optimizers.SGD(0.1),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    block = model.get_layer("qn")
    assert len([w for w in block.trainable_weights if w.path.endswith("kernel")]) == 3 + 1 + 1
    before = [arr(w) for w in block.trainable_weights]
    model.fit(rng.normal(size=(16, 8, 8, 4)), rng.integers(0, 3, 16), batch_size=16, verbose=0)
    for w, b in zip(block.trainable_weights, before, strict=True):
        assert np.abs(arr(w) - b).max() > 1e-7, w.path


def test_config_round_trip():
    layer = QuasiNewtonBlock(2, 8, strides=2, relu_mask=False, dropout_rate=0.1,
                             kernel_regularizer=keras.regularizers.L2(1e-4), name="qn")
    config = layer.get_config()
    clone = QuasiNewtonBlock.from_config(config)
    assert clone.get_config() == config
    assert (config["m"], config["strides"], config["relu_mask"]) == (2, 2, False)
    assert keras.saving.get_registered_name(QuasiNewtonBlock) == "keras_newton>QuasiNewtonBlock"
    assert kn.QuasiNewtonBlock is QuasiNewtonBlock


@pytest.mark.jax_heavy
@pytest.mark.parametrize("spec,params,last", [
    pytest.param("11-{2}", 127_546, 1, marks=pytest.mark.slow),
    pytest.param("56-{2}", 860_026, 6, marks=[pytest.mark.slow, pytest.mark.heavy]),
])
def test_trains_a_step_saves_and_reloads(spec, params, last, tmp_path, rng):
    model = kn.quasi_newton_net(spec, weight_decay=5e-4)
    assert model.name == f"quasi_newton{spec[:2]}_m2" and model.count_params() == params
    assert [layer.output.shape for layer in model.layers
            if layer.name in (f"stage1_block{last}", "stage2_block1", f"stage3_block{last}")] == [
        (None, 32, 32, 16), (None, 16, 16, 32), (None, 8, 8, 64)]
    model.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9),
                  loss="sparse_categorical_crossentropy")
    x = rng.normal(size=(4, 32, 32, 3)).astype("float32")
    y = np.arange(4) % 10
    before = arr(model.get_layer(f"stage3_block{last}").convs[2].kernel)
    loss = float(model.train_on_batch(x, y))
    assert np.isfinite(loss)
    assert not np.allclose(arr(model.get_layer(f"stage3_block{last}").convs[2].kernel), before)
    want = arr(model(x))
    model.save(tmp_path / "m.keras")
    np.save(tmp_path / "x.npy", x)
    out = run_python(
        "import sys, numpy as np, keras, keras_newton\n"
        "m = keras.saving.load_model(sys.argv[1])\n"
        "np.save(sys.argv[3], keras.ops.convert_to_numpy(m(np.load(sys.argv[2]))))\n"
        "print(type(m.get_layer('stage2_block1')).__name__)",
        tmp_path / "m.keras", tmp_path / "x.npy", tmp_path / "y.npy",
    )
    assert out.strip() == "QuasiNewtonBlock"
    np.testing.assert_allclose(np.load(tmp_path / "y.npy"), want, rtol=1e-5, atol=1e-6)


def test_registry_and_specs():
    from keras_newton import models

    assert parse_quasi_newton_spec("56-{2}") == (56, 2, (6, 6, 6))
    assert parse_quasi_newton_spec(" 46 - { 3 } ", [3, 3, 5]) == (46, 3, (3, 3, 5))
    assert {"quasi_newton56_m0", "quasi_newton56_m1", "quasi_newton56_m2",
            "quasi_newton46_m3"} <= set(models.MODELS)
    model = models.get_model("quasi_newton46_m3", include_top=False, pooling="avg")
    assert model.output_shape == (None, 64)
    assert [layer.m for layer in model.layers if isinstance(layer, QuasiNewtonBlock)] == [3] * 11


@pytest.mark.parametrize("call,match", [
    (lambda: parse_quasi_newton_spec("56-{3}"), "spec='56-{3}'"),
    (lambda: parse_quasi_newton_spec("56-{2}", (6, 6, 5)), "Received: spec='56-{2}'"),
    (lambda: parse_quasi_newton_spec("56-{2}", (6, 0, 12)), "blocks="),
    (lambda: parse_quasi_newton_spec("56-2"), "spec='56-2'"),
    (lambda: parse_quasi_newton_spec((56, 2)), "spec="),
    (lambda: QuasiNewtonBlock(-1, 8), "m=-1"),
    (lambda: QuasiNewtonBlock(1.0, 8), "m=1.0"),
    (lambda: QuasiNewtonBlock(1, 0), "filters=0"),
    (lambda: QuasiNewtonBlock(1, 8, dropout_rate=1.0), "dropout_rate=1.0"),
    (lambda: QuasiNewtonBlock(1, 8, kernel_size=0), "kernel_size=0"),
    (lambda: QuasiNewtonBlock(1, 8).build((None, 8, 8)), "rank-4"),
])
def test_bad_arguments(call, match):
    with pytest.raises(ValueError, match=re.escape(match)):
        call()
