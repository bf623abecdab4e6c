"""KerasTuner's chief/worker mode for ``search``: who this process is, the chief's oracle
server, and the workers' side of it.

KerasTuner decides the role from three environment variables: with
``KERASTUNER_ORACLE_IP`` (and ``KERASTUNER_ORACLE_PORT``) set, the process whose
``KERASTUNER_TUNER_ID`` contains ``chief`` serves the oracle over gRPC and runs no
trial; every other tuner id is a worker that asks the chief for trials, runs them and
reports back. Without them the search runs in one process (``tuner0``).

KerasTuner's own chief loop (``keras_tuner.src.distribute.oracle_chief.start_server``)
cannot tell that a worker died: the dead worker's trial stays ``RUNNING`` and the chief
never exits. ``serve`` replaces it with the same servicer plus:

- **Heartbeats.** A worker calls ``GetTrial`` for its trial every ``heartbeat_seconds``
  while the trial runs (``WorkerClient``); asking for trials also counts.
- **Lost workers.** A worker not heard from for ``worker_timeout`` seconds is dropped:
  its trial is ended as ``INVALID`` and KerasTuner's own rule applies: it is queued
  for a retry (the next worker that asks gets it) while ``max_retries_per_trial``
  allows, else it is ``FAILED`` (and counts toward ``max_trials``, as in KerasTuner).
  ``max_consecutive_failed_trials`` failed trials in a row stop the search.
- **Waiting for retries.** While trials are still running and retries are allowed, a
  worker that would be told to stop is told to wait (``IDLE``) instead, so a lost
  trial still finds someone to rerun it.
- **Late reports.** A result for a trial the chief gave up on is kept while the trial
  is not finished (waiting for its retry, or being rerun: the first result ends it),
  and ignored once it is ``COMPLETED`` or ``FAILED``.
- **Saving.** The oracle is saved after each trial is released (KerasTuner's chief
  saves it while the trial still counts as running, so a resumed chief reran it).
- **End.** The chief stops serving once no trial runs, no worker is connected and the
  budget is spent (or the oracle stopped), and reports as in a single-process search.

A worker restarted with the same ``KERASTUNER_TUNER_ID`` before its timeout gets its
unfinished trial back (KerasTuner hands an ongoing trial to the tuner id it belongs to)
and reruns it from its start.
"""

import os
import threading
import time
from concurrent import futures

import grpc
from keras_tuner.src import protos
from keras_tuner.src.distribute import oracle_client
from keras_tuner.src.distribute.oracle_chief import OracleServicer
from keras_tuner.src.engine import trial as trial_module

TrialStatus = trial_module.TrialStatus

ENV_TUNER_ID = "KERASTUNER_TUNER_ID"
ENV_IP = "KERASTUNER_ORACLE_IP"
ENV_PORT = "KERASTUNER_ORACLE_PORT"
# How long a worker waits for the chief's server (KerasTuner's own gRPC timeout).
CHIEF_WAIT_SECONDS = oracle_client.TIMEOUT
IDLE_WAIT_SECONDS = 1.0  # a worker told to wait asks again after this long
POLL_SECONDS = 0.5  # how often the chief looks for lost workers and for the end


class Role:
    """This process's part in a search: ``kind`` is ``"single"``, ``"chief"`` or ``"worker"``."""

    def __init__(self, kind, tuner_id="tuner0", address=None):
        self.kind = kind
        self.tuner_id = tuner_id
        self.address = address  # "ip:port" of the chief's oracle server

    def __repr__(self):
        return f"Role({self.kind!r}, tuner_id={self.tuner_id!r}, address={self.address!r})"


def role(environ=None):
    """Reads this process's role from KerasTuner's environment variables.

    Follows ``keras_tuner.src.distribute.utils``: distributed when
    ``KERASTUNER_ORACLE_IP`` is set; the chief is the tuner id containing ``chief``.
    """
    env = os.environ if environ is None else environ
    if ENV_IP not in env:
        return Role("single", env.get(ENV_TUNER_ID, "tuner0"))
    missing = [name for name in (ENV_PORT, ENV_TUNER_ID) if not env.get(name)]
    if missing:
        raise ValueError(f"{ENV_IP} is set, so this is a distributed search, but "
                         + " and ".join(missing) + " is not. Received: "
                         + ", ".join(f"{n}={env.get(n)!r}" for n in (ENV_IP, ENV_PORT,
                                                                    ENV_TUNER_ID)))
    port = env[ENV_PORT]
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{ENV_PORT} must be a port number (1-65535). "
                         f"Received: {ENV_PORT}={port!r}")
    tuner_id = env[ENV_TUNER_ID]
    kind = "chief" if "chief" in tuner_id else "worker"
    return Role(kind, tuner_id, f"{env[ENV_IP]}:{port}")


def heartbeat_seconds(worker_timeout):
    """A worker's heartbeat period: a sixth of the timeout, at most 10 s."""
    return min(10.0, worker_timeout / 6)


def wait_for_chief(address, timeout=CHIEF_WAIT_SECONDS):
    """Blocks until the chief's oracle server at ``address`` accepts connections."""
    print(f"Waiting for the chief's oracle at {address} ...", flush=True)
    channel = grpc.insecure_channel(address)
    try:
        grpc.channel_ready_future(channel).result(timeout=timeout)
    except grpc.FutureTimeoutError:
        raise RuntimeError(f"No chief answered at {address} within {timeout:g} s; start the "
                           f"chief ({ENV_TUNER_ID}=chief) with the same command.") from None
    finally:
        channel.close()


class WorkerClient(oracle_client.OracleClient):
    """KerasTuner's ``OracleClient`` plus heartbeats and a pause when told to wait."""

    def __init__(self, oracle, heartbeat):
        super().__init__(oracle)
        self.heartbeat = heartbeat
        self._beat = None

    def create_trial(self, tuner_id):
        trial = super().create_trial(tuner_id)
        if trial.status == TrialStatus.IDLE:
            time.sleep(IDLE_WAIT_SECONDS)  # KerasTuner asks again at once otherwise
        return trial

    def start_heartbeat(self, trial_id):
        self.stop_heartbeat()
        stop = threading.Event()
        request = protos.get_service().GetTrialRequest(trial_id=trial_id)

        def beat():
            while not stop.wait(self.heartbeat):
                try:
                    self.stub.GetTrial(request, timeout=max(self.heartbeat, 1.0))
                except grpc.RpcError:
                    pass  # the chief may be restarting; the trial goes on

        thread = threading.Thread(target=beat, name=f"heartbeat-{trial_id}", daemon=True)
        thread.start()
        self._beat = (stop, thread)

    def stop_heartbeat(self):
        if self._beat is not None:
            stop, thread = self._beat
            stop.set()
            thread.join(timeout=5)
            self._beat = None


def use_worker_client(tuner, heartbeat):
    """Swaps the ``OracleClient`` KerasTuner gave a worker tuner for a ``WorkerClient``."""
    client = tuner.oracle
    if not isinstance(client, oracle_client.OracleClient):
        return
    worker = WorkerClient(client._oracle, heartbeat)
    worker.multi_worker, worker.should_report = client.multi_worker, client.should_report
    tuner.oracle = worker


def _response(name, **fields):
    return getattr(protos.get_service(), name)(**fields)


class ChiefServicer(OracleServicer):
    """KerasTuner's ``OracleServicer`` that also notices lost workers (module docstring).

    ``clock`` is ``time.monotonic`` (a test may pass its own). The oracle's own
    ``max_consecutive_failed_trials`` check is done here instead: in KerasTuner it
    raises inside ``end_trial`` while holding the oracle's lock, which would stall
    every later request.
    """

    def __init__(self, oracle, worker_timeout, clock=time.monotonic):
        super().__init__(oracle)
        self.worker_timeout = worker_timeout
        self.clock = clock
        self.lock = threading.RLock()
        self.last_seen = {}
        self.lost = []  # {"tuner_id", "trial", "outcome"} per lost worker
        self.ended = []  # trial ids whose end a worker reported, in order
        self.fatal = None
        self.max_failures = oracle.max_consecutive_failed_trials
        oracle.max_consecutive_failed_trials = None  # checked in _end_trial

    # --- bookkeeping -----------------------------------------------------------------

    def _seen(self, tuner_id):
        if tuner_id is not None:
            self.last_seen[tuner_id] = self.clock()

    def _runner(self, trial_id):
        """The tuner id running ``trial_id``, or None."""
        return next((tuner_id for tuner_id, trial in self.oracle.ongoing_trials.items()
                     if trial.trial_id == trial_id), None)

    def _accepts(self, trial_id):
        return self._runner(trial_id) is not None or trial_id in self.oracle._retry_queue

    def _end_trial(self, trial):
        oracle = self.oracle
        if trial.trial_id in oracle._retry_queue:  # a late result for a queued retry
            oracle._retry_queue.remove(trial.trial_id)
        oracle.end_trial(trial)
        # KerasTuner saves the oracle before it releases the trial (a single-process tuner
        # saves again right after): save the released state, or a resumed chief would
        # run this trial again.
        oracle.save()
        if self.max_failures and self.fatal is None:
            failures = 0
            for trial_id in reversed(oracle.end_order):
                if oracle.trials[trial_id].status != TrialStatus.FAILED:
                    break
                failures += 1
            if failures >= self.max_failures:
                self.fatal = (f"Number of consecutive failures exceeded the limit of "
                              f"{self.max_failures}.\n" + (trial.message or ""))
                print(f"Stopping the search: {self.fatal}", flush=True)

    # --- the gRPC methods --------------------------------------------------------------

    def CreateTrial(self, request, context):
        with self.lock:
            oracle, tuner_id = self.oracle, request.tuner_id
            self._seen(tuner_id)
            if self.fatal is not None:
                oracle.tuner_ids.discard(tuner_id)
                self.stop_triggered = True
                trial = trial_module.Trial(oracle.get_space(), status=TrialStatus.STOPPED)
                return _response("CreateTrialResponse", trial=trial.to_proto())
            if tuner_id in oracle.ongoing_trials:
                print(f"Worker {tuner_id} is back: its trial "
                      f"{oracle.ongoing_trials[tuner_id].trial_id} is handed to it again.",
                      flush=True)
            trial = oracle.create_trial(tuner_id)
            if trial.status == TrialStatus.STOPPED:
                if oracle.ongoing_trials and oracle.max_retries_per_trial:
                    # A running trial may still be lost and need a retry: wait.
                    oracle.tuner_ids.add(tuner_id)
                    trial = trial_module.Trial(oracle.get_space(), status=TrialStatus.IDLE)
                else:
                    self.stop_triggered = True
            return _response("CreateTrialResponse", trial=trial.to_proto())

    def GetTrial(self, request, context):
        with self.lock:
            self._seen(self._runner(request.trial_id))  # a worker's heartbeat
            return super().GetTrial(request, context)

    def UpdateTrial(self, request, context):
        with self.lock:
            if not self._accepts(request.trial_id):
                print(f"Ignoring a late result for trial {request.trial_id} (its worker "
                      "was given up on).", flush=True)
                trial = self.oracle.get_trial(request.trial_id)
                return _response("UpdateTrialResponse", trial=trial.to_proto())
            self._seen(self._runner(request.trial_id))
            return super().UpdateTrial(request, context)

    def EndTrial(self, request, context):
        with self.lock:
            trial = trial_module.Trial.from_proto(request.trial)
            if self._accepts(trial.trial_id):
                self._seen(self._runner(trial.trial_id))
                self._end_trial(trial)
                self.ended.append(trial.trial_id)
            else:
                print(f"Ignoring the late end of trial {trial.trial_id}.", flush=True)
            return _response("EndTrialResponse")

    def GetBestTrials(self, request, context):
        with self.lock:
            return super().GetBestTrials(request, context)

    def GetSpace(self, request, context):
        with self.lock:
            return super().GetSpace(request, context)

    def UpdateSpace(self, request, context):
        with self.lock:
            return super().UpdateSpace(request, context)

    # --- the chief's loop --------------------------------------------------------------

    def check_workers(self):
        """Drops the workers not heard from for ``worker_timeout``; ends their trials."""
        with self.lock:
            now = self.clock()
            for tuner_id in sorted(self.oracle.tuner_ids):
                seen = self.last_seen.setdefault(tuner_id, now)
                if now - seen <= self.worker_timeout:
                    continue
                self.oracle.tuner_ids.discard(tuner_id)
                trial = self.oracle.ongoing_trials.get(tuner_id)
                if trial is None:
                    print(f"Worker {tuner_id} lost (no contact for {now - seen:.0f} s); "
                          "it had no trial.", flush=True)
                    self.lost.append({"tuner_id": tuner_id, "trial": None, "outcome": None})
                    continue
                trial.status = TrialStatus.INVALID
                trial.message = (f"Worker {tuner_id} lost: no contact for {now - seen:.0f} s "
                                 f"(worker_timeout {self.worker_timeout:g} s).")
                self._end_trial(trial)
                outcome = "retry" if trial.trial_id in self.oracle._retry_queue else \
                    str(trial.status)
                print(f"{trial.message} Trial {trial.trial_id}: "
                      + ("queued for a retry." if outcome == "retry" else f"{outcome}."),
                      flush=True)
                self.lost.append({"tuner_id": tuner_id, "trial": trial.trial_id,
                                  "outcome": outcome})

    def finished(self):
        """True once no trial runs, no worker is connected and the search is over."""
        with self.lock:
            oracle = self.oracle
            if oracle.ongoing_trials or oracle.tuner_ids:
                return False
            if self.stop_triggered or self.fatal is not None:
                return True
            return search_is_over(oracle)


def tidy_retry_queue(oracle):
    """Drops finished trials from a reloaded oracle's retry queue (a chief stopped by
    KerasTuner's own loop saved its last trial as still running)."""
    done = (TrialStatus.COMPLETED, TrialStatus.FAILED)
    oracle._retry_queue = [t for t in oracle._retry_queue if oracle.trials[t].status not in done]


def search_is_over(oracle):
    """True when the trial budget is spent and no trial waits for a retry."""
    return bool(oracle.max_trials) and len(oracle.trials) >= oracle.max_trials \
        and not oracle._retry_queue and not oracle.ongoing_trials


def serve(oracle, address, worker_timeout, poll=POLL_SECONDS):
    """Serves ``oracle`` at ``address`` until the search is over; returns the servicer.

    Raises ``ValueError`` when the address cannot be bound and ``RuntimeError`` when
    too many trials failed in a row (after the running trials have ended).
    """
    servicer = ChiefServicer(oracle, worker_timeout)
    # Without SO_REUSEPORT a second chief on the same port fails instead of sharing it.
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4),
                         options=[("grpc.so_reuseport", 0)])
    protos.get_service_grpc().add_OracleServicer_to_server(servicer, server)
    try:
        bound = server.add_insecure_port(address)
    except RuntimeError:
        bound = 0
    if not bound:
        raise ValueError(f"The chief cannot listen at {address} (address in use or not "
                           f"this machine's). Received: {ENV_IP}:{ENV_PORT}={address!r}")
    server.start()
    print(f"Chief: serving the oracle at {address} (worker timeout {worker_timeout:g} s).",
          flush=True)
    try:
        while not servicer.finished():
            time.sleep(poll)
            servicer.check_workers()
    finally:
        server.stop(grace=2).wait()
    if servicer.fatal is not None:
        raise RuntimeError(servicer.fatal)
    return servicer
