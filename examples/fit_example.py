"""Shared flags and the compile/fit driver of the Keras-style examples."""

import keras
import tensorflow as tf
from absl import flags
from absl import logging

from examples import mnist_data
from examples import optimizers

FLAGS = flags.FLAGS
FIRST_ORDER_LEARNING_RATE = 1e-3  # adam / sgd default: the benchmark's best on the autoencoder
_DEFAULTS = {}


def define_flags(learning_rate, damping, norm_constraint, steps, batch_size, flag_values=FLAGS):
    """Flags common to the fit-based examples, with per-example defaults; each
    is validated when the command line is parsed (e.g. --steps >= 1: Keras
    reads steps_per_epoch=0 on a repeated dataset as "no limit")."""
    fv = dict(flag_values=flag_values)
    mnist_data.define_flags(**fv)
    flags.DEFINE_enum("optimizer", "tkfac", optimizers.OPTIMIZERS, "Optimizer.", **fv)
    flags.DEFINE_float("learning_rate", None, f"Learning rate α >= 0 (default: {learning_rate} for tkfac / kfac, "
                       f"{FIRST_ORDER_LEARNING_RATE} for adam / sgd).", lower_bound=0.0, **fv)
    _DEFAULTS["second_order_learning_rate"] = learning_rate
    flags.DEFINE_float("damping", damping, "Damping λ > 0 (tkfac / kfac).", **fv)
    flags.DEFINE_float("norm_constraint", norm_constraint, "KL-clipping bound >= 0 (tkfac / kfac); 0 turns it off.",
                       lower_bound=0.0, **fv)
    flags.DEFINE_float("momentum", 0.9, "Momentum τ in [0, 1) (tkfac / kfac / sgd).", lower_bound=0.0, **fv)
    flags.DEFINE_integer("cov_update_every", 1, "Covariance-update interval >= 1 (tkfac / kfac).", lower_bound=1, **fv)
    flags.DEFINE_integer("inv_update_every", 5, "Inverse-update interval >= 1 (tkfac / kfac).", lower_bound=1, **fv)
    flags.DEFINE_integer("steps", steps, "Training steps (>= 1).", lower_bound=1, **fv)
    flags.DEFINE_integer("batch_size", batch_size, "Batch size (>= 1).", lower_bound=1, **fv)
    flags.DEFINE_integer("seed", 0, "Seed (>= 0) of weights, batch order and Fisher samples.", lower_bound=0, **fv)
    flags.DEFINE_enum("damping_split", None, ["sqrt", "pi"],
                      "TKFAC / K-FAC damping_split (default: each approximation's own rule).", **fv)
    mnist_data.register_open_bounds(flag_values, greater_than_zero=["damping"], below_one=["momentum"])


def options_from_flags():
    """The keyword arguments of ``fit_and_report`` set by the flags."""
    return dict(
        optimizer=FLAGS.optimizer,
        learning_rate=_learning_rate_from_flags(),
        damping=FLAGS.damping,
        norm_constraint=FLAGS.norm_constraint or None,
        momentum=FLAGS.momentum,
        cov_update_every=FLAGS.cov_update_every,
        inv_update_every=FLAGS.inv_update_every,
        steps=FLAGS.steps,
        batch_size=FLAGS.batch_size,
        seed=FLAGS.seed,
        damping_split=FLAGS.damping_split,
    )


def _learning_rate_from_flags():
    if FLAGS.learning_rate is not None:
        return FLAGS.learning_rate
    if FLAGS.optimizer in ("tkfac", "kfac"):
        return _DEFAULTS["second_order_learning_rate"]
    return FIRST_ORDER_LEARNING_RATE


def fit_and_report(model, distribution, loss, x_train, y_train, x_eval, y_eval, optimizer="tkfac",
                   learning_rate=1e-3, damping=1e-3, norm_constraint=None, momentum=0.9,
                   cov_update_every=1, inv_update_every=5, steps=100, batch_size=100, seed=0,
                   damping_split=None, metrics=(), verbose=1):
    """Compiles ``model`` with the chosen optimizer, fits it for ``steps`` steps
    (TKFAC / K-FAC: ``distribution`` registers the model's layers with that
    predictive distribution; None: compile() registers them from ``loss``)
    and returns {'initial': ..., 'final': ...} evaluation results (dicts of
    metric name -> value) on (x_eval, y_eval)."""
    opt = optimizers.make_optimizer(
        optimizer, model=model if distribution else None, distribution=distribution, learning_rate=learning_rate,
        damping=damping, momentum=momentum, norm_constraint=norm_constraint,
        cov_update_every=cov_update_every, inv_update_every=inv_update_every, seed=seed,
        step_options=None if damping_split is None else {"damping_split": damping_split},
    )
    model.compile(optimizer=opt, loss=loss, metrics=list(metrics))
    initial = model.evaluate(x_eval, y_eval, batch_size=1000, verbose=0, return_dict=True)
    logging.info("Before training (%s): %s", optimizer, _fmt(initial))
    if batch_size > len(x_train):
        raise ValueError(f"batch_size {batch_size} exceeds the {len(x_train)} training examples.")
    batches = (
        tf.data.Dataset.from_tensor_slices((x_train, y_train))
        .shuffle(len(x_train), seed=seed)
        .repeat()
        .batch(batch_size, drop_remainder=True)
    )
    model.fit(batches, epochs=1, steps_per_epoch=steps, shuffle=False, verbose=verbose)
    final = model.evaluate(x_eval, y_eval, batch_size=1000, verbose=0, return_dict=True)
    logging.info("After %d steps (%s): %s", steps, optimizer, _fmt(final))
    return {"initial": initial, "final": final}


def _fmt(results):
    return ", ".join(f"{k} {v:.4f}" for k, v in results.items())


def train_classifier(build_model, data, **options):
    """Fits a softmax classifier (logits output) on the training split and
    evaluates it on the test split; ``options`` as for ``fit_and_report``."""
    model = build_model(seed=options.get("seed", 0))
    return fit_and_report(
        model, None, keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        data.x_train, data.y_train, data.x_test, data.y_test,
        metrics=["sparse_categorical_accuracy"], **options,
    )
