"""Shared flags and the compile/fit driver of the Keras-style examples."""

import keras
from absl import flags
from absl import logging

import mnist_data
import optimizers

FLAGS = flags.FLAGS


def define_flags(learning_rate, damping, norm_constraint, steps, batch_size):
    """Flags common to the fit-based examples, with per-example defaults."""
    mnist_data.define_flags()
    flags.DEFINE_enum("optimizer", "tkfac", optimizers.OPTIMIZERS, "Optimizer.")
    flags.DEFINE_float("learning_rate", learning_rate, "Learning rate α.")
    flags.DEFINE_float("damping", damping, "Damping λ (tkfac / kfac).")
    flags.DEFINE_float("norm_constraint", norm_constraint, "KL-clipping bound (tkfac / kfac); 0 turns it off.")
    flags.DEFINE_float("momentum", 0.9, "Momentum τ (tkfac / kfac / sgd).")
    flags.DEFINE_integer("cov_update_every", 1, "Covariance-update interval (tkfac / kfac).")
    flags.DEFINE_integer("inv_update_every", 5, "Inverse-update interval (tkfac / kfac).")
    flags.DEFINE_integer("steps", steps, "Training steps.")
    flags.DEFINE_integer("batch_size", batch_size, "Batch size.")
    flags.DEFINE_integer("seed", 0, "Seed of weights, batch order and Fisher samples.")


def options_from_flags():
    """The keyword arguments of ``fit_and_report`` set by the flags."""
    return dict(
        optimizer=FLAGS.optimizer,
        learning_rate=FLAGS.learning_rate,
        damping=FLAGS.damping,
        norm_constraint=FLAGS.norm_constraint or None,
        momentum=FLAGS.momentum,
        cov_update_every=FLAGS.cov_update_every,
        inv_update_every=FLAGS.inv_update_every,
        steps=FLAGS.steps,
        batch_size=FLAGS.batch_size,
        seed=FLAGS.seed,
    )


def fit_and_report(model, distribution, loss, x_train, y_train, x_eval, y_eval, optimizer="tkfac",
                   learning_rate=1e-3, damping=1e-3, norm_constraint=None, momentum=0.9,
                   cov_update_every=1, inv_update_every=5, steps=100, batch_size=100, seed=0,
                   metrics=(), verbose=1):
    """Compiles ``model`` with the chosen optimizer, fits it for ``steps`` steps
    and returns {'initial': ..., 'final': ...} evaluation results (dicts of
    metric name -> value) on (x_eval, y_eval)."""
    opt = optimizers.make_optimizer(
        optimizer, model=model, distribution=distribution, learning_rate=learning_rate,
        damping=damping, momentum=momentum, norm_constraint=norm_constraint,
        cov_update_every=cov_update_every, inv_update_every=inv_update_every, seed=seed,
    )
    model.compile(optimizer=opt, loss=loss, metrics=list(metrics))
    initial = model.evaluate(x_eval, y_eval, batch_size=1000, verbose=0, return_dict=True)
    logging.info("Before training (%s): %s", optimizer, _fmt(initial))
    per_epoch = len(x_train) // batch_size
    epochs = -(-steps // per_epoch)
    keras.utils.set_random_seed(seed)
    model.fit(x_train, y_train, batch_size=batch_size, epochs=epochs, steps_per_epoch=None,
              shuffle=True, verbose=verbose, callbacks=[_StopAfter(steps)])
    final = model.evaluate(x_eval, y_eval, batch_size=1000, verbose=0, return_dict=True)
    logging.info("After %d steps (%s): %s", steps, optimizer, _fmt(final))
    return {"initial": initial, "final": final}


class _StopAfter(keras.callbacks.Callback):
    """Stops fit after a number of batches."""

    def __init__(self, steps):
        super().__init__()
        self.steps, self.seen = steps, 0

    def on_train_batch_end(self, batch, logs=None):
        self.seen += 1
        if self.seen >= self.steps:
            self.model.stop_training = True


def _fmt(results):
    return ", ".join(f"{k} {v:.4f}" for k, v in results.items())


def train_classifier(build_model, data, **options):
    """Fits a softmax classifier (logits output) on the training split and
    evaluates it on the test split; ``options`` as for ``fit_and_report``."""
    model = build_model(seed=options.get("seed", 0))
    return fit_and_report(
        model, "categorical", keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        data.x_train, data.y_train, data.x_test, data.y_test,
        metrics=["sparse_categorical_accuracy"], **options,
    )
