import json
import math
import os
import re

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

import kernels
from plamo2 import PLaMo2, PLaMo2Config, load_config, nats_and_bytes, sample

# -----------------------------------------------------------------------------
# An independent PLaMo 2: written from the description of the released model alone (README, The
# model: sandwich norms, interleaved z/x, QK-norm before NeoX RoPE, ...), in float64, with plain loops over
# time, reading weights by their Hugging Face names. It shares no code with plamo2.py.

SMALL = dict(vocab_size=97, hidden_size=64, num_hidden_layers=4, intermediate_size=96,
             num_attention_heads=4, num_key_value_heads=2, hidden_size_per_head=16,
             mamba_num_heads=4, mamba_d_state=8, mamba_d_conv=4, mamba_chunk_size=8,
             attention_window_size=5, full_attention_idx=[3], rope_theta=10000.0,
             rope_local_theta=500.0, max_position_embeddings=64)


def hf_shapes(c, tied):
    H, F_, V = c["hidden_size"], c["intermediate_size"], c["vocab_size"]
    P, Hq, Hkv = c["hidden_size_per_head"], c["num_attention_heads"], c["num_key_value_heads"]
    Nh, N, K = c["mamba_num_heads"], c["mamba_d_state"], c["mamba_d_conv"]
    I, R = Nh * P, max(64, H // 16)
    shapes = {"model.embed_tokens.weight": (V, H), "model.norm.weight": (H,)}
    if not tied:
        shapes["lm_head.weight"] = (V, H)
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.layers.{i}."
        for norm in ("pre_mixer_norm", "post_mixer_norm", "pre_mlp_norm", "post_mlp_norm"):
            shapes[p + norm + ".weight"] = (H,)
        shapes[p + "mlp.gate_up_proj.weight"] = (2 * F_, H)
        shapes[p + "mlp.down_proj.weight"] = (H, F_)
        if i % 2 == 0:  # mamba_step 2: even layers are Mamba
            shapes.update({p + "mixer.in_proj.weight": (2 * I, H), p + "mixer.conv1d.weight": (I, 1, K),
                           p + "mixer.bcdt_proj.weight": (2 * N + R, I), p + "mixer.dt_proj.weight": (Nh, R),
                           p + "mixer.dt_bias": (Nh,), p + "mixer.A_log": (Nh,), p + "mixer.D": (Nh,),
                           p + "mixer.dt_norm_weight": (R,), p + "mixer.B_norm_weight": (N,),
                           p + "mixer.C_norm_weight": (N,), p + "mixer.out_proj.weight": (H, I)})
        else:
            shapes.update({p + "mixer.qkv_proj.weight": ((Hq + 2 * Hkv) * P, H),
                           p + "mixer.o_proj.weight": (H, Hq * P),
                           p + "mixer.q_weight": (Hq, P), p + "mixer.k_weight": (Hkv, P)})
    return shapes


def random_checkpoint(path, c, tied=True, store_lm_head=False, seed=0):
    """Write a checkpoint by hand (not through save_hf): random weights, every norm non-trivial."""
    g = torch.Generator().manual_seed(seed)
    W = {}
    for name, shape in hf_shapes(c, tied).items():
        scale = 0.3 if len(shape) == 1 or name.endswith(("q_weight", "k_weight")) else 0.1
        W[name] = torch.randn(shape, generator=g) * scale
        if name.endswith("A_log"):
            W[name] = torch.rand(shape, generator=g) * 2 - 1
    if tied and store_lm_head:  # some released checkpoints store it anyway
        W["lm_head.weight"] = torch.randn(c["vocab_size"], c["hidden_size"], generator=g)
    os.makedirs(path, exist_ok=True)
    save_file(W, os.path.join(path, "model.safetensors"))
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump({"model_type": "plamo2", "architectures": ["Plamo2ForCausalLM"],
                   "tie_word_embeddings": tied, "torch_dtype": "float32", "rms_norm_eps": 1e-6,
                   "mamba_step": 2, "mamba_enabled": True, "transformers_version": "4.44.0", **c}, f)
    return {k: v.double() for k, v in W.items()}


def ref_rms(x, w=None, offset=0.0, eps=1e-6):
    y = x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps)
    return y if w is None else y * (offset + w)


def ref_forward(W, c, ids, tied=True):
    P = c["hidden_size_per_head"]
    Hq, Hkv, Nh, N, K = (c["num_attention_heads"], c["num_key_value_heads"], c["mamba_num_heads"],
                         c["mamba_d_state"], c["mamba_d_conv"])
    T = len(ids)
    x = W["model.embed_tokens.weight"][ids]                      # (T, H)
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.layers.{i}."
        h = ref_rms(x, W[p + "pre_mixer_norm.weight"], 1.0)
        if i % 2 == 0:
            zx = h @ W[p + "mixer.in_proj.weight"].T              # (T, 2*Nh*P)
            z = torch.stack([zx[:, hd * 2 * P: hd * 2 * P + P] for hd in range(Nh)], 1)      # (T, Nh, P)
            xs = torch.cat([zx[:, hd * 2 * P + P: hd * 2 * P + 2 * P] for hd in range(Nh)], 1)  # (T, I)
            w = W[p + "mixer.conv1d.weight"][:, 0, :]             # (I, K)
            conv = torch.zeros_like(xs)
            for t in range(T):
                for k in range(K):
                    src = t - (K - 1) + k
                    if src >= 0:
                        conv[t] += w[:, k] * xs[src]
            xs = conv * torch.sigmoid(conv)
            bcdt = xs @ W[p + "mixer.bcdt_proj.weight"].T
            B, C, dt = bcdt[:, :N], bcdt[:, N:2 * N], bcdt[:, 2 * N:]
            B = ref_rms(B, W[p + "mixer.B_norm_weight"])
            C = ref_rms(C, W[p + "mixer.C_norm_weight"])
            dt = ref_rms(dt, W[p + "mixer.dt_norm_weight"])
            delta = F.softplus(dt @ W[p + "mixer.dt_proj.weight"].T + W[p + "mixer.dt_bias"])  # (T, Nh)
            A = -torch.exp(W[p + "mixer.A_log"])
            D = W[p + "mixer.D"]
            xh = xs.view(T, Nh, P)
            S = torch.zeros(Nh, P, N, dtype=torch.float64)
            y = torch.zeros(T, Nh, P, dtype=torch.float64)
            for t in range(T):
                for hd in range(Nh):
                    S[hd] = torch.exp(delta[t, hd] * A[hd]) * S[hd] + delta[t, hd] * torch.outer(xh[t, hd], B[t])
                    y[t, hd] = S[hd] @ C[t] + D[hd] * xh[t, hd]
            y = y * (z * torch.sigmoid(z))
            m = y.reshape(T, Nh * P) @ W[p + "mixer.out_proj.weight"].T
        else:
            full = i in c["full_attention_idx"]
            theta = c["rope_theta"] if full else c["rope_local_theta"]
            qkv = h @ W[p + "mixer.qkv_proj.weight"].T
            q = qkv[:, :Hq * P].reshape(T, Hq, P)
            k = qkv[:, Hq * P:(Hq + Hkv) * P].reshape(T, Hkv, P)
            v = qkv[:, (Hq + Hkv) * P:].reshape(T, Hkv, P)
            q = ref_rms(q) * W[p + "mixer.q_weight"]
            k = ref_rms(k) * W[p + "mixer.k_weight"]

            def rope(u):
                out = u.clone()
                for t in range(T):
                    for j in range(P // 2):
                        ang = t / theta ** (2 * j / P)
                        a, b = u[t, :, j], u[t, :, j + P // 2]
                        out[t, :, j] = a * math.cos(ang) - b * math.sin(ang)
                        out[t, :, j + P // 2] = b * math.cos(ang) + a * math.sin(ang)
                return out
            q, k = rope(q), rope(k)
            o = torch.zeros(T, Hq, P, dtype=torch.float64)
            for t in range(T):
                keys = [s for s in range(T) if s <= t and (full or s >= t - c["attention_window_size"])]
                for j in range(Hq):
                    kv = j // (Hq // Hkv)
                    scores = torch.stack([q[t, j] @ k[s, kv] for s in keys]) / math.sqrt(P)
                    o[t, j] = torch.softmax(scores, 0) @ v[keys, kv]
            m = o.reshape(T, Hq * P) @ W[p + "mixer.o_proj.weight"].T
        x = x + ref_rms(m, W[p + "post_mixer_norm.weight"], 0.2)
        h = ref_rms(x, W[p + "pre_mlp_norm.weight"], 1.0)
        gu = h @ W[p + "mlp.gate_up_proj.weight"].T
        gate, up = gu[:, :c["intermediate_size"]], gu[:, c["intermediate_size"]:]
        mlp = (gate * torch.sigmoid(gate) * up) @ W[p + "mlp.down_proj.weight"].T
        x = x + ref_rms(mlp, W[p + "post_mlp_norm.weight"], 5 ** -1.5)
    x = ref_rms(x, W["model.norm.weight"], 1.0)
    head = W["model.embed_tokens.weight"] if tied else W["lm_head.weight"]
    return x @ head.T


@pytest.mark.parametrize("tied,store_lm_head", [(True, False), (True, True), (False, False)])
def test_matches_independent_reference(tmp_path, tied, store_lm_head):
    W = random_checkpoint(tmp_path, SMALL, tied, store_lm_head)
    model = PLaMo2.from_hf(tmp_path)
    ids = torch.randint(0, SMALL["vocab_size"], (20,), generator=torch.Generator().manual_seed(1))
    want = ref_forward(W, SMALL, ids, tied)
    got, _ = model(ids[None])
    torch.testing.assert_close(got[0].double(), want, atol=2e-4, rtol=1e-4)


# -----------------------------------------------------------------------------
# Config

def test_param_counts_of_released_shapes():
    counts = {}
    for name, tied in [("1b", True), ("8b", True), ("8b", False)]:
        with torch.device("meta"):
            counts[name, tied] = PLaMo2(PLaMo2Config.from_preset(name, tie_word_embeddings=tied)).num_params()
    assert counts["1b", True] == 1_291_441_920
    assert counts["8b", True] == 9_118_503_936
    assert counts["8b", False] == 9_528_235_008


def test_config_errors():
    with pytest.raises(ValueError, match="unknown size 'huge'"):
        PLaMo2Config.from_preset("huge")
    with pytest.raises(ValueError, match="multiple of num_key_value_heads"):
        PLaMo2Config.from_preset("tiny", num_attention_heads=4, num_key_value_heads=3)
    with pytest.raises(ValueError, match="full_attention_idx"):
        PLaMo2Config.from_preset("tiny", full_attention_idx=[4])
    with pytest.raises(ValueError, match="positive integer"):
        PLaMo2Config.from_preset("tiny", hidden_size=0)


@pytest.mark.parametrize("key,value,message", [
    ("num_hidden_layers", True, "num_hidden_layers must be a positive integer, got True"),
    ("hidden_size", 256.0, "hidden_size must be a positive integer"),
    ("full_attention_idx", 3, "full_attention_idx must be a list of layer indices, got 3"),
    ("full_attention_idx", [True], "full_attention_idx must be a list of layer indices"),
    ("rope_theta", "1e6", "rope_theta must be a positive number, got '1e6'"),
    ("rms_norm_eps", None, "rms_norm_eps must be a positive number, got None"),
    ("rope_local_theta", -5, "rope_local_theta must be a positive number or null"),
    ("tie_word_embeddings", 1, "tie_word_embeddings must be true or false"),
    ("eos_token_id", "2", "eos_token_id must be a token id"),
])
def test_config_json_values_of_the_wrong_type_are_one_sentence(tmp_path, key, value, message):
    with open(tmp_path / "config.json", "w") as f:
        json.dump({"model_type": "plamo2", **PLaMo2Config.from_preset("tiny").__dict__, key: value}, f)
    with pytest.raises(ValueError, match=re.escape(message)):
        load_config(tmp_path)


def test_config_accepts_what_released_configs_write(tmp_path):
    cfg = PLaMo2Config.from_dict({**PLaMo2Config.from_preset("tiny").__dict__, "rope_theta": 10000,
                                  "full_attention_idx": None, "rope_local_theta": None, "pad_token_id": None})
    assert cfg.rope_theta == 10000.0 and isinstance(cfg.rope_theta, float) and cfg.full_attention_idx == []
    assert PLaMo2Config.from_preset("tiny", eos_token_id=[2, 4]).eos_token_id == [2, 4]  # several EOS, as HF allows


def test_layer_pattern():
    cfg = PLaMo2Config.from_preset("1b")
    assert [cfg.is_mamba(i) for i in range(4)] == [True, False, True, False]
    cfg = PLaMo2Config.from_preset("tiny", mamba_step=4)
    assert [cfg.is_mamba(i) for i in range(4)] == [True, True, False, True]
    cfg = PLaMo2Config.from_preset("tiny", num_hidden_layers=1, mamba_step=4)
    assert [cfg.is_mamba(i) for i in range(1)] == [False]  # too few layers: the last is attention
    cfg = PLaMo2Config.from_preset("tiny", mamba_enabled=False)
    assert not any(cfg.is_mamba(i) for i in range(4))


# -----------------------------------------------------------------------------
# Cached generation against one full forward pass

def randomized(cfg, seed=0):
    torch.manual_seed(seed)
    model = PLaMo2(cfg)
    with torch.no_grad():  # non-trivial norms so that every weight matters
        for name, p in model.named_parameters():
            if p.dim() == 1 or name.endswith(("q_weight", "k_weight")):
                p.add_(torch.randn_like(p) * 0.2)
    return model.eval()


@pytest.mark.parametrize("mamba_enabled", [True, False])
@pytest.mark.parametrize("prefill", [1, 9, 21])
def test_cached_decoding_matches_full_forward(prefill, mamba_enabled):
    # Window 8 and chunk 8: prompts and decoding cross both boundaries several times.
    cfg = PLaMo2Config.from_preset("tiny", attention_window_size=8, mamba_chunk_size=8,
                                   full_attention_idx=[3], mamba_enabled=mamba_enabled)
    model = randomized(cfg)
    idx = torch.randint(0, cfg.vocab_size, (2, 40))
    full, _ = model(idx)
    cache = model.new_cache()
    steps = [model(idx[:, :prefill], cache=cache)[0]]
    for t in range(prefill, 40):
        steps.append(model(idx[:, t:t + 1], cache=cache)[0])
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-4, rtol=1e-4)
    for layer, lc in zip(model.layers, cache.layers):
        if layer.is_mamba:
            assert lc.ssm_state.dtype == torch.float32
            assert lc.conv_state.shape == (2, layer.mixer.I, cfg.mamba_d_conv - 1)
        else:  # sliding-window layers keep only W keys, full layers keep all
            assert lc.k.shape[2] == (40 if layer.mixer.full else 8)


@pytest.mark.parametrize("mamba_enabled", [True, False])
def test_packed_documents_equal_each_document_alone(mamba_enabled):
    """seq_idx: logits, summed losses and every gradient of a packed batch are those of its
    documents run one by one (window 8 and chunk 8, which the documents cross; layer 3 full)."""
    cfg = PLaMo2Config.from_preset("tiny", attention_window_size=8, mamba_chunk_size=8,
                                   full_attention_idx=[3], mamba_enabled=mamba_enabled)
    model = randomized(cfg, seed=4)
    rows = [[5, 13, 1, 21], [17, 2, 21]]                           # documents per row, 40 tokens each
    tokens = torch.randint(0, cfg.vocab_size, (2, 41), generator=torch.Generator().manual_seed(0))
    x, y = tokens[:, :-1], tokens[:, 1:]
    seq_idx = torch.tensor([[d for d, n in enumerate(r) for _ in range(n)] for r in rows])

    logits, _ = model(x, seq_idx=seq_idx)
    loss = F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum")
    packed = torch.autograd.grad(loss, list(model.parameters()))

    alone_logits, alone_loss = torch.zeros_like(logits), 0.0
    for r, lengths in enumerate(rows):
        start = 0
        for n in lengths:
            out, _ = model(x[r:r + 1, start:start + n])
            alone_logits[r, start:start + n] = out[0].detach()
            alone_loss = alone_loss + F.cross_entropy(out[0], y[r, start:start + n], reduction="sum")
            start += n
    alone = torch.autograd.grad(alone_loss, list(model.parameters()))
    torch.testing.assert_close(logits, alone_logits, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(loss, alone_loss, atol=1e-3, rtol=1e-5)
    for (name, _), g, e in zip(model.named_parameters(), packed, alone):
        torch.testing.assert_close(g, e, atol=1e-4, rtol=1e-3, msg=lambda m: f"{name}: {m}")
    # Without seq_idx the documents see each other, so the test above could fail.
    assert not torch.allclose(model(x)[0], alone_logits, atol=1e-3)
    with pytest.raises(ValueError, match="cannot be combined with a cache"):
        model(x, cache=model.new_cache(), seq_idx=seq_idx)


def test_cached_prefill_in_pieces_matches_full_forward():
    cfg = PLaMo2Config.from_preset("tiny", attention_window_size=8, mamba_chunk_size=8)
    model = randomized(cfg, seed=1)
    idx = torch.randint(0, cfg.vocab_size, (3, 37))
    full, _ = model(idx)
    cache = model.new_cache()
    pieces = [model(idx[:, a:a + 7], cache=cache)[0] for a in range(0, 37, 7)]
    torch.testing.assert_close(torch.cat(pieces, 1), full, atol=1e-4, rtol=1e-4)


def test_greedy_generate_matches_naive_loop():
    cfg = PLaMo2Config.from_preset("tiny", attention_window_size=8, mamba_chunk_size=8)
    model = randomized(cfg, seed=2)
    idx = torch.randint(0, cfg.vocab_size, (2, 5))
    fast = torch.stack(list(model.generate(idx, 20, temperature=0)), 1)
    naive = idx
    for _ in range(20):
        logits, _ = model(naive)
        naive = torch.cat([naive, logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(fast, naive[:, 5:])


def test_generate_stops_and_seeds():
    cfg = PLaMo2Config.from_preset("tiny")
    model = randomized(cfg, seed=3)
    idx = torch.randint(0, cfg.vocab_size, (1, 4))
    a = list(model.generate(idx, 10, temperature=1.0, top_k=20, seed=7))
    b = list(model.generate(idx, 10, temperature=1.0, top_k=20, seed=7))
    assert a == b
    first = a[0].item()
    assert len(list(model.generate(idx, 10, temperature=1.0, top_k=20, seed=7, stop_ids=[first]))) == 1


def test_sample_filters():
    logits = torch.tensor([[0.0, 3.0, 2.9, -1.0]])
    assert sample(logits, temperature=0).item() == 1
    g = torch.Generator().manual_seed(0)
    draws = {sample(logits, 1.0, top_k=2, generator=g).item() for _ in range(200)}
    assert draws == {1, 2}
    # Nucleus: with probabilities .5 .3 .2, top_p 0.6 keeps {0, 1} (0 alone has only .5), and
    # both are drawn about as often as their renormalised mass says (5/8 and 3/8).
    logits = torch.tensor([[0.5, 0.3, 0.2]]).log()
    draws = [sample(logits, 1.0, top_p=0.6, generator=g).item() for _ in range(800)]
    assert set(draws) == {0, 1} and abs(draws.count(0) / 800 - 5 / 8) < 0.06
    assert {sample(logits, 1.0, top_p=0.5, generator=g).item() for _ in range(100)} == {0}


def test_generate_never_samples_padding_rows_of_the_embedding():
    cfg = PLaMo2Config.from_preset("tiny", vocab_size=64)
    model = randomized(cfg, seed=5)
    with torch.no_grad():  # make the padding rows the most likely by far
        model.lm_head.weight[50:] = model.norm.weight.new_ones(cfg.hidden_size) * 5
    idx = torch.randint(0, 50, (2, 4))
    assert max(t.max().item() for t in model.generate(idx, 5, temperature=0)) >= 50  # the trap is set
    for temperature in (0, 1.0):
        out = torch.stack(list(model.generate(idx, 20, temperature=temperature, seed=0, vocab_size=50)))
        assert out.max().item() < 50


def test_nats_and_bytes_skips_ignored_targets():
    nbytes = torch.tensor([1, 2, 3, 0])                            # id 3: a special token
    logits = torch.randn(1, 4, 4)
    targets = torch.tensor([[0, -1, 2, 3]])
    nats, total = nats_and_bytes(logits, targets, nbytes)
    per_token = F.cross_entropy(logits[0], targets[0].clamp(min=0), reduction="none")
    assert total.item() == 1 + 3 and nats.item() == pytest.approx((per_token[0] + per_token[2]).item())


# -----------------------------------------------------------------------------
# Checkpoints

@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("shard", [False, True])
def test_save_load_round_trip(tmp_path, tied, shard):
    cfg = PLaMo2Config.from_preset("tiny", tie_word_embeddings=tied)
    model = randomized(cfg)
    model.save_hf(tmp_path, max_shard_bytes=2**20 if shard else 2**40)
    files = sorted(os.listdir(tmp_path))
    assert ("model.safetensors.index.json" in files) == shard
    loaded = PLaMo2.from_hf(tmp_path)
    assert loaded.config == cfg
    assert (loaded.lm_head.weight is loaded.embed_tokens.weight) == tied
    idx = torch.randint(0, cfg.vocab_size, (2, 16))
    assert torch.equal(loaded(idx)[0], model(idx)[0])
    with open(tmp_path / "config.json") as f:
        meta = json.load(f)
    assert meta["model_type"] == "plamo2" and meta["architectures"] == ["Plamo2ForCausalLM"]


def test_save_load_bf16(tmp_path):
    model = randomized(PLaMo2Config.from_preset("tiny")).to(torch.bfloat16)
    model.save_hf(tmp_path)
    loaded = PLaMo2.from_hf(tmp_path)
    assert loaded.embed_tokens.weight.dtype == torch.bfloat16
    assert PLaMo2.from_hf(tmp_path, dtype=torch.float32).embed_tokens.weight.dtype == torch.float32


def _edit_weights(path, edit):
    from safetensors.torch import load_file
    W = load_file(os.path.join(path, "model.safetensors"))
    edit(W)
    save_file(W, os.path.join(path, "model.safetensors"))


def test_load_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint directory"):
        PLaMo2.from_hf(tmp_path / "nope")
    random_checkpoint(tmp_path, SMALL)
    name = "model.layers.layers.0.mixer.A_log"
    _edit_weights(tmp_path, lambda W: W.pop(name))
    with pytest.raises(ValueError, match=f"missing {name}"):
        PLaMo2.from_hf(tmp_path)

    random_checkpoint(tmp_path, SMALL)
    _edit_weights(tmp_path, lambda W: W.update({"model.layers.layers.0.mixer.bogus": torch.zeros(1)}))
    with pytest.raises(ValueError, match="unexpected model.layers.layers.0.mixer.bogus"):
        PLaMo2.from_hf(tmp_path)

    random_checkpoint(tmp_path, SMALL)
    _edit_weights(tmp_path, lambda W: W.update({name: torch.zeros(5)}))
    with pytest.raises(ValueError, match=r"wrong shape for .*A_log \(5,\) \(expected \(4,\)\)"):
        PLaMo2.from_hf(tmp_path)

    random_checkpoint(tmp_path, SMALL)
    with open(tmp_path / "model.safetensors", "r+b") as f:
        f.truncate(100)
    with pytest.raises(ValueError, match="cannot read weights file"):
        PLaMo2.from_hf(tmp_path)

    with open(tmp_path / "config.json", "w") as f:
        json.dump({"model_type": "llama"}, f)
    with pytest.raises(ValueError, match="not PLaMo 2"):
        load_config(tmp_path)


@pytest.mark.parametrize("shard", ["../outside.safetensors", "/etc/passwd", "sub/model.safetensors", ".."])
def test_an_index_naming_files_outside_the_directory_is_refused(tmp_path, shard):
    model = randomized(PLaMo2Config.from_preset("tiny"))
    ckpt = tmp_path / "ckpt"
    model.save_hf(ckpt, max_shard_bytes=2**20)
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    name = next(iter(index["weight_map"]))
    model.save_hf(tmp_path, max_shard_bytes=2**40)  # a real file where "../outside" points
    os.replace(tmp_path / "model.safetensors", tmp_path / "outside.safetensors")
    index["weight_map"][name] = shard
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="outside the checkpoint directory"):
        PLaMo2.from_hf(ckpt)


# -----------------------------------------------------------------------------
# Training sanity

def test_every_parameter_gets_a_gradient():
    cfg = PLaMo2Config.from_preset("tiny", attention_window_size=8, mamba_chunk_size=8)
    model = randomized(cfg)
    idx = torch.randint(0, cfg.vocab_size, (2, 24))
    _, loss = model(idx[:, :-1], targets=idx[:, 1:])
    assert abs(loss.item() - math.log(cfg.vocab_size)) < 2.0
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_scan_paths_agree_inside_the_model():
    cfg = PLaMo2Config.from_preset("tiny", mamba_chunk_size=8)
    model = randomized(cfg)
    idx = torch.randint(0, cfg.vocab_size, (1, 30))
    outs = {}
    for impl in ("reference", "chunked"):
        kernels.SCAN_IMPL = impl
        try:
            outs[impl] = model(idx)[0]
        finally:
            kernels.SCAN_IMPL = "auto"
    torch.testing.assert_close(outs["chunked"], outs["reference"], atol=1e-4, rtol=1e-4)
