"""Predictive distributions the Fisher is taken under.

Each distribution turns the recorded output tensor ``x`` of its layer
([N, ..., k]) into *backward vectors*: per-example gradients of a negative
log-likelihood with respect to ``x``. Back-propagating a vector v through the
network gives the per-example pre-activation gradients g of every registered
layer, from which the Fisher factors are formed.

* ``sampled_backward_vector(x, seed)``: v = ∂(−log p(ŷ|x))/∂x with ŷ drawn
  from the model's own distribution (Monte-Carlo true Fisher, one sample).
* ``exact_backward_vectors(x)``: vectors v_1..v_K with Σ_k v_k v_kᵀ equal to
  the Fisher of the distribution in x (a factorisation F_x = B Bᵀ, columns
  of B), so that summing the statistics over k gives the exact expectation
  over all outcomes. An output with positions ([N, T..., k]: a sequence, a
  feature map) has one independent outcome per position, so its Fisher is
  block-diagonal over positions and every column is zero outside one
  position: K = (number of positions) × (columns of one position), one
  backward pass each.

Both carry the factor √c of a distribution with ``coefficient`` c (an
output's loss weight), whose Fisher is c·F.

Random draws come from a counter-based integer hash of (seed, step, element
index) computed with exact int64 arithmetic, so eager, graph and XLA
executions draw bit-identical targets (TensorFlow's stateless Philox ops give
different numbers under XLA).
"""

import math

import tensorflow as tf

from tkfac_tf.options import INFINITY, number

_MASK32 = 0xFFFFFFFF


def _hash32(x):
    """Integer mixing hash on [0, 2³²) held in int64 (multipliers < 2³¹, so no
    product overflows)."""
    x = tf.bitwise.bitwise_xor(x, tf.bitwise.right_shift(x, 16))
    x = tf.bitwise.bitwise_and(x * 0x21F0AAAD, _MASK32)
    x = tf.bitwise.bitwise_xor(x, tf.bitwise.right_shift(x, 15))
    x = tf.bitwise.bitwise_and(x * 0x735A2D97, _MASK32)
    return tf.bitwise.bitwise_xor(x, tf.bitwise.right_shift(x, 15))


def uniform_bits(shape, seed, stream=0):
    """Uniform integers on [0, 2³²) (int64) of ``shape``, a deterministic
    function of ``seed`` ([2] int64: base seed, step), ``stream`` and the
    element index."""
    seed = tf.bitwise.bitwise_and(tf.cast(seed, tf.int64), _MASK32)
    key = _hash32(tf.bitwise.bitwise_xor(_hash32(seed[0]), seed[1]))
    key = _hash32(tf.bitwise.bitwise_xor(key, stream))
    size = tf.reduce_prod(tf.cast(shape, tf.int64))
    index = tf.range(size, dtype=tf.int64)
    bits = _hash32(tf.bitwise.bitwise_and(_hash32(tf.bitwise.bitwise_xor(index, key)) + key, _MASK32))
    return tf.reshape(bits, shape)


def uniform(shape, seed, stream=0):
    """Uniform (0, 1) float32 of ``shape`` (24 bits of ``uniform_bits``)."""
    bits = uniform_bits(shape, seed, stream)
    return (tf.cast(tf.bitwise.right_shift(bits, 8), tf.float32) + 0.5) / float(2**24)


def _standard_normal(shape, seed):
    """N(0, 1) float32 by Box–Muller from two independent uniform streams."""
    u1, u2 = uniform(shape, seed, stream=1), uniform(shape, seed, stream=2)
    return tf.sqrt(-2.0 * tf.math.log(u1)) * tf.cos(2.0 * math.pi * u2)


def _activation_name(layer):
    activation = getattr(layer, "activation", None)
    return getattr(activation, "__name__", str(activation))


MAX_EXACT_BACKWARD_PASSES = 4096
"""Most backward passes estimation_mode='exact' may take per output and
covariance update (positions × classes); beyond it the mode is refused."""


def _per_position(columns, x, layer):
    """The columns of the Fisher of x ([N, T..., k]) from ``columns``, the
    factorisation of one position's Fisher evaluated at every position:
    each column masked to one position t (T·K columns), or ``columns``
    itself for an output without positions ([N, k])."""
    positions = x.shape[1:-1]
    if not positions.is_fully_defined():
        raise ValueError(
            f"estimation_mode='exact' needs the output positions of layer "
            f"'{layer.name}' to be known when the step is traced (shape "
            f"{x.shape}); use estimation_mode='gradients' for outputs of "
            "varying length."
        )
    count = positions.num_elements()
    passes = count * len(columns)
    if passes > MAX_EXACT_BACKWARD_PASSES:
        raise ValueError(
            f"estimation_mode='exact' on layer '{layer.name}' (output shape "
            f"{x.shape}) needs {count} position(s) × {len(columns)} = {passes} "
            f"backward passes per covariance update (at most "
            f"{MAX_EXACT_BACKWARD_PASSES}); use estimation_mode='gradients'."
        )
    if positions.rank == 0:
        return columns
    masks = tf.reshape(tf.eye(count, dtype=tf.float32), [count, 1, *positions.as_list(), 1])
    return [column * masks[t] for t in range(count) for column in columns]


class PredictiveDistribution:
    """Base class. ``tensor`` names which recorded tensor the distribution reads:
    'preactivation' (logits) or 'output' (the layer's activated output).
    ``coefficient`` c > 0: the weight of this output's loss term in the
    training loss (``compile(loss_weights=...)``); its Fisher is c·F, so
    every backward vector it gives is scaled by √c (``backward_scale``)."""

    tensor = "preactivation"
    allowed_activations = ()
    family = None  # key in DISTRIBUTIONS
    name = "distribution"  # for messages
    register_method = None  # the LayerCollection method that registers it
    probability_activation = None  # the activation of a probability output
    loss_description = None  # the loss it matches, for messages

    def __init__(self, layer, coefficient=1.0):
        self.layer = layer
        self.coefficient = number(
            f"coefficient of the predictive distribution on layer '{layer.name}'",
            coefficient, 0.0, INFINITY, low_open=True,
        )
        activation = _activation_name(layer)
        if self.allowed_activations and activation not in self.allowed_activations:
            raise ValueError(
                f"Layer '{layer.name}' has activation '{activation}', but a "
                f"{self.name} predictive distribution reads its logits and "
                f"needs activation in {self.allowed_activations}. Register the "
                "distribution on the layer that produces the logits, or use "
                "the distribution that matches your loss."
            )

    def sampled_backward_vector(self, x, seed):
        """√c times one sampled vector of the unweighted distribution
        (``_sampled_vector``): E[v vᵀ] = c·F at every position."""
        return self._scaled(self._sampled_vector(x, seed))

    def _sampled_vector(self, x, seed):
        raise NotImplementedError

    def exact_backward_vectors(self, x):
        """The columns of the exact Fisher c·F in x ([N, T..., k]): per
        position √c times the columns of ``position_fisher_columns`` (module
        docstring)."""
        return [self._scaled(v) for v in _per_position(self.position_fisher_columns(x), x, self.layer)]

    def _scaled(self, vector):
        return vector if self.coefficient == 1.0 else self.backward_scale * vector

    def position_fisher_columns(self, x):
        """Vectors shaped like x whose outer products, at each position
        separately, sum to that position's Fisher."""
        raise NotImplementedError

    @property
    def backward_scale(self) -> float:
        """√c: the factor of every sampled or exact backward vector."""
        return math.sqrt(self.coefficient)

    def get_config(self):
        """JSON-able description: {"layer": name, "register": method, ...}."""
        config = {"layer": self.layer.name, "register": self.register_method}
        if self.coefficient != 1.0:
            config["coefficient"] = self.coefficient
        return config


class CategoricalLogits(PredictiveDistribution):
    """Softmax over the last axis of the logits x (sparse/categorical CE)."""

    allowed_activations = ("softmax", "linear")
    family = "categorical"
    name = "categorical"
    register_method = "register_categorical_predictive_distribution"
    probability_activation = "softmax"
    loss_description = "softmax cross-entropy"

    def _sampled_vector(self, x, seed):
        """v = softmax(x) − onehot(ŷ), ŷ ~ Categorical(softmax(x))."""
        x = tf.cast(x, tf.float32)
        probs = tf.nn.softmax(x)
        cdf = tf.cumsum(probs, axis=-1)
        u = uniform(tf.shape(x)[:-1], seed)[..., None]
        num_classes = tf.shape(x)[-1]
        sample = tf.minimum(
            tf.reduce_sum(tf.cast(cdf < u, tf.int32), axis=-1), num_classes - 1
        )
        return probs - tf.one_hot(sample, num_classes, dtype=tf.float32)

    def position_fisher_columns(self, x):
        """v_c = √p_c (p − e_c), c = 1..C: Σ_c v_c v_cᵀ = diag(p) − p pᵀ."""
        x = tf.cast(x, tf.float32)
        probs = tf.stop_gradient(tf.nn.softmax(x))
        num_classes = x.shape[-1]
        if num_classes is None:
            raise ValueError(
                f"estimation_mode='exact' needs a static number of classes on "
                f"layer '{self.layer.name}'."
            )
        return [
            tf.sqrt(probs[..., c : c + 1])
            * (probs - tf.one_hot(c, num_classes, dtype=tf.float32))
            for c in range(num_classes)
        ]


class MultiBernoulliLogits(PredictiveDistribution):
    """Independent Bernoulli per output unit, logits x (sigmoid cross-entropy)."""

    allowed_activations = ("sigmoid", "linear")
    family = "multi_bernoulli"
    name = "multi-Bernoulli"
    register_method = "register_multi_bernoulli_predictive_distribution"
    probability_activation = "sigmoid"
    loss_description = "sigmoid (binary) cross-entropy"

    def _sampled_vector(self, x, seed):
        """v = σ(x) − ŷ, ŷ_d ~ Bernoulli(σ(x_d))."""
        x = tf.cast(x, tf.float32)
        probs = tf.sigmoid(x)
        sample = tf.cast(uniform(tf.shape(x), seed) < probs, tf.float32)
        return probs - sample

    def position_fisher_columns(self, x):
        """v_d = √(p_d(1−p_d)) e_d, d = 1..D: Σ_d v_d v_dᵀ = diag(p(1−p))."""
        x = tf.cast(x, tf.float32)
        probs = tf.stop_gradient(tf.sigmoid(x))
        scale = tf.sqrt(probs * (1.0 - probs))
        dims = x.shape[-1]
        return [scale * tf.one_hot(d, dims, dtype=tf.float32) for d in range(dims)]


class Normal(PredictiveDistribution):
    """Isotropic Gaussian with mean = the layer's output, fixed variance σ²
    (squared-error loss)."""

    tensor = "output"
    family = "normal"
    name = "normal"
    register_method = "register_normal_predictive_distribution"
    loss_description = "squared error"

    def __init__(self, layer, variance=1.0, coefficient=1.0):
        super().__init__(layer, coefficient)
        self.variance = number(
            f"variance of the normal predictive distribution on layer '{layer.name}'",
            variance, 0.0, INFINITY, low_open=True,
        )

    def _sampled_vector(self, x, seed):
        """v = (μ − ŷ)/σ² with ŷ = μ + σ ε, i.e. v = −ε/σ, ε ~ N(0, I)."""
        eps = _standard_normal(tf.shape(x), seed)
        return -eps / tf.sqrt(self.variance)

    def position_fisher_columns(self, x):
        """v_d = e_d / σ: Σ_d v_d v_dᵀ = I / σ²."""
        dims = x.shape[-1]
        ones = tf.ones_like(tf.cast(x, tf.float32))
        return [
            ones * tf.one_hot(d, dims, dtype=tf.float32) / tf.sqrt(self.variance)
            for d in range(dims)
        ]

    def get_config(self):
        return dict(super().get_config(), variance=self.variance)


# The one registry of distribution families: family -> class. Its
# ``register_method`` names the LayerCollection method that registers it.
DISTRIBUTIONS = {cls.family: cls for cls in (CategoricalLogits, MultiBernoulliLogits, Normal)}
