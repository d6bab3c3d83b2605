import json
import random
import re
import subprocess
import sys

import pytest

import corpus


@pytest.fixture(scope="module")
def c():
    # ~1 MB: large enough that many held-out facts are actually written (into val)
    return corpus.generate_corpus(seed=11, target_bytes=1_000_000)


@pytest.fixture(scope="module")
def world():
    return corpus.build_world(11)


def all_facts(world):
    for e in world.people + world.towns + world.companies + world.products:
        for a in corpus.PROBED:
            if corpus.ATTRS[a]["kind"] == e.kind:
                yield corpus.fact(world, e, a)


def occurrences(doc, prompt):
    """Start offsets of prompt in doc, skipping matches inside a longer name (Ai Ono in Mai Ono)."""
    i = doc.find(prompt)
    while i >= 0:
        if i == 0 or not doc[i - 1].isalnum():  # isalnum is also true for kanji and kana
            yield i
        i = doc.find(prompt, i + 1)


def test_deterministic():
    a = corpus.generate_corpus(seed=5, target_bytes=120_000)
    b = corpus.generate_corpus(seed=5, target_bytes=120_000)
    assert (a.train, a.val, a.heldout_facts, a.train_facts) == (b.train, b.val, b.heldout_facts, b.train_facts)
    assert corpus.generate_corpus(seed=6, target_bytes=120_000).train != a.train


def test_size_and_layout(c):
    size = sum(len(d.encode("utf-8")) for d in c.train + c.val)
    assert 1_000_000 <= size < 1_010_000
    assert 0.04 < len(c.val) / (len(c.train) + len(c.val)) < 0.2
    # documents are written to train.txt separated by two blank lines, so none may contain them
    assert all(d.strip() and "\n\n\n" not in d for d in c.train + c.val)


def test_heldout_facts_never_in_train(c):
    held = {f["id"] for f in c.heldout_facts}
    assert len(held) >= 20
    assert not any(held.intersection(m) for m in c.train_mentions)
    # and in the text itself, in both languages
    for f in c.heldout_facts:
        ja, en = f["ja_prompt"] + f["value"], f["en_prompt"] + " " + f["value_en"]
        assert not any(ja in d or en in d for d in c.train), f["id"]
    # not vacuous: most held-out facts are stated, in val
    stated = {i for m in c.val_mentions for i in m} & held
    assert len(stated) > 0.5 * len(held)
    assert any(f["ja_prompt"] + f["value"] in d for f in c.heldout_facts for d in c.val)


def test_train_facts_are_a_control(c):
    held = {f["id"] for f in c.heldout_facts}
    in_train = {i for m in c.train_mentions for i in m}
    assert len(c.train_facts) == len(c.heldout_facts)
    assert all(f["id"] in in_train and f["id"] not in held for f in c.train_facts)
    assert sorted(f["attribute"] for f in c.train_facts) == sorted(f["attribute"] for f in c.heldout_facts)


def test_facts_consistent_and_recorded(c, world):
    """Wherever a document writes a probe prompt, the value that follows is the world's value,
    and the document's recorded mentions include that fact."""
    docs = list(zip(c.train + c.val, c.train_mentions + c.val_mentions))
    facts = random.Random(0).sample(list(all_facts(world)), 1500)
    checked = 0
    for f in facts:
        for prompt, val, sep in ((f["ja_prompt"], f["value"], ""), (f["en_prompt"], f["value_en"], " ")):
            for doc, mentions in docs:
                for i in occurrences(doc, prompt):
                    assert doc[i + len(prompt):].startswith(sep + val), (f, doc)
                    assert f["id"] in mentions, (f, doc)
                    checked += 1
    assert checked > 400


def test_fact_matches_world(world):
    p = world.people[3]
    f = corpus.fact(world, p, "birthplace")
    town = p.attrs["birthplace"]
    assert (f["value"], f["value_en"]) == (town.name["ja"], town.name["en"])
    assert f["ja_prompt"] == p.name["ja"] + "の出身地は" and f["en_prompt"] == p.name["en"] + " was born in"
    assert town.name["ja"][-1] in "市町村"
    for co in world.companies:  # a founder works for the company and was born before founding it
        founder = co.attrs["founder"]
        assert founder.attrs["employer"] is co and founder.attrs["born"][0] + 20 < co.attrs["founded"]
    for d in world.products:
        assert d.attrs["released"] >= d.attrs["maker"].attrs["founded"]


def test_both_languages(c):
    kana = re.compile(r"[\u3040-\u309f]")
    kanji = re.compile(r"[\u4e00-\u9fff]")
    ja = [d for d in c.train if kana.search(d) and kanji.search(d)]
    en = [d for d in c.train if d.isascii()]
    assert 0.4 < len(ja) / len(c.train) < 0.8
    assert 0.15 < len(en) / len(c.train) < 0.5
    assert any("、" in d and "。" in d and "「" in d for d in ja)
    assert any(re.search(r"[\u30a0-\u30ff]{3}", d) for d in ja)  # katakana words
    both = [d for d in c.train if kana.search(d) and re.search(r"[A-Za-z]{4} [A-Za-z]{4}", d)]
    assert len(both) > 20  # translation pairs


ARITHMETIC = [
    (r"(\d+)と(\d+)を足すと(\d+)", "+"), (r"(\d+)から(\d+)を引くと(\d+)", "-"),
    (r"(\d+)に(\d+)を掛けると(\d+)", "*"), (r"(\d+)を(\d+)で割ると(\d+)", "/"),
    (r"(\d+) plus (\d+) equals (\d+)", "+"), (r"(\d+) minus (\d+) equals (\d+)", "-"),
    (r"(\d+) times (\d+) equals (\d+)", "*"), (r"(\d+) divided by (\d+) equals (\d+)", "/"),
    (r"(\d+) \+ (\d+) = (\d+)", "+"), (r"(\d+) - (\d+) = (\d+)", "-"),
    (r"(\d+) × (\d+) = (\d+)", "*"), (r"(\d+) ÷ (\d+) = (\d+)", "/"),
]


def test_arithmetic_is_correct(c):
    ops = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b, "/": lambda a, b: a / b}
    seen = {op: 0 for op in ops}
    for d in c.train + c.val:
        for pattern, op in ARITHMETIC:
            for a, b, r in re.findall(pattern, d):
                assert ops[op](int(a), int(b)) == int(r), d
                seen[op] += 1
    assert min(seen.values()) > 50, seen


def test_load_text(tmp_path):
    (tmp_path / "a.txt").write_text("first doc\nline 2\n\n\nsecond doc", encoding="utf-8")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.jsonl").write_text(
        json.dumps({"text": "吾輩は猫である。"}, ensure_ascii=False) + "\n\n" + json.dumps({"text": "名前はまだ無い。"}) + "\n",
        encoding="utf-8")
    (tmp_path / "notes.md").write_text("ignored", encoding="utf-8")
    assert corpus.load_text(str(tmp_path)) == ["first doc\nline 2", "second doc", "吾輩は猫である。", "名前はまだ無い。"]
    assert corpus.load_text(str(tmp_path / "a.txt")) == ["first doc\nline 2", "second doc"]


def test_load_text_errors(tmp_path):
    with pytest.raises(ValueError, match="no such file"):
        corpus.load_text(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "x.md").write_text("not text data")
    with pytest.raises(ValueError, match="holds no text"):
        corpus.load_text(str(tmp_path / "empty"))
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"body": "no text field"}\n')
    with pytest.raises(ValueError, match="line 2"):
        corpus.load_text(str(tmp_path / "bad.jsonl"))
    (tmp_path / "bad2.jsonl").write_text('{"text": "ok"}\nnot json\n')
    with pytest.raises(ValueError, match="line 2 is not valid JSON"):
        corpus.load_text(str(tmp_path / "bad2.jsonl"))
    (tmp_path / "latin1.txt").write_bytes("café".encode("latin-1"))
    with pytest.raises(ValueError, match="not UTF-8"):
        corpus.load_text(str(tmp_path / "latin1.txt"))


def test_cli(tmp_path):
    out = subprocess.run([sys.executable, "corpus.py", "--out", str(tmp_path), "--bytes", "60000", "--seed", "3"],
                         capture_output=True, text=True, check=True).stdout
    assert "held-out facts" in out
    c = corpus.generate_corpus(seed=3, target_bytes=60_000)
    assert corpus.load_text(str(tmp_path / "train.txt")) == c.train
    assert corpus.load_text(str(tmp_path / "val.txt")) == c.val
    facts = json.loads((tmp_path / "heldout_facts.json").read_text(encoding="utf-8"))
    assert facts["heldout"] == c.heldout_facts
