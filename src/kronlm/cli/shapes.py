"""``kronlm shapes OUT IN``: the Kronecker factor shapes of an (out, in) matrix and their cost."""

from __future__ import annotations

import click

from kronlm.cli.options import FiniteFloatRange
from kronlm.decompose import (
    choose_factor_shapes,
    factor_shapes,
    shapes_within_ratio,
)


@click.command("shapes")
@click.argument("out_features", type=click.IntRange(min=1))
@click.argument("in_features", type=click.IntRange(min=1))
@click.option("--rank", type=click.IntRange(min=1), default=1, show_default=True, help="Kronecker terms R.")
@click.option("--ratio", type=FiniteFloatRange(min=1, min_open=True), default=None, help="Also pick shapes that compress at least this much.")
@click.option("--prefer", type=click.Choice(["params", "speed"]), default="params", show_default=True, help="How --ratio picks among the shapes within budget.")
@click.option("--limit", type=click.IntRange(min=1), default=30, show_default=True, help="Rows to print (closest to the budget first when --ratio is given).")
def command(out_features, in_features, rank, ratio, prefer, limit):
    """List factorisations (out, in) = (m1·m2, n1·n2) with parameters and multiply-adds per token."""

    dense = out_features * in_features
    shapes = shapes_within_ratio(out_features, in_features, ratio, rank) if ratio else factor_shapes(out_features, in_features, rank)
    click.echo(f"{'A (m1,n1)':>14} {'B (m2,n2)':>14} {'params':>12} {'ratio':>8} {'MACs/token':>12} {'max rank':>9}")
    for s in shapes[:limit]:
        click.echo(f"{s.a_shape!s:>14} {s.b_shape!s:>14} {s.params:>12,} {s.compression_ratio:>8.1f} {s.macs:>12,} {s.max_rank:>9}")
    if ratio:
        best = choose_factor_shapes(out_features, in_features, ratio, rank, prefer=prefer)
        click.echo(f"chosen for ratio {ratio} (prefer {prefer}): A {best.a_shape} ⊗ B {best.b_shape}, {best.params:,} params")
    click.echo(f"dense: {dense:,} params and MACs/token")
