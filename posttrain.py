"""
posttrain.py: post-training a PLaMo 2 checkpoint (ours, or a released one) into a chat model, as
PLaMo 2 does: supervised fine-tuning in a chat template, then preference optimization (DPO) on
the model's own answers. Two stories, each through loop.fit with its own loss.

    python posttrain.py sft   --ckpt out/posttrain/base/ckpt --data out/posttrain/data --out out/posttrain/sft
    python posttrain.py pairs --ckpt out/posttrain/sft/ckpt --out pairs.jsonl
    python posttrain.py dpo   --ckpt out/posttrain/sft/ckpt --out out/posttrain/dpo [--rounds 3 | --data pairs.jsonl]
    python posttrain.py sft   --ckpt plamo-2-1b --data my_conversations.jsonl --out out/my-sft

The instruction data and evaluation are in tasks.py (python tasks.py data / eval), merging in
merge.py.

1. sft: conversations in the chat template (tokenizer.render_chat), packed into rows whose
   conversations (seq_idx) do not see each other; the loss on the assistants' tokens only.
2. pairs: the chat model answers training prompts several times, the verifier (tasks.py) labels
   each answer, and an accepted one is preferred to a rejected one; plus pairs that prefer the
   form and language an instruction asked for.
3. dpo: the DPO loss against a frozen copy of the starting model (its log-probs computed once);
   --rounds samples new pairs from each round's policy (iterative DPO).
"""
import argparse
import collections
import copy
import json
import math
import os
import random
import re
import sys
import time

import torch
import torch.nn.functional as F

import data
import merge
import tasks
import runs
import train
from common import (autocast, check_output, cli, nonneg_float, nonneg_int, positive_float, positive_int, unit_float,
                    write_jsonl)
from loop import LOOP_DEFAULTS, Loop, add_loop_arguments, check_memory, fit, loop_defaults
from plamo2 import bits_per_byte, pretraining_peak, token_losses
from tasks import is_chat, read_jsonl, valid_messages, verify
from tokenizer import CHAT_TEMPLATE, render_chat, token_bytes


# Learning rates for a model without lineage, by the preset nearest its size. tiny: what the
# experiments here measured (a third and a thirtieth of the 3e-3 pre-training peak); 1b and 8b: the
# published recipes for models of that size (Zephyr 7B and Tulu 3 8B SFT 2e-5 / 5e-6, DPO 5e-7;
# we take the middle); small: between the two.
SFT_LR = {"tiny": 1e-3, "small": 1e-4, "1b": 2e-5, "8b": 1e-5}
DPO_LR = {"tiny": 1e-4, "small": 1e-5, "1b": 1e-6, "8b": 5e-7}
SFT_EPOCHS = {"tiny": 6.0, "small": 3.0, "1b": 2.0, "8b": 2.0}  # tiny: measured (EXPERIMENTS.md); larger: published


def size_rules(source):
    """The loop's sizes for a stage on a checkpoint no training run made (a released model, a
    merge): the nearest preset's sequence length and micro-batch, and batches of at most 64
    sequences."""
    size = runs.nearest_size(source.params)
    p = train.TRAIN_PRESETS[size]
    why = f"the {size} preset's (the nearest in size; not made by a training run)"
    return size, {"seq_len": (p["seq_len"], why), "micro_batch": (p["micro_batch"], why),
                  "batch_tokens": (min(p["batch_tokens"], 64 * p["seq_len"]), f"{why}, at most 64 sequences")}


# -----------------------------------------------------------------------------------------------
# 1. sft: the shared loop, with a loss on the assistants' tokens only.

def read_conversations(path):
    """The "messages" lists of a JSONL file (or of DIR/train.jsonl), each checked by render_chat's
    rules and holding an assistant's message (what SFT learns); one clear error naming the line."""
    if os.path.isdir(path):
        path = os.path.join(path, "train.jsonl")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--data: no conversations at {path} (a JSONL file, or a directory with train.jsonl)")
    convs = []
    for n, row in enumerate(read_jsonl(path), 1):
        msgs = row.get("messages") if isinstance(row, dict) else None
        if not valid_messages(msgs):
            raise ValueError(f"{path}: conversation {n} is not {{\"messages\": [{{\"role\": system|user|assistant, "
                             f"\"content\": text}}, ...]}}" + (" (this looks like pre-training text: give it to "
                                                              "train.py --data)" if isinstance(row, dict) and "text" in row else ""))
        convs.append(msgs)
    for n, msgs in enumerate(convs, 1):
        if not any(m["role"] == "assistant" for m in msgs):
            raise ValueError(f"{path}: conversation {n} has no assistant message, so nothing to learn from")
    if len(convs) < 2:
        raise ValueError(f"{path} holds {len(convs)} conversation(s); SFT needs at least 2 (one is kept for validation)")
    return convs


def pack(tok, conversations, seq_len):
    """Conversations in the chat template, packed into rows of seq_len + 1 tokens in the order
    given: (x, y, seq_idx) as (n, seq_len) tensors. y is -1 except where the next token is an
    assistant's (render_chat's mask); seq_idx numbers the conversations of a row, so that Mamba
    states restart and attention stops at each (the padding at a row's end is one more). A
    conversation longer than a row is cut to it. Returns (x, y, seq_idx, conversations cut)."""
    rows, ids, mask, doc, cut = [], [], [], [], 0

    def flush():
        if ids:
            n = seq_len + 1 - len(ids)
            rows.append((ids + [tok.pad_id] * n, mask + [False] * n, doc + [doc[-1] + 1] * n))
    for msgs in conversations:
        i, m = render_chat(tok, msgs)
        if len(i) > seq_len + 1:
            i, m, cut = i[:seq_len + 1], m[:seq_len + 1], cut + 1
        if len(ids) + len(i) > seq_len + 1:
            flush()
            ids, mask, doc = [], [], []
        d = doc[-1] + 1 if doc else 0
        ids, mask, doc = ids + i, mask + m, doc + [d] * len(i)
    flush()
    t = torch.tensor([r[0] for r in rows])                                         # (n, seq_len + 1)
    m = torch.tensor([r[1] for r in rows])
    s = torch.tensor([r[2] for r in rows])
    return t[:, :-1], torch.where(m[:, 1:], t[:, 1:], -1), s[:, :-1], cut


class SFT:
    """The SFT stage for loop.fit: packed rows in a shuffled order per epoch (seeded, so the
    step is all a resume needs), cross-entropy on the assistants' tokens; fit normalizes it by
    their count over the whole step. Evaluated by the same loss on held-out conversations."""

    def __init__(self, tok, conversations, seq_len, seed, micro_batch, run):
        self.run, self.mb = run, micro_batch
        convs = list(conversations)
        random.Random(f"sft/{seed}").shuffle(convs)
        n_val = max(1, min(256, len(convs) // 20))
        self.x, self.y, self.s, cut = pack(tok, convs[n_val:], seq_len)
        self.val = pack(tok, convs[:n_val], seq_len)[:3]
        targets = (self.y != -1).sum().item()
        run.log(f"sft data: {len(convs) - n_val} conversations in {len(self.x)} rows of {seq_len} tokens "
                f"({targets:,} assistant tokens), {n_val} for validation" + (f"; {cut} cut to the row length" if cut else ""))
        if targets == 0:
            raise ValueError(f"no assistant token is left to train on (every assistant message lies beyond the "
                             f"{seq_len}-token rows): give a longer --seq-len, or shorter conversations")
        self.order = data.EpochOrder(len(self.x), seed)

    def batch(self, first, count, device):
        idx = torch.tensor([self.order(g) for g in range(first, first + count)])
        return self.x[idx].to(device), self.y[idx].to(device), self.s[idx].to(device)

    def loss(self, model, batch):
        x, y, s = batch
        logits, _ = model(x, seq_idx=s)
        return token_losses(logits, y).sum(), (y != -1).sum(), {}

    @torch.no_grad()
    def evaluate(self, model, step):
        """Validation loss in nats per assistant token (every process takes the same passes)."""
        run, mb = self.run, self.mb
        was_training = model.training
        model.eval()
        total = torch.zeros(2, device=run.device, dtype=torch.float64)
        n = len(self.val[0])
        for first in range(run.rank * mb, max(n, run.world * mb), run.world * mb):
            rows = torch.arange(first, first + mb)
            x, y, s = (t[rows % n].to(run.device) for t in self.val)
            y[rows >= n] = -1  # rows past the end only keep the passes equal on every process (FSDP)
            with autocast(run.device, run.dtype):
                loss, terms, _ = self.loss(model, (x, y, s))
            total += torch.stack([loss.double(), terms.double()])
        if run.world > 1:
            torch.distributed.all_reduce(total)
        model.train(was_training)
        return {"val_loss": (total[0] / total[1].clamp(min=1)).item()}


SFT_DEFAULTS = dict(epochs=None, data=None)


def sft_settings(args):
    """(Start or None, train state or None, lineage of a resumed run, conversations). A resumed run
    has its own settings. A new one takes the loop's settings from its checkpoint's lineage and a
    third of the peak learning rate there (the experiments' choice: a tenth and two epochs left the
    model half-trained); without lineage the sizes of the preset nearest the model and SFT_LR. It
    runs --epochs (SFT_EPOCHS by size) over the packed rows unless --max-steps, evaluating 4 times."""
    if args.resume:
        runs.claim(args.out, resume=True)
        path, lineage, state, changed = runs.resume(args, {**LOOP_DEFAULTS, **SFT_DEFAULTS})
        print(f"resuming {path} at step {state['step']}" + (f", except {', '.join(changed)}" if changed else ""))
        return None, state, lineage, read_conversations(args.data)
    source = runs.start_from(args.ckpt)
    runs.claim(args.out, [("--ckpt", source.path), ("--data", args.data)], overwrite=bool(args.overwrite))
    conversations = read_conversations(args.data)
    args.data = os.path.abspath(args.data)
    size, rules = size_rules(source)
    if "loop" in source.lineage:
        rules = {}  # the loop's sizes are inherited from the run that made it
    peak = pretraining_peak(source.lineage)
    rules["lr"] = ((peak / 3, f"a third of its pre-training's peak {peak:g}") if peak is not None else
                   (SFT_LR[size], f"SFT's rate for a model of the {size} preset's size (not pre-trained here)"))
    defaults = loop_defaults(source, rules)
    defaults["epochs"] = (SFT_EPOCHS[size], f"for the {size} size")
    lines = runs.settle(args, {k: v for k, v in defaults.items() if k not in ("max_steps", "eval_every")})
    # Rows per epoch, counted as SFT will pack them (all conversations, the validation share included).
    rows = len(pack(tokenizer_of(source.path), conversations, args.seq_len)[0])
    steps = max(1, math.ceil(args.epochs * rows * args.seq_len / args.batch_tokens))
    lines += runs.settle(args, {"max_steps": (steps, f"{args.epochs:g} epochs of {rows} packed rows"),
                                 "eval_every": (max(1, (args.max_steps or steps) // 4), "4 evaluations")})[-1:]
    print(f"sft: from {source.describe()} -> {args.out}\n" + "\n".join(lines))
    return source, None, None, conversations


def tokenizer_of(path):
    from tokenizer import load_tokenizer
    return load_tokenizer(path)


def sft(args):
    source, state, lineage, conversations = sft_settings(args)
    run = runs.start_processes(args)
    args.resume_command = f"python posttrain.py sft --out {args.out} --resume"
    model, tok = runs.load_checkpoint(os.path.join(args.out, "ckpt") if state is not None else source.path, run.device)
    model.config.chat_template = CHAT_TEMPLATE  # the saved config says: a chat model, in this template
    stage = SFT(tok, conversations, args.seq_len, args.seed, args.micro_batch, run)
    first = None
    if state is None:
        first = stage.evaluate(model, 0)
        run.log(f"before SFT: val_loss {first['val_loss']:.4f}")
        lineage = {"stage": "sft", "parent": source.path, "history": runs.history(source),
                   "text": source.lineage.get("text"), "instructions": args.data,
                   "pretrain_lr": pretraining_peak(source.lineage),
                   "settings": {k: getattr(args, k) for k in SFT_DEFAULTS}}
    fit(model, stage, Loop.from_args(args), tok, run, lineage, state, first)
    ckpt = os.path.join(args.out, "ckpt")
    run.log(f"next: python infer.py --ckpt {ckpt} --chat | python tasks.py eval --ckpt {ckpt} | "
            f"python posttrain.py dpo --ckpt {ckpt} --out <dir>")
    runs.end_processes(run)


# -----------------------------------------------------------------------------------------------
# 2. pairs: preferences between the chat model's own answers, judged by the verifier.

CHATTY = {"ja": "ほかにも質問があればどうぞ。", "en": " Let me know if you have another question."}


def form_rejected(facts, ex):
    """The right value in the wrong form, for a format example: in the other language, with more
    than the answer, or a list's values run into one sentence."""
    kind, lang = ex["kind"], ex["lang"]
    if kind == "list":
        values = [c["forms"][0] for c in ex["check"]["items"]]
        return "、".join(values) + "です。" if lang == "ja" else ", ".join(values) + "."
    f = facts[ex["fact"]]
    if kind == "short":
        return tasks.short_answer(f, lang) + CHATTY[lang]
    return tasks.short_answer(f, "ja" if kind == "english" else "en")


def make_pairs(model, tok, data, args, seed):
    """Preference pairs {"task", "lang", "source", "prompt": messages, "chosen", "rejected"}:
    args.prompts training prompts of data, args.samples answers each sampled from model at
    args.temperature, an accepted answer against a rejected one ("policy"); where every sample
    is rejected, the reference answer is chosen ("reference", args.all_wrong == "reference") or
    the prompt dropped; where every sample is accepted there is nothing to prefer. Then
    args.form_pairs pairs from the format examples, the answer in the form asked against the
    same value in another ("form"). Returns (pairs, {task: counts})."""
    if not is_chat(model):
        raise ValueError("pairs are sampled in the chat template: --ckpt must be a chat model (an SFT run's)")
    examples = read_jsonl(os.path.join(data, "train.jsonl"))
    if not all("check" in ex for ex in examples):
        raise ValueError(f"{data}/train.jsonl has examples without a check: pairs need the data `posttrain.py data` wrote")
    with open(os.path.join(data, "facts.json"), encoding="utf-8") as f:
        facts = {g["id"]: g for s in json.load(f)["sets"].values() for g in s}
    rng = random.Random(f"pairs/{seed}")
    picked = rng.sample(examples, min(args.prompts, len(examples)))
    asked = [{**ex, "messages": ex["messages"][:-1]} for ex in picked]
    outs = tasks.answers(model, tok, asked, {}, max_new=args.max_new_tokens, temperature=args.temperature,
                         samples=args.samples, seed=seed, what="sampling answers")
    pairs, tally = [], collections.defaultdict(collections.Counter)

    def add(ex, chosen, rejected, source):
        pairs.append({"task": ex["task"], "lang": ex["lang"], **({"kind": ex["kind"]} if "kind" in ex else {}),
                      "source": source, "prompt": ex["messages"][:-1], "chosen": chosen, "rejected": rejected})
        tally[ex["task"]][source] += 1
    for ex, samples in zip(picked, outs):
        ok = [verify(ex["check"], s)["ok"] for s in samples]
        right = [s for s, good in zip(samples, ok) if good]
        wrong = [s for s, good in zip(samples, ok) if not good]
        tally[ex["task"]]["prompts"] += 1
        if not wrong:
            tally[ex["task"]]["all right"] += 1
        elif right:
            add(ex, right[0], wrong[0], "policy")
        else:
            tally[ex["task"]]["all wrong"] += 1
            if args.all_wrong == "reference":
                add(ex, ex["messages"][-1]["content"], wrong[0], "reference")
    formats = [ex for ex in examples if ex["task"] == "format" and ("fact" in ex or ex["kind"] == "list")]
    for ex in rng.sample(formats, min(args.form_pairs, len(formats))):
        chosen, rejected = ex["messages"][-1]["content"], form_rejected(facts, ex)
        if verify(ex["check"], chosen)["ok"] and not verify(ex["check"], rejected)["form"]:
            add(ex, chosen, rejected, "form")
    return pairs, tally


def add_pair_arguments(p, defaults):
    """The sampling flags of `pairs`, shared by `dpo` (where defaults is {}: settled later)."""
    d = defaults.get
    p.add_argument("--prompts", type=positive_int, default=d("prompts"), help="training prompts asked (default 1024)")
    p.add_argument("--samples", type=positive_int, default=d("samples"), help="answers sampled per prompt (default 4)")
    p.add_argument("--temperature", type=nonneg_float, default=d("temperature"), help="sampling temperature (default 1.0)")
    p.add_argument("--max-new-tokens", type=positive_int, default=d("max_new_tokens"),
                   help="longest answer in tokens (default 48)")
    p.add_argument("--all-wrong", choices=["reference", "drop"], default=d("all_wrong"),
                   help="a prompt whose samples are all rejected: its reference answer is chosen (default), or drop it")
    p.add_argument("--form-pairs", type=nonneg_int, default=d("form_pairs"),
                   help="pairs that prefer the form and language asked for over the same value in another (default 256)")


def print_pairs(pairs, tally, path):
    print(f"wrote {path}: {len(pairs)} pairs")
    print(f"{'task':<12}{'prompts':>8}{'all right':>10}{'all wrong':>10}{'policy':>8}{'reference':>10}{'form':>6}")
    for task, t in tally.items():
        print(f"{task:<12}" + "".join(f"{t[k]:>{w}}" for k, w in (("prompts", 8), ("all right", 10), ("all wrong", 10),
                                                                  ("policy", 8), ("reference", 10), ("form", 6))))


def read_pairs(path):
    """Pairs from a JSONL file, each {"prompt": [messages ending with the user's], "chosen": text,
    "rejected": text} (other keys are kept and ignored)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--data: no preference pairs at {path} (a JSONL file that `posttrain.py pairs` writes)")
    pairs = read_jsonl(path)
    for n, p in enumerate(pairs, 1):
        msgs = p.get("prompt") if isinstance(p, dict) else None
        if not (isinstance(msgs, list) and msgs and all(isinstance(m, dict) and isinstance(m.get("content"), str)
                                                          and m.get("role") in ("system", "user", "assistant") for m in msgs)
                and msgs[-1]["role"] == "user" and isinstance(p.get("chosen"), str) and isinstance(p.get("rejected"), str)):
            raise ValueError(f"{path}: pair {n} is not {{\"prompt\": [{{\"role\", \"content\"}}, ..., a user's message], "
                             f"\"chosen\": text, \"rejected\": text}}")
    if len(pairs) < 2:
        raise ValueError(f"{path} holds {len(pairs)} pair(s); DPO needs at least 2 (one is kept for validation)")
    return pairs


def instruction_dir(source, given):
    """The instruction data (`tasks.py data`'s directory) whose training prompts pairs are asked
    from: given, or what the checkpoint's lineage records; one clear error if there is none."""
    path = given or source.lineage.get("instructions") or ""
    path = path if os.path.isdir(path) else os.path.dirname(path)
    if not os.path.isfile(os.path.join(path, "train.jsonl")) or not os.path.isfile(os.path.join(path, "facts.json")):
        raise FileNotFoundError("pairs are labelled by the verifier, so they need the instruction data `tasks.py data` "
                                "wrote (train.jsonl with checks, facts.json): give --data that directory"
                                + ("" if given else f"; {source.path} records none") + " (or give dpo --data pairs)")
    return path


def pairs_command(args):
    source = runs.start_from(args.ckpt)
    check_output(args.out, "--out", [("--ckpt", source.path), ("--data", args.data)], kind="file")
    if os.path.exists(args.out):
        raise ValueError(f"--out {args.out} exists; give a new file")
    instructions = instruction_dir(source, args.data)
    if source.config.chat_template != CHAT_TEMPLATE:
        raise ValueError("pairs are sampled in the chat template: --ckpt must be a chat model (an SFT run's)")
    model, tok = runs.load_checkpoint(source.path, resolve(args.device))
    t0 = time.time()
    pairs, tally = make_pairs(model, tok, instructions, args, args.seed)
    write_jsonl(args.out, pairs)
    print_pairs(pairs, tally, args.out)
    print(f"{args.samples} samples per prompt at temperature {args.temperature}, {time.time() - t0:.0f}s")
    print(f"next: python posttrain.py dpo --ckpt {args.ckpt} --data {args.out} --out <dir>")


def resolve(device):
    from common import resolve_device
    return resolve_device(device)


# -----------------------------------------------------------------------------------------------
# 3. dpo: direct preference optimization (Rafailov et al. 2023) through the shared loop.

def encode_pair(tok, pair, seq_len):
    """[(x, y) of chosen, (x, y) of rejected]: the prompt and the answer in the chat template, cut
    to seq_len + 1 tokens; y is the next token on the answer (its text and end marker) and -1 on
    the prompt, whose probability is the same under both models and cancels."""
    start = len(render_chat(tok, pair["prompt"], generation_prompt=True)[0])
    rows = []
    for answer in (pair["chosen"], pair["rejected"]):
        ids = render_chat(tok, pair["prompt"] + [{"role": "assistant", "content": answer}])[0][:seq_len + 1]
        rows.append((ids[:-1], [t if i >= start else -1 for i, t in enumerate(ids)][1:]))
    return rows


def collate(tok, rows, device):
    """(x, y) of rows [(x, y)], right-padded to the longest (a causal model never sees padding
    after a position); y is -1 on the padding."""
    T = max(len(x) for x, _ in rows)
    x = torch.full((len(rows), T), tok.pad_id)
    y = torch.full((len(rows), T), -1)
    for r, (xi, yi) in enumerate(rows):
        x[r, :len(xi)], y[r, :len(yi)] = torch.tensor(xi), torch.tensor(yi)
    return x.to(device), y.to(device)


def response_logps(model, x, y):
    """(b,) log π(answer | prompt) of each row: the log-probabilities of its targets (y != -1), summed."""
    logits, _ = model(x)                                                                       # (b, T, V)
    return -token_losses(logits, y).sum(-1)


def dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta, label_smoothing=0.0, kind="sigmoid"):
    """(loss, chosen reward, rejected reward) per pair, from the summed log-probs of the answers
    under the policy and the reference. The implicit reward of an answer is β·(log π - log π_ref);
    h is the chosen answer's log-ratio minus the rejected one's.
    sigmoid (DPO): -log σ(β·h). With label smoothing ε (conservative DPO: a label is wrong with
    probability ε): -(1 - ε)·log σ(β·h) - ε·log σ(-β·h). ipo (Azar et al. 2023): (h - 1/(2β))²,
    which stops pushing once the margin reaches 1/(2β) instead of driving it to infinity.

    >>> l, rw, rl = dpo_loss(torch.tensor([-1.]), torch.tensor([-3.]), torch.tensor([-2.]), torch.tensor([-2.]), 0.5)
    >>> round(l.item(), 4), rw.item(), rl.item()   # -log σ(0.5·((-1+2) - (-3+2))) = -log σ(1)
    (0.3133, 0.5, -0.5)
    """
    h = (chosen - ref_chosen) - (rejected - ref_rejected)
    if kind == "ipo":
        loss = (h - 1 / (2 * beta)) ** 2
    else:
        loss = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    return loss, beta * (chosen - ref_chosen).detach(), beta * (rejected - ref_rejected).detach()


def n_validation(n_pairs):
    return max(1, min(128, n_pairs // 10))


class DPO:
    """The DPO stage for loop.fit: pairs in a shuffled order per epoch, chosen and rejected
    answers in one forward pass, the loss per pair (fit averages it over the step's pairs).

    The reference model is the starting policy, frozen. Its log-probs of every pair are computed
    once, here, in eval mode without gradients (in args.ref_dtype): it never changes, so this
    equals running it beside the policy at every step, saves its forward pass there (a quarter
    of a step's compute), and it is not kept in memory while the policy trains. Evaluated on
    held-out pairs (loss, reward accuracy) and in bits per byte on pre-training's validation
    text: how far the policy drifts from the language model it came from."""

    rows_per_sequence = 2  # a chosen and a rejected row per pair, for fit's memory estimate

    def __init__(self, reference, tok, pairs, run, seq_len, micro_batch, seed, beta=0.1, label_smoothing=0.0,
                 loss="sigmoid", sft_weight=0.0, ref_dtype="float32", text=None, text_seq_len=512, eval_tokens=2**16):
        self.tok, self.run, self.mb = tok, run, micro_batch
        self.beta, self.label_smoothing, self.kind, self.sft_weight = beta, label_smoothing, loss, sft_weight
        self.text, self.text_seq_len, self.eval_tokens = text, text_seq_len, eval_tokens
        pairs = list(pairs)
        random.Random(f"dpo/{seed}").shuffle(pairs)
        n_val = n_validation(len(pairs))
        self.rows = [encode_pair(tok, p, seq_len) for p in pairs]
        self.chosen_tokens = torch.tensor([sum(t != -1 for t in rows[0][1]) for rows in self.rows]).clamp(min=1)
        check_memory(reference.config, seq_len, 2 * micro_batch, run)  # before the reference's passes
        reference = reference.to(getattr(torch, ref_dtype)).eval().requires_grad_(False)
        with torch.no_grad():
            ref = [self.logps(reference, list(range(i, min(i + micro_batch, len(pairs)))))
                   for i in range(0, len(pairs), micro_batch)]
        self.ref = torch.cat(ref, dim=1).float().cpu()                               # (2, n): chosen, rejected
        self.val_pairs, self.train_pairs = list(range(n_val)), list(range(n_val, len(pairs)))
        self.order = data.EpochOrder(len(self.train_pairs), seed)
        self.nbytes = token_bytes(tok)
        run.log(f"dpo data: {len(self.train_pairs)} pairs, {n_val} for validation; reference log-probs in {ref_dtype}: "
                f"chosen {self.ref[0].mean():.2f}, rejected {self.ref[1].mean():.2f} on average")

    def logps(self, model, idx):
        """(2, len(idx)) summed answer log-probs of pairs idx, chosen and rejected in one pass."""
        x, y = collate(self.tok, [self.rows[i][k] for k in (0, 1) for i in idx], next(model.parameters()).device)
        with autocast(self.run.device, self.run.dtype):
            return response_logps(model, x, y).view(2, len(idx))

    def batch(self, first, count, device):
        return [self.train_pairs[self.order(g)] for g in range(first, first + count)]

    def loss(self, model, idx):
        """The DPO loss of pairs idx; with sft_weight w, plus w times the chosen answer's negative
        log-likelihood per token (RPO, Pang et al. 2024: it keeps the chosen answer likely while the
        margin grows, against DPO lowering both)."""
        policy = self.logps(model, idx)                                               # (2, b)
        ref = self.ref[:, idx].to(policy.device)
        loss, rc, rr = dpo_loss(policy[0], policy[1], ref[0], ref[1], self.beta, self.label_smoothing, self.kind)
        if self.sft_weight:
            loss = loss - self.sft_weight * policy[0] / self.chosen_tokens[idx].to(policy.device)
        return loss.sum(), len(idx), {"reward_acc": (rc > rr).float().sum(), "margin": (rc - rr).sum(),
                                      "logp_chosen": policy[0].detach().sum(), "logp_rejected": policy[1].detach().sum()}

    @torch.no_grad()
    def evaluate(self, model, step):
        """Every process takes the same passes over the few held-out pairs (and the text): FSDP
        needs them all in each forward, and it costs little."""
        was_training = model.training
        model.eval()
        totals = torch.zeros(3)
        for i in range(0, len(self.val_pairs), self.mb):
            idx = self.val_pairs[i:i + self.mb]
            loss, n, m = self.loss(model, idx)
            totals += torch.tensor([loss.item(), n, m["reward_acc"].item()])
        out = {"val_loss": totals[0].item() / totals[1].item(), "val_reward_acc": totals[2].item() / totals[1].item()}
        if self.text is not None:
            with autocast(self.run.device, self.run.dtype):
                out["text_bpb"] = bits_per_byte(model, self.text, self.nbytes, self.text_seq_len, self.eval_tokens)
        model.train(was_training)
        return out


DPO_DEFAULTS = dict(epochs=2.0, beta=0.1, label_smoothing=0.0, loss="sigmoid", sft_weight=1.0, ref_dtype="float32",
                    rounds=1, prompts=1024, samples=4, temperature=1.0, max_new_tokens=48, all_wrong="reference",
                    form_pairs=256, eval_tokens=2**16)
PAIRS_PER_STEP = 32
SIZED = ("seq_len", "batch_tokens", "max_steps", "warmup_steps", "eval_every")  # per round, from its pairs


def size_round(args, pairs, tok):
    """A round's length settings from its pairs, unless given: seq_len the longest pair (none is
    cut), PAIRS_PER_STEP pairs a step, --epochs over the training pairs, evaluated twice."""
    given = set(args.given)
    longest = max(len(x) for p in pairs for x, _ in encode_pair(tok, p, 10**9))
    if "seq_len" not in given:
        args.seq_len = longest
    if "batch_tokens" not in given:
        args.batch_tokens = PAIRS_PER_STEP * args.seq_len
    n_train = len(pairs) - n_validation(len(pairs))
    if "max_steps" not in given:
        args.max_steps = max(1, math.ceil(args.epochs * n_train / (args.batch_tokens // args.seq_len)))
    if "warmup_steps" not in given:
        args.warmup_steps = max(1, args.max_steps // 10)
    if "eval_every" not in given:
        args.eval_every = max(1, args.max_steps // 2)


def round_dir(out, r):
    return os.path.join(out, f"round{r}")


# What a DPO round records in its lineage's settings, for --resume and the next round.
ROUND_SETTINGS = list(DPO_DEFAULTS) + ["data", "top", "round", "ckpt", "instructions", "text", "text_seq_len", "given"]


def dpo_settings(args):
    """(Start or None, train state or None) of the round to run: a new run's first round, settled
    from its checkpoint's lineage (a tenth of its pre-training's peak learning rate) or, for a
    model not pre-trained here, by the model's size (DPO_LR); --resume: the last round's own settings and state (a
    finished round hands on to the next)."""
    if args.resume:
        top = os.path.abspath(args.out)
        if not os.path.isdir(top):
            raise FileNotFoundError(f"--resume: no DPO round in {args.out}: the directory does not exist")
        runs.claim(top, resume=True)
        done = sorted(int(d[5:]) for d in (os.listdir(top) if os.path.isdir(top) else [])
                      if re.fullmatch(r"round\d+", d) and runs.is_checkpoint(os.path.join(top, d, "ckpt")))
        if not done:
            raise FileNotFoundError(f"--resume: no DPO round in {args.out} has a checkpoint yet (a run stopped before "
                                    f"its first starts again with the same command, without --resume)")
        args.out = round_dir(top, done[-1])
        path, lineage, state, _ = runs.resume(args, {**LOOP_DEFAULTS, **DPO_DEFAULTS})
        for k in ROUND_SETTINGS:
            setattr(args, k, lineage["settings"].get(k))
        if state["step"] < args.max_steps:
            return None, state
        return None, next_round(args, path)
    source = runs.start_from(args.ckpt)
    top = os.path.abspath(args.out)
    runs.claim(top, [("--ckpt", source.path), ("--data", args.data)], overwrite=bool(args.overwrite))
    if source.config.chat_template != CHAT_TEMPLATE:
        raise ValueError(f"{args.ckpt} is not a chat model: DPO trains answers in the chat template (run SFT first)")
    if args.data is not None:
        read_pairs(args.data)  # bad pairs are an error now, not after the settings are printed
        args.data = os.path.abspath(args.data)
        args.instructions = source.lineage.get("instructions")
    else:
        args.instructions = instruction_dir(source, None)  # prompts to sample pairs from
    size, rules = size_rules(source)
    if "loop" in source.lineage:
        rules = {}  # the loop's sizes are inherited from the run that made it
        args.text_seq_len = source.lineage["loop"]["seq_len"]
    else:
        args.text_seq_len = rules["seq_len"][0]
    peak = pretraining_peak(source.lineage)
    rules["lr"] = ((peak / 10, f"a tenth of its pre-training's peak {peak:g}") if peak is not None else
                   (DPO_LR[size], f"DPO's rate for a model of the {size} preset's size (not pre-trained here)"))
    args.text = source.lineage.get("text")  # pre-training's text: its validation split measures the drift
    defaults = {**loop_defaults(source, rules), **{k: (v, "the stage's default") for k, v in DPO_DEFAULTS.items()}}
    defaults = {k: v for k, v in defaults.items() if k not in SIZED}
    lines = runs.settle(args, defaults)
    args.given += [k for k in SIZED if getattr(args, k, None) is not None]
    args.ckpt, args.top, args.round, args.out = source.path, top, 1, round_dir(top, 1)
    print(f"dpo: from {source.describe()} -> {top}\n" + "\n".join(lines)
          + f"\n  per round, from its pairs: seq_len (the longest pair), {PAIRS_PER_STEP} pairs a step, "
            f"{args.epochs:g} epochs")
    return source, None


def next_round(args, path):
    """The settings of the round after args's, which starts from its checkpoint at path."""
    nxt = argparse.Namespace(**vars(args))
    nxt.round, nxt.ckpt, nxt.out, nxt.resume = args.round + 1, path, round_dir(args.top, args.round + 1), False
    for k in SIZED:
        if k not in args.given:
            setattr(nxt, k, None)
    return nxt


def dpo(args):
    source, state = dpo_settings(args)
    if isinstance(state, argparse.Namespace):  # a resume whose last round had finished: the next one
        args, state = state, None
    run = runs.start_processes(args)
    history = runs.history(source) if source else None
    while args.round <= args.rounds:
        args.resume_command = f"python posttrain.py dpo --out {args.top} --resume"
        # The reference is the policy this round starts from (iterative DPO: each round's own start).
        reference, tok = runs.load_checkpoint(args.ckpt, run.device)
        if state is not None:
            pairs = read_pairs(args.data)
            policy, _ = runs.load_checkpoint(os.path.join(args.out, "ckpt"), run.device)
            run.log(f"resuming round {args.round} at step {state['step']}")
        else:
            if args.round > 1 or args.data is None:  # sampled from this round's starting policy
                t0 = time.time()
                pairs, tally = make_pairs(reference, tok, args.instructions, args, args.seed + args.round)
                os.makedirs(args.out, exist_ok=True)
                args.data = os.path.join(args.out, "pairs.jsonl")
                if run.master:
                    write_jsonl(args.data, pairs)
                    print_pairs(pairs, tally, args.data)
                    print(f"round {args.round}: {args.samples} samples per prompt at temperature {args.temperature}, "
                          f"{time.time() - t0:.0f}s")
                if len(pairs) < 2:
                    raise ValueError(f"round {args.round}: {len(pairs)} pair(s); the policy's samples are all right "
                                     f"or all wrong (more --prompts, a higher --temperature, or --form-pairs)")
            else:
                pairs = read_pairs(args.data)
            size_round(args, pairs, tok)
            policy = copy.deepcopy(reference)
        text = data.open_prepared(args.text, tok)[2] if args.text and data.is_prepared(args.text) else None
        stage = DPO(reference, tok, pairs, run, args.seq_len, args.micro_batch, args.seed, args.beta,
                    args.label_smoothing, args.loss, args.sft_weight, args.ref_dtype, text, args.text_seq_len,
                    args.eval_tokens)
        del reference  # its log-probs are in the stage
        first = None
        if state is None:
            first = stage.evaluate(policy, 0)
            run.log(f"round {args.round} before DPO: " + ", ".join(f"{k} {v:.4f}" for k, v in first.items()))
            lineage = {"stage": "dpo", "parent": args.ckpt, "history": history or [],
                       "text": args.text, "instructions": args.instructions,
                       "pretrain_lr": pretraining_peak(runs.read_lineage(args.ckpt)),
                       "settings": {k: getattr(args, k) for k in ROUND_SETTINGS}}
        else:
            lineage = runs.read_lineage(os.path.join(args.out, "ckpt"))
        fit(policy, stage, Loop.from_args(args), tok, run, lineage, state, first)
        history = lineage["history"] + [{"stage": "dpo", "path": os.path.join(args.out, "ckpt")}]
        args, state = next_round(args, os.path.join(args.out, "ckpt")), None
    final = os.path.join(round_dir(args.top, args.rounds), "ckpt")
    run.log(f"the policy after {args.rounds} round(s): {final}\nnext: python tasks.py eval --ckpt {final} | "
            f"python merge.py --models <sft ckpt> {final} --method linear --out <dir>")
    runs.end_processes(run)


# -----------------------------------------------------------------------------------------------
# The command line

def parse_args(argv=None):
    ap = argparse.ArgumentParser(
        description="Post-training: SFT, preference pairs and DPO (instruction data and evaluation: tasks.py; "
                    "merging: merge.py). Examples: python posttrain.py sft --ckpt BASE --data DATA --out OUT; "
                    "python posttrain.py dpo --ckpt SFT --out OUT --rounds 3.")
    sub = ap.add_subparsers(dest="command", required=True)
    fmt = argparse.ArgumentDefaultsHelpFormatter
    s = sub.add_parser("sft", formatter_class=fmt, help="supervised fine-tuning on conversations, loss on the "
                                                        "assistants' tokens; writes OUT/ckpt")
    s.add_argument("--ckpt", help="the checkpoint to start from: ours or a released PLaMo 2 (it is only read)")
    s.add_argument("--data", help="conversations: a JSONL file of {\"messages\": [...]}, or a directory with train.jsonl")
    s.add_argument("--epochs", type=positive_float, help="passes over the packed conversations (default: 6 for the "
                                                         "tiny size, 2-3 for larger; --max-steps overrides)")
    add_loop_arguments(s)
    pr = sub.add_parser("pairs", formatter_class=fmt, help="preference pairs from a chat model's own samples, judged "
                                                           "by the verifier; writes the JSONL file --out")
    pr.add_argument("--ckpt", required=True, help="the chat model to sample (an SFT run's checkpoint)")
    pr.add_argument("--out", required=True, help="the JSONL file to write")
    pr.add_argument("--data", help="instruction data whose training prompts are asked (default: the one the SFT run used)")
    add_pair_arguments(pr, DPO_DEFAULTS)
    pr.add_argument("--seed", type=nonneg_int, default=1337, help="seed of the prompts and the samples")
    pr.add_argument("--device", default="auto", help="auto, cpu, cuda, mps")
    o = sub.add_parser("dpo", formatter_class=fmt, help="direct preference optimization of a chat model, on its own "
                                                        "samples or --data pairs; writes OUT/round<r>/ckpt per round")
    o.add_argument("--ckpt", help="the chat model to start from (it is only read); also the frozen reference")
    o.add_argument("--data", help="pairs (JSONL, as `pairs` writes) instead of sampling them from the model")
    o.add_argument("--beta", type=positive_float, help=f"strength of the pull to the reference (default {DPO_DEFAULTS['beta']})")
    o.add_argument("--label-smoothing", type=unit_float, help="conservative DPO: the share of labels taken to be wrong "
                                                              "(default 0)")
    o.add_argument("--loss", choices=["sigmoid", "ipo"], help="sigmoid (DPO, default) or ipo")
    o.add_argument("--sft-weight", type=nonneg_float, help="weight of the chosen answer's NLL per token added to the "
                                                           "loss (RPO; default 1, measured in EXPERIMENTS.md; 0: plain DPO)")
    o.add_argument("--ref-dtype", choices=["float32", "bfloat16"], help="precision of the reference model (default float32)")
    o.add_argument("--rounds", type=positive_int, help="iterative DPO: sample, label and train this many times, each "
                                                       "round from the last one's policy (default 1)")
    o.add_argument("--epochs", type=positive_float, help=f"passes over the pairs per round (default {DPO_DEFAULTS['epochs']:g})")
    o.add_argument("--eval-tokens", type=positive_int, help="tokens of pre-training validation text for bits per byte "
                                                            "(default 65536)")
    add_pair_arguments(o, {})
    add_loop_arguments(o, out="output directory: round<r>/ for each round (pairs.jsonl, log.jsonl, loss.png, ckpt/)")
    for name, target in (("data", "tasks.py data"), ("eval", "tasks.py eval"), ("merge", "merge.py")):
        sub.add_parser(name, add_help=False, help=f"moved: python {target} (this forwards to it)")
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in ("data", "eval", "merge"):
        return argparse.Namespace(command=argv[0], rest=argv[1:])
    args = ap.parse_args(argv)
    if args.command == "dpo":
        if args.label_smoothing is not None and not args.label_smoothing < 0.5:
            ap.error("--label-smoothing must be below 0.5")
        if args.data and (args.rounds or 1) > 1:
            ap.error("--rounds samples new pairs from each round's policy; with --data pairs there is one round")
        if args.out is None or (not args.resume and args.ckpt is None):
            ap.error("dpo needs --ckpt and --out (or --resume and --out)")
    if args.command == "sft" and (args.out is None or (not args.resume and (args.ckpt is None or args.data is None))):
        ap.error("sft needs --ckpt, --data and --out (or --resume and --out)")
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.command in ("data", "eval"):
        print(f"note: `posttrain.py {args.command}` is now `tasks.py {args.command}`", file=sys.stderr)
        return tasks.main([args.command] + args.rest)
    if args.command == "merge":
        print("note: `posttrain.py merge` is now `merge.py`", file=sys.stderr)
        return merge.main(args.rest)
    return cli(lambda: {"sft": sft, "pairs": pairs_command, "dpo": dpo}[args.command](args))


if __name__ == "__main__":
    main()
