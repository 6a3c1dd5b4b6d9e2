"""Quick demo: an MLP on scikit-learn's 8×8 digits with TKFAC, K-FAC or SGD-m.

    python examples/demo_mlp.py --optimizer=tkfac --epochs=10
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags, logging  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402

import tkfac_tf  # noqa: E402

_OPTIMIZER = flags.DEFINE_enum("optimizer", "tkfac", ["tkfac", "kfac", "sgd"], "Optimizer.")
_EPOCHS = flags.DEFINE_integer("epochs", 10, "Epochs over the 1,797 digits.")
_BATCH = flags.DEFINE_integer("batch_size", 128, "Batch size.")
_LR = flags.DEFINE_float("learning_rate", None, "Learning rate (default per optimizer).")
_DAMPING = flags.DEFINE_float("damping", 0.01, "Damping λ (TKFAC / K-FAC).")
_SEED = flags.DEFINE_integer("seed", 0, "Random seed.")


def build_model():
    return keras.Sequential(
        [
            keras.Input((64,)),
            keras.layers.Dense(64, activation="tanh"),
            keras.layers.Dense(10),
        ]
    )


def make_optimizer(name, model, learning_rate, damping, seed):
    if name == "sgd":
        return keras.optimizers.SGD(learning_rate or 0.1, momentum=0.9)
    collection = tkfac_tf.LayerCollection()
    for layer in model.layers:
        collection.register_dense(layer)
    collection.register_categorical_predictive_distribution(model.layers[-1])
    opt_class = tkfac_tf.TKFAC if name == "tkfac" else tkfac_tf.KFAC
    return opt_class(
        learning_rate=learning_rate or 0.03, damping=damping,
        layer_collection=collection, inv_update_every=5, seed=seed,
    )


def main(argv):
    del argv
    keras.utils.set_random_seed(_SEED.value)
    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    y = digits.target.astype(np.int32)
    logging.info("Data: scikit-learn digits, %d examples of 8x8 pixels.", len(x))
    model = build_model()
    model.compile(
        optimizer=make_optimizer(_OPTIMIZER.value, model, _LR.value, _DAMPING.value, _SEED.value),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    history = model.fit(x, y, batch_size=_BATCH.value, epochs=_EPOCHS.value, verbose=2)
    for epoch, loss in enumerate(history.history["loss"], 1):
        print(f"epoch {epoch:3d}  loss {loss:.4f}")


if __name__ == "__main__":
    app.run(main)
