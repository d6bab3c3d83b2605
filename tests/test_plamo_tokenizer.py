import json
import math
import random

import pytest
import torch

from plamo2 import PLaMo2, PLaMo2Config
from tokenizer import PlamoTokenizer, Tokenizer, load_tokenizer

SPECIALS = [["<|plamo:unk|>", 0.0, "UNKNOWN"], ["<|plamo:bos|>", 0.0, "CONTROL"],
            ["<|plamo:eos|>", 0.0, "CONTROL"], ["<|plamo:pad|>", 0.0, "CONTROL"],
            ["<|plamo:op|>", 0.0, "CONTROL"]]
BYTES = [[f"<0x{b:02X}>", 0.0, "BYTE"] for b in range(256)]
# cost = -round(score * 1e4); the comments give the costs in units of 1e4
NORMAL = {
    "東京都": -5.0,     # 5: longest match, but 東|京都 costs 2.5
    "東京": -2.0,       # 2
    "京都": -1.0,       # 1
    "東": -1.5,         # 1.5
    "京": -3.0,
    "都": -2.5,
    "の": -1.0,
    " ": -0.5,          # 0.5
    " the": -2.5,       # 2.5 = " " + th + e: a tie, the longer first piece wins
    "the": -3.0,
    "th": -1.0,         # th|e and t|he both cost 2
    "he": -1.0,
    "t": -1.0,
    "h": -1.0,
    "e": -1.0,
    "o": -1.0,
    "to": -2.00003,     # rounds to cost 2.0000 exactly, a tie with t|o (2) that it wins as longer
    "ñ": -2000.0,       # dearer than spelling ñ as bytes (1000), so it is never used
}
FIRST_NORMAL = len(SPECIALS) + len(BYTES)  # 261
IDS = {p: FIRST_NORMAL + i for i, p in enumerate(NORMAL)}
VOCAB = len(SPECIALS) + len(BYTES) + len(NORMAL)


def write_jsonl(path, rows):
    # the released file has more fields after the type; they must be ignored
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row + [None], ensure_ascii=False) + "\n")


def rows():
    return SPECIALS + BYTES + [[p, s, "NORMAL"] for p, s in NORMAL.items()]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "tokenizer.jsonl"
    write_jsonl(path, rows())
    return PlamoTokenizer.load(str(path))


def pieces(tok, text):
    return [tok.decode([i]) for i in tok.encode(text)]


def byte_ids(s):
    return [len(SPECIALS) + b for b in s.encode("utf-8")]


def test_layout(tok):
    assert tok.vocab_size == VOCAB
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 3)
    assert tok.special == {"<|plamo:unk|>": 0, "<|plamo:bos|>": 1, "<|plamo:eos|>": 2,
                           "<|plamo:pad|>": 3, "<|plamo:op|>": 4}


def test_max_score_beats_greedy_longest_match(tok):
    assert pieces(tok, "東京都") == ["東", "京都"]            # 2.5 < 東京|都 4.5 < 東京都 5
    assert pieces(tok, "東京の都") == ["東京", "の", "都"]
    assert tok.encode("東京都") == [IDS["東"], IDS["京都"]]


def test_ties_go_to_the_longer_first_piece(tok):
    assert pieces(tok, " the") == [" the"]                   # 2.5 == " "|th|e
    # th|e and t|he both cost 2: the reference DP runs right to left and keeps the longer
    # piece at each start, so the FIRST piece is the longer one (a left-to-right DP would
    # pick t|he by preferring the longer last piece)
    assert pieces(tok, "the") == ["th", "e"]
    assert pieces(tok, "the the") == ["th", "e", " the"]


def test_scores_are_rounded_before_comparing(tok):
    # as floats t|o (-2.0) beats to (-2.00003); as integer costs both are 20000, a tie
    assert pieces(tok, "to") == ["to"]


def test_byte_fallback(tok):
    assert tok.encode("😀") == byte_ids("😀") == [5 + 0xF0, 5 + 0x9F, 5 + 0x98, 5 + 0x80]
    assert tok.encode("東😀の") == [IDS["東"]] + byte_ids("😀") + [IDS["の"]]
    assert tok.encode("ñ") == byte_ids("ñ")                  # a piece dearer than its bytes loses
    assert tok.encode("x") == [5 + ord("x")]


@pytest.mark.parametrize("s", ["東京都の京都", " the the to the", "😀👨‍👩‍👧 emoji",
                               "Привет 𓀀 தமிழ்", "", " ", "\x00\n\t", "東京<|plamo:eos|>"])
def test_round_trip(tok, s):
    assert tok.decode(tok.encode(s)) == s


def test_special_tokens_are_pieces_like_any_other(tok):
    # The released tokenizer matches every non-BYTE row, CONTROL and UNKNOWN ones included:
    # plamo-2-translate's prompts write "<|plamo:op|>" in the text and expect id 4.
    assert tok.encode("<|plamo:op|>input lang=English") == [4] + tok.encode("input lang=English")
    assert tok.encode("<|plamo:unk|><|plamo:op|>") == [0, 4]
    assert tok.encode("東京<|plamo:bos|>") == [IDS["東京"], 1]
    assert 1 not in tok.encode("<|plamo:bos") and tok.encode("<|plamo:bo")[:2] == byte_ids("<|")  # no piece
    assert tok.encode("東京", bos=True) == [tok.bos_id, IDS["東京"]]
    assert tok.encode_batch(["the", ""], bos=True) == [[1, IDS["th"], IDS["e"]], [1]]
    assert tok.decode([1, IDS["東京"], 2]) == "<|plamo:bos|>東京<|plamo:eos|>"


def test_decode_bytes(tok):
    assert tok.decode(byte_ids("東") + [IDS["の"]] + byte_ids("😀")) == "東の😀"
    assert tok.decode(byte_ids("東")[:2] + [IDS["の"]]) == "\ufffdの"  # cut mid-character
    with pytest.raises(ValueError, match="outside the tokenizer's vocabulary"):
        tok.decode([VOCAB])


def test_long_prompt_round_trips(tok):
    text = "東京都の京都 the to 😀" * 300                        # ~5000 code points
    assert tok.decode(tok.encode(text)) == text               # (its speed: infer.py --bench)


# -----------------------------------------------------------------------------
# Differential test against the released algorithm (tokenization_plamo.py, Plamo2Tokenizer's
# AhoCorasick), transcribed from its code rather than from our reading of the format: its
# integer scores and sentinels, its candidate order (longest piece first, the byte fallback
# last) and its strict "<" are what decide ties there.

INVALID_SCORE = -20000000
UNKNOWN_SCORE = -10000000


def released_encode(rows, text):
    # AhoCorasick.build: every row's piece maps to its id (a later duplicate wins); BYTE rows go
    # to the byte table only; every other row is a piece with score round(score * 1e4), or
    # INVALID_SCORE when the score is not finite.
    token_id, score_of, byte_id = {}, {}, [0] * 256
    for tid, row in enumerate(rows):
        token = str(row[0])
        token_id[token] = tid
        if len(row) > 2 and row[2] == "BYTE":
            byte_id[int(row[0][3:5], 16)] = tid
            continue
        score = float(row[1])
        score_of[token] = round(score * 1e4) if math.isfinite(score) else INVALID_SCORE
    # _encode: right to left over code points; at each position the pieces that match there,
    # longest first, then the sentinel (length 1, id -1, UNKNOWN_SCORE: spell the character as
    # bytes); a candidate replaces the best only if strictly better.
    n = len(text)
    scores, path = [2**60] * n + [0], [None] * n
    for i in range(n - 1, -1, -1):
        candidates = sorted((t for t in score_of if t and text.startswith(t, i)), key=len, reverse=True)
        for length, tid, score in [(len(t), token_id[t], score_of[t]) for t in candidates] + [(1, -1, UNKNOWN_SCORE)]:
            if score > INVALID_SCORE:
                s = scores[i + length] - score
                if s < scores[i]:
                    scores[i], path[i] = s, (length, tid)
            if score == UNKNOWN_SCORE:
                break
    ids, pos = [], 0
    while pos < n:
        length, tid = path[pos]
        ids += [tid] if tid >= 0 else [byte_id[b] for b in text[pos].encode("utf-8")]
        pos += length
    return ids


def random_vocab(rng):
    """Specials, the 256 bytes, then pieces over a small alphabet with tie-prone scores, some
    duplicated, some unusable (score <= -2000 or not finite), of every type."""
    alphabet = "ab東京の <|>"
    rows = SPECIALS + [["<|plamo:msg|>", 0.0, "CONTROL"]] + BYTES
    for _ in range(rng.randrange(20, 60)):
        piece = "".join(rng.choice(alphabet) for _ in range(rng.randrange(1, 5)))
        score = rng.choice([-1.0, -1.5, -2.0, -2.5, -3.0, -0.5, -2.00003, -1.99997, -3000.0,
                            float("nan"), float("-inf"), 0.25])
        rows.append([piece, score, rng.choice(["NORMAL", "NORMAL", "USER_DEFINED", "CONTROL", "UNUSED"])])
    for _ in range(3):  # the same piece again, later: its id and score replace the first
        rows.append([rng.choice(rows[261:])[0], rng.choice([-1.0, -2.0]), "NORMAL"])
    return rows


def test_encode_matches_the_released_algorithm_on_random_vocabularies(tmp_path):
    rng = random.Random(0)
    texts = 0
    for trial in range(30):
        rows = random_vocab(rng)
        write_jsonl(tmp_path / "tokenizer.jsonl", rows)
        tok = PlamoTokenizer.load(str(tmp_path / "tokenizer.jsonl"))
        for _ in range(40):
            text = "".join(rng.choice("ab東京の <|>😀x") for _ in range(rng.randrange(0, 25)))
            text += rng.choice(["", "<|plamo:msg|>", "<|plamo:op|>a"])
            assert tok.encode(text) == released_encode(rows, text), (trial, text)
            texts += 1
    assert texts == 1200


def test_load_tokenizer_picks_the_class(tmp_path):
    write_jsonl(tmp_path / "tokenizer.jsonl", rows())
    assert isinstance(load_tokenizer(str(tmp_path)), PlamoTokenizer)
    Tokenizer({bytes([b]): b for b in range(256)}).save(str(tmp_path / "tokenizer.tiktoken"))
    assert isinstance(load_tokenizer(str(tmp_path)), Tokenizer)  # ours wins when both are there
    with pytest.raises(FileNotFoundError, match="tokenizer.tiktoken or tokenizer.jsonl"):
        load_tokenizer(str(tmp_path / "nowhere"))


@pytest.mark.parametrize("corrupt, message", [
    (lambda r: r[:7] + ["not json"] + r[8:], "line 8 is not valid JSON"),
    (lambda r: r[:5] + r[6:], r"lacks the byte tokens <0x00>"),
    (lambda r: r[:269] + [[7, 0.0, "NORMAL"]] + r[270:], "line 270 is not"),
    (lambda r: r[:269] + [["x", "high", "NORMAL"]] + r[270:], "line 270 is not"),
    (lambda r: r[:6] + [["<0x1>", 0.0, "BYTE"]] + r[7:], "line 7 is not"),
    (lambda r: [r[0]] + r[2:], r"no <\|plamo:bos\|>"),
])
def test_load_errors(tmp_path, corrupt, message):
    path = tmp_path / "tokenizer.jsonl"
    lines = corrupt(rows())  # a str is written as it is, a list as JSON
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    with pytest.raises(ValueError, match=message):
        load_tokenizer(str(tmp_path))


def test_generate_from_a_checkpoint_with_tokenizer_jsonl(tmp_path):
    # the path infer.py takes with a downloaded release: weights + config + tokenizer.jsonl
    torch.manual_seed(0)
    PLaMo2(PLaMo2Config.from_preset("tiny", vocab_size=VOCAB)).save_hf(str(tmp_path))
    write_jsonl(tmp_path / "tokenizer.jsonl", rows())
    tok, model = load_tokenizer(str(tmp_path)), PLaMo2.from_hf(str(tmp_path))
    assert tok.vocab_size == model.config.vocab_size
    ids = tok.encode("東京都の the", bos=True)
    assert ids == [1, IDS["東"], IDS["京都"], IDS["の"], IDS[" the"]]
    out = [t.item() for t in model.generate(torch.tensor([ids]), 4, temperature=0)]
    with torch.no_grad():  # the same tokens, recomputing everything each step
        for t in out:
            assert model(torch.tensor([ids]))[0][0, -1].argmax().item() == t
            ids.append(t)


def test_scores_beyond_any_cost_load_and_are_never_produced(tmp_path):
    write_jsonl(tmp_path / "tokenizer.jsonl", rows() + [["xy", 1e305, "NORMAL"], ["xz", float("nan"), "NORMAL"]])
    tok = load_tokenizer(str(tmp_path))
    assert tok.encode("xyxz") == byte_ids("xyxz")
