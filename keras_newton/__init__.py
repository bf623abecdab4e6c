"""keras-newton: Keras 3 model zoo for Newton-CGNet.

Shen et al., "Newton design: designing CNNs with the family of Newton's methods",
Sci China Inf Sci 66(6):162101, 2023. Importing the package registers its layers
with Keras (package ``keras_newton``), so ``.keras`` files load anywhere it is imported.
"""

from keras_newton import export  # noqa: F401  (registers FoldedNewtonCGBlock)
from keras_newton.layers import CGBlock, NewtonCGBlock
from keras_newton.models import *  # noqa: F403
from keras_newton.models import __all__ as _models_all

__version__ = "0.1.0"
__all__ = ["CGBlock", "NewtonCGBlock", *_models_all]
