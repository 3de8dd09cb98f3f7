"""The data layer: how a row travels from a file to the trainer.

- `reading`: any source (Dataset, JSONL/JSON file, saved folder, hub name) read with errors naming file and line;
- `rules`: DELIA's conversation rules (caches, query files), a Python reference and an Arrow fast path;
- `forms`: which of TRL's dataset forms a dataset is in, and the conversions DELIA needs between them;
- `mixing`: the seeded draw of diverse rows, and `prepare_datasets`, the one entry point the trainer calls.

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
