"""lm-evaluation-harness on our model, offline: an `LM` wrapper that needs no hub, and a local task per
instruct source built from its held-out split.

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
from tqdm import tqdm

from tuned.heldout import HeldOut, perplexity
from tuned.model import TunedModel


class TunedLM(LM):
    """loglikelihood / loglikelihood_rolling / generate_until over a `TunedModel`.

    No request can fail on its length: a context is cut from the left to fit max_seq_len, and a
    continuation longer than max_seq_len is scored on its last max_seq_len tokens.
    """

    def __init__(self, tuned: TunedModel, batch_size: int = 4, max_new_tokens: int = 128):
        super().__init__()
        self.tuned = tuned
        self.tok = tuned.tokenizer
        self.max_len = tuned.max_seq_len
        self.batch_size = batch_size
        self.max_new_tokens = max_new_tokens
        # Held-out contexts in the chat template contain special-token text; read it as special tokens.
        inner = getattr(getattr(self.tok, "tt_model", None), "tt_model", None)
        self._encode = (lambda s: inner.encode(s, allowed_special="all")) if inner is not None else (
            lambda s: self.tok.encode(s, add_bos=False, add_eos=False))

    def _score(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """Sum of log-probs of each continuation given its context, and whether greedy decoding gives it.
        Requests are batched by length (less padding) and answered in their own order."""
        out: list[tuple[float, bool] | None] = [None] * len(pairs)
        order = sorted(range(len(pairs)), key=lambda i: len(pairs[i][0]) + len(pairs[i][1]))
        for start in tqdm(range(0, len(order), self.batch_size), desc="lm-eval", unit="batch", leave=False):
            chunk = order[start : start + self.batch_size]
            seqs = [(pairs[i][0] + pairs[i][1])[-(self.max_len + 1):] for i in chunk]
            counts = [min(len(pairs[i][1]), len(s) - 1) for i, s in zip(chunk, seqs)]  # a continuation longer than the window: its last tokens
            width = max(len(s) for s in seqs) - 1
            inputs = torch.full((len(seqs), width), self.tok.pad_id, dtype=torch.long)
            where = torch.zeros((len(seqs), width), dtype=torch.bool)
            for row, (s, n) in enumerate(zip(seqs, counts)):
                inputs[row, : len(s) - 1] = torch.tensor(s[:-1])
                where[row, len(s) - 1 - n : len(s) - 1] = True
            logprobs = F.log_softmax(self.tuned.logits_at(inputs, where), dim=-1).cpu()
            for i, s, n, rows in zip(chunk, seqs, counts, logprobs.split(counts)):
                target = torch.tensor(s[len(s) - n :])
                out[i] = (rows.gather(1, target[:, None]).sum().item(), bool((rows.argmax(-1) == target).all()))
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
        """Greedy, batched with a KV cache (TunedModel.generate_ids); each request's `until` cuts its own text."""
        by_length: dict[int, list[int]] = {}
        for i, req in enumerate(requests):
            by_length.setdefault(req.args[1].get("max_gen_toks", self.max_new_tokens), []).append(i)
        out = [""] * len(requests)
        for new, which in by_length.items():
            ids = [([self.tok.bos_id] + self._encode(requests[i].args[0]))[-max(self.max_len - new, 1):] for i in which]
            for i, text in zip(which, self.tuned.complete_many(ids, new, batch_size=self.batch_size)):
                for stop in requests[i].args[1].get("until", []) or []:
                    text = text.split(stop)[0]
                out[i] = text
        return out


def _process_results(doc: dict, results: list) -> dict:
    loglikelihood, greedy = results[0]
    return {"token_perplexity": (loglikelihood, doc["target_tokens"]),
            "nll_per_token": (loglikelihood, doc["target_tokens"]), "acc": float(greedy)}


def _nll_per_token(items: list[tuple[float, int]]) -> float:
    """Summed negative log-likelihood over summed target tokens (not a mean of per-document sums)."""
    return -sum(ll for ll, _ in items) / max(sum(n for _, n in items), 1)


def _token_perplexity(items: list[tuple[float, int]]) -> float:
    return perplexity(_nll_per_token(items))


def local_tasks(tuned: TunedModel, held: dict[str, HeldOut], task_dir: Path) -> list:
    """One loglikelihood task per instruct source: its held-out prompt in the template as the context,
    the completion as the target, cut exactly as training cuts it (a dropped row is not in the task).

    Metrics: `token_perplexity` (exp of the summed NLL over the summed target tokens), `nll_per_token`
    and `acc` (greedy decoding reproduces the whole target).
    """
    from lm_eval.api.task import ConfigurableTask

    specs = tuned.instruct_specs()
    task_dir.mkdir(parents=True, exist_ok=True)
    tasks = []
    for source, h in held.items():
        if source not in specs or not h.samples:
            continue
        docs = task_dir / f"heldout_{source}.jsonl"
        with docs.open("w", encoding="utf-8") as f:
            for s in h.samples:
                cut = next(i for i, label in enumerate(s["labels"]) if label >= 0)  # where the completion starts
                target = [t for t, label in zip(s["tokens"][cut:], s["labels"][cut:]) if t not in tuned.tokenizer.stop_tokens]
                context = tuned.tokenizer.decode(s["tokens"][1:cut], skip_special_tokens=False, truncate_at_eos=False)
                f.write(json.dumps({"context": context, "target": tuned.tokenizer.decode(target),
                                    "target_tokens": len(target)}, ensure_ascii=False) + "\n")
        tasks.append(ConfigurableTask(config={
            "task": f"heldout_{source}",
            "dataset_path": "json",
            "dataset_kwargs": {"data_files": {"test": str(docs.resolve())}},
            "test_split": "test",
            "output_type": "loglikelihood",
            "doc_to_text": "{{context}}",
            "doc_to_target": "{{target}}",
            "target_delimiter": "",
            "process_results": _process_results,
            "metric_list": [
                {"metric": "token_perplexity", "aggregation": _token_perplexity, "higher_is_better": False},
                {"metric": "nll_per_token", "aggregation": _nll_per_token, "higher_is_better": False},
                {"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
            "metadata": {"version": 2.0},
        }))
    return tasks


def run_lm_eval(tuned: TunedModel, tasks: list, limit: int | None, batch_size: int) -> dict:
    """{task: {metric: value}} from lm-eval's simple_evaluate; tasks are names or Task objects."""
    import lm_eval

    results = lm_eval.simple_evaluate(model=TunedLM(tuned, batch_size), tasks=tasks, limit=limit, log_samples=False)
    return {task: {k.split(",")[0]: v for k, v in metrics.items() if isinstance(v, (int, float)) and k != "alias"}
            for task, metrics in results["results"].items()}
