"""The sections of a config that our recipes read (`eval`, `export`, `serve`), declared once as types: each key, its
type, its allowed values and its default. pydantic refuses an unknown key (with the closest known one) and a
wrong type or value; `section` turns that into one error naming each `section.key`, what it got and what it takes."""

from __future__ import annotations

from typing import Literal

from omegaconf import DictConfig, OmegaConf
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from custom_datasets._spec import did_you_mean


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class EvalOptions(_Section):
    """`eval.*` (make eval, make generate): docs/eval.md."""

    checkpoint: str | None = None  # an adapter folder; None: the run's epochs
    epochs: Literal["all", "last"] | list[int] = Field("all", description="all, last, or a list of epoch numbers like [0, 2]")
    full: Literal["last", "all"] = "last"  # generations and lm-eval on the last epoch only, or on every epoch
    num_generations: int = Field(8, ge=0)
    max_new_tokens: int = Field(64, ge=1)
    batch_size: int = Field(4, ge=1)
    tasks: list[str] = []
    limit: int | float | None = Field(None, description="rows per lm-eval task (a number, a fraction, or null: all)")
    local_task: bool = True
    base_cache: str | None = ".cache/base_eval"  # the base column, kept for the next run on the same base and data


class ExportOptions(_Section):
    """`export.*` (make export): docs/export-serve.md."""

    checkpoint: str | None = None
    dtype: Literal["bf16", "fp16", "fp32"] = "bf16"
    merge_into: Literal["trained", "original"] = "trained"
    gguf: list[Literal["f16", "bf16", "f32", "q8_0", "q4_k_m"]] = ["f16"]
    source: str | None = None
    base_model_name_or_path: str | None = None

    @field_validator("gguf", mode="before")
    @classmethod
    def _one_or_many(cls, value):
        return [] if value is None else [value] if isinstance(value, str) else value


class ServeOptions(_Section):
    """`serve.*` (make serve): docs/export-serve.md."""

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    model_name: str | list[str] | None = Field(None, description="a name, or a list of names (aliases; the first answers)")
    gguf: str | None = None
    n_ctx: int | None = Field(None, ge=1)
    parallel: int = Field(8, ge=1)
    n_threads: int | None = Field(None, ge=1)
    kv_cache: Literal["f16", "f32"] = "f16"
    template: Literal["data", "raw"] = "data"
    api_key: str | None = None
    allow_open: bool = False
    max_restarts: int = Field(3, ge=0)


def _problems(name: str, model: type[_Section], errors: list[dict]) -> list[str]:
    """One line a key: an unknown one with the closest known; a key of several allowed shapes (a union) by its
    description, once; any other by pydantic's own words."""
    out, said = [], set()
    for error in errors:
        key = str(error["loc"][0])
        field = model.model_fields.get(key)
        if error["type"] == "extra_forbidden":
            known = sorted(model.model_fields)
            out.append(f"{name}.{key}: unknown key{did_you_mean(key, known)} (known: {', '.join(known)})")
        elif field is not None and field.description:
            if key not in said:
                out.append(f"{name}.{key}: expected {field.description}; got {error['input']!r}")
                said.add(key)
        else:
            where = ".".join([name, *(str(p) for p in error["loc"])])
            out.append(f"{where}: {error['msg']}; got {error['input']!r}")
    return out


def section(cfg: DictConfig, name: str, model: type[_Section]) -> dict:
    """`cfg.<name>` checked against `model`, as a dict with every default filled in; ValueError listing every
    problem, one line each."""
    raw = cfg.get(name) if isinstance(cfg, DictConfig) else (cfg or {}).get(name)
    values = OmegaConf.to_container(raw, resolve=True) if isinstance(raw, DictConfig) else (raw or {})
    if not isinstance(values, dict):
        raise ValueError(f"{name}: expected a section of keys (like {name}.{next(iter(model.model_fields))}=...); "
                         f"got {values!r}")
    try:
        return model.model_validate(values).model_dump()
    except ValidationError as err:
        raise ValueError("\n".join(_problems(name, model, err.errors()))) from None
