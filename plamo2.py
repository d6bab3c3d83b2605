"""
PLaMo 2 in one file: Preferred Networks' hybrid Mamba-2 / sliding-window-attention decoder
(technical report arXiv 2509.04897), computing the same function as the released checkpoints.

Read in order: config -> norms -> Mamba mixer -> attention mixer -> MLP -> block -> sampling ->
model (forward, cached generation) -> checkpoints (the Hugging Face layout, the tokenizer's files,
lineage.json) -> text (generate_text, the one way every script turns tokens into text) -> bits
per byte. The tokenizers and the chat template are in tokenizer.py, the
scans in kernels.py.

Glossary:
    H hidden_size   L num_hidden_layers   V vocab_size   F intermediate_size
    P hidden_size_per_head (attention AND Mamba head dim)   Hq / Hkv attention / KV heads
    Nh mamba_num_heads   I = Nh*P Mamba inner width   N mamba_d_state   K mamba_d_conv
    R = max(64, H // 16) rank of Δ   W attention_window_size
"""

import functools
import itertools
import json
import math
import os
import shutil
from dataclasses import asdict, dataclass, field, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

import kernels
from common import Progress, atomic_write, atomic_write_text, current_umask
from tokenizer import (CHAT_TEMPLATE, IncrementalDecoder, chat_markers, load_tokenizer, save_tokenizer,
                       special_token_ids)

# -----------------------------------------------------------------------------
# Config: field names are the keys of a Hugging Face PLaMo 2 config.json.

PRESETS = {
    # Trains in minutes on a laptop CPU: 2 Mamba + 2 attention layers, ~4.7M parameters.
    "tiny": dict(vocab_size=4096, hidden_size=256, num_hidden_layers=4, intermediate_size=768,
                 num_attention_heads=4, num_key_value_heads=2, hidden_size_per_head=64,
                 mamba_num_heads=8, mamba_d_state=32, mamba_chunk_size=64,
                 attention_window_size=128, max_position_embeddings=1024),
    # One GPU, hours: ~110M parameters.
    "small": dict(vocab_size=32000, hidden_size=768, num_hidden_layers=12, intermediate_size=2048,
                  num_attention_heads=12, num_key_value_heads=4, hidden_size_per_head=64,
                  mamba_num_heads=24, attention_window_size=1024, max_position_embeddings=4096),
    # The released shapes (pfnet/plamo-2-1b and the 8B family).
    "1b": dict(vocab_size=100000, hidden_size=2048, num_hidden_layers=16, intermediate_size=8192,
               num_attention_heads=16, num_key_value_heads=1, hidden_size_per_head=128,
               mamba_num_heads=32),
    "8b": dict(vocab_size=100032, hidden_size=4096, num_hidden_layers=32, intermediate_size=16384,
               num_attention_heads=32, num_key_value_heads=4, hidden_size_per_head=128,
               mamba_num_heads=64, rope_theta=1e6),
}


@dataclass
class PLaMo2Config:
    vocab_size: int = 100000
    hidden_size: int = 2048
    num_hidden_layers: int = 16
    intermediate_size: int = 8192
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = True
    # attention
    num_attention_heads: int = 16
    num_key_value_heads: int = 1
    hidden_size_per_head: int = 128
    max_position_embeddings: int = 2048
    attention_window_size: int = 2048
    full_attention_idx: list = field(default_factory=list)  # layers without the sliding window
    rope_theta: float = 10000.0
    rope_local_theta: float | None = None  # when set, sliding-window layers use this base
    # mamba
    mamba_d_state: int = 64
    mamba_d_conv: int = 4
    mamba_num_heads: int = 32
    mamba_step: int = 2
    mamba_chunk_size: int = 256
    mamba_enabled: bool = True
    # special tokens: the ids of the tokenizer saved beside the weights (released: 1, 2, 3)
    bos_token_id: int | None = 1
    eos_token_id: int | None = 2
    pad_token_id: int | None = 3
    # a chat model (post-trained on render_chat's template) names the template here: CHAT_TEMPLATE
    chat_template: str | None = None
    # the keys of a config.json that this model does not use (a released model's auto_map,
    # linear_type, n_expert, ...), written back unchanged so that the tools that read them still do
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        # Types first: a config.json is user input, and a string or a null deep inside the model
        # would end in a traceback there. bool is an int to Python; here it is an error.
        def bad(name, what):
            raise ValueError(f"config {name} must be {what}, got {getattr(self, name)!r}")

        def is_int(v):
            return isinstance(v, int) and not isinstance(v, bool)

        for name in ["vocab_size", "hidden_size", "num_hidden_layers", "intermediate_size",
                     "num_attention_heads", "num_key_value_heads", "hidden_size_per_head",
                     "attention_window_size", "max_position_embeddings", "mamba_d_state",
                     "mamba_d_conv", "mamba_num_heads", "mamba_chunk_size", "mamba_step"]:
            if not (is_int(getattr(self, name)) and getattr(self, name) > 0):
                bad(name, "a positive integer")
        for name in ["rms_norm_eps", "rope_theta", "rope_local_theta"]:
            v = getattr(self, name)
            if v is None and name == "rope_local_theta":
                continue
            if not ((is_int(v) or isinstance(v, float)) and math.isfinite(v) and v > 0):
                bad(name, "a positive number" + (" or null" if name == "rope_local_theta" else ""))
            setattr(self, name, float(v))
        for name in ["tie_word_embeddings", "mamba_enabled"]:
            if not isinstance(getattr(self, name), bool):
                bad(name, "true or false")
        for name in ["bos_token_id", "eos_token_id", "pad_token_id"]:
            v = getattr(self, name)
            ids = v if isinstance(v, list) and v and name == "eos_token_id" else [v]  # HF allows several EOS
            if v is not None and not all(is_int(i) and 0 <= i for i in ids):
                bad(name, "a token id (a non-negative integer) or null")
        if self.chat_template not in (None, CHAT_TEMPLATE):
            bad("chat_template", f"null or {CHAT_TEMPLATE!r} (the only template this code renders)")
        if not (isinstance(self.full_attention_idx, list) and all(is_int(i) for i in self.full_attention_idx)):
            bad("full_attention_idx", "a list of layer indices")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads ({self.num_attention_heads}) must be a multiple "
                             f"of num_key_value_heads ({self.num_key_value_heads})")
        if self.hidden_size_per_head % 2:
            raise ValueError(f"hidden_size_per_head must be even for RoPE, got {self.hidden_size_per_head}")
        if self.mamba_step < 2:
            raise ValueError(f"config mamba_step must be at least 2, got {self.mamba_step}")
        if self.mamba_chunk_size > 4096:  # the chunked scan holds (chunk x chunk) matrices per head
            raise ValueError(f"config mamba_chunk_size must be at most 4096 (released models: 256), "
                             f"got {self.mamba_chunk_size}")
        if not isinstance(self.extra, dict):
            bad("extra", "a dict of the config.json keys this model does not use")
        outside = [i for i in self.full_attention_idx if not 0 <= i < self.num_hidden_layers]
        if outside:
            raise ValueError(f"full_attention_idx {outside} is outside the {self.num_hidden_layers} layers")

    @classmethod
    def from_preset(cls, name, **overrides):
        if name not in PRESETS:
            raise ValueError(f"unknown size {name!r}; choose one of {', '.join(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    @classmethod
    def from_dict(cls, d):
        """From a config.json dict; keys that are not model settings (auto_map, linear_type, ...) go
        to extra, except those save_hf writes itself (model_type, architectures, torch_dtype)."""
        d = dict(d)
        if "rope_theta" not in d and isinstance(d.get("rope_parameters"), dict):  # newer transformers
            d["rope_theta"] = d["rope_parameters"].get("rope_theta", 10000.0)
        if d.get("full_attention_idx") is None:
            d["full_attention_idx"] = []
        if d.get("rope_theta") is None:
            d["rope_theta"] = 10000.0
        names = {f.name for f in fields(cls)} - {"extra"}
        extra = {k: v for k, v in d.items() if k not in names and k not in ("model_type", "architectures", "torch_dtype")}
        return cls(**{k: v for k, v in d.items() if k in names}, extra=extra)

    def is_mamba(self, i):
        """Layer i is Mamba unless it sits at mamba_step // 2 in its group (released: odd = attention)."""
        if not self.mamba_enabled:
            return False
        if self.num_hidden_layers <= self.mamba_step // 2:  # too few layers: attention only last
            return i != self.num_hidden_layers - 1
        return i % self.mamba_step != self.mamba_step // 2


# -----------------------------------------------------------------------------
# Norms

def rms_norm(x, weight, eps, offset=0.0):
    """x / rms(x) in fp32, cast back to x's dtype, then scaled by (offset + weight).

    PLaMo 2 stores norm weights zero-centred with a per-norm offset (weight 0 -> scale = offset).
    >>> rms_norm(torch.tensor([3.0, -3.0]), torch.zeros(2), eps=0.0, offset=1.0).tolist()
    [1.0, -1.0]
    """
    xf = x.float()
    y = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    return y if weight is None else y * (offset + weight)


class RMSNorm(nn.Module):
    def __init__(self, dim, eps, offset):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(dim))
        self.eps, self.offset = eps, offset

    def forward(self, x):
        return rms_norm(x, self.weight, self.eps, self.offset)


# -----------------------------------------------------------------------------
# Mamba mixer: Mamba-2's SSD recurrence with Mamba-1 style projections.

def inverse_softplus_dt(n, dt_min=1e-3, dt_max=0.1):
    """dt_bias such that softplus(dt_bias) ~ LogUniform(dt_min, dt_max), as in the reference init."""
    dt = torch.exp(torch.rand(n) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
    dt = dt.clamp(min=1e-4)
    return dt + torch.log(-torch.expm1(-dt))  # softplus⁻¹(dt) = dt + log(1 - e^-dt)


class Mamba(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        H, P, N, K = cfg.hidden_size, cfg.hidden_size_per_head, cfg.mamba_d_state, cfg.mamba_d_conv
        self.Nh, self.P, self.N, self.K = cfg.mamba_num_heads, P, N, K
        self.I = I = self.Nh * P
        self.R = R = max(64, H // 16)
        self.eps, self.chunk_size = cfg.rms_norm_eps, cfg.mamba_chunk_size
        self.in_proj = nn.Linear(H, 2 * I, bias=False)
        self.conv1d = nn.Conv1d(I, I, K, groups=I, bias=False)  # depthwise, weight (I, 1, K)
        self.bcdt_proj = nn.Linear(I, 2 * N + R, bias=False)
        self.dt_proj = nn.Linear(R, self.Nh, bias=False)
        self.dt_bias = nn.Parameter(inverse_softplus_dt(self.Nh))
        self.A_log = nn.Parameter(torch.log(torch.arange(1, self.Nh + 1, dtype=torch.float32)))
        self.D = nn.Parameter(torch.ones(self.Nh))
        self.dt_norm_weight = nn.Parameter(torch.ones(R))
        self.B_norm_weight = nn.Parameter(torch.ones(N))
        self.C_norm_weight = nn.Parameter(torch.ones(N))
        self.out_proj = nn.Linear(I, H, bias=False)

    def forward(self, u, cache=None, seq_idx=None):
        b, l, _ = u.shape
        Nh, P, N, K, I = self.Nh, self.P, self.N, self.K, self.I
        # z and x are interleaved per head: [z_0 | x_0 | z_1 | x_1 | ...], each P wide.
        z, x = self.in_proj(u).view(b, l, Nh, 2 * P).split(P, dim=-1)   # (b, l, Nh, P) each
        x = x.reshape(b, l, I).transpose(1, 2)                            # (b, I, l)

        # Causal depthwise conv: prepend the K-1 previous inputs (zeros at the start).
        prev = x.new_zeros(b, I, K - 1) if cache is None or cache.conv_state is None else cache.conv_state
        x = torch.cat([prev, x], dim=2)                                   # (b, I, K-1+l)
        if cache is not None:
            cache.conv_state = x[:, :, x.shape[2] - (K - 1):]             # (b, I, K-1)
        if l == 1:  # decoding: the conv is a dot product over the last K inputs
            x = (x * self.conv1d.weight[:, 0]).sum(-1, keepdim=True)     # (b, I, 1)
        elif seq_idx is not None:
            # Packed documents: a tap that reaches back into the previous document reads zero,
            # as at the start of a row (the released code resets the conv state there too).
            seq = F.pad(seq_idx, (K - 1, 0), value=-1)[:, None]          # (b, 1, K-1+l)
            x = sum(self.conv1d.weight[:, :, k] * x[:, :, k:k + l] * (seq[..., k:k + l] == seq[..., K - 1:])
                    for k in range(K))                                     # (b, I, l)
        else:
            x = F.conv1d(x, self.conv1d.weight, groups=I)                 # (b, I, l)
        x = F.silu(x).transpose(1, 2)                                     # (b, l, I)

        B, C, dt = self.bcdt_proj(x).split([N, N, self.R], dim=-1)       # (b, l, N), (b, l, N), (b, l, R)
        dt = rms_norm(dt, self.dt_norm_weight, self.eps)
        B = rms_norm(B, self.B_norm_weight, self.eps)
        C = rms_norm(C, self.C_norm_weight, self.eps)
        dt = F.softplus(self.dt_proj(dt).float() + self.dt_bias.float())  # Δ (b, l, Nh), fp32
        A = -torch.exp(self.A_log.float())                                # (Nh,)
        x = x.reshape(b, l, Nh, P)                                        # (b, l, Nh, P)

        if cache is not None and l == 1 and cache.ssm_state is not None:
            y = kernels.ssd_step(cache.ssm_state, x[:, 0], dt[:, 0], A, B[:, 0], C[:, 0], self.D)
            y = y[:, None]                                                # (b, 1, Nh, P)
        elif cache is not None:
            y, cache.ssm_state = kernels.ssd_scan(x, dt, A, B, C, self.D, cache.ssm_state,
                                                  return_final_state=True, chunk_size=self.chunk_size)
        else:
            y = kernels.ssd_scan(x, dt, A, B, C, self.D, chunk_size=self.chunk_size,
                                 seq_idx=seq_idx)                          # (b, l, Nh, P)
        y = y * F.silu(z)                                                 # gate, no norm before out_proj
        return self.out_proj(y.reshape(b, l, I))


# -----------------------------------------------------------------------------
# Attention mixer: GQA, QK-norm, NeoX RoPE, sliding window or full.

@functools.lru_cache(maxsize=16)
def rope_inv_freq(dim, theta, device):
    """theta^(-2i/dim) for i < dim/2: the rotation speed of each pair of channels (cached per layer
    kind, so that a decoding step does not recompute it)."""
    return 1.0 / theta ** (torch.arange(0, dim, 2, device=device, dtype=torch.float32) / dim)


def rope_cos_sin(pos, t, dim, theta, device):
    """cos and sin (t, dim) for positions pos..pos+t-1, NeoX layout (the two halves repeat)."""
    inv_freq = rope_inv_freq(dim, theta, device)
    angles = torch.arange(pos, pos + t, device=device, dtype=torch.float32)[:, None] * inv_freq
    angles = torch.cat([angles, angles], dim=-1)                          # (t, dim)
    return angles.cos(), angles.sin()


def apply_rope(x, cos, sin):
    """Rotate-half RoPE over the whole head dim, in fp32. x (b, heads, t, dim)."""
    x1, x2 = x.float().chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x.float() * cos + rotated * sin).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg, layer_idx):
        super().__init__()
        self.Hq, self.Hkv, self.P = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.hidden_size_per_head
        self.full = layer_idx in cfg.full_attention_idx
        self.window = cfg.attention_window_size
        local = not self.full and cfg.rope_local_theta is not None
        self.theta = cfg.rope_local_theta if local else cfg.rope_theta
        self.qkv_proj = nn.Linear(cfg.hidden_size, (self.Hq + 2 * self.Hkv) * self.P, bias=False)
        self.o_proj = nn.Linear(self.Hq * self.P, cfg.hidden_size, bias=False)
        self.q_weight = nn.Parameter(torch.ones(self.Hq, self.P))
        self.k_weight = nn.Parameter(torch.ones(self.Hkv, self.P))

    def forward(self, u, cache=None, pos=0, seq_idx=None):
        b, t, _ = u.shape
        Hq, Hkv, P = self.Hq, self.Hkv, self.P
        q, k, v = self.qkv_proj(u).split([Hq * P, Hkv * P, Hkv * P], dim=-1)
        q = q.view(b, t, Hq, P).transpose(1, 2)                           # (b, Hq, t, P)
        k = k.view(b, t, Hkv, P).transpose(1, 2)                          # (b, Hkv, t, P)
        v = v.view(b, t, Hkv, P).transpose(1, 2)                          # (b, Hkv, t, P)
        # QK-norm (no offset) before RoPE.
        q = rms_norm(q, None, 1e-6) * self.q_weight[:, None, :]
        k = rms_norm(k, None, 1e-6) * self.k_weight[:, None, :]
        cos, sin = rope_cos_sin(pos, t, P, self.theta, u.device)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)

        if cache is not None:
            if cache.k is not None:
                k, v = torch.cat([cache.k, k], dim=2), torch.cat([cache.v, v], dim=2)  # (b, Hkv, s, P)
            # A sliding-window layer never looks further back than W positions.
            cache.k, cache.v = (k, v) if self.full else (k[:, :, -self.window:], v[:, :, -self.window:])

        s = k.shape[2]
        if seq_idx is None and s == t and (self.full or t <= self.window + 1):  # the window never bites
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        elif t == 1:  # one new token sees every cached key: the cache holds only the window
            out = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
        else:
            # Queries in blocks of W: a block of sliding-window queries needs at most 2W keys, so a
            # long prompt costs O(t·W), not O(t²). Key j sits at position pos + t - s + j.
            first_key = pos + t - s
            block = t if self.full else self.window
            outs = []
            for a in range(0, t, block):
                qpos = torch.arange(pos + a, pos + min(a + block, t), device=u.device)[:, None]  # (tb, 1)
                lo = 0 if self.full else max(0, pos + a - self.window - first_key)
                hi = pos + min(a + block, t) - first_key
                kpos = torch.arange(first_key + lo, first_key + hi, device=u.device)[None, :]    # (1, sb)
                mask = kpos <= qpos                                                             # (tb, sb)
                if not self.full:
                    mask &= kpos >= qpos - self.window  # keys i-W .. i
                if seq_idx is not None:  # no cache, so key j is token j: only its own document's
                    same = seq_idx[:, a:a + block, None] == seq_idx[:, None, lo:hi]            # (b, tb, sb)
                    mask = (mask & same)[:, None]                                               # (b, 1, tb, sb)
                outs.append(F.scaled_dot_product_attention(q[:, :, a:a + block], k[:, :, lo:hi], v[:, :, lo:hi],
                                                           attn_mask=mask, enable_gqa=True))
            out = torch.cat(outs, dim=2)                                  # (b, Hq, t, P)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, Hq * P))    # (b, t, H)


# -----------------------------------------------------------------------------
# MLP and block

class MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)                 # (b, t, F) each
        return self.down_proj(F.silu(gate) * up)


class Block(nn.Module):
    """Sandwich norms: x += post_norm(mixer(pre_norm(x))); x += post_norm(mlp(pre_norm(x)))."""

    def __init__(self, cfg, layer_idx):
        super().__init__()
        self.is_mamba = cfg.is_mamba(layer_idx)
        self.mixer = Mamba(cfg) if self.is_mamba else Attention(cfg, layer_idx)
        self.mlp = MLP(cfg)
        # The offsets keep each residual branch small at init; all-1 offsets trained worse.
        eps = cfg.rms_norm_eps
        self.pre_mixer_norm = RMSNorm(cfg.hidden_size, eps, offset=1.0)
        self.post_mixer_norm = RMSNorm(cfg.hidden_size, eps, offset=1.0 / 5)
        self.pre_mlp_norm = RMSNorm(cfg.hidden_size, eps, offset=1.0)
        self.post_mlp_norm = RMSNorm(cfg.hidden_size, eps, offset=1.0 / 5 ** 1.5)

    def forward(self, x, cache=None, pos=0, seq_idx=None):
        h = self.pre_mixer_norm(x)
        h = self.mixer(h, cache, seq_idx=seq_idx) if self.is_mamba else self.mixer(h, cache, pos, seq_idx)
        x = x + self.post_mixer_norm(h)
        return x + self.post_mlp_norm(self.mlp(self.pre_mlp_norm(x)))


# -----------------------------------------------------------------------------
# Sampling: the one function every script uses.

def sample(logits, temperature=1.0, top_k=None, top_p=None, generator=None):
    """Pick one token per row of logits (b, V). temperature 0 is greedy.

    top_k keeps the k most likely tokens; top_p keeps the smallest set whose probability mass
    reaches p (the most likely token is always kept).
    """
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, -math.inf)
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        drop = probs.cumsum(dim=-1) - probs >= top_p  # mass before this token already reaches p
        sorted_logits = sorted_logits.masked_fill(drop, -math.inf)
        logits = torch.full_like(logits, -math.inf).scatter(-1, order, sorted_logits)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


# -----------------------------------------------------------------------------
# The model

class LayerCache:
    """Decoding state of one layer: Mamba conv + fp32 SSM state, or attention keys/values."""
    conv_state = ssm_state = k = v = None


class Cache:
    """Everything generation carries between steps: one LayerCache per layer and the position."""

    def __init__(self, num_layers):
        self.layers = [LayerCache() for _ in range(num_layers)]
        self.pos = 0


class PLaMo2(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, offset=1.0)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.apply(self._init_weights)
        self.tie_weights()

    @staticmethod
    def _init_weights(module):
        # Reference init: N(0, 0.02) for every Linear and the embedding; the Mamba tensors,
        # norms and the depthwise conv keep the values set in their constructors.
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def tie_weights(self):
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def num_params(self):
        return sum(p.numel() for p in self.parameters())  # a tied weight is counted once

    def new_cache(self):
        return Cache(len(self.layers))

    def forward(self, idx, targets=None, cache=None, last_only=False, seq_idx=None, head=True):
        """idx (b, t) token ids -> logits (b, t, V); with targets also the mean cross-entropy.

        With a cache the tokens continue from cache.pos, and the cache is updated in place.
        Targets equal to -1 are ignored. last_only=True computes logits (b, 1, V) for the last
        position only, which is all a prefill needs (a 32K prompt x 100K vocab would not fit).
        seq_idx (b, t) int64, the document index of every token of a packed row (non-decreasing),
        makes each document see only itself: Mamba's conv and SSM states reset where it changes
        and attention does not look across, so a packed row computes what each document alone
        would (RoPE is relative: where a document starts in the row changes nothing).
        head=False returns the final norm's output (b, t, H) instead of logits (distillation makes
        a teacher's logits from it chunk by chunk).
        """
        if seq_idx is not None and (cache is not None or seq_idx.shape != idx.shape):
            raise ValueError("seq_idx must have the shape of idx, and it marks documents of a packed "
                             "training batch: it cannot be combined with a cache.")
        pos = 0 if cache is None else cache.pos
        x = self.embed_tokens(idx)                                        # (b, t, H)
        for i, block in enumerate(self.layers):
            x = block(x, None if cache is None else cache.layers[i], pos, seq_idx)
        if cache is not None:
            cache.pos += idx.shape[1]
        if last_only:
            x = x[:, -1:]
        if not head:
            return self.norm(x), None                                     # (b, t, H)
        logits = self.lm_head(self.norm(x))                               # (b, t, V)
        loss = None
        if targets is not None:
            loss = token_losses(logits, targets).sum() / (targets != -1).sum()
        return logits, loss

    @torch.inference_mode()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, seed=None,
                 stop_ids=(), vocab_size=None):
        """Yield the next token of every row, (b,), one step at a time.

        The prompt is prefilled in one pass (the chunked scan, attention within each layer's
        window); each later step feeds one token through the per-layer caches. Stops after
        max_new_tokens or once every row has produced one of stop_ids (rows that stopped keep
        being sampled; the caller masks them). vocab_size, the tokenizer's, keeps the padding
        rows of a larger embedding from being sampled (the 8B has 100,032 rows, 100,000 tokens).
        """
        generator = None
        if seed is not None:
            generator = torch.Generator(device=idx.device).manual_seed(seed)
        cache = self.new_cache()
        logits, _ = self(idx, cache=cache, last_only=True)
        done = torch.zeros(idx.shape[0], dtype=torch.bool, device=idx.device)
        stop = torch.tensor(list(stop_ids), dtype=torch.long, device=idx.device)
        for _ in range(max_new_tokens):
            next_logits = logits[:, -1]                                   # (b, V)
            if vocab_size is not None and vocab_size < next_logits.shape[-1]:
                next_logits = next_logits.clone()
                next_logits[:, vocab_size:] = -math.inf
            token = sample(next_logits, temperature, top_k, top_p, generator)  # (b,)
            yield token
            done |= torch.isin(token, stop)
            if done.all():
                return
            logits, _ = self(token[:, None], cache=cache)

    # --- checkpoints in the Hugging Face layout -------------------------------

    def save_hf(self, path, max_shard_bytes=5 * 2**30):
        """Write config.json and model.safetensors (or shards + index) into the directory path,
        names as in released PLaMo 2. config.json carries the keys this model does not use
        (config.extra) as they were read."""
        from safetensors.torch import save_file

        os.makedirs(path, exist_ok=True)
        tensors = {hf_name(k): v.detach().contiguous().cpu() for k, v in self.state_dict().items()
                   if not (k == "lm_head.weight" and self.config.tie_word_embeddings)}
        shards, size = [[]], 0
        for name, t in tensors.items():
            nbytes = t.numel() * t.element_size()
            if shards[-1] and size + nbytes > max_shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append(name)
            size += nbytes
        if len(shards) == 1:
            files = {"model.safetensors": shards[0]}
        else:
            files = {f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors": s for i, s in enumerate(shards)}
        for fname, names in files.items():
            atomic_write(os.path.join(path, fname),
                         lambda tmp, names=names: save_file({n: tensors[n] for n in names}, tmp, metadata={"format": "pt"}))
        index_path = os.path.join(path, "model.safetensors.index.json")
        if len(files) > 1:
            index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
                     "weight_map": {n: f for f, names in files.items() for n in names}}
            atomic_write_text(index_path, json.dumps(index, indent=2))
        # Remove weights of an earlier save with another sharding, so the directory is unambiguous.
        for fname in os.listdir(path):
            stale = fname.startswith("model") and fname.endswith(".safetensors") and fname not in files
            if stale or (fname == "model.safetensors.index.json" and len(files) == 1):
                os.remove(os.path.join(path, fname))
        dtype = str(next(iter(tensors.values())).dtype).removeprefix("torch.")
        settings = asdict(self.config)
        extra = settings.pop("extra")
        config = {**extra, "model_type": "plamo2", "architectures": ["Plamo2ForCausalLM"], "torch_dtype": dtype,
                  **settings}
        atomic_write_text(os.path.join(path, "config.json"), json.dumps(config, indent=2))

    @classmethod
    def from_hf(cls, path, device="cpu", dtype=None):
        """Load a Hugging Face PLaMo 2 directory (ours or a released one).

        Every tensor must be present with the right shape and a floating dtype; a stored
        lm_head.weight is ignored when the embeddings are tied. dtype=None keeps the stored dtypes.
        """
        config = load_config(path)
        stored = stored_specs(path)
        check_size(path, config, stored)  # before building: an absurd config would build for minutes
        with torch.device("meta"):
            model = cls(config)
        expected = {hf_name(k): v.shape for k, v in model.state_dict().items()
                    if not (k == "lm_head.weight" and config.tie_word_embeddings)}
        if config.tie_word_embeddings:
            stored.pop("lm_head.weight", None)
        check_tensors(path, expected, stored)

        tensors = read_safetensors(path)
        state = {k: tensors[hf_name(k)] for k in model.state_dict() if hf_name(k) in expected}
        state = {k: v.to(device=device, dtype=dtype if dtype is not None else v.dtype) for k, v in state.items()}
        if config.tie_word_embeddings:
            state["lm_head.weight"] = state["embed_tokens.weight"]
        model.load_state_dict(state, assign=True)
        model.tie_weights()  # assign=True replaced the shared Parameter with two
        return model


# -----------------------------------------------------------------------------
# Checkpoints. A checkpoint is a directory: the model in the Hugging Face layout (config.json and
# model.safetensors, or shards + model.safetensors.index.json), its tokenizer's files, and
#   lineage.json   what the model was trained on (the stage, the checkpoint it started from, the
#                  pre-training text, the instruction data, the loop's settings): what a later
#                  stage starts from; a released model or an export has none
#   train_state.pt the optimizer and data position of a training run, for --resume
# save_checkpoint writes everything into <path>.tmp and swaps it in, so that a kill at any moment
# leaves either the old checkpoint or the new one complete, and never anything stale beside it.

LINEAGE = "lineage.json"


def save_checkpoint(path, model, tok, lineage=None, train_state=None):
    """Write model, tok's files, lineage and train_state as the checkpoint directory path.
    Refused before anything is written when the config does not announce tok's special ids or a
    weight is not finite: a NaN model must never look like a checkpoint."""
    check_tokenizer(path, model.config, tok)
    check_finite(model.state_dict(), f"the model to save as {path}")
    tmp = path + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_hf(tmp)
    save_tokenizer(tok, tmp)
    if lineage is not None:
        atomic_write_text(os.path.join(tmp, LINEAGE), json.dumps(lineage, indent=1, ensure_ascii=False))
    if train_state is not None:  # None: weights only (a cut, a merge, an export), nothing to resume
        atomic_write(os.path.join(tmp, "train_state.pt"), lambda p: torch.save(train_state, p))
    swap_in(tmp, path)


def swap_in(tmp, path):
    """Make the complete directory tmp the checkpoint at path, replacing any there; every file
    gets the ordinary mode of a new file (0644 under the usual umask)."""
    mode = 0o666 & ~current_umask()
    for name in os.listdir(tmp):  # the bytes reach the disk before the new name does
        os.chmod(os.path.join(tmp, name), mode)
        with open(os.path.join(tmp, name), "rb") as f:
            os.fsync(f.fileno())
    old = path + ".old"
    if os.path.exists(path):
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def find_checkpoint(path):
    """The checkpoint directory that path names: path itself (it has config.json), the checkpoint
    of a run directory (path/ckpt), or the .old name a kill between save_checkpoint's two renames
    leaves. Never a .tmp directory, which a kill leaves half written. One clear error otherwise."""
    for p in (path, os.path.join(path, "ckpt")):
        if os.path.isfile(os.path.join(p, "config.json")):
            return p
        if not os.path.exists(p) and os.path.isfile(os.path.join(p + ".old", "config.json")):
            return p + ".old"
    if not os.path.exists(path):
        raise FileNotFoundError(f"no checkpoint directory at {path}")
    if os.path.isdir(os.path.join(path, "ckpt.tmp")) or os.path.isdir(path + ".tmp"):
        raise FileNotFoundError(f"{path} has no finished checkpoint: the run stopped while writing its first one "
                                f"(ckpt.tmp is incomplete); run the stage again, or --resume it if it had one before")
    raise FileNotFoundError(f"{path} is not a checkpoint (no config.json) and holds no run's checkpoint (no ckpt/)")


def read_lineage(path):
    """The lineage.json of a checkpoint directory, or None (a released model, an export)."""
    file = os.path.join(path, LINEAGE)
    if not os.path.exists(file):
        return None
    try:
        with open(file, encoding="utf-8") as f:
            lineage = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{file} is not valid JSON ({e})") from None
    if not isinstance(lineage, dict):
        raise ValueError(f"{file} is not a JSON object")
    return lineage


def history_after(path, lineage):
    """The stages a checkpoint made from the one at path descends through: that checkpoint's
    history, then itself ("released" for a model without lineage)."""
    lineage = lineage or {}
    return lineage.get("history", []) + [{"stage": lineage.get("stage", "released"), "path": path}]


def pretraining_peak(lineage):
    """The peak learning rate of the pre-training a checkpoint descends from, which the later
    stages take a fraction of (distillation a fifth, SFT a third, DPO a tenth); None when that
    pre-training was not ours (a released model, and what was made from one), where the stages
    take the published rates for the model's size. A fraction of the parent's own rate would
    compound down the pipeline: 3e-3 -> long context 1e-3 -> distillation 2e-4 -> SFT 7e-5, at
    which the tiny model's SFT learns nothing."""
    if not lineage:
        return None
    if "pretrain_lr" in lineage:
        return lineage["pretrain_lr"]
    # written before the lineage recorded it: known only for pre-training itself
    return lineage.get("loop", {}).get("lr") if lineage.get("stage") == "pretrain" else None


def safetensors_files(path):
    """The weight files of a checkpoint directory: [model.safetensors], or the shards its index names."""
    index_path = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index_path):
        try:
            with open(index_path) as f:
                files = sorted(set(json.load(f)["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, AttributeError, TypeError) as e:
            raise ValueError(f"{index_path} is not a valid safetensors index ({e})") from None
        # A downloaded checkpoint is untrusted input: its index may only name files beside it.
        outside = [f for f in files if not isinstance(f, str) or os.path.basename(f) != f or f in ("", ".", "..")]
        if outside:
            raise ValueError(f"{index_path} names weight files outside the checkpoint directory "
                             f"({_names([repr(f) for f in outside])}); refusing to read them.")
        return [os.path.join(path, f) for f in files]
    if os.path.exists(os.path.join(path, "model.safetensors")):
        return [os.path.join(path, "model.safetensors")]
    raise FileNotFoundError(f"no weights in {path}: expected model.safetensors or model.safetensors.index.json")


def _open_safetensors(fpath):
    from safetensors import safe_open
    try:
        return safe_open(fpath, framework="pt", device="cpu")
    except Exception as e:  # safetensors raises several types for missing, truncated or corrupt files
        raise ValueError(f"cannot read weights file {fpath}: {e}") from None


def stored_specs(path):
    """{name: (safetensors dtype, shape)} of every tensor of a checkpoint, from the file headers only."""
    specs = {}
    for fpath in safetensors_files(path):
        with _open_safetensors(fpath) as f:
            for name in f.keys():
                s = f.get_slice(name)
                specs[name] = (s.get_dtype(), tuple(s.get_shape()))
    return specs


def read_safetensors(path):
    """Every tensor of a checkpoint directory (safetensors_files)."""
    stored = {}
    for fpath in safetensors_files(path):
        try:
            with _open_safetensors(fpath) as f:
                for name in f.keys():
                    stored[name] = f.get_tensor(name)
        except ValueError:
            raise
        except Exception as e:  # a header that promises more bytes than the file has
            raise ValueError(f"cannot read weights file {fpath}: {e}") from None
    return stored


FLOAT_DTYPES = {"F64", "F32", "F16", "BF16"}


def check_size(path, config, stored):
    """One clear error when config.json's size disagrees with the stored tensors, checked from the
    headers before the model is built (a config with a million layers would take minutes to
    build and then fail anyway)."""
    layers = {int(n.split(".")[3]) for n in stored if n.startswith("model.layers.layers.") and n.split(".")[3].isdigit()}
    emb = stored.get("model.embed_tokens.weight", (None, None))[1]
    problems = []
    if len(layers) != config.num_hidden_layers:
        problems.append(f"num_hidden_layers {config.num_hidden_layers}, the weights {len(layers)} layers")
    if emb is not None and tuple(emb) != (config.vocab_size, config.hidden_size):
        problems.append(f"vocab_size x hidden_size {config.vocab_size} x {config.hidden_size}, the embedding "
                        f"{emb[0]} x {emb[1]}")
    if problems:
        raise ValueError(f"checkpoint {path}: config.json does not match its weights ({'; '.join(problems)})")


def check_tensors(path, expected, stored):
    """One error naming every missing, unexpected, mis-shaped and non-float tensor.
    expected: {name: shape}; stored: {name: (safetensors dtype, shape)}."""
    missing = sorted(expected.keys() - stored.keys())
    extra = sorted(stored.keys() - expected.keys())
    shaped = sorted(n for n in expected.keys() & stored.keys() if tuple(stored[n][1]) != tuple(expected[n]))
    typed = sorted(n for n in expected.keys() & stored.keys() if stored[n][0] not in FLOAT_DTYPES)
    problems = [f"missing {_names(missing)}" if missing else "",
                f"unexpected {_names(extra)}" if extra else "",
                "wrong shape for " + _names([f"{n} {tuple(stored[n][1])} (expected "
                                             f"{tuple(expected[n])})" for n in shaped]) if shaped else "",
                "not floating point: " + _names([f"{n} ({stored[n][0]})" for n in typed]) if typed else ""]
    problems = [p for p in problems if p]
    if problems:
        raise ValueError(f"checkpoint {path} does not match its config.json: {'; '.join(problems)}")


def check_finite(tensors, what):
    """One clear error when a floating-point tensor of {name: tensor} holds NaN or infinity."""
    bad = {n: (~torch.isfinite(t)).sum().item() for n, t in tensors.items() if t.is_floating_point()}
    bad = {n: k for n, k in bad.items() if k}
    if bad:
        raise ValueError(f"{what} holds {sum(bad.values()):,} weights that are NaN or infinite (in "
                         f"{_names(list(bad))}): it is not a usable model")


def hf_name(name):
    """Our parameter name -> the released checkpoint's (note the doubled `layers.layers`).

    >>> hf_name("layers.3.mixer.A_log"), hf_name("norm.weight"), hf_name("lm_head.weight")
    ('model.layers.layers.3.mixer.A_log', 'model.norm.weight', 'lm_head.weight')
    """
    if name.startswith("lm_head."):
        return name
    return "model.layers." + name if name.startswith("layers.") else "model." + name


def load_config(path, allow_quantized=False):
    """PLaMo2Config from path/config.json, with one clear error for anything wrong."""
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isdir(path):
        raise FileNotFoundError(f"no checkpoint directory at {path}")
    if not os.path.exists(cfg_path):
        raise FileNotFoundError(f"{path} has no config.json, so it is not a checkpoint directory")
    try:
        with open(cfg_path) as f:
            d = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{cfg_path} is not valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise ValueError(f"{cfg_path} is not a JSON object of model settings")
    if "quantization" in d and not allow_quantized:
        method = d["quantization"].get("method") if isinstance(d["quantization"], dict) else d["quantization"]
        raise ValueError(f"{path} is a quantized checkpoint ({method}): only inference (infer.py) reads it; "
                         f"start from the unquantized checkpoint it was made from")
    if d.get("model_type", "plamo2") != "plamo2":
        raise ValueError(f"{path} holds a {d['model_type']!r} model, not PLaMo 2 (model_type 'plamo2')")
    return PLaMo2Config.from_dict(d)


def check_tokenizer(path, config, tok):
    """One clear error when the tokenizer saved beside the weights is not the model's."""
    if tok.vocab_size > config.vocab_size:  # fewer is fine: released embeddings are padded (100032)
        raise ValueError(f"{path}: the tokenizer has {tok.vocab_size} tokens but the model only {config.vocab_size}.")
    ours = special_token_ids(tok)
    wrong = [k for k, v in ours.items()
             if getattr(config, k) not in (None, v) and not (isinstance(getattr(config, k), list) and v in getattr(config, k))]
    if wrong:
        raise ValueError(f"{path}/config.json does not match the tokenizer beside it: it says "
                         + ", ".join(f"{k} {getattr(config, k)} (the tokenizer's is {ours[k]})" for k in wrong)
                         + "; if the tokenizer is the right one, set those ids in config.json (checkpoints from "
                           "before config.json carried the tokenizer's ids say 1, 2, 3).")


def load(path, device="cpu", dtype=None):
    """(model, tokenizer) of a checkpoint directory (ours or a released one), checked against
    each other and for weights that are not finite; dtype=None keeps the stored dtypes."""
    model = PLaMo2.from_hf(path, device=device, dtype=dtype)
    tok = load_tokenizer(path)
    check_tokenizer(path, model.config, tok)
    check_finite(model.state_dict(), f"checkpoint {path}")
    return model, tok


def _names(names, limit=5):
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


# -----------------------------------------------------------------------------
# Text: the one way every script turns a model's tokens into text, and its losses into numbers.

def position_limit(config):
    """The longest sequence the model was trained to address, or None. Full attention has no
    window: positions past max_position_embeddings were never trained. Mamba + sliding-window
    layers have no such limit (the state and the window do not grow)."""
    full = bool(config.full_attention_idx) or not config.mamba_enabled
    return config.max_position_embeddings if full else None


@torch.inference_mode()  # like no_grad, minus autograd's version counters: ~10% faster decoding
def generate_text(model, tok, prompts, max_new, temperature=0.0, top_k=None, top_p=None, samples=1, seed=None,
                  stop_text=(), batch=64, on_text=None, what="generating"):
    """[[text] * samples] for each prompt (a list of token ids). Prompts of one length go through
    the model as one batch (no padding: the cached decode has no per-row offsets). A row stops at
    EOS, at BOS (PLaMo 2's document separator: a base model that writes it has ended its document)
    and at the chat's end-of-message marker, or once its text holds one of stop_text; the stop
    token is not part of the text. on_text(piece) receives the first prompt's first sample as it
    is generated, in whole characters (streaming). A model with full attention refuses a prompt
    longer than its max_position_embeddings and generates no further than it. A progress line
    (`what`: n/prompts, ETA) tells a person waiting on many prompts how long is left."""
    stop = {tok.eos_id, tok.bos_id, *chat_stops(tok)}
    limit = position_limit(model.config)
    for ids in prompts:
        check_prompt(model, ids)
    device = next(model.parameters()).device
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    per, out = max(1, batch // samples), [None] * len(prompts)
    # one prompt (a chat turn, a probe question): silent, the caller shows its own progress
    p = Progress(what, len(prompts), "prompts", first=5.0 if len(prompts) > 1 else math.inf)
    for _, group in itertools.groupby(order, key=lambda i: len(prompts[i])):
        group = list(group)
        for part in (group[k:k + per] for k in range(0, len(group), per)):
            idx = torch.tensor([prompts[i] for i in part for _ in range(samples)], device=device)   # (b, T)
            steps = max_new if limit is None else min(max_new, limit - idx.shape[1])
            rows = [IncrementalDecoder(tok) for _ in range(len(idx))]
            done = [False] * len(idx)
            stream = on_text if on_text and part[0] == 0 else None
            for step in model.generate(idx, steps, temperature, top_k, top_p, seed, stop_ids=stop,
                                       vocab_size=tok.vocab_size):
                for r, t in enumerate(step.tolist()):                                          # step: (b,)
                    done[r] = done[r] or t in stop
                    if not done[r]:
                        piece = rows[r].add(t)
                        if r == 0 and stream and piece:
                            stream(piece)
                        done[r] = any(s in rows[r].text[-4 * len(s) - 8:] for s in stop_text)
                if all(done):
                    break
            for r, d in enumerate(rows):
                rest = d.flush()
                if r == 0 and stream and rest:
                    stream(rest)
            for k, i in enumerate(part):
                out[i] = [d.text for d in rows[k * samples:(k + 1) * samples]]
            p.update(len(part))
    p.done()
    return out


def check_prompt(model, ids):
    """One clear error for a prompt longer than a full-attention model's trained positions."""
    limit = position_limit(model.config)
    if limit is not None and len(ids) > limit:
        raise ValueError(f"the prompt is {len(ids)} tokens, more than this model's max_position_embeddings "
                         f"({limit}), past which its full-attention layers were not trained")


def chat_stops(tok):
    """The chat's end-of-message marker, where the tokenizer can render a chat."""
    try:
        return [chat_markers(tok)[1]]
    except ValueError:
        return []


def token_losses(logits, targets):
    """(b, t) next-token losses in nats, in fp32; 0 where the target is -1 (ignored: a prompt,
    padding, a masked token). logits (b, t, V), targets (b, t)."""
    return F.cross_entropy(logits.float().transpose(1, 2), targets, ignore_index=-1, reduction="none")


# -----------------------------------------------------------------------------
# Evaluation in bits per byte: the loss over the UTF-8 bytes of the text, which compares models
# with different tokenizers.

def nats_and_bytes(logits, targets, nbytes):
    """The two sums of bits per byte for one batch: the next-token losses in nats and the UTF-8
    bytes of the targets, both without special tokens (they carry no text) and without targets
    of -1 (ignored positions, as in SFT). logits (b, t, V), targets (b, t), nbytes from
    token_bytes. bits per byte = Σ nats / ln 2 / Σ bytes."""
    y = targets.flatten()
    loss = token_losses(logits, targets).flatten()                                             # (b*t,)
    b = torch.where(y >= 0, nbytes.to(y.device)[y.clamp(min=0)], 0)
    return (loss * (b > 0)).sum().double(), b.sum().double()


@torch.inference_mode()
def bits_per_byte(model, tokens, nbytes, seq_len, max_tokens, batch=8):
    """Summed next-token losses (nats -> bits) over the UTF-8 bytes of the target tokens, in
    windows of seq_len; special tokens are left out of both sums."""
    n = min(len(tokens) - 1, max_tokens) // seq_len
    if n < 1:
        raise ValueError(f"bits per byte needs at least {seq_len + 1} validation tokens, got {min(len(tokens), max_tokens)}")
    device = next(model.parameters()).device
    nats = total = 0.0
    p = Progress("bits per byte", n, "windows")
    for first in range(0, n, batch):
        w = torch.stack([torch.from_numpy(tokens[i * seq_len:(i + 1) * seq_len + 1].astype("int64"))
                         for i in range(first, min(first + batch, n))]).to(device)  # (b, seq_len + 1)
        logits, _ = model(w[:, :-1])                                               # (b, seq_len, V)
        batch_nats, batch_bytes = nats_and_bytes(logits, w[:, 1:], nbytes)
        nats += batch_nats.item()
        total += batch_bytes.item()
        p.update(min(batch, n - first))
    p.done()
    return nats / math.log(2) / total
