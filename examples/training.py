"""The compiled training step and the batch order of the benchmark and the
Estimator-style example.

Every optimizer is driven by the same ``tf.function`` step (forward pass,
loss, gradients, ``apply_gradients``), so timings compare like with like.
TKFAC / K-FAC with an automatic schedule run their covariance and inverse
updates inside ``apply_gradients`` in the same trace. Adaptive optimizers
(``optimizer.adaptive``) also get ``loss_fn``: a closure recomputing this
batch's loss from the model, which they evaluate to choose the step.
"""

import numpy as np
import tensorflow as tf


def make_train_step(model, optimizer, loss_fn, jit_compile=False, curvature_examples=None):
    """tf.function (x, y) -> loss of one optimisation step (loss before the update).
    ``curvature_examples``: n: the adaptive step's curvature products see
    only the batch's first n examples, ρ the whole batch (what the
    optimizer's ``curvature_batch_size`` does in ``model.fit``); None: what
    the optimizer's ``curvature_loss_fn`` gives (as in ``model.fit``)."""
    # `is True`: on the classes, `TKFAC.adaptive` is also the name of the preset constructor.
    adaptive = getattr(optimizer, "adaptive", False) is True

    @tf.function(jit_compile=jit_compile)
    def train_step(x, y):
        with tf.GradientTape() as tape:
            logits = model(x, training=True)
            loss = loss_fn(y, logits)
        variables = model.trainable_variables
        grads = tape.gradient(loss, variables)
        if adaptive:
            def loss_on(start, stop):
                return loss_fn(y[start:stop], model(x[start:stop], training=True))

            if curvature_examples is None:
                batch_size = x.shape[0] if x.shape[0] is not None else tf.shape(x)[0]
                curvature_loss_fn = optimizer.curvature_loss_fn(loss_on, batch_size)
            else:
                curvature_loss_fn = lambda: loss_on(0, curvature_examples)  # noqa: E731
            optimizer.apply_gradients(
                zip(grads, variables), loss_fn=lambda: loss_fn(y, model(x, training=True)),
                curvature_loss_fn=curvature_loss_fn,
            )
        else:
            optimizer.apply_gradients(zip(grads, variables))
        return loss

    return train_step


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
