"""Running an exported ONNX classifier with ONNX Runtime (``OnnxClassifier``).

Needs only onnxruntime and NumPy: no Keras, no TensorFlow (``keras-newton predict`` and
``keras-newton serve`` run on an install without them). The zoo's ONNX files
(``<arch>.<tag>.onnx`` + sidecar, written by ``python export/export_zoo.py --zoo``; the
int8 ones ``<arch>.<tag>.int8.onnx``, key ``<arch>.<tag>.int8``) are found with
`zoo_onnx_path`.
"""

import json
import os
from pathlib import Path

import numpy as np

from keras_newton.export.onnx_export import METADATA_KEY
from keras_newton.preprocessing import normalize

INT8_SUFFIX = ".int8"  # zoo key and file name of an entry's int8 export
_ORT_TYPES = {"tensor(float)": np.float32, "tensor(double)": np.float64,
              "tensor(uint8)": np.uint8, "tensor(int64)": np.int64,
              "tensor(float16)": np.float16, "tensor(int32)": np.int32}


def softmax(logits):
    z = np.asarray(logits, dtype="float64")
    z = np.exp(z - z.max(axis=-1, keepdims=True))
    return (z / z.sum(axis=-1, keepdims=True)).astype("float32")


def sidecar_path(path):
    """``model.onnx`` -> ``model.onnx.json``."""
    return Path(f"{path}.json")


def zoo_folders():
    """Where zoo files are looked for, in the order of ``keras_newton.zoo.weights_path``."""
    from keras_newton import zoo

    folders = [Path(p) for p in [os.environ.get("KERAS_NEWTON_ZOO")] if p]
    return folders + [zoo.REPO_ZOO, zoo.INSTALLED_ZOO, zoo.keras_newton_home() / "models"]


def check_zoo_onnx(path, key, entry):
    """Raises a ValueError unless ``path`` is the current export of registry entry ``key``.

    Its sidecar must name the entry's weights (sha256) and, when it records one, the
    ONNX file's own sha256 must match: a file exported from older weights is stale.
    """
    from keras_newton import zoo

    sidecar = sidecar_path(path)
    regenerate = f"regenerate it with `python export/export_zoo.py --zoo {key}`"
    if str(path).endswith(f"{INT8_SUFFIX}.onnx"):
        regenerate += " --calibration-data TRAINING_DATA"
    if not sidecar.is_file():
        raise ValueError(f"The zoo ONNX file {path} has no sidecar {sidecar.name}; {regenerate}.")
    card = json.loads(sidecar.read_text())
    if (card.get("weights") or {}).get("sha256") != entry["sha256"]:
        raise ValueError(
            f"The zoo ONNX file {path} is stale: exported from weights with sha256 "
            f"{(card.get('weights') or {}).get('sha256')}, the registry's {key} weights have "
            f"{entry['sha256']}; {regenerate}.")
    if card.get("onnx_sha256") and zoo.file_sha256(path) != card["onnx_sha256"]:
        raise ValueError(f"The zoo ONNX file {path} is corrupted or truncated (sha256 differs "
                         f"from its sidecar's); {regenerate} or restore it.")
    return path


def _entry_key(key):
    """``newton_cgnet10.cifar10.int8`` -> ``newton_cgnet10.cifar10``; others unchanged."""
    key = str(key)
    return key[:-len(INT8_SUFFIX)] if key.endswith(INT8_SUFFIX) else key


def is_zoo_key(name):
    """True if ``name`` is a registry key (or one with ``.int8``) and no file of that name
    exists."""
    from keras_newton import zoo

    return _entry_key(name) in zoo.REGISTRY and not Path(name).exists()


def zoo_onnx_path(key):
    """Local, checked path of a zoo entry's ONNX export: ``newton_cgnet10.cifar10`` (fp32),
    ``newton_cgnet10.cifar10.int8`` (int8)."""
    from keras_newton import zoo

    entry = _entry_key(key)
    if entry not in zoo.REGISTRY:
        raise ValueError(f"No zoo entry {entry!r}. Registered: {zoo.available() or 'none'} "
                         f"(int8 exports: <key>{INT8_SUFFIX}). Received: model={key!r}")
    folders = zoo_folders()
    for folder in folders:
        candidate = folder / f"{key}.onnx"
        if candidate.is_file():
            return check_zoo_onnx(candidate, entry, zoo.REGISTRY[entry])
    command = f"python export/export_zoo.py --zoo {entry}"
    if key != entry:
        command += " --calibration-data TRAINING_DATA"
    raise ValueError(
        f"The ONNX export {key}.onnx is not in {[str(f) for f in folders]}; write it with "
        f"`{command}` or set KERAS_NEWTON_ZOO.")


class OnnxClassifier:
    """An exported keras-newton ONNX file run by an ONNX Runtime session.

    The input and output names, shape and dtype are read from the session (never
    assumed); every call checks the array against them and raises a ValueError that
    names the offending value. The model card (preprocessing, class names) comes from
    the JSON sidecar next to the file or, failing that, from the file's metadata.

    Args:
        path: the ``.onnx`` file.
        threads: ONNX Runtime intra-op threads (default: ORT's choice, one per core).
        spinning: let idle ORT threads spin (default False: friendlier on a shared CPU).
        providers: ORT execution providers (default ``["CPUExecutionProvider"]``).

    Example:
    >>> clf = OnnxClassifier("export/model.onnx")                # doctest: +SKIP
    >>> clf.classify(images_uint8, top=3)                         # doctest: +SKIP
    """

    def __init__(self, path, threads=None, spinning=False, providers=None):
        import onnxruntime as ort

        path = Path(path)
        if not path.is_file():
            raise ValueError(f"ONNX file not found. Received: onnx={str(path)!r}")
        options = ort.SessionOptions()
        if threads is not None:
            options.intra_op_num_threads = int(threads)
        if not spinning:
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.path = path
        self.session = ort.InferenceSession(str(path), options,
                                            providers=providers or ["CPUExecutionProvider"])
        (inp,) = self.session.get_inputs()
        self.input_name = inp.name
        self.input_shape = tuple(d if isinstance(d, int) else None for d in inp.shape)
        if inp.type not in _ORT_TYPES:
            raise ValueError(f"Unsupported ONNX input type. Received: type={inp.type!r}")
        self.input_dtype = np.dtype(_ORT_TYPES[inp.type])
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.metadata = self._load_metadata()

    @classmethod
    def from_zoo(cls, key, **kwargs):
        """The zoo entry ``key``'s ONNX export (see `zoo_onnx_path`)."""
        return cls(zoo_onnx_path(key), **kwargs)

    def _load_metadata(self):
        sidecar = sidecar_path(self.path)
        if sidecar.is_file():
            return json.loads(sidecar.read_text())
        custom = self.session.get_modelmeta().custom_metadata_map
        return json.loads(custom[METADATA_KEY]) if METADATA_KEY in custom else None

    @property
    def class_names(self):
        return (self.metadata or {}).get("class_names")

    @property
    def image_size(self):
        """``(H, W)`` of the model input (NHWC or NCHW, 3 channels)."""
        shape = self.input_shape[1:]
        return tuple(shape[:2]) if shape[-1] == 3 else tuple(shape[1:])

    def check_input(self, x, name="x"):
        """Raises a ValueError unless ``x`` matches the session's input dtype and shape."""
        if not isinstance(x, np.ndarray):
            raise ValueError(f"`{name}` must be a NumPy array. Received: "
                             f"{name}={type(x).__name__}")
        if x.dtype != self.input_dtype:
            raise ValueError(
                f"`{name}` must have dtype {self.input_dtype} (input {self.input_name!r} of "
                f"{self.path.name}; normalise uint8 images with `preprocess`). "
                f"Received: {name}.dtype={x.dtype}"
            )
        expected = ["batch" if d is None else d for d in self.input_shape]
        if x.ndim != len(self.input_shape) or x.shape[0] < 1 or any(
            d is not None and d != s for d, s in zip(self.input_shape, x.shape, strict=False)
        ):
            raise ValueError(f"`{name}` must have shape {expected} (input {self.input_name!r}). "
                             f"Received: {name}.shape={x.shape}")
        return x

    def run(self, x):
        """Raw first output (logits) for normalised float32 input ``x``."""
        self.check_input(x)
        return self.session.run([self.output_names[0]], {self.input_name: x})[0]

    __call__ = run

    def preprocess(self, images):
        """uint8 RGB ``[batch, H, W, 3]`` -> the normalised input of the graph."""
        if not isinstance(images, np.ndarray):
            raise ValueError("`images` must be a NumPy array. "
                             f"Received: images={type(images).__name__}")
        if images.dtype != np.uint8:
            raise ValueError("`images` must be uint8 RGB pixels in [0, 255]. "
                             f"Received: images.dtype={images.dtype}")
        h, w = self.image_size
        if images.ndim != 4 or images.shape[1:] != (h, w, 3) or images.shape[0] < 1:
            raise ValueError(f"`images` must have shape [batch, {h}, {w}, 3]. "
                             f"Received: images.shape={images.shape}")
        prep = (self.metadata or {}).get("preprocessing")
        if not prep:
            raise ValueError(
                "No preprocessing known for this file: put its JSON sidecar "
                f"({sidecar_path(self.path).name}) next to it. Received: onnx={str(self.path)!r}"
            )
        x = normalize(images, prep["mean"], prep["std"], "channels_last")
        if self.input_shape[-1] != 3:  # NCHW graph
            x = x.transpose(0, 3, 1, 2)
        return np.ascontiguousarray(x, dtype=self.input_dtype)

    def predict(self, images):
        """Class probabilities for uint8 RGB images ``[batch, H, W, 3]``."""
        out = self.run(self.preprocess(images))
        kind = (self.metadata or {}).get("output", "logits")
        return out if kind == "probabilities" else softmax(out)

    def classify(self, images, top=1):
        """``[[(index, name, probability), ...], ...]``: the ``top`` classes per image."""
        probs = self.predict(images)
        names = self.class_names or [str(i) for i in range(probs.shape[-1])]
        order = np.argsort(-probs, axis=1)[:, :top]
        return [[(int(i), names[i], float(p[i])) for i in row]
                for row, p in zip(order, probs, strict=True)]
