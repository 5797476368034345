"""kronlm's Hugging Face integration: compressed models that load, save and merge like any other.

- :mod:`plan`: the typed plan stored in ``config.json`` (``KroneckerPlan``, ``ModulePlan``);
- :mod:`registry`: the ``Kronecker*`` config and model classes registered with the Auto classes;
- :mod:`convert`: ``compress`` / ``compress_to_budget`` (dense -> compressed);
- :mod:`merge`: ``merge_and_unload`` (compressed -> dense);
- :mod:`serialization`, :mod:`metadata`, :mod:`folder_checks`: save / load, ``kronlm_compression.json``,
  folder and tensor checks;
- :mod:`loading`: models and tokenizers by hub id, folder, GGUF file or alias;
  :mod:`gguf_checkpoint`: what loading a GGUF checkpoint leaves on a model.
"""

from kronlm.modeling.convert import budget_allocation, compress, compress_to_budget
from kronlm.modeling.loading import (
    TASKS,
    ModelSource,
    describe_model,
    has_lm_head,
    infer_task,
    load_model,
    load_model_and_tokenizer,
    load_tokenizer,
    resolve_model_spec,
    task_of_architectures,
)
from kronlm.modeling.merge import merge_and_unload
from kronlm.modeling.metadata import COMPRESSION_FILE, compression_report
from kronlm.modeling.plan import KroneckerPlan, LMHeadPlan, ModulePlan
from kronlm.modeling.registry import (
    DEFAULT_ARCHITECTURES,
    adopt_kronecker_classes,
    is_kronecker_model,
    plan_of_config,
    register_architecture,
    register_defaults,
)
from kronlm.modeling.serialization import SUMMARY_FILE, load, save
from kronlm.modeling.folder_checks import check_folder_files

__all__ = [
    "COMPRESSION_FILE",
    "DEFAULT_ARCHITECTURES",
    "SUMMARY_FILE",
    "TASKS",
    "KroneckerPlan",
    "LMHeadPlan",
    "ModelSource",
    "ModulePlan",
    "adopt_kronecker_classes",
    "budget_allocation",
    "check_folder_files",
    "compress",
    "compress_to_budget",
    "compression_report",
    "describe_model",
    "has_lm_head",
    "infer_task",
    "is_kronecker_model",
    "load",
    "load_model",
    "load_model_and_tokenizer",
    "load_tokenizer",
    "merge_and_unload",
    "plan_of_config",
    "register_architecture",
    "register_defaults",
    "resolve_model_spec",
    "save",
    "task_of_architectures",
]
