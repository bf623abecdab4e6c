"""``export_model``: a zoo model to SavedModel and/or ONNX, with sidecars and parity.

Layout of the output folder::

    out/saved_model/        SavedModel (signatures serving_default, serving_normalized)
    out/saved_model.json    its sidecar
    out/model.onnx          ONNX (normalised float32 NHWC images -> logits)
    out/model.onnx.json     its sidecar

Every export outputs logits (pre-softmax scores), whatever the model's classifier
activation; the sidecars say so (``"output": "logits"``). Files are written to a
staging folder next to ``out``, checked against Keras (parity), then moved in place:
a failed export leaves nothing behind.
"""

import datetime
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from keras_newton.export import onnx_export, savedmodel

FORMATS = ("savedmodel", "onnx", "both")
ONNX_FILE = "model.onnx"
SAVEDMODEL_DIR = "saved_model"
ARTIFACTS = (ONNX_FILE, f"{ONNX_FILE}.json", SAVEDMODEL_DIR, f"{SAVEDMODEL_DIR}.json")
PARITY_TOLERANCE = 1e-4
PARITY_RANDOM_IMAGES = 64
OUTPUT_KIND = "logits"


def check_format(fmt):
    if fmt not in FORMATS:
        raise ValueError(f"`format` must be one of {list(FORMATS)}. Received: format={fmt!r}")
    return ("savedmodel", "onnx") if fmt == "both" else (fmt,)


def check_out(out, overwrite):
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"`out` must be a folder; a file of that name exists. "
                         f"Received: out={str(out)!r}")
    if out.exists() and not overwrite:
        raise ValueError(
            "Output folder already exists; pass --overwrite (overwrite=True) to replace "
            f"the exported files in it. Received: out={str(out)!r}"
        )
    return out


def check_backend():
    import keras

    if keras.backend.backend() != "tensorflow":
        raise ValueError(
            "Export runs on the TensorFlow backend (set KERAS_BACKEND=tensorflow before "
            f"importing keras). Received: backend={keras.backend.backend()!r}"
        )


def resolve_weights(arch, weights):
    """``{"tag", "path", "file", "sha256", "entry"}`` for a zoo tag or a weights path."""
    from keras_newton import zoo

    if not isinstance(weights, str) or not weights:
        raise ValueError("`weights` must be a pretrained tag (see keras_newton.zoo.available()) "
                         f"or the path to a .weights.h5 file. Received: weights={weights!r}")
    if os.path.exists(weights):
        path = Path(weights)
        if not path.is_file():
            raise ValueError(f"`weights` must be a file. Received: weights={weights!r}")
        digest = zoo.file_sha256(path)
        entry = next((e for k, e in zoo.REGISTRY.items()
                      if k.split(".", 1)[0] == arch and e.get("sha256") == digest), None)
        tag = next((k.split(".", 1)[1] for k, e in zoo.REGISTRY.items() if e is entry), None)
        return {"tag": tag, "path": str(path), "file": path.name, "sha256": digest,
                "entry": entry}
    if os.sep in weights or weights.endswith((".h5", ".keras")):
        raise ValueError(f"Weights file not found. Received: weights={weights!r}")
    entry = zoo.get_entry(arch, weights)  # ValueError naming the available tags
    return {"tag": weights, "path": None, "file": entry["file"], "sha256": entry["sha256"],
            "entry": entry}


def _card(info):
    """``(card, source)``: the registry entry or ``preprocessing.json`` next to the file."""
    if info["entry"] is not None:
        return info["entry"], f"zoo registry entry {info['tag']!r}"
    if info["path"] is not None:
        sidecar = Path(info["path"]).with_name("preprocessing.json")
        if sidecar.is_file():
            return json.loads(sidecar.read_text()), str(sidecar)
    return {}, None


def resolve_preprocessing(info, preprocessing=None):
    """The ``(x - mean) / std`` card of the weights ``info`` (explicit values win)."""
    card, source = _card(info)
    prep = card.get("preprocessing", card if "mean" in card else None)
    if preprocessing is not None:
        prep, source = preprocessing, "given explicitly"
    if not prep or "mean" not in prep or "std" not in prep:
        raise ValueError(
            "No preprocessing is known for these weights (no zoo entry with this sha256, no "
            "preprocessing.json next to the file): pass --mean R G B --std R G B "
            f"(preprocessing={{'mean': [...], 'std': [...]}}). Received: weights={info['path']!r}"
        )
    mean, std = (np.asarray(prep[k], "float64").reshape(-1).tolist() for k in ("mean", "std"))
    if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
        raise ValueError("`preprocessing` needs 3 means and 3 positive stds (RGB, 0-255 units). "
                         f"Received: preprocessing={prep!r}")
    return {"mean": mean, "std": std, "formula": "(x - mean) / std",
            "input": "RGB uint8 pixels in [0, 255]", "source": source}


def resolve_class_names(info, classes, class_names=None):
    """Explicit names, else the card's, else CIFAR-10's for 10 classes, else indices."""
    from keras_newton import zoo

    names = class_names or _card(info)[0].get("class_names")
    if names is None:
        names = list(zoo.CIFAR10_CLASSES) if classes == 10 else [str(i) for i in range(classes)]
    names = [str(n) for n in names]
    if len(names) != classes:
        raise ValueError(f"The model has {classes} classes. Received: class_names={names}")
    return names


def normalize(images, preprocessing):
    return ((np.asarray(images, "float32") - np.asarray(preprocessing["mean"], "float32"))
            / np.asarray(preprocessing["std"], "float32"))


def parity(reference, candidate, tolerance=PARITY_TOLERANCE):
    """Max abs logit difference and top-1 agreement of two ``[N, classes]`` arrays."""
    reference, candidate = np.asarray(reference), np.asarray(candidate)
    diff = float(np.abs(reference - candidate).max())
    scale = float(np.abs(reference).max())
    return {
        "max_abs_logit_diff": diff,
        "max_abs_logit": scale,
        "top1_agreement": float((reference.argmax(1) == candidate.argmax(1)).mean()),
        "top1_mismatches": int((reference.argmax(1) != candidate.argmax(1)).sum()),
        "tolerance": tolerance,
        "passed": diff <= tolerance * max(1.0, scale),
    }


def _versions():
    import importlib.metadata as md

    out = {}
    for name in ("keras", "tensorflow", "tf2onnx", "onnx", "onnxruntime", "keras-newton"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    return out


def build(model, weights, optimize=False):
    """``(reference, to_export)``: the Keras logits model and what gets exported."""
    import keras

    from keras_newton.export.optimize import optimize_for_inference
    from keras_newton.models import get_model

    policy = keras.config.dtype_policy()
    keras.config.set_dtype_policy("float32")  # ONNX export needs float32 (tensorflow-onnx#2373)
    try:
        reference = get_model(model, weights=weights, classifier_activation=None)
    finally:
        keras.config.set_dtype_policy(policy)
    return reference, (optimize_for_inference(reference) if optimize else reference)


def export_model(
    model,
    weights,
    out,
    format="both",  # noqa: A002  (the CLI's --format)
    optimize=False,
    overwrite=False,
    opset=onnx_export.DEFAULT_OPSET,
    preprocessing=None,
    class_names=None,
    parity_images=None,
    parity_source=None,
    parity_tolerance=PARITY_TOLERANCE,
):
    """Exports a zoo model with its weights; returns ``{format: sidecar dict}``.

    Args:
        model: a registered model name (``keras_newton.models.MODELS``).
        weights: a pretrained tag of ``keras_newton.zoo`` or a ``.weights.h5`` path.
        out: output folder; must not exist unless ``overwrite``.
        format: ``"savedmodel"``, ``"onnx"`` or ``"both"``.
        optimize: export `optimize_for_inference(model)` (BN folded, CG Blocks merged).
        overwrite: replace the exported files in an existing ``out`` (other files stay).
        opset: ONNX opset (default 17).
        preprocessing: ``{"mean": [3], "std": [3]}`` in pixel units; default from the
            zoo card or ``preprocessing.json`` next to the weights file.
        class_names: optional list overriding the card's.
        parity_images: uint8 ``[N, H, W, 3]`` images for the parity check (default:
            64 random images, seed 0); ``parity_source`` describes them.
        parity_tolerance: max abs logit difference allowed, relative to
            ``max(1, max |logit|)``; exceeding it aborts the export (RuntimeError).
    """
    import keras

    from keras_newton.models import canonical_name

    formats = check_format(format)
    opset = onnx_export.check_opset(opset)
    out = check_out(out, overwrite)
    check_backend()
    arch = canonical_name(model)
    info = resolve_weights(arch, weights)
    prep = resolve_preprocessing(info, preprocessing)
    reference, exported = build(arch, weights, optimize)
    names = resolve_class_names(info, int(reference.output_shape[-1]), class_names)

    if parity_images is None:
        rng = np.random.default_rng(0)
        parity_images = rng.integers(0, 256, (PARITY_RANDOM_IMAGES, *savedmodel.uint8_shape(
            reference)[1:]), dtype=np.uint8)
        parity_source = f"{PARITY_RANDOM_IMAGES} uniform random uint8 images (seed 0)"
    parity_images = np.asarray(parity_images)
    if parity_images.dtype != np.uint8 or parity_images.ndim != 4:
        raise ValueError("`parity_images` must be uint8 [N, H, W, 3]. Received: "
                         f"parity_images.dtype={parity_images.dtype}, shape={parity_images.shape}")
    x = normalize(parity_images, prep)
    if savedmodel._layout(reference) == "NCHW":
        x = np.ascontiguousarray(x.transpose(0, 3, 1, 2))
    ref_logits = reference.predict(x, batch_size=256, verbose=0)
    parity_base = {"reference": "Keras model (un-optimised) predict, TensorFlow backend",
                   "images": parity_source or f"{len(x)} given images", "n": len(x)}

    card = {
        "model": arch,
        "weights": {k: info[k] for k in ("tag", "file", "sha256")},
        "optimized": bool(optimize),
        "output": OUTPUT_KIND,
        "preprocessing": prep,
        "class_names": names,
    }
    common = {**card, "created": datetime.datetime.now(datetime.UTC).isoformat(
        timespec="seconds"), "versions": _versions(),
        "keras_backend": keras.backend.backend()}
    results = {}
    if optimize:
        opt_logits = exported.predict(x, batch_size=256, verbose=0)
        keras_opt = {**parity_base, **parity(ref_logits, opt_logits, parity_tolerance)}
        _check(keras_opt, "optimised Keras model")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        if "savedmodel" in formats:
            import tensorflow as tf

            path = staging / SAVEDMODEL_DIR
            signatures = savedmodel.export_savedmodel(exported, path, prep["mean"], prep["std"])
            loaded = tf.saved_model.load(str(path))
            checks = {
                sig: {**parity_base, **parity(ref_logits, savedmodel.run_savedmodel(
                    loaded, parity_images if sig == savedmodel.UINT8_SIGNATURE else x, sig),
                    parity_tolerance)}
                for sig in signatures
            }
            for sig, check in checks.items():
                _check(check, f"SavedModel signature {sig}")
            results["savedmodel"] = {
                "format": "savedmodel", "path": SAVEDMODEL_DIR, **common,
                "signatures": signatures, "default_signature": savedmodel.UINT8_SIGNATURE,
                "parity": {**checks, **({"keras_optimized": keras_opt} if optimize else {})},
            }
        if "onnx" in formats:
            from keras_newton.export.runtime import OnnxClassifier

            path = staging / ONNX_FILE
            onnx_export.export_onnx(exported, path, opset=opset, metadata=card)
            report = onnx_export.graph_report(path)
            session = OnnxClassifier(path)
            logits = np.concatenate([session.run(x[i:i + 256]) for i in range(0, len(x), 256)])
            check = {**parity_base, **parity(ref_logits, logits, parity_tolerance)}
            _check(check, "ONNX Runtime")
            results["onnx"] = {
                "format": "onnx", "path": ONNX_FILE, **common,
                "opset": report["opset"], "inputs": [{**report["inputs"][0], "layout":
                                                      savedmodel._layout(exported),
                                                      "normalized": True}],
                "outputs": report["outputs"], "op_types": report["op_types"],
                "runtime": "onnxruntime CPUExecutionProvider",
                "parity": {"onnxruntime": check,
                           **({"keras_optimized": keras_opt} if optimize else {})},
            }
        for fmt, sidecar in results.items():
            name = SAVEDMODEL_DIR if fmt == "savedmodel" else ONNX_FILE
            (staging / f"{name}.json").write_text(json.dumps(sidecar, indent=1) + "\n")
        out.mkdir(exist_ok=True)
        for name in ARTIFACTS:
            target = out / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
            if (staging / name).exists():
                (staging / name).rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return results


def _check(check, what):
    if not check["passed"]:
        raise RuntimeError(
            f"Parity check failed for the {what}: max abs logit difference "
            f"{check['max_abs_logit_diff']:.3g} > {check['tolerance']:g} x max(1, "
            f"{check['max_abs_logit']:.3g}); nothing was written."
        )
