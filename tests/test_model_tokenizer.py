"""Text tokenizers: byte-level round trip, a local tokenizer.json through the hf plug-in."""

from __future__ import annotations

import importlib.util

import pytest

from unimoe.model.text_tokenizer import ByteTokenizer, HFTokenizer, build_text_tokenizer
from unimoe.registry import TEXT_TOKENIZERS


def test_byte_tokenizer_round_trip_and_ids():
    tok = build_text_tokenizer("bytes")
    assert isinstance(tok, ByteTokenizer)
    text = "Hello, wörld! 你好"
    ids = tok.encode(text)
    assert ids == list(text.encode("utf-8"))
    assert tok.decode(ids + [tok.eos_id, tok.pad_id]) == text
    assert max(ids) < 256 and {tok.pad_id, tok.bos_id, tok.eos_id} == {256, 257, 258}
    assert tok.vocab_size == 259
    with pytest.raises(TypeError, match="str"):
        tok.encode([1, 2])


@pytest.mark.skipif(importlib.util.find_spec("tokenizers") is None, reason="tokenizers not installed")
def test_hf_tokenizer_from_local_json(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[UNK]": 0, "<eos>": 1, "hello": 2, "world": 3}
    t = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    t.add_special_tokens(["<eos>"])
    t.save(str(tmp_path / "tokenizer.json"))

    tok = TEXT_TOKENIZERS.build({"name": "hf", "path": str(tmp_path), "eos_token": "<eos>"})
    assert isinstance(tok, HFTokenizer)
    assert tok.encode("hello world hello") == [2, 3, 2]
    assert tok.eos_id == 1 and tok.pad_id == 1 and tok.bos_id is None
    assert tok.vocab_size == 4
    assert tok.decode([2, 3]) == "hello world"
    with pytest.raises(ValueError, match="bos_token='<s>'"):
        HFTokenizer(str(tmp_path / "tokenizer.json"), bos_token="<s>")


def test_hf_tokenizer_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        HFTokenizer(str(tmp_path / "nope"))
    if importlib.util.find_spec("transformers") is None:
        with pytest.raises(ImportError, match="transformers"):
            HFTokenizer(str(tmp_path))  # a folder without tokenizer.json
