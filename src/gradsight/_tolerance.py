"""Dtype-keyed comparison tolerances, shared by every check gradsight makes.

A value ``v`` (closed form, computed in float64) agrees with a reference ``r`` (autodiff, in the model's dtype)
when ``max|v - r| <= atol + rtol * max|v|``, i.e. the comparison is normwise over the whole tensor, so entries
that are zero or tiny do not produce meaningless elementwise relative errors.

The float32 and float16 rows are wider than torch.testing's defaults (float32 rtol 1.3e-6): a closed form in
float64 is compared against autodiff accumulated in the model's own precision through several layers, whose
rounding error grows with depth and width.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["Tolerance", "tolerance_for"]


@dataclass(frozen=True)
class Tolerance:
    """Relative and absolute tolerance of a normwise comparison."""

    rtol: float
    atol: float

    def allows(self, max_abs_err: float, scale: float) -> bool:
        """Whether an error of ``max_abs_err`` is allowed for values of magnitude ``scale`` (max |value|)."""
        return bool(np.isfinite(max_abs_err)) and max_abs_err <= self.atol + self.rtol * scale


_TABLE: dict[str, Tolerance] = {
    "float64": Tolerance(rtol=1e-9, atol=1e-12),
    "float32": Tolerance(rtol=1e-4, atol=1e-6),
    "bfloat16": Tolerance(rtol=3e-2, atol=1e-3),
    "float16": Tolerance(rtol=1e-2, atol=1e-4),
}


def tolerance_for(dtype: object) -> Tolerance:
    """The tolerance for a comparison against values computed in ``dtype``.

    Args:
        dtype: a numpy dtype, a framework dtype, or a dtype name such as ``"float32"``.

    Returns:
        The :class:`Tolerance` for that dtype; unknown dtypes get float32's.
    """
    name = str(dtype).rsplit(".", 1)[-1].replace("'>", "").replace("<dtype: '", "")
    return _TABLE.get(name, _TABLE["float32"])
