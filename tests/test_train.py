import argparse
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import corpus
import data
import tokenizer
import plamo2
import runs
import train
from loop import Loop, fit, flops_per_token, lr_at, make_optimizer, read_log
from plamo2 import PLaMo2, PLaMo2Config
from tokenizer import special_token_ids

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A run small enough for the test suite: 300 KB of corpus, 64-token sequences, 8 per step.
SMALL_RUN = ["--size", "tiny", "--corpus-bytes", "300000", "--vocab-size", "1024", "--seq-len", "64",
             "--batch-tokens", "512", "--micro-batch", "4", "--eval-tokens", "1024"]


def losses(out):
    """The train loss of every step in the log; for a step logged twice (resumed), the last."""
    with open(os.path.join(out, "log.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def run_args(out, **overrides):
    """The loop's settings of SMALL_RUN as fit() sees them, without the command line."""
    return Loop(**{"out": out, "seq_len": 64, "batch_tokens": 512, "micro_batch": 4, "max_steps": 450,
                         "lr": 3e-3, "eval_every": 100, **overrides})


def test_train_end_to_end(tmp_path, capsys):
    out = str(tmp_path / "run")
    train.main(SMALL_RUN + ["--out", out, "--max-steps", "6", "--eval-every", "3"])
    printed = capsys.readouterr().out
    assert "unigram baseline" in printed and "step 3: val_bpb" in printed and "MFU" in printed
    assert sorted(losses(out)) == list(range(1, 7))
    for name in ("log.jsonl", "loss.png", "ckpt/config.json", "ckpt/model.safetensors",
                 "ckpt/tokenizer.tiktoken", "ckpt/train_state.pt"):
        assert os.path.exists(os.path.join(out, name)), name
    model, tok = runs.load_checkpoint(os.path.join(out, "ckpt"), "cpu")
    assert model.config.vocab_size == tok.vocab_size == 1024
    # Tools that read only config.json stop and pad on these ids: they must be our tokenizer's.
    config = json.load(open(os.path.join(out, "ckpt/config.json")))
    assert {k: config[k] for k in special_token_ids(tok)} == {"bos_token_id": 1016, "eos_token_id": 1017,
                                                               "pad_token_id": 1018}
    state = runs.load_train_state(os.path.join(out, "ckpt"))
    lineage = json.load(open(os.path.join(out, "ckpt", "lineage.json")))
    assert state["step"] == 6 and lineage["step"] == 6 and lineage["stage"] == "pretrain"
    assert lineage["text"] == os.path.join(out, "data") and lineage["loop"]["lr"] == 3e-3
    assert read_log(os.path.join(out, "log.jsonl"))[-1]["val_bpb"] < 4


def test_resume_reproduces_an_uninterrupted_run(tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    train.main(SMALL_RUN + ["--out", a, "--max-steps", "6", "--eval-every", "3"])
    train.main(SMALL_RUN + ["--out", b, "--max-steps", "6", "--eval-every", "3", "--stop-at-step", "3"])
    assert sorted(losses(b)) == [1, 2, 3]
    train.main(["--out", b, "--resume"])
    assert losses(b) == losses(a)  # bit for bit: same data position, optimizer state and schedule


def test_resume_loads_the_train_state_onto_the_cpu(tmp_path, monkeypatch):
    """A run saved on a GPU must resume on a CPU, and no DDP rank may put the optimizer state on
    cuda:0: train_state.pt is read with map_location="cpu" (lazily, mmap)."""
    out = str(tmp_path / "run")
    train.main(SMALL_RUN + ["--out", out, "--max-steps", "2", "--eval-every", "2", "--stop-at-step", "1"])
    calls, load = [], torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: calls.append(k) or load(*a, **k))
    train.main(["--out", out, "--resume"])
    assert calls and all(k.get("map_location") == "cpu" and k.get("mmap") for k in calls)


def torchrun(args, port, script="train.py"):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
                    os.path.join(ROOT, script)] + args, check=True, env=env, cwd=ROOT,
                   stdout=subprocess.DEVNULL, timeout=280)


@pytest.mark.slow
def test_two_processes_match_one(tmp_path):
    """DDP, and FSDP stopped and resumed halfway under FSDP, reproduce one process with the same
    global batch; the FSDP checkpoints are gathered into a model built on the meta device."""
    one, ddp, fsdp = str(tmp_path / "one"), str(tmp_path / "ddp"), str(tmp_path / "fsdp")
    args = SMALL_RUN + ["--max-steps", "4", "--eval-every", "2"]
    train.main(args + ["--out", one])
    torchrun(args + ["--out", ddp], 29533)
    torchrun(args + ["--out", fsdp, "--fsdp", "--stop-at-step", "2"], 29534)
    torchrun(["--out", fsdp, "--resume", "--fsdp"], 29535)
    w1 = PLaMo2.from_hf(os.path.join(one, "ckpt")).state_dict()
    weights = {}
    for run in (ddp, fsdp):
        l1, l2 = losses(one), losses(run)
        assert sorted(l2) == [1, 2, 3, 4]
        for s in l1:
            assert l2[s] == pytest.approx(l1[s], rel=1e-4, abs=1e-5)
        weights[run] = PLaMo2.from_hf(os.path.join(run, "ckpt")).state_dict()
        # Two processes sum the gradients in another order than one; Adam divides each update by
        # the gradient's running size, which magnifies that rounding where a gradient is near zero:
        # within a tenth of one step's largest update (lr 3e-3); a wrong batch shows in the losses above.
        for k in w1:
            torch.testing.assert_close(weights[run][k], w1[k], atol=3e-4, rtol=0)
    for k in w1:  # DDP and FSDP (stopped and resumed) sum in the same order: the same weights
        torch.testing.assert_close(weights[fsdp][k], weights[ddp][k], atol=1e-5, rtol=1e-4)


# -----------------------------------------------------------------------------
# The shared loop


def small_model(seed=0):
    torch.manual_seed(seed)
    return PLaMo2(PLaMo2Config.from_preset("tiny", vocab_size=256, hidden_size=64, intermediate_size=128,
                                           num_attention_heads=2, num_key_value_heads=1, hidden_size_per_head=32,
                                           mamba_num_heads=2, mamba_d_state=16, mamba_chunk_size=16,
                                           bos_token_id=253, eos_token_id=254, pad_token_id=255))


class ByteTokenizer:
    """What fit needs of a tokenizer to save a checkpoint (special ids, files)."""
    vocab_size, bos_id, eos_id, pad_id = 256, 253, 254, 255
    files = {}


class WindowStage:
    """A stage over a fixed random token stream; targets equal to -1 where mask says so."""

    def __init__(self, tokens, seq_len, mask=None):
        self.tokens, self.seq_len, self.mask = tokens, seq_len, mask
        self.calls = []

    def batch(self, first, count, device):
        self.calls.append((first, count))
        rows = torch.stack([self.tokens[(g * self.seq_len) % 4000:][:self.seq_len + 1] for g in range(first, first + count)])
        y = rows[:, 1:].clone()
        if self.mask is not None:
            y[self.mask(first, count)] = -1
        return rows[:, :-1], y

    def loss(self, model, batch):
        x, y = batch
        logits, _ = model(x)
        loss = F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=-1, reduction="sum")
        return loss, (y != -1).sum(), {"tokens": (y != -1).sum()}

    def evaluate(self, model, step):
        return {"val": float(step)}


def test_shared_loop_equals_a_plain_loop(tmp_path):
    """20 steps of fit (accumulation 2, clipping, warmup + cosine) against the loop written out by
    hand with the same data order and optimizer: same losses and weights to 1e-6."""
    tokens = torch.randint(0, 253, (4200,), generator=torch.Generator().manual_seed(0))
    args = run_args(str(tmp_path / "fit"), seq_len=32, batch_tokens=256, micro_batch=4, max_steps=20,
                    eval_every=100, lr=3e-3, warmup_steps=3, grad_clip=0.5)
    run = runs.Run(rank=0, world=1, device=torch.device("cpu"), dtype=torch.float32, ddp=False)
    model = small_model()
    stage = WindowStage(tokens, 32)
    fit(model, stage, args, ByteTokenizer(), run, {})
    fitted = losses(args.out)

    plain = small_model()
    data = WindowStage(tokens, 32)
    opt = make_optimizer(plain, args, torch.device("cpu"))
    for step in range(20):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args)
        total = 0.0
        for micro in range(2):  # 8 sequences a step, 4 per pass
            x, y = data.batch(step * 8 + micro * 4, 4, "cpu")
            logits, _ = plain(x)
            loss = F.cross_entropy(logits.flatten(0, 1), y.flatten()) / 2  # the mean of equal halves
            loss.backward()
            total += loss.item()
        torch.nn.utils.clip_grad_norm_(plain.parameters(), 0.5)
        opt.step()
        opt.zero_grad()
        assert fitted[step + 1] == pytest.approx(total, rel=1e-6, abs=1e-6), step
    for (name, a), b in zip(model.named_parameters(), plain.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6, msg=lambda m: f"{name}: {m}")
    assert stage.calls == data.calls
    assert json.loads(open(os.path.join(args.out, "log.jsonl")).readlines()[-1]) == {"step": 20, "val": 20.0}


def test_masked_terms_weigh_the_same_in_every_micro_batch(tmp_path):
    """With ignored targets (SFT), the step's loss is the mean over the terms of the whole step,
    not the mean of per-micro-batch means; a micro-batch with no term at all gives no NaN."""
    tokens = torch.randint(0, 253, (4200,), generator=torch.Generator().manual_seed(1))

    def mask(first, count):  # micro-batch 0: 3 of 32 targets per row kept; micro-batch 1: none
        m = torch.ones(count, 32, dtype=torch.bool)
        if first == 0:
            m[:, :3] = False
        return m

    args = run_args(str(tmp_path / "fit"), seq_len=32, batch_tokens=512, micro_batch=8, max_steps=1,
                    eval_every=100, lr=1e-3, grad_clip=0.0, warmup_steps=18)  # a small first step: Adam's g/|g| at
    # the smallest gradients amplifies the float rounding of micro-batches against one piece
    run = runs.Run(rank=0, world=1, device=torch.device("cpu"), dtype=torch.float32, ddp=False)
    model, reference = small_model(), small_model()
    fit(model, WindowStage(tokens, 32, mask), args, ByteTokenizer(), run, {})

    # One step of AdamW on the mean over the 24 kept targets, computed in one piece.
    x, y = WindowStage(tokens, 32, mask).batch(0, 8, "cpu")
    logits, _ = reference(x)
    loss = F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=-1)
    loss.backward()
    opt = make_optimizer(reference, args, torch.device("cpu"))
    for g in opt.param_groups:
        g["lr"] = lr_at(0, args)
    opt.step()
    assert losses(args.out)[1] == pytest.approx(loss.item(), rel=1e-6)
    rows = [json.loads(line) for line in open(os.path.join(args.out, "log.jsonl"))]
    assert rows[0]["tokens"] == 1.0  # a per-term metric: Σ tokens / Σ terms
    for a, b in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)

    # A step without one loss term leaves the weights alone (AdamW would still decay them).
    before = [p.detach().clone() for p in model.parameters()]
    args = run_args(str(tmp_path / "empty"), seq_len=32, batch_tokens=512, micro_batch=8, max_steps=1,
                    eval_every=100, lr=1e-3)
    fit(model, WindowStage(tokens, 32, lambda first, count: torch.ones(count, 32, dtype=torch.bool)),
              args, ByteTokenizer(), run, {})
    assert losses(args.out)[1] == 0.0
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), before))


# -----------------------------------------------------------------------------
# Starting from another checkpoint


def test_init_from_never_writes_into_its_source_and_inherits_its_settings(tmp_path, capsys):
    src = str(tmp_path / "src")
    train.main(SMALL_RUN + ["--out", src, "--max-steps", "2", "--eval-every", "2", "--lr", "0.002"])
    before = open(os.path.join(src, "ckpt/model.safetensors"), "rb").read()
    log_before = open(os.path.join(src, "log.jsonl")).read()
    capsys.readouterr()
    # No --out: a new directory beside the source run, never the source itself.
    train.main(["--init-from", os.path.join(src, "ckpt"), "--max-steps", "1", "--eval-every", "1",
                "--full-attention-idx", "1,3", "--rope-theta", "1e6", "--rope-local-theta", "10000"])
    printed = capsys.readouterr().out
    dst = src + "-cont"
    assert os.path.exists(os.path.join(dst, "ckpt/model.safetensors"))
    assert open(os.path.join(src, "ckpt/model.safetensors"), "rb").read() == before
    assert open(os.path.join(src, "log.jsonl")).read() == log_before
    assert "copied" in printed and "new 0" in printed and "dropped 0" in printed
    inherited = next(line for line in printed.splitlines() if "inherited from its lineage" in line)
    assert "lr 0.002" in inherited and "seq_len 64" in inherited
    loop = json.load(open(os.path.join(dst, "ckpt", "lineage.json")))["loop"]
    assert (loop["lr"], loop["seq_len"], loop["batch_tokens"], loop["max_steps"]) == (0.002, 64, 512, 1)
    assert loop["warmup_steps"] == 0  # derived from this run's --max-steps, not the source's 2 // 25
    assert lr_at(0, Loop(**{**loop, "out": dst})) == 0.002
    cfg = PLaMo2.from_hf(os.path.join(dst, "ckpt")).config
    assert cfg.full_attention_idx == [1, 3] and cfg.rope_theta == 1e6 and cfg.rope_local_theta == 10000

    with pytest.raises(SystemExit):  # --out the source run itself: refused before anything is written
        train.main(["--init-from", os.path.join(src, "ckpt"), "--out", src, "--max-steps", "1"])
    assert f"--out {src} contains --init-from" in capsys.readouterr().err
    assert open(os.path.join(src, "log.jsonl")).read() == log_before
    with pytest.raises(SystemExit):  # the default again: it holds the run just made, which is kept
        train.main(["--init-from", os.path.join(src, "ckpt"), "--max-steps", "1"])
    assert "which holds a run already: give --out" in capsys.readouterr().err
    # A checkpoint directory by another name (an export): the new run goes beside it.
    export = str(tmp_path / "export")
    os.rename(os.path.join(dst, "ckpt"), export)
    args = train.parse_args(["--init-from", export])
    train.settings(args)
    assert args.out == export + "-cont" and "out" not in args.given


def test_resume_fills_settings_an_older_run_did_not_record(tmp_path):
    out = str(tmp_path / "run")
    train.main(SMALL_RUN + ["--out", out, "--max-steps", "2", "--eval-every", "1", "--stop-at-step", "1"])
    path = os.path.join(out, "ckpt", "lineage.json")
    lineage = json.load(open(path))
    del lineage["settings"]["reset_at_bos"], lineage["loop"]["warmup_steps"]  # written before these existed
    json.dump(lineage, open(path, "w"))
    train.main(["--out", out, "--resume"])
    assert sorted(losses(out)) == [1, 2]


def tiny(**overrides):
    return PLaMo2(PLaMo2Config.from_preset("tiny", vocab_size=1024, **overrides))


def test_reuse_weights_copies_only_tensors_that_mean_the_same():
    base = tiny()
    # Shapes that match, layouts that do not: another split of qkv_proj's heads (4 x 64 -> 8 x 32
    # with the same total), another per-head z/x interleave of in_proj, another layer pattern.
    for other, differs in [(tiny(num_attention_heads=8, num_key_value_heads=4, hidden_size_per_head=32,
                                 mamba_num_heads=16), ["layers.1.mixer.qkv_proj.weight", "layers.0.mixer.in_proj.weight"]),
                           (tiny(mamba_step=4), ["layers.1.mixer.in_proj.weight", "layers.0.mlp.down_proj.weight"]),
                           (tiny(num_hidden_layers=2), ["layers.0.mlp.down_proj.weight", "layers.1.pre_mixer_norm.weight"])]:
        copied, new, dropped = train.reuse_weights(other, base)
        assert "embed_tokens.weight" in copied and "norm.weight" in copied
        for name in differs:
            assert name in new and name not in copied, name
    # Width: nothing of another width is copied, and the report says so.
    copied, new, dropped = train.reuse_weights(tiny(intermediate_size=512), base)
    assert "layers.0.mlp.gate_up_proj.weight" in new and "layers.0.mlp.gate_up_proj.weight" in dropped
    assert "layers.0.mixer.in_proj.weight" in copied
    # An explicit map: the first two layers of a half-depth model from layers 2 and 3.
    half = tiny(num_hidden_layers=2)
    rename = {n: n.replace("layers.0.", "layers.2.").replace("layers.1.", "layers.3.")
              for n in half.state_dict() if n.startswith("layers.")}
    copied, new, dropped = train.reuse_weights(half, base, rename)
    assert not new and "layers.0.mlp.down_proj.weight" in dropped
    assert torch.equal(half.layers[0].mixer.in_proj.weight, base.layers[2].mixer.in_proj.weight)
    with pytest.raises(ValueError, match="shapes"):
        train.reuse_weights(tiny(intermediate_size=512), base, {"layers.0.mlp.down_proj.weight": "layers.0.mlp.down_proj.weight"})


# -----------------------------------------------------------------------------
# Errors


def test_clear_errors(tmp_path, capsys):
    run = str(tmp_path / "run")
    train.main(SMALL_RUN + ["--out", run, "--max-steps", "1", "--eval-every", "1"])
    afile, empty = tmp_path / "afile", tmp_path / "empty"
    afile.write_text("x")
    empty.mkdir()
    for argv, message in [
        (["--size", "huge"], "unknown size 'huge'"),
        (["--out", str(tmp_path / "none"), "--resume"], "no checkpoint at"),
        (SMALL_RUN + ["--out", str(tmp_path / "x"), "--data", str(empty)], "holds no text"),
        (["--out", str(tmp_path / "y"), "--init-from", str(tmp_path / "missing")], "no checkpoint directory"),
        (SMALL_RUN + ["--out", str(tmp_path / "y"), "--init-from", run], "--init-from keeps the checkpoint's tokenizer"),
        (SMALL_RUN + ["--out", str(tmp_path / "z"), "--device", "tpu9"], "unknown device 'tpu9'"),
        (SMALL_RUN + ["--out", str(tmp_path / "z"), "--eval-every", "0"], "--eval-every: must be a positive integer"),
        (["--out", run, "--resume", "--lr", "0.1"], "--lr 0.1 (the run's: 0.003)"),
        (SMALL_RUN + ["--out", str(tmp_path / "z"), "--fsdp"], "start the run with torchrun"),
        (SMALL_RUN + ["--out", str(tmp_path / "z"), "--dtype", "float16"], "float16 training needs loss scaling"),
        (SMALL_RUN + ["--out", str(afile)], "is a file"),
        (SMALL_RUN + ["--out", str(tmp_path / "z"), "--full-attention-idx", "0,1"], "names Mamba layers [0]"),
        (SMALL_RUN + ["--out", str(tmp_path / "z"), "--full-attention-idx", "one"], "takes layer numbers"),
    ]:
        with pytest.raises(SystemExit):
            train.main(argv)
        err = capsys.readouterr().err
        assert message in err.strip().splitlines()[-1], (argv, err)  # (argparse prints its usage first)
        assert "Traceback" not in err
    train.main(["--out", run, "--resume", "--lr", "0.003", "--max-steps", "2"])  # the run's own value is fine


def test_nan_loss_stops_and_keeps_the_last_checkpoint(tmp_path, capsys, monkeypatch):
    out = str(tmp_path / "run")
    train.main(SMALL_RUN + ["--out", out, "--max-steps", "2", "--eval-every", "2"])
    before = open(os.path.join(out, "ckpt/model.safetensors"), "rb").read()
    forward = PLaMo2.forward
    calls = {"n": 0}

    def poisoned(self, idx, *args, **kwargs):
        logits, loss = forward(self, idx, *args, **kwargs)
        calls["n"] += self.training
        return (logits * float("nan") if self.training and calls["n"] >= 3 else logits), loss

    monkeypatch.setattr(PLaMo2, "forward", poisoned)
    with pytest.raises(SystemExit):
        train.main(["--out", out, "--resume", "--max-steps", "4"])
    err = capsys.readouterr().err
    assert "nan at step" in err and "ckpt (step 2)" in err
    assert open(os.path.join(out, "ckpt/model.safetensors"), "rb").read() == before


def test_reset_at_bos_marks_documents(tmp_path):
    stage = train.Pretraining.__new__(train.Pretraining)
    stage.reset_at_bos, stage.tok = True, argparse.Namespace(bos_id=7)
    x = torch.tensor([[3, 7, 4, 4, 7, 7, 5]])
    assert stage.documents(x).tolist() == [[0, 1, 1, 1, 2, 3, 3]]
    stage.reset_at_bos = False
    assert stage.documents(x) is None


def test_flops_count_matmuls_only():
    """An untied embedding is a lookup, not a matmul: untying adds no FLOPs (the head is counted either way)."""
    tied = PLaMo2Config.from_preset("tiny")
    untied = PLaMo2Config.from_preset("tiny", tie_word_embeddings=False)
    assert flops_per_token(tied, 256) == flops_per_token(untied, 256)
    H, V = tied.hidden_size, tied.vocab_size
    assert flops_per_token(tied, 256) > 6 * V * H


def test_checkpoint_swap_survives_a_kill(tmp_path):
    tok = tokenizer.train_tokenizer(corpus.generate_corpus(target_bytes=30_000).train, 300)
    model = PLaMo2(PLaMo2Config.from_preset("tiny", vocab_size=1024, **special_token_ids(tok)))
    path = str(tmp_path / "ckpt")
    plamo2.save_checkpoint(path, model, tok, {"step": 1})
    plamo2.save_checkpoint(path, model, tok, {"step": 2})
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]
    os.replace(path, path + ".old")  # killed between the two renames
    assert runs.find_checkpoint(path) == path + ".old"
    with pytest.raises(ValueError, match="does not match the tokenizer"):  # the ids config.json would carry
        plamo2.save_checkpoint(path, PLaMo2(PLaMo2Config.from_preset("tiny", vocab_size=1024)), tok, {"step": 3})


def test_lr_schedules():
    args = run_args("x", max_steps=100, lr=1.0, warmup_steps=10)
    lrs = [lr_at(s, args) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))  # cosine never rises after warmup
    assert lr_at(100, args) == pytest.approx(0.1)
    args.schedule = "wsd"
    assert lr_at(50, args) == 1.0 and lr_at(100, args) == pytest.approx(0.1)


def test_batches_depend_only_on_position():
    tokens = torch.arange(1000).numpy().astype("uint16")
    a, b = data.Batches(tokens, 10, seed=1), data.Batches(tokens, 10, seed=1)
    x1, y1 = a.get(95, 10, "cpu")  # crosses into the second epoch
    b.get(0, 3, "cpu")
    x2, y2 = b.get(95, 10, "cpu")
    assert torch.equal(x1, x2) and torch.equal(y1[:, :-1], x1[:, 1:])
    first_epoch = torch.cat([a.get(g, 1, "cpu")[0] for g in range(99)])
    assert len(set(first_epoch[:, 0].tolist())) == 99  # every window once per epoch
