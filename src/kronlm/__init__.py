"""kronlm: compress pretrained transformer language models with sums of Kronecker products.

The public API is one function per job, each taking a model and a config (as peft and torchao do):

- ``kronlm.compress(model, config, calibration=ids)``: ``config`` is a
  :class:`CompressionConfig` (a preset is ``get_preset(name)``, a per-module plan is one target per
  module) or a :class:`BudgetConfig` (a parameter budget); returns the model, compressed in place.
- ``kronlm.recover(student, teacher, blocks, config, out_dir)``: distillation in stages
  (:class:`RecoveryConfig`; ``default_recovery_config()`` is the packaged recipe).
- ``kronlm.evaluate(model, tokenizer, data)``: perplexity of a data spec under a named protocol.
- ``kronlm.merge_and_unload(model)``: back to a plain dense model.
- ``kronlm.save(model, folder)`` / ``kronlm.load(folder)``.

The pipeline behind them, one subpackage per stage: decompose (nearest Kronecker products) ->
compression (which modules, which factors, the surgery) -> modeling (compressed models that save,
load and merge like any other Hugging Face model) -> distill (recovery) -> evaluation
(perplexity) -> export (ONNX, GGUF). The method is in docs/method.md.

    import kronlm
    model, tokenizer = kronlm.load_model_and_tokenizer("smollm2")
    kronlm.compress(model, kronlm.get_preset("krony-pt-llama-mlp-2x"))
    print(model.compression_report.table())
    kronlm.save(model, "out/", tokenizer=tokenizer)
    model = kronlm.load("out/")   # or AutoModelForCausalLM.from_pretrained("out/")
    print(kronlm.evaluate(model, tokenizer, "wikitext2", max_tokens=16384))
    dense = kronlm.merge_and_unload(model)   # a plain LlamaForCausalLM again
"""

from kronlm.compression import (
    BudgetConfig,
    CompressionConfig,
    CompressionReport,
    KroneckerTarget,
    count_parameters,
    get_preset,
    list_presets,
)
from kronlm.data import load_text
from kronlm.decompose import nearest_kronecker_product
from kronlm.distill import RecoveryConfig, default_recovery_config, recover
from kronlm.evaluation import evaluate, perplexity, perplexity_of_text
from kronlm.layers import KroneckerEmbedding, KroneckerLinear, KroneckerTiedLMHead
from kronlm.modeling import (
    compress,
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
    "BudgetConfig",
    "CompressionConfig",
    "CompressionReport",
    "KroneckerEmbedding",
    "KroneckerLinear",
    "KroneckerTarget",
    "KroneckerTiedLMHead",
    "RecoveryConfig",
    "compress",
    "compression_report",
    "count_parameters",
    "default_recovery_config",
    "evaluate",
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
    "recover",
    "register_architecture",
    "save",
]
