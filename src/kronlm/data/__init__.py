"""Data for kronlm: evaluation and training text (:mod:`kronlm.data.text`)."""

from kronlm.data.text import TEXT_ALIASES, TextSource, load_text, resolve_text_source

__all__ = ["TEXT_ALIASES", "TextSource", "load_text", "resolve_text_source"]
