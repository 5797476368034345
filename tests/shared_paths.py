"""The repository's example data beside the checkout: ../shared/data and ../shared/tokenizers.

Located from this file, not from the working directory; each name is None when the folder (or the
tokenizer files) are absent, so tests can skip.
"""

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
_SHARED = REPO_ROOT.parent / "shared"

SHARED_DATA: Path | None = _SHARED / "data" if (_SHARED / "data").is_dir() else None
GPT2_TOKENIZER_DIR: Path | None = (
    _SHARED / "tokenizers" / "gpt2" if (_SHARED / "tokenizers" / "gpt2" / "vocab.json").is_file() else None
)
