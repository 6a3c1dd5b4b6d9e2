"""FisherEstimator: the curvature side of the optimizers.

Owns one Fisher block per registered layer and everything that estimates
curvature from a training step: the backward vectors of each estimation mode,
the batch statistics of the factors, their running averages, the damped
inverses, the preconditioning of a gradient, and curvature-vector products
(the blocks' approximation here; the exact Gauss–Newton products are in
``curvature``). The optimizer keeps the Keras glue, the schedule and the
update rule.
"""

import numpy as np
import tensorflow as tf
from absl import logging

from tkfac_tf import curvature
from tkfac_tf import distribution
from tkfac_tf import fisher_blocks
from tkfac_tf import fisher_factors
from tkfac_tf import loss_functions

ESTIMATION_MODES = ("gradients", "empirical", "exact")


class FisherEstimator:
    """Curvature estimate of the layers of one LayerCollection.

    Args:
      approximation: 'tkfac' (δ Φ ⊗ Ψ) or 'kfac' (A ⊗ G).
      estimation_mode: 'gradients', 'empirical' or 'exact' (see ``optimizer``).
      seed: integer seed of the sampled targets ('gradients') and of the
        example subsets (``cov_batch_size``).
      cov_batch_size: None (every example) or m ≥ 1: each block's statistics
        are summed over a random subset of m examples of the replica's batch
        (``example_subset``), counted as m examples.
      conv_statistics_samples: None, or S: without ``cov_batch_size``, a
        convolution block with P output positions per example sums its
        statistics over max(MIN_CONV_SUBSET, ⌈S / P⌉) examples
        (``conv_subset_size``) (not where it reduces its positions).
      conv_statistics: 'auto', 'expand' or 'reduce': the samples of
        convolution blocks (``fisher_blocks.KroneckerFisherBlock.
        reduces_positions``).
      damping_split: None (each block's own rule) or 'sqrt' / 'pi' for every
        Kronecker block (``fisher_blocks.damping_shifts``).
      regularizer_curvature: whether each block's damping adds the mean
        curvature κ̄ of its variables' Keras weight regularizers
        (``penalty_damping``).
    """

    def __init__(self, approximation, estimation_mode, seed, matmul_dtype="float32",
                 cov_batch_size=None, damping_split=None, conv_statistics_samples=None,
                 inverse_method="cholesky", conv_statistics="expand",
                 regularizer_curvature=False):
        self.regularizer_curvature = regularizer_curvature
        self.conv_statistics_samples = conv_statistics_samples
        self.conv_statistics = conv_statistics
        self.inverse_method = inverse_method
        self.damping_split = damping_split
        self.approximation = approximation
        self.estimation_mode = estimation_mode
        self.seed = seed
        self.matmul_dtype = matmul_dtype
        self.cov_batch_size = cov_batch_size
        self.collection = None
        self.blocks = {}

    # --- state ------------------------------------------------------------------
    def build(self, collection_config, add_variable, conv_damping, conv_damping_floor):
        """Creates every block's state from the saved sizes of
        ``collection_config`` (``LayerCollection.get_config()``), with
        ``add_variable(shape, initializer, name)``; conv blocks get the
        damping mode ``conv_damping`` and floor ``conv_damping_floor`` (see
        ``fisher_blocks``), dense blocks 'plain'; every block computes its
        statistics and preconditioning products in ``matmul_dtype``."""
        self.blocks = {
            entry["layer"]: fisher_blocks.make_block(
                self.approximation,
                entry,
                add_variable,
                damping_mode=conv_damping if entry["is_convolution"] else "plain",
                damping_floor=conv_damping_floor,
                inverse_method=self.inverse_method,
            )
            for entry in collection_config["layers"]
        }
        for block in self.blocks.values():
            block.matmul_dtype = tf.as_dtype(self.matmul_dtype)
            block.conv_statistics = self.conv_statistics
            if self.damping_split is not None and hasattr(block, "damping_split"):
                block.damping_split = self.damping_split

    def bind(self, collection, variables, var_key, owner_name):
        """Binds each block to its layer in ``collection``; checks that the
        layers' variables are among ``variables`` (keys by ``var_key``);
        logs the unregistered ones once; with ``regularizer_curvature`` sets
        each block's ``penalty_damping`` and logs the regularizers whose
        curvature is not modelled."""
        keys = {var_key(v) for v in variables}
        kinds = collection.layer_kinds
        if sorted(k.block_name for k in kinds) != sorted(self.blocks):
            raise ValueError(
                f"The layer collection registers {sorted(k.block_name for k in kinds)} "
                f"but the optimizer was built for {sorted(self.blocks)}: "
                "register every layer before the optimizer's first step."
            )
        registered = set()
        for kind in kinds:
            for variable in kind.parameters:
                if var_key(variable) not in keys:
                    raise ValueError(
                        f"Registered layer '{kind.layer.name}' has variable "
                        f"'{variable.path}' that is not among the variables "
                        "being trained: the layer collection does not match "
                        "the model. Register the layers of the model you train."
                    )
            block = self.blocks[kind.block_name]
            block.bind(kind)
            if self.regularizer_curvature:
                for part, part_kind in zip(getattr(block, "parts", [block]),
                                           getattr(kind, "parts", [kind])):
                    part.penalty_damping = penalty_damping(part_kind.parameters)
            registered.update(var_key(v) for v in kind.parameters)
        self.collection = collection
        unmodelled = [f"{v.path} ({type(v.regularizer).__name__})" for v in variables
                      if curvature.penalty_curvature(v) is None]
        if self.regularizer_curvature and unmodelled:
            logging.warning(
                "%s: the curvature of these variables' weight regularizers is not "
                "modelled (only L2 and L1L2 are; their gradients are still used): %s",
                owner_name,
                ", ".join(unmodelled),
            )
        unregistered = [v.path for v in variables if var_key(v) not in registered]
        if unregistered:
            logging.warning(
                "%s: %d trainable variable(s) belong to no registered layer and "
                "get the plain momentum update (no preconditioning): %s",
                owner_name,
                len(unregistered),
                ", ".join(unregistered),
            )

    @property
    def factor_variables(self):
        """Every block's running averages, in a fixed order."""
        return [v for block in self.blocks.values() for v in block.factor_variables]

    @property
    def inverse_variables(self):
        """Every block's inverses, in a fixed order."""
        return [v for block in self.blocks.values() for v in block.inverse_variables]

    # --- statistics ---------------------------------------------------------------
    def uses_of(self, record, layer):
        """The recorded uses of ``layer`` in ``record``; a ValueError that
        says why where there are none."""
        uses = record.uses.get(id(layer)) if record is not None else None
        if not uses and record is not None and record.covariance_updated:
            raise ValueError(
                f"The statistics of this forward pass (layer '{layer.name}') "
                "were already consumed by an earlier cov_update_op() in this "
                "step; call cov_update_op() once per forward pass."
            )
        if not uses:
            raise ValueError(
                f"No statistics were recorded for layer '{layer.name}' in this "
                "step. Run the model's forward pass with training=True in the "
                "same tf.function / eager step as the optimizer's update (a "
                "subclassed model's call() must take a `training` argument, or "
                "fit never passes it), and make sure the registered layers "
                "belong to the model you train (and were not registered since "
                "in another LayerCollection). A layer called with training=False "
                "records only inside the training call of a model given to "
                "LayerCollection.from_model or register_model: register the "
                "model, or leave the layer out of the collection."
            )
        return uses

    def _backward_gradients(self, record, taps, step):
        """List over backward vectors of lists (over taps) of d/ds tensors."""
        distributions = self.collection.distributions
        if self.estimation_mode == "empirical":
            if record is None or record.loss is None:
                raise ValueError(
                    "estimation_mode='empirical' needs the training loss. fit "
                    "hands it to the optimizer's scale_loss, except under a "
                    "LossScaleOptimizer (mixed_float16), which keeps it: use "
                    "estimation_mode='gradients' or 'exact' there. In a custom "
                    "loop with cov_update_every=None call "
                    "opt.cov_update_op(loss=loss)."
                )
            # Keras losses average over the loss terms (the output's leading
            # axes, N·T for a [N, T, k] output), and under tf.distribute each
            # replica's loss is its share of the global mean (1 / R of its
            # own mean): g = R (N·T) ∂L/∂s is each term's own gradient.
            output = getattr(
                self.uses_of(record, distributions[0].layer)[0], distributions[0].tensor
            )
            terms = tf.cast(tf.size(output) // tf.shape(output)[-1], record.loss.dtype)
            terms *= float(distribution.replica_position()[1])
            # The scale enters as the loss's output gradient: eagerly the
            # tape has stopped recording, so a product formed now would
            # have no gradient.
            return [record.gradients(record.loss, taps, output_gradients=terms)]
        step = _replica_stream(step)
        targets, vector_sets = [], []
        index = 0
        for predictive in distributions:
            for use in self.uses_of(record, predictive.layer):
                target = getattr(use, predictive.tensor)
                if self.estimation_mode == "gradients":
                    seed = tf.stack([tf.constant(self.seed + index, tf.int64), step])
                    vectors = [predictive.sampled_backward_vector(target, seed)]
                else:
                    vectors = predictive.exact_backward_vectors(target)
                targets.append(target)
                vector_sets.append([tf.cast(v, target.dtype) for v in vectors])
                index += 1
        if self.estimation_mode == "gradients":
            # One backward pass of Σ_outputs −log p(ŷ): independent outputs.
            return [
                record.gradients(targets, taps, output_gradients=[vs[0] for vs in vector_sets])
            ]
        return [
            record.gradients(target, taps, output_gradients=vector)
            for target, vectors in zip(targets, vector_sets)
            for vector in vectors
        ]

    def batch_statistic_sums(self, record, step):
        """This batch's sums, one tuple per block (additive over examples,
        counts included: replicas all-reduce them by summation), from the
        tensors the taps recorded in ``record``; ``step`` seeds the sampled
        targets."""
        blocks = list(self.blocks.values())
        uses = [self.uses_of(record, block.layer) for block in blocks]
        taps = [use.preactivation for block_uses in uses for use in block_uses]
        backward = self._backward_gradients(record, taps, step)
        # One subset per step, replica and batch size: every block of the
        # same batch sums the same examples.
        subset_seed = tf.stack([tf.constant(self.seed, tf.int64), _replica_stream(step)])
        subsets = [self._subset(block, block_uses) for block, block_uses in zip(blocks, uses)]
        keys = _subset_keys(subsets, subset_seed)
        sums, offset = [], 0
        # Graph mode: each block's sums (and its im2col patches) are formed
        # after the previous block's, so at most one layer's patches are
        # alive at a time. No effect eagerly (already sequential).
        previous = []
        for block, block_uses, subset in zip(blocks, uses, subsets):
            count = len(block_uses)
            grads = [per_vector[offset : offset + count] for per_vector in backward]
            offset += count
            examples = None if subset is None else example_subset(*subset, keys=keys)
            with tf.control_dependencies(previous):
                block_sums = tuple(block.statistic_sums(block_uses, grads, examples))
            previous = list(block_sums)
            sums.append(block_sums)
        return sums

    def _subset(self, block, uses):
        """(N, m): the block's batch size N and the number of examples m
        whose statistics it sums (``cov_batch_size``, else for convolution
        blocks with a sample per position ``conv_subset_size``), or None for
        all of them (no subset, or N known to be no larger)."""
        size = self.cov_batch_size
        if size is None and not block.reduces_positions:
            size = conv_subset_size(block.kind, uses[0], self.conv_statistics_samples)
        if size is None:
            return None
        num_examples = block.kind.num_examples(uses[0])
        batch = tf.get_static_value(num_examples)
        if batch is not None and batch <= size:
            return None
        return num_examples, size

    def zero_sums(self):
        """``batch_statistic_sums`` of an empty batch (all zeros)."""
        return [block.zero_sums() for block in self.blocks.values()]

    def statistics_from_sums(self, sums):
        """The factor statistics, flat in the order of ``factor_variables``,
        from ``batch_statistic_sums`` (one batch's, or added over replicas)."""
        return [
            statistic
            for block, block_sums in zip(self.blocks.values(), sums)
            for statistic in block.statistics_from_sums(block_sums)
        ]

    def update_running_averages(self, statistics, decay, first):
        """Running averages ← statistics (``first``: initialise with them)."""
        fisher_factors.update_running_averages(self.factor_variables, statistics, decay, first)

    def update_inverses(self, damping, method="cholesky"):
        """Recomputes every block's damped inverses with damping λ by
        ``method`` (``fisher_factors.INVERSE_METHODS``): the factors of equal
        size of all blocks in one batched inversion
        (``fisher_factors.batched_inverses``), the Cholesky fallbacks of the
        rest under one conditional."""
        with fisher_factors.shared_fallback() as fallbacks:
            with fisher_factors.batched_inverses() as batch:
                values = [v for block in self.blocks.values()
                          for v in block.inverse_values(damping, method=method)]
                values = batch.resolve(values)
        for variable, value in zip(self.inverse_variables, fallbacks.resolve(values)):
            fisher_factors.assign_if_finite(variable, value)

    def inverse_costs(self):
        """Per block (in order): the flops of its inversions, Σ d³ over its
        inverse variables ([..., d, d]: batch · d³; vectors: their size)."""
        costs = []
        for block in self.blocks.values():
            cost = 0.0
            for variable in block.inverse_variables:
                shape = [int(d) for d in variable.shape]
                batch = 1
                for d in shape[:-2]:
                    batch *= d
                cost += batch * shape[-1] ** 3 if len(shape) >= 2 else float(sum(shape) or 1)
            costs.append(cost)
        return costs

    # --- products with gradients and directions -------------------------------------
    def _per_block(self, values_by_key, var_key, fn):
        """Applies ``fn(block, ∇Θ matrix)`` to each block whose layer has
        values in ``values_by_key``; returns {key: result part}."""
        out = {}
        for block in self.blocks.values():
            params = block.kind.parameters
            keys = [var_key(p) for p in params]
            if all(values_by_key.get(k) is None for k in keys):
                continue
            parts = [
                values_by_key[k] if values_by_key.get(k) is not None else tf.zeros(p.shape, p.dtype)
                for k, p in zip(keys, params)
            ]
            matrix = fn(block, block.kind.to_matrix(parts))
            for k, part in zip(keys, block.kind.from_matrix(matrix)):
                out[k] = part
        return out

    def precondition(self, grads, variables, var_key, damping=None):
        """precond(∇) per variable (float32, list in the order of
        ``variables``): the blocks' damped Kronecker inverse for registered
        layers (eigenbasis blocks damped with ``damping``, λ), the identity
        for every other variable."""
        grad_of = {var_key(v): g for g, v in zip(grads, variables)}
        direction = self._per_block(grad_of, var_key, lambda b, m: b.multiply_inverse(m, damping))
        return [
            direction.get(var_key(v), tf.cast(g, tf.float32)) for g, v in zip(grads, variables)
        ]

    def approximate_curvature_products(self, vectors, variables, var_key):
        """The matrix [uᵢᵀ F̂ uⱼ] (float32 [K, K]) of the blocks' undamped
        approximate Fisher F̂ (zero for unregistered variables) for K
        direction vectors, each a list shaped like ``variables``."""
        products = []
        for vector in vectors:
            by_key = {var_key(v): u for u, v in zip(vector, variables)}
            products.append(self._per_block(by_key, var_key, lambda b, m: b.multiply_fisher(m)))

        def entry(i, j):
            terms = [
                tf.reduce_sum(tf.cast(u, tf.float32) * products[j][var_key(v)])
                for u, v in zip(vectors[i], variables)
                if var_key(v) in products[j]
            ]
            return tf.add_n(terms) if terms else tf.constant(0.0)

        return curvature.symmetric_gram(len(vectors), entry)


def penalty_damping(variables):
    """κ̄ = Σ_v n_v κ_v / Σ_v n_v over ``variables`` (n_v entries each, κ_v
    their regularizer's curvature, ``curvature.penalty_curvature``;
    unmodelled 0): the multiple of I with the trace of the regularizers'
    exact Hessian diag(κ_v I) on one block, a Python float."""
    sizes = [float(np.prod(v.shape)) for v in variables]
    kappas = [curvature.penalty_curvature(v) or 0.0 for v in variables]
    return float(np.dot(sizes, kappas) / max(sum(sizes), 1.0))


def _replica_stream(step):
    """The random stream of ``step`` on this replica: step·R + r for replica
    r of R (reproducible, different on every replica, the step itself on
    one device), int64."""
    replica_id, count = distribution.replica_position()
    return tf.cast(step, tf.int64) * count + replica_id


MIN_CONV_SUBSET = 32  # the fewest examples a convolution block's statistics come from


def conv_subset_size(kind, use, samples):
    """max(MIN_CONV_SUBSET, ⌈samples / P⌉) for a convolution layer kind
    (``kind.is_convolution``) whose recorded pre-activation has P output
    positions per example (its static spatial size), else None (every
    example): about ``samples`` statistics samples per block."""
    if samples is None or not getattr(kind, "is_convolution", False):
        return None
    shape = use.preactivation.shape
    spatial = shape[2:] if getattr(kind, "channels_first", False) else shape[1:-1]
    if not spatial.is_fully_defined():
        return None
    positions = max(1, int(np.prod(spatial.as_list())))
    return max(MIN_CONV_SUBSET, -(-samples // positions))


SUBSET_STREAM = 3  # the subsets' random stream (the sampled targets use 0-2)


def _subset_keys(subsets, seed):
    """The ``example_keys`` of the largest batch among the blocks' (N, m)
    ``subsets`` (None entries: no subset; None if none takes one): drawn
    once for all of them."""
    counts = [tf.cast(subset[0], tf.int32) for subset in subsets if subset is not None]
    if not counts:
        return None
    return example_keys(tf.reduce_max(tf.stack(counts)), seed)


def example_keys(num_examples, seed):
    """One int32 sort key per example ([N], N = ``num_examples``), uniformly
    random: key i is a deterministic function of ``seed`` ([2] int64:
    optimizer seed, replica stream) and i alone (so the keys of N' < N
    examples are the first N' of these), bit-identical eagerly, in graphs
    and under XLA."""
    bits = loss_functions.uniform_bits(tf.reshape(num_examples, [1]), seed, SUBSET_STREAM)
    return tf.cast(bits - 2**31, tf.int32)  # order-preserving, int32 for sorting


def example_subset(num_examples, size, seed=None, keys=None):
    """min(size, N) distinct example indices (int32 [m]) drawn uniformly
    without replacement from range(N), N = ``num_examples``: the first m of
    the permutation that sorts the first N ``example_keys`` (``keys``, of
    at least N examples, or drawn from ``seed``).

    Every example is in the subset with probability m / N, so sums over it
    with the count m estimate the batch's means without bias."""
    if keys is None:
        keys = example_keys(num_examples, seed)
    return tf.argsort(keys[:num_examples], stable=True)[:size]
