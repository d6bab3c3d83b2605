"""
tasks.py: the instruction tasks about the synthetic world, the verifier that scores answers to
them, asking a model (a base model with a few-shot prompt, a chat model in its template), and two
commands: `data` writes instruction data and evaluation prompts, `eval` scores a model.

    python tasks.py data --ckpt out/posttrain/base/ckpt --out out/posttrain/data
    python tasks.py eval --ckpt out/posttrain/sft/ckpt [--json results.json]
    python tasks.py eval --ckpt plamo-2-1b-sft --data my_eval.jsonl   # your conversations, your references

Read top to bottom:
1. The world a checkpoint was pre-trained on (its lineage's text records it), and its facts in
   three sets: facts SFT examples use, facts seen only in pre-training (can SFT teach the model to
   answer about them? knowledge extraction), and the held-out facts no training text states (any
   confident answer is a hallucination).
2. Examples, one writer per task: fact QA, translation, arithmetic word problems, instructions
   about form, multi-turn follow-ups, and questions about people who do not exist ("I have no
   information"), in Japanese and English.
3. The verifier: a fact answer is right when it holds the value in an allowed form and no other
   value of that attribute; chrF and exact match for translation; the last number for arithmetic.
4. Asking a model, in batches of prompts of one length.
5. data: the files a person can read (train.jsonl, eval.jsonl, facts.json); a teacher model may
   write the answers, kept when the verifier accepts them (rejection sampling).
6. eval: the table per task, fact set and language; or, for your own conversations, exact match,
   chrF and the reference answer's loss per token.
"""
import argparse
import collections
import json
import math
import os
import random
import re
import time
import unicodedata

import torch

import corpus
import infer
import runs
from common import check_output, cli, nonneg_float, positive_int, resolve_device, write_jsonl
from plamo2 import find_checkpoint, generate_text, read_lineage, token_losses
from tokenizer import CHAT_TEMPLATE, chat_markers, render_chat


# -----------------------------------------------------------------------------------------------
# 1. The world of a checkpoint, and its facts in three sets.

def load_world(ckpt):
    """(world, corpus) that the checkpoint's pre-training text was generated from: rebuilt from
    the settings its prepared data's heldout_facts.json records (the lineage's "text"), and
    checked against it."""
    source = runs.start_from(ckpt)
    text = source.lineage.get("text")
    facts_path = os.path.join(text or "", "heldout_facts.json")
    if not text or not os.path.exists(facts_path):
        raise FileNotFoundError(f"--ckpt {ckpt}: the instruction data asks about the synthetic world, and this "
                                f"checkpoint was not pre-trained on the synthetic corpus (its lineage records "
                                f"{'no text' if not text else 'the text ' + text}); bring your own --data instead")
    try:
        with open(facts_path, encoding="utf-8") as f:
            recorded = json.load(f)
        world = recorded["world"]
        c = corpus.generate_corpus(seed=world["seed"], target_bytes=world["target_bytes"],
                                   heldout_fraction=world["heldout_fraction"], n_people=world["n_people"])
        same = [f["id"] for f in c.heldout_facts] == [f["id"] for f in recorded["heldout"]]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{facts_path} is not the held-out facts file data.py writes ({type(e).__name__}: {e})") from None
    if not same:
        raise ValueError(f"the corpus rebuilt from {facts_path} differs from the one it was written with")
    return corpus.build_world(world["seed"], world["n_people"]), c


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
        """n examples of task, alternating Japanese and English (every cell has half), each about an
        sft fact drawn at random; a writer may turn a draw down (its facts are not all sft facts)."""
        if task not in MIX:
            raise ValueError(f"unknown task {task!r}")
        write, out = getattr(self, task), []
        while len(out) < n:
            lang = "ja" if len(out) % 2 == 0 else "en"
            ex = {"task": task, "lang": lang, "set": "sft"}
            msgs = write(ex, rng.choice(self.sets["sft"]), lang, rng, split)
            if msgs is None:
                continue
            messages = [{"role": "user" if i % 2 == 0 else "assistant", "content": m} for i, m in enumerate(msgs)]
            if split == "eval":
                ex["messages"], ex["reference"] = messages[:-1], messages[-1]["content"]
            else:
                ex["messages"] = messages
            out.append(ex)
        return out

    # The writers: (ex, an sft fact, language, rng, split) -> the conversation's texts, user and
    # assistant in turn, with ex's "check" (what the verifier needs) and other fields filled in;
    # or None to draw again.

    def qa(self, ex, f, lang, rng, split):
        ex["check"] = self.check(f, lang)
        return [self.question(f, lang, rng, split), self.answer(f, lang, rng)]

    def abstain(self, ex, f, lang, rng, split):  # a made-up person: nothing to know
        e = rng.choice(self.unknown[:len(self.unknown) // 2])[lang == "en"]
        q = rng.choice(ASK[split][lang]).format(e=e, n=noun(rng.choice(corpus.attributes("person")), lang))
        ex["set"], ex["check"] = "unknown", {"type": "abstain"}
        return [q, NO_INFO[lang].format(e=e)]

    def translate(self, ex, f, lang, rng, split):
        t, other = corpus.ATTRS[f["attribute"]], "en" if lang == "ja" else "ja"
        k = rng.randrange(len(t["ja"]))
        (src, ok1), (tgt, ok2) = (self.sentence(self.entity(f), t[L][k % len(t[L])], L) for L in (lang, other))
        if not (ok1 and ok2):
            return None
        ex["kind"], ex["check"] = f"{lang}->{other}", {"type": "translation", "reference": tgt}
        return [rng.choice(TRANSLATE[split][lang]).format(s=src), tgt]

    def arithmetic(self, ex, f, lang, rng, split):
        ops, q, a = rng.choice(PROBLEMS[lang])
        op = rng.choice(ops)
        x, y, z = corpus.problem(rng, op)
        item = rng.choice(corpus.ITEMS)
        fill = dict(a=x, b=y, c=z, sym=corpus.SYMBOLS[op], item=item[0] if lang == "ja" else item[1],
                    items=item[2], name=rng.choice(self.w.people).name[lang])
        ex["check"] = {"type": "number", "answer": z}
        return [q.format(**fill), a.format(**fill)]

    def format(self, ex, f, lang, rng, split):
        kind = ex["kind"] = rng.choice(["english", "japanese", "short", "list"])
        if kind == "list":
            e = self.entity(f)
            fs = [corpus.fact(self.w, e, a) for a in rng.sample(corpus.attributes(e.kind), 3)]
            if not all(g["id"] in self.sft_ids for g in fs):
                return None
            ns = [noun(g["attribute"], lang) for g in fs]
            ns = "、".join(ns) if lang == "ja" else f"{ns[0]}, {ns[1]} and {ns[2]}"
            q = LIST_ASK[split][lang].format(e=f["entity"] if lang == "ja" else f["entity_en"], ns=ns)
            a = "\n".join(f"・{noun(g['attribute'], 'ja')}：{g['value']}" if lang == "ja" else
                          f"- {noun(g['attribute'], 'en').capitalize()}: {g['value_en']}" for g in fs)
            ex["check"] = {"type": "list", "items": [self.check(g, lang) for g in fs]}
            return [q, a]
        if FORMS[kind][lang == "en"] is None:  # "in English" is asked in Japanese, and back
            lang = ex["lang"] = "ja" if lang == "en" else "en"
        said = {"english": "en", "japanese": "ja"}.get(kind, lang)
        q = self.question(f, lang, rng, split) + ("" if lang == "ja" else " ") + FORMS[kind][lang == "en"]
        a = (f["value"] if said == "ja" else f["value_en"]) if kind == "short" else short_answer(f, said)
        ex["check"] = {**self.check(f, said), "type": "form", "form": kind}
        ex["fact"] = f["id"]  # pairs state its value in the wrong form
        return [q, a]

    def multiturn(self, ex, f, lang, rng, split):  # the second question names no entity: "And what is the hobby?"
        e = self.entity(f)
        g = corpus.fact(self.w, e, rng.choice([a for a in corpus.attributes(e.kind) if a != f["attribute"]]))
        if g["id"] not in self.sft_ids:  # the held-out fact of an sft entity
            return None
        ex["check"] = self.check(g, lang)
        return [self.question(f, lang, rng, "train"), short_answer(f, lang),
                FOLLOW[split][lang].format(n=noun(g["attribute"], lang)), short_answer(g, lang)]

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


def answers(model, tok, examples, shots, max_new=48, **kw):
    """[[answer] * samples] for each example, cut as cut_answer does."""
    was_training = model.training
    model.eval()
    # A base model goes on writing past its answer: stop it at the blank line after (or the next frame).
    stop_text = () if is_chat(model) else ("\n\n", "\n" + FRAME["ja"][0], "\n" + FRAME["en"][0])
    texts = generate_text(model, tok, [prompt(model, tok, ex, shots) for ex in examples], max_new, stop_text=stop_text,
                          **kw)
    model.train(was_training)
    return [[cut_answer(model, ex, t) for t in ts] for ex, ts in zip(examples, texts)]


# -----------------------------------------------------------------------------------------------
# 5. data: the instruction data and the evaluation prompts, written as JSONL a person can read.

def read_jsonl(path):
    """The JSON objects of a JSONL file, one per non-blank line; one clear error naming the line."""
    rows = []
    try:
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError:
                        raise ValueError(f"{path}: line {n} is not valid JSON") from None
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not UTF-8 text") from None
    except IsADirectoryError:
        raise ValueError(f"{path} is a directory; give a JSONL file") from None
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
    teacher, tok = runs.load_checkpoint(args.teacher, device)
    asked = [{**ex, "messages": ex["messages"][:-1]} for ex in examples]
    t0 = time.time()
    outs = answers(teacher, tok, asked, few_shots(examples), temperature=args.temperature, samples=args.samples,
                   seed=args.seed, what="the teacher's answers")
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
    check_output(args.out, "--out", [("--ckpt", args.ckpt), ("--teacher", args.teacher)])
    if os.path.exists(os.path.join(args.out, "train.jsonl")) and not args.overwrite:
        raise ValueError(f"--out {args.out} holds instruction data already; give a new directory, or --overwrite")
    mix = parse_mix(args.mix)
    w, c = load_world(args.ckpt)
    sets = split_facts(w, c, args.seed)
    q = Questions(w, sets, unknown_people(w, 2 * args.eval_per_cell, args.seed))
    rng, total = random.Random(f"data/{args.seed}"), sum(mix.values())
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
    facts = {"ckpt": os.path.realpath(args.ckpt), "seed": args.seed, "sets": sets, "unknown_people": q.unknown}
    write_json(os.path.join(args.out, "facts.json"), facts)
    counts = collections.Counter(ex["task"] for ex in examples)
    exp = {k: sorted(f["exposures"] for f in v) for k, v in sets.items()}
    print("facts: " + ", ".join(f"{k} {len(v)} (median {v[len(v) // 2] if v else 0} train documents each)"
                                for k, v in exp.items()))
    print(f"wrote {args.out}/train.jsonl ({len(examples)} conversations: "
          + ", ".join(f"{t} {n}" for t, n in counts.items()) + f"), eval.jsonl ({len(evals)} prompts), facts.json")
    print(f"next: python posttrain.py sft --ckpt {args.ckpt} --data {args.out} --out <dir>")


def write_json(path, obj):
    from common import atomic_write_text
    atomic_write_text(path, json.dumps(obj, ensure_ascii=False, indent=1))


# -----------------------------------------------------------------------------------------------
# 6. eval: the synthetic world's table per task, fact set (or kind) and language; or, for your
#    own conversations (no "check"), exact match, chrF and the reference answer's loss.

TASK_ORDER = ("probe", "qa", "qa-seen", "translate", "arithmetic", "format", "multiturn")
CHECKS = {"fact": ("forms", "others"), "abstain": (), "number": ("answer",), "translation": ("reference",),
          "list": ("items",), "form": ("forms", "others", "form")}


def group_of(ex):
    return ex["task"], ex.get("kind") or ex.get("set", "-"), ex["lang"]


def check_example(ex, path, n):
    """One clear error naming the line when an evaluation example of the synthetic world is malformed."""
    c = ex.get("check") if isinstance(ex, dict) else None
    ok = (isinstance(c, dict) and c.get("type") in CHECKS and all(k in c for k in CHECKS[c["type"]])
          and ex.get("task") in TASK_ORDER and ex.get("lang") in ("ja", "en")
          and (isinstance(ex.get("messages"), list) or isinstance(ex.get("prompt"), str)))
    if not ok:
        raise ValueError(f"{path}: example {n} is not an evaluation example of `tasks.py data` (task, lang, messages "
                         f"or prompt, and a check of type {', '.join(CHECKS)}); your own conversations carry no check")


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


def knowledge_note(table):
    """A sentence when the completion probe says the model does not know its world's trained facts
    (it completes them no more often than the held-out ones, which no text states), else ''."""
    def probe(s):
        cells = [r for k, r in table.items() if k.startswith(f"probe {s} ")]
        n = sum(r["n"] for r in cells)
        return sum(r["accuracy"] * r["n"] for r in cells) / n if n else None
    trained, held = probe("pretrain"), probe("heldout")
    if trained is None or held is None or trained > held + 20:
        return ""
    return (f"note: this model completes {trained:.0f}% of the facts its pre-training stated, about as often as the "
            f"held-out ones no text states ({held:.0f}%): it has not learned its world's facts, so the fact questions "
            f"cannot go well. A base that knows them (a small world, each fact in ~300 documents; it completes "
            f"all of them): python train.py --size tiny --world-people 30 --heldout-frac 0.25")


def evaluation_set(args, lineage):
    """(examples, few-shot examples, whether they are the synthetic world's) from --data, or from
    the data the checkpoint's SFT run used (its lineage's "instructions")."""
    data = args.data or lineage.get("instructions") or ""
    path = os.path.join(data, "eval.jsonl") if os.path.isdir(data) else data
    if not path or not os.path.isfile(path):
        raise FileNotFoundError(f"no evaluation data{' at ' + path if path else ''}: give --data, your conversations "
                                f"(JSONL) or the directory that `tasks.py data` wrote")
    examples = read_jsonl(path)
    if not examples:
        raise ValueError(f"{path} holds no examples")
    world = [isinstance(ex, dict) and "check" in ex for ex in examples]
    if any(world) and not all(world):
        n = world.index(False) + 1 if all(world[:1]) else world.index(True) + 1
        raise ValueError(f"{path}: example {n} is not like the first: mix either `tasks.py data` examples (with a "
                         f"check) or your own conversations (without), not both")
    if all(world):
        for n, ex in enumerate(examples, 1):
            check_example(ex, path, n)
        train_path = os.path.join(os.path.dirname(path), "train.jsonl")
        shots = few_shots(read_jsonl(train_path)) if os.path.exists(train_path) else {}
        if args.tasks:
            examples = [ex for ex in examples if ex["task"] in args.tasks.split(",")]
        return examples, shots, True
    for n, ex in enumerate(examples, 1):
        msgs = ex.get("messages") if isinstance(ex, dict) else None
        if not (valid_messages(msgs) and len(msgs) >= 2 and msgs[-1]["role"] == "assistant"):
            raise ValueError(f"{path}: conversation {n} is not {{\"messages\": [..., {{\"role\": \"assistant\", "
                             f"\"content\": the reference answer}}]}}")
    return examples, {}, False


def valid_messages(msgs):
    return isinstance(msgs, list) and bool(msgs) and all(
        isinstance(m, dict) and m.get("role") in ("system", "user", "assistant") and isinstance(m.get("content"), str)
        for m in msgs)


@torch.no_grad()
def reference_losses(model, tok, prompts, references, batch=16):
    """Nats per token of each reference answer given its prompt (token ids), and its token count:
    what likelihood-based evaluation (lm-eval's) reports. Rows are right-padded (a causal model
    never sees what follows a position)."""
    device = next(model.parameters()).device
    out = []
    for i in range(0, len(prompts), batch):
        rows = [(p, r) for p, r in zip(prompts[i:i + batch], references[i:i + batch])]
        T = max(len(p) + len(r) for p, r in rows) - 1
        x = torch.full((len(rows), T), tok.pad_id)
        y = torch.full((len(rows), T), -1)
        for k, (p, r) in enumerate(rows):
            ids = p + r
            x[k, :len(ids) - 1] = torch.tensor(ids[:-1])
            y[k, len(p) - 1:len(ids) - 1] = torch.tensor(r)
        logits, _ = model(x.to(device))
        nll = token_losses(logits, y.to(device)).sum(-1)
        out += [(n.item() / len(r), len(r)) for n, (_, r) in zip(nll, rows)]
    return out


def evaluate_references(model, tok, examples, max_new, path):
    """Your conversations: each answered greedily from all but its last message (in the chat
    template, or, for a base model, in the Q&A layout without examples), scored by exact match
    after normalize and by chrF against the last message, the reference; and the reference's loss
    per token given the prompt. Returns (items, table): the table pools everything ("all") and,
    where the examples name a "task", each task."""
    chat = is_chat(model)
    asked = [{"task": "qa", "lang": "ja" if JAPANESE.search(ex["messages"][-2]["content"] if len(ex["messages"]) > 1
                                                              else "") else "en", "messages": ex["messages"][:-1]}
             for ex in examples]
    outs = answers(model, tok, asked, {}, max_new=max_new, what="answering")
    refs = [ex["messages"][-1]["content"] for ex in examples]
    prompt_ids = [prompt(model, tok, a, {}) for a in asked]
    _, end = chat_markers(tok) if chat else (None, tok.eos_id)
    ref_ids = [tok.encode(r) + ([end] if chat else []) for r in refs]
    losses = reference_losses(model, tok, prompt_ids, ref_ids)
    items, groups = [], collections.defaultdict(list)
    for ex, (answer,), ref, (loss, n) in zip(examples, outs, refs, losses):
        exact = normalize(answer) == normalize(ref)
        item = {"messages": ex["messages"][:-1], "reference": ref, "answer": answer, "exact": exact,
                "chrf": chrf(normalize(answer), normalize(ref)), "loss": loss, "reference_tokens": n}
        items.append({**{k: v for k, v in ex.items() if k != "messages"}, **item})
        for g in ("all", ex.get("task")):
            if g:
                groups[g].append(item)
    table = {g: {"n": len(v), "exact": 100 * sum(i["exact"] for i in v) / len(v),
                 "chrf": sum(i["chrf"] for i in v) / len(v),
                 "loss": sum(i["loss"] * i["reference_tokens"] for i in v) / sum(i["reference_tokens"] for i in v)}
             for g, v in groups.items()}
    how = "chat template" if chat else "a base model: the Q&A layout, no examples"
    print(f"{path}: {len(examples)} conversations, greedy answers ({how})")
    print(f"{'group':<16}{'n':>6}{'exact %':>9}{'chrF':>7}{'loss (nats/token)':>19}")
    for g, r in table.items():
        print(f"{g:<16}{r['n']:>6}{r['exact']:>9.1f}{r['chrf']:>7.1f}{r['loss']:>19.4f}")
    return items, table


def evaluate(args):
    path = find_checkpoint(args.ckpt)  # any checkpoint inference reads: quantized ones too
    examples, shots, world = evaluation_set(args, read_lineage(path) or {})
    if args.json:
        check_output(args.json, "--json", [("--ckpt", path), ("--data", args.data)], kind="file")
    model, tok = infer.load(path, resolve_device(args.device))
    t0 = time.time()
    if world:
        items, table = score(examples, answers(model, tok, examples, shots, max_new=args.max_new_tokens,
                                                   what="answering"))
        how = "chat template" if is_chat(model) else "few-shot prompt (3 examples per task and language)"
        print_table(table, f"{args.ckpt}: {len(examples)} prompts, greedy, {how}; {time.time() - t0:.0f}s")
        note = knowledge_note(table)
        if note:
            print(note)
    else:
        items, table = evaluate_references(model, tok, examples, args.max_new_tokens, args.data)
    if args.json:
        write_json(args.json, {"ckpt": path, "chat": is_chat(model), "world": world, "table": table,
                               "items": items})
        print(f"wrote {args.json}")
    return table


# -----------------------------------------------------------------------------------------------

def add_data_arguments(d):
    d.add_argument("--ckpt", required=True, help="a checkpoint pre-trained on the synthetic corpus (its world is asked about)")
    d.add_argument("--out", required=True, help="directory for train.jsonl, eval.jsonl and facts.json")
    d.add_argument("--examples", type=positive_int, default=6000, help="SFT conversations")
    d.add_argument("--mix", help=f"task weights, e.g. qa=4,translate=1 (default {','.join(f'{k}={v:g}' for k, v in MIX.items())})")
    d.add_argument("--eval-per-cell", type=positive_int, default=100, help="evaluation prompts per task and language")
    d.add_argument("--teacher", help="a checkpoint whose answers replace the templates' when the verifier accepts them")
    d.add_argument("--samples", type=positive_int, default=4, help="with --teacher: samples per example")
    d.add_argument("--temperature", type=nonneg_float, default=0.8, help="with --teacher: sampling temperature")
    d.add_argument("--seed", type=int, default=1337, help="seed of the split, the examples and the samples")
    d.add_argument("--device", default="auto", help="with --teacher: auto, cpu, cuda, mps")
    d.add_argument("--overwrite", action="store_true", help="replace instruction data already in --out")


def add_eval_arguments(e):
    e.add_argument("--ckpt", required=True, help="the checkpoint to evaluate (chat or base, ours or released)")
    e.add_argument("--data", help="eval.jsonl or the directory `tasks.py data` wrote; or your conversations (JSONL "
                                  "of {\"messages\": [...]}, the last an assistant's reference answer); default: the "
                                  "data the checkpoint's SFT run used")
    e.add_argument("--tasks", help=f"comma-separated subset of {','.join(TASK_ORDER)}")
    e.add_argument("--max-new-tokens", type=positive_int, default=48, help="longest answer in tokens")
    e.add_argument("--json", help="write the table and every answer with its verdict to this file")
    e.add_argument("--device", default="auto", help="auto, cpu, cuda, mps")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description="Instruction data about the synthetic world, and evaluation: "
                                             "python tasks.py data --ckpt BASE --out DATA; python tasks.py eval "
                                             "--ckpt MODEL [--data DATA_OR_YOUR.jsonl].")
    sub = ap.add_subparsers(dest="command", required=True)
    add_data_arguments(sub.add_parser("data", help="write instruction data (train.jsonl), evaluation prompts "
                                                   "(eval.jsonl) and the split of facts (facts.json)",
                                      formatter_class=argparse.ArgumentDefaultsHelpFormatter))
    add_eval_arguments(sub.add_parser("eval", help="greedy answers scored per task, fact set and language (or "
                                                   "exact / chrF / loss on your conversations)",
                                      formatter_class=argparse.ArgumentDefaultsHelpFormatter))
    args = ap.parse_args(argv)
    if args.command == "eval" and args.tasks and not set(args.tasks.split(",")) <= set(TASK_ORDER):
        ap.error(f"--tasks: choose from {', '.join(TASK_ORDER)}")
    return args


def main(argv=None):
    args = parse_args(argv)
    return cli(lambda: make_data(args) if args.command == "data" else evaluate(args))


if __name__ == "__main__":
    main()
