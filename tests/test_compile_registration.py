"""model.compile(optimizer=TKFAC...) with no collection registers the model:
the same collection and the same numbers as LayerCollection.from_model, in
every way fit runs; load_model needs no attach; recompiling is handled."""

import logging

import keras
import numpy as np
import pytest

import tkfac_tf

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
_rng = np.random.RandomState(0)
X = _rng.randn(48, 6, 6, 2).astype("float32")
Y = _rng.randint(0, 3, 48)
BATCH = 16


def _model(seed=1):
    keras.utils.set_random_seed(seed)
    return keras.Sequential([
        keras.Input((6, 6, 2)),
        keras.layers.Conv2D(3, 3, activation="tanh", name="conv"),
        keras.layers.BatchNormalization(name="bn"),
        keras.layers.Flatten(),
        keras.layers.Dense(3, name="logits"),
    ], name="net")


def _optimizer(adaptive, collection=None):
    if adaptive:
        return tkfac_tf.TKFAC.adaptive(layer_collection=collection, seed=3, damping_adaptation_interval=2)
    return tkfac_tf.KFAC(learning_rate=0.05, damping=0.01, layer_collection=collection, inv_update_every=2,
                         seed=3)


def _train(explicit, adaptive=True, epochs=2, **compile_kwargs):
    model = _model()
    collection = tkfac_tf.LayerCollection.from_model(model, loss=LOSS) if explicit else None
    opt = _optimizer(adaptive, collection)
    model.compile(optimizer=opt, loss=LOSS, **compile_kwargs)
    model.fit(X, Y, batch_size=BATCH, epochs=epochs, shuffle=False, verbose=0)
    return model, opt


@pytest.mark.parametrize("mode", [
    dict(), dict(steps_per_execution=3), dict(jit_compile=True), dict(run_eagerly=True),
], ids=["fit", "steps_per_execution", "xla", "eager"])
def test_compile_registers_what_from_model_registers_with_the_same_numbers(mode):
    explicit_model, explicit_opt = _train(True, **mode)
    model, opt = _train(False, **mode)
    assert opt.layer_collection.get_config() == explicit_opt.layer_collection.get_config()
    assert int(opt.iterations.numpy()) == int(explicit_opt.iterations.numpy()) == 2 * len(X) // BATCH
    for got, want in zip(model.weights + opt.variables, explicit_model.weights + explicit_opt.variables):
        np.testing.assert_array_equal(got.numpy(), want.numpy(), err_msg=got.path)
    # Statistics on steps 0, c, 2c, ... (c = cov_update_every): the first step's are not lost.
    assert int(opt.num_cov_updates.numpy()) == len(range(0, 2 * len(X) // BATCH, opt.cov_update_every))


def test_fixed_kfac_by_compile_equals_from_model():
    explicit_model, _ = _train(True, adaptive=False)
    model, _ = _train(False, adaptive=False)
    for got, want in zip(model.weights, explicit_model.weights):
        np.testing.assert_array_equal(got.numpy(), want.numpy())


def test_load_model_trains_on_without_attach(tmp_path):
    reference, reference_opt = _train(False, epochs=2)
    model, _ = _train(False, epochs=1)
    model.save(str(tmp_path / "model.keras"))
    loaded = keras.models.load_model(str(tmp_path / "model.keras"))
    loaded.fit(X, Y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0)
    for got, want in zip(loaded.weights + loaded.optimizer.variables, reference.weights + reference_opt.variables):
        np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-6, atol=1e-7, err_msg=got.path)
    loaded.optimizer.attach(loaded)  # still allowed: its collection is registered again
    loaded.fit(X, Y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0)


def _recurrent_model(seed=1):
    """A wrapped recurrent layer: Keras gives its layers shorter paths after load_model
    ('net/bidirectional/forward_gru' → 'forward_gru')."""
    keras.utils.set_random_seed(seed)
    return keras.Sequential([
        keras.Input((6, 6, 2)),
        keras.layers.Reshape((6, 12)),
        keras.layers.Bidirectional(keras.layers.GRU(4)),
        keras.layers.Dense(3, name="logits"),
    ], name="net")


def _train_recurrent(epochs):
    model = _recurrent_model()
    opt = _optimizer(True)
    model.compile(optimizer=opt, loss=LOSS)
    model.fit(X, Y, batch_size=BATCH, epochs=epochs, shuffle=False, verbose=0)
    return model, opt


def test_load_model_finds_the_generic_blocks_of_wrapped_layers(tmp_path, caplog):
    reference, reference_opt = _train_recurrent(epochs=2)
    with caplog.at_level(logging.INFO):
        model, opt = _train_recurrent(epochs=1)
    generic = [k for k in opt.layer_collection.layer_kinds if k.register_method == "register_generic"]
    assert len(generic) == 2  # the two GRU directions: no Kronecker form, a diagonal block each
    assert "2 of them have no Kronecker-factored form" in caplog.text and "(GRU, diagonal)" in caplog.text
    model.save(str(tmp_path / "model.keras"))
    loaded = keras.models.load_model(str(tmp_path / "model.keras"))
    assert [v.path for v in loaded.trainable_variables] != [v.path for v in model.trainable_variables]
    covered = [v.path for k in loaded.optimizer.layer_collection.layer_kinds for v in k.parameters]
    assert sorted(covered) == sorted(v.path for v in loaded.trainable_variables)
    loaded.fit(X, Y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0)
    for got, want in zip(loaded.weights + loaded.optimizer.variables, reference.weights + reference_opt.variables):
        np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-6, atol=1e-7, err_msg=got.path)


def test_a_saved_path_matches_the_one_path_that_agrees_with_it_from_the_end():
    from tkfac_tf.layer_collection import _match_by_path

    named = {"backward_gru/gru_cell": "b", "forward_gru/gru_cell": "f", "gru_cell": "c", "dense": "d"}
    assert _match_by_path("net/bidirectional/backward_gru/gru_cell", named) == "b"
    assert _match_by_path("net/dense", named) == "d"
    assert _match_by_path("gru_cell", named) == "c"  # an exact path wins
    assert _match_by_path("x/gru_cell", named) == "c"
    cells = {"backward_gru/gru_cell": "b", "forward_gru/gru_cell": "f"}
    assert _match_by_path("gru_cell", cells) is None  # two paths agree on its one component: ambiguous
    assert _match_by_path("net/conv", named) is None
    assert _match_by_path("gru", {"net/rnn/gru": "g"}) == "g"  # a saved path shorter than the model's


def test_compiling_again_keeps_or_gives_back_the_layers():
    model, opt = _train(False, epochs=1)
    collection = opt.layer_collection
    model.compile(optimizer=opt, loss=LOSS)  # the same optimizer: the same collection
    assert opt.layer_collection is collection and not collection.released
    new = _optimizer(True)
    model.compile(optimizer=new, loss=LOSS)  # another optimizer: the old one gives the layers back
    assert collection.released and not new.layer_collection.released
    model.fit(X, Y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0)
    assert int(new.num_cov_updates.numpy()) == len(range(0, len(X) // BATCH, new.cov_update_every))
    with pytest.raises(ValueError, match="released"):  # the old optimizer, used again
        opt.apply_gradients(zip([v * 0 for v in model.trainable_variables], model.trainable_variables))
    # An optimizer compiled into a second model refuses, naming both.
    with pytest.raises(ValueError, match="compiled into model '.*' .* compile model '.*' with a new"):
        _model(seed=2).compile(optimizer=new, loss=LOSS)


def test_a_collection_the_user_passed_is_kept():
    model = _model()
    collection = tkfac_tf.LayerCollection()
    collection.register_dense(model.get_layer("logits"))
    collection.register_categorical_predictive_distribution(model.get_layer("logits"))
    opt = _optimizer(False, collection)
    model.compile(optimizer=opt, loss=LOSS)
    assert opt.layer_collection is collection
    assert [k.layer.name for k in collection.layer_kinds] == ["logits"]


def test_without_compile_or_a_built_model_the_error_says_what_to_do(caplog):
    model = _model()
    opt = _optimizer(True)
    with pytest.raises(ValueError, match="has no layer_collection. Compile a built model"):
        opt.build(model.trainable_variables)  # a custom loop with no compile
    unbuilt = keras.Sequential([keras.layers.Dense(3)])
    with caplog.at_level(logging.WARNING):
        unbuilt.compile(optimizer=opt, loss=LOSS)
    assert "is not built when compiled" in caplog.text
    with pytest.raises(ValueError, match="has no layer_collection"):
        unbuilt.fit(X.reshape(len(X), -1), Y, batch_size=BATCH, verbose=0)


def test_mixed_precision_compile_and_load_model_register_the_wrapped_optimizer(tmp_path):
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        keras.utils.set_random_seed(1)
        model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(5, activation="tanh"),
                                  keras.layers.Dense(3, dtype="float32")], name="mixed")
        model.compile(optimizer=tkfac_tf.TKFAC(learning_rate=0.05), loss=LOSS)
        assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
        x, y = X.reshape(len(X), -1)[:, :6], Y
        model.fit(x, y, batch_size=BATCH, verbose=0)
        model.save(str(tmp_path / "mixed.keras"))
        loaded = keras.models.load_model(str(tmp_path / "mixed.keras"))
        loaded.fit(x, y, batch_size=BATCH, verbose=0)
        assert int(loaded.optimizer.inner_optimizer.num_cov_updates.numpy()) == 2 * len(X) // BATCH
    finally:
        keras.mixed_precision.set_global_policy("float32")


@keras.saving.register_keras_serializable(package="tests")
class SubclassedNet(keras.Model):
    """Unnamed layers: a model rebuilt in the same process gets new names."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.flatten = keras.layers.Flatten()
        self.hidden = keras.layers.Dense(5, activation="tanh")
        self.prelu = keras.layers.PReLU()
        self.logits = keras.layers.Dense(3)

    def call(self, x, training=None):
        return self.logits(self.prelu(self.hidden(self.flatten(x))))


def _train_subclassed(epochs):
    keras.utils.set_random_seed(3)
    model = SubclassedNet()
    model(X[:2])
    opt = _optimizer(True)
    model.compile(optimizer=opt, loss=LOSS)
    model.fit(X, Y, batch_size=BATCH, epochs=epochs, shuffle=False, verbose=0)
    return model, opt


def test_load_model_in_the_same_process_finds_renamed_layers(tmp_path):
    """A subclassed model loaded in the process that saved it names its layers
    anew ('dense_3' for a saved 'dense_1'): the saved collection finds them by
    their position in the model and class, the generic block's variables by
    their path inside the layer, and training resumes exactly."""
    reference, reference_opt = _train_subclassed(epochs=2)
    model, opt = _train_subclassed(epochs=1)
    model.save(str(tmp_path / "model.keras"))
    loaded = keras.models.load_model(str(tmp_path / "model.keras"))
    assert {layer.name for layer in loaded.layers}.isdisjoint(layer.name for layer in model.layers)
    kinds = loaded.optimizer.layer_collection.layer_kinds
    assert [type(k.layer).__name__ for k in kinds] == ["Dense", "Dense", "PReLU"]
    covered = [v.path for k in kinds for v in k.parameters]
    assert sorted(covered) == sorted(v.path for v in loaded.trainable_variables)
    loaded.fit(X, Y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0)
    for got, want in zip(loaded.weights + loaded.optimizer.variables, reference.weights + reference_opt.variables):
        np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-6, atol=1e-7, err_msg=got.path)
