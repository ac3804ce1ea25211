"""The U+2581 escape that makes sentencepiece decoding lossless (see deepseek_moe/data/tokenizer.py)."""

from __future__ import annotations

import io
import itertools

import sentencepiece as spm

from deepseek_moe.data.tokenizer import ESCAPE, Tokenizer, escape_text, unescape_text

SPM_SPACE = "\u2581"


def test_escape_is_a_bijection_on_every_short_string():
    # Every string up to length 5 over the characters that interact with the escape.
    alphabet = ["a", " ", "0", "1", ESCAPE, SPM_SPACE]
    for n in range(6):
        for chars in itertools.product(alphabet, repeat=n):
            s = "".join(chars)
            e = escape_text(s)
            assert SPM_SPACE not in e
            assert unescape_text(e) == s, repr(s)


def test_plain_text_is_untouched():
    text = "def f(x):\n\treturn x  # é\n"
    assert escape_text(text) is text and unescape_text(text) is text


def test_tokenizer_round_trips_what_raw_sentencepiece_loses():
    lines = ["def f(x):", "    return x + 1", "class A:", "    pass"] * 50
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=model,
        model_type="bpe",
        vocab_size=300,
        byte_fallback=True,
        normalization_rule_name="identity",
        add_dummy_prefix=False,
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        minloglevel=2,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=3,
    )
    tok = Tokenizer(model.getvalue())
    text = f"a{SPM_SPACE}b {ESCAPE}1\r\n\tz\x00"
    assert tok.sp.decode(tok.sp.encode(text)) != text  # the reason the escape exists
    assert tok.decode(tok.encode(text)) == text
    assert tok.decode(tok.encode(text) + [tok.eos_id]) == text  # EOS decodes to nothing
    import pickle

    assert pickle.loads(pickle.dumps(tok)).encode(text) == tok.encode(text)
