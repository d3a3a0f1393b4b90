"""A Griffe extension for the API reference: the reStructuredText bits of docstrings, made Markdown.

gradsight's docstrings are Google style, but their cross-references use the Sphinx roles that editors and
``help()`` read well (``:class:`Finding```, ``:func:`~gradsight.watch```, ``:meth:`Run.snapshot```). Markdown
would print those literally. This extension, loaded by mkdocstrings (``extensions:`` in ``mkdocs.yml``),
rewrites each role into inline code wrapped in an *optional* mkdocs-autorefs reference: a link when the target
is documented on the site, plain code when it is not (a private module, a third-party class). Optional
references never fail the strict build. It also fences doctest lines (``>>> ...``, which Markdown would read as
nested quotes) as ``pycon`` code, and turns reST's literal-block marker ``text::`` into ``text:`` (the indented
block after it is already a Markdown code block).

Only the build uses this file; the package does not import it.
"""

from __future__ import annotations

import html
import re
from typing import Any

import griffe

#: ``:role:`target``` and ``:role:`title <target>```; the roles Sphinx's Python domain uses.
_ROLE = re.compile(r":(?:py:)?(?:class|func|meth|mod|attr|data|exc|obj|const):`(?P<body>[^`]+)`")
#: a paragraph ending in reST's literal-block marker ``::`` (not a bare ``::`` line)
_LITERAL = re.compile(r"(\S)::$", flags=re.MULTILINE)
#: a doctest directive such as ``  # doctest: +SKIP`` (noise to a reader)
_DOCTEST_FLAG = re.compile(r"\s*#\s*doctest:.*$")
_TITLED = re.compile(r"^(?P<title>.+?)\s*<(?P<target>[^<>]+)>$")


def _identifier(obj: griffe.Object, target: str) -> str | None:
    """The full path ``target`` names in ``obj``'s scope, or ``None`` when it is not gradsight's."""
    target = target.strip().rstrip("()")
    if target.startswith("gradsight"):
        return target
    if target.startswith("."):  # relative to the object's package, as Sphinx reads it
        module = obj if obj.is_module else obj.module
        base = module.path if module.is_package else module.parent.path if module.parent else module.path
        dots = len(target) - len(target.lstrip("."))
        parts = base.split(".")
        if dots > 1:
            parts = parts[: len(parts) - (dots - 1)]
        return ".".join([*parts, target.lstrip(".")]) if parts else None
    head, _, rest = target.partition(".")
    scope = obj if obj.is_module or obj.is_class else obj.parent
    try:
        resolved = scope.resolve(head) if scope is not None else None
    except (griffe.NameResolutionError, griffe.AliasResolutionError, griffe.CyclicAliasError, KeyError):
        return None
    if not resolved or not resolved.startswith("gradsight"):
        return None
    return f"{resolved}.{rest}" if rest else resolved


def _replace(obj: griffe.Object, match: re.Match[str]) -> str:
    body = match.group("body")
    titled = _TITLED.match(body)
    if titled:
        title, target = titled.group("title"), titled.group("target")
    else:
        target = body
        title = target.lstrip("~").lstrip(".")
        if target.startswith("~"):
            title = title.rsplit(".", 1)[-1]
    identifier = _identifier(obj, target.lstrip("~"))
    code = f"<code>{html.escape(title)}</code>"
    if identifier is None:
        return code
    return f'<autoref identifier="{html.escape(identifier)}" optional>{code}</autoref>'


def _fence_doctests(text: str) -> str:
    """Wrap each run of doctest lines (from ``>>>`` to the next blank line) in a ``pycon`` fence."""
    out: list[str] = []
    inside = False
    for line in text.split("\n"):
        if not inside and line.lstrip().startswith(">>>"):
            indent = line[: len(line) - len(line.lstrip())]
            out.append(f"{indent}```pycon")
            inside = True
        elif inside and not line.strip():
            out.append(f"{indent}```")
            inside = False
        out.append(_DOCTEST_FLAG.sub("", line) if inside else line)
    if inside:
        out.append(f"{indent}```")
    return "\n".join(out)


def rewrite(text: str, obj: griffe.Object) -> str:
    """``text`` made Markdown: roles replaced, doctests fenced, ``::`` markers shortened (see the module docstring)."""
    if ">>>" in text:
        text = _fence_doctests(text)
    text = _LITERAL.sub(r"\1:", text)
    return _ROLE.sub(lambda m: _replace(obj, m), text)


class SphinxRoles(griffe.Extension):
    """Rewrite the Sphinx roles of every docstring in a package once it is loaded."""

    def on_package(self, *, pkg: griffe.Module, **kwargs: Any) -> None:
        """Walk the package and rewrite each docstring in place."""
        self._walk(pkg, set())

    def _walk(self, obj: griffe.Object, seen: set[str]) -> None:
        if obj.path in seen:
            return
        seen.add(obj.path)
        if obj.docstring is not None:
            obj.docstring.value = rewrite(obj.docstring.value, obj)
        for member in list(obj.members.values()):
            if not member.is_alias:
                self._walk(member, seen)
