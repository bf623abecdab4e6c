"""Export and serving: optimize_for_inference, SavedModel/ONNX files, parity, predict.

Parity is measured on a model with non-trivial weights: random BN gammas/betas and
alpha/beta scalars, and BN moving statistics calibrated on real images (or random
ones when the CIFAR-10 archive is absent), so logits are O(1-10) and 1e-4 means
something. Real-image checks use the first 100 images of every class of the CIFAR-10
JPEG archive at $KERAS_NEWTON_DATA (default ../shared/datasets) and skip without it.
"""

import functools
import json
import os
from pathlib import Path

import keras
import numpy as np
import pytest
from helpers import sha256_hex
from PIL import Image

from keras_newton import zoo
from keras_newton.cli import main as cli_main
from keras_newton.export import (
    ONNX_FILE,
    SAVEDMODEL_DIR,
    FoldedNewtonCGBlock,
    OnnxClassifier,
    archive_sample,
    export_model,
    graph_report,
    optimize_for_inference,
    run_savedmodel,
    tap_offset,
)
from keras_newton.export.onnx_export import ALLOWED_OPS
from keras_newton.layers import NewtonCGBlock
from keras_newton.models import get_model

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("KERAS_NEWTON_DATA", REPO.parent / "shared" / "datasets"))
CIFAR_ARCHIVE = SHARED_DATA / "cifar10-jpeg" / "train.tar.xz"
PREP = {"mean": [125.3, 123.0, 113.9], "std": [63.0, 62.1, 66.7]}
TOL = 1e-4


def randomize(model, calibration, seed=0):
    """Random BN affine and CG scalars, BN moving statistics calibrated on ``calibration``."""
    rng = np.random.default_rng(seed)
    for w in model.weights:
        leaf = w.path.rsplit("/", 1)[-1]
        if leaf == "gamma":
            w.assign(rng.uniform(0.5, 1.5, w.shape).astype("float32"))
        elif leaf == "beta" and len(w.shape):
            w.assign(rng.normal(0.0, 0.2, w.shape).astype("float32"))
        elif leaf in ("alpha", "beta"):  # the CG Block scalars
            w.assign(np.float32(rng.uniform(0.5, 1.5)))
    bns = [layer for layer in model._flatten_layers()
           if isinstance(layer, keras.layers.BatchNormalization)]
    for bn in bns:
        bn.momentum = 0.0  # one training-mode pass sets the moving statistics
    model(calibration, training=True)
    for bn in bns:
        bn.momentum = 0.9
    return model


def normalize(images):
    return ((images.astype("float32") - np.asarray(PREP["mean"], "float32"))
            / np.asarray(PREP["std"], "float32"))


@functools.cache
def cifar_sample():
    """The first 100 images of every class (uint8), or None without the archive."""
    if not CIFAR_ARCHIVE.is_file():
        return None
    images, labels, names = archive_sample(CIFAR_ARCHIVE, limit=1000)
    assert names == list(zoo.CIFAR10_CLASSES) and np.bincount(labels).tolist() == [100] * 10
    return images


@pytest.fixture(scope="module")
def cifar():
    images = cifar_sample()
    if images is None:
        pytest.skip(f"CIFAR-10 archive not found at {CIFAR_ARCHIVE} (set KERAS_NEWTON_DATA)")
    assert images.shape == (1000, 32, 32, 3) and images.dtype == np.uint8
    return images


@pytest.fixture(scope="module")
def calibration():
    """256 normalised calibration images: CIFAR-10 (all classes) if available, else random."""
    images = cifar_sample()
    if images is None:
        images = np.random.default_rng(0).integers(0, 256, (1000, 32, 32, 3), dtype=np.uint8)
    return normalize(images[::4][:256])


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory, calibration):
    """Newton-CGNet-10 with non-trivial weights, saved to a .weights.h5 file."""
    model = randomize(get_model("newton_cgnet10", dropout_rate=0.0,
                                classifier_activation=None), calibration)
    path = tmp_path_factory.mktemp("weights") / "newton_cgnet10.test.weights.h5"
    model.save_weights(path)
    return path


@pytest.fixture(scope="module")
def reference(weights_file):
    return get_model("newton_cgnet10", weights=str(weights_file), classifier_activation=None)


@pytest.fixture(scope="module")
def exports(tmp_path_factory, weights_file):
    """Newton-CGNet-10 above: plain (both formats, library) and optimised (ONNX, CLI).

    The optimised export goes through ``keras-newton export --overwrite`` into a folder
    holding a stale export and a user file: the stale export goes, the user file stays.
    """
    root = tmp_path_factory.mktemp("exports")
    sidecars = export_model("newton_cgnet10", str(weights_file), root / "plain",
                            format="both", preprocessing=PREP)
    assert set(sidecars) == {"savedmodel", "onnx"}
    out = root / "optimized"
    (out / SAVEDMODEL_DIR).mkdir(parents=True)
    (out / "notes.txt").write_text("kept")
    code = cli_main(["export", "--model", "newton_cgnet10", "--weights", str(weights_file),
                     "--out", str(out), "--format", "onnx", "--optimize", "--overwrite",
                     "--mean", *map(str, PREP["mean"]), "--std", *map(str, PREP["std"])])
    assert code == 0
    assert sorted(p.name for p in out.iterdir()) == ["model.onnx", "model.onnx.json",
                                                     "notes.txt"]
    return {"plain": root / "plain", "optimized": out}


def tiny_model(size, channels=8, branch_filters=None):
    """One strided Newton-CG Block (2 CG Blocks, both projections) + pooling."""
    inputs = keras.Input((size, size, channels))
    x = NewtonCGBlock(num_cg_blocks=2, filters=16, strides=2, branch_filters=branch_filters,
                      name="block")(inputs)
    return keras.Model(inputs, keras.layers.GlobalAveragePooling2D()(x))


# ---------------------------------------------------------------- optimize_for_inference

def test_tap_offset():
    assert tap_offset(32, 1) == 1 and tap_offset(31, 1) == 1 and tap_offset(None, 1) == 1
    assert tap_offset(32, 2) == 0  # even size, stride 2: "same" pads only after
    assert tap_offset(31, 2) == 1  # odd size: one pixel before, the 1x1 is the centre
    assert tap_offset(16, 2) == 0 and tap_offset(9, 2) == 1
    with pytest.raises(ValueError, match="Received: size=None"):
        tap_offset(None, 2)


@pytest.mark.parametrize("name", ["newton_cgnet10", "resnet20"])
def test_optimized_matches_original(name, calibration):
    kwargs = {"dropout_rate": 0.0} if name.startswith("newton") else {}
    model = randomize(get_model(name, classifier_activation=None, **kwargs), calibration)
    fast = optimize_for_inference(model)
    x = calibration[:32]
    ref = model.predict(x, verbose=0)
    out = fast.predict(x, verbose=0)
    assert np.abs(ref).max() > 1.0  # non-trivial logits
    assert np.abs(ref - out).max() <= TOL
    assert (ref.argmax(1) == out.argmax(1)).all()
    kinds = {type(layer).__name__ for layer in fast.layers}
    assert not kinds & {"BatchNormalization", "Dropout", "NewtonCGBlock"}
    assert fast.count_params() < model.count_params()
    if name.startswith("newton"):
        blocks = [layer for layer in fast.layers if isinstance(layer, FoldedNewtonCGBlock)]
        assert [b.num_cg_blocks for b in blocks] == [1, 1, 2]
        # 2 convolutions per CG Block instead of 4 + projections.
        assert sum(len(b.merged) + len(b.conv4) for b in blocks) == 8


@pytest.mark.parametrize("branch_filters", [None, (4, 4, 8)])
@pytest.mark.parametrize("size", [15, 16])
def test_strided_projection_merge_is_exact_for_odd_and_even_sizes(size, branch_filters, rng):
    """The 1x1 projections sit at different 3x3 taps for odd and even input sizes.

    Also the concatenated gradient of eq. 18 (Newton-CGNet-34), folded as a zero-padded sum.
    """
    model = tiny_model(size, branch_filters=branch_filters)
    images = rng.normal(size=(16, size, size, 8)).astype("float32")
    fast = optimize_for_inference(randomize(model, images, seed=size))
    assert np.abs(model.predict(images, verbose=0) - fast.predict(images, verbose=0)).max() <= TOL


def test_optimize_refuses_dynamic_strided_input():
    inputs = keras.Input((None, None, 8))
    model = keras.Model(inputs, NewtonCGBlock(1, 16, strides=2)(inputs))
    with pytest.raises(ValueError, match="Received: size=None"):
        optimize_for_inference(model)
    with pytest.raises(ValueError, match="Received: model=Sequential"):
        optimize_for_inference(keras.Sequential([keras.layers.Dense(2)]))


def test_optimized_model_saves_and_loads(tmp_path, rng):
    images = rng.normal(size=(8, 16, 16, 8)).astype("float32")
    fast = optimize_for_inference(randomize(tiny_model(16), images))
    fast.save(tmp_path / "fast.keras")
    loaded = keras.models.load_model(tmp_path / "fast.keras")
    np.testing.assert_allclose(loaded.predict(images, verbose=0),
                               fast.predict(images, verbose=0), atol=1e-6)


# ---------------------------------------------------------------- exported files

def test_sidecars_describe_the_files(exports, weights_file):
    for name, out in exports.items():
        onnx_card = json.loads((out / f"{ONNX_FILE}.json").read_text())
        cards = [onnx_card]
        if name == "plain":
            sm_card = json.loads((out / f"{SAVEDMODEL_DIR}.json").read_text())
            signature = sm_card["signatures"]["serving_default"]["inputs"][0]
            assert signature["dtype"] == "uint8" and signature["shape"] == [None, 32, 32, 3]
            assert set(sm_card["parity"]) == {"serving_default", "serving_normalized"}
            cards.append(sm_card)
        for card in cards:
            assert card["model"] == "newton_cgnet10"
            assert card["weights"]["sha256"] == sha256_hex(weights_file)
            assert card["weights"]["file"] == weights_file.name
            assert card["optimized"] is (name == "optimized")
            assert card["output"] == "logits"
            assert card["preprocessing"]["mean"] == PREP["mean"]
            assert card["class_names"] == list(zoo.CIFAR10_CLASSES)
            assert all(check["passed"] for check in card["parity"].values())
        assert onnx_card["opset"] == 17
        assert onnx_card["inputs"] == [{"name": "images", "dtype": "float32",
                                        "shape": ["batch", 32, 32, 3], "layout": "NHWC",
                                        "normalized": True}]
        assert onnx_card["outputs"] == [{"name": "logits", "dtype": "float32",
                                         "shape": ["batch", 10]}]
        assert set(onnx_card["parity"]) == ({"onnxruntime", "keras_optimized"}
                                            if name == "optimized" else {"onnxruntime"})


def test_onnx_graph_is_clean(exports):
    for out in exports.values():
        report = graph_report(out / ONNX_FILE)
        assert report["opset"] == 17
        assert set(report["op_types"]) <= ALLOWED_OPS, report["op_types"]
        assert not report["string_tensors"]
        assert report["inputs"][0]["shape"][0] == "batch"
    # Negations are 1x1 depthwise convolutions (scales_as_depthwise_convs) in both; the
    # optimised graph has also folded BN and alpha into its kernels: fewer Conv nodes.
    import onnx

    plain, optimized = ([n.op_type for n in onnx.load(str(exports[k] / ONNX_FILE)).graph.node]
                        for k in ("plain", "optimized"))
    assert "Neg" not in plain and "Neg" not in optimized
    assert optimized.count("Conv") < plain.count("Conv")


def test_scales_as_depthwise_convs_is_exact():
    """Neg and scalar Mul become depthwise Convs with bit-identical ORT outputs; a Mul by a
    per-channel constant and a Mul right after a Conv are left alone."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from keras_newton.export.onnx_passes import scales_as_depthwise_convs

    rng = np.random.default_rng(0)
    consts = {"c": np.float32(0.9), "per_channel": rng.normal(size=(1, 4, 1, 1)),
              "w": rng.normal(size=(4, 4, 3, 3)), "half": np.float32(0.5)}
    graph = helper.make_graph(
        [helper.make_node("Neg", ["x"], ["a"]),
         helper.make_node("Mul", ["a", "c"], ["scaled"]),
         helper.make_node("Mul", ["x", "per_channel"], ["channels"]),
         helper.make_node("Conv", ["x", "w"], ["conv"], pads=[1, 1, 1, 1]),
         helper.make_node("Mul", ["conv", "half"], ["conv_half"])],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4, 6, 6])],
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, ["n", 4, 6, 6])
         for name in ("a", "scaled", "channels", "conv_half")],
        [numpy_helper.from_array(np.asarray(v, np.float32), k) for k, v in consts.items()])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    before = proto.SerializeToString()
    after = scales_as_depthwise_convs(proto)
    onnx.checker.check_model(after)
    assert [n.op_type for n in after.graph.node] == ["Conv", "Conv", "Mul", "Conv", "Mul"]
    x = rng.normal(size=(3, 4, 6, 6)).astype(np.float32)
    outs = [ort.InferenceSession(model, providers=["CPUExecutionProvider"]).run(None, {"x": x})
            for model in (before, after.SerializeToString())]
    np.testing.assert_array_equal(outs[1][0], -x)
    np.testing.assert_array_equal(outs[1][1], -x * np.float32(0.9))
    for old, new in zip(*outs, strict=True):
        np.testing.assert_array_equal(new, old)


def test_parity_on_real_images(exports, reference, cifar):
    """ORT (plain and optimised) and both SavedModel signatures vs Keras: 1e-4, same top-1."""
    import tensorflow as tf

    x = normalize(cifar)
    ref = reference.predict(x, batch_size=250, verbose=0)
    assert np.abs(ref).max() > 1.0 and len(np.unique(ref.argmax(1))) > 1
    results = {f"onnx_{name}": OnnxClassifier(out / ONNX_FILE).run(x)
               for name, out in exports.items()}
    loaded = tf.saved_model.load(str(exports["plain"] / SAVEDMODEL_DIR))
    results["savedmodel_uint8"] = run_savedmodel(loaded, cifar)
    results["savedmodel_float"] = run_savedmodel(loaded, x, "serving_normalized")
    for key, logits in results.items():
        diff = np.abs(logits - ref).max()
        print(f"{key}: max |logit diff| {diff:.2e}, top-1 agreement "
              f"{(logits.argmax(1) == ref.argmax(1)).mean():.4f} (max |logit| "
              f"{np.abs(ref).max():.2f})")
        assert diff <= TOL, key
        assert (logits.argmax(1) == ref.argmax(1)).all(), key


def test_onnx_helper_checks_inputs(exports):
    clf = OnnxClassifier(exports["plain"] / ONNX_FILE)
    assert (clf.input_name, clf.output_names, clf.input_shape) == (
        "images", ["logits"], (None, 32, 32, 3))
    good = np.zeros((2, 32, 32, 3), "float32")
    assert clf.run(good).shape == (2, 10)
    with pytest.raises(ValueError, match=r"Received: x\.dtype=float64"):
        clf.run(good.astype("float64"))
    with pytest.raises(ValueError, match=r"Received: x\.shape=\(2, 28, 28, 3\)"):
        clf.run(np.zeros((2, 28, 28, 3), "float32"))
    with pytest.raises(ValueError, match=r"Received: x\.shape=\(32, 32, 3\)"):
        clf.run(np.zeros((32, 32, 3), "float32"))
    with pytest.raises(ValueError, match=r"Received: images\.dtype=float32"):
        clf.predict(good)
    with pytest.raises(ValueError, match=r"Received: images\.shape=\(2, 32, 32\)"):
        clf.predict(np.zeros((2, 32, 32), "uint8"))
    with pytest.raises(ValueError, match="Received: onnx="):
        OnnxClassifier(exports["plain"] / "missing.onnx")
    probs = clf.predict(np.zeros((3, 32, 32, 3), "uint8"))
    np.testing.assert_allclose(probs.sum(1), 1.0, rtol=1e-5)


def test_predict_cli(exports, tmp_path, capsys):
    rng = np.random.default_rng(0)
    small = tmp_path / "a.png"
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(small)
    large = tmp_path / "b.jpg"
    Image.fromarray(rng.integers(0, 256, (48, 40, 3), dtype=np.uint8)).save(large)
    model = str(exports["optimized"] / ONNX_FILE)
    assert cli_main(["predict", "--onnx", model, "--top", "2", str(small)]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith(f"{small}: ") and sum(n in line for n in zoo.CIFAR10_CLASSES) >= 2
    assert cli_main(["predict", "--onnx", model, str(large)]) == 2
    assert "Received: image=" in capsys.readouterr().err
    assert cli_main(["predict", "--onnx", model, "--resize", "--json", str(large)]) == 0
    row = json.loads(capsys.readouterr().out)
    assert row["image"] == str(large) and len(row["top"]) == 3


# ---------------------------------------------------------------- bad input

@pytest.mark.parametrize("kwargs, match", [
    ({"model": "newton_cgnet11"}, "Received: model='newton_cgnet11'"),
    ({"weights": "imagenet"}, "Received: weights='imagenet'"),
    ({"weights": "missing/file.weights.h5"}, "Received: weights='missing/file.weights.h5'"),
    ({"format": "tflite"}, "Received: format='tflite'"),
    ({"opset": 9}, "Received: opset=9"),
])
def test_export_bad_arguments(kwargs, match, tmp_path):
    args = {"model": "newton_cgnet10", "weights": "cifar10", "out": tmp_path / "out", **kwargs}
    with pytest.raises(ValueError, match=match):
        export_model(**args)


def test_export_refuses_existing_folder_unless_overwrite(weights_file, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(ValueError, match=f"Received: out='{out}'"):
        export_model("newton_cgnet10", str(weights_file), out, preprocessing=PREP)
    code = cli_main(["export", "--model", "newton_cgnet10", "--weights", str(weights_file),
                     "--out", str(out), "--format", "onnx"])
    assert code == 2 and f"Received: out='{out}'" in capsys.readouterr().err
    # --overwrite is exercised by the `exports` fixture.


def test_export_needs_preprocessing_for_unknown_weights(weights_file, tmp_path):
    with pytest.raises(ValueError, match="Received: weights="):
        export_model("newton_cgnet10", str(weights_file), tmp_path / "out", format="onnx")
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- every zoo entry

def _export_cases():
    """(key, optimize) for every zoo entry; the unoptimized export of the entries over 1M
    parameters is heavy (NCG-82: 142 s): `test_demo_command` exports each entry that way
    to ONNX with a parity check, and the smaller entries cover the SavedModel code."""
    cases = []
    for key in zoo.available() or [None]:
        big = key is not None and zoo.REGISTRY[key]["num_params"] > 1_000_000
        cases += [pytest.param(key, False, marks=[pytest.mark.heavy] if big else []),
                  pytest.param(key, True)]
    return cases


@pytest.mark.slow
@pytest.mark.parametrize("key,optimize", _export_cases())
def test_every_zoo_entry_exports_and_reloads(key, optimize, tmp_path, calibration):
    """Each registry entry (or, with an empty registry, temp weights) to both formats,
    as the model and as `optimize_for_inference` of it."""
    import onnxruntime as ort
    import tensorflow as tf

    if key is None:  # a temp .weights.h5 with preprocessing.json next to it
        arch = "resnet20"
        model = randomize(get_model(arch, classifier_activation=None), calibration, seed=7)
        weights = str(tmp_path / "resnet20.weights.h5")
        model.save_weights(weights)
        (tmp_path / "preprocessing.json").write_text(json.dumps(PREP))
    else:
        arch, weights = key.split(".", 1)
    out = tmp_path / "export"
    cards = export_model(arch, weights, out, format="both", optimize=optimize)
    loaded = tf.saved_model.load(str(out / SAVEDMODEL_DIR))
    images = np.random.default_rng(0).integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    logits = loaded.signatures["serving_default"](images=tf.constant(images))["logits"]
    assert logits.shape == (5, cards["onnx"]["outputs"][0]["shape"][1])
    session = ort.InferenceSession(str(out / ONNX_FILE), providers=["CPUExecutionProvider"])
    (inp,) = session.get_inputs()
    x = np.random.default_rng(1).normal(size=(3, *inp.shape[1:])).astype("float32")
    assert session.run(None, {inp.name: x})[0].shape[0] == 3
    for card in cards.values():
        assert all(check["passed"] for check in card["parity"].values())
        if key is None:
            assert card["preprocessing"]["source"].endswith("preprocessing.json")
        else:
            assert card["weights"]["sha256"] == zoo.get_entry(arch, weights)["sha256"]


# ---------------------------------------------------------------- int8

def test_split_identity_taps_is_exact():
    """A stride-1 Conv dominated by its diagonal centre taps becomes Conv(W - D) + depthwise
    Conv(d); the same function to float rounding. A strided or ordinary Conv stays."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from keras_newton.export.onnx_passes import split_identity_taps

    rng = np.random.default_rng(0)
    identity = 0.05 * rng.normal(size=(6, 6, 3, 3))
    identity[np.arange(6), np.arange(6), 1, 1] += rng.uniform(-5.5, -4.5, 6)  # -alpha (I + ...)
    consts = {"w_id": identity, "b": rng.normal(size=6), "w": rng.normal(size=(6, 6, 3, 3))}
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w_id", "b"], ["y"], name="id", pads=[1, 1, 1, 1]),
         helper.make_node("Conv", ["x", "w_id"], ["s"], name="strided", pads=[1, 1, 1, 1],
                          strides=[2, 2]),
         helper.make_node("Conv", ["x", "w"], ["z"], name="plain", pads=[1, 1, 1, 1])],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 6, 8, 8])],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["n", 6, size, size])
         for n, size in (("y", 8), ("s", 4), ("z", 8))],
        [numpy_helper.from_array(np.asarray(v, np.float32), k) for k, v in consts.items()])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    before = proto.SerializeToString()
    after, rewritten = split_identity_taps(proto)
    onnx.checker.check_model(after)
    assert [r["node"] for r in rewritten] == ["id"] and rewritten[0]["ratio"] > 10
    assert [n.op_type for n in after.graph.node] == ["Conv", "Conv", "Add", "Conv", "Conv"]
    x = rng.normal(size=(2, 6, 8, 8)).astype(np.float32)
    old, new = (ort.InferenceSession(m, providers=["CPUExecutionProvider"]).run(None, {"x": x})
                for m in (before, after.SerializeToString()))
    np.testing.assert_allclose(new[0], old[0], atol=1e-5)
    np.testing.assert_array_equal(new[1], old[1])
    np.testing.assert_array_equal(new[2], old[2])


def test_quantize_bad_arguments(tmp_path):
    args = {"model": "newton_cgnet10", "weights": "cifar10", "out": tmp_path / "out"}
    with pytest.raises(ValueError, match="Received: quantize='int4'"):
        export_model(**args, quantize="int4")
    with pytest.raises(ValueError, match="Received: format='savedmodel', quantize='int8'"):
        export_model(**args, format="savedmodel", quantize="int8")
    with pytest.raises(ValueError, match="Received: data="):
        export_model(**args, format="onnx", quantize="int8", calibration_data=tmp_path / "no")
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_int8_export_of_trained_weights(tmp_path, cifar):
    """The zoo's trained Newton-CGNet-10, quantized: calibrated on training images, within
    0.5 points of fp32 top-1 (the export's own check) and agreeing on >= 97.5% of the 5,000
    held-out images, and runs in OnnxClassifier.

    97.5%, not issue 27's 99% on 500 images: 8-bit activations set the limit (98.64% for the
    120-epoch weights, 98.00% for the label-smoothed 200-epoch weights, whose logits are
    closer; calibration settings within 0.3: `keras_newton.export.quantize`'s docstring);
    saturating 8-bit weights or unsplit identity taps fall far below."""
    out = tmp_path / "int8"
    cards = export_model("newton_cgnet10", "cifar10", out, format="onnx", quantize="int8",
                         calibration_data=CIFAR_ARCHIVE)
    assert sorted(p.name for p in out.iterdir()) == [
        "model.int8.onnx", "model.int8.onnx.json", "model.onnx", "model.onnx.json"]
    card = json.loads((out / "model.int8.onnx.json").read_text())
    assert card == json.loads(json.dumps(cards["onnx_int8"]))
    assert cards["onnx"]["optimized"] and card["optimized"]  # --quantize implies --optimize
    quant, acc = card["quantization"], card["accuracy"]
    assert (quant["format"], quant["activation_type"], quant["weight_type"]) == (
        "QDQ", "QUInt8", "QInt8")
    assert quant["per_channel"] and quant["reduce_range"] and quant["excluded_nodes"] == []
    assert quant["calibration"]["images"] == 512  # the default
    assert quant["calibration"]["source"] == CIFAR_ARCHIVE.name
    assert len(quant["identity_taps_split"]) == 2  # stage 1 and stage 3's second CG Block
    assert {"QuantizeLinear", "DequantizeLinear"} <= set(card["op_types"])
    assert acc["n"] == 5000 and acc["fp32_top1"] > 0.8
    assert acc["drop_points"] == round(100 * (acc["fp32_top1"] - acc["int8_top1"]), 4)
    assert acc["passed"] and acc["max_drop_points"] == 0.5
    print(f"int8: top-1 {acc['int8_top1']:.4f} vs fp32 {acc['fp32_top1']:.4f}, agreement "
          f"{acc['top1_agreement']:.4f} on {acc['n']} validation images")
    assert acc["top1_agreement"] >= 0.975
    assert card["preprocessing"] == cards["onnx"]["preprocessing"]
    fp32, int8 = OnnxClassifier(out / "model.onnx"), OnnxClassifier(out / "model.int8.onnx")
    assert int8.run(int8.preprocess(cifar[:3])).dtype == np.float32
    top = [np.asarray([row[0][0] for row in clf.classify(cifar[::4])]) for clf in (fp32, int8)]
    assert (top[0] == top[1]).mean() >= 0.97


@pytest.mark.slow
def test_calibration_never_sees_the_validation_images(cifar):
    from keras_newton.data import holdout_split, load_dataset
    from keras_newton.export.quantize import holdout_data

    data = holdout_data(CIFAR_ARCHIVE, calibration_size=300, validation_limit=200)
    labels = load_dataset("cifar10", CIFAR_ARCHIVE, "train").labels
    train_idx, val_idx = holdout_split(labels, 5000, 0)  # training's split (trainer.py)
    assert set(data.calibration_indices) <= set(train_idx)
    assert set(data.validation_indices) <= set(val_idx) and len(data.validation_indices) == 200
    assert np.bincount(labels[data.calibration_indices]).tolist() == [30] * 10
    assert len(data.calibration) == 300 and data.images.shape == (200, 32, 32, 3)
