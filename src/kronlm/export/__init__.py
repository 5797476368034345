"""Export: save a compressed model as safetensors + JSON, load it back, check a folder."""

from kronlm.export.save import load, save
from kronlm.export.validate import validate_folder

__all__ = ["load", "save", "validate_folder"]
