"""The promises every script keeps with bad input: one clear sentence before any work, nothing that
existed before a command changed unless the user said so, nothing half-written that looks
complete, no NaN saved as a model, and Ctrl-C that loses at most the step under way."""
import fcntl
import hashlib
import io
import json
import os
import pickle
import shutil
import signal
import sys

import pytest
import torch

import infer
import merge
import plamo2
import posttrain
import prune
import tasks
import runs
import train
from test_train import SMALL_RUN, losses


def digest(path):
    """sha256 of every file under path, by relative name: what 'unchanged' means here."""
    out = {}
    for d, _, files in os.walk(path):
        for f in files:
            with open(os.path.join(d, f), "rb") as fh:
                out[os.path.relpath(os.path.join(d, f), path)] = hashlib.sha256(fh.read()).hexdigest()
    return out


def fails(main, argv, capsys, message):
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code != 0 and message in err, (argv, err)
    assert "Traceback" not in err
    return err


@pytest.fixture(scope="module")
def src(base, tmp_path_factory):
    """A copy of the base run, with a chat checkpoint beside it (the base's weights, marked chat)."""
    root = tmp_path_factory.mktemp("src")
    run = str(root / "run")
    shutil.copytree(os.path.dirname(base), run)
    chat = str(root / "chat")
    shutil.copytree(os.path.join(run, "ckpt"), chat)
    config = json.load(open(os.path.join(chat, "config.json")))
    json.dump({**config, "chat_template": plamo2.CHAT_TEMPLATE}, open(os.path.join(chat, "config.json"), "w"))
    return os.path.join(run, "ckpt"), chat


def spellings(ckpt, tmp_path):
    """Outputs that are the checkpoint, or inside it, or contain it, spelled in ways a path compare misses."""
    link = str(tmp_path / ("link-" + os.path.basename(ckpt)))
    if not os.path.lexists(link):
        os.symlink(ckpt, link)
    up = os.path.join(ckpt, "..", os.path.basename(ckpt))
    return [link, ckpt + "/", up, os.path.join(ckpt, "sub"), os.path.join(link, "sub"), os.path.dirname(ckpt)]


def test_no_spelling_of_a_path_lets_a_writer_touch_its_input(src, data, tmp_path, capsys):
    ckpt, chat = src
    before = {p: digest(os.path.dirname(p)) for p in (ckpt, chat)}
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("\n".join(json.dumps({"prompt": [{"role": "user", "content": f"q{i}"}], "chosen": "a",
                                            "rejected": "b"}) for i in range(4)) + "\n")
    for out in spellings(ckpt, tmp_path):
        for main, argv in [(train.main, ["--init-from", ckpt, "--out", out, "--max-steps", "1"]),
                           (prune.main, ["--ckpt", ckpt, "--out", out, "--num-hidden-layers", "2"]),
                           (posttrain.main, ["sft", "--ckpt", ckpt, "--data", data, "--out", out]),
                           (tasks.main, ["data", "--ckpt", ckpt, "--out", out]),
                           (merge.main, ["--models", ckpt, ckpt, "--method", "linear", "--out", out]),
                           (infer.main, ["--ckpt", ckpt, "--quant", "int8", "--out", out]),
                           (infer.main, ["--ckpt", ckpt, "--export-hf", out])]:
            fails(main, argv, capsys, "--")  # "--out X is / lies inside / contains --ckpt Y"
    for out in spellings(chat, tmp_path):
        fails(posttrain.main, ["dpo", "--ckpt", chat, "--data", str(pairs), "--out", out], capsys, "--ckpt")
    for out in spellings(chat, tmp_path)[:-1]:  # (a file beside the checkpoint, in its parent, is no harm)
        fails(posttrain.main, ["pairs", "--ckpt", chat, "--data", data, "--out", os.path.join(out, "p.jsonl")],
              capsys, "--ckpt")
    assert {p: digest(os.path.dirname(p)) for p in (ckpt, chat)} == before  # byte for byte


def test_outputs_that_cannot_be_written_are_one_sentence(src, data, tmp_path, capsys):
    ckpt, chat = src
    afile = tmp_path / "afile"
    afile.write_text("x")
    adir = tmp_path / "adir"
    adir.mkdir()
    for main, argv, message in [
        (train.main, SMALL_RUN + ["--out", str(afile)], "is a file"),
        (train.main, SMALL_RUN + ["--out", str(afile / "sub")], "is a file"),
        (tasks.main, ["data", "--ckpt", ckpt, "--out", str(afile)], "is a file"),
        (tasks.main, ["eval", "--ckpt", ckpt, "--data", data, "--json", str(adir)], "is a directory"),
        (posttrain.main, ["pairs", "--ckpt", chat, "--data", data, "--out", str(adir)], "is a directory"),
        (merge.main, ["--models", ckpt, ckpt, "--method", "linear", "--out", str(afile)], "is a file"),
        (infer.main, ["--ckpt", ckpt, "--probe", "recall", "--json", str(adir)], "is a directory"),
    ]:
        fails(main, argv, capsys, message)
    if os.geteuid() != 0:  # root writes anywhere, whatever the mode says
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o500)
        fails(train.main, SMALL_RUN + ["--out", str(ro / "run")], capsys, "permission denied")


def test_existing_work_is_replaced_only_when_asked(src, tmp_path, capsys):
    ckpt, _ = src
    run = os.path.dirname(ckpt)
    before = digest(run)
    fails(train.main, SMALL_RUN + ["--out", run, "--lr", "0.01"], capsys, "holds a run already")
    fails(train.main, SMALL_RUN + ["--out", run, "--lr", "nan"], capsys, "--lr: must be a positive number")
    assert digest(run) == before  # not even data/ was rewritten
    q = str(tmp_path / "q8")
    infer.main(["--ckpt", ckpt, "--quant", "int8", "--out", q])
    fails(infer.main, ["--ckpt", ckpt, "--quant", "int4", "--out", q], capsys, "--overwrite")
    fails(infer.main, ["--ckpt", ckpt, "--export-hf", run], capsys, "")  # another run's directory
    m = str(tmp_path / "m")
    merge.main(["--models", ckpt, ckpt, "--method", "linear", "--out", m])
    fails(merge.main, ["--models", ckpt, ckpt, "--method", "linear", "--out", m], capsys, "--overwrite")
    merge.main(["--models", ckpt, ckpt, "--method", "linear", "--out", m, "--overwrite"])
    # a quantized checkpoint written into a run's ckpt/ would sit beside its train state: refused
    other = str(tmp_path / "other")
    train.main(SMALL_RUN + ["--out", other, "--max-steps", "1"])
    fails(infer.main, ["--ckpt", ckpt, "--quant", "int8", "--out", other], capsys, "training run")
    fails(infer.main, ["--ckpt", ckpt, "--quant", "int8", "--out", os.path.join(other, "ckpt")], capsys, "--overwrite")
    infer.main(["--ckpt", ckpt, "--quant", "int8", "--out", os.path.join(other, "ckpt"), "--overwrite"])
    assert not os.path.exists(os.path.join(other, "ckpt", "train_state.pt"))  # nothing stale beside new weights
    # --overwrite replaces a run; a run stopped before its first checkpoint needs nothing at all
    train.main(SMALL_RUN + ["--out", other, "--max-steps", "1", "--overwrite"])
    stopped = str(tmp_path / "stopped")
    os.makedirs(os.path.join(stopped, "data"))
    open(os.path.join(stopped, "log.jsonl"), "w").write('{"step": 1, "loss": 7.0}\n')
    train.main(SMALL_RUN + ["--out", stopped, "--max-steps", "1"])


def test_a_second_writer_is_refused_while_the_first_lives(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    with open(out / ".lock", "a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)  # another process's run, as far as this one can tell
        fails(train.main, SMALL_RUN + ["--out", str(out)], capsys, "being written by another process")
    train.main(SMALL_RUN + ["--out", str(out), "--max-steps", "1"])  # once it ends, the directory is free


def test_nothing_non_finite_is_saved_or_loaded(src, tmp_path, capsys, monkeypatch):
    ckpt, _ = src
    nan = str(tmp_path / "nan")
    shutil.copytree(ckpt, nan)
    model, tok = plamo2.load(nan)
    with torch.no_grad():
        model.layers[0].mlp.down_proj.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or infinite"):
        plamo2.save_checkpoint(str(tmp_path / "x"), model, tok)
    assert not os.path.exists(str(tmp_path / "x")) and not os.path.exists(str(tmp_path / "x.tmp"))
    model.save_hf(nan)  # written behind save_checkpoint's back
    fails(infer.main, ["--ckpt", nan, "--prompt", "a"], capsys, "NaN or infinite")
    # weights that turn NaN in training (a loss that stays finite) are never saved as good
    out = str(tmp_path / "run")
    train.main(SMALL_RUN + ["--out", out, "--max-steps", "4", "--eval-every", "2", "--stop-at-step", "2"])
    before = open(os.path.join(out, "ckpt", "model.safetensors"), "rb").read()
    step = torch.optim.AdamW.step

    def poisoned(self, *a, **k):
        step(self, *a, **k)
        with torch.no_grad():
            self.param_groups[0]["params"][0].mul_(float("nan"))
    monkeypatch.setattr(torch.optim.AdamW, "step", poisoned)
    err = fails(train.main, ["--out", out, "--resume", "--eval-every", "1"], capsys, "NaN or infinite")
    assert "last good checkpoint" in err and "(step 2)" in err
    assert open(os.path.join(out, "ckpt", "model.safetensors"), "rb").read() == before


@pytest.mark.parametrize("edit, message", [
    (lambda c: {**c, "num_hidden_layers": 10**6}, "config.json does not match its weights"),
    (lambda c: {**c, "mamba_chunk_size": 10**7}, "mamba_chunk_size must be at most 4096"),
    (lambda c: {**c, "vocab_size": 7}, "config.json does not match its weights"),
])
def test_a_config_that_does_not_fit_its_weights_is_refused_before_building(src, tmp_path, capsys, edit, message):
    ckpt, _ = src
    bad = str(tmp_path / "bad")
    shutil.copytree(ckpt, bad)
    config = json.load(open(os.path.join(bad, "config.json")))
    json.dump(edit(config), open(os.path.join(bad, "config.json"), "w"))
    fails(infer.main, ["--ckpt", bad, "--prompt", "a"], capsys, message)


def test_bad_files_are_one_sentence(src, data, tmp_path, capsys):
    ckpt, chat = src
    # integer tensors where floats belong
    ints = str(tmp_path / "ints")
    shutil.copytree(ckpt, ints)
    from safetensors.torch import load_file, save_file
    w = load_file(os.path.join(ints, "model.safetensors"))
    w["model.norm.weight"] = w["model.norm.weight"].long()
    save_file(w, os.path.join(ints, "model.safetensors"))
    fails(infer.main, ["--ckpt", ints, "--prompt", "a"], capsys, "not floating point")
    # a run directory whose save was killed: ckpt.tmp is never taken for a checkpoint
    killed = tmp_path / "killed"
    shutil.copytree(ckpt, killed / "ckpt.tmp")
    fails(posttrain.main, ["sft", "--ckpt", str(killed), "--data", data, "--out", str(tmp_path / "s")], capsys,
          "no finished checkpoint")
    # scores files that are not: a list, a dict missing keys, garbage, a pickle that runs code
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))
    bad_scores = {"list.pt": lambda p: torch.save([1, 2], p), "keys.pt": lambda p: torch.save({"mlp": []}, p),
                  "garbage.pt": lambda p: open(p, "wb").write(b"\x00garbage"),
                  "evil.pt": lambda p: pickle.dump(Evil(), open(p, "wb"))}
    for name, write in bad_scores.items():
        write(str(tmp_path / name))
        fails(prune.main, ["--ckpt", ckpt, "--out", str(tmp_path / f"p-{name}"), "--num-hidden-layers", "2",
                           "--scores", str(tmp_path / name)], capsys, "--scores")
    assert not os.path.exists(tmp_path / "pwned")
    # a held-out facts file of the wrong types, evaluation examples with a malformed check
    run = tmp_path / "run"
    shutil.copytree(os.path.dirname(ckpt), run)
    lineage = plamo2.read_lineage(str(run / "ckpt"))
    facts = os.path.join(lineage["text"], "heldout_facts.json")
    saved = open(facts).read()
    try:
        json.dump({"heldout": 3, "world": "big"}, open(facts, "w"))
        fails(tasks.main, ["data", "--ckpt", str(run / "ckpt"), "--out", str(tmp_path / "d")], capsys,
              "is not the held-out facts file")
    finally:
        open(facts, "w").write(saved)
    for line, message in [({"task": "qa", "lang": "ja", "messages": [], "check": {"type": "fact"}}, "example 1 is not"),
                          ({"task": "qa", "lang": "ja", "messages": [], "check": 3}, "example 1 is not"),
                          ({"messages": [{"role": "user", "content": "q"}]}, "conversation 1 is not")]:
        f = tmp_path / "eval.jsonl"
        f.write_text(json.dumps(line) + "\n")
        fails(tasks.main, ["eval", "--ckpt", ckpt, "--data", str(f)], capsys, message)
    # numbers that are not: NaN, infinity, negative temperatures
    for main, argv in [(infer.main, ["--ckpt", ckpt, "--prompt", "a", "--temperature", "nan"]),
                       (posttrain.main, ["pairs", "--ckpt", chat, "--out", str(tmp_path / "p.jsonl"), "--temperature", "-1"]),
                       (merge.main, ["--models", ckpt, ckpt, "--method", "task_arithmetic", "--base", ckpt,
                                     "--lambda", "inf", "--out", str(tmp_path / "m")]),
                       (train.main, SMALL_RUN + ["--out", str(tmp_path / "t"), "--grad-clip", "-1"]),
                       (train.main, SMALL_RUN + ["--out", str(tmp_path / "t"), "--weight-decay", "nan"]),
                       (train.main, SMALL_RUN + ["--out", str(tmp_path / "t"), "--min-lr-frac", "nan"])]:
        fails(main, argv, capsys, "must be")
    # a quantized checkpoint is not merged
    q = str(tmp_path / "q4")
    infer.main(["--ckpt", ckpt, "--quant", "int4", "--out", q])
    fails(merge.main, ["--models", q, q, "--method", "linear", "--out", str(tmp_path / "mq")], capsys,
          "quantized checkpoint")


def test_sizes_that_cannot_fit_are_refused_before_allocating(tmp_path, capsys):
    fails(train.main, SMALL_RUN + ["--out", str(tmp_path / "r"), "--seq-len", "120000", "--batch-tokens", "1920000",
                                   "--micro-batch", "16"], capsys, "lower --micro-batch or --seq-len")


def test_a_broken_log_line_names_the_file(tmp_path, capsys):
    out = str(tmp_path / "run")
    train.main(SMALL_RUN + ["--out", out, "--max-steps", "2", "--eval-every", "1", "--stop-at-step", "1"])
    with open(os.path.join(out, "log.jsonl"), "a") as f:
        f.write("{not json\n")
    fails(train.main, ["--out", out, "--resume"], capsys, "log.jsonl: line 4 is not JSON")


def test_binary_bytes_on_stdin_end_the_chat(src, monkeypatch, capsys):
    ckpt, chat = src
    for c in (ckpt, chat):
        monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"\x00\xff\xfe\x80 binary \xc3\n\xff\xff")))
        infer.main(["--ckpt", c, "--chat", "--max-new-tokens", "4"])
        assert "> " in capsys.readouterr().out


def test_ctrl_c_saves_the_step_and_resume_equals_the_uninterrupted_run(tmp_path, capsys, monkeypatch):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    run = SMALL_RUN + ["--max-steps", "6", "--eval-every", "100"]
    train.main(run + ["--out", a])
    calls = {"n": 0}
    loss = train.Pretraining.loss

    def interrupted(self, model, batch):
        calls["n"] += 1
        if calls["n"] == 5:  # during step 3 (2 micro-batches a step): as if Ctrl-C were pressed
            os.kill(os.getpid(), signal.SIGINT)
        return loss(self, model, batch)
    monkeypatch.setattr(train.Pretraining, "loss", interrupted)
    with pytest.raises(SystemExit) as e:
        train.main(run + ["--out", b])
    assert e.value.code == 130
    err = capsys.readouterr().err
    assert "interrupted at step 3" in err and f"python train.py --out {b} --resume" in err
    assert sorted(losses(b)) == [1, 2, 3] and runs.load_train_state(os.path.join(b, "ckpt"))["step"] == 3
    monkeypatch.setattr(train.Pretraining, "loss", loss)
    train.main(["--out", b, "--resume"])
    assert losses(b) == losses(a)


def test_checkpoint_files_get_the_ordinary_mode(src, tmp_path):
    ckpt, _ = src
    old = os.umask(0o022)
    try:
        model, tok = plamo2.load(ckpt)
        out = str(tmp_path / "ckpt")
        plamo2.save_checkpoint(out, model, tok, {"stage": "test"}, {"step": 0})
        infer.main(["--ckpt", ckpt, "--quant", "int8", "--out", str(tmp_path / "q")])
        for d in (out, str(tmp_path / "q")):
            for f in os.listdir(d):
                assert os.stat(os.path.join(d, f)).st_mode & 0o777 == 0o644, f
    finally:
        os.umask(old)
