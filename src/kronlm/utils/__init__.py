"""Small shared helpers: atomic file and folder writes with write locks (:mod:`kronlm.utils.atomic`),
the output rules (:mod:`kronlm.utils.outputs`), safe reading of JSON and text files
(:mod:`kronlm.utils.files`), the base class of every settings file (:mod:`kronlm.utils.config`),
where local data and packaged models are found (:mod:`kronlm.utils.paths`), which device a model
runs on (:mod:`kronlm.utils.devices`)."""

from kronlm.utils.atomic import (
    FolderBusyError,
    StorageFullError,
    atomic_dir,
    atomic_path,
    folder_lock,
    write_json,
)
from kronlm.utils.config import ConfigBase, merge_settings, read_config_file
from kronlm.utils.devices import resolve_device
from kronlm.utils.files import (
    json_ready,
    read_json,
    read_text,
)
from kronlm.utils.outputs import (
    WRITTEN_BY_KEY,
    OutputRefused,
    check_output_file,
    check_output_folder,
    claim_run_folder,
    written_by_kronlm_json,
)
from kronlm.utils.paths import DATA_DIR_ENV, data_dir, default_data_dir, package_dir

__all__ = [
    "DATA_DIR_ENV",
    "WRITTEN_BY_KEY",
    "ConfigBase",
    "FolderBusyError",
    "OutputRefused",
    "StorageFullError",
    "atomic_dir",
    "atomic_path",
    "check_output_file",
    "check_output_folder",
    "claim_run_folder",
    "data_dir",
    "default_data_dir",
    "folder_lock",
    "merge_settings",
    "package_dir",
    "read_config_file",
    "json_ready",
    "read_json",
    "read_text",
    "resolve_device",
    "write_json",
    "written_by_kronlm_json",
]
