"""
tokenizer.py: text <-> token ids, for PLaMo 2 checkpoints of both kinds, and the chat template.

Read in order:
  1. Byte-level BPE, trained here (the readable reference trainer, and rustbpe which gives the
     same merges fast), encoded with tiktoken: our Tokenizer, saved as tokenizer.tiktoken.
  2. PlamoTokenizer: the released models' own tokenizer.jsonl, encoded with their algorithm
     (the best-scoring segmentation over code points), so that a released model sees the ids it
     was trained on.
  3. load_tokenizer: whichever a checkpoint directory holds, with the files it came from, which
     every checkpoint written from it carries on byte for byte.
  4. The chat template: render_chat / parse_chat, in both vocabularies.

Both tokenizers share one interface: encode(text, bos=False), encode_batch, decode(ids),
vocab_size, bos_id / eos_id / pad_id, special {name: id}, token_bytes (the bytes of every id)
and files {file name: bytes}.
"""
import base64
import collections
import hashlib
import json
import math
import os

import regex  # tiktoken's own dependency; it knows the same \\p{...} classes as tiktoken's engine
import tiktoken
import torch


def _names(names, limit=5):
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more

# -----------------------------------------------------------------------------------------------
# 1. Byte-level BPE, in three steps as in GPT-2/4: split the text into chunks with a regex, count
#    adjacent byte pairs inside chunks, and merge the most frequent pair into a new token until
#    the vocabulary is full. Every string encodes, because the 256 single bytes are tokens.
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


def merge_pair(ids, pair, new_id):
    """Replace every occurrence of pair in ids with new_id, left to right, without overlaps.

    >>> merge_pair([1, 2, 2, 2, 3], (2, 2), 9)
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
        words = [(m, n) for m, n in ((merge_pair(ids, pair, len(vocab) - 1), n) for ids, n in words) if len(m) > 1]
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


class Tokenizer:
    """A tiktoken Encoding with PLaMo 2's special tokens at the end of the vocabulary, the merges
    from train_tokenizer; with none at all, every byte is a token and BOS is id 256:

    >>> tok = Tokenizer({bytes([b]): b for b in range(256)})
    >>> ids = tok.encode("東京", bos=True)
    >>> ids, tok.decode(ids[1:]), tok.vocab_size
    ([256, 230, 157, 177, 228, 186, 172], '東京', 264)
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
        # The bytes of every id (special tokens as their names), as PlamoTokenizer has them too.
        self.token_bytes = [self.enc.decode_single_token_bytes(i) for i in range(self.vocab_size)]
        self.files = self.serialize()  # load_tokenizer replaces them with the bytes it read

    def encode(self, text, bos=False):
        """Token ids of text. Text that looks like a special token ("<|plamo:bos|>") is encoded
        as the plain characters it is; only bos=True adds the real BOS id."""
        ids = self.enc.encode_ordinary(text)
        return [self.bos_id] + ids if bos else ids

    def encode_batch(self, texts, bos=False):
        """encode() over many texts, in this thread: tiktoken's own batch call hands each text to a
        thread pool, which for many short texts (data.py's document parts) cost more than the
        encoding itself (2.6x slower measured); data.py's worker processes are the parallelism."""
        out = [self.enc.encode_ordinary(t) for t in texts]
        return [[self.bos_id] + ids for ids in out] if bos else out

    def decode(self, ids):
        """The text of ids (special tokens as their names). Bytes that stop mid-character,
        as a cut-off sample can, decode to U+FFFD."""
        return self.enc.decode(ids)

    def serialize(self):
        """{file name: bytes}: the vocabulary in tiktoken's own format, tokenizer.tiktoken (a line
        "base64(bytes) rank" per token, which tiktoken.load.load_tiktoken_bpe reads), and the split
        pattern and special tokens, which that format has no room for, in tokenizer.tiktoken.json."""
        ranks = sorted(self.enc._mergeable_ranks.items(), key=lambda kv: kv[1])
        meta = {"pattern": self.pattern, "special_tokens": self.special, "vocab_size": self.vocab_size}
        return {"tokenizer.tiktoken": "".join(f"{base64.b64encode(t).decode()} {r}\n" for t, r in ranks).encode(),
                "tokenizer.tiktoken.json": json.dumps(meta, ensure_ascii=False, indent=1).encode()}

    def save(self, path):
        """Write the two files of `files` at path and path + ".json"."""
        files = self.serialize()
        for name, p in (("tokenizer.tiktoken", path), ("tokenizer.tiktoken.json", path + ".json")):
            with open(p, "wb") as f:
                f.write(files[name])

    @classmethod
    def load(cls, path):
        """Read what save() wrote: path (.tiktoken) and path + ".json"."""
        files = {}
        for name, p in (("tokenizer.tiktoken", path), ("tokenizer.tiktoken.json", path + ".json")):
            if not os.path.isfile(p):
                raise FileNotFoundError(f"no tokenizer at {path}: {p} is missing (Tokenizer.save writes both files).")
            with open(p, "rb") as f:
                files[name] = f.read()
        return cls.from_files(files, path)

    @classmethod
    def from_files(cls, files, source="tokenizer.tiktoken"):
        """The tokenizer of the bytes of tokenizer.tiktoken and tokenizer.tiktoken.json (serialize's)."""
        ranks = {}
        for n, line in enumerate(files["tokenizer.tiktoken"].splitlines(), 1):
            try:
                token, rank = line.split()
                ranks[base64.b64decode(token, validate=True)] = int(rank)
            except ValueError:
                raise ValueError(f"{source} is not a .tiktoken file: line {n} is not 'base64 rank'.") from None
        try:
            meta = json.loads(files["tokenizer.tiktoken.json"].decode("utf-8"))
            special = sorted(meta["special_tokens"], key=meta["special_tokens"].get)
            tok = cls(ranks, meta["pattern"], special)
        except (ValueError, KeyError, TypeError, AttributeError):
            raise ValueError(f"{source}.json is not a tokenizer sidecar matching {source}.") from None
        if tok.special != meta["special_tokens"] or tok.vocab_size != meta["vocab_size"]:
            raise ValueError(f"{source}.json does not match {source}: the special token ids or vocab_size differ.")
        tok.files = dict(files)  # as read, byte for byte
        return tok


class IncrementalDecoder:
    """Text of a stream of token ids, released only once its characters are complete.

    A byte-level token can end in the middle of a UTF-8 character (東 is 3 bytes, maybe split over
    two tokens); decoding it alone gives U+FFFD, which must not be printed. So the ids since the
    last complete character wait in `pending` until their text no longer ends in U+FFFD; each step
    decodes only those few ids, not the whole continuation.
    >>> tok = Tokenizer({bytes([b]): b for b in range(256)})  # bytes only: 東 is three tokens
    >>> d = IncrementalDecoder(tok)
    >>> [d.add(t) for t in tok.encode("東京")], d.text
    (['', '', '東', '', '', '京'], '東京')
    """

    def __init__(self, tok):
        self.tok, self.pending, self.text = tok, [], ""

    def add(self, token):
        self.pending.append(token)
        piece = self.tok.decode(self.pending)
        if piece.endswith("\ufffd"):  # a character still lacks bytes (or is invalid: flush shows it)
            return ""
        self.pending, self.text = [], self.text + piece
        return piece

    def flush(self):
        """The rest, U+FFFD included: what a continuation cut off mid-character really ends with."""
        piece = self.tok.decode(self.pending)
        self.pending, self.text = [], self.text + piece
        return piece


# -----------------------------------------------------------------------------------------------
# 2. PLaMo 2's own tokenizer, for running released checkpoints (tokenizer.jsonl beside the weights).
# Not BPE: a vocabulary of scored pieces, and a text encodes as its segmentation into pieces with
# the best total score, found by dynamic programming over code points. The details follow the
# reference tokenization_plamo.py, so that a released model sees the ids it was trained on:
# every row but the byte tokens is a piece text can produce (CONTROL ones too: "<|plamo:op|>" in
# a plamo-2-translate prompt is id 4), integer costs -round(score * 1e4), a right-to-left DP that
# breaks ties towards the longer first piece, and any character may instead be spelled as its
# UTF-8 byte tokens at a fixed cost.

BYTE_FALLBACK_COST = 10**7   # the reference's UNKNOWN_SCORE: as costly as one piece of score -1000
UNUSABLE_COST = 2 * 10**7    # the reference's INVALID_SCORE: a piece this costly (score <= -2000,
                             # or not finite) is never produced from text, only decoded


class PlamoTokenizer:
    """PLaMo 2's tokenizer.jsonl: line n (0-based) is token n, a JSON array [piece, score, type, ...].

    >>> tok = PlamoTokenizer.load("plamo-2-1b/tokenizer.jsonl")  # doctest: +SKIP
    >>> ids = tok.encode("東京都の天気", bos=True)  # doctest: +SKIP
    >>> ids[0] == tok.bos_id == 1, tok.decode(ids[1:])  # doctest: +SKIP
    (True, '東京都の天気')

    A vocabulary of its own: the specials, the 256 byte tokens (ids 2-257), and one piece.
    >>> tok = PlamoTokenizer([["<|plamo:bos|>", 0.0, "CONTROL"], ["<|plamo:eos|>", 0.0, "CONTROL"]]
    ...                      + [[f"<0x{b:02X}>", 0.0, "BYTE"] for b in range(256)] + [["東", -1.0, "NORMAL"]])
    >>> tok.encode("東京", bos=True)   # 京 is no piece: its three UTF-8 bytes
    [0, 258, 230, 188, 174]
    """

    def __init__(self, rows, source="tokenizer.jsonl"):
        self.files = {"tokenizer.jsonl": "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode()}
        self.vocab_size = len(rows)
        self.special = {}    # CONTROL and UNKNOWN tokens: no text bytes (bits per byte skips them)
        self.pieces = {}     # every prefix of a matchable piece -> (id, cost); id -1 = only a prefix
        self.byte_ids = {}   # byte value -> id of its <0xXX> token
        self.token_bytes = []
        for i, row in enumerate(rows):
            try:
                piece, score, kind = row[0], row[1], row[2] if len(row) > 2 else "NORMAL"
                if not isinstance(piece, str) or isinstance(score, bool) or not isinstance(score, (int, float)):
                    raise TypeError
                if kind == "BYTE" and not (len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">")):
                    raise ValueError
                raw = bytes.fromhex(piece[3:5]) if kind == "BYTE" else piece.encode("utf-8")
            except (TypeError, ValueError, KeyError, IndexError):
                raise ValueError(f"{source} is not a PLaMo tokenizer: line {i + 1} is not "
                                 f"[piece, score, type, ...] (or is a BYTE token not named <0xXX>).") from None
            self.token_bytes.append(raw)
            if kind == "BYTE":  # only for byte fallback: "<0x41>" in a text is six characters
                self.byte_ids[raw[0]] = i
                continue
            if kind in ("CONTROL", "UNKNOWN"):
                self.special[piece] = i
            scaled = score * 1e4
            cost = -round(scaled) if math.isfinite(scaled) else UNUSABLE_COST
            for k in range(1, len(piece)):  # the prefixes let encode() stop at the first miss
                self.pieces.setdefault(piece[:k], (-1, 0))
            # A later row with the same piece replaces an earlier one, as in the reference.
            self.pieces[piece] = (i, cost) if cost < UNUSABLE_COST else (-1, 0)
        missing = [f"<0x{b:02X}>" for b in range(256) if b not in self.byte_ids]
        if missing:
            raise ValueError(f"{source} is not a PLaMo tokenizer: it lacks the byte tokens {_names(missing)}.")
        if "<|plamo:bos|>" not in self.special or "<|plamo:eos|>" not in self.special:
            raise ValueError(f"{source} is not a PLaMo tokenizer: it has no <|plamo:bos|> or <|plamo:eos|> token.")
        self.bos_id = self.special["<|plamo:bos|>"]
        self.eos_id = self.special["<|plamo:eos|>"]
        self.pad_id = self.special.get("<|plamo:pad|>", self.eos_id)  # padding is never a target

    def encode(self, text, bos=False):
        """Token ids of the cheapest segmentation of text; bos=True puts the BOS id first.

        With scores 東京 -2, 京都 -1, 東 -1.5, 都 -2.5 and 東京都 -5, "東京都" is 東|京都 (-2.5),
        not the longest match 東京都 (-5) nor 東京|都 (-4.5). Special tokens written in the text
        are pieces like any other, as in the released tokenizer: "<|plamo:op|>" is one id.
        """
        n = len(text)
        best = [0] * (n + 1)  # best[i]: least cost of encoding text[i:]
        step = [None] * n     # step[i]: (end, id) of the first piece of that encoding; id None = bytes
        for i in range(n - 1, -1, -1):
            best[i], step[i] = best[i + 1] + BYTE_FALLBACK_COST, (i + 1, None)
            for j in range(i + 1, n + 1):  # pieces starting at i, shortest first
                tid, cost = self.pieces.get(text[i:j], (None, 0))
                if tid is None:
                    break
                # <=: of equal totals the longer first piece wins, and bytes lose to any piece
                if tid >= 0 and cost + best[j] <= best[i]:
                    best[i], step[i] = cost + best[j], (j, tid)
        ids, i = [self.bos_id] if bos else [], 0
        while i < n:
            j, tid = step[i]
            ids += [tid] if tid is not None else [self.byte_ids[b] for b in text[i].encode("utf-8")]
            i = j
        return ids

    def encode_batch(self, texts, bos=False):
        return [self.encode(t, bos) for t in texts]

    def decode(self, ids):
        """The text of ids: pieces as their text (special tokens as their names), runs of byte
        tokens as the UTF-8 they spell; bytes that stop mid-character decode to U+FFFD.

        >>> tok = PlamoTokenizer([["<|plamo:bos|>", 0.0, "CONTROL"], ["<|plamo:eos|>", 0.0, "CONTROL"]]
        ...                      + [[f"<0x{b:02X}>", 0.0, "BYTE"] for b in range(256)])
        >>> tok.decode([tok.byte_ids[0xE6], tok.byte_ids[0x9D], tok.byte_ids[0xB1], tok.bos_id])
        '東<|plamo:bos|>'
        """
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside the tokenizer's vocabulary of {self.vocab_size}.")
        return b"".join(self.token_bytes[i] for i in ids).decode("utf-8", errors="replace")

    @classmethod
    def load(cls, path):
        """Read a tokenizer.jsonl (fields after [piece, score, type] are ignored)."""
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no PLaMo tokenizer at {path}.")
        with open(path, "rb") as f:
            return cls.from_jsonl(f.read(), path)

    @classmethod
    def from_jsonl(cls, data, source="tokenizer.jsonl"):
        """The tokenizer of the bytes of a tokenizer.jsonl."""
        lines = data.split(b"\n")
        if lines[-1] == b"":  # the newline that ends the last line
            lines.pop()
        rows = []
        for n, line in enumerate(lines, 1):
            try:
                rows.append(json.loads(line.decode("utf-8")))
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise ValueError(f"{source} is not a PLaMo tokenizer: line {n} is not valid JSON.") from None
        tok = cls(rows, source)
        tok.files = {"tokenizer.jsonl": data}  # as read, byte for byte
        return tok


# -----------------------------------------------------------------------------------------------
# 3. A checkpoint's tokenizer: whichever it holds, with the files it came from.

# What a released checkpoint ships beside its weights and config.json: its tokenizer and the remote
# code that transformers, vLLM and llama.cpp's converter read. A stage that writes a checkpoint
# from a model carries these on byte for byte, so that the tools that loaded the source load it.
RELEASED_FILES = ["tokenizer.jsonl", "tokenizer_config.json", "special_tokens_map.json", "tokenization_plamo.py",
                  "modeling_plamo.py", "generation_config.json"]
OUR_FILES = ["tokenizer.tiktoken", "tokenizer.tiktoken.json"]


def load_tokenizer(path):
    """The tokenizer stored in a checkpoint directory: ours (tokenizer.tiktoken, from train.py) or
    PLaMo 2's own (tokenizer.jsonl, as in a downloaded pfnet/plamo-2-1b); both share one interface.
    tok.files holds the bytes of its files and of the rest of RELEASED_FILES the directory has."""
    ours = os.path.exists(os.path.join(path, "tokenizer.tiktoken"))  # ours wins where both are
    names = OUR_FILES + RELEASED_FILES[1:] if ours else RELEASED_FILES
    if not os.path.exists(os.path.join(path, names[0])):
        raise FileNotFoundError(f"{path} has no tokenizer (expected tokenizer.tiktoken or tokenizer.jsonl)")
    if ours and not os.path.exists(os.path.join(path, "tokenizer.tiktoken.json")):
        raise FileNotFoundError(f"no tokenizer at {path}: tokenizer.tiktoken.json is missing beside tokenizer.tiktoken")
    files = {}
    for name in names:
        if os.path.isfile(os.path.join(path, name)):
            with open(os.path.join(path, name), "rb") as f:
                files[name] = f.read()
    return tokenizer_from_files(files, path)


def tokenizer_from_files(files, source=""):
    """The tokenizer of {file name: bytes}, as load_tokenizer read them (tok.files)."""
    if "tokenizer.tiktoken" in files:
        tok = Tokenizer.from_files(files, os.path.join(source, "tokenizer.tiktoken"))
    else:
        tok = PlamoTokenizer.from_jsonl(files["tokenizer.jsonl"], os.path.join(source, "tokenizer.jsonl"))
    tok.files = dict(files)
    return tok


def fingerprint(tok):
    """sha256 of the vocabulary's own files: equal exactly when two tokenizers map text to the same ids."""
    h = hashlib.sha256()
    for name in ("tokenizer.tiktoken", "tokenizer.tiktoken.json", "tokenizer.jsonl"):
        if name in tok.files:
            h.update(name.encode() + b"\0" + tok.files[name])
    return h.hexdigest()


def save_tokenizer(tok, path):
    """Write tok.files into the directory path."""
    for name, data in tok.files.items():
        with open(os.path.join(path, name), "wb") as f:
            f.write(data)


def special_token_ids(tok):
    """The config.json entries naming tok's special tokens. Tools that read only the config
    (vLLM, mlx-lm, transformers) stop and pad on these ids, so a saved config must carry them.

    >>> special_token_ids(tok)  # tok as in Tokenizer's example: the special tokens follow the 256 bytes
    {'bos_token_id': 256, 'eos_token_id': 257, 'pad_token_id': 258}
    """
    return {"bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id, "pad_token_id": tok.pad_id}


def token_bytes(tok):
    """UTF-8 bytes of every token id, 0 for special tokens: the denominator of bits per byte.
    Both tokenizers (ours and PlamoTokenizer) list each id's bytes in tok.token_bytes.

    >>> nbytes = token_bytes(tok)
    >>> nbytes[tok.bos_id].item(), nbytes[tok.encode("東京")].sum().item()  # 東京: 6 bytes however split
    (0, 6)
    """
    n = torch.tensor([len(b) for b in tok.token_bytes])
    n[list(tok.special.values())] = 0
    return n


# -----------------------------------------------------------------------------------------------
# 4. The chat template. Ours: PLaMo 2's instruct template is not public. A conversation is BOS, then
# each message as its role's marker, its text and the end-of-message marker; SFT trains on the
# assistant's text and end marker only. Our tokenizer reserves a special token per role and
# <|plamo:msg|> to end a message; the released vocabulary has none of them, so with it a role
# is <|plamo:op|> and the role's name on a line (as plamo-2-translate marks its sections), and
# a message ends with EOS.

CHAT_ROLES = ("system", "user", "assistant")
CHAT_TEMPLATE = "plamo2-minimal-v1"  # what a chat model's config.json names (chat_template)


def chat_markers(tok):
    """({role: ids that open its message}, id that ends a message)."""
    if all(f"<|plamo:{r}|>" in tok.special for r in CHAT_ROLES) and "<|plamo:msg|>" in tok.special:
        return {r: [tok.special[f"<|plamo:{r}|>"]] for r in CHAT_ROLES}, tok.special["<|plamo:msg|>"]
    if "<|plamo:op|>" not in tok.special:
        raise ValueError("this tokenizer has neither chat special tokens nor <|plamo:op|>: it cannot render a chat")
    return {r: [tok.special["<|plamo:op|>"]] + tok.encode(r + "\n") for r in CHAT_ROLES}, tok.eos_id


def render_chat(tok, messages, generation_prompt=False):
    """(ids, mask) of a conversation [{"role": ..., "content": ...}, ...]: mask[i] is True where
    ids[i] is an assistant's text or its end marker (what SFT learns). generation_prompt=True
    appends the assistant's opening marker, where a chat model continues.

    >>> tok = Tokenizer({bytes([b]): b for b in range(256)})
    >>> ids, mask = render_chat(tok, [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}])
    >>> tok.decode(ids)
    '<|plamo:bos|><|plamo:user|>Hi<|plamo:msg|><|plamo:assistant|>Yo<|plamo:msg|>'
    >>> tok.decode([i for i, m in zip(ids, mask) if m])
    'Yo<|plamo:msg|>'
    """
    opening, end = chat_markers(tok)
    ids, mask = [tok.bos_id], [False]
    for m in messages:
        if m.get("role") not in opening or not isinstance(m.get("content"), str):
            raise ValueError(f"a chat message is {{'role': one of {', '.join(CHAT_ROLES)}, 'content': text}}, got {m!r}")
        text = tok.encode(m["content"]) + [end]
        ids += opening[m["role"]] + text
        mask += [False] * len(opening[m["role"]]) + [m["role"] == "assistant"] * len(text)
    if generation_prompt:
        ids += opening["assistant"]
        mask += [False] * len(opening["assistant"])
    return ids, mask


def parse_chat(tok, ids):
    """The messages of render_chat's ids (a last message without its end marker, as a cut-off
    answer, is kept as it is). Text is split at the marker ids, never at characters that look
    like markers; with the released vocabulary a text that spells "<|plamo:op|>" encodes as that
    marker (as in its reference tokenizer), so such texts do not round trip there."""
    opening, end = chat_markers(tok)
    ids = ids[1:] if ids[:1] == [tok.bos_id] else ids
    messages, i = [], 0
    while i < len(ids):
        role = next((r for r, o in opening.items() if ids[i:i + len(o)] == o), None)
        if role is None:
            raise ValueError(f"token {i} of the conversation is not the start of a message")
        i += len(opening[role])
        j = ids.index(end, i) if end in ids[i:] else len(ids)
        messages.append({"role": role, "content": tok.decode(ids[i:j])})
        i = j + 1
    return messages
