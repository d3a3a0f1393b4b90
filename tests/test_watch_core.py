"""The shared per-step signal helpers of :mod:`gradsight._watch_core`: index picks agree with the dict-based ones."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from gradsight._watch_core import anomaly_values, judged_signals, signal_row

_names = st.lists(st.sampled_from(["a", "b.weight", "c.bias", "d/kernel"]), min_size=0, max_size=4, unique=True)
_norm = st.floats(allow_nan=True, allow_infinity=True, width=64)


@given(
    grads=_names,
    params=_names,
    update=st.booleans(),
    lr=st.booleans(),
    data=st.data(),
)
def test_judged_signals_pick_what_anomaly_values_takes_in_its_order(grads, params, update, lr, data):
    """For any signal-row layout, the values picked by index are anomaly_values' selection of the row, in order."""
    g = [data.draw(_norm) for _ in grads]
    w = [data.draw(_norm) for _ in params]
    u = [data.draw(_norm) for _ in params] if update else None
    names, values, _ = signal_row(
        tuple(grads), g, None, param_names=tuple(params), weight=w, update=u, lr={"lr": 0.1} if lr else None
    )
    by_dict = list(anomaly_values(dict(zip(names, values, strict=True)), loss=False).items())
    by_index = [(n, values[i]) for n, i in judged_signals(names)]
    assert [n for n, _ in by_index] == [n for n, _ in by_dict]
    for (_, a), (_, b) in zip(by_index, by_dict, strict=True):
        assert a == b or (a != a and b != b)  # the same float (NaN compares unequal to itself)
    if grads:  # the gradient norms come first, upstream first, and every update norm is judged
        assert [n for n, _ in by_index[:2]] == ["grad_norm_preclip", "grad_norm"]
    assert sum(n.startswith("update_norm/") for n, _ in by_index) == (len(params) if update else 0)
