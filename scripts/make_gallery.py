"""Generate the README gallery from real runs of fault-zoo scenarios (never drawn by hand).

Usage::

    MPLBACKEND=agg python scripts/make_gallery.py [--out docs/img] [--framework torch] [--seed 0]

Trains ``deep-sigmoid`` (vanishing gradients) and ``high-lr`` (exploding gradients, then NaN) under
``gradsight.watch``, and writes:

* ``overview-deep-sigmoid.png`` — :func:`gradsight.show.plot_overview`
* ``depth-deep-sigmoid.png`` — :func:`gradsight.show.plot_depth_profile`
* ``histograms-deep-sigmoid-fc1.png`` — :func:`gradsight.show.plot_histograms` of the first layer's gradients
* ``overview-high-lr.png`` — :func:`gradsight.show.plot_overview`
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("MPLBACKEND", "agg")


def main(argv: list[str] | None = None) -> int:
    """Train the scenarios and write the PNGs; print each path."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "docs" / "img"))
    parser.add_argument("--framework", choices=("torch", "keras"), default="torch")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    import matplotlib.pyplot as plt

    from gradsight import zoo
    from gradsight.show import plot_depth_profile, plot_histograms, plot_overview

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    with tempfile.TemporaryDirectory(prefix="gradsight-gallery-") as tmp:
        runs = {}
        for name in ("deep-sigmoid", "high-lr"):
            result = zoo.run_scenario(name, framework=args.framework, seed=args.seed, path=Path(tmp) / f"{name}.db")
            runs[name] = result
        ds = runs["deep-sigmoid"]
        figures = {
            "overview-deep-sigmoid.png": plot_overview(ds.path, findings=ds.findings),
            "depth-deep-sigmoid.png": plot_depth_profile(ds.path),
            "histograms-deep-sigmoid-fc1.png": plot_histograms(ds.path, "fc1", kind="grad"),
            "overview-high-lr.png": plot_overview(runs["high-lr"].path, findings=runs["high-lr"].findings),
        }
        for filename, fig in figures.items():
            target = out / filename
            # no timestamps in the PNG metadata, so reruns with the same seed give identical files
            fig.savefig(target, dpi=80, metadata={"Software": None})
            plt.close(fig)
            written.append(target)
    for target in written:
        print(target)
    return 0


if __name__ == "__main__":
    sys.exit(main())
