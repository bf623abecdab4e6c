"""Datasets: offline folder/archive sources, the cache, the hold-out split, tf.data."""

import hashlib
import os
import socket
import sys
import tarfile
import time
import zipfile
from pathlib import Path

import keras
import numpy as np
import pytest
from PIL import Image

from keras_newton import data as kd
from keras_newton.data import image_folder

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("KERAS_NEWTON_DATA", REPO.parent / "shared" / "datasets"))
CIFAR_ARCHIVE = SHARED_DATA / "cifar10-jpeg" / "train.tar.xz"
CIFAR_SHA256 = "da41fa56b5d113f3661f7d567d5c0652bab701eef3a0fff0d6364184aa9c7847"


def make_image_tree(root, classes=("cat", "dog", "frog"), per_class=None, size=(32, 32),
                    fmt="png", seed=0):
    """Writes ``split/<class>/<i>.<fmt>`` random images; returns {path: uint8 array}."""
    per_class = per_class or {"train": 4}
    rng = np.random.default_rng(seed)
    written = {}
    for split, count in per_class.items():
        for name in classes:
            folder = Path(root) / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                array = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
                path = folder / f"{i:04d}.{fmt}"
                Image.fromarray(array).save(path)
                written[path.relative_to(root).as_posix()] = array
    return written


def make_tar(tree_root, path, mode="w:xz"):
    with tarfile.open(path, mode) as archive:
        for file in sorted(Path(tree_root).rglob("*")):
            archive.add(file, arcname=file.relative_to(tree_root).as_posix(), recursive=False)
    return path


@pytest.fixture
def cache(tmp_path, monkeypatch):
    home = tmp_path / "home"
    monkeypatch.setenv("KERAS_NEWTON_HOME", str(home))
    return home / "datasets"


@pytest.fixture
def offline(monkeypatch):
    """Fails any network connection and any import of tensorflow_datasets."""
    def refuse(*args, **kwargs):
        raise AssertionError("the offline path opened a network connection")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)


def test_folder_source_decodes_every_split_with_sorted_labels(tmp_path, cache, offline):
    written = make_image_tree(tmp_path / "src", per_class={"train": 3, "test": 2})
    splits, classes = kd.load_image_source(tmp_path / "src")
    assert classes == ["cat", "dog", "frog"]
    assert sorted(splits) == ["test", "train"]
    images, labels = splits["train"]
    assert images.dtype == np.uint8 and images.shape == (9, 32, 32, 3)
    assert labels.dtype == np.int32 and labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    np.testing.assert_array_equal(images[4], written["train/dog/0001.png"])  # PNG: lossless
    assert len(splits["test"][1]) == 6


@pytest.mark.parametrize("kind", ["tar.xz", "tar.gz", "zip"])
def test_archives_match_the_folder(tmp_path, cache, offline, kind):
    make_image_tree(tmp_path / "src", per_class={"train": 2})
    if kind == "zip":
        archive = tmp_path / "src.zip"
        with zipfile.ZipFile(archive, "w") as z:
            for file in sorted((tmp_path / "src").rglob("*.png")):
                # One shared top folder, as zipping a folder produces, is dropped.
                z.write(file, "mydata/" + file.relative_to(tmp_path / "src").as_posix())
    else:
        archive = make_tar(tmp_path / "src", tmp_path / f"src.{kind}", f"w:{kind[4:]}")
    folder_splits, _ = kd.decode_source(tmp_path / "src")
    splits, classes = kd.load_image_source(archive)
    assert classes == ["cat", "dog", "frog"]
    np.testing.assert_array_equal(splits["train"][0], folder_splits["train"][0])
    np.testing.assert_array_equal(splits["train"][1], folder_splits["train"][1])


def test_archive_is_decoded_once_then_served_from_cache(tmp_path, cache, offline, monkeypatch):
    make_image_tree(tmp_path / "src", classes=[f"c{i}" for i in range(10)],
                    per_class={"train": 30}, fmt="jpg")
    archive = make_tar(tmp_path / "src", tmp_path / "train.tar.xz")
    start = time.perf_counter()
    splits, _ = kd.load_image_source(archive)
    first = time.perf_counter() - start

    def untouchable(*args, **kwargs):
        raise AssertionError("the cached load read the archive's members")

    monkeypatch.setattr(image_folder, "_iter_members", untouchable)
    monkeypatch.setattr(tarfile, "open", untouchable)
    times = []
    for _ in range(3):
        start = time.perf_counter()
        cached, _ = kd.load_image_source(archive)
        times.append(time.perf_counter() - start)
    np.testing.assert_array_equal(cached["train"][0], splits["train"][0])
    assert first >= 10 * min(times), (first, times)
    assert len(list(cache.iterdir())) == 1


def test_modified_archive_is_detected(tmp_path, cache, offline):
    make_image_tree(tmp_path / "src", per_class={"train": 2})
    archive = make_tar(tmp_path / "src", tmp_path / "train.tar.xz")
    before, _ = kd.load_image_source(archive)
    new = np.full((32, 32, 3), 7, np.uint8)
    Image.fromarray(new).save(tmp_path / "src" / "train" / "cat" / "0000.png")
    make_tar(tmp_path / "src", archive)  # same name, new content
    after, _ = kd.load_image_source(archive)
    np.testing.assert_array_equal(after["train"][0][0], new)
    assert not np.array_equal(after["train"][0][0], before["train"][0][0])
    assert len(list(cache.iterdir())) == 2


def test_modified_folder_is_detected(tmp_path, cache, offline):
    make_image_tree(tmp_path / "src", per_class={"train": 2})
    kd.load_image_source(tmp_path / "src")
    extra = tmp_path / "src" / "train" / "dog" / "0009.png"
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(extra)
    splits, _ = kd.load_image_source(tmp_path / "src")
    assert len(splits["train"][1]) == 7


def test_load_dataset_offline_checks_classes_and_joins_splits(tmp_path, cache, offline):
    make_image_tree(tmp_path / "src", classes=kd.CIFAR10_CLASSES,
                    per_class={"train": 2, "extra": 1})
    train = kd.load_dataset("CIFAR-10", data=tmp_path / "src")
    assert len(train) == 20 and train.class_names == list(kd.CIFAR10_CLASSES)
    assert len(kd.load_dataset("cifar10", data=tmp_path / "src", split="train+extra")) == 30
    with pytest.raises(ValueError, match="no split 'test'"):
        kd.load_dataset("cifar10", data=tmp_path / "src", split="test")


def test_wrong_class_folders_for_a_named_dataset(tmp_path, cache, offline):
    make_image_tree(tmp_path / "src")
    with pytest.raises(ValueError, match="has 10 classes but the source has 3"):
        kd.load_dataset("cifar10", data=tmp_path / "src")
    assert len(kd.load_dataset("folder", data=tmp_path / "src")) == 12


def test_unknown_dataset_lists_valid_names():
    with pytest.raises(ValueError, match=r"Valid names: \['cifar10', 'cifar100', 'folder', "
                                         r"'imagenet', 'svhn'\]. Received: dataset='mnist'"):
        kd.load_dataset("mnist")


def test_folder_dataset_needs_data():
    with pytest.raises(ValueError, match="Received: data=None"):
        kd.load_dataset("folder")


def test_missing_source(tmp_path, cache):
    with pytest.raises(ValueError, match="does not exist. Received: data="):
        kd.load_dataset("cifar10", data=tmp_path / "nope.tar.xz")


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_corrupt_archive(tmp_path, cache, offline, damage):
    make_image_tree(tmp_path / "src", per_class={"train": 2})
    archive = make_tar(tmp_path / "src", tmp_path / "train.tar.xz")
    content = archive.read_bytes()
    archive.write_bytes(content[: len(content) // 2] if damage == "truncated" else b"x" * 999)
    with pytest.raises(ValueError, match="corrupt. Received: data="):
        kd.load_image_source(archive)
    assert not cache.exists() or not any(cache.iterdir())


def test_corrupt_image_is_named(tmp_path, cache, offline):
    make_image_tree(tmp_path / "src")
    (tmp_path / "src" / "train" / "dog" / "0002.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match=r"Received: file=.*train/dog/0002.png"):
        kd.load_image_source(tmp_path / "src")


def test_image_of_the_wrong_size_is_named(tmp_path, cache, offline):
    make_image_tree(tmp_path / "src", classes=kd.CIFAR10_CLASSES)
    Image.fromarray(np.zeros((28, 32, 3), np.uint8)).save(
        tmp_path / "src" / "train" / "ship" / "0001.png")
    with pytest.raises(ValueError, match=r"must be 32x32.*28x32.*file=.*train/ship/0001.png"):
        kd.load_dataset("cifar10", data=tmp_path / "src")
    # Own images: every image must match the first one's size.
    with pytest.raises(ValueError, match=r"train/ship/0001.png"):
        kd.load_dataset("folder", data=tmp_path / "src")


def test_bad_layout_is_named(tmp_path, cache, offline):
    folder = tmp_path / "src" / "cat"
    folder.mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(folder / "1.png")
    with pytest.raises(ValueError, match=r"split/<class>/<image>.*Received: file=cat/1.png"):
        kd.load_image_source(tmp_path / "src")


def test_not_an_archive(tmp_path):
    (tmp_path / "data.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match="folder or an archive"):
        kd.load_image_source(tmp_path / "data.csv")


@pytest.mark.parametrize("kind", ["folder", "zip", "tar.xz"])
def test_archive_sample_takes_the_first_images_of_each_class(tmp_path, kind):
    """The export's parity sample: the first ``per_class`` images of every class, any split."""
    written = make_image_tree(tmp_path / "src", per_class={"train": 3, "val": 1})
    source = tmp_path / "src"
    if kind == "zip":
        with zipfile.ZipFile(tmp_path / "d.zip", "w") as archive:
            for name in written:
                archive.write(source / name, name)
        source = tmp_path / "d.zip"
    elif kind == "tar.xz":
        source = make_tar(source, tmp_path / "d.tar.xz")
    images, labels, names = kd.archive_sample(source, limit=5, per_class=2)
    assert names == ["cat", "dog", "frog"] and labels.tolist() == [0, 0, 1, 1, 2]
    np.testing.assert_array_equal(images[0], written["train/cat/0000.png"])
    garbage = tmp_path / "bad.tar.gz"
    garbage.write_bytes(b"\x1f\x8b garbage")
    with pytest.raises(ValueError, match="corrupt. Received: data=.*bad.tar.gz"):
        kd.archive_sample(garbage)


def test_load_image_names_a_bad_file(tmp_path):
    Image.fromarray(np.full((8, 6, 3), 7, np.uint8)).save(tmp_path / "ok.png")
    assert kd.load_image(tmp_path / "ok.png").shape == (8, 6, 3)
    assert kd.load_image(tmp_path / "ok.png", size=(4, 4), resize=True).shape == (4, 4, 3)
    with pytest.raises(ValueError, match="8x6.*--resize"):
        kd.load_image(tmp_path / "ok.png", size=(4, 4))
    (tmp_path / "bad.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="Not a readable image.*bad.png"):
        kd.load_image(tmp_path / "bad.png")
    with pytest.raises(ValueError, match="not found.*none.png"):
        kd.load_image(tmp_path / "none.png")


def test_holdout_split_is_fixed_seeded_and_class_balanced():
    labels = np.repeat(np.arange(10), 600)
    np.random.default_rng(0).shuffle(labels)
    train, val = kd.holdout_split(labels, 5000, seed=0)
    assert len(val) == 5000 and len(train) == 1000
    assert np.bincount(labels[val]).tolist() == [500] * 10
    assert not set(train) & set(val)
    again = kd.holdout_split(labels, 5000, seed=0)[1]
    np.testing.assert_array_equal(val, again)
    assert not np.array_equal(val, kd.holdout_split(labels, 5000, seed=1)[1])
    # Remainders go one each to the first classes.
    assert np.bincount(labels[kd.holdout_split(labels, 13, seed=0)[1]]).tolist() == (
        [2] * 3 + [1] * 7)
    with pytest.raises(ValueError, match="Received: val_size=6000"):
        kd.holdout_split(labels, 6000)


def test_channel_stats_and_normalization(rng):
    images = rng.integers(0, 256, (50, 8, 8, 3), dtype=np.uint8)
    mean, std = kd.channel_stats(images, chunk=7)
    flat = images.reshape(-1, 3).astype(np.float64)
    np.testing.assert_allclose(mean, flat.mean(0))
    np.testing.assert_allclose(std, flat.std(0))
    assert kd.normalization("scale") == {"mode": "scale", "mean": [0.0] * 3,
                                         "std": [255.0] * 3}
    constant = np.zeros((4, 8, 8, 3), np.uint8)
    assert kd.normalization("meanstd", constant)["std"] == [1.0] * 3  # never divides by 0


def test_make_dataset_normalizes_and_handles_the_last_batch(rng):
    images = rng.integers(0, 256, (10, 8, 8, 3), dtype=np.uint8)
    labels = np.arange(10) % 3
    mean, std = [10.0, 20.0, 30.0], [2.0, 4.0, 8.0]
    train = list(kd.make_dataset(images, labels, 4, mean, std, training=True).as_numpy_iterator())
    assert [len(y) for _, y in train] == [4, 4]  # drop_remainder: 10 // 4 full batches
    evaluation = list(kd.make_dataset(images, labels, 4, mean, std, training=False)
                      .as_numpy_iterator())
    assert [len(y) for _, y in evaluation] == [4, 4, 2]
    x = np.concatenate([b[0] for b in evaluation])
    np.testing.assert_allclose(x, (images - np.array(mean)) / np.array(std), rtol=1e-6)
    assert x.dtype == np.float32


def test_augmentation_is_a_shift_and_flip_of_the_image(rng):
    images = rng.integers(1, 256, (16, 8, 8, 3), dtype=np.uint8)
    labels = np.arange(16)
    ds = kd.make_dataset(images, labels, 16, [0.0] * 3, [1.0] * 3, training=True,
                         augment=True, seed=3)
    changed = 0
    for x, y in ds.as_numpy_iterator():
        for out, label in zip(x, y, strict=True):
            padded = np.pad(images[label], ((4, 4), (4, 4), (0, 0))).astype(np.float32)
            candidates = [c[i:i + 8, j:j + 8] for c in (padded, padded[:, ::-1])
                          for i in range(9) for j in range(9)]
            assert any(np.array_equal(out, c) for c in candidates)
            changed += not np.array_equal(out, images[label])
    assert changed > 8  # most images moved or flipped


def test_a_resumed_pipeline_draws_new_batches(rng):
    """A resumed call's pipeline (first_epoch > 0) shuffles anew: a fresh process would
    otherwise replay the first call's order of batches. The same first_epoch draws the
    same order again (a call that is redone). (tf.data's parallel augmentation is not
    reproducible element by element; ArrayBatches' is.)"""
    images = rng.integers(1, 256, (16, 8, 8, 3), dtype=np.uint8)
    labels = np.arange(16)

    def first_batch(make, first_epoch):
        keras.utils.set_random_seed(3)  # as each call of `train` does (a fresh process)
        data = make(images, labels, 16, [0.0] * 3, [1.0] * 3, training=True, augment=True,
                    seed=3, first_epoch=first_epoch)
        return next(data.as_numpy_iterator()) if make is kd.make_dataset else data[0]

    for make in (kd.make_dataset, kd.ArrayBatches):
        start, again, resumed, later = (first_batch(make, e) for e in (0, 0, 170, 171))
        np.testing.assert_array_equal(start[1], again[1])
        for one, other in ((start, resumed), (start, later), (resumed, later)):
            assert not np.array_equal(one[1], other[1])  # another order
    start, again, resumed = (first_batch(kd.ArrayBatches, e) for e in (0, 0, 170))
    np.testing.assert_array_equal(start[0], again[0])
    assert not np.array_equal(start[0][np.argsort(start[1])],  # other crops and flips
                              resumed[0][np.argsort(resumed[1])])
    assert kd.epoch_seed(3, 0) == 3
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="`first_epoch` must be a non-negative integer"):
            kd.epoch_seed(3, bad)


def test_array_batches_without_tensorflow_match_the_pipeline(rng):
    """ArrayBatches (NumPy, the JAX path): same normalisation, batching, augmentation."""
    images = rng.integers(1, 256, (10, 8, 8, 3), dtype=np.uint8)
    labels = np.arange(10)
    mean, std = [10.0, 20.0, 30.0], [2.0, 4.0, 8.0]
    evaluation = kd.ArrayBatches(images, labels, 4, mean, std, training=False)
    assert [len(evaluation[i][1]) for i in range(len(evaluation))] == [4, 4, 2]
    x = np.concatenate([evaluation[i][0] for i in range(len(evaluation))])
    np.testing.assert_allclose(x, (images - np.array(mean)) / np.array(std), rtol=1e-6)
    assert x.dtype == np.float32
    train = kd.ArrayBatches(images, labels, 4, [0.0] * 3, [1.0] * 3, training=True,
                            augment=True, seed=3)
    assert len(train) == 2  # 10 // 4: the remainder is skipped, as in make_dataset
    seen, changed = [], 0
    for _ in range(3):
        order = []
        for i in range(len(train)):
            x, y = train[i]
            for out, label in zip(x, y, strict=True):
                padded = np.pad(images[label], ((4, 4), (4, 4), (0, 0))).astype(np.float32)
                candidates = [c[r:r + 8, k:k + 8] for c in (padded, padded[:, ::-1])
                              for r in range(9) for k in range(9)]
                assert any(np.array_equal(out, c) for c in candidates)
                changed += not np.array_equal(out, images[label])
            order += y.tolist()
        assert len(set(order)) == 8
        seen.append(order)
        train.on_epoch_end()
    assert seen[0] != seen[1]  # reshuffled every epoch
    assert changed > 12


@pytest.mark.slow
@pytest.mark.skipif(not CIFAR_ARCHIVE.exists(),
                    reason=f"shared CIFAR-10 archive not found at {CIFAR_ARCHIVE} "
                           "(set KERAS_NEWTON_DATA)")
def test_shared_cifar10_archive(offline):
    """The real archive: 50,000 images, 5,000 per class (decoded once into the user cache)."""
    digest = hashlib.sha256(CIFAR_ARCHIVE.read_bytes()).hexdigest()
    assert digest == CIFAR_SHA256
    train = kd.load_dataset("cifar10", data=CIFAR_ARCHIVE)
    assert train.images.shape == (50000, 32, 32, 3)
    assert np.bincount(train.labels).tolist() == [5000] * 10
    _, val = kd.holdout_split(train.labels, 5000, seed=0)
    assert np.bincount(train.labels[val]).tolist() == [500] * 10
