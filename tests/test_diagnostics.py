"""diagnostics.fisher_approximation_errors against brute force."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import tkfac_tf
from tkfac_tf import diagnostics

from tests import brute_force

N, D_IN, HIDDEN, CLASSES = 6, 3, 4, 3


def _classifier():
    model = keras.Sequential([
        keras.Input((D_IN,)),
        keras.layers.Dense(HIDDEN, activation="tanh", name="hidden"),
        keras.layers.Dense(CLASSES, name="logits"),
    ])
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    return model, tkfac_tf.LayerCollection.from_model(model, loss=loss)


def test_errors_equal_brute_force_on_a_dense_classifier():
    model, collection = _classifier()
    x = np.random.RandomState(0).randn(N, D_IN).astype(np.float32)
    errors = diagnostics.fisher_approximation_errors(model, collection, x)
    assert sorted(errors) == ["hidden", "logits"]
    samples = brute_force.exact_categorical_samples(model, x)
    for layer, (a, gs, weights) in zip(model.layers, samples):
        exact = brute_force.exact_fisher_block(model, layer, x).astype(np.float64)
        delta, phi, psi = brute_force.tkfac_reference(a, gs, weights, N)
        cov_a, cov_g = brute_force.kfac_reference(a, gs, weights, N)
        norm = np.linalg.norm(exact)
        row = errors[layer.name]
        assert row["parameters"] == exact.shape[0]
        np.testing.assert_allclose(row["trace"], np.trace(exact), rtol=1e-5)
        np.testing.assert_allclose(row["tkfac_trace"], np.trace(exact), rtol=1e-4)
        np.testing.assert_allclose(
            row["tkfac"], np.linalg.norm(delta * np.kron(phi, psi) - exact) / norm, rtol=1e-3)
        np.testing.assert_allclose(
            row["kfac"], np.linalg.norm(np.kron(cov_a, cov_g) - exact) / norm, rtol=1e-3)
        assert 0.0 < row["tkfac"] < 2.0 and 0.0 < row["kfac"] < 2.0


def test_a_one_example_batch_is_exactly_kronecker_for_both():
    """With N = 1 and one output (rank-2 logits), F = Σ_k (a aᵀ) ⊗ (g_k g_kᵀ)
    = (a aᵀ) ⊗ G, which both approximations represent exactly."""
    model, collection = _classifier()
    x = np.random.RandomState(1).randn(1, D_IN).astype(np.float32)
    errors = diagnostics.fisher_approximation_errors(model, collection, x)
    for row in errors.values():
        assert row["tkfac"] < 1e-5 and row["kfac"] < 1e-5


def test_conv_errors_equal_the_gauss_newton_reference():
    """Conv2D (positions mixed by the pooling) → Dense: the exact block is
    F = E_i J_iᵀ (diag p_i − p_i p_iᵀ) J_i, J_i = ∂logits_i/∂Θ from a dense
    jacobian (no backward vectors); F̂ from one exact covariance update."""
    keras.utils.set_random_seed(3)
    conv = keras.layers.Conv2D(3, 2, activation="tanh", name="conv")
    head = keras.layers.Dense(CLASSES, name="logits")
    model = keras.Sequential([keras.Input((3, 3, 1)), conv, keras.layers.GlobalAveragePooling2D(), head])
    collection = tkfac_tf.LayerCollection.from_model(
        model, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x = np.random.RandomState(4).randn(5, 3, 3, 1).astype(np.float32)
    errors = diagnostics.fisher_approximation_errors(model, collection, x, layers=["conv"])
    with tf.GradientTape() as tape:
        logits = model(x)
    kernel_jac, bias_jac = tape.jacobian(logits, [conv.kernel, conv.bias])
    jac = np.concatenate([kernel_jac.numpy().reshape(5, CLASSES, -1), bias_jac.numpy()], -1)
    probs = tf.nn.softmax(logits).numpy().astype(np.float64)
    exact = np.mean([j.T @ (np.diag(p) - np.outer(p, p)) @ j for j, p in zip(jac, probs)], axis=0)
    np.testing.assert_allclose(errors["conv"]["trace"], np.trace(exact), rtol=1e-4)
    for cls in (tkfac_tf.TKFAC, tkfac_tf.KFAC):
        opt = cls(layer_collection=collection, estimation_mode="exact")
        opt.build(model.trainable_variables)

        @tf.function
        def update():
            model(x, training=True)
            opt.cov_update_op()

        update()
        approx = opt.fisher_blocks["conv"].full_fisher().numpy()
        want = np.linalg.norm(approx - exact) / np.linalg.norm(exact)
        np.testing.assert_allclose(errors["conv"][cls.approximation], want, rtol=1e-3)


def test_the_optimizer_bound_to_the_collection_keeps_training():
    model, collection = _classifier()
    x = np.random.RandomState(2).randn(16, D_IN).astype(np.float32)
    y = np.arange(16) % CLASSES
    opt = tkfac_tf.TKFAC.adaptive(layer_collection=collection, cov_update_every=1)
    model.compile(optimizer=opt, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  run_eagerly=True)
    model.fit(x, y, batch_size=16, epochs=1, verbose=0)
    diagnostics.fisher_approximation_errors(model, collection, x[:4])
    before = opt.fisher_blocks["hidden"].left_factor.numpy()
    model.fit(x, y, batch_size=16, epochs=1, verbose=0)
    assert int(opt.num_cov_updates.numpy()) == 2
    assert not np.array_equal(opt.fisher_blocks["hidden"].left_factor.numpy(), before)


def test_refuses_large_and_unknown_layers():
    model, collection = _classifier()
    x = np.zeros((2, D_IN), np.float32)
    with pytest.raises(ValueError, match="'hidden' has 16 parameters.*max_parameters=10"):
        diagnostics.fisher_approximation_errors(model, collection, x, max_parameters=10)
    with pytest.raises(ValueError, match="'nope' is not a registered Kronecker layer"):
        diagnostics.fisher_approximation_errors(model, collection, x, layers=["nope"])
    assert list(diagnostics.fisher_approximation_errors(model, collection, x, layers=["logits"])) == ["logits"]
