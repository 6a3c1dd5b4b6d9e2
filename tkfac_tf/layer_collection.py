"""LayerCollection: which layers get Fisher blocks and which predictive
distribution the Fisher is taken under."""

import gc
import re
import weakref

from typing import Any, Optional

import keras

from tkfac_tf import auto_registration
from tkfac_tf import capture
from tkfac_tf import layer_kinds
from tkfac_tf import loss_functions
from tkfac_tf.errors import RegistrationConflictError, UnsupportedLayerError


def _check_layer(layer, what, layer_class=keras.layers.Layer):
    """Raises unless ``layer`` is a built instance of ``layer_class``."""
    if not isinstance(layer, keras.layers.Layer):
        raise UnsupportedLayerError(
            f"{what} expects a keras.layers.Layer (a built "
            f"keras.layers.{layer_class.__name__}); got {type(layer).__name__}."
        )
    if not isinstance(layer, layer_class):
        name = f"layer '{layer.name}' is a"
        raise UnsupportedLayerError(
            f"{what}: {name} {type(layer).__name__}, not "
            f"keras.layers.{layer_class.__name__}. Register Dense layers with "
            "register_dense, Conv2D with register_conv2d, Conv1D with "
            "register_conv1d, DepthwiseConv2D with register_depthwise_conv2d "
            "and SeparableConv2D with register_separable_conv2d; other "
            "layers stay unregistered and get the plain momentum update."
        )
    if not layer.built:
        raise ValueError(
            f"Layer '{layer.name}' is not built. Build the model first (call it "
            "on a batch, or give it an Input / call model.build(input_shape)) "
            "and then register its layers."
        )


def _without_suffixes(path):
    """``path`` with each component's Keras uniqueness suffix dropped
    ('lstm_cell_1/kernel' -> 'lstm_cell/kernel')."""
    return "/".join(re.sub(r"_\d+$", "", part) for part in path.split("/"))


def _model_layers(model):
    """The model's layers in Keras' tracking order (nested models' included)."""
    return list(model._flatten_layers(include_self=False, recursive=True))


def _match_by_path(path: str, named: dict):
    """The value of ``named`` (path → object) whose path is ``path``, else
    the one whose path and ``path`` agree on all the components of the
    shorter, counted from the end ('a/b/c' matches 'b/c' and 'x/a/b/c'):
    the longest such agreement, or None when there is none or two objects
    tie for it."""
    if path in named:
        return named[path]
    parts = path.split("/")
    best, best_length = [], 0
    for key, value in named.items():
        key_parts = key.split("/")
        length = min(len(parts), len(key_parts))
        if parts[-length:] != key_parts[-length:] or length < best_length:
            continue
        if length > best_length:
            best, best_length = [], length
        if all(value is not other for other in best):
            best.append(value)
    return best[0] if len(best) == 1 else None


class LayerCollection:
    """Registered layers and predictive distributions of one model.

    Registration wraps each layer's ``call`` so that training calls record
    their inputs and pre-activations (see ``capture``). Layers and
    distributions are kept in registration order.
    """

    def __init__(self):
        self.recorder = capture.Recorder()
        self.recorder.owner = weakref.ref(self)
        self._released = False
        self._models = []  # models given to register_model
        self._kinds = {}  # id(layer) -> layer kind
        self._distributions = {}  # id(layer) -> PredictiveDistribution

    @classmethod
    def from_model(cls, model: keras.Model, loss: Any = None, sample_inputs: Any = None,
                   other_variables: str = "diagonal", loss_weights: Any = None) -> "LayerCollection":
        """A collection with every supported layer of ``model`` and one
        predictive distribution per output with a loss.

        ``loss`` is what ``compile(loss=...)`` takes (None: ``model.loss``),
        and ``loss_weights`` what ``compile(loss_weights=...)`` takes (each
        output's Fisher coefficient; None with ``loss=None``: the compiled
        ones, else 1).
        ``sample_inputs`` (one batch) is needed only for subclassed models
        whose input shape cannot be read. ``other_variables``: 'diagonal'
        (default: every trainable variable no layer kind covers gets a
        diagonal block, ``register_generic``), 'full' (a full block where the
        layer's leftover variables have at most
        ``layer_kinds.MAX_FULL_BLOCK_SIZE`` scalars, diagonal beyond) or
        'momentum' (they keep the plain momentum update). See
        ``auto_registration``.
        """
        collection = cls()
        try:
            auto_registration.register_model(
                collection, model, loss, sample_inputs, other_variables=other_variables,
                loss_weights=loss_weights,
            )
        except Exception:
            collection.release()  # give back the layers it took before failing
            raise
        collection.register_model(model)
        return collection

    def register_model(self, model: keras.Model) -> None:
        """Lets adaptive optimizers re-evaluate the loss inside ``model.fit``:
        each training ``model.compute_loss`` call records its (x, y,
        sample_weight) beside the layers' statistics (see
        ``capture.install_loss_recorder``); and lets the registered layers
        that the model's training call calls with ``training=False`` record
        their statistics (``capture.mark_training_calls``). ``from_model``
        calls it."""
        if not isinstance(model, keras.Model):
            raise TypeError(
                f"register_model expects a keras.Model; got {type(model).__name__}."
            )
        self._check_not_released()
        capture.install_loss_recorder(model, self.recorder)
        capture.mark_training_calls(model)
        self._models.append(model)

    # --- layers -----------------------------------------------------------
    def register_dense(self, layer: keras.layers.Layer) -> None:
        """Registers a built keras.layers.Dense for a Fisher block."""
        _check_layer(layer, "register_dense", keras.layers.Dense)
        self._register_layer(layer, layer_kinds.DenseKind(layer))

    register_fully_connected = register_dense

    def register_conv2d(self, layer: keras.layers.Layer) -> None:
        """Registers a built keras.layers.Conv2D for a Fisher block (KFC
        layout: one sample per example and output location, see
        ``layer_kinds.Conv2DKind``). A grouped convolution (groups > 1) gets
        one Kronecker block per group, stored as a batch
        (``layer_kinds.GroupedConv2DKind``)."""
        _check_layer(layer, "register_conv2d", keras.layers.Conv2D)
        if layer.groups != 1:
            self._register_layer(layer, layer_kinds.GroupedConv2DKind(layer))
        else:
            self._register_layer(layer, layer_kinds.Conv2DKind(layer))

    def register_conv1d(self, layer: keras.layers.Layer) -> None:
        """Registers a built keras.layers.Conv1D (any groups; paddings 'valid',
        'same', 'causal'): one sample per example and output step, one block
        per group (``layer_kinds.Conv1DKind``)."""
        _check_layer(layer, "register_conv1d", keras.layers.Conv1D)
        self._register_layer(layer, layer_kinds.Conv1DKind(layer))

    def register_depthwise_conv2d(self, layer: keras.layers.Layer) -> None:
        """Registers a built keras.layers.DepthwiseConv2D: one Kronecker block
        per input channel (its kh·kw patch values (+1) ⊗ its depth_multiplier
        outputs), stored and inverted as a batch
        (``layer_kinds.DepthwiseConv2DKind``)."""
        _check_layer(layer, "register_depthwise_conv2d", keras.layers.DepthwiseConv2D)
        self._register_layer(layer, layer_kinds.DepthwiseConv2DKind(layer))

    def register_separable_conv2d(self, layer: keras.layers.Layer) -> None:
        """Registers a built keras.layers.SeparableConv2D: two blocks on the
        layer, its depthwise kernel (batched, one block per input channel)
        and its pointwise kernel with the bias
        (``layer_kinds.SeparableConv2DKind``)."""
        _check_layer(layer, "register_separable_conv2d", keras.layers.SeparableConv2D)
        self._register_layer(layer, layer_kinds.SeparableConv2DKind(layer))

    def register_einsum_dense(self, layer: keras.layers.Layer) -> None:
        """Registers a built keras.layers.EinsumDense (e.g. a
        MultiHeadAttention projection) for a Kronecker block over its
        contracted input axes and its output axes, other axes being
        positions (``layer_kinds.EinsumDenseKind``)."""
        _check_layer(layer, "register_einsum_dense", keras.layers.EinsumDense)
        self._register_layer(layer, layer_kinds.EinsumDenseKind(layer))

    def register_embedding(self, layer: keras.layers.Layer) -> None:
        """Registers a built keras.layers.Embedding: Kronecker block with a
        diagonal input factor (token counts; ``layer_kinds.EmbeddingKind``)."""
        _check_layer(layer, "register_embedding", keras.layers.Embedding)
        self._register_layer(layer, layer_kinds.EmbeddingKind(layer))

    def register_layer_normalization(self, layer: keras.layers.Layer) -> None:
        """Registers a built keras.layers.LayerNormalization's scale and
        offset: per-feature 2×2 blocks (``layer_kinds.ScaleAndShiftKind``)."""
        _check_layer(layer, "register_layer_normalization", keras.layers.LayerNormalization)
        self._register_layer(layer, layer_kinds.ScaleAndShiftKind(layer))

    def register_batch_normalization(self, layer: keras.layers.Layer) -> None:
        """Registers a built keras.layers.BatchNormalization's scale and
        offset: per-feature 2×2 blocks (``layer_kinds.ScaleAndShiftKind``)."""
        _check_layer(layer, "register_batch_normalization", keras.layers.BatchNormalization)
        self._register_layer(layer, layer_kinds.ScaleAndShiftKind(layer))

    def register_generic(self, layer: keras.layers.Layer, variables: Optional[list] = None,
                         structure: str = "diagonal") -> None:
        """Registers trainable variables of ``layer`` (a layer, or a model for
        its own variables) for a generic block estimated from the batch
        gradient: ``structure`` 'diagonal' (``fisher_blocks.DiagonalBlock``)
        or 'full' (``fisher_blocks.FullBlock``, at most
        ``layer_kinds.MAX_FULL_BLOCK_SIZE`` scalars). ``variables``: the
        variables (or their paths); default: the layer's own trainable
        variables (not those of its sublayers), or for a recurrent layer
        (``keras.layers.RNN``) all of them: its cell's."""
        if not isinstance(layer, keras.layers.Layer):
            raise UnsupportedLayerError(
                f"register_generic expects a keras.layers.Layer; got {type(layer).__name__}."
            )
        if not layer.built:
            raise ValueError(f"Layer '{layer.name}' is not built; build the model first.")
        own = layer_kinds.generic_variables(layer)
        if variables is None:
            chosen = own
        else:
            by_path = {v.path: v for v in layer.trainable_variables}
            by_id = {id(v): v for v in layer.trainable_variables}
            chosen = []
            for v in variables:
                found = by_path.get(v) if isinstance(v, str) else by_id.get(id(v))
                if found is None:
                    raise ValueError(
                        f"register_generic: {v!r} is not a trainable variable of "
                        f"layer '{layer.name}'."
                    )
                chosen.append(found)
        if not chosen:
            raise ValueError(f"Layer '{layer.name}' has no trainable variables to register.")
        self._register_layer(layer, layer_kinds.VariablesKind(layer, chosen, structure))

    def _register_layer(self, layer, kind):
        self._check_not_released()
        if getattr(layer, "lora_enabled", False) or getattr(layer, "quantization_mode", None):
            raise UnsupportedLayerError(
                f"Layer '{layer.name}' uses LoRA or quantization; tkfac_tf "
                "preconditions plain float kernels only. Leave it unregistered."
            )
        if id(layer) in self._kinds:
            raise RegistrationConflictError(
                f"Layer '{layer.name}' is already registered in this "
                "LayerCollection; register each layer once."
            )
        same_name = [k for k in self._kinds.values() if k.block_name == kind.block_name]
        if same_name and all(hasattr(k, "keyed_by_path") for k in same_name + [kind]):
            # Dense / conv layers of the same name in different places (nested
            # blocks): both are keyed by their paths.
            for other in same_name + [kind]:
                other.keyed_by_path = True
        names = {k.block_name for k in self._kinds.values()}
        if kind.block_name in names:
            raise RegistrationConflictError(
                f"Another registered layer is also named '{kind.block_name}'. Give "
                "layers unique names (blocks are keyed by layer name)."
            )
        distribution = self._distributions.get(id(layer))
        if kind.tap != "activation" and distribution is not None:
            raise RegistrationConflictError(
                f"Layer '{layer.name}' carries a predictive distribution; only "
                "layers with an activation can also have a Fisher block."
            )
        self._claim(layer, kind.tap, getattr(kind, "variables", None))
        self._kinds[id(layer)] = kind

    # --- ownership of the layers' taps ----------------------------------------
    def _claim(self, layer, tap=None, variables=None):
        """Installs this collection's tap on ``layer``, unless another live
        collection holds it (a collection nothing refers to any more holds
        nothing)."""
        self._check_not_released()
        holder = getattr(layer, "_tkfac_recorder", None)
        if holder is not None and holder is not self.recorder:
            if holder.owner() is not None:
                gc.collect()  # an abandoned collection in a reference cycle
            if holder.owner() is not None:
                raise RegistrationConflictError(
                    f"Layer '{layer.name}' is already registered in another "
                    "tkfac_tf.LayerCollection that is still in use (e.g. by "
                    "an earlier optimizer); a layer belongs to one collection "
                    "at a time, and registering it here would stop the other "
                    "collection's statistics. Call release() on the other "
                    "collection first (e.g. old_optimizer.layer_collection"
                    ".release()), or drop every reference to it."
                )
        if tap is None:  # a distribution: keep the layer's block's tap, if any
            kind = self._kinds.get(id(layer))
            tap = kind.tap if kind is not None else "activation"
            variables = getattr(kind, "variables", None)
        capture.install_tap(layer, self.recorder, tap, variables)

    def _check_not_released(self):
        if self._released:
            raise RegistrationConflictError(
                "This LayerCollection was released (release()); create a new "
                "LayerCollection to register layers."
            )

    def release(self) -> None:
        """Releases every layer of this collection: their taps stop recording
        for it, and they can be registered in another collection
        (``from_model``, ``register_*``, an optimizer's ``attach``). Use it
        to abandon a collection that is still referenced (e.g. by an old
        optimizer). The collection keeps its description (``get_config``)
        but takes no further registrations, and an optimizer still bound to
        it raises a ValueError naming a released layer at its next step.
        Idempotent."""
        for layer in self._layers():
            capture.remove_tap(layer, self.recorder)
        for model in self._models:
            capture.remove_loss_recorder(model, self.recorder)
        self._released = True

    @property
    def released(self) -> bool:
        """Whether ``release()`` was called."""
        return self._released

    def _layers(self):
        layers = {id(k.layer): k.layer for k in self._kinds.values()}
        layers.update((id(d.layer), d.layer) for d in self._distributions.values())
        return list(layers.values())

    def check_holds_layers(self) -> None:
        """Raises ValueError naming the first layer whose statistics no longer
        reach this collection (it was released, or taken by another
        collection)."""
        for layer in self._layers():
            if getattr(layer, "_tkfac_recorder", None) is not self.recorder:
                how = (
                    "this LayerCollection was released (release())"
                    if self._released
                    else "the layer is now registered in another LayerCollection"
                )
                raise ValueError(
                    f"Layer '{layer.name}' no longer records statistics for "
                    f"this optimizer's LayerCollection: {how}. Train with the "
                    "optimizer of the collection that holds the layer, or "
                    "register the model in a new collection and create a new "
                    "optimizer for it."
                )

    # --- predictive distributions -------------------------------------------
    def register_categorical_predictive_distribution(self, layer: keras.layers.Layer,
                                                     coefficient: float = 1.0) -> None:
        """Categorical over the classes; logits = the layer's pre-activation
        (its activation must be softmax or linear). ``coefficient``: the
        weight of this output's loss in the training loss (compile's
        ``loss_weights``), which multiplies its Fisher."""
        self._register_distribution(layer, loss_functions.CategoricalLogits, coefficient=coefficient)

    def register_multi_bernoulli_predictive_distribution(self, layer: keras.layers.Layer,
                                                         coefficient: float = 1.0) -> None:
        """Independent Bernoulli outputs; logits = the layer's pre-activation
        (its activation must be sigmoid or linear). ``coefficient`` as for
        the categorical distribution."""
        self._register_distribution(layer, loss_functions.MultiBernoulliLogits, coefficient=coefficient)

    def register_normal_predictive_distribution(self, layer: keras.layers.Layer, variance: float = 1.0,
                                                coefficient: float = 1.0) -> None:
        """Gaussian with mean = the layer's output and the given variance
        (squared error). ``coefficient`` as for the categorical distribution."""
        self._register_distribution(layer, loss_functions.Normal, variance=variance,
                                    coefficient=coefficient)

    def _register_distribution(self, layer, cls, **kwargs):
        self._check_not_released()
        _check_layer(layer, cls.register_method)
        if id(layer) in self._distributions:
            raise RegistrationConflictError(
                f"Layer '{layer.name}' already has a predictive distribution "
                f"({self._distributions[id(layer)].name}); register one "
                "distribution per output layer."
            )
        kind = self._kinds.get(id(layer))
        if kind is not None and kind.tap != "activation":
            raise RegistrationConflictError(
                f"Layer '{layer.name}' is registered as {kind.name}, which has no "
                "activation to read the distribution's logits from."
            )
        distribution = cls(layer, **kwargs)
        self._claim(layer)
        self._distributions[id(layer)] = distribution

    # --- queries ------------------------------------------------------------
    @property
    def layer_kinds(self) -> list:
        """Layer kinds of the registered layers, in registration order."""
        return list(self._kinds.values())

    @property
    def normalises_over_batch(self) -> bool:
        """Whether a registered layer, or a layer of a model given to
        ``register_model``, normalises over the batch in training mode (a
        trainable keras BatchNormalization): its outputs, and so the exact
        curvature of the loss, couple the batch's examples."""
        layers = self._layers() + [
            layer for model in self._models
            for layer in model._flatten_layers(include_self=False, recursive=True)
        ]
        return any(
            isinstance(layer, keras.layers.BatchNormalization) and layer.trainable for layer in layers
        )

    @property
    def distributions(self) -> list:
        """Registered predictive distributions, in registration order."""
        return list(self._distributions.values())

    # --- serialization ----------------------------------------------------
    def get_config(self) -> dict:
        """JSON-able description: registered layers (with their factor sizes)
        and distributions, by layer name, in registration order, and whether
        the model's loss is recorded (``register_model``)."""
        positions = {}
        if self._models:  # where a layer is in the model (a renamed layer's fallback)
            for index, layer in enumerate(_model_layers(self._models[0])):
                positions.setdefault(id(layer), index)

        def with_position(entry, layer):
            if id(layer) in positions:
                entry = dict(entry, position=positions[id(layer)], cls=type(layer).__name__)
            return entry

        return {
            "layers": [with_position(kind.get_config(), kind.layer) for kind in self._kinds.values()],
            "distributions": [with_position(d.get_config(), d.layer) for d in self._distributions.values()],
            "records_model_loss": bool(self._models),
        }

    @classmethod
    def from_config(cls, config: dict, model: keras.Model) -> "LayerCollection":
        """Re-registers the layers of ``model`` that ``config`` names.

        Layers are found by name anywhere in the model (nested models too),
        or by path, and a generic block's variables by path. Keras gives the
        layers of a loaded model shorter paths than the saved ones (without
        the model's name, and without a wrapper's such as Bidirectional's), so
        a saved path also matches the one path of ``model`` that is a suffix
        of it by whole components, or of which it is one
        (``_match_by_path``).
        """
        layers = {model.name: model}
        paths = {}
        flat = _model_layers(model)
        for layer in flat:
            layers.setdefault(layer.name, layer)
            layers.setdefault(layer_kinds.layer_path(layer), layer)
            paths.setdefault(layer_kinds.layer_path(layer), layer)

        def at_position(entry):
            """The layer at the entry's saved position in the model's layer
            order, if of the saved class: a layer whose name Keras made
            unique anew (a subclassed model rebuilt in the same process gets
            'dense_2' for a saved 'dense')."""
            position = entry.get("position")
            if position is None or not 0 <= position < len(flat):
                return None
            layer = flat[position]
            return layer if type(layer).__name__ == entry.get("cls") else None

        def find(entry):
            """By name or path; the layer at the saved position where there is
            none, or where that one differs from it only by Keras' '_N'
            suffixes (names reassigned in this process may hit another layer)."""
            name = entry["layer"]
            layer = layers[name] if name in layers else _match_by_path(name, paths)
            positional = at_position(entry)
            if positional is not None and (layer is None or _without_suffixes(positional.name)
                                           == _without_suffixes(name.rsplit("/", 1)[-1])):
                layer = positional
            if layer is None:
                raise ValueError(
                    f"The saved layer collection names layer '{name}', which "
                    f"model '{model.name}' does not have. Attach the model the "
                    "optimizer was trained with."
                )
            return layer

        def variables_of(entry, layer):
            found, own = [], {v.path: v for v in layer.trainable_variables}
            # Fallback for a renamed layer: the path inside the layer, with
            # Keras' uniqueness suffixes ('_2') dropped.
            inside = {}
            for v in layer.trainable_variables:
                inside.setdefault(_without_suffixes(v.path[len(layer_kinds.layer_path(layer)) + 1:]), []).append(v)
            for path in entry["variables"]:
                variable = _match_by_path(path, own)
                if variable is None and path.startswith(entry["layer"] + "/"):
                    candidates = inside.get(_without_suffixes(path[len(entry["layer"]) + 1:]), [])
                    variable = candidates[0] if len(candidates) == 1 else None
                if variable is None:
                    raise ValueError(
                        f"The saved layer collection names variable '{path}', which layer "
                        f"'{layer_kinds.layer_path(layer)}' of model '{model.name}' does not have "
                        f"as a trainable variable. Attach the model the optimizer was trained with."
                    )
                found.append(variable)
            return found

        # A saved collection that names a recurrent cell: its recurrent layer
        # holds the cell's block (inside the loop the cell records nothing).
        loops = {id(rnn.cell): rnn for rnn in paths.values() if isinstance(rnn, keras.layers.RNN)}

        # Every layer is found before any is registered.
        layer_entries = [(e, loops.get(id(layer), layer))
                         for e, layer in ((e, find(e)) for e in config["layers"])]
        distribution_entries = [(e, find(e)) for e in config["distributions"]]
        collection = cls()
        for entry, layer in layer_entries:
            if "variables" in entry:
                collection.register_generic(
                    layer, variables=variables_of(entry, layer), structure=entry["structure"]
                )
            else:
                getattr(collection, entry["register"])(layer)
        for entry, layer in distribution_entries:
            options = {k: v for k, v in entry.items() if k not in ("layer", "register", "position", "cls")}
            getattr(collection, entry["register"])(layer, **options)
        if config.get("records_model_loss"):
            collection.register_model(model)
        return collection

    def validate(self) -> None:
        """Raises ValueError if the collection cannot drive an optimizer."""
        if not self._kinds:
            raise ValueError(
                "The LayerCollection has no registered layers: call "
                "register_dense(layer) / register_conv2d(layer) for the "
                "layers to precondition."
            )
        if not self._distributions:
            last = list(self._kinds.values())[-1].layer.name
            examples = [
                f"{cls.register_method}(...) ({cls.loss_description})"
                for cls in loss_functions.DISTRIBUTIONS.values()
            ]
            examples[0] = examples[0].replace("(...)", f"(model.get_layer('{last}'))", 1)
            raise ValueError(
                "The LayerCollection has no predictive distribution (registered "
                f"layers: {[k.layer.name for k in self._kinds.values()]}). Register "
                "one on the layer that produces the model's output, e.g. "
                + ", ".join(examples[:-1]) + " or " + examples[-1] + "."
            )
        self.check_holds_layers()
