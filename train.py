"""
train.py: pre-training, from text to a checkpoint, with the loop every stage shares (loop.py).

    python train.py --size tiny                                    # laptop CPU, about 13 minutes
    python train.py --size tiny --data ../novels/                   # your own UTF-8 text
    python data.py corpus/ --out data/corpus --vocab-size 32000     # a GPU node: prepare once,
    torchrun --nproc_per_node=8 train.py --size 1b --data data/corpus   # then train (DDP; --fsdp shards)
    python train.py --init-from out/tiny/ckpt --out out/tiny-long --seq-len 1024 \\
        --full-attention-idx 1,3 --rope-theta 1e6 --rope-local-theta 10000 --max-steps 200
    python train.py --init-from plamo-2-1b --data my_text/ --out out/cpt   # continual pre-training

Read top to bottom, this file is the story of the stage:
  1. Weight reuse from a checkpoint whose architecture differs (long context, --init-from).
  2. Pre-training: the stage for next-token prediction on prepared data (data.py), handed to
     loop.fit, and the command line. How a run starts (from which checkpoint, in which directory,
     on which processes) is runs.py's.
"""
import argparse
import json
import math
import os

import numpy as np
import torch
import torch.distributed as dist

import data
from common import (autocast, cli, positive_float, positive_int, resolve_device, resolve_dtype, side_by_side,
                    spread_warning, unit_float)
from loop import (LOOP_DEFAULTS, Loop, add_loop_arguments, batch_shape, check_memory, fit, flops_per_token,
                  loop_defaults, make_optimizer, measure_peak_flops)
from plamo2 import PLaMo2, PLaMo2Config, PRESETS, generate_text, nats_and_bytes, pretraining_peak, token_losses
from runs import (claim, end_processes, history, load_checkpoint, nearest_size, prepared_text, resume, settle,
                  start_from, start_processes)
from tokenizer import special_token_ids, token_bytes

# -----------------------------------------------------------------------------------------------
# 1. Weight reuse: a new model that starts from a checkpoint whose architecture differs.
#
# The config fields that fix how the numbers inside a tensor are laid out, beyond its shape: the
# same shape can hide another split of heads (qkv_proj), another per-head z/x interleave
# (in_proj), or another layer at that index (depth pruning, another mamba_step).
LAYOUT_FIELDS = {
    "embedding": ("vocab_size", "hidden_size"),
    "norm": ("hidden_size",),
    "mlp": ("hidden_size", "intermediate_size"),
    "mamba": ("hidden_size", "mamba_num_heads", "hidden_size_per_head", "mamba_d_state", "mamba_d_conv"),
    "attention": ("hidden_size", "num_attention_heads", "num_key_value_heads", "hidden_size_per_head"),
}
LAYER_FIELDS = ("num_hidden_layers", "mamba_step", "mamba_enabled")  # which layer stands at index i


def tensor_layout(cfg, name):
    """The config values that a tensor's contents depend on, for one of our parameter names.

    >>> tensor_layout(PLaMo2Config.from_preset("tiny"), "layers.1.mixer.qkv_proj.weight")
    ('attention', 256, 4, 2, 64, 4, 2, True)
    """
    parts = name.split(".")
    if parts[0] != "layers":
        kind = "norm" if parts[0] == "norm" else "embedding"
        return (kind, *(getattr(cfg, f) for f in LAYOUT_FIELDS[kind]))
    i, part = int(parts[1]), parts[2]
    kind = ("mamba" if cfg.is_mamba(i) else "attention") if part == "mixer" else "mlp" if part == "mlp" else "norm"
    return (kind, *(getattr(cfg, f) for f in LAYOUT_FIELDS[kind] + LAYER_FIELDS))


def reuse_weights(model, source, rename=None):
    """Copy into model every tensor of source that means the same thing there; report the rest.

    A tensor is copied when its name and shape match and the config fields that fix its layout
    agree (tensor_layout): a longer window, more full-attention layers or another rope_theta keep
    every tensor; another head split, width or layer pattern keeps those that still mean the
    same. rename {model's name: source's name} copies those pairs instead, whatever the rule says
    (e.g. layer 2 of a depth-pruned model from layer 4 of its source); each must fit.
    Returns (copied, new, dropped): model names copied, model names left as initialised, and
    source names not used.
    """
    src, dst = source.state_dict(), model.state_dict()
    if model.config.tie_word_embeddings:  # lm_head.weight is the embedding itself
        del dst["lm_head.weight"]
    rename = rename or {}
    pairs = {}
    for n in dst:
        if n in rename:
            s = rename[n]
            if s not in src or src[s].shape != dst[n].shape:
                raise ValueError(f"cannot copy {s} into {n}: "
                                 + (f"the source has no {s}." if s not in src else
                                    f"shapes {tuple(src[s].shape)} and {tuple(dst[n].shape)} differ."))
            pairs[n] = s
        elif (n in src and src[n].shape == dst[n].shape
              and tensor_layout(model.config, n) == tensor_layout(source.config, n)):
            pairs[n] = n
    with torch.no_grad():
        for n, s in pairs.items():
            dst[n].copy_(src[s])
    used = set(pairs.values())
    if source.config.tie_word_embeddings and "embed_tokens.weight" in used:
        used.add("lm_head.weight")
    return list(pairs), [n for n in dst if n not in pairs], [s for s in src if s not in used]


# -----------------------------------------------------------------------------------------------
# 2. Pre-training

class Pretraining:
    """The pre-training stage for fit: next-token prediction on windows of the token stream,
    evaluated in validation bits per byte, with greedy samples.

    With reset_at_bos every BOS starts a new document (seq_idx): the Mamba states restart and
    attention does not look back past it, as the released code does with packed documents.
    """

    def __init__(self, tok, train_tokens, val_tokens, seq_len, seed, run, eval_tokens=2**16, micro_batch=16,
                 reset_at_bos=False, samples=True):
        self.tok, self.run, self.eval_tokens, self.mb = tok, run, eval_tokens, micro_batch
        self.reset_at_bos, self.samples = reset_at_bos, samples
        self.data = data.Batches(train_tokens, seq_len, seed)
        self.val = data.Batches(val_tokens, seq_len, seed, shuffle=False)
        self.seq_len = seq_len
        self.nbytes = token_bytes(tok)
        self.prompts = sample_prompts(val_tokens, tok)

    def documents(self, x):
        """seq_idx (b, t) for --reset-at-bos: the count of BOS tokens up to each position."""
        return torch.cumsum(x == self.tok.bos_id, dim=1) if self.reset_at_bos else None

    def batch(self, first, count, device):
        return self.data.get(first, count, device)

    def loss(self, model, batch):
        x, y = batch
        logits, _ = model(x, seq_idx=self.documents(x))
        return token_losses(logits, y).sum(), (y != -1).sum(), {}

    @torch.no_grad()
    def evaluate(self, model, step):
        """Validation bits per byte: summed token losses (nats -> bits) over the UTF-8 bytes they
        encode, so that models with other tokenizers compare; special tokens are left out."""
        run, mb = self.run, self.mb
        was_training = model.training
        model.eval()
        # The same number of passes on every process (FSDP needs it); windows past the end wrap around.
        n_seqs = run.world * mb * max(1, min(self.val.n, self.eval_tokens // self.seq_len) // (run.world * mb))
        nats = torch.zeros((), device=run.device, dtype=torch.float64)
        total = torch.zeros((), device=run.device, dtype=torch.float64)
        for first in range(run.rank * mb, n_seqs, run.world * mb):
            x, y = self.val.get(first, mb, run.device)
            with autocast(run.device, run.dtype):
                logits, _ = model(x, seq_idx=self.documents(x))
            batch_nats, batch_bytes = nats_and_bytes(logits, y, self.nbytes)
            nats += batch_nats
            total += batch_bytes
        if run.world > 1:
            dist.all_reduce(nats)
            dist.all_reduce(total)
        if run.master and self.samples and step > 0:  # (not under FSDP: generation needs the whole model in one process)
            for s in samples(getattr(model, "module", model), self.tok, self.prompts):
                print("  > " + s.replace("\n", " ⏎ "))
        model.train(was_training)
        return {"val_bpb": (nats / math.log(2) / total).item()}


def samples(model, tok, prompts, max_new_tokens=48):
    """Greedy continuations of a Japanese and an English prompt; stop at EOS or the next BOS."""
    was_training = model.training
    model.eval()
    texts = generate_text(model, tok, [tok.encode(p, bos=True) for p in prompts], max_new_tokens)
    model.train(was_training)
    return [p + t[0] for p, t in zip(prompts, texts)]


def sample_prompts(val_tokens, tok):
    """The opening words of the first Japanese and the first English validation document."""
    ja = en = None
    for doc in tok.decode([int(t) for t in val_tokens[:20000]]).split("<|plamo:bos|>"):
        doc = doc.strip()
        if not doc:
            continue
        if ja is None and any("\u3040" <= ch <= "\u9fff" for ch in doc[:20]):
            ja = doc[:8]
        elif en is None and doc[:20].isascii():
            en = " ".join(doc.split()[:3])
    return [p for p in (ja, en) if p]


def unigram_bpb(train_tokens, val_tokens, nbytes, limit=2**24):
    """Bits per byte of the best context-free model (token frequencies of the first `limit` train
    tokens, add-one smoothed) on the first `limit` validation tokens: the baseline a language
    model must beat by far."""
    counts = np.bincount(np.asarray(train_tokens[:limit]), minlength=len(nbytes)).astype(np.float64) + 1
    logp = np.log2(counts / counts.sum())
    val = np.asarray(val_tokens[:limit])
    b = nbytes.numpy()[val]
    return float(-(logp[val] * (b > 0)).sum() / b.sum())


# Per size: the context, the global batch in tokens, the run length, the peak learning rate and
# the sequences per forward pass (gradient accumulation makes up the rest of the batch).
TRAIN_PRESETS = {
    "tiny": dict(seq_len=256, batch_tokens=4096, max_steps=450, lr=3e-3, eval_every=100, micro_batch=16),
    "small": dict(seq_len=1024, batch_tokens=2**19, max_steps=10000, lr=1.5e-3, eval_every=500, micro_batch=16),
    "1b": dict(seq_len=2048, batch_tokens=2**20, max_steps=20000, lr=4e-4, eval_every=1000, micro_batch=8),
    "8b": dict(seq_len=2048, batch_tokens=2**21, max_steps=20000, lr=2e-4, eval_every=1000, micro_batch=2),
}
# The stage's own settings (beside the loop's), recorded in the lineage: what a --resume continues
# with, and what an --init-from run inherits unless given.
PRETRAIN_DEFAULTS = dict(size="tiny", corpus_bytes=8_000_000, world_people=600, heldout_frac=0.04, eval_tokens=2**16,
                         reset_at_bos=False, recall_frac=0.0, vocab_size=None, val_frac=0.05, workers=1)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(
        description="Pre-train PLaMo 2 on the synthetic corpus or your text, or continue a checkpoint (continual "
                    "pre-training, the long-context transition). Examples: python train.py --size tiny; python train.py "
                    "--init-from out/tiny/ckpt --out out/long --seq-len 1024 --full-attention-idx 1,3 --rope-theta 1e6.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--size", help=f"model and schedule preset: {', '.join(PRESETS)} (tiny: 450 steps, lr 3e-3, "
                                   f"seq-len 256, 4096 tokens a step; see TRAIN_PRESETS)")
    ap.add_argument("--data", help="your UTF-8 text (a file, or a directory of .txt / .jsonl), or data prepared by "
                                   "data.py; default: the synthetic bilingual corpus")
    ap.add_argument("--tokenizer", help="a new run: use this checkpoint's tokenizer (ours or a released "
                                        "tokenizer.jsonl) instead of training a BPE tokenizer")
    ap.add_argument("--workers", type=positive_int, help="processes that tokenize --data text (default 1)")
    ap.add_argument("--corpus-bytes", type=positive_int, help="size of the synthetic corpus (default 8,000,000)")
    ap.add_argument("--world-people", type=positive_int, help="people in the synthetic world (default 600; towns a "
                                                              "fifth as many, companies a sixth): fewer, and each fact "
                                                              "is repeated more")
    ap.add_argument("--heldout-frac", type=unit_float, help="share of the world's entities with one fact that no train "
                                                            "document states (default 0.04)")
    ap.add_argument("--vocab-size", type=positive_int, help="size of a new BPE tokenizer (default: the preset's "
                                                            "vocab_size)")
    ap.add_argument("--eval-tokens", type=positive_int, help="validation tokens per evaluation (default 65,536)")
    ap.add_argument("--init-from", help="start from this checkpoint's weights (the architecture may differ) and "
                                        "what its lineage records; --out defaults to a new <run>-cont")
    ap.add_argument("--recall-frac", type=unit_float, help="share of the train text made of recall documents "
                                                           "(key-value statements asked for later, corpus.py), default 0")
    ap.add_argument("--reset-at-bos", action="store_true", default=None,
                    help="restart the Mamba states and attention at every BOS (documents do not see each other)")
    ap.add_argument("--bench", action="store_true", default=None,
                    help="measure training tokens/s of PLaMo 2 and of the same-size plain transformer, then exit")
    add_loop_arguments(ap)
    # Architecture changes for continual pre-training from --init-from (and for new runs).
    ap.add_argument("--full-attention-idx", help="comma-separated attention layers without the sliding window")
    ap.add_argument("--rope-theta", type=positive_float, help="RoPE base (of every attention layer, unless "
                                                              "--rope-local-theta)")
    ap.add_argument("--rope-local-theta", type=positive_float, help="RoPE base of the sliding-window layers "
                                                                    "(PLaMo 2.1: a base per kind of layer)")
    ap.add_argument("--window", type=positive_int, help="attention_window_size")
    ap.add_argument("--no-mamba", action="store_true", default=None, help="a plain transformer of the same size (ablation)")
    args = ap.parse_args(argv)
    if args.recall_frac is not None and args.recall_frac >= 1:
        ap.error("--recall-frac must be below 1")
    if args.heldout_frac is not None and not 0 < args.heldout_frac < 1:
        ap.error("--heldout-frac must be above 0 and below 1")
    if args.world_people is not None and args.world_people < 30:
        ap.error("--world-people must be at least 30")
    if args.size is not None and args.size not in PRESETS:
        ap.error(f"unknown size {args.size!r}; choose one of {', '.join(PRESETS)}")
    if args.resume and args.init_from:
        ap.error("--resume continues a run, --init-from starts a new one: give one of them")
    if args.init_from and (args.vocab_size or args.tokenizer):
        ap.error("--init-from keeps the checkpoint's tokenizer: drop --vocab-size / --tokenizer")
    if args.tokenizer and args.vocab_size:
        ap.error("--tokenizer uses an existing tokenizer, --vocab-size trains a new one: give one of them")
    return args


def settings(args):
    """Where the run starts and with what: (Start or None, train state or None, lineage of a resumed
    run or None). A resumed run has its own settings; an --init-from run inherits what its
    checkpoint's lineage records (the pre-training text, the loop's and the stage's settings); a
    new one takes the size's presets. Prints where each setting came from."""
    if args.resume:
        if args.out is None:
            raise ValueError("--resume needs --out, the directory of the run to continue.")
        claim(args.out, [("--data", args.data)], resume=True)
        path, lineage, state, changed = resume(args, {**LOOP_DEFAULTS, **PRETRAIN_DEFAULTS})
        if state is None:
            raise FileNotFoundError(f"{path} has no train_state.pt: it was not written by a training run")
        print(f"resuming {path} at step {state['step']} with the run's settings"
              + (f", except {', '.join(changed)}" if changed else ""))
        return None, state, lineage
    source = start_from(args.init_from) if args.init_from else None
    if source is not None:
        run_dir = os.path.dirname(source.path) if os.path.basename(source.path) in ("ckpt", "ckpt.old") else source.path
        default_out = run_dir + "-cont"
        if args.out is None and os.path.exists(os.path.join(default_out, "ckpt")) and not args.overwrite:
            raise ValueError(f"--out defaults to {default_out}, which holds a run already: give --out.")
        args.out = args.out or default_out
        defaults = init_defaults(args, source)
        title = f"continuing {source.describe()}"
    else:
        size = args.size or "tiny"
        defaults = {k: (v, f"the {size} preset's") for k, v in {**PRETRAIN_DEFAULTS, **TRAIN_PRESETS[size],
                                                                 "size": size}.items()}
        defaults.update({k: (v, "the loop's default") for k, v in LOOP_DEFAULTS.items()})
        defaults["vocab_size"] = (PRESETS[size]["vocab_size"], f"the {size} preset's")
        args.out = args.out or os.path.join("out", size)
        title = f"a new {size} model"
    lines = settle(args, defaults)
    claim(args.out, [("--init-from", source and source.path), ("--data", args.data), ("--tokenizer", args.tokenizer)],
          overwrite=bool(args.overwrite))
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"train: {title} -> {args.out}\n" + "\n".join(lines))
    return source, None, None


def init_defaults(args, source):
    """What an --init-from run takes from its checkpoint: with lineage, the loop's settings and the
    stage's (the text, the world, the corpus), peak learning rate included; without (a released
    model), the settings of the preset nearest its size, a third of that preset's peak learning
    rate (continual pre-training re-warms to a fraction of the original peak), and --data is needed."""
    settings = source.lineage.get("settings", {})
    if "loop" in source.lineage:  # made by a training run here
        defaults = loop_defaults(source, {"max_steps": (source.lineage["loop"]["max_steps"], "inherited from its lineage"),
                                          "lr": (source.lineage["loop"]["lr"], "inherited from its lineage")})
        for k in ("size", "corpus_bytes", "world_people", "heldout_frac", "eval_tokens", "reset_at_bos", "recall_frac",
                  "val_frac"):
            if k in settings:
                defaults[k] = (settings[k], "inherited from its lineage")
    else:
        if args.data is None:
            raise ValueError(f"--init-from {args.init_from}: the checkpoint was not made by a training run here (a "
                             f"released model, an export or a merge), so there is no training text to continue on: "
                             f"give --data.")
        size = nearest_size(source.params)
        preset = TRAIN_PRESETS[size]
        defaults = {k: (v, "the loop's default") for k, v in LOOP_DEFAULTS.items()}
        defaults.update({k: (preset[k], f"the {size} preset's (the nearest in size)")
                         for k in ("seq_len", "batch_tokens", "micro_batch", "max_steps", "eval_every")})
        defaults["lr"] = (preset["lr"] / 3, f"a third of the {size} preset's peak {preset['lr']:g} (no lineage)")
        defaults["size"] = (size, "the nearest preset in size")
    for k, v in PRETRAIN_DEFAULTS.items():
        defaults.setdefault(k, (v, "the stage's default"))
    return defaults


def model_config(args, tok=None, base=None):
    """The preset (or the --init-from checkpoint's config), changed by the architecture flags,
    with the special token ids of tok."""
    cfg = base or PLaMo2Config.from_preset(args.size, vocab_size=tok.vocab_size if tok else args.vocab_size)
    changes = special_token_ids(tok) if tok is not None else {}
    if args.full_attention_idx is not None:
        try:
            changes["full_attention_idx"] = sorted({int(i) for i in args.full_attention_idx.split(",") if i.strip()})
        except ValueError:
            raise ValueError(f"--full-attention-idx takes layer numbers separated by commas, got "
                             f"{args.full_attention_idx!r}.") from None
    if args.rope_theta is not None:
        changes["rope_theta"] = args.rope_theta
    if args.rope_local_theta is not None:
        changes["rope_local_theta"] = args.rope_local_theta
    if args.window is not None:
        changes["attention_window_size"] = args.window
    if args.no_mamba:
        changes["mamba_enabled"] = False
    changes["max_position_embeddings"] = max(cfg.max_position_embeddings, args.seq_len)
    cfg = PLaMo2Config(**{**cfg.__dict__, **changes})
    mamba = [i for i in cfg.full_attention_idx if cfg.is_mamba(i)]
    if mamba:
        attention = [i for i in range(cfg.num_hidden_layers) if not cfg.is_mamba(i)]
        raise ValueError(f"--full-attention-idx names Mamba layers {mamba}; only attention layers have a window "
                         f"(here {attention}).")
    return cfg


def wanted_text(args):
    """What the run's text is prepared from: --data's path or the synthetic world's settings, the
    validation share, and the recall documents (their size follows --seq-len)."""
    recall = dict(seed=args.seed, frac=args.recall_frac, doc_bytes=2 * args.seq_len) if args.recall_frac else None
    if args.data:
        return {"text": os.path.abspath(args.data), "val_frac": args.val_frac, "recall": recall}
    return {"world": dict(seed=args.seed, target_bytes=args.corpus_bytes, heldout_fraction=args.heldout_frac,
                          n_people=args.world_people), "recall": recall}


def inherited_text(args, text):
    """An --init-from run without --data trains on its checkpoint's text: the prepared data itself
    when it was prepared as this run would prepare it, else the text it was prepared from (raw
    files, or the synthetic world: None), to prepare again with this run's settings."""
    try:
        with open(os.path.join(text, data.MANIFEST), encoding="utf-8") as f:
            run = json.load(f).get("run", {})
    except (OSError, ValueError):
        raise FileNotFoundError(f"--init-from: the text its lineage records, {text}, is not prepared data any more: "
                                f"give --data") from None
    source = run.get("text")
    probe = argparse.Namespace(**{**vars(args), "data": source})
    return text if run == wanted_text(probe) else source


def prepare_run_data(args, path, tok):
    """Pre-training's text (--data, or the synthetic corpus) prepared into path, unless what is
    there was prepared from the same sources, settings and tokenizer."""
    wanted = wanted_text(args)
    recall = wanted["recall"]
    if data.is_prepared(path):
        with open(os.path.join(path, data.MANIFEST), encoding="utf-8") as f:
            m = json.load(f)
        same_tok = tok is None or m["tokenizer"]["sha256"] == data.fingerprint(tok)
        if same_tok and m.get("run") == wanted and data.sources_unchanged(m):
            print(f"data: {path} is already prepared from the same text and settings")
            return
    if args.data:
        data.prepare_files(args.data, path, tok, args.vocab_size, args.workers, args.seed, args.val_frac,
                           recall=recall, extra={"run": wanted})
    else:
        data.prepare_corpus(path, wanted["world"], tok, args.vocab_size, recall, args.workers, extra={"run": wanted})


def train(args):
    source, state, lineage = settings(args)
    run = start_processes(args)
    args.resume_command = f"python train.py --out {args.out} --resume"
    tok = None
    if state is not None:
        model, tok = load_checkpoint(os.path.join(args.out, "ckpt"), run.device)
    elif source is not None:
        base, tok = load_checkpoint(source.path, run.device)
    elif args.tokenizer:
        tok = data.tokenizer_arg(args.tokenizer)
    if state is None:  # a step that cannot fit is refused now, before the data is prepared
        cfg = model_config(args, tok, base.config if source is not None else None)
        check_memory(cfg, args.seq_len, batch_shape(Loop.from_args(args), run.world)[1], run, args.fsdp)
    if state is not None:
        args.data = lineage["text"]
    elif source is not None and args.data is None:
        args.data = inherited_text(args, source.lineage["text"])
    data_dir, train_tokens, val_tokens, tok = prepared_text(args.data, args.out, tok, run,
                                                            lambda path: prepare_run_data(args, path, tok))
    if state is None and source is None and "vocab_size" in args.given and tok.vocab_size != args.vocab_size:
        raise ValueError(f"--vocab-size {args.vocab_size}: {data_dir} was prepared with a tokenizer of "
                         f"{tok.vocab_size:,} tokens; drop --vocab-size (the model takes the tokenizer's)")
    if state is None:
        torch.manual_seed(args.seed)
        cfg = model_config(args, tok, base.config if source is not None else None)
        model = PLaMo2(cfg).to(run.device)
        if source is not None:
            copied, new, dropped = reuse_weights(model, base)
            run.log(f"init from {source.path}: copied {len(copied)} tensors, new {len(new)}"
                    f"{': ' + ', '.join(new) if new else ''}, dropped {len(dropped)}"
                    f"{': ' + ', '.join(dropped) if dropped else ''}")
            diff = {k: (v, getattr(cfg, k)) for k, v in base.config.__dict__.items() if getattr(cfg, k) != v}
            run.log(f"config inherited from the checkpoint, changed: {diff or 'nothing'}")
            del base
        lineage = {"stage": "cpt" if source is not None else "pretrain", "parent": source and source.path,
                   "history": history(source), "text": data_dir,
                   "pretrain_lr": pretraining_peak(source.lineage) if source is not None else args.lr,
                   "settings": {k: getattr(args, k) for k in PRETRAIN_DEFAULTS}}
    stage = Pretraining(tok, train_tokens, val_tokens, args.seq_len, args.seed, run, args.eval_tokens,
                        args.micro_batch, args.reset_at_bos, samples=not args.fsdp)
    run.log(f"unigram baseline: {unigram_bpb(train_tokens, val_tokens, stage.nbytes):.3f} bits/byte on val"
            + (" | documents reset at BOS" if args.reset_at_bos else ""))
    first = None
    if state is None:
        first = stage.evaluate(model, 0)
        run.log(f"before training: val_bpb {first['val_bpb']:.4f}")
    fit(model, stage, Loop.from_args(args), tok, run, lineage, state, first)
    run.log(f"next: python infer.py --ckpt {os.path.join(args.out, 'ckpt')} --prompt \"...\"   or a later stage "
            f"(posttrain.py sft / prune.py / train.py --init-from) with --ckpt {os.path.join(args.out, 'ckpt')}")
    end_processes(run)


def bench(args):
    """Training tokens/s of PLaMo 2 and of the same-size plain transformer, side by side."""
    size = args.size or "tiny"
    settle(args, {k: (v, "") for k, v in {**PRETRAIN_DEFAULTS, **TRAIN_PRESETS[size], **LOOP_DEFAULTS,
                                          "vocab_size": PRESETS[size]["vocab_size"], "size": size}.items()})
    loop = Loop.from_args(args)
    device = resolve_device(args.device or "auto")
    dtype = resolve_dtype(args.dtype or "auto", device)
    peak = measure_peak_flops(device, dtype)
    torch.manual_seed(args.seed)
    x = torch.randint(0, args.vocab_size, (args.micro_batch, args.seq_len + 1), device=device)
    models = {}
    for name, no_mamba in (("PLaMo 2 (Mamba + attention)", False), ("plain transformer", True)):
        cfg = model_config(argparse.Namespace(**{**vars(args), "no_mamba": no_mamba}))
        model = PLaMo2(cfg).to(device)
        models[name] = (model, make_optimizer(model, loop, device), flops_per_token(cfg, args.seq_len))

    def step(model, opt):
        with autocast(device, dtype):
            _, loss = model(x[:, :-1], x[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    times = side_by_side({name: (lambda m=m, o=o: step(m, o)) for name, (m, o, _) in models.items()}, repeats=5,
                         what="bench")
    print(f"{size}, {args.micro_batch} x {args.seq_len} tokens per step, {device} {dtype}, "
          f"peak {peak / 1e9:.0f} GFLOP/s (best of 7 matmul timings); min/median/max of 5 steps each")
    warning = spread_warning(times)
    if warning:
        print(warning)
    results = {}
    for name, (model, _, fpt) in models.items():
        t = times[name]
        tps = args.micro_batch * args.seq_len / t.median
        results[name] = tps
        print(f"  {name:30s} {model.num_params() / 1e6:6.2f}M params  {tps:8,.0f} tok/s  MFU {100 * fpt * tps / peak:.1f}%"
              f"  (step {t})")
    a, b = results.values()
    print(f"  PLaMo 2 / plain transformer: {a / b:.2f}x")


def main(argv=None):
    args = parse_args(argv)
    cli(lambda: bench(args) if args.bench else train(args))


if __name__ == "__main__":
    main()
