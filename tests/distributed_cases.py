"""Cases of tests/test_distribute.py, run in subprocesses.

``python tests/distributed_cases.py mirrored <dir> [group ...]``: two
logical CPU devices (configured before TensorFlow starts), MirroredStrategy,
the cases of the named ``MIRRORED_GROUPS`` (default: all). Each case trains the
same tiny Conv2D + Dense model on one device with a global batch of 32 and on
2 replicas × 16, and asserts that the weights and factors agree.

``python tests/distributed_cases.py worker <out.npz> [crash_after_step]``:
one MultiWorkerMirroredStrategy worker of a custom loop (TF_CONFIG and
TKFAC_BACKUP_DIR set by the caller); ``reference <out.npz>``: the same
training on one device. Prints ``OK``. (Keras 3.15's ``fit`` fails under
MultiWorkerMirroredStrategy before its first step, with Keras' own
optimizers too, so the multi-worker cases use a custom loop.)
"""

import json
import os
import sys
from unittest import mock

import numpy as np
import tensorflow as tf

MODE = sys.argv[1]
if MODE == "mirrored":
    _cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(_cpu, [tf.config.LogicalDeviceConfiguration()] * 2)

import keras  # noqa: E402

import tkfac_tf  # noqa: E402
from tkfac_tf import distribution  # noqa: E402

GLOBAL_BATCH = 32
# 1 device against 2 replicas: the same sums in another order. Fixed steps
# stay within 5e-7 of each other here (measured); the adaptive step's 2×2
# solve and λ rule amplify the round-off: 4-6e-6 after 4 adaptive steps, so
# those compare to ADAPTIVE_TOLERANCE (a margin of ≥ 15× for other CPUs'
# summation orders; a real difference, e.g. an unsummed replica loss, is
# of order 1e-1).
TOLERANCE = 1e-5
ADAPTIVE_TOLERANCE = 1e-4
LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
_rng = np.random.RandomState(0)
X = _rng.randn(2 * GLOBAL_BATCH, 6, 6, 2).astype("float32")
Y = _rng.randint(0, 3, 2 * GLOBAL_BATCH)


def build(opt_name="TKFAC", mode="empirical", adaptive=False, placement="distributed", by_compile=False,
          **kwargs):
    """The model and its compiled optimizer (create under a strategy's scope
    to distribute them); ``by_compile``: no collection is passed, compile
    registers the model."""
    keras.utils.set_random_seed(1)
    model = keras.Sequential([
        keras.Input((6, 6, 2)),
        keras.layers.Conv2D(3, 3, activation="tanh"),
        keras.layers.Flatten(),
        keras.layers.Dense(4, activation="tanh"),
        keras.layers.Dense(3),
    ])
    collection = None if by_compile else tkfac_tf.LayerCollection.from_model(model, loss=LOSS)
    options = dict(
        estimation_mode=mode, cov_update_every=1, inv_update_every=2, seed=3,
        inverse_placement=placement,
    )
    options.update(kwargs)
    cls = getattr(tkfac_tf, opt_name)
    if adaptive:
        options.setdefault("damping_adaptation_interval", 2)
        opt = cls.adaptive(layer_collection=collection, **options)
    else:
        opt = cls(learning_rate=0.05, damping=0.01, layer_collection=collection, **options)
    model.compile(optimizer=opt, loss=LOSS)
    return model, opt


def relative(a, b, floor=1e-30):
    """‖a − b‖ / max(‖a‖, floor)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(a), floor))


def local_copies(variable):
    """Every replica's copy of an optimizer (Keras) variable, as arrays."""
    value = getattr(variable, "value", variable)
    return [np.asarray(v) for v in getattr(value, "values", [value])]


def check_same(name, model1, opt1, model2, opt2):
    """Weights and factors of the one-device run equal the distributed run's
    (every replica's copy) to TOLERANCE (ADAPTIVE_TOLERANCE for adaptive
    optimizers)."""
    tolerance = ADAPTIVE_TOLERANCE if opt1.adaptive else TOLERANCE
    # Weights: relative to max(‖w‖, 1), i.e. absolute for arrays that are
    # still near their zero initialisation (biases after a few steps).
    worst = max(relative(a, b, floor=1.0) for a, b in zip(model1.get_weights(), model2.get_weights()))
    assert worst <= tolerance, f"{name}: weights differ by {worst:.2e}"
    pairs = [(f1, f2, tolerance) for f1, f2 in zip(opt1.estimator.factor_variables,
                                                   opt2.estimator.factor_variables)]
    # An inverse magnifies the factors' round-off by the damped factor's
    # condition number (up to ~100 here): 10×.
    pairs += [(f1, f2, 10 * tolerance) for f1, f2 in zip(opt1.estimator.inverse_variables,
                                                         opt2.estimator.inverse_variables)]
    for f1, f2, tolerance in pairs:
        for copy in local_copies(f2):
            error = relative(np.asarray(f1), copy)
            assert error <= tolerance, f"{name}: {f2.path} differs by {error:.2e}"
    assert int(opt1.iterations.numpy()) == int(opt2.iterations.numpy())
    np.testing.assert_allclose(opt1.damping.numpy(), opt2.damping.numpy(), rtol=1e-5)  # the same λ decisions
    print(f"OK {name}: weights within {worst:.1e}")


def fit_cases(strategy):
    cases = [
        # The covariance update every second step (its conditional) and the inverses every third.
        ("TKFAC", "empirical", False, "distributed", dict(cov_update_every=2, inv_update_every=3)),
        ("KFAC", "exact", False, "replicated"),
        # K-FAC adaptive: custom_loop_cases; the replicas' model registered by compile.
        ("TKFAC", "exact", True, "distributed", dict(by_compile=True)),
        # Amortised curvature: steps 1 and 2 model the calibrated preconditioner
        # curvature, steps 0 and 3 walk each replica's recorded forward pass
        # inside the conditional.
        ("TKFAC", "exact", True, "distributed", dict(curvature_update_every=3, inverse_warmup_steps=0,
                                                     inv_update_every=4, damping_adaptation_interval=5)),
    ]
    for opt_name, mode, adaptive, placement, *options in cases:
        options = options[0] if options else {}
        name = f"fit {opt_name} {mode} adaptive={adaptive} {placement} {options}"
        # 4 adaptive steps: two λ adaptations (ADAPTIVE_TOLERANCE).
        epochs = 2 if adaptive else 3
        one_device = {k: v for k, v in options.items() if k != "by_compile"}  # registered explicitly
        model1, opt1 = build(opt_name, mode, adaptive, placement, **one_device)
        model1.fit(X, Y, batch_size=GLOBAL_BATCH, epochs=epochs, shuffle=False, verbose=0)
        with strategy.scope():
            model2, opt2 = build(opt_name, mode, adaptive, placement, **options)
        model2.fit(X, Y, batch_size=GLOBAL_BATCH, epochs=epochs, shuffle=False, verbose=0)
        if adaptive:
            for read_out in ("reduction_ratio", "step_learning_rate", "step_momentum"):
                np.testing.assert_allclose(
                    getattr(opt2, read_out).numpy(), getattr(opt1, read_out).numpy(),
                    rtol=10 * ADAPTIVE_TOLERANCE, atol=1e-6, err_msg=f"{name}: {read_out}",
                )
        check_same(name, model1, opt1, model2, opt2)


def sequence_case(strategy):
    """Embedding, EinsumDense (attention-style projection) and
    LayerNormalization blocks: their sums add over replicas too."""
    tokens = np.random.RandomState(1).randint(0, 7, (2 * GLOBAL_BATCH, 5))
    labels = np.random.RandomState(2).randint(0, 3, 2 * GLOBAL_BATCH)

    def build_sequence(opt_name):
        keras.utils.set_random_seed(1)
        model = keras.Sequential([
            keras.Input((5,), dtype="int32"),
            keras.layers.Embedding(7, 4),
            keras.layers.EinsumDense("btd,de->bte", output_shape=(5, 6), bias_axes="e",
                                     activation="tanh"),
            keras.layers.LayerNormalization(),
            keras.layers.Flatten(),
            keras.layers.Dense(3),
        ])
        collection = tkfac_tf.LayerCollection.from_model(model, loss=LOSS)
        opt = getattr(tkfac_tf, opt_name)(
            learning_rate=0.05, damping=0.01, layer_collection=collection,
            estimation_mode="exact", inv_update_every=2,
        )
        model.compile(optimizer=opt, loss=LOSS)
        return model, opt

    for opt_name in ("TKFAC", "KFAC"):
        model1, opt1 = build_sequence(opt_name)
        # 2 steps: LayerNorm's and the inverses' round-off grows fastest here.
        model1.fit(tokens, labels, batch_size=GLOBAL_BATCH, epochs=1, shuffle=False, verbose=0)
        with strategy.scope():
            model2, opt2 = build_sequence(opt_name)
        model2.fit(tokens, labels, batch_size=GLOBAL_BATCH, epochs=1, shuffle=False, verbose=0)
        check_same(f"sequence layers {opt_name}", model1, opt1, model2, opt2)


def custom_loop(model, opt, strategy=None, steps=4, adaptive=False, iterator=None,
                after_step=None, manual=False):
    """A custom training loop with the loss averaged over the global batch
    (``iterator``: distributed batches; default: the global batches, split
    over the strategy's replicas)."""

    def replica_step(x, y):
        def loss_fn():
            per_example = LOSS.__class__(from_logits=True, reduction=None)(y, model(x, training=True))
            return tf.nn.compute_average_loss(per_example, global_batch_size=GLOBAL_BATCH)

        with tf.GradientTape() as tape:
            loss = loss_fn()
        if manual:  # the Estimator-style schedule: cov / inv ops by hand
            opt.cov_update_op(loss=loss)
            opt.inv_update_op()
        grads = tape.gradient(loss, model.trainable_variables)
        opt.apply_gradients(zip(grads, model.trainable_variables),
                            loss_fn=loss_fn if adaptive else None)
        return loss

    dataset = tf.data.Dataset.from_tensor_slices((X, Y)).batch(GLOBAL_BATCH).repeat()
    if strategy is None:
        step = tf.function(replica_step)
        iterator = iterator or iter(dataset)
    else:
        step = tf.function(lambda x, y: strategy.run(replica_step, args=(x, y)))
        iterator = iterator or iter(strategy.experimental_distribute_dataset(dataset))
    for _ in range(steps):
        step(*next(iterator))
        if after_step is not None:
            after_step()


def custom_loop_cases(strategy):
    manual = dict(cov_update_every=None, inv_update_every=None)
    for opt_name, adaptive, mode, options in (("KFAC", True, "exact", {}), ("TKFAC", False, "exact", {}),
                                             ("TKFAC", False, "empirical", manual)):
        name = f"custom loop {opt_name} adaptive={adaptive} {mode} {options}"
        model1, opt1 = build(opt_name, mode, adaptive, **options)
        opt1.build(model1.trainable_variables)
        custom_loop(model1, opt1, adaptive=adaptive, manual=bool(options))
        with strategy.scope():
            model2, opt2 = build(opt_name, mode, adaptive, **options)
            # Mirrored optimizer state is created before the step is traced.
            opt2.build(model2.trainable_variables)
        custom_loop(model2, opt2, strategy, adaptive=adaptive, manual=bool(options))
        check_same(name, model1, opt1, model2, opt2)


def curvature_subset_case(strategy):
    """fit with curvature_batch_size=n: each replica takes the curvature
    products on the first n examples of its half, so the summed replica
    losses are the mean over those 2n examples, as in the one-device
    reference whose curvature_loss_fn gathers them; ρ on the whole batch.
    With statistics_pass='curvature' the statistics come from those 2n
    examples too, averaged with ε' = 1 − (2n / batch)(1 − ε) from the
    replicas' summed counts. With 'ghost_halves' (no BatchNorm here) the
    whole batch's steps."""
    n, half = 5, GLOBAL_BATCH // 2
    rows = np.concatenate([np.arange(n), half + np.arange(n)])
    factors = {}
    for statistics_pass in ("step", "curvature"):
        model1, opt1 = build("TKFAC", "exact", True, statistics_pass=statistics_pass)
        opt1.build(model1.trainable_variables)

        @tf.function
        def step(x, y):
            with tf.GradientTape() as tape:
                loss = LOSS(y, model1(x, training=True))
            grads = tape.gradient(loss, model1.trainable_variables)
            xs, ys = tf.gather(x, rows), tf.gather(y, rows)
            opt1.apply_gradients(zip(grads, model1.trainable_variables),
                                 loss_fn=lambda: LOSS(y, model1(x, training=True)),
                                 curvature_loss_fn=lambda: LOSS(ys, model1(xs, training=True)))

        for k in range(2):  # one λ adaptation, two covariance updates
            step(X[k * GLOBAL_BATCH:(k + 1) * GLOBAL_BATCH], Y[k * GLOBAL_BATCH:(k + 1) * GLOBAL_BATCH])
        with strategy.scope():
            model2, opt2 = build("TKFAC", "exact", True, curvature_batch_size=n, statistics_pass=statistics_pass)
        model2.fit(X, Y, batch_size=GLOBAL_BATCH, epochs=1, shuffle=False, verbose=0)
        check_same(f"fit curvature_batch_size, statistics_pass={statistics_pass}", model1, opt1, model2, opt2)
        factors[statistics_pass] = [v.numpy() for v in opt1.estimator.factor_variables]
    assert max(relative(a, b) for a, b in zip(factors["curvature"], factors["step"])) > 1e-2
    # 'ghost_halves': each replica's two halves weighted by size, which
    # without BatchNorm is the whole batch's curvature.
    model1, opt1 = build("TKFAC", "exact", True, curvature_batch_size=None)
    model1.fit(X, Y, batch_size=GLOBAL_BATCH, epochs=1, shuffle=False, verbose=0)
    with strategy.scope():
        model2, opt2 = build("TKFAC", "exact", True, curvature_batch_size="ghost_halves")
    model2.fit(X, Y, batch_size=GLOBAL_BATCH, epochs=1, shuffle=False, verbose=0)
    check_same("fit ghost_halves", model1, opt1, model2, opt2)


def sampled_targets_case(strategy):
    """'gradients' mode: replica r draws the targets of its half with stream
    step·R + r. The one-device reference forms the same draws for each half
    and adds their sums; after one step (the first update initialises the
    averages) the factors must agree."""
    with strategy.scope():
        model2, opt2 = build("TKFAC", "gradients")
    model2.fit(X[:GLOBAL_BATCH], Y[:GLOBAL_BATCH], batch_size=GLOBAL_BATCH, epochs=1,
               shuffle=False, verbose=0)
    model1, opt1 = build("TKFAC", "gradients")
    opt1.build(model1.trainable_variables)
    half = GLOBAL_BATCH // 2

    def replica_sums(x, replica):
        """Replica ``replica``'s sums of the batch slice x (traced anew: the
        replica position is read when the step is traced)."""
        @tf.function
        def sums(x):
            model1(x, training=True)
            record = opt1.layer_collection.recorder.take()
            return opt1.estimator.batch_statistic_sums(record, tf.constant(0, tf.int64))

        with mock.patch.object(distribution, "replica_position", return_value=(replica, 2)):
            return sums(x)

    parts = [replica_sums(X[r * half:(r + 1) * half], r) for r in range(2)]
    total = tf.nest.map_structure(tf.add, parts[0], parts[1])
    reference = opt1.estimator.statistics_from_sums(total)
    for expected, variable in zip(reference, opt2.estimator.factor_variables):
        for copy in local_copies(variable):
            error = relative(expected, copy)
            assert error <= TOLERANCE, f"sampled targets: {variable.path} differs by {error:.2e}"
    # The replicas' draws differ: the same slice on both replicas gives
    # different sums.
    same_slice = [replica_sums(X[:half], r) for r in range(2)]
    assert relative(same_slice[0][0][1], same_slice[1][0][1]) > 1e-3, "replicas drew the same targets"
    print("OK sampled targets: per-replica streams match the reference")


def subset_case(strategy):
    """cov_batch_size: replica r sums the statistics of its own subset of
    its 16 examples (stream step·R + r); the all-reduced sums, counts
    included, equal one device's statistics of a batch made of exactly the
    union of the two subsets ('exact' mode: no sampling)."""
    size = 5
    with strategy.scope():
        model2, opt2 = build("TKFAC", "exact", cov_batch_size=size)
    model2.fit(X[:GLOBAL_BATCH], Y[:GLOBAL_BATCH], batch_size=GLOBAL_BATCH, epochs=1,
               shuffle=False, verbose=0)
    from tkfac_tf import estimator as estimator_lib

    half = GLOBAL_BATCH // 2
    union = np.concatenate([
        r * half + estimator_lib.example_subset(tf.constant(half), size, tf.constant([3, r], tf.int64)).numpy()
        for r in range(2)
    ])
    assert len(set(union.tolist())) == 2 * size
    model1, opt1 = build("TKFAC", "exact")
    model1.fit(X[union], Y[union], batch_size=len(union), epochs=1, shuffle=False, verbose=0)
    for expected, variable in zip(opt1.estimator.factor_variables, opt2.estimator.factor_variables):
        for copy in local_copies(variable):
            error = relative(expected, copy)
            assert error <= TOLERANCE, f"cov_batch_size: {variable.path} differs by {error:.2e}"
    print("OK cov_batch_size: per-replica subsets match the reference")


def checkpoint_case(strategy, directory):
    """tf.train.Checkpoint and .keras under the strategy: 2 epochs, save,
    restore into a new model and optimizer, 1 more epoch = the saved model
    trained on for that epoch without interruption."""
    with strategy.scope():
        model1, opt1 = build("TKFAC", "exact", True)
    model1.fit(X, Y, batch_size=GLOBAL_BATCH, epochs=2, shuffle=False, verbose=0)
    path = tf.train.Checkpoint(model=model1, optimizer=opt1).save(os.path.join(directory, "ckpt"))
    # .keras, loaded under the strategy (load_model's compile attaches the collection).
    model1.save(os.path.join(directory, "model.keras"))
    model1.fit(X, Y, batch_size=GLOBAL_BATCH, epochs=1, shuffle=False, verbose=0)  # uninterrupted
    with strategy.scope():
        model2, opt2 = build("TKFAC", "exact", True)
        opt2.build(model2.trainable_variables)
    tf.train.Checkpoint(model=model2, optimizer=opt2).restore(path).assert_existing_objects_matched()
    model2.fit(X, Y, batch_size=GLOBAL_BATCH, epochs=1, shuffle=False, verbose=0)
    check_same("checkpoint resume", model1, opt1, model2, opt2)
    with strategy.scope():
        model3 = keras.models.load_model(os.path.join(directory, "model.keras"))
    model3.fit(X, Y, batch_size=GLOBAL_BATCH, epochs=1, shuffle=False, verbose=0)
    check_same(".keras resume", model1, opt1, model3, model3.optimizer)


def refusal_case():
    """Strategies without mirrored synchronous replicas are refused at the
    first step, before anything changes."""
    strategy = tf.distribute.experimental.CentralStorageStrategy(["/cpu:0", "/cpu:1"])
    with strategy.scope():
        model, _ = build()
    before = model.get_weights()
    try:
        model.fit(X, Y, batch_size=GLOBAL_BATCH, epochs=1, verbose=0)
    except NotImplementedError as error:
        assert "CentralStorageStrategy" in str(error) and "MirroredStrategy" in str(error), error
    else:
        raise AssertionError("CentralStorageStrategy was not refused")
    for w, b in zip(model.get_weights(), before):
        np.testing.assert_array_equal(w, b)
    print("OK refusal")


WORKER_STEPS = 4


def _worker_slices(context):
    """Worker w's slice of every global batch (rows w·16 … w·16 + 15)."""
    per_worker = GLOBAL_BATCH // context.num_input_pipelines
    start = context.input_pipeline_id * per_worker
    dataset = tf.data.Dataset.from_tensor_slices((X, Y)).batch(GLOBAL_BATCH).repeat()
    return dataset.map(lambda x, y: (x[start:start + per_worker], y[start:start + per_worker]))


def multi_worker(out_path, crash_after_step):
    """One MultiWorkerMirroredStrategy worker: WORKER_STEPS steps of a custom
    loop, a checkpoint after every step (tf.train.CheckpointManager; the
    chief writes TKFAC_BACKUP_DIR, the other worker a scratch copy), resuming
    from the chief's latest checkpoint. With ``crash_after_step`` this
    process dies right after that step's checkpoint (a killed worker)."""
    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    task = json.loads(os.environ["TF_CONFIG"])["task"]["index"]
    with strategy.scope():
        model, opt = build("TKFAC", "exact", True)
        opt.build(model.trainable_variables)
    checkpoint = tf.train.Checkpoint(model=model, optimizer=opt)
    directory = os.environ["TKFAC_BACKUP_DIR"]
    latest = tf.train.latest_checkpoint(directory)
    if latest:
        checkpoint.restore(latest).assert_existing_objects_matched()
    writes_to = directory if task == 0 else os.path.join(directory + "_scratch", f"worker{task}")
    manager = tf.train.CheckpointManager(checkpoint, writes_to, max_to_keep=1)
    done = int(opt.iterations.numpy())
    dataset = strategy.distribute_datasets_from_function(lambda c: _worker_slices(c).skip(done))
    custom_loop(model, opt, strategy, steps=WORKER_STEPS - done, adaptive=True,
                iterator=iter(dataset), after_step=lambda: (
                    manager.save(),
                    crash_after_step is not None
                    and int(opt.iterations.numpy()) == crash_after_step
                    and os._exit(3),
                ))
    save(out_path, model, opt)


def reference(out_path):
    model, opt = build("TKFAC", "exact", True)
    custom_loop(model, opt, steps=WORKER_STEPS, adaptive=True)
    save(out_path, model, opt)


def save(out_path, model, opt):
    arrays = {f"w{i}": w for i, w in enumerate(model.get_weights())}
    arrays.update({f"f{i}": local_copies(f)[0] for i, f in enumerate(opt.estimator.factor_variables)})
    arrays["iterations"] = np.asarray(int(opt.iterations.numpy()))
    np.savez(out_path, **arrays)
    print("OK", json.dumps({"iterations": int(opt.iterations.numpy())}))


# The MirroredStrategy cases by group (tests/test_distribute.py runs one
# subprocess per group, or per pair of short groups).
MIRRORED_GROUPS = {
    "fit": lambda strategy, directory: fit_cases(strategy),
    "custom_loop": lambda strategy, directory: (custom_loop_cases(strategy),
                                                curvature_subset_case(strategy)),
    "statistics": lambda strategy, directory: (sequence_case(strategy), sampled_targets_case(strategy),
                                               subset_case(strategy), refusal_case()),
    "resume": checkpoint_case,
}


if __name__ == "__main__":
    if MODE == "mirrored":
        mirrored = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
        for group in sys.argv[3:] or list(MIRRORED_GROUPS):
            MIRRORED_GROUPS[group](mirrored, sys.argv[2])
        print("ALL OK")
    elif MODE == "worker":
        multi_worker(sys.argv[2], int(sys.argv[3]) if len(sys.argv) > 3 else None)
    elif MODE == "reference":
        reference(sys.argv[2])
    else:
        raise SystemExit(f"unknown mode {MODE!r}")
