"""The served model: an exported ONNX classifier seen through the Open Inference Protocol."""

from pathlib import Path

import numpy as np

from keras_newton.export.runtime import OnnxClassifier, softmax, zoo_onnx_path
from keras_newton.serving.protocol import BinaryReader, InferenceError, classification, input_array

PLATFORM = "onnxruntime_onnx"  # Triton's name for the ONNX Runtime backend
VERSION = "1"
PROBABILITIES = "probabilities"


def resolve_onnx(model=None, onnx=None):
    """The ONNX file to serve: a zoo key's export (``newton_cgnet10.cifar10``) or a path."""
    if (model is None) == (onnx is None):
        raise ValueError("Give a zoo key (e.g. newton_cgnet10.cifar10) or --onnx FILE, not "
                         f"both or neither. Received: model={model!r}, onnx={onnx!r}")
    if onnx is not None:
        if not Path(onnx).is_file():
            raise ValueError(f"ONNX file not found. Received: onnx={str(onnx)!r}")
        return Path(onnx)
    return zoo_onnx_path(model)


class ServedModel:
    """One ONNX classifier behind the protocol: metadata, request decoding, outputs.

    Inputs: the graph's input (``images``, normalised FP32 ``[N, H, W, 3]``) takes FP32
    as in the graph, and also UINT8 pixels, which are normalised here with the
    sidecar's mean/std (``[N, H, W, 3]`` RGB whatever the graph's layout). Outputs: the
    graph's ``logits`` and ``probabilities`` (softmax of the logits), each optionally
    as top-k ``"<value>:<index>:<class name>"`` strings (Triton's classification
    extension).

    Args:
        path: the ``.onnx`` file (its JSON sidecar gives preprocessing and class names).
        name: model name in URLs (default: the sidecar's architecture, else the file stem).
        max_batch: most images in one request.
        threads: ONNX Runtime intra-op threads (default: ONNX Runtime's choice).
    """

    def __init__(self, path, name=None, max_batch=32, threads=None):
        self.classifier = OnnxClassifier(path, threads=threads)
        clf = self.classifier
        card = clf.metadata or {}
        self.path = Path(path)
        self.name = name or card.get("model") or self.path.stem
        self.max_batch = max_batch
        self.preprocessing = card.get("preprocessing")
        out = clf.session.get_outputs()[0]
        self.num_classes = int(out.shape[-1])
        self.class_names = [str(c) for c in (clf.class_names or range(self.num_classes))]
        self.output_kind = card.get("output", "logits")
        self.logits_name = clf.output_names[0]
        self.input_name = clf.input_name
        self.input_shape = clf.input_shape  # (None, H, W, 3) or (None, 3, H, W)
        h, w = clf.image_size
        self.uint8_shape = (h, w, 3)
        self.datatypes = ("FP32", "UINT8") if self.preprocessing else ("FP32",)

    # ----------------------------------------------------------------- metadata
    def metadata(self):
        """The protocol's ``$metadata_model_response`` (plus what a client needs to send)."""
        shape = [-1 if d is None else d for d in self.input_shape]
        outputs = [{"name": n, "datatype": "FP32", "shape": [-1, self.num_classes]}
                   for n in self.output_names]
        return {
            "name": self.name, "versions": [VERSION], "platform": PLATFORM,
            "inputs": [{"name": self.input_name, "datatype": "FP32", "shape": shape}],
            "outputs": outputs,
            # Not in the protocol (clients ignore unknown fields): what this server adds.
            "parameters": {
                "accepted_datatypes": list(self.datatypes),
                "uint8_shape": [-1, *self.uint8_shape],
                "max_batch_size": self.max_batch,
                "preprocessing": self.preprocessing,
                "class_names": self.class_names,
                "source": self.path.name,
            },
        }

    @property
    def output_names(self):
        names = [self.logits_name]
        if self.output_kind != PROBABILITIES and self.logits_name != PROBABILITIES:
            names.append(PROBABILITIES)
        return names

    # ------------------------------------------------------------------ requests
    def decode_inputs(self, request, binary):
        """``x`` of a request, every check done: FP32 as the graph takes it, or UINT8
        ``[N, H, W, 3]`` pixels, which `run` normalises (once per batch)."""
        inputs = request.get("inputs")
        if not isinstance(inputs, list) or len(inputs) != 1:
            raise InferenceError(f"`inputs` must be a list with one tensor, "
                                 f"{self.input_name!r}. Received: {str(inputs)[:80]}")
        (tensor,) = inputs
        name = tensor.get("name") if isinstance(tensor, dict) else None
        if name != self.input_name:
            raise InferenceError(f"Unknown input {name!r}: model {self.name!r} has one input, "
                                 f"{self.input_name!r}")
        reader = BinaryReader(binary)
        x = input_array(tensor, reader, self.datatypes)
        reader.check_consumed()
        fp32 = x.dtype == np.float32
        expected = self.input_shape[1:] if fp32 else self.uint8_shape
        if x.ndim != len(expected) + 1 or tuple(x.shape[1:]) != tuple(expected):
            raise InferenceError(
                f"Input {name!r}: shape must be [N, {', '.join(map(str, expected))}] for "
                f"{'FP32' if fp32 else 'UINT8'}. Received: shape={list(x.shape)}")
        if not 1 <= len(x) <= self.max_batch:
            raise InferenceError(f"Input {name!r}: a request holds 1 to {self.max_batch} "
                                 f"images (--max-batch). Received: {len(x)}")
        return np.ascontiguousarray(x)

    def requested_outputs(self, request):
        """``[(name, classification count or 0, binary)]`` of a request."""
        params = request.get("parameters") or {}
        if not isinstance(params, dict):
            raise InferenceError("`parameters` must be an object")
        binary_default = bool(params.get("binary_data_output", False))
        wanted = request.get("outputs")
        if wanted is None:
            return [(n, 0, binary_default) for n in self.output_names]
        if not isinstance(wanted, list) or not wanted:
            raise InferenceError("`outputs` must be a non-empty list when given")
        result = []
        for out in wanted:
            name = out.get("name") if isinstance(out, dict) else None
            if name not in self.output_names:
                raise InferenceError(f"Unknown output {name!r}: model {self.name!r} has "
                                     f"{self.output_names}")
            p = out.get("parameters") or {}
            if not isinstance(p, dict):
                raise InferenceError(f"Output {name!r}: `parameters` must be an object")
            if "shared_memory_region" in p:
                raise InferenceError("Shared memory is not supported by this server")
            count = p.get("classification", 0)
            if isinstance(count, bool) or not isinstance(count, int) or not (
                    0 <= count <= self.num_classes):
                raise InferenceError(f"Output {name!r}: classification must be an integer in "
                                     f"[1, {self.num_classes}]. Received: {count!r}")
            result.append((name, count, bool(p.get("binary_data", binary_default))))
        return result

    def outputs(self, requested, logits):
        """``[(name, value, binary)]`` for `protocol.encode_response`."""
        values = {self.logits_name: logits}
        if PROBABILITIES in self.output_names:
            values[PROBABILITIES] = softmax(logits)
        result = []
        for name, count, binary in requested:
            value = values[name]
            if count:
                value = classification(value, count, self.class_names)
            result.append((name, value, binary))
        return result

    def run(self, x):
        """Logits of a batch (called in the batcher's thread): normalised FP32, or UINT8
        pixels, normalised here with the sidecar's mean/std."""
        if x.dtype == np.uint8:
            x = self.classifier.preprocess(x)
        return self.classifier.session.run([self.logits_name], {self.input_name: x})[0]
