"""kronlm: compress pretrained transformer language models with sums of Kronecker products.

Pipeline: decompose (nearest Kronecker products) -> compress (which modules, which factors, the
surgery) -> distill (recovery training) -> evaluate (perplexity) -> export (ONNX, GGUF); the
Hugging Face integration (compressed models that save, load and merge like any other) is
:mod:`kronlm.modeling`.

    import kronlm
    model, tokenizer = kronlm.load_model_and_tokenizer("smollm2")
    kronlm.compress(model, kronlm.get_preset("krony-pt-llama-mlp-2x"))
    print(model.compression_report.table())
    kronlm.save(model, "out/", tokenizer=tokenizer)
    model = kronlm.load("out/")   # or AutoModelForCausalLM.from_pretrained("out/")
    print(kronlm.perplexity_of_text(model, tokenizer, kronlm.load_text("wikitext2"), max_tokens=16384))
    dense = kronlm.merge_and_unload(model)   # a plain LlamaForCausalLM again
"""

from kronlm.compression import (
    CompressionConfig,
    CompressionReport,
    KroneckerTarget,
    count_parameters,
    get_preset,
    list_presets,
)
from kronlm.data import load_text
from kronlm.decompose import nearest_kronecker_product
from kronlm.evaluation import perplexity, perplexity_of_text
from kronlm.layers import KroneckerEmbedding, KroneckerLinear, KroneckerTiedLMHead
from kronlm.modeling import (
    compress,
    compress_to_budget,
    compression_report,
    load,
    load_model,
    load_model_and_tokenizer,
    load_tokenizer,
    merge_and_unload,
    register_architecture,
    register_defaults,
    save,
)

register_defaults()

__version__ = "0.1.0"

__all__ = [
    "CompressionConfig",
    "CompressionReport",
    "KroneckerEmbedding",
    "KroneckerLinear",
    "KroneckerTarget",
    "KroneckerTiedLMHead",
    "compress",
    "compress_to_budget",
    "compression_report",
    "count_parameters",
    "get_preset",
    "list_presets",
    "load",
    "load_model",
    "load_model_and_tokenizer",
    "load_text",
    "load_tokenizer",
    "merge_and_unload",
    "nearest_kronecker_product",
    "perplexity",
    "perplexity_of_text",
    "register_architecture",
    "save",
]
