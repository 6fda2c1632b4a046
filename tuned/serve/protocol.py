"""OpenAI's request schema for `make serve`, as pydantic models (after vLLM's entrypoints/openai/protocol.py): the
legacy Completions request and the Chat Completions request share their sampling fields, ranges and errors.
`parse` turns a body into a model or a `RequestError` in OpenAI's 400 shape, naming the parameter.

Strict types, as OpenAI's API checks them: "0.5" is not a number, 1 is not a boolean; unknown keys are an error
("Unrecognized request argument supplied"), not ignored.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class RequestError(Exception):
    """An OpenAI-style error response: status, message, param, code, type."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Strict):
    include_usage: bool = False


TokenIds = Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]


class Sampling(_Strict):
    """The fields both endpoints take, with OpenAI's ranges and defaults (none of llama.cpp's: no repetition
    penalty, top-k or min-p unless asked)."""

    model: str | None = None
    max_tokens: int | None = Field(None, ge=0)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, ge=0, le=1)
    n: int = Field(1, ge=1, le=128)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    logit_bias: dict[str, Annotated[float, Field(ge=-100, le=100)]] | None = None
    seed: int | None = None
    user: str | None = None
    # llama.cpp's samplers and vLLM's ignore_eos, as vLLM and llama-cpp-python accept them (extra_body): off by default
    top_k: int = Field(0, ge=0)
    min_p: float = Field(0.0, ge=0, le=1)
    repeat_penalty: float = Field(1.0, gt=0)
    ignore_eos: bool = False

    @model_validator(mode="after")
    def _common(self):
        stops = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        if len(stops) > 4 or not all(stops):
            raise _Invalid("stop", f"{self.stop!r} is not valid for 'stop': expected a string or a list of up to 4 "
                                   "non-empty strings.")
        if self.stream_options is not None and not self.stream:
            raise _Invalid("stream_options", "stream_options is only allowed when stream is true.")
        for key in self.logit_bias or {}:
            if not key.isdigit():
                raise _Invalid("logit_bias", f"logit_bias keys are token ids (as strings); got {key!r}.")
        return self

    @property
    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    def bias(self, n_vocab: int) -> list[list[float]]:
        """logit_bias as llama.cpp takes it; a token id outside the vocabulary is an error."""
        pairs = [[int(k), float(v)] for k, v in (self.logit_bias or {}).items()]
        for token, _ in pairs:
            if token >= n_vocab:
                raise RequestError(400, f"logit_bias: token id {token} is out of range (vocabulary of {n_vocab}).",
                                   param="logit_bias")
        return pairs


class CompletionRequest(Sampling):
    """POST /v1/completions (OpenAI's legacy Completions)."""

    prompt: str | Annotated[list[str], Field(min_length=1)] | TokenIds | Annotated[list[TokenIds], Field(min_length=1)]
    max_tokens: int = Field(16, ge=0)
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: bool = False
    best_of: int | None = Field(None, ge=1)
    suffix: str | None = None

    @model_validator(mode="after")
    def _completion(self):
        if self.suffix:
            raise _Invalid("suffix", "suffix is not supported: this model completes a prompt, it does not insert.")
        if self.best_of is not None and self.best_of != self.n:
            raise _Invalid("best_of", f"best_of={self.best_of} with n={self.n}: only best_of equal to n (or unset) "
                                      "is supported.")
        return self

    @property
    def prompts(self) -> list[str | list[int]]:
        p = self.prompt
        if isinstance(p, str) or (p and isinstance(p[0], int)):
            return [p]
        return list(p)


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    type: Literal["text", "image_url", "input_audio", "file"]
    text: str | None = None


class ChatMessage(BaseModel):
    """One message; OpenAI's roles only. Tool calls and names pass through to the engine's chat template."""

    model_config = ConfigDict(extra="allow", strict=True)
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[ContentPart] | None = None
    name: str | None = None


class ChatRequest(Sampling):
    """POST /v1/chat/completions."""

    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: int | None = Field(None, ge=0)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    response_format: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None

    @model_validator(mode="after")
    def _chat(self):
        if self.top_logprobs is not None and not self.logprobs:
            raise _Invalid("top_logprobs", "top_logprobs requires logprobs to be true.")
        return self

    @property
    def limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class _Invalid(ValueError):
    """A rule across fields, raised inside a validator: carries the parameter it is about."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param, self.message = param, message


_TYPE_NAMES = {"str", "int", "float", "bool", "list", "dict", "none"}


def _param(loc: tuple) -> str:
    """pydantic's error location as OpenAI writes a parameter: messages.[0].role (union branches left out)."""
    parts = []
    for part in loc:
        if isinstance(part, int):
            parts.append(f"[{part}]")
        elif str(part).isidentifier() and str(part) not in _TYPE_NAMES:
            parts.append(str(part))
    return ".".join(parts)


def parse(model: type[BaseModel], body: dict) -> Any:
    """The body as `model`, or the RequestError OpenAI answers with: the first problem, naming its parameter."""
    try:
        return model.model_validate(body)
    except ValidationError as err:
        first = err.errors(include_url=False)[0]
        cause = (first.get("ctx") or {}).get("error")
        if isinstance(cause, _Invalid):
            raise RequestError(400, cause.message, param=cause.param) from None
        loc = first["loc"]
        param = _param(loc) or None
        if first["type"] == "extra_forbidden":
            raise RequestError(400, f"Unrecognized request argument supplied: {param}", param=param) from None
        if first["type"] == "missing":
            raise RequestError(400, f"Missing required parameter: '{param}'.", param=param) from None
        if loc and loc[0] == "prompt":
            raise RequestError(400, "prompt must be a string, a list of strings, a list of token ids or a list of "
                                    "lists of token ids (none empty).", param="prompt") from None
        value = first.get("input")
        raise RequestError(400, f"{value!r} is not valid for '{param}': {first['msg']}.", param=param) from None
