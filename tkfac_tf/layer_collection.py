"""LayerCollection: which layers get Fisher blocks and which predictive
distribution the Fisher is taken under."""

import keras

from tkfac_tf import auto_registration
from tkfac_tf import capture
from tkfac_tf import layer_kinds
from tkfac_tf import loss_functions


class UnsupportedLayerError(TypeError, ValueError):
    """A layer of a kind the registration method does not accept (both a
    TypeError and a ValueError, so either ``except`` catches it)."""


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
            "register_dense and Conv2D layers with register_conv2d; other "
            "layers stay unregistered and get the plain momentum update."
        )
    if not layer.built:
        raise ValueError(
            f"Layer '{layer.name}' is not built. Build the model first (call it "
            "on a batch, or give it an Input / call model.build(input_shape)) "
            "and then register its layers."
        )


class LayerCollection:
    """Registered layers and predictive distributions of one model.

    Registration wraps each layer's ``call`` so that training calls record
    their inputs and pre-activations (see ``capture``). Layers and
    distributions are kept in registration order.
    """

    def __init__(self):
        self.recorder = capture.Recorder()
        self._kinds = {}  # id(layer) -> layer kind
        self._distributions = {}  # id(layer) -> PredictiveDistribution

    @classmethod
    def from_model(cls, model, loss=None, sample_inputs=None):
        """A collection with every supported layer of ``model`` and one
        predictive distribution per output with a loss.

        ``loss`` is what ``compile(loss=...)`` takes (None: ``model.loss``).
        ``sample_inputs`` (one batch) is needed only for subclassed models
        whose input shape cannot be read. See ``auto_registration``.
        """
        collection = auto_registration.register_model(cls(), model, loss, sample_inputs)
        collection.register_model(model)
        return collection

    def register_model(self, model):
        """Lets adaptive optimizers re-evaluate the loss inside ``model.fit``:
        each training ``model.compute_loss`` call records its (x, y,
        sample_weight) beside the layers' statistics (see
        ``capture.install_loss_recorder``). ``from_model`` calls it."""
        if not isinstance(model, keras.Model):
            raise TypeError(
                f"register_model expects a keras.Model; got {type(model).__name__}."
            )
        capture.install_loss_recorder(model, self.recorder)

    # --- layers -----------------------------------------------------------
    def register_dense(self, layer):
        """Registers a built keras.layers.Dense for a Fisher block."""
        _check_layer(layer, "register_dense", keras.layers.Dense)
        self._register_layer(layer, layer_kinds.DenseKind(layer))

    register_fully_connected = register_dense

    def register_conv2d(self, layer):
        """Registers a built keras.layers.Conv2D for a Fisher block (KFC
        layout: one sample per example and output location, see
        ``layer_kinds.Conv2DKind``). Grouped convolutions are refused."""
        _check_layer(layer, "register_conv2d", keras.layers.Conv2D)
        if layer.groups != 1:
            raise ValueError(
                f"Layer '{layer.name}' is a grouped convolution (groups="
                f"{layer.groups}); tkfac_tf supports Conv2D with groups=1 only. "
                "Leave it unregistered (plain momentum update) or use groups=1."
            )
        self._register_layer(layer, layer_kinds.Conv2DKind(layer))

    def _register_layer(self, layer, kind):
        if getattr(layer, "lora_enabled", False) or getattr(layer, "quantization_mode", None):
            raise ValueError(
                f"Layer '{layer.name}' uses LoRA or quantization; tkfac_tf "
                "preconditions plain float kernels only. Leave it unregistered."
            )
        if id(layer) in self._kinds:
            raise ValueError(
                f"Layer '{layer.name}' is already registered in this "
                "LayerCollection; register each layer once."
            )
        names = {k.layer.name for k in self._kinds.values()}
        if layer.name in names:
            raise ValueError(
                f"Another registered layer is also named '{layer.name}'. Give "
                "layers unique names (blocks are keyed by layer name)."
            )
        capture.install_tap(layer, self.recorder)
        self._kinds[id(layer)] = kind

    # --- predictive distributions -------------------------------------------
    def register_categorical_predictive_distribution(self, layer):
        """Categorical over the classes; logits = the layer's pre-activation
        (its activation must be softmax or linear)."""
        self._register_distribution(layer, loss_functions.CategoricalLogits)

    def register_multi_bernoulli_predictive_distribution(self, layer):
        """Independent Bernoulli outputs; logits = the layer's pre-activation
        (its activation must be sigmoid or linear)."""
        self._register_distribution(layer, loss_functions.MultiBernoulliLogits)

    def register_normal_predictive_distribution(self, layer, variance=1.0):
        """Gaussian with mean = the layer's output and the given variance
        (squared error)."""
        self._register_distribution(layer, loss_functions.Normal, variance=variance)

    def _register_distribution(self, layer, cls, **kwargs):
        _check_layer(layer, f"register_{cls.name}_predictive_distribution")
        if id(layer) in self._distributions:
            raise ValueError(
                f"Layer '{layer.name}' already has a predictive distribution "
                f"({self._distributions[id(layer)].name}); register one "
                "distribution per output layer."
            )
        distribution = cls(layer, **kwargs)
        capture.install_tap(layer, self.recorder)
        self._distributions[id(layer)] = distribution

    # --- queries ------------------------------------------------------------
    @property
    def layer_kinds(self):
        """Layer kinds of the registered layers, in registration order."""
        return list(self._kinds.values())

    @property
    def distributions(self):
        """Registered predictive distributions, in registration order."""
        return list(self._distributions.values())

    # --- serialization ----------------------------------------------------
    def get_config(self):
        """JSON-able description: registered layers (with their factor sizes)
        and distributions, by layer name, in registration order."""
        return {
            "layers": [kind.get_config() for kind in self._kinds.values()],
            "distributions": [d.get_config() for d in self._distributions.values()],
        }

    @classmethod
    def from_config(cls, config, model):
        """Re-registers the layers of ``model`` that ``config`` names.

        Layers are found by name anywhere in the model (nested models too).
        """
        layers = {
            layer.name: layer
            for layer in model._flatten_layers(include_self=False, recursive=True)
        }

        def find(name):
            if name not in layers:
                raise ValueError(
                    f"The saved layer collection names layer '{name}', which "
                    f"model '{model.name}' does not have. Attach the model the "
                    "optimizer was trained with."
                )
            return layers[name]

        collection = cls()
        for entry in config["layers"]:
            getattr(collection, entry["register"])(find(entry["layer"]))
        for entry in config["distributions"]:
            options = {k: v for k, v in entry.items() if k not in ("layer", "register")}
            getattr(collection, entry["register"])(find(entry["layer"]), **options)
        return collection

    def validate(self):
        """Raises ValueError if the collection cannot drive an optimizer."""
        if not self._kinds:
            raise ValueError(
                "The LayerCollection has no registered layers: call "
                "register_dense(layer) / register_conv2d(layer) for the "
                "layers to precondition."
            )
        if not self._distributions:
            last = list(self._kinds.values())[-1].layer.name
            raise ValueError(
                "The LayerCollection has no predictive distribution (registered "
                f"layers: {[k.layer.name for k in self._kinds.values()]}). Register "
                "one on the layer that produces the model's output, e.g. "
                f"register_categorical_predictive_distribution(model.get_layer('{last}')) "
                "(softmax / cross-entropy), "
                "register_multi_bernoulli_predictive_distribution(...) "
                "(sigmoid / binary cross-entropy) or "
                "register_normal_predictive_distribution(...) "
                "(squared error)."
            )
