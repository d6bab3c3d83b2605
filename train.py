"""
train.py: pre-training PLaMo 2, from raw text to a checkpoint.

Read top to bottom, this file is the story of the stage:
  1. Tokenizer: byte-level BPE trained on the training split and encoded with tiktoken.
     (PLaMo 2's own tokenizer is a 100k Unigram-style vocabulary; plamo2.py reads that one
     for released checkpoints. Ours is the standard recipe at laptop scale.)
"""
import base64
import collections
import json
import os

import regex  # tiktoken's own dependency; it knows the same \p{...} classes as tiktoken's engine
import tiktoken

# -----------------------------------------------------------------------------------------------
# 1. Tokenizer
#
# Byte-level BPE in three steps, as in GPT-2/4: split the text into chunks with a regex,
# count adjacent byte pairs inside chunks, and merge the most frequent pair into a new token
# until the vocabulary is full. Every string encodes, because the 256 single bytes are tokens.
#
# The split pattern is GPT-4's (cl100k) with one change for Japanese, which has no spaces:
# GPT-4's \p{L}+ would take a whole sentence such as 東京都の人口は as one chunk, so kanji,
# hiragana and katakana runs are chunks of their own. BPE never merges across a chunk boundary,
# so tokens never straddle 東京都|の|人口|は; a kanji word and its okurigana (好|き) stay apart too.
SPLIT_PATTERN = "|".join([
    r"'(?i:[sdmt]|ll|ve|re)",                     # English contractions
    r"[^\r\n\p{L}\p{N}]?+[^\P{L}\p{Han}\p{Hiragana}\p{Katakana}ー]+",  # a word in any other script,
                                                  # with one leading space or mark (" the", "(Tokyo")
    r"[\p{Han}〆]+",                              # kanji (々 and 〇 are Han)
    r"[\p{Hiragana}ー]+",                         # hiragana; ー (U+30FC) is script Common, not kana
    r"[\p{Katakana}ーｰﾞﾟ]+",                      # katakana, full and half width
    r"\p{N}{1,3}",                                # numbers in groups of at most 3 digits
    r" ?[^\s\p{L}\p{N}]++[\r\n]*",                # punctuation and symbols: 、。「」 emoji
    r"\s*[\r\n]",                                 # line breaks with the spaces before them
    r"\s+(?!\S)",                                 # spaces, leaving the last one to the next word
    r"\s+",
])

# The special tokens take the last ids of the vocabulary, in this order; ordinary text never
# encodes to them. Names follow PLaMo 2's tokenizer.
SPECIAL_TOKENS = [
    "<|plamo:bos|>",        # starts each document; PLaMo 2 separates pre-training documents with it
    "<|plamo:eos|>",        # end of text
    "<|plamo:pad|>",        # padding; never a training target
    "<|plamo:op|>",         # PLaMo 2's section marker ("<|plamo:op|>input lang=English" in plamo-2-translate)
    "<|plamo:msg|>",        # ends a chat message
    "<|plamo:system|>",     # a chat message starts with its role:
    "<|plamo:user|>",       #   <|plamo:user|>質問<|plamo:msg|><|plamo:assistant|>答え<|plamo:msg|>
    "<|plamo:assistant|>",
]


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


class Tokenizer:
    """A tiktoken Encoding with PLaMo 2's special tokens at the end of the vocabulary.

    >>> tok = Tokenizer.train(corpus.train, vocab_size=4096)
    >>> ids = tok.encode("東京は晴れ。", bos=True)
    >>> ids[0] == tok.bos_id == 4088, tok.decode(ids[1:])
    (True, '東京は晴れ。')
    """

    def __init__(self, mergeable_ranks, pattern=SPLIT_PATTERN, special_tokens=SPECIAL_TOKENS):
        n = len(mergeable_ranks)
        if sorted(mergeable_ranks.values()) != list(range(n)):
            raise ValueError("mergeable ranks must be the numbers 0 .. n-1, each once.")
        self.special = {t: n + i for i, t in enumerate(special_tokens)}
        self.pattern = pattern
        self.enc = tiktoken.Encoding("plamo2-bpe", pat_str=pattern, mergeable_ranks=mergeable_ranks,
                                     special_tokens=self.special)
        self.vocab_size = n + len(self.special)
        self.bos_id = self.special["<|plamo:bos|>"]
        self.eos_id = self.special["<|plamo:eos|>"]
        self.pad_id = self.special["<|plamo:pad|>"]

    @classmethod
    def train(cls, texts, vocab_size, trainer=train_bpe):
        """Train on texts so that the vocabulary, special tokens included, is vocab_size."""
        n = vocab_size - len(SPECIAL_TOKENS)
        if n < 256:
            raise ValueError(f"vocab_size must be at least {256 + len(SPECIAL_TOKENS)}: "
                             "the 256 bytes plus the special tokens.")
        ranks = trainer(texts, n)
        if len(ranks) < n:
            raise ValueError(f"the training text is too small for vocab_size {vocab_size}: "
                             f"it has pairs for only {len(ranks) + len(SPECIAL_TOKENS)} tokens.")
        return cls(ranks)

    def encode(self, text, bos=False):
        """Token ids of text. Text that looks like a special token ("<|plamo:bos|>") is encoded
        as the plain characters it is; only bos=True adds the real BOS id."""
        ids = self.enc.encode_ordinary(text)
        return [self.bos_id] + ids if bos else ids

    def encode_batch(self, texts, bos=False):
        """encode() over many texts, in parallel threads."""
        out = self.enc.encode_ordinary_batch(texts)
        return [[self.bos_id] + ids for ids in out] if bos else out

    def decode(self, ids):
        """The text of ids (special tokens as their names). Bytes that stop mid-character,
        as a cut-off sample can, decode to U+FFFD."""
        return self.enc.decode(ids)

    def save(self, path):
        """Write the vocabulary in tiktoken's own .tiktoken format (a line "base64(bytes) rank" per
        token, which tiktoken.load.load_tiktoken_bpe reads), and the split pattern and special
        tokens, which that format has no room for, to a JSON sidecar at path + ".json"."""
        ranks = self.enc._mergeable_ranks
        with open(path, "w", encoding="ascii") as f:
            for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
                f.write(f"{base64.b64encode(token).decode()} {rank}\n")
        with open(path + ".json", "w", encoding="utf-8") as f:
            json.dump({"pattern": self.pattern, "special_tokens": self.special, "vocab_size": self.vocab_size},
                      f, ensure_ascii=False, indent=1)

    @classmethod
    def load(cls, path):
        """Read what save() wrote: path (.tiktoken) and path + ".json"."""
        for p in (path, path + ".json"):
            if not os.path.isfile(p):
                raise FileNotFoundError(f"no tokenizer at {path}: {p} is missing (Tokenizer.save writes both files).")
        ranks = {}
        with open(path, "rb") as f:
            for n, line in enumerate(f, 1):
                try:
                    token, rank = line.split()
                    ranks[base64.b64decode(token, validate=True)] = int(rank)
                except ValueError:
                    raise ValueError(f"{path} is not a .tiktoken file: line {n} is not 'base64 rank'.") from None
        try:
            with open(path + ".json", encoding="utf-8") as f:
                meta = json.load(f)
            special = sorted(meta["special_tokens"], key=meta["special_tokens"].get)
            tok = cls(ranks, meta["pattern"], special)
        except (ValueError, KeyError, TypeError, AttributeError):
            raise ValueError(f"{path}.json is not a tokenizer sidecar matching {path}.") from None
        if tok.special != meta["special_tokens"] or tok.vocab_size != meta["vocab_size"]:
            raise ValueError(f"{path}.json does not match {path}: the special token ids or vocab_size differ.")
        return tok


def bytes_per_token(tok, docs):
    """UTF-8 bytes per token over docs: how much text a token carries (higher is better).

    >>> bytes_per_token(Tokenizer.train(c.train, 4096), c.val)  # the default corpus
    4.47
    """
    n_tokens = sum(len(ids) for ids in tok.encode_batch(docs))
    return sum(len(d.encode("utf-8")) for d in docs) / max(n_tokens, 1)
