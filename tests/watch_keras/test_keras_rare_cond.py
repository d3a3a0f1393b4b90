"""The watched train step's rarely taken branches stay one ``If`` op each, not lowered into the step's graph.

``tf.cond`` inside a ``tf.function`` is lowered to Switch/Merge: the executor then visits every op of the branch
not taken at each step. The watch's branches that run at few steps (full summaries, the anomaly judge, the
float64 norms after an overflow, the non-finite counts) go through ``rare_cond``, which keeps them as one ``If``
that calls only the taken branch. These tests check its results and side effects against ``tf.cond``, its
fall-back outside a function, and that a watched model's train step holds such ``If`` ops.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

import gradsight
from gradsight.frameworks.keras import _summary

pytestmark = pytest.mark.keras


def _if_ops(graph: tf.Graph) -> list[tf.Operation]:
    return [op for op in graph.get_operations() if op.type in ("If", "StatelessIf")]


def test_results_and_side_effects_match_tf_cond():
    hits = tf.Variable(0.0)

    def taken() -> tuple[tf.Tensor, tf.Tensor]:
        hits.assign_add(1.0)  # a side effect of the taken branch only, as the judge's state update
        return tf.constant(True), tf.constant(2.0)

    def quiet() -> tuple[tf.Tensor, tf.Tensor]:
        return tf.constant(False), tf.constant(0.0)

    @tf.function
    def step(p: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        return _summary.rare_cond(p, taken, quiet)

    got = [tuple(v.numpy().item() for v in step(tf.constant(i % 3 == 0))) for i in range(6)]
    assert got == [(True, 2.0), (False, 0.0), (False, 0.0), (True, 2.0), (False, 0.0), (False, 0.0)]
    assert hits.numpy() == 2.0  # the taken branch's write ran twice, the other branch never wrote
    if _summary._fast_cond is None:
        pytest.skip("this TensorFlow has no cond_v2.fast_cond_v2: rare_cond is tf.cond (checked above)")
    (op,) = _if_ops(step.get_concrete_function(tf.TensorSpec([], tf.bool)).graph)
    assert op.get_attr("_lower_using_switch_merge") is False  # not lowered into the graph


def test_outside_a_function_and_under_xla_it_is_tf_cond():
    assert _summary.rare_cond(tf.constant(True), lambda: tf.constant(1), lambda: tf.constant(0)).numpy() == 1

    @tf.function
    def step(p: tf.Tensor) -> tf.Tensor:
        return _summary.rare_cond(p, lambda: tf.constant(1.0), lambda: tf.constant(0.0), xla=True)

    graph = step.get_concrete_function(tf.TensorSpec([], tf.bool)).graph
    assert step(tf.constant(False)).numpy() == 0.0
    assert all(op.get_attr("_lower_using_switch_merge") for op in _if_ops(graph))  # tf.cond's own: lowered


@pytest.mark.skipif(_summary._fast_cond is None, reason="this TensorFlow has no cond_v2.fast_cond_v2")
def test_the_watched_train_step_keeps_its_rare_branches_as_if_ops(tmp_path, data):
    x, y = data
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(4, activation="relu"), keras.layers.Dense(3)])
    model.compile(keras.optimizers.SGD(0.1), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    with gradsight.watch(model, path=tmp_path / "run.db"):
        model.fit(x, y, batch_size=16, epochs=1, verbose=0)
        fn = model.train_function
        graphs = []
        for cell in fn.__closure__ or ():  # Keras wraps the traced tf.function in a Python closure
            value = cell.cell_contents
            if hasattr(value, "_list_all_concrete_functions"):
                graphs += [cf.graph for cf in value._list_all_concrete_functions()]
    assert graphs, "no traced train function found"
    nodes = []  # every node of the traced step, the nested functions' (Keras' one_step_on_data) included
    for g in graphs:
        gd = g.as_graph_def()
        nodes += list(gd.node) + [n for f in gd.library.function for n in f.node_def]
    ifs = [n for n in nodes if n.op in ("If", "StatelessIf")]
    unlowered = [n for n in ifs if "_lower_using_switch_merge" in n.attr and not n.attr["_lower_using_switch_merge"].b]
    # the full-summary branch, the judge, the three norms' float64 branches, the non-finite counts
    assert len(unlowered) >= 6, [(n.name, n.attr.get("_lower_using_switch_merge")) for n in ifs]
    with gradsight.load(tmp_path / "run.db") as run:  # and the run holds the logged step's summaries
        assert np.isfinite(run.summary("sequential/dense/kernel", "grad", 0).sum_sq)
