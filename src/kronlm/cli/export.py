"""``kronlm export MODEL --onnx --out DIR``: an ONNX graph of a dense or compressed causal LM, checked with onnxruntime."""

from __future__ import annotations

import time

import click

from kronlm.cli.options import FiniteFloatRange
from kronlm.compression import count_parameters
from kronlm.export import (
    METADATA_FILE,
    TOLERANCE,
    LogitsCheck,
    check_output_dir,
    export_onnx,
    require_onnx,
)
from kronlm.modeling import load_model, load_tokenizer, resolve_model_spec
from kronlm.utils import read_json


@click.command("export")
@click.argument("model")
@click.option("--onnx", "to_onnx", is_flag=True, help="Write model.onnx (the only export format so far; required).")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Output folder (an existing one is replaced only when kronlm wrote it, or with --overwrite).")
@click.option("--overwrite", is_flag=True, help="Replace --out even when kronlm did not write it.")
@click.option("--opset", type=click.IntRange(min=14), default=18, show_default=True, help="ONNX opset version.")
@click.option("--seq-len", type=click.IntRange(min=4), default=16, show_default=True, help="Tokens per row of the traced example input (batch and sequence stay dynamic).")
@click.option("--batch-size", type=click.IntRange(min=2), default=2, show_default=True, help="Rows of the traced example input (one is left-padded).")
@click.option("--exporter", type=click.Choice(["torchscript", "dynamo"]), default="torchscript", show_default=True, help="torch.onnx exporter.")
@click.option("--tolerance", type=FiniteFloatRange(min=0), default=TOLERANCE, show_default=True,
              help="Fail (writing nothing) when max |ONNX - PyTorch logits| exceeds this fraction of max |logit|, or an argmax differs outside a near tie.")
@click.option("--kv-cache", is_flag=True, help="Export the decoder with past keys/values in and out (generation without re-running the prefix).")
def command(model, to_onnx, out_dir, overwrite, opset, seq_len, batch_size, exporter, tolerance, kv_cache):
    """Export MODEL (kronlm folder, Hugging Face folder, hub id, .gguf file or alias such as smollm2) to ONNX.

    The graph maps input_ids and attention_mask (int64, batch x sequence, both dynamic) to logits,
    without a KV cache; with --kv-cache it also takes position_ids and past_key_values.{i}.key/value
    and returns present.{i}.key/value. After exporting, onnxruntime (CPU) runs it and its logits are
    compared with PyTorch's (relative to the logits' scale, plus argmax agreement); the export fails
    above --tolerance.
    """
    if not to_onnx:
        raise click.UsageError("give --onnx (ONNX is the only export format)")
    try:
        require_onnx()
    except ImportError as exc:
        raise click.ClickException(str(exc)) from None

    try:
        out = check_output_dir(out_dir, overwrite=overwrite, inputs=(model,))
    except FileExistsError as exc:
        raise click.UsageError(str(exc)) from None
    source = resolve_model_spec(model)
    t0 = time.perf_counter()
    net = load_model(model)
    click.echo(f"loaded {source.description} ({count_parameters(net):,} params) in {time.perf_counter() - t0:.1f} s")
    try:
        tokenizer = load_tokenizer(model)
    except (OSError, ValueError) as exc:
        tokenizer = None
        click.echo(f"no tokenizer written: none could be loaded from {model} ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})")
    t0 = time.perf_counter()
    path = export_onnx(net, out, tokenizer=tokenizer, opset=opset, batch_size=batch_size, seq_len=seq_len, exporter=exporter,
                       tolerance=tolerance, kv_cache=kv_cache, overwrite=overwrite)
    meta = read_json(out / METADATA_FILE)
    size = sum(p.stat().st_size for p in out.glob("model.onnx*"))
    cache = "with KV cache" if kv_cache else "no KV cache"
    click.echo(f"wrote {path} ({size / 2**20:,.1f} MiB, opset {opset}, {exporter} exporter, {cache}) in {time.perf_counter() - t0:.1f} s")
    if meta.get("check"):
        check = LogitsCheck(**meta["check"])
        where = "a 7-token prefill and 4 cached steps" if kv_cache else "3 x 11 tokens"
        click.echo(f"onnxruntime CPU vs PyTorch on {where}: {check.describe(tolerance)}")
