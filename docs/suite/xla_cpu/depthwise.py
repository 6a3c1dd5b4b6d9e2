"""Forward + backward of one layer at ConvNeXt's first-stage shape (batch 128,
14×14×32), graph mode against XLA: median of 20 calls after the first.
python docs/suite/xla_cpu/depthwise.py"""
import time, numpy as np, tensorflow as tf, keras
x = tf.random.normal([128, 14, 14, 32])
for name, layer in [("depthwise7x7", keras.layers.DepthwiseConv2D(7, padding="same")), ("conv1x1", keras.layers.Conv2D(128, 1)), ("dense", keras.layers.Dense(128))]:
    layer.build(x.shape)
    def step():
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = tf.reduce_sum(tf.square(layer(x)))
        return tape.gradient(y, [x] + layer.trainable_variables)
    res = {}
    for jit in (False, True):
        f = tf.function(step, jit_compile=jit); f()
        ts = []
        for _ in range(20):
            t = time.perf_counter(); out = f(); _ = [o.numpy() for o in out][:1]; ts.append(time.perf_counter() - t)
        res[jit] = np.median(ts)
    print("RESULT", name, "graph %.4f s, XLA %.4f s, XLA/graph %.1fx" % (res[False], res[True], res[True] / res[False]))
