"""The OpenAI-compatible front of `make serve`: one thin ASGI app over the engines of `engine.py` (llama-server
decodes every generation, many at once; the Scorer computes the prompt's log-probabilities for `echo`).

What the front decides, and nothing else:

- **The template.** In the default mode (`serve.template: data`) a *text* prompt of a generation request is
  sent as `prompt_prefix + prompt + prompt_suffix` (export.json, from the training formatter), so code written
  for text-davinci-002 sends the raw prompt. Never added: to a request with `echo: true` (it scores exactly
  the text the client sent; a scoring client writes the template into its context itself), to token-id
  prompts (the client chose every token), and in `serve.template: raw` (OpenAI's semantics exactly).
- **OpenAI's request schema and ranges** (`protocol.py`, pydantic, one schema for completions and chat): unknown
  keys, `logprobs` > 5, `temperature` outside 0..2, a chat role OpenAI does not have, ... get OpenAI's 400
  `invalid_request_error` naming the parameter; no `model` 400, an unknown one 404 `model_not_found`; a prompt
  (or a chat, through the engine's own template) + `max_tokens` over a slot's context 400
  `context_length_exceeded`, a text too long to fit refused before it is tokenized. All before the engine.
- **The engine's watch**: a dead or hung llama-server is noticed (within 0.2 s dead, `hang_after` s hung), every
  waiting request answered (503; a stream: an error event, then `[DONE]`), /health 503 while it is down, the
  engine reaped and started again (`serve.max_restarts` failed starts in a row: make serve exits non-zero).
- **logprobs** as OpenAI gives them: `logprobs: 0` the sampled tokens' own, the sampled token always in
  `top_logprobs`, tokens and `text_offset` from the tokens' bytes (part of a UTF-8 character: `bytes:\\x..`).
- **BOS**: a text prompt gets it as the GGUF says (as in training). The model reads it; an echo's text and
  logprobs leave it out (they are the client's text and its tokens, as a scoring client counts them); usage counts it.
- **OpenAI's sampling defaults**: no repetition penalty, top-k or min-p (llama.cpp's defaults are 1.1, 40
  and 0.05, which change even a temperature-0 answer); `max_tokens` 16.
- `n` and lists of prompts fan out into single engine requests sent together, so the engine batches them;
  choices are indexed prompt-major, as OpenAI does; streamed too, each chunk with its choice's index.
- `max_tokens: 0` with `echo`: the prompt's log-probabilities and no text.
- `model` in every response is the served name (`serve.model_name`: a list gives aliases, the first answers);
  `/v1/engines/{model}/completions` is `/v1/completions` for the openai 0.28 client's `engine=`.
- **A key** (`api_key`): OpenAI's Bearer check and 401 bodies. The engine listens on loopback behind a
  random key of its own: the front is its only client.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import hmac
import ipaddress
import json
import os
import socket
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from tuned.serve.engine import LlamaServer, Scorer, token_text
from tuned.serve.protocol import ChatRequest, CompletionRequest, RequestError, parse

MAX_BODY = 8 * 1024 * 1024  # bytes; a larger request body gets 413
TEMPLATE_MODES = ("data", "raw")
SERVE_DEFAULTS = {"host": "127.0.0.1", "port": 8000, "model_name": None, "gguf": None, "n_ctx": None, "parallel": 8,
                  "n_threads": None, "kv_cache": "f16", "template": "data", "api_key": None, "allow_open": False,
                  "max_restarts": 3}


def is_loopback(host: str) -> bool:
    """localhost, 127.0.0.0/8 in any form the C library accepts (127.1 too), ::1."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        return ipaddress.ip_address(socket.inet_aton(host)).is_loopback  # 127.1, 2130706433, ...
    except OSError:
        return False


def options(cfg) -> dict:
    """serve.* of a config over SERVE_DEFAULTS, the key from $SERVE_API_KEY if unset, model_name as a list (default:
    output_dir's name; the first names responses); ValueError for an unknown key and for a host other than loopback
    with no key (unless allow_open)."""
    opts = {**SERVE_DEFAULTS, **(cfg.get("serve") or {})}
    unknown = set(opts) - set(SERVE_DEFAULTS)
    if unknown:
        raise ValueError(f"serve: unknown key(s) {sorted(unknown)}; known: {sorted(SERVE_DEFAULTS)}")
    opts["api_key"] = opts["api_key"] or os.environ.get("SERVE_API_KEY") or None
    names = opts["model_name"] or Path(str(cfg.output_dir)).name
    opts["model_name"] = [str(names)] if isinstance(names, str) else [str(n) for n in names]  # the first answers
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




def _sent_bytes(p: dict) -> bytes:
    """A token's bytes as llama-server reports them (its `bytes`, else its text)."""
    return bytes(p["bytes"]) if p.get("bytes") is not None else p["token"].encode()


class EngineDown(Exception):
    """The engine died or hung while a request waited on it."""


class Front:
    """The ASGI app (`.app`) over one LlamaServer and one Scorer on the same GGUF, and the engine's watch: a dead
    engine (or one that stops answering its /health) is noticed, every request waiting on it answered with a 503
    (a stream: an error event, then `[DONE]`), /health says unavailable, and the engine is reaped and started again;
    after `max_restarts` failed starts in a row `on_fatal` is called (make serve then exits non-zero).

    Args:
        engine: the started llama-server.
        scorer: tokenizer + echo scorer.
        model_name: the name clients pass as `model` (a list: aliases, the first the name responses carry).
        prefix, suffix: the template around a text prompt (export.json).
        template: "data" (the template on text prompts of generation requests) or "raw" (never).
        api_key: when set, every /v1 request needs `Authorization: Bearer <api_key>`.
        max_restarts: failed engine starts in a row before giving up.
        hang_after: seconds without an answer to /health before a live engine counts as hung.
    """

    def __init__(self, engine: LlamaServer, scorer: Scorer, model_name: str | list[str], prefix: str = "",
                 suffix: str = "", template: str = "data", api_key: str | None = None, max_restarts: int = 3,
                 hang_after: float = 5.0, on_fatal: Callable[[], None] | None = None):
        if template not in TEMPLATE_MODES:
            raise ValueError(f"serve.template={template!r}: expected one of {list(TEMPLATE_MODES)}")
        names = [model_name] if isinstance(model_name, str) else [str(n) for n in model_name]
        if not names or not all(names):
            raise ValueError(f"serve.model_name={model_name!r}: a name, or a list of names (aliases)")
        self.engine, self.scorer, self.names, self.model_name = engine, scorer, names, names[0]
        self.prefix, self.suffix, self.template, self.api_key = prefix, suffix, template, api_key or None
        self.max_restarts, self.hang_after, self.on_fatal = max_restarts, hang_after, on_fatal
        self.exit_code, self.restarts, self.down_reason = 0, 0, None
        self.client = self._engine_client()
        self._down: asyncio.Event | None = None
        self._slots: asyncio.Semaphore | None = None
        self._watcher: asyncio.Task | None = None
        routes = [Route("/health", self.health, methods=["GET"]),
                  Route("/v1/models", self.models, methods=["GET"]),
                  Route("/v1/models/{model:path}", self.model, methods=["GET"]),
                  Route("/v1/completions", self.completions, methods=["POST"]),
                  Route("/v1/engines/{model:path}/completions", self.completions, methods=["POST"]),
                  Route("/v1/chat/completions", self.chat, methods=["POST"])]
        self.app = Starlette(routes=routes, exception_handlers={404: self._not_found, 405: self._not_allowed},
                             lifespan=self._lifespan)

    # -- the engine's watch -----------------------------------------------------------------------------------

    def _engine_client(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=self.engine.url, headers=self.engine.headers, timeout=httpx.Timeout(None),
                                 limits=httpx.Limits(max_connections=None, max_keepalive_connections=64))

    @contextlib.asynccontextmanager
    async def _lifespan(self, app):
        self._down = asyncio.Event()
        # at most one engine request a slot: the rest wait here, not in llama-server's HTTP threads (parallel + 4
        # of them), which keeps some free for its /health, so a busy engine is never taken for a hung one
        self._slots = asyncio.Semaphore(self.engine.parallel)
        self._watcher = asyncio.create_task(self._watch())
        try:
            yield
        finally:
            self._watcher.cancel()
            await self.client.aclose()

    @property
    def healthy(self) -> bool:
        return self.down_reason is None

    async def _watch(self, poll: float = 0.2) -> None:
        """Every `poll` s: has the engine exited? Every second: does it answer /health (any answer; llama-server
        answers it from its HTTP threads while its slots decode)? Either failing: `_recover`."""
        last_answer, next_ping = time.monotonic(), 0.0
        while True:
            await asyncio.sleep(poll)
            why = None
            if not self.engine.alive():
                code = self.engine.proc.returncode if self.engine.proc is not None else None
                why = f"exited ({'signal %d' % -code if code is not None and code < 0 else 'code %s' % code})"
            elif time.monotonic() >= next_ping:
                next_ping = time.monotonic() + 1.0
                try:
                    await self.client.get("/health", timeout=1.0)
                    last_answer = time.monotonic()
                except httpx.HTTPError:
                    if time.monotonic() - last_answer >= self.hang_after:
                        why = f"stopped answering for {time.monotonic() - last_answer:.0f} s (hung)"
            if why:
                await self._recover(why)
                last_answer, next_ping = time.monotonic(), 0.0
                if not self.healthy:
                    return

    def _say(self, line: str) -> None:
        print(f"make serve: {line}", file=sys.stderr, flush=True)

    async def _recover(self, why: str) -> None:
        """Marks the engine down (waiting requests get their 503 / error event at once), kills and reaps it, starts
        it again; `max_restarts` failed starts in a row: `on_fatal` with the engine's last lines."""
        self.down_reason = f"the engine {why}"
        self._down.set()
        tail = "\n  ".join(list(self.engine.log)[-10:])
        self._say(f"llama-server {why}; its last lines:\n  {tail}\nrestarting it")
        await asyncio.to_thread(self.engine.kill)
        await self.client.aclose()
        for attempt in range(1, self.max_restarts + 1):
            try:
                await asyncio.to_thread(self.engine.start)
            except (RuntimeError, TimeoutError, OSError) as err:
                self._say(f"restart {attempt} of {self.max_restarts} failed: {str(err)[-2000:]}")
                continue
            self.client = self._engine_client()
            self.restarts += 1
            self._down = asyncio.Event()
            self.down_reason = None
            self._say(f"llama-server restarted (restart {self.restarts}); serving again")
            return
        self.exit_code = 1
        self._say(f"llama-server could not be started again after {self.max_restarts} tries: stopping")
        if self.on_fatal:
            self.on_fatal()

    def _unavailable(self) -> RequestError:
        return RequestError(503, f"The model is unavailable: {self.down_reason or 'the engine stopped'}; it is being "
                                 "restarted, retry in a few seconds.", kind="server_error", code="engine_unavailable")

    async def _on_engine(self, coro, slot: bool = True):
        """Awaits `coro` (a call to the engine; holding a slot unless `slot` is False) unless the engine goes down
        first: then EngineDown."""
        down = self._down
        if down is None or down.is_set():
            coro.close()
            raise EngineDown

        async def call():
            if not slot:
                return await coro
            async with self._slots:
                return await coro

        task, waiter = asyncio.ensure_future(call()), asyncio.ensure_future(down.wait())
        try:
            await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiter.cancel()
        if not task.done():
            task.cancel()
            raise EngineDown
        try:
            return task.result()
        except httpx.HTTPError as err:  # the connection broke: it died under us
            raise EngineDown from err

    # -- plumbing ---------------------------------------------------------------------------------------------

    @staticmethod
    def _error(err: RequestError) -> JSONResponse:
        return JSONResponse(err.body(), status_code=err.status)

    async def _not_found(self, request: Request, exc) -> JSONResponse:
        return self._error(RequestError(404, f"Invalid URL ({request.method} {request.url.path})"))

    async def _not_allowed(self, request: Request, exc) -> JSONResponse:
        return self._error(RequestError(405, f"Method {request.method} is not allowed on {request.url.path}."))

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

    def _check_model(self, name: str | None) -> None:
        if name is None:
            raise RequestError(400, "You must provide a model parameter.", param="model")
        if name not in self.names:
            raise RequestError(404, f"The model '{name}' does not exist; this server serves {self.names}.",
                               param="model", code="model_not_found")

    async def _body(self, request: Request) -> dict:
        chunks, size = [], 0
        async for chunk in request.stream():
            chunks.append(chunk)
            size += len(chunk)
            if size > MAX_BODY:
                raise RequestError(413, f"The request body is over {MAX_BODY} bytes.")
        raw = b"".join(chunks)
        if not raw.strip():
            raise RequestError(400, "The request body is empty: send a JSON object (Content-Type: application/json).")
        try:  # a body of megabytes parses off the event loop
            body = await asyncio.to_thread(json.loads, raw) if len(raw) > 65536 else json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise RequestError(400, f"We could not parse the JSON body of your request: {err}") from None
        if not isinstance(body, dict):
            raise RequestError(400, "The request body must be a JSON object.")
        return body

    async def health(self, request: Request) -> Response:
        if not self.healthy:
            return JSONResponse({"status": "unavailable", "reason": self.down_reason}, status_code=503)
        return JSONResponse({"status": "ok", "restarts": self.restarts})

    def _model_card(self, name: str) -> dict:
        return {"id": name, "object": "model", "created": 0, "owned_by": "me"}

    async def models(self, request: Request) -> Response:
        try:
            self._check_key(request)
        except RequestError as err:
            return self._error(err)
        return JSONResponse({"object": "list", "data": [self._model_card(n) for n in self.names]})

    async def model(self, request: Request) -> Response:
        try:
            self._check_key(request)
            name = request.path_params["model"]
            if name not in self.names:
                raise RequestError(404, f"The model '{name}' does not exist", param="model", code="model_not_found")
        except RequestError as err:
            return self._error(err)
        return JSONResponse(self._model_card(name))

    # -- /v1/completions --------------------------------------------------------------------------------------

    def _too_long(self, n_prompt: int | None, max_tokens: int, chars: int | None = None,
                  param: str = "prompt") -> RequestError:
        room = self.engine.n_ctx
        said = (f"{n_prompt + max_tokens} tokens ({n_prompt} in your prompt; {max_tokens} for the completion)"
                if n_prompt is not None else f"a prompt of {chars} characters, more than {room} tokens can hold")
        return RequestError(400, f"This model's maximum context length is {room} tokens, however you requested "
                                 f"{said}. Please reduce your prompt; or completion length.", param=param,
                            code="context_length_exceeded")

    async def _ids(self, prompt: str | list[int], req: CompletionRequest) -> list[int]:
        """The token ids the model is fed for one prompt of `req` (the template rules of the module docstring).
        A text that cannot fit is refused before it is tokenized; tokenizing runs off the event loop."""
        if isinstance(prompt, list):
            bad = [t for t in prompt if not 0 <= t < self.scorer.n_vocab]
            if bad:
                raise RequestError(400, f"Token id {bad[0]} is out of range (vocabulary of {self.scorer.n_vocab}).",
                                   param="prompt")
            return list(prompt)
        if self.template == "data" and not req.echo:
            prompt = self.prefix + prompt + self.suffix
        self._refuse_unfittable(prompt, req.max_tokens)
        ids = _TextIds(await asyncio.to_thread(self.scorer.tokenize, prompt) if len(prompt) > 2048 else
                       self.scorer.tokenize(prompt))
        ids.bos_added = self.scorer.add_bos and ids[:1] == [self.scorer.bos]
        return ids

    def _refuse_unfittable(self, text: str, max_tokens: int, param: str = "prompt") -> None:
        """A text of more characters than n_ctx tokens can spell (the vocabulary's longest token) is refused
        before it is tokenized."""
        if len(text) > self.engine.n_ctx * self.scorer.max_token_chars:
            raise self._too_long(None, max_tokens, len(text), param=param)

    def _check_length(self, n_prompt: int, max_tokens: int, param: str = "prompt") -> None:
        if n_prompt + max_tokens > self.engine.n_ctx:
            raise self._too_long(n_prompt, max_tokens, param=param)

    def _engine_body(self, ids: list[int], req: CompletionRequest, choice: int, stream: bool) -> dict:
        body = {"prompt": ids, "n_predict": req.max_tokens, "temperature": req.temperature, "top_p": req.top_p,
                "top_k": req.top_k, "min_p": req.min_p, "repeat_penalty": req.repeat_penalty,
                "presence_penalty": req.presence_penalty, "frequency_penalty": req.frequency_penalty,
                "stop": req.stops, "logit_bias": req.bias(self.scorer.n_vocab), "ignore_eos": req.ignore_eos,
                "return_tokens": True, "stream": stream, "cache_prompt": True,
                # logprobs 0 still wants the sampled tokens' own log-probabilities: ask for one
                "n_probs": max(req.logprobs, 1) if req.logprobs is not None else 0}
        if req.seed is not None:
            body["seed"] = req.seed + choice  # n samples of one seeded request differ, and repeat
        return body

    async def _echo(self, ids: list[int], req: CompletionRequest) -> tuple[str, dict | None]:
        """The echoed prompt: its text and, with `logprobs`, its logprobs in OpenAI's legacy layout."""
        # BOS that the server put before a text prompt (the model reads it, as in training) is not the client's: it is
        # in neither the text nor the logprobs, which list the text's own tokens, as a scoring client (lm-eval's
        # [ctxlen:-1]) counts them; the first one's log-probability is then given BOS. A client's own BOS (token ids
        # or special-token text) is listed.
        hidden = int(getattr(ids, "bos_added", False))
        text = self.scorer.detokenize(ids[hidden:])
        if req.logprobs is None:
            return text, None
        chosen, tops = await asyncio.to_thread(self.scorer.score, ids, req.logprobs)
        raws = [self.scorer.token_bytes(t) for t in ids[hidden:]]
        return text, {"tokens": [token_text(r) for r in raws], "token_logprobs": chosen[hidden:],
                      "top_logprobs": tops[hidden:], "text_offset": _offsets(raws, 0)}

    async def _generated_logprobs(self, probs: list[dict], top: int, start: int, ids: list[int],
                                  generated: list[int]) -> dict:
        """llama-server's completion_probabilities in OpenAI's legacy layout: one entry per generated token, each
        token's text from its bytes (`bytes:\\x..` for part of a character), `top` alternatives plus the sampled
        token (OpenAI always lists it), text_offset in characters of the returned text, from `start`.

        llama-server leaves out a token that ends inside a UTF-8 character (its bytes come with the next entry's):
        such tokens are found from those bytes (the vocabulary's pieces) and their log-probabilities computed by
        the Scorer, fed the prompt and what was generated before them. `generated` (the ids so far) grows."""
        out: list[tuple[bytes, float, dict]] = []
        for p in probs:
            own, sent = self.scorer.token_bytes(int(p["id"])), _sent_bytes(p)
            missing = self.scorer.split_pieces(sent[: len(sent) - len(own)]) if sent != own and sent.endswith(own) else []
            if missing:
                chosen, tops = await asyncio.to_thread(self.scorer.score, ids + generated + missing, top)
                for k, token in enumerate(missing, start=len(ids) + len(generated)):
                    raw = self.scorer.token_bytes(token)
                    out.append((raw, chosen[k], tops[k] if top else {token_text(raw): chosen[k]}))
                generated.extend(missing)
            entry = {token_text(_sent_bytes(t)): t["logprob"] for t in p["top_logprobs"][:top]}
            entry.setdefault(token_text(own), p["logprob"])
            out.append((own, p["logprob"], entry))
            generated.append(int(p["id"]))
        raws = [raw for raw, _, _ in out]
        return {"tokens": [token_text(r) for r in raws], "token_logprobs": [lp for _, lp, _ in out],
                "top_logprobs": [entry for _, _, entry in out], "text_offset": _offsets(raws, start)}

    @staticmethod
    def _merge_logprobs(a: dict | None, b: dict | None) -> dict | None:
        if a is None or b is None:
            return a or b
        return {k: a[k] + b[k] for k in a}

    async def _generate(self, ids: list[int], req: CompletionRequest, choice: int) -> dict:
        """One choice, not streamed: the engine's answer in OpenAI's layout (+ the echo)."""
        echo_text, echo_lp = await self._echo(ids, req) if req.echo else ("", None)
        if req.max_tokens == 0:
            return {"text": echo_text, "logprobs": echo_lp, "finish_reason": "length", "usage": (len(ids), 0)}
        r = await self._on_engine(self.client.post("/completion", json=self._engine_body(ids, req, choice, False)))
        out = self._engine_result(r.status_code, r.content)
        gen_lp = (await self._generated_logprobs(out.get("completion_probabilities") or [], req.logprobs,
                                                 len(echo_text), ids, [])
                  if req.logprobs is not None else None)
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
            message = str(error.get("message") or content[:300])
            if "context" in message and ("exceed" in message or "too long" in message):
                raise RequestError(400, f"The prompt does not fit the model's context: {message}", param="messages",
                                   code="context_length_exceeded")
            code = 400 if status == 400 else 503
            raise RequestError(code, f"The engine refused the request: {message}",
                               kind="invalid_request_error" if code == 400 else "server_error",
                               code=None if code == 400 else "engine_error")
        return out

    def _response(self, req: CompletionRequest, choices: list[dict]) -> dict:
        prompt_tokens = sum(c["usage"][0] for c in choices[:: req.n])
        completion_tokens = sum(c["usage"][1] for c in choices)
        return {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": self.model_name,
                "choices": [{"text": c["text"], "index": i, "logprobs": c["logprobs"], "finish_reason": c["finish_reason"]}
                            for i, c in enumerate(choices)],
                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                          "total_tokens": prompt_tokens + completion_tokens}}

    async def completions(self, request: Request) -> Response:
        """POST /v1/completions, and /v1/engines/{model}/completions (the path the openai 0.28 client posts to
        for `engine=`): the same request, the model named by the path."""
        try:
            self._check_key(request)
            body = await self._body(request)
            if "model" in request.path_params:
                body = {**body, "model": request.path_params["model"]}
            req = parse(CompletionRequest, body)
            self._check_model(req.model)
            ids = [await self._ids(p, req) for p in req.prompts]
            for one in ids:
                self._check_length(len(one), req.max_tokens)
            req.bias(self.scorer.n_vocab)
            if not self.healthy:
                raise self._unavailable()
            jobs = [(one, i * req.n + j) for i, one in enumerate(ids) for j in range(req.n)]
            if req.stream:
                return StreamingResponse(self._stream(jobs, req), media_type="text/event-stream")
            choices = await asyncio.gather(*(self._generate(one, req, index) for one, index in jobs))
            return JSONResponse(self._response(req, list(choices)))
        except RequestError as err:
            return self._error(err)
        except (EngineDown, httpx.HTTPError):
            return self._error(self._unavailable())

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
            text, lp = await self._echo(ids, req)
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
                        lp = await self._generated_logprobs(event.get("completion_probabilities") or [], req.logprobs,
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

    # -- /v1/chat/completions ---------------------------------------------------------------------------------

    async def chat(self, request: Request) -> Response:
        """Checked as completions are (the same schema, ranges and errors, the model, the context length through
        the engine's own chat template), then passed to the engine's /v1/chat/completions (the GGUF's chat
        template) with OpenAI's sampling defaults; `model` rewritten to the served name."""
        try:
            self._check_key(request)
            body = await self._body(request)
            req = parse(ChatRequest, body)
            self._check_model(req.model)
            req.bias(self.scorer.n_vocab)
            if not self.healthy:
                raise self._unavailable()
            messages = [m.model_dump(exclude_none=True) for m in req.messages]
            r = await self._on_engine(self.client.post("/apply-template", json={"messages": messages}), slot=False)
            prompt = self._engine_result(r.status_code, r.content).get("prompt", "")
            self._refuse_unfittable(prompt, req.limit or 0, param="messages")
            n_prompt = len(await asyncio.to_thread(self.scorer.tokenize, prompt))
            limit = req.limit if req.limit is not None else max(self.engine.n_ctx - n_prompt, 0)
            self._check_length(n_prompt, limit, param="messages")
            sent = {"top_k": 0, "min_p": 0.0, "repeat_penalty": 1.0,
                    **body, "model": self.model_name, "max_tokens": limit}
            sent.pop("max_completion_tokens", None)
            if req.stream:
                return StreamingResponse(self._chat_stream(sent), media_type="text/event-stream")
            r = await self._on_engine(self.client.post("/v1/chat/completions", json=sent))
            out = self._engine_result(r.status_code, r.content)
            return JSONResponse({**out, "model": self.model_name})
        except RequestError as err:
            return self._error(err)
        except (EngineDown, httpx.HTTPError):
            return self._error(self._unavailable())

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

    async def aclose(self) -> None:
        await self.client.aclose()


class _TextIds(list):
    """A text prompt's token ids, and whether the server put BOS first (`_echo` leaves it out of the logprobs)."""

    bos_added = False


def _event(obj: dict) -> bytes:
    return b"data: " + json.dumps(obj).encode() + b"\n\n"


def _last(error: dict) -> bytes:
    """A stream's end after an error: the error as an event (the openai client raises it), then [DONE]."""
    return _event(error) + b"data: [DONE]\n\n"


def _offsets(raws: list[bytes], start: int) -> list[int]:
    """Each token's text_offset: the characters of the text before it (a token that starts inside a character
    starts at that character), from `start`."""
    decoder, offsets, at = codecs.getincrementaldecoder("utf-8")(errors="replace"), [], start
    for raw in raws:
        offsets.append(at)
        at += len(decoder.decode(raw))  # a partial character waits in the decoder for the token that ends it
    return offsets
