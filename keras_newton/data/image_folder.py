"""Reading images: a folder or a tar/zip archive of ``split/<class>/<image>`` files, or one file.

The one place where keras-newton reads image files (PIL, no TensorFlow): training and
evaluation data (`load_image_source`), the sample for an export's parity check
(`archive_sample`) and single images for ``predict`` (`load_image`). A missing, truncated
or corrupt file is a ValueError naming it.

A source is decoded once with PIL into uint8 arrays and cached under
``keras_newton_home() / "datasets"`` (default ``~/.keras/keras_newton/datasets``). The cache
key is the sha256 of the archive file, or for a folder the sha256 of its listing
(relative paths, sizes, mtimes), so a changed source is never served stale. Nothing
here makes a network call.
"""

import contextlib
import hashlib
import io
import json
import lzma
import os
import shutil
import tarfile
import tempfile
import warnings
import zipfile
import zlib
from pathlib import Path, PurePosixPath

import numpy as np

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".ppm", ".tif", ".tiff")
ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.xz", ".txz", ".tar.bz2", ".tbz2", ".zip")
_CACHE_FORMAT = 1


def keras_newton_home():
    """The cache root: ``$KERAS_NEWTON_HOME``, else ``keras_newton`` in Keras' cache root
    (``$KERAS_HOME``, default ``~/.keras``)."""
    if os.environ.get("KERAS_NEWTON_HOME"):
        return Path(os.environ["KERAS_NEWTON_HOME"]).expanduser()
    return Path(os.environ.get("KERAS_HOME", "~/.keras")).expanduser() / "keras_newton"


def file_sha256(path, chunk_size=1 << 20):
    """Returns the hex sha256 of the file at ``path``."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def folder_fingerprint(path):
    """Returns a sha256 over (relative path, size, mtime) of every file under ``path``."""
    digest = hashlib.sha256()
    root = Path(path)
    for file in sorted(p for p in root.rglob("*") if p.is_file()):
        stat = file.stat()
        digest.update(f"{file.relative_to(root).as_posix()}\0{stat.st_size}\0"
                      f"{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def source_key(path):
    """Returns the cache key of a folder or archive source (see module docstring)."""
    path = Path(path)
    if path.is_dir():
        return "folder-" + folder_fingerprint(path)
    return "sha256-" + file_sha256(path)


def check_source(path):
    """Returns ``path`` as a Path if it is a folder or a supported archive, else ValueError."""
    path = Path(path).expanduser()
    if not path.exists():
        raise ValueError(f"The data source does not exist. Received: data={str(path)!r}")
    if path.is_file() and not str(path).lower().endswith(ARCHIVE_SUFFIXES):
        raise ValueError(
            f"The data source must be a folder or an archive ({', '.join(ARCHIVE_SUFFIXES)}) "
            f"of split/<class>/<image> files. Received: data={str(path)!r}"
        )
    return path


def _iter_folder(root):
    for file in sorted(p for p in root.rglob("*") if p.is_file()):
        yield file.relative_to(root).as_posix(), file.read_bytes


def _iter_tar(path):
    # Streaming mode ("r|*"): members are read in order, nothing is extracted to disk.
    with tarfile.open(path, mode="r|*") as archive:
        for member in archive:
            if member.isfile():
                data = archive.extractfile(member).read()
                yield member.name, lambda data=data: data


def _iter_zip(path):
    with zipfile.ZipFile(path) as archive:
        for info in archive.infolist():
            if not info.is_dir():
                yield info.filename, lambda info=info: archive.read(info)


def _iter_members(path):
    """Yields ``(relative posix path, read() -> bytes)`` for every file in the source."""
    if path.is_dir():
        return _iter_folder(path)
    if str(path).lower().endswith(".zip"):
        return _iter_zip(path)
    return _iter_tar(path)


def _iter_images(path):
    """`_iter_members` restricted to image files (no hidden files, no ``__MACOSX``)."""
    for name, read in _iter_members(path):
        base = PurePosixPath(name)
        if name.lower().endswith(IMAGE_EXTENSIONS) and not base.name.startswith(".") and (
            base.parts[0] != "__MACOSX"
        ):
            yield name, read


@contextlib.contextmanager
def _reading(display):
    """Turns the errors of a truncated or corrupt archive into a ValueError naming it."""
    try:
        yield
    except (tarfile.TarError, zipfile.BadZipFile, lzma.LZMAError, zlib.error, EOFError,
            OSError) as e:
        raise ValueError(
            f"Could not read the archive ({type(e).__name__}: {e}); it may be truncated or "
            f"corrupt. Received: data={display!r}"
        ) from e


def _decode(data, name, display, image_size):
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as image:
            array = np.asarray(image.convert("RGB"), dtype=np.uint8)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise ValueError(
            f"Could not decode an image ({e}). Received: file={display}/{name}"
        ) from e
    if image_size is not None and array.shape[:2] != tuple(image_size):
        raise ValueError(
            f"All images must be {image_size[0]}x{image_size[1]} (height x width); this one is "
            f"{array.shape[0]}x{array.shape[1]}. Received: file={display}/{name}"
        )
    return array


def _split_parts(names):
    """Maps each image path to ``(split, class)``, dropping one shared top folder if any."""
    parts = {name: PurePosixPath(name).parts for name in names}
    tops = {p[0] for p in parts.values()}
    if len(tops) == 1 and all(len(p) == 4 for p in parts.values()):
        parts = {name: p[1:] for name, p in parts.items()}  # e.g. mydata/train/cat/1.png
    for name, p in parts.items():
        if len(p) != 3:
            raise ValueError(
                "Images must be laid out as split/<class>/<image> (e.g. train/cat/0001.png). "
                f"Received: file={name}"
            )
    return {name: p[:2] for name, p in parts.items()}


def decode_source(path, image_size=None):
    """Decodes every image of a folder or tar/zip archive, without caching.

    Args:
        path: folder or archive holding ``split/<class>/<image>`` files.
        image_size: optional ``(height, width)`` every image must have; by default
            all images must share the size of the first one.

    Returns:
        ``(splits, class_names)``: ``splits`` maps a split name to ``(images, labels)``,
        uint8 ``(n, h, w, 3)`` and int32 ``(n,)``; labels index the sorted class names.
    """
    path = check_source(path)
    display = str(path)
    images, keys = [], []
    with _reading(display):
        for name, read in _iter_images(path):
            array = _decode(read(), name, display, image_size)
            if image_size is None:
                image_size = array.shape[:2]
            images.append(array)
            keys.append(name)
    if not images:
        raise ValueError(
            f"Found no images ({', '.join(IMAGE_EXTENSIONS)}) laid out as "
            f"split/<class>/<image>. Received: data={display!r}"
        )
    parts = _split_parts(keys)
    class_names = sorted({c for _, c in parts.values()})
    index = {c: i for i, c in enumerate(class_names)}
    order = sorted(range(len(keys)), key=lambda i: keys[i])  # archive order is arbitrary
    splits = {}
    for split in sorted({s for s, _ in parts.values()}):
        idx = [i for i in order if parts[keys[i]][0] == split]
        splits[split] = (
            np.stack([images[i] for i in idx]),
            np.array([index[parts[keys[i]][1]] for i in idx], dtype=np.int32),
        )
    return splits, class_names


def archive_sample(path, limit=1000, per_class=None):
    """``(images uint8 [N, H, W, 3], labels, class_names)``: a few images of every class.

    Reads a folder or tar/zip archive of ``split/<class>/<image>`` files as a stream
    (nothing extracted, nothing cached) and keeps the first ``per_class`` images of every
    class (default ``limit // 10``; in member order, then sorted by name), at most
    ``limit`` in all; class names are the sorted folder names, as in training. Used for
    the parity check of an export on real images.
    """
    path = check_source(path)
    display = str(path)
    per_class = per_class or max(1, limit // 10)
    found = {}  # class -> [(name, bytes)]
    with _reading(display):
        for name, read in _iter_images(path):
            parts = PurePosixPath(name).parts
            bucket = found.setdefault(parts[-2], []) if len(parts) >= 2 else None
            if bucket is not None and len(bucket) < per_class:
                bucket.append((name, read()))
    if not found:
        raise ValueError(
            f"Found no images ({', '.join(IMAGE_EXTENSIONS)}) laid out as "
            f"split/<class>/<image>. Received: data={display!r}"
        )
    class_names = sorted(found)
    images, labels = [], []
    for label, class_name in enumerate(class_names):
        for name, data in sorted(found[class_name]):
            images.append(_decode(data, name, display, None))
            labels.append(label)
    shapes = {image.shape for image in images}
    if len(shapes) > 1:
        raise ValueError(f"All images must have one size; found {sorted(shapes)}. "
                         f"Received: data={display!r}")
    return np.stack(images)[:limit], np.asarray(labels)[:limit], class_names


def load_image(path, size=None, resize=False):
    """uint8 RGB array ``(H, W, 3)`` of one image file (PNG, JPEG, ...).

    If ``size`` (``(H, W)``) is given and differs from the image, the image is resized
    (bilinear) when ``resize`` is True, otherwise a ValueError is raised; so is a missing
    file or one PIL cannot read.
    """
    from PIL import Image

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"Image file not found. Received: image={str(path)!r}")
    try:
        with Image.open(path) as image:
            image = image.convert("RGB")
            if size is not None and (image.height, image.width) != tuple(size):
                if not resize:
                    raise ValueError(
                        f"Image is {image.height}x{image.width}, the model takes "
                        f"{size[0]}x{size[1]}; pass --resize (resize=True) to resize it. "
                        f"Received: image={str(path)!r}"
                    )
                image = image.resize((size[1], size[0]), Image.BILINEAR)
            return np.asarray(image, dtype=np.uint8)
    except (OSError, SyntaxError) as e:  # PIL.UnidentifiedImageError is an OSError
        raise ValueError(f"Not a readable image ({type(e).__name__}: {e}). "
                         f"Received: image={str(path)!r}") from e


def _read_cache(entry):
    meta = json.loads((entry / "meta.json").read_text())
    if meta.get("format") != _CACHE_FORMAT:
        return None
    splits = {
        s: (np.load(entry / f"{s}_images.npy"), np.load(entry / f"{s}_labels.npy"))
        for s in meta["splits"]
    }
    return splits, meta["class_names"]


def _write_cache(entry, splits, class_names, source):
    entry.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=entry.parent))
    try:
        for split, (images, labels) in splits.items():
            np.save(tmp / f"{split}_images.npy", images)
            np.save(tmp / f"{split}_labels.npy", labels)
        meta = {"format": _CACHE_FORMAT, "source": str(source), "splits": sorted(splits),
                "class_names": class_names}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        os.replace(tmp, entry)  # atomic: a reader sees a whole entry or none
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_image_source(path, image_size=None, cache_dir=None):
    """Loads a folder or tar/zip archive of ``split/<class>/<image>`` files, cached.

    The first call decodes the source (streaming a tar, nothing extracted to disk)
    and stores uint8 ``.npy`` arrays under ``cache_dir``; later calls with an unchanged
    source read those arrays and never open the archive's members. A read-only cache
    directory only costs the caching (a warning), not the load.

    Args:
        path: folder or archive (``.tar[.gz|.xz|.bz2]``, ``.zip``).
        image_size: optional ``(height, width)`` every image must have.
        cache_dir: cache root; default ``keras_newton_home() / "datasets"``.

    Returns:
        ``(splits, class_names)`` as in ``decode_source``.

    Example:
    >>> splits, classes = load_image_source("cifar10-jpeg/train.tar.xz")  # doctest: +SKIP
    >>> splits["train"][0].shape
    (50000, 32, 32, 3)
    """
    path = check_source(path)
    cache_dir = Path(cache_dir) if cache_dir else keras_newton_home() / "datasets"
    entry = cache_dir / source_key(path)
    if (entry / "meta.json").exists():
        cached = _read_cache(entry)
        if cached is not None:
            splits, class_names = cached
            if image_size is not None:
                shape = next(iter(splits.values()))[0].shape[1:3]
                if tuple(shape) != tuple(image_size):
                    raise ValueError(
                        f"All images must be {image_size[0]}x{image_size[1]}; this source "
                        f"holds {shape[0]}x{shape[1]} images. Received: data={str(path)!r}"
                    )
            return splits, class_names
    splits, class_names = decode_source(path, image_size)
    try:
        if entry.exists():
            shutil.rmtree(entry)  # an entry of an older cache format
        _write_cache(entry, splits, class_names, path)
    except OSError as e:
        warnings.warn(f"Could not cache the decoded images in {cache_dir} ({e}).", stacklevel=2)
    return splits, class_names
