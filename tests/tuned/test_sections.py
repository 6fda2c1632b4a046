"""The eval, export and serve sections, declared once as types: what each refuses, said as the key, what it got and
what it takes (literal messages: the oracle is the sentence a user must read), and the defaults the recipes rely on."""

from typing import get_args

import pytest
from omegaconf import OmegaConf

from tuned import export as ex
from tuned.sections import EvalOptions, ExportOptions, ServeOptions, section
from tuned.serve.engine import KV_CACHE_TYPES


def _error(section_name: str, model, values: dict) -> str:
    with pytest.raises(ValueError) as caught:
        section(OmegaConf.create({section_name: values}), section_name, model)
    return str(caught.value)


def test_every_section_defaults_when_absent():
    cfg = OmegaConf.create({"output_dir": "runs/x"})
    assert section(cfg, "eval", EvalOptions) == {
        "checkpoint": None, "epochs": "all", "full": "last", "num_generations": 8, "max_new_tokens": 64,
        "batch_size": 4, "tasks": [], "limit": None, "local_task": True,
        "base_cache": ".cache/base_eval"}
    assert section(cfg, "export", ExportOptions) == {
        "checkpoint": None, "dtype": "bf16", "merge_into": "trained", "gguf": ["f16"], "source": None,
        "base_model_name_or_path": None}
    assert section(cfg, "serve", ServeOptions) == {
        "host": "127.0.0.1", "port": 8000, "model_name": None, "gguf": None, "n_ctx": None, "parallel": 8,
        "n_threads": None, "kv_cache": "f16", "template": "data", "api_key": None, "allow_open": False,
        "max_restarts": 3}


@pytest.mark.parametrize("name, model, values, said", [
    ("eval", EvalOptions, {"epoch": 2},
     "eval.epoch: unknown key; did you mean 'epochs'? (known: base_cache, batch_size, checkpoint, epochs, full, limit, local_task, "
     "max_new_tokens, num_generations, tasks)"),
    ("eval", EvalOptions, {"epochs": "some"},
     "eval.epochs: expected all, last, or a list of epoch numbers like [0, 2]; got 'some'"),
    ("eval", EvalOptions, {"full": "every"}, "eval.full: Input should be 'last' or 'all'; got 'every'"),
    ("eval", EvalOptions, {"batch_size": 0}, "eval.batch_size: Input should be greater than or equal to 1; got 0"),
    ("export", ExportOptions, {"gguf": ["q4_k_m", "q5"]},
     "export.gguf.1: Input should be 'f16', 'bf16', 'f32', 'q8_0' or 'q4_k_m'; got 'q5'"),
    ("export", ExportOptions, {"dtype": "fp8"}, "export.dtype: Input should be 'bf16', 'fp16' or 'fp32'; got 'fp8'"),
    ("serve", ServeOptions, {"port": 70000}, "serve.port: Input should be less than or equal to 65535; got 70000"),
    ("serve", ServeOptions, {"kv_cache": "q8_0"}, "serve.kv_cache: Input should be 'f16' or 'f32'; got 'q8_0'"),
    ("serve", ServeOptions, {"model_name": 5},
     "serve.model_name: expected a name, or a list of names (aliases; the first answers); got 5"),
])
def test_a_bad_key_or_value_is_named_with_what_it_takes(name, model, values, said):
    assert _error(name, model, values) == said


def test_every_problem_of_a_section_is_said_at_once():
    said = _error("serve", ServeOptions, {"port": "x", "template": "chat", "paralel": 4}).splitlines()
    assert [line.split(":")[0] for line in said] == ["serve.port", "serve.template", "serve.paralel"]


def test_one_gguf_may_be_written_alone_and_none_as_an_empty_list():
    cfg = OmegaConf.create({"export": {"gguf": "q8_0"}})
    assert section(cfg, "export", ExportOptions)["gguf"] == ["q8_0"]
    assert section(OmegaConf.create({"export": {"gguf": []}}), "export", ExportOptions)["gguf"] == []


def test_the_declared_values_are_the_ones_the_code_handles():
    """The types list what export and the engine implement: a value the code cannot handle is never let through."""
    fields = ExportOptions.model_fields
    assert set(get_args(fields["dtype"].annotation)) == set(ex.DTYPES)
    assert set(get_args(fields["merge_into"].annotation)) == set(ex.MERGE_INTO)
    assert set(get_args(get_args(fields["gguf"].annotation)[0])) == set(ex.GGUF_TYPES)
    assert set(get_args(ServeOptions.model_fields["kv_cache"].annotation)) == set(KV_CACHE_TYPES)
