"""``kronlm merge DIR --out DENSE_DIR [--gguf FILE]``: a compressed model back to a plain dense model."""

from __future__ import annotations

import os
import time
from pathlib import Path

import click
import torch

from kronlm.compression import count_parameters
from kronlm.export import (
    DEFAULT_PRE_TOKENIZER,
    GGUF_DTYPES,
    export_gguf,
    gguf_written_by_kronlm,
)
from kronlm.modeling import (
    is_kronecker_model,
    load_model,
    load_tokenizer,
    merge_and_unload,
    resolve_model_spec,
    save,
)
from kronlm.utils import check_output_file, check_output_folder


@click.command("merge")
@click.argument("model")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default=None, help="Folder for the dense Hugging Face model (safetensors).")
@click.option("--gguf", "gguf_file", type=click.Path(dir_okay=False), default=None,
              help="Also (or only) write a GGUF file for llama.cpp (an existing file only when kronlm wrote it, or with --overwrite).")
@click.option("--gguf-dtype", type=click.Choice(list(GGUF_DTYPES)), default="f16", show_default=True, help="GGUF weight type (2-D weights; norms stay f32).")
@click.option("--gguf-pre", default=DEFAULT_PRE_TOKENIZER, show_default=True, help="llama.cpp pre-tokenizer name (tokenizer.ggml.pre), e.g. smollm for SmolLM2.")
@click.option("--overwrite", is_flag=True, help="Replace --out / --gguf even when kronlm did not write them.")
def command(model, out_dir, gguf_file, gguf_dtype, gguf_pre, overwrite):
    """Merge MODEL's Kronecker modules into dense weights and write a plain model of its base architecture.

    MODEL is a kronlm folder (or any spec kronlm loads). --out writes a Hugging Face folder
    (LlamaForCausalLM, GPT2LMHeadModel, ...; config, safetensors, tokenizer) that any tool loads
    without kronlm; its logits equal the compressed model's up to float32 rounding. --gguf writes
    the same weights as a GGUF file that llama.cpp loads (llama and gpt2 families).
    """
    if out_dir is None and gguf_file is None:
        raise click.UsageError("give --out DENSE_DIR, --gguf FILE, or both")
    try:
        if out_dir is not None:
            out_dir = check_output_folder(out_dir, overwrite=overwrite, inputs=(model,), option="--out")
        if gguf_file is not None:
            gguf_file = check_output_file(gguf_file, overwrite=overwrite, inputs=(model,), written_by_kronlm=gguf_written_by_kronlm,
                                          option="--gguf")
    except FileExistsError as exc:
        raise click.UsageError(str(exc)) from None
    if out_dir is not None and gguf_file is not None and Path(os.path.realpath(out_dir)) in Path(os.path.realpath(gguf_file)).parents:
        raise click.UsageError(f"--gguf {gguf_file} lies inside --out {out_dir}, which is replaced as a whole; write the GGUF file elsewhere")
    source = resolve_model_spec(model)
    t0 = time.perf_counter()
    net = load_model(model)
    try:
        tokenizer = load_tokenizer(model)
    except (OSError, ValueError):
        tokenizer = None
    click.echo(f"loaded {source.description} ({count_parameters(net):,} params) in {time.perf_counter() - t0:.1f} s")
    if not is_kronecker_model(net):
        click.echo("the model has no Kronecker modules: writing it unchanged")
    dense = merge_and_unload(net) if is_kronecker_model(net) else net
    check = torch.randint(0, dense.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0))
    if hasattr(dense, "get_output_embeddings") and dense.get_output_embeddings() is not None:
        with torch.no_grad():
            diff = (dense(check).logits - net(check).logits).abs().max().item()
        click.echo(f"merged into {type(dense).__name__} ({count_parameters(dense):,} params); max |logits difference| {diff:.3g} on 16 tokens")
    if out_dir is not None:
        save(dense, out_dir, tokenizer=tokenizer, overwrite=overwrite, inputs=(model,))
        click.echo(f"wrote {out_dir} (a plain {type(dense).__name__}: loads with transformers alone)")
    if gguf_file is not None:
        if tokenizer is None:
            raise click.ClickException(f"--gguf needs the model's tokenizer, and none could be loaded from {model}")
        path = export_gguf(dense, gguf_file, tokenizer=tokenizer, dtype=gguf_dtype, pre_tokenizer=gguf_pre)
        click.echo(f"wrote {path} ({path.stat().st_size / 2**20:,.1f} MiB, {gguf_dtype})")
