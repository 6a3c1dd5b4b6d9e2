"""EinsumDense, Embedding, LayerNorm / BatchNorm scale-and-shift and generic
diagonal blocks against brute force: per-example gradients from a
GradientTape, the exact Fisher block, traces, factors written from their
definitions in NumPy, the preconditioned step as a dense solve; eager /
graph / XLA equality; from_model; save and resume."""

import gc

import keras
import numpy as np
import pytest
import tensorflow as tf

import tkfac_tf
from tkfac_tf import keras_compat
from tests import brute_force

N, VOCAB, DIM, HEADS, HEAD_DIM, CLASSES = 6, 5, 4, 2, 3, 3
DAMPING = 0.05


def _model(steps, seed=0):
    """Embedding -> PReLU (generic) -> EinsumDense -> LayerNorm -> Dense ->
    BatchNorm -> Dense logits; one softmax output per example."""
    keras.utils.set_random_seed(seed)
    inp = keras.Input((steps,), dtype="int32")
    h = keras.layers.Embedding(VOCAB, DIM, name="emb")(inp)
    h = keras.layers.PReLU(alpha_initializer=keras.initializers.Constant(0.3), name="prelu")(h)
    h = keras.layers.EinsumDense(
        "abc,cde->abde", (steps, HEADS, HEAD_DIM), bias_axes="de", name="proj",
        bias_initializer="random_normal",
    )(h)
    h = keras.layers.Reshape((steps, HEADS * HEAD_DIM))(h)
    h = keras.layers.LayerNormalization(
        name="ln", gamma_initializer="random_normal", beta_initializer="random_normal"
    )(h)
    h = keras.layers.Flatten()(h)
    h = keras.layers.Dense(5, activation="tanh", name="hidden")(h)
    out = keras.layers.Dense(CLASSES, name="logits")(h)
    return keras.Model(inp, out)


def _bn_model(steps, seed=0):
    """BatchNorm (over [N, T, features]) -> Dense logits. BatchNorm couples
    the examples of a batch through its moments, so the layers below it have
    no per-example gradients; its own γ, β have (x̂ does not depend on them),
    when nothing above couples the examples again."""
    keras.utils.set_random_seed(seed)
    inp = keras.Input((steps, 4))
    h = keras.layers.BatchNormalization(
        name="bn", gamma_initializer="random_normal", beta_initializer="random_normal"
    )(inp)
    out = keras.layers.Dense(CLASSES, name="logits")(keras.layers.Flatten()(h))
    return keras.Model(inp, out)


def _bn_brute_force(model, x):
    variables = model.trainable_variables
    with tf.GradientTape(persistent=True) as tape:
        log_probs = tf.nn.log_softmax(model(x, training=True))
        losses = [[log_probs[i, c] for c in range(CLASSES)] for i in range(x.shape[0])]
    grads = {v.path: np.zeros((CLASSES, x.shape[0]) + tuple(v.shape)) for v in variables}
    for i in range(x.shape[0]):
        for c in range(CLASSES):
            for v, g in zip(variables, tape.gradient(losses[i][c], variables)):
                grads[v.path][c, i] = -g.numpy()
    return {"grads": grads, "probs": np.exp(log_probs.numpy()).T}


def _tokens(steps, n=N, seed=1):
    return np.random.RandomState(seed).randint(0, VOCAB, size=(n, steps)).astype(np.int32)


# --- brute force ------------------------------------------------------------------
def _brute_force(model, x):
    """Per-example, per-class gradients of −log p_c(x_i) for every trainable
    variable (a GradientTape per example and class), the class
    probabilities, and the per-position samples of the embedding and the
    EinsumDense (a, g for each class)."""
    emb, proj = model.get_layer("emb"), model.get_layer("proj")
    after_proj = model.layers[model.layers.index(proj) + 1 :]
    variables = model.trainable_variables
    with tf.GradientTape(persistent=True) as tape:
        e = tf.gather(emb.embeddings, x)
        tape.watch(e)
        h = model.get_layer("prelu")(e)
        s = tf.einsum("abc,cde->abde", h, proj.kernel) + proj.bias
        tape.watch(s)
        out = s
        for layer in after_proj:
            out = layer(out, training=True)
        log_probs = tf.nn.log_softmax(out)
        losses = [[-log_probs[i, c] for c in range(CLASSES)] for i in range(x.shape[0])]
        class_sums = [-tf.reduce_sum(log_probs[:, c]) for c in range(CLASSES)]
    grads = {
        v.path: np.zeros((CLASSES, x.shape[0]) + tuple(v.shape), np.float64) for v in variables
    }
    for i in range(x.shape[0]):
        for c in range(CLASSES):
            for v, g in zip(variables, tape.gradient(losses[i][c], variables)):
                grads[v.path][c, i] = 0.0 if g is None else tf.convert_to_tensor(g).numpy()
    g_emb = np.stack([tape.gradient(class_sums[c], e).numpy() for c in range(CLASSES)])
    g_proj = np.stack([tape.gradient(class_sums[c], s).numpy() for c in range(CLASSES)])
    probs = np.exp(log_probs.numpy()).T  # [C, N]
    return {
        "grads": grads,
        "probs": probs,
        "x_proj": h.numpy(),
        "g_emb": g_emb,
        "g_proj": g_proj,
    }


def _vec(kind_name, grads, model):
    """Per-example vectors [C, N, P] in each block's row-major order."""
    g = grads
    if kind_name == "emb":
        v = g["emb/embeddings"]
    elif kind_name == "proj":
        kernel = g["proj/kernel"].reshape(CLASSES, N, DIM, HEADS * HEAD_DIM)
        bias = g["proj/bias"].reshape(CLASSES, N, 1, HEADS * HEAD_DIM)
        v = np.concatenate([kernel, bias], axis=2)
    elif kind_name in ("ln", "bn"):
        v = np.stack([g[f"{kind_name}/gamma"], g[f"{kind_name}/beta"]], axis=-1)
    elif kind_name == "prelu":
        v = g["prelu/alpha"]
    return v.reshape(CLASSES, N, -1)


def _exact_fisher(vectors, probs):
    return np.einsum("cn,cnp,cnq->pq", probs, vectors, vectors) / vectors.shape[1]


# --- the optimizer's statistics -------------------------------------------------------
def _collect(model, approximation, x, mode="exact", other_variables="diagonal"):
    collection = tkfac_tf.LayerCollection.from_model(
        model, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        other_variables=other_variables,
    )
    opt_class = {"tkfac": tkfac_tf.TKFAC, "kfac": tkfac_tf.KFAC}[approximation]
    opt = opt_class(learning_rate=0.1, damping=DAMPING, layer_collection=collection,
                    estimation_mode=mode)
    opt.build(model.trainable_variables)

    @tf.function
    def step(x):
        model(x, training=True)
        opt.cov_update_op()
        opt.inv_update_op()

    step(x)
    return opt


_CASES = {}


def _case(steps, approximation):
    """(model, x, brute force, optimizer) for one configuration, cached."""
    key = (steps, approximation)
    if key not in _CASES:
        model = _model(steps)
        x = _tokens(steps)
        reference = _brute_force(model, x)  # before any tap is installed
        _CASES[key] = (model, x, reference, _collect(model, approximation, x))
    return _CASES[key]


def _bn_case(steps, approximation):
    key = ("bn", steps, approximation)
    if key not in _CASES:
        model = _bn_model(steps)
        x = np.random.RandomState(2).randn(N, steps, 4).astype(np.float32)
        reference = _bn_brute_force(model, x)
        _CASES[key] = (model, x, reference, _collect(model, approximation, x))
    return _CASES[key]


def _any_case(name, steps, approximation):
    return (_bn_case if name == "bn" else _case)(steps, approximation)


BLOCKS = {"emb": "emb", "proj": "proj", "ln": "ln", "bn": "bn", "prelu": "prelu"}


def test_from_model_registers_every_kind():
    model, _, _, opt = _case(1, "tkfac")
    kinds = {k.block_name: k.name for k in opt.layer_collection.layer_kinds}
    assert kinds == {
        "emb": "embedding", "prelu": "variables", "proj": "einsum_dense",
        "ln": "scale_and_shift", "hidden": "dense", "logits": "dense",
    }
    covered = {id(v) for k in opt.layer_collection.layer_kinds for v in k.parameters}
    assert covered == {id(v) for v in model.trainable_variables}
    assert isinstance(opt.fisher_blocks["emb"], tkfac_tf.fisher_blocks.EmbeddingTKFACBlock)
    assert isinstance(opt.fisher_blocks["ln"], tkfac_tf.fisher_blocks.ScaleAndShiftBlock)
    assert isinstance(opt.fisher_blocks["prelu"], tkfac_tf.fisher_blocks.DiagonalBlock)
    momentum_only = tkfac_tf.LayerCollection.from_model(
        _model(1, seed=2), loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        other_variables="momentum",
    )
    assert "variables" not in {k.name for k in momentum_only.layer_kinds}


@pytest.mark.parametrize("name", ["emb", "proj", "ln", "bn", "prelu"])
def test_tkfac_trace_equals_exact_fisher_trace(name):
    """One position per example (T = 1): every block's trace is the trace of
    the exact Fisher block (for the diagonal block: the exact diagonal is
    not what a batch gives, see test_generic_diagonal_from_definition)."""
    model, x, reference, opt = _any_case(name, 1, "tkfac")
    vectors = _vec(name, reference["grads"], model)
    exact = _exact_fisher(vectors, reference["probs"])
    block = opt.fisher_blocks[BLOCKS[name]]
    approx = block.full_fisher().numpy()
    assert approx.shape == exact.shape
    if name == "prelu":
        return  # batch-gradient estimate; see below
    np.testing.assert_allclose(np.trace(approx), np.trace(exact), rtol=2e-5)
    np.testing.assert_allclose(float(block.trace()), np.trace(exact), rtol=2e-5)


@pytest.mark.parametrize("approximation", ["tkfac", "kfac"])
@pytest.mark.parametrize("name", ["ln", "bn"])
def test_scale_and_shift_block_is_the_exact_per_feature_fisher(name, approximation):
    """Per-example gradients of γ, β are exact (several positions too): the
    block equals the exact Fisher restricted to each feature's 2×2 block."""
    for steps in (1, 3):
        model, x, reference, opt = _any_case(name, steps, approximation)
        vectors = _vec(name, reference["grads"], model)
        exact = _exact_fisher(vectors, reference["probs"])
        d = exact.shape[0] // 2
        mask = np.kron(np.eye(d), np.ones((2, 2)))
        np.testing.assert_allclose(
            opt.fisher_blocks[name].full_fisher().numpy(), exact * mask, rtol=1e-4, atol=1e-7
        )


class _InferenceBackbone(keras.Model):
    """Dense tanh -> BatchNorm, called with ``training=False`` inside the
    model's training call (a backbone fine-tuned with its BatchNorm kept in
    inference mode), then Dense logits, which Keras then calls in inference
    mode too."""

    def __init__(self):
        super().__init__(name="fine_tuned")
        self.backbone = keras.Sequential([
            keras.layers.Dense(4, activation="tanh", name="hidden"),
            keras.layers.BatchNormalization(name="bn", gamma_initializer="random_normal",
                                            beta_initializer="random_normal"),
        ])
        self.logits = keras.layers.Dense(CLASSES, name="logits")

    def call(self, x, training=None):
        return self.logits(self.backbone(x, training=False))


@pytest.mark.parametrize("approximation", ["tkfac", "kfac"])
@pytest.mark.parametrize("mode", ["graph", "xla", "eager"])
def test_inference_calls_inside_a_training_call_give_the_exact_blocks(approximation, mode):
    """Layers called with training=False inside the model's training call
    record their statistics (before, no statistics were recorded and the
    step failed); BatchNorm then normalises with its moving moments (set to
    values far from the batch's), which its block uses: in 'exact' mode
    every block's trace is the exact Fisher block's (T = 1) and BatchNorm's
    block is the exact per-feature Fisher, from one tape per example and
    class; the moving moments are not updated."""
    keras.utils.set_random_seed(4)
    model = _InferenceBackbone()
    x = np.random.RandomState(6).randn(N, 5).astype(np.float32)
    model(x)
    bn = model.backbone.get_layer("bn")
    bn.moving_mean.assign(np.linspace(-0.5, 0.5, 4))
    bn.moving_variance.assign(np.linspace(0.2, 3.0, 4))
    moving = [bn.moving_mean.numpy(), bn.moving_variance.numpy()]
    variables = model.trainable_variables
    with tf.GradientTape(persistent=True) as tape:
        log_probs = tf.nn.log_softmax(model(x, training=True))
        losses = [[-log_probs[i, c] for c in range(CLASSES)] for i in range(N)]
    grads = {v.path: np.stack([np.stack([tape.gradient(losses[i][c], v).numpy() for i in range(N)])
                               for c in range(CLASSES)]) for v in variables}
    probs = np.exp(log_probs.numpy()).T

    collection = tkfac_tf.LayerCollection.from_model(model, loss=_LOSS, sample_inputs=x)
    opt_class = {"tkfac": tkfac_tf.TKFAC, "kfac": tkfac_tf.KFAC}[approximation]
    opt = opt_class(damping=DAMPING, layer_collection=collection, estimation_mode="exact")
    opt.build(model.trainable_variables)

    def step(x):
        model(x, training=True)
        opt.cov_update_op()

    {"graph": tf.function(step), "xla": tf.function(step, jit_compile=True), "eager": step}[mode](x)
    assert sorted(block.layer.name for block in opt.fisher_blocks.values()) == ["bn", "hidden", "logits"]
    for block in opt.fisher_blocks.values():
        layer = block.layer
        if layer is bn:
            vectors = np.stack([grads[bn.gamma.path], grads[bn.beta.path]], -1).reshape(CLASSES, N, -1)
        else:
            vectors = np.concatenate([grads[layer.kernel.path], grads[layer.bias.path][:, :, None]],
                                     axis=2).reshape(CLASSES, N, -1)
        exact = _exact_fisher(vectors, probs)
        if layer is bn:
            mask = np.kron(np.eye(4), np.ones((2, 2)))
            np.testing.assert_allclose(block.full_fisher().numpy(), exact * mask, rtol=1e-4, atol=1e-7)
        elif approximation == "tkfac":
            np.testing.assert_allclose(float(block.trace()), np.trace(exact), rtol=1e-4)
        else:  # A = E[a aᵀ] of the layer's input with a 1 appended, G = E[Σ_c p_c g gᵀ], g = ∂b
            inputs = x if layer.name == "hidden" else model.backbone(x, training=False).numpy()
            a = np.concatenate([inputs, np.ones((N, 1))], axis=1)
            g = grads[layer.bias.path]  # [C, N, d_out]
            np.testing.assert_allclose(block.cov_a.numpy(), a.T @ a / N, rtol=1e-4, atol=1e-6)
            np.testing.assert_allclose(block.cov_g.numpy(), np.einsum("cn,cni,cnj->ij", probs, g, g) / N,
                                       rtol=1e-4, atol=1e-8)
    np.testing.assert_array_equal(bn.moving_mean.numpy(), moving[0])
    np.testing.assert_array_equal(bn.moving_variance.numpy(), moving[1])


@pytest.mark.parametrize("run_eagerly", [False, True])
def test_fit_trains_a_model_that_calls_its_backbone_with_training_false(run_eagerly):
    """from_model + the adaptive preset, with library defaults: every layer
    of the backbone kept in inference mode gets its block, fit trains
    (loss falls, no step skipped or rejected) and BatchNorm's moving
    moments stay where they were."""
    keras.utils.set_random_seed(4)
    model = _InferenceBackbone()
    rng = np.random.RandomState(7)
    x = rng.randn(64, 5).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int32) + (x[:, 1] > 0)
    model(x)
    bn = model.backbone.get_layer("bn")
    moving = [bn.moving_mean.numpy(), bn.moving_variance.numpy()]
    opt = tkfac_tf.TKFAC.adaptive()
    model.compile(optimizer=opt, loss=_LOSS, run_eagerly=run_eagerly)
    losses = model.fit(x, y, batch_size=16, epochs=4, shuffle=False, verbose=0).history["loss"]
    assert sorted(block.layer.name for block in opt.fisher_blocks.values()) == ["bn", "hidden", "logits"]
    assert losses[-1] < 0.8 * losses[0]
    assert int(opt.skipped_steps.numpy()) == 0 and int(opt.rejected_steps.numpy()) == 0
    np.testing.assert_array_equal(bn.moving_mean.numpy(), moving[0])
    np.testing.assert_array_equal(bn.moving_variance.numpy(), moving[1])


@pytest.mark.parametrize("approximation", ["tkfac", "kfac"])
def test_generic_diagonal_from_definition(approximation):
    """DiagonalBlock ('exact' mode): f = Σ_c (Σ_i √p_ic ∇θ(−log p_c(x_i)))² / N,
    the squared batch gradient of each backward vector (times N). With one
    example it is the exact Fisher diagonal."""
    model, x, reference, opt = _case(3, approximation)
    u = _vec("prelu", reference["grads"], model)  # [C, N, P]
    weighted = np.sqrt(reference["probs"])[:, :, None] * u
    expected = (weighted.sum(axis=1) ** 2).sum(axis=0) / N
    block = opt.fisher_blocks["prelu"]
    np.testing.assert_allclose(block.diagonal.numpy(), expected, rtol=1e-4, atol=1e-9)
    single = np.einsum("c,cp->p", reference["probs"][:, 0], u[:, 0] ** 2)
    np.testing.assert_allclose(
        (np.sqrt(reference["probs"][:, :1, None]) * u[:, :1]).sum(1).__pow__(2).sum(0), single,
        rtol=1e-6,
    )


def _full_case(approximation):
    """_case(3, ...) with other_variables='full': PReLU's α [3, 4] gets a
    12×12 FullBlock."""
    key = ("full", approximation)
    if key not in _CASES:
        model = _model(3)
        x = _tokens(3)
        reference = _brute_force(model, x)
        opt = _collect(model, approximation, x, other_variables="full")
        _CASES[key] = (model, x, reference, opt)
    return _CASES[key]


@pytest.mark.parametrize("approximation", ["tkfac", "kfac"])
def test_generic_full_block_from_definition_damping_and_solve(approximation):
    """FullBlock ('exact' mode): F = Σ_c w_c w_cᵀ / N, w_c = Σ_i √p_ic ∇θ(−log
    p_c(x_i)) (its diagonal is DiagonalBlock's f); damped as the n×1 TKFAC
    Kronecker block (F/√δ + √λ I) ⊗ (√δ + √λ); the step is a dense solve;
    the structure survives the collection's config."""
    model, x, reference, opt = _full_case(approximation)
    block = opt.fisher_blocks["prelu"]
    assert isinstance(block, tkfac_tf.fisher_blocks.FullBlock)
    u = _vec("prelu", reference["grads"], model)  # [C, N, 12]
    w = (np.sqrt(reference["probs"])[:, :, None] * u).sum(axis=1)
    fisher = np.einsum("cp,cq->pq", w, w) / N
    np.testing.assert_allclose(block.fisher.numpy(), fisher, rtol=1e-4, atol=1e-9)
    diagonal = _case(3, approximation)[3].fisher_blocks["prelu"].diagonal.numpy()
    np.testing.assert_allclose(np.diag(block.fisher.numpy()), diagonal, rtol=1e-5, atol=1e-10)

    sqrt_delta, sqrt_lam = np.sqrt(np.trace(fisher)), np.sqrt(DAMPING)
    damped = (fisher / sqrt_delta + sqrt_lam * np.eye(12)) * (sqrt_delta + sqrt_lam)
    np.testing.assert_allclose(block.inverse.numpy(), np.linalg.inv(damped), rtol=1e-4,
                               atol=1e-6 * np.abs(np.linalg.inv(damped)).max())
    grad = np.random.RandomState(4).randn(3, 4).astype(np.float32)
    variables = model.trainable_variables
    grads = [tf.constant(grad) if v.path == "prelu/alpha" else tf.zeros(v.shape) for v in variables]
    directions = opt.estimator.precondition(grads, variables, keras_compat.variable_key(opt))
    got = [d for v, d in zip(variables, directions) if v.path == "prelu/alpha"][0].numpy()
    np.testing.assert_allclose(got.reshape(-1), np.linalg.solve(damped, grad.reshape(-1)),
                               rtol=1e-3, atol=1e-5)

    config = opt.layer_collection.get_config()
    entry = [e for e in config["layers"] if e["layer"] == "prelu"][0]
    assert entry["structure"] == "full"
    again = tkfac_tf.LayerCollection.from_config(config, _model(3, seed=4))
    assert again.get_config() == config
    again.release()


def test_generic_full_block_is_the_same_eagerly_and_under_xla():
    model, x, _, opt = _full_case("tkfac")
    block = opt.fisher_blocks["prelu"]
    expected = [block.fisher.numpy(), block.inverse.numpy()]
    for run in (lambda f: f, tf.function(jit_compile=True)):
        block.fisher.assign(tf.zeros_like(block.fisher))
        opt._num_cov_updates.assign(0)

        def step(x):
            model(x, training=True)
            opt.cov_update_op()
            opt.inv_update_op()

        run(step)(tf.constant(x))
        for got, want in zip([block.fisher.numpy(), block.inverse.numpy()], expected):
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6 * np.abs(want).max())


def test_generic_full_block_refuses_large_groups_and_unknown_structures():
    model = _model(3)
    collection = tkfac_tf.LayerCollection()
    big = keras.layers.Dense(40)
    big.build((None, 30))  # 1240 scalars > MAX_FULL_BLOCK_SIZE
    with pytest.raises(ValueError, match="MAX_FULL_BLOCK_SIZE"):
        collection.register_generic(big, structure="full")
    with pytest.raises(ValueError, match="structure"):
        collection.register_generic(model.get_layer("prelu"), structure="dense")
    collection.release()


@pytest.mark.parametrize("steps", [1, 3])
def test_embedding_factors_match_definitions(steps):
    model, x, reference, opt = _case(steps, "tkfac")
    a = np.eye(VOCAB)[x.reshape(-1)]
    # g_emb[c] holds ∂Σ_i(−log p_c(x_i))/∂e (per example: no coupling); the
    # exact mode weighs class c of example i by p_c(x_i).
    gs = reference["g_emb"].reshape(CLASSES, -1, DIM)
    weights = np.repeat(reference["probs"], steps, axis=1)
    delta, phi, psi = brute_force.tkfac_reference(a, gs, weights, N)
    block = opt.fisher_blocks["emb"]
    np.testing.assert_allclose(float(block.delta), delta, rtol=1e-4)
    np.testing.assert_allclose(block.phi.numpy(), np.diag(phi), rtol=1e-4, atol=1e-8)
    np.testing.assert_allclose(block.psi.numpy(), psi, rtol=1e-4, atol=1e-8)

    _, _, _, kfac = _case(steps, "kfac")
    block = kfac.fisher_blocks["emb"]
    counts = np.bincount(x.reshape(-1), minlength=VOCAB) / N
    g_cov = np.einsum("cm,cmi,cmj->ij", weights, gs, gs) / (N * steps)
    np.testing.assert_allclose(block.cov_a.numpy(), counts, rtol=1e-6)
    np.testing.assert_allclose(block.cov_g.numpy(), g_cov, rtol=1e-4, atol=1e-8)


@pytest.mark.parametrize("steps", [1, 3])
def test_einsum_dense_factors_match_definitions(steps):
    model, x, reference, opt = _case(steps, "tkfac")
    a = reference["x_proj"].reshape(-1, DIM)
    a = np.concatenate([a, np.ones((a.shape[0], 1))], axis=1)
    gs = reference["g_proj"].reshape(CLASSES, -1, HEADS * HEAD_DIM)
    weights = np.repeat(reference["probs"], steps, axis=1)
    delta, phi, psi = brute_force.tkfac_reference(a, gs, weights, N)
    block = opt.fisher_blocks["proj"]
    np.testing.assert_allclose(float(block.delta), delta, rtol=1e-4)
    np.testing.assert_allclose(block.phi.numpy(), phi, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(block.psi.numpy(), psi, rtol=1e-4, atol=1e-7)

    _, _, _, kfac = _case(steps, "kfac")
    block = kfac.fisher_blocks["proj"]
    np.testing.assert_allclose(block.cov_a.numpy(), a.T @ a / N, rtol=1e-4, atol=1e-7)
    g_cov = np.einsum("cm,cmi,cmj->ij", weights, gs, gs) / (N * steps)
    np.testing.assert_allclose(block.cov_g.numpy(), g_cov, rtol=1e-4, atol=1e-8)


@pytest.mark.parametrize(
    "equation,input_shape,output_shape,bias_axes",
    [
        ("abc,cde->abde", (2, 3, 4), (3, 2, 5), "de"),  # MHA query / key / value
        ("abcd,cde->abe", (2, 3, 2, 4), (3, 5), "e"),  # MHA output
        ("...b,bc->...c", (2, 3, 4), (5,), "c"),
        ("ab,bc->ac", (3, 4), (5,), None),
        ("abc,dc->abd", (2, 3, 4), (3, 5), "d"),  # kernel stored [d_out, d_in]
    ],
)
def test_einsum_dense_layout_reproduces_the_layer(equation, input_shape, output_shape, bias_axes):
    """s = a Θ at every position, with a, Θ from the kind's layout."""
    keras.utils.set_random_seed(4)
    layer = keras.layers.EinsumDense(equation, output_shape, bias_axes=bias_axes,
                                     bias_initializer="random_normal")
    x = np.random.RandomState(0).randn(*input_shape).astype(np.float32)
    s = layer(x).numpy()
    kind = tkfac_tf.layer_kinds.EinsumDenseKind(layer)
    use = tkfac_tf.capture.LayerUse(tf.constant(x), tf.constant(s), tf.constant(s))
    theta = kind.to_matrix([v for v in kind.parameters])
    np.testing.assert_allclose(
        (kind.activations(use) @ theta).numpy(),
        kind.preactivation_gradients(use, tf.constant(s)).numpy(), rtol=1e-5, atol=1e-5,
    )
    back = kind.from_matrix(theta)
    for v, b in zip(kind.parameters, back):
        np.testing.assert_array_equal(b.numpy(), v.numpy())


def test_einsum_dense_refuses_non_kronecker_equations():
    layer = keras.layers.EinsumDense("abc,bcd->abd", (3, 5))  # b in x, W and s
    layer.build((2, 3, 4))
    with pytest.raises(tkfac_tf.UnsupportedLayerError):
        tkfac_tf.LayerCollection().register_einsum_dense(layer)
    layer = keras.layers.EinsumDense("abc,cde->abde", (3, 2, 5), bias_axes="e")
    layer.build((2, 3, 4))
    with pytest.raises(tkfac_tf.UnsupportedLayerError):
        tkfac_tf.LayerCollection().register_einsum_dense(layer)


@pytest.mark.parametrize("approximation", ["tkfac", "kfac"])
def test_diagonal_block_is_damped_as_an_n_by_1_tkfac_kronecker_block(approximation):
    """diag(f) = L ⊗ R with L = diag(f)/√δ [n×n], R = √δ [1×1], δ = Σf;
    inverse_values is ((L + √λ I) ⊗ (R + √λ))⁻¹, built here as dense
    Kronecker matrices; an empty block (δ = 0) falls back to 1/λ."""
    model, x, reference, opt = _case(3, approximation)
    block = opt.fisher_blocks["prelu"]
    f = block.diagonal.numpy().astype(np.float64)
    assert f.sum() > 0
    sqrt_delta, sqrt_lam = np.sqrt(f.sum()), np.sqrt(DAMPING)
    left = np.diag(f) / sqrt_delta + sqrt_lam * np.eye(f.size)
    right = np.array([[sqrt_delta + sqrt_lam]])
    expected = np.diag(np.linalg.inv(np.kron(left, right)))
    (got,) = block.inverse_values(DAMPING)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-5)
    np.testing.assert_allclose(block.inverse.numpy(), expected, rtol=1e-5)  # update_inverse ran
    saved = block.diagonal.numpy()
    try:
        block.diagonal.assign(np.zeros_like(saved))
        np.testing.assert_allclose(block.inverse_values(DAMPING)[0].numpy(), 1.0 / DAMPING, rtol=1e-6)
    finally:
        block.diagonal.assign(saved)


def _damped_dense(block, approximation, damping):
    """The damped approximate Fisher the block inverts, as a dense matrix."""
    if isinstance(block, (tkfac_tf.fisher_blocks.ScaleAndShiftBlock,
                          tkfac_tf.fisher_blocks.DiagonalBlock)):
        f = block.full_fisher().numpy().astype(np.float64)
        if isinstance(block, tkfac_tf.fisher_blocks.ScaleAndShiftBlock):
            return f + damping * np.eye(f.shape[0])  # Tikhonov per feature
        # Diagonal block: diag(f) as the TKFAC Kronecker product of an n×n and
        # a 1×1 factor, L = diag(f)/√δ, R = √δ (δ = Σf), damped TKFAC-style:
        # (L + √λ I) ⊗ (R + √λ).
        diag = np.diag(f)
        sqrt_delta = np.sqrt(diag.sum())
        return np.diag((diag / sqrt_delta + np.sqrt(damping)) * (sqrt_delta + np.sqrt(damping)))
    p, q = (m.numpy().astype(np.float64) for m in block.kronecker_factors())
    if approximation == "tkfac":
        shift_p = shift_q = np.sqrt(damping)
    else:
        pi = np.sqrt((np.trace(p) / p.shape[0]) / (np.trace(q) / q.shape[0]))
        shift_p, shift_q = pi * np.sqrt(damping), np.sqrt(damping) / pi
    return np.kron(p + shift_p * np.eye(p.shape[0]), q + shift_q * np.eye(q.shape[0]))


@pytest.mark.parametrize("approximation", ["tkfac", "kfac"])
def test_preconditioned_step_is_a_dense_solve(approximation):
    model, x, reference, opt = _case(3, approximation)
    rng = np.random.RandomState(3)
    variables = model.trainable_variables
    grads = [rng.randn(*v.shape).astype(np.float32) for v in variables]
    directions = opt.estimator.precondition(
        [tf.constant(g) for g in grads], variables, keras_compat.variable_key(opt)
    )
    by_path = {v.path: (g, d.numpy()) for v, g, d in zip(variables, grads, directions)}
    for name in ("emb", "proj", "ln", "prelu", "bn"):
        if name == "bn":
            model, x, reference, opt = _bn_case(3, approximation)
            variables = model.trainable_variables
            grads = [rng.randn(*v.shape).astype(np.float32) for v in variables]
            directions = opt.estimator.precondition(
                [tf.constant(g) for g in grads], variables, keras_compat.variable_key(opt)
            )
            by_path = {v.path: (g, d.numpy()) for v, g, d in zip(variables, grads, directions)}
        block = opt.fisher_blocks[name]
        params = block.kind.parameters
        vec = block.kind.to_matrix([by_path[p.path][0] for p in params]).numpy().reshape(-1)
        got = block.kind.to_matrix([by_path[p.path][1] for p in params]).numpy().reshape(-1)
        expected = np.linalg.solve(_damped_dense(block, approximation, DAMPING), vec)
        np.testing.assert_allclose(got, expected, rtol=2e-3, atol=1e-5 * np.abs(expected).max())


# --- modes, training, saving -------------------------------------------------------------
def _transformer(seed=0, steps=5):
    keras.utils.set_random_seed(seed)
    inp = keras.Input((steps,), dtype="int32")
    h = keras.layers.Embedding(VOCAB, 8, name="emb")(inp)
    h = keras.layers.PReLU(name="prelu")(h)
    a = keras.layers.MultiHeadAttention(2, 4, name="mha")(h, h, use_causal_mask=True)
    h = keras.layers.LayerNormalization(name="ln")(h + a)
    h = keras.layers.Dense(8, activation="relu", name="mlp")(h)
    h = keras.layers.BatchNormalization(name="bn")(h)
    out = keras.layers.Dense(VOCAB, name="logits")(h)
    return keras.Model(inp, out)


_LM_X = np.random.RandomState(5).randint(0, VOCAB, size=(24, 5)).astype(np.int32)
_LM_Y = np.roll(_LM_X, -1, axis=1)
_LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def _trained(opt_class=tkfac_tf.TKFAC, epochs=1, seed=0, **compile_kwargs):
    model = _transformer(seed)
    collection = tkfac_tf.LayerCollection.from_model(model, loss=_LOSS)
    opt = opt_class(learning_rate=0.05, damping=0.05, inv_update_every=2, seed=1,
                    layer_collection=collection)
    model.compile(optimizer=opt, loss=_LOSS, **compile_kwargs)
    if epochs:
        model.fit(_LM_X, _LM_Y, batch_size=8, epochs=epochs, shuffle=False, verbose=0)
    return model, opt


def _weights(model):
    return [w.numpy() for w in model.weights]


def test_eager_graph_and_xla_give_the_same_weights():
    initial = _weights(_transformer())
    eager, _ = _trained(run_eagerly=True)
    reference = _weights(eager)
    assert max(np.abs(a - b).max() for a, b in zip(reference, initial)) > 1e-3
    for compile_kwargs in ({}, {"jit_compile": True}):
        model, _ = _trained(**compile_kwargs)
        for a, b in zip(_weights(model), reference):
            np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5)


def test_mha_sublayers_of_two_attention_layers_get_distinct_blocks():
    keras.utils.set_random_seed(0)
    inp = keras.Input((4, 6))
    h = keras.layers.MultiHeadAttention(2, 3)(inp, inp)
    h = keras.layers.MultiHeadAttention(2, 3)(h, h)
    model = keras.Model(inp, keras.layers.Dense(3)(keras.layers.Flatten()(h)))
    collection = tkfac_tf.LayerCollection.from_model(model, loss=_LOSS)
    names = [k.block_name for k in collection.layer_kinds if k.name == "einsum_dense"]
    assert len(names) == len(set(names)) == 8
    config = collection.get_config()
    collection.release()
    again = tkfac_tf.LayerCollection.from_config(config, model)
    assert again.get_config() == config


@pytest.mark.parametrize("opt_class", [tkfac_tf.KFAC])
def test_save_load_model_and_checkpoint_resume_exactly(tmp_path, opt_class):
    reference, _ = _trained(opt_class, epochs=2)
    model, opt = _trained(opt_class, epochs=1)
    path = str(tmp_path / "model.keras")
    model.save(path)
    ckpt = tf.train.Checkpoint(model=model, optimizer=opt).save(str(tmp_path / "ckpt"))

    loaded = keras.models.load_model(path)
    loaded.optimizer.attach(loaded)
    loaded.fit(_LM_X, _LM_Y, batch_size=8, epochs=1, shuffle=False, verbose=0)
    for a, b in zip(_weights(loaded), _weights(reference)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)

    fresh, fresh_opt = _trained(opt_class, epochs=0, seed=9)
    fresh_opt.build(fresh.trainable_variables)
    tf.train.Checkpoint(model=fresh, optimizer=fresh_opt).restore(ckpt).assert_consumed()
    fresh.fit(_LM_X, _LM_Y, batch_size=8, epochs=1, shuffle=False, verbose=0)
    for a, b in zip(_weights(fresh), _weights(reference)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("layer_class", ["BatchNormalization", "LayerNormalization"])
@pytest.mark.parametrize("center", [True, False])
@pytest.mark.parametrize("axis", [-1, 1])
def test_scale_and_shift_per_example_gradients_and_sums_against_float64(layer_class, center, axis):
    """(∂ℓ_i/∂γ_c, ∂ℓ_i/∂β_c) = (Σ_t g x̂, Σ_t g) with x̂ from the batch's
    (BatchNorm) or each position's (LayerNorm) moments, computed in float64
    from the definition, on inputs far from zero mean (BatchNorm's form
    subtracts μ Σ_t g), with the features last or not (axis=1); and the
    block's Σ_i v vᵀ per feature, also with one column (center=False)."""
    from tkfac_tf import capture, layer_kinds
    from tkfac_tf.fisher_blocks import moments

    rng = np.random.default_rng(3)
    x = (rng.standard_normal((6, 3, 4, 5)) * 2 + 7).astype(np.float32)
    g = rng.standard_normal((6, 3, 4, 5)).astype(np.float32)
    layer = getattr(keras.layers, layer_class)(axis=axis, center=center)
    layer(x, training=True)
    kind = layer_kinds.ScaleAndShiftKind(layer)
    use = capture.LayerUse(tf.constant(x), None, None)
    got = np.stack([c.numpy() for c in kind.per_example_gradients(use, tf.constant(g), kind.normalized_inputs(use))], -1)

    feature = axis % 4
    d = x.shape[feature]
    axes = tuple(a for a in range(4) if a != feature) if layer_class == "BatchNormalization" else (feature,)
    x64 = x.astype(np.float64)
    x_hat = (x64 - x64.mean(axes, keepdims=True)) / np.sqrt(x64.var(axes, keepdims=True) + layer.epsilon)

    def per_feature(t):  # [N, T, d]
        return np.moveaxis(t, feature, -1).reshape(6, -1, d)

    g64, x_hat = per_feature(g.astype(np.float64)), per_feature(x_hat)
    columns = [(g64 * x_hat).sum(1)] + ([g64.sum(1)] if center else [])
    exact = np.stack(columns, -1)  # [N, d, p]
    assert got.shape == exact.shape
    np.testing.assert_allclose(got, exact, rtol=1e-4, atol=1e-4 * np.abs(exact).max())
    sums = moments._outer_product_sums([tf.constant(c.astype(np.float32)) for c in columns]).numpy()
    np.testing.assert_allclose(sums, np.einsum("ndp,ndq->dpq", exact, exact), rtol=1e-5)


@pytest.mark.parametrize("layer_class", ["BatchNormalization", "LayerNormalization"])
def test_normalisation_moments_are_the_layers_own_and_free_of_the_callers_control_dependencies(layer_class):
    """The statistics' moments are built as the layer builds them (the same
    op types on the same input, equal values) and without the control
    inputs of the context they are called in (the statistics' ordering), so
    that graph optimisation can merge them with the forward pass's: an op
    with control inputs is never merged with one without."""
    from tkfac_tf import layer_kinds

    layer = getattr(keras.layers, layer_class)()
    x = np.random.default_rng(4).standard_normal((6, 3, 5)).astype(np.float32) + 2.0
    layer(x, training=True)
    kind = layer_kinds.ScaleAndShiftKind(layer)

    @tf.function
    def moments(inputs):
        with tf.control_dependencies([tf.identity(inputs)]):
            return kind._layer_moments(inputs)

    graph = moments.get_concrete_function(tf.TensorSpec(x.shape, tf.float32)).graph
    built = [op for op in graph.get_operations() if op.type not in ("Placeholder", "Identity")]
    assert sorted(op.type for op in built if op.type in ("Mean", "SquaredDifference")) == [
        "Mean", "Mean", "SquaredDifference"]
    assert [op.name for op in built if op.control_inputs] == []  # their axis constants included
    axes = (0, 1) if layer_class == "BatchNormalization" else (2,)
    mean, variance = moments(tf.constant(x))
    np.testing.assert_allclose(np.squeeze(mean.numpy()), np.squeeze(x.mean(axes)), rtol=1e-5)
    np.testing.assert_allclose(np.squeeze(variance.numpy()), np.squeeze(x.var(axes)), rtol=1e-4)


def _recurrent_model(kind):
    keras.utils.set_random_seed(5)
    recurrent = {"lstm": lambda: keras.layers.LSTM(4, name="rnn"),
                 "bidirectional_gru": lambda: keras.layers.Bidirectional(keras.layers.GRU(3), name="rnn")}[kind]
    return keras.Sequential([keras.Input((5, 2)), recurrent(), keras.layers.Dense(CLASSES, name="logits")])


@pytest.mark.parametrize("kind", ["lstm", "bidirectional_gru"])
@pytest.mark.parametrize("mode", ["graph", "xla", "eager"])
def test_recurrent_layer_block_from_definition(kind, mode):
    """A recurrent layer calls its cell inside its loop, where nothing can be
    recorded for the step: the recurrent layer (each direction of a
    Bidirectional) gets the generic block of its cell's variables, tapped
    outside the loop, and its f ('exact' mode) is Σ_c (Σ_i √p_ic
    ∇θ(−log p_c(x_i)))² / N, in a traced step as eagerly (brute force: one
    tape per class)."""
    model = _recurrent_model(kind)
    x = np.random.RandomState(2).randn(N, 5, 2).astype(np.float32)
    recurrent = [layer for layer in model._flatten_layers() if isinstance(layer, keras.layers.RNN)]
    with tf.GradientTape(persistent=True) as tape:
        log_probs = tf.nn.log_softmax(model(x, training=True))
        weights = tf.stop_gradient(tf.sqrt(tf.exp(log_probs)))
        class_losses = [-tf.reduce_sum(weights[:, c] * log_probs[:, c]) for c in range(CLASSES)]
    expected = {}
    for layer in recurrent:
        per_class = [np.concatenate([g.numpy().ravel() for g in tape.gradient(loss, layer.trainable_variables)])
                     for loss in class_losses]
        expected[id(layer)] = np.sum(np.square(per_class), axis=0) / N

    collection = tkfac_tf.LayerCollection.from_model(
        model, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    generic = [k for k in collection.layer_kinds if k.name == "variables"]
    assert sorted(id(k.layer) for k in generic) == sorted(id(layer) for layer in recurrent)
    opt = tkfac_tf.TKFAC(learning_rate=0.1, damping=DAMPING, layer_collection=collection,
                         estimation_mode="exact")
    opt.build(model.trainable_variables)

    def step():
        model(x, training=True)
        opt.cov_update_op()

    (step if mode == "eager" else tf.function(step, jit_compile=mode == "xla"))()
    for kind_ in generic:
        assert [v.path for v in kind_.variables] == [v.path for v in kind_.layer.trainable_variables]
        np.testing.assert_allclose(opt.fisher_blocks[kind_.block_name].diagonal.numpy(),
                                   expected[id(kind_.layer)], rtol=1e-4, atol=1e-9)
    collection.release()


def test_a_recurrent_cell_the_model_calls_itself_keeps_its_own_block():
    """A cell stepped by the model's own Python loop (no keras.layers.RNN
    around it) runs in the step's graph: it keeps its generic block, and its
    statistics are recorded."""

    class Stepped(keras.Model):
        def __init__(self):
            super().__init__()
            self.cell = keras.layers.LSTMCell(3)
            self.logits = keras.layers.Dense(CLASSES)

        def call(self, x, training=None):
            state = [tf.zeros([tf.shape(x)[0], 3])] * 2
            for t in range(x.shape[1]):
                h, state = self.cell(x[:, t], state, training=training)
            return self.logits(h)

    keras.utils.set_random_seed(6)
    model = Stepped()
    x = np.random.RandomState(3).randn(N, 4, 2).astype(np.float32)
    model(x)
    opt = _collect(model, "tkfac", x)
    assert [type(k.layer).__name__ for k in opt.layer_collection.layer_kinds] == ["Dense", "LSTMCell"]
    diagonal = [b for b in opt.fisher_blocks.values() if isinstance(b, tkfac_tf.fisher_blocks.DiagonalBlock)]
    assert len(diagonal) == 1 and float(np.min(diagonal[0].diagonal.numpy())) >= 0
    assert float(np.sum(diagonal[0].diagonal.numpy())) > 0


def test_a_saved_collection_naming_a_recurrent_cell_attaches_its_recurrent_layer():
    """A saved collection that names a recurrent cell (older versions of the
    library registered cells): from_config gives its block to the recurrent
    layer, with the same variables."""
    model = _recurrent_model("lstm")
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    config = tkfac_tf.LayerCollection.from_model(model, loss=loss).get_config()
    rnn = model.get_layer("rnn")
    entry = [e for e in config["layers"] if "variables" in e][0]
    assert entry["layer"] == rnn.path
    entry["layer"] = rnn.cell.path
    gc.collect()  # the first collection, unreferenced, releases the layers
    again = tkfac_tf.LayerCollection.from_config(config, model)
    generic = [k for k in again.layer_kinds if k.name == "variables"]
    assert [id(k.layer) for k in generic] == [id(rnn)]
    assert [v.path for v in generic[0].variables] == [v.path for v in rnn.trainable_variables]
    again.release()
