"""
infer.py: running a PLaMo 2 checkpoint: generation, weight-only quantization, export, benchmarks.
(The long-context recall probe is probe.py.)

    python infer.py --ckpt out/tiny/ckpt --prompt "東京は"                 # stream a continuation
    python infer.py --ckpt out/tiny/ckpt --chat                           # a conversation (chat models)
    python infer.py --ckpt out/tiny/ckpt --quant int4 --out out/tiny/q4   # save a quantized checkpoint
    python infer.py --ckpt out/tiny/q4 --prompt "The"                     # ... and run it
    python infer.py --ckpt out/tiny/ckpt --export-hf out/tiny/hf           # the layout vLLM loads
    python infer.py --ckpt out/tiny/ckpt --bench                          # speed, memory, bits per byte

Read top to bottom, this file is the story of the stage:
  1. Loading: our checkpoints (train.py) and downloaded Hugging Face PLaMo 2 directories, both
     through plamo2.py; quantized checkpoints rebuild their quantized layers from config.json.
  2. Quantization, weight-only, in plain PyTorch: int8 per output row (symmetric) and int4 per
     group of input columns (asymmetric, two values per byte). The Mamba out_proj, dt_proj and
     the tied embedding / lm_head stay in full precision by default (see quant_targets).
  3. Generation: plamo2.generate_text (the cached decoder: constant-size Mamba state, windowed
     KV) streamed as text; several samples of one prompt run as one batch; chat in the template.
  4. Export to the Hugging Face layout (unquantized).
  5. Bench: prefill and decode speed against context length, cached vs recomputed decoding,
     and none / int8 / int4 side by side: memory, speed and validation bits per byte.
"""
import argparse
import copy
import io
import json
import math
import os
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import corpus
import data
from common import (check_output, cli, nonneg_float, nonneg_int, positive_int, progress, resolve_device,
                    resolve_dtype, side_by_side, spread_warning, unit_float)
from plamo2 import (PLaMo2, PLaMo2Config, PRESETS, bits_per_byte, check_finite, check_tensors,
                    check_prompt, check_tokenizer, find_checkpoint, generate_text, hf_name, history_after, load_config, position_limit, read_lineage, read_safetensors,
                    save_checkpoint, stored_specs)
from tokenizer import load_tokenizer, render_chat, token_bytes

# -----------------------------------------------------------------------------------------------
# 1. Loading

def load(path, device="cpu", dtype=torch.float32):
    """(model, tokenizer) from a checkpoint directory: ours, a released PLaMo 2 one, or one that
    quantize() + save_quantized() wrote (config.json then has a "quantization" entry).

    Quantized weights keep their stored integer/fp32 form; every other float tensor gets dtype.
    model.quantization is that entry, or None.
    """
    path = find_checkpoint(path)
    config = load_config(path, allow_quantized=True)  # one clear sentence for a missing directory or another architecture
    quant = config.extra.pop("quantization", None)
    model = PLaMo2.from_hf(path, device=device, dtype=dtype) if quant is None else \
        load_quantized(path, config, quant, device, dtype)
    model.quantization = quant
    tok = load_tokenizer(path)
    check_tokenizer(path, config, tok)
    check_finite({k: v for k, v in model.state_dict().items() if v.is_floating_point()}, f"checkpoint {path}")
    return model.eval(), tok


def load_quantized(path, config, quant, device, dtype):
    """Build the model on the meta device, swap in empty quantized layers where the entry says,
    then fill every tensor from the files (assign=True: nothing is allocated twice)."""
    if not (isinstance(quant, dict) and quant.get("method") in QUANT_TYPES and isinstance(quant.get("modules"), list)
            and (quant["method"] != "int4" or isinstance(quant.get("group_size"), int))):
        raise ValueError(f"{path}/config.json has a quantization entry this script cannot read: {quant!r}")
    with torch.device("meta"):
        model = PLaMo2(config)
        linears = {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
        unknown = [n for n in quant["modules"] if n not in linears]
        if unknown:
            raise ValueError(f"{path}/config.json quantizes layers the model does not have: {unknown[:5]}")
        cls = QUANT_TYPES[quant["method"]]
        for name in quant["modules"]:
            lin = model.get_submodule(name)
            set_module(model, name, cls(lin.in_features, lin.out_features, quant.get("group_size")))
    tied = config.tie_word_embeddings and "lm_head" not in quant["modules"]
    names = {hf_name(k): k for k in model.state_dict() if not (tied and k == "lm_head.weight")}
    shapes = model.state_dict()
    specs = stored_specs(path)
    if tied:
        specs.pop("lm_head.weight", None)
    quantized = set(quant["modules"])
    # Integer tensors belong to the quantized layers only (qweight); check those by shape alone.
    as_float = {n: ("F32" if k.rpartition(".")[0] in quantized else d, s) for (n, (d, s)), k in
                ((item, names.get(item[0], "")) for item in specs.items())}
    check_tensors(path, {h: shapes[k].shape for h, k in names.items()}, as_float)
    stored = read_safetensors(path)
    state = {}
    for h, k in names.items():
        t = stored[h]
        if t.is_floating_point() and k.rpartition(".")[0] not in quantized:  # scales stay fp32
            t = t.to(dtype)
        state[k] = t.to(device)
    if tied:
        state["lm_head.weight"] = state["embed_tokens.weight"]
    model.load_state_dict(state, assign=True)
    if tied:
        model.tie_weights()  # assign=True replaced the shared Parameter with two
    return model


def set_module(model, name, module):
    """model.<name> = module, for a dotted name such as "layers.0.mixer.in_proj"."""
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


# -----------------------------------------------------------------------------------------------
# 2. Quantization: weights stored as small integers, multiplied as integers on CPU (int8), by
#    PyTorch's int4 kernel (int4 on CPU), or dequantized on the fly elsewhere.
#
# int8, per output row, symmetric:     W[n, :] ≈ q[n, :] · s[n],            s[n] = max|W[n, :]| / 127
# int4, per group of G input columns,  W[n, g] ≈ q[n, g] · s[n, g] + m[n, g],
#       asymmetric:                    s = (max - min) / 15,  m = min  (the zero point, kept as the
#                                      float value q = 0 stands for, so the bound holds for any group)
# Rounding to the nearest level puts every weight within half a step of its value: |W - Ŵ| ≤ s/2.

INT8_MM = "auto"  # "auto" | "int" | "plain": which int8 matmul to use (see Int8Linear.forward); tests force each
INT4_MM = "auto"  # "auto" | "plain": the CPU int4 kernel where it applies, or dequantize and multiply

def quantize_int8(w):
    """(q int8 (N, K), scales fp32 (N,)) with w ≈ q * scales[:, None].

    >>> q, s = quantize_int8(torch.tensor([[0.5, -1.0, 0.25]]))
    >>> q.tolist(), s.tolist()
    ([[64, -127, 32]], [0.007874015718698502])
    """
    w = w.float()
    amax = w.abs().amax(dim=1)                                            # (N,)
    scales = torch.where(amax > 0, amax / 127, torch.ones_like(amax))     # an all-zero row: any scale
    q = torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8)  # (N, K)
    return q, scales


def quantize_int4(w, group_size):
    """(packed uint8 (N, K/2), scales (N, K/G), mins (N, K/G)) with
    w[:, j] ≈ q[:, j] * scales[:, j // G] + mins[:, j // G], q in 0..15.

    >>> p, s, m = quantize_int4(torch.tensor([[0.0, 1.5, 0.3, 0.9]]), group_size=4)
    >>> unpack_int4(p).tolist(), s.tolist(), m.tolist()
    ([[0, 15, 3, 9]], [[0.10000000149011612]], [[0.0]])
    """
    N, K = w.shape
    g = w.float().view(N, K // group_size, group_size)                   # (N, K/G, G)
    lo, hi = g.amin(dim=-1), g.amax(dim=-1)                               # (N, K/G)
    scales = torch.where(hi > lo, (hi - lo) / 15, torch.ones_like(hi))   # a constant group: q = 0
    q = torch.round((g - lo[..., None]) / scales[..., None]).clamp(0, 15).to(torch.uint8)
    return pack_int4(q.view(N, K)), scales, lo


def pack_int4(q):
    """Two 4-bit values per byte: column 2j in the low nibble, column 2j+1 in the high one.

    >>> pack_int4(torch.tensor([[1, 2, 15, 0]], dtype=torch.uint8)).tolist()
    [[33, 15]]
    """
    return q[:, 0::2] | (q[:, 1::2] << 4)                                 # (N, K/2)


def unpack_int4(packed):
    """The inverse of pack_int4: (N, K/2) bytes -> (N, K) values 0..15."""
    return torch.stack([packed & 15, packed >> 4], dim=-1).flatten(-2)   # (N, K)


class Int8Linear(nn.Module):
    """A bias-free nn.Linear with int8 weights and one fp32 scale per output row: 8 + 32/K bits a
    weight, about a quarter of fp32."""

    def __init__(self, in_features, out_features, group_size=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("scales", torch.ones(out_features))

    @classmethod
    def from_linear(cls, linear, group_size=None):
        m = cls(linear.in_features, linear.out_features)
        m.qweight, m.scales = quantize_int8(linear.weight.detach())
        return m.to(linear.weight.device)

    def dequantize(self, dtype=torch.float32):
        return self.qweight.to(dtype) * self.scales[:, None].to(dtype)   # (N, K)

    def forward(self, x):
        if INT8_MM == "int" or (INT8_MM == "auto" and x.device.type == "cpu"):
            return int8_matmul(x, self.qweight, self.scales)
        # Elsewhere (CUDA, MPS), dequantize into x's dtype and multiply. The weight is scaled
        # first: in fp16 the unscaled sums x·q (up to 127·K·|x|) would overflow.
        return F.linear(x, self.dequantize(x.dtype))


def int8_matmul(x, qweight, scales):
    """x Ŵᵀ for Ŵ = qweight · scales (int8 (N, K), fp32 (N,)) with integer matrix products, on CPU.

    Decoding reads every weight once per token, so it is memory-bound: an int8 weight must be
    read as int8, not first converted to a float copy (4x the bytes, and an allocation each
    call). So x is written as two int8 terms per row, x ≈ s1·q1 + s2·q2, the second quantizing
    what the first left over: |x - x̂| <= max|x| / (2·127·254), as precise as a 16-bit fixed-point
    activation, far below the weights' own rounding. Then y = (s1·(q1 qᵀ) + s2·(q2 qᵀ)) · scales,
    with exact int32 products (torch._int_mm, oneDNN's int8 GEMM).

    >>> q, s = quantize_int8(torch.tensor([[0.5, -1.0, 0.25]]))
    >>> int8_matmul(torch.tensor([[2.0, 1.0, 4.0]]), q, s)  # = 2(0.504) - 1.0 + 4(0.252)
    tensor([[1.0158]])
    """
    rows = x.reshape(-1, x.shape[-1]).float()                             # (M, K)
    terms, scale = [], []
    for _ in range(2):
        amax = rows.abs().amax(dim=1, keepdim=True)                       # (M, 1)
        s = torch.where(amax > 0, amax / 127, torch.ones_like(amax))
        q = torch.round(rows / s)
        terms.append(q.to(torch.int8))
        scale.append(s)
        rows = rows - q * s                                               # what is left for the next term
    qt = qweight.t()                                                      # (K, N), a view
    if terms[0].shape[0] == 1:  # one row: two matrix-vector products (oneDNN's fastest case)
        y = scale[0] * torch._int_mm(terms[0], qt) + scale[1] * torch._int_mm(terms[1], qt)
    else:                       # several rows: one product for both terms
        both = torch._int_mm(torch.cat(terms), qt)                        # (2M, N) int32
        y = scale[0] * both[:len(both) // 2] + scale[1] * both[len(both) // 2:]
    return (y * scales).to(x.dtype).view(*x.shape[:-1], qweight.shape[0])


class Int4Linear(nn.Module):
    """A bias-free nn.Linear with 4-bit weights and an fp32 scale and minimum per group of G input
    columns: 4 + 64/G bits a weight, 5 at G = 64 (0.156x fp32).

    On CPU it multiplies with PyTorch's int4 kernel (torch._weight_int4pack_mm_for_cpu, tinygemm's
    w = (q - 8)·scale + zero, bf16 activations and scales): ~8x a fp32 matmul for one row, faster
    than fp32 for a prompt too. That kernel wants its weight in a tile layout that depends on the
    CPU's instruction set, so the checkpoint keeps ours (qweight, scales, mins) and the kernel's copy
    is made on first use: in memory, int4 layers on CPU take twice their stored bytes. Elsewhere,
    or for shapes the kernel does not take (G not 32/64/128/256, outputs not a multiple of 16),
    each call dequantizes into a temporary and multiplies.
    """

    def __init__(self, in_features, out_features, group_size=64):
        super().__init__()
        if in_features % group_size or group_size % 2:
            raise ValueError(f"int4 needs an even group_size that divides in_features ({in_features}), got {group_size}")
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        groups = in_features // group_size
        self.register_buffer("qweight", torch.zeros(out_features, in_features // 2, dtype=torch.uint8))
        self.register_buffer("scales", torch.ones(out_features, groups))
        self.register_buffer("mins", torch.zeros(out_features, groups))
        # The CPU kernel's copy: not saved, made by cpu_matmul
        self.register_buffer("cpu_packed", None, persistent=False)
        self.register_buffer("cpu_scales_zeros", None, persistent=False)

    @classmethod
    def from_linear(cls, linear, group_size=64):
        m = cls(linear.in_features, linear.out_features, group_size)
        m.qweight, m.scales, m.mins = quantize_int4(linear.weight.detach(), group_size)
        return m.to(linear.weight.device)

    def dequantize(self, dtype=torch.float32):
        N, G = self.out_features, self.group_size
        q = unpack_int4(self.qweight).to(dtype).view(N, -1, G)           # (N, K/G, G)
        w = q * self.scales[..., None].to(dtype) + self.mins[..., None].to(dtype)
        return w.view(N, self.in_features)                                # (N, K)

    def forward(self, x):
        kernel_fits = self.group_size in (32, 64, 128, 256) and self.out_features % 16 == 0
        if x.device.type == "cpu" and INT4_MM == "auto" and kernel_fits:
            return self.cpu_matmul(x)
        return F.linear(x, self.dequantize(x.dtype))

    def cpu_matmul(self, x):
        if self.cpu_packed is None:
            self.cpu_packed = torch._convert_weight_to_int4pack_for_cpu(unpack_int4(self.qweight).int(), 1)
            zeros = self.mins + 8 * self.scales                           # w = q·s + m = (q - 8)·s + zero
            self.cpu_scales_zeros = torch.stack([self.scales.t(), zeros.t()], dim=-1).to(torch.bfloat16).contiguous()
        rows = x.reshape(-1, self.in_features).to(torch.bfloat16).contiguous()     # (M, K)
        y = torch._weight_int4pack_mm_for_cpu(rows, self.cpu_packed, self.group_size, self.cpu_scales_zeros)
        return y.to(x.dtype).view(*x.shape[:-1], self.out_features)


QUANT_TYPES = {"int8": Int8Linear, "int4": Int4Linear}


def quant_targets(model, mode, group_size=64, out_proj=False, head=False):
    """Names of the nn.Linear layers quantize() replaces. Kept in full precision by default:
    - lm_head: tied to the embedding, so a quantized copy would add memory, not save it;
    - every Mamba out_proj: PLaMo 2's own low-bit recipe keeps it in 16 bits (8-bit out_proj was
      seen to break generation in practice);
    - dt_proj: tiny (R -> Nh), and its output goes through softplus and exp(Δ·A) into the decay
      of the state, so an error there compounds over every later token.
    int4 also skips a layer whose in_features is not a multiple of group_size.
    """
    names = []
    for name, m in model.named_modules():
        if not isinstance(m, nn.Linear):
            continue
        leaf = name.rpartition(".")[2]
        if (name == "lm_head" and not head) or leaf == "dt_proj" or (leaf == "out_proj" and not out_proj):
            continue
        if mode == "int4" and m.in_features % group_size:
            continue
        names.append(name)
    return names


def quantize(model, mode, group_size=64, out_proj=False, head=False):
    """Replace the nn.Linear layers named by quant_targets with Int8Linear / Int4Linear, in place;
    returns the model, with model.quantization = the entry save_quantized writes to config.json."""
    if mode not in QUANT_TYPES:
        raise ValueError(f"unknown quantization {mode!r}; use int8 or int4")
    if getattr(model, "quantization", None):
        raise ValueError(f"the model is already quantized ({model.quantization['method']}); quantize the original")
    if mode == "int4" and (group_size < 2 or group_size % 2):
        raise ValueError(f"--group-size must be a positive even number, got {group_size}")
    names = quant_targets(model, mode, group_size, out_proj, head)
    for name in progress(names, f"quantizing to {mode}", unit="layers"):
        set_module(model, name, QUANT_TYPES[mode].from_linear(model.get_submodule(name), group_size))
    model.quantization = {"method": mode, "group_size": group_size if mode == "int4" else None, "modules": names}
    return model


def save_quantized(model, tok, src, out):
    """A checkpoint directory, written whole and swapped in: config.json with the "quantization"
    entry, safetensors of every tensor (the quantized layers as qweight / scales (/ mins)), the
    tokenizer's files, and a lineage naming the source."""
    model.config.extra["quantization"] = model.quantization
    lineage = {**(read_lineage(src) or {}), "stage": model.quantization["method"], "parent": os.path.realpath(src),
               "history": history_after(os.path.realpath(src), read_lineage(src))}
    try:
        save_checkpoint(out, model, tok, lineage)  # the state dict holds the quantized layers' buffers by name
    finally:
        del model.config.extra["quantization"]


def tensor_bytes(tensors):
    """Bytes of the distinct tensors (the tied embedding / lm_head counts once)."""
    seen, total = set(), 0
    for t in tensors:
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


# -----------------------------------------------------------------------------------------------
# 3. Generation

def print_piece(piece):
    print(piece, end="", flush=True)


def complete(model, tok, ids, args, on_text=None):
    """generate_text with the command line's sampling settings: args.num_samples continuations of
    one prompt (token ids), run as one batch."""
    return generate_text(model, tok, [ids], args.max_new_tokens, args.temperature, args.top_k or None, args.top_p,
                         args.num_samples, args.seed, on_text=on_text)[0]


def run_prompt(model, tok, args):
    ids = tok.encode(args.prompt, bos=True)
    check_prompt(model, ids)  # before anything is printed
    if args.num_samples == 1:
        print(args.prompt, end="", flush=True)
        complete(model, tok, ids, args, on_text=print_piece)
        print()
        return
    for i, text in enumerate(complete(model, tok, ids, args)):
        print(f"--- sample {i + 1} of {args.num_samples} ---")
        print(args.prompt + text)


def run_chat(model, tok, args):
    """Read lines from stdin until EOF, an empty line or "exit". A chat model (its config names a
    chat_template) answers each in the template, with the whole conversation so far, streaming
    the answer until its end-of-message marker; a base model continues each line on its own."""
    chat = model.config.chat_template is not None
    print("chat (" + (f"template {model.config.chat_template}, keeps the conversation" if chat else
                      "a base model: plain continuation of each line") + "); an empty line or 'exit' ends",
          file=sys.stderr)
    history = []
    # Bytes that are not UTF-8 (a binary file piped in) become U+FFFD instead of an endless error.
    stdin = io.TextIOWrapper(sys.stdin.buffer, encoding="utf-8", errors="replace") if hasattr(sys.stdin, "buffer") \
        else sys.stdin
    while True:
        print("> ", end="", flush=True)
        line = stdin.readline()
        if not line or line.strip() in ("", "exit"):
            print()
            return
        line = line.rstrip("\n")
        if not chat:
            complete(model, tok, tok.encode(line, bos=True), args, on_text=print_piece)
            print()
            continue
        history.append({"role": "user", "content": line})
        ids = render_chat(tok, history, generation_prompt=True)[0]
        history.append({"role": "assistant", "content": complete(model, tok, ids, args, on_text=print_piece)[0]})
        print()


# -----------------------------------------------------------------------------------------------
# 4. Export: the Hugging Face PLaMo 2 layout, unquantized

def export_hf(model, tok, src, out):
    """Write model in the Hugging Face layout (config.json + safetensors, names as in the released
    checkpoints) with the tokenizer's files to out. config.json keys that PLaMo2Config does not model
    (auto_map, tokenizer_class, ...) are carried over from src (config.extra), so a released model's
    remote code still finds its classes. A quantized model is refused: its dequantized weights would
    look like full precision while carrying the rounding error; export from the original."""
    if getattr(model, "quantization", None):
        raise ValueError("--export-hf writes full-precision weights; export the unquantized checkpoint instead")
    save_checkpoint(out, model, tok, {**(read_lineage(src) or {}), "stage": "export", "parent": os.path.realpath(src),
                                      "history": history_after(os.path.realpath(src), read_lineage(src))})
    with open(os.path.join(out, "config.json")) as f:
        config = json.load(f)

    # vLLM runs PLaMo 2 with its own Plamo2ForCausalLM, but reads config.json (and the tokenizer)
    # through PLaMo 2's Hugging Face remote code, as it does for pfnet/plamo-2-1b.
    print(f"exported {out} (Hugging Face PLaMo 2 layout, architectures {config['architectures']}).")
    if "auto_map" in config and os.path.exists(os.path.join(out, "modeling_plamo.py")):
        print(f"Serve it with vLLM:\n  vllm serve {out} --trust-remote-code")
        return
    tokenizer = os.path.exists(os.path.join(out, "tokenizer.jsonl"))
    print("To serve it with vLLM, which reads a PLaMo 2 config.json through PLaMo 2's remote code, copy "
          f"modeling_plamo.py{', tokenization_plamo.py, tokenizer_config.json' if tokenizer else ''} from "
          f"pfnet/plamo-2-1b into {out} and its \"auto_map\" into {out}/config.json, then:")
    if tokenizer:
        print(f"  vllm serve {out} --trust-remote-code")
    else:
        print(f"  vllm serve {out} --trust-remote-code --skip-tokenizer-init\n"
              "Our byte-level BPE tokenizer has no Hugging Face version: send token ids (prompt_token_ids)\n"
              "encoded with plamo2.load_tokenizer; vLLM loads the weights and config as they are.")


# -----------------------------------------------------------------------------------------------
# 5. Bench

def decode_seconds(model, prompt, steps=32):
    """Seconds of `steps` decoding steps of model.generate after prefilling prompt (1, T): the real path."""
    gen = model.generate(prompt, steps + 1, temperature=0)
    next(gen)  # prefill and the first token
    t0 = time.perf_counter()
    for _ in gen:
        pass
    return time.perf_counter() - t0


def training_seq_len(path, config):
    """The sequence length the checkpoint was trained with (its lineage), else a safe guess."""
    lineage = read_lineage(find_checkpoint(path)) or {}
    return lineage.get("loop", {}).get("seq_len") or min(config.max_position_embeddings, 2048)


def validation_tokens(args, tok):
    """(validation tokens, where they come from): --bench-data (data prepared by data.py, one of its
    .bin shards, or a UTF-8 text file, encoded here), else the validation split of the text the checkpoint's lineage
    records; (None, why not) when there is none."""
    if args.bench_data:
        if data.is_prepared(args.bench_data):
            return data.open_prepared(args.bench_data, tok)[2], args.bench_data
        if args.bench_data.endswith(".bin") and os.path.isfile(args.bench_data):  # a shard of prepared data
            tokens = np.memmap(args.bench_data, dtype=data.token_dtype(tok.vocab_size), mode="r")
            if len(tokens) and int(tokens.max()) >= tok.vocab_size:
                raise ValueError(f"{args.bench_data} holds token ids beyond this tokenizer's {tok.vocab_size}: it was "
                                 f"made with another one")
            return tokens, args.bench_data
        if not os.path.isfile(args.bench_data):
            raise FileNotFoundError(f"--bench-data {args.bench_data}: no prepared data (data.py) or text file there")
        text = "\n".join(corpus.load_text(args.bench_data))
        return np.array(tok.encode(text, bos=True), dtype=np.int64), args.bench_data
    text = (read_lineage(find_checkpoint(args.ckpt)) or {}).get("text")
    if text and data.is_prepared(text):
        return data.open_prepared(text, tok)[2], f"the validation split of {text}"
    return None, "no validation text (the checkpoint's lineage records none; give --bench-data)"


@torch.inference_mode()
def bench(model, tok, args):
    """Speed against context length (a checkpoint only), then none / int8 / int4 side by side.
    tok None: random weights of a preset (--size), speed only. Every timing is the median of
    several, interleaved; a warning says when their spread makes the ratios unreliable."""
    if model.quantization:
        raise ValueError("--bench quantizes the model itself; give it the unquantized checkpoint")
    cfg = model.config
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    n_mamba = sum(cfg.is_mamba(i) for i in range(cfg.num_hidden_layers))
    print(f"bench: {args.ckpt or f'random weights of the {args.size} preset'}: {model.num_params() / 1e6:.1f}M "
          f"parameters, {n_mamba} Mamba + {cfg.num_hidden_layers - n_mamba} attention layers (window "
          f"{cfg.attention_window_size}, full attention in {cfg.full_attention_idx or 'none'}) | {device} "
          f"{str(dtype)[6:]}, {torch.get_num_threads()} threads", flush=True)
    gen = torch.Generator().manual_seed(0)
    longest = 4096
    vocab = tok.vocab_size if tok is not None else cfg.vocab_size
    ids = torch.randint(0, vocab, (1, longest), generator=gen).to(device)  # speed only
    tokens, steps = None, 32
    if tok is not None:
        limit = position_limit(cfg) or math.inf
        if limit < 128 + steps + 1:
            raise ValueError(f"--bench needs max_position_embeddings >= 161 for a model with full attention, got {limit}")
        contexts = [c for c in (128, 512, 1024, longest) if c + steps + 1 <= limit]
        n = contexts[-1] if contexts[-1] <= 1024 else 1024
        t = side_by_side({"prefill": lambda: model(ids[:, :n], cache=model.new_cache(), last_only=True)}, repeats=3,
                         what="bench: prefill")["prefill"]
        print(f"prefill: {n} tokens in {t.median * 1e3:.0f} ms = {n / t.median:,.0f} tokens/s (min/median/max "
              f"{t.min * 1e3:.0f}/{t.median * 1e3:.0f}/{t.max * 1e3:.0f} ms)")
        times = side_by_side({c: (lambda c=c: decode_seconds(model, ids[:, :c], steps)) for c in contexts}, repeats=3,
                             what="bench: decoding at each context")
        step = {c: times[c].median / steps for c in contexts}
        print(spread_warning(times) or "", end="\n" if spread_warning(times) else "")
        print(f"decode, {steps} steps after a prefill of " + "".join(f"{c:>10}" for c in contexts) + " tokens")
        print(" " * 19 + "tokens/s" + "".join(f"{1 / step[c]:>10,.0f}" for c in contexts))
        print(" " * 11 + f"vs {contexts[0]} tokens" + "".join(f"{step[contexts[0]] / step[c]:>9.2f}x" for c in contexts))
        for c in sorted({1024 if 1024 in step else contexts[-1], contexts[-1]}):
            t_full = side_by_side({"full": lambda: model(ids[:, :c], last_only=True)}, repeats=3,
                                  what="bench: recomputing")["full"].median  # each step's cost without a cache
            print(f"cached decode vs recomputing the whole prefix, at {c} tokens: {step[c] * 1e3:.1f} ms vs "
                  f"{t_full * 1e3:.1f} ms per token = {t_full / step[c]:.0f}x")
        tokens, where = validation_tokens(args, tok)
        if tokens is not None:
            text = tok.decode([int(t) for t in tokens[:20000] if t not in tok.special.values()])
            t = side_by_side({"encode": lambda: tok.encode(text)}, repeats=3, what="bench: tokenizer")["encode"].median
            print(f"tokenizer: {len(text):,} characters of validation text encoded in {t * 1e3:.0f} ms "
                  f"= {len(text) / t:,.0f} characters/s")
        else:
            print(f"bits per byte: {where}")
    seq_len = (args.seq_len or training_seq_len(args.ckpt, cfg)) if tok is not None else None
    nbytes = token_bytes(tok) if tokens is not None else None
    where = (f"; bits per byte on {min(len(tokens) - 1, args.bench_tokens) // seq_len * seq_len:,} tokens of "
             f"{where} in windows of {seq_len}") if tokens is not None else ""
    models = {mode: model if mode == "none" else quantize(copy.deepcopy(model), mode, args.group_size,
                                                          args.quant_out_proj, args.quant_head)
              for mode in ("none", "int8", "int4")}
    times = side_by_side({mode: (lambda m=m: decode_seconds(m, ids[:, :128], steps)) for mode, m in models.items()},
                         repeats=5, what="bench: none / int8 / int4")
    print(f"\nweight-only quantization (int4 group {args.group_size}), decode after a 128-token prompt, median of 5 "
          f"interleaved runs of {steps} steps{where}")
    warning = spread_warning(times)
    if warning:
        print(warning)
    print(f"{'':6}{'quantized layers':>24}{'model memory':>15}{'decode tok/s':>14}{'min-max':>15}{'vs none':>9}"
          f"{'bits/byte':>11}")
    for mode, m in models.items():
        tps, t = steps / times[mode].median, times[mode]
        # Memory after running: what the kernels keep (int4's CPU copy) counts too.
        names = quant_targets(model, "int8" if mode == "none" else mode, args.group_size, args.quant_out_proj,
                              args.quant_head)
        layers = [m.get_submodule(n) for n in names]
        qbytes = tensor_bytes(t for layer in layers for t in (*layer.parameters(), *layer.buffers()))
        fp32 = sum(layer.in_features * layer.out_features * 4 for layer in layers)
        total = tensor_bytes((*m.parameters(), *m.buffers()))
        bpb = f"{bits_per_byte(m, tokens, nbytes, seq_len, args.bench_tokens):.4f}" if tokens is not None else "-"
        spread = f"{steps / t.max:,.1f}-{steps / t.min:,.1f}"
        print(f"{mode:6}{f'{qbytes / 2**20:.2f} MiB ({qbytes / fp32:.3f}x fp32)':>24}"
              f"{f'{total / 2**20:.1f} MiB':>15}{tps:>14,.2f}{spread:>15}{tps / (steps / times['none'].median):>8.2f}x"
              f"{bpb:>11}")
    print(f"kept in full precision: the embedding / lm_head{'' if not args.quant_head else ' (embedding only)'}, "
          f"{'' if args.quant_out_proj else 'Mamba out_proj, '}dt_proj, conv1d, norms and the SSM parameters")


# -----------------------------------------------------------------------------------------------
# main

def parse_args(argv=None):
    ap = argparse.ArgumentParser(
        description="Run a PLaMo 2 checkpoint (ours, a quantized one, or a released one): generate, chat, quantize, "
                    "export, benchmark (the recall probe: probe.py). Examples: python infer.py --ckpt out/tiny/ckpt "
                    "--prompt 東京は; --quant int8 --out DIR; --export-hf DIR; --bench.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--ckpt", help="checkpoint directory: ours (train.py), a quantized one "
                                   "(--out), or a downloaded Hugging Face PLaMo 2")
    ap.add_argument("--prompt", help="continue this text, streamed as it is generated")
    ap.add_argument("--chat", action="store_true",
                    help="read lines from stdin: a chat model answers each in its template, keeping the "
                         "conversation; a base model continues each line; an empty line, 'exit' or EOF ends")
    ap.add_argument("--max-new-tokens", type=nonneg_int, default=128, help="tokens to generate at most")
    ap.add_argument("--temperature", type=nonneg_float, default=0.8, help="sampling temperature; 0 = greedy")
    ap.add_argument("--top-k", type=nonneg_int, default=0, help="sample from the k most likely tokens (0 = all)")
    ap.add_argument("--top-p", type=unit_float, default=0.95, help="nucleus sampling: the smallest set with this mass")
    ap.add_argument("--seed", type=nonneg_int, help="seed for sampling (default: different every run)")
    ap.add_argument("--num-samples", type=positive_int, default=1, help="continuations of the prompt, run as one batch")
    ap.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, mps")
    ap.add_argument("--dtype", default="auto", help="auto (bf16 on CUDA, fp32 elsewhere), float32, bfloat16")
    ap.add_argument("--quant", choices=["none", "int8", "int4"], default="none",
                    help="weight-only quantization: int8 per output row, int4 per group of input columns")
    ap.add_argument("--group-size", type=positive_int, default=64, help="input columns per int4 scale and minimum")
    ap.add_argument("--quant-out-proj", action="store_true", help="quantize the Mamba out_proj too (sensitive)")
    ap.add_argument("--quant-head", action="store_true", help="quantize lm_head too (unties it from the embedding)")
    ap.add_argument("--out", help="with --quant: write the quantized checkpoint to this directory")
    ap.add_argument("--export-hf", metavar="OUT", help="write the (unquantized) model in the Hugging Face layout")
    ap.add_argument("--overwrite", action="store_true", help="replace a checkpoint already in --out / --export-hf")
    ap.add_argument("--bench", action="store_true", help="speed against context length, cached vs recomputed "
                                                         "decoding, and none / int8 / int4 side by side")
    ap.add_argument("--bench-data", help="validation text: data prepared by data.py (or one .bin shard of it), or a "
                                         "UTF-8 text file "
                                         "(default: the validation split of the checkpoint's own text)")
    ap.add_argument("--bench-tokens", type=positive_int, default=32768, help="validation tokens for bits per byte")
    ap.add_argument("--seq-len", type=positive_int, help="with --bench: windows of this many tokens for bits per byte "
                                                         "(default: the length the checkpoint was trained with)")
    ap.add_argument("--size", help=f"with --bench instead of --ckpt: random weights of a preset ({', '.join(PRESETS)}), "
                                   "speed and memory of none / int8 / int4 only")
    args = ap.parse_args(argv)
    if (args.ckpt is None) == (args.size is None) or (args.size and not args.bench):
        ap.error("give --ckpt (or, for --bench alone, --size and random weights of a preset)")
    if args.size and (args.prompt is not None or args.chat or args.export_hf or args.out):
        ap.error("--size gives random weights for --bench only")
    if args.size is not None and args.size not in PRESETS:
        ap.error(f"unknown size {args.size!r}; choose one of {', '.join(PRESETS)}")
    if not (args.prompt is not None or args.chat or args.bench or args.export_hf or args.out):
        ap.error("nothing to do: give --prompt, --chat, --bench, --export-hf or --quant with --out "
                 "(the recall probe is python probe.py)")
    if args.out and args.quant == "none":
        ap.error("--out writes a quantized checkpoint: add --quant int8 or --quant int4")
    if args.top_p == 0:
        ap.error("--top-p must be above 0")
    return args


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--probe" in argv:  # the recall probe moved to probe.py
        print("note: `infer.py --probe recall` is now `probe.py`", file=sys.stderr)
        k = argv.index("--probe")
        import probe
        return probe.main(argv[:k] + argv[k + 2:])
    args = parse_args(argv)
    cli(lambda: run(args))


def run(args):
    if args.export_hf and args.quant != "none":
        raise ValueError("--export-hf writes the unquantized model; drop --quant (or save it with --out)")
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    src = args.ckpt and find_checkpoint(args.ckpt)
    for flag, out in (("--out", args.out), ("--export-hf", args.export_hf)):
        if out:
            check_output(out, flag, [("--ckpt", src)])
            if os.path.exists(os.path.join(out, "config.json")) and not args.overwrite:
                raise ValueError(f"{flag} {out} holds a checkpoint already: give another directory, or --overwrite")
            if os.path.isdir(out) and any(os.path.exists(os.path.join(out, n)) for n in ("ckpt", "log.jsonl")):
                raise ValueError(f"{flag} {out} holds a training run: a checkpoint written there would sit beside "
                                 f"that run's state; give another directory")
    if args.size:
        torch.manual_seed(0)
        model = PLaMo2(PLaMo2Config.from_preset(args.size)).to(device, dtype).eval()
        model.quantization = None
        return bench(model, None, args)
    model, tok = load(src, device, dtype)
    cfg = model.config
    n_mamba = sum(cfg.is_mamba(i) for i in range(cfg.num_hidden_layers))
    q = model.quantization
    quant = f"{q['method']} ({len(q['modules'])} layers)" if q else "none"
    print(f"model: {args.ckpt}: {cfg.num_hidden_layers} layers ({n_mamba} Mamba), hidden {cfg.hidden_size}, "
          f"vocab {cfg.vocab_size}, window {cfg.attention_window_size}, max_position_embeddings "
          f"{cfg.max_position_embeddings} | {device} {str(dtype)[6:]} | quantization: {quant}", file=sys.stderr)
    if args.quant != "none":
        if q:
            raise ValueError(f"{args.ckpt} is already quantized ({q['method']}); --quant needs an unquantized checkpoint")
        if args.bench:
            raise ValueError("--bench compares none / int8 / int4 by itself; drop --quant")
        quantize(model, args.quant, args.group_size, args.quant_out_proj, args.quant_head)
        print(f"quantized {len(model.quantization['modules'])} layers to {args.quant}", file=sys.stderr)
    if args.out:
        save_quantized(model, tok, src, args.out)
        print(f"wrote the {args.quant} checkpoint to {args.out}\nnext: python infer.py --ckpt {args.out} --prompt ...",
              file=sys.stderr)
    if args.export_hf:
        export_hf(model, tok, src, args.export_hf)
    if args.bench:
        bench(model, tok, args)
    if args.prompt is not None:
        run_prompt(model, tok, args)
    if args.chat:
        run_chat(model, tok, args)


if __name__ == "__main__":
    main()
