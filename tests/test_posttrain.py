"""Post-training part 1: the split of facts, the verifier, the SFT loss (packing, masking,
normalisation) and data -> sft -> eval from the command line."""
import json
import os
import random

import pytest
import torch
import torch.nn.functional as F

import corpus
import loop as loop_module
import posttrain
import tasks
import runs
from loop import Loop, lr_at
from tokenizer import CHAT_TEMPLATE, render_chat


def test_the_fact_split_is_disjoint_recorded_and_sft_examples_state_only_sft_facts(data, world):
    w, c = world
    with open(os.path.join(data, "facts.json"), encoding="utf-8") as f:
        sets = json.load(f)["sets"]
    ids = {k: {f["id"] for f in v} for k, v in sets.items()}
    assert ids["sft"] and ids["pretrain"] and ids["heldout"]
    assert not (ids["sft"] & ids["pretrain"]) and not (ids["heldout"] & (ids["sft"] | ids["pretrain"]))
    stated = {m for doc in c.train_mentions for m in doc}
    assert ids["heldout"] == {f["id"] for f in c.heldout_facts} and not ids["heldout"] & stated
    assert ids["sft"] | ids["pretrain"] <= stated
    # Read from the text itself: no training conversation names an entity of a pretrain or held-out
    # fact together with that fact's value.
    examples = tasks.read_jsonl(os.path.join(data, "train.jsonl"))
    texts = [" ".join(m["content"] for m in ex["messages"]) for ex in examples]
    assert {ex["task"] for ex in examples} == set(tasks.MIX)
    for f in sets["pretrain"] + sets["heldout"]:
        for text in texts:
            for name, value in ((f["entity"], f["value"]), (f["entity_en"], f["value_en"])):
                assert not (name in text and value in text), (f["id"], text)
    # No evaluation prompt is a training prompt, and every cell of the table has prompts.
    seen = {json.dumps(ex["messages"][:-1]) for ex in examples}
    evals = tasks.read_jsonl(os.path.join(data, "eval.jsonl"))
    assert not any(json.dumps(ex.get("messages")) in seen for ex in evals)
    assert {tasks.group_of(ex)[:2] for ex in evals} >= {("qa", s) for s in ("sft", "pretrain", "heldout", "unknown")}


def test_the_verifier_accepts_every_allowed_form_and_rejects_wrong_answers(world):
    w, c = world
    q = tasks.Questions(w, {"sft": [], "pretrain": [], "heldout": []}, [])
    town = w.towns[0]
    pop = corpus.fact(w, town, "population")
    n = town.attrs["population"]
    ja, en = q.check(pop, "ja"), q.check(pop, "en")
    ok = lambda check, a: tasks.verify(check, a)  # noqa: E731
    for answer in (f"{n:,}人です。", f"{n}人", f"{town.name['ja']}の人口は{n:,}人である。", f"{n:,}"):
        assert ok(ja, answer)["ok"], answer
    for answer in (f"{n:,}", f"About {n} people live there.", f"The population of {town.name['en']} is {n:,}."):
        assert ok(en, answer)["ok"], answer
    assert not ok(ja, f"{n + 1:,}人です。")["ok"] and not ok(en, f"{n}0")["ok"]
    other = next(t.attrs["population"] for t in w.towns if t.attrs["population"] != n)
    assert ok(en, f"{other:,}")["verdict"] == "wrong"
    assert ok(en, f"{n:,} or maybe {other:,}")["verdict"] == "wrong"  # naming two values is not an answer
    assert ok(en, "I have no information about it.")["verdict"] == "abstain"
    assert ok(en, "")["verdict"] == "wrong"
    p = w.people[0]
    born = corpus.fact(w, p, "born")
    y, m, d = p.attrs["born"]
    assert ok(q.check(born, "en"), f"{p.name['en']} was born on {d} {corpus.MONTHS[m - 1]} {y}.")["ok"]
    # The corpus's own split date (ATTRS "born"): the month and day, and the year, both there.
    split = f"{p.name['en']}'s birthday is {corpus.MONTHS[m - 1]} {d}, and {{}} was born in {{}}."
    assert ok(q.check(born, "en"), split.format("she", y))["ok"] and not ok(q.check(born, "en"), split.format("she", y + 1))["ok"]
    assert not ok(q.check(born, "en"), f"{p.name['en']} was born in {y}.")["ok"]
    assert ok(q.check(born, "ja"), f"{y}/{m}/{d}です。")["ok"]
    assert ok(q.check(born, "ja"), f"{y}年{m}月{d}日")["ok"] and not ok(q.check(born, "ja"), f"{y}年{m}月{d + 1}日")["ok"]
    hobby = q.check(corpus.fact(w, p, "hobby"), "en")
    assert ok(hobby, p.attrs["hobby"]["en"].capitalize() + ".")["ok"]
    # The other checks: numbers, forms, lists, translations.
    assert ok({"type": "number", "answer": 50}, "5 × 10 = 50, so 50 apples.")["ok"]
    assert not ok({"type": "number", "answer": 50}, "5 × 10 = 50, so 51 apples.")["ok"]
    form = {**en, "type": "form", "form": "short"}
    assert ok(form, f"{n:,}")["ok"] and not ok(form, f"The population is {n:,}. It is a town.")["form"]
    assert ok({**en, "type": "form", "form": "english"}, f"{n:,}.")["form"]
    assert not ok({**ja, "type": "form", "form": "english"}, f"{n:,}人です。")["form"]
    items = [q.check(corpus.fact(w, town, a), "ja") for a in ("prefecture", "population", "specialty")]
    values = [corpus.value(town, a, "ja") for a in ("prefecture", "population", "specialty")]
    good = "\n".join(f"・{v}" for v in values)
    assert ok({"type": "list", "items": items}, good)["ok"]
    assert not ok({"type": "list", "items": items}, "、".join(values))["form"]
    assert not ok({"type": "list", "items": items}, "\n".join(f"・{v}" for v in values[::-1]))["ok"]
    t = {"type": "translation", "reference": "Tomoya Sano works for Sakura Foods."}
    assert ok(t, "Tomoya Sano works for Sakura Foods.")["exact"] and ok(t, "Tomoya  Sano works for Sakura Foods.")["ok"]
    part = ok(t, "Tomoya Sano works for Aoba Foods.")
    assert not part["ok"] and 50 < part["chrf"] < 100


def test_chrf_against_a_hand_computation():
    # n = 2: every unigram matches, one bigram of three (ab; bd, dc are not in abcd):
    # P = R = (1 + 1/3) / 2, so F_beta = P for every beta.
    assert tasks.chrf("abdc", "abcd", n=2) == pytest.approx(100 * (1 + 1 / 3) / 2)
    # P != R: hyp "ab", ref "abcd", n = 1: P = 1, R = 1/2, F2 = 5 * 1 * 0.5 / (4 * 1 + 0.5).
    assert tasks.chrf("ab", "abcd", n=1) == pytest.approx(100 * 5 * 0.5 / 4.5)
    assert tasks.chrf("", "abc") == 0.0


CONVS = [[{"role": "user", "content": "q" * k}, {"role": "assistant", "content": "a" * (k % 7 + 1)}] +
         ([{"role": "user", "content": "again"}, {"role": "assistant", "content": "yes!"}] if k % 3 == 0 else [])
         for k in range(1, 14)]


def test_packing_with_seq_idx_gives_the_loss_of_one_conversation_at_a_time(tiny):
    model, tok = tiny
    x, y, s, cut = posttrain.pack(tok, CONVS, 64)
    assert cut == 0 and len(x) < len(CONVS)  # several conversations share a row
    with torch.no_grad():
        logits = model(x, seq_idx=s)[0]
        packed = F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=-1, reduction="sum")
        leaky = F.cross_entropy(model(x)[0].flatten(0, 1), y.flatten(), ignore_index=-1, reduction="sum")
        alone, terms = 0.0, 0
        for c in CONVS:
            ids, mask = render_chat(tok, c)
            t = torch.tensor([ids])
            target = torch.where(torch.tensor([mask[1:]]), t[:, 1:], -1)
            alone += F.cross_entropy(model(t[:, :-1])[0][0], target[0], ignore_index=-1, reduction="sum")
            terms += sum(mask[1:])
    assert (y != -1).sum().item() == terms == sum(sum(render_chat(tok, c)[1]) for c in CONVS)
    torch.testing.assert_close(packed, alone, rtol=1e-5, atol=1e-4)
    assert not torch.allclose(leaky, alone, rtol=1e-3)  # without seq_idx, conversations see each other


def test_the_loss_is_normalised_per_assistant_token_over_the_whole_step(base, data, tmp_path, monkeypatch):
    """With plain SGD (lr from the schedule, no clipping, no decay) one step moves the weights by
    exactly lr times the gradient of (assistant-token loss summed over the step's rows) / (their
    count), although the rows go through in micro-batches of different token counts."""
    monkeypatch.setattr(loop_module, "make_optimizer", lambda model, args, device: torch.optim.SGD(model.parameters(), lr=1))
    out = str(tmp_path / "sft")
    posttrain.main(["sft", "--ckpt", base, "--data", data, "--out", out, "--max-steps", "1", "--seq-len", "128",
                    "--batch-tokens", "512", "--micro-batch", "1", "--grad-clip", "0", "--lr", "1"])
    after, _ = runs.load_checkpoint(os.path.join(out, "ckpt"), "cpu")
    model, tok = runs.load_checkpoint(base, "cpu")
    loop = Loop(out=out, **runs.read_lineage(os.path.join(out, "ckpt"))["loop"])
    run = runs.Run(0, 1, torch.device("cpu"), torch.float32, False)
    stage = posttrain.SFT(tok, posttrain.read_conversations(data), loop.seq_len, loop.seed, loop.micro_batch, run)
    x, y, s = stage.batch(0, 4, "cpu")
    counts = (y != -1).sum(1)
    assert len(set(counts.tolist())) > 1  # the micro-batches weigh differently
    loss, n, _ = stage.loss(model, (x, y, s))
    (loss / n).backward()
    lr = lr_at(0, loop)
    for (name, p), q in zip(model.named_parameters(), after.parameters()):
        torch.testing.assert_close((p.detach() - q) / lr, p.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_sft_without_a_single_assistant_token_is_an_error_before_training(base, tmp_path, capsys):
    """Data with no assistant message, or whose assistant messages all lie beyond the rows, gives
    SFT nothing to learn: one sentence, nothing written (a step without terms leaving the weights
    alone is the loop's, tested in test_train)."""
    path = tmp_path / "user_only.jsonl"
    path.write_text("\n".join(json.dumps({"messages": [{"role": "user", "content": f"question {i}"}]})
                              for i in range(8)) + "\n")
    late = tmp_path / "late.jsonl"
    late.write_text("\n".join(json.dumps({"messages": [{"role": "user", "content": "q" * 300},
                                                       {"role": "assistant", "content": "a"}]}) for i in range(8)) + "\n")
    for data, message in [(path, "conversation 1 has no assistant message"), (late, "no assistant token is left")]:
        out = str(tmp_path / f"sft-{data.stem}")
        with pytest.raises(SystemExit):
            posttrain.main(["sft", "--ckpt", base, "--data", str(data), "--out", out, "--max-steps", "2", "--seq-len", "64"])
        assert message in capsys.readouterr().err
        assert not os.path.exists(os.path.join(out, "ckpt"))


def test_data_sft_eval_from_the_command_line(base, data, tmp_path, capsys):
    out = str(tmp_path / "sft")
    posttrain.main(["sft", "--ckpt", base, "--data", data, "--out", out, "--max-steps", "4", "--seq-len", "128",
                    "--eval-every", "2"])
    printed = capsys.readouterr().out
    assert "inherited" in printed and "before SFT: val_loss" in printed and "step 4: val_loss" in printed
    with open(os.path.join(out, "ckpt", "config.json")) as f:
        assert json.load(f)["chat_template"] == CHAT_TEMPLATE
    result = str(tmp_path / "eval.json")
    tasks.main(["eval", "--ckpt", os.path.join(out, "ckpt"), "--json", result, "--max-new-tokens", "4"])  # the SFT run's data
    printed = capsys.readouterr().out
    assert "chat template" in printed and "qa         pretrain" in printed
    with open(result, encoding="utf-8") as f:
        r = json.load(f)
    assert r["chat"] and {k.split()[0] for k in r["table"]} == set(tasks.TASK_ORDER)
    assert all("answer" in it and "ok" in it for it in r["items"])
    tasks.main(["eval", "--ckpt", base, "--data", data, "--tasks", "qa,arithmetic", "--max-new-tokens", "4"])
    printed = capsys.readouterr().out
    assert "few-shot" in printed and "translate" not in printed and "arithmetic" in printed


def test_sft_stops_and_resumes_exactly(base, data, tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    common = ["--ckpt", base, "--data", data, "--max-steps", "4", "--seq-len", "128", "--eval-every", "2"]
    posttrain.main(["sft", "--out", a] + common)
    posttrain.main(["sft", "--out", b, "--stop-at-step", "2"] + common)
    posttrain.main(["sft", "--out", b, "--resume"])
    from test_train import losses
    assert losses(a) == losses(b) and sorted(losses(a)) == [1, 2, 3, 4]


def test_bad_input_is_one_clear_error(base, data, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n{"messages": [{"role": "robot"}]}\n')
    cases = [(["sft", "--ckpt", base, "--data", str(bad), "--out", str(tmp_path / "o")], "conversation 2 is not"),
             (["sft", "--ckpt", base, "--data", data, "--out", os.path.dirname(base)], "contains --ckpt"),
             (["sft", "--ckpt", str(tmp_path / "nothing"), "--data", data, "--out", str(tmp_path / "o")], "no checkpoint"),
             (["eval", "--ckpt", base], "give --data"),
             (["data", "--ckpt", base, "--out", data], "holds instruction data"),
             (["data", "--ckpt", base, "--out", str(tmp_path / "d"), "--mix", "poetry=1"], "unknown task")]
    for argv, message in cases:
        with pytest.raises(SystemExit):
            posttrain.main(argv)
        assert message in capsys.readouterr().err, argv


def test_a_teacher_answer_is_kept_only_when_the_verifier_accepts_it(data, monkeypatch):
    examples = tasks.read_jsonl(os.path.join(data, "train.jsonl"))[:6]
    rng = random.Random(0)
    samples = [[ex["messages"][-1]["content"] if rng.random() < 0.5 else "nonsense", "nonsense"] for ex in examples]
    monkeypatch.setattr(runs, "load_checkpoint", lambda path, device: (None, None))
    monkeypatch.setattr(tasks, "answers", lambda *a, **k: samples)
    args = type("A", (), dict(device="cpu", teacher="t", temperature=0.8, samples=2, seed=0))
    kept = tasks.rejection_sample(args, examples)
    expect = [ex for ex, s in zip(examples, samples) if tasks.verify(ex["check"], s[0])["ok"]]
    assert [k["messages"][:-1] for k in kept] == [e["messages"][:-1] for e in expect] and 0 < len(kept) < 6
    assert all(k["source"] == "teacher" and tasks.verify(k["check"], k["messages"][-1]["content"])["ok"] for k in kept)
