"""Dense blocks against brute force: exact Fisher, traces, factors, solves."""

import logging

import keras
import numpy as np
import pytest
import tensorflow as tf

import tkfac_tf
from tests import brute_force

N, D_IN, HIDDEN, CLASSES = 6, 3, 4, 3


def _classifier(use_bias=True, activation="softmax"):
    model = keras.Sequential(
        [
            keras.Input((D_IN,)),
            keras.layers.Dense(HIDDEN, activation="tanh", use_bias=use_bias),
            keras.layers.Dense(CLASSES, activation=activation, use_bias=use_bias),
        ]
    )
    collection = tkfac_tf.LayerCollection()
    for layer in model.layers:
        collection.register_dense(layer)
    collection.register_categorical_predictive_distribution(model.layers[-1])
    return model, collection


def _inputs(n=N, seed=0):
    return np.random.RandomState(seed).randn(n, D_IN).astype(np.float32)


def _collect_statistics(opt_class, use_bias, damping=0.05, **kwargs):
    """One exact covariance + inverse update on a fresh optimizer."""
    model, collection = _classifier(use_bias)
    opt = opt_class(
        learning_rate=0.1,
        damping=damping,
        layer_collection=collection,
        estimation_mode="exact",
        **kwargs,
    )
    opt.build(model.trainable_variables)
    x = _inputs()

    @tf.function
    def stats_step(x):
        model(x, training=True)
        opt.cov_update_op()
        opt.inv_update_op()

    stats_step(x)
    return model, opt, x


@pytest.mark.parametrize("use_bias", [True, False])
def test_tkfac_trace_equals_exact_fisher_trace(use_bias):
    model, opt, x = _collect_statistics(tkfac_tf.TKFAC, use_bias)
    for layer in model.layers:
        block = opt.fisher_blocks[layer.name]
        exact = brute_force.exact_fisher_block(model, layer, x)
        approx = block.full_fisher().numpy()
        assert approx.shape == exact.shape
        np.testing.assert_allclose(np.trace(approx), np.trace(exact), rtol=1e-5)
        np.testing.assert_allclose(float(block.delta.numpy()), np.trace(exact), rtol=1e-5)
        np.testing.assert_allclose(np.trace(block.phi.numpy()), 1.0, rtol=1e-6)
        np.testing.assert_allclose(np.trace(block.psi.numpy()), 1.0, rtol=1e-6)


@pytest.mark.parametrize("use_bias", [True, False])
def test_tkfac_factors_match_definitions(use_bias):
    model, opt, x = _collect_statistics(tkfac_tf.TKFAC, use_bias)
    samples = brute_force.exact_categorical_samples(model, x)
    for layer, (a, gs, weights) in zip(model.layers, samples):
        block = opt.fisher_blocks[layer.name]
        delta, phi, psi = brute_force.tkfac_reference(a, gs, weights, N)
        np.testing.assert_allclose(block.delta.numpy(), delta, rtol=1e-5)
        np.testing.assert_allclose(block.phi.numpy(), phi, rtol=1e-4, atol=1e-7)
        np.testing.assert_allclose(block.psi.numpy(), psi, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("use_bias", [True, False])
def test_kfac_factors_are_brute_force_averages(use_bias):
    model, opt, x = _collect_statistics(tkfac_tf.KFAC, use_bias)
    samples = brute_force.exact_categorical_samples(model, x)
    for layer, (a, gs, weights) in zip(model.layers, samples):
        block = opt.fisher_blocks[layer.name]
        cov_a, cov_g = brute_force.kfac_reference(a, gs, weights, N)
        np.testing.assert_allclose(block.cov_a.numpy(), cov_a, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(block.cov_g.numpy(), cov_g, rtol=1e-4, atol=1e-7)
        np.testing.assert_allclose(
            block.full_fisher().numpy(), np.kron(cov_a, cov_g), rtol=1e-4, atol=1e-7
        )


def _dense_damped_matrix(opt, block_refs, damping, split=None):
    """(P + s_a I) ⊗ (Q + s_g I): TKFAC P = √δΦ, Q = √δΨ and by default
    s_a = s_g = √λ; K-FAC P = A, Q = G and by default the π split."""
    if isinstance(opt, tkfac_tf.TKFAC):
        delta, phi, psi = block_refs
        left, right = np.sqrt(delta) * phi, np.sqrt(delta) * psi
        split = split or "sqrt"
    else:
        left, right = block_refs
        split = split or "pi"
    pi = 1.0
    if split == "pi":  # for TKFAC tr P = tr Q, so π = √(d_g / d_a)
        pi = np.sqrt((np.trace(left) / len(left)) / (np.trace(right) / len(right)))
    left = left + pi * np.sqrt(damping) * np.eye(len(left))
    right = right + np.sqrt(damping) / pi * np.eye(len(right))
    return np.kron(left, right)


@pytest.mark.parametrize("opt_class", [tkfac_tf.TKFAC, tkfac_tf.KFAC])
@pytest.mark.parametrize("split", [None, "sqrt", "pi"])
def test_preconditioned_step_equals_dense_solve(opt_class, split):
    damping = 0.05
    model, opt, x = _collect_statistics(opt_class, True, damping=damping, damping_split=split)
    samples = brute_force.exact_categorical_samples(model, x)
    rng = np.random.RandomState(3)
    for layer, (a, gs, weights) in zip(model.layers, samples):
        block = opt.fisher_blocks[layer.name]
        if opt_class is tkfac_tf.TKFAC:
            refs = brute_force.tkfac_reference(a, gs, weights, N)
        else:
            refs = brute_force.kfac_reference(a, gs, weights, N)
        dense = _dense_damped_matrix(opt, refs, damping, split).astype(np.float64)
        grad = rng.randn(a.shape[1], gs.shape[-1]).astype(np.float32)
        expected = np.linalg.solve(dense, grad.reshape(-1).astype(np.float64))
        got = block.multiply_inverse(tf.constant(grad)).numpy().reshape(-1)
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-6 * np.abs(expected).max())


@pytest.mark.parametrize("opt_class", [tkfac_tf.TKFAC, tkfac_tf.KFAC])
@pytest.mark.parametrize("norm_constraint", [None, 1e-4])
def test_first_fit_step_is_minus_lr_times_dense_solve(opt_class, norm_constraint):
    """θ₁ = θ₀ − α·c·F̂⁻¹∇ with F̂ the dense damped matrix, c the KL-clip factor."""
    damping, lr = 0.05, 0.1
    model, collection = _classifier()
    opt = opt_class(
        learning_rate=lr,
        damping=damping,
        layer_collection=collection,
        estimation_mode="exact",
        norm_constraint=norm_constraint,
    )
    loss_fn = keras.losses.SparseCategoricalCrossentropy()
    model.compile(optimizer=opt, loss=loss_fn)
    x = _inputs()
    y = np.array([0, 1, 2, 0, 1, 2])
    before = [w.numpy() for w in model.trainable_weights]
    samples = brute_force.exact_categorical_samples(model, x)
    with tf.GradientTape() as tape:
        loss = loss_fn(y, model(x, training=False))
    grads = tape.gradient(loss, model.trainable_weights)
    directions, sq_norm = [], 0.0
    for i, (layer, (a, gs, weights)) in enumerate(zip(model.layers, samples)):
        if opt_class is tkfac_tf.TKFAC:
            refs = brute_force.tkfac_reference(a, gs, weights, N)
        else:
            refs = brute_force.kfac_reference(a, gs, weights, N)
        dense = _dense_damped_matrix(opt, refs, damping)
        grad = np.concatenate([grads[2 * i].numpy(), grads[2 * i + 1].numpy()[None]], 0)
        solved = np.linalg.solve(dense, grad.reshape(-1)).reshape(grad.shape)
        directions.append(solved)
        sq_norm += lr**2 * float((solved * grad).sum())
    coefficient = 1.0 if norm_constraint is None else min(1.0, np.sqrt(norm_constraint / sq_norm))
    if norm_constraint is not None:
        assert coefficient < 1.0  # the constraint is active in this test
    model.fit(x, y, batch_size=N, epochs=1, verbose=0, shuffle=False)
    for i, direction in enumerate(directions):
        expected_kernel = before[2 * i] - lr * coefficient * direction[:-1]
        expected_bias = before[2 * i + 1] - lr * coefficient * direction[-1]
        np.testing.assert_allclose(model.layers[i].kernel.numpy(), expected_kernel, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(model.layers[i].bias.numpy(), expected_bias, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("opt_class", [tkfac_tf.TKFAC, tkfac_tf.KFAC])
def test_l2_regularizers_add_their_curvature_to_each_blocks_damping(opt_class):
    """With Keras weight regularizers the first fit step is −α (F̂ + κ̄ I)⁻¹∇,
    ∇ including the regularizers' gradients, each block damped with
    λ + κ̄_l, κ̄_l = Σ_v n_v κ_v / Σ_v n_v (κ = 2·l2 for L2 / L1L2, 0 for L1);
    with regularizer_curvature=False with λ alone."""
    damping, lr = 0.05, 0.1
    x, y = _inputs(), np.array([0, 1, 2, 0, 1, 2])
    regularizers = [
        dict(kernel_regularizer=keras.regularizers.L2(0.2), bias_regularizer=keras.regularizers.L1(0.3)),
        dict(kernel_regularizer=keras.regularizers.L1L2(l1=0.01, l2=0.05),
             bias_regularizer=keras.regularizers.L2(0.4)),
    ]
    kappas = [
        (2 * 0.2 * D_IN * HIDDEN) / ((D_IN + 1) * HIDDEN),
        (2 * 0.05 * HIDDEN * CLASSES + 2 * 0.4 * CLASSES) / ((HIDDEN + 1) * CLASSES),
    ]
    for modelled in (True, False):
        keras.utils.set_random_seed(0)
        model = keras.Sequential([
            keras.Input((D_IN,)),
            keras.layers.Dense(HIDDEN, activation="tanh", **regularizers[0]),
            keras.layers.Dense(CLASSES, activation="softmax", **regularizers[1]),
        ])
        collection = tkfac_tf.LayerCollection()
        for layer in model.layers:
            collection.register_dense(layer)
        collection.register_categorical_predictive_distribution(model.layers[-1])
        opt = opt_class(learning_rate=lr, damping=damping, layer_collection=collection,
                        estimation_mode="exact", regularizer_curvature=modelled)
        loss_fn = keras.losses.SparseCategoricalCrossentropy()
        model.compile(optimizer=opt, loss=loss_fn)
        before = [w.numpy() for w in model.trainable_weights]
        samples = brute_force.exact_categorical_samples(model, x)
        with tf.GradientTape() as tape:
            loss = loss_fn(y, model(x, training=False)) + tf.add_n(model.losses)
        grads = tape.gradient(loss, model.trainable_weights)
        model.fit(x, y, batch_size=N, epochs=1, verbose=0, shuffle=False)
        for i, (layer, (a, gs, weights)) in enumerate(zip(model.layers, samples)):
            assert opt.fisher_blocks[layer.name].penalty_damping == pytest.approx(
                kappas[i] if modelled else 0.0, rel=1e-6)
            reference = brute_force.tkfac_reference if opt_class is tkfac_tf.TKFAC else brute_force.kfac_reference
            block_damping = damping + (kappas[i] if modelled else 0.0)
            dense = _dense_damped_matrix(opt, reference(a, gs, weights, N), block_damping)
            grad = np.concatenate([grads[2 * i].numpy(), grads[2 * i + 1].numpy()[None]], 0)
            step = -lr * np.linalg.solve(dense, grad.reshape(-1)).reshape(grad.shape)
            np.testing.assert_allclose(layer.kernel.numpy() - before[2 * i], step[:-1], rtol=1e-4, atol=1e-6)
            np.testing.assert_allclose(layer.bias.numpy() - before[2 * i + 1], step[-1], rtol=1e-4, atol=1e-6)


def test_penalty_damping_per_part_and_unmodelled_regularizers_are_logged(caplog):
    """SeparableConv2D's two Kronecker parts each take the κ̄ of their own
    variables; a regularizer other than L1 / L2 / L1L2 is named in a
    warning (so is a subclass of L2, which may compute another penalty); an
    unregularised block gets 0."""

    class ScaledL2(keras.regularizers.L2):
        def __call__(self, x):
            return 100.0 * super().__call__(x)

    model = keras.Sequential([
        keras.Input((6, 6, 2)),
        keras.layers.SeparableConv2D(3, 3, depth_multiplier=2, depthwise_regularizer=keras.regularizers.L2(0.1),
                                     pointwise_regularizer=keras.regularizers.L1L2(0.5, 0.3), name="sep"),
        keras.layers.Flatten(),
        keras.layers.Dense(4, kernel_regularizer=keras.regularizers.OrthogonalRegularizer(0.1), name="head"),
        keras.layers.Dense(3, bias_regularizer=ScaledL2(0.1), name="out"),
    ])
    opt = tkfac_tf.TKFAC(layer_collection=tkfac_tf.LayerCollection.from_model(model, loss="mse"))
    with caplog.at_level(logging.WARNING):
        opt.build(model.trainable_variables)
    depthwise, pointwise = opt.fisher_blocks["sep"].parts
    assert depthwise.penalty_damping == pytest.approx(0.2)
    assert pointwise.penalty_damping == pytest.approx(0.6 * 4 * 3 / (4 * 3 + 3))  # bias unregularised
    assert opt.fisher_blocks["sep"].penalty_damping == [depthwise.penalty_damping, pointwise.penalty_damping]
    assert opt.fisher_blocks["head"].penalty_damping == 0.0 == opt.fisher_blocks["out"].penalty_damping
    assert "not modelled" in caplog.text and "head/kernel (OrthogonalRegularizer)" in caplog.text
    assert "out/bias (ScaledL2)" in caplog.text
    assert "sep/" not in caplog.text


def test_exact_statistics_equal_analytic_expectation_over_classes():
    """G (K-FAC) under 'exact' is E_i Σ_c p_c g_c g_cᵀ; at the logits layer
    g_c = p − e_c so G = E_i[diag(p_i) − p_i p_iᵀ] analytically."""
    model, opt, x = _collect_statistics(tkfac_tf.KFAC, True)
    logits = brute_force._logits(model, x)
    p = tf.nn.softmax(logits).numpy()
    analytic = np.mean([np.diag(pi) - np.outer(pi, pi) for pi in p], axis=0)
    block = opt.fisher_blocks[model.layers[-1].name]
    np.testing.assert_allclose(block.cov_g.numpy(), analytic, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("opt_class", [tkfac_tf.TKFAC, tkfac_tf.KFAC])
def test_sampled_statistics_converge_to_exact(opt_class):
    """'gradients' mode with many samples of the same inputs → 'exact' mode."""
    model, collection = _classifier()
    x = np.tile(_inputs(4), (2000, 1))
    results = {}
    for mode in ("exact", "gradients"):
        opt = opt_class(
            learning_rate=0.1, damping=0.05, layer_collection=collection,
            estimation_mode=mode, seed=7,
        )
        opt.build(model.trainable_variables)

        @tf.function
        def stats_step(x):
            model(x, training=True)
            opt.cov_update_op()

        stats_step(x)
        results[mode] = {
            name: [v.numpy() for v in block.factor_variables]
            for name, block in opt.fisher_blocks.items()
        }
    for name, exact in results["exact"].items():
        for exact_factor, sampled_factor in zip(exact, results["gradients"][name]):
            scale = np.abs(exact_factor).max()
            np.testing.assert_allclose(sampled_factor, exact_factor, atol=0.05 * scale)


def test_empirical_mode_uses_the_training_labels():
    """'empirical': g_i = ∂(−log p_{y_i}(x_i))/∂s_i, the labels' own gradients."""
    model, collection = _classifier()
    opt = tkfac_tf.KFAC(
        learning_rate=0.1, damping=0.05, layer_collection=collection,
        estimation_mode="empirical", momentum=0.0,
    )
    model.compile(optimizer=opt, loss="sparse_categorical_crossentropy")
    x = _inputs()
    y = np.array([2, 1, 0, 0, 1, 2])
    samples = brute_force.exact_categorical_samples(model, x)
    model.fit(x, y, batch_size=N, epochs=1, verbose=0, shuffle=False)
    # One-hot weights select each example's own label.
    for layer, (a, gs, _) in zip(model.layers, samples):
        weights = np.eye(CLASSES)[y].T
        cov_a, cov_g = brute_force.kfac_reference(a, gs, weights, N)
        block = opt.fisher_blocks[layer.name]
        np.testing.assert_allclose(block.cov_g.numpy(), cov_g, rtol=1e-4, atol=1e-8)


def test_empirical_counts_every_loss_term_of_a_sequence_output():
    """Dense on [N, T, d] with T identical positions: every (example, position)
    is a sample, so δ(T) = T·δ(1) in 'exact' and in 'empirical' mode alike."""
    deltas = {}
    for mode in ("exact", "empirical"):
        for steps in (1, 4):
            keras.utils.set_random_seed(0)
            model = keras.Sequential([keras.Input((steps, D_IN)), keras.layers.Dense(CLASSES)])
            collection = tkfac_tf.LayerCollection()
            collection.register_dense(model.layers[0])
            collection.register_categorical_predictive_distribution(model.layers[0])
            opt = tkfac_tf.TKFAC(layer_collection=collection, estimation_mode=mode, learning_rate=0.01)
            model.compile(optimizer=opt, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
            x = np.repeat(_inputs()[:, None, :], steps, axis=1)
            y = np.repeat(np.arange(N)[:, None] % CLASSES, steps, axis=1)
            model.fit(x, y, batch_size=N, verbose=0)
            deltas[mode, steps] = float(opt.fisher_blocks[model.layers[0].name].delta.numpy())
    for mode in ("exact", "empirical"):
        np.testing.assert_allclose(deltas[mode, 4], 4 * deltas[mode, 1], rtol=1e-5)


def _seed_tkfac_reference(weights, x, y, steps, lr, damping, momentum, decay, separate=False):
    """The seed's TKFAC update for a tanh MLP with a softmax output, written
    in NumPy from the paper's definitions (empirical Fisher): per step
    δ, Φ, Ψ of the batch; EMA (decay ε, first update initialises) of the
    damped forms Φ̂ = √δ Φ + √λ I, Ψ̂ = √δ Ψ + √λ I; ζ = −α Φ̂⁻¹ ∇Θ Ψ̂⁻¹;
    m ← τ m + ζ; θ ← θ + m. ``weights`` = [W1, b1, W2, b2]; returns them.
    ``separate=True``: the library's former rule (EMA of δ, Φ, Ψ each, √δ̄ Φ̄
    at inversion), to show the test tells the two apart."""
    thetas = [np.concatenate([w, b[None]], 0).astype(np.float64)
              for w, b in (weights[:2], weights[2:])]
    n = len(x)
    ema = [None, None]
    moms = [np.zeros_like(t) for t in thetas]
    onehot = np.eye(thetas[1].shape[1])[y]
    for _ in range(steps):
        a1 = np.concatenate([x, np.ones((n, 1))], 1)
        h = np.tanh(a1 @ thetas[0])
        a2 = np.concatenate([h, np.ones((n, 1))], 1)
        z = a2 @ thetas[1]
        p = np.exp(z - z.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        g2 = p - onehot                                 # N ∂L/∂z_i
        g1 = (g2 @ thetas[1][:-1].T) * (1 - h**2)       # N ∂L/∂s1_i
        for l, (a, g) in enumerate(((a1, g1), (a2, g2))):
            a_sq, g_sq = (a**2).sum(1), (g**2).sum(1)
            delta = (a_sq * g_sq).sum() / n
            phi = (a * g_sq[:, None]).T @ a / (n * delta)
            psi = (g * a_sq[:, None]).T @ g / (n * delta)
            if separate:
                stats = (delta, phi, psi)
            else:
                stats = (np.sqrt(delta) * phi + np.sqrt(damping) * np.eye(len(phi)),
                         np.sqrt(delta) * psi + np.sqrt(damping) * np.eye(len(psi)))
            ema[l] = stats if ema[l] is None else tuple(
                decay * old + (1 - decay) * new for old, new in zip(ema[l], stats))
            left, right = ema[l][-2:]
            if separate:
                left = np.sqrt(ema[l][0]) * ema[l][1] + np.sqrt(damping) * np.eye(len(phi))
                right = np.sqrt(ema[l][0]) * ema[l][2] + np.sqrt(damping) * np.eye(len(psi))
            grad = a.T @ g / n
            zeta = -lr * np.linalg.solve(left, grad) @ np.linalg.inv(right)
            moms[l] = momentum * moms[l] + zeta
        thetas = [t + m for t, m in zip(thetas, moms)]
    return [thetas[0][:-1], thetas[0][-1], thetas[1][:-1], thetas[1][-1]]


def test_tkfac_running_averages_follow_the_seed_over_three_steps():
    """Three fit steps with ε = 0.95 < 1 (the averages mix batches) equal the
    seed's update computed in NumPy."""
    rng = np.random.RandomState(3)
    x = rng.randn(16, 6).astype(np.float32)
    y = rng.randint(0, 4, size=16)
    model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(5, activation="tanh"),
                              keras.layers.Dense(4)])
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    initial = [v.numpy() for v in model.weights]
    opt = tkfac_tf.TKFAC(learning_rate=0.2, damping=1e-2, momentum=0.5, cov_ema_decay=0.95,
                         cov_update_every=1, inv_update_every=1, estimation_mode="empirical",
                         layer_collection=tkfac_tf.LayerCollection.from_model(model, loss=loss))
    model.compile(optimizer=opt, loss=loss)
    model.fit(x, y, batch_size=16, epochs=3, shuffle=False, verbose=0)
    expected = _seed_tkfac_reference(initial, x.astype(np.float64), y, steps=3, lr=0.2,
                                     damping=1e-2, momentum=0.5, decay=0.95)
    for variable, want in zip(model.weights, expected):
        np.testing.assert_allclose(variable.numpy(), want, rtol=1e-5, atol=1e-6)
    # The two averaging rules differ by far more than the tolerance here.
    separate = _seed_tkfac_reference(initial, x.astype(np.float64), y, steps=3, lr=0.2,
                                     damping=1e-2, momentum=0.5, decay=0.95, separate=True)
    gaps = [np.max(np.abs(s - e) / (np.abs(e) + 1e-6)) for s, e in zip(separate, expected)]
    assert max(gaps) > 1e-3


@pytest.mark.parametrize("opt_class", [tkfac_tf.TKFAC, tkfac_tf.KFAC])
def test_bfloat16_products_stay_within_bfloat16_rounding(opt_class):
    """matmul_dtype='bfloat16': factors and the preconditioned step agree with
    the float64 references to bfloat16's precision (2⁻⁸ per rounding, a few
    roundings deep), and are not the float32 results (the option acts)."""
    damping = 0.05
    model, opt, x = _collect_statistics(opt_class, True, damping=damping, matmul_dtype="bfloat16")
    assert opt.get_config()["matmul_dtype"] == "bfloat16"
    samples = brute_force.exact_categorical_samples(model, x)
    rng = np.random.RandomState(3)
    differs = False
    for layer, (a, gs, weights) in zip(model.layers, samples):
        block = opt.fisher_blocks[layer.name]
        if opt_class is tkfac_tf.TKFAC:
            refs = brute_force.tkfac_reference(a, gs, weights, N)
            factors = [np.sqrt(refs[0]) * refs[1], np.sqrt(refs[0]) * refs[2]]
        else:
            refs = brute_force.kfac_reference(a, gs, weights, N)
            factors = list(refs)
        for got, want in zip(block.kronecker_factors(), factors):
            scale = np.abs(want).max()
            np.testing.assert_allclose(got.numpy(), want, atol=3e-2 * scale)
            differs |= not np.allclose(got.numpy(), want, rtol=1e-6, atol=1e-6 * scale)
        dense = _dense_damped_matrix(opt, refs, damping).astype(np.float64)
        grad = rng.randn(a.shape[1], gs.shape[-1]).astype(np.float32)
        expected = np.linalg.solve(dense, grad.reshape(-1).astype(np.float64))
        got = block.multiply_inverse(tf.constant(grad)).numpy().reshape(-1)
        assert np.linalg.norm(got - expected) <= 3e-2 * np.linalg.norm(expected)
    assert differs


def test_damping_split_is_validated_and_saved():
    model, collection = _classifier()
    with pytest.raises(ValueError, match="damping_split must be None or one of"):
        tkfac_tf.TKFAC(layer_collection=collection, damping_split="half")
    opt = tkfac_tf.TKFAC(layer_collection=collection, damping_split="pi")
    assert tkfac_tf.TKFAC.from_config(opt.get_config()).get_config()["damping_split"] == "pi"


def test_matmul_dtype_is_validated():
    _, collection = _classifier()
    with pytest.raises(ValueError, match="matmul_dtype"):
        tkfac_tf.TKFAC(layer_collection=collection, matmul_dtype="float16")
