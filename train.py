"""
train.py: pre-training PLaMo 2, from raw text to a checkpoint, and the training loop that every
later stage (long context, distillation, SFT, DPO) runs with its own data and loss.

    python train.py --size tiny                           # laptop CPU, about ten minutes
    python train.py --size tiny --data ../novels/          # your own UTF-8 text
    torchrun --nproc_per_node=8 train.py --size 1b --data corpus/   # a GPU node (DDP; --fsdp to shard)
    python train.py --init-from out/tiny/ckpt --out out/tiny-long --seq-len 1024 \\
        --full-attention-idx 1,3 --rope-theta 1e6 --rope-local-theta 10000 --max-steps 200

Read top to bottom, this file is the story of the stage:
  1. Tokenizer: byte-level BPE trained on the training split and encoded with tiktoken.
     (PLaMo 2's own tokenizer is a 100k Unigram-style vocabulary; plamo2.py reads that one
     for released checkpoints. Ours is the standard recipe at laptop scale.)
  2. Data: documents separated by BOS in one memory-mapped token stream, cut into windows.
  3. Checkpoints: the Hugging Face layout plus tokenizer and training state, written atomically;
     weight reuse from a checkpoint whose architecture differs.
  4. The training loop, shared by every stage: processes and devices (DDP/FSDP), AdamW and its
     parameter groups, warmup + cosine or WSD, accumulation, clipping, the NaN stop, a JSONL log,
     a curve PNG and a progress line, evaluation and checkpoints on a cadence, exact resume.
     A stage brings its batches, its loss and its evaluation (see fit).
  5. Pre-training: that stage for next-token prediction, and the command line.
"""
import argparse
import collections
import contextlib
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass

import numpy as np
import regex  # tiktoken's own dependency; it knows the same \\p{...} classes as tiktoken's engine
import torch
import torch.distributed as dist
import torch.nn.functional as F

import corpus
from plamo2 import (PLaMo2, PLaMo2Config, PRESETS, SPECIAL_TOKENS, SPLIT_PATTERN, Tokenizer, autocast,
                    check_tokenizer, load, nats_and_bytes, resolve_device, resolve_dtype, special_token_ids,
                    token_bytes)

# -----------------------------------------------------------------------------------------------
# 1. Tokenizer
#
# Byte-level BPE in three steps, as in GPT-2/4: split the text into chunks with a regex,
# count adjacent byte pairs inside chunks, and merge the most frequent pair into a new token
# until the vocabulary is full. Every string encodes, because the 256 single bytes are tokens.
# The split pattern, the special tokens and the Tokenizer class live in plamo2.py.

def merge(ids, pair, new_id):
    """Replace every occurrence of pair in ids with new_id, left to right, without overlaps.

    >>> merge([1, 2, 2, 2, 3], (2, 2), 9)
    [1, 9, 2, 3]
    """
    out, i = [], 0
    while i < len(ids):
        if i + 1 < len(ids) and (ids[i], ids[i + 1]) == pair:
            out.append(new_id)
            i += 2
        else:
            out.append(ids[i])
            i += 1
    return out


def train_bpe_reference(text_chunks, vocab_size, pattern=SPLIT_PATTERN):
    """The readable BPE trainer (minbpe style): the ground truth that train_bpe must match.

    text_chunks: an iterable of strings (documents); each is split with `pattern` first.
    Returns mergeable_ranks {token bytes: rank}: the 256 single bytes, then one token per merge,
    vocab_size in all (fewer if the text runs out of pairs).
    Ties: of the pairs with the highest count, the one with the smallest (left id, right id)
    wins. That is rustbpe's rule (its heap orders equal counts by ascending pair), which is
    why train_bpe and this function give the same merges.

    >>> ranks = train_bpe_reference(["abab abab", "ab"], 258)
    >>> [t for t, r in ranks.items() if r >= 256]
    [b'ab', b'abab']
    """
    chunk_counts = collections.Counter(c for text in text_chunks for c in regex.findall(pattern, text))
    words = [(list(c.encode("utf-8")), n) for c, n in chunk_counts.items()]  # each distinct chunk once
    vocab = [bytes([b]) for b in range(256)]
    while len(vocab) < vocab_size:
        stats = collections.Counter()
        for ids, n in words:
            for pair in zip(ids, ids[1:]):
                stats[pair] += n
        if not stats:
            break
        pair = min(stats, key=lambda p: (-stats[p], p))
        vocab.append(vocab[pair[0]] + vocab[pair[1]])
        # a chunk that is one token has no pairs left: drop it, the loop gets faster each merge
        words = [(m, n) for m, n in ((merge(ids, pair, len(vocab) - 1), n) for ids, n in words) if len(m) > 1]
    return {token: rank for rank, token in enumerate(vocab)}


def train_bpe(text_chunks, vocab_size, pattern=SPLIT_PATTERN):
    """Same result as train_bpe_reference, fast: rustbpe (Rust, parallel) trains 8k merges on
    5 MB in seconds. Falls back to the reference when rustbpe is not installed."""
    try:
        import rustbpe
    except ImportError:
        print("rustbpe is not installed (pip install rustbpe): training with the slow pure-Python reference")
        return train_bpe_reference(text_chunks, vocab_size, pattern)
    trainer = rustbpe.Tokenizer()
    trainer.train_from_iterator(iter(text_chunks), vocab_size, pattern=pattern)
    return {bytes(token): rank for token, rank in trainer.get_mergeable_ranks()}


def train_tokenizer(texts, vocab_size, trainer=train_bpe):
    """Train a Tokenizer on texts so that the vocabulary, special tokens included, is vocab_size."""
    n = vocab_size - len(SPECIAL_TOKENS)
    if n < 256:
        raise ValueError(f"vocab_size must be at least {256 + len(SPECIAL_TOKENS)}: "
                         "the 256 bytes plus the special tokens.")
    ranks = trainer(texts, n)
    if len(ranks) < n:
        raise ValueError(f"the training text is too small for vocab_size {vocab_size}: "
                         f"it has pairs for only {len(ranks) + len(SPECIAL_TOKENS)} tokens.")
    return Tokenizer(ranks)


def bytes_per_token(tok, docs):
    """UTF-8 bytes per token over docs: how much text a token carries (higher is better).

    >>> c = corpus.generate_corpus()  # the default corpus  # doctest: +SKIP
    >>> bytes_per_token(train_tokenizer(c.train, 4096), c.val)  # doctest: +SKIP
    4.47
    """
    n_tokens = sum(len(ids) for ids in tok.encode_batch(docs))
    return sum(len(d.encode("utf-8")) for d in docs) / max(n_tokens, 1)


# -----------------------------------------------------------------------------------------------
# 2. Data: documents -> one BOS-separated token stream in a memory-mapped file

def tokenize_to_file(tok, docs, path):
    """Encode docs, each preceded by BOS (PLaMo 2's document separator), into a flat uint16/32
    file, written atomically. Returns the memory-mapped array."""
    ids = np.fromiter((t for doc in tok.encode_batch(docs, bos=True) for t in doc), dtype=token_dtype(tok))
    ids.tofile(path + ".tmp")
    os.replace(path + ".tmp", path)
    return token_file(path, tok)


def token_dtype(tok):
    """uint16 when every id fits: half the disk and memory of uint32."""
    return np.uint16 if tok.vocab_size <= 2**16 else np.uint32


def token_file(path, tok):
    """A token stream that tokenize_to_file wrote, memory-mapped."""
    return np.memmap(path, dtype=token_dtype(tok), mode="r")


class EpochOrder:
    """Position g of a run -> item perm_e[g % n] of epoch e = g // n, each epoch's permutation
    drawn from seed + e (the identity with shuffle=False): the position alone fixes the item, so
    it is all a resume needs."""

    def __init__(self, n, seed, shuffle=True):
        self.n, self.seed, self.shuffle = n, seed, shuffle
        self.epoch, self.perm = None, None

    def __call__(self, g):
        epoch, i = divmod(g, self.n)
        if not self.shuffle:
            return i
        if epoch != self.epoch:
            self.epoch = epoch
            self.perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + epoch))
        return self.perm[i].item()


class Batches:
    """Windows of seq_len + 1 tokens, sequence g of the run being window EpochOrder(n, seed)(g)
    (shuffled per epoch; in order with shuffle=False, for validation)."""

    def __init__(self, tokens, seq_len, seed, shuffle=True):
        self.tokens, self.seq_len = tokens, seq_len
        self.n = (len(tokens) - 1) // seq_len
        if self.n < 1:
            raise ValueError(f"the data has {len(tokens)} tokens, fewer than one sequence of {seq_len + 1}.")
        self.order = EpochOrder(self.n, seed, shuffle)

    def window(self, g):
        start = self.order(g) * self.seq_len
        return torch.from_numpy(self.tokens[start:start + self.seq_len + 1].astype(np.int64))

    def get(self, first, count, device):
        """Sequences first .. first+count-1 as inputs and targets, each (count, seq_len)."""
        w = torch.stack([self.window(g) for g in range(first, first + count)])
        return w[:, :-1].to(device), w[:, 1:].to(device)


def unigram_bpb(train_tokens, val_tokens, nbytes):
    """Bits per byte of the best context-free model (token frequencies of train, add-one
    smoothed): the baseline a language model must beat by far."""
    counts = np.bincount(train_tokens, minlength=len(nbytes)).astype(np.float64) + 1
    logp = np.log2(counts / counts.sum())
    val = np.asarray(val_tokens)
    b = nbytes.numpy()[val]
    return float(-(logp[val] * (b > 0)).sum() / b.sum())


def prepare_data(args, out, tok, rank):
    """Corpus -> (tokenizer, train stream, val stream). Rank 0 does the work, the others read it."""
    data_dir = os.path.join(out, "data")
    tok_path = os.path.join(data_dir, "tokenizer.tiktoken")
    if rank == 0:
        os.makedirs(data_dir, exist_ok=True)
        t0 = time.time()
        if args.data:
            train_docs, val_docs = corpus.split_train_val(corpus.load_text(args.data), seed=args.seed)
            source = args.data
        else:
            c = corpus.generate_corpus(seed=args.seed, target_bytes=args.corpus_bytes,
                                       heldout_fraction=args.heldout_frac, n_people=args.world_people)
            train_docs, val_docs, source = c.train, c.val, "the synthetic bilingual corpus"
            # The world's settings too: posttrain.py rebuilds the same world and corpus from them.
            world = dict(seed=args.seed, target_bytes=args.corpus_bytes, heldout_fraction=args.heldout_frac,
                         n_people=args.world_people)
            with open(os.path.join(data_dir, "heldout_facts.json"), "w", encoding="utf-8") as f:
                json.dump({"heldout": c.heldout_facts, "train_control": c.train_facts, "world": world}, f,
                          ensure_ascii=False)
        nb = sum(len(d.encode()) for d in train_docs)
        print(f"data: {source}: {len(train_docs):,} train / {len(val_docs):,} val documents, "
              f"{nb / 1e6:.1f} MB of train text ({time.time() - t0:.1f}s)")
        if args.recall_frac:
            # Recall documents (corpus.py) in the training stream only, so that validation stays
            # ordinary text; half a training window long on average (~4 bytes a token), so that
            # most of their questions fall in the same window as the statement they repeat.
            recall = corpus.recall_corpus(args.seed, args.recall_frac / (1 - args.recall_frac) * nb, 2 * args.seq_len)
            rb = sum(len(d.encode()) for d in recall)
            print(f"data: + {len(recall):,} recall documents, {rb / 1e6:.1f} MB ({100 * rb / (nb + rb):.0f}% of the train text)")
            train_docs = train_docs + recall
        if tok is None:
            t0 = time.time()
            tok = train_tokenizer(train_docs, args.vocab_size)
            print(f"tokenizer: byte-level BPE, {tok.vocab_size} tokens, trained in {time.time() - t0:.1f}s; "
                  f"{bytes_per_token(tok, val_docs[:2000]):.2f} bytes/token on val")
        tok.save(tok_path)
        tokenize_to_file(tok, train_docs, os.path.join(data_dir, "train.bin"))
        tokenize_to_file(tok, val_docs, os.path.join(data_dir, "val.bin"))
    if dist.is_initialized():
        dist.barrier()
    tok = Tokenizer.load(tok_path)
    return tok, token_file(os.path.join(data_dir, "train.bin"), tok), token_file(os.path.join(data_dir, "val.bin"), tok)


# -----------------------------------------------------------------------------------------------
# 3. Checkpoints: <out>/ckpt = config.json + model.safetensors (Hugging Face layout, so
#    PLaMo2.from_hf loads it), tokenizer.tiktoken, and train_state.pt for --resume.

def save_checkpoint(path, model, tok, train_state):
    """Write everything to path.tmp, then swap it in: a kill at any moment leaves either the
    previous checkpoint or the new one complete (find_checkpoint looks at both names)."""
    check_tokenizer(path, model.config, tok)  # config.json must announce this tokenizer's special ids
    tmp = path + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_hf(tmp)
    tok.save(os.path.join(tmp, "tokenizer.tiktoken"))
    if train_state is not None:  # None: weights only (a pruned model, say), nothing to resume
        torch.save(train_state, os.path.join(tmp, "train_state.pt"))
    swap_in(tmp, path)


def swap_in(tmp, path):
    """Make the complete directory tmp the checkpoint at path, replacing any there."""
    old = path + ".old"
    for name in os.listdir(tmp):  # the bytes reach the disk before the new name does
        with open(os.path.join(tmp, name), "rb") as f:
            os.fsync(f.fileno())
    if os.path.exists(path):
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def find_checkpoint(path):
    """path, or path.old when a kill hit between the two renames of save_checkpoint."""
    if not os.path.isdir(path) and os.path.isdir(path + ".old"):
        return path + ".old"
    return path


def load_checkpoint(path, device):
    """(model in fp32, tokenizer) from a checkpoint directory, with one clear error if anything is off."""
    return load(find_checkpoint(path), device=device, dtype=torch.float32)


def load_train_state(path):
    """train_state.pt of a checkpoint, on the CPU whatever device saved it (mmap: an 8B model's
    optimizer state is read lazily, and no process puts all of it on cuda:0)."""
    try:
        return torch.load(os.path.join(path, "train_state.pt"), map_location="cpu", mmap=True, weights_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} has no train_state.pt (it was not written by a training run).") from None
    except Exception as e:  # torch raises several types for a truncated or foreign file
        raise ValueError(f"cannot read {os.path.join(path, 'train_state.pt')}: {e}") from None


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
# 4. The training loop, shared by every stage
#
# A stage is an object with three methods (Pretraining below is one; distillation, SFT and DPO
# are others):
#   batch(first, count, device)  sequences first .. first+count-1 of the run, in any form;
#                                the same first always gives the same data, so a step number
#                                is all that resuming needs
#   loss(model, batch)           (sum of the loss terms, number of terms, {name: metric summed
#                                over those terms}); fit divides the loss and each metric by the
#                                terms of the whole step, so that every term weighs the same
#                                whichever micro-batch or process it fell in
#   evaluate(model, step)        {name: value}, called on every process (FSDP gathers weights)
# fit does everything else. Flags it owns are added by add_loop_arguments, in every script.

LOOP_DEFAULTS = dict(schedule="cosine", min_lr_frac=0.1, weight_decay=0.1, grad_clip=1.0, device="auto",
                     dtype="auto", seed=1337)


def add_loop_arguments(ap):
    """The flags of the training loop, the same in every script that trains. Their defaults are
    None so that a script can tell a flag given on the command line from one it fills in (from the
    run it resumes or starts from, else its presets, else LOOP_DEFAULTS): see settle()."""
    ap.add_argument("--out", help="output directory: log.jsonl, loss.png and ckpt/")
    ap.add_argument("--seq-len", type=int, help="tokens per training sequence")
    ap.add_argument("--batch-tokens", type=int, help="tokens per optimizer step, over all processes")
    ap.add_argument("--micro-batch", type=int, help="sequences per forward pass and process")
    ap.add_argument("--max-steps", type=int, help="optimizer steps; the schedule ends here")
    ap.add_argument("--stop-at-step", type=int, help="stop early at this step, as if interrupted "
                                                     "(the schedule still ends at --max-steps); --resume continues")
    ap.add_argument("--lr", type=float, help="peak learning rate")
    ap.add_argument("--schedule", choices=["cosine", "wsd"],
                    help="after warmup: cosine decay (default), or warmup-stable-decay (linear decay in the last 20%%)")
    ap.add_argument("--warmup-steps", type=int, help="linear warmup (default: 4%% of --max-steps)")
    ap.add_argument("--min-lr-frac", type=float, help="final learning rate as a fraction of --lr (default 0.1)")
    ap.add_argument("--weight-decay", type=float, help="AdamW weight decay on matrices (default 0.1)")
    ap.add_argument("--grad-clip", type=float, help="clip the global gradient norm, 0 = off (default 1.0)")
    ap.add_argument("--eval-every", type=int, help="steps between evaluations and checkpoints")
    ap.add_argument("--device", help="auto (default), cpu, cuda, cuda:1, mps")
    ap.add_argument("--dtype", help="auto (default: bf16 autocast on CUDA, fp32 elsewhere), float32, bfloat16")
    ap.add_argument("--seed", type=int, help="seed for the data order and the init (default 1337)")
    ap.add_argument("--compile", action="store_true", default=None, help="torch.compile the model")
    ap.add_argument("--resume", action="store_true", default=None,
                    help="continue the run in --out exactly where it stopped, with its own settings")
    ap.add_argument("--fsdp", action="store_true", default=None, help="shard the model with FSDP (under torchrun)")


def check_positive(ap, args, names):
    for k in names:
        if getattr(args, k, None) is not None and getattr(args, k) < 1:
            ap.error(f"--{k.replace('_', '-')} must be a positive integer")


def settle(args, presets, source=None, inherit=()):
    """Fill in every setting the command line left out, in place: from source (the settings of
    the run this one starts from) for the names in inherit, else presets, else LOOP_DEFAULTS.
    The warmup follows --max-steps unless a run gave it. Returns {name: value} inherited."""
    given = {k for k, v in vars(args).items() if v is not None and k != "given"}
    inherited = {}
    for k in inherit:
        if k in given or k not in source or (k == "warmup_steps" and k not in source.get("given", ())):
            continue
        setattr(args, k, source[k])
        inherited[k] = source[k]
    for k, v in {**LOOP_DEFAULTS, **presets}.items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)
    for k in ("compile", "resume", "fsdp"):
        setattr(args, k, bool(getattr(args, k, False)))
    if args.warmup_steps is None:
        args.warmup_steps = max(1, args.max_steps // 25)
    args.given = sorted(given)
    return inherited


# What --resume takes from the command line: how and where this invocation runs (its own value
# or the default, never the stored one), and what may change without changing the steps already
# taken (given, or the run's).
INVOCATION = {"out", "resume", "device", "compile", "fsdp", "stop_at_step"}
RESUME_MAY_CHANGE = {"dtype", "micro_batch", "max_steps", "eval_every", "eval_tokens"}


def resume_settings(args, defaults):
    """--resume: (the run's own settings, its train state, the checkpoint path, {name: value}
    given anew). A flag given with another value than the run's is an error, unless it is one of
    the above. Settings an older run did not record take defaults (the stage's, then the loop's)."""
    path = find_checkpoint(os.path.join(args.out, "ckpt"))
    if not os.path.isdir(path):
        raise FileNotFoundError(f"--resume: no checkpoint at {os.path.join(args.out, 'ckpt')} to resume from.")
    state = load_train_state(path)
    stored = {**LOOP_DEFAULTS, **defaults, **state["args"]}
    given = {k: v for k, v in vars(args).items() if v is not None and k != "given"}
    differ = [f"--{k.replace('_', '-')} {v} (the run's: {stored.get(k)})" for k, v in given.items()
              if k not in INVOCATION | RESUME_MAY_CHANGE and stored.get(k) != v]
    if differ:
        raise ValueError(f"--resume continues {args.out} with its own settings, and these flags differ from them: "
                         f"{', '.join(differ)}; drop them, or start a new run from the checkpoint with --init-from.")
    if args.fsdp and not stored.get("fsdp"):  # the optimizer state is keyed by index, FSDP's by name
        raise ValueError(f"{path} was saved without --fsdp; resume it without --fsdp.")
    now = {k: getattr(args, k) for k in INVOCATION}
    now.update(device=args.device or LOOP_DEFAULTS["device"], compile=bool(args.compile), fsdp=bool(args.fsdp),
               resume=True)
    changed = {k: given[k] for k in RESUME_MAY_CHANGE if k in given}
    merged = argparse.Namespace(**{**stored, **now, **changed})
    merged.given = sorted(set(stored.get("given", ())) | set(given))
    return merged, state, path, changed


@dataclass
class Run:
    """Where this process stands: its rank among world processes, its device and precision."""
    rank: int
    world: int
    device: torch.device
    dtype: torch.dtype
    ddp: bool  # started by torchrun: a process group, gradients averaged over processes

    @property
    def master(self):
        return self.rank == 0

    def log(self, *a, **k):
        if self.master:
            print(*a, **k)


def start_processes(args):
    """One process, or one per GPU under torchrun (which sets RANK): DDP with NCCL on GPUs, gloo on CPUs."""
    ddp = "RANK" in os.environ
    if args.fsdp and not ddp:
        raise ValueError("--fsdp shards the model over several processes: start the run with torchrun "
                         "(torchrun --nproc_per_node=N train.py --fsdp ...).")
    if ddp:
        rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
        device = torch.device("cuda", local) if torch.cuda.is_available() else torch.device("cpu")
        if device.type == "cuda":
            torch.cuda.set_device(device)
    else:
        rank, world, device = 0, 1, resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    if dtype == torch.float16:
        raise ValueError("float16 training needs loss scaling, which this loop does not do (its gradients "
                         "underflow silently): use --dtype bfloat16 or float32.")
    if ddp:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Run(rank, world, device, dtype, ddp)


def end_processes(run):
    if run.ddp:
        dist.barrier()
        dist.destroy_process_group()


def batch_shape(args, world):
    """(sequences per step, per forward pass, accumulation steps): the global batch is fixed, and
    accumulation absorbs the number of processes, so results do not depend on it."""
    seqs = args.batch_tokens // args.seq_len
    if seqs < world or seqs * args.seq_len != args.batch_tokens:
        raise ValueError(f"--batch-tokens {args.batch_tokens} must be a multiple of --seq-len {args.seq_len} "
                         f"with at least one sequence per process ({world}).")
    per_rank = seqs // world
    if per_rank * world != seqs:
        raise ValueError(f"{seqs} sequences per step do not split evenly over {world} processes.")
    mb = max(d for d in range(1, min(args.micro_batch, per_rank) + 1) if per_rank % d == 0)
    return seqs, mb, per_rank // mb


def lr_at(step, args):
    if step < args.warmup_steps:
        return args.lr * (step + 1) / args.warmup_steps
    floor = args.lr * args.min_lr_frac
    if args.schedule == "wsd":  # stable, then linear decay over the last 20% of the run
        decay_start = int(0.8 * args.max_steps)
        frac = max(0.0, (step - decay_start) / max(1, args.max_steps - decay_start))
        return args.lr - (args.lr - floor) * frac
    progress = (step - args.warmup_steps) / max(1, args.max_steps - args.warmup_steps)
    return floor + 0.5 * (args.lr - floor) * (1 + math.cos(math.pi * min(1.0, progress)))


def make_optimizer(model, args, device):
    """AdamW; no weight decay on norms, biases, embeddings and the SSM parameters (A_log, D,
    dt_bias): decaying them pulls them towards values that mean nothing."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        skip = p.dim() < 2 or name.endswith(("q_weight", "k_weight")) or "embed_tokens" in name
        (no_decay if skip else decay).append(p)
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.95), eps=1e-8, fused=device.type == "cuda")


def flops_per_token(cfg, seq_len):
    """Training FLOPs per token (forward + backward = 3x forward), matmuls only, as MFU counts
    them: 6 per weight of every Linear (the head too, tied or not; an embedding lookup is free),
    12·Hq·P per key attended, and for the scan ~3·2·(2·Nh·P·N) for the state update and read-out
    (the chunked form does a little more; we count the recurrence's own work)."""
    with torch.device("meta"):
        model = PLaMo2(cfg)
    flops = 6 * sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    for i in range(cfg.num_hidden_layers):
        if cfg.is_mamba(i):
            flops += 12 * cfg.mamba_num_heads * cfg.hidden_size_per_head * cfg.mamba_d_state
        else:
            w = seq_len if i in cfg.full_attention_idx else cfg.attention_window_size
            keys = sum(min(t, w) + 1 for t in range(seq_len)) / seq_len  # mean keys per query
            flops += 12 * cfg.num_attention_heads * cfg.hidden_size_per_head * keys
    return flops


def measure_peak_flops(device, dtype, repeats=7):
    """FLOP/s of a large matmul on this device, the denominator of MFU: the best of several
    timings, since a shared machine only ever makes one slower."""
    n = 4096 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    a @ b
    sync()
    best = 0.0
    for _ in range(repeats):
        reps, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < 0.1:
            a @ b
            reps += 1
        sync()
        best = max(best, 2 * n**3 * reps / (time.perf_counter() - t0))
    return best


def plot_log(log_path, png_path):
    """Training loss and every evaluation metric against step, from the JSONL log."""
    from matplotlib.figure import Figure  # no pyplot: a notebook's backend stays as it is

    with open(log_path) as f:
        rows = [json.loads(line) for line in f]
    last = {}
    for r in rows:  # a resumed run may log a step twice: the later one counts
        last[(r["step"], "loss" in r)] = r
    train = sorted((s, r["loss"]) for (s, is_train), r in last.items() if is_train)
    evals = sorted((s, r) for (s, is_train), r in last.items() if not is_train)
    fig = Figure(figsize=(10, 3.6))
    a, b = fig.subplots(1, 2)
    if train:
        a.plot(*zip(*train), lw=0.8)
    a.set(xlabel="step", ylabel="train loss", title="training loss")
    for name in dict.fromkeys(k for _, r in evals for k in r if k != "step"):
        points = [(s, r[name]) for s, r in evals if name in r]
        b.plot(*zip(*points), marker="o", label=name)
    if evals:
        b.legend()
    b.set(xlabel="step", title="evaluation")
    fig.tight_layout()
    fig.savefig(png_path + ".tmp.png", dpi=110)
    os.replace(png_path + ".tmp.png", png_path)


def fmt_time(s):
    return f"{int(s // 3600)}h{int(s % 3600 // 60):02d}m" if s >= 3600 else f"{int(s // 60)}m{int(s % 60):02d}s"


def fit(model, stage, args, tok, run, state=None):
    """Train model (the plain module, on run.device) on stage for args.max_steps optimizer steps;
    evaluate and write <args.out>/ckpt every args.eval_every steps and at the end. state, from a
    checkpoint's train_state.pt, resumes there: same step, optimizer state and data position.
    Returns the last evaluation's metrics."""
    device, world = run.device, run.world
    ckpt_path = os.path.join(args.out, "ckpt")
    seqs, mb, accum = batch_shape(args, world)
    cfg = model.config
    check_tokenizer(ckpt_path, cfg, tok)  # now, on every process, not at the first checkpoint
    raw = model  # not wrapped by DDP or torch.compile (FSDP shards it in place): names, generation
    if args.fsdp:  # each block's parameters sharded over the processes, gathered per layer on use
        from torch.distributed.fsdp import fully_shard
        for block in model.layers:
            fully_shard(block)
        fully_shard(model)
    elif run.ddp:
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    optimizer = make_optimizer(raw, args, device)  # after sharding: FSDP replaces the parameters
    step = 0
    if state is not None:
        if args.fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
            set_optimizer_state_dict(model, optimizer, state["optimizer"], options=StateDictOptions(full_state_dict=True))
        else:
            optimizer.load_state_dict(state["optimizer"])
        step = state["step"]
        torch.set_rng_state(state["rng"])
    resumed_at = step if state is not None else None
    last_saved = resumed_at  # for the NaN stop's message
    if args.compile:
        model = torch.compile(model)

    fpt = flops_per_token(cfg, args.seq_len)
    peak = measure_peak_flops(device, run.dtype) * world
    n_mamba = sum(cfg.is_mamba(i) for i in range(cfg.num_hidden_layers))
    run.log(f"model: {cfg.num_hidden_layers} layers ({n_mamba} Mamba), hidden {cfg.hidden_size}, "
            f"{raw.num_params() / 1e6:.1f}M parameters | device {device} x{world}, {run.dtype} | "
            f"batch {seqs} x {args.seq_len} tokens = {mb} per pass x {accum} accumulation x {world} processes | "
            f"peak {peak / 1e9:.0f} GFLOP/s (best of 7 matmul timings)")
    os.makedirs(args.out, exist_ok=True)
    log_path, png_path = os.path.join(args.out, "log.jsonl"), os.path.join(args.out, "loss.png")
    logf = open(log_path, "a" if state is not None else "w") if run.master else None
    stop = min(args.max_steps, args.stop_at_step or args.max_steps)
    live = sys.stdout.isatty()
    metrics = {}

    def evaluate_and_save(step):
        nonlocal last_saved
        metrics = stage.evaluate(model, step)
        run.log(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
        to_save, opt_state = raw, optimizer.state_dict()
        if args.fsdp:  # every process takes part in gathering the shards; rank 0 receives them
            from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                                 get_optimizer_state_dict)
            opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
            full = get_model_state_dict(model, options=opts)
            opt_state = get_optimizer_state_dict(model, optimizer, options=opts)
            if run.master:  # no second full model in memory: the gathered tensors become its weights
                with torch.device("meta"):
                    to_save = PLaMo2(cfg)
                to_save.load_state_dict(full, assign=True)
                to_save.tie_weights()
        if run.master:
            logf.write(json.dumps({"step": step, **metrics}) + "\n")
            logf.flush()
            save_checkpoint(ckpt_path, to_save, tok, {
                "step": step, "optimizer": opt_state, "rng": torch.get_rng_state(),
                "args": {k: v for k, v in vars(args).items()}, "metrics": metrics})
            plot_log(log_path, png_path)
        last_saved = step
        return metrics

    run.log(f"training {args.max_steps} steps from step {step}; evaluation and checkpoint every {args.eval_every}")
    t_start, steps_done = time.time(), 0
    while True:
        if step % args.eval_every == 0 and step > 0 and step != resumed_at:
            metrics = evaluate_and_save(step)
        if step >= stop:
            break
        t0 = time.time()
        lr = lr_at(step, args)
        for group in optimizer.param_groups:
            group["lr"] = lr
        totals = None
        for micro in range(accum):
            batch = stage.batch(step * seqs + (micro * world + run.rank) * mb, mb, device)
            # DDP averages gradients over processes at the last micro-step only.
            sync = micro == accum - 1 or not run.ddp or args.fsdp
            with (contextlib.nullcontext() if sync else model.no_sync()), autocast(device, run.dtype):
                loss, n_terms, extra = stage.loss(model, batch)
                loss.backward()
            parts = [loss, n_terms, *extra.values()]
            parts = torch.stack([torch.as_tensor(v, device=device).detach().float().reshape(()) for v in parts])
            totals = parts if totals is None else totals + parts
        if world > 1:
            dist.all_reduce(totals)
        totals = totals.tolist()
        n_terms = max(totals[1], 1.0)
        # The gradients hold Σ ∇(loss terms) of this process's micro-batches, averaged over the
        # processes by DDP/FSDP: times world / (terms of the whole step) gives the mean.
        for p in model.parameters():
            if p.grad is not None:
                p.grad.mul_(world / n_terms)
        loss_val = totals[0] / n_terms
        if not math.isfinite(loss_val):
            last = f"{ckpt_path} (step {last_saved})" if last_saved else "none yet"
            raise FloatingPointError(f"the loss became {loss_val} at step {step}; stopped without saving. "
                                     f"The last good checkpoint: {last}.")
        if args.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        if totals[1] > 0:  # a step without one loss term (all masked) must not move the weights:
            optimizer.step()  # AdamW would still decay them and apply its momentum
        optimizer.zero_grad(set_to_none=True)
        step += 1

        dt = time.time() - t0
        steps_done += 1
        tps = seqs * args.seq_len / dt
        mfu = fpt * tps / peak
        eta = (time.time() - t_start) / steps_done * (stop - step)
        means = {k: v / n_terms for k, v in zip(extra, totals[2:])}
        line = (f"step {step}/{args.max_steps} | loss {loss_val:.4f} | "
                + "".join(f"{k} {v:.4f} | " for k, v in means.items())
                + f"lr {lr:.2e} | {tps:,.0f} tok/s | MFU {100 * mfu:.1f}% | ETA {fmt_time(eta)}")
        if run.master:
            logf.write(json.dumps({"step": step, "loss": loss_val, **means, "lr": lr, "tok_per_s": tps, "mfu": mfu}) + "\n")
            if live:
                print("\r" + line, end="\n" if step % 10 == 0 else "", flush=True)
            elif step % 10 == 0 or step == 1:
                print(line, flush=True)
    if step % args.eval_every and step != resumed_at:
        metrics = evaluate_and_save(step)
    run.log(f"done: {step} steps in {fmt_time(time.time() - t_start)}; checkpoint {ckpt_path}, "
            f"log {log_path}, curve {png_path}")
    if run.master:
        logf.close()
    return metrics


# -----------------------------------------------------------------------------------------------
# 5. Pre-training

class Pretraining:
    """The pre-training stage for fit: next-token prediction on windows of the token stream,
    evaluated in validation bits per byte, with greedy samples.

    With reset_at_bos every BOS starts a new document (seq_idx): the Mamba states restart and
    attention does not look back past it, as the released code does with packed documents.
    """

    def __init__(self, model, tok, train_tokens, val_tokens, args, run):
        self.model, self.tok, self.args, self.run = model, tok, args, run
        self.data = Batches(train_tokens, args.seq_len, args.seed)
        self.val = Batches(val_tokens, args.seq_len, args.seed, shuffle=False)
        self.nbytes = token_bytes(tok)
        self.prompts = sample_prompts(val_tokens, tok)

    def documents(self, x):
        """seq_idx (b, t) for --reset-at-bos: the count of BOS tokens up to each position."""
        return torch.cumsum(x == self.tok.bos_id, dim=1) if self.args.reset_at_bos else None

    def batch(self, first, count, device):
        x, y = self.data.get(first, count, device)
        return x, y

    def loss(self, model, batch):
        x, y = batch
        logits, _ = model(x, seq_idx=self.documents(x))
        loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), ignore_index=-1, reduction="sum")
        return loss, (y != -1).sum(), {}

    @torch.no_grad()
    def evaluate(self, model, step):
        """Validation bits per byte: summed token losses (nats -> bits) over the UTF-8 bytes they
        encode, so that models with other tokenizers compare; special tokens are left out."""
        args, run = self.args, self.run
        model.eval()
        mb = args.micro_batch
        # The same number of passes on every process (FSDP needs it); windows past the end wrap around.
        n_seqs = run.world * mb * max(1, min(self.val.n, args.eval_tokens // args.seq_len) // (run.world * mb))
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
        model.train()
        if run.master and not args.fsdp:  # generation needs the whole model in one process
            for s in samples(self.model, self.tok, self.prompts, run.device):
                print("  > " + s.replace("\n", " ⏎ "))
        return {"val_bpb": (nats / math.log(2) / total).item()}


@torch.no_grad()
def samples(model, tok, prompts, device, max_new_tokens=48):
    """Greedy continuations of a Japanese and an English prompt; stop at EOS or the next BOS."""
    model.eval()
    out = []
    for p in prompts:
        idx = torch.tensor([tok.encode(p, bos=True)], device=device)
        ids = [t.item() for t in model.generate(idx, max_new_tokens, temperature=0, vocab_size=tok.vocab_size,
                                                stop_ids=[tok.bos_id, tok.eos_id])]
        out.append(p + tok.decode([i for i in ids if i not in (tok.bos_id, tok.eos_id)]))
    model.train()
    return out


def sample_prompts(val_docs_tokens, tok):
    """The opening words of the first Japanese and the first English validation document."""
    ja = en = None
    for doc in tok.decode(list(val_docs_tokens[:20000])).split("<|plamo:bos|>"):
        doc = doc.strip()
        if not doc:
            continue
        if ja is None and any("\u3040" <= ch <= "\u9fff" for ch in doc[:20]):
            ja = doc[:8]
        elif en is None and doc[:20].isascii():
            en = " ".join(doc.split()[:3])
    return [p for p in (ja, en) if p]


# Per size: the context, the global batch in tokens, the run length, the peak learning rate and
# the sequences per forward pass (gradient accumulation makes up the rest of the batch).
TRAIN_PRESETS = {
    "tiny": dict(seq_len=256, batch_tokens=4096, max_steps=450, lr=3e-3, eval_every=100, micro_batch=16),
    "small": dict(seq_len=1024, batch_tokens=2**19, max_steps=10000, lr=1.5e-3, eval_every=500, micro_batch=16),
    "1b": dict(seq_len=2048, batch_tokens=2**20, max_steps=20000, lr=4e-4, eval_every=1000, micro_batch=8),
    "8b": dict(seq_len=2048, batch_tokens=2**21, max_steps=20000, lr=2e-4, eval_every=1000, micro_batch=2),
}
PRETRAIN_DEFAULTS = dict(corpus_bytes=8_000_000, world_people=600, heldout_frac=0.04, eval_tokens=2**16,
                         reset_at_bos=False, recall_frac=0.0)
# What an --init-from run takes from the run that wrote its checkpoint, unless given here.
INHERITED = ["size", "data", "corpus_bytes", "world_people", "heldout_frac", "seq_len", "batch_tokens",
             "micro_batch", "max_steps", "lr", "schedule", "warmup_steps", "min_lr_frac", "weight_decay", "grad_clip",
             "eval_every", "eval_tokens", "seed", "dtype", "reset_at_bos", "recall_frac"]


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description="Pre-train PLaMo 2 (see the module docstring for examples).")
    ap.add_argument("--size", help=f"model and schedule preset: {', '.join(PRESETS)} (default tiny)")
    ap.add_argument("--data", help="train on this UTF-8 text (a file, or a directory of .txt / .jsonl) "
                                   "instead of the synthetic corpus")
    ap.add_argument("--corpus-bytes", type=int, help="size of the synthetic corpus (default 8,000,000)")
    ap.add_argument("--world-people", type=int, help="people in the synthetic world (default 600; towns a fifth "
                                                     "as many, companies a sixth): fewer, and each fact is repeated more")
    ap.add_argument("--heldout-frac", type=float, help="share of the world's entities with one fact that no train "
                                                       "document states (default 0.04)")
    ap.add_argument("--vocab-size", type=int, help="tokenizer size (default: the preset's vocab_size)")
    ap.add_argument("--eval-tokens", type=int, help="validation tokens per evaluation (default 65,536)")
    ap.add_argument("--init-from", help="start from this checkpoint's weights (the architecture may differ) and "
                                        "its run's training settings; --out defaults to a new <run>-cont")
    ap.add_argument("--recall-frac", type=float, help="share of the train text made of recall documents (key-value "
                                                      "statements asked for later, corpus.py), default 0")
    ap.add_argument("--reset-at-bos", action="store_true", default=None,
                    help="restart the Mamba states and attention at every BOS (documents do not see each other)")
    ap.add_argument("--bench", action="store_true", default=None,
                    help="measure training tokens/s of PLaMo 2 and of the same-size plain transformer, then exit")
    add_loop_arguments(ap)
    # Architecture changes for continual pre-training from --init-from (and for new runs).
    ap.add_argument("--full-attention-idx", help="comma-separated attention layers without the sliding window")
    ap.add_argument("--rope-theta", type=float, help="RoPE base (of every attention layer, unless --rope-local-theta)")
    ap.add_argument("--rope-local-theta", type=float, help="RoPE base of the sliding-window layers "
                                                           "(PLaMo 2.1: a base per kind of layer)")
    ap.add_argument("--window", type=int, help="attention_window_size")
    ap.add_argument("--no-mamba", action="store_true", default=None, help="a plain transformer of the same size (ablation)")
    args = ap.parse_args(argv)
    check_positive(ap, args, ["seq_len", "batch_tokens", "micro_batch", "max_steps", "eval_every", "eval_tokens",
                              "vocab_size", "corpus_bytes", "window", "warmup_steps", "stop_at_step"])
    for k in ("rope_theta", "rope_local_theta"):
        if getattr(args, k) is not None and not (math.isfinite(getattr(args, k)) and getattr(args, k) > 0):
            ap.error(f"--{k.replace('_', '-')} must be a positive number")
    if args.recall_frac is not None and not 0 <= args.recall_frac < 1:
        ap.error("--recall-frac must be at least 0 and below 1")
    if args.heldout_frac is not None and not 0 < args.heldout_frac < 1:
        ap.error("--heldout-frac must be above 0 and below 1")
    if args.world_people is not None and args.world_people < 30:
        ap.error("--world-people must be at least 30")
    if args.size is not None and args.size not in PRESETS:
        ap.error(f"unknown size {args.size!r}; choose one of {', '.join(PRESETS)}")
    if args.resume and args.init_from:
        ap.error("--resume continues a run, --init-from starts a new one: give one of them")
    return args


def settings(args):
    """The run's settings and where it starts: (args, train state or None, checkpoint to load
    or None, {name: value} inherited, or changed on resume). A resumed run has its own settings;
    an --init-from run inherits its source run's; a new one takes the size's presets."""
    if args.out is not None and os.path.exists(args.out) and not os.path.isdir(args.out):
        raise ValueError(f"--out {args.out} is a file; give a directory.")
    if args.resume:
        if args.out is None:
            raise ValueError("--resume needs --out, the directory of the run to continue.")
        return resume_settings(args, PRETRAIN_DEFAULTS)
    source, default_out = None, None
    if args.init_from:
        path = os.path.abspath(find_checkpoint(args.init_from))
        if not os.path.isdir(path):
            raise FileNotFoundError(f"--init-from: no checkpoint directory at {args.init_from}")
        try:
            source = load_train_state(path)["args"]
        except FileNotFoundError:
            source = {}  # weights without a training run (an export): nothing to inherit
        run_dir = os.path.dirname(path) if os.path.basename(path) in ("ckpt", "ckpt.old") else path
        default_out = run_dir + "-cont"
        if args.out is None and os.path.exists(os.path.join(default_out, "ckpt")):
            raise ValueError(f"--out defaults to {default_out}, which holds a run already: give --out.")
        out = os.path.abspath(args.out or default_out)
        if out == path or path.startswith(out + os.sep) or out.startswith(path + os.sep):
            raise ValueError(f"--out {args.out} holds the checkpoint that --init-from reads ({args.init_from}), "
                             f"and a run writes into its --out: choose another directory.")
    size = args.size or (source or {}).get("size") or "tiny"
    inherited = settle(args, {**PRETRAIN_DEFAULTS, **TRAIN_PRESETS[size], "size": size}, source,
                       INHERITED if source else ())
    args.out = args.out or default_out or os.path.join("out", args.size)
    args.vocab_size = args.vocab_size or PRESETS[args.size]["vocab_size"]
    return args, None, args.init_from, inherited


def model_config(args, tok=None, base=None):
    """The preset (or the --init-from checkpoint's config), changed by the architecture flags,
    with the special token ids of tok."""
    cfg = base or PLaMo2Config.from_preset(args.size, vocab_size=args.vocab_size)
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


def train(args):
    args, state, path, inherited = settings(args)
    run = start_processes(args)
    if state is not None:
        model, tok = load_checkpoint(path, run.device)
        run.log(f"resuming {path} at step {state['step']} with the run's settings"
                + "".join(f", except {k} {v}" for k, v in inherited.items()))
    elif path is not None:  # --init-from
        source, tok = load_checkpoint(path, run.device)
        if not isinstance(tok, Tokenizer):
            raise ValueError(f"{path} uses PLaMo 2's own tokenizer; train.py continues only "
                             f"checkpoints with our BPE tokenizer (tokenizer.tiktoken).")
        args.vocab_size = tok.vocab_size
        run.log(f"init from {path}: settings inherited from its run: "
                + (", ".join(f"{k}={v}" for k, v in inherited.items()) or "none (it has no train_state.pt)")
                + (f"; given here: {', '.join(args.given)}" if args.given else ""))
    else:
        tok = None
    tok, train_tokens, val_tokens = prepare_data(args, args.out, tok, run.rank)
    if state is None:
        torch.manual_seed(args.seed)
        cfg = model_config(args, tok, source.config if path is not None else None)
        model = PLaMo2(cfg).to(run.device)
        if path is not None:
            copied, new, dropped = reuse_weights(model, source)
            run.log(f"init from {path}: copied {len(copied)} tensors, new {len(new)}"
                    f"{': ' + ', '.join(new) if new else ''}, dropped {len(dropped)}{': ' + ', '.join(dropped) if dropped else ''}")
            diff = {k: (v, getattr(cfg, k)) for k, v in source.config.__dict__.items() if getattr(cfg, k) != v}
            run.log(f"config inherited from the checkpoint, changed: {diff or 'nothing'}")
            del source
    stage = Pretraining(model, tok, train_tokens, val_tokens, args, run)
    run.log(f"unigram baseline: {unigram_bpb(train_tokens, val_tokens, stage.nbytes):.3f} bits/byte on val"
            + (" | documents reset at BOS" if args.reset_at_bos else ""))
    fit(model, stage, args, tok, run, state)
    end_processes(run)


def side_by_side(fns, reps=6):
    """{name: median seconds of fn()} over reps rounds after a warm-up round, the functions
    interleaved in each round so that they all see the same machine noise."""
    times = {k: [] for k in fns}
    for rep in range(reps + 1):
        for k, fn in fns.items():
            t0 = time.time()
            fn()
            if rep:
                times[k].append(time.time() - t0)
    return {k: sorted(v)[reps // 2] for k, v in times.items()}


def bench(args):
    """Training tokens/s of PLaMo 2 and of the same-size plain transformer, side by side."""
    settle(args, {**PRETRAIN_DEFAULTS, **TRAIN_PRESETS[args.size or "tiny"], "size": args.size or "tiny"})
    args.vocab_size = args.vocab_size or PRESETS[args.size]["vocab_size"]
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    peak = measure_peak_flops(device, dtype)
    torch.manual_seed(args.seed)
    x = torch.randint(0, args.vocab_size, (args.micro_batch, args.seq_len + 1), device=device)
    models = {}
    for name, no_mamba in (("PLaMo 2 (Mamba + attention)", False), ("plain transformer", True)):
        cfg = model_config(argparse.Namespace(**{**vars(args), "no_mamba": no_mamba}))
        model = PLaMo2(cfg).to(device)
        models[name] = (model, make_optimizer(model, args, device), flops_per_token(cfg, args.seq_len))

    def step(model, opt):
        with autocast(device, dtype):
            _, loss = model(x[:, :-1], x[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
    times = side_by_side({name: (lambda m=m, o=o: step(m, o)) for name, (m, o, _) in models.items()}, reps=5)
    print(f"{args.size}, {args.micro_batch} x {args.seq_len} tokens per step, {device} {dtype}, "
          f"peak {peak / 1e9:.0f} GFLOP/s (best of 7 matmul timings)")
    results = {}
    for name, (model, _, fpt) in models.items():
        tps = args.micro_batch * args.seq_len / times[name]
        results[name] = tps
        print(f"  {name:30s} {model.num_params() / 1e6:6.2f}M params  {tps:8,.0f} tok/s  MFU {100 * fpt * tps / peak:.1f}%")
    a, b = results.values()
    print(f"  PLaMo 2 / plain transformer: {a / b:.2f}x")


def main(argv=None):
    args = parse_args(argv)
    try:
        bench(args) if args.bench else train(args)
    except (FileNotFoundError, ValueError, FloatingPointError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
