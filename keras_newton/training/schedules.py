"""The recipe's learning rate per step and per epoch: step or cosine decay, warm-up.

``recipe_lr`` is the reference in plain Python; `RecipeSchedule` computes the same
values with ``keras.ops`` from the optimizer's step counter (its ``iterations``, 0 for
the first update), so a run resumed with its step counter continues the schedule
exactly. ``epoch_lr`` is the per-epoch variant that `callbacks.TimeBudget` sets.

- ``schedule="step"`` (the paper's): ``lr * lr_factor ** k`` after ``k`` milestones; a
  milestone ``m`` switches at step ``int(m * total_steps)``.
- ``schedule="cosine"``: ``lr * (1 + cos(pi * t)) / 2``, ``t`` the fraction of the steps
  after the warm-up that has passed (1 would be the step after the last one: the last
  step's lr is small, not 0).
- ``schedule="constant"``: ``lr`` after the warm-up.
- Warm-up of ``warmup_epochs``: ``"constant"`` holds ``lr * lr_factor`` (He et al. 2016),
  ``"linear"`` ramps ``lr * (step + 1) / warmup_steps`` (Goyal et al. 2017), reaching
  ``lr`` at its last step.
"""

import math

import keras


def _settings(recipe, steps_per_epoch, epochs=None):
    epochs = recipe["epochs"] if epochs is None else epochs
    return {
        "lr": float(recipe["lr"]), "lr_factor": float(recipe["lr_factor"]),
        "total_steps": int(epochs * steps_per_epoch),
        "milestone_steps": [int(m * epochs * steps_per_epoch) for m in recipe["lr_milestones"]],
        "warmup_steps": int(recipe.get("warmup_epochs", 0) * steps_per_epoch),
        "warmup": recipe.get("warmup", "constant"),
        "schedule": recipe.get("schedule", "step"),
    }


def _lr(step, lr, lr_factor, total_steps, milestone_steps, warmup_steps, warmup, schedule):
    if step < warmup_steps:
        return lr * lr_factor if warmup == "constant" else lr * (step + 1) / warmup_steps
    if schedule == "cosine":
        t = min(max((step - warmup_steps) / max(total_steps - warmup_steps, 1), 0.0), 1.0)
        return lr * 0.5 * (1.0 + math.cos(math.pi * t))
    if schedule == "constant":
        return lr
    return lr * lr_factor ** sum(step >= b for b in milestone_steps)


def recipe_lr(recipe, step, steps_per_epoch, epochs=None):
    """The learning rate of training step ``step`` (0-based) in plain Python.

    Args:
        recipe: the run's recipe (``lr``, ``lr_factor``, ``lr_milestones``, ``epochs``,
            ``warmup_epochs``, ``warmup``, ``schedule``).
        step: the optimizer's step counter before the update.
        steps_per_epoch: training steps per epoch.
        epochs: the run's length, default ``recipe["epochs"]``.
    """
    return _lr(step, **_settings(recipe, steps_per_epoch, epochs))


def epoch_lr(recipe, epoch, epochs):
    """The learning rate of a whole epoch (0-based ``epoch`` of ``epochs``), for schedules
    set per epoch (`callbacks.TimeBudget`): a milestone ``m`` applies from the first epoch
    at or past ``m * epochs``; the linear warm-up holds ``lr * (epoch + 1) /
    warmup_epochs``; the cosine its value at the epoch's start."""
    lr, warmup = recipe["lr"], recipe.get("warmup_epochs", 0)
    if epoch < warmup:
        if recipe.get("warmup", "constant") == "constant":
            return lr * recipe["lr_factor"]
        return lr * (epoch + 1) / warmup
    if recipe.get("schedule", "step") == "cosine":
        return lr * 0.5 * (1.0 + math.cos(math.pi * (epoch - warmup) / max(epochs - warmup, 1)))
    if recipe.get("schedule", "step") == "constant":
        return lr
    passed = sum(epoch + 1e-9 >= m * epochs for m in recipe["lr_milestones"])
    return lr * recipe["lr_factor"] ** passed


@keras.saving.register_keras_serializable(package="keras_newton")
class RecipeSchedule(keras.optimizers.schedules.LearningRateSchedule):
    """`recipe_lr` as a Keras learning-rate schedule (see the module docstring).

    Args:
        lr: the base learning rate.
        lr_factor: factor per milestone passed; the constant warm-up's factor.
        total_steps: training steps of the run.
        milestone_steps: steps from which each further factor applies (step schedule).
        warmup_steps: steps of warm-up (0: none).
        warmup: ``"constant"`` or ``"linear"``.
        schedule: ``"step"``, ``"cosine"`` or ``"constant"``.

    Example:
    >>> schedule = RecipeSchedule.from_recipe(get_recipe("cifar10", True, epochs=40,
    ...     schedule="cosine", warmup_epochs=2, warmup="linear"), steps_per_epoch=351)
    >>> keras.optimizers.SGD(schedule, momentum=0.9, nesterov=True)
    """

    def __init__(self, lr, lr_factor, total_steps, milestone_steps=(), warmup_steps=0,
                 warmup="constant", schedule="step"):
        self.lr, self.lr_factor = float(lr), float(lr_factor)
        self.total_steps, self.warmup_steps = int(total_steps), int(warmup_steps)
        self.milestone_steps = sorted(int(b) for b in milestone_steps)
        self.warmup, self.schedule = warmup, schedule

    @classmethod
    def from_recipe(cls, recipe, steps_per_epoch):
        return cls(**_settings(recipe, steps_per_epoch))

    def __call__(self, step):
        ops = keras.ops
        step = ops.cast(step, "float32")
        if self.schedule == "cosine":
            span = float(max(self.total_steps - self.warmup_steps, 1))
            t = ops.clip((step - self.warmup_steps) / span, 0.0, 1.0)
            value = self.lr * 0.5 * (1.0 + ops.cos(math.pi * t))
        elif self.schedule == "constant":
            value = ops.convert_to_tensor(self.lr, "float32")
        else:  # Python-computed values, as PiecewiseConstantDecay's
            value = ops.convert_to_tensor(self.lr, "float32")
            for i, boundary in enumerate(self.milestone_steps):
                value = ops.where(step >= boundary, self.lr * self.lr_factor ** (i + 1), value)
        if self.warmup_steps:
            warm = (self.lr * self.lr_factor if self.warmup == "constant"
                    else self.lr * (step + 1.0) / self.warmup_steps)
            value = ops.where(step < self.warmup_steps, warm, value)
        return value

    def get_config(self):
        return {"lr": self.lr, "lr_factor": self.lr_factor, "total_steps": self.total_steps,
                "milestone_steps": self.milestone_steps, "warmup_steps": self.warmup_steps,
                "warmup": self.warmup, "schedule": self.schedule}
