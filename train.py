"""
train.py: pre-training PLaMo 2, from raw text to a checkpoint.

Read top to bottom, this file is the story of the stage:
  1. Tokenizer: byte-level BPE trained on the training split and encoded with tiktoken.
     (PLaMo 2's own tokenizer is a 100k Unigram-style vocabulary; plamo2.py reads that one
     for released checkpoints. Ours is the standard recipe at laptop scale.)
"""
import collections

import regex  # tiktoken's own dependency; it knows the same \p{...} classes as tiktoken's engine

from plamo2 import SPECIAL_TOKENS, SPLIT_PATTERN, Tokenizer

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

    >>> bytes_per_token(Tokenizer.train(c.train, 4096), c.val)  # the default corpus
    4.47
    """
    n_tokens = sum(len(ids) for ids in tok.encode_batch(docs))
    return sum(len(d.encode("utf-8")) for d in docs) / max(n_tokens, 1)
