"""The model side: a training config's tuned model (base + adapter) and what is done with it, in the order of the
pipeline: held-out scoring and lm-eval (heldout, harness), reports (report), export to HF / peft / GGUF (export),
the OpenAI-compatible server (serve/: app, protocol, engine), and `make fit`'s memory trace (memory, fit); the
config loader and key check (config). Like the data side (`custom_datasets`), it knows no particular model: tokenizer
and model come from the config.
"""

from tuned.model import TunedModel, epoch_adapters, latest_adapter

__all__ = ["TunedModel", "epoch_adapters", "latest_adapter"]
