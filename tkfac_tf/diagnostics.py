"""How close TKFAC's and K-FAC's blocks are to the exact Fisher blocks.

For one batch and each registered Kronecker layer l (Dense, the conv family,
EinsumDense), ``fisher_approximation_errors`` returns the relative errors

    ‖F̂_l − F_l‖_F / ‖F_l‖_F

of TKFAC's block (δ Φ ⊗ Ψ) and K-FAC's (A ⊗ G), both from one covariance
update in estimation_mode='exact' on the batch, against the exact block

    F_l = (1/N) Σ_i Σ_k g_ik g_ikᵀ,   g_ik = ∂(v_ikᵀ z_i) / ∂Θ_l,

z_i the registered outputs of example i and v_ik the columns of the exact
output Fisher (``loss_functions``: every class at every position), i.e.
F_l = E_i[J_iᵀ F_z J_i] with J_i example i's Jacobian: brute force with
per-example gradients, dense [n_l, n_l] in float64, so refused above
``max_parameters`` per layer. TKFAC's trace equals tr F_l exactly; the
paper's argument (Gao et al. 2021) is that its blocks are also closer to
F_l than K-FAC's, which this measures (docs/math.md).
"""

from typing import Dict, Optional, Sequence

import numpy as np
import tensorflow as tf

from tkfac_tf import layer_collection as layer_collection_lib
from tkfac_tf import optimizer as optimizer_lib

MAX_PARAMETERS = 4096
"""Default limit on a layer's parameter count n_l (the exact block is a
dense [n_l, n_l] float64 matrix: 128 MiB at the limit)."""


def fisher_approximation_errors(
    model,
    layer_collection: layer_collection_lib.LayerCollection,
    x,
    layers: Optional[Sequence[str]] = None,
    max_parameters: int = MAX_PARAMETERS,
) -> Dict[str, Dict[str, float]]:
    """Relative Frobenius errors of TKFAC's and K-FAC's blocks on batch ``x``.

    Args:
      model: the Keras model whose layers ``layer_collection`` registers.
      layer_collection: its collection (its predictive distributions define
        the Fisher). Any optimizer bound to it keeps working.
      x: one batch of model inputs (anything ``model(x, training=True)``
        takes). Layers that couple examples (BatchNormalization in training
        mode) make g_ik depend on the whole batch, as in the statistics.
      layers: names of registered Kronecker layers to measure (default: all).
      max_parameters: refuse a layer with more parameters than this.

    Returns:
      {layer name: {"parameters": n_l, "tkfac": error, "kfac": error,
      "trace": tr F_l, "tkfac_trace": tr F̂ (TKFAC)}}.

    Raises:
      ValueError: a name in ``layers`` is not a registered Kronecker layer,
        a selected layer has more than ``max_parameters`` parameters, or the
        collection has no predictive distribution.
    """
    kinds = {kind.block_name: kind for kind in layer_collection.layer_kinds
             if kind.structure == "kronecker"}
    names = list(kinds) if layers is None else list(layers)
    for name in names:
        if name not in kinds:
            raise ValueError(
                f"fisher_approximation_errors: '{name}' is not a registered "
                f"Kronecker layer; choose among {sorted(kinds)}."
            )
        count = kinds[name].num_parameters
        if count > max_parameters:
            raise ValueError(
                f"fisher_approximation_errors: layer '{name}' has {count} "
                f"parameters; its exact Fisher block would be a dense "
                f"[{count}, {count}] matrix (limit max_parameters="
                f"{max_parameters}). Pass layers=[...] without it, or raise "
                "max_parameters."
            )
    if not layer_collection.distributions:
        raise ValueError(
            "fisher_approximation_errors needs a registered predictive "
            "distribution (register_*_predictive_distribution or from_model(loss=...))."
        )
    approximations = _approximate_blocks(model, layer_collection, x, names)
    exact = _exact_blocks(model, layer_collection, x, [kinds[n] for n in names])
    results = {}
    for name in names:
        reference = exact[name]
        norm = np.linalg.norm(reference)
        row = {"parameters": int(reference.shape[0]), "trace": float(np.trace(reference))}
        for approximation, blocks in approximations.items():
            error = np.linalg.norm(blocks[name] - reference)
            row[approximation] = float(error / norm) if norm > 0 else float("nan")
        row["tkfac_trace"] = float(np.trace(approximations["tkfac"][name]))
        results[name] = row
    return results


def _approximate_blocks(model, collection, x, names):
    """{'tkfac' | 'kfac': {name: F̂ [n, n] float64}} after one exact
    covariance update on ``x`` (the first update sets the averages to the
    batch's statistics)."""
    recorder = collection.recorder
    hook = recorder.eager_tape_wanted  # the user's optimizer's eager hook, restored below
    blocks = {}
    try:
        for cls in (optimizer_lib.TKFAC, optimizer_lib.KFAC):
            opt = cls(layer_collection=collection, estimation_mode="exact", seed=0)
            opt.build(model.trainable_variables)

            # Eagerly: one update, which tracing would only slow down.
            model(x, training=True)
            opt.cov_update_op()
            blocks[cls.approximation] = {
                name: opt.fisher_blocks[name].full_fisher().numpy().astype(np.float64)
                for name in names
            }
    finally:
        recorder.eager_tape_wanted = hook
    return blocks


def _exact_blocks(model, collection, x, kinds):
    """{name: F_l [n, n] float64}: (1/N) Σ_i Σ_k g_ik g_ikᵀ from per-example
    gradients (a GradientTape jacobian per backward vector)."""
    parameters = [p for kind in kinds for p in kind.parameters]
    sums = {kind.block_name: 0.0 for kind in kinds}
    num_examples = None
    for predictive in collection.distributions:
        watched = {id(predictive.layer): predictive.tensor}
        with tf.GradientTape(persistent=True) as tape:
            with collection.recorder.probing(watched, tape) as outputs:
                model(x, training=True)
            projections = []
            for z in outputs:
                for v in predictive.exact_backward_vectors(z):
                    v = tf.stop_gradient(tf.cast(v, z.dtype))
                    axes = list(range(1, len(z.shape)))
                    projections.append(tf.reduce_sum(v * z, axis=axes))  # [N]
        for projection in projections:
            num_examples = int(projection.shape[0])
            jacobians = tape.jacobian(projection, parameters,
                                      unconnected_gradients=tf.UnconnectedGradients.ZERO)
            offset = 0
            for kind in kinds:
                count = len(kind.parameters)
                per_kind = jacobians[offset : offset + count]
                offset += count
                g = np.stack([_flat(kind.to_matrix([j[i] for j in per_kind]))
                              for i in range(num_examples)])  # [N, n]
                sums[kind.block_name] = sums[kind.block_name] + g.T @ g
        del tape
    return {name: total / num_examples for name, total in sums.items()}


def _flat(matrix):
    """∇Θ (one matrix, or a tuple of them for several parts) as one
    row-major float64 vector, the order of ``full_fisher``."""
    parts = matrix if isinstance(matrix, (tuple, list)) else (matrix,)
    return np.concatenate([np.asarray(m, np.float64).reshape(-1) for m in parts])
