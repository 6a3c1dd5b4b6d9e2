r"""Times the ways of inverting a damped Kronecker factor (docs/performance.md, "Inverses").

For each factor size d, a factor like the optimizer's (an exponential moving
average, decay 0.95, of a few batches' aᵀa / N with correlated ReLU
activations a, scaled to mean eigenvalue 1) plus ``--shift``·I is inverted by

  cholesky             D = L Lᵀ, L⁻¹ by blocked recursion (matrix products), L⁻ᵀ L⁻¹
                       (the library's 'cholesky')
  cholesky_solve       cholesky_solve(L, I)                (the library's 'cholesky' before)
  cholesky_triangular  L⁻¹ = triangular_solve(L, I), L⁻ᵀ L⁻¹
  eigh                 eigendecomposition                  (the library's 'eigh')
  newton_schulz_k      k Newton–Schulz steps from a close warm start (accepted;
                       the library's 'newton_schulz' with iterations=k)
  ns_fallback          the same with a warm start that fails the check
                       (identity: what the first inversion costs)
  matmul               one d×d product, for scale

each eagerly, in a tf.function ('graph') and in a tf.function(jit_compile=True)
('xla'); the first call (trace + XLA compile) is reported apart. Timings are
medians of interleaved repeats. The last column is the relative error
‖X − D⁻¹‖_F / ‖D⁻¹‖_F against a float64 NumPy inverse.

    python -m examples.benchmark_inverses                     # short run (< 1 min)
    python -m examples.benchmark_inverses --sizes=32,128,256,512,785,1000,2048 --repeats=7
"""

import time

import numpy as np
from absl import app
from absl import flags


FLAGS = flags.FLAGS
METHODS = ("cholesky", "cholesky_solve", "cholesky_triangular", "eigh", "newton_schulz", "ns_fallback", "matmul")
MODES = ("eager", "graph", "xla")


def define_flags(flag_values=FLAGS):
    """The flags, each validated when the command line is parsed."""
    fv = dict(flag_values=flag_values)
    flags.DEFINE_list("sizes", ["128", "512", "1000"], "Factor sizes d.", **fv)
    flags.DEFINE_list("methods", list(METHODS), f"Subset of {list(METHODS)}.", **fv)
    flags.DEFINE_list("modes", ["graph", "xla"], f"Subset of {list(MODES)}.", **fv)
    flags.DEFINE_list("iterations", ["1", "2"], "Newton–Schulz iteration counts k to time.", **fv)
    flags.DEFINE_integer("repeats", 3, "Interleaved timing repeats (>= 1).", lower_bound=1, **fv)
    flags.DEFINE_integer("eigh_xla_max_size", 256,
                         "Skip eigh under XLA above this size (XLA's CPU eigh takes seconds to minutes).", **fv)
    flags.DEFINE_float("shift", 0.03, "Damping shift s (> 0) added to the factor's diagonal.", **fv)
    flags.DEFINE_integer("seed", 0, "Seed of the synthetic factors.", **fv)
    flags.register_validator("sizes", lambda v: bool(v) and all(x.isdigit() and int(x) >= 1 for x in v),
                             "--sizes: positive integers", **fv)
    flags.register_validator("methods", lambda m: bool(m) and set(m) <= set(METHODS),
                             f"--methods: a subset of {list(METHODS)}", **fv)
    flags.register_validator("modes", lambda m: bool(m) and set(m) <= set(MODES),
                             f"--modes: a subset of {list(MODES)}", **fv)
    flags.register_validator("iterations", lambda v: bool(v) and all(x.isdigit() and int(x) >= 1 for x in v),
                             "--iterations: positive integers", **fv)
    flags.register_validator("shift", lambda s: s > 0, "--shift must be > 0", **fv)


def synthetic_factor(d, seed, batches=6, n=1000, decay=0.95):
    """EMA of ``batches`` batches' aᵀa / n, a = relu(z W + 0.3) (correlated,
    nonnegative like post-ReLU activations), scaled to trace d. float32 [d, d]."""
    rng = np.random.default_rng(seed)
    mixing = rng.normal(size=(d, d)) / np.sqrt(d)
    factor = None
    for _ in range(batches):
        a = np.maximum(rng.normal(size=(n, d)) @ mixing + 0.3, 0.0)
        stat = a.T @ a / n
        factor = stat if factor is None else decay * factor + (1.0 - decay) * stat
    return (factor * d / np.trace(factor)).astype(np.float32)


def _candidates(method, iterations):
    import tensorflow as tf

    from tkfac_tf import fisher_factors

    def cholesky_triangular(matrix, shift, previous):
        del previous
        identity = tf.eye(tf.shape(matrix)[-1])
        lower_inverse = tf.linalg.triangular_solve(tf.linalg.cholesky(matrix + shift * identity), identity)
        return tf.matmul(lower_inverse, lower_inverse, transpose_a=True)

    def cholesky_solve(matrix, shift, previous):
        del previous
        identity = tf.eye(tf.shape(matrix)[-1])
        return tf.linalg.cholesky_solve(tf.linalg.cholesky(matrix + shift * identity), identity)

    def library(name, k=fisher_factors.NEWTON_SCHULZ_ITERATIONS):
        return lambda matrix, shift, previous: fisher_factors.damped_inverse(
            matrix, shift, method=name, previous=previous, iterations=k)

    if method == "cholesky_triangular":
        return {method: cholesky_triangular}
    if method == "cholesky_solve":
        return {method: cholesky_solve}
    if method == "matmul":
        return {method: lambda matrix, shift, previous: tf.matmul(matrix, previous)}
    if method in ("newton_schulz", "ns_fallback"):
        label = "newton_schulz_{}" if method == "newton_schulz" else "ns_fallback_{}"
        return {label.format(k): library("newton_schulz", k) for k in iterations}
    return {method: library(method)}


def run(sizes, methods, modes, iterations, repeats, shift, seed, eigh_xla_max_size):
    """Rows (d, method, mode, median s, first call s, relative error)."""
    import tensorflow as tf

    rows = []
    for d in sizes:
        factor = synthetic_factor(d, seed)
        exact = np.linalg.inv(factor.astype(np.float64) + shift * np.eye(d))
        good_start = tf.constant(exact.astype(np.float32))  # accepted by the check
        bad_start = tf.eye(d)  # refused: falls back to Cholesky
        args = (tf.constant(factor), tf.constant(shift, tf.float32))
        calls = {}
        for method in methods:
            for label, fn in _candidates(method, iterations).items():
                start = bad_start if method == "ns_fallback" else good_start
                for mode in modes:
                    if method == "eigh" and mode == "xla" and d > eigh_xla_max_size:
                        continue
                    compiled = fn if mode == "eager" else tf.function(fn, jit_compile=mode == "xla")
                    begin = time.perf_counter()
                    value = compiled(*args, start).numpy()
                    first = time.perf_counter() - begin
                    error = (np.linalg.norm(value - exact) / np.linalg.norm(exact)
                             if method != "matmul" else float("nan"))
                    calls[(label, mode)] = (compiled, start, first, error)
        times = {key: [] for key in calls}
        for _ in range(repeats):
            for key, (compiled, start, _, _) in calls.items():
                begin = time.perf_counter()
                compiled(*args, start).numpy()
                times[key].append(time.perf_counter() - begin)
        for (label, mode), (_, _, first, error) in calls.items():
            rows.append((d, label, mode, float(np.median(times[(label, mode)])), first, error))
    return rows


def format_table(rows):
    lines = ["| d | method | mode | median ms | first call s | rel. error |", "|---|---|---|---|---|---|"]
    for d, label, mode, median, first, error in rows:
        lines.append(f"| {d} | {label} | {mode} | {median * 1e3:.2f} | {first:.2f} | {error:.1e} |")
    return "\n".join(lines)


def main(argv):
    del argv
    rows = run([int(d) for d in FLAGS.sizes], FLAGS.methods, FLAGS.modes,
               [int(k) for k in FLAGS.iterations], FLAGS.repeats, FLAGS.shift, FLAGS.seed,
               FLAGS.eigh_xla_max_size)
    print(format_table(rows))


if __name__ == "__main__":
    define_flags()
    app.run(main)
