"""OpenAI's legacy `logprobs` for make serve: the echoed prompt's (from the Scorer) and the generated tokens' (from
llama-server's completion_probabilities), each token's text from its bytes, offsets in characters."""

from __future__ import annotations

import asyncio
import codecs

from tuned.serve.engine import Scorer, token_text


class TextIds(list):
    """A text prompt's token ids, and whether the server put BOS first (`echo` leaves it out of the logprobs)."""

    bos_added = False


def sent_bytes(p: dict) -> bytes:
    """A token's bytes as llama-server reports them (its `bytes`, else its text)."""
    return bytes(p["bytes"]) if p.get("bytes") is not None else p["token"].encode()


def _offsets(raws: list[bytes], start: int) -> list[int]:
    """Each token's text_offset: the characters of the text before it (a token that starts inside a character
    starts at that character), from `start`."""
    decoder, offsets, at = codecs.getincrementaldecoder("utf-8")(errors="replace"), [], start
    for raw in raws:
        offsets.append(at)
        at += len(decoder.decode(raw))  # a partial character waits in the decoder for the token that ends it
    return offsets


async def echo(scorer: Scorer, ids: list[int], logprobs: int | None) -> tuple[str, dict | None]:
    """The echoed prompt: its text and, with `logprobs`, its logprobs in OpenAI's legacy layout."""
    # BOS that the server put before a text prompt (the model reads it, as in training) is not the client's: it is
    # in neither the text nor the logprobs, which list the text's own tokens, as a scoring client (lm-eval's
    # [ctxlen:-1]) counts them; the first one's log-probability is then given BOS. A client's own BOS (token ids
    # or special-token text) is listed.
    hidden = int(getattr(ids, "bos_added", False))
    text = scorer.detokenize(ids[hidden:])
    if logprobs is None:
        return text, None
    chosen, tops = await asyncio.to_thread(scorer.score, ids, logprobs)
    raws = [scorer.token_bytes(t) for t in ids[hidden:]]
    return text, {"tokens": [token_text(r) for r in raws], "token_logprobs": chosen[hidden:],
                  "top_logprobs": tops[hidden:], "text_offset": _offsets(raws, 0)}


async def of_generated(scorer: Scorer, probs: list[dict], top: int, start: int, ids: list[int],
                       generated: list[int]) -> dict:
    """llama-server's completion_probabilities in OpenAI's legacy layout: one entry per generated token, each
    token's text from its bytes (`bytes:\\x..` for part of a character), `top` alternatives plus the sampled
    token (OpenAI always lists it), text_offset in characters of the returned text, from `start`.

    llama-server leaves out a token that ends inside a UTF-8 character (its bytes come with the next entry's):
    such tokens are found from those bytes (the vocabulary's pieces) and their log-probabilities computed by
    the Scorer, fed the prompt and what was generated before them. `generated` (the ids so far) grows."""
    out: list[tuple[bytes, float, dict]] = []
    for p in probs:
        own, sent = scorer.token_bytes(int(p["id"])), sent_bytes(p)
        missing = scorer.split_pieces(sent[: len(sent) - len(own)]) if sent != own and sent.endswith(own) else []
        if missing:
            chosen, tops = await asyncio.to_thread(scorer.score, ids + generated + missing, top)
            for k, token in enumerate(missing, start=len(ids) + len(generated)):
                raw = scorer.token_bytes(token)
                out.append((raw, chosen[k], tops[k] if top else {token_text(raw): chosen[k]}))
            generated.extend(missing)
        entry = {token_text(sent_bytes(t)): t["logprob"] for t in p["top_logprobs"][:top]}
        entry.setdefault(token_text(own), p["logprob"])
        out.append((own, p["logprob"], entry))
        generated.append(int(p["id"]))
    raws = [raw for raw, _, _ in out]
    return {"tokens": [token_text(r) for r in raws], "token_logprobs": [lp for _, lp, _ in out],
            "top_logprobs": [entry for _, _, entry in out], "text_offset": _offsets(raws, start)}


def merge(a: dict | None, b: dict | None) -> dict | None:
    """The echo's logprobs, then the generated tokens'."""
    if a is None or b is None:
        return a or b
    return {k: a[k] + b[k] for k in a}
