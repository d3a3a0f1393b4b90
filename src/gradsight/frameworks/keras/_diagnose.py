"""Keras glue for online diagnosis: a callback that evaluates the rules after each batch and can stop ``fit``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import keras

from gradsight.diagnose import OnlineDiagnosis

__all__ = ["KerasDiagnosisCallback"]


class KerasDiagnosisCallback(keras.callbacks.Callback):
    """Run :class:`gradsight.diagnose.OnlineDiagnosis` after each training batch; stop ``fit`` on ``stop_on``.

    Put it after the watch's own callback (``model.fit`` of a watched model adds that one first), e.g.::

        with gradsight.watch(model, path="run.db") as w:
            model.fit(x, y, callbacks=[KerasDiagnosisCallback(w)])

    When a finding with a code in ``stop_on`` (default ``("non-finite",)``) appears, it sets
    ``model.stop_training = True``, so ``fit`` ends after the current batch. At the end of training the full rule
    set runs once more.

    Args:
        run: the watch (or anything :class:`OnlineDiagnosis` accepts).
        **kwargs: passed to :class:`OnlineDiagnosis` (``rules``, ``thresholds``, ``on_finding``, ``stop_on``,
            ``full_every``, ``record``).

    Attributes:
        online: the :class:`OnlineDiagnosis` (its ``findings``, ``should_stop``, ``stop_finding``).
    """

    def __init__(self, run: Any, **kwargs: Any) -> None:
        super().__init__()
        self.online = OnlineDiagnosis(run, **kwargs)

    def on_train_batch_end(self, batch: int, logs: Mapping[str, Any] | None = None) -> None:
        """Evaluate the rules on what the watch has recorded; stop training when asked to."""
        self.online.check()
        if self.online.should_stop:
            self.model.stop_training = True

    def on_train_end(self, logs: Mapping[str, Any] | None = None) -> None:
        """A last full evaluation."""
        self.online.check(full=True)
