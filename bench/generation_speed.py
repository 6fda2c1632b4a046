"""make eval's generations before and after the KV cache, in one process on one machine: SmolLM2-135M (the demo
config), prompts of about 208 tokens (as long as max_seq_len 256 leaves for 48 new ones) (windows of Tiny Shakespeare, or of the repo's text when ../shared is
absent), 48 new tokens each, greedy, fp32 on CPU.

    .venv/bin/python bench/generation_speed.py [--prompts 3] [--tokens 250] [--new 48]

before: torchtune's `generate` with no cache (what TunedModel.complete called), one prompt at a time;
after: TunedModel.complete_many (torchtune's cache, prompts batched). Prints both times and the ratio; the
answers are compared too (they must be equal).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from torchtune.generation import generate

from tuned import TunedModel
from tuned.config import load

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=3)  # make eval's eval.num_generations
    parser.add_argument("--tokens", type=int, default=208)  # the most a prompt keeps: max_seq_len 256 - 48 new
    parser.add_argument("--new", type=int, default=48)  # the demo's eval.max_new_tokens
    args = parser.parse_args()
    ckpt = REPO / "checkpoints" / "smollm2_135m"
    argv = ["--config", "configs/smollm2_135m_lora_cpu.yaml", f"checkpointer.checkpoint_dir={ckpt}", f"tokenizer.path={ckpt}",
            "dtype=fp32", "output_dir=/tmp/generation_speed"]
    tuned = TunedModel(load(argv))
    spec = next(iter(tuned.instruct_specs().values()))
    shared = REPO.parent / "shared" / "data" / "tinyshakespeare.txt"
    text = shared.read_text() if shared.is_file() else (REPO / "data" / "text" / "workshop_notes.md").read_text() * 20
    words, prompts = text.split(), []
    for k in range(args.prompts):  # windows of words until the templated prompt has about --tokens tokens
        n = 40  # prompt_ids keeps at most max_seq_len - new tokens: stop there
        while len(tuned.prompt_ids(spec, " ".join(words[k * 400 : k * 400 + n]), args.new)) < args.tokens and n < 4000:
            n += 10
        prompts.append(tuned.prompt_ids(spec, " ".join(words[k * 400 : k * 400 + n]), args.new))

    def before(ids: list[int]) -> list[int]:
        pad = max(set(range(len(ids) + 1)) - set(ids))
        with torch.inference_mode():
            out, _ = generate(tuned.model, torch.tensor([ids]), max_generated_tokens=args.new, pad_id=pad,
                              temperature=1e-6, top_k=1, stop_tokens=tuned.tokenizer.stop_tokens)
        new = out[0, len(ids):].tolist()
        return new[: next((k for k, t in enumerate(new) if t in tuned.tokenizer.stop_tokens), len(new))]

    start = time.perf_counter()
    old = [before(p) for p in prompts]
    t_old = time.perf_counter() - start
    start = time.perf_counter()
    new = tuned.generate_ids(prompts, args.new)
    t_new = time.perf_counter() - start
    print(json.dumps({"prompts": len(prompts), "prompt_tokens": [len(p) for p in prompts], "new_tokens": args.new,
                      "generated": [len(x) for x in new], "before_s": round(t_old, 2), "after_s": round(t_new, 2),
                      "speedup": round(t_old / t_new, 1), "same_answers": old == new, "torch_threads": torch.get_num_threads()}))


if __name__ == "__main__":
    main()
