"""A naive reference for what the builder must train, computed from the raw files and the source options alone.

Plain Python over Meta's own Llama 3 tokenizer and chat format (the `llama-models` package): nothing here imports
`custom_datasets` or torchtune, and nothing is vectorised, so a bug in the builder is not repeated here. It covers
what the contract tests generate: JSONL pairs with one prompt column (templates `completion` and `chat`, optional
system prompt, `train_on_input`, `too_long` truncate or drop), and text files or folders (windows with a stride).

What the builder must produce, written from the rules in docs/data.md:

- pair, completion template: BOS + encode(prompt + separator) + encode(completion) + EOS; loss on the completion
  and EOS (and on the prompt with train_on_input), never on BOS.
- pair, chat template: Meta's dialog format (llama_models.llama3.chat_format: system?, user, assistant turns, each
  header + content + <|eot_id|>), loss on the assistant content and its <|eot_id|>. torchtune's message API strips
  each content and ends the sample with <|end_of_text|>, which carries no loss: both are part of the expectation.
- too long, truncate: the completion keeps min(all of it, max(room after the prompt, half the room)), the prompt
  keeps its end in the rest; the leading BOS stays. too long, drop: no sample.
- text: each document + EOS, in windows of BOS + at most max_seq_len - 1 tokens; window k starts where window k - 1
  ends minus `stride`; the first `stride` tokens of every window after the first are context (no loss), so each
  document token carries its label in exactly one window.
- chat (conversations that fit in max_seq_len): BOS + each turn as llama-models' `ChatFormat.encode_message` writes it
  (contents stripped; tool calls as Meta's JSON; tool results under `ipython`); loss on the body (content, tool
  calls, <|eot_id|>) of the turns `train_on` and the turns' own `train` flags pick, never on a header.
- every sample's first label is -100.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from llama_models.datatypes import RawMessage, ToolCall, ToolPromptFormat
from llama_models.llama3.chat_format import ChatFormat
from llama_models.llama3.tokenizer import Tokenizer

IGNORE = -100
_META = {}


def meta_tokenizer() -> Tokenizer:
    if "tok" not in _META:
        _META["tok"] = Tokenizer.get_instance()
        _META["chat"] = ChatFormat(_META["tok"])
    return _META["tok"]


def encode(text: str) -> list[int]:
    return meta_tokenizer().encode(text, bos=False, eos=False)


def special(name: str) -> int:
    return meta_tokenizer().special_tokens[name]


@dataclass(frozen=True)
class Unit:
    """One sample the builder must make (or must leave out, when held out or dropped)."""

    index: int  # row (pairs, among the usable rows) or window (text, over all documents) number, in file order
    tokens: tuple
    labels: tuple
    cut: frozenset = frozenset()  # {"prompt", "completion"}: what truncation shortened; {"dropped"}: no sample
    key: tuple = ()  # what the held-out file says of this unit: (prompt, completion), (context, text) or the turns
    turns: int = 0  # chat: turns trained

    @property
    def supervised(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE)


@dataclass
class Source:
    name: str
    type: str
    weight: float
    units: list[Unit]
    rows: int  # usable pairs, or documents with text
    skipped: Counter = field(default_factory=Counter)
    empty_documents: int = 0
    doc_tokens: int = 0


def _jsonl(path: str):
    """(line number, object) of every non-blank line; None for a line that is not a JSON object."""
    with open(path, encoding="utf-8-sig") as f:
        for number, line in enumerate(f, start=1):
            if line.strip():
                try:
                    obj = json.loads(line)
                except ValueError:
                    obj = None
                yield number, obj if isinstance(obj, dict) else None


def _pair_pieces(opts: dict, prompt: str, completion: str):
    """(head, prompt tokens, completion tokens, completion labels)."""
    bos = special("<|begin_of_text|>")
    if opts.get("template", "completion") == "completion":
        comp = encode(completion) + [special("<|end_of_text|>")]
        return [bos], encode(prompt + opts.get("separator", "\n")), comp, list(comp)
    chat = _META["chat"]
    meta_tokenizer()
    prompt_ids = []
    if opts.get("system_prompt"):
        prompt_ids += chat._encode_header("system") + encode(opts["system_prompt"].strip()) + [special("<|eot_id|>")]
    prompt_ids += chat._encode_header("user") + encode(prompt.strip()) + [special("<|eot_id|>")]
    prompt_ids += chat._encode_header("assistant")
    answer = encode(completion.strip()) + [special("<|eot_id|>")]
    return [bos], prompt_ids, answer + [special("<|end_of_text|>")], answer + [IGNORE]


def pair_source(name: str, opts: dict, max_seq_len: int) -> Source:
    """The units of an instruct source (JSONL, one prompt column)."""
    prompt_col, comp_col = opts.get("prompt", "prompt"), opts.get("completion", "completion")
    assert isinstance(prompt_col, str), "the oracle reads one prompt column"
    units, skipped = [], Counter()
    for _, row in _jsonl(opts["path"]):
        if row is None:
            skipped["malformed JSON"] += 1
            continue
        prompt, completion = row.get(prompt_col), row.get(comp_col)
        if not isinstance(completion, str) or not completion.strip() or not isinstance(prompt, str) or not prompt.strip():
            skipped["bad row"] += 1
            continue
        head, p, c, c_labels = _pair_pieces(opts, prompt, completion)
        cut = set()
        if len(head) + len(p) + len(c) > max_seq_len:
            if opts.get("too_long", "truncate") == "drop":
                units.append(Unit(len(units), (), (), frozenset({"dropped"}), (prompt, completion)))
                continue
            room = max_seq_len - len(head)
            keep_c = min(len(c), max(room - len(p), room // 2))
            keep_p = room - keep_c
            if keep_c < len(c):
                cut.add("completion")
                c, c_labels = c[:keep_c], c_labels[:keep_c]
            if keep_p < len(p):
                cut.add("prompt")
                p = p[len(p) - keep_p:]
        p_labels = list(p) if opts.get("train_on_input", False) else [IGNORE] * len(p)
        tokens = head + p + c
        labels = [IGNORE] * len(head) + p_labels + c_labels
        labels[0] = IGNORE
        units.append(Unit(len(units), tuple(tokens), tuple(labels), frozenset(cut), (prompt, completion)))
    return Source(name, "instruct", opts.get("weight", 1), units, rows=len(units), skipped=skipped)


def _documents(path: str) -> list[str]:
    p = Path(path)
    files = sorted(f for f in p.rglob("*") if f.suffix in (".txt", ".md")) if p.is_dir() else [p]
    return [f.read_text(encoding="utf-8-sig").replace("\r\n", "\n") for f in files]


def _text(ids: list[int]) -> str:
    """What a held-out text record holds of these ids: their text, special tokens (the document's EOS) left out."""
    return meta_tokenizer().decode([i for i in ids if i < min(meta_tokenizer().special_tokens.values())])


def text_source(name: str, opts: dict, max_seq_len: int) -> Source:
    """The windows of a text source (a .txt file or a folder of them)."""
    stride, width = opts.get("stride", 0), max_seq_len - 1
    bos, eos = special("<|begin_of_text|>"), special("<|end_of_text|>")
    units, docs, empty, doc_tokens = [], 0, 0, 0
    for text in _documents(opts["path"]):
        if not text.strip():
            empty += 1
            continue
        docs += 1
        ids = encode(text) + [eos]
        doc_tokens += len(ids)
        trained_here = [0] * len(ids)
        begin = 0
        while True:
            window = ids[begin:begin + width]
            context = 0 if begin == 0 else min(stride, len(window))
            labels = [IGNORE] + [IGNORE] * context + window[context:]
            for k in range(context, len(window)):
                trained_here[begin + k] += 1
            key = (_text(window[:context]), _text(window[context:]))
            units.append(Unit(len(units), tuple([bos] + window), tuple(labels), key=key))
            if begin + width >= len(ids):
                break
            begin += width - stride
        assert trained_here == [1] * len(ids), "the oracle's own windows must train each token once"
    return Source(name, "text", opts.get("weight", 1), units, rows=docs, empty_documents=empty, doc_tokens=doc_tokens)


SHAREGPT = {"human": "user", "gpt": "assistant", "system": "system", "tool": "tool"}


def _turns(row: dict, opts: dict) -> list[dict]:
    """A row's turns as {role, content, calls, train}, read the plain way (OpenAI role/content or ShareGPT from/value)."""
    column = opts.get("column") or ("messages" if "messages" in row else "conversations")
    out = []
    for t in row[column]:
        if "from" in t:
            role, content, calls = SHAREGPT[t["from"]], t["value"], []
        else:
            role, content = t["role"], t.get("content") or ""
            calls = []
            for c in t.get("tool_calls", []):  # OpenAI's {function: {name, arguments: JSON text}}, or {name, arguments}
                fn = c.get("function", c)
                calls.append((fn["name"], json.loads(fn["arguments"]) if isinstance(fn["arguments"], str) else fn["arguments"]))
        out.append({"role": role, "content": content, "calls": calls, "train": t.get("train")})
    return out


def chat_source(name: str, opts: dict, max_seq_len: int) -> Source:
    """The units of a chat source (JSONL): one per conversation that fits in max_seq_len (the oracle does not split)."""
    meta_tokenizer()
    chat = _META["chat"]
    units = []
    for _, row in _jsonl(opts["path"]):
        turns = _turns(row, opts)
        key = tuple((t["role"], t["content"]) for t in turns[: max(i for i, t in enumerate(turns) if t["role"] == "assistant") + 1])
        if opts.get("system_prompt") is not None:
            turns = [{"role": "system", "content": opts["system_prompt"], "calls": [], "train": None}] + \
                    [t for k, t in enumerate(turns) if not (k == 0 and t["role"] == "system")]
        assistants = [i for i, t in enumerate(turns) if t["role"] == "assistant"]
        train_on = opts.get("train_on", "all_assistant")
        tokens, labels, trained_turns = [special("<|begin_of_text|>")], [IGNORE], 0
        for i, t in enumerate(turns):
            message = RawMessage(role=t["role"], content=t["content"].strip(),
                                 tool_calls=[ToolCall(call_id=str(k), tool_name=n, arguments=a) for k, (n, a) in enumerate(t["calls"])])
            ids, _ = chat.encode_message(message, ToolPromptFormat.json)
            header = len(chat._encode_header(t["role"]))
            trained = train_on == "all" or (t["role"] == "assistant" and (train_on == "all_assistant" or i == assistants[-1]))
            trained = trained if t["train"] is None else t["train"]
            trained_turns += trained
            tokens += ids
            labels += (ids[:header] if train_on == "all" and trained else [IGNORE] * header) + \
                (ids[header:] if trained else [IGNORE] * (len(ids) - header))
        assert len(tokens) <= max_seq_len, "the oracle does not split conversations"
        units.append(Unit(len(units), tuple(tokens), tuple(labels), key=key, turns=trained_turns))
    return Source(name, "chat", opts.get("weight", 1), units, rows=len(units))


def expected(sources: dict, max_seq_len: int) -> list[Source]:
    """The oracle's view of a `dataset.sources` mapping (plain dicts), in config order."""
    kinds = {"instruct": pair_source, "text": text_source, "chat": chat_source}
    return [kinds[o["type"]](name, o, max_seq_len) for name, o in sources.items()]


def stream(ds) -> Counter:
    """Every sample the dataset serves, as (tokens, labels) -> how many times, padding left out. For packs, also
    checks what makes a pack a pack: max_seq_len long, samples by seq_lens, positions restarting per sample, and
    padding (the last sequence, all pad and -100) carrying no loss."""
    out = Counter()
    for item in ds:
        tokens, labels = list(item["tokens"]), list(item["labels"])
        tokens, labels = [int(t) for t in tokens], [int(x) for x in labels]
        if not ds.packed:
            out[(tuple(tokens), tuple(labels))] += 1
            continue
        lens = [int(n) for n in item["seq_lens"]]
        positions = [int(p) for p in item["input_pos"]]
        assert len(tokens) == len(labels) == len(positions) == sum(lens) == ds.max_seq_len
        assert all(n > 0 for n in lens), f"empty sequence in a pack: {lens}"
        start = 0
        for k, n in enumerate(lens):
            seg = slice(start, start + n)
            is_pad = k == len(lens) - 1 and set(tokens[seg]) == {ds.pad_id} and set(labels[seg]) == {IGNORE}
            if not is_pad:
                assert positions[seg] == list(range(n)), "positions restart at 0 in every sample"
                out[(tuple(tokens[seg]), tuple(labels[seg]))] += 1
            start += n
    return out


def check(ds, sources: dict, max_seq_len: int, held_out_dir: str | None = None) -> dict:
    """Asserts that the dataset serves exactly what the oracle expects and that its data table says so.

    Per source: the held-out units are those named in `<held_out_dir>/<source>.jsonl`, as many as the options ask
    (never all); every other unit is served floor(weight) times, and round(frac(weight) * units) of them once more;
    dropped pairs and held-out units never; nothing else is served. Returns {source: {unit index: times served}}."""
    served = stream(ds)
    seen = Counter()
    result = {}
    by_name = {s.name: s for s in ds.stats.sources}
    for src in expected(sources, max_seq_len):
        opts, st = sources[src.name], by_name[src.name]
        weight = opts.get("weight", 1)
        held = _held_out(src, opts, held_out_dir)
        assert len(held) == _held_out_count(len(src.units), opts), (src.name, len(held))
        train = [u for u in src.units if u.index not in held]
        usable = [u for u in train if "dropped" not in u.cut]
        whole, extra = math.floor(weight), round((weight - math.floor(weight)) * len(usable))
        groups = {}
        for u in usable:  # identical samples (repeated rows) share what the stream serves of them, evenly
            groups.setdefault((u.tokens, u.labels), []).append(u.index)
        counts = dict.fromkeys((u.index for u in src.units), 0)
        for sample, members in groups.items():
            total = served[sample] - seen[sample]
            for k, index in enumerate(members):
                counts[index] = total // len(members) + (k < total % len(members))
            seen[sample] += total
        assert all(counts[u.index] in (whole, whole + 1) for u in usable), (src.name, Counter(counts.values()))
        assert sum(counts[u.index] == whole + 1 for u in usable) == extra, src.name
        never = sum(u.supervised for u in usable if counts[u.index] == 0)
        want = {
            "rows": src.rows, "held_out": len(held), "skipped": sum(src.skipped.values()),
            "dropped": sum("dropped" in u.cut for u in train),
            "prompt_cut": sum("prompt" in u.cut for u in train),
            "completion_cut": sum("completion" in u.cut for u in train),
            "truncated": sum(bool(u.cut - {"dropped"}) for u in train),
            "samples": sum(counts.values()),
            "tokens": sum(len(u.tokens) * counts[u.index] for u in usable),
            "supervised": sum(u.supervised * counts[u.index] for u in usable),
            "trainable": sum(u.supervised for u in usable),
            "never_trained": never,
        }
        if src.type == "chat":
            want |= {"turns": sum(u.turns for u in train), "turns_trained": sum(u.turns * counts[u.index] for u in usable)}
        if src.type == "text":
            want |= {"doc_tokens": src.doc_tokens, "kept_tokens": src.doc_tokens, "windows": len(src.units),
                     "empty_documents": src.empty_documents}
        got = {k: (sum(st.skipped.values()) if k == "skipped" else getattr(st, k)) for k in want}
        assert got == want, f"{src.name}: data table {got} != oracle {want}"
        result[src.name] = counts
    leftover = served - seen
    assert not leftover, f"the stream serves {sum(leftover.values())} sample(s) the oracle does not expect"
    return result


def _held_out_count(n: int, opts: dict) -> int:
    want = opts["val_size"] if opts.get("val_size") is not None else math.ceil(n * opts.get("val_fraction", 0))
    return max(0, min(want, n - 1))


def _held_out(src: Source, opts: dict, held_out_dir: str | None) -> set[int]:
    """The unit indices the held-out file names (each record must be one unit, each unit named at most once)."""
    if not held_out_dir or not (Path(held_out_dir) / f"{src.name}.jsonl").is_file():
        return set()
    by_key = {}
    for u in src.units:
        by_key.setdefault(u.key, []).append(u.index)
    held = set()
    for _, r in _jsonl(str(Path(held_out_dir) / f"{src.name}.jsonl")):
        key = {"instruct": lambda: (r["prompt"], r["completion"]), "text": lambda: (r["context"], r["text"]),
               "chat": lambda: tuple((m["role"], m["content"]) for m in r["messages"])}[src.type]()
        free = [i for i in by_key.get(key, []) if i not in held]
        assert free, f"{src.name}: held-out record {key!r:.200} is no unit of the source (or named twice)"
        held.add(free[0])
    return held
