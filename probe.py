"""
probe.py: the long-context recall probe. Can a model look up a key stated far back?

    python probe.py --ckpt out/long-context/B/ckpt [--split train] [--lengths 256,512,1024] [--json results.json]

Each probe document holds K tags "【<name><code>】" / "[<name><code>]" (corpus.py: family names no
training document uses as keys, 2-digit codes none uses as answers, all distinct) at random places
among ordinary lines; each key in turn is then asked by opening its tag again on a new line,
"【<name>", and the greedy continuation must start with exactly its code. Attention sees a code
within its window; beyond it only the Mamba state (and full-attention layers) can. It prints
accuracy by document length and by distance from the code to the question, with validation bits
per byte beside it: what the model costs on ordinary text.
"""
import argparse
import json
import random
import re
import sys

import corpus
import infer
from common import Progress, atomic_write_text, check_output, cli, nonneg_int, positive_int, resolve_device, resolve_dtype
from plamo2 import bits_per_byte, find_checkpoint, generate_text, position_limit
from tokenizer import token_bytes


PROBE_LENGTHS = (256, 512, 1024, 2048, 4096)


def recall_example(tok, w, rng, lang, length, k, heldout=True):
    """One probe document of at most `length` tokens with any of its questions (so that a model
    trained on `length` positions sees none beyond), in tokens: (context ids starting with BOS,
    [(question ids, code, distance)] for its k keys). Appending a key's question to the context
    gives its prompt, whose last token must look back `distance` tokens to the code's first
    token (so the code is inside a window W when distance <= W). A statement is its question's
    tokens followed by the code's, so that the question is exactly what was written before.
    heldout=False takes the names and codes of the training documents instead of the probe's."""
    keys = corpus.recall_keys(rng, lang, k, probe=heldout)
    questions = [tok.encode(q) for q, _, _ in keys]
    statements = [ids + tok.encode(a) for ids, (_, a, _) in zip(questions, keys)]
    room = length - 1 - max(map(len, questions)) - sum(map(len, statements))
    lines, n, source = [], 0, corpus.filler_lines(w, rng, lang)
    while True:
        ids = tok.encode(next(source))
        if n + len(ids) > room:
            break
        lines.append(ids)
        n += len(ids)
    places = sorted((rng.randint(0, len(lines)), i) for i in range(k))  # a statement goes before line `place`
    context, codes, line = [tok.bos_id], [0] * k, 0  # codes[i]: where key i's code starts
    for place, i in places + [(len(lines), None)]:
        for ids in lines[line:place]:
            context += ids
        line = max(line, place)
        if i is not None:
            codes[i] = len(context) + len(questions[i])
            context += statements[i]
    asks = [(questions[i], keys[i][2], len(context) + len(questions[i]) - 1 - codes[i]) for i in range(k)]
    return context, asks


def recall_answer(text):
    """The digits a continuation starts with (after spaces), or None.

    >>> recall_answer("48】\\n【佐藤"), recall_answer(" 48"), recall_answer(" code 48")
    ('48', '48', None)
    """
    m = re.match(r" *(\d+)", text)
    return m.group(1) if m else None


def distance_bucket(d, window):
    """The probe's distance groups, by the attention window W: inside it, then beyond, doubling.

    >>> [distance_bucket(d, 128) for d in (1, 128, 129, 256, 257)]
    ['1-128 (inside the window)', '1-128 (inside the window)', '129-256', '129-256', '257-512']
    """
    if d <= window:
        return f"1-{window} (inside the window)"
    lo = window
    while d > 2 * lo:
        lo *= 2
    return f"{lo + 1}-{2 * lo}"


def recall_probe(answer, tok, window, lengths=PROBE_LENGTHS, keys=4, docs=6, seed=0, split="heldout"):
    """Score answer(prompt ids) -> continuation text on the probe: docs documents per length
    (alternately Japanese and English), each key asked once; each document drawn from its own
    seed, so that it does not depend on the other lengths asked for. split "heldout" asks the
    probe's own names and codes, "train" those of the training documents (a fresh assignment in
    every document: still nothing to remember, but keys and codes the model has seen as such).
    Returns a dict with per-prompt "results" and accuracy [correct, asked] "by_length" and
    "by_distance"."""
    w = corpus.build_world(1337)
    results, p = [], Progress("recall probe", len(lengths) * docs * keys, "questions")
    for length in lengths:
        for d in range(docs):
            lang = "ja" if d % 2 == 0 else "en"
            rng = random.Random(f"probe/{seed}/{length}/{d}")
            context, asks = recall_example(tok, w, rng, lang, length, keys, heldout=split == "heldout")
            for question, code, distance in asks:
                text = answer(context + question)
                results.append({"length": length, "lang": lang, "tokens": len(context) + len(question),
                                "distance": distance, "code": code, "answer": text,
                                "correct": recall_answer(text) == code})
                p.update()
    p.done()
    by_length, by_distance = {}, {}
    for r in results:
        for table, key in ((by_length, r["length"]), (by_distance, distance_bucket(r["distance"], window))):
            table.setdefault(key, [0, 0])
            table[key][0] += r["correct"]
            table[key][1] += 1
    by_distance = dict(sorted(by_distance.items(), key=lambda kv: int(kv[0].split("-")[0])))
    return {"keys": keys, "docs": docs, "seed": seed, "split": split, "window": window, "results": results,
            "by_length": by_length, "by_distance": by_distance}


def greedy_answer(model, tok, max_new_tokens=8):
    """answer() for recall_probe: the model's greedy continuation of a prompt, as text."""
    return lambda ids: generate_text(model, tok, [ids], max_new_tokens)[0][0]


def print_probe(probe, config):
    k = probe["keys"]
    print(f"recall probe: {probe['docs']} documents per length (Japanese and English in turn), {k} keys each, "
          f"every key asked once; seed {probe['seed']}")
    print("keys: " + ("held out (names never used as keys in training, codes never used as answers)"
                      if probe["split"] == "heldout" else "the training documents' names and codes, a fresh code per document"))
    print(f"chance: {100 / k:.1f}% for copying one of the document's {k} codes, {100 / 90:.1f}% for guessing 2 digits")
    limit = position_limit(config)
    print(f"{'length (tokens)':>32} {'accuracy':>9} {'asked':>6}")
    for length, (right, n) in probe["by_length"].items():
        note = "  (beyond max_position_embeddings)" if limit and length > limit else ""
        print(f"{length:>32} {100 * right / n:>8.1f}% {n:>6}{note}")
    print(f"{'distance from code to question':>32} {'accuracy':>9} {'asked':>6}")
    for bucket, (right, n) in probe["by_distance"].items():
        print(f"{bucket:>32} {100 * right / n:>8.1f}% {n:>6}")


def default_lengths(args, cfg):
    """--lengths, or PROBE_LENGTHS up to what the model can address: a model with full attention
    was trained on positions up to max_position_embeddings only (Mamba + windows have no limit)."""
    if args.lengths is not None:
        return args.lengths
    if position_limit(cfg) is None:
        return list(PROBE_LENGTHS)
    lengths = [n for n in PROBE_LENGTHS if n <= cfg.max_position_embeddings]
    if len(lengths) < len(PROBE_LENGTHS):
        print(f"probe lengths up to {cfg.max_position_embeddings}: the model's max_position_embeddings, past which "
              f"its full-attention layers were never trained (--lengths asks for others)", file=sys.stderr)
    return lengths or [cfg.max_position_embeddings]


# -----------------------------------------------------------------------------------------------

def parse_args(argv=None):
    ap = argparse.ArgumentParser(description="The long-context recall probe: accuracy of looking up keys stated at "
                                             "controlled distances, by document length and by distance.",
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--ckpt", required=True, help="the checkpoint to probe (ours, quantized, or a released PLaMo 2)")
    ap.add_argument("--lengths", help="probe document lengths in tokens (default 256,512,...,4096, up to what the model "
                                      "can address)")
    ap.add_argument("--keys", type=positive_int, default=4, help="keys per probe document")
    ap.add_argument("--docs", type=positive_int, default=6, help="probe documents per length")
    ap.add_argument("--split", choices=["heldout", "train"], default="heldout",
                    help="heldout: names and codes no training document uses as keys and answers; "
                         "train: those the training documents use, a fresh code per document")
    ap.add_argument("--seed", type=nonneg_int, default=0, help="picks the documents")
    ap.add_argument("--seq-len", type=positive_int, help="windows of this many tokens for validation bits per byte "
                                                         "(default: the length the checkpoint was trained with)")
    ap.add_argument("--bench-data", help="validation text for bits per byte: data prepared by data.py, one .bin shard "
                                         "of it, or a UTF-8 text file (default: the checkpoint's own text)")
    ap.add_argument("--bench-tokens", type=positive_int, default=32768, help="validation tokens for bits per byte")
    ap.add_argument("--json", help="write the results (every prompt and its answer) to this file")
    ap.add_argument("--device", default="auto", help="auto, cpu, cuda, mps")
    ap.add_argument("--dtype", default="auto", help="auto (bf16 on CUDA, fp32 elsewhere), float32, bfloat16")
    # the names these flags had under infer.py --probe
    for old, new, kind in (("--probe-lengths", "lengths", str), ("--probe-keys", "keys", positive_int),
                           ("--probe-docs", "docs", positive_int), ("--probe-split", "split", str)):
        ap.add_argument(old, dest=new, type=kind, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.lengths is not None:
        try:
            args.lengths = [int(x) for x in args.lengths.split(",")]
        except ValueError:
            ap.error(f"--lengths takes token counts separated by commas, got {args.lengths!r}")
        if min(args.lengths) < 64:
            ap.error("--lengths must be 64 tokens or more")
    if args.split not in ("heldout", "train"):
        ap.error("--split is heldout or train")
    heldout = args.split == "heldout"
    keys = min(len(corpus.recall_names(heldout)), len(corpus.recall_codes(heldout)))
    if args.keys > keys:
        ap.error(f"need --probe-keys from 1 to {keys}")
    return args


def main(argv=None):
    args = parse_args(argv)
    return cli(lambda: run(args))


def run(args):
    src = find_checkpoint(args.ckpt)
    if args.json:
        check_output(args.json, "--json", [("--ckpt", src)], kind="file")
    device = resolve_device(args.device)
    model, tok = infer.load(src, device, resolve_dtype(args.dtype, device))
    cfg = model.config
    tokens, where = infer.validation_tokens(args, tok)
    if tokens is not None:  # what the model costs on ordinary text, beside what it recalls; first,
        seq_len = args.seq_len or infer.training_seq_len(src, cfg)  # so that an error here loses nothing
        bpb = bits_per_byte(model, tokens, token_bytes(tok), seq_len, args.bench_tokens)
    probe = recall_probe(greedy_answer(model, tok), tok, cfg.attention_window_size, default_lengths(args, cfg),
                         args.keys, args.docs, args.seed, args.split)
    print_probe(probe, cfg)
    if tokens is not None:
        probe.update(val_bpb=bpb, val_seq_len=seq_len)
        print(f"validation bits per byte, windows of {seq_len} tokens of {where}: {bpb:.4f}")
    if args.json:
        atomic_write_text(args.json, json.dumps({"ckpt": args.ckpt, **probe}, ensure_ascii=False, indent=1))
    return probe


if __name__ == "__main__":
    main()
