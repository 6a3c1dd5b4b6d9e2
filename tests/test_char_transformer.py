"""The character-level Transformer example runs a few steps offline for each
optimizer, improves the held-out loss and reports the parameter shares."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from examples import char_transformer  # noqa: E402

SMALL = dict(steps=6, batch_size=8, seq_len=12, d_model=8, heads=2, blocks=1, eval_every=3,
             tkfac_learning_rate=0.3, kfac_learning_rate=0.3, kfac_damping=0.01,
             norm_constraint=0.01, adam_learning_rate=3e-3, weight_decay=1e-2)


@pytest.fixture(scope="module")
def text_ids():
    ids, vocab = char_transformer.encode(char_transformer.load_text(("textwrap",)))
    assert vocab == 97 and len(ids) > 10000 and ids.max() < vocab and ids.min() >= 0
    return ids


@pytest.mark.parametrize("name", ["tkfac_adaptive", "adamw"])
def test_example_trains_and_reports(text_ids, name):
    # The adaptive step fits each batch's quadratic model: on batches of 8
    # sequences its first steps overshoot the held-out loss (docs/layers.md),
    # so it gets the example's default batch of 32.
    options = dict(SMALL, batch_size=32) if name == "tkfac_adaptive" else SMALL
    result = char_transformer.train(name, text_ids, 97, **options)
    losses = [loss for _, _, loss in result["curve"]]
    assert [step for step, _, _ in result["curve"]] == [0, 3, 6]
    assert np.all(np.isfinite(losses)) and losses[-1] < losses[0] - 0.1
    shares = result["shares"]
    assert sum(shares.values()) == pytest.approx(1.0)
    if name == "tkfac_adaptive":
        assert shares["none"] == 0.0 and shares["Kronecker"] > 0.5
        assert shares["diagonal"] > 0 and shares["per-feature 2x2"] > 0
    else:
        assert shares == {"none": 1.0}
    table = char_transformer.report([result])
    assert f"| 6 | {losses[-1]:.3f}" in table
