"""Reading images for ``predict`` and for parity checks (no TensorFlow needed)."""

import io
import re
import tarfile
from pathlib import Path

import numpy as np

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")


def load_image(path, size=None, resize=False):
    """uint8 RGB array ``(H, W, 3)`` of an image file.

    If ``size`` (``(H, W)``) is given and differs from the image, the image is resized
    (bilinear) when ``resize`` is True, otherwise a ValueError is raised.
    """
    from PIL import Image, UnidentifiedImageError

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
    except UnidentifiedImageError as e:
        raise ValueError(f"Not a readable image. Received: image={str(path)!r}") from e


def archive_sample(path, limit=1000, per_class=None):
    """``(images uint8 [N, H, W, 3], labels, class_names)`` from a ``split/<class>/*`` source.

    ``path`` is a ``.tar``/``.tar.gz``/``.tar.xz`` archive (read as a stream, nothing
    extracted) or a folder. Takes the first ``per_class`` images of every class in
    name order (default ``limit // 10``), at most ``limit`` in all; class names are the
    sorted folder names, as in the training pipeline.
    """
    from PIL import Image

    path = Path(path)
    per_class = per_class or max(1, limit // 10)
    found = {}  # class -> [(name, bytes)]

    def keep(parts, read):
        if len(parts) < 2 or not parts[-1].lower().endswith(IMAGE_SUFFIXES):
            return
        bucket = found.setdefault(parts[-2], [])
        if len(bucket) < per_class:
            bucket.append(("/".join(parts), read()))

    if path.is_dir():
        for file in sorted(path.rglob("*")):
            if file.is_file():
                keep(file.relative_to(path).parts, file.read_bytes)
    elif path.is_file() and re.search(r"\.tar(\.(gz|bz2|xz))?$|\.tgz$", path.name):
        with tarfile.open(path, "r|*") as archive:
            for member in archive:
                if member.isfile():
                    keep(member.name.split("/"), lambda m=member: archive.extractfile(m).read())
    else:
        raise ValueError("Expected a folder or a tar archive of split/<class>/<image> files. "
                         f"Received: path={str(path)!r}")
    if not found:
        raise ValueError(f"No images found. Received: path={str(path)!r}")
    class_names = sorted(found)
    images, labels = [], []
    for label, name in enumerate(class_names):
        for _, data in sorted(found[name]):
            with Image.open(io.BytesIO(data)) as image:
                images.append(np.asarray(image.convert("RGB"), dtype=np.uint8))
            labels.append(label)
    images, labels = np.stack(images)[:limit], np.asarray(labels)[:limit]
    return images, labels, class_names
