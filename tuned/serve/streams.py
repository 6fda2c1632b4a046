"""Streamed answers of make serve's front (server-sent events, OpenAI's chunk layout): a completion's choices from
the engine's streams, merged as they come; a chat's stream passed through; either ends with an error event and
`[DONE]` when the engine fails part-way, and stops the engine's streams when the client goes away."""

from __future__ import annotations

import asyncio
import json
import time
import uuid

import httpx

from tuned.serve import logprobs
from tuned.serve.protocol import CompletionRequest, RequestError
from tuned.serve.watch import EngineDown


def _event(obj: dict) -> bytes:
    return b"data: " + json.dumps(obj).encode() + b"\n\n"


def _last(error: dict) -> bytes:
    """A stream's end after an error: the error as an event (the openai client raises it), then [DONE]."""
    return _event(error) + b"data: [DONE]\n\n"


class Streams:
    """The streaming half of the front (`app.Front` mixes it in: the engine client, slots, scorer and checks are
    the front's)."""

    def _chunk(self, cid: str, created: int, index: int, text: str, logprobs: dict | None,
               finish: str | None) -> bytes:
        return _event({"id": cid, "object": "text_completion", "created": created, "model": self.model_name,
                       "choices": [{"text": text, "index": index, "logprobs": logprobs, "finish_reason": finish}]})

    async def _stream_one(self, ids: list[int], req: CompletionRequest, index: int, queue: asyncio.Queue, cid: str,
                          created: int) -> tuple[int, int]:
        """One choice's engine stream, translated into OpenAI chunks on `queue`; returns its token counts. A stream
        that ends without the engine's last event is the engine dying: EngineDown."""
        at = 0
        if req.echo:
            text, lp = await logprobs.echo(self.scorer, ids, req.logprobs)
            at = len(text)
            await queue.put(self._chunk(cid, created, index, text, lp, "length" if req.max_tokens == 0 else None))
        if req.max_tokens == 0:
            return len(ids), 0
        body = self._engine_body(ids, req, index, stream=True)
        generated: list[int] = []
        try:
            async with self._slots, self.client.stream("POST", "/completion", json=body) as r:
                if r.status_code != 200:
                    self._engine_result(r.status_code, await r.aread())
                async for line in r.aiter_lines():
                    if not line.startswith("data: "):
                        continue
                    event = json.loads(line[6:])
                    if "error" in event:
                        self._engine_result(500, line[6:].encode())
                    lp = None
                    if req.logprobs is not None:
                        lp = await logprobs.of_generated(self.scorer, event.get("completion_probabilities") or [], req.logprobs,
                                                            at, ids, generated)
                    text = event.get("content", "")
                    at += len(text)
                    if event.get("stop"):
                        finish = "length" if event.get("stop_type") == "limit" else "stop"
                        await queue.put(self._chunk(cid, created, index, text, lp, finish))
                        return len(ids), int(event.get("tokens_predicted") or 0)
                    if text or lp:
                        await queue.put(self._chunk(cid, created, index, text, lp, None))
        except httpx.HTTPError as err:
            raise EngineDown from err
        raise EngineDown

    async def _stream(self, jobs: list[tuple[list[int], int]], req: CompletionRequest):
        cid, created, queue = f"cmpl-{uuid.uuid4().hex}", int(time.time()), asyncio.Queue()
        tasks = [asyncio.create_task(self._stream_one(ids, req, index, queue, cid, created)) for ids, index in jobs]
        try:
            done = asyncio.gather(*tasks)
            down = asyncio.ensure_future(self._down.wait())
            try:
                while not (done.done() and queue.empty()):
                    getter = asyncio.ensure_future(queue.get())
                    await asyncio.wait({getter, done, down}, return_when=asyncio.FIRST_COMPLETED)
                    if getter.done():
                        yield getter.result()
                        continue
                    getter.cancel()
                    if down.done():
                        raise EngineDown
                counts = done.result()
            finally:
                down.cancel()
        except RequestError as err:  # after the 200 headers: an error event the openai client raises on
            yield _last(err.body())
            return
        except (EngineDown, httpx.HTTPError):
            yield _last(self._unavailable().body())
            return
        finally:  # the client went away, the engine died, or we are done: stop every engine stream (frees its slot)
            for task in tasks:
                task.cancel()
        if req.stream_options is not None and req.stream_options.include_usage:
            prompt = sum(p for p, _ in counts[:: req.n])
            completion = sum(c for _, c in counts)
            yield _event({"id": cid, "object": "text_completion", "created": created, "model": self.model_name,
                          "choices": [], "usage": {"prompt_tokens": prompt, "completion_tokens": completion,
                                                   "total_tokens": prompt + completion}})
        yield b"data: [DONE]\n\n"

    async def _chat_stream(self, body: dict):
        """The engine's chat stream, event by event; anything but a `data:` event (an error body) becomes an error
        event in OpenAI's shape, and a stream the engine leaves without `[DONE]` ends with one (then `[DONE]`)."""
        finished = False
        try:
            async with self._slots, self.client.stream("POST", "/v1/chat/completions", json=body) as r:
                lines = r.aiter_lines()
                while True:
                    line = await self._on_engine(anext(lines, None), slot=False)  # the stream holds its slot
                    if line is None:
                        break
                    if not line.strip():
                        continue
                    if line.startswith("data: "):
                        finished = finished or line.strip() == "data: [DONE]"
                        if '"error"' in line[:20] and not finished:
                            yield _last(self._chat_error(line[6:]).body())
                            return
                        yield line.encode() + b"\n\n"
                    elif not line.startswith(("event:", "id:", "retry:", ":")):
                        yield _last(self._chat_error(line.removeprefix("error: ")).body())
                        return
        except (EngineDown, httpx.HTTPError):
            yield _last(self._unavailable().body())
            return
        if not finished:
            yield _last(self._unavailable().body())

    def _chat_error(self, raw: str) -> RequestError:
        try:
            self._engine_result(500, raw.encode())
        except RequestError as err:
            return err
        return RequestError(500, f"The engine sent: {raw[:300]}", kind="server_error")
