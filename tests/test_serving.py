"""Serving: the Open Inference Protocol server, dynamic batching, Triton repository, no TF.

The server runs as `keras-newton serve` in a child process where ``tensorflow`` and
``keras`` cannot be imported (their ``sys.modules`` entries are None), on 127.0.0.1 and a
free port, and is driven by ``tritonclient.http`` (Triton's own client) and by raw
``http.client`` requests for the malformed ones. Every network wait is bounded.
Real-image checks use the CIFAR-10 JPEG archive at $KERAS_NEWTON_DATA (default
../shared/datasets) and skip without it.
"""

import asyncio
import http.client
import json
import os
import queue
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("starlette", reason="serving needs the [serve] extra")
pytest.importorskip("uvicorn", reason="serving needs the [serve] extra")
httpclient = pytest.importorskip("tritonclient.http", reason="tritonclient[http] (dev extra)")

from keras_newton import zoo  # noqa: E402
from keras_newton.export.runtime import (  # noqa: E402
    OnnxClassifier,
    sidecar_path,
    softmax,
    zoo_onnx_path,
)
from keras_newton.serving import protocol  # noqa: E402
from keras_newton.serving.batcher import DynamicBatcher  # noqa: E402
from keras_newton.serving.protocol import InferenceError  # noqa: E402
from keras_newton.serving.triton import write_model_repository  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("KERAS_NEWTON_DATA", REPO.parent / "shared" / "datasets"))
CIFAR_ARCHIVE = SHARED_DATA / "cifar10-jpeg" / "train.tar.xz"
KEY = "newton_cgnet10.cifar10"
ZOO_ONNX = REPO / "zoo" / f"{KEY}.onnx"
INT8_KEY = f"{KEY}.int8"
ZOO_INT8 = REPO / "zoo" / f"{INT8_KEY}.onnx"
MODEL = "newton_cgnet10"
NO_TF = ("import sys\n"
         "sys.modules['tensorflow'] = None\n"
         "sys.modules['keras'] = None\n"
         "from keras_newton.cli import main\n"
         "sys.exit(main(sys.argv[1:]))\n")
MAX_BODY_MB = 1


# ------------------------------------------------------------------ protocol, no server
def _tensor(datatype, shape, data=None, binary_size=None):
    t = {"name": "images", "datatype": datatype, "shape": shape}
    if data is not None:
        t["data"] = data
    if binary_size is not None:
        t["parameters"] = {"binary_data_size": binary_size}
    return t


def test_input_array_json_and_binary():
    reader = protocol.BinaryReader(b"")
    flat = protocol.input_array(_tensor("UINT8", [2, 3], [0, 1, 2, 3, 4, 255]), reader,
                                ("UINT8",))
    nested = protocol.input_array(_tensor("UINT8", [2, 3], [[0, 1, 2], [3, 4, 255]]), reader,
                                  ("UINT8",))
    assert flat.dtype == np.uint8 and flat.shape == (2, 3)
    np.testing.assert_array_equal(flat, nested)
    raw = np.arange(6, dtype="<f4")
    reader = protocol.BinaryReader(memoryview(raw.tobytes()))
    got = protocol.input_array(_tensor("FP32", [3, 2], binary_size=24), reader, ("FP32",))
    np.testing.assert_array_equal(got, raw.reshape(3, 2))
    reader.check_consumed()


@pytest.mark.parametrize("tensor,binary,match", [
    (_tensor("INT32", [1], [1]), b"", "datatype must be one of"),
    (_tensor("UINT8", [2, 2], [1, 2, 3]), b"", "has 3 elements, shape \\[2, 2\\] needs 4"),
    (_tensor("UINT8", [2], [1.5, 2]), b"", "must hold UINT8 numbers"),
    (_tensor("UINT8", [2], [1, 256]), b"", "must be in \\[0, 255\\]"),
    (_tensor("UINT8", [2], ["a", "b"]), b"", "must hold UINT8 numbers"),
    (_tensor("UINT8", [2], [[1], [2, 3]]), b"", "flat \\(or regularly nested\\)"),
    (_tensor("UINT8", [2, -1], [1, 2]), b"", "non-negative integers"),
    (_tensor("UINT8", "2", [1, 2]), b"", "non-negative integers"),
    (_tensor("UINT8", [4], binary_size=3), b"abc", "does not match shape"),
    (_tensor("UINT8", [4], binary_size=4), b"abc", "runs past the end"),
    (_tensor("UINT8", [2**62, 2**62], binary_size=0), b"", "does not match shape"),
    (_tensor("UINT8", [2]), b"", "has no `data`"),
])
def test_input_array_refuses(tensor, binary, match):
    with pytest.raises(InferenceError, match=match) as info:
        protocol.input_array(tensor, protocol.BinaryReader(memoryview(binary)), ("UINT8",))
    assert info.value.status == 400


def test_parse_body_errors():
    with pytest.raises(InferenceError, match="Malformed JSON"):
        protocol.parse_body(b"{bad")
    with pytest.raises(InferenceError, match="must be a JSON object"):
        protocol.parse_body(b"[1, 2]")
    with pytest.raises(InferenceError, match="Inference-Header-Content-Length"):
        protocol.parse_body(b"{}", "99")
    request, rest = protocol.parse_body(b'{"a": 1}xyz', "8")
    assert request == {"a": 1} and bytes(rest) == b"xyz"


def test_response_decodes_in_tritonclient():
    """Our binary and JSON encodings, BYTES included, read back by Triton's own client."""
    logits = np.arange(6, dtype=np.float32).reshape(2, 3) - 2.5
    classes = protocol.classification(logits, 2, ["a", "b", "c"])
    assert classes == [["-0.500000:2:c", "-1.500000:1:b"], ["2.500000:2:c", "1.500000:1:b"]]
    for binary in (True, False):
        body, header_length = protocol.encode_response(
            {"model_name": "m", "model_version": "1", "id": "7"},
            [("logits", logits, binary), ("probabilities", classes, binary)])
        result = httpclient.InferResult.from_response_body(body, header_length=header_length)
        np.testing.assert_array_equal(result.as_numpy("logits"), logits)
        got = result.as_numpy("probabilities")
        assert got.shape == (2, 2)
        assert [[s.decode() if isinstance(s, bytes) else s for s in row] for row in got] == classes
        assert result.get_response()["id"] == "7"


def test_batcher_forms_batches_and_splits_exactly():
    calls = []

    def fn(x):
        calls.append(len(x))
        time.sleep(0.01)
        return x * 2

    async def scenario(batching):
        batcher = DynamicBatcher(fn, max_batch=8, max_delay=0.05, batching=batching)
        await batcher.start()
        try:
            sizes = [1, 3, 2, 5, 1, 4, 8, 1]
            xs = [np.full((n, 2), i, dtype=np.float32) for i, n in enumerate(sizes)]
            ys = await asyncio.wait_for(asyncio.gather(*[batcher.submit(x) for x in xs]), 30)
            with pytest.raises(ValueError, match="1 to 8 images"):
                await batcher.submit(np.zeros((9, 2), np.float32))
        finally:
            await batcher.stop()
        for x, y in zip(xs, ys, strict=True):
            np.testing.assert_array_equal(y, x * 2)
        return batcher.statistics()

    stats = asyncio.run(scenario(True))
    assert max(calls) <= 8 and max(calls) > 1 and sum(calls) == 25
    assert stats["images"] == 25 and stats["requests"] == 8
    calls.clear()
    asyncio.run(scenario(False))
    assert calls == [1, 3, 2, 5, 1, 4, 8, 1]  # one call per request, in arrival order



def test_batcher_never_mixes_dtypes():
    """UINT8 pixels (normalised per batch by the model) and FP32 inputs run apart."""
    calls = []

    def fn(x):
        calls.append((x.dtype, len(x)))
        time.sleep(0.01)
        return x.astype(np.float32) * 2

    async def scenario():
        batcher = DynamicBatcher(fn, max_batch=16, max_delay=0.05)
        await batcher.start()
        try:
            xs = [np.full((1, 2), i, np.uint8 if i >= 3 else np.float32) for i in range(6)]
            ys = await asyncio.wait_for(asyncio.gather(*[batcher.submit(x) for x in xs]), 30)
        finally:
            await batcher.stop()
        for x, y in zip(xs, ys, strict=True):
            np.testing.assert_array_equal(y, x.astype(np.float32) * 2)

    asyncio.run(scenario())
    assert calls == [(np.dtype(np.float32), 3), (np.dtype(np.uint8), 3)]

@pytest.mark.parametrize("instances", [2, 3])
def test_batcher_instances_overlap_up_to_their_count(instances):
    """With N instances at most N calls run at once (here exactly N while work waits),
    and every request still gets its own rows."""
    lock, running, peak = threading.Lock(), [0], [0]

    def fn(x):
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        time.sleep(0.05)
        with lock:
            running[0] -= 1
        return x + 1

    async def scenario():
        batcher = DynamicBatcher(fn, max_batch=2, max_delay=0.0, instances=instances)
        await batcher.start()
        try:
            xs = [np.full((1, 3), i, np.float32) for i in range(4 * instances)]
            ys = await asyncio.wait_for(asyncio.gather(*[batcher.submit(x) for x in xs]), 30)
        finally:
            await batcher.stop()
        for x, y in zip(xs, ys, strict=True):
            np.testing.assert_array_equal(y, x + 1)

    asyncio.run(scenario())
    assert peak[0] == instances
    with pytest.raises(ValueError, match="instances"):
        DynamicBatcher(fn, instances=0)

# ------------------------------------------------------------------ zoo ONNX, Triton repo
def test_zoo_onnx_files_are_current(tmp_path):
    """Every zoo entry has its ONNX export in zoo/, made from the registered weights."""
    assert zoo.available(), "the zoo registry is empty"
    for key in zoo.available():
        path = REPO / "zoo" / f"{key}.onnx"
        assert path.is_file(), f"{path.name} missing: python export/export_zoo.py --zoo {key}"
        card = json.loads(sidecar_path(path).read_text())
        assert card["weights"]["sha256"] == zoo.REGISTRY[key]["sha256"], (
            f"{path.name} was exported from other weights: python export/export_zoo.py --zoo "
            f"{key}")
        assert card["onnx_sha256"] == zoo.file_sha256(path)
        assert card["preprocessing"]["mean"] == zoo.REGISTRY[key]["preprocessing"]["mean"]
        assert card["class_names"] == zoo.REGISTRY[key]["class_names"]
        assert path.stat().st_size < 20e6
        assert zoo_onnx_path(key) in (path, Path(os.environ.get("KERAS_NEWTON_ZOO", "-"))
                                      / path.name)
    assert ZOO_INT8.is_file(), (f"{ZOO_INT8.name} missing: python export/export_zoo.py --zoo "
                                f"{KEY} --calibration-data TRAINING_DATA")
    for path in sorted((REPO / "zoo").glob("*.int8.onnx")):  # the int8 exports
        key = path.name[:-len(".int8.onnx")]
        card = json.loads(sidecar_path(path).read_text())
        assert card["weights"]["sha256"] == zoo.REGISTRY[key]["sha256"], (
            f"{path.name} was exported from other weights: python export/export_zoo.py --zoo "
            f"{key} --calibration-data TRAINING_DATA")
        assert card["onnx_sha256"] == zoo.file_sha256(path)
        assert card["quantization"]["dtype"] == "int8" and card["accuracy"]["passed"]
        assert card["accuracy"]["n"] == zoo.REGISTRY[key]["metrics"]["val_images"]
        assert card["accuracy"]["fp32_top1"] == pytest.approx(
            zoo.REGISTRY[key]["metrics"]["val_top1"], abs=1e-4)
        assert zoo_onnx_path(f"{key}.int8").name == path.name
    assert "zoo/*.onnx" in (REPO / "setup.cfg").read_text()  # it travels with the package
    stale = tmp_path / ZOO_ONNX.name
    stale.write_bytes(ZOO_ONNX.read_bytes())
    card = json.loads(sidecar_path(ZOO_ONNX).read_text())
    card["weights"]["sha256"] = "0" * 64
    sidecar_path(stale).write_text(json.dumps(card))
    with pytest.raises(ValueError, match="is stale"):
        from keras_newton.export.runtime import check_zoo_onnx

        check_zoo_onnx(stale, KEY, zoo.REGISTRY[KEY])


def test_triton_repository_matches_graph(tmp_path):
    pb = pytest.importorskip("tritonclient.grpc.model_config_pb2",
                             reason="Triton's ModelConfig proto (tritonclient)")
    from google.protobuf import text_format

    config = write_model_repository(ZOO_ONNX, tmp_path, max_batch=16, max_delay=0.003)
    folder = tmp_path / MODEL
    assert sorted(p.name for p in folder.iterdir()) == ["1", "config.pbtxt", "labels.txt"]
    parsed = text_format.Parse((folder / "config.pbtxt").read_text(), pb.ModelConfig())
    written = OnnxClassifier(folder / "1" / "model.onnx")
    session = written.session
    assert parsed.name == MODEL == config["name"]
    assert parsed.platform == "onnxruntime_onnx"
    assert parsed.max_batch_size == 16
    assert parsed.dynamic_batching.max_queue_delay_microseconds == 3000
    types = {"tensor(float)": pb.DataType.TYPE_FP32}
    for declared, actual in ((parsed.input, session.get_inputs()),
                             (parsed.output, session.get_outputs())):
        assert [t.name for t in declared] == [v.name for v in actual]
        for t, v in zip(declared, actual, strict=True):
            assert t.data_type == types[v.type]
            assert not isinstance(v.shape[0], int)  # dynamic batch, left out of dims
            assert list(t.dims) == list(v.shape[1:])
    assert [t.name for t in parsed.output] == ["logits", "probabilities"]
    labels = (folder / "labels.txt").read_text().split()
    assert labels == written.class_names == zoo.REGISTRY[KEY]["class_names"]
    x = written.preprocess(np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3), np.uint8))
    logits, probs = session.run(["logits", "probabilities"], {"images": x})
    np.testing.assert_allclose(probs, softmax(logits), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(logits, OnnxClassifier(ZOO_ONNX).run(x))
    with pytest.raises(ValueError, match="exists; pass --overwrite"):
        write_model_repository(ZOO_ONNX, tmp_path)
    write_model_repository(ZOO_ONNX, tmp_path, overwrite=True)


# ------------------------------------------------------------------ the server
class Server:
    """`keras-newton serve` without TensorFlow in a child process, on a free port."""

    def __init__(self, *args, timeout=90):
        self.proc = subprocess.Popen(
            [sys.executable, "-c", NO_TF, "serve", *args, "--port", "0"], cwd=REPO,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()
        deadline = time.monotonic() + timeout
        seen = []
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                break
            if line is None:
                break
            seen.append(line)
            match = re.search(r"on http://127\.0\.0\.1:(\d+)", line)
            if match:
                self.port = int(match.group(1))
                break
        else:
            match = None
        if not match:
            self.close()
            raise AssertionError("the server did not start:\n" + "".join(seen))
        self.url = f"127.0.0.1:{self.port}"
        while time.monotonic() < deadline:
            if self.request("GET", "/v2/health/ready")[0] == 200:
                return
            time.sleep(0.1)
        self.close()
        raise AssertionError("the server never became ready")

    def _pump(self):
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def request(self, method, path, body=None, headers=None, timeout=30):
        """``(status, parsed JSON or raw bytes)``; ``(0, error)`` if the server is unreachable."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            response = conn.getresponse()
            content = response.read()
            if response.getheader("Content-Type", "").startswith("application/json"):
                return response.status, json.loads(content)
            return response.status, content
        except OSError as e:
            return 0, e
        finally:
            conn.close()

    def close(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=20)


@pytest.fixture(scope="module")
def server():
    if not ZOO_ONNX.is_file():
        pytest.fail(f"{ZOO_ONNX} missing: python export/export_zoo.py --zoo {KEY}")
    srv = Server(KEY, "--max-delay-ms", "20", "--max-body-mb", str(MAX_BODY_MB))
    yield srv
    alive = srv.proc.poll() is None
    srv.close()
    assert alive, "the server died during the tests"


@pytest.fixture(scope="module")
def offline():
    return OnnxClassifier(ZOO_ONNX)


def _client(server):
    return httpclient.InferenceServerClient(server.url, connection_timeout=30,
                                            network_timeout=60)


def _input(x, binary=True):
    datatype = "UINT8" if x.dtype == np.uint8 else "FP32"
    inp = httpclient.InferInput("images", list(x.shape), datatype)
    inp.set_data_from_numpy(x, binary_data=binary)
    return inp


def test_health_metadata_config(server):
    client = _client(server)
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready(MODEL) and client.is_model_ready(MODEL, "1")
    assert not client.is_model_ready("other")
    meta = client.get_model_metadata(MODEL)
    assert meta["name"] == MODEL and meta["platform"] == "onnxruntime_onnx"
    assert meta["inputs"] == [{"name": "images", "datatype": "FP32", "shape": [-1, 32, 32, 3]}]
    assert meta["outputs"] == [{"name": n, "datatype": "FP32", "shape": [-1, 10]}
                               for n in ("logits", "probabilities")]
    assert meta["parameters"]["accepted_datatypes"] == ["FP32", "UINT8"]
    config = client.get_model_config(MODEL)
    assert config["max_batch_size"] == 32 and config["input"][0]["dims"] == [32, 32, 3]
    server_meta = client.get_server_metadata()
    assert {"binary_tensor_data", "classification"} <= set(server_meta["extensions"])
    client.close()


def test_infer_matches_offline_onnxruntime(server, offline):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    want = offline.run(offline.preprocess(images))
    client = _client(server)
    for binary in (True, False):
        result = client.infer(MODEL, [_input(images, binary)], outputs=[
            httpclient.InferRequestedOutput("logits", binary_data=binary),
            httpclient.InferRequestedOutput("probabilities", binary_data=binary,
                                            class_count=3)], request_id="r1")
        np.testing.assert_array_equal(result.as_numpy("logits"), want)
        assert result.get_response()["id"] == "r1"
        top = result.as_numpy("probabilities")
        assert top.shape == (5, 3)
        for row, logits in zip(top, want, strict=True):
            first = row[0].decode() if isinstance(row[0], bytes) else row[0]
            value, index, label = first.split(":")
            assert int(index) == int(np.argmax(logits))
            assert label == offline.class_names[int(index)]
            assert float(value) == pytest.approx(softmax(logits).max(), abs=1e-6)
    # normalised FP32 as in the graph, and no `outputs`: every output, in binary
    result = client.infer(MODEL, [_input(offline.preprocess(images))])
    np.testing.assert_array_equal(result.as_numpy("logits"), want)
    np.testing.assert_allclose(result.as_numpy("probabilities"), softmax(want), atol=1e-6)
    client.close()


@pytest.mark.slow
def test_top1_on_cifar10_matches_offline(server, offline):
    """Real CIFAR-10 images: the served top-1 is offline ONNX Runtime's, image for image."""
    if not CIFAR_ARCHIVE.is_file():
        pytest.skip(f"CIFAR-10 archive not found at {CIFAR_ARCHIVE} (set KERAS_NEWTON_DATA)")
    from keras_newton.data.image_folder import archive_sample

    images, labels, _ = archive_sample(CIFAR_ARCHIVE, limit=40)
    client = _client(server)
    served = np.concatenate([client.infer(MODEL, [_input(images[i:i + 8])]).as_numpy("logits")
                             for i in range(0, len(images), 8)])
    client.close()
    want = offline.run(offline.preprocess(images))
    np.testing.assert_array_equal(served.argmax(1), want.argmax(1))
    np.testing.assert_array_equal(served, want)
    assert (want.argmax(1) == labels).mean() >= 0.6  # trained weights, not chance


def test_concurrent_requests_batched_identically(server, offline):
    """24 clients at once: batches form, and every request gets exactly its own logits."""
    rng = np.random.default_rng(1)
    requests = [rng.integers(0, 256, (int(n), 32, 32, 3), dtype=np.uint8)
                for n in rng.integers(1, 4, 24)]
    _, before = server.request("GET", f"/v2/models/{MODEL}/stats")
    results, errors = [None] * len(requests), []
    barrier = threading.Barrier(len(requests), timeout=60)

    def send(i):
        try:
            client = _client(server)
            barrier.wait()
            results[i] = client.infer(MODEL, [_input(requests[i])]).as_numpy("logits")
            client.close()
        except Exception as e:  # noqa: BLE001  (reported below)
            errors.append(repr(e))

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(requests))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors and all(r is not None for r in results)
    for x, got in zip(requests, results, strict=True):
        np.testing.assert_array_equal(got, offline.run(offline.preprocess(x)))
    _, after = server.request("GET", f"/v2/models/{MODEL}/stats")

    def counts(stats):
        return {b["batch_size"]: b["compute_infer"]["count"]
                for b in stats["model_stats"][0]["batch_stats"]}

    new = {n: c - counts(before).get(n, 0) for n, c in counts(after).items()}
    formed = [n for n, c in new.items() if c > 0]
    assert sum(n * c for n, c in new.items()) == sum(len(x) for x in requests)
    assert max(formed) > 3 and max(formed) <= 32  # several requests ran as one batch


def _infer_body(datatype="UINT8", shape=(1, 32, 32, 3), data=None, **extra):
    count = int(np.prod(shape))
    tensor = {"name": "images", "datatype": datatype, "shape": list(shape),
              "data": [0] * count if data is None else data}
    return json.dumps({"inputs": [tensor], **extra}).encode()


def _binary_body(n):
    header = json.dumps({"inputs": [{"name": "images", "datatype": "UINT8",
                                     "shape": [n, 32, 32, 3],
                                     "parameters": {"binary_data_size": n * 3072}}]}).encode()
    return header + bytes(n * 3072), {"Inference-Header-Content-Length": str(len(header))}


def _chunks(total, size=1 << 16):
    """A body http.client sends chunked (no Content-Length)."""
    return lambda: (b" " * min(size, total - start) for start in range(0, total, size))


BAD_REQUESTS = {
    "malformed JSON": ("POST", "infer", b'{"inputs": [', {}, 400),
    "not an object": ("POST", "infer", b"[1, 2, 3]", {}, 400),
    "wrong datatype": ("POST", "infer", _infer_body("INT32"), {}, 400),
    "wrong shape": ("POST", "infer", _infer_body(shape=(1, 32, 32, 4)), {}, 400),
    "wrong FP32 shape": ("POST", "infer", _infer_body("FP32", (1, 3, 32, 32)), {}, 400),
    "data length": ("POST", "infer", _infer_body(shape=(2, 32, 32, 3), data=[0] * 3072), {},
                    400),
    "values out of range": ("POST", "infer", _infer_body(data=[300] * 3072), {}, 400),
    "too many images": ("POST", "infer", *_binary_body(33), 400),
    "binary size": ("POST", "infer", _binary_body(2)[0][:-5],
                    _binary_body(2)[1], 400),
    "unknown input": ("POST", "infer", _infer_body().replace(b'"images"', b'"pixels"'), {},
                      400),
    "unknown output": ("POST", "infer", _infer_body(outputs=[{"name": "features"}]), {}, 400),
    "bad classification": ("POST", "infer", _infer_body(outputs=[
        {"name": "logits", "parameters": {"classification": 11}}]), {}, 400),
    "body over the limit": ("POST", "infer", b"x" * (MAX_BODY_MB * 2 << 20), {}, 413),
    "chunked body over the limit": ("POST", "infer", _chunks(MAX_BODY_MB * 2 << 20), {}, 413),
    "unknown model": ("POST", "/v2/models/resnet20/infer", _infer_body(), {}, 404),
    "unknown version": ("POST", f"/v2/models/{MODEL}/versions/7/infer", _infer_body(), {},
                        404),
    "unknown model metadata": ("GET", "/v2/models/resnet20", None, {}, 404),
    "unknown path": ("GET", "/v2/nothing", None, {}, 404),
    "wrong method": ("GET", "infer", None, {}, 405),
}


def test_bad_requests_get_protocol_errors_and_server_stays_ready(server):
    failures = []
    for what, (method, path, body, headers, status) in BAD_REQUESTS.items():
        path = f"/v2/models/{MODEL}/infer" if path == "infer" else path
        body = body() if callable(body) else body
        got, content = server.request(method, path, body, headers)
        if got != status or not (isinstance(content, dict) and isinstance(
                content.get("error"), str) and content["error"]):
            failures.append(f"{what}: HTTP {got} {content!r:.200}, expected {status}")
        ready, _ = server.request("GET", "/v2/health/ready")
        if ready != 200:
            failures.append(f"after {what}: ready answered {ready}")
    assert not failures, "\n".join(failures)
    status, content = server.request("POST", f"/v2/models/{MODEL}/infer", _infer_body())
    assert status == 200 and content["outputs"][0]["shape"] == [1, 10]
    assert server.proc.poll() is None


def test_int8_zoo_file_in_onnx_classifier():
    """The int8 export runs in OnnxClassifier like the fp32 one (same I/O, sidecar
    preprocessing) and agrees with it on real images."""
    if not CIFAR_ARCHIVE.is_file():
        pytest.skip(f"CIFAR-10 archive not found at {CIFAR_ARCHIVE} (set KERAS_NEWTON_DATA)")
    from keras_newton.data.image_folder import archive_sample

    int8, fp32 = OnnxClassifier.from_zoo(INT8_KEY), OnnxClassifier(ZOO_ONNX)
    assert int8.path == ZOO_INT8
    assert (int8.input_name, int8.input_shape, int8.input_dtype, int8.output_names) == (
        fp32.input_name, fp32.input_shape, fp32.input_dtype, fp32.output_names)
    assert int8.metadata["quantization"]["dtype"] == "int8"
    images, labels, _ = archive_sample(CIFAR_ARCHIVE, limit=200)
    top = [np.asarray([row[0][0] for row in clf.classify(images)]) for clf in (fp32, int8)]
    assert (top[0] == top[1]).mean() >= 0.97
    assert (top[1] == labels).mean() >= 0.6  # trained weights, not chance


def test_predict_and_evaluate_int8_without_tensorflow(tmp_path):
    """``predict`` and ``evaluate --onnx`` on the int8 zoo export, with neither TensorFlow nor
    Keras importable; evaluate's numbers are OnnxClassifier's on the same hold-out."""
    from PIL import Image

    from keras_newton.data import holdout_split, load_dataset

    int8 = OnnxClassifier(ZOO_INT8)
    image = np.random.default_rng(3).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    Image.fromarray(image).save(tmp_path / "img.png")
    want = int8.classify(image[None], top=2)[0]
    result = subprocess.run([sys.executable, "-c", NO_TF, "predict", "--onnx", INT8_KEY,
                             str(tmp_path / "img.png"), "--top", "2", "--json"], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    top = json.loads(result.stdout.strip().splitlines()[-1])["top"]
    assert [(t["index"], t["class"]) for t in top] == [(i, n) for i, n, _ in want]
    assert top[0]["probability"] == pytest.approx(want[0][2], abs=1e-6)

    data = tmp_path / "images"  # 12 images per CIFAR-10 class; a hold-out of 40
    rng = np.random.default_rng(4)
    for name in zoo.CIFAR10_CLASSES:
        (data / "train" / name).mkdir(parents=True)
        for i in range(12):
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(
                data / "train" / name / f"{i}.png")
    env = {**os.environ, "KERAS_NEWTON_HOME": str(tmp_path / "home")}
    result = subprocess.run([sys.executable, "-c", NO_TF, "evaluate", "--onnx", str(ZOO_INT8),
                             "--data", str(data), "--val-size", "40", "--out",
                             str(tmp_path / "eval")], cwd=REPO, capture_output=True, text=True,
                            timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "int8 ONNX" in result.stdout and "on 40 images" in result.stdout
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    source = load_dataset("cifar10", data, "train", cache_dir=tmp_path / "cache")
    _, val = holdout_split(source.labels, 40, 0)
    preds = int8.run(int8.preprocess(source.images[val])).argmax(1)
    assert metrics["num_images"] == 40 and metrics["quantization"] == "int8"
    assert metrics["top1"] == pytest.approx((preds == source.labels[val]).mean())
    assert np.asarray(metrics["confusion"]).sum() == 40
    assert (tmp_path / "eval" / "confusion.png").is_file()


def test_server_serves_int8():
    """``keras-newton serve newton_cgnet10.cifar10.int8``: the logits of offline ONNX Runtime
    on the int8 file, bit for bit."""
    srv = Server(INT8_KEY, "--max-delay-ms", "5")
    try:
        offline = OnnxClassifier(ZOO_INT8)
        images = np.random.default_rng(5).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
        client = _client(srv)
        assert client.get_model_metadata(MODEL)["parameters"]["source"] == ZOO_INT8.name
        result = client.infer(MODEL, [_input(images)])
        np.testing.assert_array_equal(result.as_numpy("logits"),
                                      offline.run(offline.preprocess(images)))
        client.close()
    finally:
        srv.close()


def test_predict_without_tensorflow(tmp_path, offline):
    from PIL import Image

    image = np.random.default_rng(2).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    path = tmp_path / "img.png"
    Image.fromarray(image).save(path)
    want = offline.classify(image[None], top=2)[0]
    for onnx in (str(ZOO_ONNX), KEY):
        result = subprocess.run([sys.executable, "-c", NO_TF, "predict", "--onnx", onnx,
                                 str(path), "--top", "2", "--json"], cwd=REPO,
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr[-3000:]
        top = json.loads(result.stdout.strip().splitlines()[-1])["top"]
        assert [(t["index"], t["class"]) for t in top] == [(i, n) for i, n, _ in want]
        assert top[0]["probability"] == pytest.approx(want[0][2], abs=1e-6)


@pytest.mark.slow
def test_export_triton_cli(tmp_path):
    """``keras-newton export --format triton`` (TensorFlow) writes a loadable repository."""
    from keras_newton.cli import main

    out = tmp_path / "repo"
    assert main(["export", "--model", "newton_cgnet10", "--weights", "cifar10", "--format",
                 "triton", "--optimize", "--out", str(out), "--max-batch", "8"]) == 0
    text = (out / MODEL / "config.pbtxt").read_text()
    assert 'platform: "onnxruntime_onnx"' in text and "max_batch_size: 8" in text
    written = OnnxClassifier(out / MODEL / "1" / "model.onnx")
    x = written.preprocess(np.zeros((2, 32, 32, 3), np.uint8))
    np.testing.assert_allclose(written.run(x), OnnxClassifier(ZOO_ONNX).run(x), atol=1e-4)
    assert main(["export", "--model", "newton_cgnet10", "--weights", "cifar10", "--format",
                 "triton", "--out", str(out)]) == 2  # exists, no --overwrite
