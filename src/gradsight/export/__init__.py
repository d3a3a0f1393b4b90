"""Export a run to other tools: TensorBoard (after the fact or live), CSV and Parquet.

Importing this package imports neither TensorBoard nor pyarrow nor pandas; each is imported when its export
runs. The command line is ``gradsight export {tensorboard,csv,parquet} RUN``.
"""

from __future__ import annotations

from ._scalars import headline_scalars, layer_scalars
from ._tensorboard import LiveTensorBoard, TensorBoardSink, histogram_fields, to_tensorboard
from ._tidy import read_csv, to_csv, to_parquet

__all__ = [
    "LiveTensorBoard",
    "TensorBoardSink",
    "headline_scalars",
    "histogram_fields",
    "layer_scalars",
    "read_csv",
    "to_csv",
    "to_parquet",
    "to_tensorboard",
]
