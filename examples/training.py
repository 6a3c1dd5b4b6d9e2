"""The compiled training step and the batch order shared by the examples.

Every optimizer is driven by the same ``tf.function`` step (forward pass,
loss, gradients, ``apply_gradients``), so timings compare like with like.
TKFAC / K-FAC with an automatic schedule run their covariance and inverse
updates inside ``apply_gradients`` in the same trace.
"""

import numpy as np
import tensorflow as tf


def make_train_step(model, optimizer, loss_fn, jit_compile=False):
    """tf.function (x, y) -> loss of one optimisation step (loss before the update)."""

    @tf.function(jit_compile=jit_compile)
    def train_step(x, y):
        with tf.GradientTape() as tape:
            logits = model(x, training=True)
            loss = loss_fn(y, logits)
        variables = model.trainable_variables
        grads = tape.gradient(loss, variables)
        optimizer.apply_gradients(zip(grads, variables))
        return loss

    return train_step


def make_eval_step(model, loss_fn, metric_fn=None):
    """tf.function (x, y) -> (loss, metric) without training-mode taps."""

    @tf.function
    def eval_step(x, y):
        logits = model(x, training=False)
        metric = metric_fn(y, logits) if metric_fn is not None else tf.constant(0.0)
        return loss_fn(y, logits), metric

    return eval_step


def batch_indices(num_examples, batch_size, step, seed=0):
    """Indices of batch ``step``: epochs are seeded permutations, so the order
    is a pure function of (seed, step) and a resumed run sees the same batches.
    The last incomplete batch of an epoch is dropped."""
    per_epoch = num_examples // batch_size
    if per_epoch < 1:
        raise ValueError(f"batch_size {batch_size} exceeds the {num_examples} examples.")
    epoch, position = divmod(step, per_epoch)
    order = np.random.RandomState([seed, epoch]).permutation(num_examples)
    return order[position * batch_size : (position + 1) * batch_size]


def evaluate(eval_step, x, y, batch_size=1000):
    """Example-weighted mean (loss, metric) over a dataset."""
    total_loss = total_metric = 0.0
    for start in range(0, len(x), batch_size):
        xb, yb = x[start : start + batch_size], y[start : start + batch_size]
        loss, metric = eval_step(tf.constant(xb), tf.constant(yb))
        total_loss += float(loss) * len(xb)
        total_metric += float(metric) * len(xb)
    return total_loss / len(x), total_metric / len(x)
