"""Keras layers of the Newton-CGNet family (registered under package ``keras_newton``).

Importing this package registers every layer a keras-newton ``.keras`` file can hold,
the inference layer `FoldedNewtonCGBlock` of ``keras_newton.export`` included.
"""

from keras_newton.layers.cg_block import CGBlock
from keras_newton.layers.folded_newton_cg_block import FoldedNewtonCGBlock
from keras_newton.layers.kmax_pooling import KMaxPooling
from keras_newton.layers.newton_cg_block import NewtonCGBlock
from keras_newton.layers.quasi_newton_block import QuasiNewtonBlock

__all__ = ["CGBlock", "FoldedNewtonCGBlock", "KMaxPooling", "NewtonCGBlock", "QuasiNewtonBlock"]
