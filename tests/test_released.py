"""Every stage, from its command line, on a checkpoint in the released PLaMo 2 layout (tests/released.py:
PFN's config keys, tokenizer.jsonl, bf16 shards with an index, no lineage) and the user's own data.
Each output loads again, keeps tokenizer.jsonl and the companion files byte for byte, and keeps
the config.json keys our model does not use."""
import json
import os
import re

import pytest
import torch

import data
import infer
import merge
import plamo2
import posttrain
import prune
import tasks
import train
from released import CONFIG
from tokenizer import CHAT_TEMPLATE, RELEASED_FILES, load_tokenizer, render_chat

SMALL = ["--seq-len", "32", "--batch-tokens", "64", "--micro-batch", "2", "--eval-every", "2"]


def same_companions(src, out):
    """The released files, byte for byte, and PFN's config keys as they were."""
    for name in RELEASED_FILES:
        with open(os.path.join(src, name), "rb") as a, open(os.path.join(out, name), "rb") as b:
            assert a.read() == b.read(), name
    config = json.load(open(os.path.join(out, "config.json")))
    for k in ("linear_type", "n_expert", "sparse_step", "use_predefined_initial_state", "auto_map", "tokenizer_class",
              "fp8_accum_dtype", "capacity_factor"):
        assert config[k] == CONFIG[k], k


@pytest.fixture(scope="module")
def cpt(released, user, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("cpt") / "cpt")
    train.main(["--init-from", released, "--data", user["text"], "--out", out, "--max-steps", "2", *SMALL])
    return out


def test_continual_pretraining_on_your_text_with_the_released_tokenizer(released, user, cpt):
    model, tok = plamo2.load(os.path.join(cpt, "ckpt"))
    assert isinstance(tok, type(load_tokenizer(released)))
    same_companions(released, os.path.join(cpt, "ckpt"))
    lineage = plamo2.read_lineage(os.path.join(cpt, "ckpt"))
    assert lineage["stage"] == "cpt" and lineage["parent"] == os.path.realpath(released)
    manifest, train_tokens, _, data_tok = data.open_prepared(lineage["text"], tok)
    assert manifest["tokenizer"]["kind"] == "PlamoTokenizer" and max(train_tokens[:]) < tok.vocab_size
    assert data.fingerprint(data_tok) == data.fingerprint(tok)


def test_sft_dpo_eval_on_your_files(released, user, cpt, tmp_path, capsys):
    sft = str(tmp_path / "sft")
    posttrain.main(["sft", "--ckpt", released, "--data", user["conversations"], "--out", sft, "--max-steps", "2",
                    "--stop-at-step", "1", *SMALL])
    printed = capsys.readouterr().out
    assert "no lineage" in printed and "lr 2e-05" not in printed  # a tiny model: the tiny size's rate
    posttrain.main(["sft", "--out", sft, "--resume"])  # save, resume and load again
    model, tok = plamo2.load(os.path.join(sft, "ckpt"))
    assert model.config.chat_template == CHAT_TEMPLATE
    ids, _ = render_chat(tok, [{"role": "user", "content": "hi"}], generation_prompt=True)
    assert ids[1] == tok.special["<|plamo:op|>"]  # the released vocabulary's form of the template
    same_companions(released, os.path.join(sft, "ckpt"))
    dpo = str(tmp_path / "dpo")
    posttrain.main(["dpo", "--ckpt", sft, "--data", user["pairs"], "--out", dpo, "--max-steps", "2", "--eval-every", "2"])
    plamo2.load(os.path.join(dpo, "round1", "ckpt"))
    same_companions(released, os.path.join(dpo, "round1", "ckpt"))
    capsys.readouterr()
    out = str(tmp_path / "eval.json")
    tasks.main(["eval", "--ckpt", os.path.join(dpo, "round1"), "--data", user["eval"], "--json", out,
                "--max-new-tokens", "4"])
    printed = capsys.readouterr().out
    assert re.search(r"all\s+6\s", printed) and "loss (nats/token)" in printed
    result = json.load(open(out))
    assert set(result["table"]) == {"all", "ja", "en"} and len(result["items"]) == 6
    assert all(i["loss"] > 0 and 0 <= i["chrf"] <= 100 for i in result["items"])


def test_prune_and_distil_on_your_text(released, user, tmp_path):
    out = str(tmp_path / "pruned")
    prune.main(["--ckpt", released, "--data", user["text"], "--out", out, "--intermediate-size", "48",
                "--mamba-num-heads", "1", "--calib-samples", "4", "--distill-steps", "2", *SMALL])
    for d in ("pruned", "ckpt"):
        model, _ = plamo2.load(os.path.join(out, d))
        assert model.config.intermediate_size == 48 and model.config.mamba_num_heads == 1
        same_companions(released, os.path.join(out, d))


def test_merge_quantize_export(released, cpt, tmp_path):
    m = str(tmp_path / "merged")
    merge.main(["--models", released, cpt, "--method", "linear", "--out", m])
    plamo2.load(os.path.join(m, "ckpt"))
    same_companions(released, os.path.join(m, "ckpt"))
    q = str(tmp_path / "int8")
    infer.main(["--ckpt", released, "--quant", "int8", "--out", q])
    model, _ = infer.load(q)
    assert model.quantization["method"] == "int8"
    same_companions(released, q)
    hf = str(tmp_path / "hf")
    infer.main(["--ckpt", released, "--export-hf", hf])
    a, _ = plamo2.load(released, dtype=torch.float32)
    b, _ = plamo2.load(hf, dtype=torch.float32)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    same_companions(released, hf)


def readme_commands(section="### On a released model"):
    """The commands of the README's section, as (script, argv), in order."""
    readme = open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")).read()
    body = readme[readme.index(section):]
    body = body[:body.index("\n#", 1)]
    cmds = [line.split("#")[0].split() for line in body.splitlines() if line.startswith("    python ")]
    return [(c[1], c[2:]) for c in cmds]


@pytest.mark.slow
def test_the_readme_commands_on_a_released_model_run_as_written(released, user, tmp_path, capsys):
    """The README's commands for a released model, in its order, on the fixture: the only changes
    are the paths and the sizes (a few steps of a tiny model)."""
    mains = {"data.py": data.main, "train.py": train.main, "posttrain.py": posttrain.main, "tasks.py": tasks.main,
             "prune.py": prune.main, "merge.py": merge.main, "infer.py": infer.main}
    paths = {"plamo-2-1b": released, "my_text/": user["text"], "my_data": str(tmp_path / "my_data"),
             "my_conversations.jsonl": user["conversations"], "my_pairs.jsonl": user["pairs"],
             "my_eval.jsonl": user["eval"]}
    sizes = {"1000": "2", "1536": "48"}
    commands = readme_commands()
    assert [c[0] for c in commands] == ["data.py", "train.py", "posttrain.py", "posttrain.py", "tasks.py", "prune.py",
                                        "merge.py", "infer.py"]
    for script, argv in commands:
        argv = [paths.get(a, sizes.get(a, str(tmp_path / a) if a.startswith("out/") else a)) for a in argv]
        if script in ("train.py", "prune.py") or argv[0] in ("sft", "dpo"):
            argv += SMALL
        if script == "data.py":
            argv += ["--workers", "2"]
        if script == "tasks.py":
            argv += ["--max-new-tokens", "4"]
        capsys.readouterr()
        mains[script](argv)
    model, _ = infer.load(str(tmp_path / "out" / "int8"))
    assert model.quantization["method"] == "int8"
    same_companions(released, str(tmp_path / "out" / "int8"))
    chain = [h["stage"] for h in plamo2.read_lineage(str(tmp_path / "out" / "int8"))["history"]]
    assert chain == ["released", "cpt", "sft", "dpo", "merge"]
