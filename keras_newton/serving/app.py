"""The Open Inference Protocol (KServe v2) REST API as a Starlette (ASGI) application.

    GET  /v2                                       server metadata
    GET  /v2/health/live, /v2/health/ready         health
    GET  /v2/models/{name}[/versions/1]            model metadata
    GET  /v2/models/{name}[/versions/1]/ready      model health
    GET  /v2/models/{name}[/versions/1]/config     model configuration (Triton's extension)
    GET  /v2/models/{name}[/versions/1]/stats      batches run, per size (Triton's extension)
    POST /v2/models/{name}[/versions/1]/infer      inference (JSON or binary tensors)

Every error is the protocol's ``{"error": "..."}`` with a 4xx status (404: unknown
model, version or path; 413: body over the limit; 400: anything else wrong with the
request), or 500 if the model itself fails. Run it with uvicorn (`keras-newton serve`).
"""

import json
import logging
from contextlib import asynccontextmanager

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.responses import Response
from starlette.routing import Route

from keras_newton.serving import protocol
from keras_newton.serving.batcher import DynamicBatcher
from keras_newton.serving.model import VERSION
from keras_newton.serving.protocol import InferenceError

SERVER_NAME = "keras-newton"
EXTENSIONS = ["binary_tensor_data", "classification", "model_configuration", "statistics"]
DEFAULT_MAX_BODY = 16 << 20
log = logging.getLogger("keras_newton.serving")


def _json(obj, status=200):
    return Response(json.dumps(obj, separators=(",", ":")), status_code=status,
                    media_type="application/json")


def _error(message, status=400):
    return Response(protocol.error_body(message), status_code=status,
                    media_type="application/json")


async def _read_body(request, limit):
    """The request body, refused (413) past ``limit`` bytes, announced or not.

    A body over the limit is still read (and dropped), up to 16 times the limit, so that
    a client that sends it all before reading gets the 413 and not a reset connection.
    """
    declared = request.headers.get("content-length")
    if declared is not None and not declared.isdigit():
        raise InferenceError(f"Invalid Content-Length header. Received: {declared!r}")
    if declared is not None and int(declared) > 16 * limit:
        raise InferenceError(f"Request body of {declared} bytes exceeds the limit of {limit} "
                             "bytes (--max-body-mb)", status=413)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size <= limit:
            chunks.append(chunk)
        elif size > 16 * limit:
            break
    if size > limit or (declared is not None and int(declared) > limit):
        raise InferenceError(f"Request body of {int(declared) if declared else f'over {size}'} "
                             f"bytes exceeds the limit of {limit} bytes (--max-body-mb)",
                             status=413)
    return b"".join(chunks)


def create_app(model, max_delay=0.002, batching=True, max_body=DEFAULT_MAX_BODY, instances=1):
    """The ASGI application serving ``model`` (a `ServedModel`).

    Args:
        model: the `ServedModel`; its ``max_batch`` bounds requests and batches.
        max_delay: seconds a request may wait for others to join its batch.
        batching: False runs every request as its own ONNX Runtime call.
        max_body: largest request body in bytes.
        instances: ONNX Runtime calls that may run at once (Triton's instance count).
    """
    from keras_newton import __version__

    batcher = DynamicBatcher(model.run, max_batch=model.max_batch, max_delay=max_delay,
                             batching=batching, instances=instances)
    state = {"ready": False}

    def check_model(request):
        name = request.path_params["name"]
        version = request.path_params.get("version")
        if name != model.name:
            raise InferenceError(f"Unknown model {name!r}; this server serves {model.name!r}",
                                 status=404)
        if version is not None and version != VERSION:
            raise InferenceError(f"Unknown version {version!r} of model {name!r}; it has "
                                 f"[{VERSION!r}]", status=404)

    def guarded(handler):
        async def endpoint(request):
            try:
                return await handler(request)
            except InferenceError as e:
                return _error(e.message, e.status)
            except Exception as e:  # noqa: BLE001  (a bug: say so in the protocol's form)
                log.exception("error in %s %s", request.method, request.url.path)
                return _error(f"Internal server error: {type(e).__name__}: {e}", 500)
        return endpoint

    async def server_metadata(request):
        return _json({"name": SERVER_NAME, "version": __version__, "extensions": EXTENSIONS})

    async def live(request):
        return _json({"live": True})

    async def ready(request):
        return _json({"ready": state["ready"]}, 200 if state["ready"] else 503)

    async def model_metadata(request):
        check_model(request)
        return _json(model.metadata())

    async def model_ready(request):
        check_model(request)
        return _json({"name": model.name, "ready": state["ready"]},
                     200 if state["ready"] else 503)

    async def model_config(request):
        from keras_newton.serving.triton import model_config

        check_model(request)
        return _json(model_config(model.classifier, model.name, model.max_batch,
                                  max_delay if batching else None, instances=instances))

    async def model_stats(request):
        """Triton's statistics extension (the subset this server measures)."""
        check_model(request)
        stats = batcher.statistics()
        batch_stats = [{"batch_size": n, "compute_infer": {"count": c, "ns": ns}}
                       for n, (c, ns) in stats["batches"].items()]
        return _json({"model_stats": [{
            "name": model.name, "version": VERSION, "inference_count": stats["images"],
            "execution_count": sum(c for c, _ in stats["batches"].values()),
            "parameters": {"request_count": stats["requests"]}, "batch_stats": batch_stats}]})

    async def infer(request):
        check_model(request)
        body = await _read_body(request, max_body)
        req, binary = protocol.parse_body(
            body, request.headers.get(protocol.HEADER_LENGTH.lower()))
        x = model.decode_inputs(req, binary)
        requested = model.requested_outputs(req)
        try:
            logits = await batcher.submit(x)
        except Exception as e:  # noqa: BLE001  (the model failed: a server error)
            return _error(f"Inference failed: {type(e).__name__}: {e}", 500)
        response = {"model_name": model.name, "model_version": VERSION}
        if "id" in req:
            response["id"] = req["id"]
        content, header_length = protocol.encode_response(
            response, model.outputs(requested, logits))
        if header_length is None:
            return Response(content, media_type="application/json")
        return Response(content, media_type="application/octet-stream",
                        headers={protocol.HEADER_LENGTH: str(header_length)})

    async def not_found(request, exc):
        return _error(f"{exc.detail} ({request.method} {request.url.path})", exc.status_code)

    async def lifespan(app):
        await batcher.start()
        state["ready"] = True
        try:
            yield
        finally:
            state["ready"] = False
            await batcher.stop()

    prefix = "/v2/models/{name}"
    routes = [Route("/v2", guarded(server_metadata)),
              Route("/v2/health/live", guarded(live)),
              Route("/v2/health/ready", guarded(ready))]
    for base in (prefix, prefix + "/versions/{version}"):
        routes += [Route(base, guarded(model_metadata)),
                   Route(base + "/ready", guarded(model_ready)),
                   Route(base + "/config", guarded(model_config)),
                   Route(base + "/stats", guarded(model_stats)),
                   Route(base + "/infer", guarded(infer), methods=["POST"])]
    app = Starlette(routes=routes, lifespan=asynccontextmanager(lifespan),
                    exception_handlers={HTTPException: not_found})
    app.state.model, app.state.batcher = model, batcher
    return app
