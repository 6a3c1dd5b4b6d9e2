"""Layer registration and optimizer construction shared by the examples."""

import keras
import tkfac_tf

OPTIMIZERS = ("tkfac", "kfac", "adam", "sgd")


def layer_collection_for(model, distribution):
    """A LayerCollection with every Dense (and Conv2D) layer of ``model``.

    Args:
      model: a built Keras model whose last layer produces the logits.
      distribution: 'bernoulli' (sigmoid cross-entropy) or 'categorical'
        (softmax cross-entropy); registered on the model's last layer.
    """
    collection = tkfac_tf.LayerCollection()
    for layer in model.layers:
        if isinstance(layer, keras.layers.Dense):
            collection.register_dense(layer)
        elif isinstance(layer, keras.layers.Conv2D):
            if not hasattr(collection, "register_conv2d"):
                raise NotImplementedError(
                    "This tkfac_tf has no LayerCollection.register_conv2d (Conv2D support)."
                )
            collection.register_conv2d(layer)
    output = model.layers[-1]
    if distribution == "bernoulli":
        collection.register_multi_bernoulli_predictive_distribution(output)
    elif distribution == "categorical":
        collection.register_categorical_predictive_distribution(output)
    else:
        raise ValueError(f"distribution must be 'bernoulli' or 'categorical'; got {distribution!r}.")
    return collection


def make_optimizer(name, model=None, distribution=None, learning_rate=1e-3, damping=1e-3,
                   momentum=0.9, norm_constraint=None, cov_update_every=1,
                   inv_update_every=20, cov_ema_decay=0.95, seed=0):
    """One of OPTIMIZERS. ``model`` / ``distribution`` are needed by tkfac / kfac
    (their layers are registered here); damping, the schedule and the norm
    constraint only apply to them."""
    if name in ("tkfac", "kfac"):
        cls = tkfac_tf.TKFAC if name == "tkfac" else tkfac_tf.KFAC
        return cls(
            learning_rate=learning_rate,
            damping=damping,
            layer_collection=layer_collection_for(model, distribution),
            momentum=momentum,
            cov_ema_decay=cov_ema_decay,
            cov_update_every=cov_update_every,
            inv_update_every=inv_update_every,
            norm_constraint=norm_constraint,
            seed=seed,
        )
    if name == "adam":
        return keras.optimizers.Adam(learning_rate=learning_rate)
    if name == "sgd":
        return keras.optimizers.SGD(learning_rate=learning_rate, momentum=momentum)
    raise ValueError(f"optimizer must be one of {OPTIMIZERS}; got {name!r}.")
