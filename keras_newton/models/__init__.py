"""Model builders and the registry of named models (``get_model``, ``MODELS``)."""

import re

from keras_newton.models import newton_cgnet as _ncg
from keras_newton.models import resnet as _resnet
from keras_newton.models.imagenet import (
    IMAGENET_MODELS,
    IMAGENET_PAPER_PARAMS,
    NewtonCGNet34,
    ResNet34,
)
from keras_newton.models.newton_cgnet import (
    NewtonCGNet10,
    NewtonCGNet16,
    NewtonCGNet22,
    NewtonCGNet28,
    NewtonCGNet56,
    NewtonCGNet82,
    NewtonCGNet110,
    newton_cgnet,
    parse_spec,
)
from keras_newton.models.quasi_newton import (
    QUASI_NEWTON_MODELS,
    parse_quasi_newton_spec,
    quasi_newton_net,
)
from keras_newton.models.resnet import (
    PlainNet20,
    PlainNet32,
    PlainNet44,
    PlainNet56,
    PlainNet110,
    PlainNet164,
    ResNet20,
    ResNet32,
    ResNet44,
    ResNet56,
    ResNet110,
    ResNet164,
    plainnet,
    resnet,
)
from keras_newton.models.text import (
    TEXT_MODELS,
    TEXT_PAPER_PARAMS,
    TEXT_PARAMS_NOTE,
    VDCNN9,
    VDCNN17,
    VDCNN29,
    NewtonCGNetText,
    newton_cgnet_text,
    vdcnn,
)

# Parameter counts of the paper's Tables 3 and 5 (millions); None where it gives none.
PAPER_PARAMS = {
    "newton_cgnet10": 0.29, "newton_cgnet16": 0.48, "newton_cgnet22": 0.68,
    "newton_cgnet28": 0.87, "newton_cgnet56": 1.70, "newton_cgnet82": 2.62,
    "newton_cgnet110": 3.45, "resnet20": 0.27, "resnet32": 0.46, "resnet44": 0.66,
    "resnet56": 0.85, "resnet110": 1.73, "resnet164": 2.62,
}

MODELS = {f"newton_cgnet{d}": getattr(_ncg, f"NewtonCGNet{d}") for d in _ncg.SPECS}
MODELS.update({f"resnet{d}": getattr(_resnet, f"ResNet{d}") for d in _resnet.RESNET_DEPTHS})
MODELS.update({f"plainnet{d}": getattr(_resnet, f"PlainNet{d}") for d in _resnet.RESNET_DEPTHS})
# Beyond the paper: quasi-Newton Blocks of order m (Section 3.1, eq. 8; docs/newton_design.md).
MODELS.update(QUASI_NEWTON_MODELS)
# ImageNet (224x224, 1000 classes; Section 4.1.5).
MODELS.update(IMAGENET_MODELS)
PAPER_PARAMS.update(IMAGENET_PAPER_PARAMS)
# Character-level text (int32 character ids of length 1024; Section 4.2).
MODELS.update(TEXT_MODELS)
PAPER_PARAMS.update(TEXT_PAPER_PARAMS)


def canonical_name(name):
    """``"NewtonCGNet-56"``, ``"newton_cgnet_56"`` -> ``"newton_cgnet56"``."""
    key = re.sub(r"[-_\s]+(?=\d)", "", str(name).strip().lower().replace("-", "_"))
    key = key.replace("newtoncgnet", "newton_cgnet")
    if key not in MODELS:
        raise ValueError(f"Unknown model. Valid names: {sorted(MODELS)}. Received: model={name!r}")
    return key


def get_model(name, **kwargs):
    """Builds the registered model ``name`` (see ``MODELS``) with builder kwargs."""
    return MODELS[canonical_name(name)](**kwargs)


__all__ = [
    "MODELS", "PAPER_PARAMS", "canonical_name", "get_model", "newton_cgnet", "parse_spec",
    "resnet", "plainnet", "quasi_newton_net", "parse_quasi_newton_spec",
    "NewtonCGNet10", "NewtonCGNet16", "NewtonCGNet22", "NewtonCGNet28", "NewtonCGNet56",
    "NewtonCGNet82", "NewtonCGNet110",
    "ResNet20", "ResNet32", "ResNet44", "ResNet56", "ResNet110", "ResNet164",
    "NewtonCGNet34", "ResNet34", "NewtonCGNetText", "VDCNN9", "VDCNN17", "VDCNN29",
    "newton_cgnet_text", "vdcnn", "TEXT_PARAMS_NOTE",
    "PlainNet20", "PlainNet32", "PlainNet44", "PlainNet56", "PlainNet110", "PlainNet164",
]
