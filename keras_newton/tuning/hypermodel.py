"""KerasTuner hypermodels of the Newton-CGNet family and the ResNet baseline.

A search space maps a hyperparameter to one of:

- a scalar: fixed, e.g. ``{"batch_size": 128}``;
- a tuple ``(min, max)``: a range (log-sampled for ``lr`` and ``weight_decay`` when
  ``min > 0``), e.g. ``{"lr": (0.01, 0.3)}``;
- a list: the choices, e.g. ``{"width_multiplier": [0.5, 1.0, 2.0]}``.

Keys (``SPACE_KEYS``): ``blocks`` (CG Blocks per stage for Newton-CGNet: N1, N2 and
N3 are each drawn from it; residual blocks per stage n for ResNet, depth 6n+2),
``width_multiplier`` and ``dropout`` (Newton-CGNet only: the ResNet builder has
neither), ``lr``, ``weight_decay`` and ``batch_size``. The batch size is tuned in
``HyperModel.fit``, as KerasTuner recommends; so is the recipe's step schedule
(``lr`` divided by 10 at 50% and 75% of the steps), which needs the batch size.
"""

import contextlib
import math
import numbers

import keras
import keras_tuner

FAMILIES = ("newton_cgnet", "resnet", "both")

# Default spaces: small enough for CPU searches; widen them on GPUs.
NEWTON_CGNET_SPACE = {
    "blocks": (1, 3),
    "width_multiplier": [0.5, 1.0],
    "dropout": (0.0, 0.4),
    "lr": (0.01, 0.3),
    "weight_decay": (1e-5, 1e-3),
    "batch_size": [64, 128],
}
RESNET_SPACE = {
    "blocks": (1, 3),
    "lr": (0.01, 0.3),
    "weight_decay": (1e-5, 1e-3),
    "batch_size": [64, 128],
}
SPACE_KEYS = {
    "newton_cgnet": tuple(NEWTON_CGNET_SPACE),
    "resnet": tuple(RESNET_SPACE),
    "both": tuple(NEWTON_CGNET_SPACE),
}
_INT_KEYS = ("blocks", "batch_size")
_LOG_KEYS = ("lr", "weight_decay")


def default_space(family):
    """Returns a copy of the default search space of ``family``."""
    _check_family(family)
    return dict(RESNET_SPACE if family == "resnet" else NEWTON_CGNET_SPACE)


def _check_family(family):
    if family not in FAMILIES:
        raise ValueError(f"`family` must be one of {list(FAMILIES)}. Received: family={family!r}")


def _check_value(key, value):
    """Raises ValueError unless ``value`` is a valid single value of ``key``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"`{key}` values must be numbers. Received: {key}={value!r}")
    if key in _INT_KEYS:
        ok, allowed = float(value).is_integer() and value >= 1, "positive integers"
    elif key == "dropout":
        ok, allowed = 0 <= value < 1, "in [0, 1)"
    elif key == "weight_decay":
        ok, allowed = value >= 0, ">= 0"
    else:  # lr, width_multiplier
        ok, allowed = value > 0, "> 0"
    if not ok or not math.isfinite(value):
        raise ValueError(f"`{key}` values must be {allowed}. Received: {key}={value!r}")
    return int(value) if key in _INT_KEYS else float(value)


def resolve_space(family, space=None):
    """Validates ``space`` (overrides of the family's default) and returns the full space.

    Each entry of the result is ``("fixed", v)``, ``("range", lo, hi)`` or
    ``("choice", [v, ...])``.

    Raises:
        ValueError: for an unknown key, a value out of bounds, an empty choice list,
            a range with ``max < min``, or a space where nothing is left to tune.
    """
    _check_family(family)
    if space is not None and not isinstance(space, dict):
        raise ValueError(f"`space` must be a dict of hyperparameter -> value, (min, max) or "
                         f"[choices]. Received: space={space!r}")
    merged = {**default_space(family), **(space or {})}
    unknown = sorted(set(merged) - set(SPACE_KEYS[family]))
    if unknown:
        raise ValueError(f"Unknown hyperparameter for family {family!r}. Valid keys: "
                         f"{list(SPACE_KEYS[family])}. Received: {unknown[0]}="
                         f"{merged[unknown[0]]!r}")
    resolved = {}
    for key, spec in merged.items():
        if isinstance(spec, tuple):
            if len(spec) != 2:
                raise ValueError(f"A range must be (min, max). Received: {key}={spec!r}")
            lo, hi = (_check_value(key, v) for v in spec)
            if hi < lo:
                raise ValueError(f"The `{key}` range is empty: max < min. "
                                 f"Received: {key}={spec!r}")
            resolved[key] = ("fixed", lo) if lo == hi else ("range", lo, hi)
        elif isinstance(spec, list):
            if not spec:
                raise ValueError(f"The `{key}` choices are empty. Received: {key}=[]")
            values = sorted(dict.fromkeys(_check_value(key, v) for v in spec))
            resolved[key] = ("fixed", values[0]) if len(values) == 1 else ("choice", values)
        else:
            resolved[key] = ("fixed", _check_value(key, spec))
    if family != "both" and all(spec[0] == "fixed" for spec in resolved.values()):
        raise ValueError("The search space is empty: every hyperparameter is fixed. Give a "
                         "range (min, max) or a list of choices for at least one. "
                         f"Received: space={space!r}")
    return resolved


def describe_space(space):
    """Returns a JSON-friendly view of a resolved space (for ``search.json``)."""
    return {key: list(spec) for key, spec in space.items()}


class CGNetHyperModel(keras_tuner.HyperModel):
    """Builds and trains Newton-CGNets and/or ResNets from KerasTuner hyperparameters.

    ``build(hp)`` draws the architecture, dropout, weight decay and learning rate and
    returns a model compiled with SGD at that learning rate. ``fit(hp, model, x, y,
    validation_data=(x_val, y_val), epochs=...)`` draws the batch size, recompiles with
    the recipe's step schedule for that many steps, builds the ``tf.data`` pipelines
    (normalisation with ``mean``/``std``, optional "+" augmentation) and trains.

    Args:
        family: ``"newton_cgnet"``, ``"resnet"`` or ``"both"`` (the family becomes a
            hyperparameter; each family's own keys are conditional on it).
        space: overrides of the default space (see the module docstring).
        classes: number of classes.
        input_shape: image shape ``(h, w, 3)``.
        mean, std: per-channel normalisation in pixel units.
        augment: the "+" augmentation (shift and flip) in training.
        recipe: the training recipe (``keras_newton.training.get_recipe``) supplying
            momentum, Nesterov, milestones and the lr factor.
        stages: fix Newton-CGNet's ``(N1, N2, N3)`` instead of drawing them from
            ``blocks`` (e.g. Newton-CGNet-56's ``(9, 9, 9)``).
        seed: seed set before every build (weight initialisation) and of the shuffling.
        num_replicas: replicas of the distribution; batch sizes must divide evenly.
    """

    def __init__(self, family="newton_cgnet", space=None, *, classes=10,
                 input_shape=(32, 32, 3), mean=(0.0, 0.0, 0.0), std=(255.0, 255.0, 255.0),
                 augment=False, recipe=None, stages=None, seed=0, num_replicas=1, name=None):
        super().__init__(name=name, tunable=True)
        self.family = family
        self.stages = tuple(stages) if stages is not None else None
        if self.stages is not None:
            from keras_newton.models import parse_spec

            parse_spec(self.stages)
            space = {**(space or {}), "blocks": 1}  # unused: the stages are fixed
        self.space = resolve_space(family, space)
        self.classes = classes
        self.input_shape = tuple(input_shape)
        self.mean, self.std = list(mean), list(std)
        self.augment = augment
        if recipe is None:
            from keras_newton.training import get_recipe

            recipe = get_recipe("cifar10", augment)
        self.recipe = dict(recipe)
        self.seed = seed
        self.num_replicas = num_replicas
        for size in self.values("batch_size"):
            if size % num_replicas:
                raise ValueError(f"`batch_size` (the global batch) must be divisible by the "
                                 f"{num_replicas} replicas. Received: batch_size={size}")
        self.last_params = None

    def values(self, key):
        """The values ``key`` can take (both ends for a range)."""
        spec = self.space[key]
        return [spec[1]] if spec[0] == "fixed" else list(spec[1:]) if spec[0] == "range" \
            else list(spec[1])

    def _hp(self, hp, key, name=None):
        name = name or key
        spec = self.space[key]
        if spec[0] == "fixed":
            return hp.Fixed(name, spec[1])
        if spec[0] == "choice":
            return hp.Choice(name, spec[1])
        lo, hi = spec[1:]
        if key in _INT_KEYS:
            return hp.Int(name, lo, hi)
        sampling = "log" if key in _LOG_KEYS and lo > 0 else "linear"
        return hp.Float(name, lo, hi, sampling=sampling)

    def _family(self, hp):
        if self.family == "both":
            return hp.Choice("family", ["newton_cgnet", "resnet"])
        return self.family

    def build(self, hp):
        from keras_newton.models import newton_cgnet, resnet

        keras.utils.set_random_seed(self.seed)
        family = self._family(hp)
        lr = self._hp(hp, "lr")
        weight_decay = self._hp(hp, "weight_decay")
        common = dict(classes=self.classes, input_shape=self.input_shape,
                      weight_decay=weight_decay)
        if family == "newton_cgnet":
            with _scope(hp, self.family, "newton_cgnet"):
                if self.stages is not None:
                    stages = tuple(hp.Fixed(f"N{i + 1}", n) for i, n in enumerate(self.stages))
                else:
                    stages = tuple(self._hp(hp, "blocks", f"N{i}") for i in (1, 2, 3))
                width = self._hp(hp, "width_multiplier")
                dropout = self._hp(hp, "dropout")
            model = newton_cgnet(stages, dropout_rate=dropout, width_multiplier=width, **common)
        else:
            with _scope(hp, self.family, "resnet"):
                n = self._hp(hp, "blocks", "n")
            model = resnet(6 * n + 2, **common)
        self.last_params = int(model.count_params())
        model.compile(
            optimizer=keras.optimizers.SGD(lr, momentum=self.recipe["momentum"],
                                           nesterov=self.recipe["nesterov"]),
            loss=keras.losses.SparseCategoricalCrossentropy(),
            metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")],
        )
        return model

    def fit(self, hp, model, x, y, validation_data, epochs=1, callbacks=None, verbose="auto",
            initial_epoch=0, **kwargs):
        from keras_newton.data import make_dataset
        from keras_newton.training import compile_for_recipe

        batch_size = self._hp(hp, "batch_size")
        steps = len(y) // batch_size
        if steps < 1:
            raise ValueError(f"`batch_size` is larger than the {len(y)} training images. "
                             f"Received: batch_size={batch_size}")
        recipe = {**self.recipe, "lr": self._hp(hp, "lr"), "epochs": epochs}
        strategy = getattr(model, "distribute_strategy", None)
        with strategy.scope() if strategy is not None else contextlib.nullcontext():
            compile_for_recipe(model, recipe, steps)
        train_ds = make_dataset(x, y, batch_size, self.mean, self.std, training=True,
                                augment=self.augment, seed=self.seed)
        val_ds = make_dataset(*validation_data, batch_size, self.mean, self.std,
                              training=False)
        return model.fit(train_ds, validation_data=val_ds, epochs=epochs,
                         initial_epoch=initial_epoch, callbacks=callbacks, verbose=verbose,
                         shuffle=False, **kwargs)


def _scope(hp, family, value):
    """The conditional scope of ``value``'s own hyperparameters when searching both."""
    if family == "both":
        return hp.conditional_scope("family", [value])
    return contextlib.nullcontext()


def depth_of(values):
    """Returns the depth L of a trial's hyperparameter values (None if unknown)."""
    if "N1" in values and values.get("family", "newton_cgnet") == "newton_cgnet":
        return 2 * (values["N1"] + values["N2"] + values["N3"]) + 2
    if "n" in values:
        return 6 * values["n"] + 2
    return None
