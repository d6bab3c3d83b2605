import base64
import sys

import pytest
import regex
import tiktoken
import tiktoken.load

import corpus
import tokenizer
from tokenizer import SPECIAL_TOKENS, SPLIT_PATTERN, Tokenizer
from tokenizer import train_tokenizer

ODD_STRINGS = [
    "😀👨‍👩‍👧 Ω≈ç√ தமிழ் 𓀀 ｶﾀｶﾅ 　全角",
    "",
    " ",
    "e\u0301 a\u0308 ﾊﾟﾝ ｶﾞｷﾞ",            # combining marks, half-width voiced kana
    "東京都の人口は約1400万人です。",
    "コーヒーとすごーい、々〆〇ヶ",
    "tab\there\r\nwindows\n\n\nthree blank  ",
    "\x00\x01\x7f\u200b\ufeff\U0010ffff",  # controls, zero-width, BOM, last code point
    "1234567890 １２３４５ ①②",
    "Привет, мир! 안녕하세요 مرحبا שלום Ελληνικά",
    "<|plamo:bos|> <|plamo:eos|><|plamo:user|>",
    "I'm can't we'LL they've",
]


@pytest.fixture(scope="module")
def docs():
    c = corpus.generate_corpus(seed=2, target_bytes=150_000)
    return c.train, c.val


@pytest.fixture(scope="module")
def tok(docs):
    return train_tokenizer(docs[0], vocab_size=600)


def test_split_pattern_scripts():
    chunks = regex.findall(SPLIT_PATTERN, "山田太郎は、東京のコーヒー店で2024年に働いた。He's 12345 years")
    assert chunks == ["山田太郎", "は", "、", "東京", "の", "コーヒー", "店", "で", "202", "4", "年", "に", "働", "いた",
                      "。He", "'s", " ", "123", "45", " years"]  # GPT-4's rule: one leading mark joins a word


@pytest.mark.parametrize("s", ODD_STRINGS)
def test_split_pattern_covers_everything(s):
    # a character no branch matches would be silently dropped by tiktoken
    assert "".join(regex.findall(SPLIT_PATTERN, s)) == s


def test_merge():
    assert tokenizer.merge_pair([1, 2, 2, 2, 3], (2, 2), 9) == [1, 9, 2, 3]
    assert tokenizer.merge_pair([2, 2, 2, 2], (2, 2), 9) == [9, 9]


def test_reference_tie_break():
    # every pair occurs equally often: the smallest (left id, right id) must win
    ranks = tokenizer.train_bpe_reference(["ba dc", "ba dc"], 257)
    assert [t for t, r in ranks.items() if r == 256] == [b" d"]  # (32, 100) < (98, 97) < (100, 99)


def test_reference_matches_rustbpe(docs):
    pytest.importorskip("rustbpe")
    texts = docs[0][:60] + ODD_STRINGS + ["ba dc", "ab cd ef gh " * 3, "aaaa bbbb aaaa", "ﾊﾟﾝﾊﾟﾝ"]
    ref = tokenizer.train_bpe_reference(texts, 256 + 250)
    fast = tokenizer.train_bpe(texts, 256 + 250)
    assert len(ref) == 256 + 250
    assert ref == fast


def test_fallback_without_rustbpe(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "rustbpe", None)  # makes `import rustbpe` fail
    texts = ODD_STRINGS + ["ba dc"]
    assert tokenizer.train_bpe(texts, 300) == tokenizer.train_bpe_reference(texts, 300)
    assert "rustbpe is not installed" in capsys.readouterr().out


def test_vocab_layout(tok):
    assert tok.vocab_size == 600 == tok.enc.n_vocab
    n = 600 - len(SPECIAL_TOKENS)
    assert [tok.special[t] for t in SPECIAL_TOKENS] == list(range(n, 600))
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (n, n + 1, n + 2)
    assert tok.decode([tok.special["<|plamo:user|>"]]) == "<|plamo:user|>"


def test_plain_text_never_encodes_to_special_tokens(tok, docs):
    first_special = tok.vocab_size - len(SPECIAL_TOKENS)
    for s in ODD_STRINGS + docs[1][:50]:
        assert all(i < first_special for i in tok.encode(s))
    ids = tok.encode("<|plamo:bos|>hello", bos=True)
    assert ids[0] == tok.bos_id and tok.bos_id not in ids[1:]
    assert tok.decode(ids[1:]) == "<|plamo:bos|>hello"
    assert tok.encode_batch(["a", "b"], bos=True) == [tok.encode("a", bos=True), tok.encode("b", bos=True)]


@pytest.mark.parametrize("s", ODD_STRINGS)
def test_round_trip(tok, s):
    assert tok.decode(tok.encode(s)) == s


def test_round_trip_corpus(tok, docs):
    for d in docs[1]:
        assert tok.decode(tok.encode(d)) == d


def test_save_load(tok, tmp_path, monkeypatch, docs):
    path = str(tmp_path / "tok.tiktoken")
    tok.save(path)
    tok2 = Tokenizer.load(path)
    assert (tok2.vocab_size, tok2.special, tok2.pattern) == (tok.vocab_size, tok.special, tok.pattern)
    for s in ODD_STRINGS + docs[1][:20]:
        assert tok2.encode(s) == tok.encode(s)
    # the file is tiktoken's own format (its loader caches by path; switch that off)
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "")
    assert tiktoken.load.load_tiktoken_bpe(path) == tok.enc._mergeable_ranks


def test_load_errors(tok, tmp_path):
    path = str(tmp_path / "tok.tiktoken")
    with pytest.raises(FileNotFoundError, match="no tokenizer at"):
        Tokenizer.load(path)
    tok.save(path)
    with open(path, "a") as f:
        f.write("this is not base64\n")
    with pytest.raises(ValueError, match=r"not a \.tiktoken file: line 593"):
        Tokenizer.load(path)
    tok.save(path)
    with open(path + ".json", "w") as f:
        f.write("{")
    with pytest.raises(ValueError, match="not a tokenizer sidecar"):
        Tokenizer.load(path)
    tok.save(path)
    with open(path, "a") as f:
        f.write(base64.b64encode(b"extra token").decode() + " 592\n")
    with pytest.raises(ValueError, match="does not match"):
        Tokenizer.load(path)


def test_train_errors():
    with pytest.raises(ValueError, match="at least 264"):
        train_tokenizer(["abc"], vocab_size=100)
    with pytest.raises(ValueError, match="too small for vocab_size 1000"):
        train_tokenizer(["just a few words"], vocab_size=1000)


def test_bytes_per_token(tok, docs):
    bpt = tokenizer.bytes_per_token(tok, docs[1])
    assert 1.5 < bpt < 8.0
    assert tokenizer.bytes_per_token(tok, ["abc"]) == 3 / len(tok.encode("abc"))
