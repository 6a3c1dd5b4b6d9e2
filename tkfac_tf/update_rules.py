"""The update rules: the step's coefficients (α, μ), ρ and the damping rule.

Every rule yields coefficients (α, μ) for the preconditioned gradient
d = precond(∇) and the previous update δ, and one formula applies them:

    u = μ δ − α d,    θ ← θ + u,    δ ← u.

The fixed rule: α = lr · c (c ≤ 1 the KL-clipping coefficient), μ = τ. The
adaptive rule: (α, μ) = lr · argmin M(α'Δ + μ'δ) over the quadratic model M
(Martens & Grosse 2015, §6–7; Δ = −d), and the Levenberg–Marquardt rule
adapts λ from ρ. Pure functions of tensors: nothing here assigns.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

import tensorflow as tf

from tkfac_tf import curvature


class Coefficients(NamedTuple):
    """u = mu · δ − alpha · d (float32 scalars, or Python floats)."""

    alpha: tf.Tensor | float
    mu: tf.Tensor | float


def updates(coefficients: Coefficients, directions: Sequence[tf.Tensor],
            previous: Sequence[tf.Tensor]) -> list[tf.Tensor]:
    """u = μ δ − α d per variable, in each δ's dtype (``previous``: the
    previous updates, e.g. the momentum variables)."""
    alpha, mu = coefficients
    return [
        tf.cast(mu, p.dtype) * p - tf.cast(alpha * d, p.dtype)
        for d, p in zip(directions, previous)
    ]


def fixed(learning_rate: tf.Tensor, momentum: float, norm_constraint: Optional[float],
          directions: Sequence[tf.Tensor], grads: Sequence[tf.Tensor]) -> Coefficients:
    """α = lr · c, μ = τ, with c = min(1, √(C / (lr² Σ⟨d, ∇⟩))) when a norm
    constraint C is given (KL clipping), else c = 1."""
    alpha = learning_rate
    if norm_constraint is not None:
        sq_norm = learning_rate * learning_rate * curvature.dot(directions, grads)
        coefficient = tf.minimum(1.0, tf.sqrt(tf.math.divide_no_nan(norm_constraint, sq_norm)))
        coefficient = tf.where(sq_norm > 0.0, coefficient, 1.0)
        alpha = learning_rate * coefficient
    return Coefficients(alpha, momentum)


class QuadraticModelStep(NamedTuple):
    """The adaptive rule's result: the coefficients (scaled by lr), the
    model's predicted change M₀(u) − M₀(0) without its damping term (ρ's
    denominator), and whether both are finite (bool tensor)."""

    coefficients: Coefficients
    model_change: tf.Tensor
    finite: tf.Tensor


def quadratic_model(gram: tf.Tensor, dots: tf.Tensor, damping: tf.Tensor,
                    learning_rate: tf.Tensor,
                    rho_gradient_dots: Optional[tf.Tensor] = None) -> QuadraticModelStep:
    """The adaptive coefficients from ``gram`` = [uᵢᵀ G uⱼ] of (d, δ) [2, 2]
    and ``dots`` = the pairwise dots of (d, δ, ∇) [3, 3] (``curvature``).
    With Δ = −d the products take signs: A = S (G + λ D) S, b = S [∇ᵀd, ∇ᵀδ],
    S = diag(−1, 1), D the dots of (d, δ); (α, μ) = lr · ``solve_quadratic_model``.
    ρ's prediction takes b from ``rho_gradient_dots`` ([gᵀd, gᵀδ] [2]) where
    its losses are of another batch than ∇'s (gradient accumulation), else b."""
    signs = tf.constant([-1.0, 1.0])
    flip = signs[:, None] * signs[None, :]
    gram = flip * gram
    identity_gram = flip * dots[:2, :2]
    matrix = gram + damping * identity_gram
    linear = signs * dots[2, :2]
    alpha, mu = solve_quadratic_model(matrix, linear, identity_gram[1, 1] > 0.0)
    coefficients = Coefficients(learning_rate * alpha, learning_rate * mu)
    # ρ's prediction leaves the damping term out (as tensorflow/kfac and
    # kfac-jax do): on an exactly quadratic loss ρ = 1 whatever λ is.
    rho_linear = linear if rho_gradient_dots is None else signs * rho_gradient_dots
    model_change = quadratic_model_change(coefficients, rho_linear, gram)
    finite = tf.reduce_all(tf.math.is_finite(tf.stack([alpha, mu, model_change])))
    return QuadraticModelStep(coefficients, model_change, finite)


CALIBRATION_MEMORY = 0.5
"""c on a curvature step is max(dᵀGd / ∇ᵀd, 0.5 · the previous c)."""


class CurvatureCalibration(NamedTuple):
    """State of the amortised exact curvature (float32 scalars): ``scale``
    c, set on curvature steps (``calibrated_curvature``), and
    ``momentum_curvature`` q = δᵀBδ predicted for the next step's δ."""

    scale: tf.Tensor
    momentum_curvature: tf.Tensor


def calibrated_curvature(fresh: tf.Tensor, exact: tf.Tensor, dots: tf.Tensor,
                         state: CurvatureCalibration) -> tuple[tf.Tensor, CurvatureCalibration]:
    """The curvature [uᵢᵀ G uⱼ] of (d, δ) for an amortised adaptive step.

    B is the curvature the preconditioner inverts (d = B⁻¹∇, so dᵀBd = ∇ᵀd
    and dᵀBδ = ∇ᵀδ cost nothing). On a curvature step (``fresh``) the exact
    Gram matrix ``exact`` is used, c becomes max(dᵀGd / ∇ᵀd, c/2) (kept
    if the ratio is not a finite positive number: a large curvature is
    forgotten over a few curvature steps) and q = δᵀGδ / c; elsewhere

        G ≈ c · [[∇ᵀd, ∇ᵀδ], [∇ᵀδ, q]]

    with q = δᵀBδ from ``next_momentum_curvature`` of the previous step.
    ``dots``: the pairwise dots of (d, δ, ∇) [3, 3].
    Returns (Gram [2, 2], the calibration of this step)."""
    grad_d, grad_delta = dots[2, 0], dots[2, 1]
    ratio = tf.math.divide_no_nan(exact[0, 0], grad_d)
    usable = tf.math.is_finite(ratio) & (ratio > 0.0)
    kept = tf.convert_to_tensor(state.scale)
    scale = tf.where(fresh & usable, tf.maximum(ratio, CALIBRATION_MEMORY * kept), kept)
    momentum_curvature = tf.where(fresh, tf.math.divide_no_nan(exact[1, 1], scale),
                                  tf.convert_to_tensor(state.momentum_curvature))
    modelled = scale * tf.stack([tf.stack([grad_d, grad_delta]),
                                 tf.stack([grad_delta, momentum_curvature])])
    return tf.where(fresh, exact, modelled), CurvatureCalibration(scale, momentum_curvature)


def next_momentum_curvature(coefficients: Coefficients, dots: tf.Tensor,
                            momentum_curvature: tf.Tensor) -> tf.Tensor:
    """uᵀBu of this step's update u = μδ − αd, the next step's δᵀBδ while B
    stays the same: μ² δᵀBδ − 2μα ∇ᵀδ + α² ∇ᵀd (Bd = ∇)."""
    alpha, mu = coefficients
    return mu * mu * momentum_curvature - 2.0 * mu * alpha * dots[2, 1] + alpha * alpha * dots[2, 0]


def solve_quadratic_model(matrix, linear, use_momentum):
    """Minimiser c = (α, μ) of the quadratic model along Δ and δ with the
    momentum kept in [0, 1]:

        min  M(αΔ + μδ) − h = cᵀ b + ½ cᵀ A c   subject to 0 ≤ μ ≤ 1,

    A = [[Δᵀ(G+λI)Δ, Δᵀ(G+λI)δ], [δᵀ(G+λI)Δ, δᵀ(G+λI)δ]] (``matrix``,
    float32 [2, 2]), b = [∇ᵀΔ, ∇ᵀδ] (``linear``, [2]). The unconstrained
    minimiser is c = −A⁻¹ b; if its μ leaves [0, 1], μ is clipped to the
    nearer bound and α = −(b₀ + μ A₀₁) / A₀₀ (the constrained minimiser of
    a convex quadratic lies on that bound). The bound is ours: on one
    minibatch the 2×2 model often asks for μ far outside it (−4 to 127 on
    the MNIST MLP at batch 100, shuffled or class-sorted), fitting the
    batch's noise, and training then diverges (docs/adaptive.md).

    Without momentum (``use_momentum`` False, e.g. δ = 0 on the first step),
    or when the 2×2 system is (nearly) singular, μ = 0 and α = −b₀ / A₀₀.

    Returns:
      (alpha, mu) float32 scalars (non-finite when A₀₀ = 0, i.e. d = 0: the
      caller skips such a step without counting it as non-finite).
    """
    a00, a01, a11 = matrix[0, 0], matrix[0, 1], matrix[1, 1]
    b0, b1 = linear[0], linear[1]
    det = a00 * a11 - a01 * a01
    usable = use_momentum & (a11 > 0.0) & (det > 1e-6 * a00 * a11)
    safe_det = tf.where(usable, det, 1.0)
    mu = tf.where(usable, -(a00 * b1 - a01 * b0) / safe_det, 0.0)
    mu = tf.clip_by_value(mu, 0.0, 1.0)
    alpha = -(b0 + mu * a01) / a00
    return alpha, mu


def quadratic_model_change(coefficients, linear, matrix):
    """M(u) − M(0) = cᵀ b + ½ cᵀ A c for u = c₀Δ + c₁δ (b as in
    ``solve_quadratic_model``; A the model's [2, 2] curvature, with the
    damping term for choosing c, without it for ρ)."""
    c = tf.stack(coefficients)
    return tf.reduce_sum(c * linear) + 0.5 * tf.reduce_sum(c[:, None] * matrix * c[None, :])


def reduction_ratio(before, after, model_change, measured):
    """ρ on a ``measured`` step (the losses were evaluated), else 0: with
    Δh = h(θ + u) − h(θ) and ΔM = M₀(u) − M₀(0) (``model_change``),
    ρ = Δh / ΔM where the model predicts a fall (ΔM < 0: always, where ρ's
    losses are those of the model's gradient), else 2 − Δh / ΔM (the last
    micro-batch under gradient accumulation may be predicted to rise):
    ρ = 1 − (Δh − ΔM) / |ΔM| either way, so a change above the prediction
    gives ρ < 1 (λ rises) and ρ < 0 is a rise the model did not predict."""
    ratio = (after - before) / model_change
    return tf.where(measured, tf.where(model_change < 0.0, ratio, 2.0 - ratio), 0.0)


REJECTED_STEP_DAMPING_FACTOR = 10.0
"""λ's factor after a rejected step (``rejects``): the quadratic model was
wrong in sign, not in degree, so λ jumps rather than creeps (λ/ω is ×1.29
with the preset's ω = 0.95⁵)."""


def rejects(before, after, rho, measured):
    """Whether a step is rejected: on a ``measured`` step, ρ < 0 (the loss
    rose where the model predicted a fall, or rose beyond twice a predicted
    rise: ``reduction_ratio``), or a loss is not finite (overflow)."""
    finite = tf.math.is_finite(before) & tf.math.is_finite(after)
    return measured & (tf.logical_not(finite) | (rho < 0.0))


def rejected_step_damping(damping, max_damping):
    """λ after a rejected step: min(λ · ``REJECTED_STEP_DAMPING_FACTOR``, max)."""
    return tf.minimum(damping * REJECTED_STEP_DAMPING_FACTOR, max_damping)


def levenberg_marquardt(damping, rho, decay, min_damping, max_damping):
    """λ ← ωλ if ρ > 3/4, λ/ω if ρ < 1/4 or ρ is not finite, else λ;
    clipped to [min, max] (Martens & Grosse 2015, §6.5; ω = ``decay``).
    A step with ρ < 0 or not finite is rejected instead (``rejects``)."""
    raise_damping = (rho < 0.25) | tf.logical_not(tf.math.is_finite(rho))
    damping = tf.where(rho > 0.75, damping * decay, tf.where(raise_damping, damping / decay, damping))
    return tf.clip_by_value(damping, min_damping, max_damping)
