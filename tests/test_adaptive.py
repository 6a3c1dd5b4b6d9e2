"""Adaptive TKFAC / K-FAC against brute force: exact Gauss–Newton products
from dense Jacobians, the quadratic model's α and μ, the Levenberg–Marquardt
rule, and equal numbers in every execution mode."""

from unittest import mock

import keras
import numpy as np
import pytest
import tensorflow as tf

import tkfac_tf
from tkfac_tf import curvature
from tkfac_tf import keras_compat
from tkfac_tf import options as options_lib
from tkfac_tf import update_rules

N, D_IN, HIDDEN, CLASSES = 8, 3, 4, 3
LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def _data(seed=0):
    rng = np.random.RandomState(seed)
    return rng.randn(N, D_IN).astype(np.float32), rng.randint(0, CLASSES, size=N)


def _model(activation="tanh"):
    return keras.Sequential([
        keras.Input((D_IN,)),
        keras.layers.Dense(HIDDEN, activation=activation),
        keras.layers.Dense(CLASSES),
    ])


def _x_over_one_plus_x_squared(x):
    """An activation built from an op without a hand-written forward-mode
    rule (DivNoNan) whose second input is computed from its first."""
    return tf.math.divide_no_nan(x, 1.0 + tf.square(x))


def _manual_collection(model):
    """Both Dense layers and the categorical distribution, registered by hand
    (the collection does not know the model)."""
    collection = tkfac_tf.LayerCollection()
    for layer in model.layers:
        collection.register_dense(layer)
    collection.register_categorical_predictive_distribution(model.layers[-1])
    return collection


def _flat(parts):
    return np.concatenate([np.asarray(p, np.float64).ravel() for p in parts])


def _dense_gauss_newton(model, x):
    """G = Σ_i J_iᵀ (diag p_i − p_i p_iᵀ) J_i / N for the mean softmax
    cross-entropy, J_i = ∂logits_i/∂θ from a dense GradientTape jacobian."""
    variables = model.trainable_variables
    with tf.GradientTape() as tape:
        logits = model(x)
    jac = tape.jacobian(logits, variables)  # per variable [N, C, *shape]
    jac = np.concatenate([j.numpy().reshape(N, CLASSES, -1) for j in jac], axis=-1)
    probs = tf.nn.softmax(logits).numpy().astype(np.float64)
    gn = 0.0
    for i in range(N):
        h = np.diag(probs[i]) - np.outer(probs[i], probs[i])
        gn = gn + jac[i].T @ h @ jac[i]
    return gn / N


@pytest.mark.parametrize("activation", ["tanh", _x_over_one_plus_x_squared], ids=["tanh", "divide_no_nan"])
@pytest.mark.parametrize("mode", ["eager", "graph", "xla"])
def test_exact_gauss_newton_products_equal_dense_jacobian_products(mode, activation):
    """Eagerly one ForwardAccumulator pass per direction; in a graph (and
    under XLA) one forward-mode walk of the loss's graph for both."""
    model = _model(activation)
    x, y = _data()
    collection = tkfac_tf.LayerCollection.from_model(model, loss=LOSS)
    variables = model.trainable_variables
    rng = np.random.RandomState(1)
    vectors = [[tf.constant(rng.randn(*v.shape).astype(np.float32)) for v in variables]
               for _ in range(2)]
    probe = curvature.LossProbe(
        collection.recorder, {id(d.layer): d.tensor for d in collection.distributions},
        variables, lambda: LOSS(y, model(x, training=True)))
    values = [tf.convert_to_tensor(v) for v in variables]
    products = lambda: curvature.gauss_newton_gram(probe, values, vectors)  # noqa: E731
    if mode != "eager":
        products = tf.function(products, jit_compile=mode == "xla")
    loss, gram = products()
    gn = _dense_gauss_newton(model, x)
    flat = [_flat(v) for v in vectors]
    expected = np.array([[u @ gn @ w for w in flat] for u in flat])
    np.testing.assert_allclose(gram.numpy(), expected, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(float(loss), float(LOSS(y, model(x))), rtol=1e-6)
    # The probe changed no variable and recorded no statistics.
    assert collection.recorder.take() is None


@pytest.mark.parametrize("hidden, every", [("dense", 1), ("dropout", 1), ("lstm", 1), ("dense", 2),
                                           ("lstm", 2)])
def test_fit_takes_the_curvature_from_its_own_forward_pass(hidden, every):
    """In a traced fit step the products come from the step's forward pass
    (no re-evaluation): the same Gram matrix as the re-evaluating probe in
    the same graph (also through an LSTM's while loop, which reads its
    variables inside, and built inside the amortised curvature's
    conditional: curvature_update_every=2), and h(θ) shared with ρ only
    without random draws."""
    keras.utils.set_random_seed(4)
    dropout = hidden == "dropout"
    x, y = _data(5)
    if hidden == "lstm":
        x = x.reshape(N, 3, 1)
        layers = [keras.Input((3, 1)), keras.layers.LSTM(HIDDEN)]
    else:
        layers = [keras.Input((D_IN,)), keras.layers.Dense(HIDDEN, activation="tanh")]
    layers += [keras.layers.Dropout(0.3)] if dropout else []
    model = keras.Sequential(layers + [keras.layers.Dense(CLASSES)])
    # Without the inverse warm-up step 1 is the only step of three that is
    # not a curvature step (inverses on step 0, λ adapted after step 4).
    opt = tkfac_tf.TKFAC.adaptive(layer_collection=tkfac_tf.LayerCollection.from_model(model, loss=LOSS),
                                  curvature_update_every=every, inverse_warmup_steps=0, damping=1.0)
    model.compile(optimizer=opt, loss=LOSS)
    results, evaluated = [], []
    original = curvature.recorded_gauss_newton_gram
    original_loss = curvature.LossProbe.loss

    def spy(record, watched, variables):
        gram_fn = original(record, watched, variables)
        results.append(curvature.recorded_training_loss(record))

        def checked(vectors):
            gram = gram_fn(vectors)
            probe = curvature.LossProbe(opt.layer_collection.recorder, watched, variables,
                                        record.recorded_loss_fn())
            _, probed = curvature.gauss_newton_gram(
                probe, [tf.convert_to_tensor(v) for v in variables], vectors)
            tf.py_function(lambda a, b: results.append((a.numpy(), b.numpy())), [gram, probed], [])
            return gram

        return checked

    def loss_spy(self, values):
        evaluated.append(values)
        return original_loss(self, values)

    with mock.patch.object(curvature, "recorded_gauss_newton_gram", spy), \
            mock.patch.object(curvature.LossProbe, "loss", loss_spy):
        model.fit(x, y, batch_size=N, epochs=3, verbose=0, shuffle=False)
    assert (results[0] is None) == dropout
    # ρ evaluates h(θ + u) (and h(θ) with random draws) once per trace, nothing else.
    assert len(evaluated) == (2 if dropout else 1)
    assert int(opt.rejected_steps.numpy()) == 0  # else step 1 would be a curvature step too
    grams = results[1:]
    assert len(grams) == (3 if every == 1 else 2)  # the conditional ran the walk on steps 0 and 2
    for gram, probed in grams:
        if dropout:  # the probe drew other dropout masks
            assert np.all(np.isfinite(gram)) and gram[0, 0] > 0
        else:
            np.testing.assert_allclose(gram, probed, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("dropout", [False, True], ids=["deterministic", "dropout"])
def test_fit_takes_rhos_h_theta_from_its_own_forward_pass(dropout):
    """With the curvature on the first examples (curvature_batch_size) ρ's
    h(θ) is the whole batch's loss: in a traced fit step the step's own
    training loss, so ρ re-evaluates the loss once (at θ + u); a forward
    pass that draws random numbers is re-evaluated at both points (the
    value of ρ: test_quadratic_loss_reduction_ratio_and_damping_rule)."""
    keras.utils.set_random_seed(4)
    x, y = _data(5)
    layers = [keras.Input((D_IN,)), keras.layers.Dense(HIDDEN, activation="tanh")]
    layers += [keras.layers.Dropout(0.3)] if dropout else []
    model = keras.Sequential(layers + [keras.layers.Dense(CLASSES)])
    opt = tkfac_tf.TKFAC.adaptive(layer_collection=tkfac_tf.LayerCollection.from_model(model, loss=LOSS),
                                  curvature_batch_size=N // 2)
    model.compile(optimizer=opt, loss=LOSS)
    evaluated = []
    original = curvature.LossProbe.loss

    def spy(self, values):
        evaluated.append(values)
        return original(self, values)

    with mock.patch.object(curvature.LossProbe, "loss", spy):
        model.fit(x, y, batch_size=N, epochs=1, verbose=0, shuffle=False)
    assert len(evaluated) == (2 if dropout else 1)  # one trace of the step
    assert np.isfinite(float(opt.reduction_ratio.numpy())) and int(opt.skipped_steps.numpy()) == 0


def test_pairwise_dots_equal_numpy():
    rng = np.random.RandomState(2)
    shapes = [(3, 4), (4,), (2, 2, 3)]
    vectors = [[rng.randn(*s).astype(np.float32) for s in shapes] for _ in range(3)]
    flat = np.stack([_flat(v) for v in vectors])
    got = curvature.pairwise_dots([[tf.constant(p) for p in v] for v in vectors])
    np.testing.assert_allclose(got.numpy(), flat @ flat.T, rtol=1e-5, atol=1e-6)


def _manual_adaptive_steps(opt_class, **options):
    """A model, its batch, an adaptive optimizer with the schedule by hand
    ('exact' estimation) and two traced functions: ``statistics()`` (a
    covariance and an inverse update on the batch) and ``apply()`` (one
    adaptive step)."""
    model = _model()
    x, y = _data()
    opt = opt_class.adaptive(layer_collection=tkfac_tf.LayerCollection.from_model(model, loss=LOSS),
                             cov_update_every=None, inv_update_every=None, inverse_warmup_steps=0,
                             estimation_mode="exact", **options)
    variables = model.trainable_variables
    opt.build(variables)
    loss_fn = lambda: LOSS(y, model(x, training=True))  # noqa: E731

    @tf.function
    def statistics():
        model(x, training=True)
        opt.cov_update_op()
        opt.inv_update_op()

    @tf.function
    def apply():
        with tf.GradientTape() as tape:
            loss = loss_fn()
        opt.apply_gradients(zip(tape.gradient(loss, variables), variables), loss_fn=loss_fn)

    return model, x, y, opt, statistics, apply


def _step_vectors(model, x, y, opt):
    """Before a step: ∇ (per variable), and flat float64 Δ = −precond(∇),
    δ (the momentum: the previous update) and θ."""
    variables = model.trainable_variables
    with tf.GradientTape() as tape:
        loss = LOSS(y, model(x))
    grads = tape.gradient(loss, variables)
    delta = _flat(opt.estimator.precondition(grads, variables, keras_compat.variable_key(opt))) * -1.0
    return grads, delta, _flat([m.numpy() for m in opt.momentums]), _flat([v.numpy() for v in variables])


def _dense_model_coefficients(curvature_matrix, damping, grads, delta, previous, first):
    """(α, μ) minimising the damped 2×2 model over Δ and δ with the dense
    ``curvature_matrix`` (μ = 0 on the ``first`` step; μ outside [0, 1]
    clipped to the bound and α optimal given it)."""
    g = _flat(grads)
    a = np.array([[u @ (curvature_matrix @ w + damping * w) for w in (delta, previous)]
                  for u in (delta, previous)])
    b = np.array([g @ delta, g @ previous])
    if first:
        return -b[0] / a[0, 0], 0.0
    alpha, mu = -np.linalg.solve(a, b)
    if not 0.0 <= mu <= 1.0:
        mu = min(max(mu, 0.0), 1.0)
        alpha = -(b[0] + mu * a[0, 1]) / a[0, 0]
    return alpha, mu


@pytest.mark.parametrize("opt_class", [tkfac_tf.TKFAC, tkfac_tf.KFAC])
def test_alpha_mu_solve_the_exact_quadratic_model(opt_class):
    """Two manual steps: the update equals α Δ + μ δ with (α, μ) from the
    2×2 system of the dense Gauss–Newton matrix, Δ = −precond(∇), δ the
    previous update (μ = 0 on the first step)."""
    model, x, y, opt, statistics, apply = _manual_adaptive_steps(opt_class, damping=0.05)
    variables = model.trainable_variables
    for step in range(2):
        statistics()
        grads, delta, previous, before = _step_vectors(model, x, y, opt)
        alpha, mu = _dense_model_coefficients(_dense_gauss_newton(model, x), float(opt.damping.numpy()),
                                              grads, delta, previous, first=step == 0)
        if step == 0:
            assert not previous.any()
        else:
            assert mu > 1e-3
        apply()
        np.testing.assert_allclose(float(opt.step_learning_rate.numpy()), alpha, rtol=1e-5)
        np.testing.assert_allclose(float(opt.step_momentum.numpy()), mu, rtol=1e-5, atol=1e-8)
        after = _flat([v.numpy() for v in variables])
        np.testing.assert_allclose(after - before, alpha * delta + mu * previous, rtol=1e-4, atol=1e-7)


def _dense_preconditioner(opt, variables):
    """P, the dense matrix of d = precond(∇) over the model's variables
    (float64 [n, n], column j = precond of the j-th unit vector)."""
    shapes = [v.shape for v in variables]
    sizes = [int(np.prod(shape)) for shape in shapes]
    columns = []
    for j in range(sum(sizes)):
        unit = np.zeros(sum(sizes), np.float32)
        unit[j] = 1.0
        parts = np.split(unit, np.cumsum(sizes)[:-1])
        grads = [tf.constant(part.reshape(shape)) for part, shape in zip(parts, shapes)]
        columns.append(_flat(opt.estimator.precondition(grads, variables, keras_compat.variable_key(opt))))
    return np.stack(columns, axis=1)


def test_amortised_curvature_models_the_preconditioner_between_curvature_steps():
    """curvature_update_every=3, one inverse update by hand before step 0,
    λ adapted on step 4: steps 0 and 3 solve the 2×2 model with the dense
    Gauss–Newton G; steps 1 and 2 with c·B, B = P⁻¹ the curvature the
    (dense) preconditioner inverts and c = ΔᵀGΔ / ΔᵀBΔ of step 0 (at least 1/2); every
    update is α Δ + μ δ with Δ = −precond(∇) of its own step; on step 3
    c = max(ΔᵀGΔ / ΔᵀBΔ, c / 2)."""
    keras.utils.set_random_seed(13)  # weights whose steps 1 and 2 take 0 < μ < 1
    model, x, y, opt, statistics, apply = _manual_adaptive_steps(
        tkfac_tf.TKFAC, damping=0.2, curvature_update_every=3, damping_adaptation_interval=5)
    variables = model.trainable_variables
    statistics()
    preconditioner_curvature = np.linalg.inv(_dense_preconditioner(opt, variables))
    scale = None
    for step in range(4):
        grads, delta, previous, before = _step_vectors(model, x, y, opt)
        if step in (0, 3):
            curvature_matrix = _dense_gauss_newton(model, x)
            ratio = (delta @ curvature_matrix @ delta) / (delta @ preconditioner_curvature @ delta)
            scale = max(ratio, 0.5 * (1.0 if scale is None else scale))  # c starts at 1
        else:
            curvature_matrix = scale * preconditioner_curvature
        alpha, mu = _dense_model_coefficients(curvature_matrix, float(opt.damping.numpy()),
                                              grads, delta, previous, first=step == 0)
        apply()
        np.testing.assert_allclose(float(opt.step_learning_rate.numpy()), alpha, rtol=1e-4)
        np.testing.assert_allclose(float(opt.step_momentum.numpy()), mu, rtol=1e-4, atol=1e-7)
        np.testing.assert_allclose(float(opt._curvature_scale.numpy()), scale, rtol=1e-4)
        after = _flat([v.numpy() for v in variables])
        np.testing.assert_allclose(after - before, alpha * delta + mu * previous, rtol=1e-3, atol=1e-7)
    assert scale != pytest.approx(1.0, rel=1e-2)  # the calibration is not the identity here
    assert int(opt.skipped_steps.numpy()) == 0


def test_amortised_curvature_solves_the_model_afresh_after_a_rejected_step():
    """ρ is measured on the step after a rejection (ρ's read-out < 0); with
    curvature_update_every=3 that step (k = 1) is a curvature step too: its
    (α, μ) solve the model with the dense Gauss–Newton G, and ρ's h(θ) is
    the products' own pass (loss_fn alone: the same function), so the step
    is kept (it lowers h)."""
    keras.utils.set_random_seed(13)
    model, x, y, opt, statistics, apply = _manual_adaptive_steps(
        tkfac_tf.TKFAC, damping=0.2, curvature_update_every=3, damping_adaptation_interval=5)
    variables = model.trainable_variables
    statistics()
    apply()
    opt._reduction_ratio.assign(-1.0)  # as after a rejected step 0
    grads, delta, previous, before = _step_vectors(model, x, y, opt)
    loss_before = float(LOSS(y, model(x)))
    alpha, mu = _dense_model_coefficients(_dense_gauss_newton(model, x), float(opt.damping.numpy()),
                                          grads, delta, previous, first=False)
    apply()
    assert int(opt.rejected_steps.numpy()) == 0 and float(LOSS(y, model(x))) < loss_before
    np.testing.assert_allclose(float(opt.step_learning_rate.numpy()), alpha, rtol=1e-4)
    np.testing.assert_allclose(float(opt.step_momentum.numpy()), mu, rtol=1e-4, atol=1e-7)
    after = _flat([v.numpy() for v in variables])
    np.testing.assert_allclose(after - before, alpha * delta + mu * previous, rtol=1e-3, atol=1e-7)


def test_calibrated_curvature_and_its_momentum_term():
    exact = tf.constant([[2.0, 0.5], [0.5, 1.0]])
    dots = tf.constant([[9.0, 9.0, 4.0], [9.0, 9.0, 3.0], [4.0, 3.0, 9.0]])  # ∇ᵀd = 4, ∇ᵀδ = 3
    state = update_rules.CurvatureCalibration(0.75, 5.0)
    gram, new = update_rules.calibrated_curvature(tf.constant(True), exact, dots, state)
    np.testing.assert_array_equal(gram.numpy(), exact.numpy())
    assert (float(new.scale), float(new.momentum_curvature)) == (0.5, 2.0)  # c = 2 / 4, q = 1 / c
    gram, new = update_rules.calibrated_curvature(tf.constant(False), exact, dots, state)
    np.testing.assert_array_equal(gram.numpy(), 0.75 * np.array([[4.0, 3.0], [3.0, 5.0]]))
    assert (float(new.scale), float(new.momentum_curvature)) == (0.75, 5.0)
    # A large c decays by half per curvature step, not at once.
    _, new = update_rules.calibrated_curvature(tf.constant(True), exact, dots, state._replace(scale=7.0))
    assert float(new.scale) == 3.5 and float(new.momentum_curvature) == pytest.approx(1.0 / 3.5, rel=1e-6)
    for unusable in (0.0, -1.0, float("nan")):
        broken = tf.tensor_scatter_nd_update(exact, [[0, 0]], [unusable])
        _, new = update_rules.calibrated_curvature(tf.constant(True), broken, dots, state)
        assert float(new.scale) == 0.75, unusable
    # u = μδ − αd: uᵀBu = μ²q − 2μα∇ᵀδ + α²∇ᵀd
    q = update_rules.next_momentum_curvature(update_rules.Coefficients(2.0, 0.5), dots, 5.0)
    assert float(q) == 0.25 * 5.0 - 2.0 * 0.5 * 2.0 * 3.0 + 4.0 * 4.0


def test_amortised_curvature_gives_the_same_steps_in_every_mode():
    """fit with curvature_update_every=3 (λ adapted after step 2, inverses
    on step 0): step 0 solves the model, steps 1 and 2 reuse it, in graph,
    eager and XLA alike."""
    options = dict(curvature_update_every=3, damping_adaptation_interval=4, inverse_warmup_steps=0)
    reference, opt = _fit_weights("graph", steps=STEPS, **options)
    assert int(opt.skipped_steps.numpy()) == 0
    every_step, _ = _fit_weights("graph", steps=STEPS, damping_adaptation_interval=4, inverse_warmup_steps=0)
    assert _max_relative_difference(every_step, reference) > 1e-3  # the option changes the steps
    for mode in ("eager", "xla"):
        weights, _ = _fit_weights(mode, steps=STEPS, **options)
        _assert_same_steps(weights, reference, err_msg=mode)


def test_approximate_curvature_products_use_the_blocks():
    model = _model()
    x, y = _data()
    opt = tkfac_tf.TKFAC.adaptive(layer_collection=tkfac_tf.LayerCollection.from_model(model, loss=LOSS),
                                  curvature="approximate", estimation_mode="exact")
    variables = model.trainable_variables
    opt.build(variables)
    model(x, training=True)
    opt.cov_update_op()
    rng = np.random.RandomState(2)
    vectors = [[tf.constant(rng.randn(*v.shape).astype(np.float32)) for v in variables]
               for _ in range(2)]
    gram = opt.estimator.approximate_curvature_products(vectors, variables, keras_compat.variable_key(opt))
    # Dense F̂: block-diagonal of each layer's full_fisher() over Θ = [W; b].
    blocks = [opt.fisher_blocks[layer.name].full_fisher().numpy() for layer in model.layers]
    flat = [[np.concatenate([np.asarray(v[2 * l]), np.asarray(v[2 * l + 1])[None]]).ravel()
             for l in range(2)] for v in vectors]
    expected = np.array([[sum(u[l] @ blocks[l] @ w[l] for l in range(2)) for w in flat] for u in flat])
    np.testing.assert_allclose(gram.numpy(), expected, rtol=1e-5)


@pytest.mark.parametrize("curvature_batch_size, damping",
                         [(None, 1.02e-5), (None, 1e-2), (None, 1.0), (None, 100.0), (5, 1.0)])
def test_quadratic_loss_reduction_ratio_and_damping_rule(curvature_batch_size, damping):
    """Linear model + squared error: the loss is its own quadratic model, so
    ρ = (cᵀb + ½cᵀGc) / (cᵀb + ½cᵀGc) = 1 at any λ (ρ's prediction has no
    damping term); ρ > 3/4 multiplies λ by ω = 0.95 on the adaptation step.
    With curvature_batch_size=n the model's G is the first n examples' (G_n)
    and the numerator stays the whole batch's real change:
    ρ = (cᵀb + ½cᵀGc) / (cᵀb + ½cᵀG_n c)."""
    rng = np.random.RandomState(4)
    x = rng.randn(16, 3).astype(np.float32)
    y = (x @ rng.randn(3, 2)).astype(np.float32)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    loss = keras.losses.MeanSquaredError()
    opt = tkfac_tf.TKFAC.adaptive(layer_collection=tkfac_tf.LayerCollection.from_model(model, loss=loss),
                                  damping=damping, damping_adaptation_interval=1, estimation_mode="exact",
                                  curvature_batch_size=curvature_batch_size)
    model.compile(optimizer=opt, loss=loss)
    w0 = _flat([v.numpy() for v in model.trainable_variables])
    a = np.concatenate([x, np.ones((16, 1), np.float32)], 1).astype(np.float64)
    model.fit(x, y, batch_size=16, epochs=1, verbose=0, shuffle=False)  # "first n" = x[:n]
    u = _flat([v.numpy() for v in model.trainable_variables]) - w0
    # h(θ) = mean over N·2 entries of (aΘ − y)²: Hessian 2/(2N) aᵀa per output column.
    theta0 = np.concatenate([w0[:6].reshape(3, 2), w0[6:][None]], 0)
    upd = np.concatenate([u[:6].reshape(3, 2), u[6:][None]], 0)
    resid = a @ theta0 - y
    grad = a.T @ resid * 2 / resid.size
    quad = np.sum((a @ upd) ** 2) / resid.size
    actual = np.sum(grad * upd) + quad
    n = curvature_batch_size or len(x)
    quad_model = np.sum((a[:n] @ upd) ** 2) / (2 * n)
    predicted = np.sum(grad * upd) + quad_model
    np.testing.assert_allclose(float(opt.reduction_ratio.numpy()), actual / predicted, rtol=1e-4)
    np.testing.assert_allclose(float(tf.reduce_mean((a @ (theta0 + upd) - y) ** 2)),
                               float(loss(y, model(x))), rtol=1e-5)
    if curvature_batch_size is None:
        np.testing.assert_allclose(float(opt.reduction_ratio.numpy()), 1.0, rtol=1e-4)
        np.testing.assert_allclose(float(opt.damping.numpy()), max(0.95 * damping, 1e-5), rtol=1e-6)
    else:  # the subset's curvature differs measurably, and so does ρ
        assert abs(quad_model / quad - 1) > 0.05


@pytest.mark.parametrize("modelled", [True, False])
def test_l2_regularised_quadratic_loss_has_reduction_ratio_one(modelled):
    """Linear model + squared error + L2 weight regularizers (L2 and L1L2's
    l2 part, l1 = 0): h(θ) = mean (aΘ − y)² + Σ_v c_v ‖θ_v‖² is exactly
    quadratic, with Hessian G + diag(2 c_v I); the model adds the second
    term exactly, so ρ = 1 on every step. Without it (regularizer_curvature
    =False) the model's curvature along u is too small: the first step
    overshoots the minimum along u so far that h rises, and is rejected."""
    rng = np.random.RandomState(4)
    x = rng.randn(16, 3).astype(np.float32)
    y = (x @ rng.randn(3, 2)).astype(np.float32)
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(
        2, kernel_regularizer=keras.regularizers.L2(0.5),
        bias_regularizer=keras.regularizers.L1L2(l1=0.0, l2=0.2))])
    loss = keras.losses.MeanSquaredError()
    opt = tkfac_tf.TKFAC.adaptive(layer_collection=tkfac_tf.LayerCollection.from_model(model, loss=loss),
                                  damping=1e-2, damping_adaptation_interval=1, estimation_mode="exact",
                                  regularizer_curvature=modelled)
    model.compile(optimizer=opt, loss=loss)
    for _ in range(2 if modelled else 1):
        w0 = _flat([v.numpy() for v in model.trainable_variables])
        model.fit(x, y, batch_size=16, epochs=1, verbose=0, shuffle=False)
        u = _flat([v.numpy() for v in model.trainable_variables]) - w0
        # The real change of h along u, from its closed form in float64.
        a = np.concatenate([x, np.ones((16, 1))], 1)
        theta0 = np.concatenate([w0[:6].reshape(3, 2), w0[6:][None]], 0)
        upd = np.concatenate([u[:6].reshape(3, 2), u[6:][None]], 0)
        c = np.concatenate([np.full((3, 2), 0.5), np.full((1, 2), 0.2)], 0)
        resid = a @ theta0 - y
        grad = a.T @ resid * 2 / resid.size + 2 * c * theta0
        actual = np.sum(grad * upd) + np.sum((a @ upd) ** 2) / resid.size + np.sum(c * upd**2)
        rho = float(opt.reduction_ratio.numpy())
        if modelled:
            assert actual < 0.0
            np.testing.assert_allclose(rho, 1.0, rtol=1e-4)
        else:
            assert not u.any() and rho < 0.0 and int(opt.rejected_steps.numpy()) == 1


def _noisy_linear_regression(seed):
    """32 examples of 3 features with 2 noisy linear targets, a Dense(2)
    model and the mean squared error: an exactly quadratic loss."""
    rng = np.random.RandomState(seed)
    x = rng.randn(32, 3).astype(np.float32)
    y = (x @ rng.randn(3, 2) + 0.3 * rng.randn(32, 2)).astype(np.float32)
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    return x, y, model, keras.losses.MeanSquaredError()


@pytest.mark.parametrize("mode", ["graph", "eager", "xla"])
def test_gradient_accumulation_models_the_average_gradient_and_the_last_micro_batch(mode):
    """gradient_accumulation_steps=2, linear model + squared error: the first
    update u = αΔ minimises ∇̄ᵀu + ½uᵀ(G₂ + λI)u along Δ (∇̄ the two
    micro-batches' mean gradient, G₂ the exact curvature of the last one,
    whose forward pass is at the update's weights), i.e. ∇̄ᵀu + uᵀ(G₂ + λI)u
    = 0; ρ compares the last micro-batch's loss change with its own
    gradient's model, exact for this quadratic loss: ρ = 1 on every update."""
    x, y, model, loss = _noisy_linear_regression(5)
    damping = 0.05
    opt = tkfac_tf.TKFAC.adaptive(layer_collection=tkfac_tf.LayerCollection.from_model(model, loss=loss),
                                  damping=damping, damping_adaptation_interval=1, estimation_mode="exact",
                                  gradient_accumulation_steps=2)
    model.compile(optimizer=opt, loss=loss, run_eagerly=mode == "eager", jit_compile=mode == "xla")
    a = np.concatenate([x, np.ones((32, 1))], 1)
    theta = np.concatenate([model.layers[0].kernel.numpy(), model.layers[0].bias.numpy()[None]], 0)
    model.fit(x[:16], y[:16], batch_size=8, epochs=1, verbose=0, shuffle=False)
    after = np.concatenate([model.layers[0].kernel.numpy(), model.layers[0].bias.numpy()[None]], 0)
    u = after - theta
    grad = a[:16].T @ (a[:16] @ theta - y[:16]) * 2 / (16 * 2)  # the mean of the two micro-batches'
    curvature = np.sum((a[8:16] @ u) ** 2) * 2 / (8 * 2)  # uᵀG₂u
    linear = np.sum(grad * u)
    assert linear < 0.0
    np.testing.assert_allclose(linear + curvature + damping * np.sum(u * u), 0.0, atol=1e-4 * abs(linear))
    for start in (0, 16):
        model.fit(x[start:start + 16], y[start:start + 16], batch_size=8, epochs=1, verbose=0, shuffle=False)
        np.testing.assert_allclose(float(opt.reduction_ratio.numpy()), 1.0, rtol=1e-4)
    assert int(opt.iterations.numpy()) == 3 and int(opt.rejected_steps.numpy()) == 0


@pytest.mark.parametrize("schedule", ["manual", "automatic"])
def test_gradient_accumulation_with_cov_update_op_in_a_custom_loop(schedule):
    """A custom loop under gradient_accumulation_steps=2 calling
    cov_update_op itself. Manual schedule: every call sets the averages
    (two per update) and ρ still predicts the last micro-batch from its own
    gradient (ρ = 1 on this quadratic loss). Automatic schedule with a
    manual call on an update's last micro-batch: that call sets the
    averages and the first micro-batch's accumulated sums are dropped."""
    x, y, model, loss = _noisy_linear_regression(6)
    manual = schedule == "manual"
    opt = tkfac_tf.TKFAC.adaptive(
        layer_collection=tkfac_tf.LayerCollection.from_model(model, loss=loss), damping=0.05,
        damping_adaptation_interval=1, estimation_mode="exact", gradient_accumulation_steps=2,
        **(dict(cov_update_every=None, inv_update_every=None, inverse_warmup_steps=0) if manual else {}))
    opt.build(model.trainable_variables)

    @tf.function
    def micro_step(x, y, update_covariances):
        with tf.GradientTape() as tape:
            value = loss(y, model(x, training=True))
        grads = tape.gradient(value, model.trainable_variables)
        if update_covariances:
            opt.cov_update_op()
            if manual:
                opt.inv_update_op()
        opt.apply_gradients(zip(grads, model.trainable_variables),
                            loss_fn=lambda: loss(y, model(x, training=True)))

    for k in range(4):
        micro_step(x[8 * k:8 * k + 8], y[8 * k:8 * k + 8], manual or k % 2 == 1)
        if manual and k % 2 == 1:
            np.testing.assert_allclose(float(opt.reduction_ratio.numpy()), 1.0, rtol=1e-4)
    assert int(opt.iterations.numpy()) == 2
    assert int(opt.num_cov_updates.numpy()) == (4 if manual else 2)
    if manual:
        assert not opt._accumulated_sums
    else:
        assert opt._accumulated_sums and not any(np.asarray(v).any() for v in opt._accumulated_sums)


def test_levenberg_marquardt_rule():
    decay = 0.95 ** 5
    for rho, expected in ((0.9, 0.2 * decay), (0.5, 0.2), (0.1, 0.2 / decay), (-3.0, 0.2 / decay),
                          (float("nan"), 0.2 / decay), (float("-inf"), 0.2 / decay)):
        got = update_rules.levenberg_marquardt(tf.constant(0.2), tf.constant(rho), decay, 1e-8, 1e8)
        np.testing.assert_allclose(float(got), expected, rtol=1e-6)
    clipped = update_rules.levenberg_marquardt(tf.constant(1e-8), tf.constant(0.9), decay, 1e-8, 1.0)
    assert float(clipped) == pytest.approx(1e-8)


def _fit_weights(mode, steps=3, sample_weight=None, curvature_examples=None, **options):
    """Weights after ``steps`` adaptive steps on one batch: model.fit in
    ``mode`` ('eager', 'graph', 'xla'), or ('custom') a loop whose
    curvature_loss_fn re-evaluates the loss on the first
    ``curvature_examples`` examples (loss_fn, for ρ, on all)."""
    keras.utils.set_random_seed(7)
    model = _model()
    x, y = _data(3)
    n = curvature_examples
    options = {"seed": 3, "damping": 0.1, "damping_adaptation_interval": 2, **options}
    opt = tkfac_tf.TKFAC.adaptive(layer_collection=tkfac_tf.LayerCollection.from_model(model, loss=LOSS),
                                  **options)
    if mode == "custom":
        variables = model.trainable_variables
        opt.build(variables)

        @tf.function
        def step(x, y, w):
            subset = None if n is None else lambda: LOSS(y[:n], model(x[:n], training=True), w[:n])
            with tf.GradientTape() as tape:
                loss = LOSS(y, model(x, training=True), w)
            opt.apply_gradients(zip(tape.gradient(loss, variables), variables),
                                loss_fn=lambda: LOSS(y, model(x, training=True), w), curvature_loss_fn=subset)

        w = np.ones(N, np.float32) if sample_weight is None else sample_weight
        for _ in range(steps):
            step(x, y, w)
    else:
        model.compile(optimizer=opt, loss=LOSS, run_eagerly=mode == "eager", jit_compile=mode == "xla")
        model.fit(x, y, sample_weight=sample_weight, batch_size=N, epochs=steps, verbose=0,
                  shuffle=False)
    return [v.numpy() for v in model.weights], opt


# Trajectory comparisons between modes (other fusions and summation orders):
# 3 adaptive steps, one λ adaptation (after step 2) and one step with the
# adapted λ. Measured on this model: perturbing the inputs by 2⁻²² relative
# (a few ulps) moves the weights after 3 steps by up to 9e-6 relative, and
# XLA against graph differs by 1-9e-6; STEPS_RTOL leaves a margin of ≥ 30×
# for other CPUs' summation orders, while a real difference between modes
# (other targets, a missed or doubled update, another λ) moves them by
# more than 1e-2 (``_max_relative_difference`` of the options below).
STEPS, STEPS_RTOL, STEPS_ATOL = 3, 3e-4, 1e-6


def _assert_same_steps(weights, reference, err_msg=""):
    for got, want in zip(weights, reference):
        np.testing.assert_allclose(got, want, rtol=STEPS_RTOL, atol=STEPS_ATOL, err_msg=err_msg)


def _max_relative_difference(weights, reference):
    return max(float(np.max(np.abs(a - b)) / np.max(np.abs(b))) for a, b in zip(weights, reference))


def test_modes_give_the_same_adaptive_steps():
    reference, opt = _fit_weights("graph", steps=STEPS)
    assert int(opt.skipped_steps.numpy()) == 0
    assert float(opt.damping.numpy()) != pytest.approx(0.1)  # λ was adapted
    for mode in ("eager", "xla", "custom"):
        weights, _ = _fit_weights(mode, steps=STEPS)
        _assert_same_steps(weights, reference, err_msg=mode)


def test_curvature_batch_size_re_evaluates_the_first_examples_in_every_mode():
    """fit with curvature_batch_size=n (x, y and sample_weight sliced) takes
    the steps of a custom loop whose loss_fn uses the first n examples."""
    weights = np.linspace(0.5, 2.0, N).astype(np.float32)
    reference, _ = _fit_weights("custom", steps=STEPS, sample_weight=weights, curvature_examples=5)
    whole, _ = _fit_weights("graph", steps=STEPS, sample_weight=weights)
    assert _max_relative_difference(whole, reference) > 1e-2  # the option changes the steps
    # (eager = graph for the adaptive step: test_modes_give_the_same_adaptive_steps)
    for mode in ("graph", "xla"):
        got, opt = _fit_weights(mode, steps=STEPS, sample_weight=weights, curvature_batch_size=5)
        assert int(opt.skipped_steps.numpy()) == 0
        _assert_same_steps(got, reference, err_msg=mode)


def test_ghost_halves_are_the_two_halves_weighted_by_size():
    for n in (1, 2, 7, 160):
        first, second = curvature.ghost_halves(n)
        assert first == (0, n // 2) and second == (n // 2, n)
        as_tensors = curvature.ghost_halves(tf.constant(n))
        assert [(int(a), int(b)) for a, b in as_tensors] == [first, second]
        expected = ((n // 2) * 1.5 + (n - n // 2) * 4.0) / n
        for size in (n, tf.constant(n)):
            got = curvature.ghost_halves_loss(tf.constant(1.5), tf.constant(4.0), size)
            assert float(got) == pytest.approx(expected, rel=1e-6)
    # A batch of one: its first half is empty, and a plain mean of no examples is NaN.
    assert float(curvature.ghost_halves_loss(tf.constant(float("nan")), tf.constant(4.0), tf.constant(1))) == 4.0


def _ghost_halves_weights(model_fn, loss, x, y, mode, **options):
    """Weights after 3 adaptive steps with curvature_batch_size='ghost_halves':
    model.fit ('graph', 'xla'), or ('custom') a loop passing
    opt.curvature_loss_fn(loss_on, batch_size)."""
    model = model_fn()
    opt = tkfac_tf.TKFAC.adaptive(layer_collection=tkfac_tf.LayerCollection.from_model(model, loss=loss),
                                  seed=3, damping=0.1, damping_adaptation_interval=2, **options)
    if mode == "custom":
        variables = model.trainable_variables
        opt.build(variables)

        @tf.function
        def step(x, y):
            with tf.GradientTape() as tape:
                value = loss(y, model(x, training=True))
            curvature_loss_fn = opt.curvature_loss_fn(
                lambda start, stop: loss(y[start:stop], model(x[start:stop], training=True)), tf.shape(x)[0])
            opt.apply_gradients(zip(tape.gradient(value, variables), variables),
                                loss_fn=lambda: loss(y, model(x, training=True)),
                                curvature_loss_fn=curvature_loss_fn)

        for _ in range(STEPS):
            step(tf.constant(x), tf.constant(y))
    else:
        model.compile(optimizer=opt, loss=loss, jit_compile=mode == "xla")
        model.fit(x, y, batch_size=len(x), epochs=STEPS, verbose=0, shuffle=False)
    assert int(opt.skipped_steps.numpy()) == 0
    return [v.numpy() for v in model.weights]


def test_ghost_halves_in_fit_equal_a_custom_loop_and_without_batch_norm_the_whole_batch():
    """An odd batch of 11 (halves of 5 and 6 examples): a BatchNorm model's
    fit steps with 'ghost_halves' are those of a custom loop passing
    opt.curvature_loss_fn, in a graph and under XLA, and not the whole
    batch's; a model without BatchNorm takes the whole batch's steps (its
    halves' size-weighted mean loss is the batch's loss)."""
    rng = np.random.RandomState(8)
    x = rng.randn(11, 3).astype(np.float32)
    x[:5] = 2.0 * x[:5] + 1.0  # the halves' own moments differ
    y = rng.randn(11, 2).astype(np.float32)
    loss = keras.losses.MeanSquaredError()
    reference = _ghost_halves_weights(_batch_norm_model, loss, x, y, "custom", curvature_batch_size="ghost_halves")
    whole = _ghost_halves_weights(_batch_norm_model, loss, x, y, "graph", curvature_batch_size=None)
    assert _max_relative_difference(whole, reference) > 1e-2
    for mode in ("graph", "xla"):
        got = _ghost_halves_weights(_batch_norm_model, loss, x, y, mode, curvature_batch_size="ghost_halves")
        _assert_same_steps(got, reference, err_msg=mode)

    def plain():
        keras.utils.set_random_seed(5)
        return keras.Sequential([keras.Input((3,)), keras.layers.Dense(4, activation="tanh"), keras.layers.Dense(2)])

    halves = _ghost_halves_weights(plain, loss, x, y, "graph", curvature_batch_size="ghost_halves")
    _assert_same_steps(halves, _ghost_halves_weights(plain, loss, x, y, "graph", curvature_batch_size=None))


def test_curvature_loss_fn_follows_the_option():
    model = _batch_norm_model()
    calls = []

    def loss_on(start, stop):
        calls.append((start, stop))
        return tf.constant(float(len(calls)))

    def curvature_loss_fn(size, **options):
        opt = tkfac_tf.TKFAC.adaptive(layer_collection=tkfac_tf.LayerCollection.from_model(model, loss=LOSS),
                                      **options)
        calls.clear()
        fn = opt.curvature_loss_fn(loss_on, size)
        return None if fn is None else (float(fn()), list(calls))

    assert curvature_loss_fn(256) == (1.0, [(0, 128)])  # 'auto' on a BatchNorm model: the first half
    assert curvature_loss_fn(64) is None  # ... a batch of at most 64 whole
    assert curvature_loss_fn(256, curvature_batch_size=None) is None
    assert curvature_loss_fn(256, curvature_batch_size=5) == (1.0, [(0, 5)])
    assert curvature_loss_fn(9, curvature_batch_size="ghost_halves") == (
        pytest.approx((4 * 1.0 + 5 * 2.0) / 9), [(0, 4), (4, 9)])
    opt = tkfac_tf.TKFAC.adaptive(layer_collection=tkfac_tf.LayerCollection.from_model(model, loss=LOSS),
                                  curvature_batch_size="ghost_halves")
    assert opt.curvature_examples(256) is None  # every example, in two parts


def test_curvature_batch_size_leaves_a_given_loss_fn_alone():
    with mock.patch("tkfac_tf.optimizer.logging.warning") as warning:
        got, _ = _fit_weights("custom", steps=2, curvature_batch_size=5)
        got_again, _ = _fit_weights("custom", steps=2, curvature_batch_size=5)
    want, _ = _fit_weights("custom", steps=2)
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w)
    assert warning.call_count == 2  # once per optimizer
    assert "curvature_batch_size=5 has no effect" in warning.call_args[0][0] % warning.call_args[0][1:]
    with mock.patch("tkfac_tf.optimizer.logging.warning") as warning:  # the loop did the slicing itself
        _fit_weights("custom", steps=1, curvature_examples=5, curvature_batch_size=5)
    assert warning.call_count == 0


def test_example_custom_loop_takes_the_optimizers_curvature_batch_size():
    """examples/training.make_train_step with no curvature_examples puts the
    curvature products on the optimizer's first curvature_batch_size
    examples: the weights of passing curvature_examples itself, not those
    of the whole batch's curvature."""
    from examples import training

    x, y = _data(3)

    def weights_after_steps(curvature_examples, **options):
        keras.utils.set_random_seed(7)
        model = _model()
        opt = tkfac_tf.TKFAC.adaptive(layer_collection=tkfac_tf.LayerCollection.from_model(model, loss=LOSS),
                                      seed=3, damping=0.1, **options)
        opt.build(model.trainable_variables)
        step = training.make_train_step(model, opt, LOSS, curvature_examples=curvature_examples)
        for _ in range(3):
            step(x, y)
        return [w.numpy() for w in model.weights]

    by_option = weights_after_steps(None, curvature_batch_size=5)
    for got, want in zip(by_option, weights_after_steps(5)):
        np.testing.assert_array_equal(got, want)
    whole_batch = weights_after_steps(None)
    assert any(not np.array_equal(a, b) for a, b in zip(by_option, whole_batch))


def _batch_norm_model():
    """Dense -> BatchNormalization -> Dense(2) with random γ, β (a fresh
    BatchNorm's are 1 and 0)."""
    keras.utils.set_random_seed(5)
    model = keras.Sequential([
        keras.Input((3,)), keras.layers.Dense(4), keras.layers.BatchNormalization(), keras.layers.Dense(2)])
    rng = np.random.RandomState(6)
    for variable in model.layers[1].trainable_variables:
        variable.assign(1.0 + 0.5 * rng.randn(*variable.shape).astype(np.float32))
    return model


def test_curvature_examples_follow_the_option_and_the_models_batch_norm():
    with_batch_norm = _batch_norm_model()

    def examples(model, size, **options):
        opt = tkfac_tf.TKFAC.adaptive(layer_collection=tkfac_tf.LayerCollection.from_model(model, loss=LOSS),
                                      **options)
        return opt.curvature_examples(size)

    floor = tkfac_tf.optimizer.MIN_AUTO_CURVATURE_EXAMPLES
    assert floor == 64
    # Half the batch, never fewer than 64 examples; a batch of at most 64 whole.
    assert [examples(with_batch_norm, n) for n in (256, 200, 128, 100, 65, 64, 16, 1)] == [
        128, 100, 64, 64, 64, None, None, None]
    assert int(examples(with_batch_norm, tf.constant(300))) == 150
    assert int(examples(with_batch_norm, tf.constant(9))) == 64  # [:64] of 9 examples: all of them
    assert examples(with_batch_norm, 256, curvature_batch_size=None) is None
    assert examples(with_batch_norm, 256, curvature_batch_size=5) == 5
    assert examples(_model(), 256) is None  # no layer couples the examples
    assert examples(_model(), 256, curvature_batch_size=5) == 5
    # A model given to register_model counts with its unregistered BatchNorm too.
    manual = tkfac_tf.LayerCollection()
    for layer in (with_batch_norm.layers[0], with_batch_norm.layers[2]):
        manual.register_dense(layer)
    manual.register_normal_predictive_distribution(with_batch_norm.layers[2])
    assert not manual.normalises_over_batch
    manual.register_model(with_batch_norm)
    assert manual.normalises_over_batch
    manual.release()
    with_batch_norm.layers[1].trainable = False  # frozen: normalises with its moving statistics
    assert examples(with_batch_norm, 256) is None


@pytest.mark.parametrize("curvature_batch_size, statistics_pass",
                         [("auto", "step"), (None, "step"), ("ghost_halves", "step"), ("auto", "curvature")])
def test_batch_norm_models_take_the_curvature_on_the_first_half_by_default(curvature_batch_size,
                                                                           statistics_pass):
    """With BatchNorm in training mode, fit's default quadratic model takes
    G from the first half of a batch of 160, normalised with that half's own
    moments: ρ = (h(θ + u) − h(θ)) / (∇ᵀu + ½ uᵀ G_half u), with G_half =
    J_halfᵀ J_half · 2 / (n · 2) (mean squared error over n examples and 2
    outputs) from a dense Jacobian of the half batch's outputs; None keeps
    the whole batch's G (BatchNorm then normalises with all 160 examples);
    'ghost_halves' takes the mean of both halves' G, each half normalised
    with its own moments. With statistics_pass='curvature' the half's G
    comes from the pass the statistics were taken from."""
    rng = np.random.RandomState(7)
    x = rng.randn(160, 3).astype(np.float32)
    x[:80] = 2.0 * x[:80] + 1.5  # the halves' own moments differ from the whole batch's
    y = rng.randn(160, 2).astype(np.float32)
    model = _batch_norm_model()
    loss = keras.losses.MeanSquaredError()
    opt = tkfac_tf.TKFAC.adaptive(layer_collection=tkfac_tf.LayerCollection.from_model(model, loss=loss),
                                  damping_adaptation_interval=1, estimation_mode="exact",
                                  curvature_batch_size=curvature_batch_size, statistics_pass=statistics_pass)
    model.compile(optimizer=opt, loss=loss)
    variables = model.trainable_variables
    theta0 = [v.numpy() for v in variables]

    def whole_batch_loss():
        return float(loss(y, model(x, training=True)))

    def gauss_newton(start, stop):
        with tf.GradientTape() as tape:
            outputs = model(x[start:stop], training=True)
        rows = stop - start
        jac = np.concatenate([j.numpy().reshape(rows * 2, -1) for j in tape.jacobian(outputs, variables)], 1)
        return jac.T.astype(np.float64) @ jac / rows

    with tf.GradientTape() as tape:
        loss0 = loss(y, model(x, training=True))
    grad = _flat(tape.gradient(loss0, variables))
    half, second_half, whole = gauss_newton(0, 80), gauss_newton(80, 160), gauss_newton(0, 160)
    model.fit(x, y, batch_size=160, epochs=1, verbose=0, shuffle=False)
    u = _flat([v.numpy() for v in variables]) - _flat(theta0)
    actual = whole_batch_loss() - float(loss0)
    quad = {"auto": u @ half @ u, None: u @ whole @ u, "ghost_halves": 0.5 * (u @ half @ u + u @ second_half @ u)}
    predicted = {option: grad @ u + 0.5 * value for option, value in quad.items()}
    for a, b in (("auto", None), ("ghost_halves", None), ("ghost_halves", "auto")):  # ρ tells them apart
        assert abs(predicted[a] / predicted[b] - 1) > 1e-2
    predicted = predicted[curvature_batch_size]
    np.testing.assert_allclose(float(opt.reduction_ratio.numpy()), actual / predicted, rtol=1e-3)


def test_statistics_from_the_curvature_pass_are_its_examples_own():
    """statistics_pass='curvature' with curvature_batch_size=6 of a batch of
    12, eagerly, in a graph and under XLA: the factors after one fit step
    (the first update sets them to the batch's statistics) are those of a
    step on the first 6 examples alone, BatchNorm normalising them with
    their own moments; the step's own pass gives other factors. The sampled targets of 6 examples are the same
    draws in both (same seed, step and shape); 'exact' targets would not
    do here: their one vector per output unit for every example sums to
    zero through BatchNorm (Σᵢ BN(s)ᵢ does not depend on s), which leaves
    the first Dense layer's factors at round-off."""
    rng = np.random.RandomState(4)
    x = rng.randn(12, 3).astype(np.float32)
    x[:6] = 2.0 * x[:6] + 1.0  # the first examples' moments differ from the batch's
    y = rng.randn(12, 2).astype(np.float32)
    loss = keras.losses.MeanSquaredError()

    def factors(x, y, mode="graph", **options):
        model = _batch_norm_model()
        opt = tkfac_tf.TKFAC.adaptive(layer_collection=tkfac_tf.LayerCollection.from_model(model, loss=loss),
                                      seed=3, **options)
        model.compile(optimizer=opt, loss=loss, run_eagerly=mode == "eager", jit_compile=mode == "xla")
        model.fit(x, y, batch_size=len(x), epochs=1, verbose=0, shuffle=False)
        assert int(opt.skipped_steps.numpy()) == 0
        return [v.numpy() for v in opt.estimator.factor_variables]

    want = factors(x[:6], y[:6], curvature_batch_size=None)
    assert _max_relative_difference(factors(x, y, curvature_batch_size=6, statistics_pass="step"), want) > 1e-2
    for mode in ("eager", "graph", "xla"):  # one step's sums of order-1 terms: 1e-5 holds any order
        got = factors(x, y, mode, curvature_batch_size=6, statistics_pass="curvature")
        for a, b in zip(got, want):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6 * np.abs(b).max(), err_msg=mode)


def test_statistics_of_part_of_the_batch_average_over_as_many_examples():
    """statistics_pass='curvature' with 6 of 12 examples: the second
    update's decay is ε' = 1 − (6/12)(1 − ε), so after two steps the
    factors are ε' F₁ + (1 − ε') S₂, F₁ the first step's statistics and S₂
    the second's: those of a fresh optimizer at step 1 (the same sampled
    targets) on the weights after the first step. The default 'auto' is
    'curvature' with BatchNorm; without, it takes the step's own pass."""
    rng = np.random.RandomState(4)
    x = rng.randn(12, 3).astype(np.float32)
    x[:6] = 2.0 * x[:6] + 1.0
    y = rng.randn(12, 2).astype(np.float32)
    loss = keras.losses.MeanSquaredError()

    def fit(steps, build=_batch_norm_model, weights=None, first_step=0, **options):
        model = build()
        if weights is not None:
            model.set_weights(weights)
        opt = tkfac_tf.TKFAC.adaptive(layer_collection=tkfac_tf.LayerCollection.from_model(model, loss=loss),
                                      seed=3, curvature_batch_size=6, **options)
        model.compile(optimizer=opt, loss=loss)
        opt.build(model.trainable_variables)
        opt.iterations.assign(first_step)
        model.fit(x, y, batch_size=len(x), epochs=steps, verbose=0, shuffle=False)
        assert int(opt.skipped_steps.numpy()) == 0
        return model, [v.numpy().astype(np.float64) for v in opt.estimator.factor_variables]

    model, first = fit(1, cov_ema_decay=0.6)
    _, second = fit(1, weights=model.get_weights(), first_step=1, statistics_pass="curvature")
    _, got = fit(2, cov_ema_decay=0.6)
    assert _max_relative_difference(second, first) > 0.05

    def averaged(decay):
        return [decay * f + (1 - decay) * s for f, s in zip(first, second)]

    assert _max_relative_difference(averaged(0.6), got) > 1e-2  # the unscaled ε: off
    # Two float32 steps of order-1 sums: 1e-4 holds any summation order.
    for a, b in zip(averaged(1 - 0.5 * (1 - 0.6)), got):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * np.abs(b).max())

    def plain():
        keras.utils.set_random_seed(5)
        return keras.Sequential([keras.Input((3,)), keras.layers.Dense(4, activation="tanh"), keras.layers.Dense(2)])

    # One step: the first update sets the factors to the statistics, the whole batch's with 'step'.
    for a, b in zip(fit(1, plain)[1], fit(1, plain, statistics_pass="step")[1]):
        np.testing.assert_array_equal(a, b)


def test_a_custom_loop_without_curvature_loss_fn_is_told_only_where_auto_would_slice():
    """'auto' in a custom loop that passes only loss_fn: a BatchNorm model's
    step is logged once (the loop must slice the batch itself), a model
    without BatchNorm's is not (its whole batch is what 'auto' takes)."""
    rng = np.random.RandomState(9)
    x = tf.constant(rng.randn(160, 3).astype(np.float32))
    y = tf.constant(rng.randn(160, 2).astype(np.float32))
    loss = keras.losses.MeanSquaredError()
    plain = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])

    def make_step(model, opt):
        variables = model.trainable_variables
        loss_fn = lambda: loss(y, model(x, training=True))  # noqa: E731

        @tf.function
        def step():
            with tf.GradientTape() as tape:
                value = loss_fn()
            opt.apply_gradients(zip(tape.gradient(value, variables), variables), loss_fn=loss_fn)

        return step

    for model, logged in ((_batch_norm_model(), 1), (plain, 0)):
        opt = tkfac_tf.TKFAC.adaptive(layer_collection=tkfac_tf.LayerCollection.from_model(model, loss=loss))
        opt.build(model.trainable_variables)
        step = make_step(model, opt)
        with mock.patch("tkfac_tf.optimizer.logging.warning") as warning:
            step()
            step()
        assert warning.call_count == logged, model.name
        if logged:
            assert "curvature_batch_size='auto' has no effect" in warning.call_args[0][0] % warning.call_args[0][1:]


def test_fit_without_the_models_loss_is_refused_without_a_slicing_note():
    """A collection that registers a BatchNorm model's layers by hand but not
    the model (no recorded loss): fit's adaptive step raises the error that
    says how to record it, and logs nothing about slicing the batch."""
    model = _batch_norm_model()
    collection = tkfac_tf.LayerCollection()
    collection.register_dense(model.layers[0])
    collection.register_batch_normalization(model.layers[1])
    collection.register_dense(model.layers[2])
    collection.register_normal_predictive_distribution(model.layers[2])
    assert collection.normalises_over_batch
    model.compile(optimizer=tkfac_tf.TKFAC.adaptive(layer_collection=collection), loss="mse")
    x = np.random.RandomState(10).randn(160, 3).astype(np.float32)
    with mock.patch("tkfac_tf.optimizer.logging.warning") as warning:
        with pytest.raises(ValueError, match="register_model"):
            model.fit(x, x[:, :2], batch_size=160, epochs=1, verbose=0)
    assert warning.call_count == 0


def test_example_custom_loop_takes_half_a_batch_norm_models_batch():
    """make_train_step's default on a BatchNorm model: the steps of passing
    curvature_examples = half the batch (80 of 160), not those of the whole
    batch."""
    from examples import training

    rng = np.random.RandomState(8)
    x = tf.constant(rng.randn(160, 3).astype(np.float32))
    y = tf.constant(rng.randn(160, 2).astype(np.float32))
    loss = keras.losses.MeanSquaredError()

    def weights_after_steps(curvature_examples):
        model = _batch_norm_model()
        opt = tkfac_tf.TKFAC.adaptive(layer_collection=tkfac_tf.LayerCollection.from_model(model, loss=loss),
                                      seed=3)
        opt.build(model.trainable_variables)
        step = training.make_train_step(model, opt, loss, curvature_examples=curvature_examples)
        for _ in range(2):
            step(x, y)
        return [w.numpy() for w in model.weights]

    default = weights_after_steps(None)
    for got, want in zip(default, weights_after_steps(80)):
        np.testing.assert_array_equal(got, want)
    assert any(not np.array_equal(a, b) for a, b in zip(default, weights_after_steps(160)))


def test_approximate_curvature_trains_the_same_in_graph_and_xla():
    reference, opt = _fit_weights("graph", steps=STEPS, curvature="approximate")
    assert int(opt.skipped_steps.numpy()) == 0
    exact, _ = _fit_weights("graph", steps=STEPS)
    assert _max_relative_difference(exact, reference) > 1e-2  # the option changes the steps
    weights, _ = _fit_weights("xla", steps=STEPS, curvature="approximate")
    _assert_same_steps(weights, reference)


def test_checkpoint_resume_is_exact(tmp_path):
    x, y = _data(3)

    def fresh():
        keras.utils.set_random_seed(7)
        model = _model()
        opt = tkfac_tf.TKFAC.adaptive(layer_collection=tkfac_tf.LayerCollection.from_model(model, loss=LOSS),
                                      seed=3, damping_adaptation_interval=2)
        model.compile(optimizer=opt, loss=LOSS)
        return model, opt

    model, opt = fresh()
    model.fit(x, y, batch_size=N, epochs=6, verbose=0)
    straight = [v.numpy() for v in model.weights]

    model, opt = fresh()
    model.fit(x, y, batch_size=N, epochs=3, verbose=0)
    tf.train.Checkpoint(model=model, optimizer=opt).write(str(tmp_path / "ckpt"))
    damping = float(opt.damping.numpy())
    model, opt = fresh()
    opt.build(model.trainable_variables)
    tf.train.Checkpoint(model=model, optimizer=opt).read(str(tmp_path / "ckpt")).assert_consumed()
    assert float(opt.damping.numpy()) == damping and int(opt.iterations.numpy()) == 3
    model.fit(x, y, batch_size=N, epochs=3, verbose=0)
    for got, want in zip(model.weights, straight):
        np.testing.assert_array_equal(got.numpy(), want)


@pytest.mark.parametrize("poisoned", ["model", "rho"])
def test_non_finite_step_is_skipped_and_overflow_raises_damping(poisoned):
    """'model': the loss re-evaluations behind the curvature and ρ are NaN:
    the step is skipped, λ kept. 'rho': the curvature (curvature_loss_fn)
    is finite but h(θ + u) (loss_fn) is inf, an overflow: the step is
    rejected, λ ← 10λ. Either way weights, previous update and ρ's
    read-out stay, weight decay included, and the next finite step trains."""
    model = _model()
    x, y = _data()
    opt = tkfac_tf.TKFAC.adaptive(layer_collection=tkfac_tf.LayerCollection.from_model(model, loss=LOSS),
                                  damping=1.0, damping_adaptation_interval=1, weight_decay=1e-2)
    variables = model.trainable_variables
    opt.build(variables)
    poison = tf.Variable(1.0)  # λ = 1: the finite steps' ρ ≈ 1, none is rejected
    curvature_loss_fn = None if poisoned == "model" else (lambda: LOSS(y, model(x, training=True)))

    @tf.function
    def step():
        with tf.GradientTape() as tape:
            loss = LOSS(y, model(x, training=True))
        opt.apply_gradients(zip(tape.gradient(loss, variables), variables),
                            loss_fn=lambda: LOSS(y, model(x, training=True)) * poison,
                            curvature_loss_fn=curvature_loss_fn)

    step()
    weights, damping = [v.numpy() for v in variables], float(opt.damping.numpy())
    momenta, rho = [m.numpy() for m in opt.momentums], float(opt.reduction_ratio.numpy())
    poison.assign(float("nan") if poisoned == "model" else float("inf"))
    step()
    # A non-finite model skips the step; a finite one whose loss at θ + u overflowed is rejected.
    assert (int(opt.skipped_steps.numpy()), int(opt.rejected_steps.numpy())) == (
        (1, 0) if poisoned == "model" else (0, 1))
    if poisoned == "model":
        assert float(opt.damping.numpy()) == damping
    else:
        np.testing.assert_allclose(float(opt.damping.numpy()), damping * 10, rtol=1e-6)
    if poisoned == "model":
        assert float(opt.reduction_ratio.numpy()) == rho
    else:  # no non-finite ρ kept, but a negative one: the next steps are measured
        assert float(opt.reduction_ratio.numpy()) == np.finfo(np.float32).min
    for got, want in zip(variables, weights):
        np.testing.assert_array_equal(got.numpy(), want)
    for got, want in zip(opt.momentums, momenta):
        np.testing.assert_array_equal(got.numpy(), want)
    poison.assign(1.0)
    step()
    assert int(opt.skipped_steps.numpy()) + int(opt.rejected_steps.numpy()) == 1
    assert not np.array_equal(variables[0].numpy(), weights[0])


@pytest.mark.parametrize("mode", ["eager", "graph"])
def test_a_step_that_raises_the_batch_loss_is_rejected_and_watched_until_an_adaptation_keeps_one(mode):
    """ρ's losses come from loss_fn = sign · h (the curvature from h): with sign = −1 every step
    that lowers h raises loss_fn, so a measured step is rejected (weights and
    previous update kept, λ ← 10λ, ρ's read-out < 0). ρ is measured on the
    first step, on the adaptation steps (k + 1) % 3 == 0, and on every step
    after a rejection until an adaptation step keeps its step."""
    model = _model()
    x, y = _data()
    opt = tkfac_tf.TKFAC.adaptive(layer_collection=tkfac_tf.LayerCollection.from_model(model, loss=LOSS),
                                  damping=1.0, damping_adaptation_interval=3)
    variables = model.trainable_variables
    opt.build(variables)
    sign = tf.Variable(1.0)  # λ ≥ 1: every step lowers h (ρ ≈ 1 with sign = 1)

    def step():
        with tf.GradientTape() as tape:
            loss = LOSS(y, model(x, training=True))
        opt.apply_gradients(zip(tape.gradient(loss, variables), variables),
                            loss_fn=lambda: LOSS(y, model(x, training=True)) * sign,
                            curvature_loss_fn=lambda: LOSS(y, model(x, training=True)))

    step = step if mode == "eager" else tf.function(step)

    def run(step_sign):
        sign.assign(step_sign)
        before = [v.numpy() for v in variables + opt.momentums]
        step()
        return not all(np.array_equal(a, v.numpy()) for a, v in zip(before, variables + opt.momentums))

    # k = 0, the first step: measured, rejected.
    assert not run(-1.0)
    assert int(opt.rejected_steps.numpy()) == 1 and float(opt.reduction_ratio.numpy()) < 0
    np.testing.assert_allclose(float(opt.damping.numpy()), 10.0, rtol=1e-6)
    # k = 1, no adaptation step: still measured after the rejection, rejected again.
    assert not run(-1.0)
    np.testing.assert_allclose(float(opt.damping.numpy()), 100.0, rtol=1e-6)
    # k = 2, an adaptation step that keeps its step: ρ ≥ 0 and the Levenberg–Marquardt rule.
    assert run(1.0)
    rho = float(opt.reduction_ratio.numpy())
    assert rho >= 0 and int(opt.rejected_steps.numpy()) == 2 and int(opt.skipped_steps.numpy()) == 0
    decay = 0.95 ** 3
    expected = 100 * decay if rho > 0.75 else 100 / decay if rho < 0.25 else 100
    np.testing.assert_allclose(float(opt.damping.numpy()), expected, rtol=1e-6)
    # k = 3: not measured any more, so a rise of loss_fn goes unseen and the step is kept.
    assert run(-1.0)
    assert int(opt.rejected_steps.numpy()) == 2 and float(opt.reduction_ratio.numpy()) == rho


@pytest.mark.parametrize("optimizer,seed", [("TKFAC", 1), ("TKFAC", 6), ("KFAC", 6)])
def test_rejections_keep_a_tiny_batch_from_blowing_up(optimizer, seed):
    """Dense(8, relu) → ×2 → Dense(5) fitted to one batch of 8 (149 weights,
    a Gauss–Newton matrix of rank ≤ 32) from the preset's λ₀ = 1e-3: the
    first steps' models are wrong in sign. Without rejections these runs
    diverged (TKFAC: batch loss 4e33 and 1e19 after 20 steps, every later
    step skipped; K-FAC: 1e5, then non-finite); with them λ rises until the
    steps hold and the loss falls."""
    rng = np.random.RandomState(seed)
    x, y = rng.randn(8, 12).astype("float32"), rng.randint(0, 5, 8)
    keras.utils.set_random_seed(seed)
    model = keras.Sequential([keras.Input((12,)), keras.layers.Dense(8, activation="relu"),
                              keras.layers.Rescaling(2.0), keras.layers.Dense(5)])
    opt = getattr(tkfac_tf, optimizer).adaptive()
    model.compile(optimizer=opt, loss=LOSS)
    losses = model.fit(x, y, batch_size=8, epochs=20, shuffle=False, verbose=0).history["loss"]
    assert np.all(np.isfinite(losses)) and max(losses) <= 1.5 * losses[0]
    assert losses[-1] < 0.05 * losses[0]
    assert int(opt.rejected_steps.numpy()) >= 1 and float(opt.damping.numpy()) > 1e-3
    assert int(opt.skipped_steps.numpy()) == 0


def test_rejection_rule():
    """ρ = Δh/ΔM for a predicted fall, 2 − Δh/ΔM for a predicted rise; a
    step is rejected for ρ < 0 or a non-finite loss, where measured."""
    inf, nan = float("inf"), float("nan")
    cases = [((1.0, 2.0, -0.5, True), (-2.0, True)), ((2.0, 1.0, -0.5, True), (2.0, False)),
             ((1.0, 1.0, -0.5, True), (0.0, False)), ((1.0, inf, -0.5, True), (None, True)),
             ((nan, 1.0, -0.5, True), (None, True)), ((1.0, 2.0, -0.5, False), (0.0, False)),
             # a predicted rise (the last micro-batch under gradient accumulation):
             ((1.0, 1.5, 0.5, True), (1.0, False)), ((1.0, 1.75, 0.5, True), (0.5, False)),
             ((1.0, 3.0, 0.5, True), (-2.0, True)), ((2.0, 1.0, 0.5, True), (4.0, False))]
    for (before, after, change, measured), (rho, rejected) in cases:
        before, after, change, measured = (tf.constant(v) for v in (before, after, change, measured))
        ratio = update_rules.reduction_ratio(before, after, change, measured)
        if rho is not None:
            assert float(ratio) == pytest.approx(rho)
        assert bool(update_rules.rejects(before, after, ratio, measured)) == rejected
    assert float(update_rules.rejected_step_damping(tf.constant(0.3), 1.0)) == pytest.approx(1.0)
    assert float(update_rules.rejected_step_damping(tf.constant(0.03), 1.0)) == pytest.approx(0.3)


def test_adaptive_needs_a_loss_and_refuses_kl_clipping():
    model = _model()
    x, y = _data()
    collection = _manual_collection(model)
    opt = tkfac_tf.TKFAC.adaptive(layer_collection=collection)
    model.compile(optimizer=opt, loss=LOSS)
    with pytest.raises(ValueError, match="register_model"):
        model.fit(x, y, batch_size=N, epochs=1, verbose=0)
    with pytest.raises(ValueError, match="norm_constraint"):
        tkfac_tf.TKFAC.adaptive(layer_collection=collection, norm_constraint=0.1)
    with pytest.raises(TypeError, match="loss_fn"):
        opt.apply_gradients([], loss_fn=3)
    with pytest.raises(TypeError, match="curvature_loss_fn"):
        opt.apply_gradients([], loss_fn=lambda: 0.0, curvature_loss_fn=3)
    with pytest.raises(ValueError, match="curvature_loss_fn needs loss_fn"):
        opt.apply_gradients([], curvature_loss_fn=lambda: 0.0)


def test_register_model_enables_fit_with_a_manual_collection():
    model = _model()
    x, y = _data()
    collection = _manual_collection(model)
    collection.register_model(model)
    opt = tkfac_tf.TKFAC.adaptive(layer_collection=collection)
    model.compile(optimizer=opt, loss=LOSS)
    history = model.fit(x, y, batch_size=N, epochs=8, verbose=0)
    assert history.history["loss"][-1] < 0.8 * history.history["loss"][0]
    assert int(opt.skipped_steps.numpy()) == 0


@pytest.mark.parametrize("seed", range(6))
def test_quadratic_model_solution_keeps_momentum_in_bounds(seed):
    """The solver's (α, μ) minimises cᵀb + ½cᵀAc over μ ∈ [0, 1] (checked by
    a fine scan of μ with the best α for each)."""
    rng = np.random.RandomState(seed)
    root = rng.randn(2, 2)
    a = root @ root.T + 0.1 * np.eye(2)
    b = rng.randn(2) * 3.0

    def model(alpha, mu):
        c = np.array([alpha, mu])
        return c @ b + 0.5 * c @ a @ c

    mus = np.linspace(0.0, 1.0, 100001)
    alphas = -(b[0] + mus * a[0, 1]) / a[0, 0]
    best = np.argmin([model(al, m) for al, m in zip(alphas, mus)])
    alpha, mu = update_rules.solve_quadratic_model(tf.constant(a, tf.float32), tf.constant(b, tf.float32),
                                                tf.constant(True))
    np.testing.assert_allclose(float(mu), mus[best], atol=2e-5)
    np.testing.assert_allclose(float(alpha), alphas[best], rtol=1e-4, atol=1e-5)
    unconstrained = -np.linalg.solve(a, b)
    if 0.0 <= unconstrained[1] <= 1.0:
        np.testing.assert_allclose([float(alpha), float(mu)], unconstrained, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("argument, value", [
    ("curvature", "diagonal"), ("damping_adaptation_interval", 0), ("damping_adaptation_interval", None),
    ("damping_adaptation_decay", 0.0), ("damping_adaptation_decay", 1.5), ("min_damping", 0.0),
    ("max_damping", 1e-9), ("inverse_warmup_steps", -1), ("curvature_batch_size", 0),
    ("curvature_update_every", 0), ("curvature_update_every", None),
    ("curvature_batch_size", 2.5), ("curvature_batch_size", "half"),
    ("damping", 1e-6), ("damping", 1e9),  # outside [min_damping, max_damping]
])
def test_bad_adaptive_arguments_are_refused_naming_them(argument, value):
    collection = _manual_collection(_model())
    with pytest.raises(ValueError, match=argument):
        tkfac_tf.TKFAC.adaptive(layer_collection=collection, **{argument: value})


@pytest.mark.parametrize("arguments, named", [
    (dict(curvature_update_every=2), "curvature_update_every"),
    (dict(min_damping=1e-4, curvature="approximate"), "curvature, min_damping"),
])
def test_adaptive_options_on_the_fixed_step_are_named_in_a_warning(arguments, named):
    with mock.patch.object(options_lib.logging, "warning") as warning:
        tkfac_tf.TKFAC(layer_collection=_manual_collection(_model()), **arguments)
        assert warning.call_count == 1 and warning.call_args[0][1] == named
        tkfac_tf.TKFAC(layer_collection=_manual_collection(_model()), adaptive=True, **arguments)
        tkfac_tf.TKFAC(layer_collection=_manual_collection(_model()))
        assert warning.call_count == 1


def test_amortising_the_approximate_curvature_is_refused():
    with pytest.raises(ValueError, match="curvature_update_every=2 amortises the exact"):
        tkfac_tf.TKFAC.adaptive(layer_collection=_manual_collection(_model()), curvature_update_every=2,
                                curvature="approximate")


def test_inverse_warmup_needs_the_inverse_schedule():
    with pytest.raises(ValueError, match="inverse_warmup_steps"):
        tkfac_tf.TKFAC(layer_collection=_manual_collection(_model()), inverse_warmup_steps=3,
                       inv_update_every=None)


def test_save_load_model_attach_resumes_exactly(tmp_path):
    """The .keras file keeps the adaptive state (λ, previous update,
    counters) and that the collection records the model's loss, so
    load_model + attach continues as if uninterrupted."""
    x, y = _data(3)

    def fresh():
        keras.utils.set_random_seed(7)
        model = _model()
        opt = tkfac_tf.KFAC.adaptive(layer_collection=tkfac_tf.LayerCollection.from_model(model, loss=LOSS),
                                     seed=3, damping=0.1, damping_adaptation_interval=2)
        model.compile(optimizer=opt, loss=LOSS)
        return model

    model = fresh()
    model.fit(x, y, batch_size=N, epochs=6, verbose=0)
    straight = [v.numpy() for v in model.weights]

    model = fresh()
    model.fit(x, y, batch_size=N, epochs=3, verbose=0)
    model.save(str(tmp_path / "model.keras"))
    model.optimizer.layer_collection.release()
    loaded = keras.models.load_model(str(tmp_path / "model.keras"))
    assert loaded.optimizer.adaptive is True
    assert float(loaded.optimizer.damping.numpy()) == float(model.optimizer.damping.numpy())
    loaded.optimizer.attach(loaded)
    loaded.fit(x, y, batch_size=N, epochs=3, verbose=0)
    for got, want in zip(loaded.weights, straight):
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-6, atol=1e-7)
