"""SavedModel export (``keras.export.ExportArchive``) with two serving signatures.

* ``serving_default``: uint8 images ``[batch, H, W, 3]`` (RGB, NHWC, dynamic batch);
  the card's preprocessing ``(x - mean) / std`` runs inside the graph.
* ``serving_normalized``: float32 images already normalised, in the model's own
  layout (what the Keras model and the ONNX file take).

Both return ``{"logits": float32 [batch, classes]}`` (pre-softmax scores).
"""

import numpy as np

UINT8_SIGNATURE = "serving_default"
FLOAT_SIGNATURE = "serving_normalized"
INPUT_NAME = "images"
OUTPUT_NAME = "logits"


def _layout(model):
    """``"NHWC"`` or ``"NCHW"`` from a 3-channel model input shape."""
    shape = tuple(model.input_shape[1:])
    if len(shape) == 3 and shape[-1] == 3:
        return "NHWC"
    if len(shape) == 3 and shape[0] == 3:
        return "NCHW"
    raise ValueError("Export needs a model taking RGB images (H, W, 3) or (3, H, W). "
                     f"Received: input_shape={model.input_shape}")


def uint8_shape(model):
    """The ``[None, H, W, 3]`` shape of the uint8 signature."""
    shape = tuple(model.input_shape[1:])
    return [None, *(shape[:2] if _layout(model) == "NHWC" else shape[1:]), 3]


def export_savedmodel(model, path, mean, std):
    """Writes ``model`` (TensorFlow backend) as a SavedModel at ``path``.

    Args:
        model: a Keras model taking normalised float32 images, returning logits.
        path: output folder (must not exist).
        mean, std: per-channel preprocessing in 0-255 pixel units (RGB).

    Returns:
        ``{signature_name: {"inputs": [...], "outputs": [...]}}`` for the sidecar.
    """
    import keras
    import tensorflow as tf

    from keras_newton.preprocessing import normalize

    layout = _layout(model)
    float_shape = [None, *model.input_shape[1:]]
    u8_shape = uint8_shape(model)

    def from_uint8(images):
        x = normalize(images, mean, std, "channels_last")
        if layout == "NCHW":
            x = tf.transpose(x, (0, 3, 1, 2))
        return {OUTPUT_NAME: model(x, training=False)}

    def from_float(images):
        return {OUTPUT_NAME: model(images, training=False)}

    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint(UINT8_SIGNATURE, from_uint8, input_signature=[
        tf.TensorSpec(u8_shape, tf.uint8, name=INPUT_NAME)])
    archive.add_endpoint(FLOAT_SIGNATURE, from_float, input_signature=[
        tf.TensorSpec(float_shape, tf.float32, name=INPUT_NAME)])
    archive.write_out(str(path), verbose=False)
    out = {"name": OUTPUT_NAME, "dtype": "float32", "shape": [None, model.output_shape[-1]]}
    return {
        UINT8_SIGNATURE: {
            "inputs": [{"name": INPUT_NAME, "dtype": "uint8", "shape": u8_shape,
                        "layout": "NHWC", "normalized": False}],
            "outputs": [out],
        },
        FLOAT_SIGNATURE: {
            "inputs": [{"name": INPUT_NAME, "dtype": "float32", "shape": float_shape,
                        "layout": layout, "normalized": True}],
            "outputs": [out],
        },
    }


def run_savedmodel(loaded, images, signature=UINT8_SIGNATURE, batch_size=256):
    """Logits (NumPy) of a ``tf.saved_model.load``-ed export, in batches."""
    import tensorflow as tf

    fn = loaded.signatures[signature]
    outs = [fn(**{INPUT_NAME: tf.constant(images[i:i + batch_size])})[OUTPUT_NAME].numpy()
            for i in range(0, len(images), batch_size)]
    return np.concatenate(outs)


def export_text_savedmodel(model, path, tokenizer=None):
    """Writes a TF SavedModel whose ``serve`` signature maps raw strings to predictions.

    For the character-level text models (``keras_newton.models.newton_cgnet_text``, VDCNN).
    TensorFlow backend. The signature takes a string tensor ``(batch,)`` and runs
    ``tokenizer`` (default ``keras_newton.data.text.CharTokenizer`` of the model's input
    length) then ``model``.
    Load it with ``import tensorflow_text`` first (its normalisation ops).
    """
    import keras
    import tensorflow as tf

    from keras_newton.data.text import CharTokenizer

    if keras.backend.backend() != "tensorflow":
        raise ValueError("export_text_savedmodel needs the TensorFlow backend. "
                         f"Received: backend={keras.backend.backend()!r}")
    length = model.input_shape[1]
    tokenizer = tokenizer or CharTokenizer(sequence_length=length)
    if tokenizer.sequence_length != length:
        raise ValueError(f"The tokenizer's sequence_length must be the model's input length "
                         f"{length}. Received: sequence_length={tokenizer.sequence_length}")
    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint(
        "serve", lambda texts: model(tokenizer.encode(texts), training=False),
        input_signature=[tf.TensorSpec([None], tf.string, name="texts")],
    )
    archive.write_out(str(path))
    return path
