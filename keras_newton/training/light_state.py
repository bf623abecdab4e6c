"""A run's light state: what resumes it on another machine, without the optimizer's momentum.

``BackupAndRestore`` (``out/backup``) keeps the last finished epoch with the optimizer's
state: twice the weights, and tied to the folder it was written in. The light state is
written beside it after every epoch and is what a run folder carries to another machine
(a commit, a GPU machine and back):

- ``last.weights.h5``: the model's weights after the last finished epoch (no optimizer).
- ``state.json``: ``epochs_done``, the optimizer's step counter ``iterations`` (the
  schedule's position), ``steps_per_epoch`` and the next step's ``lr``.
- ``legs.json``: one entry per call of ``train`` (first epoch, how it resumed, backend,
  precision, device), for the model card.
- with the run's ``config.json``, ``preprocessing.json``, ``history.csv``, ``best.json``,
  ``best.weights.h5`` (the optimizer stripped; left out when the best epoch is the last
  one: ``last.weights.h5`` is then the best), ``curves.png``, ``budget.json``,
  ``summary.json`` and ``SHA256SUMS``: `snapshot` copies these into a folder.
  ``init.weights.h5`` (the ``--init-weights`` file a run started from) only matters
  before the first epoch: `snapshot` leaves it out once an epoch is done (config.json
  keeps its record). ``swa.npz``: the weight average of a run with ``swa_epochs``.

Resuming from it (`restore`) loads the weights and the step counter into a freshly
compiled model: the schedule continues at its exact position, the momentum buffers start
from zero (SGD rebuilds them within about 1 / (1 - momentum) = 10 steps). A backup of a
later or the same epoch is preferred when there is one (same machine).
"""

import datetime
import hashlib
import json
import os
import shutil
from pathlib import Path

import keras

from keras_newton.files import atomic_write_text, warnings_unless_it_fails

LAST_WEIGHTS = "last.weights.h5"
STATE_JSON = "state.json"
LEGS_JSON = "legs.json"
SUMS = "SHA256SUMS"
# A copy of the `--init-weights` file (`trainer.train`), loaded when the run starts.
INIT_WEIGHTS = "init.weights.h5"
# The running weight average of a run with `swa_epochs` (`swa.WeightAverage`).
SWA_NPZ = "swa.npz"
# Copied by `snapshot` when present (besides the weights, treated apart).
SNAPSHOT_FILES = ("config.json", "preprocessing.json", "history.csv", "best.json",
                  "curves.png", "budget.json", "summary.json", STATE_JSON, LEGS_JSON, SWA_NPZ)
BEST_WEIGHTS = "best.weights.h5"
BEST_JSON = "best.json"
BACKUP_METADATA = ("backup", "training_metadata.json")


def strip_optimizer(src, dst):
    """Copies a ``.weights.h5`` file without its ``optimizer`` group (deterministic bytes)."""
    import h5py

    with h5py.File(src, "r") as source, h5py.File(dst, "w") as target:
        for key in source:
            if key != "optimizer":
                source.copy(key, target)


def save_model_weights(model, path):
    """Saves the model's weights without the optimizer's variables, atomically."""
    path = Path(path)
    full = path.with_name(f".{path.name}.full.weights.h5")
    tmp = path.with_name(f".{path.name}.tmp.weights.h5")
    model.save_weights(full, overwrite=True)
    strip_optimizer(full, tmp)
    full.unlink()
    os.replace(tmp, path)


def load_model_weights(model, path):
    """Loads a ``.weights.h5`` file; one without the optimizer's variables leaves the
    optimizer as it is (Keras warns that it skipped it: silenced here). A file that does
    not fit raises Keras' ValueError, without its warnings (`warnings_unless_it_fails`)."""
    with warnings_unless_it_fails(drop=("Skipping variable loading for optimizer",)):
        model.load_weights(path)


def file_sha256(path, chunk_size=1 << 20):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def write_sums(folder, names):
    """Writes ``folder/SHA256SUMS`` (``sha256sum`` format, names relative to ``folder``)."""
    folder = Path(folder)
    lines = [f"{file_sha256(folder / n)}  {n}\n" for n in sorted(names)]
    atomic_write_text(folder / SUMS, "".join(lines))


def check_sums(folder):
    """Checks every file that ``folder/SHA256SUMS`` lists; ValueError naming the bad ones."""
    folder = Path(folder)
    bad = []
    for line in (folder / SUMS).read_text().splitlines():
        if not line.strip():
            continue
        digest, name = line.split(maxsplit=1)
        name = name.lstrip("*")
        if not (folder / name).exists():
            bad.append(f"{name} (missing)")
        elif file_sha256(folder / name) != digest:
            bad.append(f"{name} (sha256 differs)")
    if bad:
        raise ValueError(f"The run's light state does not match its {SUMS}: "
                         f"{', '.join(bad)}. Received: out={str(folder)!r}")


def read_state(out):
    path = Path(out) / STATE_JSON
    return json.loads(path.read_text()) if path.exists() else None


def backup_epoch(out):
    """Epochs done according to ``out/backup`` (BackupAndRestore), None without one."""
    path = Path(out).joinpath(*BACKUP_METADATA)
    if not path.exists():
        return None
    try:
        return int(json.loads(path.read_text())["epoch"])
    except (ValueError, KeyError):
        return None


def epochs_done(out, kind):
    """Epochs done by the run in ``out`` that resumes as ``kind`` (`resume_kind`); 0 for
    a new run (``kind`` None)."""
    if kind == "light":
        return int(read_state(out)["epochs_done"])
    if kind == "backup":
        return backup_epoch(out) or 0
    return 0


def resume_kind(out):
    """How a run in ``out`` resumes: ``"backup"`` (with momentum), ``"light"``, or None.

    The backup wins when it is at least as recent as the light state; a backup older than
    the light state (a newer light state copied over the folder) is set aside in
    ``backup.old``.
    """
    out = Path(out)
    state = read_state(out)
    has_light = state is not None and (out / LAST_WEIGHTS).exists()
    backup = backup_epoch(out)
    if (out / "backup").exists() and (not has_light or (backup or 0) >= state["epochs_done"]):
        return "backup"
    if not has_light:
        return None
    if (out / "backup").exists():
        old = out / "backup.old"
        if old.exists():
            shutil.rmtree(old)
        os.replace(out / "backup", old)
        print(f"The backup in {out / 'backup'} (epoch {backup}) is older than the light state "
              f"(epoch {state['epochs_done']}): moved to {old}.")
    return "light"


def _best_is_last(best, state):
    """Whether the best weights are the last epoch's (a weight average never is)."""
    return best["epoch"] == state["epochs_done"] and not best.get("swa_epochs")


def restore(model, out):
    """Loads the light state of ``out`` into ``model`` (built, not yet compiled).

    Checks ``SHA256SUMS`` when there is one, loads ``last.weights.h5``, and writes the best
    weights back as ``best.weights.h5`` when the light state left them out (best epoch =
    last epoch). Returns the state (``epochs_done``, ``iterations``, ...); the caller sets
    ``optimizer.iterations`` after compiling.
    """
    out = Path(out)
    if (out / SUMS).exists():
        check_sums(out)
    state = read_state(out)
    load_model_weights(model, out / LAST_WEIGHTS)
    best_path = out / BEST_JSON
    best = json.loads(best_path.read_text()) if best_path.exists() else None
    if best is not None and _best_is_last(best, state):
        shutil.copyfile(out / LAST_WEIGHTS, out / BEST_WEIGHTS)
    return state


def append_leg(out, leg):
    """Appends ``leg`` (a dict) to ``out/legs.json``; returns the list."""
    path = Path(out) / LEGS_JSON
    legs = json.loads(path.read_text()) if path.exists() else []
    legs.append({"date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                 **leg})
    atomic_write_text(path, json.dumps(legs, indent=1))
    return legs


def read_legs(out):
    path = Path(out) / LEGS_JSON
    return json.loads(path.read_text()) if path.exists() else []


class LightState(keras.callbacks.Callback):
    """Writes the light state (``last.weights.h5``, ``state.json``) after every epoch.

    The first write of a call also removes ``SHA256SUMS``: it described the state this
    call started from.

    Args:
        out: the run folder.
        steps_per_epoch: training steps per epoch (recorded).
    """

    def __init__(self, out, steps_per_epoch):
        super().__init__()
        self.out, self.steps_per_epoch = Path(out), int(steps_per_epoch)

    def on_epoch_end(self, epoch, logs=None):
        sums = self.out / SUMS
        if sums.exists():
            sums.unlink()
        save_model_weights(self.model, self.out / LAST_WEIGHTS)
        optimizer = self.model.optimizer
        iterations = int(keras.ops.convert_to_numpy(optimizer.iterations))
        atomic_write_text(self.out / STATE_JSON, json.dumps({
            "epochs_done": epoch + 1, "iterations": iterations,
            "steps_per_epoch": self.steps_per_epoch,
            "lr": float(keras.ops.convert_to_numpy(optimizer.learning_rate)),
            "optimizer_state": "not kept: momentum restarts from zero on a light resume",
        }, indent=1))


def _copy_state(run, to, state):
    for name in (*SNAPSHOT_FILES, LAST_WEIGHTS, BEST_WEIGHTS, INIT_WEIGHTS, SUMS):
        if (to / name).exists():
            (to / name).unlink()
    names = [n for n in SNAPSHOT_FILES if (run / n).exists()]
    if state["epochs_done"] == 0 and (run / INIT_WEIGHTS).exists():
        names.append(INIT_WEIGHTS)  # not started yet: the start still needs it
    for name in names:
        shutil.copyfile(run / name, to / name)
    shutil.copyfile(run / LAST_WEIGHTS, to / LAST_WEIGHTS)
    names.append(LAST_WEIGHTS)
    best = json.loads((to / BEST_JSON).read_text()) if (to / BEST_JSON).exists() else None
    if best is not None and not _best_is_last(best, state):
        strip_optimizer(run / BEST_WEIGHTS, to / BEST_WEIGHTS)
        names.append(BEST_WEIGHTS)
    (to / STATE_JSON).write_text(json.dumps(state, indent=1))
    return names


def snapshot(run, to):
    """Copies the light state of the run folder ``run`` into ``to``, with ``SHA256SUMS``.

    The best weights are stripped of the optimizer's state, and left out when the best
    epoch is the last finished one (`restore` writes them back from
    ``last.weights.h5``); ``init.weights.h5`` is left out once an epoch is done. Light-state
    files already in ``to`` are replaced, stale best and init weights removed.

    Returns:
        The names written, ``SHA256SUMS`` last.
    """
    run, to = Path(run), Path(to)
    state = read_state(run)
    if state is None or not (run / LAST_WEIGHTS).exists():
        raise ValueError(f"The run folder has no light state ({STATE_JSON}, {LAST_WEIGHTS}; "
                         "written after each epoch by `keras-newton train`). "
                         f"Received: run={str(run)!r}")
    if to.resolve() == run.resolve():
        raise ValueError(f"`to` must be another folder than the run. Received: to={str(to)!r}")
    to.mkdir(parents=True, exist_ok=True)
    for _ in range(3):  # a run training in `run` may finish an epoch meanwhile: copy again
        names = _copy_state(run, to, state)
        now = read_state(run)
        if now == state:
            break
        state = now
    else:
        raise RuntimeError(f"The run in {run} kept changing while it was copied; try again.")
    write_sums(to, names)
    return [*names, SUMS]
