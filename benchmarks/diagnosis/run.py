"""Run the labelled fault scenarios, diagnose every run, and measure how often the diagnosis names the root cause.

For every scenario of ``scenarios.py``, every watch configuration and every seed: train (a run file), diagnose it
with :func:`gradsight.diagnose` exactly as shipped (default thresholds), and compare with the labels.

Candidate roots
    The findings with ``is_root`` true (``getattr(f, "is_root", True)``: before the diagnosis marks roots, every
    finding is a candidate) and severity warning or error, in the order the diagnosis returns them. The *first*
    candidate root is what a user reads first.

Verdicts
    Fault runs: ``ok`` (the first candidate root is the expected root or an acceptable alternate, and it names
    the expected layers/parameters), ``ok, names missing`` (right code, expected names not in its layers or
    evidence), ``late #k`` (an accepted code is the k-th candidate root), ``missed`` (no candidate root has an
    accepted code). Healthy runs: ``ok`` (no warning or error at all) or ``false alarm``. ``crashed``: training or
    the diagnosis raised; the error is in the JSON.

Figures (per configuration; the issue's targets apply to the default preset)
    root named first: % of fault runs whose first candidate root has an accepted code (target >= 95 %);
    healthy alarms: healthy runs with any warning or error (target 0);
    contradictory advice: runs whose findings' advice both raises and lowers the learning rate (target 0; see
    :func:`contradictory_advice`);
    per code: precision = of the runs whose first candidate root has this code, the share where it is accepted;
    recall = of the runs labelled with this code as expected root, the share whose first candidate root is
    accepted. A healthy run predicts its first warning/error code (or nothing).

The script reports the figures; it exits non-zero on unmet targets only with ``--strict``.

Usage::

    python benchmarks/diagnosis/run.py                    # all scenarios, 3 seeds, default preset and every=10
    python benchmarks/diagnosis/run.py --quick            # 1 seed
    python benchmarks/diagnosis/run.py --only keras --seeds 2 --json out.json
    python benchmarks/diagnosis/run.py --configs default --strict
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))
try:
    import gradsight
except ImportError:  # run from a checkout without an installed gradsight
    sys.path.insert(0, str(HERE.parent.parent / "src"))
    import gradsight

import scenarios as sc  # noqa: E402

#: The watch configurations: the default preset, and full summaries every 10 steps.
CONFIGS: dict[str, dict[str, Any]] = {
    "default": {"preset": "default"},
    "every10": {"preset": "default", "every": 10},
}
#: The issue's targets, judged on the default preset.
TARGETS = {"root_first_pct": 95.0, "healthy_alarms": 0, "contradictory": 0}
SERIOUS = ("warning", "error")

# ---------------------------------------------------------------------------------------------------------------
# Reading a diagnosis.


def is_root(finding: Any) -> bool:
    """Whether a finding is a root candidate: ``is_root`` where the diagnosis sets it, else every finding."""
    return bool(getattr(finding, "is_root", True))


def candidate_roots(findings: Sequence[Any]) -> list[Any]:
    """Warning/error findings that are roots (all of them before the diagnosis marks roots), in the given order."""
    return [f for f in findings if is_root(f) and f.severity in SERIOUS]


_LR = r"(?:learning[\s-]+rates?|\blrs?\b|step[\s-]+sizes?)"
_RAISE = r"(?:raise|raising|increase|increasing|higher|larger|bigger|boost)"
_LOWER = r"(?:lower|lowering|reduce|reducing|decrease|decreasing|smaller|cut|halve|halving|divide)"
_GAP = r"(?:(?!(?:and|or|but|then)\b)[\w.×/-]+\s+){0,3}?"  # up to 3 words, not across a conjunction
_NEGATED = re.compile(r"(?:\b(?:not|never|avoid|instead\s+of|rather\s+than)|n't)\W+(?:\w+\W+){0,2}$", re.I)


def _directions(text: str) -> set[str]:
    found = set()
    for direction, verb in (("raise", _RAISE), ("lower", _LOWER)):
        before = re.compile(rf"\b{verb}\b\s+{_GAP}{_LR}", re.I)  # "lower the learning rate", "a smaller lr"
        after = re.compile(rf"{_LR}\s+{_GAP}{verb}\b", re.I)  # "the learning rate 10x lower"
        for pattern in (before, after):
            for m in pattern.finditer(text):
                if not _NEGATED.search(text[max(0, m.start() - 40) : m.start()]):
                    found.add(direction)
    return found


def contradictory_advice(findings: Iterable[Any]) -> dict[str, list[str]] | None:
    """The advice that raises and the advice that lowers the learning rate, when a report holds both; else None.

    A report is contradictory when the ``advice`` of its findings (every finding, whatever its severity or
    ``is_root``: the user reads them all) contains at least one piece that raises the learning rate and one that
    lowers it. A piece of advice raises it when a raising word (raise, increase, higher, larger, bigger, boost)
    comes at most three words before "learning rate" / "lr" / "step size" ("Raise the learning rate", "use a
    higher learning rate") or at most three words after it ("the learning rate 10x higher"); the same with
    lowering words (lower, reduce, decrease, smaller, cut, halve, divide) for lowering. The words in between may
    not cross "and"/"or"/"but"/"then" ("lower the batch size and raise ..." does not lower the learning rate), and
    a match with a negation up to two words before it ("do not", "n't", "never", "avoid", "instead of", "rather
    than": "do not raise the learning rate") does not count. Advice that only asks to *sweep* or *tune* the
    learning rate raises and lowers nothing. Only advice is
    read, never the explanation or the message (which may describe either direction as a possible cause).
    """
    raising, lowering = [], []
    for f in findings:
        for advice in getattr(f, "advice", ()) or ():
            d = _directions(str(advice))
            if "raise" in d:
                raising.append(f"{f.code}: {advice}")
            if "lower" in d:
                lowering.append(f"{f.code}: {advice}")
    return {"raise": raising, "lower": lowering} if raising and lowering else None


def _tokens(name: str) -> list[str]:
    return [t for t in re.split(r"[./:]", str(name)) if t]


def name_matches(expected: str, found: str) -> bool:
    """Whether a found name designates the expected layer or parameter.

    Names are split on ``.``, ``/`` and ``:``; they match when one's parts are a contiguous run of the other's:
    ``conv2`` and ``conv2.bias`` match (the layer holds the parameter), ``fc1/bias`` matches Keras'
    ``mlp/fc1/bias``, ``fc1`` does not match ``fc10``.
    """
    a, b = _tokens(expected), _tokens(found)
    if not a or not b:
        return False
    short, long_ = (a, b) if len(a) <= len(b) else (b, a)
    return any(long_[i : i + len(short)] == short for i in range(len(long_) - len(short) + 1))


def _strings(obj: Any) -> Iterable[str]:
    if isinstance(obj, Mapping):
        for k, v in obj.items():
            yield str(k)
            yield from _strings(v)
    elif isinstance(obj, (list, tuple, set)):
        for v in obj:
            yield from _strings(v)
    elif isinstance(obj, str):
        yield obj


def names_located(finding: Any, expected: Sequence[str]) -> bool:
    """Whether every expected name is named in the finding's ``layers`` or anywhere in its ``evidence``."""
    found = [*finding.layers, *_strings(finding.evidence)]
    return all(any(name_matches(e, f) for f in found) for e in expected)


# ---------------------------------------------------------------------------------------------------------------
# Running.


@dataclass
class Row:
    """One run: a scenario under one watch configuration and seed, its diagnosis and its verdict."""

    scenario: str
    framework: str
    config: str
    seed: int
    expected_root: str | None
    acceptable_roots: list[str]
    expected_names: list[str]
    found_roots: list[str] = field(default_factory=list)
    findings: list[dict[str, Any]] = field(default_factory=list)
    verdict: str = ""
    root_first: bool | None = None  # fault runs: the first candidate root is accepted
    names_ok: bool | None = None  # fault runs whose root was found: the expected names are located
    root_rank: int | None = None  # 1-based position of the first accepted code among candidate roots
    alarms: list[str] = field(default_factory=list)  # healthy runs: warning/error codes
    contradictory: dict[str, list[str]] | None = None
    exhibit: str | None = None  # None: the run shows its fault (or learns); else what is missing
    train_s: float = 0.0
    diagnose_s: float = 0.0
    error: str | None = None
    path: str | None = None

    @property
    def healthy(self) -> bool:
        return self.expected_root is None


def judge(row: Row, findings: Sequence[Any], scenario: sc.Scenario) -> None:
    """Fill the row's diagnosis fields and verdict from the findings."""
    roots = candidate_roots(findings)
    row.found_roots = [f.code for f in roots]
    row.findings = [
        {
            "code": f.code,
            "severity": f.severity,
            "is_root": getattr(f, "is_root", None),
            "caused_by": list(getattr(f, "caused_by", ()) or ()),
            "layers": list(f.layers),
            "first_step": f.first_step,
            "message": f.message,
        }
        for f in findings
    ]
    row.contradictory = contradictory_advice(findings)
    if scenario.healthy:
        row.alarms = [f"{f.severity} {f.code}" for f in findings if f.severity in SERIOUS]
        row.verdict = "false alarm" if row.alarms else "ok"
        return
    accepted = scenario.accepted
    rank = next((i for i, f in enumerate(roots, start=1) if f.code in accepted), None)
    row.root_rank = rank
    row.root_first = rank == 1
    if rank is None:
        row.verdict = "missed"
        return
    row.names_ok = names_located(roots[rank - 1], scenario.expected_names)
    if rank > 1:
        row.verdict = f"late #{rank}"
    else:
        row.verdict = "ok" if row.names_ok else "ok, names missing"
        if roots[0].code != scenario.expected_root:
            row.verdict += f" (alt {roots[0].code})"


def run_one(scenario: sc.Scenario, config: str, seed: int, workdir: Path) -> Row:
    """Train, diagnose and judge one run; an exception becomes a ``crashed`` row, never a failure."""
    row = Row(
        scenario.name,
        scenario.framework,
        config,
        seed,
        scenario.expected_root,
        list(scenario.acceptable_roots),
        list(scenario.expected_names),
    )
    path = workdir / f"{scenario.name}-{config}-seed{seed}.db"
    row.path = str(path)
    t0 = time.perf_counter()
    try:
        scenario.run(seed, path, CONFIGS[config])
    except Exception as e:  # a crash is a result to report, not a reason to stop the benchmark
        row.error = f"training: {type(e).__name__}: {e}"
        row.verdict = "crashed"
        row.train_s = time.perf_counter() - t0
        return row
    row.train_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    try:
        with sc._quiet(), gradsight.load(path) as run:
            findings = gradsight.diagnose(run)
            row.diagnose_s = time.perf_counter() - t0
            row.exhibit = scenario.exhibit(run)
    except Exception as e:
        row.error = f"diagnosis: {type(e).__name__}: {e}\n{traceback.format_exc(limit=3)}"
        row.verdict = "crashed"
        return row
    judge(row, findings, scenario)
    return row


def select(only: Sequence[str] = ()) -> list[sc.Scenario]:
    """The scenarios whose name contains any of the substrings in ``only`` (all when empty)."""
    return [s for s in sc.SCENARIOS.values() if not only or any(o in s.name for o in only)]


def run_benchmark(
    scenarios: Sequence[sc.Scenario],
    *,
    seeds: int = 3,
    configs: Sequence[str] = tuple(CONFIGS),
    workdir: Path,
    progress: Callable[[Row], None] | None = None,
) -> list[Row]:
    """Every scenario x configuration x seed, in that order; run files go to ``workdir``."""
    rows = []
    for scenario in scenarios:
        for config in configs:
            for seed in range(seeds):
                row = run_one(scenario, config, seed, workdir)
                rows.append(row)
                if progress is not None:
                    progress(row)
    return rows


# ---------------------------------------------------------------------------------------------------------------
# Summaries.


def _pct(num: int, den: int) -> float | None:
    return round(100.0 * num / den, 1) if den else None


def _median(values: Sequence[float]) -> float | None:
    return round(statistics.median(values), 3) if values else None


def summarise(rows: Sequence[Row]) -> dict[str, Any]:
    """Per configuration: the headline figures, the per-code table, and whether the targets are met."""
    out: dict[str, Any] = {}
    for config in dict.fromkeys(r.config for r in rows):
        rs = [r for r in rows if r.config == config]
        done = [r for r in rs if r.verdict != "crashed"]
        faults = [r for r in done if not r.healthy]
        healthy = [r for r in done if r.healthy]
        first = [r for r in faults if r.root_first]
        named = [r for r in first if r.names_ok]
        alarms = [r for r in healthy if r.alarms]
        contra = [r for r in done if r.contradictory]
        s = {
            "runs": len(rs),
            "crashed": sum(r.verdict == "crashed" for r in rs),
            "fault_runs": len(faults),
            "root_first": len(first),
            "root_first_pct": _pct(len(first), len(faults)),
            "root_found_anywhere": sum(r.root_rank is not None for r in faults),
            "names_located": len(named),
            "names_located_pct": _pct(len(named), len(first)),
            "healthy_runs": len(healthy),
            "healthy_alarms": len(alarms),
            "contradictory": len(contra),
            "not_exhibited": sum(r.exhibit is not None for r in done),
            "median_root_rank": _median([r.root_rank for r in faults if r.root_rank is not None]),
            "median_train_s": _median([r.train_s for r in rs]),
            "median_diagnose_s": _median([r.diagnose_s for r in done]),
            "median_findings": _median([len(r.findings) for r in done]),
            "per_code": per_code(done),
        }
        s["targets_met"] = {
            "root_first_pct": (s["root_first_pct"] or 0.0) >= TARGETS["root_first_pct"],
            "healthy_alarms": s["healthy_alarms"] <= TARGETS["healthy_alarms"],
            "contradictory": s["contradictory"] <= TARGETS["contradictory"],
        }
        out[config] = s
    return out


def _accepted(r: Row) -> tuple[str, ...]:
    return (r.expected_root, *r.acceptable_roots) if r.expected_root else ()


def per_code(rows: Sequence[Row]) -> dict[str, dict[str, Any]]:
    """Precision and recall of the first candidate root, per code (see the module docstring)."""
    predicted = {id(r): (r.found_roots[0] if r.found_roots else None) for r in rows}
    codes = sorted({r.expected_root for r in rows if r.expected_root} | {c for c in predicted.values() if c})
    table = {}
    for code in codes:
        pred = [r for r in rows if predicted[id(r)] == code]
        right = [r for r in pred if code in _accepted(r)]
        labelled = [r for r in rows if r.expected_root == code]
        hit = [r for r in labelled if r.root_first]
        table[code] = {
            "predicted": len(pred),
            "correct": len(right),
            "precision_pct": _pct(len(right), len(pred)),
            "labelled": len(labelled),
            "recalled": len(hit),
            "recall_pct": _pct(len(hit), len(labelled)),
        }
    return table


def _fmt(v: Any) -> str:
    return "-" if v is None else f"{v:g}" if isinstance(v, float) else str(v)


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[_fmt(c) for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(header)]

    def line(r: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()

    return "\n".join([line(header), line(["-" * w for w in widths]), *(line(r) for r in cells)])


def format_report(rows: Sequence[Row], summary: Mapping[str, Any]) -> str:
    """The per-run table, the per-code tables and the summary, as printed."""
    runs = _table(
        ["scenario", "framework", "config", "seed", "expected root", "found roots (in order)", "verdict"],
        [
            [
                r.scenario,
                r.framework,
                r.config,
                r.seed,
                r.expected_root or "(healthy)",
                " > ".join(r.found_roots) or "-",
                r.verdict + ("" if r.exhibit is None else "  [fault not exhibited]"),
            ]
            for r in rows
        ],
    )
    parts = ["Runs", runs]
    for config, s in summary.items():
        parts += [
            "",
            f"Per code, first candidate root ({config})",
            _table(
                ["code", "predicted", "correct", "precision %", "labelled", "recalled", "recall %"],
                [
                    [c, v["predicted"], v["correct"], v["precision_pct"], v["labelled"], v["recalled"], v["recall_pct"]]
                    for c, v in s["per_code"].items()
                ],
            ),
        ]
    summary_rows = []
    for config, s in summary.items():
        met = s["targets_met"]
        summary_rows.append(
            [
                config,
                s["runs"],
                f"{s['root_first']}/{s['fault_runs']} = {_fmt(s['root_first_pct'])} %"
                + ("" if met["root_first_pct"] else " (target >= 95)"),
                f"{s['names_located']}/{s['root_first']}",
                f"{s['healthy_alarms']}/{s['healthy_runs']}" + ("" if met["healthy_alarms"] else " (target 0)"),
                s["contradictory"] if met["contradictory"] else f"{s['contradictory']} (target 0)",
                s["crashed"],
                s["not_exhibited"],
                s["median_train_s"],
                s["median_diagnose_s"],
            ]
        )
    parts += [
        "",
        "Summary",
        _table(
            [
                "config",
                "runs",
                "root named first",
                "names located",
                "healthy w/ warning+",
                "contradictory",
                "crashed",
                "not exhibited",
                "median train s",
                "median diagnose s",
            ],
            summary_rows,
        ),
    ]
    return "\n".join(parts)


def failing_scenarios(rows: Sequence[Row]) -> dict[str, list[str]]:
    """Per scenario and configuration, the runs whose verdict is not ``ok``: ``seed: verdict (found roots)``."""
    out: dict[str, list[str]] = {}
    for r in rows:
        if r.verdict == "ok" or r.verdict.startswith("ok (alt"):
            continue
        roots = " > ".join(r.found_roots) or "none"
        out.setdefault(f"{r.scenario} [{r.config}]", []).append(f"seed {r.seed}: {r.verdict} ({roots})")
    return out


def to_json(rows: Sequence[Row], summary: Mapping[str, Any], args: Mapping[str, Any]) -> dict[str, Any]:
    """The JSON document: metadata, targets, per-configuration summary and per-code tables, per-run rows."""
    versions = {"python": platform.python_version(), "gradsight": getattr(gradsight, "__version__", None)}
    for mod in ("torch", "tensorflow", "keras", "transformers", "sklearn", "numpy"):
        if mod in sys.modules:
            versions[mod] = getattr(sys.modules[mod], "__version__", None)
    return {
        "benchmark": "gradsight diagnosis fault benchmark",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "processor": platform.processor()},
        "versions": versions,
        "dataset": sc.DATASET,
        "args": dict(args),
        "configs": CONFIGS,
        "targets": {**TARGETS, "judged_on": "default"},
        "summary": summary,
        "failing": failing_scenarios(rows),
        "scenarios": {
            s.name: {
                "framework": s.framework,
                "description": s.description,
                "expected_root": s.expected_root,
                "acceptable_roots": list(s.acceptable_roots),
                "expected_names": list(s.expected_names),
                "why": s.why,
            }
            for s in (sc.SCENARIOS[name] for name in dict.fromkeys(r.scenario for r in rows))
        },
        "rows": [asdict(r) for r in rows],
    }


def targets_met(summary: Mapping[str, Any]) -> bool:
    """Whether the default preset meets every target (True when it was not run)."""
    s = summary.get("default")
    return s is None or all(s["targets_met"].values())


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; see the module docstring."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, default=3, help="seeds per scenario and configuration (default 3)")
    p.add_argument("--quick", action="store_true", help="one seed (same as --seeds 1)")
    p.add_argument("--only", action="append", default=[], help="run scenarios whose name contains this (repeatable)")
    p.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated, among {list(CONFIGS)}")
    p.add_argument("--json", type=Path, help="write the JSON results here")
    p.add_argument("--keep", type=Path, help="keep the run files in this directory (default: a temporary one)")
    p.add_argument("--strict", action="store_true", help="exit 1 when a default-preset target is not met")
    p.add_argument("--list", action="store_true", help="list the scenarios and their labels, then exit")
    args = p.parse_args(argv)
    scenarios = select(args.only)
    if args.list:
        for s in scenarios:
            alt = f" (or {', '.join(s.acceptable_roots)})" if s.acceptable_roots else ""
            print(f"{s.name:40s} {s.expected_root or '(healthy)'}{alt}  {', '.join(s.expected_names)}")
        return 0
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = [c for c in configs if c not in CONFIGS]
    if unknown or not scenarios:
        p.error(f"unknown configs {unknown}" if unknown else f"no scenario matches {args.only}")
    seeds = 1 if args.quick else args.seeds
    try:
        import torch

        torch.set_num_threads(1)
    except ImportError:  # pragma: no cover
        pass
    workdir = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="gradsight-faultbench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    total = len(scenarios) * len(configs) * seeds
    done = [0]

    def progress(r: Row) -> None:
        done[0] += 1
        roots = " > ".join(r.found_roots) or "-"
        print(
            f"[{done[0]}/{total}] {r.scenario} {r.config} seed {r.seed}: {r.verdict} ({roots}) {r.train_s:.1f}s",
            file=sys.stderr,
            flush=True,
        )

    t0 = time.perf_counter()
    try:
        rows = run_benchmark(scenarios, seeds=seeds, configs=configs, workdir=workdir, progress=progress)
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    summary = summarise(rows)
    print(f"dataset: {sc.DATASET}; {len(scenarios)} scenarios x {len(configs)} configs x {seeds} seed(s)")
    print(format_report(rows, summary))
    print(f"\nwall time {time.perf_counter() - t0:.0f} s")
    failing = failing_scenarios(rows)
    if failing:
        print("\nNot ok (scenario [config]: seed: verdict (found roots))")
        for key, items in failing.items():
            print(f"  {key}: " + "; ".join(items))
    if args.json:
        doc = to_json(rows, summary, {**vars(args), "json": str(args.json), "keep": str(args.keep), "seeds": seeds})
        args.json.write_text(json.dumps(doc, indent=1, default=str))
        print(f"JSON written to {args.json}")
    if args.strict and not targets_met(summary):
        print("targets not met (--strict)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
