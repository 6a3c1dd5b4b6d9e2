"""cov_batch_size: the factor statistics of a random subset of the batch.

Checks: the subset draw (distinct indices, min(m, N) of them, every example
equally likely, so sums over it with the count m are unbiased); on a fixed
subset every block's statistics equal the statistics of a batch made of
exactly those examples (the whole-batch path, itself tested against brute
force elsewhere), for every block kind, in 'exact' and 'empirical' modes;
the generic diagonal block keeps the whole batch; m ≥ N changes nothing;
eager == tf.function == XLA; argument validation and get_config."""

import types

import keras
import numpy as np
import pytest
import tensorflow as tf

import tkfac_tf
from tkfac_tf import capture
from tkfac_tf import estimator as estimator_lib
from tkfac_tf import fisher_blocks
from tests import kind_models

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
N, M, SEED = 12, 5, 3


def _models():
    """(name, model, x, y): conv kinds + LayerNorm + Dense; Embedding +
    EinsumDense + generic + Dense."""
    images, tokens = kind_models.image_and_token_models(6)
    rng = np.random.RandomState(0)
    y = rng.randint(0, 3, N)
    return [("images", images, rng.randn(N, 6, 6, 4).astype("float32"), y),
            ("tokens", tokens, rng.randint(0, 7, (N, 5)).astype("int32"), y)]


def _statistics(model, x, y, mode, cov_batch_size, run="graph", step=0, **options):
    """Every block's statistics of one covariance update on (x, y) at
    ``step``, run eagerly, in a tf.function ('graph') or under XLA."""
    collection = tkfac_tf.LayerCollection.from_model(model, loss=LOSS)
    opt = tkfac_tf.TKFAC(layer_collection=collection, estimation_mode=mode, seed=SEED,
                         cov_batch_size=cov_batch_size, **options)
    opt.build(model.trainable_variables)

    def sums(x, y):
        loss = LOSS(y, model(x, training=True))
        record = collection.recorder.take()
        record.loss = loss
        return opt.estimator.batch_statistic_sums(record, tf.constant(step, tf.int64))

    if run != "eager":
        sums = tf.function(sums, jit_compile=run == "xla")
    result = opt.estimator.blocks, [
        [s.numpy() for s in block.statistics_from_sums(block_sums)]
        for block, block_sums in zip(opt.estimator.blocks.values(), sums(x, y))
    ]
    collection.release()
    return result


def _subset(n=N, m=M, step=0):
    seed = tf.constant([SEED, step], tf.int64)
    return estimator_lib.example_subset(tf.constant(n), m, seed).numpy()


def test_example_subset_is_uniform_without_replacement():
    # Drawn in a graph (traced once: 1,500 eager draws take seconds), which
    # draws what an eager call does.
    draw = tf.function(lambda step: estimator_lib.example_subset(
        tf.constant(N), M, tf.stack([tf.constant(SEED, tf.int64), step])))
    draws = np.stack([draw(tf.constant(k, tf.int64)).numpy() for k in range(1500)])
    np.testing.assert_array_equal(draws[7], _subset(step=7))
    assert draws.shape == (1500, M)
    assert all(len(set(d)) == M for d in draws) and draws.min() == 0 and draws.max() == N - 1
    # Each example is drawn with probability m / N (binomial std ≈ 18 here).
    counts = np.bincount(draws.ravel(), minlength=N)
    np.testing.assert_allclose(counts, 1500 * M / N, atol=70)
    # Different steps draw different subsets; the draw is a function of the seed.
    assert not np.array_equal(draws[0], draws[1])
    np.testing.assert_array_equal(_subset(step=7), _subset(step=7))
    # m ≥ N: a permutation of the whole batch.
    np.testing.assert_array_equal(np.sort(_subset(m=N + 3)), np.arange(N))
    # The keys of a larger batch, cut to N, draw the same subset (the blocks
    # of one step share one set of keys).
    seed = tf.constant([SEED, 7], tf.int64)
    keys = estimator_lib.example_keys(tf.constant(N + 9), seed)
    np.testing.assert_array_equal(
        estimator_lib.example_subset(tf.constant(N), M, keys=keys).numpy(), _subset(step=7))


@pytest.mark.parametrize("mode", ["exact", "empirical"])
def test_subset_statistics_equal_those_of_a_batch_of_exactly_those_examples(mode):
    subset = _subset()
    for name, model, x, y in _models():
        if mode == "empirical" and name == "images":
            continue  # the same code path; keep the test small
        blocks, sub = _statistics(model, x, y, mode, M)
        _, ref = _statistics(model, x[subset], y[subset], mode, None)
        _, whole = _statistics(model, x, y, mode, None)
        checked = 0
        for block_name, block, got, expected, full in zip(blocks, blocks.values(), sub, ref, whole):
            if isinstance(block, fisher_blocks.DiagonalBlock):
                expected = full  # the squared batch gradient: always the whole batch
            for g, e, f in zip(got, expected, full):
                np.testing.assert_allclose(g, e, rtol=2e-5, atol=1e-6, err_msg=f"{name} {block_name}")
                if not isinstance(block, fisher_blocks.DiagonalBlock):
                    assert np.abs(g - f).max() > 1e-4 * np.abs(f).max(), "subset = whole batch?"
            checked += 1
        assert checked == len(blocks) == (6 if name == "images" else 4)


def test_batch_norm_subset_uses_the_batch_moments():
    """BatchNorm's per-example gradients are formed with the whole batch's
    moments, then the subset's are summed: compare with a gather of the
    whole batch's per-example gradients (written out from the layer)."""
    keras.utils.set_random_seed(0)
    model = keras.Sequential([
        keras.Input((4,)),
        keras.layers.BatchNormalization(gamma_initializer="random_normal"),
        keras.layers.Dense(3),
    ])
    x = np.random.RandomState(1).randn(N, 4).astype("float32")
    bn, dense = model.layers
    with tf.GradientTape(persistent=True) as tape:
        y_bn = bn(x, training=True)
        tape.watch(y_bn)
        log_probs = tf.nn.log_softmax(dense(y_bn))
        class_sums = [-tf.reduce_sum(log_probs[:, c]) for c in range(3)]
    mean, var = np.mean(x, 0), np.var(x, 0)
    x_hat = (x - mean) / np.sqrt(var + bn.epsilon)
    probs = np.exp(log_probs.numpy())
    subset = _subset()
    expected = 0.0
    for c in range(3):
        g = tape.gradient(class_sums[c], y_bn).numpy()
        v = np.stack([g * x_hat, g], -1)[subset]  # [m, d, 2]
        expected += np.einsum("n,ndp,ndq->dpq", probs[subset, c], v, v) / M
    blocks, sub = _statistics(model, x, np.zeros(N, int), "exact", M)
    name = next(n for n, b in blocks.items() if isinstance(b, fisher_blocks.ScaleAndShiftBlock))
    np.testing.assert_allclose(sub[list(blocks).index(name)][0], expected, rtol=1e-4, atol=1e-6)


def test_batch_no_larger_than_cov_batch_size_is_the_whole_batch():
    name, model, x, y = _models()[0]
    _, none = _statistics(model, x, y, "gradients", None)
    for size in (N, N + 5):
        _, large = _statistics(model, x, y, "gradients", size)
        for a, b in zip(none, large):
            for s, t in zip(a, b):
                np.testing.assert_allclose(t, s, rtol=1e-5, atol=1e-8)


def test_eager_graph_and_xla_draw_the_same_subset():
    name, model, x, y = _models()[1]
    runs = [_statistics(model, x, y, "gradients", M, run, step=4)[1] for run in ("eager", "graph", "xla")]
    _, whole = _statistics(model, x, y, "gradients", None, step=4)
    for other in runs[1:]:
        for a, b, f in zip(runs[0], other, whole):
            for s, t, u in zip(a, b, f):
                np.testing.assert_allclose(t, s, rtol=1e-4, atol=1e-7)
    assert np.abs(runs[0][0][1] - whole[0][1]).max() > 1e-3 * np.abs(whole[0][1]).max()


def test_argument_validation_and_config_round_trip():
    for bad in (0, -3, 2.5, "8", True):
        with pytest.raises(ValueError, match="cov_batch_size"):
            tkfac_tf.TKFAC(cov_batch_size=bad)
    opt = tkfac_tf.KFAC(cov_batch_size=np.int64(64))
    assert opt.cov_batch_size == 64 and isinstance(opt.cov_batch_size, int)
    assert tkfac_tf.KFAC.from_config(opt.get_config()).cov_batch_size == 64
    assert tkfac_tf.TKFAC().cov_batch_size is None
    assert tkfac_tf.TKFAC.from_config(tkfac_tf.TKFAC().get_config()).cov_batch_size is None


def test_conv_subset_size_follows_the_positions_of_each_convolution():
    conv = types.SimpleNamespace(is_convolution=True)
    conv_first = types.SimpleNamespace(is_convolution=True, channels_first=True)
    dense = types.SimpleNamespace(is_convolution=False)

    def use(shape):
        return capture.LayerUse(None, tf.TensorSpec(shape), None)

    size = estimator_lib.conv_subset_size
    assert size(conv, use([64, 28, 28, 8]), 8192) == 32  # ⌈8192 / 784⌉ = 11, floored at 32
    assert size(conv, use([64, 7, 7, 8]), 8192) == 168  # ⌈8192 / 49⌉
    assert size(conv_first, use([64, 8, 14, 14]), 8192) == 42  # positions from the last two axes
    assert size(conv, use([64, 100, 8]), 8192) == 82  # Conv1D
    assert size(conv, use([64, None, None, 8]), 8192) is None  # unknown positions: every example
    assert size(dense, use([64, 28, 28, 8]), 8192) is None
    assert size(conv, use([64, 7, 7, 8]), None) is None


def test_convolution_blocks_take_their_subset_and_dense_blocks_the_whole_batch():
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((12, 12, 2)), keras.layers.Conv2D(4, 3, padding="same", name="conv"),
                              keras.layers.Flatten(), keras.layers.Dense(3, name="logits")])
    rng = np.random.RandomState(1)
    x, y = rng.randn(48, 12, 12, 2).astype("float32"), rng.randint(0, 3, 48)
    # 144 positions: ⌈1000 / 144⌉ = 7 -> the floor of 32 of the 48 examples.
    blocks, default = _statistics(model, x, y, "gradients", None, conv_statistics_samples=1000)
    _, whole = _statistics(model, x, y, "gradients", None, conv_statistics_samples=None)
    _, subset = _statistics(model, x, y, "gradients", 32, conv_statistics_samples=None)
    names = list(blocks)
    conv, dense = names.index("conv"), names.index("logits")
    for got, want in zip(default[conv], subset[conv]):  # the same seeded draw of 32 examples
        np.testing.assert_array_equal(got, want)
    for got, want in zip(default[dense], whole[dense]):  # Dense: every example
        np.testing.assert_array_equal(got, want)
    assert np.abs(default[conv][1] - whole[conv][1]).max() > 1e-3 * np.abs(whole[conv][1]).max()
    assert tkfac_tf.TKFAC().conv_statistics_samples == 8192
    with pytest.raises(ValueError, match="conv_statistics_samples"):
        tkfac_tf.TKFAC(conv_statistics_samples=0)


@pytest.mark.parametrize("run", ["eager", "graph", "xla"])
def test_reduced_convolution_statistics_take_every_example(run):
    """conv_statistics='reduce' forms one sample per example (the mean patch
    without im2col, the summed gradient), so the sample budget does not
    apply: the statistics equal those with conv_statistics_samples=None, run
    eagerly, in a graph and under XLA,
    and differ from the expanded ones; a Dense block is unchanged."""
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((12, 12, 2)), keras.layers.Conv2D(4, 3, padding="same", name="conv"),
                              keras.layers.Flatten(), keras.layers.Dense(3, name="logits")])
    rng = np.random.RandomState(1)
    x, y = rng.randn(48, 12, 12, 2).astype("float32"), rng.randint(0, 3, 48)
    blocks, budget = _statistics(model, x, y, "gradients", None, run=run, conv_statistics="reduce",
                                 conv_statistics_samples=1000)
    _, whole = _statistics(model, x, y, "gradients", None, conv_statistics="reduce",
                           conv_statistics_samples=None)
    _, expanded = _statistics(model, x, y, "gradients", None, conv_statistics_samples=None)
    names = list(blocks)
    conv, dense = names.index("conv"), names.index("logits")
    for got, want in zip(budget, whole):
        for g, w in zip(got, want):
            # float32 sums in another order: errors relative to the matrix's scale.
            np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5 * np.abs(w).max())
    assert np.abs(whole[conv][1] - expanded[conv][1]).max() > 1e-2 * np.abs(expanded[conv][1]).max()
    for got, want in zip(whole[dense], expanded[dense]):
        np.testing.assert_array_equal(got, want)
    assert tkfac_tf.TKFAC().conv_statistics == "auto"
    with pytest.raises(ValueError, match="conv_statistics"):
        tkfac_tf.TKFAC(conv_statistics="mean")


def test_auto_reduces_the_depthwise_convolutions_only():
    """conv_statistics='auto' (the default): one sample per example for
    depthwise convolutions (DepthwiseConv2D, Conv2D / Conv1D with a group per
    input channel, SeparableConv2D's depthwise part), one per location for
    every other convolution; the statistics equal those of 'reduce' and of
    'expand' block by block."""
    keras.utils.set_random_seed(0)
    L = keras.layers
    inputs = keras.Input((10, 10, 4))
    h = L.Conv2D(4, 3, padding="same", name="conv")(inputs)
    h = L.DepthwiseConv2D(3, padding="same", name="depthwise")(h)
    h = L.Conv2D(4, 3, padding="same", groups=4, name="grouped_per_channel")(h)
    h = L.Conv2D(4, 3, padding="same", groups=2, name="grouped_two")(h)
    h = L.SeparableConv2D(4, 3, padding="same", name="separable")(h)
    h = L.Reshape((100, 4))(h)
    h = L.Conv1D(4, 3, groups=4, name="conv1d_per_channel")(h)
    outputs = L.Dense(3, name="logits")(L.Flatten()(h))
    model = keras.Model(inputs, outputs)
    rng = np.random.RandomState(1)
    x, y = rng.randn(40, 10, 10, 4).astype("float32"), rng.randint(0, 3, 40)
    blocks, auto = _statistics(model, x, y, "gradients", None, conv_statistics_samples=None)
    _, reduced = _statistics(model, x, y, "gradients", None, conv_statistics="reduce",
                             conv_statistics_samples=None)
    _, expanded = _statistics(model, x, y, "gradients", None, conv_statistics="expand",
                              conv_statistics_samples=None)
    reducing = {"depthwise", "grouped_per_channel", "conv1d_per_channel"}
    assert {name for name, block in blocks.items() if block.reduces_positions} == reducing
    assert [part.reduces_positions for part in blocks["separable"].parts] == [True, False]
    for index, name in enumerate(blocks):
        statistics = list(zip(auto[index], (reduced if name in reducing else expanded)[index]))
        if name == "separable":  # depthwise part reduced, pointwise part expanded
            split = len(blocks[name].parts[0].factor_variables)
            statistics = list(zip(auto[index], reduced[index][:split] + expanded[index][split:]))
        for got, want in statistics:
            np.testing.assert_array_equal(got, want)
    for name in reducing | {"conv"}:  # the two settings do differ on these blocks
        index = list(blocks).index(name)
        assert np.abs(reduced[index][1] - expanded[index][1]).max() > 1e-3 * np.abs(expanded[index][1]).max()
