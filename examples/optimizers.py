"""Layer registration and optimizer construction shared by the examples."""

import keras
import tkfac_tf

OPTIMIZERS = ("tkfac_adaptive", "kfac_adaptive", "tkfac", "kfac", "adam", "sgd")
# Learning rate, momentum and damping chosen by the optimizer every step
# (library defaults; the hyperparameter arguments of make_optimizer are ignored).
ADAPTIVE = ("tkfac_adaptive", "kfac_adaptive")


# The loss each output distribution is registered from (from_model maps it to
# the predictive distribution): sigmoid cross-entropy -> multi-Bernoulli,
# softmax cross-entropy -> categorical. Summing instead of averaging over
# pixels (the autoencoder) scales the loss but leaves the distribution as is.
REGISTRATION_LOSSES = {
    "bernoulli": keras.losses.BinaryCrossentropy(from_logits=True),
    "categorical": keras.losses.SparseCategoricalCrossentropy(from_logits=True),
}


def layer_collection_for(model, distribution):
    """Every supported layer (Dense, the conv family) of ``model`` and the predictive distribution
    ('bernoulli' or 'categorical') on the layer that produces its logits."""
    if distribution not in REGISTRATION_LOSSES:
        raise ValueError(f"distribution must be 'bernoulli' or 'categorical'; got {distribution!r}.")
    return tkfac_tf.LayerCollection.from_model(model, loss=REGISTRATION_LOSSES[distribution])


def _collection(model, distribution):
    return None if model is None else layer_collection_for(model, distribution)


def make_optimizer(name, model=None, distribution=None, learning_rate=1e-3, damping=1e-3,
                   momentum=0.9, norm_constraint=None, cov_update_every=1,
                   inv_update_every=20, cov_ema_decay=0.95, seed=0, step_options=None):
    """One of OPTIMIZERS. The TKFAC / K-FAC family registers ``model``'s layers
    with the predictive ``distribution`` here, or, with ``model=None``, when
    it is compiled into a model (the compiled loss gives the distribution);
    damping, the schedule and
    the norm constraint only apply to tkfac / kfac. The adaptive ones take the
    library defaults for everything but the seed. ``step_options``: extra
    keyword arguments of the whole TKFAC / K-FAC family, adaptive included
    (the cost-of-the-step options, e.g. ``cov_batch_size``, ``matmul_dtype``)."""
    step_options = dict(step_options or {})
    if name in ADAPTIVE:
        cls = tkfac_tf.TKFAC if name == "tkfac_adaptive" else tkfac_tf.KFAC
        return cls.adaptive(layer_collection=_collection(model, distribution), seed=seed, **step_options)
    if name in ("tkfac", "kfac"):
        cls = tkfac_tf.TKFAC if name == "tkfac" else tkfac_tf.KFAC
        return cls(
            learning_rate=learning_rate,
            damping=damping,
            layer_collection=_collection(model, distribution),
            momentum=momentum,
            cov_ema_decay=cov_ema_decay,
            cov_update_every=cov_update_every,
            inv_update_every=inv_update_every,
            norm_constraint=norm_constraint,
            seed=seed,
            **step_options,
        )
    if name == "adam":
        return keras.optimizers.Adam(learning_rate=learning_rate)
    if name == "sgd":
        return keras.optimizers.SGD(learning_rate=learning_rate, momentum=momentum)
    raise ValueError(f"optimizer must be one of {OPTIMIZERS}; got {name!r}.")
