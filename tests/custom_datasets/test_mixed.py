"""The builder end to end: weights, held-out split, determinism, one stream from all sources."""

import hashlib
import inspect
import json
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest
from support import SHARED_DATA, pairs, write_jsonl
from torchtune.data import padded_collate_sft

from custom_datasets import mixed_dataset


def digest(ds) -> str:
    h = hashlib.sha256()
    for item in ds:
        for key in sorted(item):
            h.update(key.encode() + item[key].numpy().tobytes())
    return h.hexdigest()


def sources(tmp_path, **overrides):
    p = write_jsonl(tmp_path / "pairs.jsonl", pairs(40))
    (tmp_path / "text").mkdir(exist_ok=True)
    (tmp_path / "text" / "a.txt").write_text(" ".join(f"word{i}" for i in range(300)))
    out = {"pairs": {"type": "instruct", "path": str(p)}, "text": {"type": "text", "path": str(tmp_path / "text")}}
    for name, extra in overrides.items():
        out[name].update(extra)
    return out


@pytest.mark.parametrize("weight, expected", [(1, 40), (2, 80), (0.25, 10), (1.5, 60), (0.33, 13), (1.33, 53), (2.9, 116)])
def test_weight_is_how_often_a_source_is_seen(tmp_path, tokenizer, weight, expected):
    """Literal expectations: weight w serves every pair floor(w) times and a subset of round(frac(w) * 40) distinct
    pairs once more (0.33 of 40 = 13.2: 13, not 14)."""
    ds = mixed_dataset(tokenizer, sources=sources(tmp_path, pairs={"weight": weight}), packed=False)
    assert ds.stats.sources[0].samples == expected
    prompts = [tokenizer.decode(ds[i]["tokens"]) for i in range(len(ds))]
    counts = Counter(next(q for q in range(40) if f"q question number {q}?\n" in p) for p in prompts if "question" in p)
    served = Counter(counts.get(q, 0) for q in range(40))  # how many pairs are served 0, 1, 2, ... times
    whole = int(weight)
    assert served == Counter({whole + 1: expected - 40 * whole, whole: 40 - (expected - 40 * whole)}) - Counter(), served


@pytest.mark.parametrize("rows, options, held", [(3, {"val_size": 10}, 2), (3, {"val_fraction": 0.99}, 2),
                                                 (40, {"val_fraction": 0.05}, 2), (41, {"val_fraction": 0.05}, 3),
                                                 (1, {"val_fraction": 0.5}, 0), (40, {"val_size": 0}, 0)])
def test_held_out_count_never_takes_every_row(tmp_path, tokenizer, rows, options, held):
    """Literal counts: ceil(rows * val_fraction) or val_size, and at least one row always stays for training."""
    srcs = {"pairs": {"type": "instruct", "path": str(write_jsonl(tmp_path / "p.jsonl", pairs(rows))), **options}}
    ds = mixed_dataset(tokenizer, sources=srcs, packed=False, held_out_dir=str(tmp_path / "held"))
    assert (ds.stats.sources[0].held_out, ds.stats.sources[0].samples, len(ds)) == (held, rows - held, rows - held)


def test_fractional_weight_picks_the_same_quarter_every_time(tmp_path, tokenizer):
    a = mixed_dataset(tokenizer, sources=sources(tmp_path, pairs={"weight": 0.25}))
    b = mixed_dataset(tokenizer, sources=sources(tmp_path, pairs={"weight": 0.25}))
    c = mixed_dataset(tokenizer, sources=sources(tmp_path, pairs={"weight": 0.25}), seed=1)
    assert digest(a) == digest(b) != digest(c)


def test_held_out_rows_are_written_and_never_trained_on(tmp_path, tokenizer):
    out = tmp_path / "run" / "held_out"
    ds = mixed_dataset(tokenizer, sources=sources(tmp_path, pairs={"val_size": 5}, text={"val_fraction": 0.2}),
                       held_out_dir=str(out), packed=False)
    held = [json.loads(line) for line in (out / "pairs.jsonl").read_text().splitlines()]
    assert len(held) == 5 and ds.stats.sources[0].held_out == 5 and ds.stats.sources[0].samples == 35
    assert set(held[0]) == {"source", "where", "prompt", "completion"} and held[0]["where"].startswith(str(tmp_path))
    trained = "".join(tokenizer.decode(ds[i]["tokens"]) for i in range(len(ds)))
    assert all(h["prompt"] + "\n" not in trained for h in held)
    text_held = [json.loads(line) for line in (out / "text.jsonl").read_text().splitlines()]
    assert len(text_held) == ds.stats.sources[1].held_out == 1
    assert text_held[0]["text"] not in trained
    again = mixed_dataset(tokenizer, sources=sources(tmp_path, pairs={"val_size": 5}, text={"val_fraction": 0.2}),
                          held_out_dir=str(tmp_path / "again"), packed=False)
    assert (tmp_path / "again" / "pairs.jsonl").read_text() == (out / "pairs.jsonl").read_text()
    assert len(again) == len(ds)


def test_sources_are_packed_together_into_one_stream(tmp_path, tokenizer):
    srcs = {"pairs": {"type": "instruct", "path": str(write_jsonl(tmp_path / "p.jsonl", pairs(6)))},
            "text": {"type": "text", "path": str(tmp_path / "t.txt")}}
    (tmp_path / "t.txt").write_text(" ".join(f"word{i}" for i in range(40)))
    both = mixed_dataset(tokenizer, sources=srcs)
    alone = [mixed_dataset(tokenizer, sources={k: v}) for k, v in srcs.items()]
    assert [len(a) for a in alone] == [1, 1] and len(both) == 1
    assert both[0]["seq_lens"].tolist()[:-1] == sorted(alone[1][0]["seq_lens"].tolist()[:1] + alone[0][0]["seq_lens"].tolist()[:-1], reverse=True)


def test_same_config_and_seed_give_byte_identical_packs_across_processes(tmp_path, tokenizer):
    srcs = sources(tmp_path, pairs={"weight": 1.5, "val_fraction": 0.1})
    held = str(tmp_path / "h")
    script = (
        "import hashlib, inspect, json, sys\n"
        "from torchtune.models.llama3 import llama3_tokenizer\n"
        "from custom_datasets import mixed_dataset\n"
        + inspect.getsource(digest) +
        "tok = llama3_tokenizer(sys.argv[1], max_seq_len=256)\n"
        f"print(digest(mixed_dataset(tok, sources=json.loads(sys.argv[2]), held_out_dir={held!r})))\n"
    )
    from tools.make_tiny_checkpoint import llama3_tokenizer_path

    run = subprocess.run([sys.executable, "-c", script, str(llama3_tokenizer_path()), json.dumps(srcs)],
                         capture_output=True, text=True, check=True, env={"PYTHONHASHSEED": "123", "PATH": ""})
    assert run.stdout.strip().splitlines()[-1] == digest(mixed_dataset(tokenizer, sources=srcs, held_out_dir=held))


def test_unpacked_samples_work_with_the_stock_sft_collator(tmp_path, tokenizer):
    ds = mixed_dataset(tokenizer, sources=sources(tmp_path), packed=False)
    batch = padded_collate_sft([ds[0], ds[1]])
    assert batch["tokens"].shape == batch["labels"].shape and batch["tokens"].shape[0] == 2


def test_data_table_is_logged_at_build_time(tmp_path, tokenizer, caplog):
    with caplog.at_level("INFO"):
        mixed_dataset(tokenizer, sources=sources(tmp_path, pairs={"val_size": 2}), held_out_dir=str(tmp_path / "h"))
    text = caplog.text
    assert "Data table (max_seq_len=256)" in text
    assert "pairs   instruct" in text and "held out" in text and "text kept" in text
    assert "packs x 256 tokens, fill" in text


@pytest.mark.skipif(not SHARED_DATA.exists(), reason="../shared/data is not present")
def test_shared_data_keeps_all_text_and_fills_99_percent_at_2048(tokenizer):
    ds = mixed_dataset(
        tokenizer,
        sources={"alpaca": {"type": "instruct", "path": str(SHARED_DATA / "alpaca_8k.jsonl")},
                 "shakespeare": {"type": "text", "path": str(SHARED_DATA / "tinyshakespeare.txt")}},
        max_seq_len=2048, bad_rows="skip")
    alpaca, shakespeare = ds.stats.sources
    assert dict(alpaca.skipped) == {"empty completion": 5}  # the 5 known empty completions, counted
    assert shakespeare.doc_tokens == 301_769 + 1  # docs/data.md's count, + EOS
    assert shakespeare.kept_tokens == shakespeare.doc_tokens
    assert ds.stats.fill >= 0.99


def test_data_table_counts_prompt_and_answer_cuts_apart(tmp_path, tokenizer):
    """Rows built so that the test knows what must be cut: 3 with a long context (prompt shortened), 2 with
    a long answer (answer cut), 1 with both."""
    long = " ".join(f"w{i}" for i in range(400))
    rows = ([{"instruction": "Q?", "context": long, "output": "short"}] * 3 + [{"instruction": "Q?", "context": "c", "output": long}] * 2
            + [{"instruction": "Q?", "context": long, "output": long}] + [{"instruction": "Q?", "context": "c", "output": "ok"}] * 4)
    path = write_jsonl(tmp_path / "rows.jsonl", rows)
    ds = mixed_dataset(tokenizer, sources={"rows": {"type": "instruct", "path": str(path), "prompt": ["instruction", "context"],
                                                    "completion": "output"}}, max_seq_len=128)
    (s,) = ds.stats.sources
    assert (s.prompt_cut, s.completion_cut, s.truncated, s.dropped) == (4, 3, 6, 0)
    table = ds.stats.table()
    assert "prompt cut" in table and "answer cut" in table and "prompt shortened in 4, answer cut in 3" in table


def test_a_fractional_text_weight_reports_what_is_never_trained(tmp_path, tokenizer):
    """Oracle: the labels of the packed stream itself. Weight 1 trains T supervised tokens per epoch; weight 0.3
    trains t; the report must say T - t are never trained (the subset is fixed: the same every epoch) and
    must not call the text 100% kept."""
    (tmp_path / "text").mkdir()
    (tmp_path / "text" / "a.txt").write_text(" ".join(f"word{i}" for i in range(3000)))

    def stream(weight):
        ds = mixed_dataset(tokenizer, sources={"text": {"type": "text", "path": str(tmp_path / "text"), "weight": weight}},
                           max_seq_len=128)
        return ds, sum(int((np.asarray(ds[i]["labels"]) != -100).sum()) for i in range(len(ds)))

    _, everything = stream(1)
    ds, trained = stream(0.3)
    (s,) = ds.stats.sources
    assert s.never_trained == everything - trained and 0.6 < s.never_trained / everything < 0.8
    row = ds.stats.rows()[0]
    assert row[-1] != "100.0%" and row[-2].startswith(f"{s.never_trained:,} (")
    assert "never trained in this run" in ds.stats.table()


def test_shuffle_seed_serves_every_pack_once_in_the_order_it_fixes(tmp_path, tokenizer):
    """The stock recipe's sampler fixes its own seed at 0, so dataset.shuffle_seed (the presets: ${seed}) is what
    changes the data order with the recipe's seed: the stored packs, each served once, reordered; one seed, one order."""
    from custom_datasets._spec import DatasetError

    srcs = sources(tmp_path)
    items = lambda **kw: [tuple(item["tokens"]) for item in mixed_dataset(tokenizer, packed=False, sources=srcs, **kw)]  # noqa: E731
    stored, one, again, two = items(), items(shuffle_seed=1), items(shuffle_seed=1), items(shuffle_seed=2)
    assert len(stored) > 20 and sorted(one) == sorted(stored) == sorted(two)
    assert one == again and one != stored and two != one
    with pytest.raises(DatasetError, match=r"dataset.shuffle_seed: 'x' is not a whole number"):
        mixed_dataset(tokenizer, sources=srcs, shuffle_seed="x")
