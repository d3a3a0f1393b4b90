"""The documentation site: every public name is documented, the API reference names it, the site builds strictly
and its internal links resolve, and the how-to examples that the build does not run still run.

The build test runs ``mkdocs build --strict`` on the whole site (tutorials included: their code runs during the
build), so it is slow; all of this module stays on one pytest-xdist worker.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import inspect
import os
import re
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest

import gradsight

pytestmark = pytest.mark.xdist_group("docs")

ROOT = Path(__file__).resolve().parents[2]
API_PAGE = ROOT / "docs" / "reference" / "api.md"
HOWTO = ROOT / "docs" / "howto"
BUILD_TIMEOUT_S = 600

#: The public surface besides ``gradsight`` itself: the submodules users import from (README, API reference), and
#: the classes of the objects ``gradsight.watch`` returns (users call their methods). Each with the modules it
#: needs; a surface whose modules are missing is skipped.
SURFACES: dict[str, tuple[str, ...]] = {
    "gradsight": (),
    "gradsight.zoo": (),
    "gradsight.export": (),
    "gradsight.diagnose": (),
    "gradsight.explain": (),
    "gradsight.show": (),
    "gradsight.integrations": ("torch", "lightning", "transformers"),
    "gradsight.frameworks.torch._watch:Watch": ("torch",),
    "gradsight.frameworks.torch._ddp:DDPWatch": ("torch",),
    "gradsight.frameworks.torch._fsdp:FSDPWatch": ("torch",),
    "gradsight.frameworks.keras._watch:KerasWatch": ("tensorflow", "keras"),
}
#: Public names of ``gradsight`` that need a framework when resolved (they are loaded on first access).
NEEDS = {
    "GradsightKerasCallback": ("tensorflow", "keras"),
    "KerasDiagnosisCallback": ("tensorflow", "keras"),
    "watch_tape": ("tensorflow", "keras"),
}


def _missing(modules: tuple[str, ...]) -> list[str]:
    return [m for m in modules if importlib.util.find_spec(m) is None]


# ---- docstrings ---------------------------------------------------------------------------------------------------
def _own_doc(cls: type) -> str | None:
    """``cls``'s own docstring, not one inherited, nor the signature a dataclass writes in place of a missing one."""
    doc = cls.__dict__.get("__doc__")
    if not doc or not doc.strip():
        return None
    if doc.startswith(f"{cls.__name__}(") and doc.rstrip().endswith(")"):  # dataclasses' generated __doc__
        return None
    return doc


def _member_doc_owner(cls: type, name: str) -> type | None:
    """The first class of ``cls``'s MRO that defines ``name`` with a docstring (what ``inspect.getdoc`` reads)."""
    for klass in cls.__mro__:
        if name in vars(klass):
            attr = vars(klass)[name]
            func = attr.__func__ if isinstance(attr, (staticmethod, classmethod)) else attr
            if getattr(func, "__doc__", None) and func.__doc__.strip():
                return klass
    return None


def _undocumented_members(cls: type) -> list[str]:
    """Public methods and properties of a gradsight class whose only docstring is none, or a builtin's."""
    out = []
    for name in sorted(dir(cls)):
        if name.startswith("_"):
            continue
        definer = next((k for k in cls.__mro__ if name in vars(k)), None)
        if definer is None or not definer.__module__.startswith("gradsight"):
            continue  # inherited from a third-party base (a keras Callback, a tuple): not ours to document
        attr = vars(definer)[name]
        if not (inspect.isfunction(attr) or isinstance(attr, (property, staticmethod, classmethod))):
            continue  # data: dataclass fields, constants (documented in the class's Attributes section)
        owner = _member_doc_owner(cls, name)
        if owner is None or owner.__module__ == "builtins" or inspect.getdoc(getattr(cls, name, None)) is None:
            out.append(f"{cls.__module__}.{cls.__qualname__}.{name}")
    return out


def _data_docstring(module_name: str, name: str) -> bool:
    """Whether module ``module_name`` documents its attribute ``name``: a string right after the assignment, or
    ``#:`` comments right above it (the two forms documentation tools read)."""
    spec = importlib.util.find_spec(module_name)
    assert spec is not None and spec.origin, module_name
    source = Path(spec.origin).read_text(encoding="utf-8")
    lines = source.splitlines()
    body = ast.parse(source).body
    for i, node in enumerate(body):
        targets = (
            node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
        )
        if not any(isinstance(t, ast.Name) and t.id == name for t in targets):
            continue
        after = body[i + 1] if i + 1 < len(body) else None
        if isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str):
            return True
        return node.lineno >= 2 and lines[node.lineno - 2].lstrip().startswith("#:")
    return False


def _defining_module(module_name: str, name: str) -> str:
    """The module that assigns ``module_name.name``: followed through ``from .x import name`` re-exports."""
    spec = importlib.util.find_spec(module_name)
    assert spec is not None and spec.origin, module_name
    package = module_name if spec.submodule_search_locations else module_name.rpartition(".")[0]
    for node in ast.parse(Path(spec.origin).read_text(encoding="utf-8")).body:
        if isinstance(node, ast.ImportFrom) and any(alias.name == name for alias in node.names):
            source = importlib.util.resolve_name("." * node.level + (node.module or ""), package)
            return _defining_module(source, name)
    return module_name


def _surface_objects(surface: str) -> dict[str, object]:
    """Qualified name -> object, for every public name of a surface (a module's ``__all__``, or one class)."""
    module_name, _, cls_name = surface.partition(":")
    module = importlib.import_module(module_name)
    if cls_name:
        return {f"{module_name}.{cls_name}": getattr(module, cls_name)}
    names = [n for n in module.__all__ if not _missing(NEEDS.get(n, ()))] if surface == "gradsight" else module.__all__
    return {f"{module_name}.{n}": getattr(module, n) for n in names}


@pytest.mark.parametrize("surface", list(SURFACES))
def test_every_public_name_and_member_has_a_docstring(surface):
    missing_modules = _missing(SURFACES[surface])
    if missing_modules:
        pytest.skip(f"{surface} needs {', '.join(missing_modules)}, which is not installed")
    undocumented = []
    for qualname, obj in _surface_objects(surface).items():
        module_name, _, name = qualname.rpartition(".")
        if inspect.ismodule(obj):
            if not (obj.__doc__ or "").strip():
                undocumented.append(qualname)
        elif inspect.isclass(obj):
            if _own_doc(obj) is None:
                undocumented.append(qualname)
            if obj.__module__.startswith("gradsight"):
                undocumented += _undocumented_members(obj)
        elif callable(obj):
            if not (getattr(obj, "__doc__", None) or "").strip():
                undocumented.append(qualname)
        else:  # data (a version string, a table of codes): documented where it is assigned
            if not _data_docstring(_defining_module(module_name, name), name):
                undocumented.append(qualname)
    assert not undocumented, "public names without a docstring:\n  " + "\n  ".join(sorted(set(undocumented)))


def test_the_docstring_check_catches_what_it_should():
    class Plain(Exception):
        pass

    class Documented:
        """Documented."""

        def method(self):
            return 1

        @property
        def prop(self):
            return 2

        def documented(self):
            """Documented."""

    for cls in (Plain, Documented):
        cls.__module__ = "gradsight.fake"
    assert _own_doc(Plain) is None  # Exception's docstring does not count
    assert _own_doc(Documented) == "Documented."
    assert _undocumented_members(Documented) == [
        "gradsight.fake.test_the_docstring_check_catches_what_it_should.<locals>.Documented.method",
        "gradsight.fake.test_the_docstring_check_catches_what_it_should.<locals>.Documented.prop",
    ]
    assert _data_docstring("gradsight._version", "__version__")
    assert not _data_docstring("gradsight._frameworks", "no_such_name")


# ---- the API reference --------------------------------------------------------------------------------------------
def test_the_api_reference_renders_every_public_name():
    text = API_PAGE.read_text(encoding="utf-8")
    rendered = set(re.findall(r"^::: (\S+)$", text, flags=re.MULTILINE))
    headings = set(re.findall(r'^\s+heading: "([^"]+)"$', text, flags=re.MULTILINE))
    missing = [n for n in [*gradsight.__all__, "integrations", "export"] if f"gradsight.{n}" not in rendered | headings]
    assert not missing, (
        f"docs/reference/api.md has no '::: gradsight.NAME' block (or a block with heading \"gradsight.NAME\") for "
        f"{missing}; add one per public name"
    )


# ---- the built site -----------------------------------------------------------------------------------------------
class _Links(HTMLParser):
    """The ids a page defines and the relative links (href, src) it contains."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.ids: set[str] = set()
        self.links: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        for key, value in attrs:
            if value is None:
                continue
            if key == "id" or (key == "name" and tag == "a"):
                self.ids.add(value)
            elif key in ("href", "src"):
                self.links.append(value)


def _parse(page: Path) -> _Links:
    parser = _Links()
    parser.feed(page.read_text(encoding="utf-8"))
    return parser


def broken_links(site: Path) -> list[str]:
    """Every relative ``href``/``src`` of ``site``'s HTML pages whose file, or ``#anchor`` in it, does not exist."""
    pages = {p.resolve(): _parse(p) for p in sorted(site.rglob("*.html"))}
    broken = []
    for page, parsed in pages.items():
        for link in parsed.links:
            parts = urlsplit(link)
            if parts.scheme or parts.netloc or link.startswith("//") or not link or link == "#":
                continue  # external (none should be), or no target
            path = unquote(parts.path)
            target = (site / path.lstrip("/")) if path.startswith("/") else (page.parent / path) if path else page
            target = target.resolve()
            if target.is_dir():
                target = target / "index.html"
            where = f"{page.relative_to(site.resolve())}: {link}"
            if not target.is_file():
                broken.append(f"{where} (no file {target})")
            elif parts.fragment and target.suffix == ".html":
                ids = pages[target].ids if target in pages else _parse(target).ids
                if unquote(parts.fragment) not in ids:
                    broken.append(f"{where} (no id {parts.fragment!r} in {target.name})")
    return broken


def test_the_link_checker_finds_broken_links(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "index.html").write_text('<h2 id="here">x</h2><a href="#here">ok</a><a href="#gone">bad</a>')
    (tmp_path / "index.html").write_text(
        '<a href="a/">ok</a><a href="a/#here">ok</a><a href="a/#nope">bad</a><img src="img/x.png">'
        '<a href="https://example.org/">external</a><a href="missing/">bad</a>'
    )
    found = broken_links(tmp_path)
    assert len(found) == 4, found
    assert any("#gone" in b for b in found) and any("a/#nope" in b for b in found)
    assert any("img/x.png" in b for b in found) and any("missing/" in b for b in found)


@pytest.fixture(scope="module")
def built_site(tmp_path_factory):
    """The whole site built with ``mkdocs build --strict`` into a temporary directory: (returncode, log, site)."""
    for module in ("mkdocs", "material", "mkdocstrings", "mkdocstrings_handlers.python", "markdown_exec"):
        if _missing((module.split(".")[0],)) or importlib.util.find_spec(module) is None:
            pytest.skip(f"the docs build needs {module} (pip install -e '.[docs]'), which is not installed")
    site = tmp_path_factory.mktemp("site")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1", "MPLBACKEND": "agg"}
    cmd = [sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(ROOT / "mkdocs.yml"), "-d", str(site)]
    try:
        done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"mkdocs build --strict took longer than {BUILD_TIMEOUT_S} s:\n{(exc.stderr or '')[-3000:]}")
    return done.returncode, done.stdout + done.stderr, site


def test_the_site_builds_strictly(built_site):
    returncode, log, _ = built_site
    lines = log.splitlines()
    first = next((i for i, line in enumerate(lines) if line.startswith(("WARNING", "ERROR"))), max(len(lines) - 40, 0))
    # from the first warning on: a failing code block's traceback follows its WARNING line
    assert returncode == 0, "mkdocs build --strict failed:\n" + "\n".join(lines[first : first + 120])


def test_every_internal_link_and_anchor_of_the_site_resolves(built_site):
    returncode, _, site = built_site
    if returncode != 0:
        pytest.skip("the site did not build (see test_the_site_builds_strictly)")
    assert (site / "index.html").is_file() and (site / "reference" / "api" / "index.html").is_file()
    broken = broken_links(site)
    assert not broken, f"{len(broken)} broken internal link(s):\n  " + "\n  ".join(broken[:50])


def test_the_built_api_reference_shows_every_public_name(built_site):
    returncode, _, site = built_site
    if returncode != 0:
        pytest.skip("the site did not build (see test_the_site_builds_strictly)")
    page = (site / "reference" / "api" / "index.html").read_text(encoding="utf-8")
    headings = re.findall(r'<h[2-6] id="([^"]+)" class="doc doc-heading">(.*?)</h[2-6]>', page, flags=re.DOTALL)
    text = {re.sub(r"<[^>]+>|&para;", " ", body).split()[0] for _, body in headings if body.strip()}
    missing = [n for n in gradsight.__all__ if f"gradsight.{n}" not in text]
    assert not missing, f"the built API reference has no heading for {missing}"


# ---- how-to examples the build does not run ----------------------------------------------------------------------
def _titled_examples() -> list[tuple[str, str]]:
    """``(title, code)`` of every ```` ```python title="NAME.py" ```` block in the how-to guides."""
    found = []
    for page in sorted(HOWTO.glob("*.md")):
        text = page.read_text(encoding="utf-8")
        found += re.findall(r'^```python title="([\w.-]+\.py)"\n(.*?)^```$', text, flags=re.MULTILINE | re.DOTALL)
    return found


EXAMPLES = _titled_examples()


def test_the_howto_examples_are_found():
    assert {title for title, _ in EXAMPLES} >= {"lightning_example.py", "hf_trainer_example.py"}


@pytest.mark.slow
@pytest.mark.parametrize(("title", "code"), EXAMPLES, ids=[t for t, _ in EXAMPLES])
def test_a_howto_example_runs_as_written(tmp_path, title, code):
    needs = sorted(
        {
            m
            for m in ("torch", "lightning", "transformers", "accelerate", "tensorflow", "keras")
            if re.search(rf"^(import|from) {m}\b", code, flags=re.MULTILINE)
        }
    )
    if "transformers" in needs:
        needs.append("accelerate")  # the Trainer needs it
    missing = _missing(tuple(needs))
    if missing:
        pytest.skip(f"{title} needs {', '.join(missing)}, which is not installed")
    script = tmp_path / title
    script.write_text(code, encoding="utf-8")
    env = {**os.environ, "MPLBACKEND": "agg", "TF_CPP_MIN_LOG_LEVEL": "2"}
    done = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, f"{title} failed:\n{(done.stdout + done.stderr)[-4000:]}"
