"""Raw scores trained with a Keras cross-entropy left at ``from_logits=False`` (rule ``logits-as-probabilities``).

The watch records what the compiled loss is and which layer makes the model's output; the rule names the mistake
from the recorded output range. Real training on scikit-learn's digits: the broken run (a ``Dense(10)`` head, no
activation) learns badly, the two correct spellings learn, and only the broken one gets the finding.
"""

from __future__ import annotations

import contextlib

import keras
import numpy as np
import pytest

import gradsight
from gradsight.diagnose import GradsightWarning
from gradsight.frameworks.keras._watch import _loss_meta, _output_layers
from gradsight.store import Run

pytestmark = pytest.mark.keras


@pytest.mark.parametrize(
    ("loss", "expected"),
    [
        ("sparse_categorical_crossentropy", [{"name": "sparse_categorical_crossentropy", "from_logits": False}]),
        ("bce", [{"name": "binary_crossentropy", "from_logits": False}]),
        ("mse", [{"name": "mean_squared_error", "from_logits": None}]),
        (None, None),
    ],
)
def test_the_loss_is_described_from_its_string(loss, expected):
    assert _loss_meta(loss) == expected


def test_the_loss_is_described_from_its_class_function_or_collection():
    assert _loss_meta(keras.losses.CategoricalCrossentropy(from_logits=True)) == [
        {"name": "categorical_crossentropy", "from_logits": True}
    ]
    assert _loss_meta(keras.losses.categorical_crossentropy) == [
        {"name": "categorical_crossentropy", "from_logits": False}
    ]
    assert _loss_meta(lambda y, p: p) == [{"name": "<lambda>", "from_logits": None}]  # unknown: not guessed
    assert _loss_meta({"a": "mae", "b": keras.losses.BinaryCrossentropy(from_logits=True)}) == [
        {"name": "mean_absolute_error", "from_logits": None},
        {"name": "binary_crossentropy", "from_logits": True},
    ]


def test_the_output_layer_is_known_only_where_a_layer_makes_the_output():
    seq = keras.Sequential([keras.Input((8,)), keras.layers.Dense(4), keras.layers.Dense(3, name="head")])
    assert _output_layers(seq) == ["head"]
    x = keras.Input((8,))
    assert _output_layers(keras.Model(x, keras.ops.softmax(keras.layers.Dense(3)(x)))) is None  # an op, no layer

    class Sub(keras.Model):
        def __init__(self):
            super().__init__()
            self.d = keras.layers.Dense(3)

        def call(self, x):
            return self.d(x)

    sub = Sub()
    sub(np.zeros((1, 8), "float32"))
    assert _output_layers(sub) is None  # call() may do anything after its last layer


def _digits():
    sklearn = pytest.importorskip("sklearn.datasets")
    x, y = sklearn.load_digits(return_X_y=True)
    return (x / 16.0).astype("float32"), y


def _train(tmp_path, head, loss, y_onehot=False):
    x, y = _digits()
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((64,)), keras.layers.Dense(32, activation="relu"), head])
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss=loss, metrics=["accuracy"])
    target = keras.utils.to_categorical(y, 10) if y_onehot else y
    with gradsight.watch(model, path=tmp_path / "r.db", every=10):
        hist = model.fit(x[:960], target[:960], batch_size=32, epochs=6, verbose=0)
    return hist.history["accuracy"][-1], gradsight.diagnose(tmp_path / "r.db")


@pytest.mark.parametrize("onehot", [False, True], ids=["sparse", "categorical"])
def test_raw_scores_into_a_probability_cross_entropy_is_the_root_cause(tmp_path, onehot):
    loss = keras.losses.CategoricalCrossentropy() if onehot else "sparse_categorical_crossentropy"
    acc, found = _train(tmp_path, keras.layers.Dense(10, name="scores"), loss, onehot)
    run = Run(tmp_path / "r.db")
    assert run.meta["model"]["output_layers"] == ["scores"]
    assert run.meta["loss"][0]["from_logits"] is False
    root = found[0]
    assert root.code == "logits-as-probabilities" and root.severity == "error" and root.is_root, [
        (f.code, f.message) for f in found
    ]
    assert root.layers == ("scores",) and root.evidence["activation"] == "linear"
    # the recorded range is the output's: outside [0, 1], as the message says
    out = run.to_pandas(kind="output", layer="scores")
    assert root.evidence["output_min"] == pytest.approx(out["min"].min())
    assert root.evidence["output_min"] < 0 or root.evidence["output_max"] > 1
    assert "from_logits=True" in root.advice[0] and "{" not in root.message + root.explanation
    assert acc < 0.5  # the same model trained correctly reaches > 0.75 (next test): the mistake costs


@pytest.mark.parametrize("spelling", ["logits+from_logits", "softmax+probabilities"])
def test_either_correct_spelling_learns_and_is_not_flagged(tmp_path, spelling):
    if spelling == "logits+from_logits":
        head, loss = keras.layers.Dense(10), keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    else:
        head, loss = keras.layers.Dense(10, activation="softmax"), "sparse_categorical_crossentropy"
    with contextlib.nullcontext() if spelling == "logits+from_logits" else pytest.warns(GradsightWarning):
        acc, found = _train(tmp_path, head, loss)  # (a softmax output read through its logits: no output_grad)
    assert acc > 0.75
    assert "logits-as-probabilities" not in [f.code for f in found], [(f.code, f.message) for f in found]


def test_a_squared_error_on_raw_scores_is_not_flagged(tmp_path):
    _, found = _train(tmp_path, keras.layers.Dense(10), "mse", y_onehot=True)
    assert "logits-as-probabilities" not in [f.code for f in found]


def test_a_model_compiled_again_with_another_loss_records_the_new_loss_and_when_regression(tmp_path):
    """Regression: meta["loss"] kept the first compile's loss, so the diagnosis judged later steps by a loss they no
    longer trained with (e.g. from_logits=False after a fix to from_logits=True)."""
    x, y = np.random.default_rng(0).normal(size=(64, 4)).astype("float32"), np.arange(64) % 3
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, name="scores")])
    model.compile(keras.optimizers.SGD(0.01), "sparse_categorical_crossentropy")
    with gradsight.watch(model, path=tmp_path / "r.db") as w:
        model.fit(x, y, batch_size=16, epochs=1, verbose=0)  # 4 steps: 0..3
        model.compile(keras.optimizers.SGD(0.01), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        model.fit(x, y, batch_size=16, epochs=1, verbose=0)
        model.fit(x, y, batch_size=16, epochs=1, verbose=0)  # the same loss again: nothing more to note
    run = Run(w.path)
    assert run.meta["loss"] == [{"name": "sparse_categorical_crossentropy", "from_logits": True}]
    notes = [n for n in run.meta["notes"] if "compiled again" in n]
    assert len(notes) == 1 and "from step 4 on" in notes[0] and "'from_logits': False" in notes[0]
    assert run.steps == [0] and list(run.scalars.index) == list(range(12))
