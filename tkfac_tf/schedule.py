"""When a step updates the statistics, the inverses and the damping.

``step`` counts applied steps from 0 (the optimizer's ``iterations``), so the
first step does every scheduled part. Intervals of None hand that part to
the user (``cov_update_op()`` / ``inv_update_op()``).
"""

from __future__ import annotations

import tensorflow as tf
from absl import logging

from tkfac_tf.options import AdaptiveRule, Schedule


def is_covariance_step(schedule: Schedule, step: tf.Tensor) -> tf.Tensor:
    """k % cov_update_every == 0 (needs cov_update_every)."""
    return step % schedule.cov_update_every == 0


def is_inverse_step(schedule: Schedule, step: tf.Tensor) -> tf.Tensor:
    """k % inv_update_every == 0 or k < inverse_warmup_steps (needs
    inv_update_every)."""
    return (step % schedule.inv_update_every == 0) | (step < schedule.inverse_warmup_steps)


def is_adaptation_step(interval: int, step: tf.Tensor) -> tf.Tensor:
    """(k + 1) % T == 0: the Levenberg–Marquardt rule adapts λ."""
    return (step + 1) % interval == 0


def is_curvature_step(schedule: Schedule, rule: AdaptiveRule, step: tf.Tensor,
                      rejected_before: tf.Tensor) -> tf.Tensor:
    """Whether the adaptive step k solves its quadratic model afresh (the
    curvature products of d and δ): k % curvature_update_every == 0, every
    inverse step (a new preconditioner changes d's scale), every
    adaptation step and every step after a rejected one (``rejected_before``:
    ρ is checked on both, its h(θ) from the products' pass). Other steps
    use the calibrated preconditioner curvature
    (``update_rules.calibrated_curvature``)."""
    fresh = ((step % rule.curvature_update_every == 0)
             | is_adaptation_step(rule.damping_adaptation_interval, step) | rejected_before)
    if schedule.inv_update_every is not None:
        fresh |= is_inverse_step(schedule, step)
    return fresh


def eager_tape_wanted(schedule: Schedule, step: int) -> bool:
    """Whether an eager step k needs the layer taps' tape (the statistics
    are taken on it)."""
    return schedule.cov_update_every is None or step % schedule.cov_update_every == 0


def never_updated(schedule: Schedule, manual_calls: set) -> list[str]:
    """The parts of the update that have no schedule and were never run by
    hand (``manual_calls`` holds 'cov' / 'inv' once called)."""
    return [
        f"{part}_update_every=None and no {part}_update_op() call"
        for part, every in (("cov", schedule.cov_update_every), ("inv", schedule.inv_update_every))
        if every is None and part not in manual_calls
    ]


def warn_never_updated(name: str, missing: list[str]) -> None:
    """Logs that a step runs with parts that never ran (the step is then
    plain momentum SGD, or preconditioned by never-updated inverses)."""
    logging.warning(
        "%s: apply_gradients runs with %s so far: the Fisher factors "
        "or their inverses have never been updated, so the step uses "
        "no Fisher information (plain momentum SGD up to a constant "
        "scale). Call "
        "opt.cov_update_op() and opt.inv_update_op() in your training "
        "step, or set cov_update_every / inv_update_every. (Logged once.)",
        name,
        " and ".join(missing),
    )
