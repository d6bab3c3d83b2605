"""Post-training part 2: preference pairs, the DPO loss and stage, model merging, and pairs -> dpo ->
merge -> eval from the command line."""
import argparse
import copy
import json
import math
import os
import re
import shutil
import zlib

import pytest
import torch

import merge
import posttrain
import tasks
import plamo2
import runs
from plamo2 import read_safetensors
from tokenizer import CHAT_TEMPLATE, Tokenizer, render_chat


def test_the_dpo_loss_against_hand_computed_values():
    # log-probs: policy chosen -1, rejected -3; reference -2 for both; β = 0.5: h = 1 - (-1) = 2, βh = 1.
    c, r, ref = torch.tensor([-1.0]), torch.tensor([-3.0]), torch.tensor([-2.0])
    loss, rc, rr = posttrain.dpo_loss(c, r, ref, ref, beta=0.5)
    assert math.isclose(loss.item(), math.log(1 + math.exp(-1)), rel_tol=1e-6)          # -log σ(1)
    assert (rc.item(), rr.item()) == (0.5, -0.5)                                          # β·(log π - log π_ref)
    loss, _, _ = posttrain.dpo_loss(c, r, ref, ref, beta=0.5, label_smoothing=0.1)
    assert math.isclose(loss.item(), 0.9 * math.log(1 + math.exp(-1)) + 0.1 * math.log(1 + math.exp(1)), rel_tol=1e-6)
    loss, _, _ = posttrain.dpo_loss(c, r, ref, ref, beta=0.25, kind="ipo")
    assert math.isclose(loss.item(), (2 - 1 / (2 * 0.25)) ** 2 + 0.0, abs_tol=1e-6)      # (h - 1/2β)² = 0
    loss, _, _ = posttrain.dpo_loss(c, r, ref, ref, beta=1.0, kind="ipo")
    assert math.isclose(loss.item(), (2 - 0.5) ** 2, rel_tol=1e-6)
    # With the policy equal to the reference every form is at its start: log 2 (sigmoid), 1/(2β)² (IPO).
    assert math.isclose(posttrain.dpo_loss(c, r, c, r, 0.1)[0].item(), math.log(2), rel_tol=1e-6)
    assert math.isclose(posttrain.dpo_loss(c, r, c, r, 0.1, kind="ipo")[0].item(), 25.0, rel_tol=1e-6)


PAIRS = [{"prompt": [{"role": "user", "content": "first?"}, {"role": "assistant", "content": "one"},
                     {"role": "user", "content": "colour " * (k % 3 + 1)}],
          "chosen": "blue" * (k % 2 + 1), "rejected": "a long wrong answer " * (k % 4 + 1)} for k in range(12)]


def test_the_answer_mask_excludes_the_prompt_and_padding_changes_nothing(tiny):
    model, tok = tiny
    for pair in PAIRS[:4]:
        start = len(render_chat(tok, pair["prompt"], generation_prompt=True)[0])
        for (x, y), answer in zip(posttrain.encode_pair(tok, pair, 512), (pair["chosen"], pair["rejected"])):
            full = render_chat(tok, pair["prompt"] + [{"role": "assistant", "content": answer}])[0]
            assert x == full[:-1] and len(y) == len(x)
            # Targets only after the assistant's opening marker: the answer and its end marker, not the
            # earlier assistant turn "one" of the prompt.
            assert all(t == -1 for t in y[:start - 1]) and tok.decode([t for t in y if t != -1]) == tok.decode(full[start:])
            assert tok.decode(full[start:]).startswith(answer)
    rows = [r for p in PAIRS[:4] for r in posttrain.encode_pair(tok, p, 512)]
    with torch.no_grad():
        together = posttrain.response_logps(model, *posttrain.collate(tok, rows, "cpu"))   # right-padded batch
        for k, (x, y) in enumerate(rows):
            logits = torch.log_softmax(model(torch.tensor([x]))[0][0], -1)                     # (T, V)
            alone = sum(logits[i, t] for i, t in enumerate(y) if t != -1)
            torch.testing.assert_close(together[k], alone, rtol=1e-5, atol=1e-4)


def dpo_args(**kw):
    """DPO's settings in these tests, as keyword arguments."""
    return {**dict(seq_len=512, micro_batch=4, seed=0, ref_dtype="float32", beta=0.5, label_smoothing=0.0,
                   loss="sigmoid", eval_tokens=1024, text_seq_len=64), **kw}


def test_gradients_reach_the_policy_only_and_training_raises_the_reward_accuracy(tiny):
    model, tok = tiny
    policy, reference = copy.deepcopy(model).train(), copy.deepcopy(model)
    frozen = {n: p.clone() for n, p in reference.named_parameters()}
    run = runs.Run(0, 1, torch.device("cpu"), torch.float32, False)
    stage = posttrain.DPO(reference, tok, PAIRS, run, **dpo_args())
    assert not stage.ref.requires_grad and not any(p.requires_grad for p in reference.parameters())
    # The reference log-probs, from one concatenated pass, equal chosen and rejected scored one by one.
    for k in (0, 5):
        for side in (0, 1):
            x, y = stage.rows[k][side]
            expect = posttrain.response_logps(model, torch.tensor([x]), torch.tensor([y]))[0]
            torch.testing.assert_close(stage.ref[side, k], expect.detach(), rtol=1e-5, atol=1e-4)
    idx = stage.batch(0, len(stage.train_pairs), "cpu")
    loss, n, m = stage.loss(policy, idx)
    assert n == len(stage.train_pairs) and math.isclose(loss.item() / n, math.log(2), rel_tol=1e-4)  # policy = reference
    loss.backward()
    assert all(p.grad is not None for p in policy.parameters()) and sum(p.grad.norm() for p in policy.parameters()) > 0
    assert all(p.grad is None for p in reference.parameters())
    opt = torch.optim.Adam(policy.parameters(), lr=3e-3)
    accuracy = []
    for _ in range(6):
        opt.zero_grad()
        loss, n, m = stage.loss(policy, idx)
        (loss / n).backward()
        opt.step()
        accuracy.append(m["reward_acc"].item() / n)
    assert accuracy[-1] == 1.0 > accuracy[0]
    assert all(torch.equal(p, frozen[n]) for n, p in reference.named_parameters())   # the reference never moved
    # A bfloat16 reference (--ref-dtype) gives nearly the same log-probs.
    low = posttrain.DPO(copy.deepcopy(model), tok, PAIRS, run, **dpo_args(ref_dtype="bfloat16"))
    torch.testing.assert_close(low.ref, stage.ref, rtol=0.01, atol=0.1)


def test_pairs_are_labelled_by_the_verifier(data, monkeypatch):
    examples = tasks.read_jsonl(os.path.join(data, "train.jsonl"))
    answer = {json.dumps(ex["messages"][:-1]): ex["messages"][-1]["content"] for ex in examples}
    right = lambda asked: answer[json.dumps(asked["messages"])]  # noqa: E731  (the reference answer)
    # Per prompt by its place (all prompts are asked, in a shuffled order): right and wrong, all wrong, all right.
    fake = lambda model, tok, asked, shots, **kw: [  # noqa: E731
        [[right(ex), "nonsense"], ["nonsense", "still nonsense"], [right(ex), right(ex)]][i % 3]
        for i, ex in enumerate(asked)]
    monkeypatch.setattr(tasks, "answers", fake)
    chat = argparse.Namespace(config=argparse.Namespace(chat_template=CHAT_TEMPLATE))
    args = argparse.Namespace(prompts=len(examples), samples=2, temperature=1.0, max_new_tokens=8, all_wrong="reference",
                              form_pairs=0)
    pairs, tally = posttrain.make_pairs(chat, None, data, args, 0)
    assert [p["source"] for p in pairs] == [["policy", "reference"][i % 3] for i in range(len(examples)) if i % 3 < 2]
    for p in pairs:
        ex = next(e for e in examples if e["messages"][:-1] == p["prompt"])
        assert tasks.verify(ex["check"], p["chosen"])["ok"] and not tasks.verify(ex["check"], p["rejected"])["ok"]
    assert sum(t["all right"] for t in tally.values()) == len(examples) // 3
    args.all_wrong = "drop"
    assert all(p["source"] == "policy" for p in posttrain.make_pairs(chat, None, data, args, 0)[0])


def test_form_pairs_prefer_the_form_asked_for(data):
    with open(os.path.join(data, "facts.json"), encoding="utf-8") as f:
        facts = {g["id"]: g for s in json.load(f)["sets"].values() for g in s}
    formats = [ex for ex in tasks.read_jsonl(os.path.join(data, "train.jsonl")) if ex["task"] == "format"]
    assert {ex["kind"] for ex in formats} == {"english", "japanese", "short", "list"}
    for ex in formats:
        rejected = posttrain.form_rejected(facts, ex)
        assert tasks.verify(ex["check"], ex["messages"][-1]["content"])["ok"]
        assert not tasks.verify(ex["check"], rejected)["form"], (ex["kind"], rejected)
        if ex["kind"] in ("english", "japanese"):  # the same value, in the other language
            assert bool(tasks.JAPANESE.search(rejected)) == (ex["kind"] == "english")


def test_merge_methods_against_their_formulas():
    g = torch.Generator().manual_seed(0)
    a, b, base = (torch.randn(5, 7, generator=g) for _ in range(3))
    merge_ = merge.merge_tensor
    torch.testing.assert_close(merge_("linear", None, [a, a, a], [0.2, 0.3, 0.5]), a)
    torch.testing.assert_close(merge_("linear", None, [a, b], [1, 3]), 0.25 * a + 0.75 * b)
    torch.testing.assert_close(merge_("slerp", None, [a, b], None, t=0.0), a)
    torch.testing.assert_close(merge_("slerp", None, [a, b], None, t=1.0), b)
    u, v = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    mid = merge_("slerp", None, [u, v], None, t=0.5)
    assert math.isclose(mid.norm().item(), 1.0, rel_tol=1e-6)            # on the circle; linear would be 0.707
    torch.testing.assert_close(mid, torch.tensor([1.0, 1.0]) / math.sqrt(2))
    torch.testing.assert_close(merge_("slerp", None, [a, 2 * a], None, t=0.5), 1.5 * a)  # colinear: linear
    torch.testing.assert_close(merge_("task_arithmetic", base, [a, b], [1, 1], lam=0.0), base)
    torch.testing.assert_close(merge_("task_arithmetic", base, [a, b], [0.5, 2], lam=0.5),
                               base + 0.5 * (0.5 * (a - base) + 2 * (b - base)))
    # TIES by hand, density 0.5 (two of four entries kept per task vector):
    #   trimmed  [3, 0, 0, 2]  [-2, -2.5, 0, 0]  [-4, 1, 0, 0]  -> sum [-3, -1.5, 0, 2], signs [-, -, 0, +]
    #   agreeing means: (-2 - 4)/2, -2.5 (the +1 disagrees), none, 2
    zero = torch.zeros(4)
    taus = [torch.tensor([3.0, -1, 0.5, 2]), torch.tensor([-2.0, -2.5, 0.4, 1]), torch.tensor([-4.0, 1, 0.1, 0.5])]
    torch.testing.assert_close(merge_("ties", zero, taus, [1, 1, 1], density=0.5), torch.tensor([-3.0, -2.5, 0, 2]))
    torch.testing.assert_close(merge_("ties", zero + 1, [t + 1 for t in taus], [1, 1, 1], density=0.5, lam=2.0),
                               1 + 2 * torch.tensor([-3.0, -2.5, 0, 2]))
    # DARE keeps the expectation: ones dropped at density p and rescaled average 1 within 5 standard
    # errors (sqrt((1 - p) / (p n))); seeded per tensor name.
    n, p = 200_000, 0.3
    ones = torch.ones(n)
    dropped = merge_("dare", torch.zeros(n), [ones], [1.0], name="w", density=p, seed=7)
    assert abs(dropped.mean().item() - 1) < 5 * math.sqrt((1 - p) / (p * n))
    assert math.isclose((dropped != 0).float().mean().item(), p, abs_tol=0.01)
    assert torch.all((dropped == 0) | torch.isclose(dropped, torch.tensor(1 / p)))
    assert torch.equal(dropped, merge_("dare", torch.zeros(n), [ones], [1.0], name="w", density=p, seed=7))
    assert not torch.equal(dropped, merge_("dare", torch.zeros(n), [ones], [1.0], name="v", density=p, seed=7))
    # DARE with TIES' signs: where both are kept the elected sign is +, and the -0.5 entry does not count.
    first, second = (merge.dare_drop(v, p, torch.Generator().manual_seed(zlib.crc32(f"7/w/{i}".encode())))
                     for i, v in enumerate((ones, -0.5 * ones)))
    assert torch.equal(first, dropped)
    torch.testing.assert_close(merge_("dare_ties", torch.zeros(n), [ones, -0.5 * ones], [1.0, 1.0], name="w", density=p, seed=7),
                               torch.where(first != 0, first, second))


@pytest.fixture(scope="module")
def chat(base, data, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("sft") / "sft")
    posttrain.main(["sft", "--ckpt", base, "--data", data, "--out", out, "--max-steps", "2", "--seq-len", "128"])
    return os.path.join(out, "ckpt")


def test_pairs_dpo_merge_eval_from_the_command_line(base, chat, data, tmp_path, capsys):
    pairs = str(tmp_path / "pairs.jsonl")
    sample = ["--prompts", "8", "--samples", "2", "--max-new-tokens", "8", "--form-pairs", "8"]
    posttrain.main(["pairs", "--ckpt", chat, "--out", pairs] + sample)
    rows = tasks.read_jsonl(pairs)
    assert {"form"} <= {r["source"] for r in rows} and "all right" in capsys.readouterr().out
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    size = ["--eval-tokens", "1024", "--seq-len", "64", "--batch-tokens", "256"]  # 4 pairs a step
    small = size + ["--max-steps", "3", "--eval-every", "3"]
    posttrain.main(["dpo", "--ckpt", chat, "--data", pairs, "--out", a] + small)
    printed = capsys.readouterr().out
    # before training: log 2 (policy = reference) plus the chosen answers' NLL per token (RPO, the default)
    assert float(re.search(r"round 1 before DPO: val_loss ([\d.]+)", printed).group(1)) > math.log(2)
    assert "text_bpb" in printed and "reward_acc" in printed
    # Stopped and resumed: the same steps as uninterrupted.
    posttrain.main(["dpo", "--ckpt", chat, "--data", pairs, "--out", b, "--stop-at-step", "2"] + small)
    posttrain.main(["dpo", "--out", b, "--resume"])
    from test_train import losses
    assert losses(os.path.join(a, "round1")) == losses(os.path.join(b, "round1"))
    # Two rounds on the policy's own samples: round 2 starts from round 1's policy.
    c = str(tmp_path / "c")
    posttrain.main(["dpo", "--ckpt", chat, "--out", c, "--rounds", "2", "--max-steps", "1"] + size + sample)
    assert os.path.exists(os.path.join(c, "round2", "pairs.jsonl"))
    settings = runs.read_lineage(os.path.join(c, "round2", "ckpt"))["settings"]
    assert settings["ckpt"] == os.path.join(c, "round1", "ckpt") and settings["round"] == 2
    capsys.readouterr()
    policy = os.path.join(c, "round2", "ckpt")
    tasks.main(["eval", "--ckpt", policy, "--tasks", "qa", "--max-new-tokens", "2"])   # finds the SFT data
    assert "chat template" in capsys.readouterr().out
    m = str(tmp_path / "m")
    merge.main(["--base", base, "--models", chat, policy, "--method", "ties", "--out", m])
    with open(os.path.join(m, "ckpt", "config.json")) as f:
        assert json.load(f)["chat_template"] == CHAT_TEMPLATE   # the SFT model's marker, carried over
    tasks.main(["eval", "--ckpt", os.path.join(m, "ckpt"), "--data", data, "--tasks", "qa", "--max-new-tokens", "2"])
    assert "chat template" in capsys.readouterr().out


def test_the_streaming_merge_equals_the_merge_in_memory_and_bad_inputs_are_clear_errors(base, chat, tmp_path, capsys):
    model, tok = runs.load_checkpoint(chat, "cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    other = str(tmp_path / "o" / "ckpt")
    plamo2.save_checkpoint(other, model, tok, None)
    states = {p: read_safetensors(runs.find_checkpoint(p)) for p in (base, chat, other)}
    for method, extra in (("linear", ["--weights", "1", "3"]), ("slerp", ["--t", "0.3"]), ("task_arithmetic", ["--lambda", "0.7"]),
                          ("ties", ["--density", "0.4"]), ("dare", ["--density", "0.6"]), ("dare_ties", ["--seed", "3"])):
        out = str(tmp_path / method)
        with_base = ["--base", base] if method not in ("linear", "slerp") else []
        merge.main(["--models", chat, other, "--method", method, "--out", out] + with_base + extra)
        args = merge.parse_args(["--models", chat, other, "--method", method, "--out", out] + with_base + extra)
        merged = read_safetensors(os.path.join(out, "ckpt"))
        assert merged.keys() == states[chat].keys()
        for name, t in merged.items():
            expect = merge.merge_tensor(method, states[base][name], [states[chat][name], states[other][name]],
                                            args.weights or [1.0, 1.0], name, args.t, args.lam, args.density, args.seed)
            assert torch.equal(t, expect), (method, name)
        runs.load_checkpoint(os.path.join(out, "ckpt"), "cpu")  # an ordinary checkpoint
    # The writer keeps every dtype and shape byte for byte.
    tensors = {"a": torch.randn(3, 4).to(torch.bfloat16), "b": torch.arange(6).view(2, 3), "c": torch.tensor(2.5)}
    path = str(tmp_path / "t.safetensors")
    merge.write_safetensors(path, [(n, {torch.bfloat16: "BF16", torch.int64: "I64", torch.float32: "F32"}[t.dtype],
                                        tuple(t.shape)) for n, t in tensors.items()], tensors.values())
    from safetensors.torch import load_file
    assert all(torch.equal(load_file(path)[n], t) for n, t in tensors.items())
    # Mismatched inputs: one clear error each, nothing written.
    wide = str(tmp_path / "wide")
    shutil.copytree(runs.find_checkpoint(other), wide)
    with open(os.path.join(wide, "config.json")) as f:
        cfg = json.load(f)
    with open(os.path.join(wide, "config.json"), "w") as f:
        json.dump({**cfg, "rope_theta": 1.0}, f)
    retok = str(tmp_path / "retok")
    shutil.copytree(runs.find_checkpoint(other), retok)
    Tokenizer({bytes([b]): b for b in range(256)}).save(os.path.join(retok, "tokenizer.tiktoken"))
    cases = [(["--models", chat, wide, "--method", "linear"], "different configs (rope_theta)"),
             (["--models", chat, retok, "--method", "linear"], "different tokenizers"),
             (["--models", chat, str(tmp_path / "none"), "--method", "linear"], "no checkpoint"),
             (["--models", chat, other, "--method", "ties"], "needs --base"),
             (["--models", chat, other, base, "--method", "slerp"], "exactly two")]
    for argv, message in cases:
        with pytest.raises(SystemExit):
            merge.main(["--out", str(tmp_path / "bad")] + argv)
        assert message in capsys.readouterr().err, argv
        assert not os.path.exists(str(tmp_path / "bad" / "ckpt"))
    with pytest.raises(SystemExit):
        merge.main(["--models", chat, other, "--method", "linear", "--out", str(tmp_path / "o")])
    assert "contains --models" in capsys.readouterr().err


def test_bad_pairs_and_dpo_input_is_one_clear_error(base, chat, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(PAIRS[0]) + "\n" + json.dumps({"prompt": [{"role": "user", "content": "hi"}], "chosen": "a"}) + "\n")
    taken = tmp_path / "taken.jsonl"
    taken.write_text("")
    cases = [(["dpo", "--ckpt", chat, "--data", str(bad), "--out", str(tmp_path / "o")], "pair 2 is not"),
             (["dpo", "--ckpt", chat, "--data", str(tmp_path / "none.jsonl"), "--out", str(tmp_path / "o")], "no preference pairs"),
             (["dpo", "--ckpt", chat, "--out", os.path.dirname(chat)], "contains --ckpt"),
             (["dpo", "--out", str(tmp_path / "nothing"), "--resume"], "no DPO round"),
             (["dpo", "--ckpt", chat, "--data", str(bad), "--rounds", "2", "--out", str(tmp_path / "o")], "one round"),
             (["pairs", "--ckpt", chat, "--out", str(taken)], "exists"),
             (["pairs", "--ckpt", base, "--out", str(tmp_path / "p.jsonl"), "--data", runs.read_lineage(chat)["instructions"]],
              "must be a chat model")]
    for argv, message in cases:
        with pytest.raises(SystemExit):
            posttrain.main(argv)
        assert message in capsys.readouterr().err, argv
