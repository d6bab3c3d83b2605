"""Structured pruning of a trained PLaMo 2, Minitron-style and Mamba-aware.

    python prune.py --ckpt out/tiny/ckpt --out out/tiny-pruned --hidden-size 192 --intermediate-size 512 \
        --mamba-num-heads 6 --num-attention-heads 2 --num-key-value-heads 1

The story, one function each:
1. calibrate: forward hooks over training windows, no gradients; a channel's score is the L2 norm
   over the samples of its sequence-mean |activation| (Minitron). Also 1 - cos(input, output) of
   every block, for depth.
2. plan: which channels, heads and layers to keep for the target sizes.
3. cut: a new config and the state dict sliced to it, an ordinary PLaMo 2 checkpoint.
(Distillation through the shared loop is the next step of issue #9 and is not built yet.)
"""
import argparse
import os
import sys

import torch
import torch.nn.functional as F

import train
from plamo2 import PLaMo2, PLaMo2Config


# -----------------------------------------------------------------------------------------------
# 1. Calibration

@torch.no_grad()
def calibrate(model, windows):
    """Importance statistics of `model` over `windows` (a list of (1, t) token tensors), in fp32.

    Returns {"mlp": [per layer (F,)], "attn": [per attention layer (Hq,) or None], "mamba": [per
    Mamba layer (Nh,) or None], "hidden": (H,), "layer": (L,)}. Each channel's score is
    sqrt(sum over windows of mean_t |a|^2), a = the activation feeding the projection that the
    channel is an input of (down_proj, o_proj, the x part of Mamba's in_proj; a head's channels
    by their L2 norm); hidden channels on every pre-norm output, the scores summed over the norms;
    a layer by 1 - cos(input, output), its mean over tokens and windows."""
    cfg, layers = model.config, model.layers
    L = len(layers)
    acc = {"mlp": [0.0] * L, "attn": [None if b.is_mamba else 0.0 for b in layers],
           "mamba": [0.0 if b.is_mamba else None for b in layers], "hidden": [0.0] * (2 * L), "layer": torch.zeros(L)}
    hooks = []

    def add(kind, i, value):  # value (n,): this window's sequence-mean |activation|
        acc[kind][i] = acc[kind][i] + value.double() ** 2

    for i, block in enumerate(layers):
        hooks.append(block.mlp.down_proj.register_forward_pre_hook(
            lambda m, a, i=i: add("mlp", i, a[0].float().abs().mean((0, 1)))))
        if block.is_mamba:
            Nh, P = block.mixer.Nh, block.mixer.P
            hooks.append(block.mixer.in_proj.register_forward_hook(   # x of each head, before the conv
                lambda m, a, out, i=i, Nh=Nh, P=P: add("mamba", i, out.float().view(*out.shape[:2], Nh, 2 * P)
                                                       [..., P:].abs().mean((0, 1)).norm(dim=-1))))
        else:
            Hq, P = block.mixer.Hq, block.mixer.P
            hooks.append(block.mixer.o_proj.register_forward_pre_hook(
                lambda m, a, i=i, Hq=Hq, P=P: add("attn", i, a[0].float().view(*a[0].shape[:2], Hq, P)
                                                  .abs().mean((0, 1)).norm(dim=-1))))
        for j, norm in enumerate((block.pre_mixer_norm, block.pre_mlp_norm)):
            hooks.append(norm.register_forward_hook(
                lambda m, a, out, j=2 * i + j: add("hidden", j, out.float().abs().mean((0, 1)))))
        hooks.append(block.register_forward_hook(
            lambda m, a, out, i=i: acc["layer"].__setitem__(
                i, acc["layer"][i] + (1 - F.cosine_similarity(a[0].float(), out.float(), dim=-1)).mean())))
    try:
        model.eval()
        for idx in windows:
            model(idx)
    finally:
        for h in hooks:
            h.remove()
    sq = lambda v: None if v is None else v.sqrt().float()
    return {"mlp": [sq(v) for v in acc["mlp"]], "attn": [sq(v) for v in acc["attn"]],
            "mamba": [sq(v) for v in acc["mamba"]], "hidden": sum(sq(v) for v in acc["hidden"]),
            "layer": acc["layer"] / len(windows)}


# -----------------------------------------------------------------------------------------------
# 2. Planning: what to keep for the target sizes

def top(scores, n):
    """The indices of the n largest scores, in ascending order of index.

    >>> top(torch.tensor([0.1, 3.0, 2.0, 0.5]), 2)
    tensor([1, 2])
    """
    return torch.sort(torch.topk(scores, n).indices).values


def plan(scores, cfg, targets):
    """keep (for cut) from calibrate's scores and targets {config key: new value}; keys not given
    stay as they are. Attention: kv groups ranked by the summed scores of their q heads, then the
    best q heads within each kept group; layers: whole groups of mamba_step by summed importance."""
    t = {k: targets.get(k, getattr(cfg, k)) for k in ("hidden_size", "intermediate_size", "mamba_num_heads",
                                                     "num_attention_heads", "num_key_value_heads", "num_hidden_layers")}
    Hq, Hkv = cfg.num_attention_heads, cfg.num_key_value_heads
    if t["num_attention_heads"] % t["num_key_value_heads"] or \
            t["num_attention_heads"] // t["num_key_value_heads"] > Hq // Hkv:
        raise ValueError(f"{t['num_attention_heads']} attention heads cannot share {t['num_key_value_heads']} kv "
                         f"heads here: each kept kv group keeps at most its {Hq // Hkv} q heads, the same number in each")
    for k, v in t.items():
        if not 1 <= v <= getattr(cfg, k):
            raise ValueError(f"--{k.replace('_', '-')} {v}: must be from 1 to the model's {getattr(cfg, k)}")
    step = cfg.mamba_step if cfg.mamba_enabled else 1
    if t["num_hidden_layers"] % step:
        raise ValueError(f"--num-hidden-layers must be a multiple of mamba_step ({step}): layers go in whole groups")
    groups = scores["layer"].view(-1, step).sum(1)                     # (L / step,)
    kept = top(groups, t["num_hidden_layers"] // step)
    layers = [g * step + j for g in kept.tolist() for j in range(step)]
    keep = {"layers": layers, "hidden": top(scores["hidden"], t["hidden_size"]), "mlp": {}, "mamba": {}, "attn": {}}
    per, per_new = Hq // Hkv, t["num_attention_heads"] // t["num_key_value_heads"]
    for i in layers:
        keep["mlp"][i] = top(scores["mlp"][i], t["intermediate_size"])
        if cfg.is_mamba(i):
            keep["mamba"][i] = top(scores["mamba"][i], t["mamba_num_heads"])
        else:
            by_group = scores["attn"][i].view(Hkv, per)                # (Hkv, per)
            kv = top(by_group.sum(1), t["num_key_value_heads"])
            q = torch.cat([g * per + top(by_group[g], per_new) for g in kv.tolist()])
            keep["attn"][i] = (kv, q)
    return keep


def random_scores(scores, seed):
    """The same shapes as scores, random values: --importance random, the ablation."""
    g = torch.Generator().manual_seed(seed)
    rand = lambda v: None if v is None else torch.rand(v.shape, generator=g)
    return {k: [rand(x) for x in v] if isinstance(v, list) else rand(v) for k, v in scores.items()}


# -----------------------------------------------------------------------------------------------
# 3. Cutting: a config and a state dict sliced to the kept indices

def cut(model, keep):
    """A new PLaMo2 holding `model` sliced to `keep`:
      "layers": the layer indices kept, in order (whole groups of mamba_step, so that the layer
                pattern of the config still holds);
      "hidden": hidden channels kept (every norm, projection, embedding and head alike);
      "mlp": {layer: neurons kept}; "attn": {layer: (kv groups kept, q heads kept)};
      "mamba": {layer: heads kept}. Absent entries keep everything. Counts must agree across layers.
    """
    cfg = model.config
    layers = keep.get("layers", list(range(cfg.num_hidden_layers)))
    step = cfg.mamba_step if cfg.mamba_enabled else 1
    groups = [layers[g:g + step] for g in range(0, len(layers), step)]
    if any(len(g) != step or g[0] % step or g != list(range(g[0], g[0] + step)) for g in groups):
        raise ValueError(f"layers are kept in whole groups of mamba_step={step}: got {layers}")
    hidden = torch.as_tensor(keep.get("hidden", range(cfg.hidden_size)))
    full = lambda n: torch.arange(n)
    mlp = {i: torch.as_tensor(keep.get("mlp", {}).get(i, full(cfg.intermediate_size))) for i in layers}
    mamba = {i: torch.as_tensor(keep.get("mamba", {}).get(i, full(cfg.mamba_num_heads)))
             for i in layers if cfg.is_mamba(i)}
    attn = {}
    for i in layers:
        if not cfg.is_mamba(i):
            kv, q = keep.get("attn", {}).get(i, (full(cfg.num_key_value_heads), full(cfg.num_attention_heads)))
            kv, q = torch.as_tensor(kv), torch.as_tensor(q)
            per = cfg.num_attention_heads // cfg.num_key_value_heads
            if sorted((q // per).unique().tolist()) != sorted(kv.tolist()) or len(q) % len(kv) or \
                    any(((q // per) == g).sum() != len(q) // len(kv) for g in kv):
                raise ValueError(f"layer {i}: q heads {q.tolist()} are not the same number in each kept kv group {kv.tolist()}")
            # The pruned model gives q head j to kv group j // (per group): order q by its group's place in kv.
            attn[i] = (kv, torch.tensor(sorted(q.tolist(), key=lambda h: (kv.tolist().index(h // per), h))))
    checks = [("layers", torch.as_tensor(layers), cfg.num_hidden_layers), ("hidden_size", hidden, cfg.hidden_size)]
    checks += [("intermediate_size", v, cfg.intermediate_size) for v in mlp.values()]
    checks += [("mamba_num_heads", v, cfg.mamba_num_heads) for v in mamba.values()]
    checks += [(n, v, getattr(cfg, n)) for kv, q in attn.values()
               for n, v in (("num_key_value_heads", kv), ("num_attention_heads", q))]
    for name, v, n in checks:
        if len(v) == 0 or len(set(v.tolist())) != len(v) or v.min() < 0 or v.max() >= n:
            raise ValueError(f"{name}: the kept indices must be distinct, from 0 to {n - 1}, and at least one")
    sizes = lambda d: {len(v) if not isinstance(v, tuple) else (len(v[0]), len(v[1])) for v in d.values()}
    for name, d in (("intermediate_size", mlp), ("mamba_num_heads", mamba), ("attention heads", attn)):
        if len(sizes(d)) > 1:
            raise ValueError(f"{name} must be the same in every layer: got {sorted(sizes(d))}")
    new_cfg = PLaMo2Config(**{**vars(cfg), "num_hidden_layers": len(layers), "hidden_size": len(hidden),
                              "intermediate_size": len(next(iter(mlp.values()))),
                              **({"mamba_num_heads": len(next(iter(mamba.values())))} if mamba else {}),
                              **({"num_key_value_heads": len(next(iter(attn.values()))[0]),
                                  "num_attention_heads": len(next(iter(attn.values()))[1])} if attn else {}),
                              "full_attention_idx": [layers.index(i) for i in cfg.full_attention_idx if i in layers]})
    R_old, R_new = max(64, cfg.hidden_size // 16), max(64, new_cfg.hidden_size // 16)
    if R_old != R_new:
        raise ValueError(f"the Δ rank max(64, hidden/16) changes ({R_old} -> {R_new}); pruning it is not built yet")
    sd = model.state_dict()
    out = {}
    P = cfg.hidden_size_per_head
    heads = lambda h: (h[:, None] * P + torch.arange(P)).reshape(-1)  # head indices -> channel indices
    out["embed_tokens.weight"] = sd["embed_tokens.weight"][:, hidden]
    out["norm.weight"] = sd["norm.weight"][hidden]
    if not cfg.tie_word_embeddings:
        out["lm_head.weight"] = sd["lm_head.weight"][:, hidden]
    for new_i, i in enumerate(layers):
        src, dst = f"layers.{i}.", f"layers.{new_i}."
        for n in ("pre_mixer_norm", "post_mixer_norm", "pre_mlp_norm", "post_mlp_norm"):
            out[dst + n + ".weight"] = sd[src + n + ".weight"][hidden]
        f = mlp[i]
        gate_up = sd[src + "mlp.gate_up_proj.weight"]                      # (2F, H): [gate; up]
        out[dst + "mlp.gate_up_proj.weight"] = torch.cat([gate_up[f], gate_up[cfg.intermediate_size + f]])[:, hidden]
        out[dst + "mlp.down_proj.weight"] = sd[src + "mlp.down_proj.weight"][hidden][:, f]
        m = src + "mixer."
        if cfg.is_mamba(i):
            h = mamba[i]
            x_ch = heads(h)                                                  # channels of the kept heads in x
            zx = (h[:, None] * 2 * P + torch.arange(2 * P)).reshape(-1)      # in_proj rows: [z_h | x_h] per head
            out[dst + "mixer.in_proj.weight"] = sd[m + "in_proj.weight"][zx][:, hidden]
            out[dst + "mixer.conv1d.weight"] = sd[m + "conv1d.weight"][x_ch]
            out[dst + "mixer.bcdt_proj.weight"] = sd[m + "bcdt_proj.weight"][:, x_ch]
            out[dst + "mixer.dt_proj.weight"] = sd[m + "dt_proj.weight"][h]
            for n in ("dt_bias", "A_log", "D"):
                out[dst + "mixer." + n] = sd[m + n][h]
            for n in ("dt_norm_weight", "B_norm_weight", "C_norm_weight"):
                out[dst + "mixer." + n] = sd[m + n]
            out[dst + "mixer.out_proj.weight"] = sd[m + "out_proj.weight"][hidden][:, x_ch]
        else:
            kv, q = attn[i]
            qkv = sd[m + "qkv_proj.weight"]                                 # (Hq P + 2 Hkv P, H)
            Hq, Hkv = cfg.num_attention_heads, cfg.num_key_value_heads
            rows = torch.cat([heads(q), Hq * P + heads(kv), (Hq + Hkv) * P + heads(kv)])
            out[dst + "mixer.qkv_proj.weight"] = qkv[rows][:, hidden]
            out[dst + "mixer.o_proj.weight"] = sd[m + "o_proj.weight"][hidden][:, heads(q)]
            out[dst + "mixer.q_weight"] = sd[m + "q_weight"][q]
            out[dst + "mixer.k_weight"] = sd[m + "k_weight"][kv]
    pruned = PLaMo2(new_cfg)
    missing, unexpected = pruned.load_state_dict(out, strict=False)
    if unexpected or set(missing) - ({"lm_head.weight"} if cfg.tie_word_embeddings else set()):
        raise RuntimeError(f"cut left tensors out: missing {missing}, unexpected {unexpected}")
    pruned.tie_weights()
    return pruned


# -----------------------------------------------------------------------------------------------
# main

TARGETS = ["hidden_size", "intermediate_size", "mamba_num_heads", "num_attention_heads", "num_key_value_heads",
           "num_hidden_layers"]


def calibration_windows(ckpt, tok, n, seq_len, seed):
    """n windows (1, seq_len) of the training stream of the run that wrote ckpt, in the shuffled
    order training visits them."""
    path = os.path.join(ckpt, "..", "data", "train.bin")
    if not os.path.exists(path):
        raise FileNotFoundError(f"no training data at {os.path.normpath(path)} for calibration")
    x, _ = train.Batches(train.token_file(path, tok), seq_len, seed).get(0, n, "cpu")  # (n, seq_len)
    return list(x.split(1))


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ckpt", required=True, help="the checkpoint to prune (it is only read)")
    ap.add_argument("--out", required=True, help="where the pruned checkpoint goes (a new directory)")
    for k in TARGETS:
        ap.add_argument("--" + k.replace("_", "-"), type=int, help=f"the pruned model's {k} (default: unchanged)")
    ap.add_argument("--calib-samples", type=int, default=256, help="training windows for the statistics")
    ap.add_argument("--seq-len", type=int, default=256, help="tokens per calibration window")
    ap.add_argument("--scores", help="read the statistics from this file if it exists, else write them there")
    ap.add_argument("--importance", choices=["activation", "random"], default="activation",
                    help="random: the same shapes, random channels (the ablation)")
    ap.add_argument("--seed", type=int, default=1337)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    if args.calib_samples < 1 or args.seq_len < 2:
        ap.error("need --calib-samples >= 1 and --seq-len >= 2")
    return args


def main(argv=None):
    args = parse_args(argv)
    try:
        if os.path.exists(args.out):
            raise ValueError(f"--out {args.out} already exists; pruning writes a new directory and never its source")
        model, tok = train.load_checkpoint(args.ckpt, args.device)
        if args.scores and os.path.exists(args.scores):
            scores = torch.load(args.scores)
            print(f"scores: read {args.scores}")
        else:
            windows = [w.to(args.device) for w in calibration_windows(args.ckpt, tok, args.calib_samples, args.seq_len, args.seed)]
            scores = calibrate(model, windows)
            print(f"scores: {len(windows)} windows of {args.seq_len} tokens")
            if args.scores:
                torch.save(scores, args.scores)
        if args.importance == "random":
            scores = random_scores(scores, args.seed)
        keep = plan(scores, model.config, {k: getattr(args, k) for k in TARGETS if getattr(args, k) is not None})
        pruned = cut(model, keep)
        n_old, n_new = model.num_params(), pruned.num_params()
        print(f"pruned: {n_old / 1e6:.2f}M -> {n_new / 1e6:.2f}M parameters; layers kept {keep['layers']}")
        train.save_checkpoint(args.out, pruned, tok, None)
        print(f"wrote {args.out}")
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
