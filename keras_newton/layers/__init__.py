"""Keras layers of the Newton-CGNet family (registered under package ``keras_newton``)."""

from keras_newton.layers.cg_block import CGBlock
from keras_newton.layers.kmax_pooling import KMaxPooling
from keras_newton.layers.newton_cg_block import NewtonCGBlock

__all__ = ["CGBlock", "KMaxPooling", "NewtonCGBlock"]
