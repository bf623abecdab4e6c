"""Model builders: the paper's parameter counts, the applications contract, bad input."""

import warnings

import keras
import numpy as np
import pytest
from helpers import run_python

import keras_newton as kn
from keras_newton import files, models

pytestmark = pytest.mark.backend_agnostic

# Table 3 of the paper (millions of parameters), typed in from the paper.
PAPER_TABLE3 = {
    "NewtonCGNet10": 0.29, "NewtonCGNet16": 0.48, "NewtonCGNet22": 0.68,
    "NewtonCGNet28": 0.87, "NewtonCGNet56": 1.70, "NewtonCGNet82": 2.62,
    "NewtonCGNet110": 3.45, "ResNet20": 0.27, "ResNet32": 0.46, "ResNet44": 0.66,
    "ResNet56": 0.85, "ResNet110": 1.73, "ResNet164": 2.62,
}
SMALL = ["NewtonCGNet10", "ResNet20", "PlainNet20"]


@pytest.mark.parametrize("builder,paper", sorted(PAPER_TABLE3.items()))
def test_parameter_counts_match_paper_table3(builder, paper):
    params = getattr(kn, builder)().count_params()
    assert abs(params / 1e6 - paper) / paper <= 0.03, (builder, params)


@pytest.mark.parametrize("depth,stages", [(10, (1, 1, 2)), (16, (2, 2, 3)), (22, (3, 3, 4)),
                                          (28, (4, 4, 5)), (56, (9, 9, 9)),
                                          (82, (13, 13, 14)), (110, (18, 18, 18))])
def test_named_specs_are_the_papers(depth, stages):
    model = getattr(kn, f"NewtonCGNet{depth}")()
    assert [layer.num_cg_blocks for layer in model.layers
            if isinstance(layer, kn.NewtonCGBlock)] == list(stages)
    assert models.parse_spec(f"{depth}-{{{','.join(map(str, stages))}}}") == (depth, stages)


def test_generic_builder_takes_string_or_ints():
    a = kn.newton_cgnet("16-{2,2,3}")
    b = kn.newton_cgnet((2, 2, 3), depth=16)
    assert a.count_params() == b.count_params() == kn.NewtonCGNet16().count_params()
    assert a.name == "newton_cgnet16"


def test_stage_layout():
    model = kn.NewtonCGNet10()
    shapes = {layer.name: layer.output.shape for layer in model.layers}
    assert shapes["stage1"] == (None, 32, 32, 16)
    assert shapes["stage2"] == (None, 16, 16, 32)
    assert shapes["stage3"] == (None, 8, 8, 64)
    conv_kernels = [w for w in model.weights if w.path.endswith("kernel") and len(w.shape) == 4]
    # stem + 4 CG Blocks x 4 convs + 2 x (3 projections) at the stride-2 stages
    assert len(conv_kernels) == 1 + 4 * 4 + 2 * 3


@pytest.mark.parametrize("builder", SMALL)
def test_applications_contract(builder):
    build = getattr(kn, builder)
    assert build(include_top=False).output_shape == (None, 8, 8, 64)
    assert build(include_top=False, pooling="avg").output_shape == (None, 64)
    assert build(include_top=False, pooling="max").output_shape == (None, 64)
    assert build(include_top=False, input_shape=(48, 48, 3)).output_shape == (None, 12, 12, 64)
    assert build(classes=7).output_shape == (None, 7)
    tensor = keras.Input((40, 40, 3))
    assert build(input_tensor=tensor, input_shape=(40, 40, 3)).output_shape == (None, 10)
    x = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype("float32")
    probs = keras.ops.convert_to_numpy(build()(x))
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)
    logits = keras.ops.convert_to_numpy(build(classifier_activation=None)(x))
    assert logits.min() < 0  # raw logits, not probabilities


@pytest.mark.jax_heavy
def test_weights_from_path_and_keras_round_trip(tmp_path, rng):
    model = kn.NewtonCGNet10(dropout_rate=0.2)
    for w in model.weights:
        if w.path.endswith("moving_mean"):
            w.assign(rng.normal(0, 0.1, w.shape).astype("float32"))
    x = rng.normal(size=(2, 32, 32, 3)).astype("float32")
    want = keras.ops.convert_to_numpy(model(x))
    model.save_weights(tmp_path / "w.weights.h5")
    again = kn.NewtonCGNet10(weights=str(tmp_path / "w.weights.h5"))
    np.testing.assert_allclose(keras.ops.convert_to_numpy(again(x)), want, rtol=1e-6, atol=1e-6)
    model.save(tmp_path / "m.keras")
    np.save(tmp_path / "x.npy", x)
    run_python(
        "import sys, numpy as np, keras, keras_newton\n"
        "m = keras.saving.load_model(sys.argv[1])\n"
        "np.save(sys.argv[3], keras.ops.convert_to_numpy(m(np.load(sys.argv[2]))))",
        tmp_path / "m.keras", tmp_path / "x.npy", tmp_path / "y.npy",
    )
    np.testing.assert_allclose(np.load(tmp_path / "y.npy"), want, rtol=1e-6, atol=1e-6)


def test_weights_of_other_classes_fail_without_keras_warning(tmp_path):
    """A file that does not fit is one clear error; Keras' warning that layers "will retain
    their freshly-initialized weights" would contradict it. Other warnings still pass."""
    kn.NewtonCGNet10(classes=3).save_weights(tmp_path / "three.weights.h5")
    with warnings.catch_warnings(record=True) as seen, pytest.raises(
            ValueError, match=r"Could not load the weights file .*three.weights.h5.* into "
                              r"'newton_cgnet10' \(ValueError: .*shape"):
        warnings.simplefilter("always")
        kn.NewtonCGNet10(weights=str(tmp_path / "three.weights.h5"))
    assert not [w for w in seen if "freshly-initialized" in str(w.message)]
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with files.warnings_unless_it_fails(drop=("dropped",)):
            warnings.warn("kept", stacklevel=1)
            warnings.warn("dropped here", stacklevel=1)
    assert [str(w.message) for w in seen] == ["kept"]


def test_registry_names():
    assert models.canonical_name("newton_cgnet_56") == "newton_cgnet56"
    assert models.canonical_name("NewtonCGNet-82") == "newton_cgnet82"
    assert models.canonical_name("ResNet110") == "resnet110"
    assert models.get_model("plainnet20").name == "plainnet20"
    with pytest.raises(ValueError, match=r"Valid names: \[.*newton_cgnet10.*model='vgg16'"):
        models.get_model("vgg16")


@pytest.mark.parametrize("call,match", [
    (lambda: kn.newton_cgnet("82-{13,13,13}"), "depth=82"),
    (lambda: kn.newton_cgnet((1, 1, 2), depth=12), "depth=12"),
    (lambda: kn.newton_cgnet((1, 0, 2)), "stages="),
    (lambda: kn.newton_cgnet("deep"), "stages='deep'"),
    (lambda: kn.newton_cgnet((1, 1, 2), dropout_rate=1.5), "dropout_rate=1.5"),
    (lambda: kn.resnet(21), "depth=21"),
    (lambda: kn.plainnet(0), "depth=0"),
    (lambda: kn.NewtonCGNet10(pooling="mean"), "pooling='mean'"),
    (lambda: kn.NewtonCGNet10(classes=0), "classes=0"),
    (lambda: kn.NewtonCGNet10(weights="imagenet"), "weights='imagenet'"),
    (lambda: kn.NewtonCGNet10(input_shape=(4, 4, 3)), "at least 8x8"),
    (lambda: kn.NewtonCGNet10(input_shape=(32, 32)), "input_shape="),
    (lambda: kn.ResNet20(weight_decay=-1.0), "weight_decay"),
])
def test_bad_input(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_cli_models_table(capsys, monkeypatch):
    from keras_newton import models
    from keras_newton.cli import main

    # One builder of each kind (every builder is built by the tests of its family).
    kinds = ("newton_cgnet82", "resnet20", "quasi_newton46_m3", "newton_cgnet_text")
    monkeypatch.setattr(models, "MODELS", {k: models.MODELS[k] for k in kinds})
    assert main(["models"]) == 0
    rows = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines()
            if line.split() and line.split()[0] in kinds}
    assert list(rows) == list(kinds)
    depth, params, paper = rows["newton_cgnet82"][1:4]
    assert depth == "82" and paper == "2.62M"  # Table 3
    assert abs(int(params.replace(",", "")) / 2.62e6 - 1) < 0.01
    assert rows["resnet20"][1:2] == ["20"] and rows["quasi_newton46_m3"][1] == "46"
    assert rows["newton_cgnet_text"][1] == "-"  # no depth in the name


def _channels_first_conv_runs():
    """TensorFlow's CPU kernels run Conv2D in NHWC only; JAX (and GPUs) run NCHW too."""
    try:
        keras.layers.Conv2D(1, 1, data_format="channels_first")(np.zeros((1, 1, 2, 2), "float32"))
    except Exception:  # tf UnimplementedError: "only supports the NHWC tensor format on CPU"
        return False
    return True


def _randomize(model, seed=0):
    """Non-trivial weights: random kernels, BN statistics, alphas and betas."""
    rng = np.random.default_rng(seed)
    for w in model.weights:
        value = rng.normal(0, 0.1, w.shape)
        if w.path.endswith(("variance", "gamma", "alpha", "beta")) and len(w.shape) < 2:
            value = np.abs(value) + 0.5
        w.assign(value.astype("float32"))
    return model


CHANNELS_FIRST_BUILDERS = [
    ("NewtonCGNet10", {}), ("ResNet20", {}), ("PlainNet20", {}),
    # concatenated branches (eq. 18) along the channel axis; 21.7M parameters: ~15 s on
    # TensorFlow (symbolic checks), ~55 s on JAX on the busy 2-core CPU
    pytest.param("NewtonCGNet34", {"input_shape": (3, 32, 32), "classes": 5},
                 marks=pytest.mark.slow),
]


@pytest.mark.parametrize("builder,kwargs", CHANNELS_FIRST_BUILDERS)
def test_channels_first_model_with_channels_last_weights(builder, kwargs, tmp_path):
    """A channels_first model loads the weights file of a channels_last one (by path).

    Any backend: same shapes (transposed), parameters and weights, BN on axis 1. Where
    channels_first convolutions run (JAX on CPU; GPUs): the same logits on transposed
    images (TensorFlow's CPU Conv2D is NHWC only).
    """
    build = getattr(kn, builder)
    size = kwargs.get("input_shape", (3, 32, 32))[1:]
    last = _randomize(build(data_format="channels_last", classifier_activation=None,
                            **{**kwargs, "input_shape": (*size, 3)}))
    last.save_weights(tmp_path / "last.weights.h5")
    first = build(data_format="channels_first", classifier_activation=None,
                  weights=tmp_path / "last.weights.h5", **{**kwargs, "input_shape": (3, *size)})
    assert first.input_shape == (None, 3, *size)
    assert first.count_params() == last.count_params()
    for a, b in zip(first.weights, last.weights, strict=True):
        assert a.path == b.path
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(a),
                                      keras.ops.convert_to_numpy(b))
    for layer in first.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            assert layer.axis in (1, [1]), layer.name
        if hasattr(layer, "data_format"):
            assert layer.data_format == "channels_first", layer.name
        if layer.name in ("stage1", "stage2", "stage3", "stage4"):
            want = last.get_layer(layer.name).output.shape
            assert layer.output.shape == (None, want[3], want[1], want[2]), layer.name
    if builder != "NewtonCGNet34":  # 21.7M parameters: built twice only
        notop = build(data_format="channels_first", include_top=False, **kwargs)
        assert notop.output_shape == (None, 64, 8, 8)
    if not _channels_first_conv_runs():
        pytest.skip("outputs not compared: no channels_first Conv2D on this backend/device "
                    "(TensorFlow on CPU); the JAX run of `make test` compares them")
    x = np.random.default_rng(1).normal(size=(2, *size, 3)).astype("float32")
    want = keras.ops.convert_to_numpy(last(x))
    got = keras.ops.convert_to_numpy(first(np.ascontiguousarray(x.transpose(0, 3, 1, 2))))
    assert np.abs(want).max() > 0.1  # the weights do something
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_image_data_format_is_the_default():
    previous = keras.config.image_data_format()
    keras.config.set_image_data_format("channels_first")
    try:
        assert kn.NewtonCGNet10().input_shape == (None, 3, 32, 32)
        assert kn.ResNet20(include_top=False).output_shape == (None, 64, 8, 8)
    finally:
        keras.config.set_image_data_format(previous)
    assert kn.NewtonCGNet10(data_format="channels_last").input_shape == (None, 32, 32, 3)
