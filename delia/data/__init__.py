"""The data layer: how a row travels from a file to the trainer.

- `reading`: any source (Dataset, JSONL/JSON file, saved folder, hub name) read with errors naming file and line;
  `files` opens (compressed) files, `json_check` explains a JSON file datasets refused, `errors` holds the exception;
- `forms`: the one row-form reader: which of TRL's forms a dataset or row is in, a row's messages whatever its form,
  and the final-reply split; `json_type`: datasets' Json columns in Arrow; `conform`: a cache in the downstream schema;
- `rules`: DELIA's conversation rules (caches, query files), a Python reference and an Arrow fast path;
- `mixing`: the seeded draw of diverse rows, and `prepare_datasets`, the one entry point the trainer calls;
- `queries`: general queries for self-sampling; `fingerprint`: what identifies a mixture.

Two loaders: `read_dataset` reads any source as it is; `load_conversations` also checks DELIA's conversation rules.
"""

from .mixing import SOURCES, MixturePlan, PreparedData, mix_datasets, plan_mixture, prepare_datasets
from .reading import EXPECTED_ROW, DataFormatError, DatasetOrigin, read_dataset
from .rules import load_conversations, validate_conversations

__all__ = [
    "EXPECTED_ROW",
    "SOURCES",
    "DataFormatError",
    "DatasetOrigin",
    "MixturePlan",
    "PreparedData",
    "load_conversations",
    "mix_datasets",
    "plan_mixture",
    "prepare_datasets",
    "read_dataset",
    "validate_conversations",
]
