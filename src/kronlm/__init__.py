"""kronlm: compress pretrained transformer language models with sums of Kronecker products.

Pipeline: decompose (nearest Kronecker products) -> compress (model surgery) -> distill
(recovery training) -> evaluate (perplexity) -> export (safetensors folders that load with the
Hugging Face Auto classes).

    import kronlm
    report = kronlm.compress(model, kronlm.get_preset("krony-pt-96m"))
    kronlm.save(model, "out/")
    model = kronlm.load("out/")   # or AutoModelForCausalLM.from_pretrained("out/")
"""

from kronlm.compress import CompressionConfig, CompressionReport, KroneckerTarget, compress, get_preset, list_presets
from kronlm.decompose import nearest_kronecker_product
from kronlm.export import load, save
from kronlm.layers import KroneckerEmbedding, KroneckerLinear, KroneckerTiedLMHead
from kronlm.models.registry import register_architecture as _register_architecture
from kronlm.models.registry import register_defaults as _register_defaults

_register_defaults()
register_architecture = _register_architecture

__version__ = "0.1.0"

__all__ = [
    "CompressionConfig",
    "CompressionReport",
    "KroneckerEmbedding",
    "KroneckerLinear",
    "KroneckerTarget",
    "KroneckerTiedLMHead",
    "compress",
    "get_preset",
    "list_presets",
    "load",
    "nearest_kronecker_product",
    "register_architecture",
    "save",
]
