r"""A character-level Transformer language model on Python's own standard
library source (ships with every Python, so it runs offline), trained with
adaptive TKFAC and K-FAC (library defaults, no tuning), TKFAC and K-FAC
with fixed hyperparameters, Adam and AdamW for a fixed number of steps.

Model: Embedding -> learned position embedding (a custom layer: a generic
diagonal block, or plain momentum for the *_momentum optimizers) -> ``--blocks`` x [MultiHeadAttention (causal) + residual +
LayerNorm, Dense MLP + residual + LayerNorm] -> Dense logits per position.
``LayerCollection.from_model`` registers every layer kind.

Prints the held-out loss (mean next-character cross-entropy, nats) at
several steps with the training seconds to reach them, and the share of
parameters preconditioned by a Kronecker block, a per-feature
scale-and-shift block, a diagonal block or none.

  python -m examples.char_transformer
  python -m examples.char_transformer --optimizers=tkfac,adam --steps=300
  python -m examples.char_transformer --plot_dir=docs   # + the two PNGs
"""

import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from absl import app, flags  # noqa: E402

from examples import loss_plots
import tkfac_tf  # noqa: E402

MODULES = ("textwrap", "string", "abc", "functools", "contextlib", "argparse", "json/decoder")
OPTIMIZERS = ("tkfac", "kfac", "adam", "adamw", "tkfac_momentum", "kfac_momentum",
              "tkfac_adaptive", "kfac_adaptive")
DEFAULT_OPTIMIZERS = ("tkfac_adaptive", "kfac_adaptive", "tkfac", "kfac", "adam", "adamw")
LABELS = {"tkfac": "TKFAC", "kfac": "K-FAC", "tkfac_momentum": "TKFAC (position emb.: momentum)",
          "kfac_momentum": "K-FAC (position emb.: momentum)", "adam": "Adam", "adamw": "AdamW",
          "tkfac_adaptive": "TKFAC (adaptive)", "kfac_adaptive": "K-FAC (adaptive)"}


def define_flags():
    flags.DEFINE_list("optimizers", list(DEFAULT_OPTIMIZERS),
                      f"Subset of {OPTIMIZERS} (*_momentum: other_variables='momentum').")
    flags.DEFINE_integer("steps", 200, "Training steps per optimizer.", lower_bound=1)
    flags.DEFINE_integer("batch_size", 32, "Sequences per batch.", lower_bound=1)
    flags.DEFINE_integer("seq_len", 32, "Characters per sequence.", lower_bound=2)
    flags.DEFINE_integer("d_model", 32, "Model width.", lower_bound=2)
    flags.DEFINE_integer("heads", 2, "Attention heads.", lower_bound=1)
    flags.DEFINE_integer("blocks", 2, "Transformer blocks.", lower_bound=1)
    flags.DEFINE_integer("eval_every", 10, "Evaluate every this many steps.", lower_bound=1)
    flags.DEFINE_integer("table_every", 50, "Rows of the printed loss table every this many steps.",
                         lower_bound=1)
    flags.DEFINE_string("plot_dir", None, "If set, write loss-vs-steps and loss-vs-seconds PNGs here.")
    flags.DEFINE_string("plot_prefix", "layers_char_transformer", "File name prefix of the plots.")
    flags.DEFINE_integer("seed", 0, "Seed of the weights and batches.")
    flags.DEFINE_float("tkfac_learning_rate", 0.3, "TKFAC learning rate.")
    flags.DEFINE_float("kfac_learning_rate", 0.3, "K-FAC learning rate.")
    flags.DEFINE_float("kfac_damping", 0.01, "TKFAC / K-FAC damping.")
    flags.DEFINE_float("norm_constraint", 0.01, "TKFAC / K-FAC norm constraint (KL clip).")
    flags.DEFINE_enum("other_variables", "diagonal", ["diagonal", "full", "momentum"],
                      "from_model's treatment of variables no layer kind covers (the position "
                      "embedding here) for 'tkfac' / 'kfac'; the *_momentum optimizers always use momentum.")
    flags.DEFINE_float("adam_learning_rate", 3e-3, "Adam / AdamW learning rate.")
    flags.DEFINE_float("weight_decay", 1e-2, "AdamW weight decay.")


# --- data -------------------------------------------------------------------------
def load_text(modules=MODULES):
    """The source of a few standard-library modules, read from the directory
    of the running Python's ``os`` module."""
    root = os.path.dirname(os.__file__)
    parts = []
    for name in modules:
        with open(os.path.join(root, name + ".py"), encoding="utf-8") as f:
            parts.append(f.read())
    return "\n".join(parts)


def encode(text):
    """Characters -> ids: printable ASCII and newline get their own id, any
    other character id 0 (vocab size 97)."""
    codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32).astype(np.int64)
    ids = np.where((codes >= 32) & (codes < 127), codes - 30, 0)
    ids[codes == 10] = 1
    return ids.astype(np.int32), 97


def batches(ids, seq_len, batch_size, seed):
    """Endless random (x, y) batches of the first 90% of ``ids``; y is x
    shifted by one character."""
    rng = np.random.RandomState(seed)
    limit = int(0.9 * len(ids)) - seq_len - 1
    while True:
        starts = rng.randint(0, limit, size=batch_size)
        window = np.stack([ids[s : s + seq_len + 1] for s in starts])
        yield window[:, :-1], window[:, 1:]


def held_out(ids, seq_len, count=256):
    """Fixed evaluation sequences from the last 10% of ``ids``."""
    start = int(0.9 * len(ids))
    starts = np.linspace(start, len(ids) - seq_len - 2, count).astype(int)
    window = np.stack([ids[s : s + seq_len + 1] for s in starts])
    return window[:, :-1], window[:, 1:]


# --- model ------------------------------------------------------------------------
class PositionEmbedding(keras.layers.Layer):
    """Adds a learned [seq_len, d_model] position embedding."""

    def build(self, input_shape):
        self.positions = self.add_weight(
            shape=tuple(input_shape[-2:]), initializer=keras.initializers.RandomNormal(stddev=0.02),
            name="positions",
        )

    def call(self, x):
        return x + self.positions


def build_model(vocab, seq_len, d_model, heads, blocks, seed):
    keras.utils.set_random_seed(seed)
    inp = keras.Input((seq_len,), dtype="int32")
    h = keras.layers.Embedding(vocab, d_model, name="chars")(inp)
    h = PositionEmbedding(name="positions")(h)
    for b in range(blocks):
        a = keras.layers.MultiHeadAttention(heads, d_model // heads, name=f"attention_{b}")(
            h, h, use_causal_mask=True
        )
        h = keras.layers.LayerNormalization(name=f"ln_attention_{b}")(h + a)
        m = keras.layers.Dense(2 * d_model, activation="relu", name=f"mlp_in_{b}")(h)
        m = keras.layers.Dense(d_model, name=f"mlp_out_{b}")(m)
        h = keras.layers.LayerNormalization(name=f"ln_mlp_{b}")(h + m)
    out = keras.layers.Dense(vocab, name="logits")(h)
    return keras.Model(inp, out)


LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

BLOCK_GROUPS = {
    "dense": "Kronecker",
    "einsum_dense": "Kronecker",
    "embedding": "Kronecker (diagonal input factor)",
    "scale_and_shift": "per-feature 2x2",
    "variables": "diagonal",
}


def parameter_shares(model, collection):
    """{group: share of the model's trainable parameters}, groups as in
    ``BLOCK_GROUPS`` plus 'none'."""
    total = sum(int(np.prod(v.shape)) for v in model.trainable_variables)
    shares = {}
    covered = 0
    for kind in collection.layer_kinds:
        count = sum(int(np.prod(v.shape)) for v in kind.parameters)
        group = BLOCK_GROUPS[kind.name]
        shares[group] = shares.get(group, 0) + count / total
        covered += count
    shares["none"] = (total - covered) / total
    return shares, total


def make_optimizer(name, model, options):
    if name in ("tkfac_momentum", "kfac_momentum"):
        name = name.split("_")[0]
        options = dict(options, other_variables="momentum")
    if name in ("tkfac_adaptive", "kfac_adaptive"):
        collection = tkfac_tf.LayerCollection.from_model(
            model, loss=LOSS, other_variables=options.get("other_variables", "diagonal")
        )
        cls = tkfac_tf.TKFAC if name == "tkfac_adaptive" else tkfac_tf.KFAC
        return cls.adaptive(layer_collection=collection, seed=options["seed"]), collection
    if name in ("tkfac", "kfac"):
        collection = tkfac_tf.LayerCollection.from_model(
            model, loss=LOSS, other_variables=options.get("other_variables", "diagonal")
        )
        cls = tkfac_tf.TKFAC if name == "tkfac" else tkfac_tf.KFAC
        return cls(
            learning_rate=options[f"{name}_learning_rate"], damping=options["kfac_damping"],
            norm_constraint=options.get("norm_constraint"),
            layer_collection=collection, seed=options["seed"],
        ), collection
    if name == "adam":
        return keras.optimizers.Adam(options["adam_learning_rate"]), None
    if name == "adamw":
        return keras.optimizers.AdamW(
            options["adam_learning_rate"], weight_decay=options["weight_decay"]
        ), None
    raise ValueError(f"Unknown optimizer {name!r}; choose from {OPTIMIZERS}.")


def train(name, text_ids, vocab, steps=200, batch_size=32, seq_len=32, d_model=32, heads=2,
          blocks=2, eval_every=25, seed=0, **options):
    """Trains one optimizer; returns {'name', 'curve': [(step, seconds,
    held-out loss)], 'shares', 'parameters', 'first_step_seconds',
    'step_seconds' (mean after the first), 'step_times' (every step's
    seconds, the first included)}."""
    options = dict(options, seed=seed)
    model = build_model(vocab, seq_len, d_model, heads, blocks, seed)
    optimizer, collection = make_optimizer(name, model, options)
    model.compile(optimizer=optimizer, loss=LOSS)
    x_eval, y_eval = held_out(text_ids, seq_len)
    evaluate = tf.function(lambda x, y: LOSS(y, model(x, training=False)))
    shares, total = (parameter_shares(model, collection) if collection is not None
                     else ({"none": 1.0}, None))
    data = batches(text_ids, seq_len, batch_size, seed)
    curve = [(0, 0.0, float(evaluate(x_eval, y_eval)))]
    seconds, first_step, step_times = 0.0, 0.0, []
    for step in range(1, steps + 1):
        x, y = next(data)
        start = time.perf_counter()
        model.train_on_batch(x, y)
        elapsed = time.perf_counter() - start
        step_times.append(elapsed)
        if step == 1:
            first_step = elapsed  # tracing and compilation; not counted below
        else:
            seconds += elapsed
        if step % eval_every == 0 or step == steps:
            curve.append((step, seconds, float(evaluate(x_eval, y_eval))))
    if total is None:
        total = sum(int(np.prod(v.shape)) for v in model.trainable_variables)
    return {"name": name, "curve": curve, "shares": shares, "parameters": total,
            "first_step_seconds": first_step,
            "step_seconds": seconds / max(steps - 1, 1), "step_times": step_times}


def median_step(result):
    """Median seconds of the steps after the first (robust to the shared CPU's
    hiccups)."""
    times = result.get("step_times", [])[1:]
    return float(np.median(times)) if times else float("nan")


def reach(result, target):
    """(step, seconds) of the first evaluation with held-out loss <= target,
    or (None, None)."""
    for step, seconds, loss in result["curve"]:
        if loss <= target:
            return step, seconds
    return None, None


def report(results, table_every=None):
    """Markdown tables: held-out loss vs steps (training seconds after the
    first step, which traces and compiles; rows every ``table_every`` steps
    and the last), step times with same-run ratios to Adam (when Adam ran),
    parameter shares."""
    lines = ["| step | " + " | ".join(r["name"] for r in results) + " |",
             "|---|" + "---|" * len(results)]
    last = len(results[0]["curve"]) - 1
    for row in range(len(results[0]["curve"])):
        step = results[0]["curve"][row][0]
        if table_every and step % table_every and row != last:
            continue
        cells = [f"{r['curve'][row][2]:.3f} ({r['curve'][row][1]:.1f} s)" for r in results]
        lines.append(f"| {step} | " + " | ".join(cells) + " |")
    lines.append("")
    adam = next((r for r in results if r["name"] == "adam"), None)
    target = adam["curve"][-1][2] if adam else None
    lines.append("| optimizer | final loss | first step (trace + compile) | mean step after it | "
                 "median step | median step / Adam's | steps to Adam's final loss | "
                 "seconds to it | seconds to it / Adam's | Adam's steps to this final loss |")
    lines.append("|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        cells = [f"{r['curve'][-1][2]:.3f}", f"{r['first_step_seconds']:.1f} s",
                 f"{1000 * r['step_seconds']:.1f} ms", f"{1000 * median_step(r):.1f} ms"]
        if adam:
            step, seconds = reach(r, target)
            cells.append(f"{median_step(r) / median_step(adam):.2f}")
            cells.append(str(step) if step is not None else "not reached")
            cells.append(f"{seconds:.1f} s" if step is not None else "-")
            cells.append(f"{seconds / adam['curve'][-1][1]:.2f}" if step is not None else "-")
            adam_step, _ = reach(adam, r["curve"][-1][2])
            cells.append(str(adam_step) if adam_step is not None else "not reached")
        else:
            cells += ["-"] * 5
        lines.append(f"| {r['name']} | " + " | ".join(cells) + " |")
    lines.append("")
    groups = ["Kronecker", "Kronecker (diagonal input factor)", "per-feature 2x2", "diagonal", "none"]
    lines.append("| optimizer | parameters | " + " | ".join(groups) + " |")
    lines.append("|---|---|" + "---|" * len(groups))
    for r in results:
        lines.append(f"| {r['name']} | {r['parameters']} | "
                     + " | ".join(f"{100 * r['shares'].get(g, 0.0):.1f}%" for g in groups) + " |")
    return "\n".join(lines)


def plot(results, plot_dir, prefix="layers_char_transformer"):
    """Held-out loss vs steps and vs training seconds (after the first step),
    one PNG each; returns their paths."""
    os.makedirs(plot_dir, exist_ok=True)
    paths = []
    for suffix, xlabel, column in (("loss_vs_steps", "step", 0),
                                   ("loss_vs_seconds", "training seconds (after the first step)", 1)):
        curves = [(LABELS.get(r["name"], r["name"]), [c[column] for c in r["curve"]], [c[2] for c in r["curve"]],
                   dict(marker=".", ms=3, ls="--" if r["name"].endswith("_momentum") else "-"))
                  for r in results]
        paths.append(loss_plots.save_loss_figure(
            os.path.join(plot_dir, f"{prefix}_{suffix}.png"), curves, xlabel, "held-out loss (nats)",
            "character Transformer on stdlib source", y_top=3.5))
    return paths


def main(argv):
    del argv
    f = flags.FLAGS
    for name in f.optimizers:
        if name not in OPTIMIZERS:
            raise app.UsageError(f"--optimizers: unknown optimizer {name!r}; choose from {OPTIMIZERS}.")
    if f.d_model % f.heads:
        raise app.UsageError("--d_model must be a multiple of --heads.")
    ids, vocab = encode(load_text())
    options = {k: getattr(f, k) for k in (
        "steps", "batch_size", "seq_len", "d_model", "heads", "blocks", "eval_every", "seed",
        "tkfac_learning_rate", "kfac_learning_rate", "kfac_damping", "adam_learning_rate",
        "weight_decay", "norm_constraint", "other_variables")}
    print(f"{len(ids)} characters of standard-library source, vocab {vocab}")
    results = []
    for name in f.optimizers:
        result = train(name, ids, vocab, **options)
        print(f"{name}: final held-out loss {result['curve'][-1][2]:.3f} "
              f"after {result['curve'][-1][1]:.1f} s", flush=True)
        results.append(result)
    print(report(results, f.table_every))
    if f.plot_dir:
        for path in plot(results, f.plot_dir, f.plot_prefix):
            print("wrote", path)


if __name__ == "__main__":
    define_flags()
    app.run(main)
