"""What the stages counted, gathered in one object: the log table and reports all read it."""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field

from custom_datasets._tables import text_table


@dataclass
class SourceStats:
    name: str
    type: str
    weight: float
    rows: int = 0  # usable pairs, or documents
    skipped: Counter = field(default_factory=Counter)  # bad rows skipped, by reason (bad_rows: skip)
    empty_documents: int = 0
    held_out: int = 0  # pairs (instruct) or windows (text)
    truncated: int = 0  # too-long pairs cut to max_seq_len (too_long: truncate): prompt, completion or both
    prompt_cut: int = 0  # of those, pairs whose prompt was shortened (several columns: the longest after the first)
    completion_cut: int = 0  # of those, pairs whose completion was cut
    dropped: int = 0  # too-long pairs left out (too_long: drop)
    windows: int = 0  # text: windows the documents were cut into (one per sample before weighting)
    doc_tokens: int = 0  # text: tokens in the documents, EOS included
    kept_tokens: int = 0  # text: document tokens trained or held out in some window
    samples: int = 0  # training samples after weighting
    tokens: int = 0  # training tokens after weighting
    supervised: int = 0  # of those, tokens that carry a label (per epoch; a sample seen twice counts twice)
    never_trained: int = 0  # supervised tokens of training samples the weight leaves out of every epoch
    trainable: int = 0  # supervised tokens of all training samples, each once (weight 1 trains exactly these)
    length_hist: list = field(default_factory=list)  # training samples per length bin (before weighting)
    turns: int = 0  # chat: turns to train in the training conversations (train_on and the turns' own flags)
    turns_placed: int = 0  # chat: of those, turns in some sample (all of them, unless conversations were dropped)
    turns_trained: int = 0  # chat: trained turns in one epoch of samples (a sample seen twice counts twice)
    split: int = 0  # chat: conversations split into several samples at turn boundaries
    exact_duplicates: int = 0  # training rows (text: windows) that copy an earlier one, after normalising
    near_duplicates: int = 0  # training rows whose MinHash Jaccard estimate with an earlier one is >= the threshold
    duplicates_across: int = 0  # of those, copies of another source's row
    deduplicated: int = 0  # of those, removed from training (dataset.dedup)
    prompt_repeats: int = 0  # pairs: training rows whose prompt alone (normalised) repeats an earlier row's
    held_out_seen: int = 0  # held-out rows (windows) with an exact or near copy among the training rows


@dataclass
class DataStats:
    max_seq_len: int
    packed: bool
    sources: list[SourceStats]
    packs: int = 0
    pad_tokens: int = 0
    hist_edges: list = field(default_factory=list)  # bin edges of every source's length_hist
    cache: str = ""  # "built", "loaded" or "off", and where
    ranks: int = 1  # processes training (torchrun's world size) when the dataset was made
    batch_size: int = 1  # the recipe's, per rank
    accumulation: int = 1  # the recipe's gradient_accumulation_steps
    step_packs: int = 1  # ranks x batch_size x accumulation: packs per optimizer step
    split_packs: int = 0  # packs split in two at a sample boundary so that step_packs divides their number
    dedup: str = "off"  # dataset.dedup: off | exact | near
    held_out_dedup: bool = False  # dataset.held_out_dedup: seen held-out rows are not evaluated
    unaligned: int = 0  # packs the count still lacks (every pack holds one sample): the sampler repeats or drops some

    @classmethod
    def from_dict(cls, d: dict) -> "DataStats":
        keep = {k: v for k, v in d.items() if k in cls.__dataclass_fields__ and k != "sources"}
        sources = [SourceStats(**{**s, "skipped": Counter(s["skipped"])}) for s in d["sources"]]
        return cls(sources=sources, **keep)

    @property
    def tokens(self) -> int:
        return sum(s.tokens for s in self.sources)

    @property
    def supervised(self) -> int:
        return sum(s.supervised for s in self.sources)

    @property
    def fill(self) -> float:
        """Non-pad tokens / slots, over all packs."""
        return self.tokens / (self.packs * self.max_seq_len) if self.packed and self.packs else 1.0

    def as_dict(self) -> dict:
        # asdict() would rebuild each Counter from (key, value) tuples, counting the tuples.
        sources = [{**asdict(s), "skipped": dict(s.skipped)} for s in self.sources]
        out = {**asdict(self), "sources": sources}
        out.update(tokens=self.tokens, supervised=self.supervised, fill=self.fill)
        return out

    COLUMNS = ["source", "type", "weight", "rows", "held out", "skipped", "prompt cut", "answer cut", "dropped",
               "exact dup", "near dup", "seen", "samples", "tokens", "supervised", "never trained", "text kept"]

    def rows(self) -> list[list[str]]:
        """One row per source, in COLUMNS order (the console table and report.md)."""
        rows = []
        for s in self.sources:
            skipped = sum(s.skipped.values())
            # text kept: document tokens trained in the run or held out (a weight under 1 leaves some out)
            kept = f"{100 * (s.kept_tokens - s.never_trained) / s.doc_tokens:.1f}%" if s.doc_tokens else "-"
            never = f"{s.never_trained:,} ({100 * s.never_trained / s.trainable:.0f}%)" if s.trainable else "0"
            rows.append([s.name, s.type, f"{s.weight:g}", f"{s.rows:,}", f"{s.held_out:,}", f"{skipped:,}",
                         f"{s.prompt_cut:,}", f"{s.completion_cut:,}", f"{s.dropped:,}", f"{s.exact_duplicates:,}",
                         f"{s.near_duplicates:,}", f"{s.held_out_seen:,}", f"{s.samples:,}", f"{s.tokens:,}",
                         f"{s.supervised:,}", never, kept])
        return rows

    def notes(self) -> list[str]:
        """What the table's counts mean for each source: skipped rows, cuts, drops, windows."""
        notes = []
        for s in self.sources:
            for reason, n in sorted(s.skipped.items()):
                notes.append(f"{s.name}: skipped {n:,} bad row(s): {reason}")
            if s.truncated:
                notes.append(f"{s.name}: cut {s.truncated:,} pair(s) longer than max_seq_len={self.max_seq_len} "
                             f"(prompt shortened in {s.prompt_cut:,}, answer cut in {s.completion_cut:,}; a prompt of "
                             "several columns loses the end of its longest column after the first, marked [\u2026], "
                             "never the instruction)")
            if s.dropped:
                notes.append(f"{s.name}: dropped {s.dropped:,} pair(s) longer than max_seq_len={self.max_seq_len}")
            if s.empty_documents:
                notes.append(f"{s.name}: {s.empty_documents:,} empty document(s) had no text")
            if s.windows and s.type == "text":
                notes.append(f"{s.name}: {s.doc_tokens:,} document tokens cut into {s.windows:,} windows")
            if s.type == "chat":
                lost = s.turns - s.turns_placed
                notes.append(f"{s.name}: {s.rows:,} conversations, {s.turns:,} turns to train in the training ones; "
                             f"{s.turns_placed:,} placed in {s.windows:,} samples, each in exactly one"
                             f"{f', {lost:,} in dropped conversations' if lost else ''}; {s.split:,} conversation(s) "
                             f"split at turn boundaries; {s.turns_trained:,} turns trained per epoch")
            copies = s.exact_duplicates + s.near_duplicates
            if copies or s.prompt_repeats:
                unit = "window(s)" if s.type == "text" else "row(s)"
                what = (f"{s.deduplicated:,} removed (dedup: {self.dedup})" if s.deduplicated else
                        f"kept (dedup: {self.dedup}; exact or near removes them)")
                across = f", {s.duplicates_across:,} of another source's" if s.duplicates_across else ""
                prompts = f"; {s.prompt_repeats:,} prompt(s) repeat an earlier row's prompt" if s.prompt_repeats else ""
                notes.append(f"{s.name}: {s.exact_duplicates:,} exact and {s.near_duplicates:,} near copies of earlier "
                             f"training {unit}{across}: {what}{prompts}")
            if s.held_out_seen:
                fate = ("not evaluated (held_out_dedup: true; in held_out/<source>.seen.jsonl)" if self.held_out_dedup else
                        "evaluated: make eval's held-out loss flatters the model; set dataset.held_out_dedup: true")
                notes.append(f"{s.name}: {s.held_out_seen:,} held-out {'window(s)' if s.type == 'text' else 'row(s)'} "
                             f"have a copy in training: {fate}")
            if s.never_trained:
                notes.append(f"{s.name}: weight {s.weight:g} trains the same {100 * (1 - s.never_trained / s.trainable):.0f}% "
                             f"of its supervised tokens every epoch (the subset is fixed by dataset.seed); "
                             f"{s.never_trained:,} ({100 * s.never_trained / s.trainable:.0f}%) are never trained in this run")
        return notes

    def alignment_note(self) -> str:
        """What the split packs (or the ones that could not be split) mean for an epoch."""
        what = "packs" if self.packed else "samples"
        count = self.packs if self.packed else sum(s.samples for s in self.sources)
        step = (f"{self.ranks} rank(s) x batch_size {self.batch_size} x gradient_accumulation_steps "
                f"{self.accumulation} = {self.step_packs}")
        if not self.unaligned:
            return (f"split {self.split_packs:,} pack(s) in two at a sample boundary, so that the {count:,} packs are a "
                    f"multiple of {step}: every pack is trained once an epoch")
        return (f"{count:,} {what} are not a multiple of {step}, and no pack holds two samples to split: each epoch the "
                f"stock sampler repeats or leaves out up to {self.step_packs - 1:,} of them. Lower batch_size or "
                "gradient_accumulation_steps, or add data")

    def table(self) -> str:
        """The build-time data table, one row per source and a totals line."""
        lines = text_table([list(self.COLUMNS), *map(list, self.rows())], left=2)
        notes = self.notes()
        if self.split_packs and not self.unaligned:  # (unaligned: mixed_dataset logs the note as a warning)
            notes.append(self.alignment_note())
        if self.cache:
            notes.append(f"cache: {self.cache}")
        share = self.supervised / self.tokens if self.tokens else 0.0
        if self.packed:
            total = (f"{self.packs:,} packs x {self.max_seq_len:,} tokens, fill {100 * self.fill:.2f}% "
                     f"({self.pad_tokens:,} pad), supervised {100 * share:.1f}% of tokens")
        else:
            total = f"{sum(s.samples for s in self.sources):,} unpacked samples, supervised {100 * share:.1f}% of tokens"
        return "\n".join(lines + notes + [total])
