"""The modeling code a compressed folder carries, so that tools without kronlm can load it.

``save_pretrained`` of a Kronecker model (and so ``kronlm.save``) writes three Python files into
the folder and points ``config.json``'s ``auto_map`` at them:

- ``kronlm_layers.py``: :mod:`kronlm.modeling.remote.kronlm_layers` copied verbatim: standalone
  ``KroneckerLinear`` / ``KroneckerEmbedding`` / ``KroneckerTiedLMHead`` (same forward, so
  bit-identical logits), the plan surgery and the module-kind table ``MODULE_BUILDERS``;
- ``configuration_kronlm.py``: ``Kronecker<Base>Config``, a subclass of the base config;
- ``modeling_kronlm.py``: ``Kronecker<Base>...`` for every Auto class the base type has.

Only torch and transformers are imported by them, so ``AutoModelForCausalLM.from_pretrained(folder,
trust_remote_code=True)`` works in any process (lm-eval's command line, serving tools). kronlm
itself never runs these files: once kronlm is imported its registered classes are "explicit local
code" to transformers, which then ignores ``auto_map`` even under ``trust_remote_code=True``.

``config.json`` also gets a load guard: ``transformers_weights`` set to a sentence that starts
with :data:`LOAD_GUARD_PREFIX`. transformers reads that key as the weights file name in every
``from_pretrained``; the Kronecker config classes (kronlm's and the folder's) drop it when they
read the config, while a dense class (``LlamaForCausalLM.from_pretrained(folder)``) stops with a
``ValueError`` quoting the sentence, which says how to load the folder, instead of loading a dense
model with the compressed modules' weights initialised at random.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from kronlm.utils.atomic import atomic_path
from kronlm.utils.files import read_json

TEMPLATE_DIR = Path(__file__).resolve().parent / "remote"
LAYERS_FILE = "kronlm_layers.py"
CONFIG_FILE = "configuration_kronlm.py"
MODELING_FILE = "modeling_kronlm.py"
REMOTE_FILES = (LAYERS_FILE, CONFIG_FILE, MODELING_FILE)
# Kept equal to the template's constants (tests check it).
LOAD_GUARD_KEY = "transformers_weights"
LOAD_GUARD_PREFIX = "kronlm-compressed model"
AUTO_CONFIG = "AutoConfig"

CONFIG_TEMPLATE = '''"""Configuration of a kronlm-compressed {base_type} model (written by kronlm {version}).

Loaded by transformers under trust_remote_code=True; needs only transformers and torch.
"""

from {config_module} import {config_name}

from .kronlm_layers import drop_load_guard


class {kronecker_config}({config_name}):
    """{config_name} of a kronlm-compressed model; the plan is ``config.kronlm``."""

    model_type = "{model_type}"

    # Defined on the class itself: transformers generates an __init__ for config subclasses without one.
    def __init__(self, **kwargs):
        super().__init__(**drop_load_guard(kwargs))
'''

MODELING_HEADER = '''"""Model classes of a kronlm-compressed {base_type} model (written by kronlm {version}).

Each class builds the base architecture, then replaces the modules listed in ``config.kronlm``
with the Kronecker modules of ``kronlm_layers.py``. Loaded by transformers under
trust_remote_code=True; needs only transformers and torch.
"""

{imports}

from .configuration_kronlm import {kronecker_config}
from .kronlm_layers import KroneckerModelMixin
'''

MODEL_TEMPLATE = '''

class {kronecker_name}(KroneckerModelMixin, {base_name}):
    """{base_name} with Kronecker modules as planned in ``config.kronlm``."""

    config_class = {kronecker_config}
'''


def load_guard_message(model_type: str, base_class: str) -> str:
    """The load-guard sentence for a folder of ``model_type`` saved from a model whose base class is ``base_class``."""
    return (
        f"{LOAD_GUARD_PREFIX} (model_type {model_type}): {base_class} and the other dense classes cannot load it. "
        "Load it with AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True) (or the folder's other Auto classes), "
        "or with kronlm.load(folder) after pip install kronlm; `kronlm merge folder --out dense_folder` writes a plain dense copy"
    )


def drop_load_guard(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Remove the load guard from config keyword arguments (as read from ``config.json``); returns them."""
    value = kwargs.get(LOAD_GUARD_KEY)
    if isinstance(value, str) and value.startswith(LOAD_GUARD_PREFIX):
        del kwargs[LOAD_GUARD_KEY]
    return kwargs


def is_kronlm_auto_map(value: Any) -> bool:
    """True for an ``auto_map`` that points at the code files kronlm writes (rewritten on every save)."""
    return isinstance(value, dict) and bool(value) and all(
        isinstance(ref, str) and ref.split(".", 1)[0] in {Path(f).stem for f in REMOTE_FILES} for ref in value.values()
    )


def template_text(name: str) -> str:
    """The text of a template file shipped in :mod:`kronlm.modeling.remote` (read, never imported).

    Raises:
        FileNotFoundError: the installed kronlm lacks the file.
    """
    path = TEMPLATE_DIR / name
    if not path.is_file():
        raise FileNotFoundError(f"{path}: kronlm's remote-code template is missing (broken installation?)")
    return path.read_text(encoding="utf-8")


def remote_code_files(base_type: str, config_class: type, model_classes: dict[str, type], version: str) -> dict[str, str]:
    """File name -> text of the three code files for a base ``model_type``.

    Args:
        base_type: the base ``model_type`` ("llama", "gpt2", ...).
        config_class: the base config class (``LlamaConfig``).
        model_classes: Auto class name -> base model class (``{"AutoModelForCausalLM": LlamaForCausalLM, ...}``).
        version: kronlm's version, written into the docstrings.
    """
    kronecker_config = f"Kronecker{config_class.__name__}"
    config_text = CONFIG_TEMPLATE.format(
        base_type=base_type, version=version, config_module=config_class.__module__, config_name=config_class.__name__,
        kronecker_config=kronecker_config, model_type=f"kronecker_{base_type}",
    )
    by_module: dict[str, list[str]] = {}
    for cls in dict.fromkeys(model_classes.values()):
        by_module.setdefault(cls.__module__, []).append(cls.__name__)
    imports = "\n".join(f"from {module} import {', '.join(sorted(names))}" for module, names in sorted(by_module.items()))
    modeling = MODELING_HEADER.format(base_type=base_type, version=version, imports=imports, kronecker_config=kronecker_config)
    for cls in dict.fromkeys(model_classes.values()):
        modeling += MODEL_TEMPLATE.format(kronecker_name=f"Kronecker{cls.__name__}", base_name=cls.__name__, kronecker_config=kronecker_config)
    return {LAYERS_FILE: template_text(LAYERS_FILE), CONFIG_FILE: config_text, MODELING_FILE: modeling}


def auto_map(config_class: type, model_classes: dict[str, type]) -> dict[str, str]:
    """``config.json``'s ``auto_map``: Auto class name -> ``file.Class`` in the folder."""
    mapping = {AUTO_CONFIG: f"{Path(CONFIG_FILE).stem}.Kronecker{config_class.__name__}"}
    for auto_name, cls in model_classes.items():
        mapping[auto_name] = f"{Path(MODELING_FILE).stem}.Kronecker{cls.__name__}"
    return mapping


def write_remote_code(
    folder: str | os.PathLike, base_type: str, config_class: type, model_classes: dict[str, type], saved_class: type, version: str
) -> None:
    """Write the three code files into ``folder`` and add ``auto_map`` and the load guard to its ``config.json``.

    Args:
        folder: a folder ``save_pretrained`` has just written (its ``config.json`` exists).
        base_type, config_class, model_classes, version: see :func:`remote_code_files`.
        saved_class: the base class of the saved model (named in the load-guard sentence).

    Raises:
        FileNotFoundError: ``folder/config.json`` is missing.
        OSError: a file cannot be written.
    """
    folder = Path(folder)
    for name, text in remote_code_files(base_type, config_class, model_classes, version).items():
        with atomic_path(folder / name) as tmp:
            tmp.write_text(text, encoding="utf-8")
    config_path = folder / "config.json"
    config = read_json(config_path)
    config["auto_map"] = auto_map(config_class, model_classes)
    config[LOAD_GUARD_KEY] = load_guard_message(f"kronecker_{base_type}", saved_class.__name__)
    with atomic_path(config_path) as tmp:
        # transformers' own layout (indent 2, sorted keys), so a re-save by transformers diffs cleanly.
        tmp.write_text(_json_text(config), encoding="utf-8")


def _json_text(data: dict[str, Any]) -> str:
    return json.dumps(data, indent=2, sort_keys=True) + "\n"


__all__ = [
    "AUTO_CONFIG",
    "CONFIG_FILE",
    "LAYERS_FILE",
    "LOAD_GUARD_KEY",
    "LOAD_GUARD_PREFIX",
    "MODELING_FILE",
    "REMOTE_FILES",
    "auto_map",
    "drop_load_guard",
    "is_kronlm_auto_map",
    "load_guard_message",
    "remote_code_files",
    "template_text",
    "write_remote_code",
]
