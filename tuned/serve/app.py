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
import hmac
import json
import time
import uuid
from collections.abc import Callable

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from tuned.serve import logprobs
from tuned.serve.engine import LlamaServer, Scorer
from tuned.serve.options import TEMPLATE_MODES
from tuned.serve.protocol import ChatRequest, CompletionRequest, RequestError, parse
from tuned.serve.streams import Streams
from tuned.serve.watch import EngineDown, EngineWatch

MAX_BODY = 8 * 1024 * 1024  # bytes; a larger request body gets 413


class Front(Streams, EngineWatch):
    """The ASGI app (`.app`) over one LlamaServer and one Scorer on the same GGUF: the routes, their checks and the
    answers not streamed (streamed ones: `Streams`); the engine's watch (`EngineWatch`) answers waiting requests
    503 when the engine dies, and /health says unavailable until it is back.

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
        super().__init__(engine, max_restarts=max_restarts, hang_after=hang_after, on_fatal=on_fatal)
        self.scorer, self.names, self.model_name = scorer, names, names[0]
        self.prefix, self.suffix, self.template, self.api_key = prefix, suffix, template, api_key or None
        routes = [Route("/health", self.health, methods=["GET"]),
                  Route("/v1/models", self.models, methods=["GET"]),
                  Route("/v1/models/{model:path}", self.model, methods=["GET"]),
                  Route("/v1/completions", self.completions, methods=["POST"]),
                  Route("/v1/engines/{model:path}/completions", self.completions, methods=["POST"]),
                  Route("/v1/chat/completions", self.chat, methods=["POST"])]
        self.app = Starlette(routes=routes, exception_handlers={404: self._not_found, 405: self._not_allowed},
                             lifespan=self._lifespan)

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
        ids = logprobs.TextIds(await asyncio.to_thread(self.scorer.tokenize, prompt) if len(prompt) > 2048 else
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

    async def _generate(self, ids: list[int], req: CompletionRequest, choice: int) -> dict:
        """One choice, not streamed: the engine's answer in OpenAI's layout (+ the echo)."""
        echo_text, echo_lp = await logprobs.echo(self.scorer, ids, req.logprobs) if req.echo else ("", None)
        if req.max_tokens == 0:
            return {"text": echo_text, "logprobs": echo_lp, "finish_reason": "length", "usage": (len(ids), 0)}
        r = await self._on_engine(self.client.post("/completion", json=self._engine_body(ids, req, choice, False)))
        out = self._engine_result(r.status_code, r.content)
        gen_lp = (await logprobs.of_generated(self.scorer, out.get("completion_probabilities") or [], req.logprobs,
                                                 len(echo_text), ids, [])
                  if req.logprobs is not None else None)
        return {"text": echo_text + out["content"], "logprobs": logprobs.merge(echo_lp, gen_lp),
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
