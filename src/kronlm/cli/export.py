"""``kronlm export MODEL --onnx --out DIR``: an ONNX graph of a dense or compressed causal LM, checked with onnxruntime."""

from __future__ import annotations

import time

import click


@click.command("export")
@click.argument("model")
@click.option("--onnx", "to_onnx", is_flag=True, help="Write model.onnx (the only export format so far; required).")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Output folder (replaced if it exists).")
@click.option("--opset", type=click.IntRange(min=14), default=18, show_default=True, help="ONNX opset version.")
@click.option("--seq-len", type=click.IntRange(min=4), default=16, show_default=True, help="Tokens per row of the traced example input (batch and sequence stay dynamic).")
@click.option("--batch-size", type=click.IntRange(min=2), default=2, show_default=True, help="Rows of the traced example input (one is left-padded).")
@click.option("--exporter", type=click.Choice(["torchscript", "dynamo"]), default="torchscript", show_default=True, help="torch.onnx exporter.")
@click.option("--tolerance", type=click.FloatRange(min=0), default=1e-4, show_default=True, help="Fail (writing nothing) when ONNX and PyTorch logits differ by more.")
def command(model, to_onnx, out_dir, opset, seq_len, batch_size, exporter, tolerance):
    """Export MODEL (kronlm folder, Hugging Face folder, hub id, .gguf file or alias such as smollm2) to ONNX.

    The graph maps input_ids and attention_mask (int64, batch x sequence, both dynamic) to logits,
    without a KV cache. After exporting, onnxruntime (CPU) runs it on 3 x 11 tokens and the largest
    difference from PyTorch's logits is printed; above --tolerance the export fails.
    """
    if not to_onnx:
        raise click.UsageError("give --onnx (ONNX is the only export format)")
    try:
        from kronlm.export.onnx import check_output_dir, require_onnx

        require_onnx()
    except ImportError as exc:
        raise click.ClickException(str(exc)) from None
    import kronlm  # noqa: F401  (registers the Kronecker Auto classes)
    from kronlm.compress.report import count_parameters
    from kronlm.export.onnx import METADATA_FILE, export_onnx
    from kronlm.models.loading import load_model, load_tokenizer, resolve_model_spec
    from kronlm.utils.io import read_json

    out = check_output_dir(out_dir)
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
    path = export_onnx(net, out, tokenizer=tokenizer, opset=opset, batch_size=batch_size, seq_len=seq_len, exporter=exporter, tolerance=tolerance)
    meta = read_json(out / METADATA_FILE)
    size = sum(p.stat().st_size for p in out.glob("model.onnx*"))
    click.echo(f"wrote {path} ({size / 2**20:,.1f} MiB, opset {opset}, {exporter} exporter, no KV cache) in {time.perf_counter() - t0:.1f} s")
    click.echo(f"onnxruntime CPU vs PyTorch: max |logits difference| {meta['max_abs_diff']:.3g} on 3 x 11 tokens (tolerance {tolerance:g})")
