r"""TKFAC in the structure tf.estimator users know, on TF2: input_fn, model_fn,
a --model_dir with checkpoints and TensorBoard summaries, train-until-max_steps.

  python -m examples.estimator_style_mnist --model_dir=/tmp/tkfac_mnist --max_steps=500
  (run it again with a larger --max_steps: it resumes where it stopped)
  tensorboard --logdir=/tmp/tkfac_mnist

The optimizer's three parts are driven by hand inside one ``tf.function``
step (the automatic schedule is off): on steps k with
k % --cov_update_every == 0 the covariance update, on k % --inv_update_every
== 0 the inverse update, then the preconditioned update. k is the
optimizer's ``iterations`` counter, which is checkpointed, so a resumed run
keeps the schedule.

Checkpoints (``tf.train.CheckpointManager``) hold the model and the optimizer:
its iterations, momenta, damping and every Fisher block's factors and
inverses are optimizer variables and are saved and restored with it. The
batch of step k is a pure function of (seed, k) (``input_fn`` starts at the
restored step), so stopping after k steps and restarting reproduces an
uninterrupted run exactly.

The one departure from tf.estimator: Keras models and optimizers must be
created outside traced functions, so ``create_model_and_optimizer`` builds
them once and ``model_fn`` receives them in ``params["model"]`` /
``params["optimizer"]``.
"""

import collections
import os

import numpy as np
import tensorflow as tf
from absl import app
from absl import flags
from absl import logging

import tkfac_tf
from tkfac_tf.optimizer import ADAPTIVE_DEFAULTS

from examples import mnist_data
from examples import models
from examples import optimizers
from examples import training

FLAGS = flags.FLAGS

TRAIN, EVAL = "train", "eval"

EstimatorSpec = collections.namedtuple("EstimatorSpec", ["mode", "loss", "metrics"])


def define_flags(flag_values=FLAGS):
    """The flags, each validated when the command line is parsed."""
    fv = dict(flag_values=flag_values)
    mnist_data.define_flags(**fv)
    flags.DEFINE_string("model_dir", None, "Checkpoints and summaries go here; an existing run resumes.", **fv)
    flags.mark_flag_as_required("model_dir", **fv)
    flags.register_validator("model_dir", lambda v: v is None or bool(v.strip()),
                             message="--model_dir must not be empty.", **fv)
    flags.DEFINE_enum("optimizer", "tkfac", ("tkfac", "kfac") + optimizers.ADAPTIVE,
                      "Kronecker-factored optimizer; the *_adaptive ones choose the learning rate, "
                      "momentum and damping themselves (--learning_rate, --damping, --momentum and "
                      "--norm_constraint are then unused).", **fv)
    flags.DEFINE_integer("max_steps", 500, "Train until the global step reaches this (>= 1).", lower_bound=1, **fv)
    flags.DEFINE_integer("batch_size", 100, "Batch size (>= 1).", lower_bound=1, **fv)
    flags.DEFINE_float("learning_rate", 0.3, "Learning rate α >= 0.", lower_bound=0.0, **fv)
    flags.DEFINE_float("damping", 0.03, "Damping λ > 0.", **fv)
    flags.DEFINE_float("norm_constraint", 0.01, "KL-clipping bound >= 0; 0 turns it off.", lower_bound=0.0, **fv)
    flags.DEFINE_float("momentum", 0.9, "Momentum τ in [0, 1).", lower_bound=0.0, **fv)
    flags.DEFINE_integer("cov_update_every", 1, "Covariance update on steps k % this == 0 (>= 1).", lower_bound=1, **fv)
    flags.DEFINE_integer("inv_update_every", 5, "Inverse update on steps k % this == 0 (>= 1).", lower_bound=1, **fv)
    flags.DEFINE_integer("eval_every", 100, "Evaluate on the test split every this many steps (>= 1).",
                         lower_bound=1, **fv)
    flags.DEFINE_integer("save_every", 100, "Save a checkpoint every this many steps (>= 1).", lower_bound=1, **fv)
    flags.DEFINE_integer("log_every", 10, "Write training summaries every this many steps (>= 1).",
                         lower_bound=1, **fv)
    flags.DEFINE_integer("seed", 0, "Seed (>= 0) of weights, batch order and Fisher samples.", lower_bound=0, **fv)
    mnist_data.register_open_bounds(flag_values, greater_than_zero=["damping"], below_one=["momentum"])


def params_from_flags():
    return dict(
        optimizer=FLAGS.optimizer, max_steps=FLAGS.max_steps, batch_size=FLAGS.batch_size,
        learning_rate=FLAGS.learning_rate, damping=FLAGS.damping,
        norm_constraint=FLAGS.norm_constraint or None, momentum=FLAGS.momentum,
        cov_update_every=FLAGS.cov_update_every, inv_update_every=FLAGS.inv_update_every,
        eval_every=FLAGS.eval_every, save_every=FLAGS.save_every, log_every=FLAGS.log_every,
        seed=FLAGS.seed,
    )


def input_fn(mode, params, data, start_step=0):
    """tf.data.Dataset of (features, labels).

    TRAIN: one batch per step from ``start_step`` to ``params['max_steps']``,
    the batch of step k fixed by (seed, k). EVAL: the test split once.
    """
    if mode == EVAL:
        return tf.data.Dataset.from_tensor_slices((data.x_test, data.y_test)).batch(1000)
    x, y = tf.constant(data.x_train), tf.constant(data.y_train)
    indices = np.stack([
        training.batch_indices(len(data.x_train), params["batch_size"], k, params["seed"])
        for k in range(start_step, params["max_steps"])
    ]).astype(np.int32) if params["max_steps"] > start_step else np.zeros((0, params["batch_size"]), np.int32)
    return tf.data.Dataset.from_tensor_slices(indices).map(lambda i: (tf.gather(x, i), tf.gather(y, i)))


def create_model_and_optimizer(params):
    """The MLP and a TKFAC / K-FAC optimizer (fixed-step or adaptive) with the
    automatic schedule off, built."""
    model = models.build_mlp(seed=params["seed"])
    if params["optimizer"] in optimizers.ADAPTIVE:
        cls = tkfac_tf.TKFAC if params["optimizer"] == "tkfac_adaptive" else tkfac_tf.KFAC
        optimizer = cls.adaptive(
            layer_collection=optimizers.layer_collection_for(model, "categorical"),
            cov_update_every=None, inv_update_every=None, inverse_warmup_steps=0, seed=params["seed"],
        )
    else:
        optimizer = optimizers.make_optimizer(
            params["optimizer"], model=model, distribution="categorical",
            learning_rate=params["learning_rate"], damping=params["damping"],
            momentum=params["momentum"], norm_constraint=params["norm_constraint"],
            cov_update_every=None, inv_update_every=None, seed=params["seed"],
        )
    optimizer.build(model.trainable_variables)
    return model, optimizer


def model_fn(features, labels, mode, params):
    """One training step (TRAIN) or one evaluation batch (EVAL); call it inside a tf.function."""
    model, optimizer = params["model"], params["optimizer"]
    if mode == EVAL:
        logits = model(features, training=False)
        return EstimatorSpec(mode, models.classifier_loss(labels, logits),
                             {"accuracy": models.accuracy(labels, logits)})
    variables = model.trainable_variables

    def loss_fn():
        return models.classifier_loss(labels, model(features, training=True))

    with tf.GradientTape() as tape:
        logits = model(features, training=True)
        loss = models.classifier_loss(labels, logits)
    grads = tape.gradient(loss, variables)
    step = optimizer.iterations

    def run(fn):
        def branch():
            fn()
            return tf.constant(True)
        return branch

    # Adaptive: inverses on every step of a short warm-up too, as the
    # library's own schedule does (ADAPTIVE_DEFAULTS["inverse_warmup_steps"]).
    warmup = ADAPTIVE_DEFAULTS["inverse_warmup_steps"] if optimizer.adaptive else 0
    tf.cond(step % params["cov_update_every"] == 0, run(optimizer.cov_update_op), lambda: tf.constant(False))
    tf.cond((step % params["inv_update_every"] == 0) | (step < warmup), run(optimizer.inv_update_op),
            lambda: tf.constant(False))
    # The adaptive step re-evaluates this batch's loss (curvature, damping).
    optimizer.apply_gradients(zip(grads, variables), loss_fn=loss_fn if optimizer.adaptive else None)
    return EstimatorSpec(mode, loss, {"accuracy": models.accuracy(labels, logits)})


def evaluate(eval_step, dataset):
    """Example-weighted means of the EVAL spec's loss and metrics."""
    totals, count = collections.defaultdict(float), 0
    for features, labels in dataset:
        loss, metrics = eval_step(features, labels)
        n = int(features.shape[0])
        totals["loss"] += float(loss) * n
        for name, value in metrics.items():
            totals[name] += float(value) * n
        count += n
    return {name: total / count for name, total in totals.items()}


def train_and_evaluate(model_dir, params, data):
    """Trains until params['max_steps'] (resuming from model_dir); returns the
    last evaluation (dict) and the model and optimizer."""
    params = dict(params)
    model, optimizer = create_model_and_optimizer(params)
    params.update(model=model, optimizer=optimizer)
    checkpoint = tf.train.Checkpoint(model=model, optimizer=optimizer)
    manager = tf.train.CheckpointManager(checkpoint, model_dir, max_to_keep=3)
    if manager.latest_checkpoint:
        checkpoint.restore(manager.latest_checkpoint).assert_existing_objects_matched()
        logging.info("Restored %s at step %d", manager.latest_checkpoint, int(optimizer.iterations))
    else:
        logging.info("No checkpoint in %s: starting at step 0", model_dir)
    start = int(optimizer.iterations)
    train_writer = tf.summary.create_file_writer(os.path.join(model_dir, "train"))
    eval_writer = tf.summary.create_file_writer(os.path.join(model_dir, "eval"))

    @tf.function
    def train_step(features, labels):
        spec = model_fn(features, labels, TRAIN, params)
        return spec.loss, spec.metrics

    @tf.function
    def eval_step(features, labels):
        spec = model_fn(features, labels, EVAL, params)
        return spec.loss, spec.metrics

    result = {}
    step = start
    for features, labels in input_fn(TRAIN, params, data, start_step=start):
        loss, metrics = train_step(features, labels)
        step = int(optimizer.iterations)
        if step % params["log_every"] == 0:
            with train_writer.as_default():
                tf.summary.scalar("loss", loss, step)
                tf.summary.scalar("accuracy", metrics["accuracy"], step)
                tf.summary.scalar("learning_rate", optimizer.learning_rate, step)
                tf.summary.scalar("damping", optimizer.damping, step)
        if step % params["eval_every"] == 0 or step == params["max_steps"]:
            result = evaluate(eval_step, input_fn(EVAL, params, data))
            with eval_writer.as_default():
                for name, value in result.items():
                    tf.summary.scalar(name, value, step)
            logging.info("step %d: train loss %.4f; eval %s", step, float(loss),
                         ", ".join(f"{k} {v:.4f}" for k, v in result.items()))
        if step % params["save_every"] == 0 or step == params["max_steps"]:
            manager.save(checkpoint_number=step)
    if step == start:
        logging.info("Already at step %d >= max_steps %d: nothing to train", start, params["max_steps"])
        if not result:
            result = evaluate(eval_step, input_fn(EVAL, params, data))
    train_writer.flush()
    eval_writer.flush()
    return result, model, optimizer


def main(argv):
    del argv
    train_and_evaluate(FLAGS.model_dir, params_from_flags(), mnist_data.from_flags())


if __name__ == "__main__":
    define_flags()
    app.run(main)
