"""Brute-force references for tests, independent of the library's code paths.

Everything here is computed from the model's weights with a GradientTape and
NumPy: per-example parameter gradients, the exact Fisher block, and the
factor statistics written straight from their definitions.
"""

import numpy as np
import tensorflow as tf


def dense_forward(model, x):
    """Manual forward pass of a Sequential of Dense layers.

    Returns (tape, activations [per layer: a with trailing 1 if bias],
    pre-activations, log-softmax of the last pre-activation, and per class c
    the summed loss Σ_i −log p_c(x_i)), with the
    pre-activations watched by the returned persistent tape.
    """
    tape = tf.GradientTape(persistent=True)
    a_list, s_list = [], []
    with tape:
        h = tf.convert_to_tensor(x, tf.float32)
        for layer in model.layers:
            a = h.numpy()
            if layer.bias is not None:
                a = np.concatenate([a, np.ones((a.shape[0], 1), np.float32)], axis=1)
            a_list.append(a)
            s = tf.matmul(h, layer.kernel) + (layer.bias if layer.bias is not None else 0.0)
            tape.watch(s)
            s_list.append(s)
            h = layer.activation(s)
        log_probs = tf.nn.log_softmax(s_list[-1])
        class_losses = [-tf.reduce_sum(log_probs[:, c]) for c in range(log_probs.shape[-1])]
    return tape, a_list, s_list, log_probs, class_losses


def exact_categorical_samples(model, x):
    """Per layer: (a [N, d_a], gs [C, N, d_g], weights p [C, N]) where
    gs[c, i] = ∂(−log p_c(x_i))/∂s_i and p[c, i] = p_c(x_i)."""
    tape, a_list, s_list, log_probs, class_losses = dense_forward(model, x)
    probs = np.exp(log_probs.numpy())
    per_layer_g = [[] for _ in s_list]
    for loss_c in class_losses:
        grads = tape.gradient(loss_c, s_list)
        for l, g in enumerate(grads):
            per_layer_g[l].append(g.numpy())
    return [(a, np.stack(gs), probs.T) for a, gs in zip(a_list, per_layer_g)]


def per_example_parameter_gradients(model, layer, x):
    """[C, N, d_a·d_g]: row-major vec of ∂(−log p_c(x_i))/∂[W; b] for one Dense
    layer of a softmax classifier, from a GradientTape jacobian."""
    params = [layer.kernel] + ([layer.bias] if layer.bias is not None else [])
    out = []
    with tf.GradientTape(persistent=True) as tape:
        log_probs = tf.nn.log_softmax(_logits(model, x))
        losses = [-log_probs[:, c] for c in range(log_probs.shape[-1])]
    for loss_c in losses:
        jac = tape.jacobian(loss_c, params)
        kernel = jac[0].numpy()  # [N, d_in, d_out]
        if len(jac) > 1:
            kernel = np.concatenate([kernel, jac[1].numpy()[:, None, :]], axis=1)
        out.append(kernel.reshape(kernel.shape[0], -1))
    return np.stack(out)


def _logits(model, x):
    h = tf.convert_to_tensor(x, tf.float32)
    for layer in model.layers:
        s = tf.matmul(h, layer.kernel) + (layer.bias if layer.bias is not None else 0.0)
        h = layer.activation(s)
    return s


def exact_fisher_block(model, layer, x):
    """E_i Σ_c p_c(x_i) v v ᵀ with v the per-example parameter gradient."""
    grads = per_example_parameter_gradients(model, layer, x)  # [C, N, P]
    probs = tf.nn.softmax(_logits(model, x)).numpy().T  # [C, N]
    n = grads.shape[1]
    return np.einsum("cn,cnp,cnq->pq", probs, grads, grads) / n


def tkfac_reference(a, gs, weights, n):
    """δ, Φ, Ψ from their definitions with sample weights w (Σ over c, i)."""
    a_sq = (a**2).sum(-1)  # [N]
    g_sq = (gs**2).sum(-1)  # [C, N]
    delta = (weights * a_sq[None] * g_sq).sum() / n
    phi = np.einsum("ci,ci,ij,ik->jk", weights, g_sq, a, a) / (n * delta)
    psi = np.einsum("ci,i,cij,cik->jk", weights, a_sq, gs, gs) / (n * delta)
    return delta, phi, psi


def kfac_reference(a, gs, weights, n):
    """A = Σ_i a aᵀ / N, G = Σ_{c,i} w g gᵀ / N."""
    return a.T @ a / n, np.einsum("ci,cij,cik->jk", weights, gs, gs) / n


def sample_statistics(a, g, num_examples):
    """NumPy sums with every (outcome k, example i, use/position t) a sample.

    a: [N, T, d_a]; g: [K, N, T, d_g]. Returns δ, Φ, Ψ, A, G from their definitions (docs/math.md).
    """
    a = a.astype(np.float64)
    g = g.astype(np.float64)
    num_positions = a.shape[1]
    a_sq = np.sum(a**2, axis=-1)  # [N, T]
    g_sq = np.sum(g**2, axis=-1)  # [K, N, T]
    delta = np.sum(a_sq[None] * g_sq) / num_examples
    phi = np.einsum("kit,ita,itb->ab", g_sq, a, a) / (num_examples * delta)
    psi = np.einsum("it,kitc,kitd->cd", a_sq, g, g) / (num_examples * delta)
    cov_a = np.einsum("ita,itb->ab", a, a) / num_examples
    cov_g = np.einsum("kitc,kitd->cd", g, g) / (num_examples * num_positions)
    return delta, phi, psi, cov_a, cov_g


def check_blocks(tkfac_block, kfac_block, expected):
    """The blocks' statistics after one covariance update equal ``expected``
    (``sample_statistics``), and tr of the TKFAC block = δ."""
    delta, phi, psi, cov_a, cov_g = expected
    np.testing.assert_allclose(tkfac_block.delta.numpy(), delta, rtol=1e-4)
    np.testing.assert_allclose(tkfac_block.phi.numpy(), phi, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(tkfac_block.psi.numpy(), psi, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(
        np.trace(tkfac_block.full_fisher().numpy()), delta, rtol=1e-4
    )
    np.testing.assert_allclose(kfac_block.cov_a.numpy(), cov_a, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(kfac_block.cov_g.numpy(), cov_g, rtol=1e-4, atol=1e-7)
