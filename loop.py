"""
loop.py: the training loop that every stage runs (pre-training, long context, distillation, SFT,
DPO). A stage brings its batches, its loss and its evaluation; fit does the rest:

  - its settings (Loop), the same flags in every script that trains (add_loop_arguments);
  - AdamW with its parameter groups, warmup + cosine or WSD (lr_at);
  - accumulation over micro-batches and processes (DDP/FSDP), clipping, bf16 autocast;
  - the NaN stop, Ctrl-C/SIGTERM that save and print the --resume command (interruptible);
  - a JSONL log and its curve, evaluation and an atomic checkpoint on a cadence, exact resume.

How a run starts (from which checkpoint, in which directory, on which processes) is runs.py's;
what a model is, plamo2.py's.
"""
import contextlib
import json
import math
import os
import signal
import time
from dataclasses import dataclass, fields

import torch
import torch.distributed as dist

from common import (Interrupted, autocast, fmt_time, nonneg_float, nonneg_int, positive_float, positive_int,
                    unit_float)
from plamo2 import PLaMo2, check_tokenizer, save_checkpoint
from runs import INVOCATION

# A stage is an object with three methods (train.Pretraining is one; distillation, SFT and DPO
# are others):
#   batch(first, count, device)  sequences first .. first+count-1 of the run, in any form;
#                                the same first always gives the same data, so a step number
#                                is all that resuming needs
#   loss(model, batch)           (sum of the loss terms, number of terms, {name: metric summed
#                                over those terms}); fit divides the loss and each metric by the
#                                terms of the whole step, so that every term weighs the same
#                                whichever micro-batch or process it fell in
#   evaluate(model, step)        {name: value}, called on every process (FSDP gathers weights)
# and, optionally, rows_per_sequence (DPO runs a chosen and a rejected row per pair) for the
# memory estimate. fit does everything else.

@dataclass
class Loop:
    """The training loop's settings: the flags of add_loop_arguments, the same in every script."""
    seq_len: int
    batch_tokens: int
    micro_batch: int
    max_steps: int
    lr: float
    warmup_steps: int = 0        # 0: 4% of max_steps
    schedule: str = "cosine"
    min_lr_frac: float = 0.1
    weight_decay: float = 0.1
    grad_clip: float = 1.0       # 0: off
    eval_every: int = 100
    seed: int = 1337
    dtype: str = "auto"
    # where and how this invocation runs, not the recipe: not recorded, never inherited
    out: str = ""
    device: str = "auto"
    compile: bool = False
    fsdp: bool = False
    stop_at_step: int = 0        # 0: run to max_steps
    resume_command: str = ""     # what the Ctrl-C message tells the user to run

    def recipe(self):
        """What the lineage records: the settings that make the run what it is, and fsdp (the optimizer
        state is saved in FSDP's layout, which --resume must know)."""
        skip = (INVOCATION - {"fsdp"}) | {"resume_command"}
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in skip}

    @classmethod
    def from_args(cls, args):
        return cls(**{f.name: getattr(args, f.name) for f in fields(cls) if getattr(args, f.name, None) is not None})


LOOP_DEFAULTS = dict(schedule="cosine", min_lr_frac=0.1, weight_decay=0.1, grad_clip=1.0, seed=1337, dtype="auto")


def add_loop_arguments(ap, out="output directory: log.jsonl, loss.png and ckpt/"):
    """The flags of the training loop, the same in every script that trains. Their defaults are
    None so that a script can tell a flag given on the command line from one it fills in (from the
    run it resumes or starts from, else its presets, else LOOP_DEFAULTS): see runs.settle().
    out: what --out holds, for the help."""
    ap.add_argument("--out", help=out)
    ap.add_argument("--seq-len", type=positive_int, help="tokens per training sequence")
    ap.add_argument("--batch-tokens", type=positive_int, help="tokens per optimizer step, over all processes")
    ap.add_argument("--micro-batch", type=positive_int, help="sequences per forward pass and process")
    ap.add_argument("--max-steps", type=positive_int, help="optimizer steps; the schedule ends here")
    ap.add_argument("--stop-at-step", type=positive_int, help="stop early at this step, as if interrupted "
                                                              "(the schedule still ends at --max-steps); --resume continues")
    ap.add_argument("--lr", type=positive_float, help="peak learning rate")
    ap.add_argument("--schedule", choices=["cosine", "wsd"],
                    help="after warmup: cosine decay (default), or warmup-stable-decay (linear decay in the last 20%%)")
    ap.add_argument("--warmup-steps", type=positive_int, help="linear warmup (default: 4%% of --max-steps)")
    ap.add_argument("--min-lr-frac", type=unit_float, help="final learning rate as a fraction of --lr (default 0.1)")
    ap.add_argument("--weight-decay", type=nonneg_float, help="AdamW weight decay on matrices (default 0.1)")
    ap.add_argument("--grad-clip", type=nonneg_float, help="clip the global gradient norm, 0 = off (default 1.0)")
    ap.add_argument("--eval-every", type=positive_int, help="steps between evaluations and checkpoints")
    ap.add_argument("--device", help="auto (default), cpu, cuda, cuda:1, mps")
    ap.add_argument("--dtype", help="auto (default: bf16 autocast on CUDA, fp32 elsewhere), float32, bfloat16")
    ap.add_argument("--seed", type=nonneg_int, help="seed for the data order and the init (default 1337)")
    ap.add_argument("--compile", action="store_true", default=None, help="torch.compile the model")
    ap.add_argument("--resume", action="store_true", default=None,
                    help="continue the run in --out exactly where it stopped, with its own settings")
    ap.add_argument("--overwrite", action="store_true", default=None,
                    help="replace the run or checkpoint already in --out (refused without it)")
    ap.add_argument("--fsdp", action="store_true", default=None, help="shard the model with FSDP (under torchrun)")


def loop_defaults(source, rules=None):
    """{name: (value, where from)} of the loop's settings a stage takes from a Start: each of
    source.lineage's loop settings (inherited), then LOOP_DEFAULTS; rules {name: (value, why)} win."""
    out = {k: (v, "the loop's default") for k, v in LOOP_DEFAULTS.items()}
    for k, v in source.lineage.get("loop", {}).items():
        if k != "fsdp":
            out[k] = (v, "inherited from its lineage")
    out.update(rules or {})
    return out


def batch_shape(loop, world):
    """(sequences per step, per forward pass, accumulation steps): the global batch is fixed, and
    accumulation absorbs the number of processes, so results do not depend on it."""
    seqs = loop.batch_tokens // loop.seq_len
    if seqs < world or seqs * loop.seq_len != loop.batch_tokens:
        raise ValueError(f"--batch-tokens {loop.batch_tokens} must be a multiple of --seq-len {loop.seq_len} "
                         f"with at least one sequence per process ({world}).")
    per_rank = seqs // world
    if per_rank * world != seqs:
        raise ValueError(f"{seqs} sequences per step do not split evenly over {world} processes.")
    mb = max(d for d in range(1, min(loop.micro_batch, per_rank) + 1) if per_rank % d == 0)
    return seqs, mb, per_rank // mb


def check_memory(cfg, seq_len, rows, run, fsdp=False):
    """One clear error, before anything is allocated, when a training step of `rows` sequences of
    seq_len tokens per forward pass cannot fit in this device's memory even alone: the optimizer
    state (16 bytes per parameter in fp32: weights, gradients, Adam's two moments), the logits
    (three vocabulary-wide fp32 tensors per token: logits, their float copy for the loss, their
    gradient) and the activations (a lower bound: 16 fp32 values of the hidden size per token and
    layer). The real need is higher, so what this refuses can never run."""
    if run.device.type == "cuda":
        total = torch.cuda.get_device_properties(run.device).total_memory
    else:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    with torch.device("meta"):
        params = PLaMo2(cfg).num_params()
    tokens = rows * seq_len
    need = {"optimizer state": 16 * params / (run.world if fsdp else 1),
            "logits": 12 * tokens * cfg.vocab_size,
            "activations": 64 * tokens * cfg.hidden_size * cfg.num_hidden_layers}
    if sum(need.values()) > total:
        parts = ", ".join(f"{k} {v / 2**30:.1f} GiB" for k, v in need.items())
        raise ValueError(f"a training step of {rows} sequences of {seq_len} tokens needs at least "
                         f"{sum(need.values()) / 2**30:.1f} GiB ({parts}) and this {run.device.type} has "
                         f"{total / 2**30:.1f} GiB: lower --micro-batch or --seq-len.")


def lr_at(step, loop):
    warmup = loop.warmup_steps or max(1, loop.max_steps // 25)
    if step < warmup:
        return loop.lr * (step + 1) / warmup
    floor = loop.lr * loop.min_lr_frac
    if loop.schedule == "wsd":  # stable, then linear decay over the last 20% of the run
        decay_start = int(0.8 * loop.max_steps)
        frac = max(0.0, (step - decay_start) / max(1, loop.max_steps - decay_start))
        return loop.lr - (loop.lr - floor) * frac
    progress = (step - warmup) / max(1, loop.max_steps - warmup)
    return floor + 0.5 * (loop.lr - floor) * (1 + math.cos(math.pi * min(1.0, progress)))


def make_optimizer(model, loop, device):
    """AdamW; no weight decay on norms, biases, embeddings and the SSM parameters (A_log, D,
    dt_bias): decaying them pulls them towards values that mean nothing."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        skip = p.dim() < 2 or name.endswith(("q_weight", "k_weight")) or "embed_tokens" in name
        (no_decay if skip else decay).append(p)
    groups = [{"params": decay, "weight_decay": loop.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=loop.lr, betas=(0.9, 0.95), eps=1e-8, fused=device.type == "cuda")


def flops_per_token(cfg, seq_len):
    """Training FLOPs per token (forward + backward = 3x forward), matmuls only, as MFU counts
    them: 6 per weight of every Linear (the head too, tied or not; an embedding lookup is free),
    12·Hq·P per key attended, and for the scan ~3·2·(2·Nh·P·N) for the state update and read-out
    (the chunked form does a little more; we count the recurrence's own work)."""
    with torch.device("meta"):
        model = PLaMo2(cfg)
    flops = 6 * sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    for i in range(cfg.num_hidden_layers):
        if cfg.is_mamba(i):
            flops += 12 * cfg.mamba_num_heads * cfg.hidden_size_per_head * cfg.mamba_d_state
        else:
            w = seq_len if i in cfg.full_attention_idx else cfg.attention_window_size
            keys = sum(min(t, w) + 1 for t in range(seq_len)) / seq_len  # mean keys per query
            flops += 12 * cfg.num_attention_heads * cfg.hidden_size_per_head * keys
    return flops


def measure_peak_flops(device, dtype, repeats=7):
    """FLOP/s of a large matmul on this device, the denominator of MFU: the best of several
    timings, since a shared machine only ever makes one slower."""
    n = 4096 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    a @ b
    sync()
    best = 0.0
    for _ in range(repeats):
        reps, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < 0.1:
            a @ b
            reps += 1
        sync()
        best = max(best, 2 * n**3 * reps / (time.perf_counter() - t0))
    return best


def plot_log(log_path, png_path):
    """Training loss and every evaluation metric against step, from the JSONL log (draw_log)."""
    from matplotlib.figure import Figure  # no pyplot: a notebook's backend stays as it is

    fig = Figure(figsize=(10, 3.6))
    draw_log(*fig.subplots(1, 2), read_log(log_path))
    fig.tight_layout()
    fig.savefig(png_path + ".tmp.png", dpi=110)
    os.replace(png_path + ".tmp.png", png_path)


def draw_log(a, b, rows, title=""):
    """Onto axes a the training loss (log scale: the first steps fall by orders of magnitude more
    than the rest), onto b every evaluation metric (a step-0 evaluation included), against step."""
    last = {}
    for r in rows:  # a resumed run may log a step twice: the later one counts
        last[(r["step"], "loss" in r)] = r
    train = sorted((s, r["loss"]) for (s, is_train), r in last.items() if is_train)
    evals = sorted((s, r) for (s, is_train), r in last.items() if not is_train)
    if train:
        a.plot(*zip(*train), lw=0.8)
        if min(v for _, v in train) > 0:
            a.set_yscale("log")
    a.set(xlabel="step", ylabel="train loss", title=f"{title} training loss".strip())
    for name in dict.fromkeys(k for _, r in evals for k in r if k != "step"):
        points = [(s, r[name]) for s, r in evals if name in r]
        b.plot(*zip(*points), marker="o", label=name)
    if evals:
        b.legend(fontsize="small")
    b.set(xlabel="step", title=f"{title} evaluation".strip())


def read_log(path):
    """The rows of a log.jsonl; a line that is not JSON (a kill mid-write, an edit) is one clear error."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    raise ValueError(f"{path}: line {n} is not JSON; delete that line (the run's checkpoints are "
                                     f"unaffected) and run again") from None
    return rows


class Fit:
    """The state of one run of the loop (fit): the model as trained (maybe wrapped by DDP/FSDP or
    compiled) and as saved, its optimizer, the log, and where the run stands."""

    def __init__(self, model, stage, loop, tok, run, lineage, state):
        self.stage, self.loop, self.tok, self.run, self.lineage = stage, loop, tok, run, lineage
        self.raw, self.cfg = model, model.config  # not wrapped: names, generation, saving
        self.ckpt = os.path.join(loop.out, "ckpt")
        self.seqs, self.mb, self.accum = batch_shape(loop, run.world)
        check_tokenizer(self.ckpt, self.cfg, tok)  # now, on every process, not at the first checkpoint
        check_memory(self.cfg, loop.seq_len, self.mb * getattr(stage, "rows_per_sequence", 1), run, loop.fsdp)
        if loop.fsdp:  # each block's parameters sharded over the processes, gathered per layer on use
            from torch.distributed.fsdp import fully_shard
            for block in model.layers:
                fully_shard(block)
            fully_shard(model)
        elif run.ddp:
            model = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[run.device] if run.device.type == "cuda" else None)
        self.optimizer = make_optimizer(self.raw, loop, run.device)  # after sharding: FSDP replaces the parameters
        self.step = self.resumed_at = self.last_saved = 0
        if state is not None:
            if loop.fsdp:
                from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
                set_optimizer_state_dict(model, self.optimizer, state["optimizer"],
                                         options=StateDictOptions(full_state_dict=True))
            else:
                self.optimizer.load_state_dict(state["optimizer"])
            self.step = self.resumed_at = self.last_saved = state["step"]
            torch.set_rng_state(state["rng"])
        self.model = torch.compile(model) if loop.compile else model
        self.log_path, self.png_path = os.path.join(loop.out, "log.jsonl"), os.path.join(loop.out, "loss.png")
        if run.master:
            os.makedirs(loop.out, exist_ok=True)
            if state is not None and os.path.exists(self.log_path):
                read_log(self.log_path)  # a broken log is an error now, not at the first checkpoint
        self.logf = open(self.log_path, "a" if state is not None else "w", encoding="utf-8") if run.master else None
        self.t_start = time.time()

    def log(self, row):
        if self.run.master:
            self.logf.write(json.dumps(row) + "\n")
            self.logf.flush()

    def save(self, metrics=None):
        """Evaluation's metrics to the log, then the checkpoint with its lineage and train state;
        the gathering of FSDP's shards takes every process. A checkpoint whose weights are not
        finite is refused, and the run stops naming the last good one."""
        model, to_save, opt_state = self.model, self.raw, self.optimizer.state_dict()
        if self.loop.fsdp:  # every process takes part in gathering the shards; rank 0 receives them
            from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                                 get_optimizer_state_dict)
            opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
            full = get_model_state_dict(model, options=opts)
            opt_state = get_optimizer_state_dict(model, self.optimizer, options=opts)
            if self.run.master:  # no second full model in memory: the gathered tensors become its weights
                with torch.device("meta"):
                    to_save = PLaMo2(self.cfg)
                to_save.load_state_dict(full, assign=True)
                to_save.tie_weights()
        if self.run.master:
            if metrics is not None:
                self.log({"step": self.step, **metrics})
            lineage = {**self.lineage, "loop": self.loop.recipe(), "step": self.step,
                       "tokens": self.step * self.seqs * self.loop.seq_len, "parameters": self.raw.num_params(),
                       "seconds": round(self.lineage.get("seconds", 0) + time.time() - self.t_start, 1)}
            try:
                save_checkpoint(self.ckpt, to_save, self.tok, lineage,
                                {"step": self.step, "optimizer": opt_state, "rng": torch.get_rng_state()})
            except ValueError as e:
                raise FloatingPointError(f"{e}; stopped at step {self.step} without saving. The last good checkpoint: "
                                         f"{self.last_good()}.") from None
            plot_log(self.log_path, self.png_path)
        self.last_saved = self.step

    def last_good(self):
        return f"{self.ckpt} (step {self.last_saved})" if self.last_saved else "none yet"

    def evaluate_and_save(self):
        metrics = self.stage.evaluate(self.model, self.step)
        self.run.log(f"step {self.step}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
        self.save(metrics)
        return metrics

    def train_step(self):
        """One optimizer step over the step's micro-batches; returns (loss, {metric: mean}, lr)."""
        loop, run, model = self.loop, self.run, self.model
        lr = lr_at(self.step, loop)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        totals = None
        for micro in range(self.accum):
            batch = self.stage.batch(self.step * self.seqs + (micro * run.world + run.rank) * self.mb, self.mb,
                                     run.device)
            # DDP averages gradients over processes at the last micro-step only.
            sync = micro == self.accum - 1 or not run.ddp or loop.fsdp
            with (contextlib.nullcontext() if sync else model.no_sync()), autocast(run.device, run.dtype):
                loss, n_terms, extra = self.stage.loss(model, batch)
                loss.backward()
            parts = [loss, n_terms, *extra.values()]
            parts = torch.stack([torch.as_tensor(v, device=run.device).detach().float().reshape(()) for v in parts])
            totals = parts if totals is None else totals + parts
        if run.world > 1:
            dist.all_reduce(totals)
        totals = totals.tolist()
        n_terms = max(totals[1], 1.0)
        # The gradients hold Σ ∇(loss terms) of this process's micro-batches, averaged over the
        # processes by DDP/FSDP: times world / (terms of the whole step) gives the mean.
        for p in model.parameters():
            if p.grad is not None:
                p.grad.mul_(run.world / n_terms)
        loss_val = totals[0] / n_terms
        if not math.isfinite(loss_val):
            raise FloatingPointError(f"the loss became {loss_val} at step {self.step}; stopped without saving. "
                                     f"The last good checkpoint: {self.last_good()}.")
        if loop.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), loop.grad_clip)
        if totals[1] > 0:  # a step without one loss term (all masked) must not move the weights:
            self.optimizer.step()  # AdamW would still decay them and apply its momentum
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return loss_val, {k: v / n_terms for k, v in zip(extra, totals[2:])}, lr


    def steps(self, first=None):
        """The loop: steps, with evaluations and checkpoints every eval_every and at the end, a
        progress line at least every 20 seconds, and the interrupt honoured after a step."""
        loop, run, cfg = self.loop, self.run, self.cfg
        n_mamba = sum(cfg.is_mamba(i) for i in range(cfg.num_hidden_layers))
        run.log(f"model: {cfg.num_hidden_layers} layers ({n_mamba} Mamba), hidden {cfg.hidden_size}, "
                f"{self.raw.num_params() / 1e6:.1f}M parameters | device {run.device} x{run.world}, {run.dtype} | batch "
                f"{self.seqs} x {loop.seq_len} tokens = {self.mb} per pass x {self.accum} accumulation x {run.world} "
                f"processes\ntraining {loop.max_steps} steps from step {self.step}; evaluation and checkpoint every "
                f"{loop.eval_every}")
        if first and self.resumed_at == 0:  # the evaluation before the first step: curves start at step 0
            self.log({"step": 0, **first})
        stop = min(loop.max_steps, loop.stop_at_step or loop.max_steps)
        fpt, peak = flops_per_token(cfg, loop.seq_len), measure_peak_flops(run.device, run.dtype) * run.world
        t_start, last_print, metrics = time.time(), 0.0, {}
        with interruptible(run) as interrupted:
            while True:
                if self.step % loop.eval_every == 0 and self.step > 0 and self.step != self.resumed_at:
                    metrics = self.evaluate_and_save()
                if self.step >= stop:
                    break
                t0 = time.time()
                loss_val, means, lr = self.train_step()
                tps = self.seqs * loop.seq_len / (time.time() - t0)
                # MFU against the best matmul rate measured: measured again when a step beats it (a
                # machine that was busy at the start would otherwise report more than 100%).
                if fpt * tps > peak:
                    peak = max(fpt * tps, measure_peak_flops(run.device, run.dtype) * run.world)
                self.log({"step": self.step, "loss": loss_val, **means, "lr": lr, "tok_per_s": tps, "mfu": fpt * tps / peak})
                eta = (time.time() - t_start) / (self.step - self.resumed_at) * (stop - self.step)
                if run.master and (self.step % 10 == 0 or self.step == 1 or time.time() - last_print > 20):
                    last_print = time.time()
                    print(f"step {self.step}/{loop.max_steps} | loss {loss_val:.4f} | "
                          + "".join(f"{k} {v:.4f} | " for k, v in means.items())
                          + f"lr {lr:.2e} | {tps:,.0f} tok/s | MFU {100 * fpt * tps / peak:.1f}% | ETA {fmt_time(eta)}",
                          flush=True)
                if interrupted(self.step):
                    self.save()
                    raise Interrupted(f"interrupted at step {self.step}: saved {self.ckpt}; continue with\n  "
                                      f"{loop.resume_command}")
            if self.step % loop.eval_every and self.step != self.resumed_at:
                metrics = self.evaluate_and_save()
        run.log(f"done: {self.step} steps in {fmt_time(time.time() - t_start)}; checkpoint {self.ckpt}, "
                f"log {self.log_path}, curve {self.png_path}")
        return metrics


@contextlib.contextmanager
def interruptible(run):
    """While the loop runs, Ctrl-C (SIGINT) and SIGTERM only ask it to stop: the loop asks
    interrupted(step) after each step, and every process agrees on the answer (under torchrun the
    signal reaches rank 0, or all). A second Ctrl-C stops at once; the last checkpoint stands."""
    asked = []

    def on_signal(signum, frame):
        if asked:
            raise KeyboardInterrupt
        asked.append(signum)
        run.log(f"\n{signal.Signals(signum).name}: finishing this step, then saving (again to stop at once)")

    def interrupted(step):
        if run.world > 1:
            flag = torch.tensor(float(bool(asked)), device=run.device)
            dist.all_reduce(flag)
            return flag.item() > 0
        return bool(asked)

    handlers = {}
    for s in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(ValueError):  # not the main thread (a notebook's runner): no handler
            handlers[s] = signal.signal(s, on_signal)
    try:
        yield interrupted
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)


def fit(model, stage, loop, tok, run, lineage, state=None, first=None):
    """Train model (the plain module, on run.device) on stage for loop.max_steps optimizer steps;
    evaluate and write <loop.out>/ckpt (with lineage.json: lineage, plus the loop's settings and
    the step) every loop.eval_every steps and at the end. state, from a checkpoint's
    train_state.pt, resumes there: same step, optimizer state and data position. first: the
    stage's evaluation before training, logged as step 0.

    Ctrl-C (SIGINT) or SIGTERM finish the step under way, write the checkpoint (without an
    evaluation), and raise Interrupted with the command that resumes: at most that step is lost.
    Returns the last evaluation's metrics."""
    f = Fit(model, stage, loop, tok, run, lineage, state)
    try:
        return f.steps(first)
    finally:
        if f.logf:
            f.logf.close()
