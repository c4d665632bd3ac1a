"""Streaming detokenisation (IncrementalDetokenizer over tokenizers' DecodeStream): the deltas of any token stream
add up to the whole decode, multi-byte characters are never split, and word-level decoders keep their spaces."""
from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from decoder_service.tokenizer import TextTokenizer, build_byte_level_tokenizer

TEXT = "Grüße, 世界! naïve café: 3 € → ok 🚀 done"


def deltas(tokenizer: TextTokenizer, ids: list[int], context: list[int] = ()) -> list[str]:
    detok = tokenizer.detokenizer(list(context))
    out = [detok.push(t) for t in ids]
    assert "".join(out) == detok.text
    return out


def test_byte_level_deltas_add_up_and_never_split_a_character():
    tokenizer = TextTokenizer(build_byte_level_tokenizer())
    ids = tokenizer.encode(TEXT)
    assert len(ids) > len(TEXT.encode()) // 4  # many characters span several byte tokens
    pieces = deltas(tokenizer, ids)
    assert "".join(pieces) == TEXT == tokenizer.decode(ids)
    assert all("\ufffd" not in p for p in pieces)  # a partial UTF-8 sequence is held back, not emitted
    assert "" in pieces  # ... which happened: some tokens completed no character


def test_generated_text_after_a_context_is_the_decode_of_the_whole_minus_the_context():
    tokenizer = TextTokenizer(build_byte_level_tokenizer())
    context, generated = tokenizer.encode("prompt: 世"), tokenizer.encode("界 and more")
    whole = tokenizer.decode(context + generated)
    assert "".join(deltas(tokenizer, generated, context)) == whole[len(tokenizer.decode(context)):]


def test_word_level_decoders_keep_the_spaces_between_tokens():
    vocab = {w: i for i, w in enumerate(["[UNK]", "the", "cache", "stays", "bounded", "."])}
    inner = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    inner.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    inner.decoder = decoders.WordPiece()  # joins words with spaces, as BERT-style decoders do
    tokenizer = TextTokenizer(inner)
    ids = tokenizer.encode("the cache stays bounded")
    assert "".join(deltas(tokenizer, ids[2:], ids[:2])) == " stays bounded"
