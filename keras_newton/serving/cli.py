"""``keras-newton serve``: an ONNX Runtime server on the Open Inference Protocol (KServe v2)."""

HELP = ("Serve a zoo model's ONNX export (or --onnx FILE) over the Open Inference Protocol "
        "(KServe v2 REST, as Triton), with dynamic batching; no TensorFlow needed.")


def add_arguments(parser):
    parser.add_argument("model", nargs="?",
                        help="zoo key whose ONNX export is served, e.g. newton_cgnet10.cifar10")
    parser.add_argument("--onnx", help="an exported model.onnx instead (sidecar next to it)")
    parser.add_argument("--name", help="model name in the URLs (default: the architecture, "
                        "e.g. newton_cgnet10)")
    parser.add_argument("--host", default="127.0.0.1", help="address (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000,
                        help="port (default 8000; 0: a free one, printed at start)")
    parser.add_argument("--max-batch", type=int, default=32,
                        help="most images per request and per ONNX Runtime batch (default 32)")
    parser.add_argument("--max-delay-ms", type=float, default=2.0,
                        help="how long a request may wait for others to join its batch "
                             "(default 2 ms)")
    parser.add_argument("--no-batching", action="store_true",
                        help="run every request as its own ONNX Runtime call")
    parser.add_argument("--threads", type=int, help="ONNX Runtime intra-op threads per call "
                        "(default: ONNX Runtime's choice, one per core)")
    parser.add_argument("--instances", type=int, default=1,
                        help="batches that run at once, as Triton's instance_group count "
                             "(default 1); on a CPU, --instances 2 --threads 1 can beat one "
                             "call over two cores (see benchmarks/README.md)")
    parser.add_argument("--max-body-mb", type=float, default=16.0,
                        help="largest request body in MiB (default 16)")
    parser.add_argument("--access-log", action="store_true", help="log every request")


def run(args):
    import socket
    import sys

    from keras_newton.serving.model import ServedModel, resolve_onnx

    try:
        import uvicorn

        from keras_newton.serving.app import create_app
    except ModuleNotFoundError as e:
        raise ValueError(f"`serve` needs {e.name}: pip install 'keras-newton[serve]' "
                         "(starlette, uvicorn)") from None
    if args.max_batch < 1:
        raise ValueError(f"--max-batch must be >= 1. Received: max_batch={args.max_batch}")
    if args.max_delay_ms < 0:
        raise ValueError(f"--max-delay-ms must be >= 0. Received: {args.max_delay_ms}")
    if args.instances < 1:
        raise ValueError(f"--instances must be >= 1. Received: instances={args.instances}")
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads must be >= 1. Received: threads={args.threads}")
    if not args.max_body_mb > 0:
        raise ValueError(f"--max-body-mb must be > 0. Received: {args.max_body_mb}")
    path = resolve_onnx(args.model, args.onnx)
    model = ServedModel(path, name=args.name, max_batch=args.max_batch, threads=args.threads)
    app = create_app(model, max_delay=args.max_delay_ms / 1000, batching=not args.no_batching,
                     max_body=int(args.max_body_mb * (1 << 20)), instances=args.instances)
    family = socket.AF_INET6 if ":" in args.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((args.host, args.port))
    except OSError as e:
        sock.close()
        raise ValueError(f"Cannot listen on {args.host}:{args.port}: {e.strerror}") from None
    port = sock.getsockname()[1]
    batching = ("off" if args.no_batching else
                f"up to {args.max_batch} images within {args.max_delay_ms:g} ms")
    if args.instances > 1:
        batching += f"; {args.instances} instances"
    print(f"keras-newton serve: model {model.name!r} ({path}) on http://{args.host}:{port} "
          f"(Open Inference Protocol v2; dynamic batching {batching})", flush=True)
    config = uvicorn.Config(app, log_level="warning", access_log=args.access_log,
                            timeout_graceful_shutdown=5)
    server = uvicorn.Server(config)
    server.run(sockets=[sock])  # on uvloop where installed (uvicorn[standard])
    print("keras-newton serve: stopped", file=sys.stderr, flush=True)
    return 0
