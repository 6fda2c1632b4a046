"""type: chat — conversations in the same packed stream, checked against Meta's own Llama 3 chat format (llama-models'
ChatFormat, through tests/oracle.py), transformers' chat templates, and hand-counted splits."""

import json

import oracle
import pytest
from support import REPO, pairs, write_jsonl

from custom_datasets import DatasetError, mixed_dataset

IGNORE = -100
OPENAI = REPO / "data" / "chat" / "messages_tools.jsonl"
SHAREGPT = REPO / "data" / "chat" / "sharegpt.jsonl"


def mixed_sources(tmp_path, **chat_options) -> dict:
    """Pairs, text and both chat files (OpenAI with tool calls, ShareGPT multi-turn) with weights and held-out rows."""
    (tmp_path / "t.txt").write_text(" ".join(f"word{i}" for i in range(700)))
    flags = [json.loads(line) for line in OPENAI.read_text().splitlines()]
    flags[1]["messages"][1]["train"] = False  # a per-turn flag: this answer is context only
    return {"pairs": {"type": "instruct", "path": str(write_jsonl(tmp_path / "p.jsonl", pairs(10))), "val_size": 2},
            "text": {"type": "text", "path": str(tmp_path / "t.txt"), "stride": 32},
            "tools": {"type": "chat", "path": str(write_jsonl(tmp_path / "tools.jsonl", flags)), "weight": 2, "val_size": 2,
                      **chat_options},
            "sharegpt": {"type": "chat", "path": str(SHAREGPT), "weight": 0.5, "val_fraction": 0.1, **chat_options}}


@pytest.mark.parametrize("options", [{}, {"train_on": "last_assistant"}, {"train_on": "all"},
                                     {"system_prompt": "Be kind."}], ids=["all_assistant", "last_assistant", "all", "system_prompt"])
@pytest.mark.parametrize("packed", [True, False])
def test_conversations_pairs_and_text_in_one_stream_are_metas_format_token_by_token(tmp_path, tokenizer, options, packed):
    """Oracle: every conversation as llama-models' ChatFormat.encode_message writes it (tool calls as Meta's JSON,
    tool results under ipython), loss on the bodies of the turns train_on picks and the turns' own flags allow;
    served weight times (2, and a fixed half), held-out rows never; pairs and text as before; the table's counts."""
    sources = mixed_sources(tmp_path, **options)
    ds = mixed_dataset(tokenizer, sources=sources, max_seq_len=512, packed=packed, held_out_dir=str(tmp_path / "held"))
    counts = oracle.check(ds, sources, 512, str(tmp_path / "held"))
    assert sorted(set(counts["tools"].values())) == [0, 2] and sorted(set(counts["sharegpt"].values())) == [0, 1]
    tools = next(s for s in ds.stats.sources if s.name == "tools")
    assert tools.rows == 24 and tools.held_out == 2 and tools.turns_placed == tools.turns
    if packed:
        assert len({frozenset(oracle.stream(ds))}) == 1 and ds.stats.packs < ds.stats.sources[0].samples + 30


def test_a_tool_call_conversation_is_exactly_metas_tokens(tokenizer, tmp_path):
    """Literal check of one row against Meta's format: the assistant's call is its JSON after the header, the
    result is an ipython turn, and only the two assistant bodies (call + <|eot_id|>, answer + <|eot_id|>) carry loss."""
    row = json.loads(OPENAI.read_text().splitlines()[0])
    row["messages"] = row["messages"][:5]
    ds = mixed_dataset(tokenizer, sources={"c": {"type": "chat", "path": str(write_jsonl(tmp_path / "c.jsonl", [row]))}},
                       packed=False)
    text = tokenizer.decode(ds[0]["tokens"], skip_special_tokens=False)
    assert text == ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nYou answer in one short sentence. You may "
                    "call get_weather(city).<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nHow warm is it in Paris right "
                    "now?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n{\"type\": \"function\", \"name\": "
                    "\"get_weather\", \"parameters\": {\"city\": \"Paris\"}}<|eot_id|><|start_header_id|>ipython<|end_header_id|>"
                    "\n\n{\"city\": \"Paris\", \"celsius\": 10}<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
                    "It is 10 °C in Paris.<|eot_id|>")
    trained = tokenizer.decode([t for t in ds[0]["labels"] if t != IGNORE], skip_special_tokens=False)
    assert trained == "{\"type\": \"function\", \"name\": \"get_weather\", \"parameters\": {\"city\": \"Paris\"}}<|eot_id|>It is 10 °C in Paris.<|eot_id|>"


def long_conversation(turns: int) -> dict:
    msgs = [{"role": "system", "content": "Keep count."}]
    for i in range(turns):
        msgs += [{"role": "user", "content": f"Question {i}: " + " ".join(f"q{i}w{j}" for j in range(12))},
                 {"role": "assistant", "content": f"Answer {i}: " + " ".join(f"a{i}w{j}" for j in range(10))}]
    return {"messages": msgs}


def trained_runs(labels) -> list[tuple]:
    runs, run = [], []
    for x in list(labels) + [IGNORE]:
        if x != IGNORE:
            run.append(int(x))
        elif run:
            runs.append(tuple(run))
            run = []
    return runs


def test_a_long_conversation_is_split_at_turn_boundaries_and_every_answer_is_trained_once(tmp_path, tokenizer):
    """Oracle: Meta's encoding of each assistant turn (llama-models). 12 exchanges of 106 tokens at max_seq_len 256:
    several samples, each within 256, each opening with BOS + the system turn, each answer trained in exactly one
    sample and nothing else trained; later samples carry earlier turns as context (no loss)."""
    from llama_models.datatypes import RawMessage, ToolPromptFormat

    row = long_conversation(12)
    ds = mixed_dataset(tokenizer, sources={"c": {"type": "chat", "path": str(write_jsonl(tmp_path / "c.jsonl", [row]))}},
                       max_seq_len=256, packed=False)
    oracle.meta_tokenizer()
    chat = oracle._META["chat"]
    system, _ = chat.encode_message(RawMessage(role="system", content="Keep count."), ToolPromptFormat.json)
    answers = []
    for m in row["messages"][2::2]:
        ids, _ = chat.encode_message(RawMessage(role="assistant", content=m["content"]), ToolPromptFormat.json)
        answers.append(tuple(ids[len(chat._encode_header("assistant")):]))
    samples = [ds[i] for i in range(len(ds))]
    assert len(samples) >= 4
    runs = [r for s in samples for r in trained_runs(s["labels"])]
    assert sorted(runs) == sorted(answers)  # every answer once; nothing else carries loss
    for s in samples:
        assert len(s["tokens"]) <= 256 and s["tokens"][: 1 + len(system)] == [oracle.special("<|begin_of_text|>"), *system]
    assert any(tokenizer.decode(s["tokens"]).count("Answer") > len(trained_runs(s["labels"])) for s in samples[1:])
    (st,) = ds.stats.sources
    assert (st.rows, st.turns, st.turns_placed, st.split, st.windows, st.truncated) == (1, 12, 12, 1, len(samples), 0)
    short = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]}
    path = write_jsonl(tmp_path / "c2.jsonl", [row, short])
    dropped = mixed_dataset(tokenizer, sources={"c": {"type": "chat", "path": str(path), "too_long": "drop"}},
                            max_seq_len=256, packed=False)
    (st,) = dropped.stats.sources
    assert (st.dropped, st.samples, st.turns, st.turns_placed) == (1, 1, 13, 1)
    assert "12 in dropped conversations" in dropped.stats.table()


def test_an_exchange_longer_than_max_seq_len_is_cut_and_counted(tmp_path, tokenizer):
    row = {"messages": [{"role": "user", "content": " ".join(f"u{j}" for j in range(300))},
                        {"role": "assistant", "content": " ".join(f"a{j}" for j in range(300))}]}
    ds = mixed_dataset(tokenizer, sources={"c": {"type": "chat", "path": str(write_jsonl(tmp_path / "c.jsonl", [row]))}},
                       max_seq_len=128, packed=False)
    (st,) = ds.stats.sources
    assert len(ds[0]["tokens"]) == 128 and (st.prompt_cut, st.completion_cut, st.turns_placed) == (1, 1, 1)
    assert tokenizer.decode([t for t in ds[0]["labels"] if t != IGNORE]).startswith("a0 a1 a2")


@pytest.mark.parametrize("turns, reason, where", [
    ([{"role": "user", "content": "hi"}, {"role": "bot", "content": "yo"}], "unknown role", "turn 1: role 'bot'"),
    ([{"role": "user", "content": "hi"}, {"role": "system", "content": "x"}, {"role": "assistant", "content": "yo"}],
     "turns out of order", "turn 1 is a system turn"),
    ([{"role": "user", "content": "hi"}, {"role": "tool", "content": "42"}, {"role": "assistant", "content": "yo"}],
     "tool result without a call", "turn 1 is a tool result"),
    ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  "}], "empty message", "turn 1 (assistant) is empty"),
    ([{"role": "system", "content": "x"}, {"role": "user", "content": "hi"}], "no assistant turn", "no assistant turn"),
    ([{"role": "user", "content": "hi"}, {"role": "assistant", "tool_calls": [{"type": "function", "function":
      {"name": "f", "arguments": "{not json"}}]}], "bad tool call", "turn 1: tool_calls[0] arguments are not JSON"),
    ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo", "train": False}], "nothing to train", "train: false"),
])
def test_a_bad_conversation_is_named_by_file_line_and_turn(tmp_path, tokenizer, turns, reason, where):
    good = [{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}] * 2
    path = write_jsonl(tmp_path / "c.jsonl", good + [{"messages": turns}])
    with pytest.raises(DatasetError) as info:
        mixed_dataset(tokenizer, sources={"c": {"type": "chat", "path": str(path)}})
    (problem,) = info.value.problems
    assert problem.startswith(f"dataset.sources.c: {path}:3: {reason}: ") and where in problem, problem
    assert "fix the row or set dataset.bad_rows=skip" in problem
    ds = mixed_dataset(tokenizer, sources={"c": {"type": "chat", "path": str(path)}}, bad_rows="skip")
    assert dict(ds.stats.sources[0].skipped) == {reason: 1} and ds.stats.sources[0].rows == 2


def test_unknown_role_names_the_mapping_key_and_roles_maps_it(tmp_path, tokenizer):
    rows = [{"conversations": [{"from": "human", "value": "hi"}, {"from": "bot", "value": "yo"}]}]
    path = write_jsonl(tmp_path / "c.jsonl", rows)
    with pytest.raises(DatasetError, match=r"map it with dataset.sources.c.roles, e.g. roles: \{bot: user\}"):
        mixed_dataset(tokenizer, sources={"c": {"type": "chat", "path": str(path)}})
    ds = mixed_dataset(tokenizer, sources={"c": {"type": "chat", "path": str(path), "roles": {"bot": "assistant"}}}, packed=False)
    assert tokenizer.decode([t for t in ds[0]["labels"] if t != IGNORE], skip_special_tokens=False) == "yo<|eot_id|>"


def test_an_instruct_source_on_conversations_says_to_use_type_chat(tmp_path, tokenizer):
    with pytest.raises(DatasetError) as info:
        mixed_dataset(tokenizer, sources={"c": {"type": "instruct", "path": str(OPENAI)}})
    (problem,) = info.value.problems
    assert f"{OPENAI}:1 holds conversations (column 'messages')" in problem and "Use type: chat" in problem


def test_the_models_own_chat_template_for_a_tokenizer_json_model(tmp_path, small_checkpoint):
    """SmolLM2 (ChatML): ids equal transformers' apply_chat_template of the whole conversation; the loss is on each
    assistant turn's content and its <|im_end|> + newline, nothing else."""
    from transformers import AutoTokenizer

    from custom_datasets._hf_tokenizer import hf_tokenizer

    rows = [json.loads(line) for line in SHAREGPT.read_text().splitlines()[:3]]
    ds = mixed_dataset(hf_tokenizer(str(small_checkpoint), max_seq_len=512),
                       sources={"c": {"type": "chat", "path": str(write_jsonl(tmp_path / "c.jsonl", rows))}}, packed=False)
    ref = AutoTokenizer.from_pretrained(small_checkpoint)
    names = {"system": "system", "human": "user", "gpt": "assistant"}
    for i, row in enumerate(rows):
        messages = [{"role": names[t["from"]], "content": t["value"]} for t in row["conversations"]]
        ids = ref.apply_chat_template(messages, tokenize=True)
        ids = ids if ids[:1] == [ref.bos_token_id] else [ref.bos_token_id] + ids
        assert ds[i]["tokens"] == ids
        trained = [ref.decode(list(r)) for r in trained_runs(ds[i]["labels"])]
        assert trained == [m["content"] + "<|im_end|>\n" for m in messages if m["role"] == "assistant"]


def test_eval_scores_a_held_out_conversations_last_answer_after_the_turns_before_it(tmp_path, tokenizer):
    """Oracle: Meta's format of the conversation up to its last assistant turn, with train_on last_assistant."""
    from custom_datasets._spec import parse_sources
    from tuned.heldout import held_out_samples, read_held_out

    sources = {"c": {"type": "chat", "path": str(OPENAI), "val_size": 6}}
    mixed_dataset(tokenizer, sources=sources, held_out_dir=str(tmp_path / "held"))
    records = read_held_out(tmp_path / "held", ["c"])["c"]
    (spec,) = parse_sources(sources, 256)
    held = held_out_samples(tokenizer, spec, records, 256)
    want = {u.key: u for u in oracle.chat_source("c", {**sources["c"], "path": str(tmp_path / "held" / "c.jsonl"),
                                                         "train_on": "last_assistant"}, 256).units}
    assert len(held.samples) == 6
    for s in held.samples:
        unit = want[tuple((m["role"], m["content"]) for m in s["record"]["messages"])]
        assert (s["tokens"], s["labels"]) == (list(unit.tokens), list(unit.labels))
        assert tokenizer.decode([t for t in s["labels"] if t != IGNORE]).strip() == s["record"]["completion"]


@pytest.mark.parametrize("suffix", [".parquet", ".json"])
def test_conversations_from_table_files_are_the_jsonl_ones(tmp_path, tokenizer, suffix):
    """The OpenAI file with tool calls written as Parquet (datasets fills the keys a turn lacks with nulls) or as
    one JSON array: the same samples as the JSONL file."""
    import pandas as pd

    rows = [json.loads(line) for line in OPENAI.read_text().splitlines()]
    path = tmp_path / f"c{suffix}"
    if suffix == ".parquet":
        pd.DataFrame(rows).to_parquet(path)
    else:
        path.write_text(json.dumps(rows))
    got, want = (mixed_dataset(tokenizer, sources={"c": {"type": "chat", "path": str(p)}}, packed=False) for p in (path, OPENAI))
    assert [got[i]["tokens"] for i in range(len(got))] == [want[i]["tokens"] for i in range(len(want))]
    assert [got[i]["labels"] for i in range(len(got))] == [want[i]["labels"] for i in range(len(want))]
