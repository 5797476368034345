"""Prefill / decode throughput and peak memory of dense vs compressed models, random weights (issue 5).

    python benchmarks/model_speed.py --threads 2 [--family llama|gpt2|all] [--out FILE.md]

Same as ``kronlm bench models``; prints a Markdown section per family (machine, command, table).
"""

from kronlm.cli.bench import models_command

if __name__ == "__main__":
    models_command(prog_name="benchmarks/model_speed.py")
