"""docs/api.md is generated from the code (scripts/api_reference.py) and must match it."""

import importlib.util
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "api_reference.py"


def _script():
    spec = importlib.util.spec_from_file_location("api_reference", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_committed_api_page_is_what_the_code_gives():
    # A fresh process: tests that register initialisers or presets must not change what the page shows.
    done = subprocess.run([sys.executable, str(SCRIPT), "--check"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr


def test_every_public_name_is_on_the_page_once_with_a_summary():
    api = _script()
    page = api.page()
    for namespace in api.NAMESPACES:
        module = importlib.import_module(namespace)
        assert f"## `{namespace}`" in page
        for name in module.__all__:
            assert f"`{name}" in page, f"{namespace}.{name} missing from docs/api.md"
    described = [line for line in page.splitlines() if line.startswith("- ")]
    heads = [line.split("`")[1].split("(")[0] for line in described]
    assert len(heads) == len(set(heads)), "an object described twice: it belongs in one namespace"
    assert all(": " in line for line in described if "` = `" not in line), "a public name without a docstring"


def test_an_object_is_described_in_the_most_specific_namespace_exporting_it():
    api = _script()
    import kronlm
    assert api.home("compress", kronlm.compress, ["kronlm", "kronlm.modeling"]) == "kronlm.modeling"
    assert api.home("BudgetConfig", kronlm.BudgetConfig,
                    ["kronlm", "kronlm.compression", "kronlm.compression.budget"]) == "kronlm.compression.budget"
    assert api.signature(lambda a, *, b=2: a) == "(a, *, b=2)"


def test_every_package_with_public_names_has_a_section():
    # kronlm.cli is the command line, kronlm.modeling.remote the code copied beside saved models.
    api = _script()
    source = REPO / "src"
    packages = {".".join(p.parent.relative_to(source).parts) for p in (source / "kronlm").rglob("__init__.py")}
    public = {name for name in packages if hasattr(importlib.import_module(name), "__all__")}
    assert public - {"kronlm.cli", "kronlm.modeling.remote"} <= set(api.NAMESPACES), sorted(public - set(api.NAMESPACES))
