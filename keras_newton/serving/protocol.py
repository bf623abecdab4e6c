"""The Open Inference Protocol (KServe v2) REST payloads, without a web framework.

Requests and responses are JSON objects; tensor ``data`` is the row-major tensor, flat
(or nested, accepted). Two extensions of Triton Inference Server are implemented, as
``tritonclient.http`` uses them by default:

* binary tensor data: the body is the JSON header followed by raw little-endian
  tensors; the header's length is in the ``Inference-Header-Content-Length`` HTTP
  header and each binary tensor has a ``binary_data_size`` parameter. Outputs are sent
  this way when their ``binary_data`` parameter (or the request's
  ``binary_data_output``) is true. BYTES elements are a 4-byte little-endian length
  followed by the bytes.
* classification: an output requested with ``{"classification": k}`` comes back as a
  BYTES tensor ``[batch, k]`` of ``"<value>:<index>:<label>"`` strings, highest first.

Errors are `InferenceError` (an HTTP status, 400 unless said otherwise) whose message
becomes the protocol's ``{"error": "..."}`` body.
"""

import json
import math
import struct

import numpy as np

HEADER_LENGTH = "Inference-Header-Content-Length"
# KServe v2 tensor datatypes -> NumPy (little-endian as on the wire); BYTES is separate.
DATATYPES = {
    "BOOL": np.dtype("bool"), "UINT8": np.dtype("<u1"), "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"), "UINT64": np.dtype("<u8"), "INT8": np.dtype("<i1"),
    "INT16": np.dtype("<i2"), "INT32": np.dtype("<i4"), "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"), "FP32": np.dtype("<f4"), "FP64": np.dtype("<f8"),
}
KNOWN_DATATYPES = (*DATATYPES, "BYTES", "BF16")


class InferenceError(Exception):
    """A request the server refuses: ``status`` (HTTP) and a message for ``{"error"}``."""

    def __init__(self, message, status=400):
        super().__init__(message)
        self.message = message
        self.status = status


def datatype_of(dtype):
    """The KServe datatype name of a NumPy dtype (``float32`` -> ``"FP32"``)."""
    dtype = np.dtype(dtype)
    for name, candidate in DATATYPES.items():
        if (candidate.kind, candidate.itemsize) == (dtype.kind, dtype.itemsize):
            return name
    raise ValueError(f"No KServe datatype for this dtype. Received: dtype={dtype}")


def parse_body(body, header_length=None):
    """``(request dict, binary bytes after the JSON header)`` of an inference request body."""
    if header_length is not None:
        try:
            size = int(header_length)
        except ValueError:
            size = -1
        if not 0 <= size <= len(body):
            raise InferenceError(f"Invalid {HEADER_LENGTH} header: it must be an integer "
                                 f"between 0 and the body size {len(body)}. Received: "
                                 f"{header_length!r}")
        header, binary = body[:size], memoryview(body)[size:]
    else:
        header, binary = body, memoryview(b"")
    try:
        request = json.loads(header)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise InferenceError(f"Malformed JSON in the request body: {e}") from None
    if not isinstance(request, dict):
        raise InferenceError("The request body must be a JSON object. "
                             f"Received: {type(request).__name__}")
    return request, binary


class BinaryReader:
    """Hands out the binary tensors that follow the JSON header, in order."""

    def __init__(self, data):
        self.data, self.offset = data, 0

    def take(self, size, name):
        if self.offset + size > len(self.data):
            raise InferenceError(f"Input {name!r}: binary_data_size {size} runs past the end of "
                                 f"the body ({len(self.data) - self.offset} bytes left)")
        chunk = self.data[self.offset:self.offset + size]
        self.offset += size
        return chunk

    def check_consumed(self):
        if self.offset != len(self.data):
            raise InferenceError(f"{len(self.data) - self.offset} bytes after the JSON header "
                                 "belong to no input (check binary_data_size)")


def _shape(tensor, name):
    shape = tensor.get("shape")
    if not isinstance(shape, list) or any(
            isinstance(d, bool) or not isinstance(d, int) or d < 0 for d in shape):
        raise InferenceError(f"Input {name!r}: `shape` must be a list of non-negative "
                             f"integers. Received: shape={shape!r}")
    return tuple(shape)


def input_array(tensor, reader, datatypes):
    """The NumPy array of one ``$request_input`` (JSON ``data`` or binary), checked.

    ``datatypes`` are the accepted datatype names. The element count must match the
    shape; JSON integers must fit the integer datatype and may not be booleans or
    strings; floats are refused for integer datatypes.
    """
    if not isinstance(tensor, dict):
        raise InferenceError(f"Each input must be a JSON object. Received: {tensor!r:.80}")
    name = tensor.get("name")
    datatype = tensor.get("datatype")
    if datatype not in datatypes:
        raise InferenceError(f"Input {name!r}: datatype must be one of {list(datatypes)}. "
                             f"Received: datatype={datatype!r}")
    shape = _shape(tensor, name)
    dtype = DATATYPES[datatype]
    count = math.prod(shape)  # Python ints: no overflow on absurd shapes
    params = tensor.get("parameters") or {}
    if not isinstance(params, dict):
        raise InferenceError(f"Input {name!r}: `parameters` must be an object")
    if "shared_memory_region" in params:
        raise InferenceError(f"Input {name!r}: shared memory is not supported by this server")
    if "binary_data_size" in params:
        size = params["binary_data_size"]
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise InferenceError(f"Input {name!r}: binary_data_size must be a non-negative "
                                 f"integer. Received: {size!r}")
        if "data" in tensor:
            raise InferenceError(f"Input {name!r} has both binary_data_size and JSON data")
        if size != count * dtype.itemsize:
            raise InferenceError(
                f"Input {name!r}: binary_data_size {size} does not match shape {list(shape)} "
                f"of {datatype} ({count * dtype.itemsize} bytes)")
        return np.frombuffer(reader.take(size, name), dtype=dtype).reshape(shape)
    if "data" not in tensor:
        raise InferenceError(f"Input {name!r} has no `data` (nor a binary_data_size parameter)")
    try:
        values = np.asarray(tensor["data"])
    except ValueError:  # ragged nesting
        raise InferenceError(f"Input {name!r}: `data` must be a flat (or regularly nested) "
                             "list of numbers") from None
    if values.size != count:
        raise InferenceError(f"Input {name!r}: `data` has {values.size} elements, shape "
                             f"{list(shape)} needs {count}")
    kind = values.dtype.kind
    if count and (kind not in "iuf" or (dtype.kind in "iu" and kind == "f")):
        raise InferenceError(f"Input {name!r}: `data` must hold {datatype} numbers. "
                             f"Received elements of type {values.dtype}")
    if count and dtype.kind in "iu":
        info = np.iinfo(dtype)
        if values.min() < info.min or values.max() > info.max:
            raise InferenceError(f"Input {name!r}: {datatype} values must be in "
                                 f"[{info.min}, {info.max}]. Received: [{values.min()}, "
                                 f"{values.max()}]")
    return values.astype(dtype, copy=False).reshape(shape)


def serialize_bytes(elements):
    """BYTES tensor body: each element as a 4-byte little-endian length, then its bytes."""
    return b"".join(struct.pack("<I", len(e)) + e for e in elements)


def classification(scores, count, labels):
    """``[batch, count]`` of ``"<value>:<index>:<label>"`` strings, highest score first."""
    order = np.argsort(-scores, axis=1, kind="stable")[:, :count]
    return [[f"{row[i]:f}:{i}:{labels[i]}" for i in idx] for row, idx in zip(
        scores, order, strict=True)]


def encode_response(response, outputs):
    """``(body bytes, header length or None)`` of an inference response.

    ``response`` holds ``model_name``, ``model_version``, ``id`` (if any); ``outputs`` is a
    list of ``(name, value, binary)`` where ``value`` is a NumPy array or, for a BYTES
    tensor, a nested list of ``str``. Binary outputs follow the JSON header in order.
    """
    tensors, blobs = [], []
    for name, value, binary in outputs:
        if isinstance(value, np.ndarray):
            datatype, shape = datatype_of(value.dtype), list(value.shape)
            raw = np.ascontiguousarray(value, dtype=value.dtype.newbyteorder("<"))
            tensor = {"name": name, "datatype": datatype, "shape": shape}
            if binary:
                blobs.append(raw.tobytes())
                tensor["parameters"] = {"binary_data_size": len(blobs[-1])}
            else:
                tensor["data"] = raw.ravel().tolist()
        else:  # BYTES: a list of rows of str
            shape = [len(value), len(value[0]) if value else 0]
            tensor = {"name": name, "datatype": "BYTES", "shape": shape}
            flat = [s for row in value for s in row]
            if binary:
                blobs.append(serialize_bytes([s.encode() for s in flat]))
                tensor["parameters"] = {"binary_data_size": len(blobs[-1])}
            else:
                tensor["data"] = flat
        tensors.append(tensor)
    header = json.dumps({**response, "outputs": tensors}, separators=(",", ":")).encode()
    if not blobs:
        return header, None
    return b"".join([header, *blobs]), len(header)


def error_body(message):
    return json.dumps({"error": str(message)}).encode()
