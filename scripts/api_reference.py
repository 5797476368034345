"""Write docs/api.md: every public name of kronlm, one section per namespace, from the code itself.

A namespace's public names are its ``__all__``. Each object is described once, in the most specific
namespace that exports it (``kronlm.compress`` lives in ``kronlm.modeling``; the top-level package
points there), with its signature (functions) or base classes (classes) and the first paragraph of
its docstring. The page is generated, never edited by hand: after changing a public name or its
docstring, run

    python scripts/api_reference.py            # rewrites docs/api.md
    python scripts/api_reference.py --check    # exit 1 when docs/api.md is not current (the tests run this)
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PAGE = REPO / "docs" / "api.md"

# The pipeline's order: decompose -> compress -> distill -> evaluate -> export, then what serves them.
NAMESPACES = [
    "kronlm",
    "kronlm.decompose",
    "kronlm.layers",
    "kronlm.compression",
    "kronlm.compression.budget",
    "kronlm.modeling",
    "kronlm.data",
    "kronlm.distill",
    "kronlm.evaluation",
    "kronlm.tasks",
    "kronlm.tasks.glue",
    "kronlm.tasks.squad",
    "kronlm.export",
    "kronlm.bench",
    "kronlm.utils",
]


def first_paragraph(doc: str | None) -> str:
    """The docstring's first paragraph as one line ("" without a docstring)."""
    if not doc:
        return ""
    paragraph = inspect.cleandoc(doc).split("\n\n")[0]
    return " ".join(line.strip() for line in paragraph.splitlines())


def anchor(namespace: str) -> str:
    """GitHub's anchor of the heading "`namespace`"."""
    return namespace.replace(".", "")


def stable(text: str) -> str:
    """A signature without what changes from run to run or machine to machine (object addresses,
    where the package is installed)."""
    import kronlm

    text = re.sub(r" at 0x[0-9a-f]+", "", text)
    return text.replace(str(Path(kronlm.__file__).resolve().parent), "<kronlm>")


def signature(obj) -> str:
    """``(a: int, b: str = 'x') -> T``: annotations as written in the source (they are strings
    under ``from __future__ import annotations``), defaults as their repr."""
    sig = inspect.signature(obj)
    params, marker_done = [], False
    for p in sig.parameters.values():
        if p.kind is p.KEYWORD_ONLY and not marker_done:
            params.append("*")
            marker_done = True
        if p.kind is p.VAR_POSITIONAL:
            marker_done = True
        text = {p.VAR_POSITIONAL: "*", p.VAR_KEYWORD: "**"}.get(p.kind, "") + p.name
        if p.annotation is not p.empty:
            text += f": {p.annotation if isinstance(p.annotation, str) else inspect.formatannotation(p.annotation)}"
        if p.default is not p.empty:
            text += f" = {p.default!r}" if p.annotation is not p.empty else f"={p.default!r}"
        params.append(text)
    ret = sig.return_annotation
    tail = "" if ret is sig.empty else f" -> {ret if isinstance(ret, str) else inspect.formatannotation(ret)}"
    return stable(f"({', '.join(params)}){tail}")


def home(name: str, obj, owners: list[str]) -> str:
    """The namespace an object is described in: the most specific of ``owners`` (those exporting
    ``name``) that holds the module defining it, else the most specific owner."""
    module = getattr(obj, "__module__", None) if (inspect.isclass(obj) or callable(obj)) else None
    if module:
        holding = [ns for ns in owners if module == ns or module.startswith(ns + ".")]
        if holding:
            return max(holding, key=len)
    return max(owners, key=len)


def describe(name: str, obj) -> list[str]:
    """One entry: the name with its signature or bases, then the docstring's first paragraph."""
    if inspect.isclass(obj):
        bases = [b.__name__ for b in obj.__bases__ if b is not object]
        head = f"class `{name}`" + (f" ({', '.join(f'`{b}`' for b in bases)})" if bases else "")
    elif callable(obj):
        try:
            head = f"`{name}{signature(obj)}`"
        except (TypeError, ValueError):
            head = f"`{name}(...)`"
    else:
        value = stable(repr(obj))
        head = f"`{name}` = `{value if len(value) <= 80 else value[:77] + '...'}`"
    summary = first_paragraph(obj.__doc__) if (inspect.isclass(obj) or callable(obj)) else ""
    return [f"- {head}" + (f": {summary}" if summary else "")]


def page() -> str:
    """The whole of docs/api.md."""
    modules = {ns: importlib.import_module(ns) for ns in NAMESPACES}
    owners: dict[int, list[str]] = {}
    for ns, module in modules.items():
        for name in module.__all__:
            owners.setdefault(id(getattr(module, name)), []).append(ns)
    lines = ["# Python API", "",
             "Every public name of kronlm, by namespace, in the order of the pipeline (decompose → compress → distill → "
             "evaluate → export). Each is described once, in the most specific namespace that exports it; the others "
             "list it with a link. Signatures follow the `nn.Linear` (out, in) orientation for shapes; the docstrings "
             "(`help(kronlm.compress)`) give shapes, units, errors and sources in full. Generated by "
             "`python scripts/api_reference.py` from the code.", ""]
    for ns, module in modules.items():
        lines += [f"## `{ns}`", "", first_paragraph(module.__doc__), ""]
        described, elsewhere = [], []
        for name in sorted(module.__all__, key=str.lower):
            obj = getattr(module, name)
            where = home(name, obj, owners[id(obj)])
            if where == ns:
                described += describe(name, obj)
            else:
                elsewhere.append(f"[`{name}`](#{anchor(where)})")
        lines += described
        if elsewhere:
            lines += ["", "Also exported here: " + ", ".join(elsewhere) + "."]
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Write the page, or with ``--check`` compare it; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 when docs/api.md differs from what the code gives")
    args = parser.parse_args(argv)
    text = page()
    if args.check:
        current = PAGE.read_text() if PAGE.is_file() else ""
        if current != text:
            print(f"{PAGE.relative_to(REPO)} is out of date: run `python scripts/api_reference.py`", file=sys.stderr)
            return 1
        return 0
    PAGE.write_text(text)
    print(f"wrote {PAGE.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
