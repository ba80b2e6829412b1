"""Examples for distillation: task records, readers, the generated arithmetic task, tokenization.

Importing this package loads only the stdlib and numpy: transformers, datasets, pyarrow and Ray are
imported inside the functions that use them, so the CLI and job entry points start fast.
"""

from kdray.data.arithmetic import arithmetic_splits, generate_arithmetic
from kdray.data.holdout import read_config_split
from kdray.data.readers import ReadResult, detect_format, read_records
from kdray.data.records import (
    ADAPTERS,
    MalformedRow,
    Record,
    adapt_row,
    gsm8k_record,
    parse_gsm8k_answer,
    summarization_record,
    translation_record,
)
from kdray.data.tokenize import (
    Tokenize,
    collate,
    pad_id_of,
    tokenize_example,
)

__all__ = [
    "ADAPTERS",
    "MalformedRow",
    "ReadResult",
    "Record",
    "Tokenize",
    "adapt_row",
    "arithmetic_splits",
    "collate",
    "detect_format",
    "generate_arithmetic",
    "gsm8k_record",
    "pad_id_of",
    "parse_gsm8k_answer",
    "read_config_split",
    "read_records",
    "summarization_record",
    "tokenize_example",
    "translation_record",
]
