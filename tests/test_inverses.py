"""fisher_factors.damped_inverse: every method against a float64 NumPy inverse,
the Newton–Schulz acceptance check and its Cholesky fallback, batched
(grouped) factors, eager == tf.function == XLA, and the optimizer option."""

import numpy as np
import pytest
import tensorflow as tf

import tkfac_tf
from tkfac_tf import fisher_factors

SHIFT = 0.05


def _factor(d, seed, samples=40):
    """PSD aᵀa / n with correlated columns, rank ≤ samples (like a real factor)."""
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(samples, d)) @ rng.normal(size=(d, d)) / np.sqrt(d)
    return (a.T @ a / samples).astype(np.float32)


def _inverse64(matrix, shift):
    return np.linalg.inv(matrix.astype(np.float64) + shift * np.eye(matrix.shape[-1]))


def _relative_error(value, exact):
    return np.linalg.norm(value - exact) / np.linalg.norm(exact)


# float32 round-off: Cholesky / eigh give ‖X − D⁻¹‖ / ‖D⁻¹‖ ≈ κ(D)·ε with
# κ ≈ 1e2 here (eigenvalues in [0.05, ~5]), i.e. ~1e-5; 1e-4 leaves a margin.
TOLERANCE = 1e-4


@pytest.mark.parametrize("method", ["cholesky", "eigh", "newton_schulz"])
def test_methods_match_the_dense_inverse(method):
    matrix = _factor(12, 0)
    exact = _inverse64(matrix, SHIFT)
    # A warm start 2% off: ‖S_0‖_F ≈ 0.02·√12 ≈ 0.07, bound 0.07⁴ ≈ 2e-5 ≤ 1e-3.
    previous = (exact * 0.98).astype(np.float32)
    value = fisher_factors.damped_inverse(matrix, SHIFT, method=method, previous=previous)
    assert _relative_error(value.numpy(), exact) < TOLERANCE
    np.testing.assert_array_equal(value.numpy(), value.numpy().T)  # symmetrized


def test_blocked_triangular_inverse_and_cholesky_inverse_beyond_one_leaf():
    """Sizes that recurse (odd halves twice, a batch of groups): L⁻¹ and
    L⁻ᵀL⁻¹ against NumPy's float64 inverse of the same L, eagerly, in a graph
    and under XLA, L⁻ᵀL⁻¹ exactly symmetric off the diagonal blocks it
    assembles; D⁻¹ = L⁻ᵀL⁻¹ against the dense inverse; a shape known only at
    run time takes cholesky_solve, same result."""
    leaf = fisher_factors.INVERSE_LEAF
    blocked = fisher_factors.lower_inverse_and_gram
    for shape in ((4 * leaf + 7,), (2, leaf + 3)):
        d = shape[-1]
        matrices = np.stack([_factor(d, seed, samples=2 * d) for seed in range(int(np.prod(shape[:-1])))])
        matrices = matrices.reshape(shape[:-1] + (d, d))
        lower = tf.linalg.cholesky(matrices + SHIFT * np.eye(d, dtype=np.float32))
        exact_lower_inverse = np.linalg.inv(lower.numpy().astype(np.float64))
        exact_gram = np.einsum("...ki,...kj->...ij", exact_lower_inverse, exact_lower_inverse)
        for run in (blocked, tf.function(blocked), tf.function(blocked, jit_compile=True)):
            lower_inverse, gram = (value.numpy() for value in run(lower))
            assert _relative_error(lower_inverse, exact_lower_inverse) < 1e-5
            np.testing.assert_array_equal(np.triu(lower_inverse.reshape(-1, d, d)[0], 1), 0.0)
            assert _relative_error(gram, exact_gram) < 1e-5
            half = d // 2
            np.testing.assert_array_equal(gram[..., :half, half:], np.swapaxes(gram[..., half:, :half], -1, -2))
        assert blocked(lower, with_inverse=False)[0] is None
        value = fisher_factors.damped_inverse(matrices, SHIFT).numpy()
        assert _relative_error(value, _inverse64(matrices, SHIFT)) < TOLERANCE
    xla = tf.function(lambda m: fisher_factors.damped_inverse(m, SHIFT), jit_compile=True)(matrices).numpy()
    assert _relative_error(xla, value) < 1e-5
    unknown_shape = tf.function(lambda m: fisher_factors.damped_inverse(m, SHIFT),
                                input_signature=[tf.TensorSpec([None, None], tf.float32)])
    assert _relative_error(unknown_shape(matrices[0]).numpy(), value[0]) < TOLERANCE


def test_newton_schulz_takes_its_steps_from_the_warm_start():
    """One step from X_0 = 0.995·D⁻¹: the residual S_0 = 0.005·I becomes
    S_1 = 2.5e-5·I, so X_1 = (1 − 2.5e-5)·D⁻¹, measurably off the exact
    inverse (a Cholesky result is ~1e-6 off) and equal to that step."""
    matrix = _factor(10, 1)
    exact = _inverse64(matrix, SHIFT)
    previous = 0.995 * exact
    bound = fisher_factors.newton_schulz_bound(
        np.eye(10) - (matrix + SHIFT * np.eye(10)) @ previous, 1
    )
    assert float(bound) == pytest.approx(0.005**2 * 10, rel=1e-3)  # ‖S_0‖_F² ≤ 1e-3: accepted
    value = fisher_factors.damped_inverse(
        matrix, SHIFT, method="newton_schulz", previous=previous.astype(np.float32), iterations=1
    ).numpy()
    assert _relative_error(value, (1 - 2.5e-5) * exact) < 3e-6
    assert _relative_error(value, exact) == pytest.approx(2.5e-5, rel=0.15)


def test_newton_schulz_falls_back_to_cholesky_on_a_poor_warm_start():
    matrix = _factor(10, 2)
    for previous in (np.eye(10), np.full((10, 10), np.nan)):  # first inversion; garbage
        value = fisher_factors.damped_inverse(
            matrix, SHIFT, method="newton_schulz", previous=previous.astype(np.float32)
        )
        expected = fisher_factors.damped_inverse(matrix, SHIFT, method="cholesky")
        np.testing.assert_array_equal(value.numpy(), expected.numpy())
    with pytest.raises(ValueError, match="needs the previous inverse"):
        fisher_factors.damped_inverse(matrix, SHIFT, method="newton_schulz")
    with pytest.raises(ValueError, match="inverse method must be one of"):
        fisher_factors.damped_inverse(matrix, SHIFT, method="lu")


@pytest.mark.parametrize("method", ["cholesky", "eigh", "newton_schulz"])
def test_batched_factors_with_one_shift_per_group(method):
    matrices = np.stack([_factor(6, s) for s in range(3)])
    shifts = np.array([0.05, 0.2, 1.0], np.float32)
    exact = np.stack([_inverse64(m, s) for m, s in zip(matrices, shifts)])
    previous = (exact * 0.99).astype(np.float32)
    value = fisher_factors.damped_inverse(matrices, shifts, method=method, previous=previous)
    for got, want in zip(value.numpy(), exact):
        assert _relative_error(got, want) < TOLERANCE
    # One group with a poor warm start sends the whole batch to Cholesky.
    previous[1] = np.eye(6)
    value = fisher_factors.damped_inverse(matrices, shifts, method=method, previous=previous)
    for got, want in zip(value.numpy(), exact):
        assert _relative_error(got, want) < TOLERANCE


@pytest.mark.parametrize("method", ["cholesky", "eigh", "newton_schulz"])
def test_eager_graph_and_xla_agree(method):
    matrix = tf.constant(_factor(8, 3))
    exact = _inverse64(matrix.numpy(), SHIFT)
    previous = tf.constant((exact * 0.98).astype(np.float32))

    def invert(m, p):
        return fisher_factors.damped_inverse(m, SHIFT, method=method, previous=p)

    eager = invert(matrix, previous).numpy()
    graph = tf.function(invert)(matrix, previous).numpy()
    xla = tf.function(invert, jit_compile=True)(matrix, previous).numpy()
    # Each mode's own float32 round-off, ≈ κ(D)·ε (TOLERANCE); elementwise
    # bounds would not follow from it (small entries cancel).
    assert _relative_error(graph, eager) < TOLERANCE
    assert _relative_error(xla, eager) < TOLERANCE
    assert _relative_error(xla, exact) < TOLERANCE


def test_failed_cholesky_falls_back_to_eigh_or_under_xla_to_the_previous_inverse():
    """Indefinite input (eigenvalues 3, −1): eagerly and in graphs the
    eigen-inverse with the −1 clamped at 0, XLA the previous inverse instead
    of compiling an eigendecomposition; per matrix of a batch."""
    indefinite = np.array([[1.0, 2.0], [2.0, 1.0]], np.float32)
    good = np.array([[2.0, 0.0], [0.0, 1.0]], np.float32)
    matrices = np.stack([indefinite, good])
    previous = np.stack([np.eye(2), 3 * np.eye(2)]).astype(np.float32)
    shift = 1e-3
    vectors = np.array([[1.0, 1.0], [1.0, -1.0]]) / np.sqrt(2.0)
    clamped = vectors @ np.diag([1 / (3 + shift), 1 / shift]) @ vectors.T
    good_inverse = np.diag([1 / (2 + shift), 1 / (1 + shift)])
    seen = []

    def invert(m, p):
        seen.append(fisher_factors.in_xla_context())
        return fisher_factors.damped_inverse(m, shift, previous=p)

    for fn in (invert, tf.function(invert)):
        value = fn(matrices, previous).numpy()
        np.testing.assert_allclose(value[0], clamped, rtol=1e-4)
        # Per matrix: the good one keeps its Cholesky inverse.
        np.testing.assert_allclose(value[1], good_inverse, rtol=1e-5)
    value = tf.function(invert, jit_compile=True)(matrices, previous).numpy()
    np.testing.assert_array_equal(value[0], previous[0])
    np.testing.assert_allclose(value[1], good_inverse, rtol=1e-5)
    assert seen == [False, False, True]


def test_shared_fallback_gives_each_inverse_its_own_fallback():
    """Inverses computed under one shared conditional equal those of one
    conditional each: the indefinite matrix gets its eigen-inverse, the
    positive definite ones keep their Cholesky inverse, bit for bit."""
    indefinite = np.array([[1.0, 2.0], [2.0, 1.0]], np.float32)
    good = np.array([[2.0, 0.5], [0.5, 1.0]], np.float32)
    shift = 1e-3

    def separate(*matrices):
        return [fisher_factors.damped_inverse(m, shift) for m in matrices]

    def shared(*matrices):
        with fisher_factors.shared_fallback() as fallbacks:
            values = [fisher_factors.damped_inverse(m, shift) for m in matrices]
        return fallbacks.resolve(values)

    vectors = np.array([[1.0, 1.0], [1.0, -1.0]]) / np.sqrt(2.0)
    clamped = vectors @ np.diag([1 / (3 + shift), 1 / shift]) @ vectors.T  # eigenvalues 3, −1 → 3, 0
    for matrices in ((good, indefinite, 3 * good), (good, 3 * good)):
        for wrap in (lambda f: f, tf.function):
            want = [v.numpy() for v in wrap(separate)(*matrices)]
            got = [v.numpy() for v in wrap(shared)(*matrices)]
            for a, b in zip(got, want):
                np.testing.assert_array_equal(a, b)
            for m, value in zip(matrices, got):
                expected = clamped if m is indefinite else np.linalg.inv(m.astype(np.float64) + shift * np.eye(2))
                np.testing.assert_allclose(value, expected, rtol=1e-4)
    with pytest.raises(RuntimeError, match="transformed"):
        with fisher_factors.shared_fallback() as fallbacks:
            value = fisher_factors.damped_inverse(good, shift)
        fallbacks.resolve([2.0 * value])


@pytest.mark.parametrize("method", ["cholesky", "eigh"])
def test_batched_inverses_equal_one_inversion_per_factor(method):
    """Factors of several sizes, single and grouped, one indefinite: the
    inverses requested inside batched_inverses (stacked per size) are those
    of one damped_inverse each, every positive definite one the float64
    inverse, eagerly, in a graph and (Cholesky: per matrix, the previous
    inverse where it fails) under XLA."""
    indefinite = np.array([[1.0, 2.0, 0.0], [2.0, 1.0, 0.0], [0.0, 0.0, 1.0]], np.float32)
    requests = [  # (matrix, shift, previous)
        (_factor(3, 1), 0.05, np.eye(3)),
        (_factor(5, 2), 0.2, np.eye(5)),
        (np.stack([_factor(3, 3), indefinite]), np.array([0.1, 0.01]), np.stack([np.eye(3), 2 * np.eye(3)])),
        (_factor(3, 4), 0.3, np.eye(3)),
        (np.stack([_factor(5, 5), _factor(5, 6)]), 0.05, np.stack([np.eye(5)] * 2)),
    ]
    requests = [(np.float32(m), np.float32(s), np.float32(p)) for m, s, p in requests]

    def separate(*flat):
        return [fisher_factors.damped_inverse(m, s, method=method, previous=p)
                for m, s, p in zip(flat[0::3], flat[1::3], flat[2::3])]

    def batched(*flat):
        with fisher_factors.batched_inverses() as batch:
            values = [fisher_factors.requested_inverse(m, s, method=method, previous=p)
                      for m, s, p in zip(flat[0::3], flat[1::3], flat[2::3])]
            assert all(isinstance(v, fisher_factors.PendingInverse) for v in values)
            return batch.resolve(["untouched", *values])[1:]

    flat = [t for request in requests for t in request]
    for wrap in (lambda f: f, tf.function):
        want = [v.numpy() for v in wrap(separate)(*flat)]
        got = [v.numpy() for v in wrap(batched)(*flat)]
        for (matrix, shift, _), a, b in zip(requests, got, want):
            assert a.shape == matrix.shape
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
            for m, s, value in zip(matrix.reshape(-1, *matrix.shape[-2:]),
                                   np.broadcast_to(shift, matrix.shape[:-2]).reshape(-1),
                                   a.reshape(-1, *matrix.shape[-2:])):
                if not np.array_equal(m, indefinite):
                    assert _relative_error(value, _inverse64(m, s)) < TOLERANCE
    if method == "cholesky":
        xla = [v.numpy() for v in tf.function(batched, jit_compile=True)(*flat)]
        np.testing.assert_array_equal(xla[2][1], 2 * np.eye(3, dtype=np.float32))  # kept
        assert _relative_error(xla[2][0], _inverse64(requests[2][0][0], 0.1)) < TOLERANCE
        assert _relative_error(xla[4][1], _inverse64(requests[4][0][1], 0.05)) < TOLERANCE
    # Outside batched_inverses and for newton_schulz the inverse is computed at once.
    assert isinstance(fisher_factors.requested_inverse(requests[0][0], 0.1), tf.Tensor)
    with fisher_factors.batched_inverses():
        assert isinstance(fisher_factors.requested_inverse(
            requests[0][0], 0.1, method="newton_schulz", previous=requests[0][2]), tf.Tensor)


def test_padded_inversion_sizes_give_each_factor_its_own_inverse():
    """inversion_sizes: the small factors at the largest small size, d beside
    d + 1 at d + 1, chains and the rest unpadded; the zero-padded batched
    inverses (one grouped, past one triangular leaf) are each factor's own
    float64 inverse, with its own shape."""
    assert fisher_factors.inversion_sizes([7, 20, 150, 151, 152, 300, 301, 64]) == {
        7: 20, 20: 20, 64: 64, 150: 150, 151: 152, 152: 152, 300: 301, 301: 301}
    requests = [(_factor(7, 1), 0.05), (_factor(20, 2), 0.2),
                (np.stack([_factor(150, 3), _factor(150, 4)]), np.float32([0.1, 0.3])),
                (_factor(151, 5), 0.05), (_factor(152, 6), 0.01)]
    with fisher_factors.batched_inverses() as batch:
        values = batch.resolve([fisher_factors.requested_inverse(m, s) for m, s in requests])
    for (matrix, shift), value in zip(requests, values):
        assert value.shape == matrix.shape
        for m, s, v in zip(matrix.reshape(-1, *matrix.shape[-2:]),
                           np.broadcast_to(shift, matrix.shape[:-2]).reshape(-1),
                           value.numpy().reshape(-1, *matrix.shape[-2:])):
            assert _relative_error(v, _inverse64(m, s)) < TOLERANCE


def _moments(d, p, seed):
    """[d, p, p] per-feature second moments E[v vᵀ] of 8 samples (PSD)."""
    v = np.random.default_rng(seed).normal(size=(d, 8, p))
    return np.einsum("dnp,dnq->dpq", v, v).astype(np.float32) / 8


def test_closed_form_inverses_batched_match_the_dense_inverse():
    """closed_form_inverse (1×1 and 2×2 per feature, scalar or per-feature
    shifts) is the float64 inverse of M + sI; requested inside
    batched_inverses, several blocks' matrices are inverted together with the
    same values, eagerly and in a graph, and a cholesky request beside them
    is unaffected."""
    requests = [  # (matrix, shift)
        (_moments(3, 2, 1), np.float32(0.05)),
        (_moments(5, 2, 2), np.linspace(0.01, 0.5, 5).astype(np.float32)),
        (_moments(4, 1, 3), np.float32(0.2)),
        (_moments(2, 1, 4), np.array([0.1, 0.3], np.float32)),
        (_moments(4, 2, 5), np.float32(1e-3)),
    ]
    for matrix, shift in requests:
        value = fisher_factors.closed_form_inverse(matrix, shift).numpy()
        shifts = np.broadcast_to(shift, matrix.shape[:1])
        for m, s, v in zip(matrix, shifts, value):
            assert _relative_error(v, _inverse64(m, s)) < 1e-5

    def batched(*flat):
        with fisher_factors.batched_inverses() as batch:
            values = [fisher_factors.requested_inverse(m, s, method=fisher_factors.CLOSED_FORM)
                      for m, s in zip(flat[0::2], flat[1::2])]
            values.append(fisher_factors.requested_inverse(_factor(3, 6), SHIFT))
            assert all(isinstance(v, fisher_factors.PendingInverse) for v in values)
            return batch.resolve(values)

    flat = [t for request in requests for t in request]
    for wrap in (lambda f: f, tf.function):
        got = [v.numpy() for v in wrap(batched)(*flat)]
        for (matrix, shift), value in zip(requests, got):
            np.testing.assert_allclose(value, fisher_factors.closed_form_inverse(matrix, shift).numpy(),
                                       rtol=1e-6)
        assert _relative_error(got[-1], _inverse64(_factor(3, 6), SHIFT)) < TOLERANCE
    with pytest.raises(ValueError, match="1×1 or 2×2"):
        fisher_factors.closed_form_inverse(np.eye(3, dtype=np.float32), 0.1)


def _assert_inverses_of_damped_factors(opt, tolerance):
    """Every Kronecker block's two inverses against the float64 inverse of
    its own factor damped with the optimizer's λ (relative error)."""
    for block in opt.fisher_blocks.values():
        left, right = block.kronecker_factors()
        left_shift, right_shift = block._shifts(tf.linalg.trace(left), tf.linalg.trace(right), opt.damping)
        for factor, shift, inverse in ((left, left_shift, block.left_inverse),
                                       (right, right_shift, block.right_inverse)):
            exact = _inverse64(factor.numpy(), float(shift))
            assert _relative_error(inverse.numpy(), exact) < tolerance, block.name


def test_optimizer_inverses_of_equal_sized_factors_match_the_dense_inverse():
    """Three hidden layers of equal shapes (their factors inverted as one
    batch): after training, every block inverse is the float64 inverse of its
    own damped factor."""
    rng = np.random.default_rng(1)
    x = rng.normal(size=(64, 6)).astype(np.float32)
    y = (x @ rng.normal(size=(6, 3))).astype(np.float32)
    model = tf.keras.Sequential([tf.keras.Input((6,))] + [
        tf.keras.layers.Dense(6, activation="tanh", name=f"hidden{i}") for i in range(3)
    ] + [tf.keras.layers.Dense(3, name="out")])
    collection = tkfac_tf.LayerCollection.from_model(model, loss=tf.keras.losses.MeanSquaredError())
    opt = tkfac_tf.TKFAC(learning_rate=0.01, damping=0.1, layer_collection=collection,
                         inv_update_every=1, seed=0)
    model.compile(optimizer=opt, loss="mse")
    model.fit(x, y, batch_size=16, epochs=1, verbose=0)
    _assert_inverses_of_damped_factors(opt, TOLERANCE)


def test_optimizer_inverses_with_newton_schulz_match_the_dense_inverse():
    """A tiny model trained with inverse_method='newton_schulz': after steps
    whose warm start is accepted, every block inverse still equals the float64
    inverse of its damped factor."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 5)).astype(np.float32)
    y = (x @ rng.normal(size=(5, 3))).astype(np.float32)
    model = tf.keras.Sequential([tf.keras.Input((5,)), tf.keras.layers.Dense(4, activation="tanh",
                                 name="hidden"), tf.keras.layers.Dense(3, name="out")])
    collection = tkfac_tf.LayerCollection.from_model(model, loss=tf.keras.losses.MeanSquaredError())
    opt = tkfac_tf.TKFAC(learning_rate=0.01, damping=0.1, layer_collection=collection,
                         inv_update_every=1, cov_ema_decay=0.99, inverse_method="newton_schulz", seed=0)
    model.compile(optimizer=opt, loss="mse")
    model.fit(x, y, batch_size=16, epochs=1, verbose=0)
    _assert_inverses_of_damped_factors(opt, 1e-3)  # Newton–Schulz's acceptance tolerance


@pytest.mark.parametrize("method", ["eigenbasis", "cholesky"])
def test_eigenbasis_preconditions_with_a_damping_set_after_the_inverse_update(method):
    """A tiny model inverted at step 0 only (inv_update_every=100), trained
    three more steps (the averages move on), then ``opt.damping`` raised
    from 0.01 to 0.5: with 'eigenbasis' the next preconditioned gradient is
    the float64 solve (L₀ + √λ I)⁻¹ ∇ (R₀ + √λ I)⁻¹ at the new λ with the
    factors L₀, R₀ of step 0; Cholesky still applies its step-0 inverses."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 5)).astype(np.float32)
    y = (x @ rng.normal(size=(5, 3))).astype(np.float32)
    tf.keras.utils.set_random_seed(0)
    model = tf.keras.Sequential([tf.keras.Input((5,)), tf.keras.layers.Dense(4, activation="tanh"),
                                 tf.keras.layers.Dense(3)])
    opt = tkfac_tf.TKFAC(learning_rate=0.01, damping=0.01, inv_update_every=100, seed=0,
                         inverse_method=method)
    model.compile(optimizer=opt, loss="mse")
    model.fit(x[:16], y[:16], batch_size=16, verbose=0)
    snapshot = {name: [f.numpy() for f in block.kronecker_factors()]
                for name, block in opt.fisher_blocks.items()}
    model.fit(x[16:], y[16:], batch_size=16, shuffle=False, verbose=0)
    moved = max(np.abs(opt.fisher_blocks[name].kronecker_factors()[0].numpy() - left).max()
                for name, (left, _) in snapshot.items())
    assert moved > 1e-3  # the averages did change after the snapshot

    opt.damping = 0.5
    with tf.GradientTape() as tape:
        loss = tf.reduce_mean(tf.square(model(x, training=False) - y))
    variables = model.trainable_variables
    grads = tape.gradient(loss, variables)
    key = tkfac_tf.keras_compat.variable_key(opt)
    got = {key(v): d for v, d in zip(variables, opt.estimator.precondition(grads, variables, key, opt.damping))}
    grad_of = {key(v): g for v, g in zip(variables, grads)}
    for name, block in opt.fisher_blocks.items():
        keys = [key(p) for p in block.kind.parameters]
        matrix = block.kind.to_matrix([grad_of[k] for k in keys]).numpy().astype(np.float64)
        left, right = snapshot[name]
        want = _inverse64(left, np.sqrt(0.5)) @ matrix @ _inverse64(right, np.sqrt(0.5))
        have = block.kind.to_matrix([got[k] for k in keys]).numpy()
        error = _relative_error(have, want)
        if method == "eigenbasis":
            assert error < TOLERANCE, (name, error)
        else:
            assert error > 0.1, (name, error)  # the old λ = 0.01 is still in its inverses
