"""Long context: the recall documents, the recall probe, and the transition to full attention."""
import json
import os
import random
import re

import pytest
import torch

import corpus
import infer
import probe
import tokenizer
import runs
import train
from plamo2 import PLaMo2, PLaMo2Config
from tokenizer import PlamoTokenizer, special_token_ids

from test_plamo_tokenizer import BYTES, SPECIALS
from test_train import SMALL_RUN


@pytest.fixture(scope="module")
def world():
    return corpus.build_world(1337)


@pytest.fixture(scope="module")
def bpe():
    return tokenizer.train_tokenizer(corpus.generate_corpus(target_bytes=200_000).train, 600)


@pytest.fixture(scope="module")
def plamo_tok():
    """A PLaMo 2 vocabulary: specials, the 256 bytes, and a few pieces (the rest falls back to bytes)."""
    pieces = ("【", "】", "[", "]", " the", "e", "a", "1", "2", "o8", "藤1")  # the last two span name and code
    return PlamoTokenizer(SPECIALS + BYTES + [[p, -1.0, "NORMAL"] for p in pieces])


# -----------------------------------------------------------------------------
# Recall documents and the probe's held-out keys

def test_recall_keys_of_the_probe_never_occur_in_training():
    train_names, probe_names = (set(corpus.recall_names(probe)) for probe in (False, True))
    assert len(probe_names) > 8 and not train_names & probe_names
    train_codes, probe_codes = (set(corpus.recall_codes(probe)) for probe in (False, True))
    assert train_codes | probe_codes == {str(c) for c in range(10, 100)} and not train_codes & probe_codes
    names = {n for pair in train_names for n in pair}
    for seed in (1337, 32):  # the world of seed 32 has no 佐藤: the split must not depend on the world
        docs = corpus.recall_corpus(seed, 60_000, 2000)
        stated = re.findall(r"^[【\[]([^\d\s]+)(\d+)[】\]]$", "\n".join(docs), re.M)
        assert len(stated) > 200 and all(n in names and c in train_codes for n, c in stated)


def test_every_recall_statement_is_asked_after_it_is_made(world):
    for seed in range(20):
        doc = corpus.recall_doc(world, random.Random(seed), "ja" if seed % 2 else "en", 1500)
        keys = re.findall(r"^[【\[][^\d\s]+\d+[】\]]$", doc, re.M)
        assert keys and all(2 <= keys.count(k) <= 4 for k in keys)  # stated once, asked again 1-3 times
        codes = {k: re.search(r"\d+", k).group() for k in set(keys)}
        assert len(set(codes.values())) == len(codes)  # no two keys share a code
    assert corpus.recall_corpus(5, 20_000, 1000) == corpus.recall_corpus(5, 20_000, 1000)


@pytest.mark.parametrize("which", ["bpe", "plamo"])
def test_probe_documents_put_each_key_at_its_stated_distance(world, bpe, plamo_tok, which):
    tok = bpe if which == "bpe" else plamo_tok
    rng = random.Random(3)
    for length in (128, 300, 1000):
        for lang in ("ja", "en"):
            context, asks = probe.recall_example(tok, world, rng, lang, length, 4)
            assert context[0] == tok.bos_id and len(asks) == 4
            longest = max(len(q) for q, _, _ in asks)
            assert length - 400 <= len(context) + longest <= length  # never past the length, short by a line at most
            for question, code, distance in asks:
                prompt = context + question
                at = len(prompt) - 1 - distance  # the code's first token, `distance` back from the last
                assert prompt[at - len(question):at] == question  # the question is what came before it
                assert tok.decode(prompt[at:]).split("\n")[0] == code + ("】" if lang == "ja" else "]")
                assert tok.decode(prompt).count(tok.decode(question)) == 2  # stated once, then asked


def test_the_scorer_accepts_exactly_the_right_digits():
    ok = lambda text: probe.recall_answer(text) == "48"
    assert ok("48\n") and ok(" 48") and ok("48") and ok("48】")
    assert not any(ok(t) for t in ["480", "4", " 4", "x48", "", " 4 8", "4,8", "\n48"])


def test_an_oracle_scores_everything_and_copying_one_code_scores_chance(bpe):
    def oracle(ids):  # reads the prompt: the digits stated after its last question
        text = bpe.decode(ids)
        question = text[text.rfind("\n") + 1:]
        return re.search(re.escape(question) + r"(\d+)", text).group(1)

    def first_code(ids):  # copies the first code of the document, whatever is asked
        return re.search(r"[【\[][^\d\s]+(\d\d)[】\]]", bpe.decode(ids)).group(1)

    kwargs = dict(tok=bpe, window=64, lengths=(200, 400), keys=4, docs=4, seed=1)
    perfect = probe.recall_probe(oracle, **kwargs)
    assert all(r["correct"] for r in perfect["results"]) and len(perfect["results"]) == 32
    assert perfect["by_length"] == {200: [16, 16], 400: [16, 16]}
    chance = probe.recall_probe(first_code, **kwargs)
    assert sum(r["correct"] for r in chance["results"]) == 32 // 4  # each document's first key, once
    assert probe.recall_probe(lambda ids: "00", **kwargs)["by_length"] == {200: [0, 16], 400: [0, 16]}
    asked = {}
    for split in ("heldout", "train"):  # which names are asked: the probe's, or the training documents'
        names = set()
        probe.recall_probe(lambda ids: names.add(bpe.decode(ids).rsplit("\n", 1)[1][1:]) or "", **kwargs, split=split)
        asked[split] = names
    assert asked["heldout"] <= {n for pair in corpus.recall_names(True) for n in pair}
    assert asked["train"] <= {n for pair in corpus.recall_names(False) for n in pair} and len(asked["train"]) > 11


def test_probe_from_the_command_line(tmp_path, bpe, capsys):
    ckpt = str(tmp_path / "ckpt")
    PLaMo2(PLaMo2Config.from_preset("tiny", vocab_size=bpe.vocab_size, **special_token_ids(bpe))).save_hf(ckpt)
    bpe.save(os.path.join(ckpt, "tokenizer.tiktoken"))
    out = str(tmp_path / "probe.json")
    infer.main(["--ckpt", ckpt, "--probe", "recall", "--probe-lengths", "128,256", "--probe-docs", "2",
                "--json", out, "--seed", "3"])
    printed = capsys.readouterr().out
    assert "chance: 25.0%" in printed and "inside the window" in printed and "bits per byte" not in printed
    result = json.load(open(out))
    model, tok = infer.load(ckpt)
    direct = probe.recall_probe(probe.greedy_answer(model, tok), tok, 128, [128, 256], keys=4, docs=2, seed=3)
    assert result["results"] == direct["results"] and len(direct["results"]) == 16
    assert result["by_length"] == {str(k): v for k, v in direct["by_length"].items()}
    # a length's documents do not depend on the other lengths asked for
    alone = probe.recall_probe(probe.greedy_answer(model, tok), tok, 128, [256], keys=4, docs=2, seed=3)
    assert alone["results"] == direct["results"][8:]
    for bad in (["--probe-keys", "12"], ["--probe-lengths", "32"], ["--probe-lengths", "1k"], ["--seq-len", "0"]):
        with pytest.raises(SystemExit):
            probe.parse_args(["--ckpt", ckpt, *bad])  # (the flags' names under infer.py --probe still work)
    assert "--probe-keys from 1 to 11" in capsys.readouterr().err


# -----------------------------------------------------------------------------
# The transition: sliding window -> full attention, a RoPE base per kind of layer

def test_the_transition_keeps_every_tensor_and_reports_what_changed(tmp_path, capsys):
    src = str(tmp_path / "base")
    train.main(SMALL_RUN + ["--out", src, "--max-steps", "1", "--eval-every", "1"])
    base, tok = runs.load_checkpoint(os.path.join(src, "ckpt"), "cpu")
    capsys.readouterr()
    args = train.parse_args(["--init-from", os.path.join(src, "ckpt"), "--seq-len", "128", "--full-attention-idx", "3",
                             "--rope-theta", "1e6", "--rope-local-theta", "10000", "--recall-frac", "0.2"])
    train.settings(args)
    cfg = train.model_config(args, tok, base.config)
    assert (cfg.full_attention_idx, cfg.rope_theta, cfg.rope_local_theta) == ([3], 1e6, 10000.0)
    model = PLaMo2(cfg)
    copied, new, dropped = train.reuse_weights(model, base)
    assert not new and not dropped
    for name, t in base.state_dict().items():
        assert torch.equal(model.state_dict()[name], t), name  # bit for bit
    # and from the command line, which says what it changed and trains on recall documents too
    train.main(["--init-from", os.path.join(src, "ckpt"), "--out", str(tmp_path / "long"), "--seq-len", "128",
                "--full-attention-idx", "3", "--rope-theta", "1e6", "--rope-local-theta", "10000",
                "--recall-frac", "0.2", "--max-steps", "1", "--eval-every", "1"])
    printed = capsys.readouterr().out
    assert "changed: {'full_attention_idx': ([], [3]), 'rope_theta': (10000.0, 1000000.0), " \
           "'rope_local_theta': (None, 10000.0)}" in printed
    assert "recall documents" in printed and "copied 56 tensors, new 0, dropped 0" in printed
    # the probe beside validation bits per byte of the run's own data, in windows of --seq-len
    out = str(tmp_path / "probe.json")
    infer.main(["--ckpt", str(tmp_path / "long" / "ckpt"), "--probe", "recall", "--probe-lengths", "128",
                "--probe-docs", "1", "--seq-len", "64", "--json", out])
    result = json.load(open(out))
    assert "validation bits per byte, windows of 64 tokens" in capsys.readouterr().out
    assert result["val_seq_len"] == 64 and 0 < result["val_bpb"] < 8 and len(result["results"]) == 4


def test_decoding_after_the_transition_keeps_full_and_windowed_caches():
    """Beyond the old window (8) and the training length (16): the full-attention layer keeps every
    key, the windowed one the last 8, and cached decoding equals one forward pass."""
    torch.manual_seed(0)
    cfg = PLaMo2Config.from_preset("tiny", attention_window_size=8, mamba_chunk_size=8, max_position_embeddings=16,
                                   full_attention_idx=[1], rope_theta=1e6, rope_local_theta=1e4)
    model = PLaMo2(cfg).eval()
    idx = torch.randint(0, cfg.vocab_size, (1, 40))
    with torch.no_grad():
        full, _ = model(idx)
        cache = model.new_cache()
        steps = [model(idx[:, :5], cache=cache)[0]] + [model(idx[:, t:t + 1], cache=cache)[0] for t in range(5, 40)]
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-4, rtol=1e-4)
    assert [lc.k.shape[2] for lc, b in zip(cache.layers, model.layers) if not b.is_mamba] == [40, 8]
