"""data.py: pre-training text prepared once into token shards, streamed, in parallel, deterministic."""
import json
import os
import random

import numpy as np
import pytest
import torch

import corpus
import data
import train
from tokenizer import Tokenizer, fingerprint, train_tokenizer

from test_train import SMALL_RUN, losses


@pytest.fixture(scope="module")
def texts(tmp_path_factory):
    """A directory of .txt and .jsonl files, some documents longer than a part."""
    root = tmp_path_factory.mktemp("texts")
    c = corpus.generate_corpus(seed=5, target_bytes=120_000)
    long_doc = "\n".join(c.train[:40])  # > PART_CHARS: cut into parts at line breaks
    (root / "a.txt").write_text("\n\n\n".join(c.train[40:200] + [long_doc]) + "\n", encoding="utf-8")
    (root / "sub").mkdir()
    with open(root / "sub" / "b.jsonl", "w", encoding="utf-8") as f:
        for d in c.train[200:]:
            f.write(json.dumps({"text": d}, ensure_ascii=False) + "\n")
    tok = train_tokenizer(c.train, 600)
    return str(root), tok, long_doc


def shards(path):
    return {f: open(os.path.join(path, f), "rb").read() for f in sorted(os.listdir(path)) if f.endswith(".bin")}


def test_parts_join_back_and_cut_at_line_breaks():
    text = "".join(f"line {i} " * random.Random(i).randint(1, 30) + "\n" for i in range(400))
    ps = data.parts(text, size=256)
    assert "".join(ps) == text and all(p.endswith("\n") for p in ps[:-1]) and max(map(len, ps)) <= 512
    assert data.parts("x" * 1000, size=256) == ["x" * 512, "x" * 488]  # no line break within reach: cut hard
    assert data.parts("", 10) == []


def test_the_same_shards_byte_for_byte_whatever_the_workers(texts, tmp_path):
    path, tok, long_doc = texts
    one, four = str(tmp_path / "one"), str(tmp_path / "four")
    m1 = data.prepare_files(path, one, tok, workers=1, shard_tokens=5000)
    m4 = data.prepare_files(path, four, tok, workers=4, shard_tokens=5000)
    assert shards(one) == shards(four) and len(m1["train"]["shards"]) > 2
    assert {k: v for k, v in m1.items() if k != "seconds"} == {k: v for k, v in m4.items() if k != "seconds"}
    # every shard but the last of a split holds exactly shard_tokens tokens
    assert [s["tokens"] for s in m1["train"]["shards"][:-1]] == [5000] * (len(m1["train"]["shards"]) - 1)
    # the stream is the documents in reading order, each preceded by BOS, the long one's parts without
    _, train_tokens, val_tokens, _ = data.open_prepared(one, tok)
    expect = {"train": [], "val": []}
    for f in corpus.text_files(path):
        for doc in corpus.read_documents(f):
            for i, p in enumerate(data.parts(doc)):
                expect[data.split_of(p, 1337, 0.05)] += ([tok.bos_id] if i == 0 else []) + tok.encode(p)
    assert train_tokens[:].tolist() == expect["train"] and val_tokens[:].tolist() == expect["val"]
    assert expect["val"] and m1["train"]["bytes"] + m1["val"]["bytes"] == sum(
        len(d.encode()) for f in corpus.text_files(path) for d in corpus.read_documents(f))


def test_the_split_depends_on_the_text_alone(texts):
    path, tok, _ = texts
    docs = corpus.load_text(path)
    splits = {d: data.split_of(d, 1337, 0.2) for d in docs}
    assert {d: data.split_of(d, 1337, 0.2) for d in reversed(docs)} == splits  # not on the order
    assert 0.1 < sum(s == "val" for s in splits.values()) / len(docs) < 0.3
    assert {d: data.split_of(d, 7, 0.2) for d in docs} != splits  # the seed picks another split


def test_windows_cross_shard_boundaries_and_resume_exactly(tmp_path):
    """A run on data whose shards are small: its windows span shards (the stream is one array),
    and a stopped run resumes to the same losses."""
    src = str(tmp_path / "src")
    train.main(SMALL_RUN + ["--out", src, "--max-steps", "1", "--eval-every", "1"])
    _, tokens, _, tok = data.open_prepared(os.path.join(src, "data"))
    small = str(tmp_path / "small")
    c = corpus.generate_corpus(seed=1337, target_bytes=300000)
    data.prepare(data.corpus_records(c), small, tok, shard_tokens=1000)
    _, sharded, _, _ = data.open_prepared(small, tok)
    assert len(sharded.maps) > 10 and np.array_equal(sharded[:], tokens[:])
    assert np.array_equal(sharded[990:1010], tokens[990:1010])  # a slice across a boundary
    w = data.Batches(sharded, 64, seed=3)
    starts = [w.order(g) * 64 for g in range(w.n)]
    assert any(s // 1000 != (s + 64) // 1000 for s in starts)  # some window spans two shards
    assert torch.equal(w.get(0, w.n, "cpu")[0], data.Batches(tokens, 64, seed=3).get(0, w.n, "cpu")[0])
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    run = SMALL_RUN + ["--data", small, "--max-steps", "4", "--eval-every", "2"]
    train.main(run + ["--out", a])
    train.main(run + ["--out", b, "--stop-at-step", "2"])
    train.main(["--out", b, "--resume"])
    assert losses(a) == losses(b)


def test_bad_data_is_one_clear_error_and_leaves_nothing_that_looks_prepared(texts, tmp_path, capsys):
    path, tok, _ = texts
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "ok.txt").write_text("\n\n\n".join(f"吾輩は猫である。名前は{i}号。" * 3 for i in range(200)), encoding="utf-8")
    (bad / "latin1.txt").write_bytes(("abc\n" * 10 + "café").encode("latin-1"))
    out = str(tmp_path / "out")
    with pytest.raises(SystemExit):
        data.main([str(bad), "--out", out, "--tokenizer", str(tmp_path / "nowhere")])
    with pytest.raises(SystemExit):
        data.main([str(bad), "--out", out, "--vocab-size", "300", "--workers", "1"])
    err = capsys.readouterr().err
    assert "latin1.txt is not UTF-8 text: byte 43" in err and "--skip-bad-files" in err
    assert not data.is_prepared(out)
    data.main([str(bad), "--out", out, "--vocab-size", "300", "--workers", "1", "--skip-bad-files", "--val-frac", "0.5"])
    assert "skipped 1 file" in capsys.readouterr().out and data.is_prepared(out)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "blank.txt").write_text("\n\n\n")
    for argv, message in [([str(empty), "--out", str(tmp_path / "e"), "--vocab-size", "300"], "no training text"),
                          ([str(bad), "--out", out, "--vocab-size", "300"], "holds prepared data already")]:
        with pytest.raises(SystemExit):
            data.main(argv)
        assert message in capsys.readouterr().err
    # a manifest that no longer matches its shards, or a tokenizer other than the model's
    _, _, _, data_tok = data.open_prepared(out)
    with pytest.raises(ValueError, match="prepared with another tokenizer"):
        data.open_prepared(out, tok)
    shard = os.path.join(out, json.load(open(os.path.join(out, "manifest.json")))["train"]["shards"][0]["file"])
    with open(shard, "ab") as f:
        f.write(b"\0\0")
    with pytest.raises(ValueError, match="no longer matches the manifest"):
        data.open_prepared(out)
    assert fingerprint(data_tok) != fingerprint(tok)


def test_the_default_run_goes_through_the_same_pipeline(tmp_path):
    """The synthetic corpus is prepared like any text: its stream is the corpus's documents, BOS
    before each, the training documents (and recall documents) first, in order."""
    out = str(tmp_path / "run")
    train.main(SMALL_RUN + ["--out", out, "--max-steps", "1", "--eval-every", "1", "--recall-frac", "0.2"])
    manifest, tokens, val, tok = data.open_prepared(os.path.join(out, "data"))
    c = corpus.generate_corpus(seed=1337, target_bytes=300000)
    recall = data.recall_documents(dict(seed=1337, frac=0.2, doc_bytes=128), sum(len(d.encode()) for d in c.train))
    expect = [t for d in c.train + recall for t in [tok.bos_id] + tok.encode(d)]
    assert tokens[:].tolist() == expect
    assert val[:].tolist() == [t for d in c.val for t in [tok.bos_id] + tok.encode(d)]
    assert manifest["run"]["recall"]["frac"] == 0.2
    assert json.load(open(os.path.join(out, "data", "heldout_facts.json")))["world"]["n_people"] == 600
    assert isinstance(tok, Tokenizer) and os.path.exists(os.path.join(out, "data", "tokenizer.tiktoken"))
