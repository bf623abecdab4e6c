"""Export and serving: SavedModel and ONNX files, inference-time rewrite, ONNX Runtime.

* `export_model` (CLI ``keras-newton export``): a zoo model and its weights to
  SavedModel (uint8 and normalised-float signatures) and/or ONNX, with JSON sidecars
  (model card, input/output names and shapes, opset, parity measured at export).
* `optimize_for_inference`: BatchNormalization folded into convolutions, the
  convolutions of each CG Block that read the same tensor merged into one
  (`FoldedNewtonCGBlock`).
* `OnnxClassifier` (CLI ``keras-newton predict``): runs an exported ONNX file.
* `quantize_onnx` (``keras-newton export --quantize int8``): an int8 (QDQ) ONNX file for
  CPU serving, calibrated on training images (`holdout_data`).
* `export_text_savedmodel`: a text model behind a SavedModel signature on raw strings.

`FoldedNewtonCGBlock` lives (and is registered with Keras) in ``keras_newton.layers``.
"""

from keras_newton._lazy import lazy_attributes

# Imported on first use (PEP 562), so that `keras_newton.export.runtime` (OnnxClassifier:
# `keras-newton predict`, `serve`) imports neither Keras nor TensorFlow.
_EXPORTS = {
    "keras_newton.data.image_folder": ["archive_sample", "load_image"],
    "keras_newton.export.core": [
        "ARTIFACTS", "FORMATS", "INT8_FILE", "ONNX_FILE", "PARITY_TOLERANCE", "SAVEDMODEL_DIR",
        "export_model", "parity",
    ],
    "keras_newton.export.quantize": ["holdout_data", "quantize_onnx"],
    "keras_newton.export.onnx_export": ["DEFAULT_OPSET", "export_onnx", "graph_report",
                                        "to_onnx"],
    "keras_newton.export.runtime": ["OnnxClassifier", "softmax"],
    "keras_newton.export.savedmodel": ["export_savedmodel", "export_text_savedmodel",
                                       "run_savedmodel"],
    "keras_newton.export.optimize": ["FoldedNewtonCGBlock", "fold_batch_norm",
                                     "fold_newton_cg_block", "optimize_for_inference",
                                     "tap_offset"],
}
__all__ = sorted(name for names in _EXPORTS.values() for name in names)
__getattr__, __dir__ = lazy_attributes(__name__, _EXPORTS)
