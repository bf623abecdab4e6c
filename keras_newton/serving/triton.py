"""A Triton Inference Server model repository from an exported ONNX file.

    REPO/<name>/config.pbtxt        platform onnxruntime_onnx, inputs/outputs from the graph,
                                    max_batch_size, dynamic_batching
    REPO/<name>/labels.txt          class names (Triton's classification extension)
    REPO/<name>/1/model.onnx        the graph, with a Softmax output ``probabilities`` added
    REPO/<name>/1/model.onnx.json   the export's sidecar (preprocessing, class names)

Names, datatypes and dims are read from the ONNX graph through an ONNX Runtime
session, never assumed. With ``max_batch_size > 0`` Triton's dims leave out the batch
dimension, which must be dynamic in the graph. The same Open Inference Protocol client
call works against this repository served by Triton (or KServe's Triton runtime) and
against ``keras-newton serve``.
"""

import json
import shutil
from pathlib import Path

from keras_newton.export.runtime import OnnxClassifier, sidecar_path

# ONNX Runtime's element types -> Triton's config data types.
TRITON_TYPES = {
    "tensor(float)": "TYPE_FP32", "tensor(float16)": "TYPE_FP16",
    "tensor(double)": "TYPE_FP64", "tensor(uint8)": "TYPE_UINT8",
    "tensor(int8)": "TYPE_INT8", "tensor(int32)": "TYPE_INT32",
    "tensor(int64)": "TYPE_INT64", "tensor(bool)": "TYPE_BOOL",
}
LABELS_FILE = "labels.txt"
PROBABILITIES = "probabilities"


def _tensors(values, max_batch, what):
    out = []
    for v in values:
        if v.type not in TRITON_TYPES:
            raise ValueError(f"No Triton data type for {what} {v.name!r}. Received: "
                             f"type={v.type!r}")
        dims = list(v.shape)
        if max_batch > 0:
            if isinstance(dims[0], int):
                raise ValueError(f"max_batch_size > 0 needs a dynamic batch dimension; {what} "
                                 f"{v.name!r} has shape {dims}")
            dims = dims[1:]
        out.append({"name": v.name, "data_type": TRITON_TYPES[v.type],
                    "dims": [d if isinstance(d, int) else -1 for d in dims]})
    return out


def model_config(classifier, name, max_batch=32, max_delay=0.002, probabilities=True,
                 instances=None):
    """Triton's model configuration (as the JSON of its ``/config`` endpoint) for a graph.

    Args:
        classifier: an `OnnxClassifier` (its session gives names, types and shapes).
        name: the model name.
        max_batch: ``max_batch_size`` (0: no batch dimension in the config).
        max_delay: seconds of ``dynamic_batching { max_queue_delay_microseconds }``;
            None leaves dynamic batching out.
        probabilities: list a ``probabilities`` output too, when the graph lacks one (the
            server computes it; `write_model_repository` adds it to the graph).
        instances: ``instance_group``'s CPU instance count (None leaves it out).
    """
    session = classifier.session
    outputs = _tensors(session.get_outputs(), max_batch, "output")
    if probabilities and all(o["name"] != PROBABILITIES for o in outputs):
        outputs.append({**outputs[0], "name": PROBABILITIES})
    if classifier.class_names:
        for o in outputs:
            o["label_filename"] = LABELS_FILE
    config = {"name": name, "platform": "onnxruntime_onnx", "max_batch_size": int(max_batch),
              "input": _tensors(session.get_inputs(), max_batch, "input"), "output": outputs}
    if max_delay is not None and max_batch > 0:
        config["dynamic_batching"] = {
            "max_queue_delay_microseconds": int(round(max_delay * 1e6))}
    if instances is not None:
        config["instance_group"] = [{"count": int(instances), "kind": "KIND_CPU"}]
    return config


def _pbtxt_value(value, indent):
    if isinstance(value, dict):
        body = "\n".join(_pbtxt_field(k, v, indent + 1) for k, v in value.items())
        return "{\n" + body + "\n" + "  " * indent + "}" if body else "{ }"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str) and value.startswith("TYPE_"):
        return value  # an enum
    if isinstance(value, str):
        return json.dumps(value)
    return str(value)


def _pbtxt_field(key, value, indent):
    pad = "  " * indent
    if isinstance(value, list) and value and isinstance(value[0], dict):
        items = ",\n".join(pad + "  " + _pbtxt_value(v, indent + 1) for v in value)
        return f"{pad}{key} [\n{items}\n{pad}]"
    if isinstance(value, list):
        return f"{pad}{key}: [ {', '.join(_pbtxt_value(v, indent) for v in value)} ]"
    if isinstance(value, dict):
        return f"{pad}{key} {_pbtxt_value(value, indent)}"
    return f"{pad}{key}: {_pbtxt_value(value, indent)}"


def config_pbtxt(config):
    """``config.pbtxt`` text (protobuf text format) of a `model_config` dict."""
    return "\n".join(_pbtxt_field(k, v, 0) for k, v in config.items()) + "\n"


def _with_probabilities(path):
    """The ONNX model at ``path`` with a Softmax of its first output added as an output."""
    import onnx
    from onnx import helper

    proto = onnx.load(str(path))
    graph = proto.graph
    if any(o.name == PROBABILITIES for o in graph.output):
        return proto
    logits = graph.output[0]
    graph.node.append(helper.make_node("Softmax", [logits.name], [PROBABILITIES], axis=-1,
                                       name="keras_newton_probabilities"))
    out = graph.output.add()
    out.CopyFrom(logits)
    out.name = PROBABILITIES
    onnx.checker.check_model(proto)
    return proto


def write_model_repository(onnx_path, repo, name=None, max_batch=32, max_delay=0.002,
                           overwrite=False):
    """Writes ``repo/<name>/`` for Triton from an exported ONNX file; returns its config.

    Args:
        onnx_path: the exported ``model.onnx`` (its sidecar is copied along).
        repo: the model repository folder (created if needed; other models stay).
        name: the model's name (default: the sidecar's architecture, e.g. newton_cgnet10).
        max_batch: ``max_batch_size``.
        max_delay: dynamic batching's queue delay in seconds (None: no dynamic batching).
        overwrite: replace an existing ``repo/<name>/``.
    """
    import onnx

    onnx_path = Path(onnx_path)
    source = OnnxClassifier(onnx_path)
    name = name or (source.metadata or {}).get("model") or onnx_path.stem
    if not name or "/" in name or name in (".", ".."):
        raise ValueError(f"`name` must be a plain folder name. Received: name={name!r}")
    target = Path(repo) / name
    if target.exists() and not overwrite:
        raise ValueError(f"{target} exists; pass --overwrite (overwrite=True) to replace it. "
                         f"Received: out={str(repo)!r}")
    staging = Path(repo) / f".{name}.staging"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        (staging / "1").mkdir(parents=True)
        onnx.save(_with_probabilities(onnx_path), str(staging / "1" / "model.onnx"))
        if sidecar_path(onnx_path).is_file():
            shutil.copyfile(sidecar_path(onnx_path), sidecar_path(staging / "1" / "model.onnx"))
        written = OnnxClassifier(staging / "1" / "model.onnx")
        config = model_config(written, name, max_batch, max_delay)
        (staging / "config.pbtxt").write_text(config_pbtxt(config))
        if written.class_names:
            (staging / LABELS_FILE).write_text("\n".join(written.class_names) + "\n")
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return config
