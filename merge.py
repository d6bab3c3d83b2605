"""
merge.py: model merging, as PLaMo 2 merges models after SFT and after DPO: checkpoints of one
config combined tensor by tensor with the methods of mergekit, streamed from their safetensors
files into a new checkpoint (two 8B models never sit in memory).

    python merge.py --models out/sft/ckpt out/dpo/round1/ckpt --weights 0.75 0.25 --method linear --out out/merged
    python merge.py --base out/base/ckpt --models A/ckpt B/ckpt --method ties --density 0.5 --out out/merged

Read top to bottom: the methods on one tensor (linear, SLERP, task arithmetic, TIES, DARE), the
streaming reader and writer, the inputs' checks, and the command.
"""
import argparse
import json
import math
import os
import shutil
import struct
import time
import zlib
from dataclasses import asdict

import torch

from common import Progress, atomic_write_text, check_output, cli, finite_float, positive_float, unit_float
from plamo2 import (LINEAGE, PLaMo2Config, find_checkpoint, history_after, pretraining_peak, read_lineage,
                    safetensors_files, swap_in)
from tokenizer import OUR_FILES, RELEASED_FILES

MERGE_METHODS = ("linear", "slerp", "task_arithmetic", "ties", "dare", "dare_ties")


def slerp(a, b, t, colinear=0.9995):
    """Spherical interpolation from a (t=0) to b (t=1), along the great circle of their
    directions, scaled as the vectors are; linear where they are nearly colinear (sin ω -> 0)."""
    cos = (a.flatten() @ b.flatten()) / (a.norm() * b.norm()).clamp(min=1e-12)
    if cos.abs() > colinear:
        return (1 - t) * a + t * b
    omega = torch.arccos(cos)
    return (torch.sin((1 - t) * omega) * a + torch.sin(t * omega) * b) / torch.sin(omega)


def trim(tau, density):
    """TIES' trim: tau with all but its round(density · n) largest magnitudes set to zero.

    >>> trim(torch.tensor([0.1, -3.0, 2.0, 0.5]), 0.5).tolist()
    [0.0, -3.0, 2.0, 0.0]
    """
    k = round(density * tau.numel())
    keep = torch.zeros(tau.numel(), dtype=torch.bool)
    keep[tau.abs().flatten().topk(k).indices] = True
    return tau * keep.view(tau.shape)


def dare_drop(tau, density, generator):
    """DARE: each entry kept with probability density and divided by it, so its expectation is tau."""
    keep = torch.rand(tau.shape, generator=generator) < density
    return torch.where(keep, tau / density, torch.zeros_like(tau))


def disjoint_mean(taus, weights):
    """TIES' sign election and disjoint merge: per entry, the sign of the weighted sum of the task
    vectors, then the weighted mean of the entries that have that sign (0 where none has)."""
    taus = torch.stack(taus)                                                      # (models, *shape)
    w = torch.tensor(weights, dtype=taus.dtype).view(-1, *[1] * (taus.dim() - 1))
    agree = (torch.sign(taus) == torch.sign((w * taus).sum(0))) & (taus != 0)
    num, den = (w * taus * agree).sum(0), (w * agree).sum(0)
    return torch.where(den != 0, num / torch.where(den != 0, den, 1), 0)


def merge_tensor(method, base, models, weights, name="", t=0.5, lam=1.0, density=0.5, seed=0):
    """One merged tensor, computed in float32 and returned in the first model's dtype (inputs in
    other dtypes are read as float32 too).
    linear Σ w_i θ_i / Σ w_i; slerp of the two models at t; the others on task vectors
    τ_i = θ_i - base: task_arithmetic base + λ Σ w_i τ_i; ties base + λ · disjoint_mean of the
    trimmed τ_i; dare base + λ Σ w_i drop(τ_i); dare_ties base + λ · disjoint_mean of drop(τ_i).
    DARE's drop is seeded per (seed, tensor name, model), whatever the order tensors come in."""
    ms = [m.float() for m in models]
    if method == "linear":
        out = sum(w * m for w, m in zip(weights, ms)) / sum(weights)
    elif method == "slerp":
        out = slerp(ms[0], ms[1], t)
    else:
        b = base.float()
        taus = [m - b for m in ms]
        if method == "ties":
            taus = [trim(tau, density) for tau in taus]
        elif method in ("dare", "dare_ties"):
            taus = [dare_drop(tau, density, torch.Generator().manual_seed(zlib.crc32(f"{seed}/{name}/{i}".encode())))
                    for i, tau in enumerate(taus)]
        if method in ("ties", "dare_ties"):
            delta = disjoint_mean(taus, weights)
        else:
            delta = sum(w * tau for w, tau in zip(weights, taus))
        out = b + lam * delta
    return out.to(models[0].dtype)


class Weights:
    """A checkpoint's tensors by name, each read from its safetensors file only when asked."""

    def __init__(self, path):
        from safetensors import safe_open
        self.file = {}
        for fpath in safetensors_files(path):
            try:
                f = safe_open(fpath, framework="pt", device="cpu")
            except Exception as e:  # safetensors raises several types for truncated or foreign files
                raise ValueError(f"cannot read weights file {fpath}: {e}") from None
            self.file.update((n, f) for n in f.keys())

    def names(self):
        return sorted(self.file)

    def spec(self, name):
        s = self.file[name].get_slice(name)
        return s.get_dtype(), tuple(s.get_shape())

    def __getitem__(self, name):
        return self.file[name].get_tensor(name)


SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16,
                      "I64": torch.int64, "I32": torch.int32, "U8": torch.uint8, "BOOL": torch.bool}


def write_safetensors(path, specs, tensors):
    """A safetensors file written one tensor at a time, in constant memory: specs [(name, dtype
    name, shape)] make the header (8-byte length, JSON, data offsets), then each tensor of the
    iterable tensors, in the same order, is appended as raw bytes."""
    header, offset = {}, 0
    for name, dtype, shape in specs:
        size = math.prod(shape) * SAFETENSORS_DTYPES[dtype].itemsize
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps({"__metadata__": {"format": "pt"}, **header}, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text)
        for (name, dtype, shape), t in zip(specs, tensors, strict=True):
            assert t.dtype == SAFETENSORS_DTYPES[dtype] and tuple(t.shape) == shape, name
            f.write(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())


def tokenizer_files(path):
    """{name: bytes} of the tokenizer's files and the rest a released checkpoint ships beside its
    weights (tokenizer.RELEASED_FILES): what the merged checkpoint carries, byte for byte."""
    files = {}
    for name in OUR_FILES + RELEASED_FILES:
        if os.path.isfile(os.path.join(path, name)):
            with open(os.path.join(path, name), "rb") as f:
                files[name] = f.read()
    return files


def merge_inputs(args):
    """(config of the output, tokenizer files {name: bytes}, base Weights or None, [Weights of
    --models], their paths) after checking that every input is an unquantized checkpoint with the
    same config (chat_template aside), tokenizer files and tensors."""
    paths = [os.path.realpath(find_checkpoint(p)) for p in ([args.base] if args.base else []) + args.models]
    configs = {}
    for p in paths:
        with open(os.path.join(p, "config.json")) as f:
            configs[p] = json.load(f)
        if "quantization" in configs[p]:
            raise ValueError(f"{p} is a quantized checkpoint ({configs[p]['quantization'].get('method')}): merging "
                             f"its packed integers would not merge its weights; merge the unquantized checkpoints, "
                             f"then quantize the merge")
    first, tokenizer = paths[0], tokenizer_files(paths[0])
    settings = {p: asdict(PLaMo2Config.from_dict(c)) for p, c in configs.items()}  # defaults filled in
    for p in paths[1:]:
        differ = sorted(k for k in settings[first] if k != "chat_template" and settings[first][k] != settings[p][k])
        if differ:
            raise ValueError(f"{p} and {first} have different configs ({', '.join(differ)}): only models of one "
                             f"architecture and size can be merged")
        if tokenizer_files(p) != tokenizer:
            raise ValueError(f"{p} and {first} have different tokenizers: their token ids mean different things")
    weights = [Weights(p) for p in paths]
    shapes = {n: weights[0].spec(n)[1] for n in weights[0].names()}
    for p, w in zip(paths[1:], weights[1:]):  # dtypes may differ (a bf16 release, an fp32 fine-tune of it)
        if {n: w.spec(n)[1] for n in w.names()} != shapes:
            raise ValueError(f"{p} and {first} hold different tensors (names or shapes)")
    specs = {n: weights[0].spec(n) for n in weights[0].names()}
    floats = [n for n, (dtype, _) in specs.items() if dtype not in ("F64", "F32", "BF16", "F16")]
    if floats:
        raise ValueError(f"{first} holds tensors that are not floating point ({', '.join(floats[:3])}): not a "
                         f"checkpoint these methods can merge")
    models = paths[-len(args.models):]
    config = dict(configs[models[0]])
    # A chat model among the inputs makes the merge one: its template marker is carried over.
    config["chat_template"] = next((configs[p]["chat_template"] for p in models + paths[:1]
                                    if configs[p].get("chat_template")), None)
    return config, tokenizer, weights[0] if args.base else None, weights[-len(models):], models


def merge(args):
    out = os.path.join(args.out, "ckpt")
    check_output(args.out, "--out", [("--base", args.base and find_checkpoint(args.base))]
                 + [("--models", find_checkpoint(m)) for m in args.models])
    if os.path.exists(os.path.join(out, "config.json")) and not args.overwrite:
        raise ValueError(f"--out {args.out} holds a merged checkpoint already: give another --out, or --overwrite")
    config, tokenizer, base, models, model_paths = merge_inputs(args)
    base_path = os.path.realpath(find_checkpoint(args.base)) if args.base else None
    w = args.weights or [1.0] * len(models)
    t0 = time.time()
    specs = [(n, *models[0].spec(n)) for n in models[0].names()]
    tmp = out + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    p = Progress("merging", len(specs), "tensors")

    def merged():
        for n, _, _ in specs:
            t = merge_tensor(args.method, base[n] if base else None, [m[n] for m in models], w, n, args.t,
                             args.lam, args.density, args.seed)
            if not torch.isfinite(t).all():
                raise ValueError(f"the merge of {n} is not finite (NaN or infinity); nothing was written")
            p.update()
            yield t
    try:
        write_safetensors(os.path.join(tmp, "model.safetensors"), specs, merged())
    except ValueError:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    p.done()
    atomic_write_text(os.path.join(tmp, "config.json"), json.dumps(config, indent=2))
    for name, data in tokenizer.items():
        with open(os.path.join(tmp, name), "wb") as f:
            f.write(data)
    recipe = {"method": args.method, "base": base_path, "models": model_paths, "weights": w, "t": args.t,
              "lambda": args.lam, "density": args.density, "seed": args.seed}
    lineages = [read_lineage(p) or {} for p in model_paths]
    shared = lambda key: lineages[0].get(key) if all(lin.get(key) == lineages[0].get(key) for lin in lineages) else None  # noqa: E731
    history = {h["path"]: h for p, lin in zip(model_paths, lineages) for h in history_after(p, lin)}  # each once
    peaks = {pretraining_peak(lin) for lin in lineages}  # the models' one pre-training, or none known
    lineage = {"stage": "merge", "parents": model_paths, "base": base_path, "text": shared("text"),
               "instructions": shared("instructions"), "pretrain_lr": peaks.pop() if len(peaks) == 1 else None,
               "settings": recipe, "history": list(history.values())}
    atomic_write_text(os.path.join(tmp, LINEAGE), json.dumps(lineage, indent=1, ensure_ascii=False))
    swap_in(tmp, out)
    atomic_write_text(os.path.join(args.out, "merge.json"), json.dumps(recipe, indent=1))
    print(f"merged {len(models)} model(s) by {args.method} into {out}: {len(specs)} tensors in {time.time() - t0:.1f}s")
    print(f"next: python tasks.py eval --ckpt {out}   or   python infer.py --ckpt {out} --chat")


def add_arguments(m):
    m.add_argument("--models", nargs="+", required=True, help="the checkpoints to merge")
    m.add_argument("--base", help="the model the task vectors are taken from (task_arithmetic, ties, dare, dare_ties)")
    m.add_argument("--method", required=True, choices=MERGE_METHODS)
    m.add_argument("--weights", type=finite_float, nargs="+", help="one weight per model (default 1 each; linear "
                                                                   "normalises them)")
    m.add_argument("--t", type=unit_float, default=0.5, help="slerp: 0 is the first model, 1 the second")
    m.add_argument("--lambda", dest="lam", type=finite_float, default=1.0, help="scale of the merged task vector")
    m.add_argument("--density", type=positive_float, default=0.5, help="ties, dare: the share of each task vector "
                                                                       "kept, at most 1")
    m.add_argument("--seed", type=int, default=1337, help="dare: seed of the drop")
    m.add_argument("--out", required=True, help="output directory: ckpt/ and merge.json (the recipe)")
    m.add_argument("--overwrite", action="store_true", help="replace a merge already in --out")


def check_arguments(ap, args):
    task_vectors = args.method not in ("linear", "slerp")
    if task_vectors != bool(args.base):
        ap.error(f"--method {args.method} " + ("needs --base" if task_vectors else "merges --models alone; drop --base"))
    if args.method == "slerp" and len(args.models) != 2:
        ap.error("--method slerp interpolates between exactly two --models")
    if args.weights and len(args.weights) != len(args.models):
        ap.error(f"--weights: give one per model ({len(args.models)})")
    if args.method == "linear" and args.weights and not sum(args.weights) > 0:
        ap.error("--weights of a linear merge must sum to more than 0")
    if args.density > 1:
        ap.error("--density must be in (0, 1]")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description="Merge checkpoints of one config tensor by tensor into a new checkpoint "
                                             "(linear, slerp, task_arithmetic, ties, dare, dare_ties).",
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_arguments(ap)
    args = ap.parse_args(argv)
    check_arguments(ap, args)
    return args


def main(argv=None):
    args = parse_args(argv)
    cli(lambda: merge(args))


if __name__ == "__main__":
    main()
