"""int8 ONNX exports for CPU serving: static QDQ quantization with ``onnxruntime.quantization``.

Needs onnx, onnxruntime and NumPy only (no Keras, no TensorFlow). `quantize_onnx` turns an
fp32 export (the optimised one: BatchNormalization folded, CG Block convolutions merged)
into an int8 file that takes and returns the same tensors (float32 ``images`` in, float32
``logits`` out), so `OnnxClassifier`, ``keras-newton predict`` and ``keras-newton serve``
run it unchanged. `holdout_data` gives the images: calibration images from the training
part of the seeded hold-out split, never from the validation images that report accuracy.

Settings, chosen for x86-64 CPUs without VNNI (this project's AVX2 machine) and measured on
the zoo's Newton-CGNet-10 (5,000 validation images, fp32 86.12%):

* QDQ format, uint8 activations (asymmetric, per tensor), int8 weights (symmetric, per
  output channel) with ``reduce_range`` (7-bit weights, ``[-64, 64]``). Without VNNI, ONNX
  Runtime's u8 x s8 kernels multiply with ``vpmaddubsw``, which adds two u8 x s8 products
  into a *saturating* int16: with 8-bit weights ``2 x 255 x 127 = 64,770`` overflows 32,767,
  with 7-bit weights ``2 x 255 x 64 = 32,640`` cannot. Measured: 8-bit weights 78.90%
  (the same file run without the fused kernels, i.e. without saturation: 86.24%); u8 x u8
  and s8 x s8 do not saturate but ran at 1.2x and 0.6x the fp32 speed (u8 x s8: 1.4-1.7x;
  batch 256, CPU shared with a training run).
* Calibration: percentile (99.999) of each activation's histogram over the calibration
  images: 85.98% and 98.84% top-1 agreement with fp32 (512 images; MinMax 85.90% and
  98.34%, entropy 85.90% and 98.34%, percentile 99.99 / 99.9999 98.66% / 98.58% agreement;
  256 and 1,024 images within 0.3 points). The agreement is near what 8-bit activations
  allow here: with 8-bit weights and no saturation (kernels not fused) it was 98.76%.
* One CG Block pattern quantizes badly: `optimize_for_inference` merges the identity of
  ``g = y + g1 + g2 + g3`` (and of ``y + alpha d``) into the CG Block's 3x3 convolution as
  diagonal centre taps, up to 53x larger than the W1/W2 weights of the same output
  channel (Newton-CGNet-10, stage 3, second CG Block). Per-channel 7-bit scales then leave
  W1/W2 about one quantization level: 84.72% with the identity inside the kernel.
  `onnx_passes.split_identity_taps` moves those taps to a 1x1 depthwise convolution added
  back (same function in fp32, to 1e-5), which gives the 85.98% above; no node needs to be
  kept in fp32. (Keeping that convolution in fp32 instead, with ``nodes_to_exclude``, gave
  wrong results in ONNX Runtime 1.32's extended graph optimisations.)

The 120-epoch Newton-CGNet-10 weights (fp32 86.92%): int8 86.96%, top-1 agreement 98.64%.
The limit is the 8-bit activations, spread over the network: every activation at 16 bits
gave 99.04% (99.48% with the weights' rounding bias corrected, which changed nothing with
8-bit activations); 8-bit weights without saturation 98.56%; no single tensor or node kept
at higher precision gained more than 0.15 point (percentile, MinMax and entropy calibration
within 0.3).

The 200-epoch label-smoothed Newton-CGNet-10 weights (fp32 87.58%), 2026-12-04: int8 87.08%,
agreement 98.00% (percentile 99.99 / 99.9999, 512 or 2,048 calibration images: 87.12-87.24%,
97.84-98.10%): label smoothing leaves closer logits, so more images flip. The 300-epoch
weights that replaced them (dropout 0.2, fp32 88.22%), 2026-12-07: int8 87.98%, agreement
98.54%. Newton-CGNet-82 (fp32 89.14%): int8 88.90%, agreement 98.98%.
"""

import contextlib
import dataclasses
import io
import tempfile
from pathlib import Path

import numpy as np

INT8 = "int8"
QUANTIZE_CHOICES = (INT8,)
DEFAULT_CALIBRATION_SIZE = 512
DEFAULT_MAX_ACCURACY_DROP = 0.5  # points of top-1 on the validation images
DEFAULT_VAL_SIZE = 5000
CALIBRATION_PERCENTILE = 99.999
IDENTITY_TAP_RATIO = 2.0
SETTINGS = {
    "dtype": INT8,
    "format": "QDQ",
    "activations": "uint8, asymmetric, per tensor",
    "weights": "int8, symmetric, per output channel, 7-bit range [-64, 64] (reduce_range)",
    "activation_type": "QUInt8",
    "weight_type": "QInt8",
    "per_channel": True,
    "reduce_range": True,
    "why": ("x86-64 without VNNI (AVX2): ONNX Runtime's u8 x s8 kernels (vpmaddubsw) add "
            "pairs of products into a saturating int16; 7-bit weights keep 2 x 255 x 64 = "
            "32,640 below 32,767 (8-bit weights overflowed: 78.90% vs 86.12% fp32 on "
            "Newton-CGNet-10); u8 x u8 and s8 x s8 do not saturate but ran at 1.2x and 0.6x "
            "the fp32 speed on this CPU, u8 x s8 at 1.4-1.7x."),
}


def check_quantize(quantize):
    """``None`` or ``"int8"``; anything else is a ValueError."""
    if quantize is not None and quantize not in QUANTIZE_CHOICES:
        raise ValueError(f"`quantize` must be one of {list(QUANTIZE_CHOICES)} or None. "
                         f"Received: quantize={quantize!r}")
    return quantize


@dataclasses.dataclass
class HoldoutData:
    """Calibration images (training part) and validation images (the hold-out).

    Attributes:
        calibration: uint8 ``[n, H, W, 3]``, a class-balanced, seeded subset of the
            training part of the split.
        images, labels: the validation hold-out (uint8 images, int labels).
        class_names: label order of the source.
        source: where the images come from (file name or ``tfds <name>``).
        val_size, seed: the hold-out split (`keras_newton.data.holdout_split`).
        calibration_indices, validation_indices: their indices in the training split.
    """

    calibration: np.ndarray
    images: np.ndarray
    labels: np.ndarray
    class_names: list
    source: str
    val_size: int
    seed: int
    calibration_indices: np.ndarray
    validation_indices: np.ndarray

    @property
    def split(self):
        return (f"seeded class-balanced hold-out of the training split (val_size "
                f"{self.val_size}, seed {self.seed}), as in training")

    def calibration_record(self):
        return {"images": int(len(self.calibration)), "source": self.source,
                "part": f"training part of the {self.split}; never the validation images",
                "seed": self.seed}


def holdout_data(data=None, dataset="cifar10", calibration_size=DEFAULT_CALIBRATION_SIZE,
                 val_size=DEFAULT_VAL_SIZE, seed=0, validation_limit=None):
    """The calibration and validation images of an int8 export (see `HoldoutData`).

    The training split of ``data`` (a folder or tar/zip archive of
    ``split/<class>/<image>`` files; default: tensorflow-datasets ``dataset``) is split as
    in training (`keras_newton.data.holdout_split(labels, val_size, seed)`); calibration
    takes ``calibration_size`` images of the training part, validation is the hold-out
    (``validation_limit`` of them, class-balanced, if given).
    """
    from keras_newton.data.datasets import load_dataset
    from keras_newton.data.splits import balanced_subset, holdout_split

    for name, value in (("calibration_size", calibration_size),
                        ("validation_limit", validation_limit or 1)):
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
            raise ValueError(f"`{name}` must be a positive int. Received: {name}={value!r}")
    train = load_dataset(dataset, data, "train")
    train_idx, val_idx = holdout_split(train.labels, val_size, seed)
    if calibration_size > len(train_idx):
        raise ValueError(f"`calibration_size` must be at most {len(train_idx)} (the training "
                         f"part). Received: calibration_size={calibration_size}")
    calibration = balanced_subset(train.labels, train_idx, calibration_size, seed)
    if validation_limit is not None and validation_limit < len(val_idx):
        val_idx = balanced_subset(train.labels, val_idx, validation_limit, seed)
    source = Path(data).name if data is not None else f"tfds {dataset}"
    return HoldoutData(train.images[calibration], train.images[val_idx],
                       train.labels[val_idx], list(train.class_names), source, val_size, seed,
                       calibration, val_idx)


class _Reader:
    """``onnxruntime.quantization.CalibrationDataReader`` over normalised batches."""

    def __init__(self, name, x, batch_size=32):
        self.batches = [{name: x[i:i + batch_size]} for i in range(0, len(x), batch_size)]
        self.position = 0

    def get_next(self):
        if self.position >= len(self.batches):
            return None
        self.position += 1
        return self.batches[self.position - 1]

    def rewind(self):
        self.position = 0


def quantize_onnx(fp32_path, int8_path, calibration_images, exclude=()):
    """Writes the int8 QDQ version of the fp32 export ``fp32_path`` to ``int8_path``.

    Args:
        fp32_path: an fp32 keras-newton ONNX file (its sidecar or embedded model card
            gives the preprocessing), preferably the optimised export.
        int8_path: where the int8 file is written.
        calibration_images: uint8 ``[n, H, W, 3]`` training images (never the images
            accuracy is reported on).
        exclude: node names (of the graph after `split_identity_taps`) kept in fp32.

    Returns:
        The ``quantization`` record of the sidecar (settings, calibration count,
        rewritten and excluded nodes).
    """
    import onnx
    import onnxruntime
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from keras_newton.export.onnx_passes import split_identity_taps
    from keras_newton.export.runtime import OnnxClassifier

    fp32 = OnnxClassifier(fp32_path)
    x = fp32.preprocess(np.asarray(calibration_images))
    exclude = [str(n) for n in exclude]
    with tempfile.TemporaryDirectory(prefix="keras-newton-quantize.") as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        # ONNX shape inference and ORT's basic optimisations; symbolic shape inference
        # (sympy) is for transformers and not needed for these CNNs.
        quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=True)
        proto, rewritten = split_identity_taps(onnx.load(str(prepared)), IDENTITY_TAP_RATIO)
        names = {n.name for n in proto.graph.node}
        unknown = sorted(set(exclude) - names)
        if unknown:
            convs = sorted(n.name for n in proto.graph.node if n.op_type in ("Conv", "Gemm"))
            raise ValueError(f"No such node in the graph to keep in fp32 (convolutions: "
                             f"{convs}). Received: exclude={unknown}")
        onnx.save(proto, str(prepared))
        with contextlib.redirect_stdout(io.StringIO()):  # the calibrator's progress prints
            quantize_static(
                str(prepared), str(int8_path), _Reader(fp32.input_name, x),
                quant_format=QuantFormat.QDQ, activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8, per_channel=True, reduce_range=True,
                nodes_to_exclude=exclude or None, calibrate_method=CalibrationMethod.Percentile,
                extra_options={"CalibPercentile": CALIBRATION_PERCENTILE},
            )
    proto = onnx.load(str(int8_path))
    proto.producer_name = "keras-newton"
    proto.doc_string = ("keras-newton int8 export (QDQ, onnxruntime.quantization): normalised "
                        "float32 NHWC images -> logits")
    onnx.save(proto, str(int8_path))
    return {
        **SETTINGS,
        "tool": f"onnxruntime.quantization.quantize_static (onnxruntime {onnxruntime.__version__})",
        "calibration": {"method": "Percentile", "percentile": CALIBRATION_PERCENTILE,
                        "images": int(len(x))},
        "preprocess": ("quant_pre_process (ONNX shape inference, ONNX Runtime basic graph "
                       "optimisations), then onnx_passes.split_identity_taps"),
        "identity_taps_split": rewritten,
        "excluded_nodes": exclude,
    }


def logits(classifier, images, batch_size=250):
    """Logits of uint8 ``images`` through an `OnnxClassifier`, in batches."""
    return np.concatenate([classifier.run(classifier.preprocess(images[i:i + batch_size]))
                           for i in range(0, len(images), batch_size)])


def compare_accuracy(fp32_path, int8_path, images, labels, description=None,
                     max_drop=DEFAULT_MAX_ACCURACY_DROP):
    """Top-1 of the fp32 and int8 files on labelled uint8 ``images``, and their agreement.

    ``passed`` is False if int8 top-1 is more than ``max_drop`` points below fp32's.
    """
    from keras_newton.export.runtime import OnnxClassifier

    labels = np.asarray(labels)
    ref = logits(OnnxClassifier(fp32_path), images).argmax(1)
    got = logits(OnnxClassifier(int8_path), images).argmax(1)
    fp32_top1, int8_top1 = float((ref == labels).mean()), float((got == labels).mean())
    drop = round(100 * (fp32_top1 - int8_top1), 4)
    return {"reference": f"the fp32 export ({Path(fp32_path).name})",
            "images": description or f"{len(labels)} labelled images", "n": int(len(labels)),
            "fp32_top1": fp32_top1, "int8_top1": int8_top1, "drop_points": drop,
            "top1_agreement": float((ref == got).mean()), "max_drop_points": max_drop,
            "passed": drop <= max_drop}
