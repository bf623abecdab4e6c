"""Text models (Section 4.2): KMaxPooling, temporal Newton-CG Blocks, builders, tokenizer,
data, recipe and the text trainer, against independent references."""

import json
import os
from pathlib import Path

import keras
import numpy as np
import pytest
from helpers import arr, reference_params, run_python
from reference import newton_cg_block

from keras_newton.data.text import (
    ALPHABET,
    UNKNOWN_ID,
    VOCAB_SIZE,
    load_text_csv,
    load_text_dataset,
    stratified_split,
)
from keras_newton.layers import KMaxPooling, NewtonCGBlock
from keras_newton.models.text import (
    TEXT_MODELS,
    TEXT_PAPER_PARAMS,
    VDCNN17,
    newton_cgnet_text,
    vdcnn,
)

REPO = Path(__file__).resolve().parents[1]
AG_NEWS = (Path(os.environ.get("KERAS_NEWTON_DATA", REPO.parent / "shared" / "datasets"))
           / "ag_news" / "test.csv")
needs_tf = pytest.mark.skipif(keras.backend.backend() != "tensorflow",
                              reason="TensorFlow-only (SavedModel / eager tf.string)")
agnostic = pytest.mark.backend_agnostic


def kmax_reference(x, k):
    """NumPy: per (example, channel), the k largest over time (ties: earlier first), in
    time order. ``x`` is (batch, steps, channels)."""
    out = np.empty((x.shape[0], k, x.shape[2]), x.dtype)
    for b in range(x.shape[0]):
        for c in range(x.shape[2]):
            col = x[b, :, c]
            keep = sorted(sorted(range(len(col)), key=lambda t: (-col[t], t))[:k])
            out[b, :, c] = col[keep]
    return out


# --------------------------------------------------------------------------- KMaxPooling
@agnostic
@pytest.mark.parametrize("k,steps", [(1, 5), (3, 7), (8, 8), (8, 33)])
def test_kmax_pooling_matches_numpy(k, steps, rng):
    x = rng.normal(size=(3, steps, 5)).astype("float32")
    np.testing.assert_array_equal(arr(KMaxPooling(k)(x)), kmax_reference(x, k))
    channels_first = KMaxPooling(k, data_format="channels_first")(np.swapaxes(x, 1, 2))
    np.testing.assert_array_equal(arr(channels_first), np.swapaxes(kmax_reference(x, k), 1, 2))


@agnostic
def test_kmax_pooling_hand_example_and_gradient():
    x = np.array([[[1.0, 0.0], [5.0, 3.0], [2.0, 2.0], [4.0, 1.0]]], "float32")
    np.testing.assert_array_equal(arr(KMaxPooling(2)(x))[0], [[5.0, 3.0], [4.0, 2.0]])
    # In a model, the gradient reaches exactly the selected steps (like max pooling).
    inputs = keras.Input((4, 2))
    model = keras.Model(inputs, keras.layers.Flatten()(KMaxPooling(2)(inputs)))
    model.compile(keras.optimizers.SGD(1.0), "mse")
    w = keras.Variable(x)
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        with tf.GradientTape() as tape:
            loss = keras.ops.sum(model(w))
        grad = arr(tape.gradient(loss, w.value))
    elif keras.backend.backend() == "jax":
        import jax

        grad = arr(jax.grad(lambda v: keras.ops.sum(model(v)))(x))
    else:
        pytest.skip("gradient check written for TensorFlow and JAX")
    np.testing.assert_array_equal(grad[0], [[0, 0], [1, 1], [0, 1], [1, 0]])


@agnostic
def test_kmax_pooling_contract():
    layer = KMaxPooling(4, name="kmax")
    assert layer.compute_output_shape((None, 10, 6)) == (None, 4, 6)
    clone = KMaxPooling.from_config(layer.get_config())
    assert clone.get_config() == layer.get_config()
    assert keras.saving.get_registered_name(KMaxPooling) == "keras_newton>KMaxPooling"
    with pytest.raises(ValueError, match="k=0"):
        KMaxPooling(0)
    with pytest.raises(ValueError, match="k=2.5"):
        KMaxPooling(2.5)
    with pytest.raises(ValueError, match="at least k=8 time steps"):
        KMaxPooling(8).build((None, 7, 4))
    with pytest.raises(ValueError, match="rank-3"):
        KMaxPooling(2).build((None, 7))
    with pytest.raises(ValueError, match="data_format="):
        KMaxPooling(2, data_format="NWC")


# ------------------------------------------------------------- temporal Newton-CG Block

@agnostic
@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("in_channels,filters,strides", [(6, 6, 1), (4, 8, 2)])
def test_temporal_newton_cg_block_matches_numpy_algorithm2(in_channels, filters, strides,
                                                           fused, rng):
    """rank=1 = Algorithm 2 on a (batch, 1, steps, channels) image with 1x3 kernels."""
    block = NewtonCGBlock(2, filters, strides=strides, dropout_rate=0.2, fused=fused, rank=1)
    x = rng.normal(size=(2, 11, in_channels)).astype("float32")
    block.build(x.shape)
    for w in block.weights:
        low, high = (0.5, 2.0) if w.path.endswith("moving_variance") else (-0.6, 0.6)
        w.assign(rng.uniform(low, high, w.shape).astype("float32"))
    assert block.cg_blocks[0].conv1.kernel.shape == (3, in_channels, filters)
    got = arr(block(x, training=False))
    blocks, proj = reference_params(block, lambda k: k[None])  # (k, cin, cout) -> 1 x k
    want = newton_cg_block(x[:, None].astype("float64"), blocks, proj, strides)[:, 0]
    assert got.shape == (2, -(-11 // strides), filters)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@agnostic
def test_rank_argument_contract():
    layer = NewtonCGBlock(1, 8, rank=1)
    assert layer.get_config()["rank"] == 1
    assert NewtonCGBlock.from_config(layer.get_config()).get_config() == layer.get_config()
    assert NewtonCGBlock(1, 8).get_config()["rank"] == 2
    with pytest.raises(ValueError, match="rank=3"):
        NewtonCGBlock(1, 8, rank=3)
    with pytest.raises(ValueError, match="rank-3 input"):
        NewtonCGBlock(1, 8, rank=1).build((None, 8, 8, 4))


# ---------------------------------------------------------------------------- builders
@agnostic
def test_parameter_counts_and_paper_discrepancy():
    model = newton_cgnet_text()
    n = model.count_params()
    # The classifier alone, from k=8, 512 maps, 2048 hidden units, 4 classes:
    head = (8 * 512 * 2048 + 2048) + (2048 * 2048 + 2048) + (2048 * 4 + 4)
    assert sum(model.get_layer(f).count_params() for f in ("fc1", "fc2", "predictions")) == head
    assert head > TEXT_PAPER_PARAMS["newton_cgnet_text"] * 1e6  # 12.6M > the paper's 8.2M
    assert n == 15_771_528  # the count the docs state
    assert newton_cgnet_text(hidden_units=1024).count_params() == 8_425_352
    # 1024 hidden units reproduce the paper's VDCNN counts (9.1M, 9.5M with shortcuts).
    assert round(VDCNN17(shortcut=True, hidden_units=1024).count_params() / 1e6, 1) == 9.1
    assert round(vdcnn(29, shortcut=True, hidden_units=1024).count_params() / 1e6, 1) == 9.5
    # Depth 12 = 9 convolutions on the longest path (stem + 2 per CG Block) + 3 FC.
    blocks = [layer for layer in model.layers if isinstance(layer, NewtonCGBlock)]
    assert [b.filters for b in blocks] == [64, 128, 256, 512]
    assert all(b.num_cg_blocks == 1 and b.rank == 1 for b in blocks)
    assert 1 + 2 * len(blocks) + 3 == 12


@agnostic
def test_forward_pass_on_1024_characters(rng):
    model = newton_cgnet_text()
    ids = rng.integers(0, VOCAB_SIZE, (2, 1024)).astype("int32")
    ids[1] = 0  # an empty text: all padding
    probs = arr(model(ids, training=False))
    assert model.input_shape == (None, 1024) and probs.shape == (2, 4)
    assert np.all(np.isfinite(probs))
    np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-5)


@agnostic
def test_vdcnn_variants_and_heads():
    plain, res = vdcnn(9, sequence_length=64, hidden_units=8), vdcnn(9, True, sequence_length=64,
                                                                     hidden_units=8)
    assert plain.name == "vdcnn9" and res.name == "vdcnn9_shortcut"
    assert not any(isinstance(la, keras.layers.Add) for la in plain.layers)
    assert sum(isinstance(la, keras.layers.Add) for la in res.layers) == 4
    assert len([la for la in TEXT_MODELS["vdcnn29"](sequence_length=64).layers
                if isinstance(la, keras.layers.Conv1D)]) == 29
    kw = {"include_top": False, "sequence_length": 64}
    assert newton_cgnet_text(**kw).output_shape == (None, 8, 512)
    assert newton_cgnet_text(pooling="kmax", **kw).output_shape == (None, 8 * 512)
    assert newton_cgnet_text(pooling="avg", **kw).output_shape == (None, 512)
    assert set(TEXT_MODELS) == set(TEXT_PAPER_PARAMS)


@agnostic
@pytest.mark.parametrize("kwargs,match", [
    ({"sequence_length": 56}, "at least 57"),
    ({"sequence_length": 96, "k": 13}, "at least 97"),
    ({"sequence_length": 0}, "sequence_length=0"),
    ({"num_cg_blocks": (1, 1, 1)}, "num_cg_blocks="),
    ({"hidden_units": 0}, "hidden_units=0"),
    ({"pooling": "mean"}, "pooling="),
    ({"weights": "imagenet"}, "weights="),
    ({"dropout_rate": 1.0}, "dropout_rate="),
])
def test_bad_builder_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        newton_cgnet_text(**kwargs)


@agnostic
def test_short_sequences_without_top_are_allowed():
    model = newton_cgnet_text(include_top=False, sequence_length=16)
    assert model.output_shape == (None, 2, 512)
    with pytest.raises(ValueError, match="depth="):
        vdcnn(10)


@pytest.mark.jax_heavy
@agnostic
def test_keras_file_round_trip_in_fresh_process(tmp_path, rng):
    model = newton_cgnet_text(sequence_length=64, hidden_units=16, dropout_rate=0.1)
    for w in model.weights:
        if w.path.endswith("moving_variance"):
            w.assign(rng.uniform(0.5, 2.0, w.shape).astype("float32"))
        elif w.path.endswith("moving_mean"):
            w.assign(rng.normal(0, 0.1, w.shape).astype("float32"))
    ids = rng.integers(0, VOCAB_SIZE, (3, 64)).astype("int32")
    path, inp = tmp_path / "m.keras", tmp_path / "x.npy"
    model.save(path)
    np.save(inp, ids)
    out = run_python(
        "import sys, numpy as np, keras, keras_newton\n"
        "m = keras.saving.load_model(sys.argv[1])\n"
        "np.save(sys.argv[3], keras.ops.convert_to_numpy(m(np.load(sys.argv[2]))))\n"
        "print(m.get_layer('kmax_pool').__class__.__name__, m.get_layer('stage4').rank)",
        path, inp, tmp_path / "y.npy",
    )
    assert out.split() == ["KMaxPooling", "1"]
    np.testing.assert_allclose(np.load(tmp_path / "y.npy"), arr(model(ids)), rtol=1e-5,
                               atol=1e-6)


# --------------------------------------------------------------------------- tokenizer
def _tokenize(texts, length):
    from keras_newton.data.text import CharTokenizer

    return np.asarray(keras.ops.convert_to_numpy(CharTokenizer(sequence_length=length)(texts)))


@agnostic
def test_alphabet():
    assert len(ALPHABET) == 70 and len(set(ALPHABET)) == 70
    assert VOCAB_SIZE == 72 and UNKNOWN_ID == 71


@agnostic
def test_tokenizer_hand_checked_string():
    # Ids worked out by hand: a..z = 1..26, 0..9 = 27..36, then - , ; . ! ? : ' " / \ | _
    # @ # $ % ^ & * ~ ` + = < > ( ) [ ] { } = 37..68, space 69, newline 70, other 71.
    text = "Ça va? Ｎo.1 “ﬁne” ß!\n".encode() + b"\xff" + "Σ(x)".encode()
    want = [71, 1, 69, 22, 1, 42, 69,  # Ç->ç unknown, "a va?"
            14, 15, 40, 28, 69,  # full-width Ｎ -> n (NFKC), "o.1 "
            71, 6, 9, 14, 5, 71, 69,  # curly quotes unknown, ligature ﬁ -> "fi", "ne"
            19, 19, 41, 70,  # ß -> "ss" (case folding), "!", newline
            71,  # the invalid byte -> U+FFFD -> unknown
            71, 63, 24, 64]  # Σ -> σ unknown, "(x)"
    ids = _tokenize([text], 40)
    assert ids.dtype == np.int32 and ids.shape == (1, 40)
    assert ids[0].tolist() == want + [0] * (40 - len(want))


@agnostic
def test_tokenizer_empty_overlong_and_shapes():
    long_text = "ab" * 700  # 1,400 characters: cut after 1,024
    ids = _tokenize(["", long_text, "Z"], 1024)
    assert ids.shape == (3, 1024)
    assert not ids[0].any()
    assert ids[1].tolist() == [1, 2] * 512
    assert ids[2].tolist() == [26] + [0] * 1023
    assert _tokenize([["a", "b"], ["c", ""]], 4).tolist() == [[[1, 0, 0, 0], [2, 0, 0, 0]],
                                                              [[3, 0, 0, 0], [0, 0, 0, 0]]]


@agnostic
def test_tokenizer_in_tf_data_and_config():
    import tensorflow as tf

    from keras_newton.data.text import CharTokenizer

    tokenizer = CharTokenizer(sequence_length=8)
    ds = tf.data.Dataset.from_tensor_slices((["Hi!", "ok"], [0, 1])).batch(2)
    ids, labels = next(iter(ds.map(lambda t, y: (tokenizer(t), y))))
    assert ids.numpy().tolist() == [[8, 9, 41, 0, 0, 0, 0, 0], [15, 11, 0, 0, 0, 0, 0, 0]]
    clone = CharTokenizer.from_config(tokenizer.get_config())
    assert clone.get_config()["sequence_length"] == 8
    with pytest.raises(ValueError, match="sequence_length=0"):
        CharTokenizer(sequence_length=0)
    with pytest.raises(ValueError, match="normalization_form="):
        CharTokenizer(normalization_form="NFX")


@needs_tf
def test_savedmodel_signature_takes_raw_strings(tmp_path, rng):
    from keras_newton.data.text import CharTokenizer
    from keras_newton.export import export_text_savedmodel

    model = newton_cgnet_text(sequence_length=64, hidden_units=16)
    texts = ["Wall St. Bears Claw Back Into the Black (Reuters)", "", "caf\u00e9 \u00fcber"]
    want = arr(model(CharTokenizer(64)(texts), training=False))
    export_text_savedmodel(model, tmp_path / "sm")
    (tmp_path / "texts.json").write_text(json.dumps(texts))
    run_python(
        "import sys, json, numpy as np, tensorflow as tf, tensorflow_text\n"
        "sm = tf.saved_model.load(sys.argv[1])\n"
        "texts = json.load(open(sys.argv[2]))\n"
        "np.save(sys.argv[3], sm.serve(tf.constant(texts)).numpy())\n",
        tmp_path / "sm", tmp_path / "texts.json", tmp_path / "y.npy",
    )
    np.testing.assert_allclose(np.load(tmp_path / "y.npy"), want, rtol=1e-5, atol=1e-6)


# -------------------------------------------------------------------------------- data
@agnostic
def test_stratified_split():
    labels = np.repeat([0, 1, 2], [50, 30, 20])
    train, val = stratified_split(labels, 10, seed=3)
    assert len(val) == 10 and len(train) == 90 and not set(train) & set(val)
    assert np.bincount(labels[val]).tolist() == [5, 3, 2]
    again = stratified_split(labels, 10, seed=3)
    assert np.array_equal(again[1], val)
    assert not np.array_equal(stratified_split(labels, 10, seed=4)[1], val)
    with pytest.raises(ValueError, match="val_size=100"):
        stratified_split(labels, 100)


@agnostic
def test_load_text_csv(tmp_path):
    path = tmp_path / "a.csv"
    path.write_bytes(b'label,title,description\n3,"Title, one",Body\n1,t2,"multi\nline"\n'
                     b'3,bad \xff byte,x\n')
    data = load_text_csv(path)
    assert data.texts.tolist() == ["Title, one Body", "t2 multi\nline", "bad \ufffd byte x"]
    assert data.labels.tolist() == [1, 0, 1] and data.class_names == ["1", "3"]
    path.write_text('"2","no header"\n"1","x"\n')
    assert load_text_csv(path).labels.tolist() == [1, 0]
    path.write_text("label,text\nfour,oops\n")
    with pytest.raises(ValueError, match="integer label"):
        load_text_csv(path)
    with pytest.raises(ValueError, match="existing CSV"):
        load_text_csv(tmp_path / "missing.csv")
    with pytest.raises(ValueError, match="not in tensorflow-datasets"):
        load_text_dataset("dbpedia")


@agnostic
@pytest.mark.skipif(not AG_NEWS.exists(), reason=f"AG News CSV not found at {AG_NEWS} "
                                                 "(set KERAS_NEWTON_DATA)")
def test_ag_news_csv_split():
    data = load_text_dataset("ag_news", AG_NEWS)
    assert len(data) == 7600 and data.class_names == ["World", "Sports", "Business", "Sci/Tech"]
    assert np.bincount(data.labels).tolist() == [1900] * 4
    train, val = stratified_split(data.labels, 1600, seed=0)
    assert len(train) == 6000 and np.bincount(data.labels[val]).tolist() == [400] * 4


# ----------------------------------------------------------------------- recipe, trainer
@agnostic
def test_text_recipe():
    from keras_newton.training.recipes import get_recipe

    recipe = get_recipe("ag_news")
    assert recipe["recipe"] == "TEXT"
    assert (recipe["lr"], recipe["momentum"], recipe["nesterov"], recipe["batch_size"],
            recipe["weight_decay"], recipe["epochs"], recipe["lr_milestones"],
            recipe["lr_factor"], recipe["dropout"]) == (0.1, 0.9, True, 128, 5e-5, 100,
                                                        [0.5, 0.75], 0.1, 0.1)


@needs_tf
@pytest.mark.slow
def test_train_cli_on_a_small_csv(tmp_path, rng, capsys):
    from keras_newton.training.cli import main

    words = {0: "goal match team", 1: "stock bank market", 2: "chip cpu space"}
    labels = rng.integers(0, 3, 60)
    lines = ["label,title,description"] + [f"{y + 1},{words[y]},{words[y]} {i}"
                                           for i, y in enumerate(labels)]
    (tmp_path / "d.csv").write_text("\n".join(lines) + "\n")
    out = tmp_path / "run"
    argv = ["--model", "newton_cgnet_text", "--dataset", "text_csv", "--data",
            str(tmp_path / "d.csv"), "--epochs", "1", "--batch-size", "16", "--val-size", "12",
            "--sequence-length", "64", "--hidden-units", "16", "--lr", "0.01", "--out", str(out),
            "--verbose", "0"]
    assert main(argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["train_items"], summary["val_items"], summary["epochs"]) == (48, 12, 1)
    assert summary["sequence_length"] == 64 and summary["recipe"]["recipe"] == "TEXT"
    assert (out / "model.keras").exists() and (out / "history.csv").exists()
    assert main(argv) == 2  # a completed run is not trained again
    assert "completed run" in capsys.readouterr().err
    assert main(["--model", "newton_cgnet56", "--dataset", "cifar10",
                 "--sequence-length", "64"]) == 2
