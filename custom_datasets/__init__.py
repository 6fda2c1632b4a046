"""Dataset builders for stock torchtune recipes: instruct pairs + raw text + conversations -> one packed stream."""

from custom_datasets._format import format_pair, format_prompt
from custom_datasets._lr_schedulers import cosine_schedule_with_warmup
from custom_datasets._mixed import MixedDataset, mixed_dataset
from custom_datasets._read import Pair
from custom_datasets._spec import ChatSpec, DatasetError, InstructSpec, TextSpec, parse_sources
from custom_datasets._stats import DataStats, SourceStats

__all__ = [
    "mixed_dataset", "MixedDataset", "DatasetError", "DataStats", "SourceStats",
    "parse_sources", "InstructSpec", "TextSpec", "ChatSpec", "Pair", "format_pair", "format_prompt",
    "cosine_schedule_with_warmup",
]
