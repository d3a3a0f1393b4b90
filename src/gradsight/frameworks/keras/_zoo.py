"""Keras side of :mod:`gradsight.zoo`: build a scenario's network, train it under the watch, return the run.

The network is a ``keras.Sequential`` with an ``Input`` whose layer names are the scenario's, activations as
separate ``Activation`` layers, so PyTorch and Keras runs name the same layers. Training is ``model.fit`` over
one epoch of ``steps`` batches, unshuffled.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import keras
import numpy as np
import tensorflow as tf

if TYPE_CHECKING:  # pragma: no cover
    from ..._scenario import NaNInjection, Scenario

__all__ = ["build", "train"]


class _StepCounter(keras.callbacks.Callback):
    """Counts finished training batches in a ``tf.Variable`` that the injecting layer reads in the graph."""

    def __init__(self, var: tf.Variable) -> None:
        super().__init__()
        self.var = var

    def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
        self.var.assign_add(1)


class InjectDense(keras.layers.Dense):
    """A ``Dense`` that injects a NaN into its forward output or its backward pass at one training step.

    The step is read from a ``tf.Variable`` kept outside Keras' variable tracking (a callback advances it), so
    the injection works inside the compiled train function.
    """

    def __init__(self, *args: Any, phase: str, at_step: int, counter: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.phase = phase
        self.at_step = at_step
        self._counter_fn = counter

    def call(self, inputs: Any, training: Any = None) -> Any:
        out = super().call(inputs)
        if not training:
            return out
        hit = tf.equal(self._counter_fn(), self.at_step)
        nanrow = tf.where(tf.range(tf.shape(out)[-1]) == 0, tf.constant(np.nan, out.dtype), tf.zeros((), out.dtype))
        if self.phase == "forward":
            return out + tf.where(hit, nanrow, tf.zeros_like(nanrow))

        @tf.custom_gradient
        def nan_grad(x: Any) -> Any:
            def grad(g: Any) -> Any:
                return tf.where(hit, g + nanrow, g)

            return tf.identity(x), grad

        return nan_grad(out)


def build(scenario: Scenario, inject: NaNInjection | None = None, counter: Any = None) -> keras.Sequential:
    """The scenario's network as a ``keras.Sequential`` with the scenario's layer names."""
    seed = 0
    layers: list[Any] = [keras.Input((8, 8, 1) if scenario.data == "images" else (10,))]
    for spec in scenario.layers:
        kind, name = spec["kind"], spec["name"]
        init: dict[str, Any] = {}
        if "weight_std" in spec:
            seed += 1
            init["kernel_initializer"] = keras.initializers.RandomNormal(0.0, spec["weight_std"], seed=seed)
        if "bias" in spec:
            init["bias_initializer"] = keras.initializers.Constant(spec["bias"])
        if kind == "dense":
            if inject is not None and inject.layer == name:
                layers.append(
                    InjectDense(
                        spec["units"], name=name, phase=inject.phase, at_step=inject.step, counter=counter, **init
                    )
                )
            else:
                layers.append(keras.layers.Dense(spec["units"], name=name, **init))
        elif kind == "conv":
            layers.append(keras.layers.Conv2D(spec["filters"], 3, padding="same", name=name, **init))
        elif kind == "act":
            layers.append(keras.layers.Activation(spec["fn"], name=name))
        elif kind == "pool":
            layers.append(keras.layers.MaxPooling2D(2, name=name))
        elif kind == "flatten":
            layers.append(keras.layers.Flatten(name=name))
        else:  # pragma: no cover - scenarios are data we write
            raise ValueError(f"unknown layer kind {kind!r}")
    return keras.Sequential(layers, name=f"zoo_{scenario.name.replace('-', '_')}")


def _naive_ce(y_true: Any, logits: Any) -> Any:
    """The classic bug: ``-sum(onehot * log(softmax))`` is NaN once a probability underflows (0 * log 0)."""
    onehot = tf.one_hot(tf.cast(tf.reshape(y_true, [-1]), tf.int32), tf.shape(logits)[-1], dtype=logits.dtype)
    return -tf.reduce_sum(onehot * tf.math.log(tf.nn.softmax(logits, axis=-1)), axis=-1)


def _loss(kind: str) -> Any:
    if kind == "ce":
        return keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    if kind == "mse":
        return keras.losses.MeanSquaredError()
    if kind == "ce-naive":
        return _naive_ce
    raise ValueError(f"unknown loss {kind!r}")  # pragma: no cover


def train(
    scenario: Scenario, x: np.ndarray, y: np.ndarray, *, seed: int, path: Path, inject: NaNInjection | None = None
) -> Path:
    """Train the scenario under ``gradsight.watch`` (full summaries every step); return the run file."""
    from ..._watch import watch

    keras.backend.clear_session()
    keras.utils.set_random_seed(seed)
    counter = tf.Variable(0, dtype=tf.int32, trainable=False)
    model = build(scenario, inject, counter=counter.read_value if inject is not None else None)
    model.compile(
        optimizer=keras.optimizers.SGD(learning_rate=scenario.lr, momentum=scenario.momentum),
        loss=_loss(scenario.loss),
    )
    callbacks = [_StepCounter(counter)] if inject is not None else []
    with watch(model, path=path, every=1) as w:
        model.fit(x, y, batch_size=scenario.batch, epochs=1, shuffle=False, verbose=0, callbacks=callbacks)
    return Path(w.path)
