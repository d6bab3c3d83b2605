"""
train.py: pre-training PLaMo 2, from raw text to a checkpoint.

    python train.py --size tiny                           # laptop CPU, about ten minutes
    python train.py --size tiny --data ../novels/          # your own UTF-8 text
    torchrun --nproc_per_node=8 train.py --size 1b --data corpus/   # a GPU node (DDP; --fsdp to shard)
    python train.py --init-from out/tiny/ckpt --full-attention-idx 1,3 --rope-theta 1e6 --seq-len 1024

Read top to bottom, this file is the story of the stage:
  1. Tokenizer: byte-level BPE trained on the training split and encoded with tiktoken.
     (PLaMo 2's own tokenizer is a 100k Unigram-style vocabulary; plamo2.py reads that one
     for released checkpoints. Ours is the standard recipe at laptop scale.)
  2. Data: documents separated by BOS in one memory-mapped token stream, cut into windows.
  3. Checkpoints: the Hugging Face layout plus tokenizer and training state, written atomically;
     weight reuse from a checkpoint whose architecture differs.
  4. Training: AdamW, warmup + cosine or WSD, gradient accumulation, DDP/FSDP, evaluation in
     bits per byte, samples, a JSONL log and a loss-curve PNG.
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

import numpy as np
import regex  # tiktoken's own dependency; it knows the same \p{...} classes as tiktoken's engine
import torch
import torch.distributed as dist

import corpus
from plamo2 import (PLaMo2, PLaMo2Config, PRESETS, SPECIAL_TOKENS, SPLIT_PATTERN, Tokenizer, autocast,
                    load_tokenizer, nats_and_bytes, resolve_device, resolve_dtype, token_bytes)

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

    >>> bytes_per_token(train_tokenizer(c.train, 4096), c.val)  # the default corpus
    4.47
    """
    n_tokens = sum(len(ids) for ids in tok.encode_batch(docs))
    return sum(len(d.encode("utf-8")) for d in docs) / max(n_tokens, 1)


# -----------------------------------------------------------------------------------------------
# 2. Data: documents -> one BOS-separated token stream in a memory-mapped file

def tokenize_to_file(tok, docs, path):
    """Encode docs, each preceded by BOS (PLaMo 2's document separator), into a flat uint16/32
    file, written atomically. Returns the memory-mapped array."""
    dtype = np.uint16 if tok.vocab_size <= 2**16 else np.uint32
    ids = np.fromiter((t for doc in tok.encode_batch(docs, bos=True) for t in doc), dtype=dtype)
    ids.tofile(path + ".tmp")
    os.replace(path + ".tmp", path)
    return np.memmap(path, dtype=dtype, mode="r")


class Batches:
    """Windows of seq_len + 1 tokens, visited in a shuffled order that depends only on the seed
    and the epoch, so the position in that order (one integer) is all a resume needs.

    Sequence g of the run is window perm_e[g % n] of epoch e = g // n.
    """

    def __init__(self, tokens, seq_len, seed, shuffle=True):
        self.tokens, self.seq_len, self.seed, self.shuffle = tokens, seq_len, seed, shuffle
        self.n = (len(tokens) - 1) // seq_len
        if self.n < 1:
            raise ValueError(f"the data has {len(tokens)} tokens, fewer than one sequence of {seq_len + 1}.")
        self.epoch, self.perm = None, None

    def window(self, g):
        epoch, i = divmod(g, self.n)
        if self.shuffle and epoch != self.epoch:
            self.epoch = epoch
            self.perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + epoch))
        start = (self.perm[i].item() if self.shuffle else i) * self.seq_len
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
            c = corpus.generate_corpus(seed=args.seed, target_bytes=args.corpus_bytes)
            train_docs, val_docs, source = c.train, c.val, "the synthetic bilingual corpus"
            with open(os.path.join(data_dir, "heldout_facts.json"), "w", encoding="utf-8") as f:
                json.dump({"heldout": c.heldout_facts, "train_control": c.train_facts}, f, ensure_ascii=False)
        nb = sum(len(d.encode()) for d in train_docs)
        print(f"data: {source}: {len(train_docs):,} train / {len(val_docs):,} val documents, "
              f"{nb / 1e6:.1f} MB of train text ({time.time() - t0:.1f}s)")
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
    dtype = np.uint16 if tok.vocab_size <= 2**16 else np.uint32
    train_tokens = np.memmap(os.path.join(data_dir, "train.bin"), dtype=dtype, mode="r")
    val_tokens = np.memmap(os.path.join(data_dir, "val.bin"), dtype=dtype, mode="r")
    return tok, train_tokens, val_tokens


# -----------------------------------------------------------------------------------------------
# 3. Checkpoints: <out>/ckpt = config.json + model.safetensors (Hugging Face layout, so
#    PLaMo2.from_hf loads it), tokenizer.tiktoken, and train_state.pt for --resume.

def save_checkpoint(path, model, tok, train_state):
    """Write everything to path.tmp, then swap it in: a kill at any moment leaves either the
    previous checkpoint or the new one complete (find_checkpoint looks at both names)."""
    tmp, old = path + ".tmp", path + ".old"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_hf(tmp)
    tok.save(os.path.join(tmp, "tokenizer.tiktoken"))
    torch.save(train_state, os.path.join(tmp, "train_state.pt"))
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
    """(model, tokenizer) from a checkpoint directory, with one clear error if anything is off."""
    path = find_checkpoint(path)
    model = PLaMo2.from_hf(path, device=device, dtype=torch.float32)
    tok = load_tokenizer(path)
    if tok.vocab_size > model.config.vocab_size:  # released embeddings may be padded (100032 rows)
        raise ValueError(f"{path}: the tokenizer has {tok.vocab_size} tokens but the model only {model.config.vocab_size}.")
    return model, tok


def reuse_weights(model, source):
    """Copy every tensor of source whose name and shape match model's; report the rest.

    This is how a stage starts from trained weights when the architecture changed: a longer
    window, more full-attention layers or another rope_theta keep every tensor; a pruned or grown
    model keeps those that still fit.
    """
    src, dst = source.state_dict(), model.state_dict()
    copied = [n for n in dst if n in src and src[n].shape == dst[n].shape]
    with torch.no_grad():
        for n in copied:
            dst[n].copy_(src[n])
    new = [n for n in dst if n not in copied]
    dropped = [n for n in src if n not in copied]
    return copied, new, dropped


# -----------------------------------------------------------------------------------------------
# 4. Training

# Per size: the context, the global batch in tokens, the run length, the peak learning rate and
# the sequences per forward pass (gradient accumulation makes up the rest of the batch).
TRAIN_PRESETS = {
    "tiny": dict(seq_len=256, batch_tokens=4096, max_steps=450, lr=3e-3, eval_every=100, micro_batch=16),
    "small": dict(seq_len=1024, batch_tokens=2**19, max_steps=10000, lr=1.5e-3, eval_every=500, micro_batch=16),
    "1b": dict(seq_len=2048, batch_tokens=2**20, max_steps=20000, lr=4e-4, eval_every=1000, micro_batch=8),
    "8b": dict(seq_len=2048, batch_tokens=2**21, max_steps=20000, lr=2e-4, eval_every=1000, micro_batch=2),
}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description="Pre-train PLaMo 2 (see the module docstring for examples).")
    ap.add_argument("--size", default="tiny", help=f"model and schedule preset: {', '.join(PRESETS)}")
    ap.add_argument("--out", help="output directory (default out/<size>)")
    ap.add_argument("--data", help="train on this UTF-8 text (a file or a directory of .txt / .jsonl) "
                                   "instead of the synthetic corpus")
    ap.add_argument("--corpus-bytes", type=int, default=8_000_000, help="size of the synthetic corpus")
    ap.add_argument("--vocab-size", type=int, help="tokenizer size (default: the preset's vocab_size)")
    ap.add_argument("--seq-len", type=int, help="tokens per training sequence")
    ap.add_argument("--batch-tokens", type=int, help="tokens per optimizer step, over all processes")
    ap.add_argument("--micro-batch", type=int, help="sequences per forward pass and process")
    ap.add_argument("--max-steps", type=int, help="optimizer steps; the schedule ends here")
    ap.add_argument("--stop-at-step", type=int, help="stop early at this step, as if interrupted "
                                                     "(the schedule still ends at --max-steps); --resume continues")
    ap.add_argument("--lr", type=float, help="peak learning rate")
    ap.add_argument("--schedule", choices=["cosine", "wsd"], default="cosine",
                    help="after warmup: cosine decay, or warmup-stable-decay (linear decay in the last 20%%)")
    ap.add_argument("--warmup-steps", type=int, help="linear warmup (default: 4%% of --max-steps)")
    ap.add_argument("--min-lr-frac", type=float, default=0.1, help="final learning rate as a fraction of --lr")
    ap.add_argument("--weight-decay", type=float, default=0.1, help="AdamW weight decay on matrices")
    ap.add_argument("--grad-clip", type=float, default=1.0, help="clip the global gradient norm (0 = off)")
    ap.add_argument("--eval-every", type=int, help="steps between evaluations and checkpoints")
    ap.add_argument("--eval-tokens", type=int, default=2**16, help="validation tokens per evaluation")
    ap.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, mps")
    ap.add_argument("--dtype", default="auto", help="auto (bf16 autocast on CUDA, fp32 elsewhere), float32, bfloat16")
    ap.add_argument("--seed", type=int, default=1337, help="seed for the corpus, the data order and the init")
    ap.add_argument("--compile", action="store_true", help="torch.compile the model")
    ap.add_argument("--resume", action="store_true", help="continue the run in --out exactly where it stopped")
    ap.add_argument("--init-from", help="start from this checkpoint's weights (the architecture may differ)")
    ap.add_argument("--fsdp", action="store_true", help="shard the model with FSDP (under torchrun)")
    ap.add_argument("--bench", action="store_true",
                    help="measure training tokens/s of PLaMo 2 and of the same-size plain transformer, then exit")
    # Architecture changes for continual pre-training from --init-from (and for new runs).
    ap.add_argument("--full-attention-idx", help="comma-separated layers without the sliding window")
    ap.add_argument("--rope-theta", type=float, help="RoPE base")
    ap.add_argument("--window", type=int, help="attention_window_size")
    ap.add_argument("--no-mamba", action="store_true", help="a plain transformer of the same size (ablation)")
    args = ap.parse_args(argv)
    args.given = sorted(k for k, v in vars(args).items() if v != ap.get_default(k))
    for k in ("seq_len", "batch_tokens", "micro_batch", "max_steps", "eval_every", "eval_tokens", "vocab_size",
              "corpus_bytes", "window"):
        if getattr(args, k) is not None and getattr(args, k) < 1:
            ap.error(f"--{k.replace('_', '-')} must be a positive integer")
    if args.size not in PRESETS:
        ap.error(f"unknown size {args.size!r}; choose one of {', '.join(PRESETS)}")
    for k, v in TRAIN_PRESETS[args.size].items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    args.out = args.out or os.path.join("out", args.size)
    args.vocab_size = args.vocab_size or PRESETS[args.size]["vocab_size"]
    if args.warmup_steps is None:
        args.warmup_steps = max(1, args.max_steps // 25)
    return args


def model_config(args, base=None):
    """The preset (or the --init-from checkpoint's config), changed by the architecture flags."""
    cfg = base or PLaMo2Config.from_preset(args.size, vocab_size=args.vocab_size)
    changes = {}
    if args.full_attention_idx is not None:
        changes["full_attention_idx"] = [int(i) for i in args.full_attention_idx.split(",") if i.strip()]
    if args.rope_theta is not None:
        changes["rope_theta"] = args.rope_theta
    if args.window is not None:
        changes["attention_window_size"] = args.window
    if args.no_mamba:
        changes["mamba_enabled"] = False
    changes["max_position_embeddings"] = max(cfg.max_position_embeddings, args.seq_len)
    return PLaMo2Config(**{**cfg.__dict__, **changes})


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
    """Training FLOPs per token (forward + backward = 3x forward): 6 per weight used in a matmul
    (the embedding lookup is free, the untied head is not), 12·Hq·P per key attended, and for
    the scan ~3·2·(2·Nh·P·N) for the state update and read-out (the chunked form does a little
    more; we count the recurrence's own work, as MFU conventionally does)."""
    with torch.device("meta"):
        n = PLaMo2(cfg).num_params()
    flops = 6 * n
    for i in range(cfg.num_hidden_layers):
        if cfg.is_mamba(i):
            flops += 12 * cfg.mamba_num_heads * cfg.hidden_size_per_head * cfg.mamba_d_state
        else:
            w = seq_len if i in cfg.full_attention_idx else cfg.attention_window_size
            keys = sum(min(t, w) + 1 for t in range(seq_len)) / seq_len  # mean keys per query
            flops += 12 * cfg.num_attention_heads * cfg.hidden_size_per_head * keys
    return flops


def measure_peak_flops(device, dtype):
    """Achieved FLOP/s of a large matmul on this device: the denominator of MFU."""
    n = 4096 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    reps, t0 = 0, time.time()
    while time.time() - t0 < 0.5:
        a @ b
        reps += 1
        sync()
    return 2 * n**3 * reps / (time.time() - t0)


@torch.no_grad()
def evaluate(model, val, nbytes, args, device, dtype, rank, world):
    """Validation loss in bits per byte: summed token losses (nats → bits) over the UTF-8 bytes
    they encode, so models with different tokenizers compare. Special tokens are left out."""
    model.eval()
    mb = args.micro_batch
    # The same number of passes on every process (FSDP needs it); windows past the end wrap around.
    n_seqs = world * mb * max(1, min(val.n, args.eval_tokens // args.seq_len) // (world * mb))
    nats = torch.zeros((), device=device, dtype=torch.float64)
    total = torch.zeros((), device=device, dtype=torch.float64)
    for first in range(rank * mb, n_seqs, world * mb):
        x, y = val.get(first, mb, device)
        with autocast(device, dtype):
            logits, _ = model(x)
        batch_nats, batch_bytes = nats_and_bytes(logits, y, nbytes)
        nats += batch_nats
        total += batch_bytes
    if world > 1:
        dist.all_reduce(nats)
        dist.all_reduce(total)
    model.train()
    return (nats / math.log(2) / total).item()


def samples(model, tok, prompts, device, max_new_tokens=48):
    """Greedy continuations of a Japanese and an English prompt; stop at EOS or the next BOS."""
    out = []
    for p in prompts:
        idx = torch.tensor([tok.encode(p, bos=True)], device=device)
        ids = [t.item() for t in model.generate(idx, max_new_tokens, temperature=0, stop_ids=[tok.bos_id, tok.eos_id])]
        out.append(p + tok.decode([i for i in ids if i not in (tok.bos_id, tok.eos_id)]))
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


def plot_log(log_path, png_path):
    """Train loss and validation bits per byte against step, from the JSONL log."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(log_path) as f:
        rows = [json.loads(line) for line in f]
    last = {}
    for r in rows:  # a resumed run may log a step twice: the later one counts
        last[(r["step"], "val_bpb" in r)] = r
    train = sorted((s, r["loss"]) for (s, is_val), r in last.items() if not is_val)
    val = sorted((s, r["val_bpb"]) for (s, is_val), r in last.items() if is_val)
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    if train:
        a.plot(*zip(*train), lw=0.8)
    a.set(xlabel="step", ylabel="train loss (nats/token)", title="training loss")
    if val:
        b.plot(*zip(*val), marker="o")
    b.set(xlabel="step", ylabel="bits per byte", title="validation")
    fig.tight_layout()
    fig.savefig(png_path + ".tmp.png", dpi=110)
    plt.close(fig)
    os.replace(png_path + ".tmp.png", png_path)


def fmt_time(s):
    return f"{int(s // 3600)}h{int(s % 3600 // 60):02d}m" if s >= 3600 else f"{int(s // 60)}m{int(s % 60):02d}s"


def train(args):
    # --- processes and devices: one process, or one per GPU under torchrun ---
    ddp = "RANK" in os.environ
    if ddp:
        rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
        if torch.cuda.is_available():
            device = torch.device("cuda", local)
            torch.cuda.set_device(device)
        else:
            device = torch.device("cpu")
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    else:
        rank, world, device = 0, 1, resolve_device(args.device)
    master = rank == 0
    log = print if master else (lambda *a, **k: None)
    dtype = resolve_dtype(args.dtype, device)
    ckpt_path = os.path.join(args.out, "ckpt")

    # --- where the run starts: fresh, resumed, or from another checkpoint's weights ---
    state, tok, source = None, None, None
    if args.resume:
        path = find_checkpoint(ckpt_path)
        if not os.path.isdir(path):
            raise FileNotFoundError(f"--resume: no checkpoint at {ckpt_path} to resume from.")
        state = torch.load(os.path.join(path, "train_state.pt"), weights_only=True)
        if args.fsdp and not state["args"]["fsdp"]:  # the optimizer state is keyed differently
            raise ValueError(f"{path} was saved without --fsdp; resume it without --fsdp.")
        # Settings come from the checkpoint, except how and where this invocation runs, and what
        # may change without changing the result so far (the run's length, how often to evaluate).
        now = {"out", "resume", "device", "compile", "stop_at_step", "fsdp", "given"}
        changed = sorted({"max_steps", "eval_every", "eval_tokens"} & set(args.given))
        args = argparse.Namespace(**{**state["args"], **{k: getattr(args, k) for k in now | set(changed)}})
        model, tok = load_checkpoint(path, device)
        log(f"resuming {path} at step {state['step']} with the checkpoint's settings"
            f"{' except ' + ', '.join(changed) if changed else ''}")
    elif args.init_from:
        source, tok = load_checkpoint(args.init_from, device)
        if not isinstance(tok, Tokenizer):
            raise ValueError(f"{args.init_from} uses PLaMo 2's own tokenizer; train.py continues only "
                             f"checkpoints with our BPE tokenizer (tokenizer.tiktoken).")
        args.vocab_size = tok.vocab_size
        model = None
    if state is None:
        torch.manual_seed(args.seed)
        cfg = model_config(args, source.config if source else None)
        model = PLaMo2(cfg).to(device)
        if source is not None:
            copied, new, dropped = reuse_weights(model, source)
            log(f"init from {args.init_from}: copied {len(copied)} tensors, new {len(new)}"
                f"{': ' + ', '.join(new) if new else ''}, dropped {len(dropped)}{': ' + ', '.join(dropped) if dropped else ''}")
            diff = {k: (v, getattr(cfg, k)) for k, v in source.config.__dict__.items() if getattr(cfg, k) != v}
            log(f"config inherited from the checkpoint, changed: {diff or 'nothing'}")
            del source
    cfg = model.config

    tok, train_tokens, val_tokens = prepare_data(args, args.out, tok, rank)
    nbytes = token_bytes(tok)
    data = Batches(train_tokens, args.seq_len, args.seed)
    val = Batches(val_tokens, args.seq_len, args.seed, shuffle=False)

    # --- batch arithmetic: the global batch is fixed, accumulation absorbs the world size ---
    seqs = args.batch_tokens // args.seq_len
    if seqs < world or seqs * args.seq_len != args.batch_tokens:
        raise ValueError(f"--batch-tokens {args.batch_tokens} must be a multiple of --seq-len {args.seq_len} "
                         f"with at least one sequence per process ({world}).")
    per_rank = seqs // world
    if per_rank * world != seqs:
        raise ValueError(f"{seqs} sequences per step do not split evenly over {world} processes.")
    mb = max(d for d in range(1, min(args.micro_batch, per_rank) + 1) if per_rank % d == 0)
    accum = per_rank // mb

    raw = model  # the plain module: for generation, saving and parameter names
    if args.fsdp:  # each block's parameters sharded over the processes, gathered per layer on use
        from torch.distributed.fsdp import fully_shard
        for block in model.layers:
            fully_shard(block)
        fully_shard(model)
    elif ddp:
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[local] if device.type == "cuda" else None)
    optimizer = make_optimizer(raw, args, device)  # after sharding: FSDP replaces the parameters
    step, pos = 0, 0
    if state is not None:
        if args.fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
            set_optimizer_state_dict(model, optimizer, state["optimizer"],
                                     options=StateDictOptions(full_state_dict=True))
        else:
            optimizer.load_state_dict(state["optimizer"])
        step, pos = state["step"], state["pos"]
        torch.set_rng_state(state["rng"])
    if args.compile:
        model = torch.compile(model)

    n_params = raw.num_params()
    fpt = flops_per_token(cfg, args.seq_len)
    peak = measure_peak_flops(device, dtype) * world
    log(f"model: {cfg.num_hidden_layers} layers ({sum(cfg.is_mamba(i) for i in range(cfg.num_hidden_layers))} Mamba), "
        f"hidden {cfg.hidden_size}, {n_params / 1e6:.1f}M parameters | device {device} x{world}, {dtype} | "
        f"batch {seqs} x {args.seq_len} tokens = {mb} per pass x {accum} accumulation x {world} processes")
    log(f"unigram baseline: {unigram_bpb(train_tokens, val_tokens, nbytes):.3f} bits/byte on val | "
        f"measured peak {peak / 1e9:.0f} GFLOP/s")
    prompts = sample_prompts(val_tokens, tok)
    os.makedirs(args.out, exist_ok=True)
    log_path, png_path = os.path.join(args.out, "log.jsonl"), os.path.join(args.out, "loss.png")
    logf = open(log_path, "a" if state else "w") if master else None
    stop = min(args.max_steps, args.stop_at_step or args.max_steps)
    live = sys.stdout.isatty()

    def checkpoint_and_eval(step):
        bpb = evaluate(model, val, nbytes, args, device, dtype, rank, world)
        log(f"step {step}: val {bpb:.4f} bits/byte")
        if not args.fsdp and master:  # generation needs the whole model in one process
            for s in samples(raw, tok, prompts, device):
                log("  > " + s.replace("\n", " ⏎ "))
        if master:
            logf.write(json.dumps({"step": step, "val_bpb": bpb}) + "\n")
            logf.flush()
        to_save, opt_state = raw, optimizer.state_dict()
        if args.fsdp:  # every process takes part in gathering the shards; rank 0 receives them
            from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                                 get_optimizer_state_dict)
            opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
            full = get_model_state_dict(model, options=opts)
            opt_state = get_optimizer_state_dict(model, optimizer, options=opts)
            if master:
                to_save = PLaMo2(cfg)
                to_save.load_state_dict(full)
        if master:
            save_checkpoint(ckpt_path, to_save, tok, {
                "step": step, "pos": pos, "optimizer": opt_state, "rng": torch.get_rng_state(),
                "args": {k: v for k, v in vars(args).items()}, "val_bpb": bpb})
            plot_log(log_path, png_path)
        return bpb

    # --- the loop ---
    log(f"training {args.max_steps} steps from step {step}; checkpoints and samples every {args.eval_every}")
    t_start, tokens_done = time.time(), 0
    while True:
        if step % args.eval_every == 0 and step > 0 and not (state and step == state["step"]):
            checkpoint_and_eval(step)
        if step >= stop:
            break
        t0 = time.time()
        lr = lr_at(step, args)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss_sum = torch.zeros((), device=device)
        for micro in range(accum):
            x, y = data.get(pos + (micro * world + rank) * mb, mb, device)
            # DDP averages gradients over processes at the last micro-step only.
            sync = micro == accum - 1 or not ddp or args.fsdp
            with (contextlib.nullcontext() if sync else model.no_sync()), autocast(device, dtype):
                _, loss = model(x, y)
                (loss / accum).backward()
            loss_sum += loss.detach() / accum
        pos += seqs
        if world > 1:
            dist.all_reduce(loss_sum, op=dist.ReduceOp.AVG)
        loss_val = loss_sum.item()
        if not math.isfinite(loss_val):
            last = f"{ckpt_path} (step {step - step % args.eval_every})" if step >= args.eval_every else "none yet"
            raise FloatingPointError(f"the loss became {loss_val} at step {step}; stopped without saving. "
                                     f"The last good checkpoint: {last}.")
        if args.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1

        dt = time.time() - t0
        tokens_done += args.batch_tokens
        tps = args.batch_tokens / dt
        mfu = fpt * tps / peak
        eta = (time.time() - t_start) / tokens_done * args.batch_tokens * (stop - step)
        line = (f"step {step}/{args.max_steps} | loss {loss_val:.4f} | lr {lr:.2e} | {tps:,.0f} tok/s | "
                f"MFU {100 * mfu:.1f}% | ETA {fmt_time(eta)}")
        if master:
            logf.write(json.dumps({"step": step, "loss": loss_val, "lr": lr, "tok_per_s": tps, "mfu": mfu}) + "\n")
            if live:
                print("\r" + line, end="\n" if step % 10 == 0 else "", flush=True)
            elif step % 10 == 0 or step == 1:
                print(line, flush=True)
    if step % args.eval_every and not (state and step == state["step"]):
        checkpoint_and_eval(step)
    log(f"done: {step} steps in {fmt_time(time.time() - t_start)}; checkpoint {ckpt_path}, "
        f"log {log_path}, curve {png_path}")
    if master:
        logf.close()
    if ddp:
        dist.barrier()
        dist.destroy_process_group()


def bench(args):
    """Training tokens/s of PLaMo 2 and of the same-size plain transformer, side by side."""
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    peak = measure_peak_flops(device, dtype)
    torch.manual_seed(args.seed)
    x = torch.randint(0, args.vocab_size, (args.micro_batch, args.seq_len + 1), device=device)
    results = {}
    models = {}
    for name, no_mamba in (("PLaMo 2 (Mamba + attention)", False), ("plain transformer", True)):
        cfg = model_config(argparse.Namespace(**{**vars(args), "no_mamba": no_mamba}))
        model = PLaMo2(cfg).to(device)
        models[name] = (model, make_optimizer(model, args, device), flops_per_token(cfg, args.seq_len))
    times = {name: [] for name in models}
    for rep in range(6):  # interleaved, so that both see the same machine noise
        for name, (model, opt, _) in models.items():
            t0 = time.time()
            with autocast(device, dtype):
                _, loss = model(x[:, :-1], x[:, 1:])
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if rep > 0:
                times[name].append(time.time() - t0)
    print(f"{args.size}, {args.micro_batch} x {args.seq_len} tokens per step, {device} {dtype}, "
          f"measured peak {peak / 1e9:.0f} GFLOP/s")
    for name, (model, _, fpt) in models.items():
        tps = args.micro_batch * args.seq_len / np.median(times[name])
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
