"""Reading the files a user hands to keras-newton (JSON cards, ``.weights.h5``), and
writing a run's text files whole (`atomic_write_text`).

Every failure -- a missing file, a folder, bytes that are not what was expected -- is a
ValueError that names the file and says what was expected; the command line prints it
as one line (``keras-newton <command>: error: ...``). Images and image archives are read
by `keras_newton.data.image_folder`, which does the same.
"""

import contextlib
import json
import os
import warnings
from pathlib import Path


def atomic_write_text(path, text):
    """Writes ``text`` to ``path`` through a temporary file: a reader (or a run killed
    meanwhile) sees the old file or the new one, never a part."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _one_line(error):
    return " ".join(str(error).split()) or type(error).__name__


def read_json(path, what="JSON file"):
    """The parsed content of the JSON file ``path``; ``what`` names it in errors."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"The {what} {str(path)!r} does not exist"
                         f"{' (it is a folder)' if path.is_dir() else ''}.")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"The {what} {str(path)!r} is not valid JSON ({_one_line(e)}); it "
                         "may be truncated or corrupt.") from e


@contextlib.contextmanager
def warnings_unless_it_fails(drop=()):
    """Holds back the warnings of the block: issued when it ends without an exception
    (except those whose message contains a string of ``drop``), dropped with its exception.
    Keras warns "Affected layers will retain their freshly-initialized weights" before it
    raises for a weights file that does not fit: the error alone tells what happened."""
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        yield
    for w in seen:
        if not any(text in str(w.message) for text in drop):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)


def load_weights(model, path):
    """``model.load_weights(path)``; a ValueError naming the file when it does not fit.

    h5py raises OSError for a truncated or non-HDF5 file, Keras ValueError or KeyError
    for weights of another architecture.
    """
    try:
        with warnings_unless_it_fails():
            model.load_weights(path)
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(
            f"Could not load the weights file {str(path)!r} into {model.name!r} "
            f"({type(e).__name__}: {_one_line(e)}); expected a Keras `.weights.h5` file "
            "saved from this architecture (it may be truncated or corrupt)."
        ) from e
    return model
