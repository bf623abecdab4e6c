"""The paper's training recipes (Section 4.1.2) as data.

Keys are the paper's dataset names: "+" marks the standard augmentation (shift and
mirror). Every value can be overridden (``get_recipe(..., **overrides)``, or the
matching ``keras-newton train`` flag).

- SGD with Nesterov momentum 0.9, batch 128, learning rate 0.1 divided by 10 at 50%
  and 75% of the epochs. ``warmup_epochs`` (not in the paper, 0 by default) trains the
  first epochs at ``lr * lr_factor``: He et al. (2016) started ResNet-110 so, because
  0.1 was "slightly too large to start converging".
- Short schedules (not in the paper; each off by default): ``schedule="cosine"`` decays
  the lr per step from ``lr`` after the warm-up to zero at the end (Loshchilov & Hutter,
  2017) instead of the milestones; ``warmup="linear"`` ramps the warm-up epochs per step
  from ``lr / warmup_steps`` to ``lr`` (Goyal et al., 2017) instead of holding
  ``lr * lr_factor``; ``label_smoothing`` mixes ``label_smoothing / classes`` into every
  class of the targets (Szegedy et al., 2016); ``schedule="constant"`` keeps ``lr`` after
  the warm-up, e.g. to fine-tune at a constant rate.
- Weight averaging (not in the paper, off by default): ``swa_epochs=N`` makes the run's
  result the average of the weights after each of its last N epochs, with the
  BatchNormalization statistics recomputed for it (stochastic weight averaging,
  Izmailov et al., 2018; `training.swa`).
- CIFAR: 300 epochs, weight decay 5e-4; SVHN: 40 epochs, weight decay 1e-4.
- Dropout 0.2 on C10+/C100+, 0.3 on SVHN, 0.4 on C10/C100 (no augmentation).
- Validation hold-out: 5,000 training images on CIFAR, 6,000 on SVHN; SVHN trains on
  all its training data (``train+extra``, 604,388 images, as in the works it follows).
- ImageNet: 100 epochs, batch 256, dropout 0.2, lr / 10 at epochs 30, 60, 90; its
  training views are always augmented (random-resized crop, flip) and the 50,000
  validation images are the validation set.
- Text (Section 4.2, recipe "TEXT"): 100 epochs, weight decay 5e-5, dropout 0.1, same
  SGD and schedule; 1,600 items held out for validation (the AG News CSV of 7,600
  items splits 6,000 / 1,600).
- The model with the lowest validation error is kept.
"""

_COMMON = {
    "optimizer": "sgd",
    "momentum": 0.9,
    "nesterov": True,
    "batch_size": 128,
    "lr": 0.1,
    "lr_milestones": [0.5, 0.75],  # fractions of the total training steps
    "lr_factor": 0.1,
    "warmup_epochs": 0,  # epochs at lr * lr_factor before lr (not in the paper)
    "warmup": "constant",  # or "linear": lr * (step + 1) / warmup_steps
    "schedule": "step",  # the paper's milestones, or "cosine" (not in the paper)
    "label_smoothing": 0.0,
    "swa_epochs": 0,  # average the weights of the last N epochs (not in the paper)
    "train_split": "train",
    "val_size": 5000,
}
_CIFAR = {**_COMMON, "epochs": 300, "weight_decay": 5e-4}

RECIPES = {
    "C10": {**_CIFAR, "augment": False, "dropout": 0.4},
    "C10+": {**_CIFAR, "augment": True, "dropout": 0.2},
    "C100": {**_CIFAR, "augment": False, "dropout": 0.4},
    "C100+": {**_CIFAR, "augment": True, "dropout": 0.2},
    # Section 4.1.5; weight decay 1e-4 as in the ResNet it modifies (He et al. 2016).
    "ImageNet": {**_COMMON, "epochs": 100, "batch_size": 256, "weight_decay": 1e-4,
                 "dropout": 0.2, "augment": True, "lr_milestones": [0.3, 0.6, 0.9],
                 "val_size": 50000},
    "SVHN": {**_COMMON, "epochs": 40, "weight_decay": 1e-4, "dropout": 0.3, "augment": False,
             "train_split": "train+extra", "val_size": 6000},
    "TEXT": {**_COMMON, "epochs": 100, "weight_decay": 5e-5, "dropout": 0.1, "augment": False,
             "val_size": 1600},
}

# keras_newton.data dataset name -> paper name (without "+"). Your own images ("folder")
# get the CIFAR recipe.
DATASET_RECIPES = {"imagenet": "ImageNet",
                   "cifar10": "C10", "cifar100": "C100", "svhn": "SVHN", "folder": "C10"}
# Every text dataset (keras_newton.data.text.TEXT_DATASETS) gets the text recipe.
TEXT_RECIPE = "TEXT"


def recipe_name(dataset, augment):
    """Returns the paper's name of the recipe, e.g. ``("cifar10", True) -> "C10+"``."""
    if dataset not in DATASET_RECIPES:
        from keras_newton.data.text import is_text_dataset

        if is_text_dataset(dataset):
            return TEXT_RECIPE
    base = DATASET_RECIPES[dataset]
    return f"{base}+" if augment and f"{base}+" in RECIPES else base


def get_recipe(dataset, augment=False, **overrides):
    """Returns a copy of the recipe for ``dataset`` with ``overrides`` applied.

    Args:
        dataset: a canonical dataset name (``keras_newton.data.canonical_dataset``).
        augment: whether the "+" augmentation is used; picks C10+ over C10 etc.
        **overrides: recipe keys to replace; ``None`` values are ignored.

    Returns:
        A dict with every key of ``RECIPES[...]`` plus ``"recipe"`` (its name).
    """
    name = recipe_name(dataset, augment)
    # ImageNet's training views are always augmented (random-resized crop and flip).
    recipe = {**RECIPES[name], "augment": bool(augment) or name == "ImageNet", "recipe": name}
    for key, value in overrides.items():
        if key not in recipe:
            raise ValueError(f"Unknown recipe key. Valid keys: {sorted(RECIPES[name])}. "
                             f"Received: {key}={value!r}")
        if value is not None:
            recipe[key] = value
    _check(recipe)
    return recipe


# Options added after runs were started: a run's config.json records them only when they
# differ from these values, so that the configs of older runs still match.
LATER_OPTIONS = {"warmup_epochs": 0, "warmup": "constant", "schedule": "step",
                 "label_smoothing": 0.0, "swa_epochs": 0}
SCHEDULES = ("step", "cosine", "constant")
WARMUPS = ("constant", "linear")


def recorded_recipe(recipe):
    """The recipe as a run's ``config.json`` records it: without the options of
    ``LATER_OPTIONS`` at their defaults (``warmup`` also without warm-up epochs), so that
    runs from before the options still resume."""
    def default(key, value):
        if key == "warmup" and not recipe.get("warmup_epochs"):
            return True
        return key in LATER_OPTIONS and value == LATER_OPTIONS[key]

    return {k: v for k, v in recipe.items() if not default(k, v)}


def _check(recipe):
    for key in ("batch_size", "epochs"):
        value = recipe[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"`{key}` must be a positive integer. Received: {key}={value!r}")
    for key in ("lr", "lr_factor"):
        if not recipe[key] > 0:
            raise ValueError(f"`{key}` must be > 0. Received: {key}={recipe[key]!r}")
    if not 0 <= recipe["momentum"] < 1:
        raise ValueError(f"`momentum` must be in [0, 1). Received: momentum={recipe['momentum']}")
    if recipe["weight_decay"] < 0:
        raise ValueError(
            f"`weight_decay` must be >= 0. Received: weight_decay={recipe['weight_decay']}"
        )
    if recipe["dropout"] is not None and not 0 <= recipe["dropout"] < 1:
        raise ValueError(f"`dropout` must be in [0, 1). Received: dropout={recipe['dropout']}")
    warmup = recipe["warmup_epochs"]
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise ValueError("`warmup_epochs` must be an integer >= 0. "
                         f"Received: warmup_epochs={warmup!r}")
    if recipe["schedule"] not in SCHEDULES:
        raise ValueError(f"`schedule` must be one of {SCHEDULES}. "
                         f"Received: schedule={recipe['schedule']!r}")
    if recipe["warmup"] not in WARMUPS:
        raise ValueError(f"`warmup` must be one of {WARMUPS}. "
                         f"Received: warmup={recipe['warmup']!r}")
    smoothing = recipe["label_smoothing"]
    if isinstance(smoothing, bool) or not isinstance(smoothing, int | float) or not (
            0 <= smoothing < 1):
        raise ValueError("`label_smoothing` must be in [0, 1). "
                         f"Received: label_smoothing={smoothing!r}")
    if recipe["schedule"] != "step":
        if warmup >= recipe["epochs"]:
            raise ValueError(f"`warmup_epochs` must leave epochs for the {recipe['schedule']} "
                             f"schedule (of {recipe['epochs']}). Received: warmup_epochs={warmup}")
    elif warmup and warmup >= min(recipe["lr_milestones"], default=1) * recipe["epochs"]:
        raise ValueError("`warmup_epochs` must end before the first lr milestone "
                         f"({min(recipe['lr_milestones'])} * {recipe['epochs']} epochs). "
                         f"Received: warmup_epochs={warmup}")
    swa = recipe["swa_epochs"]
    if isinstance(swa, bool) or not isinstance(swa, int) or not 0 <= swa <= recipe["epochs"]:
        raise ValueError(f"`swa_epochs` must be an integer in [0, {recipe['epochs']}] (the "
                         f"run's epochs). Received: swa_epochs={swa!r}")
    if not all(0 < m < 1 for m in recipe["lr_milestones"]):
        raise ValueError("`lr_milestones` must be fractions of the training in (0, 1). "
                         f"Received: lr_milestones={recipe['lr_milestones']}")
