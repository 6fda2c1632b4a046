"""`make mutate`: seeds known, plausible bugs into a copy of the project, one at a time, runs the data layer's tests
against each, and prints which bugs the tests catch ("killed") and which they miss ("SURVIVED").

Each mutation is a literal replacement in one file (it must match exactly once, so a mutation that no longer
applies is reported as stale instead of passing silently). The copy is `git ls-files` of this checkout (tracked and
untracked, not ignored), with PYTHONPATH set to it, so the installed package in .venv is not what is tested.

    python tests/mutate.py [--only 1,5] [--tests "tests/..."] [--list]

Exit status 1 when any mutation survives or is stale.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TESTS = ["tests/contract/test_pack_properties.py", "tests/contract/test_bad_input.py", "tests/custom_datasets", "tests/tuned"]


@dataclass(frozen=True)
class Mutation:
    name: str
    path: str
    old: str
    new: str


MUTATIONS = [
    Mutation("labels masked one token late", "custom_datasets/_tokenize.py",
             "labels[offsets[lengths > 0]] = IGNORE", "labels[offsets[lengths > 0] + 1] = IGNORE"),
    Mutation("too_long: drop served as empty samples", "custom_datasets/_build.py",
             "train = np.flatnonzero(table.flags != Cut.DROPPED)", "train = np.arange(len(table.flags))"),
    Mutation("dropped pairs not counted", "custom_datasets/_build.py",
             "stats.dropped = int((table.flags == Cut.DROPPED).sum())", "stats.dropped = 0"),
    Mutation("truncated pairs not counted", "custom_datasets/_build.py",
             "stats.truncated = int(((table.flags & (Cut.PROMPT | Cut.COMPLETION)) > 0).sum())", "stats.truncated = 0"),
    Mutation("cache key without train_on_input", "custom_datasets/_mixed.py",
             '"sources": [dataclasses.asdict(s) for s in specs]',
             '"sources": [{k: v for k, v in dataclasses.asdict(s).items() if k != "train_on_input"} for s in specs]'),
    Mutation("cache key without the tokenizer", "custom_datasets/_store.py",
             "h.update(_tokenizer_digest(tokenizer))", "h.update(b'')"),
    Mutation("cache key without packed", "custom_datasets/_mixed.py", '"packed": packed, ', ""),
    Mutation("cache key without the builder version", "custom_datasets/_store.py",
             'h = hashlib.sha256(f"store v{STORE_VERSION}".encode())', 'h = hashlib.sha256(b"store")'),
    Mutation("stored version/key not checked on load", "custom_datasets/_store.py",
             'if manifest.get("version") != STORE_VERSION or manifest.get("key") != key:', "if False:"),
    Mutation("tokenizer digest samples the merges", "custom_datasets/_store.py",
             'merges = hashlib.sha256(b"\\0".join(ranks))\n        merges.update(np.fromiter(ranks.values(), np.int64, len(ranks)).tobytes())',
             'merges = hashlib.sha256(b"\\0".join(list(ranks)[::61]))'),  # the digest before: every 61st token
    Mutation("eval scores the prompt (as train_on_input)", "tuned/heldout.py",
             "dataclasses.replace(spec, train_on_input=False)", "spec"),
    Mutation("eval scores held-out text's stride context", "tuned/heldout.py",
             "[IGNORE] * (1 + len(ctx)) + body", "[IGNORE] + ctx + body"),
    Mutation("held-out text loses its context split", "custom_datasets/_held_out.py",
             "context = int((labs[1:] == IGNORE).sum())", "context = 0"),
    Mutation("a builder that loses the rename race fails", "custom_datasets/_store.py",
             "    except OSError:  # another process finished the same store first\n",
             "    except OSError:  # another process finished the same store first\n        raise\n"),
    Mutation("reader runs far ahead of the writer", "custom_datasets/_tokenize.py",
             "IN_FLIGHT = 2  #", "IN_FLIGHT = 8  #"),
    Mutation("fractional weight drawn with replacement", "custom_datasets/_mix.py",
             '_rng(seed, name, "weight").sample(range(len(ids)), part)', '_rng(seed, name, "weight").choices(range(len(ids)), k=part)'),
    Mutation("fractional weight: ceil for round", "custom_datasets/_mix.py",
             "part = round((weight - whole) * len(ids))", "part = math.ceil((weight - whole) * len(ids))"),
    Mutation("every row may be held out", "custom_datasets/_mix.py", "min(want, max(n - 1, 0))", "min(want, n)"),
    Mutation("worst fit instead of best fit", "custom_datasets/_pack.py",
             "at = bisect.bisect_left(open_packs, (size, -1))",
             "at = len(open_packs) - 1 if open_packs and open_packs[-1][0] >= size else len(open_packs)"),
    Mutation("table-file errors without the row number", "custom_datasets/_read.py",
             'yield f"{path} row {index + 1}", row', 'yield f"{path}", row'),
    Mutation("stored held-out split with held_out_dir unset", "custom_datasets/_mixed.py",
             "_need_held_out_dir(stats.sources, held_out_dir, problems)  #", "pass  #"),
    Mutation("stale build folders of dead builders kept", "custom_datasets/_store.py",
             "    _remove_stale(cache_dir)\n", ""),
    Mutation("chat: assistant headers trained", "custom_datasets/_chat.py",
             'labels += list(p.header) if i in train and train_on == "all" else', "labels += list(p.header) if i in train else"),
    Mutation("chat: tool calls left out", "custom_datasets/_chat.py",
             "for name, arguments in t.tool_calls:", "for name, arguments in ():"),
    Mutation("chat: a split trains its context turns again", "custom_datasets/_chat.py",
             "labels += list(p.body) if i in train else", "labels += list(p.body) if pieces[i].trained else"),
    Mutation("chat: a turn's own train flag ignored", "custom_datasets/_chat.py",
             "out.append(trained if t.train is None else t.train)", "out.append(trained)"),
    Mutation("chat: tool results not under ipython", "custom_datasets/_chat.py",
             '"tool": "ipython"}', '"tool": "tool"}'),
    Mutation("fit: allocations not rounded to the allocator's blocks", "tuned/memory.py",
             "BLOCK = 512  #", "BLOCK = 1  #"),
    Mutation("fit: activation checkpointing not applied", "tuned/memory.py",
             'if cfg.get("enable_activation_checkpointing", False):\n            training.set_activation_checkpointing',
             'if False:\n            training.set_activation_checkpointing'),
    Mutation("fit: the trace ignores the config's batch_size", "tuned/memory.py",
             "batch, seq = int(cfg.batch_size), sequence_length(cfg)", "batch, seq = 1, sequence_length(cfg)"),
    Mutation("chat: eval scores every answer of a held-out conversation", "tuned/heldout.py",
             'train_on="last_assistant", train_key', 'train_on="all_assistant", train_key'),
    Mutation("dedup: exact copies compared without case folding", "custom_datasets/_minhash.py",
             "ord(chr(c).casefold())", "c"),
    Mutation("dedup: near copies confirmed only well above the threshold", "custom_datasets/_dedup.py",
             "if j[k] >= self.threshold and j[k] > best_j[f]:", "if j[k] >= self.threshold + 0.15 and j[k] > best_j[f]:"),
    Mutation("dedup: rows kept in earlier batches never found again", "custom_datasets/_dedup.py",
             "        if not self._n or not len(sigs):", "        if True:"),
    Mutation("dedup: merging the kept tables drops the older entries", "custom_datasets/_dedup.py",
             "k, v = np.concatenate([old_k, k]), np.concatenate([old_v, v])", "pass"),
    Mutation("dedup: held_out_dedup leaves seen rows in the held-out split", "custom_datasets/_duplicates.py",
             "            if dups.held_out:\n                out[spec.name][1].add(row & ROW_MASK)", "            pass"),
    Mutation("data: shuffle_seed leaves the packs in the stored order", "custom_datasets/_mixed.py",
             "        if self._order is not None:\n", "        if False:\n"),
    Mutation("dedup: exact mode removes near copies too", "custom_datasets/_duplicates.py",
             'return self.mode == "near" or (self.mode == "exact" and not near)', 'return self.mode in ("near", "exact")'),
]


def copy_project(dest: Path) -> None:
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, capture_output=True,
                           check=True).stdout.decode().split("\0")
    for name in filter(None, files):
        src = REPO / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)


def apply(root: Path, m: Mutation) -> bool:
    path = root / m.path
    text = path.read_text()
    if text.count(m.old) != 1:
        return False
    path.write_text(text.replace(m.old, m.new))
    return True


def run_tests(root: Path, tests: list[str]) -> tuple[bool, str]:
    """(passed, the first failing test or the tail of the output)."""
    env = {**os.environ, "PYTHONPATH": str(root), "PYTHONDONTWRITEBYTECODE": "1"}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-rfE", "-p", "no:cacheprovider",
                           *tests], cwd=root, env=env, capture_output=True, text=True)
    lines = proc.stdout.splitlines()
    failed = [line.removeprefix("FAILED ").removeprefix("ERROR ") for line in lines if line.startswith(("FAILED", "ERROR"))]
    return proc.returncode == 0, (failed[0][:300] if failed else lines[-1] if lines else proc.stderr[-300:])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", help="comma-separated mutation numbers (1-based)")
    parser.add_argument("--tests", help="space-separated test paths (default: the data layer's)")
    parser.add_argument("--list", action="store_true", help="list the mutations and exit")
    args = parser.parse_args()
    chosen = [int(x) for x in args.only.split(",")] if args.only else range(1, len(MUTATIONS) + 1)
    if args.list:
        for i in chosen:
            print(f"{i:2}. {MUTATIONS[i - 1].name} ({MUTATIONS[i - 1].path})")
        return 0
    tests = args.tests.split() if args.tests else TESTS
    with tempfile.TemporaryDirectory(prefix="mutate.") as tmp:
        base = Path(tmp) / "base"
        copy_project(base)
        if (REPO.parent / "shared").is_dir():  # ../shared/data, where the tests look for the real data
            (Path(tmp) / "shared").symlink_to(REPO.parent / "shared")
        check = subprocess.run([sys.executable, "-c", "import custom_datasets; print(custom_datasets.__file__)"], cwd=base,
                               env={**os.environ, "PYTHONPATH": str(base)}, capture_output=True, text=True, check=True)
        assert check.stdout.strip().startswith(str(base)), f"the copy is not what is imported: {check.stdout}"
        rows, bad = [], 0
        for i in chosen:
            m = MUTATIONS[i - 1]
            root = Path(tmp) / f"m{i}"
            shutil.copytree(base, root)
            start = time.time()
            if not apply(root, m):
                result, detail = "STALE", f"{m.old!r} does not occur exactly once in {m.path}"
            else:
                passed, detail = run_tests(root, tests)
                result = "SURVIVED" if passed else "killed"
            shutil.rmtree(root, ignore_errors=True)
            bad += result != "killed"
            rows.append((i, m.name, m.path, result, detail, time.time() - start))
            print(f"{i:2}. {result:8} {m.name}: {detail} ({rows[-1][-1]:.0f} s)", flush=True)
    print("\n| # | seeded bug | file | result | first failing test |\n| ---: | --- | --- | --- | --- |")
    for i, name, path, result, detail, _ in rows:
        print(f"| {i} | {name} | `{path}` | {'**' + result + '**' if result != 'killed' else result} | `{detail}` |")
    print(f"\n{len(rows) - bad} of {len(rows)} seeded bugs killed by: {' '.join(tests)}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
