"""Exact curvature products and the quadratic model of the adaptive optimizers.

The adaptive step (Martens & Grosse 2015, §6–7) needs, on the current batch,
products uᵀ G v of the *exact* Gauss–Newton matrix of the training loss h

    G = Jᵀ H_z J,    J = ∂z/∂θ,   H_z = ∂²h/∂z²,

with z the registered outputs (the tensors the predictive distributions read:
logits, or the output of a squared-error model). For the losses tkfac_tf
registers (softmax / sigmoid cross-entropy, squared error) G is the exact
Fisher of the model, scaled exactly as the loss h is (mean over the batch,
sum or mean over units, sample weights: whatever the loss does).

How: a re-evaluation of the loss, ``loss_fn()``, with the trainable variables
replaced by tensors (``keras.StatelessScope``: no variable, moving statistic
or seed is changed). The layer taps watch z on a tape, so that

    J v = jvp(z),    H_z J v = jvp(∂h/∂z)      (forward-over-reverse),

and uᵀ G v = Σ (J u) · (H_z J v). In a graph (``tf.function``, XLA) the
loss is evaluated once and ``forward_mode.jvp`` walks its graph for every
direction; eagerly each direction runs the loss inside its own
``tf.autodiff.ForwardAccumulator``. In ``model.fit``'s traced step, when the
curvature is the whole batch's, ``recorded_gauss_newton_gram`` walks the
step's own forward pass instead, from the variables' reads to the recorded
z and training loss: no re-evaluation at all. All compute the same exact
products. The exact Hessian of Keras L2 weight regularizers (2·l2 I,
``penalty_curvature``) is added by the step; other regularisation losses
that do not depend on z add no curvature.
"""

from typing import Optional

import keras
import tensorflow as tf

from tkfac_tf import capture
from tkfac_tf import forward_mode


class LossProbe:
    """Side-effect-free re-evaluations of the training loss on this batch.

    Args:
      recorder: the collection's ``capture.Recorder`` (its taps watch z).
      watched: dict id(layer) -> 'preactivation' | 'output', the tensors z.
      variables: the trainable variables θ (Keras variables).
      loss_fn: callable() -> scalar training loss, evaluating the model with
        its variables' current values (the step's forward pass and loss).
    """

    def __init__(self, recorder, watched, variables, loss_fn):
        self.recorder = recorder
        self.watched = watched
        self.variables = list(variables)
        self.loss_fn = loss_fn

    def _stateless_loss(self, values):
        """loss_fn() with the variables read as ``values`` (float32)."""
        with keras.StatelessScope(state_mapping=list(zip(self.variables, values))):
            return tf.cast(self.loss_fn(), tf.float32)

    def _evaluate(self, values, tape=None):
        with self.recorder.probing(self.watched, tape) as outputs:
            loss = self._stateless_loss(values)
        return loss, outputs

    def recorded_loss(self, values, record):
        """h at θ = ``values``, the registered layers' training uses of its
        forward pass recorded into ``record`` (``Recorder.recording_into``)."""
        with self.recorder.recording_into(record):
            return self._stateless_loss(values)

    def loss(self, values):
        """h at θ = ``values`` (tensors shaped like the variables)."""
        return self._evaluate(values)[0]

    def gauss_newton_vectors(self, values, tangent_sets):
        """h(θ), and for each tangent v of ``tangent_sets`` (lists shaped
        like the variables): the lists J v and H_z J v over the watched
        tensors z, at θ = ``values``. In a graph one evaluation of the loss
        and one forward-mode walk of its graph for all tangents
        (``forward_mode``); eagerly one ``ForwardAccumulator`` pass per
        tangent."""
        if tf.executing_eagerly():
            return self._accumulated_vectors(values, tangent_sets)
        values = [tf.identity(v) for v in values]  # sources in this graph
        with tf.GradientTape(watch_accessed_variables=False) as tape:
            loss, outputs = self._evaluate(values, tape)
        _check_outputs(outputs)
        output_grads = tape.gradient(
            loss, outputs, unconnected_gradients=tf.UnconnectedGradients.ZERO
        )
        return (loss, *_walked_vectors(values, tangent_sets, outputs, output_grads))

    def _accumulated_vectors(self, values, tangent_sets):
        values = [tf.convert_to_tensor(v) for v in values]
        jvs, hjvs = [], []
        for tangents in tangent_sets:
            with tf.autodiff.ForwardAccumulator(values, list(tangents)) as accumulator:
                with tf.GradientTape(watch_accessed_variables=False) as tape:
                    loss, outputs = self._evaluate(values, tape)
                _check_outputs(outputs)
                output_grads = tape.gradient(
                    loss, outputs, unconnected_gradients=tf.UnconnectedGradients.ZERO
                )
            jvs.append([_zero_if_none(accumulator.jvp(z), z) for z in outputs])
            hjvs.append([_zero_if_none(accumulator.jvp(g), g) for g in output_grads])
        return loss, jvs, hjvs


class CurvaturePass:
    """The curvature re-evaluation of an adaptive step, evaluated once and
    shared: the registered layers' uses of that forward pass are recorded
    (``record``, a ``capture.TraceRecord`` whose ``loss`` is the pass's
    loss), so the factor statistics can be taken from it, and ``gram``
    gives the exact Gauss–Newton products along K directions from the
    same pass (in a graph by a forward-mode walk of it; eagerly, where
    no graph can be walked, by ``gauss_newton_gram``'s re-evaluations).

    Args:
      probe: the step's curvature ``LossProbe`` (its loss_fn: the loss on
        the curvature examples).
      values: the variables' values θ (tensors shaped like them).
    """

    def __init__(self, probe, values):
        self.probe = probe
        self.values = [tf.identity(v) for v in values]  # sources in this graph
        self.record = capture.TraceRecord()
        self.record.loss = probe.recorded_loss(self.values, self.record)
        self.outputs = [getattr(use, tensor) for key, tensor in probe.watched.items()
                        for use in self.record.uses.get(key, [])]
        _check_outputs(self.outputs)

    def gram(self, vectors):
        """h(θ) of the pass and [uᵢᵀ G uⱼ] (float32 [K, K]) for K direction
        vectors (each a list shaped like the variables)."""
        if tf.executing_eagerly():
            return gauss_newton_gram(self.probe, self.values, vectors)
        return self.record.loss, _walked_gram(self.record.loss, self.values, self.outputs, vectors)


def recorded_gauss_newton_gram(record, watched, variables):
    """A function of K direction vectors giving [uᵢᵀ G uⱼ] (float32 [K, K])
    from the step's own training forward pass (``model.fit``'s: the recorded
    z and ``compute_loss`` result), with no re-evaluation:
    ``forward_mode.jvp`` from the variables' handles (the tangent of every
    read of θᵢ is the direction's part for θᵢ) to z and ∂h/∂z. The function
    builds its ops in the graph it is called in: the forward pass's, or one
    nested in it (a conditional's branch, which evaluates them only when
    taken). None where the pass cannot be used: eagerly, without a recorded
    ``compute_loss`` result, when the step runs in another graph than its
    forward pass (a conditional), or when a variable was not read in it.
    ρ's h(θ) from the same pass: ``recorded_training_loss``.

    Args:
      record: the step's ``capture.TraceRecord``.
      watched: dict id(layer) -> 'preactivation' | 'output', the tensors z.
      variables: the trainable variables θ (Keras variables).
    """
    if tf.executing_eagerly() or record is None or record.training_loss is None:
        return None
    loss = record.training_loss
    graph = tf.compat.v1.get_default_graph()
    outputs = [getattr(use, tensor) for key, tensor in watched.items()
               for use in record.uses.get(key, [])]
    if not outputs or any(t.graph is not graph for t in outputs + [loss]):
        return None
    captured = {id(external): internal for external, internal in graph.captures}
    handles = [captured.get(id(_handle(v))) for v in variables]
    if any(h is None for h in handles):
        return None

    return lambda vectors: _walked_gram(loss, handles, outputs, vectors)


def recorded_training_loss(record):
    """h(θ) of the step's own training forward pass (``model.fit``'s
    recorded ``compute_loss`` result, float32): the value a re-evaluation of
    the whole batch's loss at θ returns, without the forward pass. None
    where it cannot stand in for one: eagerly, without a recorded result,
    when the step runs in another graph than its forward pass, or when that
    pass draws random numbers (a re-evaluation would draw others)."""
    if tf.executing_eagerly() or record is None or record.training_loss is None:
        return None
    loss = record.training_loss
    if loss.graph is not tf.compat.v1.get_default_graph() or forward_mode.draws_random_numbers([loss]):
        return None
    return tf.cast(loss, tf.float32)


def _walked_gram(loss, sources, outputs, vectors):
    """[uᵢᵀ G uⱼ] (float32 [K, K]) for K direction vectors from one
    forward-mode walk of a graph's forward pass: from ``sources`` (the
    variables' values or reads) to the watched tensors z (``outputs``)
    and ∂h/∂z of its loss h (``loss``)."""
    output_grads = tf.gradients(loss, outputs, unconnected_gradients=tf.UnconnectedGradients.ZERO)
    jvs, hjvs = _walked_vectors(sources, vectors, outputs, output_grads)
    return symmetric_gram(len(vectors), lambda i, j: dot(jvs[i], hjvs[j]))


def _walked_vectors(sources, tangent_sets, outputs, output_grads):
    """For each tangent set: J v and H_z J v (lists over z, float32) by one
    forward-mode walk from ``sources`` to z and ∂h/∂z."""
    tangents = forward_mode.jvp(sources, tangent_sets, list(outputs) + list(output_grads))
    jvs = [[tf.cast(t, tf.float32) for t in ts[: len(outputs)]] for ts in tangents]
    hjvs = [[tf.cast(t, tf.float32) for t in ts[len(outputs):]] for ts in tangents]
    return jvs, hjvs


def _handle(variable):
    """The resource handle of a (Keras) variable's backing tf.Variable, or
    None (in a replica context the local replica's)."""
    backing = variable.value if isinstance(variable, keras.Variable) else variable
    return getattr(backing, "handle", None)


def _check_outputs(outputs):
    if not outputs:
        raise ValueError(
            "The loss function given to the adaptive optimizer did not "
            "call the layers that carry the registered predictive "
            "distributions in training mode: it must run the model's "
            "forward pass (training=True) and return its loss."
        )


def recorded_batch_size(record):
    """The number of examples of the batch recorded in ``model.fit`` (the
    leading dimension of its first input; ``record.loss_inputs`` is set):
    an int if static, else a scalar int32 tensor."""
    first = tf.nest.flatten(record.loss_inputs[1])[0]
    size = first.shape[0]
    return int(size) if size is not None else tf.shape(first)[0]


def sliced_loss_fn(record, start, stop):
    """``record``'s loss re-evaluation recorded in ``model.fit``
    (``capture.TraceRecord.recorded_loss_fn``) on examples [start, stop)
    of its x, y and sample_weight (every nested tensor sliced; ints or
    scalar int tensors). For a loss that averages over the examples
    (Keras' default reduction) a subset's loss and Gauss–Newton matrix
    estimate the batch's at the same scale.

    Raises:
      TypeError / ValueError: if some input cannot be sliced (e.g. a
        ``tf.SparseTensor``); found now, at trace time.
    """
    model, *data = record.loss_inputs
    subset = capture.TraceRecord()
    subset.loss_inputs = (model, *tf.nest.map_structure(lambda t: None if t is None else t[start:stop], data))
    return subset.recorded_loss_fn()


def ghost_halves(batch_size):
    """The two parts of a batch of n examples (an int or a scalar int32
    tensor) whose losses ``ghost_halves_loss`` combines: [0, h) and [h, n),
    h = n // 2, as (start, stop) pairs."""
    half = batch_size // 2
    return (0, half), (half, batch_size)


def ghost_halves_loss(first, second, batch_size):
    """(h · L₁ + (n − h) · L₂) / n (float32 scalar) for the losses L₁, L₂ of
    the ``ghost_halves`` of a batch of n examples, each evaluated in a
    forward pass of its own (so a BatchNorm layer normalises each half with
    its own moments: "ghost batches"). For a loss that averages over
    examples that do not interact this is the whole batch's loss, and its
    Gauss–Newton matrix the whole batch's. A batch of one example has an
    empty first half, whose loss may be NaN: weighted 0, it adds 0."""
    half = tf.cast(batch_size // 2, tf.float32)
    total = tf.cast(batch_size, tf.float32)
    weighted_first = tf.math.multiply_no_nan(tf.cast(first, tf.float32), half)
    return (weighted_first + (total - half) * tf.cast(second, tf.float32)) / total


def _zero_if_none(tangent, like):
    return tf.zeros_like(like, tf.float32) if tangent is None else tf.cast(tangent, tf.float32)


def gauss_newton_gram(probe, values, vectors):
    """h(θ) and the matrix [uᵢᵀ G uⱼ] (float32 [K, K]) for K direction
    vectors (each a list shaped like the variables)."""
    loss, jvs, hjvs = probe.gauss_newton_vectors(values, vectors)
    return loss, symmetric_gram(len(vectors), lambda i, j: dot(jvs[i], hjvs[j]))


def symmetric_gram(k, entry):
    """The symmetrised [k, k] float32 matrix ½(E + Eᵀ), E[i, j] = entry(i, j)
    (a scalar tensor): Gram matrices whose two sides come from different
    computations."""
    gram = tf.convert_to_tensor([[entry(i, j) for j in range(k)] for i in range(k)])
    return 0.5 * (gram + tf.transpose(gram))


def pairwise_dots(vectors, weights=None):
    """[K, K] float32 matrix [Σ over variables wₖ ⟨vᵢ, vⱼ⟩] of K vectors
    (each a list shaped like the variables), wₖ = ``weights[k]`` (floats;
    None: every wₖ = 1; variables of weight 0 are left out): per variable
    one [K, size] × [size, K] product, which reads each vector once
    (K(K+1)/2 separate ``dot`` calls read each K times)."""
    def flat(value):
        value = tf.cast(value, tf.float32)
        return value if value.shape.rank == 1 else tf.reshape(value, [-1])

    weights = [1.0] * len(vectors[0]) if weights is None else weights
    products = []
    for i, weight in enumerate(weights):
        if weight == 0.0:
            continue
        stacked = tf.stack([flat(v[i]) for v in vectors])
        product = tf.matmul(stacked, stacked, transpose_b=True)
        products.append(product if weight == 1.0 else weight * product)
    return tf.add_n(products) if products else tf.zeros([len(vectors)] * 2)


def penalty_curvature(variable) -> Optional[float]:
    """κ, the second derivative of ``variable``'s Keras weight regularizer
    R(w) in each entry, where it is constant: 2·l2 for ``L2(l2)`` and
    ``L1L2(l1, l2)`` (R = l1 Σ|w| + l2 Σw²; the L1 part has none away from
    w = 0), 0 for ``L1`` and for no regularizer; None for any other
    regularizer, subclasses of these included (not modelled). Keras adds R(w) to the training loss
    (``model.losses``), so its exact Hessian is κ I over the variable."""
    regularizer = getattr(variable, "regularizer", None)
    # Exact classes: a subclass may compute another penalty.
    if regularizer is None or type(regularizer) is keras.regularizers.L1:
        return 0.0
    if type(regularizer) in (keras.regularizers.L2, keras.regularizers.L1L2):
        return 2.0 * float(regularizer.l2)
    return None


def dot(us, vs):
    """Σ over variables of ⟨u, v⟩ (float32 scalar)."""
    return tf.add_n(
        [tf.reduce_sum(tf.cast(u, tf.float32) * tf.cast(v, tf.float32)) for u, v in zip(us, vs)]
    )


def _register_dynamic_update_slice_gradient():
    """Registers a gradient for XlaDynamicUpdateSlice where TensorFlow has
    none. Under XLA the gradient of ``tf.slice`` is that op, and the
    forward-mode products above differentiate gradient functions, so a model
    that slices a variable-dependent tensor (keras_hub's PositionEmbedding)
    could not take an adaptive step with ``jit_compile=True``. For
    y = dynamic_update_slice(x, u, i): ∂/∂x = the gradient with the window
    zeroed, ∂/∂u = the gradient's window."""
    from tensorflow.python.framework import ops  # private: the gradient registry

    try:
        ops.gradient_registry.lookup("XlaDynamicUpdateSlice")
        return
    except LookupError:
        pass
    from tensorflow.compiler.tf2xla.python import xla  # private: the XLA ops

    @tf.RegisterGradient("XlaDynamicUpdateSlice")
    def _gradient(op, grad):
        update, indices = op.inputs[1], op.inputs[2]
        return (xla.dynamic_update_slice(grad, tf.zeros_like(update), indices),
                xla.dynamic_slice(grad, indices, tf.shape(update)), None)


_register_dynamic_update_slice_gradient()
