"""Automatic registration: walk a Keras model, map its loss to distributions.

:func:`register_model` fills a :class:`~tkfac_tf.LayerCollection` from a
built model and the loss it is trained with (or ``model.loss`` after
``compile``):

* Layers. Every Dense, Conv1D, Conv2D (any groups), DepthwiseConv2D,
  SeparableConv2D, EinsumDense (so MultiHeadAttention's projections),
  Embedding, LayerNormalization and BatchNormalization layer of the model,
  nested models included, that is built, trainable and used by the model
  gets a Fisher block (docs/conv.md, docs/layers.md). A layer called
  several times in a forward pass (shared weights) is registered once; the
  optimizer accumulates its statistics over all uses. Every other trainable
  variable gets a diagonal block (``register_generic``, one per owning
  layer) with ``other_variables='diagonal'`` (the default), a full block
  where the layer's leftover variables are small
  (``other_variables='full'``: at most ``layer_kinds.MAX_FULL_BLOCK_SIZE``
  scalars, diagonal beyond), or the plain momentum update with
  ``other_variables='momentum'``; those are listed in a single absl log
  message. A recurrent layer (``keras.layers.RNN``: LSTM, GRU, SimpleRNN,
  ConvLSTM, ``RNN(cell)``, each direction of a ``Bidirectional``) calls its
  cell inside its loop, where no call can be recorded for the step: its
  cell's variables (and its cell's sublayers') get the recurrent layer's one
  generic block, tapped outside the loop.
* Predictive distributions. Each model output that has a loss gets one
  distribution, read on the layer that produces the output:

  ======================================  ======================  ============
  loss                                    output activation       distribution
  ======================================  ======================  ============
  (sparse) categorical cross-entropy      softmax (from_logits    categorical
                                          False) / linear (True)
  binary cross-entropy                    sigmoid (False) /       multi-
                                          linear (True)           Bernoulli
  mean squared error                      any                     normal,
                                                                  σ² = D / 2
  ======================================  ======================  ============

  σ² = D / 2 (D = size of the output's last axis) makes the normal Fisher
  2/D · I, the Gauss-Newton matrix of Keras' mean squared error (a mean over
  the last axis). The output may also come from an ``Activation`` layer (it
  is tapped like any layer with an ``activation``), a ``Softmax`` layer, or
  a ``keras.ops.softmax`` / ``keras.ops.sigmoid`` in a functional graph (the
  distribution is then read on the linear layer that feeds it).

Output layers are found from the Keras graph (``model.outputs``' history) for
functional and Sequential models, and by one inference call on a small batch
of zeros (or ``sample_inputs``) for subclassed models.
"""

import keras
import numpy as np
from absl import logging
from keras import tree

from tkfac_tf import keras_compat
from tkfac_tf import layer_kinds
from tkfac_tf import loss_functions
from tkfac_tf.errors import UnsupportedLayerError

# Families of loss_functions.DISTRIBUTIONS (the one registry: each class
# names its register method and the activation of its probability output).
_CATEGORICAL = loss_functions.CategoricalLogits.family
_BERNOULLI = loss_functions.MultiBernoulliLogits.family
_NORMAL = loss_functions.Normal.family

_LOSS_FUNCTIONS = {
    keras.losses.sparse_categorical_crossentropy: _CATEGORICAL,
    keras.losses.categorical_crossentropy: _CATEGORICAL,
    keras.losses.binary_crossentropy: _BERNOULLI,
    keras.losses.mean_squared_error: _NORMAL,
}

_HOW_TO_REGISTER_BY_HAND = (
    "Register the distribution by hand instead: build "
    "lc = tkfac_tf.LayerCollection(), call lc.register_dense(layer) for the "
    "layers to precondition, then "
    + ", ".join(
        f"lc.{cls.register_method}(output_layer"
        + (", variance=...)" if cls is loss_functions.Normal else ")")
        + f" for a {cls.loss_description}"
        for cls in loss_functions.DISTRIBUTIONS.values()
    )
    + "."
)


# --- losses -----------------------------------------------------------------
class LossSpec:
    """A loss reduced to what the Fisher needs.

    Attributes:
      family: 'categorical', 'multi_bernoulli' or 'normal'.
      from_logits: whether the loss reads logits (cross-entropies only).
      description: how the user spelled it, for messages.
    """

    def __init__(self, family, from_logits, description):
        self.family = family
        self.from_logits = from_logits
        self.description = description


def _describe(loss):
    if isinstance(loss, str):
        return repr(loss)
    if isinstance(loss, keras.losses.Loss):
        return f"{type(loss).__name__}(...)"
    return getattr(loss, "__name__", None) or repr(loss)


def _unmappable(loss, output, reason):
    where = f" for output '{output}'" if output is not None else ""
    return ValueError(
        f"Cannot infer a predictive distribution from the loss "
        f"{_describe(loss)}{where}: {reason} from_model understands sparse / "
        "categorical cross-entropy, binary cross-entropy and mean squared "
        "error (as strings, keras.losses classes or functions). "
        + _HOW_TO_REGISTER_BY_HAND
    )


def parse_loss(loss, output=None):
    """Maps one Keras loss (string, ``keras.losses.Loss`` or function) to a
    :class:`LossSpec`.

    Raises:
      ValueError: if the loss is not one of the supported ones.
    """
    if isinstance(loss, str):
        try:
            resolved = keras.losses.get(loss)
        except (ValueError, TypeError):
            raise _unmappable(loss, output, "it is not a Keras loss name.") from None
        spec = parse_loss(resolved, output)
        return LossSpec(spec.family, spec.from_logits, repr(loss))
    if isinstance(loss, keras.losses.Loss):
        fn = getattr(loss, "fn", None)
        kwargs = dict(getattr(loss, "_fn_kwargs", None) or {})
    elif callable(loss):
        fn, kwargs = loss, {}
    else:
        raise _unmappable(loss, output, "it is neither a string, a Loss nor a function.")
    family = _LOSS_FUNCTIONS.get(fn)
    if family is None:
        raise _unmappable(loss, output, "it is a custom or unsupported loss.")
    axis = kwargs.get("axis", -1)
    if family != _NORMAL and axis != -1:
        raise _unmappable(
            loss, output, f"it reduces over axis={axis}; only axis=-1 is supported."
        )
    return LossSpec(family, bool(kwargs.get("from_logits", False)), _describe(loss))


def _is_nested(loss):
    return isinstance(loss, (list, tuple, dict))


def losses_per_output(loss, output_keys):
    """The loss of each output (None: no loss), in output order.

    Args:
      loss: what ``compile(loss=...)`` accepts: one loss (applied to every
        output), a list / tuple in output order, or a dict keyed by output name.
      output_keys: list of the outputs' names (dict keys or output layer names).
    """
    if isinstance(loss, dict):
        unknown = [k for k in loss if k not in output_keys]
        if unknown:
            raise ValueError(
                f"The loss dict has keys {unknown} that name no model output; "
                f"the outputs are {output_keys}."
            )
        return [loss.get(key) for key in output_keys]
    if isinstance(loss, (list, tuple)):
        if len(loss) != len(output_keys):
            raise ValueError(
                f"The loss list has {len(loss)} entries but the model has "
                f"{len(output_keys)} outputs {output_keys}; give one loss per "
                "output (None for an output without loss)."
            )
        return list(loss)
    return [loss] * len(output_keys)


# --- model outputs ----------------------------------------------------------
class _Output:
    """One model output: its name, the layer that carries its distribution,
    the output's last dimension, and the ``Softmax`` layer or softmax /
    sigmoid operation that follows ``layer`` (None when ``layer`` produces
    the output itself) with the activation it applies."""

    def __init__(self, key, layer, size, applied_by=None, applied=None):
        self.key = key
        self.layer = layer
        self.size = size
        self.applied_by = applied_by
        self.applied = applied


def _has_graph(model):
    """Whether a model exposes a Keras functional graph (Functional, Sequential)."""
    try:
        return bool(model.outputs)
    except (AttributeError, ValueError):
        return False


def _is_transparent(layer):
    """An ``Activation('linear')``: output is its input."""
    return (
        isinstance(layer, keras.layers.Activation)
        and loss_functions._activation_name(layer) == "linear"
    )


class _GraphSource:
    """Producers of tensors read from Keras history (functional graphs)."""

    def producer(self, tensor):
        """(producing layer or model, first input of that call, index of the
        tensor among the producer's outputs)."""
        operation, node_index, tensor_index = tensor._keras_history
        if isinstance(operation, keras.Model):
            return operation, None, tensor_index
        node = operation._inbound_nodes[node_index]
        inputs = node.input_tensors
        return operation, (inputs[0] if inputs else None), tensor_index


class _ProbeSource:
    """Producers of tensors recorded during one inference call of a model.

    The ``call`` of every (non-model) layer inside the model is wrapped for
    that call and restored after; the innermost layer producing a tensor wins.
    """

    def __init__(self, model, sample_inputs):
        self.model = model
        self._produced = {}  # id(tensor) -> (layer, its first input)
        self._keep = []  # keeps probed tensors alive so their ids stay unique
        self.called = set()  # ids of the layers that were called
        self.layer_ids = set()  # ids of the layers that were watched
        saved = []
        try:
            for layer in model._flatten_layers(include_self=False, recursive=True):
                if isinstance(layer, keras.Model):
                    continue
                self.layer_ids.add(id(layer))
                saved.append((layer, layer.__dict__.get("call")))
                keras_compat.set_untracked(layer, "call", self._wrap(layer, layer.call))
            if sample_inputs is None:
                sample_inputs = _zeros_like_first_call(model)
            try:
                if isinstance(sample_inputs, _KeywordInputs):
                    outputs = model(**sample_inputs, training=False)
                else:
                    outputs = model(sample_inputs, training=False)
            except Exception as error:
                raise ValueError(
                    f"from_model ran model '{model.name}' "
                    f"({type(model).__name__}) on one batch to find its output "
                    f"layers, and the call failed ({type(error).__name__}: "
                    f"{error}). Pass sample_inputs=<one batch of real inputs> "
                    "to from_model."
                ) from error
        finally:
            for layer, call in saved:
                if call is None:
                    object.__delattr__(layer, "call")
                else:
                    keras_compat.set_untracked(layer, "call", call)
        self.outputs = outputs

    def _wrap(self, layer, call):
        def probe_call(*args, **kwargs):
            outputs = call(*args, **kwargs)
            self.called.add(id(layer))
            first = args[0] if args else kwargs.get("inputs")
            self._keep.extend([first, outputs])
            for tensor in tree.flatten(outputs):
                self._produced.setdefault(id(tensor), (layer, first))
            return outputs

        return probe_call

    def producer(self, tensor):
        layer, first = self._produced.get(id(tensor), (None, None))
        return layer, first, None


class _KeywordInputs(dict):
    """Inputs of a call taking several tensor arguments, passed by name."""


def _zeros_like_first_call(model):
    """A batch of zeros shaped like the model's first call (unknown dims = 2)."""
    shapes = getattr(model, "_build_shapes_dict", None)
    if not shapes:
        raise ValueError(
            f"from_model cannot tell the input shape of subclassed model "
            f"'{model.name}'. Call the model on a batch first, or pass "
            "sample_inputs=<one batch of inputs> to from_model."
        )
    dtype = getattr(model, "input_dtype", None) or "float32"

    def zeros(shape):
        return keras.ops.zeros([2 if d is None else d for d in shape], dtype=dtype)

    if len(shapes) == 1:
        return tree.map_shape_structure(zeros, next(iter(shapes.values())))
    return _KeywordInputs(
        (name[: -len("_shape")], tree.map_shape_structure(zeros, shape))
        for name, shape in shapes.items()
    )


def _static_last_dim(tensor):
    shape = tuple(tensor.shape)
    return int(shape[-1]) if shape and shape[-1] is not None else None


def _resolve(tensor, source, probes, key):
    """The :class:`_Output` for ``tensor``: its leaf producer, looking through
    nested models, ``Activation('linear')`` and a final ``Softmax`` layer
    or softmax / sigmoid operation."""
    layer, first_input, index = source.producer(tensor)
    if layer is None:
        raise ValueError(
            f"from_model could not find the layer that produces output "
            f"'{key}' (is it computed outside any layer?). "
            + _HOW_TO_REGISTER_BY_HAND
        )
    if isinstance(layer, keras.Model):
        if _has_graph(layer):
            return _resolve(layer.outputs[index], _GraphSource(), probes, key)
        if id(layer) not in probes:
            probes[id(layer)] = _ProbeSource(layer, None)
        inner = probes[id(layer)]
        return _resolve(tree.flatten(inner.outputs)[index], inner, probes, key)
    if isinstance(layer, keras.layers.InputLayer):
        raise ValueError(f"Model output '{key}' is a model input, not a layer output.")
    if _is_transparent(layer) and first_input is not None:
        return _resolve(first_input, source, probes, key)
    size = _static_last_dim(tensor)
    applied = "softmax" if isinstance(layer, keras.layers.Softmax) else keras_compat.probability_op(layer)
    if applied is not None:
        last = len(tensor.shape) - 1
        if applied == "softmax" and (layer.axis not in (-1, [-1], (-1,), last, [last]) or first_input is None):
            raise ValueError(
                f"Output '{key}' is a softmax over axis {layer.axis} ('{layer.name}'); "
                "from_model supports a softmax over the last axis only. " + _HOW_TO_REGISTER_BY_HAND
            )
        logits = _resolve(first_input, source, probes, key)
        return _Output(key, logits.layer, size, applied_by=layer, applied=applied)
    return _Output(key, layer, size)


def model_outputs(model, sample_inputs=None):
    """The model's outputs in Keras' flat output order.

    Returns:
      (list of :class:`_Output`, list of output names as a loss dict keys
      them, dict id(model) -> :class:`_ProbeSource` of the probed models).
    """
    probes = {}
    if _has_graph(model):
        flat = list(model.outputs)
        struct = getattr(model, "_outputs_struct", None)
        if isinstance(struct, dict) and len(struct) == len(flat):
            keys = sorted(struct)  # Keras flattens dicts in sorted key order
        else:
            keys = list(getattr(model, "output_names", None) or [])
            if len(keys) != len(flat):
                keys = [t._keras_history.operation.name for t in flat]
        source = _GraphSource()
    else:
        source = probes[id(model)] = _ProbeSource(model, sample_inputs)
        flat = tree.flatten(source.outputs)
        if isinstance(source.outputs, dict):
            keys = sorted(source.outputs)
        else:
            keys = [f"output_{i}" for i in range(len(flat))]
    return [_resolve(t, source, probes, k) for t, k in zip(flat, keys)], keys, probes


# --- distributions ------------------------------------------------------------
def _distribution_for(output, spec):
    """(layer, distribution class, kwargs) for one output, checked against
    its activation."""
    distribution = loss_functions.DISTRIBUTIONS[spec.family]
    probability_activation = distribution.probability_activation
    layer = output.layer
    if not callable(getattr(layer, "activation", None)):
        raise ValueError(
            f"Output '{output.key}' is produced by layer '{layer.name}' "
            f"({type(layer).__name__}), which has no activation that tkfac_tf "
            "can tap to read the logits / mean. " + _HOW_TO_REGISTER_BY_HAND
        )
    activation = loss_functions._activation_name(layer)
    if output.applied_by is not None:
        if activation != "linear":
            raise ValueError(
                f"Output '{output.key}': {output.applied} '{output.applied_by.name}' "
                f"follows layer '{layer.name}' whose activation is "
                f"'{activation}'; the logits must be linear. "
                + _HOW_TO_REGISTER_BY_HAND
            )
        activation = output.applied
    if spec.family == _NORMAL:
        if output.applied_by is not None:
            raise ValueError(
                f"Output '{output.key}' ends in {output.applied} "
                f"'{output.applied_by.name}'; a mean squared error on "
                "probabilities is not supported. " + _HOW_TO_REGISTER_BY_HAND
            )
        if output.size is None:
            raise ValueError(
                f"Output '{output.key}' has an unknown last dimension; "
                "from_model needs it to set the normal distribution's variance."
            )
        return layer, distribution, {"variance": output.size / 2.0}
    expected = "linear" if spec.from_logits else probability_activation
    if activation != expected:
        if spec.from_logits:
            meaning = (
                f"from_logits=True, so the loss treats the output as logits, but "
                f"layer '{layer.name}' applies '{activation}'. Remove the "
                f"activation (use a linear output) or use from_logits=False"
                + (f" with activation '{probability_activation}'." if activation == probability_activation else ".")
            )
        else:
            meaning = (
                f"from_logits=False, so the loss expects probabilities from a "
                f"'{probability_activation}' output, but layer '{layer.name}' "
                f"applies '{activation}'"
                + (
                    " (its outputs are logits). Use from_logits=True, or give the "
                    f"layer activation='{probability_activation}'."
                    if activation == "linear"
                    else f". Give the layer activation='{probability_activation}'."
                )
            )
        raise ValueError(
            f"The loss {spec.description} does not match output '{output.key}': "
            + meaning
        )
    return layer, distribution, {}


# --- layers -------------------------------------------------------------------
def _layer_method(collection, layer):
    """The register_* method for a supported layer, or None."""
    if isinstance(layer, keras.layers.Dense):
        return collection.register_dense
    if isinstance(layer, keras.layers.Conv2D):
        return collection.register_conv2d
    if isinstance(layer, keras.layers.Conv1D):
        return collection.register_conv1d
    if isinstance(layer, keras.layers.DepthwiseConv2D):
        return collection.register_depthwise_conv2d
    if isinstance(layer, keras.layers.SeparableConv2D):
        return collection.register_separable_conv2d
    if isinstance(layer, keras.layers.EinsumDense):
        return collection.register_einsum_dense
    if isinstance(layer, keras.layers.Embedding):
        return collection.register_embedding
    if isinstance(layer, keras.layers.LayerNormalization):
        return collection.register_layer_normalization
    if isinstance(layer, keras.layers.BatchNormalization):
        return collection.register_batch_normalization
    return None


OTHER_VARIABLES = ("diagonal", "full", "momentum")


def _own_trainable_variables(layer):
    return list(getattr(layer, "_trainable_variables", []) or [])


def _called_in_recurrent_loops(model):
    """The ids of the layers that a recurrent layer (``keras.layers.RNN``)
    of ``model`` calls inside its loop: its cell and the cell's sublayers."""
    inside = set()
    for layer in model._flatten_layers(include_self=False, recursive=True):
        if isinstance(layer, keras.layers.RNN) and id(layer) not in inside:
            inside.update(id(sub) for sub in layer._flatten_layers(include_self=False, recursive=True))
    return inside


def loss_weights_per_output(loss_weights, output_keys):
    """Each output's loss weight (1.0 where none is given), from what
    ``compile(loss_weights=...)`` takes: None, one number (the single
    output's), a list / tuple in output order or a dict keyed by output name."""
    if loss_weights is None:
        return [1.0] * len(output_keys)
    if not isinstance(loss_weights, (list, tuple, dict)):
        if len(output_keys) != 1:
            raise ValueError(
                f"loss_weights={loss_weights!r} is one number, but the model has "
                f"{len(output_keys)} outputs {output_keys}; give a list or a dict."
            )
        return [loss_weights]
    return [1.0 if w is None else w for w in losses_per_output(loss_weights, output_keys)]


def register_model(collection, model, loss=None, sample_inputs=None, other_variables="diagonal",
                   loss_weights=None):
    """Registers ``model``'s supported layers and the predictive distribution of
    each output with a loss into ``collection``. See the module docstring.

    Args:
      collection: an empty or partly filled LayerCollection.
      model: a built keras.Model (Sequential, functional or subclassed).
      loss: the training loss (as given to ``compile``); None reads
        ``model.loss`` (the model must be compiled), and then, when
        ``loss_weights`` is None, the compiled ``loss_weights`` too.
      sample_inputs: one batch of inputs for subclassed models whose input
        shape cannot be read (otherwise zeros shaped like the first call).

      other_variables: 'diagonal' (every trainable variable that no layer
        kind covers gets a diagonal block via ``register_generic``, one per
        owning layer), 'full' (a full block for owners with at most
        ``layer_kinds.MAX_FULL_BLOCK_SIZE`` such scalars, diagonal beyond) or
        'momentum' (they keep the plain momentum update).
      loss_weights: as ``compile(loss_weights=...)``: each output's weight
        in the training loss, the coefficient of its distribution's Fisher.

    Returns:
      ``collection``.
    """
    if other_variables not in OTHER_VARIABLES:
        raise ValueError(
            f"other_variables must be one of {OTHER_VARIABLES}; got {other_variables!r}."
        )
    if not isinstance(model, keras.Model):
        raise TypeError(
            f"from_model expects a keras.Model; got {type(model).__name__}. "
            "Register single layers with register_dense."
        )
    if not model.built or not model.trainable_variables:
        raise ValueError(
            f"Model '{model.name}' is not built (or has no trainable "
            "variables). Build it first: give it an Input, call "
            "model.build(input_shape), or call it on a batch."
        )
    if loss is None:
        loss = getattr(model, "loss", None)
        if loss is None:
            raise ValueError(
                f"from_model(model '{model.name}', loss=None) reads model.loss, "
                "but the model is not compiled with a loss. Pass loss=... (e.g. "
                "'sparse_categorical_crossentropy') or compile the model first."
            )
        if loss_weights is None:
            loss_weights = keras_compat.compiled_loss_weights(model)
    outputs, keys, probes = model_outputs(model, sample_inputs)
    specs = []
    weights = loss_weights_per_output(loss_weights, keys)
    for output, output_loss, weight in zip(outputs, losses_per_output(loss, keys), weights):
        if output_loss is None or weight == 0:  # a weight of 0 removes the output's loss
            continue
        if _is_nested(output_loss):
            raise _unmappable(output_loss, output.key, "a nested loss structure per output.")
        layer, distribution, kwargs = _distribution_for(output, parse_loss(output_loss, output.key))
        if weight != 1.0:
            kwargs = dict(kwargs, coefficient=weight)
        specs.append((layer, distribution, kwargs))
    if not specs:
        raise ValueError(
            f"No output of model '{model.name}' has a loss; from_model needs at "
            "least one to register a predictive distribution."
        )

    trainable_ids = {id(v) for v in model.trainable_variables}
    watched = set().union(*(p.layer_ids for p in probes.values()))
    called = set().union(*(p.called for p in probes.values()))
    in_loops = _called_in_recurrent_loops(model)
    registered, skipped = [], []
    for layer in model._flatten_layers(include_self=False, recursive=True):
        if id(layer) in in_loops:
            continue
        method = _layer_method(collection, layer)
        own = [v for v in _own_trainable_variables(layer) if id(v) in trainable_ids]
        if method is None or not layer.built or not own:
            continue
        if id(layer) in watched and id(layer) not in called:
            skipped.append((layer, "not called by the model"))
            continue
        try:
            method(layer)
        except UnsupportedLayerError as error:  # any other error propagates
            skipped.append((layer, str(error).rstrip(".")))
            continue
        registered.append(layer)

    if other_variables != "momentum":
        covered = {id(v) for kind in collection.layer_kinds for v in kind.parameters}
        taken = {id(kind.layer) for kind in collection.layer_kinds}
        owners = list(model._flatten_layers(include_self=False, recursive=True)) + [model]
        for layer in owners:
            if id(layer) in taken or id(layer) in in_loops or (
                    id(layer) in watched and id(layer) not in called):
                continue
            left = [v for v in layer_kinds.generic_variables(layer)
                    if id(v) in trainable_ids and id(v) not in covered]
            if left:
                size = sum(int(np.prod(v.shape)) for v in left)
                full = other_variables == "full" and size <= layer_kinds.MAX_FULL_BLOCK_SIZE
                collection.register_generic(layer, left, "full" if full else "diagonal")
                registered.append(layer)
                covered.update(id(v) for v in left)

    distributions = []
    seen = {}
    for layer, distribution, kwargs in specs:
        previous = seen.get(id(layer))
        if previous is not None:
            if previous != (distribution, kwargs):
                raise ValueError(
                    f"Layer '{layer.name}' produces several outputs with "
                    "different losses; register their distributions by hand."
                )
            continue
        seen[id(layer)] = (distribution, kwargs)
        getattr(collection, distribution.register_method)(layer, **kwargs)
        distributions.append((layer, distribution))

    _log_summary(model, collection, registered, skipped, distributions)
    return collection


def _log_summary(model, collection, registered, skipped, distributions):
    """One absl message: what was registered, and the trainable variables left
    to the plain momentum update."""
    covered = {id(v) for kind in collection.layer_kinds for v in kind.parameters}
    owner = {}
    for layer in model._flatten_layers(include_self=True, recursive=True):
        for variable in _own_trainable_variables(layer):
            owner.setdefault(id(variable), layer)
    left = {}
    for variable in model.trainable_variables:
        if id(variable) in covered:
            continue
        layer = owner.get(id(variable), model)
        left.setdefault(id(layer), (layer, []))[1].append(variable.path)
    names = ", ".join(f"{l.name} ({type(l).__name__})" for l in registered) or "none"
    dists = ", ".join(f"{d.name} on '{l.name}'" for l, d in distributions)
    message = (
        f"tkfac_tf.LayerCollection.from_model(model '{model.name}'): registered "
        f"{len(registered)} layer(s): {names}; predictive distribution(s): {dists}."
    )
    generic = [kind for kind in collection.layer_kinds if isinstance(kind, layer_kinds.VariablesKind)]
    if generic:
        message += (
            f" {len(generic)} of them have no Kronecker-factored form and get a generic block "
            "estimated from the batch gradient (register_generic): "
            + "; ".join(f"{k.layer.name} ({type(k.layer).__name__}, {k.structure})" for k in generic)
            + "."
        )
    if skipped:
        message += " Not registered: " + "; ".join(
            f"{l.name} ({type(l).__name__}): {why}" for l, why in skipped
        ) + "."
    if left:
        count = sum(len(paths) for _, paths in left.values())
        message += (
            f" {len(left)} trainable layer(s) with {count} variable(s) are "
            "unregistered and get the plain momentum update (no "
            "preconditioning): "
            + "; ".join(
                f"{layer.name} ({type(layer).__name__}): {', '.join(paths)}"
                for layer, paths in left.values()
            )
            + "."
        )
    if not getattr(model, "_call_has_training_arg", True):
        message += (
            f" Model '{model.name}' ({type(model).__name__}) has a call() "
            "without a `training` argument, so fit() calls it without "
            "training=True and tkfac_tf, which records statistics in training "
            "calls only, will see none: add `training=None` to the signature "
            "of its call()."
        )
    if left or skipped or not getattr(model, "_call_has_training_arg", True):
        logging.warning("%s", message)
    else:
        logging.info("%s Every trainable variable is preconditioned.", message)
