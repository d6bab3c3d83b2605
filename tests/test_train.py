import json
import os
import subprocess
import sys

import pytest
import torch

import corpus
import train
from plamo2 import PLaMo2, PLaMo2Config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A run small enough for the test suite: 300 KB of corpus, 64-token sequences, 8 per step.
SMALL_RUN = ["--size", "tiny", "--corpus-bytes", "300000", "--vocab-size", "1024", "--seq-len", "64",
             "--batch-tokens", "512", "--micro-batch", "4", "--eval-tokens", "1024"]


def losses(out):
    """The train loss of every step in the log; for a step logged twice (resumed), the last."""
    with open(os.path.join(out, "log.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def test_train_end_to_end(tmp_path, capsys):
    out = str(tmp_path / "run")
    train.main(SMALL_RUN + ["--out", out, "--max-steps", "6", "--eval-every", "3"])
    printed = capsys.readouterr().out
    assert "unigram baseline" in printed and "val" in printed and "MFU" in printed
    assert sorted(losses(out)) == list(range(1, 7))
    for name in ("log.jsonl", "loss.png", "ckpt/config.json", "ckpt/model.safetensors",
                 "ckpt/tokenizer.tiktoken", "ckpt/train_state.pt"):
        assert os.path.exists(os.path.join(out, name)), name
    model, tok = train.load_checkpoint(os.path.join(out, "ckpt"), "cpu")
    assert model.config.vocab_size == tok.vocab_size == 1024
    assert torch.load(os.path.join(out, "ckpt/train_state.pt"), weights_only=True)["step"] == 6


def test_resume_reproduces_an_uninterrupted_run(tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    train.main(SMALL_RUN + ["--out", a, "--max-steps", "6", "--eval-every", "3"])
    train.main(SMALL_RUN + ["--out", b, "--max-steps", "6", "--eval-every", "3", "--stop-at-step", "3"])
    assert sorted(losses(b)) == [1, 2, 3]
    train.main(["--out", b, "--resume"])
    assert losses(b) == losses(a)  # bit for bit: same data position, optimizer state and schedule


def torchrun(args, port):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
                    os.path.join(ROOT, "train.py")] + args, check=True, env=env, cwd=ROOT,
                   stdout=subprocess.DEVNULL, timeout=280)


def test_two_processes_match_one(tmp_path):
    """DDP, and FSDP stopped and resumed halfway, reproduce one process with the same global batch."""
    one, ddp, fsdp = str(tmp_path / "one"), str(tmp_path / "ddp"), str(tmp_path / "fsdp")
    args = SMALL_RUN + ["--max-steps", "4", "--eval-every", "2"]
    train.main(args + ["--out", one])
    torchrun(args + ["--out", ddp], 29533)
    torchrun(args + ["--out", fsdp, "--fsdp", "--stop-at-step", "2"], 29534)
    torchrun(["--out", fsdp, "--resume"], 29535)
    w1 = PLaMo2.from_hf(os.path.join(one, "ckpt")).state_dict()
    for run in (ddp, fsdp):
        l1, l2 = losses(one), losses(run)
        assert sorted(l2) == [1, 2, 3, 4]
        for s in l1:
            assert l2[s] == pytest.approx(l1[s], rel=1e-4, abs=1e-5)
        w2 = PLaMo2.from_hf(os.path.join(run, "ckpt")).state_dict()
        for k in w1:
            torch.testing.assert_close(w2[k], w1[k], atol=1e-5, rtol=1e-4)


def test_init_from_reuses_matching_weights(tmp_path, capsys):
    src = str(tmp_path / "src")
    train.main(SMALL_RUN + ["--out", src, "--max-steps", "2", "--eval-every", "2"])
    capsys.readouterr()
    # Long-context continual pre-training: every tensor still fits.
    dst = str(tmp_path / "dst")
    train.main(SMALL_RUN + ["--out", dst, "--max-steps", "1", "--eval-every", "1", "--seq-len", "128",
                            "--init-from", os.path.join(src, "ckpt"), "--full-attention-idx", "1,3",
                            "--rope-theta", "1e6", "--window", "256"])
    printed = capsys.readouterr().out
    assert "copied" in printed and "new 0" in printed and "dropped 0" in printed
    cfg = PLaMo2.from_hf(os.path.join(dst, "ckpt")).config
    assert cfg.full_attention_idx == [1, 3] and cfg.rope_theta == 1e6 and cfg.attention_window_size == 256

    # A different width: nothing but the shape-independent tensors fit, and the report says so.
    small = PLaMo2(PLaMo2Config.from_preset("tiny", vocab_size=1024))
    narrow = PLaMo2(PLaMo2Config.from_preset("tiny", vocab_size=1024, intermediate_size=512))
    copied, new, dropped = train.reuse_weights(narrow, small)
    assert "layers.0.mlp.gate_up_proj.weight" in new and "layers.0.mlp.gate_up_proj.weight" in dropped
    assert "layers.0.mixer.in_proj.weight" in copied
    assert torch.equal(narrow.layers[0].mixer.in_proj.weight, small.layers[0].mixer.in_proj.weight)


def test_clear_errors(tmp_path, capsys):
    for argv, message in [
        (["--size", "huge"], "unknown size 'huge'"),
        (["--out", str(tmp_path / "none"), "--resume"], "no checkpoint at"),
        (SMALL_RUN + ["--out", str(tmp_path / "x"), "--data", str(tmp_path)], "holds no text"),
        (SMALL_RUN + ["--out", str(tmp_path / "y"), "--init-from", str(tmp_path / "missing")], "no checkpoint directory"),
        (SMALL_RUN + ["--out", str(tmp_path / "z"), "--device", "tpu9"], "unknown device 'tpu9'"),
        (SMALL_RUN + ["--out", str(tmp_path / "z"), "--eval-every", "0"], "--eval-every must be a positive integer"),
    ]:
        with pytest.raises(SystemExit):
            train.main(argv)
        assert message in capsys.readouterr().err


def test_nan_loss_stops_and_keeps_the_last_checkpoint(tmp_path, capsys, monkeypatch):
    out = str(tmp_path / "run")
    train.main(SMALL_RUN + ["--out", out, "--max-steps", "2", "--eval-every", "2"])
    before = open(os.path.join(out, "ckpt/model.safetensors"), "rb").read()
    forward = PLaMo2.forward
    calls = {"n": 0}

    def poisoned(self, idx, targets=None, cache=None):
        logits, loss = forward(self, idx, targets, cache)
        calls["n"] += targets is not None
        return logits, (loss * float("nan") if loss is not None and calls["n"] >= 3 else loss)

    monkeypatch.setattr(PLaMo2, "forward", poisoned)
    with pytest.raises(SystemExit):
        train.main(["--out", out, "--resume", "--max-steps", "4"])
    err = capsys.readouterr().err
    assert "nan at step" in err and "ckpt (step 2)" in err
    assert open(os.path.join(out, "ckpt/model.safetensors"), "rb").read() == before


def test_checkpoint_swap_survives_a_kill(tmp_path):
    model = PLaMo2(PLaMo2Config.from_preset("tiny", vocab_size=1024))
    tok = train.train_tokenizer(corpus.generate_corpus(target_bytes=30_000).train, 300)
    path = str(tmp_path / "ckpt")
    train.save_checkpoint(path, model, tok, {"step": 1})
    train.save_checkpoint(path, model, tok, {"step": 2})
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]
    os.replace(path, path + ".old")  # killed between the two renames
    assert train.find_checkpoint(path) == path + ".old"


def test_lr_schedules():
    args = train.parse_args(["--max-steps", "100", "--lr", "1.0", "--warmup-steps", "10"])
    lrs = [train.lr_at(s, args) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))  # cosine never rises after warmup
    assert train.lr_at(100, args) == pytest.approx(0.1)
    args.schedule = "wsd"
    assert train.lr_at(50, args) == 1.0 and train.lr_at(100, args) == pytest.approx(0.1)


def test_batches_depend_only_on_position():
    tokens = torch.arange(1000).numpy().astype("uint16")
    a, b = train.Batches(tokens, 10, seed=1), train.Batches(tokens, 10, seed=1)
    x1, y1 = a.get(95, 10, "cpu")  # crosses into the second epoch
    b.get(0, 3, "cpu")
    x2, y2 = b.get(95, 10, "cpu")
    assert torch.equal(x1, x2) and torch.equal(y1[:, :-1], x1[:, 1:])
    first_epoch = torch.cat([a.get(g, 1, "cpu")[0] for g in range(99)])
    assert len(set(first_epoch[:, 0].tolist())) == 99  # every window once per epoch
