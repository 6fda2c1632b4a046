"""The OpenAI-compatible front of `make serve`: one thin ASGI app over the engines of `engine.py` (llama-server
decodes every generation, many at once; the Scorer computes the prompt's log-probabilities for `echo`).

What the front decides, and nothing else:

- **The template.** In the default mode (`serve.template: data`) a *text* prompt of a generation request is
  sent as `prompt_prefix + prompt + prompt_suffix` (export.json, from the training formatter), so code written
  for text-davinci-002 sends the raw prompt. Never added: to a request with `echo: true` (it scores exactly
  the text the client sent; a scoring client writes the template into its context itself), to token-id
  prompts (the client chose every token), and in `serve.template: raw` (OpenAI's semantics exactly).
- **OpenAI's request schema and ranges** (`validate`): unknown keys, `logprobs` > 5, `temperature` outside
  0..2, ... get OpenAI's 400 `invalid_request_error` naming the parameter; an unknown `model` 404
  `model_not_found`; a prompt + `max_tokens` over a slot's context 400 `context_length_exceeded`.
- **OpenAI's sampling defaults**: no repetition penalty, top-k or min-p (llama.cpp's defaults are 1.1, 40
  and 0.05, which change even a temperature-0 answer); `max_tokens` 16.
- `n` and lists of prompts fan out into single engine requests sent together, so the engine batches them;
  choices are indexed prompt-major, as OpenAI does; streamed too, each chunk with its choice's index.
- `max_tokens: 0` with `echo`: the prompt's log-probabilities and no text.
- `model` in every response is the served name.
- **A key** (`api_key`): OpenAI's Bearer check and 401 bodies. The engine listens on loopback behind a
  random key of its own: the front is its only client.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import os
import time
import uuid
from pathlib import Path

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from custom_datasets.tuned.engine import LlamaServer, Scorer

MAX_BODY = 8 * 1024 * 1024  # bytes; a larger request body gets 413
# OpenAI's legacy Completions parameters: (type check, range check or None, description for the error)
_NUMBER = (int, float)
COMPLETION_PARAMS = {
    "model": (str, None, "a string"),
    "prompt": (None, None, ""),
    "max_tokens": (int, lambda v: v >= 0, "an integer >= 0"),
    "temperature": (_NUMBER, lambda v: 0 <= v <= 2, "a number between 0 and 2"),
    "top_p": (_NUMBER, lambda v: 0 <= v <= 1, "a number between 0 and 1"),
    "n": (int, lambda v: 1 <= v <= 128, "an integer between 1 and 128"),
    "stream": (bool, None, "a boolean"),
    "stream_options": (dict, None, "an object"),
    "logprobs": (int, lambda v: 0 <= v <= 5, "an integer between 0 and 5"),
    "echo": (bool, None, "a boolean"),
    "stop": ((str, list), None, "a string or a list of up to 4 strings"),
    "presence_penalty": (_NUMBER, lambda v: -2 <= v <= 2, "a number between -2 and 2"),
    "frequency_penalty": (_NUMBER, lambda v: -2 <= v <= 2, "a number between -2 and 2"),
    "best_of": (int, lambda v: v >= 1, "an integer >= 1"),
    "logit_bias": (dict, None, "an object of token id -> bias between -100 and 100"),
    "seed": (int, None, "an integer"),
    "suffix": (str, None, "a string"),
    "user": (str, None, "a string"),
    # llama.cpp's samplers and vLLM's ignore_eos, as vLLM and llama-cpp-python accept them beside OpenAI's
    # (extra_body): off by default
    "top_k": (int, lambda v: v >= 0, "an integer >= 0 (0: off)"),
    "min_p": (_NUMBER, lambda v: 0 <= v <= 1, "a number between 0 and 1"),
    "repeat_penalty": (_NUMBER, lambda v: v > 0, "a number > 0 (1: off)"),
    "ignore_eos": (bool, None, "a boolean (vLLM's: generate max_tokens tokens whatever comes)"),
}
OPENAI_DEFAULTS = {"max_tokens": 16, "temperature": 1.0, "top_p": 1.0, "n": 1, "top_k": 0, "min_p": 0.0,
                   "repeat_penalty": 1.0, "presence_penalty": 0.0, "frequency_penalty": 0.0}
TEMPLATE_MODES = ("data", "raw")
SERVE_DEFAULTS = {"host": "127.0.0.1", "port": 8000, "model_name": None, "gguf": None, "n_ctx": None, "parallel": 8,
            "n_threads": None, "kv_cache": "f16", "template": "data", "api_key": None, "allow_open": False}


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def options(cfg) -> dict:
    """serve.* of a config over SERVE_DEFAULTS, the key from $SERVE_API_KEY if unset; ValueError for an unknown key and for
    a host other than loopback with no key (unless allow_open)."""
    opts = {**SERVE_DEFAULTS, **(cfg.get("serve") or {})}
    unknown = set(opts) - set(SERVE_DEFAULTS)
    if unknown:
        raise ValueError(f"serve: unknown key(s) {sorted(unknown)}; known: {sorted(SERVE_DEFAULTS)}")
    opts["api_key"] = opts["api_key"] or os.environ.get("SERVE_API_KEY") or None
    if not is_loopback(str(opts["host"])) and not opts["api_key"] and not opts["allow_open"]:
        raise ValueError(f"serve.host={opts['host']} opens the model to the network with no key. Set serve.api_key=... "
                         "(or SERVE_API_KEY) so that clients must send it, or serve.allow_open=true if anyone who "
                         "reaches the port may use the model.")
    return opts


def served_gguf(export_dir: Path, wanted: str | None) -> tuple[Path, dict]:
    """The GGUF of export_dir to serve (`wanted`: f16, model-f16.gguf, ...; None: the first) and export.json."""
    manifest_path = export_dir / "export.json"
    if not manifest_path.is_file():
        raise ValueError(f"{manifest_path} not found: run make export CONFIG=... first.")
    manifest = json.loads(manifest_path.read_text())
    names = manifest.get("gguf") or []
    if wanted is not None:
        names = [n for n in names if n in (wanted, f"model-{wanted}.gguf")]
    if not names:
        raise ValueError(f"{export_dir}: no GGUF{f' {wanted!r}' if wanted else ''} in this export (it has "
                         f"{manifest.get('gguf')}); export with export.gguf=[f16] (or f32, q8_0, q4_k_m).")
    return export_dir / names[0], manifest




class RequestError(Exception):
    """An OpenAI-style error response: status, message, param, code."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def response(self) -> JSONResponse:
        return JSONResponse({"error": {"message": self.message, "type": self.kind, "param": self.param,
                                       "code": self.code}}, status_code=self.status)


def _is_number(value, kinds) -> bool:
    return isinstance(value, kinds) and not (isinstance(value, bool) and kinds is not bool)


def validate(body: dict, model_name: str) -> dict:
    """A completions request checked against OpenAI's schema and ranges, with OpenAI's defaults filled in."""
    unknown = sorted(set(body) - set(COMPLETION_PARAMS))
    if unknown:
        raise RequestError(400, f"Unrecognized request argument supplied: {unknown[0]}", param=unknown[0])
    for key, value in body.items():
        kinds, check, what = COMPLETION_PARAMS[key]
        if value is None or kinds is None:
            continue
        if not _is_number(value, kinds) or (check is not None and not check(value)):
            raise RequestError(400, f"{value!r} is not valid for '{key}': expected {what}.", param=key)
    if body.get("model") not in (None, model_name):
        raise RequestError(404, f"The model '{body['model']}' does not exist; this server serves '{model_name}'.",
                           param="model", code="model_not_found")
    if body.get("suffix"):
        raise RequestError(400, "suffix is not supported: this model completes a prompt, it does not insert.",
                           param="suffix")
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else (stop or [])
    if len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
        raise RequestError(400, f"{body.get('stop')!r} is not valid for 'stop': expected a string or a list of up to "
                                "4 non-empty strings.", param="stop")
    bias = body.get("logit_bias") or {}
    try:
        bias = [[int(k), float(v)] for k, v in bias.items()]
    except (TypeError, ValueError):
        raise RequestError(400, "logit_bias maps token ids (as strings) to numbers.", param="logit_bias") from None
    if not all(-100 <= v <= 100 for _, v in bias):
        raise RequestError(400, "logit_bias values must be between -100 and 100.", param="logit_bias")
    req = {**OPENAI_DEFAULTS, **{k: v for k, v in body.items() if v is not None}, "stop": stop, "logit_bias": bias}
    best_of = req.get("best_of", req["n"])
    if best_of != req["n"]:
        raise RequestError(400, f"best_of={best_of} with n={req['n']}: only best_of equal to n (or unset) is supported.",
                           param="best_of")
    if req.get("stream") and req.get("stream_options") and set(req["stream_options"]) - {"include_usage"}:
        raise RequestError(400, "stream_options takes only include_usage.", param="stream_options")
    prompt = body.get("prompt", "")
    if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and all(_is_number(t, int) for t in prompt)):
        prompts = [prompt]
    elif isinstance(prompt, list) and prompt and all(
            isinstance(p, str) or (isinstance(p, list) and p and all(_is_number(t, int) for t in p)) for p in prompt):
        prompts = list(prompt)
    else:
        raise RequestError(400, "prompt must be a string, a list of strings, a list of token ids or a list of lists "
                                "of token ids (none empty).", param="prompt")
    req["prompts"] = prompts
    return req


class Front:
    """The ASGI app (`.app`) over one LlamaServer and one Scorer on the same GGUF.

    Args:
        engine: the started llama-server.
        scorer: tokenizer + echo scorer.
        model_name: the name clients pass as `model`, and every response's `model`.
        prefix, suffix: the template around a text prompt (export.json).
        template: "data" (the template on text prompts of generation requests) or "raw" (never).
        api_key: when set, every /v1 request needs `Authorization: Bearer <api_key>`.
    """

    def __init__(self, engine: LlamaServer, scorer: Scorer, model_name: str, prefix: str = "", suffix: str = "",
                 template: str = "data", api_key: str | None = None):
        if template not in TEMPLATE_MODES:
            raise ValueError(f"serve.template={template!r}: expected one of {list(TEMPLATE_MODES)}")
        self.engine, self.scorer, self.model_name = engine, scorer, model_name
        self.prefix, self.suffix, self.template, self.api_key = prefix, suffix, template, api_key or None
        self.client = httpx.AsyncClient(base_url=engine.url, headers=engine.headers, timeout=httpx.Timeout(None),
                                        limits=httpx.Limits(max_connections=None, max_keepalive_connections=64))
        self.app = Starlette(routes=[
            Route("/health", self.health, methods=["GET"]),
            Route("/v1/models", self.models, methods=["GET"]),
            Route("/v1/completions", self.completions, methods=["POST"]),
            Route("/v1/chat/completions", self.chat, methods=["POST"]),
        ], exception_handlers={404: self._not_found, 405: self._not_found})

    # -- plumbing ---------------------------------------------------------------------------------------------

    async def _not_found(self, request: Request, exc) -> JSONResponse:
        return RequestError(404, f"Invalid URL ({request.method} {request.url.path})").response()

    def _check_key(self, request: Request) -> None:
        if self.api_key is None:
            return
        header = request.headers.get("authorization", "")
        if not header:
            raise RequestError(401, "You didn't provide an API key. You need to provide your API key in an "
                                    "Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY): "
                                    "the key this server was started with (serve.api_key).")
        given = header[7:] if header[:7].lower() == "bearer " else ""
        if not hmac.compare_digest(given.encode(), self.api_key.encode()):
            shown = f"{given[:3]}***{given[-2:]}" if len(given) > 5 else "***"
            raise RequestError(401, f"Incorrect API key provided: {shown}. The key is the one this server was "
                                    "started with (serve.api_key).", code="invalid_api_key")

    async def _body(self, request: Request) -> dict:
        raw = b""
        async for chunk in request.stream():
            raw += chunk
            if len(raw) > MAX_BODY:
                raise RequestError(413, f"The request body is over {MAX_BODY} bytes.")
        if not raw.strip():
            raise RequestError(400, "The request body is empty: send a JSON object (Content-Type: application/json).")
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise RequestError(400, f"We could not parse the JSON body of your request: {err}") from None
        if not isinstance(body, dict):
            raise RequestError(400, "The request body must be a JSON object.")
        return body

    async def health(self, request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def models(self, request: Request) -> Response:
        try:
            self._check_key(request)
        except RequestError as err:
            return err.response()
        return JSONResponse({"object": "list", "data": [
            {"id": self.model_name, "object": "model", "created": 0, "owned_by": "me"}]})

    # -- /v1/completions --------------------------------------------------------------------------------------

    def _ids(self, prompt: str | list[int], req: dict) -> list[int]:
        """The token ids the model is fed for one prompt of `req` (the template rules of the module docstring)."""
        if isinstance(prompt, list):
            bad = [t for t in prompt if not 0 <= t < self.scorer.n_vocab]
            if bad:
                raise RequestError(400, f"Token id {bad[0]} is out of range (vocabulary of {self.scorer.n_vocab}).",
                                   param="prompt")
            return list(prompt)
        if self.template == "data" and not req.get("echo"):
            prompt = self.prefix + prompt + self.suffix
        return self.scorer.tokenize(prompt)

    def _check_length(self, ids: list[int], req: dict) -> None:
        room = self.engine.n_ctx
        if len(ids) + req["max_tokens"] > room:
            raise RequestError(400, f"This model's maximum context length is {room} tokens, however you requested "
                                    f"{len(ids) + req['max_tokens']} tokens ({len(ids)} in your prompt; "
                                    f"{req['max_tokens']} for the completion). Please reduce your prompt; or "
                                    "completion length.", param="prompt", code="context_length_exceeded")

    def _engine_body(self, ids: list[int], req: dict, choice: int, stream: bool) -> dict:
        seed = req.get("seed")
        body = {"prompt": ids, "n_predict": req["max_tokens"], "temperature": req["temperature"], "top_p": req["top_p"],
                "top_k": req["top_k"], "min_p": req["min_p"], "repeat_penalty": req["repeat_penalty"],
                "presence_penalty": req["presence_penalty"], "frequency_penalty": req["frequency_penalty"],
                "stop": req["stop"], "n_probs": req.get("logprobs") or 0, "logit_bias": req["logit_bias"],
                "ignore_eos": bool(req.get("ignore_eos")), "return_tokens": True, "stream": stream, "cache_prompt": True}
        if seed is not None:
            body["seed"] = seed + choice  # n samples of one seeded request differ, and repeat
        return body

    async def _echo(self, ids: list[int], req: dict) -> tuple[str, dict | None]:
        """The echoed prompt: its text and, with `logprobs`, its logprobs in OpenAI's legacy layout."""
        hidden = int(ids[:1] == [self.scorer.bos])  # BOS is in the tokens (the model saw it), not in the text
        text = self.scorer.detokenize(ids[hidden:])
        if req.get("logprobs") is None:
            return text, None
        chosen, tops = await asyncio.to_thread(self.scorer.score, ids, req["logprobs"])
        tokens = [self.scorer.piece(t) for t in ids]
        offsets, at = [], 0
        for i, piece in enumerate(tokens):
            offsets.append(at)
            at += len(piece) if i >= hidden else 0
        return text, {"tokens": tokens, "token_logprobs": chosen, "top_logprobs": tops, "text_offset": offsets}

    def _generated_logprobs(self, probs: list[dict], start: int) -> dict:
        tokens, chosen, tops, offsets, at = [], [], [], [], start
        for p in probs:
            tokens.append(p["token"])
            chosen.append(p["logprob"])
            tops.append({t["token"]: t["logprob"] for t in p["top_logprobs"]})
            offsets.append(at)
            at += len(p["token"])
        return {"tokens": tokens, "token_logprobs": chosen, "top_logprobs": tops, "text_offset": offsets}

    @staticmethod
    def _merge_logprobs(a: dict | None, b: dict | None) -> dict | None:
        if a is None or b is None:
            return a or b
        return {k: a[k] + b[k] for k in a}

    async def _generate(self, ids: list[int], req: dict, choice: int) -> dict:
        """One choice, not streamed: the engine's answer in OpenAI's layout (+ the echo)."""
        echo_text, echo_lp = await self._echo(ids, req) if req.get("echo") else ("", None)
        if req["max_tokens"] == 0:
            return {"text": echo_text, "logprobs": echo_lp, "finish_reason": "length",
                    "usage": (len(ids), 0)}
        r = await self.client.post("/completion", json=self._engine_body(ids, req, choice, stream=False))
        out = self._engine_result(r.status_code, r.content)
        gen_lp = (self._generated_logprobs(out.get("completion_probabilities") or [], len(echo_text))
                  if req.get("logprobs") is not None else None)
        return {"text": echo_text + out["content"], "logprobs": self._merge_logprobs(echo_lp, gen_lp),
                "finish_reason": "length" if out.get("stop_type") == "limit" else "stop",
                "usage": (len(ids), int(out.get("tokens_predicted") or 0))}

    @staticmethod
    def _engine_result(status: int, content: bytes) -> dict:
        try:
            out = json.loads(content)
        except json.JSONDecodeError:
            out = {}
        if status != 200 or "error" in out:
            error = out.get("error") if isinstance(out.get("error"), dict) else {}
            code = 400 if status == 400 else 503
            raise RequestError(code, f"The engine refused the request: {error.get('message') or content[:300]!r}",
                               kind="invalid_request_error" if code == 400 else "server_error")
        return out

    def _response(self, req: dict, choices: list[dict]) -> dict:
        prompt_tokens = sum(c["usage"][0] for c in choices[:: req["n"]])
        completion_tokens = sum(c["usage"][1] for c in choices)
        return {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": self.model_name,
                "choices": [{"text": c["text"], "index": i, "logprobs": c["logprobs"], "finish_reason": c["finish_reason"]}
                            for i, c in enumerate(choices)],
                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                          "total_tokens": prompt_tokens + completion_tokens}}

    async def completions(self, request: Request) -> Response:
        try:
            self._check_key(request)
            req = validate(await self._body(request), self.model_name)
            ids = [self._ids(p, req) for p in req["prompts"]]
            for one in ids:
                self._check_length(one, req)
            jobs = [(one, i * req["n"] + j) for i, one in enumerate(ids) for j in range(req["n"])]
            if req.get("stream"):
                return StreamingResponse(self._stream(jobs, req), media_type="text/event-stream")
            choices = await asyncio.gather(*(self._generate(one, req, index) for one, index in jobs))
            return JSONResponse(self._response(req, list(choices)))
        except RequestError as err:
            return err.response()
        except httpx.HTTPError as err:
            return RequestError(503, f"The engine is not answering: {err}", kind="server_error").response()

    def _chunk(self, cid: str, created: int, index: int, text: str, logprobs: dict | None,
               finish: str | None) -> bytes:
        return b"data: " + json.dumps({"id": cid, "object": "text_completion", "created": created,
                                       "model": self.model_name, "choices": [
                                           {"text": text, "index": index, "logprobs": logprobs,
                                            "finish_reason": finish}]}).encode() + b"\n\n"

    async def _stream_one(self, ids: list[int], req: dict, index: int, queue: asyncio.Queue, cid: str,
                          created: int) -> tuple[int, int]:
        """One choice's engine stream, translated into OpenAI chunks on `queue`; returns its token counts."""
        at = 0
        if req.get("echo"):
            text, lp = await self._echo(ids, req)
            at = len(text)
            await queue.put(self._chunk(cid, created, index, text, lp, "length" if req["max_tokens"] == 0 else None))
        if req["max_tokens"] == 0:
            return len(ids), 0
        body = self._engine_body(ids, req, index, stream=True)
        async with self.client.stream("POST", "/completion", json=body) as r:
            if r.status_code != 200:
                self._engine_result(r.status_code, await r.aread())
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    self._engine_result(500, line[6:].encode())
                lp = None
                if req.get("logprobs") is not None:
                    lp = self._generated_logprobs(event.get("completion_probabilities") or [], at)
                text = event.get("content", "")
                at += len(text)
                if event.get("stop"):
                    finish = "length" if event.get("stop_type") == "limit" else "stop"
                    await queue.put(self._chunk(cid, created, index, text, lp, finish))
                    return len(ids), int(event.get("tokens_predicted") or 0)
                if text or lp:
                    await queue.put(self._chunk(cid, created, index, text, lp, None))
        return len(ids), 0

    async def _stream(self, jobs: list[tuple[list[int], int]], req: dict):
        cid, created, queue = f"cmpl-{uuid.uuid4().hex}", int(time.time()), asyncio.Queue()
        tasks = [asyncio.create_task(self._stream_one(ids, req, index, queue, cid, created)) for ids, index in jobs]
        done = asyncio.gather(*tasks)
        try:
            while not (done.done() and queue.empty()):
                getter = asyncio.ensure_future(queue.get())
                await asyncio.wait({getter, done}, return_when=asyncio.FIRST_COMPLETED)
                if getter.done():
                    yield getter.result()
                else:
                    getter.cancel()
            try:
                counts = done.result()
            except RequestError as err:
                yield b"data: " + json.dumps({"error": {"message": err.message, "type": err.kind, "param": err.param,
                                                        "code": err.code}}).encode() + b"\n\n"
                return
            if (req.get("stream_options") or {}).get("include_usage"):
                prompt = sum(p for p, _ in counts[:: req["n"]])
                completion = sum(c for _, c in counts)
                yield b"data: " + json.dumps({"id": cid, "object": "text_completion", "created": created,
                                              "model": self.model_name, "choices": [],
                                              "usage": {"prompt_tokens": prompt, "completion_tokens": completion,
                                                        "total_tokens": prompt + completion}}).encode() + b"\n\n"
            yield b"data: [DONE]\n\n"
        finally:  # the client went away (or we are done): stop every engine stream, which frees its slot
            for task in tasks:
                task.cancel()

    # -- /v1/chat/completions ---------------------------------------------------------------------------------

    async def chat(self, request: Request) -> Response:
        """Passed to the engine's own /v1/chat/completions (the GGUF's chat template), after the key, the body and
        the model are checked; OpenAI's sampling defaults; `model` rewritten to the served name."""
        try:
            self._check_key(request)
            body = await self._body(request)
            if body.get("model") not in (None, self.model_name):
                raise RequestError(404, f"The model '{body['model']}' does not exist; this server serves "
                                        f"'{self.model_name}'.", param="model", code="model_not_found")
            if not isinstance(body.get("messages"), list) or not body["messages"]:
                raise RequestError(400, "messages must be a non-empty list.", param="messages")
            body = {"top_k": 0, "min_p": 0.0, "repeat_penalty": 1.0, **body, "model": self.model_name}
            if body.get("stream"):
                return StreamingResponse(self._chat_stream(body), media_type="text/event-stream")
            r = await self.client.post("/v1/chat/completions", json=body)
            out = self._engine_result(r.status_code, r.content)
            return JSONResponse({**out, "model": self.model_name})
        except RequestError as err:
            return err.response()
        except httpx.HTTPError as err:
            return RequestError(503, f"The engine is not answering: {err}", kind="server_error").response()

    async def _chat_stream(self, body: dict):
        async with self.client.stream("POST", "/v1/chat/completions", json=body) as r:
            async for line in r.aiter_lines():
                if line:
                    yield line.encode() + b"\n\n"

    async def aclose(self) -> None:
        await self.client.aclose()
