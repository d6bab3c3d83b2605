"""
prune.py: a smaller model from a trained one, as PLaMo 2.1 8B was made from the 31B model:
structured pruning, Minitron-style and Mamba-aware, then distillation from the original.

    python prune.py --ckpt out/tiny/ckpt --out out/tiny-pruned --hidden-size 192 --intermediate-size 512 \\
        --mamba-num-heads 6 --num-attention-heads 2 --num-key-value-heads 1 --distill-steps 300
    python prune.py --ckpt plamo-2-1b --data my_text/ --out out/pruned --hidden-size 1536 --distill-steps 2000
    python prune.py --out out/tiny-pruned --resume                  # a stopped distillation continues

The story, one function each:
1. calibrate: forward hooks over windows of the teacher's training text (or --data), no
   gradients; a channel's score is the L2 norm over the windows of its sequence-mean |activation|
   (Minitron). Also 1 - cos(input, output) of every block, for depth.
2. plan: which channels, heads and layers to keep for the target sizes.
3. cut: a new config and the state dict sliced to it, an ordinary PLaMo 2 checkpoint
   (<out>/pruned).
4. distil: loop.fit with a stage whose loss is KL(teacher || student) on the logits, on the
   same text (<out>/ckpt, resumable like any run).
"""
import argparse
import contextlib
import os

import torch
import torch.nn.functional as F

import data
import runs
import train
from common import (Progress, autocast, cli, nonneg_int, positive_float, positive_int, side_by_side, spread_warning,
                    unit_float)
from loop import LOOP_DEFAULTS, Loop, add_loop_arguments, fit, loop_defaults, make_optimizer
from plamo2 import PLaMo2, PLaMo2Config, pretraining_peak, save_checkpoint, token_losses


# -----------------------------------------------------------------------------------------------
# 1. Calibration
#
# Each statistic is gathered by a forward hook where the channel enters a projection. The hooks
# add the square of this window's sequence-mean |activation| per channel into acc[kind][layer].

def mean_abs(a):
    """(n,) the mean |a| over the batch and sequence of a (b, t, n) activation, in fp32."""
    return a.float().abs().mean((0, 1))


def by_head(a, heads):
    """(heads,) the L2 norm over a head's channels of mean_abs, for a (b, t, heads * width) activation."""
    return mean_abs(a).view(heads, -1).norm(dim=-1)


@torch.no_grad()
def calibrate(model, windows, n=None):
    """Importance statistics of `model` over `windows` (an iterable of (1, t) token tensors; n of
    them, for the progress line), in fp32.

    Returns {"mlp": [per layer (F,)], "attn": [per attention layer (Hq,) or None], "mamba": [per
    Mamba layer (Nh,) or None], "dt": [per Mamba layer (R,) or None], "hidden": (H,), "layer": (L,)}.
    Each channel's score is sqrt(sum over windows of mean_t |a|^2), a = the activation feeding the
    projection that the channel is an input of (down_proj, o_proj, the x part of Mamba's in_proj,
    dt_proj for the Δ rank; a head's channels by their L2 norm); hidden channels on every pre-norm
    output, the scores summed over the norms; a layer by 1 - cos(input, output), its mean over
    tokens and windows."""
    layers = model.layers
    L = len(layers)
    acc = {"mlp": [0.0] * L, "attn": [None if b.is_mamba else 0.0 for b in layers],
           "mamba": [0.0 if b.is_mamba else None for b in layers], "dt": [0.0 if b.is_mamba else None for b in layers],
           "hidden": [0.0] * (2 * L), "layer": torch.zeros(L)}

    def add(kind, i, value):  # value (n,): this window's sequence-mean |activation|
        acc[kind][i] = acc[kind][i] + value.double() ** 2

    def input_hook(kind, i, heads=None):  # on what enters a module
        return lambda module, args: add(kind, i, mean_abs(args[0]) if heads is None else by_head(args[0], heads))

    def mamba_x_hook(i, Nh, P):  # in_proj's output is [z_h | x_h] per head: the x halves
        return lambda module, args, out: add("mamba", i, out.float().view(*out.shape[:2], Nh, 2 * P)[..., P:]
                                             .abs().mean((0, 1)).norm(dim=-1))

    def norm_hook(j):  # a pre-norm's output, for the hidden channels
        return lambda module, args, out: add("hidden", j, mean_abs(out))

    def layer_hook(i):  # 1 - cos(the block's input, its output), mean over tokens
        def hook(module, args, out):
            acc["layer"][i] += (1 - F.cosine_similarity(args[0].float(), out.float(), dim=-1)).mean()
        return hook

    hooks = []
    for i, block in enumerate(layers):
        hooks.append(block.mlp.down_proj.register_forward_pre_hook(input_hook("mlp", i)))
        if block.is_mamba:
            hooks.append(block.mixer.in_proj.register_forward_hook(mamba_x_hook(i, block.mixer.Nh, block.mixer.P)))
            hooks.append(block.mixer.dt_proj.register_forward_pre_hook(input_hook("dt", i)))  # after dt_norm
        else:
            hooks.append(block.mixer.o_proj.register_forward_pre_hook(input_hook("attn", i, block.mixer.Hq)))
        for j, norm in enumerate((block.pre_mixer_norm, block.pre_mlp_norm)):
            hooks.append(norm.register_forward_hook(norm_hook(2 * i + j)))
        hooks.append(block.register_forward_hook(layer_hook(i)))
    p, count = Progress("calibration", n or 0, "windows"), 0
    try:
        model.eval()
        for idx in windows:
            model(idx)
            count += 1
            p.update()
    finally:
        for h in hooks:
            h.remove()
    p.done()
    sq = lambda v: None if v is None else v.sqrt().float()  # noqa: E731
    return {"mlp": [sq(v) for v in acc["mlp"]], "attn": [sq(v) for v in acc["attn"]],
            "mamba": [sq(v) for v in acc["mamba"]], "dt": [sq(v) for v in acc["dt"]],
            "hidden": sum(sq(v) for v in acc["hidden"]), "layer": acc["layer"] / max(count, 1)}


def save_scores(path, scores):
    """The statistics as a file torch.load reads with weights_only=True (tensors, lists, None)."""
    from common import atomic_write
    atomic_write(path, lambda tmp: torch.save(scores, tmp))


def load_scores(path, cfg):
    """calibrate's statistics from a file save_scores wrote, checked against the model they are for:
    loaded with weights_only=True (a pickle's code never runs), every key and shape as calibrate
    gives them for cfg; one clear error otherwise."""
    try:
        scores = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # torch raises several types for garbage, pickles with code, truncated files
        raise ValueError(f"--scores {path} is not a scores file (prune.py --scores writes them)") from None
    L, mamba = cfg.num_hidden_layers, [cfg.is_mamba(i) for i in range(cfg.num_hidden_layers)]
    R = max(64, cfg.hidden_size // 16)
    expect = {"mlp": [(cfg.intermediate_size,)] * L, "attn": [None if m else (cfg.num_attention_heads,) for m in mamba],
              "mamba": [(cfg.mamba_num_heads,) if m else None for m in mamba], "dt": [(R,) if m else None for m in mamba],
              "hidden": (cfg.hidden_size,), "layer": (L,)}
    shape = lambda v: None if v is None else tuple(v.shape) if isinstance(v, torch.Tensor) else "?"  # noqa: E731
    ok = isinstance(scores, dict) and set(scores) == set(expect) and all(
        shape(scores[k]) == e if not isinstance(e, list) else
        isinstance(scores[k], list) and [shape(v) for v in scores[k]] == e for k, e in expect.items())
    if not ok:
        raise ValueError(f"--scores {path} does not hold the statistics of this model ({L} layers, hidden "
                         f"{cfg.hidden_size}, ...): calibrate again without --scores, or give another file")
    return scores


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
    + (1 - kd_weight) · next-token loss, per token, on the same windows of the same text.
    Evaluation (validation bits per byte) is pre-training's. The teacher is frozen, in eval mode,
    and replicated in every process; its forward stops at its final norm (head=False), and the
    loss makes its logits chunk by chunk from its lm_head's weight."""

    def __init__(self, teacher, kd_weight, temperature, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.teacher = teacher.eval().requires_grad_(False)
        self.kd_weight, self.temperature = kd_weight, temperature

    def loss(self, model, batch):
        x, y = batch
        seq_idx = self.documents(x)
        logits, _ = model(x, seq_idx=seq_idx)                             # (b, t, V)
        mask = y != -1
        w = self.kd_weight
        with torch.no_grad() if w == 1 else contextlib.nullcontext():  # at w = 1 only logged: no graph to keep
            ce = token_losses(logits, y).sum()
        if w == 0:  # the control arm: next-token loss only, and no teacher forward to pay for
            return ce, mask.sum(), {"ce": ce.detach()}
        with torch.no_grad():
            hidden, _ = self.teacher(x, seq_idx=seq_idx, head=False)      # (b, t, H)
        kl = kl_divergence(logits, hidden, self.teacher.lm_head.weight, mask, self.temperature)
        return w * kl + (1 - w) * ce, mask.sum(), {"kl": kl.detach(), "ce": ce.detach()}


# -----------------------------------------------------------------------------------------------
# The command line

TARGETS = ["hidden_size", "intermediate_size", "mamba_num_heads", "num_attention_heads", "num_key_value_heads",
           "num_hidden_layers"]
# The stage's own settings, recorded in the lineage (--resume continues with them).
PRUNE_DEFAULTS = dict(calib_samples=256, importance="activation", kd_weight=1.0, temperature=1.0, eval_tokens=2**16,
                      reset_at_bos=False, from_scratch=False, teacher=None, scores=None, **{k: None for k in TARGETS})


def parse_args(argv=None):
    ap = argparse.ArgumentParser(
        description="Structured pruning (Minitron-style, Mamba-aware) of any PLaMo 2 checkpoint, then distillation "
                    "from it. Example: python prune.py --ckpt out/tiny/ckpt --out out/tiny-pruned --hidden-size 192 "
                    "--distill-steps 300.", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--ckpt", help="the checkpoint to prune: ours, or a released PLaMo 2 (it is only read)")
    ap.add_argument("--data", help="text to calibrate and distil on: a file, a directory of .txt / .jsonl, or data "
                                   "prepared by data.py (default: the text the checkpoint was trained on)")
    for k in TARGETS:
        ap.add_argument("--" + k.replace("_", "-"), type=positive_int, help=f"the pruned model's {k} (default: unchanged)")
    ap.add_argument("--calib-samples", type=positive_int, help="windows (of --seq-len tokens) for the statistics "
                                                               "(default 256)")
    ap.add_argument("--scores", help="read the statistics from this file if it exists, else write them there")
    ap.add_argument("--importance", choices=["activation", "random"],
                    help="activation (default), or random: the same shapes, random channels (the ablation)")
    ap.add_argument("--from-scratch", action="store_true", default=None,
                    help="the pruned shapes with freshly initialized weights (the control arm; give it the teacher's --lr)")
    ap.add_argument("--distill-steps", type=nonneg_int, dest="max_steps", metavar="N",
                    help="distillation steps after the cut (the loop's --max-steps; default 0: cut only)")
    ap.add_argument("--kd-weight", type=unit_float, help="loss = w * KL to the teacher + (1 - w) * next-token loss "
                                                         "(default 1)")
    ap.add_argument("--temperature", type=positive_float, help="softmax temperature of both distributions in the KL "
                                                               "(default 1)")
    ap.add_argument("--eval-tokens", type=positive_int, help="validation tokens per evaluation (default: the "
                                                             "teacher run's)")
    ap.add_argument("--workers", type=positive_int, default=1, help="processes that tokenize --data text (default 1)")
    ap.add_argument("--bench", action="store_true", default=None,
                    help="decode tokens/s of the teacher and the pruned model, and distillation against "
                         "next-token training tokens/s, side by side; writes nothing")
    add_loop_arguments(ap)
    args = ap.parse_args(argv)
    if args.bench and ("RANK" in os.environ or args.resume):
        ap.error("--bench measures one process on a new cut: run it without torchrun and --resume")
    if (args.out is None and not args.bench) or (args.ckpt is None and not args.resume):
        ap.error("give --ckpt and --out (or --resume and --out; --bench needs only --ckpt)")
    return args


def settings(args):
    """(teacher Start or None, train state, lineage of a resumed run, data directory): a resumed
    distillation has its own settings (a run stopped before its first checkpoint continues from
    its cut); a new one takes what the teacher's lineage records, or, without one, the settings of
    the preset nearest its size, and a fifth of the peak learning rate (Minitron's rule)."""
    if args.resume:
        runs.claim(args.out, [("--data", args.data)], resume=True)
        defaults = {**LOOP_DEFAULTS, **PRUNE_DEFAULTS}
        cut = os.path.join(args.out, "pruned")
        has_ckpt = os.path.isdir(os.path.join(args.out, "ckpt")) or os.path.isdir(os.path.join(args.out, "ckpt.old"))
        path, lineage, state, changed = runs.resume(args, defaults, None if has_ckpt else cut)
        print(f"resuming {args.out} " + (f"at step {state['step']}" if state else "from its cut, at step 0")
              + (f", except {', '.join(changed)}" if changed else ""))
        return None, state, lineage, lineage["text"]
    source = runs.start_from(args.ckpt)
    args.teacher = source.path  # recorded for --resume, which may start from another directory
    if not args.bench:
        runs.claim(args.out, [("--ckpt", source.path), ("--data", args.data), ("--scores", args.scores)],
                    overwrite=bool(args.overwrite))
    size = runs.nearest_size(source.params)
    preset = train.TRAIN_PRESETS[size]
    if "loop" in source.lineage:
        rules = {"max_steps": (0, "cut only")}
        stage = {k: (v, "inherited from its lineage") for k, v in source.lineage.get("settings", {}).items()
                 if k in ("eval_tokens", "reset_at_bos")}
    else:
        rules = {k: (preset[k], f"the {size} preset's (the nearest in size; not made by a training run)")
                 for k in ("seq_len", "batch_tokens", "micro_batch", "eval_every")}
        rules["max_steps"] = (0, "cut only")
        stage = {}
    peak = pretraining_peak(source.lineage)
    rules["lr"] = ((peak / 5, f"a fifth of its pre-training's peak {peak:g} (Minitron)") if peak is not None else
                   (preset["lr"] / 5, f"a fifth of the {size} preset's peak {preset['lr']:g} (Minitron)"))
    defaults = {**loop_defaults(source, rules), **{k: (v, "the stage's default") for k, v in PRUNE_DEFAULTS.items()
                                                        if k not in ("teacher",)}, **stage}
    lines = runs.settle(args, defaults)
    data_dir = args.data if args.data else source.lineage.get("text")
    if data_dir is None:
        raise ValueError(f"--ckpt {args.ckpt} has no lineage.json (a released model or an export), so there is no "
                         f"training text to calibrate and distil on: give --data.")
    print(f"prune: from {source.describe()} -> {args.out or '(bench)'}\n" + "\n".join(lines))
    return source, None, None, data_dir


def prune_model(args, teacher, train_tokens, device):
    """calibrate -> plan -> cut: the pruned student (or, --from-scratch, its shapes initialized anew)."""
    cfg = teacher.config
    if args.scores and os.path.exists(args.scores):
        scores = load_scores(args.scores, cfg)
        print(f"scores: read {args.scores}")
    else:
        batches = data.Batches(train_tokens, args.seq_len, args.seed)  # the windows training visits first
        windows = (batches.get(g, 1, device)[0] for g in range(min(args.calib_samples, batches.n)))
        scores = calibrate(teacher, windows, min(args.calib_samples, batches.n))
        print(f"scores: {min(args.calib_samples, batches.n)} windows of {args.seq_len} tokens")
        if args.scores:
            save_scores(args.scores, scores)
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


def bench(teacher, student, tok, stage, args, run, new_tokens=128):
    """Tokens/s, side by side: decoding with the teacher and the student (batch 1, greedy, cache),
    then a distillation step and a next-token step of the student (stage(kd_weight) makes each)."""
    prompt = torch.tensor([tok.encode("佐藤", bos=True)], device=run.device)
    decode = lambda m: lambda: sum(1 for _ in m.generate(prompt, new_tokens, temperature=0))  # noqa: E731
    t = side_by_side({"teacher": decode(teacher), "student": decode(student)}, what="bench: decoding")
    print(f"decode, batch 1: teacher {new_tokens / t['teacher'].median:,.0f} tok/s, pruned "
          f"{new_tokens / t['student'].median:,.0f} tok/s ({t['teacher'].median / t['student'].median:.2f}x)")
    optimizer = make_optimizer(student, Loop.from_args(args), run.device)
    kd, ce = stage(1.0), stage(0.0)
    x, y = kd.batch(0, args.micro_batch, run.device)

    def step(s):
        with autocast(run.device, run.dtype):
            loss, _, _ = s.loss(student, (x, y))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    t = side_by_side({"kd": lambda: step(kd), "ce": lambda: step(ce)}, what="bench: training")
    print(spread_warning(t) or "", end="\n" if spread_warning(t) else "")
    kd, ce = t["kd"].median, t["ce"].median
    print(f"train step, {args.micro_batch} x {args.seq_len} tokens: distillation {x.numel() / kd:,.0f} tok/s, "
          f"next-token loss only {x.numel() / ce:,.0f} tok/s ({ce / kd:.2f}x) | {run.device} {run.dtype}")


def prune(args):
    source, state, lineage, text = settings(args)
    run = runs.start_processes(args)
    args.resume_command = f"python prune.py --out {args.out} --resume"
    teacher, tok = runs.load_checkpoint(lineage["settings"]["teacher"] if lineage else source.path, run.device)
    if args.bench and not data.is_prepared(text):
        raise ValueError("--bench writes nothing: give --data prepared by data.py, or a checkpoint that records its text")
    text, train_tokens, val_tokens, _ = runs.prepared_text(
        text, args.out, tok, run, lambda path: data.prepare_files(text, path, tok, workers=args.workers, seed=args.seed))

    def stage(kd_weight):
        return Distillation(teacher, kd_weight, args.temperature, tok, train_tokens, val_tokens, args.seq_len,
                            args.seed, run, args.eval_tokens, args.micro_batch, args.reset_at_bos, not args.fsdp)
    cut_path = os.path.join(args.out or "", "pruned")
    if lineage is not None:  # resuming: the distillation's checkpoint, or the cut of a run stopped before one
        student, _ = runs.load_checkpoint(os.path.join(args.out, "ckpt") if state else cut_path, run.device)
    elif run.master:  # the other processes read the cut that rank 0 writes
        student = prune_model(args, teacher, train_tokens, run.device)
        lineage = {"stage": "pruned", "parent": source.path, "history": runs.history(source), "text": text,
                   "pretrain_lr": pretraining_peak(source.lineage),
                   "settings": {k: getattr(args, k) for k in PRUNE_DEFAULTS}, "loop": Loop.from_args(args).recipe()}
        if args.bench:
            return bench(teacher, student, tok, stage, args, run)
        save_checkpoint(cut_path, student, tok, lineage)
        print(f"wrote {cut_path}")
    if source is not None and run.ddp:
        torch.distributed.barrier()
        student, _ = runs.load_checkpoint(cut_path, run.device)
        lineage = runs.read_lineage(cut_path)
    distil = stage(args.kd_weight)
    first = None
    if state is None:
        first = distil.evaluate(student, 0)
        run.log(f"before distillation: val_bpb {first['val_bpb']:.4f}")
    if args.max_steps > 0:
        run.log(f"distilling {args.max_steps} steps: kd_weight {args.kd_weight}, temperature {args.temperature}, "
                f"lr {args.lr:.2e}")
        fit(student, distil, Loop.from_args(args), tok, run, {**lineage, "stage": "distill"}, state, first)
        run.log(f"next: python infer.py --ckpt {os.path.join(args.out, 'ckpt')} --bench, or posttrain.py sft --ckpt "
                f"{os.path.join(args.out, 'ckpt')} --data ...")
    else:
        run.log(f"next: distil it with --resume --distill-steps N, or use {cut_path} as a checkpoint")
    runs.end_processes(run)


def main(argv=None):
    args = parse_args(argv)
    cli(lambda: prune(args))


if __name__ == "__main__":
    main()
