"""Dataset builders for stock torchtune recipes: instruct pairs + raw text -> one packed stream."""

from custom_datasets._mixed import MixedDataset, mixed_dataset
from custom_datasets._spec import DatasetError
from custom_datasets._stats import DataStats, SourceStats

__all__ = ["mixed_dataset", "MixedDataset", "DatasetError", "DataStats", "SourceStats"]
