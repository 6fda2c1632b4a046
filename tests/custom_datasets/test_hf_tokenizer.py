"""The tokenizer of a tokenizer.json model (SmolLM2-135M-Instruct) writes chat data in the model's own chat
template. Oracle: transformers' `apply_chat_template` on the same folder."""

import json

import pytest
from support import our_recipe, run
from torchtune.data import Message

from custom_datasets import hf_tokenizer
from custom_datasets._format import format_pair, format_prompt
from custom_datasets._read import Pair
from custom_datasets._spec import InstructSpec

CONVERSATIONS = [
    [("user", "Which glue for outdoor oak?"), ("assistant", "Polyurethane glue: it is waterproof.")],
    [("system", "Be brief."), ("user", "Hi"), ("assistant", "Hello! 12 planks."),
     ("user", "And 3.5 more?"), ("assistant", "15.5 planks, then.\n\nDone.")],
]


@pytest.fixture(scope="module")
def reference(small_checkpoint):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(small_checkpoint)


@pytest.fixture(scope="module")
def ours(small_checkpoint):
    return hf_tokenizer(str(small_checkpoint), 256)


@pytest.mark.parametrize("turns", CONVERSATIONS)
def test_messages_are_the_models_chat_template_with_loss_on_the_assistant_turns(ours, reference, turns):
    messages = [Message(role=r, content=c, masked=r != "assistant") for r, c in turns]
    ids, mask = ours.tokenize_messages(messages)
    assert ids == reference.apply_chat_template([{"role": r, "content": c} for r, c in turns], tokenize=True)
    trained = ours.decode([t for t, m in zip(ids, mask) if not m], truncate_at_eos=False, skip_special_tokens=False)
    assert trained == "".join(c + "<|im_end|>\n" for r, c in turns if r == "assistant")


def test_chat_template_source_trains_the_completion_and_generates_from_the_assistant_header(ours, reference):
    spec = InstructSpec("p", "x", template="chat", system_prompt="Answer like a carpenter.")
    turns = [{"role": "system", "content": "Answer like a carpenter."}, {"role": "user", "content": "Name a wood."}]
    sample, truncated = format_pair(ours, spec, Pair("Name a wood.", "Oak.", "x:1"), 256)
    assert not truncated
    assert sample.tokens == reference.apply_chat_template(turns + [{"role": "assistant", "content": "Oak."}], tokenize=True)
    trained = [t for t, label in zip(sample.tokens, sample.labels) if label != -100]
    assert ours.decode(trained, truncate_at_eos=False, skip_special_tokens=False) == "Oak.<|im_end|>\n"
    assert format_prompt(ours, spec, "Name a wood.") == reference.apply_chat_template(turns, tokenize=True,
                                                                                       add_generation_prompt=True)


def test_a_model_without_a_chat_template_says_so(small_checkpoint, tmp_path):
    for name in ("tokenizer.json", "generation_config.json"):
        (tmp_path / name).write_bytes((small_checkpoint / name).read_bytes())
    config = json.loads((small_checkpoint / "tokenizer_config.json").read_text())
    del config["chat_template"]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="no chat_template.*template: completion"):
        hf_tokenizer(str(tmp_path), 256).tokenize_messages([Message(role="user", content="hi")])


def test_make_data_builds_chat_formatted_pairs_for_the_small_model(small_checkpoint, tmp_path):
    """`make data` on the SmolLM2 preset with the pairs in its chat template: built, counted, loss on answers."""
    args = [f"checkpointer.checkpoint_dir={small_checkpoint}", f"tokenizer.path={small_checkpoint}",
            f"output_dir={tmp_path}", "dataset.cache_dir=null", "dataset.sources.pairs.template=chat"]
    run([*our_recipe("prepare_data"), "--config", "configs/smollm2_135m_lora_cpu.yaml", *args])
    report = json.loads((tmp_path / "data" / "report.json").read_text())
    pairs = next(s for s in report["sources"] if s["name"] == "pairs")
    assert pairs["samples"] == pairs["rows"] - pairs["held_out"] > 0 and 0 < pairs["supervised"] < pairs["tokens"]
    assert report["dataset_config"]["sources"]["pairs"]["template"] == "chat"


@pytest.mark.parametrize("old", ["custom_datasets.tuned.hf_tokenizer", "custom_datasets.tuned.hf_tokenizer.hf_tokenizer"])
def test_a_config_with_the_tokenizers_old_path_still_builds_it_and_is_told_the_new_one(small_checkpoint, ours, old):
    """The tokenizer moved out of custom_datasets.tuned (the model side's old home): a config written before names
    the old path. torchtune's own instantiate (what `tune run` does) still builds the same tokenizer, with a
    FutureWarning that names the path to write instead."""
    from omegaconf import OmegaConf
    from torchtune import config

    node = OmegaConf.create({"_component_": old, "path": str(small_checkpoint), "max_seq_len": 256})
    with pytest.warns(FutureWarning, match=r"write that in your config") as caught:
        tokenizer = config.instantiate(node)
    assert "moved to custom_datasets.hf_tokenizer;" in str(caught[0].message)
    text = "Polyurethane glue: it is waterproof."
    assert tokenizer.encode(text) == ours.encode(text)
