"""The model of a training config, as the stock recipe builds it, with or without its trained adapter.

One model serves base and tuned: LoRA's B matrices start at zero, so before an adapter is loaded the
model computes exactly the base checkpoint (NF4 base + zero adapter under QLoRA). Evaluating the 8B
model therefore needs what training needs for weights (about 5.5 GiB under QLoRA) and none of the
optimizer state, gradients or stored activations.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from omegaconf import DictConfig
from torchtune import config, training, utils
from torchtune.generation import generate

from custom_datasets import InstructSpec, format_prompt, parse_sources


def latest_adapter(output_dir: str | Path) -> Path:
    """The newest `epoch_N` directory under output_dir that holds an adapter."""
    epochs = [p for p in Path(output_dir).glob("epoch_*") if (p / "adapter_model.pt").is_file()]
    if not epochs:
        raise FileNotFoundError(
            f"No trained adapter under {output_dir} (looked for epoch_*/adapter_model.pt). Train first "
            "(make train CONFIG=...), or pass the adapter directory: eval.checkpoint=path/to/epoch_N"
        )
    return max(epochs, key=lambda p: int(re.sub(r"\D", "", p.name) or -1))


class TunedModel:
    """The config's model on its device, base weights loaded; `load_adapter` turns it into the tuned one."""

    def __init__(self, cfg: DictConfig):
        self.cfg = cfg
        self.device = utils.get_device(device=cfg.device)
        self.dtype = training.get_dtype(cfg.dtype, device=self.device)
        self.tokenizer = config.instantiate(cfg.tokenizer)
        checkpointer = config.instantiate(cfg.checkpointer)
        self.base_files = [str(Path(cfg.checkpointer.checkpoint_dir) / f) for f in cfg.checkpointer.checkpoint_files]
        with training.set_default_dtype(self.dtype), self.device:
            self.model = config.instantiate(cfg.model)
        missing, unexpected = self.model.load_state_dict(checkpointer.load_checkpoint()[training.MODEL_KEY], strict=False)
        if unexpected or any("lora" not in k and "magnitude" not in k for k in missing):
            raise ValueError(f"Base checkpoint does not match cfg.model: missing {missing[:5]}, unexpected {unexpected[:5]}")
        if any(hasattr(m, "initialize_dora_magnitude") for m in self.model.modules()):
            for m in self.model.modules():
                if hasattr(m, "initialize_dora_magnitude"):
                    m.initialize_dora_magnitude()
        self.model.eval()
        self.adapter: str | None = None

    def load_adapter(self, adapter_dir: str | Path) -> None:
        path = Path(adapter_dir) / "adapter_model.pt"
        state = torch.load(path, map_location=self.device, weights_only=True)
        _, unexpected = self.model.load_state_dict(state, strict=False)
        if unexpected:
            raise ValueError(f"{path} does not fit cfg.model (unexpected keys {unexpected[:5]}); was it trained with this config?")
        self.adapter = str(path)

    def instruct_specs(self) -> dict[str, InstructSpec]:
        specs = parse_sources(self.cfg.dataset.sources, self.cfg.tokenizer.max_seq_len)
        return {s.name: s for s in specs if isinstance(s, InstructSpec)}

    @torch.inference_mode()
    def complete(self, ids: list[int], max_new_tokens: int) -> str:
        """Greedy continuation of token ids, stopping at the end-of-turn tokens; special tokens dropped."""
        prompt = torch.tensor([ids], device=self.device)
        out, _ = generate(self.model, prompt, max_generated_tokens=max_new_tokens, pad_id=self.tokenizer.pad_id,
                          temperature=1e-6, top_k=1, stop_tokens=self.tokenizer.stop_tokens)
        return self.tokenizer.decode(out[0, prompt.shape[1]:].tolist())

    def generate(self, spec: InstructSpec, prompt: str, max_new_tokens: int) -> str:
        """Greedy completion of `prompt` in the source's template."""
        return self.complete(format_prompt(self.tokenizer, spec, prompt), max_new_tokens)
