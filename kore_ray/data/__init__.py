"""Data schemas, readers/writers and validation for kore-ray's input and training files."""

from kore_ray.data.io import (
    RowError,
    import_llava,
    iter_row_errors,
    iter_rows,
    read_parquet,
    read_records,
    write_parquet,
)
from kore_ray.data.schemas import (
    Conversation,
    EvalQuestion,
    KnowledgeItem,
    QAPair,
    Record,
    RetentionProbe,
)
from kore_ray.data.validate import KINDS, detect_kind, validate_file

__all__ = [
    "KINDS",
    "Conversation",
    "EvalQuestion",
    "KnowledgeItem",
    "QAPair",
    "Record",
    "RetentionProbe",
    "RowError",
    "detect_kind",
    "import_llava",
    "iter_row_errors",
    "iter_rows",
    "read_parquet",
    "read_records",
    "validate_file",
    "write_parquet",
]
