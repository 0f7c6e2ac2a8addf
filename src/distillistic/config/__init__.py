"""Run configuration: its schema (:mod:`.schema`), parsing (:mod:`.parse`), checks (:mod:`.validate`), help.

A leaf of the package: it never looks a model or dataset name up (the methods' parameter specs it reads are
plain data, :mod:`distillistic.methods.catalogue`).
"""

from distillistic.config.parse import coerce, from_mapping, import_plugins, import_plugins_named, load, parse_set, save
from distillistic.config.schema import (
    FIELDS,
    MACHINE_KEYS,
    THESIS_ALPHA,
    VOLATILE_KEYS,
    CommonConfig,
    Config,
    all_keys,
    cache_dir,
    default_of,
    is_key,
    param_of,
)
from distillistic.config.validate import (
    CHOICES,
    model_names,
    split_names,
    student_archs,
    teacher_names,
    teacher_weights_list,
    validate,
    validate_for_data,
)
from distillistic.config.yaml_files import MAX_YAML_BYTES, read_yaml, safe_load_bounded

__all__ = [
    "CHOICES", "FIELDS", "MACHINE_KEYS", "MAX_YAML_BYTES", "THESIS_ALPHA", "VOLATILE_KEYS", "CommonConfig", "Config",
    "all_keys", "cache_dir", "coerce", "default_of", "from_mapping", "import_plugins", "import_plugins_named",
    "is_key", "load",
    "model_names", "param_of", "parse_set", "read_yaml", "safe_load_bounded", "save", "split_names",
    "student_archs", "teacher_names", "teacher_weights_list", "validate", "validate_for_data",
]
