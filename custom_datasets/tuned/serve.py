"""An OpenAI-compatible server for the exported GGUF: llama.cpp's server (llama-cpp-python[server]) plus the
data's prompt template.

The engine is llama-cpp-python's own FastAPI app: /v1/completions (streaming, logprobs, echo, stop, ...),
/v1/chat/completions (the GGUF's chat template), /v1/models. What this module adds, as one ASGI middleware
in front of it:

- the template: a client sends the raw prompt, as to text-davinci-002; the server sends
  `prompt_prefix + prompt + prompt_suffix` (export.json, from the training formatter) and llama.cpp adds BOS,
  which gives the token ids training used;
- `n` > 1 and a list of prompts (llama-cpp-python serves one completion of one prompt per request and ignores
  `n`): fanned out into single requests and merged, choices indexed as OpenAI does (prompt-major);
- OpenAI's sampling defaults (no repetition penalty, top-k or min-p: `SAMPLING_DEFAULTS`);
- OpenAI-style errors where llama-cpp-python answers otherwise: an unknown `model` (404 model_not_found,
  where it silently serves its default), a request its schema refuses, e.g. max_tokens < 0 (400
  invalid_request_error, where it answers 500), `n` > 1 with `stream`.
"""

from __future__ import annotations

import json
from pathlib import Path

# OpenAI's sampling has no repetition penalty, top-k or min-p; llama-cpp-python's server defaults them to 1.1, 40
# and 0.05, which changes even a temperature-0 completion. A client can still send them (extra_body).
SAMPLING_DEFAULTS = {"repeat_penalty": 1.0, "top_k": 0, "min_p": 0.0}
COMPLETIONS = ("/v1/completions", "/v1/engines/copilot-codex/completions")
CHAT = "/v1/chat/completions"


def openai_error(status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error") -> tuple[int, bytes]:
    return status, json.dumps({"error": {"message": message, "type": kind, "param": param, "code": code}}).encode()


async def _read_body(receive) -> bytes:
    body, more = b"", True
    while more:
        message = await receive()
        body += message.get("body", b"")
        more = message.get("more_body", False)
    return body


async def _send_json(send, status: int, body: bytes) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


class TemplateMiddleware:
    """See the module docstring. `app` is llama-cpp-python's FastAPI app."""

    def __init__(self, app, model_name: str, prefix: str, suffix: str):
        self.app, self.model_name, self.prefix, self.suffix = app, model_name, prefix, suffix

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] not in (*COMPLETIONS, CHAT):
            return await self.app(scope, receive, send)
        raw = await _read_body(receive)
        try:
            body = json.loads(raw or b"{}")
        except json.JSONDecodeError as err:
            return await _send_json(send, *openai_error(400, f"The request body is not valid JSON: {err}"))
        if not isinstance(body, dict):
            return await _send_json(send, *openai_error(400, "The request body must be a JSON object."))
        model = body.get("model")
        if model is not None and model != self.model_name:
            return await _send_json(send, *openai_error(
                404, f"The model '{model}' does not exist; this server serves '{self.model_name}'.",
                param="model", code="model_not_found"))
        body = {**SAMPLING_DEFAULTS, **body}
        from llama_cpp.server.types import CreateChatCompletionRequest, CreateCompletionRequest
        from pydantic import ValidationError

        try:  # the engine's own request schema, answered the OpenAI way (it would give a 500)
            (CreateChatCompletionRequest if scope["path"] == CHAT else CreateCompletionRequest).model_validate(body)
        except ValidationError as err:
            first = err.errors()[0]
            param = ".".join(str(p) for p in first["loc"]) or None
            message = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in err.errors())
            return await _send_json(send, *openai_error(400, message, param=param))
        if scope["path"] == CHAT:
            return await self._forward(scope, body, receive, send)
        prompts = body.get("prompt", "")
        prompts = prompts if isinstance(prompts, list) else [prompts]
        if not prompts or not all(isinstance(p, str) for p in prompts):
            return await _send_json(send, *openai_error(
                400, "prompt must be a string or a list of strings (token-id prompts are not accepted: the server "
                     "applies the training template to text).", param="prompt"))
        n = body.get("n", 1)
        if not isinstance(n, int) or n < 1:
            return await _send_json(send, *openai_error(400, f"n must be a positive integer, got {n!r}.", param="n"))
        body = {**body, "n": 1}
        if len(prompts) == 1 and n == 1:
            return await self._forward(scope, {**body, "prompt": self.prefix + prompts[0] + self.suffix}, receive, send)
        if body.get("stream"):
            return await _send_json(send, *openai_error(
                400, "stream with n > 1 or several prompts is not supported; send one request per completion.",
                param="stream"))
        choices, usage, first = [], {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}, None
        for prompt in prompts:
            for _ in range(n):
                status, payload = await self._call(scope, {**body, "prompt": self.prefix + prompt + self.suffix})
                if status != 200:
                    return await _send_json(send, status, payload)
                result = json.loads(payload)
                first = first or result
                for choice in result["choices"]:
                    choices.append({**choice, "index": len(choices)})
                for key in usage:
                    usage[key] += (result.get("usage") or {}).get(key, 0)
        return await _send_json(send, 200, json.dumps({**first, "choices": choices, "usage": usage}).encode())

    async def _call(self, scope, body: dict) -> tuple[int, bytes]:
        """Runs the wrapped app on `body`; returns (status, response body)."""
        data, sent = json.dumps(body).encode(), False
        status, chunks = 500, []

        async def receive():
            nonlocal sent
            if sent:
                return await _never()
            sent = True
            return {"type": "http.request", "body": data, "more_body": False}

        async def send(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.body":
                chunks.append(message.get("body", b""))

        await self.app(self._scope(scope, data), receive, send)
        return status, b"".join(chunks)

    async def _forward(self, scope, body: dict, receive, send):
        """Passes the rewritten request on; after its body, the client's own receive (its disconnect)."""
        data, sent = json.dumps(body).encode(), False

        async def replay():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": data, "more_body": False}
            return await receive()

        return await self.app(self._scope(scope, data), replay, send)

    @staticmethod
    def _scope(scope, data: bytes) -> dict:
        headers = [(k, v) for k, v in scope["headers"] if k.lower() != b"content-length"]
        return {**scope, "headers": headers + [(b"content-length", str(len(data)).encode())]}


async def _never():
    """An internal request has no client to disconnect: after its body, receive waits until cancelled."""
    import anyio

    await anyio.sleep_forever()


KV_CACHE_TYPES = {"f16": 1, "f32": 0}  # ggml type ids (GGML_TYPE_F16, GGML_TYPE_F32)


def create_app(export_dir: str | Path, model_name: str, n_ctx: int | None = None, gguf: str | None = None,
               n_threads: int | None = None, chat_format: str | None = None, kv_cache: str = "f16"):
    """The ASGI app: llama-cpp-python's server on export_dir's GGUF, behind the template middleware."""
    from llama_cpp.server.app import create_app as llama_app
    from llama_cpp.server.settings import ModelSettings, ServerSettings

    export_dir = Path(export_dir)
    manifest_path = export_dir / "export.json"
    if not manifest_path.is_file():
        raise FileNotFoundError(f"{manifest_path} not found: run make export CONFIG=... first.")
    manifest = json.loads(manifest_path.read_text())
    names = manifest.get("gguf") or []
    if gguf is not None:
        names = [n for n in names if n in (gguf, f"model-{gguf}.gguf")]
    if not names:
        raise FileNotFoundError(f"{export_dir}: no GGUF{f' {gguf!r}' if gguf else ''} in this export "
                                f"(it has {manifest.get('gguf')}); export with export.gguf=[f16] (or q8_0, q4_k_m).")
    settings = {"model": str(export_dir / names[0]), "model_alias": model_name, "verbose": False,
                "n_ctx": int(n_ctx or manifest["max_seq_len"])}
    if n_threads:
        settings["n_threads"] = n_threads
    if chat_format:
        settings["chat_format"] = chat_format
    if kv_cache not in KV_CACHE_TYPES:
        raise ValueError(f"serve.kv_cache={kv_cache!r}: expected one of {list(KV_CACHE_TYPES)}")
    settings["type_k"] = settings["type_v"] = KV_CACHE_TYPES[kv_cache]
    app = llama_app(server_settings=ServerSettings(), model_settings=[ModelSettings(**settings)])
    return TemplateMiddleware(app, model_name, manifest.get("prompt_prefix", ""), manifest.get("prompt_suffix", ""))
