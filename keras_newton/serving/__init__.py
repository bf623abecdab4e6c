"""Serving exported models with ONNX Runtime on the Open Inference Protocol (KServe v2).

* `ServedModel`: an exported ONNX classifier behind the protocol (metadata, request
  decoding, logits / probabilities / top-k class names).
* `DynamicBatcher`: concurrent requests run as one ONNX Runtime batch.
* ``keras_newton.serving.app.create_app``: the Starlette (ASGI) application; CLI
  ``keras-newton serve`` runs it on uvicorn (``pip install 'keras-newton[serve]'``).
* `write_model_repository`: a Triton Inference Server model repository
  (``keras-newton export --format triton``).

Nothing here imports Keras or TensorFlow.
"""

from keras_newton.serving.batcher import DynamicBatcher
from keras_newton.serving.model import ServedModel, resolve_onnx
from keras_newton.serving.protocol import InferenceError
from keras_newton.serving.triton import config_pbtxt, model_config, write_model_repository

__all__ = ["DynamicBatcher", "InferenceError", "ServedModel", "config_pbtxt", "model_config",
           "resolve_onnx", "write_model_repository"]
