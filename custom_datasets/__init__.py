"""What a training config names: instruct pairs + raw text + conversations -> one packed stream (`mixed_dataset`),
the Hugging Face tokenizer for models that ship tokenizer.json (`hf_tokenizer`), and the resume-safe cosine schedule.
The stages are private modules, re-exported here (docs/layout.md): read (_read, _read_chat), check and format (_spec,
_format, _chat, _items), tokenize (_tokenize, _build), duplicates (_minhash, _dedup, _duplicates), held-out splits
(_held_out), mix and pack (_mix, _pack), store (_store), counts (_stats), all driven by _mixed. The model side
(eval, export, serve) is the `tuned` package."""

from custom_datasets._format import format_pair, format_prompt
from custom_datasets._hf_tokenizer import HFTokenizer, hf_tokenizer
from custom_datasets._lr_schedulers import cosine_schedule_with_warmup
from custom_datasets._mixed import MixedDataset, mixed_dataset
from custom_datasets._read import Pair
from custom_datasets._spec import ChatSpec, DatasetError, InstructSpec, TextSpec, parse_sources
from custom_datasets._stats import DataStats, SourceStats

__all__ = [
    "mixed_dataset", "MixedDataset", "DatasetError", "DataStats", "SourceStats",
    "parse_sources", "InstructSpec", "TextSpec", "ChatSpec", "Pair", "format_pair", "format_prompt",
    "cosine_schedule_with_warmup", "hf_tokenizer", "HFTokenizer",
]

def __getattr__(name: str):
    """`custom_datasets.tuned.hf_tokenizer`, the tokenizer's path before the model side moved out to `tuned` (a config
    written then names it): still found, with a warning that names the new path."""
    if name != "tuned":
        raise AttributeError(f"module 'custom_datasets' has no attribute {name!r}")
    import types
    import warnings

    def moved(*args, **kwargs):
        warnings.warn("tokenizer._component_: custom_datasets.tuned.hf_tokenizer moved to "
                      "custom_datasets.hf_tokenizer; write that in your config", FutureWarning, stacklevel=2)
        return hf_tokenizer(*args, **kwargs)

    moved.hf_tokenizer = moved  # the module path, custom_datasets.tuned.hf_tokenizer.hf_tokenizer, too
    return types.SimpleNamespace(hf_tokenizer=moved)
