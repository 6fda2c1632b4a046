"""Templates, loss masks, truncation and text windows, checked token by token with the real tokenizer."""

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from torchtune.data import Message

from custom_datasets._format import format_pair, window_document
from custom_datasets._read import Document, Pair
from custom_datasets._spec import InstructSpec, TextSpec

IGNORE = -100


def enc(tokenizer, text):
    return tokenizer.encode(text, add_bos=False, add_eos=False)


def test_completion_template_is_bos_prompt_completion_eos_with_loss_on_completion_only(tokenizer):
    sample, truncated = format_pair(tokenizer, InstructSpec("p", "x"), Pair("Name a colour.", "Red", "f:1"), 256)
    prompt, completion = enc(tokenizer, "Name a colour.\n"), enc(tokenizer, "Red")
    assert not truncated
    assert sample.tokens == [tokenizer.bos_id] + prompt + completion + [tokenizer.eos_id]
    assert sample.labels == [IGNORE] * (1 + len(prompt)) + completion + [tokenizer.eos_id]


def test_train_on_input_puts_loss_on_the_prompt_too(tokenizer):
    spec = InstructSpec("p", "x", train_on_input=True, separator="")
    sample, _ = format_pair(tokenizer, spec, Pair("Name a colour.", "Red", "f:1"), 256)
    assert sample.labels[0] == IGNORE and sample.labels[1:] == sample.tokens[1:]


def test_llama3_chat_uses_the_tokenizers_message_api_and_masks_through_the_assistant_header(tokenizer):
    spec = InstructSpec("p", "x", template="llama3_chat", system_prompt="Be brief.")
    sample, _ = format_pair(tokenizer, spec, Pair("Name a colour.", "Red", "f:1"), 256)
    stock, _ = tokenizer.tokenize_messages([
        Message("system", "Be brief.", masked=True), Message("user", "Name a colour.", masked=True),
        Message("assistant", "Red", masked=False)])
    assert sample.tokens == stock
    trained = [t for t, label in zip(sample.tokens, sample.labels) if label != IGNORE]
    assert tokenizer.decode(trained, skip_special_tokens=False) == "Red<|eot_id|>"
    first = sample.labels.index(trained[0])
    prompt_text = tokenizer.decode(sample.tokens[:first], skip_special_tokens=False)
    assert prompt_text.startswith("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>")
    assert prompt_text.endswith("Name a colour.<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")


def test_truncate_keeps_the_prompts_end_and_as_much_completion_as_fits(tokenizer):
    prompt = " ".join(f"w{i}" for i in range(100))
    sample, truncated = format_pair(tokenizer, InstructSpec("p", "x"), Pair(prompt, "short answer", "f:1"), 64)
    completion = enc(tokenizer, "short answer") + [tokenizer.eos_id]
    assert truncated and len(sample.tokens) == 64
    assert sample.tokens[0] == tokenizer.bos_id and sample.tokens[-len(completion):] == completion
    assert tokenizer.decode(sample.tokens[1:-len(completion)]).endswith("w98 w99\n")

    long_completion = " ".join(f"c{i}" for i in range(100))
    sample, _ = format_pair(tokenizer, InstructSpec("p", "x"), Pair(prompt, long_completion, "f:1"), 64)
    kept = [t for t, label in zip(sample.tokens, sample.labels) if label != IGNORE]
    assert len(sample.tokens) == 64 and len(kept) == (64 - 1) // 2  # the prompt keeps the other half
    assert tokenizer.decode(kept).startswith("c0 c1") and tokenizer.eos_id not in kept


def test_drop_leaves_the_pair_out(tokenizer):
    sample, truncated = format_pair(tokenizer, InstructSpec("p", "x", too_long="drop"), Pair("a " * 100, "b", "f:1"), 64)
    assert sample is None and truncated


@settings(max_examples=40, deadline=None)
@given(words=st.integers(1, 400), max_seq_len=st.integers(16, 96), stride_share=st.floats(0, 0.9))
def test_text_windows_train_every_token_exactly_once(tokenizer, words, max_seq_len, stride_share):
    stride = int(stride_share * (max_seq_len - 2))
    doc = Document(" ".join(f"t{i}" for i in range(words)), "d.txt")
    out = window_document(tokenizer, TextSpec("t", "d.txt", stride=stride), doc, max_seq_len)
    ids = enc(tokenizer, doc.text) + [tokenizer.eos_id]
    assert len(out.tokens) == len(out.labels) == sum(out.lengths)
    cut = np.cumsum(out.lengths)[:-1]
    windows = [(t.tolist(), lab.tolist()) for t, lab in zip(np.split(out.tokens, cut), np.split(out.labels, cut))]
    trained = [t for tokens, labels in windows for t, lab in zip(tokens, labels) if lab != IGNORE]
    assert trained == ids  # in order, none lost, none twice
    assert out.doc_tokens == out.trained_tokens == len(ids)
    for i, (tokens, labels) in enumerate(windows):
        assert len(tokens) <= max_seq_len and tokens[0] == tokenizer.bos_id and labels[0] == IGNORE
        context = stride if i else 0
        assert labels[1:1 + context] == [IGNORE] * context  # the overlap is context only
        if i:  # the overlap repeats the end of the previous window
            assert tokens[1:1 + stride] == windows[i - 1][0][len(windows[i - 1][0]) - stride:]


def test_generation_prompt_is_the_training_sample_up_to_the_completion(tokenizer):
    from custom_datasets import format_prompt

    for spec in (InstructSpec("p", "x"), InstructSpec("p", "x", template="llama3_chat", system_prompt="Hi.")):
        sample, _ = format_pair(tokenizer, spec, Pair("Name a colour.", "Red", "f:1"), 256)
        prompt = format_prompt(tokenizer, spec, "Name a colour.")
        assert sample.tokens[:len(prompt)] == prompt
        assert all(label == IGNORE for label in sample.labels[:len(prompt)]) and sample.labels[len(prompt)] != IGNORE


def test_truncate_shortens_the_context_never_the_instruction(tokenizer):
    """prompt: [instruction, context] with a context too long: the instruction stays whole, the context keeps
    its beginning and is marked where it was cut, and the short answer is kept whole."""
    from custom_datasets._format import CUT_MARK, Cut

    spec = InstructSpec("p", "x", prompt=("instruction", "context"))
    instruction = "Summarise the notes below in one line."
    context = " ".join(f"note{i}" for i in range(200))
    pair = Pair(instruction + spec.prompt_joiner + context, "A short summary.", "f:1", (instruction, context))
    sample, cut = format_pair(tokenizer, spec, pair, 96)
    assert cut == Cut.PROMPT and len(sample.tokens) <= 96
    text = tokenizer.decode(sample.tokens[1:])
    assert text.startswith(instruction + spec.prompt_joiner + "note0 note1 note2")
    assert CUT_MARK + spec.separator + "A short summary." in text
    assert tokenizer.decode([t for t, label in zip(sample.tokens, sample.labels) if label != IGNORE],
                            truncate_at_eos=False, skip_special_tokens=False) == "A short summary.<|end_of_text|>"


def test_prompt_and_completion_cuts_are_told_apart(tokenizer):
    from custom_datasets._format import Cut

    spec = InstructSpec("p", "x", prompt=("instruction", "context"))
    long = " ".join(f"w{i}" for i in range(200))
    cases = {("Q?", long, "short"): Cut.PROMPT, ("Q?", "ctx", long): Cut.COMPLETION,
             ("Q?", long, long): Cut.PROMPT | Cut.COMPLETION, ("Q?", "ctx", "short"): Cut.NONE}
    for (q, ctx, answer), expected in cases.items():
        _, cut = format_pair(tokenizer, spec, Pair(q + spec.prompt_joiner + ctx, answer, "f:1", (q, ctx)), 96)
        assert cut == expected, (q, ctx[:10], answer[:10])


def test_an_instruction_longer_than_the_room_falls_back_to_the_prompts_end(tokenizer):
    spec = InstructSpec("p", "x", prompt=("instruction", "context"))
    instruction = " ".join(f"i{i}" for i in range(200))
    sample, cut = format_pair(tokenizer, spec, Pair(instruction + "\n\nctx", "ok", "f:1", (instruction, "ctx")), 64)
    assert cut and len(sample.tokens) == 64 and tokenizer.decode(sample.tokens[-4:]).endswith("ok")
