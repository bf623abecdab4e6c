"""Dynamic batching: requests that arrive together run as one ONNX Runtime call."""

import asyncio
import collections
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np


class _Pending:
    __slots__ = ("x", "future", "arrived")

    def __init__(self, x, future, arrived):
        self.x, self.future, self.arrived = x, future, arrived


class DynamicBatcher:
    """Runs ``fn`` on batches concatenated from concurrent `submit` calls.

    A batch starts with the oldest waiting request and takes the next ones in arrival
    order while they fit in ``max_batch`` images and have its dtype; it runs once it is
    full or once its oldest request has waited ``max_delay`` seconds. While every
    instance is busy, new requests queue, so a busy server forms large batches without
    waiting at all. Each request gets back exactly its own rows of ``fn``'s output.
    ``fn`` runs in ``instances`` worker threads (ONNX Runtime releases the GIL), at most
    one batch per instance at a time, like Triton's ``instance_group { count }``.

    Args:
        fn: ``fn(x) -> y`` on a batch ``x [n, ...]``, returning ``y [n, ...]``.
        max_batch: most images per call of ``fn``; a single request may not exceed it.
        max_delay: seconds the oldest request may wait for others (0: none).
        batching: False runs every request alone, in arrival order (the baseline).
        instances: batches that may run at once (``fn`` must be thread-safe when > 1,
            as ``onnxruntime.InferenceSession.run`` is).
    """

    def __init__(self, fn, max_batch=32, max_delay=0.002, batching=True, instances=1):
        if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
            raise ValueError(f"`max_batch` must be an integer >= 1. Received: "
                             f"max_batch={max_batch!r}")
        if not max_delay >= 0:
            raise ValueError(f"`max_delay` must be >= 0 seconds. Received: max_delay={max_delay!r}")
        if isinstance(instances, bool) or not isinstance(instances, int) or instances < 1:
            raise ValueError(f"`instances` must be an integer >= 1. Received: "
                             f"instances={instances!r}")
        self.fn, self.max_batch, self.max_delay, self.batching = fn, max_batch, max_delay, batching
        self.instances = instances
        self._running = set()  # tasks of the batches in flight
        self._pending = collections.deque()
        self._pending_images = 0
        self._wakeup = None
        self._task = None
        self._executor = None
        self.batches = collections.Counter()  # batch size -> number of calls of fn
        self.batch_ns = collections.Counter()  # batch size -> total ns inside fn
        self.requests = 0

    async def start(self):
        self._wakeup = asyncio.Event()
        self._executor = ThreadPoolExecutor(self.instances,
                                            thread_name_prefix="keras-newton-batcher")
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self):
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        if self._running:
            await asyncio.gather(*self._running, return_exceptions=True)
        for item in self._pending:
            if not item.future.done():
                item.future.set_exception(RuntimeError("the server is shutting down"))
        self._pending.clear()
        if self._executor is not None:
            self._executor.shutdown(wait=True)

    async def submit(self, x):
        """``fn``'s output rows for ``x`` (``[n, ...]``, 1 <= n <= max_batch)."""
        if not 1 <= len(x) <= self.max_batch:
            raise ValueError(f"A request holds 1 to {self.max_batch} images. "
                             f"Received: {len(x)}")
        if self._task is None or self._task.done():
            raise RuntimeError("The batcher is not running (call start() first)")
        future = asyncio.get_running_loop().create_future()
        self._pending.append(_Pending(x, future, time.monotonic()))
        self._pending_images += len(x)
        self._wakeup.set()
        return await future

    def _take(self):
        """Pops the requests of the next batch (oldest first, while they fit)."""
        items, n = [], 0
        while self._pending:
            x = self._pending[0].x
            if items and (not self.batching or n + len(x) > self.max_batch
                          or x.dtype != items[0].x.dtype):  # one dtype per batch
                break
            size = len(x)
            item = self._pending.popleft()
            self._pending_images -= size
            if item.future.cancelled():  # the client went away while waiting
                continue
            items.append(item)
            n += size
        return items

    def _timed(self, x):
        start = time.perf_counter_ns()
        y = self.fn(x)
        return y, time.perf_counter_ns() - start

    def statistics(self):
        """Calls of ``fn`` per batch size: ``{size: (calls, total ns)}``, and totals."""
        return {"requests": self.requests,
                "images": sum(n * c for n, c in self.batches.items()),
                "batches": {n: (c, self.batch_ns[n]) for n, c in sorted(self.batches.items())}}

    async def _run(self):
        free = asyncio.Semaphore(self.instances)
        while True:
            await free.acquire()  # the next batch forms while every instance is busy
            while not self._pending:
                self._wakeup.clear()
                await self._wakeup.wait()
            if self.batching:
                deadline = self._pending[0].arrived + self.max_delay
                while self._pending_images < self.max_batch:
                    timeout = deadline - time.monotonic()
                    if timeout <= 0:
                        break
                    self._wakeup.clear()
                    try:
                        await asyncio.wait_for(self._wakeup.wait(), timeout)
                    except TimeoutError:
                        break
            items = self._take()
            if not items:
                free.release()
                continue
            task = asyncio.get_running_loop().create_task(self._execute(items, free))
            self._running.add(task)
            task.add_done_callback(self._running.discard)

    async def _execute(self, items, free):
        """Runs one batch in an instance's thread and hands each request its rows."""
        x = items[0].x if len(items) == 1 else np.concatenate([i.x for i in items])
        try:
            y, ns = await asyncio.get_running_loop().run_in_executor(
                self._executor, self._timed, x)
        except Exception as e:  # noqa: BLE001  (handed to every waiting request)
            for item in items:
                if not item.future.done():
                    item.future.set_exception(e)
            return
        finally:
            free.release()
        self.batches[len(x)] += 1
        self.batch_ns[len(x)] += ns
        self.requests += len(items)
        start = 0
        for item in items:
            stop = start + len(item.x)
            if not item.future.done():
                item.future.set_result(y[start:stop])
            start = stop
