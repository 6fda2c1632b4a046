"""lm-evaluation-harness on our model, offline: an `LM` wrapper that needs no hub, and a local task
generated from the held-out split.

torchtune 0.6.1's `eleuther_eval` cannot run offline (its wrapper builds `HFLM(pretrained="gpt2")`,
which downloads GPT-2) and refuses lm-eval >= 0.4.10 by a string compare, so this is the
copy-and-modify route torchtune recommends for recipes.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from lm_eval.api.model import LM

from custom_datasets import format_prompt

from tuned_model import TunedModel


class TunedLM(LM):
    """loglikelihood / loglikelihood_rolling / generate_until over a `TunedModel`."""

    def __init__(self, tuned: TunedModel, batch_size: int = 4, max_new_tokens: int = 128):
        super().__init__()
        self.tuned = tuned
        self.tok = tuned.tokenizer
        self.max_len = tuned.cfg.tokenizer.max_seq_len
        self.batch_size = batch_size
        self.max_new_tokens = max_new_tokens
        # Held-out contexts in the chat template contain special-token text; read it as special tokens.
        inner = getattr(getattr(self.tok, "tt_model", None), "tt_model", None)
        self._encode = (lambda s: inner.encode(s, allowed_special="all")) if inner is not None else (
            lambda s: self.tok.encode(s, add_bos=False, add_eos=False))

    def _score(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """Sum of log-probs of each continuation given its context, and whether greedy decoding gives it."""
        out = []
        for start in range(0, len(pairs), self.batch_size):
            chunk = pairs[start : start + self.batch_size]
            seqs = [(ctx + cont)[-(self.max_len + 1):] for ctx, cont in chunk]
            width = max(len(s) for s in seqs) - 1
            inputs = torch.full((len(seqs), width), self.tok.pad_id, dtype=torch.long)
            for i, s in enumerate(seqs):
                inputs[i, : len(s) - 1] = torch.tensor(s[:-1])
            with torch.inference_mode():
                logits = self.tuned.model(inputs.to(self.tuned.device)).float()
            logprobs = F.log_softmax(logits, dim=-1).cpu()
            for i, ((_, cont), s) in enumerate(zip(chunk, seqs)):
                n = len(cont)
                rows = logprobs[i, len(s) - 1 - n : len(s) - 1]
                target = torch.tensor(s[-n:])
                out.append((rows.gather(1, target[:, None]).sum().item(), bool((rows.argmax(-1) == target).all())))
        return out

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        pairs = []
        for req in requests:
            context, continuation = req.args
            pairs.append(([self.tok.bos_id] + self._encode(context), self._encode(continuation)))
        return self._score(pairs)

    def loglikelihood_rolling(self, requests) -> list[float]:
        out = []
        for req in requests:
            ids = self._encode(req.args[0])
            windows = [([self.tok.bos_id] + ids[max(0, s - self.max_len + 1) : s], ids[s : s + self.max_len - 1])
                       for s in range(0, len(ids), self.max_len - 1)]
            out.append(sum(ll for ll, _ in self._score(windows)))
        return out

    def generate_until(self, requests) -> list[str]:
        out = []
        for req in requests:
            context, kwargs = req.args
            text = self.tuned.complete([self.tok.bos_id] + self._encode(context), kwargs.get("max_gen_toks", self.max_new_tokens))
            for stop in kwargs.get("until", []) or []:
                text = text.split(stop)[0]
            out.append(text)
        return out


def write_local_tasks(held_out: dict[str, list[dict]], tuned: TunedModel, task_dir: Path) -> list[str]:
    """One loglikelihood task per instruct source: the held-out prompt in its template, the reference
    completion as the target. Metrics: perplexity (per document) and acc (greedy decoding reproduces
    the reference exactly)."""
    specs = tuned.instruct_specs()
    task_dir.mkdir(parents=True, exist_ok=True)
    names = []
    for source, records in held_out.items():
        if source not in specs or not records:
            continue
        docs = task_dir / f"heldout_{source}.jsonl"
        with docs.open("w", encoding="utf-8") as f:
            for r in records:
                ids = format_prompt(tuned.tokenizer, specs[source], r["prompt"])[1:]  # BOS is added by the wrapper
                context = tuned.tokenizer.decode(ids, skip_special_tokens=False, truncate_at_eos=False)
                f.write(json.dumps({"context": context, "target": r["completion"]}, ensure_ascii=False) + "\n")
        name = f"heldout_{source}"
        task = {
            "task": name,
            "dataset_path": "json",
            "dataset_kwargs": {"data_files": {"test": str(docs.resolve())}},
            "test_split": "test",
            "output_type": "loglikelihood",
            "doc_to_text": "{{context}}",
            "doc_to_target": "{{target}}",
            "target_delimiter": "",
            "metric_list": [{"metric": "perplexity", "aggregation": "perplexity", "higher_is_better": False},
                            {"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
            "metadata": {"version": 1.0},
        }
        (task_dir / f"{name}.yaml").write_text(json.dumps(task, indent=2) + "\n")  # JSON is YAML
        names.append(name)
    return names


def run_lm_eval(tuned: TunedModel, tasks: list[str], task_dir: Path, limit: int | None, batch_size: int) -> dict:
    """{task: {metric: value}} from lm-eval's simple_evaluate."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(task_dir))
    results = lm_eval.simple_evaluate(model=TunedLM(tuned, batch_size), tasks=tasks, task_manager=manager,
                                      limit=limit, log_samples=False)
    return {task: {k.split(",")[0]: v for k, v in metrics.items() if isinstance(v, (int, float)) and k != "alias"}
            for task, metrics in results["results"].items()}
