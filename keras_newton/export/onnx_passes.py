"""Exact clean-ups of a tf2onnx graph for ONNX Runtime on CPU.

tf2onnx converts NHWC convolutions to NCHW ``Conv`` nodes wrapped in Transposes and
cancels the pairs, but it does not push a Transpose through a multi-output ``Split``,
so every ``Conv -> Split`` on channels (the fused convolutions of `CGBlock`, the merged
convolution of `FoldedNewtonCGBlock`) leaves two layout copies per CG Block. And ONNX
Runtime's blocked-layout (NCHWc) kernels have no ``Split``: a split convolution output
is reordered back and forth, and the BatchNormalization after it cannot be fused into
the convolution. The passes here:

1. `push_transposes_through_split`: ``Transpose(p) -> Split(axis a)`` becomes
   ``Split(axis p[a]) -> Transpose(p)`` on every output, so that tf2onnx's transpose
   optimizer can cancel the pairs;
2. `split_channel_convs`: ``Conv(W, b) -> Split(axis 1)`` becomes one ``Conv`` per
   part, with the matching rows of ``W`` and ``b`` (the same arithmetic; ORT then fuses
   each with its ReLU, BN affine or Add);
3. `scales_as_depthwise_convs`: ``Neg(x)`` and ``Mul(x, c)`` with a constant scalar ``c``
   (the CG Block's ``d = -g + beta d``, ``y + alpha d``) become a 1x1 depthwise ``Conv``
   with weight -1 or ``c``: the same product, but ORT's NCHWc transformer has no kernel
   for Neg or a broadcast Mul, so each left the blocked layout (a ReorderOutput before,
   a ReorderInput after, and every Add around it unfused).

All are exact rewrites (no arithmetic changes); `simplify` runs the first two, tf2onnx's
optimizers, then the third. Parity against Keras is measured on the result.

4. `split_identity_taps`, for int8 quantization only (`keras_newton.export.quantize`): a
   stride-1 ``Conv`` whose kernel is dominated by its diagonal centre taps (the identity
   ``y`` of ``g = y + g1 + g2 + g3`` and ``y + alpha d``, merged into the CG Block's
   convolution by `optimize_for_inference`) becomes ``Conv(x, W - D) + DepthwiseConv(x, d)``.
   Same function (float rounding aside); per-channel int8 weights then resolve the small
   W1/W2 kernels instead of spending their range on the identity.
"""

import numpy as np

__all__ = ["push_transposes_through_split", "scales_as_depthwise_convs", "simplify",
           "split_channel_convs", "split_identity_taps"]


def _attr(node, name, default=None):
    import onnx

    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def _index(graph):
    producer = {out: n for n in graph.node for out in n.output}
    consumers = {}
    for n in graph.node:
        for name in n.input:
            consumers.setdefault(name, []).append(n)
    return producer, consumers


def _graph_outputs(graph):
    return {o.name for o in graph.output}


def _replace_node(graph, old, new_nodes):
    """Replaces ``old`` by ``new_nodes`` at its position (keeps topological order)."""
    position = list(graph.node).index(old)
    graph.node.remove(old)
    for offset, node in enumerate(new_nodes):
        graph.node.insert(position + offset, node)


def _drop_unused_initializers(graph):
    used = {name for n in graph.node for name in n.input}
    for tensor in [t for t in graph.initializer if t.name not in used]:
        graph.initializer.remove(tensor)


def push_transposes_through_split(proto):
    """``Transpose(perm) -> Split(axis)`` to ``Split(perm[axis]) -> Transpose(perm)``."""
    import onnx

    graph = proto.graph
    producer, consumers = _index(graph)
    outputs = _graph_outputs(graph)
    for split in [n for n in graph.node if n.op_type == "Split"]:
        transpose = producer.get(split.input[0])
        if (transpose is None or transpose.op_type != "Transpose"
                or len(consumers[transpose.output[0]]) != 1
                or transpose.output[0] in outputs):
            continue
        perm = list(_attr(transpose, "perm"))
        axis = _attr(split, "axis", 0) % len(perm)
        new_split = onnx.helper.make_node(
            "Split", [transpose.input[0], *split.input[1:]],
            [f"{out}__pre_transpose" for out in split.output], name=split.name,
            axis=perm[axis], **{a.name: onnx.helper.get_attribute_value(a)
                                for a in split.attribute if a.name != "axis"})
        transposes = [onnx.helper.make_node("Transpose", [pre], [out], perm=perm,
                                            name=f"{out}__transpose")
                      for pre, out in zip(new_split.output, split.output, strict=True)]
        graph.node.remove(transpose)
        _replace_node(graph, split, [new_split, *transposes])
    return proto


def split_channel_convs(proto):
    """``Conv(W, b) -> Split(axis=1)`` (constant W, b, sizes) to one Conv per part."""
    import onnx
    from onnx import numpy_helper

    graph = proto.graph
    initializers = {t.name: t for t in graph.initializer}
    producer, consumers = _index(graph)
    outputs = _graph_outputs(graph)
    for split in [n for n in graph.node if n.op_type == "Split"]:
        conv = producer.get(split.input[0])
        if (conv is None or conv.op_type != "Conv" or _attr(split, "axis", 0) != 1
                or len(consumers[conv.output[0]]) != 1 or conv.output[0] in outputs
                or _attr(conv, "group", 1) != 1 or conv.input[1] not in initializers
                or (len(conv.input) > 2 and conv.input[2] not in initializers)):
            continue
        kernel = numpy_helper.to_array(initializers[conv.input[1]])
        bias = (numpy_helper.to_array(initializers[conv.input[2]]) if len(conv.input) > 2
                else np.zeros(kernel.shape[0], kernel.dtype))
        if len(split.input) > 1 and split.input[1]:
            if split.input[1] not in initializers:
                continue
            sizes = numpy_helper.to_array(initializers[split.input[1]]).tolist()
        elif kernel.shape[0] % len(split.output) == 0:
            sizes = [kernel.shape[0] // len(split.output)] * len(split.output)
        else:
            continue
        new_nodes, start = [], 0
        for out, size in zip(split.output, sizes, strict=True):
            w_name, b_name = f"{out}__kernel", f"{out}__bias"
            graph.initializer.extend([
                numpy_helper.from_array(kernel[start:start + size], w_name),
                numpy_helper.from_array(bias[start:start + size], b_name)])
            new_nodes.append(onnx.helper.make_node(
                "Conv", [conv.input[0], w_name, b_name], [out], name=f"{out}__conv",
                **{a.name: onnx.helper.get_attribute_value(a) for a in conv.attribute}))
            start += size
        graph.node.remove(conv)
        _replace_node(graph, split, new_nodes)
    _drop_unused_initializers(graph)
    return proto


def scales_as_depthwise_convs(proto):
    """``Neg(x)`` and ``Mul(x, scalar constant)`` on 4-D ``x`` to a 1x1 depthwise ``Conv``.

    A Mul whose ``x`` comes from a Conv is left alone (ORT folds it into that Conv).
    """
    import onnx
    from onnx import numpy_helper

    graph = proto.graph
    initializers = {t.name: t for t in graph.initializer}
    producer, _ = _index(graph)
    inferred = onnx.shape_inference.infer_shapes(proto).graph
    channels = {}
    for value in (*inferred.value_info, *inferred.input, *inferred.output):
        dims = value.type.tensor_type.shape.dim
        if len(dims) == 4 and dims[1].HasField("dim_value"):
            channels[value.name] = dims[1].dim_value
    for node in [n for n in graph.node if n.op_type in ("Neg", "Mul")]:
        if node.op_type == "Neg":
            x, scale = node.input[0], -1.0
        else:
            constants = [i for i in node.input if i in initializers]
            if len(constants) != 1 or len(node.input) != 2:
                continue
            value = numpy_helper.to_array(initializers[constants[0]])
            x = next(i for i in node.input if i not in initializers)
            if value.size != 1 or value.dtype != np.float32 or (
                    x in producer and producer[x].op_type == "Conv"):
                continue
            scale = value.item()
        if x not in channels:
            continue
        weight = f"{node.output[0]}__depthwise"
        graph.initializer.append(numpy_helper.from_array(
            np.full((channels[x], 1, 1, 1), scale, np.float32), weight))
        _replace_node(graph, node, [onnx.helper.make_node(
            "Conv", [x, weight], list(node.output), name=f"{node.output[0]}__conv",
            group=channels[x], kernel_shape=[1, 1])])
    _drop_unused_initializers(graph)
    return proto


def split_identity_taps(proto, min_ratio=2.0):
    """Moves the dominant diagonal centre taps of stride-1 convolutions to a depthwise Conv.

    A ``Conv`` (group 1, constant ``W`` of shape ``[C, C, k, k]`` with odd ``k``, stride
    and dilation 1, padding ``k // 2`` before) reads input channel ``c`` at the output
    pixel through its diagonal centre tap ``d_c = W[c, c, k//2, k//2]``. Where
    ``|d_c|`` is at least ``min_ratio`` times the largest other weight of output channel
    ``c`` (median over channels), the node becomes ``Add(Conv(x, W - D, b),
    Conv(x, d, group=C, 1x1))``: the same function, with float rounding differences only.

    Returns ``(proto, [{"node", "ratio"}, ...])``, the nodes rewritten and their median
    ratio.
    """
    import onnx
    from onnx import numpy_helper

    graph = proto.graph
    initializers = {t.name: t for t in graph.initializer}
    rewritten = []
    for node in [n for n in graph.node if n.op_type == "Conv"]:
        if (len(node.input) < 2 or node.input[1] not in initializers
                or _attr(node, "group", 1) != 1
                or _attr(node, "auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET")):
            continue
        kernel = numpy_helper.to_array(initializers[node.input[1]])
        if kernel.ndim != 4 or kernel.shape[0] != kernel.shape[1]:
            continue
        kh, kw = kernel.shape[2:]
        pads = list(_attr(node, "pads", [0, 0, 0, 0]))
        if (kh % 2 == 0 or kw % 2 == 0 or pads[:2] != [kh // 2, kw // 2]
                or any(s != 1 for s in _attr(node, "strides", [1, 1]))
                or any(d != 1 for d in _attr(node, "dilations", [1, 1]))):
            continue
        channels = np.arange(kernel.shape[0])
        diagonal = kernel[channels, channels, kh // 2, kw // 2].copy()
        rest = kernel.copy()
        rest[channels, channels, kh // 2, kw // 2] = 0
        largest = np.abs(rest).reshape(len(channels), -1).max(1)
        ratio = float(np.median(np.abs(diagonal) / np.maximum(largest, 1e-30)))
        if not ratio >= min_ratio:
            continue
        out = node.output[0]
        off, scale = f"{out}__off_diagonal", f"{out}__identity_scale"
        graph.initializer.extend([
            numpy_helper.from_array(rest, off),
            numpy_helper.from_array(diagonal.reshape(-1, 1, 1, 1), scale)])
        _replace_node(graph, node, [
            onnx.helper.make_node(
                "Conv", [node.input[0], off, *node.input[2:]], [f"{out}__off_diagonal_out"],
                name=f"{node.name}__off_diagonal",
                **{a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}),
            onnx.helper.make_node(
                "Conv", [node.input[0], scale], [f"{out}__identity_out"],
                name=f"{node.name}__identity", group=len(channels), kernel_shape=[1, 1]),
            onnx.helper.make_node(
                "Add", [f"{out}__off_diagonal_out", f"{out}__identity_out"], [out],
                name=f"{node.name}__identity_add"),
        ])
        rewritten.append({"node": node.name, "ratio": round(ratio, 2)})
    _drop_unused_initializers(graph)
    return proto, rewritten


def simplify(proto):
    """The two layout passes, tf2onnx's graph optimizers (transpose cancelling etc.), then
    `scales_as_depthwise_convs`."""
    from tf2onnx.graph import GraphUtil

    proto = push_transposes_through_split(proto)
    proto = split_channel_convs(proto)
    metadata = [(p.key, p.value) for p in proto.metadata_props]
    producer, doc = proto.producer_name, proto.doc_string
    proto = scales_as_depthwise_convs(GraphUtil.optimize_model_proto(proto))
    proto.producer_name, proto.doc_string = producer, doc
    del proto.metadata_props[:]
    for key, value in metadata:
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    return proto
