"""Tokenize once: the pack store is keyed by everything that changes the packs, verified on load,
rebuilt (with a log line) when damaged, and safe when several processes build it at once."""

import dataclasses
import inspect
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from support import pairs, write_jsonl
from test_mixed import digest

from custom_datasets import mixed_dataset


def sources(tmp_path):
    p = write_jsonl(tmp_path / "data" / "pairs.jsonl", pairs(30))
    (tmp_path / "data" / "t.txt").write_text(" ".join(f"w{i}" for i in range(400)))
    return {"pairs": {"type": "instruct", "path": str(p), "val_size": 3},
            "text": {"type": "text", "path": str(tmp_path / "data" / "t.txt")}}


def build(tokenizer, tmp_path, srcs=None, **kw):
    return mixed_dataset(tokenizer, sources=srcs or sources(tmp_path), cache_dir=str(tmp_path / "cache"),
                         held_out_dir=str(tmp_path / "held"), **kw)


def entries(tmp_path) -> list[Path]:
    return sorted(p for p in (tmp_path / "cache").iterdir() if not p.name.startswith("."))


def test_second_build_loads_the_same_packs_memory_mapped(tmp_path, tokenizer):
    cold = build(tokenizer, tmp_path)
    assert cold.stats.cache.startswith("built")
    (tmp_path / "held").joinpath("pairs.jsonl").unlink()
    warm = build(tokenizer, tmp_path)
    assert warm.stats.cache.startswith("loaded") and isinstance(warm._packs.tokens, np.memmap)
    assert digest(warm) == digest(cold) == digest(mixed_dataset(tokenizer, sources=sources(tmp_path), held_out_dir=str(tmp_path / "h2")))
    assert warm.stats.as_dict() | {"cache": ""} == cold.stats.as_dict() | {"cache": ""}
    assert (tmp_path / "held" / "pairs.jsonl").read_text() == (tmp_path / "h2" / "pairs.jsonl").read_text()


def key_sources(tmp_path) -> dict:
    """A pairs source with two prompt columns (so that every option matters) and a text source."""
    rows = [{"prompt": f"Question {i}?", "context": f"context {i}", "completion": f"Answer {i}.", "other": f"Other {i}."}
            for i in range(12)]
    p = write_jsonl(tmp_path / "data" / "rows.jsonl", rows)
    (tmp_path / "data" / "t.txt").write_text(" ".join(f"w{i}" for i in range(400)))
    chats = [{"messages": [{"role": "user", "content": f"Hi {i}"}, {"role": "assistant", "content": f"Hello {i}."}],
              "conversations": [{"from": "human", "value": f"Yo {i}"}, {"from": "gpt", "value": f"Hey {i}."}]} for i in range(12)]
    return {"pairs": {"type": "instruct", "path": str(p), "prompt": ["prompt", "context"]},
            "text": {"type": "text", "path": str(tmp_path / "data" / "t.txt")},
            "chats": {"type": "chat", "path": str(write_jsonl(tmp_path / "data" / "chats.jsonl", chats))}}


# Every field of each source spec and every builder argument, with another value. The test below fails when a new
# field or argument is not listed here (decide: does it change the packs? then it must change the key).
SPEC_CHANGES = {
    "instruct": {"name": "rename", "path": "copy", "prompt": ["prompt"], "completion": "other", "prompt_joiner": " | ",
                 "separator": " => ", "template": "chat", "system_prompt": "Be brief.", "train_on_input": True,
                 "too_long": "drop", "split": "validation", "weight": 2, "val_fraction": 0.2, "val_size": 2,
                 "type": {"type": "text", "column": "completion"}},
    "text": {"name": "rename", "path": "copy", "column": "body", "stride": 8, "weight": 2, "val_fraction": 0.2,
             "val_size": 1, "type": {"type": "instruct"}},
    "chat": {"name": "rename", "path": "copy", "column": "conversations", "format": "openai", "roles": {"bot": "assistant"},
             "system_prompt": "Be brief.", "train_on": "all", "train_key": "trainable", "too_long": "drop",
             "split": "validation", "weight": 2, "val_fraction": 0.2, "val_size": 1, "type": {"type": "instruct"}},
}
BUILDER_CHANGES = {"packed": False, "max_seq_len": 128, "seed": 1, "bad_rows": "skip", "dedup": "near", "dedup_threshold": 0.5,
                   "held_out_dedup": True}
NOT_IN_KEY = {"sources": "its fields are SPEC_CHANGES", "tokenizer": "tested below by its merges",
              "held_out_dir": "where the held-out files are copied to", "cache_dir": "where the store is",
              "num_workers": "the same packs from any number (tested)",
              "batch_size": "packs are split on load, the store is not (tests/custom_datasets/test_pack.py)",
              "gradient_accumulation_steps": "as batch_size",
              "shuffle_seed": "the stored packs, served in another order (tests/custom_datasets/test_mixed.py)"}
CHANGES = [(kind, f) for kind in SPEC_CHANGES for f in SPEC_CHANGES[kind]] + [("builder", a) for a in BUILDER_CHANGES]


def test_every_spec_field_and_builder_argument_is_listed():
    from custom_datasets._spec import SPECS

    for kind, cls in SPECS.items():
        assert {f.name for f in dataclasses.fields(cls)} == set(SPEC_CHANGES[kind]), kind
    params = set(inspect.signature(mixed_dataset).parameters) - {"unknown"}
    assert params == set(BUILDER_CHANGES) | set(NOT_IN_KEY)


@pytest.mark.parametrize("kind, field", CHANGES, ids=[f"{k}.{f}" for k, f in CHANGES])
def test_every_setting_changes_the_key(tmp_path, tokenizer, kind, field):
    assert build(tokenizer, tmp_path, key_sources(tmp_path)).stats.cache.startswith("built")
    assert build(tokenizer, tmp_path, key_sources(tmp_path)).stats.cache.startswith("loaded")
    srcs, kw = key_sources(tmp_path), {}
    if kind == "builder":
        kw[field] = BUILDER_CHANGES[field]
    else:
        name = {"instruct": "pairs", "text": "text", "chat": "chats"}[kind]
        value = SPEC_CHANGES[kind][field]
        if field == "name":
            srcs["renamed"] = srcs.pop(name)
        elif field == "path":
            copy = Path(srcs[name]["path"]).with_name("copy" + Path(srcs[name]["path"]).suffix)
            copy.write_bytes(Path(srcs[name]["path"]).read_bytes())
            srcs[name]["path"] = str(copy)
        elif field == "type":
            srcs[name] = {"path": srcs["pairs"]["path"], **value}
        else:
            srcs[name][field] = value
    assert build(tokenizer, tmp_path, srcs, **kw).stats.cache.startswith("built"), f"{kind}.{field} did not change the key"
    assert len(entries(tmp_path)) == 2


def test_a_tokenizer_with_the_same_size_and_one_merge_apart_changes_the_key(tmp_path, tokenizer):
    from torchtune.models.llama3 import llama3_tokenizer

    from tools.make_tiny_checkpoint import llama3_tokenizer_path

    lines = llama3_tokenizer_path().read_text().splitlines()
    a, b = lines[1000].split(), lines[1001].split()  # swap two ranks: the same vocabulary, one merge order apart
    lines[1000], lines[1001] = f"{a[0]} {b[1]}", f"{b[0]} {a[1]}"
    (tmp_path / "swapped.model").write_text("\n".join(lines) + "\n")
    swapped = llama3_tokenizer(str(tmp_path / "swapped.model"), max_seq_len=256)
    assert swapped.vocab_size == tokenizer.vocab_size
    assert build(tokenizer, tmp_path).stats.cache.startswith("built")
    assert build(llama3_tokenizer(str(llama3_tokenizer_path()), max_seq_len=256), tmp_path).stats.cache.startswith("loaded")
    assert build(swapped, tmp_path).stats.cache.startswith("built")
    assert len(entries(tmp_path)) == 2


def test_a_store_of_another_builder_version_is_not_used(tmp_path, tokenizer, monkeypatch, caplog):
    from custom_datasets import _store

    build(tokenizer, tmp_path)
    (folder,) = entries(tmp_path)
    monkeypatch.setattr(_store, "STORE_VERSION", _store.STORE_VERSION + 1)
    assert build(tokenizer, tmp_path).stats.cache.startswith("built")
    assert len(entries(tmp_path)) == 2  # another version has another key: the old store is not even looked at
    new = next(p for p in entries(tmp_path) if p != folder)
    manifest = json.loads((new / "manifest.json").read_text())
    manifest["version"] -= 1  # a store that says it was written by another version, under this version's key
    (new / "manifest.json").write_text(json.dumps(manifest))
    with caplog.at_level("WARNING"):
        assert build(tokenizer, tmp_path).stats.cache.startswith("built")
    assert "written by another builder version or for another key" in caplog.text


def test_a_stored_held_out_split_without_held_out_dir_is_the_cold_builds_error(tmp_path, tokenizer):
    from custom_datasets import DatasetError

    build(tokenizer, tmp_path)  # val_size 3: the store holds a held-out split
    for _ in range(2):  # loaded from the store, then (store removed) built cold: the same error
        with pytest.raises(DatasetError, match="dataset.held_out_dir is not set but a source holds rows out"):
            mixed_dataset(tokenizer, sources=sources(tmp_path), cache_dir=str(tmp_path / "cache"))
        for folder in entries(tmp_path):
            shutil.rmtree(folder)


def test_build_folders_left_by_dead_builders_are_removed(tmp_path, tokenizer):
    import socket

    host = socket.gethostname()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    cache = tmp_path / "cache"
    stale, alive, other_host = (cache / f".k.{host}.{dead.pid}.tmp", cache / f".k.{host}.{os.getpid()}.tmp",
                                cache / f".k.elsewhere.{dead.pid}.tmp")
    for folder in (stale, alive, other_host):
        (folder / "x").mkdir(parents=True)
    build(tokenizer, tmp_path)
    assert not stale.exists() and alive.exists() and other_host.exists()


@pytest.mark.parametrize("damage", ["truncated", "zeroed", "foreign", "manifest"])
def test_a_damaged_cache_is_detected_logged_and_rebuilt(tmp_path, tokenizer, caplog, damage):
    expected = digest(build(tokenizer, tmp_path))  # (the dataset maps the files: read it before damaging them)
    (folder,) = entries(tmp_path)
    tokens = folder / "tokens.bin"
    if damage == "truncated":
        tokens.write_bytes(tokens.read_bytes()[:-100])
    elif damage == "zeroed":
        tokens.write_bytes(bytes(tokens.stat().st_size))
    elif damage == "foreign":
        tokens.write_bytes(np.arange(tokens.stat().st_size // 4, dtype=np.int32).tobytes())  # same size, other content
    else:
        (folder / "manifest.json").write_text("{not json")
    with caplog.at_level("WARNING"):
        again = build(tokenizer, tmp_path)
    assert f"Data cache {folder} is unusable" in caplog.text and "rebuilding it" in caplog.text
    assert again.stats.cache.startswith("built") and digest(again) == expected


def test_concurrent_builds_that_collide_leave_one_valid_store(tmp_path, tokenizer):
    """Three processes build the same config; each waits at commit until all three have built, so all three rename
    at once: one wins, the two others take the rename-collision path and use the winner's store."""
    srcs = sources(tmp_path)
    script = (
        "import glob, hashlib, json, os, sys, time\n"
        "from torchtune.models.llama3 import llama3_tokenizer\n"
        "from custom_datasets import mixed_dataset, _store\n"
        + inspect.getsource(digest) +
        "commit = _store.commit\n"
        "def held_commit(*args, **kwargs):\n"
        f"    open(os.path.join({str(tmp_path)!r}, f'arrived.{{os.getpid()}}'), 'w').close()\n"
        f"    while len(glob.glob(os.path.join({str(tmp_path)!r}, 'arrived.*'))) < 3:\n"
        "        time.sleep(0.01)\n"
        "    return commit(*args, **kwargs)\n"
        "_store.commit = held_commit\n"
        "tok = llama3_tokenizer(sys.argv[1], max_seq_len=256)\n"
        f"ds = mixed_dataset(tok, sources=json.loads(sys.argv[2]), cache_dir={str(tmp_path / 'cache')!r}, held_out_dir=sys.argv[3])\n"
        "print(ds.stats.cache.split()[0], digest(ds))\n"
    )
    from tools.make_tiny_checkpoint import llama3_tokenizer_path

    procs = [subprocess.Popen([sys.executable, "-c", script, str(llama3_tokenizer_path()), json.dumps(srcs), str(tmp_path / f"h{i}")],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(3)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    results = [o[0].strip().splitlines()[-1].split() for o in outs]
    assert [r[0] for r in results] == ["built"] * 3 and len({r[1] for r in results}) == 1
    assert sum("first; using its copy" in o[1] for o in outs) == 2  # two lost the race, and said so
    assert len(entries(tmp_path)) == 1
    assert not list((tmp_path / "cache").glob(".*.tmp"))  # no half-written folder left behind
    assert all((tmp_path / f"h{i}" / "pairs.jsonl").is_file() for i in range(3))
    assert build(tokenizer, tmp_path).stats.cache.startswith("loaded") and digest(build(tokenizer, tmp_path)) == results[0][1]


def test_parallel_tokenization_gives_the_same_packs(tmp_path, tokenizer, monkeypatch):
    from custom_datasets import _tokenize

    srcs = {"pairs": {"type": "instruct", "path": str(write_jsonl(tmp_path / "p.jsonl", pairs(300)))}}
    serial = mixed_dataset(tokenizer, sources=srcs, num_workers=1)
    monkeypatch.setattr(_tokenize, "CHUNK", 7)  # 43 tasks: over PARALLEL_FROM, so a pool of 2 runs them
    parallel = mixed_dataset(tokenizer, sources=srcs, num_workers=2)
    assert digest(parallel) == digest(serial)


def test_under_torchrun_rank_0_builds_and_the_other_ranks_read(tmp_path):
    """Two ranks (gloo on CPU, as torchrun starts lora_finetune_distributed's): one build, one cache."""
    srcs = sources(tmp_path)
    script = tmp_path / "ranks.py"
    script.write_text(
        "import hashlib, json, sys, torch.distributed as dist\n"
        "from torchtune.models.llama3 import llama3_tokenizer\n"
        "from custom_datasets import mixed_dataset\n"
        + inspect.getsource(digest) +
        "dist.init_process_group('gloo')\n"
        "tok = llama3_tokenizer(sys.argv[1], max_seq_len=256)\n"
        f"ds = mixed_dataset(tok, sources=json.loads(sys.argv[2]), cache_dir={str(tmp_path / 'cache')!r}, held_out_dir={str(tmp_path / 'held')!r})\n"
        f"open(f'{tmp_path}/rank{{dist.get_rank()}}.txt', 'w').write(f'RANK {{dist.get_rank()}} {{ds.stats.cache.split()[0]}} {{digest(ds)}}')\n"
        "dist.destroy_process_group()\n"
    )
    from tools.make_tiny_checkpoint import llama3_tokenizer_path

    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29561",
                          str(script), str(llama3_tokenizer_path()), json.dumps(srcs)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    lines = [(tmp_path / f"rank{r}.txt").read_text() for r in (0, 1)]  # (stdout lines of two ranks can interleave)
    assert [line.split()[:3] for line in lines] == [["RANK", "0", "built"], ["RANK", "1", "loaded"]]
    assert lines[0].split()[3] == lines[1].split()[3] and len(entries(tmp_path)) == 1
