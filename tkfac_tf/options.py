"""The optimizers' options: frozen groups with their defaults, validation
and config entries, each option written once.

``Options.from_arguments(arguments)`` takes the constructor's keyword
arguments, validates each option (the messages name the argument and its
bounds) and the rules between them, and returns the four groups; the
optimizer reads every option from them and writes them back to its config
with ``Options.to_config()``. The class docstring of
``KroneckerFactoredOptimizer`` documents each option.
"""

from __future__ import annotations

import dataclasses
import numbers
import random
from typing import Any, Callable, Optional

from absl import logging
import keras
import numpy as np
import tensorflow as tf

from tkfac_tf.distribution import INVERSE_PLACEMENTS
from tkfac_tf.estimator import ESTIMATION_MODES
from tkfac_tf.fisher_blocks import CONV_STATISTICS, DAMPING_MODES, DAMPING_SPLITS, INVERSE_METHODS
from tkfac_tf.fisher_factors import MATMUL_DTYPES

CURVATURES = ("exact", "approximate")
STATISTICS_PASSES = ("auto", "step", "curvature")

_SCALAR_KINDS = "a Python, NumPy or 0-d tensor scalar"
INFINITY = float("inf")


def scalar(name: str, value: Any, integer: bool = False, what: Optional[str] = None,
           error: type = TypeError) -> float | int:
    """``value`` as a Python float (int if ``integer``) if it is a real scalar:
    a Python or NumPy number, a 0-d NumPy array, or a 0-d eager tensor /
    variable. Booleans, strings, arrays and symbolic tensors are refused
    with ``error`` naming ``name``."""
    what = what or ("an integer" if integer else "a real number")
    if isinstance(value, (bool, np.bool_)):
        raise error(f"{name} must be {what} ({_SCALAR_KINDS}), not a bool; got {value!r}.")
    if isinstance(value, numbers.Real):
        array = np.asarray(value)
    elif isinstance(value, np.ndarray) or tf.is_tensor(value) or isinstance(value, keras.Variable):
        try:
            array = np.asarray(value if isinstance(value, np.ndarray) else value.numpy())
        except Exception:  # a symbolic tensor (inside a tf.function)
            raise error(
                f"{name} must be {what} ({_SCALAR_KINDS}) known outside any "
                f"tf.function; got the symbolic tensor {value!r}."
            ) from None
    else:
        raise error(f"{name} must be {what} ({_SCALAR_KINDS}); got {type(value).__name__} {value!r}.")
    if array.shape != ():
        raise error(f"{name} must be {what} ({_SCALAR_KINDS}); got a value of shape {array.shape}.")
    if array.dtype.kind == "b" or array.dtype.kind not in ("iu" if integer else "iuf"):
        raise error(f"{name} must be {what} ({_SCALAR_KINDS}); got a {array.dtype} value {value!r}.")
    return int(array) if integer else float(array)


def number(name: str, value: Any, low: float, high: float, low_open: bool = False,
           high_open: bool = True) -> float:
    """``value`` as a float in the interval from ``low`` to ``high`` (open or
    closed ends), else ValueError naming ``name`` and the interval."""
    value = scalar(name, value)
    ok_low = value > low if low_open else value >= low
    ok_high = value < high if high_open else value <= high
    if not (ok_low and ok_high):
        left = "(" if low_open else "["
        right = ")" if high_open else "]"
        raise ValueError(f"{name} must be in {left}{low}, {high}{right}; got {value}.")
    return value


def interval(name: str, value: Any) -> Optional[int]:
    """None, or an integer ≥ 1 (a schedule interval or a size)."""
    if value is None:
        return None
    value = scalar(name, value, integer=True, what="an integer >= 1 or None", error=ValueError)
    if value < 1:
        raise ValueError(f"{name} must be an integer >= 1 or None; got {value!r}.")
    return value


def _curvature_batch_size(name, value):
    """'auto', 'ghost_halves', None (the whole batch) or an integer >= 1."""
    what = "'auto', 'ghost_halves', None or an integer >= 1"
    if value is None or (isinstance(value, str) and value in ("auto", "ghost_halves")):
        return value
    if isinstance(value, str):
        raise ValueError(f"{name} must be {what}; got {value!r}.")
    value = scalar(name, value, integer=True, what=what, error=ValueError)
    if value < 1:
        raise ValueError(f"{name} must be {what}; got {value!r}.")
    return value


def _count(name, value):
    value = scalar(name, value, integer=True, what="an integer >= 0", error=ValueError)
    if value < 0:
        raise ValueError(f"{name} must be an integer >= 0; got {value!r}.")
    return value


def _positive(name, value):
    return number(name, value, 0.0, INFINITY, low_open=True)


def _unit_interval(name, value):
    return number(name, value, 0.0, 1.0)


def _optional_positive(name, value):
    return None if value is None else _positive(name, value)


def _one_of(choices, optional=False):
    def check(name, value):
        if optional and value is None:
            return None
        if value not in choices:
            prefix = "None or " if optional else ""
            raise ValueError(f"{name} must be {prefix}one of {choices}; got {value!r}.")
        # The choice itself: a value equal to it (tf.float32 == 'float32') may not serialise.
        return choices[list(choices).index(value)]

    return check


def _flag(name, value):
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be True or False; got {value!r}.")
    return bool(value)


def _seed(name, value):
    return scalar(name, random.randrange(2**31) if value is None else value, integer=True)


def _required_interval(name, value):
    value = interval(name, value)
    if value is None:
        raise ValueError(f"{name} must be an integer >= 1; got None.")
    return value


def _option(default: Any, check: Callable[[str, Any], Any]):
    return dataclasses.field(default=default, metadata={"check": check})


@dataclasses.dataclass(frozen=True)
class _Group:
    """Validates every field with its check (``_option``) on creation, then
    the rules between fields (``_check_together``)."""

    def __post_init__(self):
        for field in dataclasses.fields(self):
            object.__setattr__(self, field.name, field.metadata["check"](field.name, getattr(self, field.name)))
        self._check_together()

    def _check_together(self):
        pass


@dataclasses.dataclass(frozen=True)
class Schedule(_Group):
    """When the statistics and the inverses are updated (``schedule``)."""

    cov_update_every: Optional[int] = _option(1, interval)
    inv_update_every: Optional[int] = _option(20, interval)
    inverse_warmup_steps: int = _option(0, _count)

    def _check_together(self):
        if self.inverse_warmup_steps and self.inv_update_every is None:
            raise ValueError(
                "inverse_warmup_steps needs the automatic inverse schedule "
                "(inv_update_every); with inv_update_every=None call "
                "inv_update_op() yourself."
            )


@dataclasses.dataclass(frozen=True)
class FixedRule(_Group):
    """The fixed step: momentum τ and KL clipping."""

    momentum: float = _option(0.9, lambda name, value: number(name, value, 0.0, 1.0))
    norm_constraint: Optional[float] = _option(None, _optional_positive)


@dataclasses.dataclass(frozen=True)
class AdaptiveRule(_Group):
    """The quadratic-model step and its Levenberg–Marquardt damping."""

    adaptive: bool = _option(False, _flag)
    curvature: str = _option("exact", _one_of(CURVATURES))
    curvature_batch_size: Optional[int | str] = _option("auto", _curvature_batch_size)
    curvature_update_every: int = _option(1, _required_interval)
    damping_adaptation_interval: int = _option(5, _required_interval)
    damping_adaptation_decay: float = _option(
        0.95, lambda name, value: number(name, value, 0.0, 1.0, low_open=True)
    )
    min_damping: float = _option(1e-5, _positive)
    max_damping: float = _option(1e8, scalar)

    def _check_together(self):
        object.__setattr__(self, "max_damping", number(
            "max_damping", self.max_damping, self.min_damping, INFINITY, high_open=False
        ))
        if not self.adaptive:
            changed = [field.name for field in dataclasses.fields(self)
                       if field.name != "adaptive" and getattr(self, field.name) != field.default]
            if changed:
                logging.warning(
                    "%s only act on the adaptive step and have no effect with adaptive=False (the "
                    "fixed step). Pass adaptive=True (e.g. TKFAC.adaptive(...)) or leave them out.",
                    ", ".join(changed))
        elif self.curvature_update_every > 1 and self.curvature != "exact":
            raise ValueError(
                f"curvature_update_every={self.curvature_update_every} amortises the exact curvature "
                "products; curvature='approximate' has no extra pass to amortise. Pass "
                "curvature_update_every=1 or curvature='exact'."
            )


@dataclasses.dataclass(frozen=True)
class Estimation(_Group):
    """How the Fisher blocks are estimated, damped and inverted
    (``estimator``, ``fisher_blocks``, ``fisher_factors``)."""

    cov_ema_decay: float = _option(0.95, _unit_interval)
    estimation_mode: str = _option("gradients", _one_of(ESTIMATION_MODES))
    seed: Optional[int] = _option(None, _seed)
    conv_damping: str = _option("plain", _one_of(DAMPING_MODES))
    conv_damping_floor: float = _option(1e-6, _positive)
    damping_split: Optional[str] = _option(None, _one_of(DAMPING_SPLITS, optional=True))
    inverse_placement: str = _option("distributed", _one_of(INVERSE_PLACEMENTS))
    matmul_dtype: str = _option("float32", _one_of(MATMUL_DTYPES))
    cov_batch_size: Optional[int] = _option(None, interval)
    statistics_pass: str = _option("auto", _one_of(STATISTICS_PASSES))
    conv_statistics_samples: Optional[int] = _option(8192, interval)
    conv_statistics: str = _option("auto", _one_of(CONV_STATISTICS))
    inverse_method: str = _option("cholesky", _one_of(INVERSE_METHODS))
    regularizer_curvature: bool = _option(True, _flag)


@dataclasses.dataclass(frozen=True)
class Options:
    """Every option of an optimizer, by group."""

    schedule: Schedule
    fixed: FixedRule
    adaptive: AdaptiveRule
    estimation: Estimation

    GROUPS = {"schedule": Schedule, "fixed": FixedRule, "adaptive": AdaptiveRule,
              "estimation": Estimation}

    def __post_init__(self):
        if self.adaptive.adaptive and self.fixed.norm_constraint is not None:
            raise ValueError(
                "norm_constraint (KL clipping) is for the fixed-step optimizer; "
                "the adaptive step is sized by its quadratic model. Pass "
                "norm_constraint=None with adaptive=True."
            )

    @classmethod
    def names(cls) -> dict[str, str]:
        """option name -> its group's name."""
        return dict(_GROUP_OF)

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        """option name -> default."""
        return {field.name: field.default for group_cls in cls.GROUPS.values()
                for field in dataclasses.fields(group_cls)}

    @classmethod
    def from_arguments(cls, arguments: dict[str, Any]) -> tuple["Options", dict[str, Any]]:
        """The options named in ``arguments`` (defaults for the others),
        validated, and the arguments that are not options."""
        names = _GROUP_OF
        by_group = {group: {} for group in cls.GROUPS}
        rest = {}
        for name, value in arguments.items():
            if name in names:
                by_group[names[name]][name] = value
            else:
                rest[name] = value
        return cls(**{group: group_cls(**by_group[group])
                      for group, group_cls in cls.GROUPS.items()}), rest

    def replace(self, **changes: Any) -> "Options":
        """These options with some of them changed (validated again)."""
        names = _GROUP_OF
        groups = {group: getattr(self, group) for group in self.GROUPS}
        for name, value in changes.items():
            groups[names[name]] = dataclasses.replace(groups[names[name]], **{name: value})
        return Options(**groups)

    def get(self, name: str) -> Any:
        """The value of option ``name``."""
        return getattr(getattr(self, _GROUP_OF[name]), name)

    def to_config(self) -> dict[str, Any]:
        """Every option by name (JSON-serialisable)."""
        return {name: self.get(name) for name in _GROUP_OF}


_GROUP_OF = {field.name: group for group, group_cls in Options.GROUPS.items()
             for field in dataclasses.fields(group_cls)}
