"""Tokenize once: the pack store is keyed by everything that changes the packs, verified on load,
rebuilt (with a log line) when damaged, and safe when several processes build it at once."""

import inspect
import json
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


@pytest.mark.parametrize("change", ["file content", "weight", "max_seq_len", "seed", "template", "stride"])
def test_anything_that_changes_the_packs_changes_the_key(tmp_path, tokenizer, change):
    build(tokenizer, tmp_path)
    srcs, kw = sources(tmp_path), {}
    if change == "file content":
        write_jsonl(tmp_path / "data" / "pairs.jsonl", pairs(31))
    elif change == "weight":
        srcs["text"]["weight"] = 2
    elif change == "max_seq_len":
        kw["max_seq_len"] = 128
    elif change == "seed":
        kw["seed"] = 1
    elif change == "template":
        srcs["pairs"]["template"] = "llama3_chat"
    else:
        srcs["text"]["stride"] = 8
    assert build(tokenizer, tmp_path, srcs, **kw).stats.cache.startswith("built")
    assert len(entries(tmp_path)) == 2


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


def test_concurrent_builds_of_the_same_config_do_not_corrupt_each_other(tmp_path, tokenizer):
    srcs = sources(tmp_path)
    script = (
        "import hashlib, json, sys\n"
        "from torchtune.models.llama3 import llama3_tokenizer\n"
        "from custom_datasets import mixed_dataset\n"
        + inspect.getsource(digest) +
        "tok = llama3_tokenizer(sys.argv[1], max_seq_len=256)\n"
        f"ds = mixed_dataset(tok, sources=json.loads(sys.argv[2]), cache_dir={str(tmp_path / 'cache')!r}, held_out_dir=sys.argv[3])\n"
        "print(digest(ds))\n"
    )
    from make_tiny_checkpoint import llama3_tokenizer_path

    procs = [subprocess.Popen([sys.executable, "-c", script, str(llama3_tokenizer_path()), json.dumps(srcs), str(tmp_path / f"h{i}")],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(3)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    digests = {o[0].strip().splitlines()[-1] for o in outs}
    assert len(digests) == 1 and len(entries(tmp_path)) == 1
    assert not list((tmp_path / "cache").glob(".*.tmp"))  # no half-written folder left behind
    assert build(tokenizer, tmp_path).stats.cache.startswith("loaded") and digest(build(tokenizer, tmp_path)) in digests


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
    from make_tiny_checkpoint import llama3_tokenizer_path

    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29561",
                          str(script), str(llama3_tokenizer_path()), json.dumps(srcs)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    lines = [(tmp_path / f"rank{r}.txt").read_text() for r in (0, 1)]  # (stdout lines of two ranks can interleave)
    assert [line.split()[:3] for line in lines] == [["RANK", "0", "built"], ["RANK", "1", "loaded"]]
    assert lines[0].split()[3] == lines[1].split()[3] and len(entries(tmp_path)) == 1
