"""ONNX export through a ``tf.function`` with an explicit signature and tf2onnx.

``tf2onnx.convert.from_keras`` is broken on Keras 3 (tensorflow-onnx#2348, #2448), so
the model is wrapped in a ``tf.function`` whose input signature has a ``None`` batch
dimension and converted with ``tf2onnx.convert.from_function``. The graph takes the
normalised float32 images the Keras model takes (``(x - mean) / std``, preprocessing
is stated in the metadata and the sidecar) and returns float32 logits.
"""

import json

from keras_newton.export import onnx_passes

DEFAULT_OPSET = 17
SUPPORTED_OPSETS = range(13, 19)  # what tf2onnx 1.17 emits and onnxruntime 1.32 runs
INPUT_NAME = "images"
OUTPUT_NAME = "logits"
METADATA_KEY = "keras_newton"
# Everything a Newton-CGNet / ResNet graph may contain after conversion.
ALLOWED_OPS = frozenset({
    "Conv", "Add", "Sub", "Mul", "Div", "Neg", "Relu", "Split", "Slice", "Transpose",
    "GlobalAveragePool", "ReduceMean", "Squeeze", "Unsqueeze", "Reshape", "MatMul", "Gemm",
    "Softmax", "Identity", "Concat", "Cast", "Flatten", "BatchNormalization", "Max",
})


def check_opset(opset):
    if isinstance(opset, bool) or not isinstance(opset, int) or opset not in SUPPORTED_OPSETS:
        raise ValueError(
            f"`opset` must be an int in [{SUPPORTED_OPSETS.start}, {SUPPORTED_OPSETS.stop - 1}] "
            f"(tf2onnx 1.17 / onnxruntime 1.32; default {DEFAULT_OPSET}). Received: opset={opset!r}"
        )
    return opset


def to_onnx(model, opset=DEFAULT_OPSET, metadata=None, simplify=True):
    """Converts a Keras model (TensorFlow backend) to an ``onnx.ModelProto``.

    The input is named ``images`` with shape ``[batch, *model.input_shape[1:]]`` and
    the output ``logits``; the batch dimension is the symbolic ``batch``. ``metadata``
    (a JSON-serialisable dict) is stored under ``keras_newton`` in ``metadata_props``.
    ``simplify`` applies the exact layout clean-ups of `onnx_passes.simplify`.
    """
    import tensorflow as tf
    import tf2onnx

    check_opset(opset)
    spec = [tf.TensorSpec((None, *model.input_shape[1:]), tf.float32, name=INPUT_NAME)]

    @tf.function(input_signature=spec)
    def serve(images):
        return {OUTPUT_NAME: model(images, training=False)}

    proto, _ = tf2onnx.convert.from_function(serve, input_signature=spec, opset=opset)
    if simplify:
        proto = onnx_passes.simplify(proto)
    for value in (*proto.graph.input, *proto.graph.output):
        dim = value.type.tensor_type.shape.dim[0]
        dim.ClearField("dim_value")
        dim.dim_param = "batch"
    proto.producer_name = "keras-newton"
    proto.doc_string = "keras-newton export: normalised float32 NHWC images -> logits"
    if metadata is not None:
        entry = proto.metadata_props.add()
        entry.key = METADATA_KEY
        entry.value = json.dumps(metadata)
    return proto


def export_onnx(model, path, opset=DEFAULT_OPSET, metadata=None, simplify=True):
    """Writes ``model`` as ONNX to ``path`` (see `to_onnx`) and returns ``path``."""
    import onnx

    proto = to_onnx(model, opset=opset, metadata=metadata, simplify=simplify)
    onnx.checker.check_model(proto)
    onnx.save(proto, str(path))
    return path


def graph_report(path):
    """``{"opset", "op_types", "string_tensors", "inputs", "outputs"}`` of an ONNX file."""
    import onnx

    proto = onnx.load(str(path))

    def shape(value):
        return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]

    def dtype(value):
        return onnx.helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type).name

    strings = [v.name for v in (*proto.graph.input, *proto.graph.output, *proto.graph.value_info)
               if v.type.tensor_type.elem_type == onnx.TensorProto.STRING]
    strings += [t.name for t in proto.graph.initializer if t.data_type == onnx.TensorProto.STRING]
    return {
        "opset": next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")),
        "op_types": sorted({n.op_type for n in proto.graph.node}),
        "string_tensors": strings,
        "inputs": [{"name": v.name, "dtype": dtype(v), "shape": shape(v)}
                   for v in proto.graph.input],
        "outputs": [{"name": v.name, "dtype": dtype(v), "shape": shape(v)}
                    for v in proto.graph.output],
    }
