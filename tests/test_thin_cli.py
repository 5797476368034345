"""The command line is a thin wrapper over the library, and nothing else depends on it.

Rules, checked on the source (no import is run):

1. No module of the library (``src/kronlm`` outside ``kronlm/cli``) and no benchmark script
   (``benchmarks/*.py``) imports ``kronlm.cli``: what a command does is reachable without it.
2. A command module (``kronlm/cli/*.py``) uses the library only through its public namespaces:
   every ``from kronlm.X import name`` names a *package* ``kronlm.X`` (an ``__init__.py``, such as
   ``kronlm.compression`` or ``kronlm.tasks.glue``) and a name in that package's ``__all__``;
   submodules (``kronlm.compression.surgery``) and plain ``import kronlm.X`` are not used.
   Imports among the command modules themselves are free.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "src" / "kronlm"
CLI = SRC / "cli"


def _kronlm_imports(path: Path) -> list[tuple[int, str, list[str]]]:
    """(line, module, names) of every import of kronlm in ``path`` (names empty for ``import x``)."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and node.module.split(".")[0] == "kronlm":
            out.append((node.lineno, node.module, [a.name for a in node.names]))
        elif isinstance(node, ast.Import):
            out += [(node.lineno, a.name, []) for a in node.names if a.name.split(".")[0] == "kronlm"]
    return out


def _package_all(module: str) -> list[str] | None:
    """``__all__`` of the package ``module`` (read from its ``__init__.py``), or None when
    ``module`` is not a package of the library."""
    init = SRC.parent.joinpath(*module.split(".")) / "__init__.py"
    if not init.is_file():
        return None
    for node in ast.parse(init.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets):
            return [ast.literal_eval(e) for e in node.value.elts]
    return []


LIBRARY = sorted(p for p in SRC.rglob("*.py") if CLI not in p.parents)
BENCHMARKS = sorted((REPO / "benchmarks").glob("*.py"))
COMMANDS = sorted(CLI.glob("*.py"))


@pytest.mark.parametrize("path", LIBRARY + BENCHMARKS, ids=lambda p: str(p.relative_to(REPO)))
def test_nothing_outside_the_command_line_imports_it(path):
    found = [f"{line}: {module}" for line, module, _ in _kronlm_imports(path) if module == "kronlm.cli" or module.startswith("kronlm.cli.")]
    assert not found, f"{path.relative_to(REPO)} imports the command line ({'; '.join(found)}); call the library instead"


def test_every_subcommand_has_a_module():
    from kronlm.cli import SUBCOMMANDS

    modules = {"eval": "evaluate"}
    assert {modules.get(name, name) for name in SUBCOMMANDS} <= {p.stem for p in COMMANDS}


@pytest.mark.parametrize("path", COMMANDS, ids=lambda p: p.name)
def test_commands_use_only_the_public_namespaces_of_the_library(path):
    wrong = []
    for line, module, names in _kronlm_imports(path):
        if module == "kronlm.cli" or module.startswith("kronlm.cli."):
            continue
        public = _package_all(module)
        if not names or public is None:
            wrong.append(f"{line}: {module} is not a package's public namespace")
            continue
        wrong += [f"{line}: {module}.{name} is not in {module}.__all__" for name in names if name not in public]
    assert not wrong, f"cli/{path.name}: " + "; ".join(wrong)
