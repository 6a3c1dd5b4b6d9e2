"""Every block kind, built by ``make_block`` from a layer collection entry,
implements the ``FisherBlock`` interface: its sums and statistics have the
factors' structure, ``multiply_fisher`` is its dense ``full_fisher``, and
``multiply_inverse`` is the inverse of F̂ plus a damping term that is
positive semi-definite and vanishes with λ (checked by dense inversion in
float64)."""

import numpy as np
import pytest
import tensorflow as tf

from tkfac_tf import fisher_blocks

# One entry per structure, as LayerCollection.get_config()['layers'] writes them.
ENTRIES = {
    "dense": {"layer": "dense", "input_size": 4, "output_size": 3, "is_convolution": False},
    "grouped_conv": {"layer": "conv", "input_size": 3, "output_size": 2, "is_convolution": True,
                     "groups": 2},
    "separable_conv": {"layer": "separable", "input_size": 3, "output_size": 2, "is_convolution": True,
                       "parts": [{"input_size": 2, "output_size": 1, "groups": 2},
                                 {"input_size": 3, "output_size": 2, "groups": 1}]},
    "embedding": {"layer": "embedding", "structure": "embedding", "input_size": 5, "output_size": 3,
                  "is_convolution": False},
    "scale_and_shift": {"layer": "norm", "structure": "scale_and_shift", "input_size": 3,
                        "output_size": 2, "is_convolution": False},
    "diagonal": {"layer": "scale", "structure": "diagonal", "input_size": 6, "output_size": 1,
                 "is_convolution": False},
    "full": {"layer": "bias", "structure": "full", "input_size": 5, "output_size": 1,
             "is_convolution": False},
}


def _add_variable(shape, initializer, name):
    init = initializer
    if init == "identity":
        value = np.broadcast_to(np.eye(shape[-1]), shape)
    elif init in ("zeros", "ones"):
        value = np.full(shape, 0.0 if init == "zeros" else 1.0)
    else:
        value = init(shape).numpy()
    return tf.Variable(np.asarray(value, np.float32), name=name)


def _gradient_shapes(block):
    """The shape(s) of the ∇Θ matrix the block multiplies."""
    if isinstance(block, fisher_blocks.MultiPartBlock):
        return [shape for part in block.parts for shape in _gradient_shapes(part)]
    if isinstance(block, (fisher_blocks.DiagonalBlock, fisher_blocks.FullBlock)):
        return [(block.input_size,)]
    if isinstance(block, fisher_blocks.ScaleAndShiftBlock):
        return [(block.input_size, block.output_size)]
    groups = getattr(block, "groups", None)
    return [(groups, block.input_size, block.output_size) if groups else
            (block.input_size, block.output_size)]


def _fill_factors(block, rng):
    """Random positive definite running averages with eigenvalues in about
    [1, 3] (F̂'s condition number ≲ 10: float32 inverses exact to ~1e-6)."""
    for variable in block.factor_variables:
        shape = variable.shape
        if len(shape) >= 2 and shape[-1] == shape[-2]:
            a = rng.randn(*shape)
            value = np.einsum("...ij,...kj->...ik", a, a) / (2 * shape[-1]) + np.eye(shape[-1])
        else:
            value = rng.uniform(1.0, 2.0, shape)
        variable.assign(value.astype(np.float32))


def _apply(fn, block, flat):
    """fn on the ∇Θ shapes of ``block`` of the flat vector, flattened back."""
    shapes = _gradient_shapes(block)
    pieces, start = [], 0
    for shape in shapes:
        size = int(np.prod(shape))
        pieces.append(tf.constant(flat[start:start + size].reshape(shape), tf.float32))
        start += size
    out = fn(tuple(pieces) if len(pieces) > 1 else pieces[0])
    out = out if isinstance(out, (tuple, list)) else [out]
    return np.concatenate([np.asarray(o, np.float64).reshape(-1) for o in out])


def _dense(fn, block, size):
    return np.stack([_apply(fn, block, np.eye(size)[i]) for i in range(size)], axis=1)


@pytest.mark.parametrize("approximation", ["tkfac", "kfac"])
@pytest.mark.parametrize("structure", list(ENTRIES))
def test_every_block_implements_the_interface(approximation, structure):
    block = fisher_blocks.make_block(approximation, ENTRIES[structure], _add_variable)
    assert isinstance(block, fisher_blocks.FisherBlock)
    _fill_factors(block, np.random.RandomState(0))

    # Sums of an empty batch -> statistics shaped like the running averages.
    statistics = block.statistics_from_sums(block.zero_sums())
    assert [tuple(s.shape) for s in statistics] == [tuple(v.shape) for v in block.factor_variables]

    fisher = np.asarray(block.full_fisher(), np.float64)
    size = fisher.shape[0]
    assert size == sum(int(np.prod(s)) for s in _gradient_shapes(block))
    np.testing.assert_allclose(_dense(block.multiply_fisher, block, size), fisher, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(float(block.trace()), np.trace(fisher), rtol=1e-5)

    damping_norms = []
    for damping in (1e-1, 1e-3, 1e-8):
        block.update_inverse(tf.constant(damping))
        inverse = _dense(block.multiply_inverse, block, size)
        np.testing.assert_allclose(inverse, inverse.T, rtol=1e-5, atol=1e-6)
        # The damped F̂ the preconditioner inverts: F̂ + D(λ), D ⪰ 0.
        damping_term = np.linalg.inv(0.5 * (inverse + inverse.T)) - fisher
        scale = np.linalg.norm(fisher, 2)
        # float32 inverses of F̂ + D (condition ≲ 10): D is known to ~1e-5·‖F̂‖,
        # so a bound 10× that; a wrong inverse is off by far more.
        assert np.linalg.eigvalsh(0.5 * (damping_term + damping_term.T)).min() >= -1e-4 * scale
        damping_norms.append(np.linalg.norm(damping_term, 2) / scale)
    # D(λ) is of order √λ·‖F̂‖ or λ: it shrinks with λ, and at λ = 1e-8 the
    # preconditioner is F̂⁻¹ to 1e-3 (√λ = 1e-4; a 1 % error in any part of
    # the inverse would show).
    assert damping_norms[2] < damping_norms[1] / 5 < damping_norms[0] / 25, damping_norms
    assert damping_norms[2] < 1e-3, damping_norms


@pytest.mark.parametrize("damping_mode", ["plain", "trace_scaled"])
@pytest.mark.parametrize("approximation", ["tkfac", "kfac"])
@pytest.mark.parametrize("structure", list(ENTRIES))
def test_eigenbasis_snapshot_is_damped_with_the_current_damping(approximation, structure, damping_mode):
    """inverse_method='eigenbasis': the identity before the first snapshot;
    after it, multiply_inverse(∇, λ₂) is the damped inverse at λ₂ of the
    factors at the snapshot (later changes of the running averages wait for
    the next snapshot), whatever λ was when it was taken: the Cholesky
    block's inverse of the same factors re-inverted at λ₂."""
    entry = ENTRIES[structure]
    eigen = fisher_blocks.make_block(approximation, entry, _add_variable, damping_mode=damping_mode,
                                     inverse_method="eigenbasis")
    reference = fisher_blocks.make_block(approximation, entry, _add_variable, damping_mode=damping_mode)
    assert eigen.inverse_method == "eigenbasis"
    _fill_factors(eigen, np.random.RandomState(0))
    _fill_factors(reference, np.random.RandomState(0))
    size = np.asarray(reference.full_fisher()).shape[0]

    np.testing.assert_allclose(_dense(lambda m: eigen.multiply_inverse(m, 0.1), eigen, size),
                               np.eye(size), atol=1e-7)
    with pytest.raises(ValueError, match="needs the damping"):
        eigen.multiply_inverse(tf.zeros(_gradient_shapes(eigen)[0])) if structure != "separable_conv" \
            else eigen.multiply_inverse(tuple(tf.zeros(s) for s in _gradient_shapes(eigen)))

    eigen.update_inverse(tf.constant(1.0))  # the snapshot; its λ plays no part
    _fill_factors(eigen, np.random.RandomState(1))  # newer averages, not yet snapshot
    for damping in (1e-1, 1e-3):
        reference.update_inverse(tf.constant(damping))
        want = _dense(reference.multiply_inverse, reference, size)
        got = _dense(lambda m: eigen.multiply_inverse(m, tf.constant(damping)), eigen, size)
        # Both are float32 inverses of the same damped matrix, whose
        # condition is ≲ 10 (factor eigenvalues in [1, 3]): they agree to
        # ~1e-6; ignoring λ₂ or taking the newer averages is off by > 1e-2.
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
