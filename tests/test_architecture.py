"""The shape of the house, checked on the source: no import cycles, framework-free rooms, long functions justified.

Everything here reads ``src/gradsight`` with :mod:`ast`; nothing is imported, so the checks are fast and cannot be
fooled by import order or lazy imports.

* **No import cycles.** The graph holds every gradsight-internal import: module level, inside functions and under
  ``if TYPE_CHECKING:`` (a cycle hidden in a function is still two modules that cannot be understood apart).
  ``from pkg import name`` is an edge to ``pkg.name`` when that is a module, else to ``pkg``; relative imports
  are resolved; ``importlib.import_module("gradsight.x")`` with a literal counts too.
* **Framework-free rooms.** :data:`FRAMEWORK_FREE` (explain, diagnose, show, export, summary, store) never import
  a deep-learning framework or an adapter under ``gradsight.frameworks``, and never name one in code: no string
  naming an adapter module (``"_torch_explain"``, ``"gradsight.frameworks.keras._watch"``), no framework module
  name handed to a module lookup (``find_spec("torch")``, ``sys.modules``, ``.startswith("keras")``...), no
  reading of ``__module__`` (telling frameworks apart is :mod:`gradsight._frameworks`' job). Docstrings,
  comments and messages may talk about frameworks; framework ids such as ``"torch"`` are plain data.
* **Long functions say why.** A function longer than :data:`MAX_FUNCTION_LINES` lines needs a comment directly
  above its ``def`` (or its first decorator) starting with ``# long function:`` and giving a reason.

:data:`KNOWN_OFFENDERS` lists what is being fixed right now; it only ever shrinks, and should be empty.
"""

from __future__ import annotations

import ast
import itertools
import re
from collections.abc import Iterator
from functools import cache
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"

#: Rooms that must not know any framework: they read numpy, the run store and plain data only.
FRAMEWORK_FREE = (
    "gradsight.explain",
    "gradsight.diagnose",
    "gradsight.show",
    "gradsight.export",
    "gradsight.summary",
    "gradsight.store",
)
#: Top-level packages of deep-learning frameworks and their trainer libraries.
FRAMEWORK_ROOTS = frozenset(
    {"torch", "tensorflow", "keras", "tf_keras", "jax", "flax", "lightning", "pytorch_lightning", "transformers"}
)
MAX_FUNCTION_LINES = 80
LONG_FUNCTION_TAG = "# long function:"

#: What is known to break a rule while its owner fixes it: ``(kind, what, reason)``.
#:
#: * ``("cycle", "a -> b", reason)``: the import edge from module ``a`` to module ``b`` that closes a cycle; the
#:   graph without the listed edges must be acyclic.
#: * ``("framework", "module", reason)``: a framework-free module that imports or names a framework.
#: * ``("long-function", "module:Qual.name", reason)``: a function over the limit without its comment.
KNOWN_OFFENDERS: frozenset[tuple[str, str, str]] = frozenset()


# ---- reading the source ----------------------------------------------------------------------------------------
def _module_name(path: Path, src: Path) -> str:
    parts = list(path.relative_to(src).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


@cache
def _modules(src: Path = SRC) -> dict[str, Path]:
    """Every module of the ``gradsight`` package under ``src``, by dotted name."""
    return {_module_name(p, src): p for p in sorted((src / "gradsight").rglob("*.py"))}


@cache
def _tree(module: str, src: Path = SRC) -> ast.Module:
    path = _modules(src)[module]
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def _is_package(module: str, src: Path) -> bool:
    return _modules(src)[module].name == "__init__.py"


def _owning_module(dotted: str, src: Path) -> str | None:
    """The longest prefix of ``dotted`` that is one of our modules (``gradsight.store.Run`` -> ``gradsight.store``)."""
    parts = dotted.split(".")
    for n in range(len(parts), 0, -1):
        candidate = ".".join(parts[:n])
        if candidate in _modules(src):
            return candidate
    return None


def _resolve_from(module: str, node: ast.ImportFrom, src: Path) -> str:
    """The absolute module a ``from ... import`` reads from, relative levels resolved."""
    if node.level == 0:
        return node.module or ""
    package = module if _is_package(module, src) else module.rpartition(".")[0]
    base = package.split(".")
    if node.level > 1:
        base = base[: len(base) - (node.level - 1)]
    return ".".join([*base, node.module] if node.module else base)


def _imported_names(module: str, src: Path = SRC) -> Iterator[tuple[str, int]]:
    """Every absolute module name ``module`` imports, anywhere in its body, with the line of the import."""
    for node in ast.walk(_tree(module, src)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            base = _resolve_from(module, node, src)
            yield base, node.lineno
            for alias in node.names:
                yield f"{base}.{alias.name}", node.lineno  # a submodule, when it is one
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "import_module"
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            yield node.args[0].value, node.lineno


@cache
def _graph(src: Path = SRC) -> dict[str, dict[str, int]]:
    """``module -> {imported gradsight module: line}`` for every internal import."""
    graph: dict[str, dict[str, int]] = {}
    for module in _modules(src):
        edges: dict[str, int] = {}
        for name, line in _imported_names(module, src):
            if name == "gradsight" or name.startswith("gradsight."):
                target = _owning_module(name, src)
                if target is not None and target != module:
                    edges.setdefault(target, line)
        graph[module] = edges
    return graph


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a path ``[a, b, ..., a]``, or ``None`` (iterative DFS, white/grey/black)."""
    state: dict[str, int] = {}
    for start in sorted(graph):
        if state.get(start):
            continue
        stack: list[tuple[str, Iterator[str]]] = [(start, iter(sorted(graph[start])))]
        path = [start]
        state[start] = 1
        while stack:
            node, children = stack[-1]
            child = next(children, None)
            if child is None:
                state[node] = 2
                stack.pop()
                path.pop()
            elif state.get(child) == 1:
                return [*path[path.index(child) :], child]
            elif not state.get(child):
                state[child] = 1
                path.append(child)
                stack.append((child, iter(sorted(graph.get(child, ())))))
    return None


def _known(kind: str) -> dict[str, str]:
    return {what: reason for k, what, reason in KNOWN_OFFENDERS if k == kind}


# ---- 1. no import cycles ---------------------------------------------------------------------------------------
def _fake_package(root: Path, files: dict[str, str]) -> Path:
    """A ``gradsight`` package under ``root`` with the given ``{relative path: source}`` files."""
    for rel, code in files.items():
        path = root / "gradsight" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(code, encoding="utf-8")
    return root


def test_the_graph_sees_every_kind_of_import(tmp_path):
    # The walker itself, on a package made for it: relative, function-local, TYPE_CHECKING, `from pkg import
    # module`, import_module with a literal.
    src = _fake_package(
        tmp_path,
        {
            "__init__.py": "from .sub import thing\nimport importlib\nimportlib.import_module('gradsight.lazy')\n",
            "sub/__init__.py": "from . import mod\nfrom .mod import name\n",
            "sub/mod.py": "def f():\n    from ..store import Run\n",
            "store.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import gradsight.lazy\n",
            "lazy.py": "from gradsight.sub.mod import f\n",
        },
    )
    assert _graph(src) == {
        "gradsight": {"gradsight.sub": 1, "gradsight.lazy": 3},
        "gradsight.sub": {"gradsight.sub.mod": 1},
        "gradsight.sub.mod": {"gradsight.store": 2},
        "gradsight.store": {"gradsight.lazy": 3},
        "gradsight.lazy": {"gradsight.sub.mod": 1},
    }
    graph = {m: set(e) for m, e in _graph(src).items()}
    assert _find_cycle(graph) == ["gradsight.lazy", "gradsight.sub.mod", "gradsight.store", "gradsight.lazy"]
    graph["gradsight.store"].clear()
    assert _find_cycle(graph) is None


def test_no_import_cycles():
    known = _known("cycle")
    graph = {m: set(edges) for m, edges in _graph().items()}
    for edge in known:
        a, _, b = edge.partition(" -> ")
        graph.get(a, set()).discard(b)
    cycles = []
    while (cycle := _find_cycle(graph)) is not None:  # every cycle, each shown by the edge that closes it
        cycles.append(cycle)
        graph[cycle[-2]].discard(cycle[-1])
    if cycles:
        lines = _graph()
        text = "\n\n".join(
            "\n".join(f"  {a} -> {b}  (line {lines[a][b]})" for a, b in itertools.pairwise(cycle)) for cycle in cycles
        )
        pytest.fail(
            f"{len(cycles)} import cycle(s) in src/gradsight (every import counts: module level, in functions, under "
            f"TYPE_CHECKING):\n{text}\nBreak each by moving what both sides need into a module that neither of "
            "them imports back (e.g. plain data types into their own module), or by importing the public name "
            "from the module that defines it rather than from a package that re-exports it."
        )


# ---- 2. framework-free rooms -----------------------------------------------------------------------------------
def _in_framework_free_room(module: str) -> bool:
    return any(module == room or module.startswith(room + ".") for room in FRAMEWORK_FREE)


def _docstring_nodes(tree: ast.Module) -> set[int]:
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                out.add(id(body[0].value))
    return out


#: A string naming an adapter module: ``"_torch_explain"``, ``"gradsight.frameworks.keras._watch"``.
ADAPTER_MODULE = re.compile(r"(?:^|\.)_(?:torch|keras)_\w+$|(?:^|\.)frameworks\.\w+")
#: A string naming a framework module: ``"torch"``, ``"torch.nn"``, ``"tensorflow.keras"``.
FRAMEWORK_MODULE = re.compile(rf"^(?:{'|'.join(sorted(FRAMEWORK_ROOTS))})(?:\.\w+)*\.?$")
#: Calls whose string arguments are module names.
MODULE_LOOKUPS = frozenset({"find_spec", "import_module", "__import__", "startswith", "endswith"})


def _strings(node: ast.AST) -> Iterator[ast.Constant]:
    for sub in ast.walk(node):
        if isinstance(sub, ast.Constant) and isinstance(sub.value, str):
            yield sub


def _framework_mentions(module: str, src: Path = SRC) -> list[str]:
    """What in ``module`` imports or names a framework or an adapter module, one line each.

    Four things count: an import of a framework or of ``gradsight.frameworks``; a string that is an adapter's
    module name; a framework's module name handed to a module lookup (``find_spec``, ``import_module``,
    ``sys.modules``, ``str.startswith``...); and reading ``__module__`` (telling frameworks apart by module names
    is :func:`gradsight._frameworks.framework_of`'s job). Docstrings, comments and messages are free to talk.
    """
    out = set()
    for name, line in _imported_names(module, src):
        if name.split(".")[0] in FRAMEWORK_ROOTS or name.startswith("gradsight.frameworks"):
            out.add((line, f"imports {name}"))
    tree = _tree(module, src)
    docstrings = _docstring_nodes(tree)
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            if ADAPTER_MODULE.search(node.value):
                out.add((node.lineno, f"names the adapter module {node.value!r}"))
            elif node.value == "__module__":
                out.add((node.lineno, "reads __module__ (use gradsight._frameworks.framework_of)"))
        elif isinstance(node, ast.Attribute) and node.attr == "__module__":
            out.add((node.lineno, "reads __module__ (use gradsight._frameworks.framework_of)"))
        elif isinstance(node, ast.Call):
            func = node.func
            called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            lookup = called in MODULE_LOOKUPS or (called == "get" and "sys.modules" in ast.unparse(func))
            for const in _strings(node) if lookup else ():
                if FRAMEWORK_MODULE.match(const.value):
                    out.add((const.lineno, f"looks up the framework module {const.value!r} ({called})"))
        elif isinstance(node, ast.Subscript) and "sys.modules" in ast.unparse(node.value):
            for const in _strings(node.slice):
                if FRAMEWORK_MODULE.match(const.value):
                    out.add((const.lineno, f"looks up the framework module {const.value!r} (sys.modules)"))
    return [f"line {line}: {what}" for line, what in sorted(out)]


def test_framework_free_rooms_neither_import_nor_name_a_framework():
    known = _known("framework")
    bad = {}
    for module in _modules():
        if _in_framework_free_room(module) and module not in known:
            mentions = _framework_mentions(module)
            if mentions:
                bad[module] = mentions
    assert not bad, (
        "framework-free modules (explain, diagnose, show, export, summary, store) import or name a framework or an "
        "adapter; framework code belongs in gradsight/frameworks/, reached through the registry in "
        "_frameworks.py:\n" + "\n".join(f"{m}:\n    " + "\n    ".join(v) for m, v in sorted(bad.items()))
    )


def test_the_framework_check_catches_what_it_should(tmp_path):
    code = (
        '"""Docstrings may say torch, gradsight.frameworks.torch._watch and tensorflow."""\n'
        "import importlib.util, sys\n"
        "from ..frameworks.torch import _watch\n"
        "def f(x):\n"
        "    import torch.nn\n"
        "    if importlib.util.find_spec('tensorflow'): pass\n"
        "    m = sys.modules.get('keras')\n"
        "    adapter = 'gradsight.frameworks.keras._explain'\n"
        "    fw = getattr(x, '__module__', '')\n"
        "    return type(x).__module__.startswith('jax')\n"
        "MESSAGE = 'expected a torch.nn.Module; see the _keras_logits note'  # words in messages are fine\n"
        "FRAMEWORKS = ('torch', 'keras')  # framework *ids* are data\n"
    )
    src = _fake_package(tmp_path, {"__init__.py": "", "explain/__init__.py": "", "explain/_x.py": code})
    assert _framework_mentions("gradsight.explain._x", src) == [
        "line 3: imports gradsight.frameworks.torch",
        "line 3: imports gradsight.frameworks.torch._watch",
        "line 5: imports torch.nn",
        "line 6: looks up the framework module 'tensorflow' (find_spec)",
        "line 7: looks up the framework module 'keras' (get)",
        "line 8: names the adapter module 'gradsight.frameworks.keras._explain'",
        "line 9: reads __module__ (use gradsight._frameworks.framework_of)",
        "line 10: looks up the framework module 'jax' (startswith)",
        "line 10: reads __module__ (use gradsight._frameworks.framework_of)",
    ]


# ---- 3. long functions say why ---------------------------------------------------------------------------------
def _functions(node: ast.AST, prefix: str = "") -> Iterator[tuple[str, ast.FunctionDef | ast.AsyncFunctionDef]]:
    for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield prefix + child.name, child
            yield from _functions(child, f"{prefix}{child.name}.")
        elif isinstance(child, ast.ClassDef):
            yield from _functions(child, f"{prefix}{child.name}.")
        else:
            yield from _functions(child, prefix)


def _has_reason(lines: list[str], fn: ast.FunctionDef | ast.AsyncFunctionDef) -> bool:
    """Whether the comment block directly above the def (or its first decorator) holds a ``# long function:``."""
    first = min([fn.lineno, *(d.lineno for d in fn.decorator_list)])
    i = first - 2  # 0-based index of the line above
    while i >= 0 and lines[i].strip().startswith("#"):
        text = lines[i].strip()
        if text.startswith(LONG_FUNCTION_TAG) and len(text[len(LONG_FUNCTION_TAG) :].strip()) >= 10:
            return True
        i -= 1
    return False


def _long_functions(src: Path = SRC) -> dict[str, int]:
    """``module:Qual.name -> lines`` for every function over the limit without its ``# long function:`` reason."""
    out = {}
    for module, path in _modules(src).items():
        lines = path.read_text(encoding="utf-8").splitlines()
        for qualname, fn in _functions(_tree(module, src)):
            length = (fn.end_lineno or fn.lineno) - fn.lineno + 1
            if length > MAX_FUNCTION_LINES and not _has_reason(lines, fn):
                out[f"{module}:{qualname}"] = length
    return out


def test_long_functions_give_a_reason():
    known = _known("long-function")
    bad = {name: n for name, n in _long_functions().items() if name not in known}
    assert not bad, (
        f"functions longer than {MAX_FUNCTION_LINES} lines without a '{LONG_FUNCTION_TAG} <reason>' comment "
        "directly above the def: split them, or say why they read best whole:\n"
        + "\n".join(f"  {name}: {n} lines" for name, n in sorted(bad.items()))
    )


def test_the_long_function_check_reads_the_comment_above(tmp_path):
    def body(n: int, indent: str = "    ") -> str:
        return "".join(f"{indent}x = {i}\n" for i in range(n))

    n = MAX_FUNCTION_LINES  # with its def line: one over the limit
    code = (
        f"def bare():\n{body(n)}\n"
        f"# long function: one table of cases, clearest read top to bottom\n@staticmethod\ndef tagged():\n{body(n)}\n"
        f"# long function:\ndef no_reason():\n{body(n)}\n"
        "class C:\n    # section\n    # long function: the same, as a method, with another comment above\n"
        f"    def method(self):\n{body(n, '        ')}\n"
        f"def at_the_limit():\n{body(n - 1)}\n"
    )
    src = _fake_package(tmp_path, {"__init__.py": code})
    assert _long_functions(src) == {"gradsight:bare": n + 1, "gradsight:no_reason": n + 1}


def test_known_offenders_are_well_formed():
    # Entries may go stale while their owners fix them (the list is then emptied); they must stay readable.
    for kind, what, reason in KNOWN_OFFENDERS:
        assert kind in {"cycle", "framework", "long-function"}, (kind, what)
        assert reason.strip(), f"{kind} {what}: give a reason"
        if kind == "cycle":
            assert " -> " in what, f"a cycle entry names one import edge, 'a -> b', got {what!r}"
        if kind == "long-function":
            assert ":" in what, f"a long-function entry is 'module:Qual.name', got {what!r}"
