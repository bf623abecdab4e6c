"""``export_model``: a zoo model to SavedModel and/or ONNX, with sidecars and parity.

Layout of the output folder::

    out/saved_model/        SavedModel (signatures serving_default, serving_normalized)
    out/saved_model.json    its sidecar
    out/model.onnx          ONNX (normalised float32 NHWC images -> logits)
    out/model.onnx.json     its sidecar
    out/model.int8.onnx     with quantize="int8": the same graph quantized (QDQ int8; same
    out/model.int8.onnx.json  inputs and outputs), its sidecar with the accuracy vs fp32

Every export outputs logits (pre-softmax scores), whatever the model's classifier
activation; the sidecars say so (``"output": "logits"``). Files are written to a
staging folder next to ``out``, checked against Keras (parity), then moved in place:
a failed export leaves nothing behind.
"""

import datetime
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np

from keras_newton.export import onnx_export, savedmodel

FORMATS = ("savedmodel", "onnx", "both")
ONNX_FILE = "model.onnx"
INT8_FILE = "model.int8.onnx"
SAVEDMODEL_DIR = "saved_model"
ARTIFACTS = (ONNX_FILE, f"{ONNX_FILE}.json", INT8_FILE, f"{INT8_FILE}.json", SAVEDMODEL_DIR,
             f"{SAVEDMODEL_DIR}.json")
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

    if weights is None:
        raise ValueError("`weights` must be a pretrained tag (see keras_newton.zoo.available()) "
                         f"or the path to a .weights.h5 file. Received: weights={weights!r}")
    return zoo.resolve_weights(arch, weights)


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
    from keras_newton.preprocessing import normalize as _normalize

    return _normalize(images, preprocessing["mean"], preprocessing["std"], "channels_last")


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
    quantize=None,
    calibration_data=None,
    calibration_size=None,
    dataset="cifar10",
    val_size=None,
    split_seed=None,
    validation_limit=None,
    max_accuracy_drop=None,
    quantize_exclude=(),
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
        quantize: ``"int8"`` also writes ``model.int8.onnx`` (`keras_newton.export.quantize`:
            static QDQ, per-channel 7-bit weights, uint8 activations) from the optimised
            graph (implies ``optimize``; needs the ONNX format), sidecar key ``"onnx_int8"``.
        calibration_data: folder or archive of ``split/<class>/<image>`` files whose
            training split is held out as in training (``val_size``, ``split_seed``: default
            the registry entry's evaluation split, else 5000 and 0); calibration images come
            from the training part, the accuracy against fp32 is measured on the hold-out
            (``validation_limit`` images of it, class-balanced, if given). Default: the
            tensorflow-datasets ``dataset``.
        calibration_size: calibration images (default 512).
        max_accuracy_drop: top-1 points int8 may lose against fp32 on the validation
            images (default 0.5); more aborts the export (RuntimeError).
        quantize_exclude: node names kept in fp32.
    """
    import keras

    from keras_newton.export import quantize as quant
    from keras_newton.models import canonical_name

    formats = check_format(format)
    opset = onnx_export.check_opset(opset)
    if quant.check_quantize(quantize) and "onnx" not in formats:
        raise ValueError("`quantize` needs the ONNX format ('onnx' or 'both'). "
                         f"Received: format={format!r}, quantize={quantize!r}")
    optimize = bool(optimize or quantize)
    out = check_out(out, overwrite)
    check_backend()
    arch = canonical_name(model)
    info = resolve_weights(arch, weights)
    prep = resolve_preprocessing(info, preprocessing)
    holdout = None
    if quantize:  # the data first: a wrong path fails before the slow export
        split = (info["entry"] or {}).get("eval") or {}
        holdout = quant.holdout_data(
            calibration_data, dataset, calibration_size or quant.DEFAULT_CALIBRATION_SIZE,
            val_size or split.get("val_size", quant.DEFAULT_VAL_SIZE),
            split.get("seed", 0) if split_seed is None else split_seed, validation_limit)
    reference, exported = build(arch, weights, optimize)
    names = resolve_class_names(info, int(reference.output_shape[-1]), class_names)

    check = ParityCheck(reference, *parity_sample(reference, parity_images, parity_source),
                        prep, parity_tolerance)
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
    optimized = {}
    if optimize:
        optimized["keras_optimized"] = check(
            exported.predict(check.x, batch_size=256, verbose=0), "optimised Keras model")

    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        written = {}
        if "savedmodel" in formats:
            written["savedmodel"] = (SAVEDMODEL_DIR, _write_savedmodel(
                exported, staging / SAVEDMODEL_DIR, check, prep))
        if "onnx" in formats:
            written["onnx"] = (ONNX_FILE, _write_onnx(exported, staging / ONNX_FILE, check,
                                                      opset, card))
        results = {fmt: {"format": fmt, "path": path, **common, **fields,
                         "parity": {**fields["parity"], **optimized}}
                   for fmt, (path, fields) in written.items()}
        if quantize:
            fields = _write_int8(staging / ONNX_FILE, staging / INT8_FILE, check, holdout,
                                 max_accuracy_drop, quantize_exclude, names,
                                 written["onnx"][1]["inputs"][0]["layout"])
            results["onnx_int8"] = {"format": "onnx", "path": INT8_FILE, **common, **fields}
        _install(staging, out, results)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return results


def parity_sample(reference, images=None, source=None):
    """``(uint8 images [N, H, W, 3], description)`` to check parity on (default: random)."""
    if images is None:
        shape = (PARITY_RANDOM_IMAGES, *savedmodel.uint8_shape(reference)[1:])
        return (np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8),
                f"{PARITY_RANDOM_IMAGES} uniform random uint8 images (seed 0)")
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4:
        raise ValueError("`parity_images` must be uint8 [N, H, W, 3]. Received: "
                         f"parity_images.dtype={images.dtype}, shape={images.shape}")
    return images, source or f"{len(images)} given images"


class ParityCheck:
    """The Keras reference's logits on the parity images; checks each export against them.

    ``images`` are the uint8 NHWC images (what the SavedModel's default signature takes),
    ``x`` the same normalised in the model's layout (what the model and ONNX take).
    """

    def __init__(self, reference, images, source, preprocessing, tolerance=PARITY_TOLERANCE):
        self.images = images
        x = normalize(images, preprocessing)
        if savedmodel._layout(reference) == "NCHW":
            x = np.ascontiguousarray(x.transpose(0, 3, 1, 2))
        self.x = x
        self.tolerance = tolerance
        self.logits = reference.predict(x, batch_size=256, verbose=0)
        self.base = {"reference": "Keras model (un-optimised) predict, TensorFlow backend",
                     "images": source, "n": len(x)}

    def __call__(self, logits, what):
        """The parity record of ``logits``; RuntimeError past the tolerance (see `_check`)."""
        check = {**self.base, **parity(self.logits, logits, self.tolerance)}
        _check(check, what)
        return check


def _write_savedmodel(model, path, check, prep):
    """Writes the SavedModel at ``path``; its sidecar's fields, parity checked."""
    import tensorflow as tf

    signatures = savedmodel.export_savedmodel(model, path, prep["mean"], prep["std"])
    loaded = tf.saved_model.load(str(path))
    checks = {}
    for sig in signatures:
        images = check.images if sig == savedmodel.UINT8_SIGNATURE else check.x
        checks[sig] = check(savedmodel.run_savedmodel(loaded, images, sig),
                            f"SavedModel signature {sig}")
    return {"signatures": signatures, "default_signature": savedmodel.UINT8_SIGNATURE,
            "parity": checks}


def _write_onnx(model, path, check, opset, metadata):
    """Writes the ONNX file at ``path``; its sidecar's fields, parity checked in ORT."""
    from keras_newton.export.runtime import OnnxClassifier

    onnx_export.export_onnx(model, path, opset=opset, metadata=metadata)
    report = onnx_export.graph_report(path)
    session = OnnxClassifier(path)
    x = check.x
    logits = np.concatenate([session.run(x[i:i + 256]) for i in range(0, len(x), 256)])
    return {
        "opset": report["opset"],
        "inputs": [{**report["inputs"][0], "layout": savedmodel._layout(model),
                    "normalized": True}],
        "outputs": report["outputs"], "op_types": report["op_types"],
        "runtime": "onnxruntime CPUExecutionProvider",
        "parity": {"onnxruntime": check(logits, "ONNX Runtime")},
    }


def _write_int8(fp32_path, path, check, holdout, max_drop, exclude, class_names, layout):
    """Writes the int8 file at ``path`` from the staged fp32 export; its sidecar's fields.

    Accuracy against the fp32 file is measured on the validation images (never
    calibrated on); a drop of more than ``max_drop`` points aborts (RuntimeError).
    """
    from keras_newton.export import quantize as quant
    from keras_newton.export.runtime import OnnxClassifier

    if list(holdout.class_names) != list(class_names):
        raise ValueError(f"The calibration data's classes {holdout.class_names} are not the "
                         f"model's {class_names}. Received: calibration source "
                         f"{holdout.source!r}")
    record = quant.quantize_onnx(fp32_path, path, holdout.calibration, exclude)
    record["calibration"].update(holdout.calibration_record())
    max_drop = quant.DEFAULT_MAX_ACCURACY_DROP if max_drop is None else float(max_drop)
    accuracy = quant.compare_accuracy(
        fp32_path, path, holdout.images, holdout.labels,
        f"{len(holdout.labels)} validation images of {holdout.source} ({holdout.split})",
        max_drop)
    if not accuracy["passed"]:
        raise RuntimeError(
            f"The int8 export loses {accuracy['drop_points']:.2f} points of top-1 against "
            f"fp32 ({100 * accuracy['int8_top1']:.2f}% vs {100 * accuracy['fp32_top1']:.2f}% "
            f"on {accuracy['n']} validation images), more than {max_drop:g}; nothing was "
            "written.")
    report = onnx_export.graph_report(path)
    reference = OnnxClassifier(fp32_path)
    x = check.x
    fp32 = np.concatenate([reference.run(x[i:i + 256]) for i in range(0, len(x), 256)])
    int8 = OnnxClassifier(path)
    logits = np.concatenate([int8.run(x[i:i + 256]) for i in range(0, len(x), 256)])
    agreement = parity(fp32, logits)  # int8 is not held to the fp32 tolerance: recorded only
    del agreement["tolerance"], agreement["passed"]
    return {
        "optimized": True,
        "opset": report["opset"],
        "inputs": [{**report["inputs"][0], "layout": layout, "normalized": True}],
        "outputs": report["outputs"], "op_types": report["op_types"],
        "runtime": "onnxruntime CPUExecutionProvider",
        "quantization": record,
        "accuracy": accuracy,
        "parity": {"onnxruntime_fp32": {
            "reference": f"the fp32 export ({Path(fp32_path).name}), ONNX Runtime",
            "images": check.base["images"], "n": check.base["n"], **agreement}},
    }


def _install(staging, out, results):
    """Writes each sidecar beside its staged file, then moves the files into ``out``."""
    for sidecar in results.values():
        (staging / f"{sidecar['path']}.json").write_text(json.dumps(sidecar, indent=1) + "\n")
    out.mkdir(exist_ok=True)
    for name in ARTIFACTS:
        target = out / name
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()
        if (staging / name).exists():
            (staging / name).rename(target)


def _check(check, what):
    if not check["passed"]:
        raise RuntimeError(
            f"Parity check failed for the {what}: max abs logit difference "
            f"{check['max_abs_logit_diff']:.3g} > {check['tolerance']:g} x max(1, "
            f"{check['max_abs_logit']:.3g}); nothing was written."
        )
