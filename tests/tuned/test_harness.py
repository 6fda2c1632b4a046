"""lm-eval through our wrapper: no request fails on its length, scores equal a plain forward pass,
and the local task's metrics are per token and cannot overflow."""

import math
from types import SimpleNamespace

import pytest
import torch
from support import tiny_config

from tuned import TunedModel
from tuned.harness import TunedLM, _nll_per_token, _token_perplexity


@pytest.fixture(scope="module")
def lm(tiny_checkpoint, tmp_path_factory):
    return TunedLM(TunedModel(tiny_config(tiny_checkpoint, tmp_path_factory.mktemp("run"))), batch_size=2)


def _oracle(lm, context: str, continuation: str) -> float:
    """Sum of log-probs of the continuation's tokens, one whole forward pass, no batching."""
    enc = lambda s: lm.tok.encode(s, add_bos=False, add_eos=False)  # noqa: E731
    ctx, cont = [lm.tok.bos_id] + enc(context), enc(continuation)
    with torch.no_grad():
        logprobs = torch.log_softmax(lm.tuned.model(torch.tensor([ctx + cont]))[0].float(), -1)
    return sum(logprobs[len(ctx) - 1 + i, t].item() for i, t in enumerate(cont))


def test_loglikelihood_equals_a_plain_forward_pass_in_request_order(lm):
    requests = [("The capital of France is", " Paris, of course."), ("Two plus two", " is four"),
                ("A long context " * 20, " short"), ("Hi", " there")]
    got = lm.loglikelihood([SimpleNamespace(args=r) for r in requests])
    for (ll, _), r in zip(got, requests):
        assert ll == pytest.approx(_oracle(lm, *r), rel=1e-5, abs=1e-4)


def test_a_continuation_longer_than_max_seq_len_is_scored_not_a_crash(lm):
    long = " ".join(f"word{i}" for i in range(600))  # far over max_seq_len=256
    ((ll, greedy),) = lm.loglikelihood([SimpleNamespace(args=("Write a lot:", long))])
    assert math.isfinite(ll) and ll < 0 and greedy is False
    rolling = lm.loglikelihood_rolling([SimpleNamespace(args=(long,))])
    assert math.isfinite(rolling[0])


def test_local_task_metrics_are_per_token_and_never_overflow():
    items = [(-10.0, 5), (-30.0, 5)]  # two documents: 40 nats over 10 tokens
    assert _nll_per_token(items) == pytest.approx(4.0)
    assert _token_perplexity(items) == pytest.approx(math.exp(4.0))
    huge = [(-900.0, 1)] * 3  # lm-eval's per-document `perplexity` raises OverflowError here
    assert math.isfinite(_token_perplexity(huge))
