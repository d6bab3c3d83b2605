import io
import json
import os
import shutil
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import corpus
import infer
from plamo2 import PLaMo2, PLaMo2Config
from plamo2 import generate_text
from tokenizer import CHAT_TEMPLATE, IncrementalDecoder, load_tokenizer, parse_chat, special_token_ids
from tokenizer import train_tokenizer

# -----------------------------------------------------------------------------
# One tiny model, trained for a few dozen steps so that its predictions are peaked enough for
# greedy decoding and bits per byte to mean something; shared by the whole file.


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A checkpoint directory (config + weights + tokenizer) and validation tokens."""
    torch.manual_seed(0)
    c = corpus.generate_corpus(target_bytes=50_000)
    tok = train_tokenizer(c.train, vocab_size=512)
    stream = np.array([t for ids in tok.encode_batch(c.train, bos=True) for t in ids], dtype=np.int64)
    val = np.array([t for ids in tok.encode_batch(c.val, bos=True) for t in ids], dtype=np.int64)
    model = PLaMo2(PLaMo2Config.from_preset("tiny", vocab_size=tok.vocab_size, **special_token_ids(tok)))
    opt = torch.optim.AdamW(model.parameters(), lr=6e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(30):  # ~4 s on 2 cores: val bits/byte 8 -> ~2.7
        starts = torch.randint(0, len(stream) - 129, (4,), generator=g).tolist()
        w = torch.stack([torch.from_numpy(stream[s:s + 129]) for s in starts])      # (4, 129)
        _, loss = model(w[:, :-1], w[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad()
    ckpt = str(tmp_path_factory.mktemp("run") / "ckpt")
    model.save_hf(ckpt)
    tok.save(os.path.join(ckpt, "tokenizer.tiktoken"))
    return ckpt, val


def fresh(trained):
    model, tok = infer.load(trained[0])
    return model, tok


def run_main(argv, capsys):
    """infer.main(argv) -> (exit code, stdout, stderr)."""
    code = 0
    try:
        infer.main(argv)
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


# -----------------------------------------------------------------------------
# The formats: error bounds, packing, kernels


def weights(n=48, k=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.02
    w[3, 7] = 0.5        # an outlier widens its row's (and group's) step
    w[5] = 0.0           # an all-zero row
    w[6, 64:128] = 0.01  # a constant group
    w[7] = w[7].abs()    # a row whose groups do not straddle zero
    return w


def _linear(w):
    lin = nn.Linear(w.shape[1], w.shape[0], bias=False)
    with torch.no_grad():
        lin.weight.copy_(w)
    return lin


def test_int8_within_half_a_step_per_row():
    w = weights()
    m = infer.Int8Linear.from_linear(_linear(w))
    err = (w - m.dequantize()).abs()                                               # (N, K)
    assert (err <= m.scales[:, None] / 2 + 1e-7).all()
    assert m.qweight.dtype == torch.int8 and m.qweight.abs().max() == 127
    nonzero = w.abs().amax(1) > 0
    assert (m.qweight.abs().amax(1)[nonzero] == 127).all()  # each row uses its full range
    assert (m.dequantize()[5] == 0).all()


def test_int4_within_half_a_step_per_group():
    w, G = weights(), 64
    m = infer.Int4Linear.from_linear(_linear(w), G)
    assert m.qweight.dtype == torch.uint8 and m.qweight.shape == (48, 128)
    err = (w - m.dequantize()).abs().view(48, 256 // G, G)
    assert (err <= m.scales[..., None] / 2 + 1e-7).all()
    q = infer.unpack_int4(m.qweight).view(48, 256 // G, G)
    spread = w.view(48, -1, G).amax(-1) > w.view(48, -1, G).amin(-1)
    assert (q.amin(-1) == 0).all() and (q.amax(-1)[spread] == 15).all()  # every group uses 0..15
    assert torch.equal(m.dequantize()[6, 64:128], w[6, 64:128])           # a constant group is exact



def test_int4_packing_round_trips_with_the_documented_nibble_order():
    q = torch.randint(0, 16, (5, 66), dtype=torch.uint8)
    p = infer.pack_int4(q)
    assert p.shape == (5, 33) and p.dtype == torch.uint8
    assert torch.equal(infer.unpack_int4(p), q)
    assert torch.equal(p[:, 0] & 15, q[:, 0]) and torch.equal(p[:, 0] >> 4, q[:, 1])


# The quantized layers compute x Ŵᵀ for their dequantized weight Ŵ, in every path and dtype:
# float16 included, where the unscaled sums x·q (up to 127·K·|x|) would overflow.
QUANT_DTYPES = [(torch.float32, 2e-5), (torch.bfloat16, 2e-2), (torch.float16, 2e-3)]


@pytest.mark.parametrize("dtype,tol", QUANT_DTYPES, ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("path", ["int", "plain"])
@pytest.mark.parametrize("shape", [(1, 1), (3, 5)])
def test_int8_matches_the_dequantized_matmul(monkeypatch, dtype, tol, path, shape):
    w = weights(n=48, k=4096) * 50                     # large weights and inputs: fp16 sums would overflow
    m = infer.Int8Linear.from_linear(_linear(w))
    x = (torch.randn(*shape, 4096) * 8).to(dtype)
    calls = []
    int_mm = torch._int_mm
    monkeypatch.setattr(torch, "_int_mm", lambda *a: calls.append(1) or int_mm(*a))
    monkeypatch.setattr(infer, "INT8_MM", path)
    y = m(x)
    assert bool(calls) == (path == "int")
    if path == "int":  # x written as two int8 terms: |x - x̂| <= max|x| / 64516 per element
        tol = max(tol, 1e-4)
    expected = F.linear(x.double(), m.dequantize(torch.float64))
    assert y.shape == (*shape, 48) and y.dtype == dtype and torch.isfinite(y).all()
    torch.testing.assert_close(y.double(), expected, rtol=tol, atol=tol * expected.abs().max().item())


def test_int8_auto_uses_integer_products_on_cpu(monkeypatch):
    calls = []
    int_mm = torch._int_mm
    monkeypatch.setattr(torch, "_int_mm", lambda *a: calls.append(tuple(a[0].shape)) or int_mm(*a))
    m = infer.Int8Linear.from_linear(_linear(weights()))
    assert infer.INT8_MM == "auto"
    m(torch.randn(1, 256))                              # one row: two matrix-vector products
    m(torch.randn(2, 7, 256))                           # a prompt: one product for both terms
    assert calls == [(1, 256), (1, 256), (28, 256)]


@pytest.mark.parametrize("dtype,tol", QUANT_DTYPES, ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("path", ["auto", "plain"])
def test_int4_matches_the_dequantized_matmul(monkeypatch, dtype, tol, path):
    m = infer.Int4Linear.from_linear(_linear(weights(k=1024) * 50), 64)
    x = (torch.randn(3, 1024) * 8).to(dtype)
    monkeypatch.setattr(infer, "INT4_MM", path)
    y = m(x)
    assert (m.cpu_packed is not None) == (path == "auto")  # the CPU kernel ran, from its own copy
    if path == "auto":  # bf16 activations, scales and zeros inside the kernel
        tol = max(tol, 2e-2)
    expected = F.linear(x.double(), m.dequantize(torch.float64))
    assert y.dtype == dtype and torch.isfinite(y).all()
    torch.testing.assert_close(y.double(), expected, rtol=tol, atol=tol * expected.abs().max().item())
    assert set(m.state_dict()) == {"qweight", "scales", "mins"}  # the kernel's copy is not saved


@pytest.mark.parametrize("cls,rel", [(infer.Int8Linear, 0.02), (infer.Int4Linear, 0.15)])
def test_quantized_linear_output_is_close_to_linear(cls, rel):
    lin = _linear(torch.randn(96, 256) * 0.02)
    x = torch.randn(4, 7, 256)
    with torch.no_grad():
        y, yq = lin(x), cls.from_linear(lin, 64)(x)
    err = ((yq - y).norm() / y.norm()).item()
    assert err < rel
    assert err > 0  # it really is quantized


# -----------------------------------------------------------------------------
# The model: what is quantized, quality, save / load


def test_default_keeps_out_proj_dt_proj_and_the_tied_head_in_full_precision(trained):
    model, _ = fresh(trained)
    n_linear = sum(isinstance(m, nn.Linear) for m in model.modules())
    infer.quantize(model, "int4")
    for name, m in model.named_modules():
        leaf = name.rpartition(".")[2]
        if leaf in ("out_proj", "dt_proj") or name == "lm_head":
            assert type(m) is nn.Linear, name
        elif leaf in ("in_proj", "bcdt_proj", "qkv_proj", "o_proj", "gate_up_proj", "down_proj"):
            assert isinstance(m, infer.Int4Linear), name
    assert isinstance(model.embed_tokens, nn.Embedding) and model.lm_head.weight is model.embed_tokens.weight
    n_mamba = sum(model.config.is_mamba(i) for i in range(model.config.num_hidden_layers))
    assert len(model.quantization["modules"]) == n_linear - 2 * n_mamba - 1  # out_proj, dt_proj, lm_head
    flagged = infer.quantize(fresh(trained)[0], "int8", out_proj=True, head=True)
    assert isinstance(flagged.layers[0].mixer.out_proj, infer.Int8Linear)
    assert isinstance(flagged.lm_head, infer.Int8Linear) and isinstance(flagged.embed_tokens, nn.Embedding)


def test_quantized_bits_per_byte_stay_close_to_the_full_model(trained):
    model, tok = fresh(trained)
    nbytes = infer.token_bytes(tok)
    assert nbytes[[tok.bos_id, tok.eos_id]].tolist() == [0, 0]  # specials are not text
    assert nbytes[tok.encode("東京")].sum() == 6
    val = trained[1]
    full = infer.bits_per_byte(model, val, nbytes, seq_len=128, max_tokens=4096)
    int8 = infer.bits_per_byte(infer.quantize(fresh(trained)[0], "int8"), val, nbytes, 128, 4096)
    int4 = infer.bits_per_byte(infer.quantize(fresh(trained)[0], "int4"), val, nbytes, 128, 4096)
    assert full < 3.5  # trained: far below the ~9 bits/byte of a uniform guess over 512 tokens
    assert abs(int8 - full) < 0.001 * full
    assert abs(int4 - full) < 0.01 * full
    assert int4 != full


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_a_saved_quantized_checkpoint_loads_with_identical_logits(trained, tmp_path, mode):
    model, tok = fresh(trained)
    infer.quantize(model, mode, group_size=32)
    out = str(tmp_path / mode)
    infer.save_quantized(model, tok, trained[0], out)
    with open(os.path.join(out, "config.json")) as f:
        entry = json.load(f)["quantization"]
    assert entry == model.quantization and entry["method"] == mode
    assert os.path.getsize(os.path.join(out, "model.safetensors")) < \
        0.6 * os.path.getsize(os.path.join(trained[0], "model.safetensors"))
    loaded, tok = infer.load(out)
    assert loaded.quantization == entry
    assert isinstance(loaded.layers[0].mixer.in_proj, infer.QUANT_TYPES[mode])
    assert loaded.lm_head.weight is loaded.embed_tokens.weight
    idx = torch.tensor([tok.encode("東京は晴れ。The weather", bos=True)])
    with torch.no_grad():
        assert torch.equal(loaded(idx)[0], model(idx)[0])


def test_quant_on_a_quantized_checkpoint_is_an_error(trained, tmp_path, capsys):
    out = str(tmp_path / "q8")
    code, _, err = run_main(["--ckpt", trained[0], "--quant", "int8", "--out", out], capsys)
    assert code == 0 and os.path.exists(os.path.join(out, "config.json"))
    code, out_text, err = run_main(["--ckpt", out, "--quant", "int4", "--prompt", "a"], capsys)
    assert code == 1 and "already quantized" in err and out_text == ""
    assert len(err.strip().splitlines()[-1]) < 150  # one sentence, no traceback
    code, _, err = run_main(["--ckpt", out, "--export-hf", str(tmp_path / "hf")], capsys)
    assert code == 1 and "unquantized" in err


# -----------------------------------------------------------------------------
# Generation


def naive_greedy(model, tok, prompt, n):
    """Recompute the whole sequence every step, no cache: the reference for cached decoding."""
    ids = tok.encode(prompt, bos=True)
    new = []
    with torch.no_grad():
        for _ in range(n):
            t = model(torch.tensor([ids + new]))[0][0, -1].argmax().item()
            if t in (tok.bos_id, tok.eos_id):
                break
            new.append(t)
    return tok.decode(new)


def test_prompt_streams_the_greedy_continuation(trained, capsys, monkeypatch):
    pieces = []
    monkeypatch.setattr(infer, "print_piece", lambda p: (pieces.append(p), print(p, end="")))
    prompt = "東京は"
    code, out, err = run_main(["--ckpt", trained[0], "--prompt", prompt, "--temperature", "0",
                               "--max-new-tokens", "24"], capsys)
    assert code == 0 and "model:" in err
    model, tok = fresh(trained)
    expected = naive_greedy(model, tok, prompt, 24)
    assert len(expected) > 5
    assert out == prompt + expected + "\n"
    assert len(pieces) > 3 and "".join(pieces) == expected  # printed piece by piece


def test_incremental_decoding_never_prints_half_a_character(trained):
    _, tok = fresh(trained)
    text = "鬱蒼とした森で、彼は「齟齬」と言った。"  # rare kanji: split into byte tokens
    d = IncrementalDecoder(tok)
    pieces = [d.add(t) for t in tok.encode(text)] + [d.flush()]
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)
    assert "" in pieces[:-1]  # some token ended mid-character and was held back
    lead, a = tok.token_bytes.index(b"\xe6"), tok.encode("A")[0]  # a lead byte without its other two
    d = IncrementalDecoder(tok)
    assert [d.add(lead), d.add(a), d.add(lead), d.flush()] == ["", "\ufffdA", "", "\ufffd"]  # never stuck
    assert d.text == "\ufffdA\ufffd"


def test_num_samples_gives_separate_continuations(trained, capsys):
    code, out, _ = run_main(["--ckpt", trained[0], "--prompt", "The", "--num-samples", "2", "--seed", "0",
                             "--temperature", "1.0", "--max-new-tokens", "20"], capsys)
    assert code == 0
    parts = out.split("--- sample ")
    assert [p.split(" ---")[0] for p in parts[1:]] == ["1 of 2", "2 of 2"]
    texts = [p.split("---\n", 1)[1] for p in parts[1:]]
    assert all(t.startswith("The") for t in texts) and texts[0] != texts[1]


def test_rows_stop_on_their_own(trained):
    _, tok = fresh(trained)
    a, b, c = tok.encode("a")[0], tok.encode("b")[0], tok.encode("c")[0]

    class Scripted:
        config = PLaMo2Config.from_preset("tiny", vocab_size=tok.vocab_size)

        def parameters(self):
            yield torch.zeros(1)

        def generate(self, idx, *args, **kwargs):
            assert idx.shape[0] == 3
            rows = [[a, b, c], [tok.eos_id, a, b], [b, tok.bos_id, c]]
            for step in zip(*rows):  # one token per row and step
                yield torch.tensor(step)

    outs = generate_text(Scripted(), tok, [tok.encode("p", bos=True)], 5, samples=3)[0]
    assert outs[0] == tok.decode([a, b, c])    # steps: a, b, c
    assert outs[1] == ""                        # EOS first: nothing, and later tokens are dropped
    assert outs[2] == tok.decode([b])           # BOS (the document separator) ends it too


@pytest.mark.parametrize("lines,expected", [("東京\nThe\nexit\nnever\n", ["東京", "The"]),
                                            ("a\n\nb\n", ["a"]),
                                            ("x\ny", ["x", "y"])])  # EOF
def test_chat_continues_each_line_until_empty_exit_or_eof(trained, capsys, monkeypatch, lines, expected):
    seen = []
    real = infer.complete
    monkeypatch.setattr(infer, "complete", lambda m, t, ids, a, on_text=None: seen.append(t.decode(ids[1:]))
                        or real(m, t, ids, a, on_text))
    monkeypatch.setattr(sys, "stdin", io.StringIO(lines))
    code, out, _ = run_main(["--ckpt", trained[0], "--chat", "--max-new-tokens", "5", "--seed", "0"], capsys)
    assert code == 0 and seen == expected
    assert out.count("> ") >= len(expected)


def test_chat_on_a_chat_checkpoint_keeps_the_conversation(trained, tmp_path, capsys, monkeypatch):
    ckpt = str(tmp_path / "chat")
    shutil.copytree(trained[0], ckpt)
    with open(os.path.join(ckpt, "config.json")) as f:
        config = json.load(f)
    with open(os.path.join(ckpt, "config.json"), "w") as f:
        json.dump({**config, "chat_template": CHAT_TEMPLATE}, f)
    seen, real = [], infer.complete
    monkeypatch.setattr(infer, "complete", lambda m, t, ids, *a, **k: seen.append(ids) or real(m, t, ids, *a, **k))
    monkeypatch.setattr(sys, "stdin", io.StringIO("東京は?\nそれから?\n"))
    code, out, err = run_main(["--ckpt", ckpt, "--chat", "--max-new-tokens", "6", "--seed", "0"], capsys)
    assert code == 0 and "keeps the conversation" in err and len(seen) == 2
    tok = load_tokenizer(ckpt)
    first, second = parse_chat(tok, seen[0]), parse_chat(tok, seen[1])
    assert first == [{"role": "user", "content": "東京は?"}, {"role": "assistant", "content": ""}]
    assert [m["role"] for m in second] == ["user", "assistant", "user", "assistant"]
    assert second[2]["content"] == "それから?" and second[1]["content"] in out  # the first answer, as printed
    assert seen[1][:len(seen[0])] == seen[0]  # the second prompt continues the first


# -----------------------------------------------------------------------------
# Export and errors


def test_export_hf_loads_with_identical_logits(trained, tmp_path, capsys):
    out = str(tmp_path / "hf")
    code, printed, _ = run_main(["--ckpt", trained[0], "--export-hf", out], capsys)
    assert code == 0 and "vllm serve" in printed and "--skip-tokenizer-init" in printed  # our BPE
    a, b = PLaMo2.from_hf(trained[0]), PLaMo2.from_hf(out)
    tok = load_tokenizer(out)
    idx = torch.tensor([tok.encode("東京は晴れ。", bos=True)])
    with torch.no_grad():
        assert torch.equal(a(idx)[0], b(idx)[0])


def test_export_keeps_a_released_checkpoints_remote_code_entries(trained, tmp_path, capsys):
    src = tmp_path / "released"
    shutil.copytree(trained[0], src)
    config = json.loads((src / "config.json").read_text())
    auto_map = {"AutoConfig": "modeling_plamo.Plamo2Config"}
    (src / "config.json").write_text(json.dumps({**config, "auto_map": auto_map, "tokenizer_class": "PlamoTokenizer"}))
    (src / "modeling_plamo.py").write_text("# PLaMo 2's remote code\n")
    out = tmp_path / "hf"
    code, printed, _ = run_main(["--ckpt", str(src), "--export-hf", str(out)], capsys)
    exported = json.loads((out / "config.json").read_text())
    assert code == 0 and exported["auto_map"] == auto_map and exported["tokenizer_class"] == "PlamoTokenizer"
    assert exported["architectures"] == ["Plamo2ForCausalLM"] and (out / "modeling_plamo.py").exists()
    assert f"vllm serve {out} --trust-remote-code\n" in printed


def test_a_checkpoint_with_plamo2s_own_tokenizer_runs(tmp_path, capsys):
    """A downloaded Hugging Face directory has tokenizer.jsonl instead of our BPE files."""
    rows = [[f"<|plamo:{t}|>", 0.0, "CONTROL"] for t in ("unk", "bos", "eos", "pad", "op")]
    rows += [[f"<0x{b:02X}>", 0.0, "BYTE"] for b in range(256)]
    rows += [[p, -1.0, "NORMAL"] for p in ("東", "京", "東京", "は", " the", "The")]
    ckpt = tmp_path / "released"
    PLaMo2(PLaMo2Config.from_preset("tiny", vocab_size=len(rows))).save_hf(str(ckpt))
    (ckpt / "tokenizer.jsonl").write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n")
    _, tok = infer.load(str(ckpt))
    nbytes = infer.token_bytes(tok)
    assert tok.bos_id == 1 and nbytes[tok.encode("東京は")].tolist() == [6, 3]
    assert nbytes[:5].tolist() == [0] * 5 and nbytes[5:261].tolist() == [1] * 256  # specials, bytes
    code, out, err = run_main(["--ckpt", str(ckpt), "--prompt", "東京は", "--max-new-tokens", "8",
                               "--temperature", "0"], capsys)
    assert code == 0, err
    model, tok = infer.load(str(ckpt))
    assert tok.encode("東京は", bos=True) == [1, 263, 264]   # BOS, 東京, は: its own segmentation
    assert out == "東京は" + naive_greedy(model, tok, "東京は", 8) + "\n"


def save_model(path, tok, **overrides):
    cfg = PLaMo2Config.from_preset("tiny", vocab_size=tok.vocab_size, **special_token_ids(tok), **overrides)
    PLaMo2(cfg).save_hf(path)
    tok.save(os.path.join(path, "tokenizer.tiktoken"))
    return path


def test_a_long_prompt_is_an_error_only_with_full_attention(trained, tmp_path, capsys):
    _, tok = fresh(trained)
    prompt = "The weather in Tokyo was fine. " * 8
    assert len(tok.encode(prompt, bos=True)) > 20
    full = save_model(str(tmp_path / "full"), tok, full_attention_idx=[1], max_position_embeddings=20)
    code, out, err = run_main(["--ckpt", full, "--prompt", prompt, "--max-new-tokens", "3"], capsys)
    assert code == 1 and "max_position_embeddings" in err and out == ""
    # Mamba + sliding window only: no position limit, the same prompt runs.
    swa = save_model(str(tmp_path / "swa"), tok, max_position_embeddings=20)
    code, out, err = run_main(["--ckpt", swa, "--prompt", prompt, "--max-new-tokens", "3"], capsys)
    assert code == 0 and out.startswith(prompt)


def test_user_errors_end_in_one_sentence(trained, tmp_path, capsys):
    other = tmp_path / "llama"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 8}))
    mismatched = tmp_path / "ids"  # config.json announcing other special tokens than its tokenizer's
    shutil.copytree(trained[0], mismatched)
    config = json.loads((mismatched / "config.json").read_text())
    (mismatched / "config.json").write_text(json.dumps({**config, "eos_token_id": 2}))
    afile = tmp_path / "afile"
    afile.write_text("x")
    cases = [([str(tmp_path / "missing"), "--prompt", "a"], "no checkpoint directory"),
             ([str(other), "--prompt", "a"], "not PLaMo 2"),
             ([str(mismatched), "--prompt", "a"], "eos_token_id 2 (the tokenizer's is 505)"),
             ([trained[0], "--export-hf", str(afile)], "is a file"),
             ([trained[0], "--quant", "int8", "--out", str(afile)], "is a file")]
    for argv, message in cases:
        code, out, err = run_main(["--ckpt", *argv], capsys)
        assert code == 1 and message in err and err.startswith("error: ") and "Traceback" not in err, err
    assert afile.read_text() == "x"
    with pytest.raises(SystemExit):
        infer.main(["--ckpt", trained[0], "--prompt", "a", "--quant", "int3"])  # argparse choices
    assert "invalid choice" in capsys.readouterr().err


def test_bench_on_random_weights_of_a_preset(capsys):
    """--size: the released shapes without a checkpoint (1b takes minutes; tiny here)."""
    code, out, err = run_main(["--bench", "--size", "tiny"], capsys)
    assert code == 0, err
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.split()[:1] in (["none"], ["int8"], ["int4"])}
    assert set(rows) == {"none", "int8", "int4"} and rows["none"][-1] == "-"  # no data: no bits per byte
    assert "random weights of the tiny preset" in out and "prefill" not in out


def test_bench_prints_speed_memory_and_bits_per_byte(trained, tmp_path, capsys):
    val = str(tmp_path / "val.bin")
    trained[1].astype(np.uint16).tofile(val)
    code, out, err = run_main(["--ckpt", trained[0], "--bench", "--bench-data", val, "--bench-tokens", "1024"], capsys)
    assert code == 0, err
    for needle in ("prefill", "tokens/s", "cached decode vs recomputing", "bits/byte"):
        assert needle in out
    rows = {line.split()[0]: line for line in out.splitlines() if line.split()[:1] in (["none"], ["int8"], ["int4"])}
    ratio = {k: float(v.split("(")[1].split("x")[0]) for k, v in rows.items()}
    # int4 stores 0.156x; on CPU its kernel's copy of the weights doubles that in memory
    assert ratio["none"] == 1.0 and ratio["int8"] <= 0.27 and 0.28 <= ratio["int4"] <= 0.31
