"""One optimizer step as a pipeline of named stages.

    inputs      the step's gradients summed over replicas, its record (the
                layer taps' tensors), its loss re-evaluations, finiteness
    statistics  the scheduled covariance update (``schedule``)
    inverses    the scheduled inverse update
    precondition d = precond(∇) (``estimator``)
    proposal    the coefficients (α, μ) of the fixed or the adaptive rule
                (``update_rules``), the update u = μ δ − α d, and for the
                adaptive rule ρ and the new λ
    commit      one guarded commit on every device: u applied (θ ← θ + u,
                δ ← u) if everything is finite and ρ does not reject it,
                else nothing changes but ``skipped_steps`` (counted here
                and nowhere else) or, after a step that ρ rejected (the
                batch loss rose), ``rejected_steps``, λ and ρ

Each stage is a function of the optimizer (the Keras face that holds the
options and the state) and of what the earlier stages returned. Under
tf.distribute the stages run in replica context (``distribution``): every
state change goes through ``distribution.commit_on_every_device``.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional, Sequence

import tensorflow as tf

from tkfac_tf import curvature as curvature_lib
from tkfac_tf import distribution
from tkfac_tf import fisher_factors
from tkfac_tf import keras_compat
from tkfac_tf import schedule
from tkfac_tf import update_rules


class StepInputs(NamedTuple):
    """What every stage reads: the step number k (int64), the layer taps'
    record (or None), the loss re-evaluations (curvature, ρ) of an adaptive
    step (or None), the gradients summed over replicas, the learning rate
    (float32), whether the gradients are finite, whether a manual
    ``cov_update_op`` of this step found non-finite statistics, and the
    curvature pass the statistics are taken from (``statistics_pass``;
    None: they come from ``record``)."""

    step: tf.Tensor
    record: Any
    loss_fns: Optional[tuple]
    grads: list
    learning_rate: tf.Tensor
    finite: tf.Tensor
    covariance_skipped: tf.Tensor
    curvature_pass: Optional[curvature_lib.CurvaturePass] = None


class Proposal(NamedTuple):
    """The update a rule proposes: coefficients, the per-variable update u,
    whether it may be committed, and for the adaptive rule the damping
    change (ρ, new λ, whether λ adapts on this step, whether ρ rejected
    the step: λ then rises although the step is not applied), with
    amortised curvature the calibration to keep, and whether there was
    nothing to step along (``idle``: the preconditioned gradient is zero,
    so the quadratic model has no minimiser to take; skipped, not counted)."""

    coefficients: update_rules.Coefficients
    updates: list
    finite: tf.Tensor
    damping: Optional[tuple] = None
    calibration: Optional[update_rules.CurvatureCalibration] = None
    idle: Optional[tf.Tensor] = None


def run(opt, grads: Sequence[tf.Tensor], variables: Sequence[Any], learning_rate: Any) -> None:
    """The whole step of ``opt`` for ``grads`` of ``variables``."""
    inputs, directions = preconditioned_gradients(opt, grads, variables, learning_rate)
    with tf.name_scope("proposal"):
        if opt.options.adaptive.adaptive:
            proposal = adaptive_proposal(opt, inputs, directions, variables)
        else:
            proposal = fixed_proposal(opt, inputs, directions, variables)
    with tf.name_scope("commit"):
        commit(opt, proposal, variables, inputs)


def preconditioned_gradients(opt, grads, variables, learning_rate) -> tuple[StepInputs, list]:
    """The stages before the proposal: inputs, the scheduled statistics and
    inverses, d = precond(∇). Returns the inputs (``finite`` also covering
    the statistics) and d, float32, one per variable."""
    with tf.name_scope("inputs"):
        inputs = step_inputs(opt, grads, learning_rate)
    with tf.name_scope("statistics"):
        inputs = inputs._replace(curvature_pass=statistics_pass(opt, inputs, variables))
        finite = inputs.finite & update_statistics(opt, inputs)
    if opt.options.schedule.inv_update_every is not None:
        with tf.name_scope("inverses"):
            update_inverses(opt, schedule.is_inverse_step(opt.options.schedule, inputs.step) & finite)
    with tf.name_scope("precondition"):
        directions = opt.estimator.precondition(
            inputs.grads, variables, keras_compat.variable_key(opt), opt.damping
        )
    return inputs._replace(finite=finite), directions


# --- inputs ---------------------------------------------------------------------------------
def step_inputs(opt, grads, learning_rate) -> StepInputs:
    """The step's record, loss re-evaluations and replica-summed gradients."""
    # Applied updates so far (differs from _iterations under Keras'
    # gradient_accumulation_steps, which calls this every k-th batch).
    step = tf.convert_to_tensor(opt.iterations)
    micro_batch = opt._thread_state.micro_batch
    record = micro_batch.record if micro_batch is not None else opt.layer_collection.recorder.take()
    opt._warn_if_never_updated()
    loss_fns = step_loss_fns(opt, record)
    grads = distribution.all_reduce_sum(list(grads))
    covariance_skipped = tf.constant(False)
    if record is not None and record.covariance_skipped is not None:
        covariance_skipped = record.covariance_skipped
    return StepInputs(step, record, loss_fns, grads, tf.cast(learning_rate, tf.float32),
                      all_finite(grads), covariance_skipped)


def step_loss_fns(opt, record):
    """The adaptive step's loss re-evaluations (curvature, ρ): those
    given to apply_gradients, else the step's recorded compute_loss, for
    the curvature products on the first ``opt.curvature_examples(batch)``
    examples (with 'ghost_halves' the two halves', each its own forward
    pass) and for ρ on the whole batch (ρ compares the loss's real
    change with the model's, whose gradient is the whole batch's); None
    when not adaptive."""
    rule = opt.options.adaptive
    if not rule.adaptive:
        return None
    given = opt._thread_state.step_loss_fns
    if given is not None:
        would_slice = rule.curvature_batch_size is not None and (
            rule.curvature_batch_size != "auto" or opt.layer_collection.normalises_over_batch)
        if would_slice and given[0] is given[1]:  # no curvature_loss_fn
            opt._warn_curvature_batch_size(
                "the loss functions given to apply_gradients are used as they are "
                "(pass curvature_loss_fn=opt.curvature_loss_fn(loss_on, batch_size) "
                "for the same effect)"
            )
        return given
    loss_fn = whole_batch = None
    if record is not None and record.loss_inputs is not None:
        whole_batch = record.recorded_loss_fn()
        try:
            loss_fn = opt._curvature_subset_loss_fn(
                lambda start, stop: curvature_lib.sliced_loss_fn(record, start, stop),
                curvature_lib.recorded_batch_size(record))
        except (TypeError, ValueError) as error:
            opt._warn_curvature_batch_size(
                f"the recorded inputs could not be sliced ({error}); the whole batch is used"
            )
            loss_fn = None
        # The same callable when nothing is sliced: ρ then reuses the curvature pass's h(θ).
        loss_fn = loss_fn or whole_batch
    if loss_fn is None and (record is None or not (record.uses or record.covariance_updated)):
        # No registered layer ran in training mode: that is what to fix.
        opt.estimator.uses_of(record, opt.layer_collection.layer_kinds[0].layer)
    if loss_fn is None:
        raise ValueError(
            f"The adaptive {type(opt).__name__} needs this batch's loss. In "
            "model.fit build the collection with "
            "LayerCollection.from_model(model, loss=...) or call "
            "layer_collection.register_model(model); in a custom loop pass "
            "opt.apply_gradients(grads_and_vars, loss_fn=lambda: "
            "loss(y, model(x, training=True)))."
        )
    return loss_fn, whole_batch


# --- statistics and inverses -------------------------------------------------------------------
def statistics_pass(opt, inputs: StepInputs, variables) -> Optional[curvature_lib.CurvaturePass]:
    """With ``statistics_pass='curvature'``: the adaptive step's curvature
    re-evaluation, evaluated here once, when it takes part of the batch
    (``curvature_batch_size``) and runs on every step; the statistics are
    then taken from its examples and forward pass, and the curvature
    products walk the same pass. None otherwise (the statistics take
    ``inputs.record``): the curvature is the whole batch's (also as
    'ghost_halves'), amortised or approximate, the schedule is manual, or
    Keras accumulates gradients."""
    rule = opt.options.adaptive
    loss_fns = inputs.loss_fns
    if (resolved_statistics_pass(opt) != "curvature" or loss_fns is None
            or loss_fns[0] is loss_fns[1] or rule.curvature_batch_size == "ghost_halves"
            or rule.curvature != "exact"
            or rule.curvature_update_every > 1 or opt.options.schedule.cov_update_every is None
            or inputs.record is None or inputs.record.covariance_updated
            or opt._thread_state.micro_batch is not None):
        return None
    return curvature_lib.CurvaturePass(loss_probe(opt, variables, loss_fns[0]),
                                       [tf.cast(v, tf.float32) for v in variables])


def resolved_statistics_pass(opt) -> str:
    """``statistics_pass`` with 'auto' resolved: 'curvature' where the
    collection normalises over the batch (BatchNorm in training mode, whose
    curvature products take part of the batch under
    ``curvature_batch_size='auto'``), else 'step'."""
    choice = opt.options.estimation.statistics_pass
    if choice == "auto":
        return "curvature" if opt.layer_collection.normalises_over_batch else "step"
    return choice


def example_counts(opt, inputs: StepInputs) -> Optional[tf.Tensor]:
    """(n, N), float32 [2]: the examples of this replica's curvature pass and
    of its batch, when the statistics come from that pass; else None."""
    if inputs.curvature_pass is None:
        return None
    estimator = opt.estimator
    block = next(iter(estimator.blocks.values()))

    def examples(record):
        return tf.cast(block.kind.num_examples(estimator.uses_of(record, block.layer)[0]), tf.float32)

    return tf.stack([examples(inputs.curvature_pass.record), examples(inputs.record)])


def running_average_decay(opt, counts: Optional[tf.Tensor]):
    """ε of this covariance update: ``cov_ema_decay``, or with statistics of
    n of the batch's N examples (``counts``, summed over replicas)
    ε' = 1 − (n/N)(1 − ε), so the running averages span the same
    N / (1 − ε) examples as with the whole batch's statistics."""
    decay = opt.options.estimation.cov_ema_decay
    if counts is None:
        return decay
    return 1.0 - tf.math.divide_no_nan(counts[0], counts[1]) * (1.0 - decay)


def loss_probe(opt, variables, loss_fn) -> curvature_lib.LossProbe:
    """The re-evaluation ``loss_fn`` of the adaptive step, its taps watching
    the collection's registered outputs z."""
    collection = opt.layer_collection
    return curvature_lib.LossProbe(
        collection.recorder, {id(d.layer): d.tensor for d in collection.distributions},
        variables, loss_fn)


class MicroBatch(NamedTuple):
    """Under Keras' ``gradient_accumulation_steps``: one micro-batch's
    record, its gradients summed over replicas (the adaptive step's ρ
    predicts this micro-batch's loss) and its statistic sums (one tuple per
    block, summed over replicas; zeros when the coming update is no
    covariance step; None without the automatic covariance schedule or
    after a manual ``cov_update_op``)."""

    record: Any
    grads: list
    sums: Optional[list]


def micro_batch_statistics(opt, grads) -> MicroBatch:
    """This micro-batch's record, ``grads`` and statistic sums, formed
    before Keras' choice between accumulating and updating, for either
    branch. The sampled targets are seeded by the micro-batch's own count
    (``keras_compat.applied_batches``), so the micro-batches of one update
    draw apart."""
    record = opt.layer_collection.recorder.take()
    grads = distribution.all_reduce_sum(list(grads))
    if not opt._accumulated_sums or (record is not None and record.covariance_updated):
        return MicroBatch(record, grads, None)
    estimator = opt.estimator
    micro_step = tf.convert_to_tensor(keras_compat.applied_batches(opt))
    with tf.name_scope("statistics"):
        if opt.options.schedule.cov_update_every == 1:
            sums = estimator.batch_statistic_sums(record, micro_step)
        else:
            sums = tf.cond(
                schedule.is_covariance_step(opt.options.schedule, opt.iterations),
                lambda: estimator.batch_statistic_sums(record, micro_step),
                estimator.zero_sums,
            )
        # Summed over replicas here, outside every conditional.
        return MicroBatch(record, grads, distribution.all_reduce_sum(sums))


def accumulate_statistics(opt, micro_batch: MicroBatch) -> None:
    """Accumulated sums += this micro-batch's (on an accumulation step)."""
    if micro_batch.sums is None:
        return
    on_every_device(
        opt,
        lambda sums: [v.assign_add(s) for v, s in zip(opt._accumulated_sums, tf.nest.flatten(sums))],
        micro_batch.sums,
    )


def update_accumulated_statistics(opt, inputs: StepInputs, micro_batch: MicroBatch) -> tf.Tensor:
    """The update step under gradient accumulation: the statistics of the
    accumulated sums plus this micro-batch's (every micro-batch since the
    last update, summed over replicas), assigned if finite on covariance
    steps; the accumulated sums reset. Returns as ``update_statistics``.
    After a manual ``cov_update_op`` on this micro-batch the accumulated
    sums are dropped (that call set the averages)."""
    if micro_batch.sums is None:
        reset_accumulated_statistics(opt)
        return tf.constant(True)
    flat = tf.nest.flatten(micro_batch.sums)
    total = tf.nest.pack_sequence_as(
        micro_batch.sums, [s + tf.convert_to_tensor(v) for s, v in zip(flat, opt._accumulated_sums)])
    taken = schedule.is_covariance_step(opt.options.schedule, inputs.step) & inputs.finite
    finite = commit_statistics(opt, opt.estimator.statistics_from_sums(total), taken)
    reset_accumulated_statistics(opt)
    return finite | tf.logical_not(taken)


def reset_accumulated_statistics(opt) -> None:
    """Accumulated sums ← 0 (none without the automatic schedule)."""
    if opt._accumulated_sums:
        on_every_device(opt, lambda: [v.assign(tf.zeros_like(v)) for v in opt._accumulated_sums])


def update_statistics(opt, inputs: StepInputs) -> tf.Tensor:
    """The scheduled covariance update (unless ``cov_update_op`` ran in this
    step): this replica's statistic sums, summed over replicas on
    covariance steps only, assigned to the running averages if finite.
    Returns whether the statistics were finite (True when none were taken)."""
    record = inputs.record
    micro_batch = opt._thread_state.micro_batch
    if micro_batch is not None and opt._accumulated_sums:
        return update_accumulated_statistics(opt, inputs, micro_batch)
    if opt.options.schedule.cov_update_every is None or (
        record is not None and record.covariance_updated
    ):
        return tf.constant(True)
    estimator = opt.estimator
    if inputs.curvature_pass is not None:
        record = inputs.curvature_pass.record
    if opt.options.schedule.cov_update_every == 1:
        # Every step: no conditional (whose other branch would trace every
        # block's zero sums).
        is_cov_step = tf.constant(True)
        sums = estimator.batch_statistic_sums(record, inputs.step)
    else:
        is_cov_step = schedule.is_covariance_step(opt.options.schedule, inputs.step)
        sums = tf.cond(
            is_cov_step,
            lambda: estimator.batch_statistic_sums(record, inputs.step),
            estimator.zero_sums,
        )

    taken = is_cov_step & inputs.finite
    counts = example_counts(opt, inputs)
    if distribution.replica_position()[1] == 1:
        # Nothing to sum: one conditional assignment, as cov_update_op's
        # (the replicas' path below nests two and traces the statistics
        # twice, which only its all-reduce needs).
        finite = commit_statistics(opt, estimator.statistics_from_sums(sums), taken, counts)
        return finite | tf.logical_not(taken)

    def assign_if_finite(summed):  # (sums,) or (sums, counts), summed over replicas
        statistics = estimator.statistics_from_sums(summed[0])
        decay = running_average_decay(opt, summed[1] if len(summed) > 1 else None)
        run_if(all_finite(statistics), lambda: assign_statistics(opt, statistics, decay))

    return distribution.sum_and_commit_if(
        taken,
        (sums,) if counts is None else (sums, counts),
        opt._num_cov_updates.value,
        assign_if_finite,
        lambda summed: all_finite(estimator.statistics_from_sums(summed[0])),
    )


def commit_statistics(opt, statistics, taken: Optional[tf.Tensor] = None,
                      counts: Optional[tf.Tensor] = None) -> tf.Tensor:
    """Running averages ← ``statistics`` on every device, decaying by
    ``running_average_decay(opt, counts)``, if they are all finite (and
    ``taken`` holds, where given); returns whether they are finite. The
    statistics must be the same on every replica."""
    finite = all_finite(statistics)
    commit = finite if taken is None else finite & taken
    decay = tf.convert_to_tensor(running_average_decay(opt, counts), tf.float32)
    on_every_device(
        opt,
        lambda statistics, commit, decay: run_if(commit, lambda: assign_statistics(opt, statistics, decay)),
        statistics,
        commit,
        decay,
    )
    return finite


def assign_statistics(opt, statistics, decay) -> None:
    """Running averages ← decay · averages + (1 − decay) · statistics (the
    first update initialises them)."""
    first = tf.equal(opt._num_cov_updates, 0)
    opt.estimator.update_running_averages(statistics, decay, first)
    opt._num_cov_updates.assign_add(1)


def update_inverses(opt, predicate: tf.Tensor) -> None:
    """Recomputes the inverses where ``predicate`` (a bool tensor, the
    same on every replica) holds: on every device ('replicated', or one
    replica), or each block on its owner replica and then summed over
    replicas ('distributed')."""
    estimation = opt.options.estimation
    method = estimation.inverse_method
    count = distribution.num_replicas()
    if estimation.inverse_placement == "replicated" or count == 1:
        on_every_device(
            opt,
            lambda p: run_if(p, lambda: opt.estimator.update_inverses(opt.damping, method)),
            predicate,
        )
        return
    blocks = list(opt.estimator.blocks.values())
    distribution.distributed_update(
        predicate,
        [block.inverse_variables for block in blocks],
        distribution.assign_owners(opt.estimator.inverse_costs(), count),
        lambda job: blocks[job].inverse_values(opt.damping, method=method),
        fisher_factors.assign_if_finite,
    )


# --- proposals ---------------------------------------------------------------------------------
def _momenta(opt, variables):
    return [keras_compat.slot(opt, opt.momentums, v) for v in variables]


def fixed_proposal(opt, inputs: StepInputs, directions, variables) -> Proposal:
    """α = lr · c (KL clipping), μ = τ: u = τ δ − α d."""
    rule = opt.options.fixed
    coefficients = update_rules.fixed(
        inputs.learning_rate, rule.momentum, rule.norm_constraint, directions, inputs.grads
    )
    updates = update_rules.updates(coefficients, directions, _momenta(opt, variables))
    # The update itself: d overflows where an inverse is too large (a tiny
    # λ), and α is whatever the learning rate (or its schedule) gives.
    return Proposal(coefficients, updates, inputs.finite & all_finite(updates))


def adaptive_proposal(opt, inputs: StepInputs, directions, variables) -> Proposal:
    """The quadratic-model step with Levenberg–Marquardt damping (see
    ``optimizer``): not committable if the step or the model is not finite.
    ρ is measured on the adaptation steps and on the first step (λ₀ is a
    guess); a step whose ρ is negative or not finite (the batch loss rose,
    or overflowed at θ + u) is rejected: not applied, with λ raised
    ×``update_rules.REJECTED_STEP_DAMPING_FACTOR``. Under
    tf.distribute the loss and the exact curvature products of each
    replica's slice are summed over replicas (each replica's loss is its
    share of the global mean)."""
    rule = opt.options.adaptive
    loss_fns = inputs.loss_fns
    # Δ = −directions: every product is taken with the directions d and
    # the signs are applied to the 2×2 results (no negated copy of Δ).
    previous = [tf.cast(m, tf.float32) for m in _momenta(opt, variables)]
    values = [tf.cast(v, tf.float32) for v in variables]
    vectors = [list(directions), previous]
    probe, rho_probe = (loss_probe(opt, variables, loss_fn) for loss_fn in loss_fns)

    # Amortised exact curvature (``curvature_update_every`` > 1): between
    # curvature steps the model's G is the preconditioner's own curvature
    # calibrated on the last exact products (``update_rules.calibrated_curvature``).
    # Collectives stay outside tf.cond: on those steps the replicas sum zeros.
    amortised = rule.curvature_update_every > 1  # exact curvature only (options)
    # ρ's h(θ) is the curvature pass's loss when that is the whole batch's.
    shares_loss = rule.curvature == "exact" and loss_fns[1] is loss_fns[0]
    # In model.fit the products then reuse the step's own forward pass
    # (amortised: its walk is built inside the conditional).
    recorded = None
    if shares_loss and opt._thread_state.step_loss_fns is None:
        recorded = curvature_lib.recorded_gauss_newton_gram(inputs.record, probe.watched, variables)

    def curvature_products():
        with tf.name_scope("curvature"):
            if recorded is not None:
                return tf.zeros([]), recorded(vectors)
            if inputs.curvature_pass is not None:
                return inputs.curvature_pass.gram(vectors)
            if rule.curvature == "exact":
                return curvature_lib.gauss_newton_gram(probe, values, vectors)
            return tf.zeros([]), opt.estimator.approximate_curvature_products(
                vectors, variables, keras_compat.variable_key(opt)
            )

    if amortised:
        fresh = schedule.is_curvature_step(opt.options.schedule, rule, inputs.step,
                                           opt.reduction_ratio < 0.0)
        loss, gram = tf.cond(fresh, curvature_products, lambda: (tf.zeros([]), tf.zeros([2, 2])))
    else:
        loss, gram = curvature_products()
    if recorded is not None:
        loss = curvature_lib.recorded_training_loss(inputs.record)
        if loss is None:  # the pass drew random numbers: ρ evaluates h(θ) itself
            shares_loss, loss = False, tf.zeros([])
    if rule.curvature == "exact":
        loss, gram = distribution.all_reduce_sum((loss, gram))
    if not shares_loss:
        # No h(θ), or not the whole batch's: in model.fit ρ takes the step's
        # own training loss (no re-evaluation), else it evaluates both. Where
        # the recorded products ran, they found that loss unusable (random draws).
        loss = None
        if opt._thread_state.step_loss_fns is None and recorded is None:
            loss = curvature_lib.recorded_training_loss(inputs.record)
        if loss is not None:
            loss = distribution.all_reduce_sum(loss)
    damping = tf.convert_to_tensor(opt.damping)
    # [d, δ, ∇]ᵀ[d, δ, ∇] in one pass over the three vectors.
    dots = curvature_lib.pairwise_dots(vectors + [inputs.grads])
    # d = 0 (every gradient zero, e.g. a batch whose sample weights are all
    # zero): A₀₀ = 0 and the model's α is 0/0. The step is skipped, δ kept
    # for the next batch, and not counted as non-finite.
    idle = inputs.finite & tf.equal(dots[0, 0], 0.0)
    calibration = None
    if amortised:
        gram, calibration = update_rules.calibrated_curvature(
            fresh, gram, dots, update_rules.CurvatureCalibration(
                opt._curvature_scale, opt._momentum_curvature))
    if opt.options.estimation.regularizer_curvature:
        # The L2 weight regularizers' exact Hessian diag(κ_v I), the same on every replica.
        kappas = [curvature_lib.penalty_curvature(v) or 0.0 for v in variables]
        if any(kappas):
            gram = gram + curvature_lib.pairwise_dots(vectors, kappas)
    rho_gradient_dots = None
    micro_batch = opt._thread_state.micro_batch
    if micro_batch is not None:
        # Under gradient accumulation ρ's losses are the last micro-batch's:
        # its prediction takes that micro-batch's own gradient.
        rho_gradient_dots = tf.stack([curvature_lib.dot(micro_batch.grads, v) for v in vectors])
    model = update_rules.quadratic_model(gram, dots, damping, inputs.learning_rate,
                                         rho_gradient_dots)
    if amortised:
        calibration = calibration._replace(momentum_curvature=update_rules.next_momentum_curvature(
            model.coefficients, dots, calibration.momentum_curvature))
    updates = update_rules.updates(model.coefficients, directions, previous)
    adapt = schedule.is_adaptation_step(rule.damping_adaptation_interval, inputs.step)
    # ρ is measured on the adaptation steps, on the first step (λ₀ is a
    # guess) and after a rejection (ρ's read-out < 0) until an adaptation
    # step keeps its step.
    check = adapt | tf.equal(inputs.step, 0) | (opt.reduction_ratio < 0.0)

    def losses_before_and_after():
        with tf.name_scope("reduction_ratio"):
            before = loss if loss is not None else rho_probe.loss(values)
            after = rho_probe.loss([v + u for v, u in zip(values, updates)])
            return tf.stack([before, after]) if loss is None else tf.stack([0.0, after])

    # Collectives stay outside tf.cond: the replicas' losses are summed
    # on every step (two scalars), computed only when ρ is measured.
    before, after = tf.unstack(
        distribution.all_reduce_sum(
            tf.cond(check, losses_before_and_after, lambda: tf.zeros([2]))
        )
    )
    if loss is not None:
        before = loss
    rho = update_rules.reduction_ratio(before, after, model.model_change, check)
    step_finite = inputs.finite & model.finite
    rejected = step_finite & update_rules.rejects(before, after, rho, check)
    decay = rule.damping_adaptation_decay ** rule.damping_adaptation_interval
    new_damping = tf.where(
        rejected,
        update_rules.rejected_step_damping(damping, rule.max_damping),
        update_rules.levenberg_marquardt(damping, rho, decay, rule.min_damping, rule.max_damping),
    )
    return Proposal(model.coefficients, updates, step_finite & tf.logical_not(rejected),
                    (rho, new_damping, adapt, rejected), calibration, idle)


# --- the commit --------------------------------------------------------------------------------
def commit(opt, proposal: Proposal, variables, inputs: StepInputs) -> None:
    """On every device: if ``proposal.finite``, decoupled weight decay, then
    δ ← u and θ ← θ + u for every variable, the step's (α, μ) recorded and,
    on an adaptation step, ρ and the new λ; else nothing but λ (and a
    finite ρ) after a rejected step, counted in ``rejected_steps``.
    ``skipped_steps`` + 1 if the step was skipped for non-finite values or
    its ``cov_update_op`` found non-finite statistics (one count per step;
    not for an ``idle`` proposal, which had nothing to apply)."""
    momenta = _momenta(opt, variables)

    def on_device(ok, covariance_skipped, idle, updates, coefficients, learning_rate, calibration,
                  *damping):
        rho, new_damping, adapt, rejected = damping or (None, None, None, tf.constant(False))

        def apply():
            apply_decoupled_weight_decay(opt, variables, learning_rate)
            for variable, momentum, update in zip(variables, momenta, updates):
                opt.assign(momentum, tf.cast(update, momentum.dtype))
                opt.assign_add(variable, tf.cast(update, variable.dtype))
            opt._step_learning_rate.assign(coefficients[0])
            opt._step_momentum.assign(coefficients[1])
            if calibration:
                opt._curvature_scale.assign(calibration.scale)
                opt._momentum_curvature.assign(calibration.momentum_curvature)
            if damping:

                def adapt_damping():
                    opt._reduction_ratio.assign(rho)
                    opt._damping.assign(new_damping)

                run_if(adapt, adapt_damping)

        def skip():
            if damping:

                def reject():
                    # ρ's read-out < 0 keeps the next steps measured; an
                    # overflow (ρ not finite) reads as the lowest float32.
                    opt._damping.assign(new_damping)
                    opt._reduction_ratio.assign(
                        tf.where(tf.math.is_finite(rho), rho, tf.float32.min))

                run_if(rejected, reject)

        run_if_else(ok, apply, skip)
        failed = tf.logical_not(ok | rejected | idle)
        opt._skipped_steps.assign_add(tf.cast(failed | covariance_skipped, tf.int64))
        if damping:
            opt._rejected_steps.assign_add(tf.cast(rejected, tf.int64))

    on_every_device(
        opt, on_device, proposal.finite, inputs.covariance_skipped,
        tf.constant(False) if proposal.idle is None else proposal.idle, proposal.updates,
        tuple(proposal.coefficients), inputs.learning_rate,
        proposal.calibration or (),
        *(proposal.damping or ()),
    )


def apply_decoupled_weight_decay(opt, variables, learning_rate) -> None:
    """θ ← θ − α·wd·θ for the variables Keras' weight-decay settings
    select (``exclude_from_weight_decay``)."""
    if opt.weight_decay is None:
        return
    for variable in variables:
        if keras_compat.uses_weight_decay(opt, variable):
            decay = tf.cast(learning_rate * opt.weight_decay, variable.dtype)
            opt.assign_sub(variable, variable * decay)


# --- helpers -----------------------------------------------------------------------------------
def on_every_device(opt, fn, *args) -> None:
    """``fn(*args)`` on every device of the strategy (directly without
    one): the only way optimizer state and weights are assigned."""
    distribution.commit_on_every_device(opt._num_cov_updates.value, fn, *args)


def run_if(predicate, fn) -> tf.Tensor:
    return run_if_else(predicate, fn, lambda: None)


def run_if_else(predicate, true_fn, false_fn) -> tf.Tensor:
    """tf.cond for side effects only (works eagerly, in graphs and XLA)."""

    def branch(fn):
        def run_branch():
            fn()
            return tf.constant(True)

        return run_branch

    return tf.cond(predicate, branch(true_fn), branch(false_fn))


def all_finite(tensors) -> tf.Tensor:
    """True iff every element of every (non-None) tensor is finite."""
    checks = [
        tf.reduce_all(tf.math.is_finite(tf.cast(t, tf.float32)))
        for t in tensors
        if t is not None
    ]
    return tf.reduce_all(checks) if checks else tf.constant(True)
