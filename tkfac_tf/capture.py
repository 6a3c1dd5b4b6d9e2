"""Capture of registered layers' inputs and pre-activations in a forward pass.

Registering a layer wraps its ``call`` on the instance. During a training call
the layer's ``activation`` is swapped for a tap that records the
pre-activation ``s`` (the tensor the activation receives) and the activation's
output, then applies the real activation. The layer's own ``call`` runs
unchanged and its config is untouched, so ``model.save`` / ``load_model`` see
the original layer.

Recorded tensors belong to one trace (one ``tf.function`` graph, or the eager
context) and one replica (under tf.distribute every replica records its own
slice of the batch). :class:`Recorder` stores them on the graph they belong
to (or, eagerly, until the next forward pass of the same model), keyed by
replica, and the optimizer takes them (:meth:`Recorder.take`) in the same
trace and replica, so a tensor from one graph never reaches another. In eager mode there is no ``tf.gradients``: the first tap of
a step opens a persistent ``tf.GradientTape`` that watches every
pre-activation, and :meth:`Recorder.take` closes it.

A training call also keeps the float state it assigns (BatchNorm's moving
statistics) finite: a batch with non-finite values, whose step the optimizer
skips, would otherwise leave them NaN for every later inference call.
"""

import contextlib
import functools
import weakref

import keras
import tensorflow as tf
from absl import logging

from tkfac_tf import distribution
from tkfac_tf import keras_compat


class LayerUse:
    """One call of a registered layer: its input, pre-activation and output.

    Attributes:
      inputs: the layer's first positional input, e.g. [N, ..., d_in].
      preactivation: the tensor passed to the activation, [N, ..., d_out].
      output: the activation's output, same shape as ``preactivation``.
      training: whether it was a training call; False for an inference call
        made inside a registered model's training call (``training=False``
        passed on purpose, e.g. a BatchNorm backbone kept in inference mode).
    """

    __slots__ = ("inputs", "preactivation", "output", "training")

    def __init__(self, inputs, preactivation, output, training=True):
        self.inputs = inputs
        self.preactivation = preactivation
        self.output = output
        self.training = training


class TraceRecord:
    """What the taps recorded in one trace, until the optimizer takes it.

    Attributes:
      uses: dict id(layer) -> list of :class:`LayerUse`, in call order.
      tape: the persistent eager ``tf.GradientTape`` watching the
        pre-activations, or None in graph mode.
      loss: the training loss seen by ``optimizer.scale_loss`` (needed by the
        'empirical' estimation mode), or None.
      loss_inputs: (model, x, y, sample_weight) of the step's training
        ``model.compute_loss`` call (recorded on models given to
        ``install_loss_recorder``), or None.
      training_loss: what that call returned (h(θ) of the step's forward
        pass), or None.
    """

    def __init__(self):
        self.uses = {}
        self.tape = None
        self.loss = None
        self.loss_inputs = None
        self.training_loss = None
        self._tape_open = False
        self.covariance_updated = False
        # Set by cov_update_op on its marker: bool tensor, whether that update
        # was skipped (and counted in skipped_steps) for non-finite values.
        self.covariance_skipped = None
        # Eager only: id(outermost layer of a Keras call) -> its call context.
        self.entry_contexts = {}

    def is_new_forward_pass(self, context):
        """Eager: a second outermost call of the same layer/model is a new
        pass, and so is the first outermost call of a model that contains an
        earlier call's outermost layer (e.g. a sub-model called on its own
        before the training step of the model around it): that model's pass
        runs the sub-model again."""
        entry = getattr(context, "entry_layer", None)
        known = self.entry_contexts.setdefault(id(entry), context)
        if known is not context:
            return True
        if len(self.entry_contexts) == 1 or not isinstance(entry, keras.layers.Layer):
            return False
        inside = {id(layer) for layer in entry._flatten_layers(include_self=False, recursive=True)}
        return any(earlier in inside for earlier in self.entry_contexts if earlier != id(entry))

    def recorded_loss_fn(self):
        """callable() re-running the step's recorded training forward pass
        and ``compute_loss`` (see ``loss_inputs``), or None."""
        if self.loss_inputs is None:
            return None
        model, x, y, sample_weight = self.loss_inputs
        compute_loss = model._tkfac_original_compute_loss

        def loss_fn():
            y_pred = model(x, training=True)
            if getattr(model, "_compute_loss_has_training_arg", True):
                return compute_loss(x, y, y_pred, sample_weight, training=True)
            return compute_loss(x, y, y_pred, sample_weight)

        return loss_fn

    def close_tape(self):
        """Stops the eager tape recording (idempotent). Gradients of what it
        recorded can still be taken: it is persistent."""
        if self.tape is not None and self._tape_open:
            self.tape.__exit__(None, None, None)
            self._tape_open = False

    def open_tape(self):
        self.tape = tf.GradientTape(persistent=True, watch_accessed_variables=False)
        self.tape.__enter__()
        self._tape_open = True

    def gradients(self, target, sources, output_gradients=None):
        """d target / d sources (None for unconnected sources), graph or eager."""
        if self.tape is not None:
            return self.tape.gradient(
                target,
                sources,
                output_gradients=output_gradients,
                unconnected_gradients=tf.UnconnectedGradients.NONE,
            )
        return tf.gradients(target, sources, grad_ys=output_gradients)


def _current_graph():
    return tf.compat.v1.get_default_graph()


# Per thread: how many training calls of models given to
# ``mark_training_calls`` are running (MirroredStrategy traces each
# replica on its own thread).
_MODEL_TRAINING_CALLS = distribution.ThreadLocal(depth=0)


def in_model_training_call():
    """Whether a registered model's training call is running on this thread:
    a registered layer's inference call then records an inference use
    (``LayerUse.training`` False), which its block takes when the step holds
    no training use of the layer."""
    return _MODEL_TRAINING_CALLS.depth > 0


def _is_training_call(kwargs):
    """Whether this layer call is a training call (Keras' `training` flag)."""
    training = kwargs.get("training")
    if training is None:
        context = keras_compat.current_call_context()
        training = getattr(context, "training", None)
    if training is None:
        return False
    if tf.is_tensor(training):
        static = tf.get_static_value(training)
        # A symbolic flag: record, the statistics are only used if the
        # optimizer consumes them in this trace.
        return True if static is None else bool(static)
    return bool(training)


_GRAPH_ATTRIBUTE = "_tkfac_trace_records"


class Recorder:
    """Per-trace store of the tapped tensors of one LayerCollection's layers.

    Graph records live on the graph object itself (attribute
    ``_tkfac_trace_records``, keyed by recorder and replica), so a graph
    that is never used by the optimizer is garbage-collected together with
    its tensors.
    """

    def __init__(self):
        # Eager records, by replica id.
        self._eager_records = {}
        # Per thread: MirroredStrategy runs each replica's step on a thread.
        self._probe_state = distribution.ThreadLocal(active_probe=None, redirect=None)
        # Set by the LayerCollection: a weak reference to the collection
        # (a layer held by a collection that no longer exists is free).
        self.owner = lambda: None
        # Set by the optimizer: whether an eager training step needs a tape.
        self.eager_tape_wanted = None

    @property
    def active_probe(self):
        """The current ``probing`` block's state (this thread's), or None."""
        return self._probe_state.active_probe

    @active_probe.setter
    def active_probe(self, probe):
        self._probe_state.active_probe = probe

    def _key(self):
        """This recorder's record key for the current replica."""
        return (id(self), distribution.replica_position()[0])

    @property
    def _eager_record(self):
        return self._eager_records.get(self._key()[1])

    @_eager_record.setter
    def _eager_record(self, record):
        self._eager_records[self._key()[1]] = record

    @property
    def eager_tape_wanted(self):
        """Callable: whether an eager training step needs a tape. Held weakly
        (the layers hold the recorder, which must not keep the optimizer and
        its collection alive); True when unset or its owner is gone."""
        wanted = self._eager_tape_wanted() if self._eager_tape_wanted else None
        return wanted or (lambda: True)

    @eager_tape_wanted.setter
    def eager_tape_wanted(self, fn):
        if fn is None:
            self._eager_tape_wanted = None
        elif hasattr(fn, "__self__"):
            self._eager_tape_wanted = weakref.WeakMethod(fn)
        else:
            self._eager_tape_wanted = lambda: fn

    @contextlib.contextmanager
    def probing(self, watched, tape=None):
        """Within the block, calls of the registered layers record nothing
        (a re-evaluation of the loss by the adaptive optimizer): the tensors
        named by ``watched`` (dict id(layer) -> 'preactivation' | 'output')
        are watched on ``tape`` (if given) and collected into the yielded
        list, in call order."""
        previous = self.active_probe
        self.active_probe = _Probe(watched, tape)
        try:
            yield self.active_probe.outputs
        finally:
            self.active_probe = previous

    @property
    def redirect(self):
        """The record of the current ``recording_into`` block (this
        thread's), or None."""
        return self._probe_state.redirect

    @contextlib.contextmanager
    def recording_into(self, record):
        """Within the block, training calls of the registered layers record
        into ``record`` (a fresh :class:`TraceRecord`) instead of the trace's
        record, and assign no state of their own (the block runs in a
        ``keras.StatelessScope``: a re-evaluation of the loss whose uses
        the optimizer reads, e.g. for the factor statistics). Eagerly
        ``record``'s tape watches the pre-activations and is closed when
        the block ends."""
        previous = self.redirect
        self._probe_state.redirect = record
        try:
            yield record
        finally:
            self._probe_state.redirect = previous
            record.close_tape()

    def _graph_records(self, graph):
        records = getattr(graph, _GRAPH_ATTRIBUTE, None)
        if records is None:
            records = {}
            setattr(graph, _GRAPH_ATTRIBUTE, records)
        return records

    def _record_for_write(self, from_layer_call=True):
        if self.redirect is not None:
            return self.redirect
        if tf.executing_eagerly():
            record = self._eager_record
            if from_layer_call:
                # Calling the same model (outermost layer) again starts a new
                # eager forward pass: what an earlier pass left (its update
                # skipped, e.g. by a loss-scale optimizer, or never made) is
                # dropped, never mixed in.
                context = keras_compat.current_call_context()
                if record is not None and record.is_new_forward_pass(context):
                    record.close_tape()
                    record = None
                if record is None:
                    record = self._eager_record = TraceRecord()
                    record.is_new_forward_pass(context)
            return record
        return self._graph_records(_current_graph()).setdefault(self._key(), TraceRecord())

    def _watch(self, preactivation):
        """Eager only: makes sure the step's tape is open and watches s."""
        if not tf.executing_eagerly():
            return
        record = self._record_for_write()
        if record.tape is None:
            if not self.eager_tape_wanted():
                return
            record.open_tape()
        record.tape.watch(preactivation)

    def add_use(self, layer, use):
        """Appends ``use`` to the layer's uses in this trace. A layer's uses
        are all training uses or all inference uses: training uses replace
        inference ones (a layer called both ways trains on its training
        calls, as without inference uses)."""
        uses = self._record_for_write().uses.setdefault(id(layer), [])
        if uses and uses[0].training != use.training:
            if not use.training:
                return
            uses.clear()
        uses.append(use)

    def set_loss(self, loss):
        """Remembers the training loss of this trace (for 'empirical')."""
        record = self._record_for_write(from_layer_call=False)
        if record is not None:
            record.loss = loss

    def set_loss_inputs(self, model, x, y, sample_weight, training_loss):
        """Remembers the step's ``compute_loss`` inputs and result (adaptive
        optimizers re-evaluate the loss from them, or differentiate the
        result)."""
        if self.active_probe is not None or self.redirect is not None:
            return
        record = self._record_for_write(from_layer_call=False)
        if record is not None:
            record.loss_inputs = (model, x, y, sample_weight)
            record.training_loss = training_loss

    def stop_eager_recording(self):
        """Eager: closes a pending tape (an inference call happened), keeping
        what it recorded, so no later op is recorded into it."""
        if tf.executing_eagerly() and self._eager_record is not None:
            self._eager_record.close_tape()

    def take(self):
        """Removes and returns the current trace's record (None if empty).

        Graph mode looks in the current graph, then its outer graphs (the
        optimizer may run inside a tf.cond / loop body). In eager mode the
        step's tape is closed here; gradients can still be taken from it.
        """
        if tf.executing_eagerly():
            record, self._eager_record = self._eager_record, None
        else:
            record = None
            graph = _current_graph()
            while graph is not None:
                record = getattr(graph, _GRAPH_ATTRIBUTE, {}).pop(self._key(), None)
                if record is not None and (record.uses or record.covariance_updated):
                    break
                graph = getattr(graph, "outer_graph", None)
        if record is not None:
            record.close_tape()
        return record

    def take_for_covariance_update(self):
        """take(), leaving in its place an empty record marked
        ``covariance_updated`` so that the step's apply_gradients knows. Later
        training calls in the same trace record into the marked record."""
        record = self.take()
        marker = TraceRecord()
        marker.covariance_updated = True
        if record is not None:
            marker.loss_inputs = record.loss_inputs
        if tf.executing_eagerly():
            if record is not None:
                marker.entry_contexts = dict(record.entry_contexts)
            self._eager_record = marker
        else:
            self._graph_records(_current_graph())[self._key()] = marker
        return record

    def note_covariance_skipped(self, skipped):
        """Stores ``skipped`` (bool tensor) on this trace's covariance-update
        marker, for the apply_gradients of the same step."""
        if tf.executing_eagerly():
            record = self._eager_record
        else:
            record = self._graph_records(_current_graph()).get(self._key())
        if record is not None and record.covariance_updated:
            record.covariance_skipped = skipped


def install_tap(layer, recorder, tap="activation", variables=None):
    """Wraps ``layer.call`` so that training calls record a LayerUse into
    ``recorder``. The wrapper is installed once per layer; installing it
    again (the LayerCollection checks who holds the layer) points it at
    ``recorder``.

    ``tap`` says what a use records: 'activation' (the tensor the layer's
    activation receives, see ``_call_with_tap``), 'output' (the call's output
    is the "pre-activation": Embedding, LayerNorm, BatchNorm) or 'variables'
    (the call runs with ``variables`` replaced by read tensors in a
    ``keras.StatelessScope``; one :class:`VariableUse` per variable)."""
    if not getattr(layer, "_tkfac_wrapped", False):
        _wrap_call(layer)
        keras_compat.set_untracked(layer, "_tkfac_wrapped", True)
    keras_compat.set_untracked(layer, "_tkfac_recorder", recorder)
    keras_compat.set_untracked(layer, "_tkfac_tap", tap)
    keras_compat.set_untracked(layer, "_tkfac_tapped_variables", list(variables or []))


def remove_tap(layer, recorder):
    """Stops ``layer`` recording into ``recorder`` (if it does): its calls then
    run the original ``call`` only, until a tap is installed again."""
    if getattr(layer, "_tkfac_recorder", None) is recorder:
        keras_compat.set_untracked(layer, "_tkfac_recorder", None)


class _Probe:
    """State of ``Recorder.probing``: which tensors to watch, and those seen."""

    def __init__(self, watched, tape):
        self.watched = watched
        self.tape = tape
        self.outputs = []

    def see(self, tensor):
        if self.tape is not None:
            self.tape.watch(tensor)
        self.outputs.append(tensor)

    def call(self, layer, original_call, args, kwargs):
        which = self.watched.get(id(layer))
        if which is None:
            return original_call(*args, **kwargs)

        def tap(activation, preactivation):
            if which == "preactivation":
                self.see(preactivation)
            output = activation(preactivation)
            if which == "output":
                self.see(output)
            return output

        return _call_with_tap(layer, original_call, args, kwargs, tap)[0]


def _call_with_tap(layer, original_call, args, kwargs, tap):
    """Runs the layer's call with its activation replaced by
    ``lambda s: tap(activation, s)``; returns (outputs, number of taps)."""
    activation = layer.activation
    count = [0]

    def counted_tap(preactivation):
        count[0] += 1
        return tap(activation, preactivation)

    keras_compat.set_untracked(layer, "activation", counted_tap)
    try:
        outputs = original_call(*args, **kwargs)
    finally:
        keras_compat.set_untracked(layer, "activation", activation)
    return outputs, count[0]


def _wrap_call(layer):
    original_call = layer.call

    @functools.wraps(original_call)
    def call(*args, **kwargs):
        recorder = layer._tkfac_recorder
        if recorder is None:  # released
            return original_call(*args, **kwargs)
        if recorder.active_probe is not None:
            return recorder.active_probe.call(layer, original_call, args, kwargs)
        if _is_training_call(kwargs):
            if recorder.redirect is not None:  # stateless: nothing to keep finite
                return _recorded_call(layer, recorder, original_call, args, kwargs)
            with _finite_state(layer):
                return _recorded_call(layer, recorder, original_call, args, kwargs)
        if in_model_training_call():
            return _recorded_call(layer, recorder, original_call, args, kwargs, training=False)
        recorder.stop_eager_recording()
        return original_call(*args, **kwargs)

    keras_compat.set_untracked(layer, "call", call)


@contextlib.contextmanager
def _finite_state(layer):
    """Keeps the float state a training call assigns finite
    (``keras_compat.call_state``: BatchNorm's moving statistics): if any of
    it is NaN or ±Inf after the call (a batch with non-finite values, whose
    step the optimizer skips), all of it is set back to its value before the
    call. Under a distribution strategy each replica decides for the copy
    it reads."""
    state = keras_compat.call_state(layer)
    before = [tf.convert_to_tensor(v.value) for v in state]
    yield
    if not state:
        return
    after = [tf.convert_to_tensor(v.value) for v in state]
    finite = tf.reduce_all([tf.reduce_all(tf.math.is_finite(a)) for a in after])
    for variable, old, new in zip(state, before, after):
        variable.assign(tf.where(finite, new, old))


def _recorded_call(layer, recorder, original_call, args, kwargs, training=True):
    """A registered layer's call recorded by its kind of tap (``training``:
    whether it is a training call, else an inference call inside a model's
    training call)."""
    mode = getattr(layer, "_tkfac_tap", "activation")
    if mode == "output":
        return _output_tap_call(layer, recorder, original_call, args, kwargs, training)
    if mode == "variables":
        return _variables_tap_call(layer, recorder, original_call, args, kwargs, training)
    return _activation_tap_call(layer, recorder, original_call, args, kwargs, training)


def _activation_tap_call(layer, recorder, original_call, args, kwargs, training):
    """Runs the call with its activation tapped; records the pre-activation
    and the activation's output (exactly one activation call per call)."""
    taps = []

    def tap(activation, preactivation):
        recorder._watch(preactivation)
        output = activation(preactivation)
        taps.append((preactivation, output))
        return output

    outputs, count = _call_with_tap(layer, original_call, args, kwargs, tap)
    if count != 1:
        raise RuntimeError(
            f"Layer '{layer.name}' ({type(layer).__name__}) applied its "
            f"activation {count} times in one call; tkfac_tf needs "
            "exactly one activation call per layer call to capture the "
            "pre-activation. Do not register this layer."
        )
    inputs = args[0] if args else kwargs["inputs"]
    preactivation, output = taps[0]
    recorder.add_use(layer, LayerUse(inputs, preactivation, output, training))
    return outputs


class VariableUse(LayerUse):
    """One call of a layer whose variables are tapped: ``preactivation`` is
    the read tensor of variable ``index`` (of the layer's tapped variables)
    that the call used; ``inputs`` the call's first input."""

    __slots__ = ("index",)

    def __init__(self, inputs, read, index, training=True):
        super().__init__(inputs, read, read, training)
        self.index = index


def _first_input(args, kwargs):
    return args[0] if args else kwargs.get("inputs")


def _is_reverse_call(args, kwargs):
    """Whether a call is keras_hub's ReversibleEmbedding projecting hidden
    states onto the vocabulary (``reverse=True``), not a token lookup."""
    reverse = kwargs.get("reverse", args[1] if len(args) > 1 else False)
    return reverse is True


def _output_tap_call(layer, recorder, original_call, args, kwargs, training):
    """Runs the call and records its output as the use's pre-activation. A
    tied embedding's reverse call (``_is_reverse_call``) is not a lookup: it
    is run unrecorded, so the block holds the lookups' statistics only."""
    if _is_reverse_call(args, kwargs):
        if not getattr(layer, "_tkfac_reverse_logged", False):
            keras_compat.set_untracked(layer, "_tkfac_reverse_logged", True)
            logging.warning(
                "Layer '%s' (%s) is also called with reverse=True (tied output weights): "
                "its block takes the statistics of the token lookups only.",
                layer.name, type(layer).__name__)
        return original_call(*args, **kwargs)
    outputs = original_call(*args, **kwargs)
    if not tf.is_tensor(outputs):
        raise RuntimeError(
            f"Layer '{layer.name}' ({type(layer).__name__}) returned "
            f"{type(outputs).__name__}, not one tensor; tkfac_tf taps its "
            "output. Do not register this layer."
        )
    recorder._watch(outputs)
    recorder.add_use(layer, LayerUse(_first_input(args, kwargs), outputs, outputs, training))
    return outputs


def _variables_tap_call(layer, recorder, original_call, args, kwargs, training):
    """Runs the call with the tapped variables replaced by read tensors
    (``keras.StatelessScope``), which are recorded (and watched eagerly).
    Other state the call assigns inside the scope (BatchNorm statistics,
    seed generators) is written back to its variables afterwards."""
    import keras

    variables = layer._tkfac_tapped_variables
    reads = []
    for variable in variables:
        read = tf.identity(tf.convert_to_tensor(variable.value))
        recorder._watch(read)
        reads.append(read)
    mapped = {id(v) for v in variables}
    with keras.StatelessScope(state_mapping=list(zip(variables, reads))) as scope:
        outputs = original_call(*args, **kwargs)
    for variable in layer.variables:
        if id(variable) in mapped:
            continue
        value = scope.get_current_value(variable)
        if value is not None:
            variable.assign(value)
    inputs = _first_input(args, kwargs)
    for index, read in enumerate(reads):
        recorder.add_use(layer, VariableUse(inputs, read, index, training))
    return outputs


def mark_training_calls(model):
    """Wraps ``model.call`` (on the instance, once) so that while a training
    call of the model runs, ``in_model_training_call`` is True: the
    registered layers it calls with ``training=False`` then record inference
    uses instead of nothing. Inert while the model has no loss recorder
    (``install_loss_recorder``; ``remove_loss_recorder`` releases it)."""
    if getattr(model, "_tkfac_marks_training_calls", False):
        return
    original_call = model.call

    @functools.wraps(original_call)
    def call(*args, **kwargs):
        if getattr(model, "_tkfac_loss_recorder", None) is None or not _is_training_call(kwargs):
            return original_call(*args, **kwargs)
        _MODEL_TRAINING_CALLS.depth += 1
        try:
            return original_call(*args, **kwargs)
        finally:
            _MODEL_TRAINING_CALLS.depth -= 1

    keras_compat.set_untracked(model, "call", call)
    keras_compat.set_untracked(model, "_tkfac_marks_training_calls", True)


def install_loss_recorder(model, recorder):
    """Wraps ``model.compute_loss`` (on the instance) so that each training
    call remembers its (x, y, sample_weight) in ``recorder``: ``model.fit``'s
    step then carries what an adaptive optimizer needs to re-evaluate the
    loss. Installed once per model (with ``_build_optimizer_before_tracing``);
    the newest recorder wins."""
    if getattr(model, "_tkfac_original_compute_loss", None) is None:
        original = model.compute_loss

        @functools.wraps(original)
        def compute_loss(x=None, y=None, y_pred=None, sample_weight=None, *args, **kwargs):
            training = kwargs.get("training", args[0] if args else True)
            recorder = model._tkfac_loss_recorder
            loss = original(x, y, y_pred, sample_weight, *args, **kwargs)
            if training is not False and recorder is not None:
                recorder.set_loss_inputs(model, x, y, sample_weight, loss)
            return loss

        keras_compat.set_untracked(model, "compute_loss", compute_loss)
        keras_compat.set_untracked(model, "_tkfac_original_compute_loss", original)
        _build_optimizer_before_tracing(model)
    keras_compat.set_untracked(model, "_tkfac_loss_recorder", recorder)


def _build_optimizer_before_tracing(model):
    """Wraps ``model.make_train_function`` (on the instance) so that the
    compiled optimizer is built, as Keras builds it under a distribution
    strategy, before the train step is first traced: an optimizer whose
    variables are created inside that trace makes ``tf.function`` trace the
    whole step a second time. Models not built yet keep Keras' own order."""
    original = model.make_train_function

    @functools.wraps(original)
    def make_train_function(*args, **kwargs):
        optimizer = getattr(model, "optimizer", None)
        if optimizer is not None and not optimizer.built and model.built:
            optimizer.build(model.trainable_variables)
        return original(*args, **kwargs)

    keras_compat.set_untracked(model, "make_train_function", make_train_function)


def remove_loss_recorder(model, recorder):
    """Stops ``model``'s ``compute_loss`` recording into ``recorder`` (if it does)."""
    if getattr(model, "_tkfac_loss_recorder", None) is recorder:
        keras_compat.set_untracked(model, "_tkfac_loss_recorder", None)
