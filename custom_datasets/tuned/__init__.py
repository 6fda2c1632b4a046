"""The tuned model of a training config and what is done with it: held-out evaluation, lm-eval, reports.

Shared by our recipes (make eval, make generate); like the data layer, it knows no particular model:
tokenizer and model come from the config.
"""

from custom_datasets.tuned.hf_tokenizer import HFTokenizer, hf_tokenizer
from custom_datasets.tuned.model import TunedModel, epoch_adapters, latest_adapter

__all__ = ["TunedModel", "epoch_adapters", "latest_adapter", "HFTokenizer", "hf_tokenizer"]
