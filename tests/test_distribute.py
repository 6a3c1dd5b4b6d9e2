"""Distribution strategies are refused with a clear error (not supported yet).

Runs in a subprocess: two logical CPU devices must be configured before
TensorFlow initialises its devices.
"""

import os
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    """
    import numpy as np, tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    import keras, tkfac_tf
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    x = np.random.RandomState(0).randn(32, 3).astype("float32")
    y = np.arange(32) % 2
    for make in (lambda lc: tkfac_tf.TKFAC(layer_collection=lc),
                 lambda lc: tkfac_tf.KFAC.adaptive(layer_collection=lc)):
        with strategy.scope():
            model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
            opt = make(tkfac_tf.LayerCollection.from_model(model, loss=loss))
            model.compile(optimizer=opt, loss=loss)
        before = model.get_weights()
        try:
            model.fit(x, y, batch_size=16, epochs=1, verbose=0)
        except NotImplementedError as error:
            assert "MirroredStrategy" in str(error) and "strategy.scope()" in str(error), error
        else:
            raise SystemExit("no error under MirroredStrategy")
        for w, b in zip(model.get_weights(), before):
            np.testing.assert_array_equal(w, b)
    print("REFUSED")
    """
)


def test_mirrored_strategy_is_refused_before_any_update():
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    result = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300,
                            env=env, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert result.returncode == 0 and "REFUSED" in result.stdout, result.stdout + result.stderr[-3000:]
