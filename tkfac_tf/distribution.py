"""tf.distribute support: which strategies work, and the collective steps.

Data-parallel training (``MirroredStrategy``, ``MultiWorkerMirroredStrategy``,
``OneDeviceStrategy``; Keras' contract: each replica's loss is its share of
the mean over the global batch). The optimizer's step runs in replica
context, each replica with its own slice of the batch:

* the gradients and the factor statistics' sums (additive over examples,
  counts included: ``FisherEstimator.batch_statistic_sums``) are all-reduced
  by summation, so every replica finalises the same statistics, equal to one
  device's statistics of the global batch;
* the statistic sums and distributed inverses are all-reduced only on
  the steps that update them (``sum_and_commit_if``: in cross-replica
  context, where a collective may sit inside ``tf.cond``);
* every change of optimizer state and weights is committed through the
  strategy (``commit_on_every_device``: ``merge_call`` then
  ``extended.update`` on each device), with values that are identical on
  every replica, so mirrored variables stay mirrored;
* inverses are either recomputed on every replica ('replicated') or each
  block is inverted on one replica (``assign_owners``: greedy by cost) and
  the results summed over replicas, zeros elsewhere ('distributed').

Without a strategy every function here is the identity / a direct call, so
one-device training runs exactly the same code.
"""

import threading

import tensorflow as tf

from tkfac_tf import keras_compat

INVERSE_PLACEMENTS = ("distributed", "replicated")

_SUPPORTED = (
    "MirroredStrategy",
    "MultiWorkerMirroredStrategy",
    "CollectiveAllReduceStrategy",
    "OneDeviceStrategy",
    "_DefaultDistributionStrategy",
)


def check_strategy_supported(optimizer_name, what):
    """Raises NotImplementedError under a strategy tkfac_tf cannot run on:
    parameter servers (variables are not mirrored, updates are asynchronous),
    TPUs (untested here; see docs/distributed.md) and central storage."""
    if not tf.distribute.has_strategy():
        return
    strategy = tf.distribute.get_strategy()
    names = {cls.__name__ for cls in type(strategy).__mro__}
    if names.intersection(_SUPPORTED) and not names.intersection(
        {"ParameterServerStrategy", "ParameterServerStrategyV2", "CentralStorageStrategy"}
    ):
        return
    raise NotImplementedError(
        f"{optimizer_name}.{what} was called under tf.distribute strategy "
        f"{type(strategy).__name__}, which tkfac_tf does not support: it needs "
        "synchronous data parallelism with mirrored variables "
        "(MirroredStrategy, MultiWorkerMirroredStrategy or OneDeviceStrategy). "
        "TPUStrategy is not supported yet (see docs/distributed.md); with "
        "parameter servers the factor statistics cannot be all-reduced."
    )


def replica_position():
    """(replica id, number of replicas in sync) of the current replica, as
    Python ints: (0, 1) without a strategy or in cross-replica context."""
    context = tf.distribute.get_replica_context()
    if context is None:
        return 0, 1
    count = context.num_replicas_in_sync
    if count == 1:
        return 0, 1
    static = tf.get_static_value(context.replica_id_in_sync_group)
    if static is None:
        raise NotImplementedError(
            f"tkfac_tf needs a replica id known when the step is traced; "
            f"{type(tf.distribute.get_strategy()).__name__} does not give one."
        )
    return int(static), count


def num_replicas():
    """Replicas in sync of the current strategy (1 without one)."""
    return tf.distribute.get_strategy().num_replicas_in_sync


def all_reduce_sum(values):
    """Σ over replicas of the nested structure ``values`` (in replica
    context; the values themselves with one replica)."""
    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync == 1:
        return values
    return context.all_reduce(tf.distribute.ReduceOp.SUM, values)


def _first_local(strategy, value):
    """A value that is identical on every replica, as one tensor."""
    return strategy.experimental_local_results(value)[0]


def commit_on_every_device(anchor, fn, *args):
    """Runs ``fn(*args)`` once per device holding the mirrored variables, in
    update context: every variable it reads or assigns is that device's
    copy. ``args`` (nested tensors, identical on every replica) reach each
    device as its own copy. ``anchor``: any mirrored tf.Variable of the
    optimizer (it fixes the devices). Without a strategy: ``fn(*args)``.
    Call it in replica context (or with no strategy)."""
    context = tf.distribute.get_replica_context()
    if not tf.distribute.has_strategy() or context is None:
        fn(*args)
        return

    def merge(strategy, *merged):
        strategy.extended.update(anchor, lambda _, *device_args: fn(*device_args), args=merged, group=False)

    context.merge_call(merge, args=args)


def assign_owners(costs, count):
    """Greedy balanced assignment (largest cost first to the least-loaded
    replica) of jobs with ``costs`` to ``count`` replicas; returns a list of
    owner ids in the order of ``costs``."""
    loads = [0.0] * count
    owners = [0] * len(costs)
    for job in sorted(range(len(costs)), key=lambda j: (-costs[j], j)):
        owner = min(range(count), key=lambda r: (loads[r], r))
        owners[job] = owner
        loads[owner] += costs[job]
    return owners


def sum_and_commit_if(predicate, local, anchor, commit, check):
    """Where ``predicate`` (a bool tensor, the same on every replica) holds:
    sums the nested tensors ``local`` (this replica's part) over replicas and
    runs ``commit(summed)`` on every device (update context, as
    ``commit_on_every_device``). Returns ``check(summed)`` (a bool tensor;
    True where ``predicate`` does not hold). The all-reduce itself runs only
    where ``predicate`` holds (in cross-replica context: collectives cannot
    sit in a replica's conditional). Call in replica context; with one
    replica nothing is communicated."""
    _, count = replica_position()

    def local_check(values):
        return tf.cond(predicate, lambda: check(values), lambda: tf.constant(True))

    if count == 1:
        commit_on_every_device(
            anchor,
            lambda p, values: tf.cond(p, lambda: _run(commit, values), lambda: tf.constant(False)),
            predicate,
            local,
        )
        return local_check(local)

    def merge(strategy, local, predicate):
        predicate = _first_local(strategy, predicate)
        flat = tf.nest.flatten(local)

        def reduce_and_commit():
            summed = strategy.extended.batch_reduce_to(
                tf.distribute.ReduceOp.SUM, [(value, anchor) for value in flat]
            )
            strategy.extended.update(
                anchor,
                lambda _, *values: _run(commit, tf.nest.pack_sequence_as(local, list(values))),
                args=tuple(summed),
                group=False,
            )
            first = [_first_local(strategy, value) for value in summed]
            return check(tf.nest.pack_sequence_as(local, first))

        return tf.cond(predicate, reduce_and_commit, lambda: tf.constant(True))

    return tf.distribute.get_replica_context().merge_call(merge, args=(local, predicate))


def _run(fn, *args):
    fn(*args)
    return tf.constant(True)


def distributed_update(predicate, variables, owners, compute, assign_one):
    """On steps where ``predicate`` holds: each replica r computes
    ``compute(job)`` for the jobs it owns (``owners[job] == r``), zeros for
    the others; the results are summed over replicas and assigned to
    ``variables`` (a list over jobs of lists of variables) on every device
    by ``assign_one(variable, value)``.
    ``compute(job) -> list of tensors shaped like variables[job]``. Call in
    replica context."""
    replica_id, count = replica_position()
    flat = [v for job_variables in variables for v in job_variables]

    def shares():
        out = []
        for job, job_variables in enumerate(variables):
            if count == 1 or owners[job] == replica_id:
                out.extend(tf.cast(value, tf.float32) for value in compute(job))
            else:
                out.extend(tf.zeros(v.shape, tf.float32) for v in job_variables)
        return out

    local = tf.cond(predicate, shares, lambda: [tf.zeros(v.shape, tf.float32) for v in flat])

    def assign(values):
        for variable, value in zip(flat, values):
            assign_one(variable, value)

    sum_and_commit_if(
        predicate, local, _tf_variable(flat[0]), assign, lambda values: tf.constant(True)
    )


def _tf_variable(variable):
    """The tf.Variable behind a Keras variable."""
    return variable if isinstance(variable, tf.Variable) else variable.value


class ThreadLocal(threading.local):
    """Per-thread attributes (MirroredStrategy traces each replica on its
    own thread), with a default value for every name."""

    def __init__(self, **defaults):
        super().__init__()
        self.__dict__.update(defaults)


def communication_per_step(optimizer):
    """What one step of ``optimizer`` (built) all-reduces across replicas, in
    bytes (float32): dict with

      gradients   every step: the trainable variables' sizes;
      statistics  per covariance update (every ``cov_update_every`` steps):
                  every block's statistic sums;
      curvature   every step, adaptive optimizers: the loss and 2×2 Gram
                  matrix of the exact curvature, and the two losses of ρ;
      inverses    per inverse update, 'distributed' placement only: every
                  block's inverses (the owners' results, zeros elsewhere).
    """
    float_bytes = 4

    def size(shape):
        count = 1
        for d in shape:
            count *= int(d)
        return count

    estimator = optimizer.estimator
    statistics = sum(size(t.shape) for t in tf.nest.flatten(estimator.zero_sums()))
    gradients = sum(size(v.shape) for v in keras_compat.trained_variables(optimizer))
    curvature = 0
    if optimizer.adaptive:
        curvature = (1 + 4 if optimizer.curvature == "exact" else 0) + 2
    inverses = 0
    if optimizer.inverse_placement == "distributed":
        inverses = sum(size(v.shape) for v in estimator.inverse_variables)
    return {
        "gradients": gradients * float_bytes,
        "statistics": statistics * float_bytes,
        "curvature": curvature * float_bytes,
        "inverses": inverses * float_bytes,
    }
