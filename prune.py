"""Structured pruning of a trained PLaMo 2, Minitron-style and Mamba-aware, then distillation.

    python prune.py --ckpt out/tiny/ckpt --out out/tiny-pruned --hidden-size 192 --intermediate-size 512 \
        --mamba-num-heads 6 --num-attention-heads 2 --num-key-value-heads 1 --distill-steps 300

The story, one function each:
1. calibrate: forward hooks over training windows, no gradients; a channel's score is the L2 norm
   over the samples of its sequence-mean |activation| (Minitron). Also 1 - cos(input, output) of
   every block, for depth.
2. plan: which channels, heads and layers to keep for the target sizes.
3. cut: a new config and the state dict sliced to it, an ordinary PLaMo 2 checkpoint
   (<out>/pruned).
4. Distillation: train.fit with a stage whose loss is KL(teacher || student) on the logits, on
   the teacher's own training stream (<out>/ckpt, resumable like any run).
"""
import argparse
import contextlib
import math
import os
import sys
import time

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
    Mamba layer (Nh,) or None], "dt": [per Mamba layer (R,) or None], "hidden": (H,), "layer": (L,)}.
    Each channel's score is sqrt(sum over windows of mean_t |a|^2), a = the activation feeding the
    projection that the channel is an input of (down_proj, o_proj, the x part of Mamba's in_proj,
    dt_proj for the Δ rank; a head's channels by their L2 norm); hidden channels on every pre-norm output, the scores summed over the norms;
    a layer by 1 - cos(input, output), its mean over tokens and windows."""
    cfg, layers = model.config, model.layers
    L = len(layers)
    acc = {"mlp": [0.0] * L, "attn": [None if b.is_mamba else 0.0 for b in layers],
           "mamba": [0.0 if b.is_mamba else None for b in layers], "dt": [0.0 if b.is_mamba else None for b in layers],
           "hidden": [0.0] * (2 * L), "layer": torch.zeros(L)}
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
            hooks.append(block.mixer.dt_proj.register_forward_pre_hook(  # the Δ rank, after dt_norm
                lambda m, a, i=i: add("dt", i, a[0].float().abs().mean((0, 1)))))
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
            "mamba": [sq(v) for v in acc["mamba"]], "dt": [sq(v) for v in acc["dt"]], "hidden": sum(sq(v) for v in acc["hidden"]),
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
    for k, v in t.items():
        if not 1 <= v <= getattr(cfg, k):
            raise ValueError(f"--{k.replace('_', '-')} {v}: must be from 1 to the model's {getattr(cfg, k)}")
    if t["num_attention_heads"] % t["num_key_value_heads"] or \
            t["num_attention_heads"] // t["num_key_value_heads"] > Hq // Hkv:
        raise ValueError(f"{t['num_attention_heads']} attention heads cannot share {t['num_key_value_heads']} kv "
                         f"heads here: each kept kv group keeps at most its {Hq // Hkv} q heads, the same number in each")
    step = cfg.mamba_step if cfg.mamba_enabled else 1
    if t["num_hidden_layers"] % step:
        raise ValueError(f"--num-hidden-layers must be a multiple of mamba_step ({step}): layers go in whole groups")
    groups = scores["layer"].view(-1, step).sum(1)                     # (L / step,)
    kept = top(groups, t["num_hidden_layers"] // step)
    layers = [g * step + j for g in kept.tolist() for j in range(step)]
    keep = {"layers": layers, "hidden": top(scores["hidden"], t["hidden_size"]), "mlp": {}, "mamba": {}, "dt": {},
            "attn": {}}
    R = max(64, t["hidden_size"] // 16)  # the Δ rank follows the hidden size
    per, per_new = Hq // Hkv, t["num_attention_heads"] // t["num_key_value_heads"]
    for i in layers:
        keep["mlp"][i] = top(scores["mlp"][i], t["intermediate_size"])
        if cfg.is_mamba(i):
            keep["mamba"][i] = top(scores["mamba"][i], t["mamba_num_heads"])
            keep["dt"][i] = top(scores["dt"][i], R)
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
      "mamba": {layer: heads kept}; "dt": {Mamba layer: Δ channels kept}, max(64, hidden/16) of
      them (needed where that rank changes). Absent entries keep everything. Counts must agree
      across layers. The new model's tensors are slices of model's, on its device (meta too).
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
    R_old, R_new = max(64, cfg.hidden_size // 16), max(64, len(hidden) // 16)
    dt = {i: torch.as_tensor(keep.get("dt", {}).get(i, full(R_old))) for i in mamba}
    if any(len(v) != R_new for v in dt.values()):
        raise ValueError(f"the Δ rank max(64, hidden/16) becomes {R_new} (it was {R_old}): keep that many Δ "
                         f"channels in every Mamba layer (keep['dt'])")
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
    checks += [("Δ rank", v, R_old) for v in dt.values()]
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
            N = cfg.mamba_d_state
            bcdt = torch.cat([torch.arange(2 * N), 2 * N + dt[i]])          # bcdt_proj rows: [B | C | Δ rank]
            out[dst + "mixer.bcdt_proj.weight"] = sd[m + "bcdt_proj.weight"][bcdt][:, x_ch]
            out[dst + "mixer.dt_proj.weight"] = sd[m + "dt_proj.weight"][h][:, dt[i]]
            out[dst + "mixer.dt_norm_weight"] = sd[m + "dt_norm_weight"][dt[i]]
            for n in ("dt_bias", "A_log", "D"):
                out[dst + "mixer." + n] = sd[m + n][h]
            for n in ("B_norm_weight", "C_norm_weight"):  # a copy: the teacher's must not train along
                out[dst + "mixer." + n] = sd[m + n].clone()
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
    with torch.device("meta"):  # no init to overwrite: the slices become the parameters
        pruned = PLaMo2(new_cfg)
    missing, unexpected = pruned.load_state_dict(out, strict=False, assign=True)
    if unexpected or set(missing) - ({"lm_head.weight"} if cfg.tie_word_embeddings else set()):
        raise RuntimeError(f"cut left tensors out: missing {missing}, unexpected {unexpected}")
    pruned.tie_weights()
    return pruned


# -----------------------------------------------------------------------------------------------
# 4. Distillation: the shared training loop with a teacher

class KLDivergence(torch.autograd.Function):
    """Σ over the rows where mask of T² · KL(p_t || p_s), p = softmax(logits / T), the teacher's
    logits made from its final hidden states chunk by chunk.

    The gradient with respect to the student's logits is T · (p_s - p_t) (T² times 1/T from the
    scaling); forward computes it with each chunk, so that no (tokens x vocab) teacher tensor
    lives past its chunk (at the released 100K vocabulary a full batch's would be gigabytes) and
    backward has nothing to recompute."""

    @staticmethod
    def forward(ctx, s, h, w, mask, T, chunk):  # s (n, V) student logits, h (n, H) teacher hidden, w (V, H)
        total = torch.zeros((), device=s.device, dtype=torch.float32)
        grad = torch.empty_like(s)
        for i in range(0, len(s), chunk):  # in place where it can: each (c, V) temporary is 2^26 floats
            r, m = slice(i, i + chunk), mask[i:i + chunk]
            log_t = F.log_softmax((h[r] @ w.T).float() / T, dim=-1)      # (c, V)
            log_s = F.log_softmax(s[r].float() / T, dim=-1)              # (c, V)
            p_t = log_t.exp()
            total += T * T * (log_t.sub_(log_s).mul_(p_t).sum(-1) * m).sum()
            grad[r] = log_s.exp_().sub_(p_t).mul_(T * m[:, None])        # T · (p_s - p_t), masked rows 0
        ctx.save_for_backward(grad)
        return total

    @staticmethod
    def backward(ctx, g):
        (grad,) = ctx.saved_tensors
        return grad * g, None, None, None, None, None


def kl_divergence(student_logits, teacher_hidden, teacher_head, mask, T=1.0):
    """KLDivergence over a batch: logits (b, t, V), hidden (b, t, H), head (V, H), mask (b, t).
    Chunks of about 2^26 logits, 256 MB in fp32: a few such temporaries at a time, whatever the vocabulary."""
    V = student_logits.shape[-1]
    return KLDivergence.apply(student_logits.flatten(0, 1), teacher_hidden.flatten(0, 1), teacher_head,
                              mask.flatten().to(torch.float32), T, max(1, 2**26 // V))


class Distillation(train.Pretraining):
    """The pre-training stage with a teacher: the loss is kd_weight · T² · KL(teacher || student)
    + (1 - kd_weight) · next-token loss, per token, on the same windows of the same stream.
    Evaluation (validation bits per byte) is pre-training's. The teacher is frozen, in eval mode,
    and replicated in every process."""

    def __init__(self, student, teacher, tok, train_tokens, val_tokens, args, run):
        super().__init__(student, tok, train_tokens, val_tokens, args, run)
        self.teacher = teacher.eval().requires_grad_(False)
        # The teacher's forward stops at its final norm: the loss makes its logits chunk by chunk.
        self.head = teacher.lm_head.weight                                # (V, H)
        self.teacher.lm_head = torch.nn.Identity()

    def loss(self, model, batch):
        x, y = batch
        seq_idx = self.documents(x)
        logits, _ = model(x, seq_idx=seq_idx)                             # (b, t, V)
        mask = y != -1
        w = self.args.kd_weight
        with torch.no_grad() if w == 1 else contextlib.nullcontext():  # at w = 1 only logged: no graph to keep
            ce = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), ignore_index=-1, reduction="sum")
        if w == 0:  # the control arm: next-token loss only, and no teacher forward to pay for
            return ce, mask.sum(), {"ce": ce.detach()}
        with torch.no_grad():
            hidden, _ = self.teacher(x, seq_idx=seq_idx)                  # (b, t, H)
        kl = kl_divergence(logits, hidden, self.head, mask, self.args.temperature)
        return w * kl + (1 - w) * ce, mask.sum(), {"kl": kl.detach(), "ce": ce.detach()}


# -----------------------------------------------------------------------------------------------
# main

TARGETS = ["hidden_size", "intermediate_size", "mamba_num_heads", "num_attention_heads", "num_key_value_heads",
           "num_hidden_layers"]
PRUNE_DEFAULTS = dict(calib_samples=256, importance="activation", kd_weight=1.0, temperature=1.0, max_steps=0,
                      eval_tokens=2**16, reset_at_bos=False, from_scratch=False)
# What the distillation takes from the run that trained the teacher, unless given here; its peak
# learning rate becomes a fifth of the teacher's (Minitron's rule), and the run length is its own.
INHERITED = ["seq_len", "batch_tokens", "micro_batch", "schedule", "min_lr_frac", "weight_decay", "grad_clip",
             "eval_every", "eval_tokens", "seed", "dtype", "reset_at_bos"]


def calibration_windows(train_tokens, n, seq_len, seed):
    """n windows (1, seq_len) of the training stream, in the shuffled order training visits them."""
    x, _ = train.Batches(train_tokens, seq_len, seed).get(0, n, "cpu")   # (n, seq_len)
    return list(x.split(1))


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ckpt", help="the checkpoint to prune, a training run's (it is only read)")
    for k in TARGETS:
        ap.add_argument("--" + k.replace("_", "-"), type=int, help=f"the pruned model's {k} (default: unchanged)")
    ap.add_argument("--calib-samples", type=int, help="training windows (of --seq-len tokens) for the statistics (256)")
    ap.add_argument("--scores", help="read the statistics from this file if it exists, else write them there")
    ap.add_argument("--importance", choices=["activation", "random"],
                    help="activation (default), or random: the same shapes, random channels (the ablation)")
    ap.add_argument("--from-scratch", action="store_true", default=None,
                    help="the pruned shapes with freshly initialized weights (the control arm; give it the teacher's --lr)")
    ap.add_argument("--distill-steps", type=int, dest="max_steps", metavar="N",
                    help="distillation steps after the cut (the loop's --max-steps; default 0: cut only)")
    ap.add_argument("--kd-weight", type=float, help="loss = w * KL to the teacher + (1 - w) * next-token loss (default 1)")
    ap.add_argument("--temperature", type=float, help="softmax temperature of both distributions in the KL (default 1)")
    ap.add_argument("--eval-tokens", type=int, help="validation tokens per evaluation (default: the teacher run's)")
    ap.add_argument("--bench", action="store_true", default=None,
                    help="decode tokens/s of the teacher and the pruned model, and distillation against "
                         "next-token training tokens/s, side by side; writes nothing")
    train.add_loop_arguments(ap)
    args = ap.parse_args(argv)
    train.check_positive(ap, args, ["calib_samples", "seq_len", "batch_tokens", "micro_batch", "eval_every",
                                    "eval_tokens", "warmup_steps", "stop_at_step"] + TARGETS)
    if args.max_steps is not None and args.max_steps < 0:
        ap.error("--distill-steps must be 0 or more")
    if args.kd_weight is not None and not 0 <= args.kd_weight <= 1:
        ap.error("--kd-weight must be from 0 to 1")
    if args.temperature is not None and not (math.isfinite(args.temperature) and args.temperature > 0):
        ap.error("--temperature must be a positive number")
    if args.bench and ("RANK" in os.environ or args.resume):
        ap.error("--bench measures one process on a new cut: run it without torchrun and --resume")
    if (args.out is None and not args.bench) or (args.ckpt is None and not args.resume):
        ap.error("give --ckpt and --out (or --resume and --out; --bench needs only --ckpt)")
    return args


def settings(args):
    """(args, train state or None): a resumed distillation has its own settings; a new one takes
    the teacher's run's (INHERITED), a fifth of its learning rate and PRUNE_DEFAULTS."""
    if args.resume:
        args, state, _, _ = train.resume_settings(args, PRUNE_DEFAULTS)
        return args, state
    path = train.find_checkpoint(args.ckpt)
    args.ckpt = os.path.abspath(path)  # recorded for --resume, which may start from another directory
    if args.out and os.path.exists(args.out):
        raise ValueError(f"--out {args.out} already exists; pruning writes a new directory and never its source "
                         f"(--resume continues a stopped distillation there)")
    if args.out and os.path.abspath(args.out).startswith(os.path.abspath(path) + os.sep):
        raise ValueError(f"--out {args.out} is inside the checkpoint it prunes ({args.ckpt}): choose another directory")
    if not os.path.isdir(path):
        raise FileNotFoundError(f"--ckpt: no checkpoint directory at {args.ckpt}")
    source = train.load_train_state(path)["args"]
    # The teacher's training stream: its run's data/, or, for a pruned model, the data it was distilled on.
    args.data_dir = source.get("data_dir") or os.path.join(os.path.dirname(os.path.abspath(path)), "data")
    if not os.path.exists(os.path.join(args.data_dir, "train.bin")):
        raise FileNotFoundError(f"no training data at {os.path.join(args.data_dir, 'train.bin')}: calibration and "
                                f"distillation read the stream the teacher was trained on")
    train.settle(args, {**PRUNE_DEFAULTS, "lr": source["lr"] / 5}, source, INHERITED)
    return args, None


def prune(args, teacher, train_tokens, device):
    """calibrate -> plan -> cut: the pruned student (or, --from-scratch, its shapes initialized anew)."""
    if args.scores and os.path.exists(args.scores):
        scores = torch.load(args.scores)
        print(f"scores: read {args.scores}")
    else:
        windows = [w.to(device) for w in calibration_windows(train_tokens, args.calib_samples, args.seq_len, args.seed)]
        scores = calibrate(teacher, windows)
        print(f"scores: {len(windows)} windows of {args.seq_len} tokens")
        if args.scores:
            torch.save(scores, args.scores)
    cfg = teacher.config
    if scores["layer"].shape != (cfg.num_hidden_layers,) or scores["hidden"].shape != (cfg.hidden_size,) or \
            scores["mlp"][0].shape != (cfg.intermediate_size,):
        raise ValueError(f"--scores {args.scores} holds the statistics of another model (not of {args.ckpt})")
    if args.importance == "random":
        scores = random_scores(scores, args.seed)
    keep = plan(scores, cfg, {k: getattr(args, k) for k in TARGETS if getattr(args, k) is not None})
    student = cut(teacher, keep)
    if args.from_scratch:
        torch.manual_seed(args.seed)
        student = PLaMo2(student.config).to(device)
    print(f"pruned: {teacher.num_params() / 1e6:.2f}M -> {student.num_params() / 1e6:.2f}M parameters; "
          f"layers kept {keep['layers']}" + (" (weights initialized anew)" if args.from_scratch else ""))
    return student


def bench(teacher, student, tok, streams, args, run, new_tokens=128):
    """Tokens/s, side by side: decoding with the teacher and the student (batch 1, greedy, cache),
    then a distillation step and a next-token step of the student."""
    prompt = torch.tensor([tok.encode("佐藤", bos=True)], device=run.device)
    decode = lambda m: lambda: sum(1 for _ in m.generate(prompt, new_tokens, temperature=0))
    t = train.side_by_side({"teacher": decode(teacher), "student": decode(student)})
    t_teacher, t_student = t["teacher"], t["student"]
    print(f"decode, batch 1: teacher {new_tokens / t_teacher:,.0f} tok/s, pruned {new_tokens / t_student:,.0f} tok/s "
          f"({t_teacher / t_student:.2f}x)")
    # After decoding: the stage makes the teacher stop before its head.
    stage = Distillation(student, teacher, tok, *streams, args, run)
    optimizer = train.make_optimizer(student, args, run.device)
    x, y = stage.batch(0, args.micro_batch, run.device)

    def step(w):
        args.kd_weight = w
        with train.autocast(run.device, run.dtype):
            loss, _, _ = stage.loss(student, (x, y))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if run.device.type == "cuda":
            torch.cuda.synchronize()
    t = train.side_by_side({"kd": lambda: step(1.0), "ce": lambda: step(0.0)})
    kd, ce = t["kd"], t["ce"]
    print(f"train step, {args.micro_batch} x {args.seq_len} tokens: distillation {x.numel() / kd:,.0f} tok/s, "
          f"next-token loss only {x.numel() / ce:,.0f} tok/s ({ce / kd:.2f}x) | {run.device} {run.dtype}")


def data_streams(args, tok):
    """The teacher's training and validation token streams."""
    return [train.token_file(os.path.join(args.data_dir, f"{split}.bin"), tok) for split in ("train", "val")]


def main(argv=None):
    args = parse_args(argv)
    try:
        args, state = settings(args)
        run = train.start_processes(args)
        if run.ddp:  # every process has checked that --out is new before rank 0 writes there
            torch.distributed.barrier()
        teacher, tok = train.load_checkpoint(args.ckpt, run.device)
        streams = data_streams(args, tok)                                  # (train, val) tokens
        if state is not None:
            student, _ = train.load_checkpoint(os.path.join(args.out, "ckpt"), run.device)
            run.log(f"resuming {args.out} at step {state['step']}")
        elif run.master:  # the other processes read the cut that rank 0 writes
            student = prune(args, teacher, streams[0], run.device)
            if not args.bench:
                train.save_checkpoint(os.path.join(args.out, "pruned"), student, tok, None)
                print(f"wrote {os.path.join(args.out, 'pruned')}")
        if state is None and run.ddp:
            torch.distributed.barrier()
            student, _ = train.load_checkpoint(os.path.join(args.out, "pruned"), run.device)
        if args.bench:
            bench(teacher, student, tok, streams, args, run)
            return
        # After the cut, which reads the teacher's head: the stage makes the teacher stop before it.
        stage = Distillation(student, teacher, tok, *streams, args, run)
        if state is None:
            run.log(f"before distillation: val_bpb {stage.evaluate(student, 0)['val_bpb']:.4f}")
        if args.max_steps > 0:
            run.log(f"distilling {args.max_steps} steps: kd_weight {args.kd_weight}, temperature {args.temperature}, "
                    f"lr {args.lr:.2e}")
            train.fit(student, stage, args, tok, run, state)
        train.end_processes(run)
    except (FileNotFoundError, ValueError, FloatingPointError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
