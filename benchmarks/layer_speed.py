"""Per-layer speed of KroneckerLinear vs nn.Linear for every preset's factor shapes (issue 5).

    python benchmarks/layer_speed.py --threads 2 [--tokens 1,16,512,4096] [--autotune] [--out FILE.md]

Same as ``kronlm bench layers``; prints a Markdown section (machine, command, table).
"""

from kronlm.cli.bench import layers_command

if __name__ == "__main__":
    layers_command(prog_name="benchmarks/layer_speed.py")
