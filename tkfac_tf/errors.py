"""Exception types of tkfac_tf's registration, distinct so that callers (and
``auto_registration``) can tell the causes apart by type, never by message."""


class UnsupportedLayerError(TypeError, ValueError):
    """A layer the registration method does not accept: the wrong kind
    (``register_dense`` on a Conv2D), a grouped convolution, a LoRA or
    quantized layer. Both a TypeError and a ValueError, so either ``except``
    catches it. ``LayerCollection.from_model`` leaves such layers
    unregistered (plain momentum update) and reports them."""


class RegistrationConflictError(ValueError):
    """A registration that conflicts with an earlier one: a layer registered
    twice in one collection, a layer still held by another live
    ``LayerCollection`` (release it with ``LayerCollection.release()``), two
    registered layers with one name, or a second predictive distribution on
    a layer."""
