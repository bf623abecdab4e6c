"""Export and serving: SavedModel and ONNX files, inference-time rewrite, ONNX Runtime.

* `export_model` (CLI ``keras-newton export``): a zoo model and its weights to
  SavedModel (uint8 and normalised-float signatures) and/or ONNX, with JSON sidecars
  (model card, input/output names and shapes, opset, parity measured at export).
* `optimize_for_inference`: BatchNormalization folded into convolutions, the
  convolutions of each CG Block that read the same tensor merged into one
  (`FoldedNewtonCGBlock`).
* `OnnxClassifier` (CLI ``keras-newton predict``): runs an exported ONNX file.

Importing this package registers `FoldedNewtonCGBlock` with Keras.
"""

from keras_newton.export.core import (
    ARTIFACTS,
    FORMATS,
    ONNX_FILE,
    PARITY_TOLERANCE,
    SAVEDMODEL_DIR,
    export_model,
    parity,
)
from keras_newton.export.images import archive_sample, load_image
from keras_newton.export.onnx_export import DEFAULT_OPSET, export_onnx, graph_report, to_onnx
from keras_newton.export.optimize import (
    FoldedNewtonCGBlock,
    fold_batch_norm,
    optimize_for_inference,
    tap_offset,
)
from keras_newton.export.runtime import OnnxClassifier, softmax
from keras_newton.export.savedmodel import export_savedmodel, run_savedmodel

__all__ = [
    "ARTIFACTS", "DEFAULT_OPSET", "FORMATS", "ONNX_FILE", "PARITY_TOLERANCE", "SAVEDMODEL_DIR",
    "FoldedNewtonCGBlock", "OnnxClassifier", "archive_sample", "export_model", "export_onnx",
    "export_savedmodel", "fold_batch_norm", "graph_report", "load_image",
    "optimize_for_inference", "parity", "run_savedmodel", "softmax", "tap_offset", "to_onnx",
]
