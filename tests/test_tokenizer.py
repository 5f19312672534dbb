import json

import pytest

from pytransformer.text.tokenizer import (
    BOS_ID,
    EOS_ID,
    PAD_ID,
    UNK_ID,
    CharTokenizer,
    SentencePieceTokenizer,
    load_tokenizer,
)

TEXTS = ["three hundred and seventy-one", "dreihunderteinundsiebzig", "zwölf"] * 40


def test_char_roundtrip_and_specials():
    tok = CharTokenizer.train(TEXTS)
    ids = tok.encode("zwölf")
    assert min(ids) > UNK_ID
    assert tok.decode(ids) == "zwölf"
    assert tok.decode([BOS_ID, *ids, EOS_ID, PAD_ID]) == "zwölf"
    assert tok.encode("Q") == [UNK_ID]
    assert tok.vocab_size == 4 + len(set("".join(TEXTS)))


def test_char_save_load(tmp_path):
    tok = CharTokenizer.train(TEXTS)
    tok.save(tmp_path / "t.json")
    again = load_tokenizer(tmp_path / "t.json")
    assert again.itos == tok.itos
    assert again.encode("drei") == tok.encode("drei")


def test_char_rejects_empty_and_duplicates():
    with pytest.raises(ValueError, match="texts"):
        CharTokenizer.train(["", ""])
    with pytest.raises(ValueError, match="chars"):
        CharTokenizer(["a", "a"])


def test_load_rejects_foreign_file(tmp_path):
    (tmp_path / "x.json").write_text(json.dumps({"type": "bpe"}))
    with pytest.raises(ValueError, match="unknown tokenizer"):
        load_tokenizer(tmp_path / "x.json")
    (tmp_path / "y.json").write_text("not json")
    with pytest.raises(ValueError, match="not a pytransformer tokenizer"):
        load_tokenizer(tmp_path / "y.json")


def test_sentencepiece_roundtrip(tmp_path):
    pytest.importorskip("sentencepiece")
    # More pieces than the text supports: training shrinks the vocabulary to what fits.
    tok = SentencePieceTokenizer.train(TEXTS, vocab_size=500)
    assert 4 < tok.vocab_size < 500
    for text in ("three hundred and seventy-one", "dreihunderteinundsiebzig"):
        ids = tok.encode(text)
        assert min(ids) > UNK_ID
        assert tok.decode(ids) == text
        assert len(tok.tokens(text)) == len(ids)
    tok.save(tmp_path / "sp.json")
    assert load_tokenizer(tmp_path / "sp.json").encode("zwölf") == tok.encode("zwölf")
