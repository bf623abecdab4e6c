"""ImageNet models (Section 4.1.5, Table 5) and the ImageNet input pipeline."""

import json

import keras
import numpy as np
import pytest
from helpers import run_python
from PIL import Image

from keras_newton.data import load_dataset
from keras_newton.data.imagenet import IMAGENET_MEAN, IMAGENET_STD, imagenet_dataset
from keras_newton.layers import NewtonCGBlock
from keras_newton.models import NewtonCGNet34, ResNet34, get_model

# torchvision.models.resnet34().parameters() (1x1 projection shortcuts, no conv bias).
TORCHVISION_RESNET34 = 21_797_672


def trainable(layers):
    return sum(int(np.prod(w.shape)) for layer in layers for w in layer.trainable_weights)


def stage3(model):
    return [layer for layer in model.layers if layer.name.startswith("stage3")]


@pytest.fixture(scope="module")
def models():
    return NewtonCGNet34(), ResNet34()


def test_parameter_counts_match_table5(models):
    ncg, res = models
    assert trainable(res.layers) == TORCHVISION_RESNET34
    assert abs(ncg.count_params() / 21.7e6 - 1) < 0.02
    assert abs(res.count_params() / 21.8e6 - 1) < 0.02
    # Stage 3 by hand. ResNet: 3x3 128->256, 3x3 256->256, 1x1 128->256 projection,
    # five blocks of two 3x3 256->256; 13 BNs of 256 (gamma, beta).
    res_stage = 9 * 128 * 256 + 9 * 256 * 256 + 128 * 256 + 5 * 2 * 9 * 256 * 256 + 13 * 512
    # Newton-CG: W1, W2 3x3 -> 64, W3 3x3 -> 256, W4 3x3 256 -> 128 in each of 6 CG Blocks
    # (the first reads 128 channels), three 1x1 128->256 projections, BN over
    # 64+64+256+128 channels per CG Block and 3x256 for the projections, 6 alpha, 5 beta.
    ncg_stage = (9 * 128 * (64 + 64 + 256) + 9 * 256 * 128 + 5 * 9 * 256 * 512 + 3 * 128 * 256
                 + 6 * 2 * 512 + 3 * 512 + 6 + 5)
    assert trainable(stage3(res)) == res_stage
    assert trainable(stage3(ncg)) == ncg_stage
    assert trainable(res.layers) - trainable(ncg.layers) == res_stage - ncg_stage


def test_newton_stage_structure(models):
    ncg, _ = models
    (block,) = stage3(ncg)
    assert isinstance(block, NewtonCGBlock) and block.num_cg_blocks == 6
    cg = block.cg_blocks[1]
    assert [c.filters for c in (cg.conv1, cg.conv2, cg.conv3, cg.conv4)] == [64, 64, 256, 128]
    assert block.dropout_rate == 0.2 and block.strides == 2
    names = [layer.name for layer in ncg.layers]
    assert "stage2_block4_out" in names and "stage4_block3_out" in names
    assert not any(n.startswith("stage3_block") for n in names)


@pytest.mark.jax_heavy
@pytest.mark.backend_agnostic
@pytest.mark.parametrize("builder", [NewtonCGNet34, ResNet34])
def test_forward_at_224(builder, rng):
    model = builder()
    assert model.input_shape == (None, 224, 224, 3) and model.output_shape == (None, 1000)
    x = rng.normal(size=(2, 224, 224, 3)).astype("float32")
    probs = keras.ops.convert_to_numpy(model(x, training=False))
    assert probs.shape == (2, 1000) and np.all(np.isfinite(probs))
    np.testing.assert_allclose(probs.sum(1), 1.0, rtol=1e-5)
    assert builder(include_top=False, pooling="avg").output_shape == (None, 512)
    assert builder(include_top=False, input_shape=(64, 64, 3)).output_shape == (None, 2, 2, 512)


@pytest.mark.slow
@pytest.mark.heavy
@pytest.mark.backend_agnostic
def test_keras_file_round_trip_in_fresh_process(tmp_path, rng):
    model = get_model("newton_cgnet_34", input_shape=(64, 64, 3), classes=10,
                      classifier_activation=None)
    for w in model.weights:  # non-trivial BN statistics and scalars
        if w.path.endswith(("moving_mean", "alpha", "beta")) and "stage3" in w.path:
            w.assign(np.asarray(rng.uniform(0.2, 0.9, w.shape), "float32"))
    x = rng.normal(size=(2, 64, 64, 3)).astype("float32")
    path, inp = tmp_path / "m.keras", tmp_path / "x.npy"
    model.save(path)
    np.save(inp, x)
    run_python(
        "import sys, numpy as np, keras, keras_newton\n"
        "m = keras.saving.load_model(sys.argv[1])\n"
        "np.save(sys.argv[3], keras.ops.convert_to_numpy(m(np.load(sys.argv[2]))))\n",
        path, inp, tmp_path / "y.npy",
    )
    want = keras.ops.convert_to_numpy(model(x))
    np.testing.assert_allclose(np.load(tmp_path / "y.npy"), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("call,match", [
    (lambda: NewtonCGNet34(input_shape=(31, 31, 3)), "at least 32x32"),
    (lambda: NewtonCGNet34(dropout_rate=1.0), "dropout_rate="),
    (lambda: ResNet34(pooling="min", include_top=False), "pooling="),
    (lambda: NewtonCGNet34(weights="imagenet"), "weights="),
])
def test_bad_arguments(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# ---------------------------------------------------------------- input pipeline

@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """data/{train,val}/{cat,dog}/*.png; val images are 256x320 (no resize needed)."""
    root = tmp_path_factory.mktemp("imagenet")
    rng = np.random.default_rng(0)
    pixels = {}
    for split, n, shape in (("train", 5, (300, 200)), ("val", 2, (256, 320))):
        for name in ("cat", "dog"):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(n):
                image = rng.integers(0, 256, (*shape, 3), dtype=np.uint8)
                Image.fromarray(image).save(folder / f"{i}.png")
                pixels[(split, name, i)] = image
    return root, pixels


def test_eval_view_is_the_central_crop(image_folder):
    root, pixels = image_folder
    ds, count, class_names = imagenet_dataset("val", str(root), batch_size=3)
    assert (count, class_names) == (4, ["cat", "dog"])
    images, labels = zip(*[(x.numpy(), y.numpy()) for x, y in ds], strict=True)
    assert [len(y) for y in labels] == [3, 1]  # evaluation keeps the last small batch
    images, labels = np.concatenate(images), np.concatenate(labels)
    np.testing.assert_array_equal(labels, [0, 0, 1, 1])
    # 256x320: the shorter side is already 256; the crop is rows 16:240, columns 48:272.
    want = pixels[("val", "dog", 1)][16:240, 48:272].astype("float64")
    want = (want - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
    np.testing.assert_allclose(images[3], want, atol=1e-3)


def test_train_view_shapes_shuffle_and_limit(image_folder):
    root, _ = image_folder
    ds, count, _ = imagenet_dataset("train", str(root), batch_size=4, seed=1)
    batches = [(x.numpy(), y.numpy()) for x, y in ds]
    assert count == 10 and len(batches) == 2  # drop_remainder: 10 // 4
    assert batches[0][0].shape == (4, 224, 224, 3) and batches[0][0].dtype == np.float32
    # Normalised uint8 pixels stay inside the normalised [0, 255] range.
    lo = (0 - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
    hi = (255 - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
    x = batches[0][0]
    assert np.all(x >= lo - 1e-3) and np.all(x <= hi + 1e-3) and x.std() > 0.3
    _, count, _ = imagenet_dataset("train", str(root), batch_size=2, limit=4)
    assert count == 4


def test_pipeline_bad_input(image_folder, tmp_path):
    root, _ = image_folder
    with pytest.raises(ValueError, match="split="):
        imagenet_dataset("test", str(root))
    with pytest.raises(ValueError, match="batch_size="):
        imagenet_dataset("val", str(root), batch_size=0)
    with pytest.raises(ValueError, match="no split 'train'"):
        imagenet_dataset("train", str(tmp_path))
    with pytest.raises(ValueError, match="stream it"):
        load_dataset("imagenet")


@pytest.mark.slow  # ~60 s: a 21.7M-parameter model at 224x224 on CPU
@pytest.mark.heavy
def test_train_end_to_end(image_folder, tmp_path):
    """keras-newton train --dataset imagenet on a tiny folder: the recipe and the stream."""
    from keras_newton.training import train

    root, _ = image_folder
    summary = train(model="newton_cgnet34", dataset="imagenet", data=str(root),
                    out=tmp_path / "run", epochs=1, batch_size=4, verbose=0)
    assert summary["recipe"]["recipe"] == "ImageNet"
    assert summary["recipe"]["lr_milestones"] == [0.3, 0.6, 0.9]
    assert summary["recipe"]["augment"] is True and summary["recipe"]["dropout"] == 0.2
    assert (summary["train_images"], summary["val_images"]) == (10, 4)
    assert summary["steps_per_epoch"] == 2 and summary["test_accuracy"] is None
    prep = json.loads((tmp_path / "run" / "preprocessing.json").read_text())
    assert prep["mean"] == list(IMAGENET_MEAN) and prep["class_names"] == ["cat", "dog"]
    model = keras.saving.load_model(tmp_path / "run" / "model.keras")
    assert model.output_shape == (None, 2)
