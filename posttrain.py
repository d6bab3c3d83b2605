"""Post-training: synthetic instruction data, supervised fine-tuning in the chat template, the
evaluation that every later step is judged by, DPO on the model's own answers, and model merging.

    python posttrain.py data  --ckpt out/posttrain/base/ckpt --out out/posttrain/data
    python posttrain.py sft   --ckpt out/posttrain/base/ckpt --data out/posttrain/data --out out/posttrain/sft
    python posttrain.py eval  --ckpt out/posttrain/sft/ckpt [--json results.json]
    python posttrain.py pairs --ckpt out/posttrain/sft/ckpt --out pairs.jsonl
    python posttrain.py dpo   --ckpt out/posttrain/sft/ckpt --out out/posttrain/dpo [--rounds 3 | --data pairs.jsonl]
    python posttrain.py merge --base out/posttrain/base/ckpt --models A/ckpt B/ckpt --method ties --out out/merged

The story:
1. data: questions with verifiable answers about the synthetic world the base model was trained
   on (corpus.py), in Japanese and English: fact QA, translation, arithmetic word problems,
   instructions about form, multi-turn follow-ups, and questions about people who do not exist
   (answered "I have no information"). The world's facts are split three ways, recorded in
   facts.json: facts that SFT examples use, facts seen only in pre-training (can SFT teach the
   model to answer about them? knowledge extraction), and the held-out facts no training text
   states (where any confident answer is a hallucination). Optionally a teacher model writes the
   answers, kept only when the verifier accepts them (rejection sampling).
2. sft: train.fit with a loss on the assistants' tokens only, conversations packed into rows
   whose documents (seq_idx) do not see each other.
3. eval: greedy answers to prompts no training example used, scored by the verifier per task,
   fact set and language; a base model is asked with a few-shot prompt, a chat model in its
   template. Plus the completion probe: the world's own sentence openings, continued.
4. pairs: the chat model answers training prompts several times, the verifier labels each
   answer, and an accepted one is preferred to a rejected one; plus pairs that prefer the form
   and language an instruction asked for.
5. dpo: train.fit with the DPO loss against a frozen copy of the starting model; --rounds
   samples new pairs from each round's policy (iterative DPO).
6. merge: checkpoints of one config combined tensor by tensor (linear, SLERP, task arithmetic,
   TIES, DARE), streamed from their safetensors files into a new checkpoint.
"""
import argparse
import collections
import copy
import itertools
import json
import math
import os
import random
import re
import shutil
import struct
import sys
import time
import unicodedata
import zlib

import torch
import torch.nn.functional as F

import corpus
import train
from plamo2 import (CHAT_TEMPLATE, autocast, bits_per_byte, chat_markers, load_tokenizer, render_chat, resolve_device,
                    safetensors_files, token_bytes)


# -----------------------------------------------------------------------------------------------
# 1. The world of a checkpoint, and its facts in three sets.

def load_world(ckpt):
    """(world, corpus) that the checkpoint's pre-training run generated its text from:
    rebuilt from the settings its data/heldout_facts.json records, and checked against it."""
    path = train.find_checkpoint(ckpt)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"--ckpt: no checkpoint directory at {ckpt}")
    try:
        source = train.load_train_state(path)["args"]
    except FileNotFoundError:
        source = {}
    data_dir = source.get("data_dir") or os.path.join(os.path.dirname(os.path.abspath(path)), "data")
    facts_path = os.path.join(data_dir, "heldout_facts.json")
    if not os.path.exists(facts_path):
        raise FileNotFoundError(f"{facts_path} not found: the instruction data asks about the synthetic world, "
                                f"so --ckpt must come from a run on the synthetic corpus (not on --data text)")
    with open(facts_path, encoding="utf-8") as f:
        recorded = json.load(f)
    if "world" not in recorded:
        raise ValueError(f"{facts_path} does not record its world's settings (written by an older train.py): "
                         f"train the base model again")
    c = corpus.generate_corpus(**recorded["world"])
    if [f["id"] for f in c.heldout_facts] != [f["id"] for f in recorded["heldout"]]:
        raise ValueError(f"the corpus rebuilt from {facts_path} differs from the one it was written with")
    return corpus.build_world(recorded["world"]["seed"], recorded["world"]["n_people"]), c


def split_facts(w, c, seed):
    """{set: [fact dicts]}: the entities split in halves at random (a founder in the company's),
    "sft" facts for the SFT examples and "pretrain" facts that only pre-training states; and the
    "heldout" facts, stated by no training text. Each fact carries how many train documents
    state it ("exposures")."""
    exposures = collections.Counter(f for m in c.train_mentions for f in m)
    held = {f["id"] for f in c.heldout_facts}
    entities = w.people + w.towns + w.companies + w.products
    rng = random.Random(f"split/{seed}")
    sft = set(rng.sample([e.id for e in entities], len(entities) // 2))
    for co in w.companies:  # "X founded Y" also says that X works for Y: a founder goes with the company
        sft.discard(co.attrs["founder"].id)
        if co.id in sft:
            sft.add(co.attrs["founder"].id)
    sets = {"sft": [], "pretrain": [], "heldout": []}
    for e in entities:
        for a in corpus.attributes(e.kind):
            f = corpus.fact(w, e, a)
            f["exposures"] = exposures[f["id"]]
            name = "heldout" if f["id"] in held else "sft" if e.id in sft else "pretrain"
            if name != "heldout" and f["exposures"] == 0:
                continue  # never stated in train although not held out (too rare to come up): no use
            sets[name].append(f)
    return sets


def unknown_people(w, n, seed):
    """n made-up people (Japanese, English name) built like the world's but not in it."""
    taken = {p.name["ja"] for p in w.people} | {p.name["en"] for p in w.people}
    rng, out = random.Random(f"unknown/{seed}"), []
    while len(out) < n:
        (fk, _, fe), (gk, _, ge) = rng.choice(corpus.FAMILY), rng.choice(corpus.GIVEN_F + corpus.GIVEN_M)
        if fk + gk not in taken and f"{ge} {fe}" not in taken:
            taken |= {fk + gk, f"{ge} {fe}"}
            out.append((fk + gk, f"{ge} {fe}"))
    return out


# -----------------------------------------------------------------------------------------------
# 2. Examples. Questions are worded from each attribute's noun in several ways; the corpus's own
#    question (ATTRS q*, which its Q&A documents use) is one of the training phrasings, and the
#    evaluation asks in a phrasing that no training text uses.

NOUNS = {  # attribute -> (Japanese, English)
    "birthplace": ("出身地", "hometown"), "born": ("生年月日", "date of birth"), "employer": ("勤務先", "employer"),
    "job": ("職業", "occupation"), "hobby": ("趣味", "hobby"), "prefecture": ("所在地", "prefecture"),
    "population": ("人口", "population"), "specialty": ("名産品", "specialty"), "founded": ("創業年", "founding year"),
    "hq": ("本社所在地", "head office"), "founder": ("創業者", "founder"), "employees": ("従業員数", "number of employees"),
    "maker": ("製造元", "maker"), "released": ("発売年", "release year"), "price": ("価格", "price"),
}
ASK = {  # phrasings from the noun: the SFT data uses "train" (and ATTRS' q*), the evaluation "eval"
    "train": {"ja": ["{e}の{n}を教えてください。", "{e}について質問です。{n}は何ですか。"],
              "en": ["Tell me the {n} of {e}.", "I have a question about {e}: what is the {n}?"]},
    "eval": {"ja": ["{e}の{n}をご存じですか。"], "en": ["Do you know the {n} of {e}?"]},
}
FOLLOW = {"train": {"ja": "では、{n}は何ですか。", "en": "And what is the {n}?"},
          "eval": {"ja": "{n}も教えてもらえますか。", "en": "What about the {n}?"}}
FORMS = {  # instructions about form, appended to a question
    "english": ("英語で答えてください。", None), "japanese": (None, "Please answer in Japanese."),
    "short": ("答えだけを書いてください。", "Reply with the answer only."),
}
LIST_ASK = {"train": {"ja": "{e}の{ns}を箇条書きで教えてください。", "en": "List the {ns} of {e}."},
            "eval": {"ja": "{e}について、{ns}を箇条書きにしてください。", "en": "Give the {ns} of {e} as a list."}}
TRANSLATE = {"train": {"ja": ["次の文を英語に翻訳してください。\n{s}", "英訳してください：{s}"],
                       "en": ["Translate into Japanese:\n{s}", "What is this in Japanese? {s}"]},
             "eval": {"ja": ["この文を英語にしてください。\n{s}"], "en": ["Please translate this sentence into Japanese.\n{s}"]}}
PROBLEMS = {  # (operation, question, worked answer); {name} is a person of the world, no fact of theirs
    "ja": [("+", "{name}は{item}を{a}個持っています。{b}個もらうと、全部で何個になりますか。", "{a} + {b} = {c}なので、{c}個です。"),
           ("-", "{item}が{a}個あります。{b}個使うと、残りは何個ですか。", "{a} - {b} = {c}なので、残りは{c}個です。"),
           ("*", "1箱に{item}が{a}個ずつ入っています。{b}箱では全部で何個ですか。", "{a} × {b} = {c}なので、{c}個です。"),
           ("/", "{item}が{a}個あります。{b}人で同じ数ずつ分けると、1人何個になりますか。", "{a} ÷ {b} = {c}なので、1人{c}個です。"),
           ("+-*/", "{a} {sym} {b} を計算してください。", "{a} {sym} {b} = {c}です。")],
    "en": [("+", "{name} has {a} {items} and gets {b} more. How many {items} does {name} have now?", "{a} + {b} = {c}, so {c} {items}."),
           ("-", "There are {a} {items}. If {b} are used, how many are left?", "{a} - {b} = {c}, so {c} are left."),
           ("*", "Each box holds {a} {items}. How many {items} are in {b} boxes?", "{a} × {b} = {c}, so {c} {items}."),
           ("/", "{a} {items} are shared equally among {b} people. How many does each person get?", "{a} ÷ {b} = {c}, so each gets {c}."),
           ("+-*/", "Calculate {a} {sym} {b}.", "{a} {sym} {b} = {c}.")],
}
NO_INFO = {"ja": "{e}についての情報は持っていません。", "en": "I have no information about {e}."}
ABSTAIN = re.compile(r"情報は持っていません|わかりません|分かりません|no information|don't know|do not know", re.I)


def noun(attr, lang):
    return NOUNS[attr][lang == "en"]


def short_answer(f, lang):
    v = f["value"] if lang == "ja" else f["value_en"]
    return v + "です。" if lang == "ja" else v[0].upper() + v[1:] + "."


def surface_forms(value_ja, value_en, attr, lang):
    """The ways a right answer may write a value, in the language asked (numbers with or without
    digit commas are the same after normalize): for a date also 9 November 1995 and 1995/11/9,
    and in English the corpus's "birthday is November 9, and he was born in 1995", a tuple of
    parts that must all be there."""
    forms, parts = [value_ja if lang == "ja" else value_en], []
    if attr == "born":
        y, mo, d = re.match(r"(\d+)年(\d+)月(\d+)日", value_ja).groups()
        month = corpus.MONTHS[int(mo) - 1]
        forms += [f"{y}/{mo}/{d}"] if lang == "ja" else [f"{d} {month} {y}"]
        parts = [] if lang == "ja" else [(f"{month} {d}", y)]
    if attr in ("population", "employees", "price", "founded", "released"):
        forms.append(re.sub(r"[^\d,]", "", value_en))  # the number alone: "78,330", "1995"
    if attr == "job" and lang == "en":
        forms.append(re.sub(r"^(a|an) ", "", value_en))
    return sorted(set(forms), key=len, reverse=True) + parts


class Questions:
    """Examples about one world and its split of facts. make(task, n, rng, split) writes n
    examples of a task: {"task", "lang", "set", "messages", "check", ...}. split "train": SFT
    conversations about sft facts, answers included, stating no fact of the other sets; "eval":
    the evaluation's prompts (ending with the user's message; "reference" is a right answer and
    "check" what the verifier needs), in the phrasings no training text uses."""

    def __init__(self, w, sets, unknown):
        self.w, self.sets, self.unknown = w, sets, unknown
        self.sft_ids = {f["id"] for f in sets["sft"]}
        self.by_id = {e.id: e for e in w.people + w.towns + w.companies + w.products}
        self.values = collections.defaultdict(set)  # attribute -> every (ja, en) value in the world
        for e in self.by_id.values():
            for a in corpus.attributes(e.kind):
                self.values[a].add((corpus.value(e, a, "ja"), corpus.value(e, a, "en")))

    def entity(self, f):
        return self.by_id[f["id"].split("/")[0]]

    def check(self, f, lang):
        """The value in the forms the verifier accepts, and the attribute's other values in the
        world (naming one is a wrong answer)."""
        a, mine = f["attribute"], (f["value"], f["value_en"])
        return {"type": "fact", "forms": surface_forms(*mine, a, lang),
                "others": list(dict.fromkeys(o for v in sorted(self.values[a]) if v != mine
                                             for o in surface_forms(*v, a, lang)))}

    def sentence(self, e, template, lang):
        """(template filled for e, whether every fact it states is an sft fact)."""
        F_ = corpus.Fields(lang)
        corpus.FIELDS[e.kind](F_, self.w, e)
        return F_.fill(template), all(f"{i}/{a}" in self.sft_ids for i, a in F_.used)

    def question(self, f, lang, rng, split):
        """The corpus's own question (train only) or one of ASK[split]."""
        t = rng.choice(ASK[split][lang] + ([None] if split == "train" else []))
        e = f["entity"] if lang == "ja" else f["entity_en"]
        return f[lang + "_question"] if t is None else t.format(e=e, n=noun(f["attribute"], lang))

    def answer(self, f, lang, rng):
        """The value in a short sentence, or one of the corpus's sentences for the attribute that
        states only sft facts."""
        e = self.entity(f)
        options = [s for s, ok in (self.sentence(e, t, lang) for t in corpus.ATTRS[f["attribute"]][lang]) if ok]
        return rng.choice(options + [short_answer(f, lang)])

    def make(self, task, n, rng, split):
        out = []
        while len(out) < n:
            lang = "ja" if len(out) % 2 == 0 else "en"  # alternating: every cell has half
            ex = {"task": task, "lang": lang, "set": "sft"}
            f = rng.choice(self.sets["sft"])
            if task == "qa":
                msgs = [self.question(f, lang, rng, split), self.answer(f, lang, rng)]
                ex["check"] = self.check(f, lang)
            elif task == "abstain":  # a made-up person: nothing to know
                e = rng.choice(self.unknown[:len(self.unknown) // 2])[lang == "en"]
                q = rng.choice(ASK[split][lang]).format(e=e, n=noun(rng.choice(corpus.attributes("person")), lang))
                msgs, ex["set"], ex["check"] = [q, NO_INFO[lang].format(e=e)], "unknown", {"type": "abstain"}
            elif task == "translate":
                t, other = corpus.ATTRS[f["attribute"]], "en" if lang == "ja" else "ja"
                k = rng.randrange(len(t["ja"]))
                (src, ok1), (tgt, ok2) = (self.sentence(self.entity(f), t[L][k % len(t[L])], L) for L in (lang, other))
                if not (ok1 and ok2):
                    continue
                msgs = [rng.choice(TRANSLATE[split][lang]).format(s=src), tgt]
                ex["kind"], ex["check"] = f"{lang}->{other}", {"type": "translation", "reference": tgt}
            elif task == "arithmetic":
                ops, q, a = rng.choice(PROBLEMS[lang])
                op = rng.choice(ops)
                x, y, z = corpus.problem(rng, op)
                item = rng.choice(corpus.ITEMS)
                fill = dict(a=x, b=y, c=z, sym=corpus.SYMBOLS[op], item=item[0] if lang == "ja" else item[1],
                            items=item[2], name=rng.choice(self.w.people).name[lang])
                msgs, ex["check"] = [q.format(**fill), a.format(**fill)], {"type": "number", "answer": z}
            elif task == "format":
                kind = ex["kind"] = rng.choice(["english", "japanese", "short", "list"])
                if kind == "list":
                    e = self.entity(f)
                    fs = [corpus.fact(self.w, e, a) for a in rng.sample(corpus.attributes(e.kind), 3)]
                    if not all(g["id"] in self.sft_ids for g in fs):
                        continue
                    ns = [noun(g["attribute"], lang) for g in fs]
                    ns = "、".join(ns) if lang == "ja" else f"{ns[0]}, {ns[1]} and {ns[2]}"
                    q = LIST_ASK[split][lang].format(e=f["entity"] if lang == "ja" else f["entity_en"], ns=ns)
                    a = "\n".join(f"・{noun(g['attribute'], 'ja')}：{g['value']}" if lang == "ja" else
                                  f"- {noun(g['attribute'], 'en').capitalize()}: {g['value_en']}" for g in fs)
                    ex["check"] = {"type": "list", "items": [self.check(g, lang) for g in fs]}
                else:
                    if FORMS[kind][lang == "en"] is None:  # "in English" is asked in Japanese, and back
                        lang = ex["lang"] = "ja" if lang == "en" else "en"
                    said = {"english": "en", "japanese": "ja"}.get(kind, lang)
                    q = self.question(f, lang, rng, split) + ("" if lang == "ja" else " ") + FORMS[kind][lang == "en"]
                    a = (f["value"] if said == "ja" else f["value_en"]) if kind == "short" else short_answer(f, said)
                    ex["check"] = {**self.check(f, said), "type": "form", "form": kind}
                    ex["fact"] = f["id"]  # pairs state its value in the wrong form
                msgs = [q, a]
            elif task == "multiturn":  # the second question names no entity: "And what is the hobby?"
                e = self.entity(f)
                g = corpus.fact(self.w, e, rng.choice([a for a in corpus.attributes(e.kind) if a != f["attribute"]]))
                if g["id"] not in self.sft_ids:  # the held-out fact of an sft entity
                    continue
                msgs = [self.question(f, lang, rng, "train"), short_answer(f, lang),
                        FOLLOW[split][lang].format(n=noun(g["attribute"], lang)), short_answer(g, lang)]
                ex["check"] = self.check(g, lang)
            else:
                raise ValueError(f"unknown task {task!r}")
            messages = [{"role": "user" if i % 2 == 0 else "assistant", "content": m} for i, m in enumerate(msgs)]
            if split == "eval":
                ex["messages"], ex["reference"] = messages[:-1], messages[-1]["content"]
            else:
                ex["messages"] = messages
            out.append(ex)
        return out

    def facts_eval(self, rng, per_set):
        """Fact QA for the evaluation: each fact of each set (per_set of them at most, at random)
        asked in each language in the evaluation's own phrasing ("qa"), in the first of the SFT
        data's phrasings ("qa-seen": the same words, about facts SFT never asked; make_data drops
        the prompts that are in the training data), and as the completion probe (the corpus's
        own sentence openings); and per_set // 2 made-up people, where the right answer is none."""
        out = []
        for name in ("sft", "pretrain", "heldout"):
            facts = self.sets[name]
            for f in rng.sample(facts, per_set) if len(facts) > per_set else facts:
                for lang in ("ja", "en"):
                    c, ref = self.check(f, lang), short_answer(f, lang)
                    e = f["entity"] if lang == "ja" else f["entity_en"]
                    for task, q in (("qa", self.question(f, lang, rng, "eval")),
                                    ("qa-seen", ASK["train"][lang][0].format(e=e, n=noun(f["attribute"], lang)))):
                        out.append({"task": task, "lang": lang, "set": name, "fact": f["id"], "check": c,
                                    "reference": ref, "messages": [{"role": "user", "content": q}]})
                    out.append({"task": "probe", "lang": lang, "set": name, "fact": f["id"], "check": c,
                                "reference": ref, "prompt": f[lang + "_prompt"]})
        for ja, en in self.unknown[len(self.unknown) // 2:][:per_set // 2]:  # not the people SFT asks about
            for lang, e in (("ja", ja), ("en", en)):
                q = ASK["eval"][lang][0].format(e=e, n=noun(rng.choice(corpus.attributes("person")), lang))
                out.append({"task": "qa", "lang": lang, "set": "unknown", "check": {"type": "abstain"},
                            "messages": [{"role": "user", "content": q}], "reference": NO_INFO[lang].format(e=e)})
        return out


MIX = dict(qa=4, translate=1.5, arithmetic=1.5, format=1.5, multiturn=1, abstain=0.5)


def parse_mix(text):
    """"qa=4,translate=1" -> {task: weight}, every task of MIX named or left at its default."""
    mix = dict(MIX)
    for part in filter(None, (p.strip() for p in (text or "").split(","))):
        k, _, v = part.partition("=")
        if k not in MIX:
            raise ValueError(f"--mix: unknown task {k!r}; the tasks are {', '.join(MIX)}")
        try:
            mix[k] = float(v)
        except ValueError:
            raise ValueError(f"--mix: {part!r} is not task=weight") from None
        if not (math.isfinite(mix[k]) and mix[k] >= 0):
            raise ValueError(f"--mix: the weight of {k} must be 0 or more")
    if sum(mix.values()) <= 0:
        raise ValueError("--mix: at least one task needs a positive weight")
    return mix


# -----------------------------------------------------------------------------------------------
# 3. The verifier.

def normalize(s):
    """NFKC (full-width digits and letters become ASCII), lower case, no digit-grouping commas,
    single spaces."""
    s = unicodedata.normalize("NFKC", s).lower()
    s = re.sub(r"(?<=\d),(?=\d{3})", "", s)
    return re.sub(r"\s+", " ", s).strip()


def find(form, text):
    """Whether the normalized form occurs in the normalized text, not inside a longer number or word."""
    form = normalize(form)
    return re.search(r"(?<![\da-z])" + re.escape(form) + r"(?![\da-z])", text) is not None


def parts(form):
    """A form's parts: itself, or the parts of a form written in pieces (surface_forms)."""
    return [form] if isinstance(form, str) else form


def fact_verdict(check, answer):
    """"right" (the value, in a form allowed, and no other value of the attribute), "abstain" (says
    it does not know, names no value) or "wrong"."""
    text = normalize(answer)
    right = any(all(find(s, text) for s in parts(f)) for f in check["forms"])
    for s in (s for f in check["forms"] for s in parts(f)):  # a right value may contain another one
        text = re.sub(re.escape(normalize(s)), " ", text)           # ("reading" in "reading manga")
    other = any(all(find(s, text) for s in parts(o)) for o in check["others"])
    if right and not other:
        return "right"
    if not right and not other and ABSTAIN.search(answer):
        return "abstain"
    return "wrong"


JAPANESE = re.compile(r"[\u3040-\u30ff\u3400-\u9fff]")


def chrf(hyp, ref, n=6, beta=2.0):
    """chrF (Popović 2015) in percent: character n-gram (1..n) precision and recall averaged over
    n, combined as an F-beta score; spaces are left out, as sacrebleu does.

    >>> round(chrf("abc", "abc"), 1), round(chrf("abcd", "abce", n=2), 1)
    (100.0, 70.8)
    """
    hyp, ref = hyp.replace(" ", ""), ref.replace(" ", "")
    precisions, recalls = [], []
    for k in range(1, n + 1):
        h = collections.Counter(hyp[i:i + k] for i in range(len(hyp) - k + 1))
        r = collections.Counter(ref[i:i + k] for i in range(len(ref) - k + 1))
        if not h or not r:
            continue
        match = sum((h & r).values())
        precisions.append(match / sum(h.values()))
        recalls.append(match / sum(r.values()))
    if not precisions:
        return 0.0
    p, r = sum(precisions) / len(precisions), sum(recalls) / len(recalls)
    return 0.0 if p + r == 0 else 100 * (1 + beta ** 2) * p * r / (beta ** 2 * p + r)


def verify(check, answer):
    """{"ok": bool, ...} for one answer; fact questions add "verdict", translation "chrf" and
    "exact", form instructions "form" (the form followed, whatever the value)."""
    kind = check["type"]
    if kind == "fact":
        v = fact_verdict(check, answer)
        return {"ok": v == "right", "verdict": v}
    if kind == "abstain":
        said = bool(ABSTAIN.search(answer))
        return {"ok": said, "verdict": "abstain" if said else "wrong"}
    if kind == "number":
        numbers = re.findall(r"\d+", normalize(answer))
        return {"ok": bool(numbers) and int(numbers[-1]) == check["answer"]}
    if kind == "translation":
        exact = normalize(answer) == normalize(check["reference"])
        return {"ok": exact, "exact": exact, "chrf": chrf(normalize(answer), normalize(check["reference"]))}
    if kind == "list":
        lines = [line.strip() for line in answer.strip().split("\n") if line.strip()]
        form = len(lines) == len(check["items"]) and all(re.match(r"^(・|-|\*|\d+\.)", line) for line in lines)
        values = form and all(fact_verdict(c, line) == "right" for c, line in zip(check["items"], lines))
        return {"ok": values, "form": form}
    if kind == "form":
        body = answer.strip().rstrip("。.")
        form = {"english": not JAPANESE.search(answer), "japanese": bool(JAPANESE.search(answer)),
                "short": len(body) <= 40 and not re.search(r"です|ます|[。！？!?]|\.\s", body)}[check["form"]]
        return {"ok": form and fact_verdict(check, answer) == "right", "form": form}
    raise ValueError(f"unknown check type {kind!r}")


# -----------------------------------------------------------------------------------------------
# 4. Asking a model: in the chat template if it is a chat model, else with a few-shot prompt in
#    the corpus's own Q&A layout ("質問：...\n回答：..."), which a base model has read.

FRAME = {"ja": ("質問：", "回答："), "en": ("Question: ", "Answer: ")}


def is_chat(model):
    return model.config.chat_template == CHAT_TEMPLATE


def few_shot_text(messages, lang, answer=""):
    """A conversation in the Q&A layout, ending with its answer (a shot) or an open "回答："."""
    q, a = FRAME[lang]
    return "\n".join([(q if m["role"] == "user" else a) + m["content"] for m in messages] + [a + answer])


def prompt(model, tok, ex, shots):
    """Token ids that ask ex's question: the probe's raw prompt; a chat model's template with the
    assistant's turn opened; or, for a base model, shots (same task and language) then ex."""
    if ex["task"] == "probe":
        return tok.encode(ex["prompt"], bos=True)
    if is_chat(model):
        return render_chat(tok, ex["messages"], generation_prompt=True)[0]
    examples = [few_shot_text(s["messages"][:-1], s["lang"], s["messages"][-1]["content"])
                for s in shots.get((ex["task"].removesuffix("-seen"), ex["lang"]), [])]  # qa-seen: qa's
    return tok.encode("\n\n".join(examples + [few_shot_text(ex["messages"], ex["lang"])]), bos=True)


def cut_answer(model, ex, text):
    """The answer in a continuation: a base model goes on writing the next question (or, after a
    probe, the next sentence), so its text ends at a blank line or the next question frame."""
    if ex["task"] == "probe":
        return re.split(r"[。\n]|\.(\s|$)", text, maxsplit=1)[0]
    if is_chat(model):
        return text
    text = text.split("\n\n")[0]
    return re.split("\n(?:" + "|".join(map(re.escape, FRAME["ja"] + FRAME["en"])) + ")", text)[0]


@torch.inference_mode()
def generate(model, tok, prompts, max_new, temperature=0.0, samples=1, seed=0, batch=64, stop_text=()):
    """[[text] * samples] for each prompt (token ids): prompts of the same length go through one
    batch, so no padding is needed; a row stops at EOS, BOS, the chat's end marker, or once its
    text holds one of stop_text."""
    stop = {tok.eos_id, tok.bos_id}
    try:
        stop.add(chat_markers(tok)[1])
    except ValueError:
        pass
    device = next(model.parameters()).device
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    per = max(1, batch // samples)
    out = [None] * len(prompts)
    for _, group in itertools.groupby(order, key=lambda i: len(prompts[i])):
        group = list(group)
        for part in (group[k:k + per] for k in range(0, len(group), per)):
            idx = torch.tensor([prompts[i] for i in part for _ in range(samples)], device=device)   # (b, T)
            rows, done = [[] for _ in range(len(idx))], [False] * len(idx)
            for step in model.generate(idx, max_new, temperature, seed=seed, stop_ids=stop, vocab_size=tok.vocab_size):
                for r, t in enumerate(step.tolist()):                                          # step: (b,)
                    done[r] = done[r] or t in stop
                    if not done[r]:
                        rows[r].append(t)
                        done[r] = any(s in tok.decode(rows[r][-8:]) for s in stop_text)
                if all(done):
                    break
            texts = [tok.decode(r) for r in rows]
            for k, i in enumerate(part):
                out[i] = texts[k * samples:(k + 1) * samples]
    return out


def answers(model, tok, examples, shots, max_new=48, **kw):
    """[[answer] * samples] for each example, cut as cut_answer does."""
    was_training = model.training
    model.eval()
    # A base model goes on writing past its answer: stop it at the blank line after (or the next frame).
    stop_text = () if is_chat(model) else ("\n\n", "\n" + FRAME["ja"][0], "\n" + FRAME["en"][0])
    texts = generate(model, tok, [prompt(model, tok, ex, shots) for ex in examples], max_new, stop_text=stop_text, **kw)
    model.train(was_training)
    return [[cut_answer(model, ex, t) for t in ts] for ex, ts in zip(examples, texts)]


# -----------------------------------------------------------------------------------------------
# 5. data: the instruction data and the evaluation prompts, written as JSONL a person can read.

def write_jsonl(path, rows):
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    os.replace(path + ".tmp", path)


def read_jsonl(path):
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    raise ValueError(f"{path}: line {n} is not valid JSON") from None
    return rows


def few_shots(examples, k=3):
    """{(task, lang): the first k examples}: the base model's few-shot prompts."""
    shots = collections.defaultdict(list)
    for ex in examples:
        if len(shots[ex["task"], ex["lang"]]) < k:
            shots[ex["task"], ex["lang"]].append(ex)
    return shots


def rejection_sample(args, examples):
    """Answers written by a teacher model: args.samples samples per example (temperature
    args.temperature), the first that the verifier accepts replaces the template's answer; an
    example with none accepted is dropped. Returns the kept examples."""
    device = resolve_device(args.device)
    teacher, tok = train.load_checkpoint(args.teacher, device)
    asked = [{**ex, "messages": ex["messages"][:-1]} for ex in examples]
    t0 = time.time()
    outs = answers(teacher, tok, asked, few_shots(examples), temperature=args.temperature, samples=args.samples,
                   seed=args.seed)
    kept, tally = [], collections.defaultdict(lambda: [0, 0])
    for ex, samples in zip(examples, outs):
        good = next((s for s in samples if verify(ex["check"], s)["ok"]), None)
        tally[ex["task"]][1] += 1
        if good is not None:
            tally[ex["task"]][0] += 1
            kept.append({**ex, "messages": ex["messages"][:-1] + [{"role": "assistant", "content": good.strip()}],
                         "source": "teacher"})
    print(f"teacher {args.teacher}: {args.samples} samples per example at temperature {args.temperature} "
          f"({time.time() - t0:.0f}s); accepted: " + ", ".join(f"{t} {a}/{n}" for t, (a, n) in tally.items()))
    return kept


def make_data(args):
    if os.path.exists(os.path.join(args.out, "train.jsonl")):
        raise ValueError(f"--out {args.out} holds instruction data already; give a new directory")
    w, c = load_world(args.ckpt)
    sets = split_facts(w, c, args.seed)
    q = Questions(w, sets, unknown_people(w, 2 * args.eval_per_cell, args.seed))
    mix, rng = parse_mix(args.mix), random.Random(f"data/{args.seed}")
    total = sum(mix.values())
    examples = [ex for task, weight in mix.items() for ex in q.make(task, round(args.examples * weight / total), rng, "train")]
    rng.shuffle(examples)
    if args.teacher:
        examples = rejection_sample(args, examples)
    rng = random.Random(f"eval/{args.seed}")
    evals = q.facts_eval(rng, args.eval_per_cell) + [
        ex for task in ("translate", "arithmetic", "format", "multiturn") for ex in q.make(task, 2 * args.eval_per_cell, rng, "eval")]
    seen = {json.dumps(ex["messages"][:-1], ensure_ascii=False) for ex in examples}
    evals = [ex for ex in evals if ex["task"] == "probe" or json.dumps(ex["messages"], ensure_ascii=False) not in seen]
    os.makedirs(args.out, exist_ok=True)
    write_jsonl(os.path.join(args.out, "train.jsonl"), examples)
    write_jsonl(os.path.join(args.out, "eval.jsonl"), evals)
    with open(os.path.join(args.out, "facts.json"), "w", encoding="utf-8") as f:
        json.dump({"ckpt": os.path.abspath(args.ckpt), "seed": args.seed, "sets": sets,
                   "unknown_people": q.unknown}, f, ensure_ascii=False, indent=1)
    counts = collections.Counter(ex["task"] for ex in examples)
    exp = {k: sorted(f["exposures"] for f in v) for k, v in sets.items()}
    print(f"facts: " + ", ".join(f"{k} {len(v)} (median {v[len(v) // 2] if v else 0} train documents each)"
                                 for k, v in exp.items()))
    print(f"wrote {args.out}/train.jsonl ({len(examples)} conversations: "
          + ", ".join(f"{t} {n}" for t, n in counts.items()) + f"), eval.jsonl ({len(evals)} prompts), facts.json")


# -----------------------------------------------------------------------------------------------
# 6. sft: the shared loop, with a loss on the assistants' tokens only.

def read_conversations(path):
    """The "messages" lists of a JSONL file (or of DIR/train.jsonl), each checked by render_chat's rules."""
    if os.path.isdir(path):
        path = os.path.join(path, "train.jsonl")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--data: no conversations at {path} (a JSONL file, or a directory with train.jsonl)")
    convs = []
    for n, row in enumerate(read_jsonl(path), 1):
        msgs = row.get("messages") if isinstance(row, dict) else None
        if not isinstance(msgs, list) or not msgs or not all(
                isinstance(m, dict) and m.get("role") in ("system", "user", "assistant")
                and isinstance(m.get("content"), str) for m in msgs):
            raise ValueError(f"{path}: conversation {n} is not {{\"messages\": [{{\"role\": system|user|assistant, "
                             f"\"content\": text}}, ...]}}")
        convs.append(msgs)
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
    """The SFT stage for train.fit: packed rows in a shuffled order per epoch (seeded, so the
    step is all a resume needs), cross-entropy on the assistants' tokens; fit normalizes it by
    their count over the whole step. Evaluated by the same loss on held-out conversations."""

    def __init__(self, tok, conversations, args, run):
        self.args, self.run = args, run
        convs = list(conversations)
        random.Random(f"sft/{args.seed}").shuffle(convs)
        n_val = max(1, min(256, len(convs) // 20))
        self.x, self.y, self.s, cut = pack(tok, convs[n_val:], args.seq_len)
        self.val = pack(tok, convs[:n_val], args.seq_len)[:3]
        run.log(f"sft data: {len(convs) - n_val} conversations in {len(self.x)} rows of {args.seq_len} tokens "
                f"({(self.y != -1).sum().item():,} assistant tokens), {n_val} for validation"
                + (f"; {cut} cut to the row length" if cut else ""))
        self.order = train.EpochOrder(len(self.x), args.seed)

    def batch(self, first, count, device):
        idx = torch.tensor([self.order(g) for g in range(first, first + count)])
        return self.x[idx].to(device), self.y[idx].to(device), self.s[idx].to(device)

    def loss(self, model, batch):
        x, y, s = batch
        logits, _ = model(x, seq_idx=s)
        loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), ignore_index=-1, reduction="sum")
        return loss, (y != -1).sum(), {}

    @torch.no_grad()
    def evaluate(self, model, step):
        """Validation loss in nats per assistant token (every process takes the same passes)."""
        run, mb = self.run, self.args.micro_batch
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
        model.train()
        return {"val_loss": (total[0] / total[1].clamp(min=1)).item()}


SFT_DEFAULTS = dict(epochs=6.0)
# What SFT takes from the run that wrote its starting checkpoint, unless given: how the loop runs,
# not how long (its own --epochs) or how fast (a third of the source's peak learning rate: README,
# Post-training, for what a tenth and two epochs left undone).
INHERITED = ["seq_len", "batch_tokens", "micro_batch", "schedule", "min_lr_frac", "weight_decay", "grad_clip",
             "seed", "dtype"]


def sft_settings(args):
    """(args, train state or None, conversations): a resumed run has its own settings; a new one
    inherits INHERITED from the source run, runs --epochs over the packed rows unless
    --max-steps, evaluates four times."""
    if args.resume:
        args, state, _, _ = train.resume_settings(args, SFT_DEFAULTS)
        return args, state, read_conversations(args.data)
    path = os.path.abspath(train.find_checkpoint(args.ckpt))
    if not os.path.isdir(path):
        raise FileNotFoundError(f"--ckpt: no checkpoint directory at {args.ckpt}")
    out = os.path.abspath(args.out)
    if os.path.exists(os.path.join(out, "ckpt")) or out == path or path.startswith(out + os.sep):
        raise ValueError(f"--out {args.out} holds a run or the checkpoint SFT starts from; give a new directory "
                         f"(--resume continues a stopped run there)")
    try:
        source = train.load_train_state(path)["args"]
    except FileNotFoundError:
        source = {}  # weights without a training run (an export, a released model): loop defaults
    conversations = read_conversations(args.data)
    args.ckpt, args.data = path, os.path.abspath(args.data)
    args.data_dir = source.get("data_dir") or os.path.join(os.path.dirname(path), "data")  # the world, for eval
    seq_len = args.seq_len or source.get("seq_len") or 512
    batch_tokens = args.batch_tokens or source.get("batch_tokens") or 16 * seq_len
    # Rows per epoch, counted as SFT will pack them (all conversations, the validation share included).
    rows = len(pack(load_tokenizer(path), conversations, seq_len)[0])
    epochs = args.epochs if args.epochs is not None else SFT_DEFAULTS["epochs"]
    steps = args.max_steps or max(1, math.ceil(epochs * rows * seq_len / batch_tokens))
    presets = {**SFT_DEFAULTS, "seq_len": seq_len, "batch_tokens": batch_tokens, "micro_batch": 16,
               "lr": source.get("lr", 3e-3) / 3, "max_steps": steps, "eval_every": max(1, steps // 4)}
    inherited = train.settle(args, presets, source, INHERITED)
    print(f"sft from {path}: inherited {', '.join(f'{k}={v}' for k, v in inherited.items()) or 'nothing'}; "
          f"lr {args.lr:.2e}, {args.max_steps} steps")
    return args, None, conversations


def sft(args):
    args, state, conversations = sft_settings(args)
    run = train.start_processes(args)
    model, tok = train.load_checkpoint(os.path.join(args.out, "ckpt") if state is not None else args.ckpt, run.device)
    model.config.chat_template = CHAT_TEMPLATE  # the saved config says: a chat model, in this template
    stage = SFT(tok, conversations, args, run)
    if state is None:
        run.log(f"before SFT: val_loss {stage.evaluate(model, 0)['val_loss']:.4f}")
    train.fit(model, stage, args, tok, run, state)
    train.end_processes(run)


# -----------------------------------------------------------------------------------------------
# 7. eval: the table per task, fact set (or kind) and language.

TASK_ORDER = ("probe", "qa", "qa-seen", "translate", "arithmetic", "format", "multiturn")


def group_of(ex):
    return ex["task"], ex.get("kind") or ex.get("set", "-"), ex["lang"]


def score(examples, outs):
    """Each example with its answer and verdict, and the table: {(task, set or kind, lang): {n,
    accuracy %, and per task: wrong % and abstain % (fact questions), chrF (translation), form %}}."""
    items, cells = [], collections.defaultdict(list)
    for ex, (answer,) in zip(examples, outs):
        v = verify(ex["check"], answer)
        items.append({**{k: ex[k] for k in ex if k != "check"}, "answer": answer, **v})
        cells[group_of(ex)].append(v)
    table = {}
    for key in sorted(cells, key=lambda k: (TASK_ORDER.index(k[0]), k[1], k[2])):
        vs = cells[key]
        row = {"n": len(vs), "accuracy": 100 * sum(v["ok"] for v in vs) / len(vs)}
        if all("verdict" in v for v in vs):
            for name in ("wrong", "abstain"):
                row[name] = 100 * sum(v["verdict"] == name for v in vs) / len(vs)
        if all("chrf" in v for v in vs):
            row["chrf"] = sum(v["chrf"] for v in vs) / len(vs)
        if all("form" in v for v in vs):
            row["form"] = 100 * sum(v["form"] for v in vs) / len(vs)
        table[" ".join(key)] = row
    return items, table



def print_table(table, title):
    print(title)
    print(f"{'task':<11}{'set / kind':<12}{'lang':<6}{'n':>5}{'acc %':>8}{'wrong %':>9}{'abst. %':>9}{'chrF':>7}{'form %':>8}")
    for key, r in table.items():
        task, group, lang = key.split(" ")
        cols = "".join(f"{r[k]:>{w}.1f}" if k in r else " " * w for k, w in
                       (("wrong", 9), ("abstain", 9), ("chrf", 7), ("form", 8)))
        print(f"{task:<11}{group:<12}{lang:<6}{r['n']:>5}{r['accuracy']:>8.1f}{cols}")


def evaluation_set(args):
    """(eval prompts, few-shot examples) from --data, or from the data the checkpoint's SFT run used."""
    data = args.data or instruction_data(args.ckpt) or ""
    path = os.path.join(data, "eval.jsonl") if os.path.isdir(data) else data
    if not path or not os.path.isfile(path):
        raise FileNotFoundError(f"no evaluation prompts{' at ' + path if path else ''}: give --data, the directory "
                                f"that `posttrain.py data` wrote")
    train_path = os.path.join(os.path.dirname(path), "train.jsonl")
    shots = few_shots(read_jsonl(train_path)) if os.path.exists(train_path) else {}
    examples = read_jsonl(path)
    if args.tasks:
        examples = [ex for ex in examples if ex["task"] in args.tasks.split(",")]
    return examples, shots


def evaluate(args):
    examples, shots = evaluation_set(args)
    model, tok = train.load_checkpoint(args.ckpt, resolve_device(args.device))
    t0 = time.time()
    items, table = score(examples, answers(model, tok, examples, shots, max_new=args.max_new_tokens))
    how = "chat template" if is_chat(model) else "few-shot prompt (3 examples per task and language)"
    print_table(table, f"{args.ckpt}: {len(examples)} prompts, greedy, {how}; {time.time() - t0:.0f}s")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"ckpt": os.path.abspath(args.ckpt), "chat": is_chat(model), "table": table, "items": items},
                      f, ensure_ascii=False, indent=1)
        print(f"wrote {args.json}")
    return table


# -----------------------------------------------------------------------------------------------
# 8. pairs: preferences between the chat model's own answers, judged by the verifier.

def instruction_data(ckpt):
    """The instruction-data directory that a post-trained checkpoint's lineage used (its SFT run's
    --data, which a DPO run records as "instructions"), or None."""
    try:
        source = train.load_train_state(train.find_checkpoint(ckpt))["args"]
    except FileNotFoundError:
        return None
    data = source.get("instructions") or source.get("data") or ""
    return (data if os.path.isdir(data) else os.path.dirname(data)) or None


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
        return short_answer(f, lang) + CHATTY[lang]
    return short_answer(f, "ja" if kind == "english" else "en")


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
    outs = answers(model, tok, asked, {}, max_new=args.max_new_tokens, temperature=args.temperature,
                   samples=args.samples, seed=seed)
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
    p.add_argument("--prompts", type=int, default=d("prompts"), help="training prompts asked (default 1024)")
    p.add_argument("--samples", type=int, default=d("samples"), help="answers sampled per prompt (default 4)")
    p.add_argument("--temperature", type=float, default=d("temperature"), help="sampling temperature (default 1.0)")
    p.add_argument("--max-new-tokens", type=int, default=d("max_new_tokens"), help="longest answer in tokens (default 48)")
    p.add_argument("--all-wrong", choices=["reference", "drop"], default=d("all_wrong"),
                   help="a prompt whose samples are all rejected: its reference answer is chosen (default), or drop it")
    p.add_argument("--form-pairs", type=int, default=d("form_pairs"),
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


def pairs_command(args):
    if os.path.exists(args.out):
        raise ValueError(f"--out {args.out} exists; give a new file")
    data = args.data or instruction_data(args.ckpt)
    if not data or not os.path.isfile(os.path.join(data, "train.jsonl")):
        raise FileNotFoundError("no instruction data to take prompts from: give --data, the directory `posttrain.py data` wrote")
    model, tok = train.load_checkpoint(args.ckpt, resolve_device(args.device))
    t0 = time.time()
    pairs, tally = make_pairs(model, tok, data, args, args.seed)
    write_jsonl(args.out, pairs)
    print_pairs(pairs, tally, args.out)
    print(f"{args.samples} samples per prompt at temperature {args.temperature}, {time.time() - t0:.0f}s")


# -----------------------------------------------------------------------------------------------
# 9. dpo: direct preference optimization (Rafailov et al. 2023) through the shared loop.

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
    nll = F.cross_entropy(logits.float().transpose(1, 2), y, ignore_index=-1, reduction="none")  # (b, T)
    return -nll.sum(-1)


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
    """The DPO stage for train.fit: pairs in a shuffled order per epoch, chosen and rejected
    answers in one forward pass, the loss per pair (fit averages it over the step's pairs).

    The reference model is the starting policy, frozen. Its log-probs of every pair are computed
    once, here, in eval mode without gradients (in args.ref_dtype): it never changes, so this
    equals running it beside the policy at every step, saves its forward pass there (a quarter
    of a step's compute), and it is not kept in memory while the policy trains. Evaluated on
    held-out pairs (loss, reward accuracy) and in bits per byte on pre-training's validation
    text: how far the policy drifts from the language model it came from."""

    def __init__(self, reference, tok, pairs, args, run):
        self.tok, self.args, self.run = tok, args, run
        pairs = list(pairs)
        random.Random(f"dpo/{args.seed}").shuffle(pairs)
        n_val = n_validation(len(pairs))
        self.rows = [encode_pair(tok, p, args.seq_len) for p in pairs]
        reference = reference.to(getattr(torch, args.ref_dtype)).eval().requires_grad_(False)
        with torch.no_grad():
            ref = [self.logps(reference, list(range(i, min(i + args.micro_batch, len(pairs)))))
                   for i in range(0, len(pairs), args.micro_batch)]
        self.ref = torch.cat(ref, dim=1).float().cpu()                               # (2, n): chosen, rejected
        self.val_pairs, self.train_pairs = list(range(n_val)), list(range(n_val, len(pairs)))
        self.order = train.EpochOrder(len(self.train_pairs), args.seed)
        val_bin = os.path.join(args.data_dir or "", "val.bin")
        self.text = train.token_file(val_bin, tok) if os.path.exists(val_bin) else None  # pre-training validation
        self.nbytes = token_bytes(tok)
        run.log(f"dpo data: {len(self.train_pairs)} pairs, {n_val} for validation; reference log-probs in {args.ref_dtype}: "
                f"chosen {self.ref[0].mean():.2f}, rejected {self.ref[1].mean():.2f} on average")

    def logps(self, model, idx):
        """(2, len(idx)) summed answer log-probs of pairs idx, chosen and rejected in one pass."""
        x, y = collate(self.tok, [self.rows[i][k] for k in (0, 1) for i in idx], next(model.parameters()).device)
        with autocast(self.run.device, self.run.dtype):
            return response_logps(model, x, y).view(2, len(idx))

    def batch(self, first, count, device):
        return [self.train_pairs[self.order(g)] for g in range(first, first + count)]

    def loss(self, model, idx):
        policy = self.logps(model, idx)                                               # (2, b)
        ref = self.ref[:, idx].to(policy.device)
        a = self.args
        loss, rc, rr = dpo_loss(policy[0], policy[1], ref[0], ref[1], a.beta, a.label_smoothing, a.loss)
        return loss.sum(), len(idx), {"reward_acc": (rc > rr).float().sum(), "margin": (rc - rr).sum(),
                                      "logp_chosen": policy[0].detach().sum(), "logp_rejected": policy[1].detach().sum()}

    @torch.no_grad()
    def evaluate(self, model, step):
        """Every process takes the same passes over the few held-out pairs (and the text): FSDP
        needs them all in each forward, and it costs little."""
        model.eval()
        totals = torch.zeros(3)
        for i in range(0, len(self.val_pairs), self.args.micro_batch):
            idx = self.val_pairs[i:i + self.args.micro_batch]
            loss, n, m = self.loss(model, idx)
            totals += torch.tensor([loss.item(), n, m["reward_acc"].item()])
        out = {"val_loss": totals[0].item() / totals[1].item(), "val_reward_acc": totals[2].item() / totals[1].item()}
        if self.text is not None:
            with autocast(self.run.device, self.run.dtype):
                out["text_bpb"] = bits_per_byte(model, self.text, self.nbytes, self.args.text_seq_len, self.args.eval_tokens)
        model.train()
        return out


DPO_DEFAULTS = dict(epochs=2.0, beta=0.1, label_smoothing=0.0, loss="sigmoid", ref_dtype="float32", rounds=1,
                    prompts=1024, samples=4, temperature=1.0, max_new_tokens=48, all_wrong="reference", form_pairs=256,
                    eval_tokens=2**16)
DPO_INHERITED = ["micro_batch", "schedule", "min_lr_frac", "weight_decay", "grad_clip", "seed", "dtype"]
PAIRS_PER_STEP = 32


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


def dpo_settings(args):
    """(args, train state or None) of the round to run: a new run's first round, settled from
    the starting checkpoint's run (a tenth of its learning rate); --resume: the last round's own
    settings and state (a finished round hands on to the next)."""
    if args.resume:
        top = os.path.abspath(args.out)
        done = sorted(int(d[5:]) for d in (os.listdir(top) if os.path.isdir(top) else [])
                      if re.fullmatch(r"round\d+", d) and os.path.isdir(train.find_checkpoint(os.path.join(top, d, "ckpt"))))
        if not done:
            raise FileNotFoundError(f"--resume: no DPO round with a checkpoint in {args.out}")
        args.out = round_dir(top, done[-1])
        args, state, path, _ = train.resume_settings(args, DPO_DEFAULTS)
        if state["step"] < args.max_steps:
            return args, state
        return next_round(args, path), None
    path = os.path.abspath(train.find_checkpoint(args.ckpt))
    if not os.path.isdir(path):
        raise FileNotFoundError(f"--ckpt: no checkpoint directory at {args.ckpt}")
    top = os.path.abspath(args.out)
    if os.path.exists(round_dir(top, 1)) or top == path or path.startswith(top + os.sep):
        raise ValueError(f"--out {args.out} holds a DPO run or the checkpoint it starts from; give a new directory "
                         f"(--resume continues a stopped run there)")
    try:
        source = train.load_train_state(path)["args"]
    except FileNotFoundError:
        source = {}
    args.instructions = instruction_data(path)  # prompts to sample from, and the evaluation's
    if args.data is not None:
        read_pairs(args.data)  # bad pairs are an error now, not after the settings are printed
        args.data = os.path.abspath(args.data)
    elif not args.instructions or not os.path.isfile(os.path.join(args.instructions, "train.jsonl")):
        raise FileNotFoundError(f"{args.ckpt} records no instruction data to sample prompts from "
                                f"(it was not written by `posttrain.py sft`): give --data with pairs")
    args.ckpt, args.top, args.round = path, top, 1
    args.data_dir = source.get("data_dir")   # pre-training's data: its validation text, the world
    args.text_seq_len = source.get("text_seq_len") or source.get("seq_len") or 512
    presets = {**DPO_DEFAULTS, "micro_batch": 16, "lr": source.get("lr", 1e-3) / 10, "max_steps": 1}
    inherited = train.settle(args, presets, source, DPO_INHERITED)
    args.out = round_dir(top, 1)
    print(f"dpo from {path}: inherited {', '.join(f'{k}={v}' for k, v in inherited.items()) or 'nothing'}; "
          f"lr {args.lr:.2e}, beta {args.beta}, {args.loss} loss, {args.rounds} round(s)")
    return args, None


def next_round(args, path):
    """The settings of the round after args's, which starts from its checkpoint at path."""
    nxt = argparse.Namespace(**vars(args))
    nxt.round, nxt.ckpt, nxt.out, nxt.resume = args.round + 1, path, round_dir(args.top, args.round + 1), False
    return nxt


def dpo(args):
    args, state = dpo_settings(args)
    run = train.start_processes(args)
    while args.round <= args.rounds:
        # The reference is the policy this round starts from (iterative DPO: each round's own start).
        reference, tok = train.load_checkpoint(args.ckpt, run.device)
        if state is not None:
            pairs = read_pairs(args.data)
            policy, _ = train.load_checkpoint(os.path.join(args.out, "ckpt"), run.device)
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
        if not is_chat(policy):
            raise ValueError(f"{args.ckpt} is not a chat model: DPO trains answers in the chat template (run SFT first)")
        stage = DPO(reference, tok, pairs, args, run)
        del reference  # its log-probs are in the stage
        if state is None:
            run.log(f"round {args.round} before DPO: " + ", ".join(f"{k} {v:.4f}" for k, v in stage.evaluate(policy, 0).items()))
        train.fit(policy, stage, args, tok, run, state)
        args, state = next_round(args, os.path.join(args.out, "ckpt")), None
    run.log(f"the policy after {args.rounds} round(s): {os.path.join(round_dir(args.top, args.rounds), 'ckpt')}")
    train.end_processes(run)


# -----------------------------------------------------------------------------------------------
# 10. merge: checkpoints of one config combined tensor by tensor (the methods of mergekit).

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
    """TIES' trim: tau with all but its round(density · n) largest magnitudes set to zero."""
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
    """One merged tensor, computed in float32 and returned in the first model's dtype.
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
    """{name: bytes} of a checkpoint's files besides its weights, config and training state."""
    files = {}
    for name in sorted(os.listdir(path)):
        if name not in ("config.json", "train_state.pt") and not name.startswith("model"):
            with open(os.path.join(path, name), "rb") as f:
                files[name] = f.read()
    return files


def merge_inputs(args):
    """(config of the output, tokenizer files {name: bytes}, base Weights or None, [Weights of
    --models], their paths) after checking that every input has the same config (chat_template
    aside), tokenizer files and tensors."""
    paths = [train.find_checkpoint(p) for p in ([args.base] if args.base else []) + args.models]
    configs = {}
    for p in paths:
        if not os.path.isfile(os.path.join(p, "config.json")):
            raise FileNotFoundError(f"no checkpoint at {p} (config.json missing)")
        with open(os.path.join(p, "config.json")) as f:
            configs[p] = json.load(f)
    first, tokenizer = paths[0], tokenizer_files(paths[0])
    for p in paths[1:]:
        differ = sorted(k for k in configs[first].keys() | configs[p].keys() if k not in ("chat_template", "torch_dtype")
                        and configs[first].get(k) != configs[p].get(k))
        if differ:
            raise ValueError(f"{p} and {first} have different configs ({', '.join(differ)}): only models of one "
                             f"architecture and size can be merged")
        if tokenizer_files(p) != tokenizer:
            raise ValueError(f"{p} and {first} have different tokenizers: their token ids mean different things")
    weights = [Weights(p) for p in paths]
    specs = {n: weights[0].spec(n) for n in weights[0].names()}
    for p, w in zip(paths[1:], weights[1:]):
        if {n: w.spec(n) for n in w.names()} != specs:
            raise ValueError(f"{p} and {first} hold different tensors (names, shapes or dtypes)")
    models = paths[-len(args.models):]
    config = dict(configs[models[0]])
    # A chat model among the inputs makes the merge one: its template marker is carried over.
    config["chat_template"] = next((configs[p]["chat_template"] for p in models + paths[:1]
                                    if configs[p].get("chat_template")), None)
    return config, tokenizer, weights[0] if args.base else None, weights[-len(models):], models


def merge(args):
    out = os.path.join(args.out, "ckpt")
    config, tokenizer, base, models, model_paths = merge_inputs(args)
    base_path = train.find_checkpoint(args.base) if args.base else None
    if os.path.abspath(out) in {os.path.abspath(p) for p in model_paths + [base_path] if p}:
        raise ValueError("--out would overwrite one of the checkpoints it merges; give a new directory")
    w = args.weights or [1.0] * len(models)
    t0 = time.time()
    specs = [(n, *models[0].spec(n)) for n in models[0].names()]
    tmp = out + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    merged = (merge_tensor(args.method, base[n] if base else None, [m[n] for m in models], w, n, args.t,
                           args.lam, args.density, args.seed) for n, _, _ in specs)
    write_safetensors(os.path.join(tmp, "model.safetensors"), specs, merged)
    with open(os.path.join(tmp, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    for name, data in tokenizer.items():
        with open(os.path.join(tmp, name), "wb") as f:
            f.write(data)
    train.swap_in(tmp, out)
    recipe = {"method": args.method, "base": base_path, "models": model_paths, "weights": w, "t": args.t, "lambda": args.lam, "density": args.density,
              "seed": args.seed}
    with open(os.path.join(args.out, "merge.json"), "w") as f:
        json.dump(recipe, f, indent=1)
    print(f"merged {len(models)} model(s) by {args.method} into {out}: {len(specs)} tensors in {time.time() - t0:.1f}s")


# -----------------------------------------------------------------------------------------------

def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    d = sub.add_parser("data", help="write instruction data (train.jsonl), evaluation prompts (eval.jsonl) and the "
                                    "split of facts (facts.json) about the world of --ckpt's pre-training")
    d.add_argument("--ckpt", required=True, help="a checkpoint trained on the synthetic corpus (its world is asked about)")
    d.add_argument("--out", required=True, help="directory for train.jsonl, eval.jsonl and facts.json")
    d.add_argument("--examples", type=int, default=6000, help="SFT conversations (default 6000)")
    d.add_argument("--mix", help=f"task weights, e.g. qa=4,translate=1 (default {','.join(f'{k}={v:g}' for k, v in MIX.items())})")
    d.add_argument("--eval-per-cell", type=int, default=100, help="evaluation prompts per task and language (default 100)")
    d.add_argument("--teacher", help="a checkpoint whose answers replace the templates' when the verifier accepts them")
    d.add_argument("--samples", type=int, default=4, help="with --teacher: samples per example (default 4)")
    d.add_argument("--temperature", type=float, default=0.8, help="with --teacher: sampling temperature (default 0.8)")
    d.add_argument("--seed", type=int, default=1337, help="seed of the split, the examples and the samples")
    d.add_argument("--device", default="auto", help="with --teacher: auto (default), cpu, cuda, mps")
    s = sub.add_parser("sft", help="supervised fine-tuning on conversations, loss on the assistants' tokens")
    s.add_argument("--ckpt", help="the checkpoint to start from (it is only read)")
    s.add_argument("--data", help="conversations: a JSONL file of {\"messages\": [...]}, or a directory with train.jsonl")
    s.add_argument("--epochs", type=float, help="passes over the packed conversations (default 6; --max-steps overrides)")
    train.add_loop_arguments(s)
    e = sub.add_parser("eval", help="greedy answers to the evaluation prompts, scored per task, fact set and language")
    e.add_argument("--ckpt", required=True, help="the checkpoint to evaluate (chat or base)")
    e.add_argument("--data", help="eval.jsonl, or the directory `data` wrote (default: the one the SFT run used)")
    e.add_argument("--tasks", help=f"comma-separated subset of {','.join(TASK_ORDER)}")
    e.add_argument("--max-new-tokens", type=int, default=48, help="longest answer in tokens (default 48)")
    e.add_argument("--json", help="write the table and every answer with its verdict to this file")
    e.add_argument("--device", default="auto", help="auto (default), cpu, cuda, mps")
    pr = sub.add_parser("pairs", help="preference pairs from a chat model's own samples, judged by the verifier")
    pr.add_argument("--ckpt", required=True, help="the chat model to sample (an SFT run's checkpoint)")
    pr.add_argument("--out", required=True, help="the JSONL file to write")
    pr.add_argument("--data", help="instruction data whose training prompts are asked (default: the one the SFT run used)")
    add_pair_arguments(pr, DPO_DEFAULTS)
    pr.add_argument("--seed", type=int, default=1337, help="seed of the prompts and the samples (default 1337)")
    pr.add_argument("--device", default="auto", help="auto (default), cpu, cuda, mps")
    o = sub.add_parser("dpo", help="direct preference optimization of a chat model, on its own samples or --data pairs")
    o.add_argument("--ckpt", help="the chat model to start from (it is only read); also the frozen reference")
    o.add_argument("--data", help="pairs (JSONL, as `pairs` writes) instead of sampling them from the model")
    o.add_argument("--beta", type=float, help=f"strength of the pull to the reference (default {DPO_DEFAULTS['beta']})")
    o.add_argument("--label-smoothing", type=float, help="conservative DPO: the share of labels taken to be wrong (default 0)")
    o.add_argument("--loss", choices=["sigmoid", "ipo"], help="sigmoid (DPO, default) or ipo")
    o.add_argument("--ref-dtype", choices=["float32", "bfloat16"], help="precision of the reference model (default float32)")
    o.add_argument("--rounds", type=int, help="iterative DPO: sample, label and train this many times, each round "
                                              "from the last one's policy (default 1)")
    o.add_argument("--epochs", type=float, help=f"passes over the pairs per round (default {DPO_DEFAULTS['epochs']:g})")
    o.add_argument("--eval-tokens", type=int, help="tokens of pre-training validation text for bits per byte (default 65536)")
    add_pair_arguments(o, {})
    train.add_loop_arguments(o)
    m = sub.add_parser("merge", help="merge checkpoints of one config tensor by tensor into a new checkpoint")
    m.add_argument("--models", nargs="+", required=True, help="the checkpoints to merge")
    m.add_argument("--base", help="the model the task vectors are taken from (task_arithmetic, ties, dare, dare_ties)")
    m.add_argument("--method", required=True, choices=MERGE_METHODS)
    m.add_argument("--weights", type=float, nargs="+", help="one weight per model (default 1 each; linear normalises them)")
    m.add_argument("--t", type=float, default=0.5, help="slerp: 0 is the first model, 1 the second (default 0.5)")
    m.add_argument("--lambda", dest="lam", type=float, default=1.0, help="scale of the merged task vector (default 1)")
    m.add_argument("--density", type=float, default=0.5, help="ties, dare: the share of each task vector kept (default 0.5)")
    m.add_argument("--seed", type=int, default=1337, help="dare: seed of the drop (default 1337)")
    m.add_argument("--out", required=True, help="output directory: ckpt/ and merge.json (the recipe)")
    args = ap.parse_args(argv)
    if args.command == "merge":
        task_vectors = args.method not in ("linear", "slerp")
        if task_vectors != bool(args.base):
            ap.error(f"--method {args.method} " + ("needs --base" if task_vectors else "merges --models alone; drop --base"))
        if args.method == "slerp" and len(args.models) != 2:
            ap.error("--method slerp interpolates between exactly two --models")
        if args.weights and len(args.weights) != len(args.models):
            ap.error(f"--weights: give one per model ({len(args.models)})")
        if args.method == "linear" and args.weights and not sum(args.weights) > 0:
            ap.error("--weights of a linear merge must sum to more than 0")
        if not 0 <= args.t <= 1 or not 0 < args.density <= 1:
            ap.error("--t must be in [0, 1] and --density in (0, 1]")
    if args.command in ("pairs", "dpo"):
        train.check_positive(ap, args, ["prompts", "samples", "max_new_tokens", "rounds", "eval_tokens"])
        if args.form_pairs is not None and args.form_pairs < 0:
            ap.error("--form-pairs must be 0 or more")
    if args.command == "dpo":
        train.check_positive(ap, args, ["seq_len", "batch_tokens", "micro_batch", "max_steps", "eval_every",
                                        "warmup_steps", "stop_at_step"])
        if args.beta is not None and not args.beta > 0:
            ap.error("--beta must be positive")
        if args.label_smoothing is not None and not 0 <= args.label_smoothing < 0.5:
            ap.error("--label-smoothing must be in [0, 0.5)")
        if args.epochs is not None and not (math.isfinite(args.epochs) and args.epochs > 0):
            ap.error("--epochs must be a positive number")
        if args.data and (args.rounds or 1) > 1:
            ap.error("--rounds samples new pairs from each round's policy; with --data pairs there is one round")
        if args.out is None or (not args.resume and args.ckpt is None):
            ap.error("dpo needs --ckpt and --out (or --resume and --out)")
    if args.command == "sft":
        train.check_positive(ap, args, ["seq_len", "batch_tokens", "micro_batch", "max_steps", "eval_every",
                                        "warmup_steps", "stop_at_step"])
        if args.epochs is not None and not (math.isfinite(args.epochs) and args.epochs > 0):
            ap.error("--epochs must be a positive number")
        if args.out is None or (not args.resume and (args.ckpt is None or args.data is None)):
            ap.error("sft needs --ckpt, --data and --out (or --resume and --out)")
    if args.command == "data":
        train.check_positive(ap, args, ["examples", "eval_per_cell", "samples"])
    if args.command == "eval" and args.tasks and not set(args.tasks.split(",")) <= set(TASK_ORDER):
        ap.error(f"--tasks: choose from {', '.join(TASK_ORDER)}")
    return args


def main(argv=None):
    args = parse_args(argv)
    try:
        {"data": make_data, "sft": sft, "eval": evaluate, "pairs": pairs_command, "dpo": dpo,
         "merge": merge}[args.command](args)
    except (FileNotFoundError, ValueError, FloatingPointError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
