"""The GPU scripts run rarely (only where a GPU is lent), so a flag a benchmark no longer accepts
would surface only then: each script runs here with a stand-in Python that claims a CUDA device and
hands every benchmark invocation to that benchmark's own argument parser instead of running it."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

SHIM = """#!{python}
import importlib.util, json, sys
if sys.argv[1] == "-c":  # the scripts' CUDA check
    sys.exit(0)
script = sys.argv[1]
spec = importlib.util.spec_from_file_location("gpu_script_benchmark", script)
module = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = module  # dataclasses look their module up there
spec.loader.exec_module(module)
args = module.parse_args(sys.argv[2:])
with open({log!r}, "a") as f:
    f.write(json.dumps({{"script": script, "device": str(args.device)}}) + "\\n")
"""


def run_with_stand_in(script: Path, tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess, Path]:
    """Run the bash ``script`` with $PYTHON the stand-in; returns the finished process and the log
    of the invocations it parsed (one JSON line each)."""
    log = tmp_path / "invocations.jsonl"
    shim = tmp_path / "python"
    shim.write_text(SHIM.format(python=sys.executable, log=str(log)))
    shim.chmod(0o755)
    env = {**os.environ, "PYTHON": str(shim), "HF_HUB_OFFLINE": "1"}
    return subprocess.run(["bash", str(script), *args], env=env, capture_output=True, text=True, timeout=300), log


def run_script(name: str, tmp_path: Path, *args: str) -> list[dict]:
    done, log = run_with_stand_in(REPO / "benchmarks" / name, tmp_path, *args)
    assert done.returncode == 0, done.stdout + done.stderr
    return [json.loads(line) for line in log.read_text().splitlines()]


@pytest.mark.parametrize(("name", "expected"), [
    ("recovery_gpu.sh", ["benchmarks/recovery.py"]),
    ("tasks_gpu.sh", ["benchmarks/glue_decoders.py", "benchmarks/glue_decoders.py", "benchmarks/squad_minilm.py"]),
])
def test_every_benchmark_invocation_of_the_gpu_scripts_parses(name, expected, tmp_path):
    data = tmp_path / "data"
    (data / "glue").mkdir(parents=True)
    calls = run_script(name, tmp_path, str(data)) if name == "tasks_gpu.sh" else run_script(name, tmp_path)
    assert [c["script"] for c in calls] == expected
    assert {c["device"] for c in calls} == {"cuda"}


def test_the_stand_in_fails_on_a_flag_the_benchmark_does_not_know(tmp_path):
    """The check above could pass vacuously if the stand-in never parsed: an unknown flag must fail."""
    script = tmp_path / "bad_gpu.sh"
    script.write_text('set -e\ncd "' + str(REPO) + '"\n"$PYTHON" benchmarks/recovery.py --size 0.85 --no-such-flag\n')
    done, log = run_with_stand_in(script, tmp_path)
    assert done.returncode != 0
    assert "--no-such-flag" in done.stderr
    assert not log.exists()
