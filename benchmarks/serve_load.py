"""Load test of ``keras-newton serve`` on loopback: throughput and latency, with and without
dynamic batching, against offline ONNX Runtime on the same file.

For each model, one server per setting (dynamic batching; no batching; dynamic batching
with ``--instances`` instances of one ONNX Runtime thread each) is started as a
child process (``keras-newton serve --onnx FILE --port 0``), and ``--clients`` concurrent
keep-alive HTTP/1.1 clients send pre-encoded Open Inference Protocol requests (UINT8
images in the binary tensor extension, logits back in binary) until ``--requests``
requests are answered or ``--time-limit`` seconds have passed. Two workloads: ``single``
(one image per request) and ``mix`` (1 to 8 images per request, seeded). Every response
must be HTTP 200 with ``n x classes`` logits; a sample of responses is compared with
offline ONNX Runtime exactly. The server's statistics endpoint gives the batch sizes it
formed; offline ONNX Runtime (same file, same threads, in this process while no server
runs) is timed at 1, 8, 16, 32 before the servers run and at those and the formed batch
sizes after, five interleaved readings each time; the median of the ten readings per size
is the bound serving can approach; "offline best" is the best of 1, 8, 16, 32 (the best
median over every size timed is printed too). Reported
per workload and setting: images/s, requests/s, latency p50/p90/p99/max, failed requests,
the batches formed, and images/s as a fraction of offline's best and of offline running
exactly the batches the server formed.

    python benchmarks/serve_load.py                                  # NCG-10 zoo + NCG-56
    python benchmarks/serve_load.py --models newton_cgnet10 --requests 64 --time-limit 20
    python benchmarks/serve_load.py --onnx newton_cgnet56=/tmp/ncg56/model.onnx

``newton_cgnet10`` is the zoo's ONNX export; any other model name is exported once with
random weights (BN statistics and CG scalars moved off their initial values, optimised
graph) into ``--work`` (needs TensorFlow, in a child process), or taken from ``--onnx``.
The client is a minimal asyncio HTTP/1.1 client so that it takes little of the CPU the
server needs; ``--client tritonclient`` uses ``tritonclient.http.aio`` instead.
"""

import argparse
import asyncio
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
ZOO_ONNX = {"newton_cgnet10": REPO / "zoo" / "newton_cgnet10.cifar10.onnx"}
DEFAULT_MODELS = ("newton_cgnet10", "newton_cgnet56")
PREP = {"mean": [125.3, 123.0, 113.9], "std": [63.0, 62.1, 66.7]}
EXPORT_RANDOM = r"""
import json
import sys
import numpy as np
from keras_newton.export import export_model
from keras_newton.models import get_model
name, out, prep = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
model = get_model(name, classifier_activation=None)
rng = np.random.default_rng(1)
for w in model.weights:
    leaf = w.path.rsplit("/", 1)[-1]
    if leaf in ("gamma", "moving_variance"):
        w.assign(rng.uniform(0.5, 1.5, w.shape).astype("float32"))
    elif leaf in ("beta", "moving_mean", "alpha"):
        w.assign(rng.normal(0.0, 0.2, w.shape).astype("float32") if len(w.shape)
                 else np.float32(rng.uniform(0.5, 1.5)))
model.save_weights(out + ".weights.h5")
export_model(name, out + ".weights.h5", out, format="onnx", optimize=True,
             preprocessing=prep)
"""


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default=",".join(DEFAULT_MODELS), help="default: %(default)s")
    p.add_argument("--onnx", action="append", default=[], metavar="MODEL=PATH",
                   help="use this ONNX file (with its sidecar) for MODEL")
    p.add_argument("--work", default=os.path.join(tempfile.gettempdir(),
                                                  "keras-newton-serve-load"),
                   help="where random-weight exports are kept (default: %(default)s)")
    p.add_argument("--clients", type=int, default=32, help="concurrent clients (default 32)")
    p.add_argument("--requests", type=int, default=512,
                   help="requests per workload and setting (default 512)")
    p.add_argument("--time-limit", type=float, default=120.0,
                   help="seconds per workload and setting; no new request after it (120)")
    p.add_argument("--workloads", default="single,mix", help="default: %(default)s")
    p.add_argument("--max-batch", type=int, default=32, help="server --max-batch (32)")
    p.add_argument("--max-delay-ms", type=float, default=2.0, help="server --max-delay-ms (2)")
    p.add_argument("--threads", type=int, help="ONNX Runtime intra-op threads (server and "
                                                "offline; default: ONNX Runtime's)")
    p.add_argument("--instances", type=int, default=2,
                   help="a third server setting: dynamic batching with this many instances "
                        "of one ONNX Runtime thread each (default 2; 1: leave it out)")
    p.add_argument("--client", choices=("raw", "tritonclient"), default="raw")
    p.add_argument("--offline-seconds", type=float, default=2.0,
                   help="time per offline batch-size measurement (default 2 s)")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args = p.parse_args(argv)
    args.models = [m for m in args.models.split(",") if m]
    args.workloads = [w for w in args.workloads.split(",") if w]
    args.onnx = dict(item.split("=", 1) for item in args.onnx)
    if not set(args.workloads) <= {"single", "mix"}:
        p.error("--workloads: single and/or mix")
    if args.clients < 1 or args.requests < 1 or args.time_limit <= 0:
        p.error("--clients, --requests and --time-limit must be positive")
    return args


def onnx_file(name, args):
    if name in args.onnx:
        return Path(args.onnx[name])
    if name in ZOO_ONNX:
        return ZOO_ONNX[name]
    out = Path(args.work) / name
    if not (out / "model.onnx").is_file():
        print(f"[{name}] exporting random weights to {out} (TensorFlow, once)", flush=True)
        out.parent.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "KERAS_BACKEND": "tensorflow"}
        subprocess.run([sys.executable, "-c", EXPORT_RANDOM, name, str(out), json.dumps(PREP)],
                       check=True,
                       env=env, cwd=REPO, timeout=1800)
    return out / "model.onnx"


# ----------------------------------------------------------------------------- server
class Server:
    """``keras-newton serve`` in a child process; ``url`` once it answers ready."""

    def __init__(self, path, batching, args, instances=1):
        cmd = [sys.executable, "-m", "keras_newton", "serve", "--onnx", str(path), "--port", "0",
               "--max-batch", str(args.max_batch), "--max-delay-ms", str(args.max_delay_ms)]
        if not batching:
            cmd.append("--no-batching")
        if instances > 1:  # one ONNX Runtime thread per instance
            cmd += ["--instances", str(instances), "--threads", "1"]
        elif args.threads:
            cmd += ["--threads", str(args.threads)]
        self.proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + 120
        line = ""
        while time.monotonic() < deadline and self.proc.poll() is None:
            line = self.proc.stdout.readline()
            match = re.search(r"http://([\d.]+):(\d+)", line)
            if match:
                self.host, self.port = match.group(1), int(match.group(2))
                break
        else:
            self.close()
            raise RuntimeError(f"the server did not start: {line}")
        self.url = f"http://{self.host}:{self.port}"
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(self.url + "/v2/health/ready", timeout=5) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.1)
        self.close()
        raise RuntimeError("the server never became ready")

    def stats(self, name):
        with urllib.request.urlopen(f"{self.url}/v2/models/{name}/stats", timeout=10) as r:
            stats = json.loads(r.read())["model_stats"][0]
        return {b["batch_size"]: b["compute_infer"]["count"] for b in stats["batch_stats"]}

    def close(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=15)


# ----------------------------------------------------------------------------- clients
def encode_request(images):
    header = json.dumps({
        "inputs": [{"name": "images", "datatype": "UINT8", "shape": list(images.shape),
                    "parameters": {"binary_data_size": images.nbytes}}],
        "outputs": [{"name": "logits", "parameters": {"binary_data": True}}],
    }).encode()
    return header, header + images.tobytes()


def workload(kind, count, rng):
    sizes = np.ones(count, int) if kind == "single" else rng.integers(1, 9, count)
    return [rng.integers(0, 256, (int(n), 32, 32, 3), dtype=np.uint8) for n in sizes]


async def _raw_worker(host, port, path, bodies, state, results, deadline, classes):
    reader, writer = await asyncio.open_connection(host, port)
    try:
        while state["next"] < len(bodies) and time.monotonic() < deadline:
            i = state["next"]
            state["next"] += 1
            header, body = bodies[i]
            request = (f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Length: {len(body)}\r\n"
                       f"Inference-Header-Content-Length: {len(header)}\r\n\r\n").encode() + body
            start = time.perf_counter()
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            status = int(lines[0].split()[1])
            fields = dict(line.split(": ", 1) for line in lines[1:] if ": " in line)
            fields = {k.lower(): v for k, v in fields.items()}
            content = await reader.readexactly(int(fields["content-length"]))
            elapsed = time.perf_counter() - start
            logits = None
            if status == 200:
                hl = int(fields["inference-header-content-length"])
                logits = np.frombuffer(content[hl:], "<f4").reshape(-1, classes)
            results.append((i, status, elapsed, logits))
    finally:
        writer.close()


async def _triton_worker(url, name, images, state, results, deadline):
    import tritonclient.http.aio as aioclient

    client = aioclient.InferenceServerClient(url)
    try:
        while state["next"] < len(images) and time.monotonic() < deadline:
            i = state["next"]
            state["next"] += 1
            inp = aioclient.InferInput("images", list(images[i].shape), "UINT8")
            inp.set_data_from_numpy(images[i])
            start = time.perf_counter()
            try:
                r = await client.infer(name, [inp], outputs=[
                    aioclient.InferRequestedOutput("logits")])
                results.append((i, 200, time.perf_counter() - start, r.as_numpy("logits")))
            except Exception:  # noqa: BLE001  (counted as a failed request)
                results.append((i, 0, time.perf_counter() - start, None))
    finally:
        await client.close()


def run_load(server, name, images, classes, clients, time_limit, client="raw"):
    """``(results, wall seconds, client exceptions)``; results ``(i, status, s, logits)``."""
    bodies = [encode_request(x) for x in images]
    state, results = {"next": 0}, []
    path = f"/v2/models/{name}/infer"

    async def main():
        deadline = time.monotonic() + time_limit
        if client == "raw":
            workers = [_raw_worker(server.host, server.port, path, bodies, state, results,
                                   deadline, classes) for _ in range(clients)]
        else:
            workers = [_triton_worker(f"{server.host}:{server.port}", name, images, state,
                                      results, deadline) for _ in range(clients)]
        outcome = await asyncio.gather(*workers, return_exceptions=True)
        return [o for o in outcome if isinstance(o, BaseException)]

    start = time.perf_counter()
    try:  # the lighter event loop leaves more of the CPU to the server
        import uvloop

        errors = uvloop.run(main())
    except ModuleNotFoundError:
        errors = asyncio.run(main())
    wall = time.perf_counter() - start
    return results, wall, errors


# ----------------------------------------------------------------------------- offline
STANDARD_SIZES = (1, 8, 16, 32)


def offline_ips(session, sizes, seconds, rng, repeats=5):
    """Images/s of ``session.run`` per batch size: ``repeats`` readings of about
    ``seconds / repeats`` each, the sizes interleaved (so a noisy moment hits them all)."""
    out = {n: [] for n in sorted(set(sizes))}
    inputs = {n: session.preprocess(rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8))
              for n in out}
    for x in inputs.values():
        session.run(x)
    for _ in range(repeats):
        for n, x in inputs.items():
            calls, start = 0, time.perf_counter()
            while time.perf_counter() - start < seconds / repeats or calls < 2:
                session.run(x)
                calls += 1
            out[n].append(calls * n / (time.perf_counter() - start))
    return out


def offline_streams_ips(path, streams, sizes, seconds, rng):
    """Images/s of ``streams`` threads each calling one 1-thread session back to back."""
    from keras_newton.export.runtime import OnnxClassifier

    clf = OnnxClassifier(path, threads=1)
    out = {}
    for n in sizes:
        x = clf.preprocess(rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8))
        clf.run(x)
        calls = [0] * streams
        stop = time.perf_counter() + seconds

        def work(i, x=x, stop=stop, calls=calls):
            while time.perf_counter() < stop or calls[i] < 3:
                clf.run(x)
                calls[i] += 1

        threads = [threading.Thread(target=work, args=(i,)) for i in range(streams)]
        start = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        out[n] = sum(calls) * n / (time.perf_counter() - start)
    return out


def bound_at(batches, ips):
    """Offline images/s of running exactly ``batches`` ({size: count}) back to back."""
    images = sum(n * c for n, c in batches.items())
    seconds = sum(c * n / ips[n] for n, c in batches.items())
    return images / seconds if seconds else float("nan")


def summarize(results, wall, errors, batches, requested):
    ok = [r for r in results if r[1] == 200 and r[3] is not None]
    lat = sorted(r[2] * 1000 for r in ok)
    images = sum(len(r[3]) for r in ok)

    def pct(q):
        return lat[min(len(lat) - 1, int(round(q / 100 * (len(lat) - 1))))] if lat else None

    calls = sum(batches.values())
    return {
        "requests": len(results), "requested": requested, "failed": len(results) - len(ok)
        + len(errors), "client_errors": [repr(e) for e in errors][:3], "images": images,
        "wall_s": wall, "requests_per_s": len(ok) / wall, "images_per_s": images / wall,
        "latency_ms": {"p50": pct(50), "p90": pct(90), "p99": pct(99), "max": lat[-1]
                       if lat else None, "mean": statistics.fmean(lat) if lat else None},
        "batches": {str(k): v for k, v in sorted(batches.items())}, "ort_calls": calls,
        "mean_batch": sum(n * c for n, c in batches.items()) / calls if calls else None,
    }


def main(argv=None):
    args = parse_args(argv)
    from keras_newton.export.runtime import OnnxClassifier

    rng = np.random.default_rng(0)
    report = {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": platform.processor() or
              platform.machine(), "cpus": os.cpu_count(), "load_before": os.getloadavg(),
              "settings": {k: v for k, v in vars(args).items() if k != "json"}, "models": {}}
    for name in args.models:
        path = onnx_file(name, args)
        clf = OnnxClassifier(path, threads=args.threads)
        classes = int(clf.session.get_outputs()[0].shape[-1])
        print(f"[{name}] {path} ({path.stat().st_size / 1e6:.2f} MB)", flush=True)
        entry = {"onnx": str(path), "workloads": {}}
        offline_before = offline_ips(clf, STANDARD_SIZES, args.offline_seconds, rng)
        formed = set()
        for kind in args.workloads:
            images = workload(kind, args.requests, np.random.default_rng(1))
            step = max(1, len(images) // 16)  # these responses are compared exactly
            reference = {i: clf.run(clf.preprocess(images[i]))
                         for i in range(0, len(images), step)}
            entry["workloads"][kind] = {}
            settings = [("batching", True, 1), ("no_batching", False, 1)]
            if args.instances > 1:
                settings.append((f"batching_x{args.instances}", True, args.instances))
            for setting, batching, instances in settings:
                server = Server(path, batching, args, instances)
                try:
                    model_name = clf.metadata["model"] if clf.metadata else path.stem
                    run_load(server, model_name, workload("single", 4, rng), classes, 1, 30)
                    before = server.stats(model_name)
                    results, wall, errors = run_load(server, model_name, images, classes,
                                                     args.clients, args.time_limit, args.client)
                    after = server.stats(model_name)
                finally:
                    server.close()
                batches = {n: c - before.get(n, 0) for n, c in after.items()
                           if c - before.get(n, 0)}
                formed |= set(batches)
                mismatches = sum(1 for i, status, _, y in results if i in reference and
                                 y is not None and not np.array_equal(y, reference[i]))
                summary = summarize(results, wall, errors, batches, len(images))
                summary["checked_exact"] = sum(1 for r in results if r[0] in reference)
                summary["mismatches"] = mismatches
                entry["workloads"][kind][setting] = summary
                s = summary
                print(f"[{name}] {kind:6s} {setting:11s}: {s['images_per_s']:7.1f} img/s "
                      f"{s['requests_per_s']:7.1f} req/s  p50 {s['latency_ms']['p50']:.1f} ms "
                      f"p99 {s['latency_ms']['p99']:.1f} ms  failed {s['failed']}  mean batch "
                      f"{s['mean_batch']:.1f}  exact {s['checked_exact'] - mismatches}/"
                      f"{s['checked_exact']}", flush=True)
        offline_after = offline_ips(clf, formed | set(STANDARD_SIZES), args.offline_seconds, rng)
        # The bound: per batch size, the median of the readings before and after the servers.
        ips = {n: statistics.median(v + offline_before.get(n, []))
               for n, v in offline_after.items()}
        entry["offline_images_per_s"] = {str(k): v for k, v in sorted(ips.items())}
        entry["offline_readings_before"] = {str(k): v for k, v in sorted(offline_before.items())}
        entry["offline_readings_after"] = {str(k): v for k, v in sorted(offline_after.items())}
        # Offline best: the best of the sizes timed both before and after (ten readings
        # each); the best over every size (five readings for the formed-only ones) is
        # reported too: a maximum over many noisy medians leans high.
        best = max(ips[n] for n in STANDARD_SIZES)
        entry["offline_best_images_per_s"] = best
        entry["offline_best_any_size"] = max(ips.items(), key=lambda kv: kv[1])
        print(f"[{name}] offline ONNX Runtime images/s: " + ", ".join(
            f"b{n} {v:.1f}" for n, v in sorted(ips.items()) if n in STANDARD_SIZES)
            + "; best at any size: b{} {:.1f}".format(*entry["offline_best_any_size"]),
            flush=True)
        if args.instances > 1:  # what the instances could reach offline, for reference
            streams = offline_streams_ips(path, args.instances, (1, 8, 16, 32),
                                          args.offline_seconds, rng)
            entry[f"offline_{args.instances}_streams_images_per_s"] = {
                str(k): v for k, v in streams.items()}
            print(f"[{name}] offline, {args.instances} concurrent 1-thread calls, images/s: "
                  + ", ".join(f"b{n} {v:.1f}" for n, v in streams.items()), flush=True)
        for kind, settings in entry["workloads"].items():
            for setting, s in settings.items():
                batches = {int(k): v for k, v in s["batches"].items()}
                s["offline_bound_at_formed_batches"] = bound_at(batches, ips)
                s["fraction_of_bound"] = s["images_per_s"] / s["offline_bound_at_formed_batches"]
                s["fraction_of_offline_best"] = s["images_per_s"] / best
                print(f"[{name}] {kind:6s} {setting:11s}: {s['fraction_of_offline_best']:.0%} of "
                      f"offline best ({best:.1f}), {s['fraction_of_bound']:.0%} of offline at "
                      f"the batches formed ({s['offline_bound_at_formed_batches']:.1f})",
                      flush=True)
        report["models"][name] = entry
    report["load_after"] = os.getloadavg()
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
    failed = sum(s["failed"] + s["mismatches"] for e in report["models"].values()
                 for w in e["workloads"].values() for s in w.values())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
