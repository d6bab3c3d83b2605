"""
data.py: pre-training text, prepared once: streamed from any number of files of any size, split
into train and validation by document, tokenized by several processes into token shards that
training memory-maps (every process, with no tokenization and no long wait under torchrun).

    python data.py corpus/ --out data/corpus --tokenizer out/tiny/ckpt --workers 8
    python data.py corpus/ --out data/corpus --vocab-size 32000   # a new BPE tokenizer, from a sample
    torchrun --nproc_per_node=8 train.py --size 1b --data data/corpus
    python data.py --bench                                        # memory and MB/s against corpus size

train.py --data also takes raw text (prepared into the run's data/ first) and, without --data,
prepares the synthetic corpus the same way: one pipeline for every run.

Read top to bottom:
  1. Records: the documents of the files, long ones cut into parts of about PART_CHARS at line
     breaks; a seeded hash of each part's text decides its split, so that the split depends on
     neither the reading order nor the number of workers.
  2. The tokenizer: a given one (ours or a released tokenizer.jsonl, so that a model trained here
     shares PLaMo 2's vocabulary), or a new BPE trained on a bounded, seeded sample of the text.
  3. prepare: workers tokenize batches of records; the main process writes their tokens in
     reading order into shards of SHARD_TOKENS tokens (each written atomically), and the manifest
     last, so that a directory without one was never finished. The output is the same byte for
     byte whatever the number of workers.
  4. Prepared data: the shards of a split as one token array (TokenStream), checked against the
     manifest and the tokenizer; windows in a per-epoch order (EpochOrder, Batches).
  5. --bench.
"""
import argparse
import collections
import concurrent.futures
import hashlib
import itertools
import json
import multiprocessing
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np
import torch

import corpus
from common import Progress, atomic_write_text, check_output, nonneg_int, positive_int, unit_float
from tokenizer import PlamoTokenizer, bytes_per_token, fingerprint, load_tokenizer, tokenizer_from_files, train_tokenizer

PART_CHARS = 4096            # a longer document is cut into parts of about this many characters
SHARD_TOKENS = 2**27         # tokens per shard file (256 MB of uint16)
SAMPLE_BYTES = 64 * 2**20    # text a new BPE tokenizer trains on, at most (nanochat: ~2B characters)
BATCH_CHARS = 1 << 20        # characters per task of a worker
MANIFEST = "manifest.json"

# -----------------------------------------------------------------------------------------------
# 1. Records: (text, starts a document, split)


def parts(text, size=PART_CHARS):
    """text cut into pieces of about `size` characters, each ending at a line break where there is
    one within reach (else cut hard), which join back into text.

    >>> parts("ab\\ncd\\nef", size=4)
    ['ab\\n', 'cd\\n', 'ef']
    """
    out, start = [], 0
    while len(text) - start > size:
        cut = text.rfind("\n", start, start + size) + 1
        cut = cut if cut > start else text.find("\n", start + size, start + 2 * size) + 1 or start + 2 * size
        out.append(text[start:cut])
        start = cut
    return out + [text[start:]] if start < len(text) else out


def split_of(text, seed, val_frac):
    """'val' or 'train' by a seeded hash of the text: the same text always goes the same way."""
    h = int.from_bytes(hashlib.blake2b(f"{seed}\0{text}".encode(), digest_size=8).digest(), "little")
    return "val" if h < val_frac * 2**64 else "train"


def file_records(files, seed, val_frac):
    """(text, starts a document, split) for every part of every document of files, streamed."""
    for f in files:
        for doc in corpus.read_documents(f):
            for i, p in enumerate(parts(doc)):
                yield p, i == 0, split_of(p, seed, val_frac)


def corpus_records(c, recall=()):
    """The synthetic corpus's records: its own split (every document stating a held-out fact is
    in validation), recall documents in the training split only. Training text first, so that
    each split keeps the corpus's order."""
    for doc in list(c.train) + list(recall):
        for i, p in enumerate(parts(doc)):
            yield p, i == 0, "train"
    for doc in c.val:
        for i, p in enumerate(parts(doc)):
            yield p, i == 0, "val"


# -----------------------------------------------------------------------------------------------
# 2. The tokenizer

def tokenizer_sample(records, total_bytes, seed, sample_bytes=SAMPLE_BYTES):
    """The training records a new tokenizer learns from: each with probability
    sample_bytes / total_bytes (all of them for small data), by a seeded hash of its text."""
    p = min(1.0, sample_bytes / max(total_bytes, 1))
    return [t for t, _, split in records
            if split == "train" and (p >= 1 or split_of(t, f"tok/{seed}", p) == "val")]


# -----------------------------------------------------------------------------------------------
# 3. prepare

_worker_tok = None


def _start_worker(files):
    global _worker_tok
    _worker_tok = tokenizer_from_files(files)


def _tokenize(batch):
    """Tokens of a batch of records, per split, with BOS where a document starts; and the bytes
    and documents of each split."""
    tok, out = _worker_tok, {"train": [], "val": []}
    counts = {s: [0, 0] for s in out}
    for (text, first, split), ids in zip(batch, tok.encode_batch([t for t, _, _ in batch])):
        out[split].append(([tok.bos_id] if first else []) + ids)
        counts[split][0] += len(text.encode())
        counts[split][1] += first
    dtype = token_dtype(tok.vocab_size)
    return {s: np.fromiter(itertools.chain.from_iterable(rows), dtype=dtype, count=sum(map(len, rows)))
            for s, rows in out.items()}, counts


def batches(records, size=BATCH_CHARS):
    batch, n = [], 0
    for r in records:
        batch.append(r)
        n += len(r[0])
        if n >= size:
            yield batch
            batch, n = [], 0
    if batch:
        yield batch


class ShardWriter:
    """Tokens of one split into files <split>-00000.bin, ... of exactly shard_tokens tokens (the
    last one fewer), each written under a .tmp name and renamed when full."""

    def __init__(self, out, split, dtype, shard_tokens):
        self.out, self.split, self.dtype, self.shard_tokens = out, split, dtype, shard_tokens
        self.shards, self.file, self.n = [], None, 0

    def write(self, tokens):
        while len(tokens):
            if self.file is None:
                self.name = f"{self.split}-{len(self.shards):05d}.bin"
                self.file, self.n = open(os.path.join(self.out, self.name + ".tmp"), "wb"), 0
            take = tokens[:self.shard_tokens - self.n]
            self.file.write(take.astype(self.dtype).tobytes())
            self.n += len(take)
            tokens = tokens[len(take):]
            if self.n == self.shard_tokens:
                self.finish()

    def finish(self):
        if self.file is not None:
            self.file.flush()
            os.fsync(self.file.fileno())
            self.file.close()
            os.replace(os.path.join(self.out, self.name + ".tmp"), os.path.join(self.out, self.name))
            self.shards.append({"file": self.name, "tokens": self.n})
            self.file = None


def token_dtype(vocab_size):
    """uint16 when every id fits: half the disk and memory of uint32."""
    return np.uint16 if vocab_size <= 2**16 else np.uint32


def prepare(records, out, tok, workers=1, sources=None, extra=None, shard_tokens=SHARD_TOKENS, what="text",
            total_bytes=0):
    """Tokenize records (an iterable of (text, starts a document, split)) with tok into out/:
    shards per split, tok's files, and MANIFEST (written last). workers processes tokenize, each
    a batch of BATCH_CHARS at a time, at most 2 * workers batches in flight (so memory stays flat
    whatever the size of the data); the tokens are written in the order the records came.
    Returns the manifest."""
    os.makedirs(out, exist_ok=True)
    if os.path.exists(os.path.join(out, MANIFEST)):
        os.remove(os.path.join(out, MANIFEST))  # unfinished from here on, until the new one is written
    for name, data in tok.files.items():
        with open(os.path.join(out, name), "wb") as f:
            f.write(data)
    dtype = token_dtype(tok.vocab_size)
    writers = {s: ShardWriter(out, s, dtype, shard_tokens) for s in ("train", "val")}
    totals = {s: [0, 0] for s in writers}
    total_bytes = sum(s["bytes"] for s in sources) if sources else total_bytes
    p, t0 = Progress(f"preparing {what}", total_bytes, "bytes"), time.time()

    def take(result):
        tokens, counts = result
        for s in writers:
            writers[s].write(tokens[s])
            totals[s] = [a + b for a, b in zip(totals[s], counts[s])]
        p.update(counts["train"][0] + counts["val"][0])

    if workers == 1:
        _start_worker(tok.files)
        for batch in batches(records):
            take(_tokenize(batch))
    else:
        # spawn: fresh processes, none of this one's threads (a fork under torch's can hang)
        ctx = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(workers, ctx, _start_worker, (tok.files,)) as pool:
            pending = collections.deque()
            for batch in batches(records):
                pending.append(pool.submit(_tokenize, batch))
                if len(pending) >= 2 * workers:
                    take(pending.popleft().result())
            while pending:
                take(pending.popleft().result())
    for w in writers.values():
        w.finish()
    p.done()
    if not totals["train"][0]:
        raise ValueError(f"{what} holds no training text (every part went to validation, or there is none).")
    if not totals["val"][0]:
        raise ValueError(f"{what} gave no validation text: give more text, or a larger --val-frac.")
    manifest = {"format": 1, "dtype": np.dtype(dtype).name, "shard_tokens": shard_tokens,
                "tokenizer": {"kind": type(tok).__name__, "vocab_size": tok.vocab_size, "sha256": fingerprint(tok)},
                "sources": sources or [], **(extra or {}), "seconds": round(time.time() - t0, 1)}
    for s, w in writers.items():
        manifest[s] = {"tokens": sum(x["tokens"] for x in w.shards), "bytes": totals[s][0], "documents": totals[s][1],
                       "shards": w.shards}
    atomic_write_text(os.path.join(out, MANIFEST), json.dumps(manifest, indent=1, ensure_ascii=False))
    return manifest


def describe(path, manifest):
    t, v = manifest["train"], manifest["val"]
    return (f"{path}: {t['tokens']:,} train tokens ({t['bytes'] / 1e6:.1f} MB of text, {t['documents']:,} documents, "
            f"{len(t['shards'])} shard(s)), {v['tokens']:,} validation tokens; tokenizer "
            f"{manifest['tokenizer']['kind']} of {manifest['tokenizer']['vocab_size']:,}")


def prepare_files(path, out, tok=None, vocab_size=32000, workers=1, seed=1337, val_frac=0.05, skip_bad=False,
                  recall=None, extra=None, shard_tokens=SHARD_TOKENS):
    """Your own text at path (a file or a directory of .txt / .jsonl) -> prepared data in out. tok:
    the tokenizer to use; None: a new BPE of vocab_size, trained on a sample. Files that are not
    UTF-8 are an error naming the file and byte, or (skip_bad) left out and counted. recall
    {seed, frac, doc_bytes}: recall documents (corpus.py) added to the training text."""
    files, bad = [], []
    for f in corpus.text_files(path):
        try:
            corpus.check_utf8(f)
            files.append(f)
        except ValueError as e:
            if not skip_bad:
                raise ValueError(f"{e} Fix or remove it, or pass --skip-bad-files.") from None
            bad.append(f)
    if bad:
        print(f"data: skipped {len(bad)} file(s) that are not UTF-8 (first: {bad[0]})")
    if not files:
        raise ValueError(f"--data {path} holds no UTF-8 text.")
    sources = [{"path": os.path.abspath(f), "bytes": os.path.getsize(f), "mtime": os.path.getmtime(f)} for f in files]
    total = sum(s["bytes"] for s in sources)
    recall_docs = recall_documents(recall, (1 - val_frac) * total)

    def records():  # read again for each pass
        yield from file_records(files, seed, val_frac)
        yield from ((p, i == 0, "train") for doc in recall_docs for i, p in enumerate(parts(doc)))
    tok = tok or new_tokenizer(records(), total, seed, vocab_size)
    settings = {"split": {"by": "seeded hash of each part", "seed": seed, "val_frac": val_frac, "part_chars": PART_CHARS},
                "skipped": [os.path.abspath(f) for f in bad], **(extra or {})}
    return prepare(records(), out, tok, workers, sources, settings, shard_tokens, what=path)


def prepare_corpus(out, world, tok=None, vocab_size=4096, recall=None, workers=1, extra=None,
                   shard_tokens=SHARD_TOKENS):
    """The synthetic corpus (corpus.generate_corpus(**world)) -> prepared data in out, through the
    same path as any text; with its held-out facts and the world's settings in
    heldout_facts.json (post-training rebuilds the same world from them)."""
    t0 = time.time()
    c = corpus.generate_corpus(seed=world["seed"], target_bytes=world["target_bytes"],
                               heldout_fraction=world["heldout_fraction"], n_people=world["n_people"])
    nb = sum(len(d.encode()) for d in c.train)
    print(f"data: the synthetic bilingual corpus: {len(c.train):,} train / {len(c.val):,} val documents, "
          f"{nb / 1e6:.1f} MB of train text ({time.time() - t0:.1f}s)")
    recall_docs = recall_documents(recall, nb)
    if recall_docs:
        rb = sum(len(d.encode()) for d in recall_docs)
        print(f"data: + {len(recall_docs):,} recall documents, {rb / 1e6:.1f} MB ({100 * rb / (nb + rb):.0f}% of the "
              f"train text)")
    total = nb + sum(len(d.encode()) for d in c.val + recall_docs)
    tok = tok or new_tokenizer(corpus_records(c, recall_docs), total, world["seed"], vocab_size)
    os.makedirs(out, exist_ok=True)
    facts = {"heldout": c.heldout_facts, "train_control": c.train_facts, "world": world}
    atomic_write_text(os.path.join(out, "heldout_facts.json"), json.dumps(facts, ensure_ascii=False))
    return prepare(corpus_records(c, recall_docs), out, tok, workers, None, {"split": {"by": "the corpus's held-out facts"},
                   **(extra or {})}, shard_tokens, what="the synthetic corpus", total_bytes=total)


def recall_documents(recall, train_bytes):
    """Recall documents (corpus.py) to make a share recall["frac"] of the training text, in the
    training split only so that validation stays ordinary text; about two windows' worth of bytes
    (~4 bytes a token) each, so that most of their questions fall in the window of the statement."""
    if not recall:
        return []
    return corpus.recall_corpus(recall["seed"], recall["frac"] / (1 - recall["frac"]) * train_bytes, recall["doc_bytes"])


def new_tokenizer(records, total_bytes, seed, vocab_size):
    """A BPE tokenizer of vocab_size trained on a bounded, seeded sample of the training records."""
    t0 = time.time()
    sample = tokenizer_sample(records, total_bytes, seed)
    if not sample:
        raise ValueError("the data holds no training text to train a tokenizer on.")
    tok = train_tokenizer(sample, vocab_size)
    print(f"tokenizer: byte-level BPE, {tok.vocab_size} tokens, trained on {sum(map(len, sample)):,} characters in "
          f"{time.time() - t0:.1f}s; {bytes_per_token(tok, sample[-2000:]):.2f} bytes/token")
    return tok


def sources_unchanged(manifest):
    """Whether every source file of a manifest is still there with the same size and time."""
    return all(os.path.isfile(s["path"]) and os.path.getsize(s["path"]) == s["bytes"]
               and os.path.getmtime(s["path"]) == s["mtime"] for s in manifest.get("sources", []))


# -----------------------------------------------------------------------------------------------
# 4. Prepared data

class TokenStream:
    """The shards of one split as one array of token ids: len(), and slices that may cross from
    one shard into the next, read from memory maps (nothing is loaded before it is asked for)."""

    def __init__(self, files, dtype):
        self.maps = [np.memmap(f, dtype=dtype, mode="r") for f in files]
        self.starts = np.cumsum([0] + [len(m) for m in self.maps])

    def __len__(self):
        return int(self.starts[-1])

    def __getitem__(self, s):
        start, stop, step = s.indices(len(self))
        assert step == 1, "TokenStream takes contiguous slices"
        out, i = [], int(np.searchsorted(self.starts, start, side="right")) - 1
        while start < stop:
            a = start - self.starts[i]
            b = min(stop - self.starts[i], len(self.maps[i]))
            out.append(self.maps[i][a:b])
            start += b - a
            i += 1
        return out[0] if len(out) == 1 else np.concatenate(out) if out else np.zeros(0, self.maps[0].dtype)


def is_prepared(path):
    return os.path.isfile(os.path.join(path, MANIFEST))


def open_prepared(path, tok=None):
    """(manifest, train TokenStream, val TokenStream, tokenizer) of prepared data, checked: the
    manifest must match its shards, and tok (the model's tokenizer), if given, the one the data
    was prepared with."""
    file = os.path.join(path, MANIFEST)
    if not os.path.isfile(file):
        raise FileNotFoundError(f"{path} is not prepared data (no {MANIFEST}; an unfinished `data.py` run leaves none)")
    try:
        with open(file, encoding="utf-8") as f:
            manifest = json.load(f)
        dtype = np.dtype(manifest["dtype"])
        splits = {s: manifest[s]["shards"] for s in ("train", "val")}
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
        raise ValueError(f"{file} is not a data.py manifest") from None
    for shards in splits.values():
        for sh in shards:
            p = os.path.join(path, sh["file"])
            if not os.path.isfile(p) or os.path.getsize(p) != sh["tokens"] * dtype.itemsize:
                raise ValueError(f"{path}: {sh['file']} no longer matches the manifest (missing, or another size): "
                                 f"prepare the data again")
    data_tok = load_tokenizer(path)
    if fingerprint(data_tok) != manifest["tokenizer"]["sha256"]:
        raise ValueError(f"{path}: the tokenizer files beside the shards are not the ones the manifest records")
    if tok is not None and fingerprint(tok) != fingerprint(data_tok):
        raise ValueError(f"{path} was prepared with another tokenizer than this model's ({manifest['tokenizer']['kind']} "
                         f"of {manifest['tokenizer']['vocab_size']:,}): prepare it again with --tokenizer <the checkpoint>")
    streams = [TokenStream([os.path.join(path, sh["file"]) for sh in splits[s]], dtype) for s in ("train", "val")]
    return manifest, *streams, data_tok


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
    """Windows of seq_len + 1 tokens of a token array (a TokenStream), sequence g of the run
    being window EpochOrder(n, seed)(g) (shuffled per epoch; in order with shuffle=False, for
    validation). A window may span two shards."""

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


# -----------------------------------------------------------------------------------------------
# 5. The command line, and --bench

def parse_args(argv=None):
    ap = argparse.ArgumentParser(description="Prepare pre-training text once: token shards that train.py --data reads.")
    ap.add_argument("data", nargs="?", help="a UTF-8 file, or a directory of .txt / .jsonl files (searched recursively)")
    ap.add_argument("--out", help="the directory to write: shards, tokenizer files and manifest.json")
    ap.add_argument("--tokenizer", help="a checkpoint directory (ours or a released PLaMo 2), or a tokenizer file "
                                        "(tokenizer.tiktoken or tokenizer.jsonl), whose tokenizer to use")
    ap.add_argument("--vocab-size", type=positive_int, help="without --tokenizer: train a new BPE tokenizer of this size "
                                                             "on a sample of the text (default 32000)")
    ap.add_argument("--workers", type=positive_int, default=max(1, (os.cpu_count() or 2) - 1),
                    help="tokenizing processes (default: the CPUs less one)")
    ap.add_argument("--val-frac", type=unit_float, default=0.05, help="share of the text for validation (default 0.05)")
    ap.add_argument("--seed", type=nonneg_int, default=1337, help="seed of the split and of the tokenizer's sample")
    ap.add_argument("--skip-bad-files", action="store_true", help="leave out files that are not UTF-8 (counted), "
                                                                  "instead of stopping at the first")
    ap.add_argument("--overwrite", action="store_true", help="replace prepared data already in --out")
    ap.add_argument("--bench", action="store_true", help="measure peak memory and MB/s against corpus size, then exit")
    ap.add_argument("--bench-sizes", default="10,100,1000", help="with --bench: corpus sizes in MB (default 10,100,1000)")
    args = ap.parse_args(argv)
    if not args.bench and (args.data is None or args.out is None):
        ap.error("give the text to prepare and --out (or --bench)")
    if args.tokenizer and args.vocab_size:
        ap.error("--vocab-size trains a new tokenizer; --tokenizer uses an existing one: give one of them")
    return args


def tokenizer_arg(path):
    """The tokenizer that --tokenizer names: a directory holding one, or one of its files."""
    if os.path.isfile(path):
        name = os.path.basename(path)
        if name not in ("tokenizer.tiktoken", "tokenizer.jsonl"):
            raise ValueError(f"--tokenizer {path}: expected a checkpoint directory, tokenizer.tiktoken or tokenizer.jsonl")
        path = os.path.dirname(os.path.abspath(path))
    return load_tokenizer(path)


def main(argv=None):
    args = parse_args(argv)
    try:
        if args.bench:
            return bench(args)
        check_output(args.out, "--out", [("--data", args.data), ("--tokenizer", args.tokenizer)])
        if is_prepared(args.out) and not args.overwrite:
            raise ValueError(f"--out {args.out} holds prepared data already: give another --out, or --overwrite")
        tok = tokenizer_arg(args.tokenizer) if args.tokenizer else None
        m = prepare_files(args.data, args.out, tok, args.vocab_size or 32000, args.workers, args.seed, args.val_frac,
                          args.skip_bad_files)
        print(f"prepared {describe(args.out, m)}, in {m['seconds']:.0f}s with {args.workers} worker(s)")
        print(f"next: python train.py --data {args.out} ...  (or torchrun --nproc_per_node=N train.py --data {args.out} ...)")
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


def unigram_vocabulary(texts, size, max_len=6):
    """Rows of a tokenizer.jsonl in PLaMo 2's layout with `size` entries (specials, the 256 bytes,
    then the most frequent substrings of texts up to max_len characters, scored by log frequency):
    a stand-in for the released 100K vocabulary when measuring PlamoTokenizer's speed."""
    counts = collections.Counter()
    for t in texts:
        for n in range(1, max_len + 1):
            counts.update(t[i:i + n] for i in range(len(t) - n + 1))
    total = sum(counts.values())
    specials = [["<|plamo:unk|>", 0.0, "UNKNOWN"]] + [[f"<|plamo:{s}|>", 0.0, "CONTROL"] for s in ("bos", "eos", "pad", "op")]
    rows = specials + [[f"<0x{b:02X}>", 0.0, "BYTE"] for b in range(256)]
    top = [p for p, _ in counts.most_common(size) if "<|" not in p][:size - len(rows)]
    return rows + [[p, math.log(counts[p] / total), "NORMAL"] for p in top]


def tree_rss(pid):
    """Resident memory of a process and all its descendants, in bytes (Linux /proc)."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/status") as f:
                total += next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))
            with open(f"/proc/{p}/task/{p}/children") as f:
                todo += [int(c) for c in f.read().split()]
        except (OSError, StopIteration):
            pass
    return total


def timed_run(argv, until=None):
    """(seconds, peak resident bytes of the process tree, seconds until a line containing `until`
    was printed) of `python argv` run to the end."""
    t0 = time.time()
    proc = subprocess.Popen([sys.executable] + argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PLAMO2_QUIET": "1"})
    peak, first = [0], [None]

    def watch():
        while proc.poll() is None:
            peak[0] = max(peak[0], tree_rss(proc.pid))
            time.sleep(0.05)
    threading.Thread(target=watch, daemon=True).start()
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if until and first[0] is None and until in line:
            first[0] = time.time() - t0
    if proc.wait():
        raise RuntimeError("".join(lines[-20:]))
    return time.time() - t0, peak[0], first[0]


def bench(args):
    """The prepare step against corpus size: peak memory and MB/s with 1 and 2 workers, beside
    tiktoken's own encoder on the same text (the ceiling); the first training step on prepared
    data of each size; PlamoTokenizer's speed on Japanese text with a 100K-piece vocabulary."""
    root = tempfile.mkdtemp(prefix="plamo2-data-bench-")
    c = corpus.generate_corpus(target_bytes=8_000_000)
    base = list(c.train) + (corpus.load_text(args.data) if args.data else [])
    tok = train_tokenizer(c.train, 4096)
    tok_dir = os.path.join(root, "tokenizer")
    os.makedirs(tok_dir)
    tok.save(os.path.join(tok_dir, "tokenizer.tiktoken"))
    sizes = [int(s) for s in args.bench_sizes.split(",")]
    print(f"data.py --bench: the synthetic corpus{' + ' + args.data if args.data else ''} repeated to each size, "
          f"our BPE tokenizer (4,096 tokens); {os.cpu_count()} CPUs; files written to {root}", flush=True)
    # the ceiling: tiktoken's encoder, one thread, on the same text
    sample = "\n\n\n".join(base)[:20_000_000]
    t0 = time.time()
    for i in range(0, len(sample), 1 << 20):
        tok.enc.encode_ordinary(sample[i:i + (1 << 20)])
    ceiling = len(sample.encode()) / (time.time() - t0) / 1e6
    print(f"tiktoken's encoder alone, one thread: {ceiling:.2f} MB/s", flush=True)
    rows = []
    for mb in sizes:
        text_dir = os.path.join(root, f"corpus-{mb}MB")  # files of at most 100 MB, the documents in turn
        os.makedirs(text_dir)
        docs, written, k = itertools.cycle(base), 0, 0
        while written < mb * 1e6:
            with open(os.path.join(text_dir, f"part-{k:03d}.txt"), "w", encoding="utf-8") as f:
                part = 0
                while part < 100e6 and written < mb * 1e6:
                    doc = next(docs) + "\n\n\n"
                    f.write(doc)
                    part += len(doc.encode())
                    written += len(doc.encode())
            k += 1
        row = {"MB": written / 1e6}
        for workers in (1, 2):
            out = os.path.join(root, f"prepared-{mb}MB-{workers}")
            took, peak, _ = timed_run(["data.py", text_dir, "--out", out, "--tokenizer", tok_dir,
                                       "--workers", str(workers)])
            row[f"w{workers}"] = (took, peak)
            print(f"  {written / 1e6:,.0f} MB, {workers} worker(s): {took:.1f} s = {written / 1e6 / took:.2f} MB/s, "
                  f"peak memory {peak / 2**20:.0f} MiB", flush=True)
        _, _, first = timed_run(["train.py", "--data", os.path.join(root, f"prepared-{mb}MB-1"), "--size", "tiny",
                                 "--out", os.path.join(root, f"run-{mb}MB"), "--max-steps", "2", "--eval-every", "2"],
                                until="step 1/")
        row["first_step"] = first
        print(f"  first training step on it after {first:.1f} s", flush=True)
        rows.append(row)
        shutil.rmtree(text_dir)
    print("\n| corpus | 1 worker | 2 workers | peak memory (1 / 2 workers) | first step |")
    print("|---:|---:|---:|---:|---:|")
    for r in rows:
        (s1, m1), (s2, m2) = r["w1"], r["w2"]
        print(f"| {r['MB']:,.0f} MB | {r['MB'] / s1:.2f} MB/s ({r['MB'] / s1 / ceiling:.0%} of tiktoken) | "
              f"{r['MB'] / s2:.2f} MB/s | {m1 / 2**20:.0f} / {m2 / 2**20:.0f} MiB | {r['first_step']:.1f} s |")
    # PLaMo 2's own tokenizer: the DP over code points, in Python, with a 100K-piece vocabulary
    ja = [d for d in base if re.search(r"[\u3040-\u30ff]", d[:40])]
    rows = unigram_vocabulary(ja, 100_000)
    plamo = PlamoTokenizer(rows)
    text = "\n".join(ja)[:300_000]
    t0 = time.time()
    ids = plamo.encode(text)
    dt = time.time() - t0
    print(f"\nPlamoTokenizer, a {len(rows):,}-piece vocabulary from the Japanese text: {len(text.encode()) / dt / 1e6:.2f} "
          f"MB/s per process on Japanese text ({len(text.encode()) / len(ids):.2f} bytes/token); our BPE on the same "
          f"text: {len(text.encode()) / seconds(lambda: tok.encode(text)) / 1e6:.2f} MB/s")
    shutil.rmtree(root)


def seconds(fn):
    t0 = time.time()
    fn()
    return time.time() - t0


if __name__ == "__main__":
    main()
