"""
report.py: the report card of a pipeline run (pipeline.py). Every model the run has made is
measured once, by the scripts that measure one model:

    tasks.py eval   the evaluation's task accuracies          -> RUN/eval/<model>.tasks.json
    probe.py        recall by distance, validation bits/byte  -> RUN/eval/<model>.probe.json
    decode speed and memory (infer.decode_seconds)            -> RUN/eval/<model>.speed.json

and RUN/report.md is written from those files and from what the stages wrote themselves
(lineage.json: parameters, steps, tokens; log.jsonl: the curves; times.json: each stage's time),
with curves.png (every training stage's loss and evaluations) and recall.png beside it.
Nothing is typed in: run it again and it measures only what is new (or changed) and rewrites the
report.

    python report.py --run out/pipeline-tiny [--eval DATA] [--lengths 256,512,1024] [--docs 4] [--max-new-tokens 48]
    python report.py --compare SFT=sft.tasks.json DPO=dpo.tasks.json   # evaluations side by side
"""
import argparse
import json
import os

import torch

import infer
import probe
import tasks
from common import atomic_write_text, cli, fmt_time, positive_int, resolve_device, side_by_side
from plamo2 import PLaMo2, find_checkpoint, load_config, read_lineage

# The pipeline's models, in its order: (name in the report, directory in the run).
MODELS = [("base", "base"), ("long-context", "long"), ("pruned", "pruned"), ("SFT", "sft"), ("DPO", "dpo/round1"),
          ("merged", "merged"), ("int8", "int8"), ("int4", "int4")]


def checkpoints(run):
    """{name: checkpoint directory} of the models the run has finished so far."""
    found = {}
    for name, sub in MODELS:
        try:
            found[name] = find_checkpoint(os.path.join(run, sub))
        except FileNotFoundError:
            pass
    return found


def measured(path, ckpt, measure):
    """The JSON at path if it was written after the checkpoint was, else measure() written there."""
    if os.path.exists(path) and os.path.getmtime(path) >= os.path.getmtime(os.path.join(ckpt, "config.json")):
        with open(path) as f:
            return json.load(f)
    result = measure()
    if result is not None:
        atomic_write_text(path, json.dumps(result, ensure_ascii=False, indent=1))
    return result


@torch.inference_mode()
def speed(ckpt, device, steps=32, prompt=128):
    """Decode tokens/s after a prompt of 128 tokens (median of 3) and the model's memory (its
    weights and buffers, int4's CPU copy included, after running)."""
    model, tok = infer.load(ckpt, device)
    ids = torch.randint(0, tok.vocab_size, (1, prompt), generator=torch.Generator().manual_seed(0)).to(device)
    t = side_by_side({"decode": lambda: infer.decode_seconds(model, ids, steps)}, repeats=3, what="decode speed")
    return {"decode_tok_s": steps / t["decode"].median, "memory_bytes": infer.tensor_bytes(
        (*model.parameters(), *model.buffers())), "device": str(device)}


def measure(run, name, ckpt, args, text, seq_len):
    """The three measurements of one model, each from its file when it is up to date."""
    out = os.path.join(run, "eval", name.lower())
    evaluation = args.eval or os.path.join(run, "data")
    got = {"tasks": None}
    if os.path.exists(evaluation):  # the pipeline writes the world's data after the base
        def ask():
            tasks.main(["eval", "--ckpt", ckpt, "--data", evaluation, "--max-new-tokens", str(args.max_new_tokens),
                        "--json", out + ".tasks.json.new"])
            with open(out + ".tasks.json.new") as f:
                result = json.load(f)
            os.remove(out + ".tasks.json.new")
            return result
        got["tasks"] = measured(out + ".tasks.json", ckpt, ask)
    lengths = ["--lengths", args.lengths] if args.lengths else []
    bpb = ["--bench-data", text, "--seq-len", str(seq_len)] if text else []
    got["probe"] = measured(out + ".probe.json", ckpt, lambda: probe.run(probe.parse_args(
        ["--ckpt", ckpt, *lengths, "--docs", str(args.docs), "--split", args.split, *bpb])))
    got["speed"] = measured(out + ".speed.json", ckpt, lambda: speed(ckpt, resolve_device(args.device)))
    return got


# -----------------------------------------------------------------------------------------------
# The report: numbers from the files, one row per model

def pooled(table):
    """{task: score}: the evaluation pooled per task, weighted by prompts. The world's tasks score
    accuracy %; your own conversations (tasks.py eval on references) score chrF per group."""
    sums = {}
    for key, r in table.items():
        task, score = key.split(" ")[0], r["accuracy"] if "accuracy" in r else r["chrf"]
        n, total = sums.get(task, (0, 0.0))
        sums[task] = (n + r["n"], total + score * r["n"])
    return {task: total / n for task, (n, total) in sums.items()}


def model_rows(found, results):
    """The report's table as {model: {column: text}}."""
    rows = {}
    for name, ckpt in found.items():
        r, lineage = results[name], read_lineage(ckpt) or {}
        with torch.device("meta"):  # the parameter count from the config: quantized or not
            params = PLaMo2(load_config(ckpt, allow_quantized=True)).num_params()
        row = {"parameters": f"{params / 1e6:.2f}M",
               "val bpb": f"{r['probe']['val_bpb']:.3f}" if "val_bpb" in r["probe"] else "-"}
        for bucket, (right, n) in r["probe"]["by_distance"].items():
            row[f"recall {bucket.split(' ')[0]}"] = f"{100 * right / n:.0f}%"
        if r["tasks"]:
            row.update({task: f"{v:.1f}" for task, v in pooled(r["tasks"]["table"]).items()})
        row["decode tok/s"] = f"{r['speed']['decode_tok_s']:,.0f}"
        row["memory"] = f"{r['speed']['memory_bytes'] / 2**20:,.1f} MiB"
        row["made by"] = lineage.get("stage", "-")
        rows[name] = row
    return rows


def compare_rows(evaluations):
    """{name: {column: text}} from tasks.py eval JSON files: accuracy % pooled per task (per fact
    set for the fact questions and the probe), and the format answers' form % beside their
    accuracy (form and value both right). For comparing arms of an experiment on one evaluation."""
    rows = {}
    for name, result in evaluations.items():
        if not isinstance(result, dict) or not result.get("world"):
            raise ValueError(f"--compare {name}: not an evaluation on the synthetic world's data (tasks.py eval --json)")
        cells = {}
        for key, r in result["table"].items():
            task, group, _ = key.split(" ")
            column = f"{task} {group}" if task in ("qa", "qa-seen", "probe") else task
            cells.setdefault(column, []).append((r["n"], r["accuracy"]))
            if "form" in r:
                cells.setdefault(f"{task} form", []).append((r["n"], r["form"]))
        rows[name] = {c: f"{sum(n * a for n, a in v) / sum(n for n, _ in v):.1f}" for c, v in cells.items()}
    return rows


def markdown_table(rows, first):
    columns = list(dict.fromkeys(c for row in rows.values() for c in row))
    lines = [f"| {first} | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    lines += [f"| {name} | " + " | ".join(row.get(c, "") for c in columns) + " |" for name, row in rows.items()]
    return "\n".join(lines)


def stage_rows(run, found, times):
    """Each stage's wall time (times.json, as pipeline.py measured it) and what its lineage says."""
    rows = {}
    for stage, seconds in sorted(times.items(), key=lambda kv: kv[0] == "report"):  # the measuring last
        name = {"pretrain": "base", "long": "long-context", "prune": "pruned", "sft": "SFT", "dpo": "DPO",
                "merge": "merged"}.get(stage, stage)
        lineage = read_lineage(found[name]) or {} if name in found else {}
        loop = lineage.get("loop", {})
        rows[stage] = {"wall time": fmt_time(seconds), "steps": str(lineage.get("step", "")),
                       "tokens": f"{lineage['tokens']:,}" if "tokens" in lineage else "",
                       "sequence length": str(loop.get("seq_len", ""))}
    if times:
        rows["total"] = {"wall time": fmt_time(sum(times.values()))}
    return rows


def plot_curves(run, png):
    """Every training stage's loss (top) and evaluations (bottom), side by side, from its log."""
    from matplotlib.figure import Figure

    from loop import draw_log, read_log
    logs = [(name, os.path.join(run, sub, "log.jsonl")) for name, sub in MODELS]
    logs = [(name, read_log(path)) for name, path in logs if os.path.exists(path)]
    if not logs:
        return False
    fig = Figure(figsize=(3.6 * len(logs), 6))
    axes = fig.subplots(2, len(logs), squeeze=False)
    for k, (name, rows) in enumerate(logs):
        draw_log(axes[0, k], axes[1, k], rows, name)
    fig.tight_layout()
    fig.savefig(png, dpi=90)
    return True


def plot_recall(results, png):
    """Recall accuracy against the distance from the code to its question, one line per model."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 3.8))
    ax = fig.subplots()
    for name, r in results.items():
        buckets = r["probe"]["by_distance"]
        ax.plot(range(len(buckets)), [100 * a / n for a, n in buckets.values()], marker="o", label=name)
        ax.set_xticks(range(len(buckets)), [b.split(" ")[0] for b in buckets])
    ax.set(xlabel="distance from the code to its question (tokens)", ylabel="recall accuracy %",
           title=f"the recall probe (window {next(iter(results.values()))['probe']['window']} tokens)")
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(png, dpi=90)


def write_report(run, found, results, times):
    """RUN/report.md with its figures, from the measurements and the stages' files."""
    os.makedirs(run, exist_ok=True)
    probe_settings = next(iter(results.values()))["probe"] if results else {}
    lines = [f"# Report card: {os.path.basename(os.path.normpath(run))}", "",
             "One row per model, in the pipeline's order. val bpb: validation bits per byte of the pre-training text. "
             f"recall D: the recall probe's accuracy on keys D tokens back ({probe_settings.get('docs', '?')} "
             f"documents per length, {probe_settings.get('keys', '?')} keys each, the {probe_settings.get('split', '?')} "
             f"split's names and codes; inside the attention window first). "
             "Task columns: the evaluation's accuracy % pooled over each task's prompts (chrF for your own "
             "conversations). decode tok/s: greedy decoding after a 128-token prompt, batch 1; memory: weights and "
             "buffers.", "", markdown_table(model_rows(found, results), "model"), ""]
    stages = stage_rows(run, found, times)
    if stages:
        lines += ["## Time of each stage", "", markdown_table(stages, "stage"), ""]
    if plot_curves(run, os.path.join(run, "curves.png")):
        lines += ["## Curves", "", "![every training stage's loss and evaluations](curves.png)", ""]
    if results:
        plot_recall(results, os.path.join(run, "recall.png"))
        lines += ["![recall by distance](recall.png)", ""]
    lines += ["Each model's answers and verdicts: eval/<model>.tasks.json; each probe question: eval/<model>.probe.json."]
    atomic_write_text(os.path.join(run, "report.md"), "\n".join(lines) + "\n")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", help="the pipeline's directory (pipeline.py --out)")
    ap.add_argument("--compare", nargs="+", metavar="NAME=EVAL_JSON",
                    help="instead: print one table of these evaluations (tasks.py eval --json) side by side")
    ap.add_argument("--eval", help="the evaluation: the world's data directory (default RUN/data) or your conversations")
    ap.add_argument("--lengths", help="recall probe document lengths in tokens (default: probe.py's)")
    ap.add_argument("--docs", type=positive_int, default=4, help="recall probe documents per length")
    ap.add_argument("--split", choices=["heldout", "train"], default="heldout",
                    help="the recall probe's keys: held out from training, or the training documents' (probe.py)")
    ap.add_argument("--max-new-tokens", type=positive_int, default=48, help="the evaluation's longest answer in tokens")
    ap.add_argument("--device", default="auto", help="auto, cpu, cuda, mps")
    args = ap.parse_args(argv)
    if bool(args.run) == bool(args.compare):
        ap.error("give --run (the report card of a pipeline run) or --compare (a table of evaluations)")
    if args.compare:
        if not all("=" in a for a in args.compare):
            ap.error("--compare takes NAME=EVAL_JSON pairs")

        def compare():
            evaluations = {}
            for a in args.compare:
                name, path = a.split("=", 1)
                with open(path, encoding="utf-8") as f:
                    evaluations[name] = json.load(f)
            print(markdown_table(compare_rows(evaluations), "model"))
        return cli(compare)

    def report():
        found = checkpoints(args.run)
        base = read_lineage(found["base"]) or {} if "base" in found else {}
        text, seq_len = base.get("text"), base.get("loop", {}).get("seq_len")  # one validation text for every model
        os.makedirs(os.path.join(args.run, "eval"), exist_ok=True)
        results = {name: measure(args.run, name, ckpt, args, text, seq_len) for name, ckpt in found.items()}
        times_path = os.path.join(args.run, "times.json")
        times = json.load(open(times_path)) if os.path.exists(times_path) else {}
        write_report(args.run, found, results, times)
        print(f"wrote {os.path.join(args.run, 'report.md')}")
    cli(report)


if __name__ == "__main__":
    main()
