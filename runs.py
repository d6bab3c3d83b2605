"""
runs.py: how every stage's run starts, and where it writes. Each stage script (train.py,
prune.py, posttrain.py) starts the same way:

  1. from a checkpoint: start_from reads it without loading its weights (a checkpoint directory,
     or a run directory with ckpt/; never a half-written .tmp), with its lineage.json, what the
     stage inherits from it; settle fills each setting from the command line, the lineage or the
     stage's choice by the model's size, and says where each came from;
  2. in an output directory: claim refuses one that is an input under any spelling, that another
     live process writes (a lock), or that holds a run already (unless --overwrite);
  3. or resuming: a stopped run continues with the settings its lineage recorded;
  4. on its processes: one, or one per GPU under torchrun;
  5. on its text: prepared data (data.py), prepared by rank 0 when it is raw text, while the other
     ranks wait for the manifest without a collective call that would time out.
"""
import fcntl
import math
import os
import shutil
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

import data
from common import check_output, resolve_device, resolve_dtype
from plamo2 import (PLaMo2, PLaMo2Config, PRESETS, check_size, find_checkpoint, history_after, load, load_config,
                    read_lineage, stored_specs)

# -----------------------------------------------------------------------------------------------
# 1. A checkpoint to start from, what the stage inherits, and where the run writes
#
# A checkpoint written by a stage here carries lineage.json: the stage, the checkpoint it started
# from, the pre-training text ("text": prepared data, data.py) and instruction data it learned
# from, the loop's settings ("loop") and the stage's own ("settings"). A later stage starts from
# it: it takes the data and the loop's settings from there, and derives its learning rate from
# the peak recorded there. A checkpoint without lineage (a released model) is just as good a
# start: the stage chooses by the model's size instead (nearest_size), and asks for the data it
# needs.


@dataclass
class Start:
    """A checkpoint a new run starts from."""
    path: str          # the checkpoint directory (real path)
    lineage: dict      # its lineage.json, {} when it has none
    config: PLaMo2Config
    params: int        # parameters, counted from the weight files

    def describe(self):
        made = f"a {self.lineage['stage']} checkpoint" if self.lineage else "no lineage (a released model, an export or a merge)"
        return f"{self.path} ({made}, {self.params / 1e6:.2f}M parameters)"


def start_from(ckpt):
    """The checkpoint that ckpt names (a checkpoint directory, or a run directory with ckpt/), read
    without loading its weights: one clear error for anything missing or inconsistent."""
    path = os.path.realpath(find_checkpoint(ckpt))
    config = load_config(path)
    specs = stored_specs(path)
    check_size(path, config, specs)
    params = sum(math.prod(shape) for name, (_, shape) in specs.items()
                 if not (name == "lm_head.weight" and config.tie_word_embeddings))
    return Start(path, read_lineage(path) or {}, config, params)


def nearest_size(params):
    """The preset whose parameter count is nearest in ratio: the size a model without lineage is
    treated as.

    >>> nearest_size(4.7e6), nearest_size(1.29e9), nearest_size(3e8)
    ('tiny', '1b', 'small')
    """
    counts = {}
    for name in PRESETS:
        with torch.device("meta"):
            counts[name] = PLaMo2(PLaMo2Config.from_preset(name)).num_params()
    return min(counts, key=lambda k: abs(math.log(params / counts[k])))


def settle(args, defaults):
    """Fill every setting the command line left out (None) from defaults {name: (value, where it
    comes from)}, in place; args.given lists those the command line gave. Returns the lines that
    say where each setting came from."""
    given, by_source = [], {}
    args.given = [name for name in defaults if getattr(args, name, None) is not None]
    for name, (value, source) in defaults.items():
        if getattr(args, name, None) is not None:
            given.append(f"{name} {getattr(args, name)}")
            continue
        setattr(args, name, value)
        by_source.setdefault(source, []).append(f"{name} {value:.3g}" if isinstance(value, float) else f"{name} {value}")
    lines = [f"  given here: {', '.join(given)}"] if given else []
    return lines + [f"  {source}: {', '.join(names)}" for source, names in by_source.items()]


def claim(out, inputs=(), resume=False, overwrite=False):
    """Make out this process's run directory, before anything is read: it must not be an input
    (check_output), no other live process may be writing it (a lock file, released when this
    process ends, however it ends), and a new run may not replace a run or checkpoint already
    there unless told (--overwrite). A directory whose run stopped before its first checkpoint
    holds nothing to lose: a new run starts there again. Returns the lock (keep it)."""
    check_output(out, "--out", inputs)
    if resume and not os.path.isdir(out):
        raise FileNotFoundError(f"--resume: no checkpoint at {out}: the directory does not exist")
    os.makedirs(out, exist_ok=True)
    lock = None
    if int(os.environ.get("RANK", "0")) == 0:  # one writer per run: the rank that saves
        lock = open(os.path.join(out, ".lock"), "a+")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ValueError(f"--out {out} is being written by another process right now; wait for it to end, "
                             f"or give another --out.") from None
    if not resume:
        done = [d for d in sorted(os.listdir(out)) if is_checkpoint(os.path.join(out, d))
                or os.path.isdir(os.path.join(out, d)) and any(is_checkpoint(os.path.join(out, d, e))
                                                               for e in os.listdir(os.path.join(out, d)))]
        if is_checkpoint(out):
            done = ["."]
        if done and not overwrite:
            raise ValueError(f"--out {out} holds a run already ({', '.join(done)}): continue it with --resume, "
                             f"give another --out, or replace it with --overwrite.")
        for d in done if overwrite else []:
            shutil.rmtree(os.path.join(out, d), ignore_errors=True) if d != "." else None
    return lock


def is_checkpoint(path):
    return os.path.isfile(os.path.join(path, "config.json"))


def load_checkpoint(path, device):
    """(model in fp32, tokenizer) from a checkpoint directory, with one clear error if anything is off."""
    return load(find_checkpoint(path), device=device, dtype=torch.float32)


def load_train_state(path):
    """train_state.pt of a checkpoint, on the CPU whatever device saved it (mmap: an 8B model's
    optimizer state is read lazily, and no process puts all of it on cuda:0)."""
    try:
        return torch.load(os.path.join(path, "train_state.pt"), map_location="cpu", mmap=True, weights_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} has no train_state.pt (it was not written by a training run).") from None
    except Exception as e:  # torch raises several types for a truncated or foreign file
        raise ValueError(f"cannot read {os.path.join(path, 'train_state.pt')}: {e}") from None


# What --resume takes from the command line: how and where this invocation runs (its own value
# or the default, never the stored one), and what may change without changing the steps already
# taken (given, or the run's).
INVOCATION = {"out", "resume", "overwrite", "device", "compile", "fsdp", "stop_at_step"}
RESUME_MAY_CHANGE = {"dtype", "micro_batch", "max_steps", "eval_every", "eval_tokens"}


def resume(args, defaults, ckpt=None):
    """--resume: the run in args.out (or the checkpoint ckpt) continues with its own settings, from
    its lineage.json, which only the flags of RESUME_MAY_CHANGE may change; any other flag given
    with another value is an error. Settings an older run did not record take defaults. Returns
    (the checkpoint path, its lineage, its train state or None if it has none, [lines of what
    changed])."""
    path = ckpt or os.path.join(args.out, "ckpt")
    try:
        path = find_checkpoint(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"--resume: no checkpoint at {path} to resume from (a run stopped before its first "
                                f"one starts again with the same command, without --resume).") from None
    lineage = read_lineage(path) or {}
    state = load_train_state(path) if os.path.exists(os.path.join(path, "train_state.pt")) else None
    stored = {**defaults, **lineage.get("loop", {}), **lineage.get("settings", {})}
    given = {k: v for k, v in vars(args).items() if v is not None and k in stored}
    differ = [f"--{k.replace('_', '-')} {v} (the run's: {stored[k]})" for k, v in given.items()
              if k not in INVOCATION | RESUME_MAY_CHANGE and stored[k] != v]
    if differ:
        raise ValueError(f"--resume continues {args.out} with its own settings, and these flags differ from them: "
                         f"{', '.join(differ)}; drop them, or start a new run from the checkpoint with --init-from.")
    if args.fsdp and not stored.get("fsdp"):  # the optimizer state is keyed by index, FSDP's by name
        raise ValueError(f"{path} was saved without --fsdp; resume it without --fsdp.")
    for k, v in stored.items():
        if k not in INVOCATION and (k not in RESUME_MAY_CHANGE or getattr(args, k, None) is None):
            setattr(args, k, v)
    changed = [f"{k} {given[k]}" for k in RESUME_MAY_CHANGE if k in given and given[k] != stored.get(k)]
    return path, lineage, state, changed



# -----------------------------------------------------------------------------------------------
# 2. Processes, and the run's text

@dataclass
class Run:
    """Where this process stands: its rank among world processes, its device and precision."""
    rank: int
    world: int
    device: torch.device
    dtype: torch.dtype
    ddp: bool  # started by torchrun: a process group, gradients averaged over processes

    @property
    def master(self):
        return self.rank == 0

    def log(self, *a, **k):
        if self.master:
            print(*a, **k, flush=True)


def start_processes(args):
    """One process, or one per GPU under torchrun (which sets RANK): DDP with NCCL on GPUs, gloo on CPUs."""
    ddp = "RANK" in os.environ
    if args.fsdp and not ddp:
        raise ValueError("--fsdp shards the model over several processes: start the run with torchrun "
                         "(torchrun --nproc_per_node=N train.py --fsdp ...).")
    if ddp:
        rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
        device = torch.device("cuda", local) if torch.cuda.is_available() else torch.device("cpu")
        if device.type == "cuda":
            torch.cuda.set_device(device)
    else:
        rank, world, device = 0, 1, resolve_device(args.device or "auto")
    dtype = resolve_dtype(args.dtype or "auto", device)
    if dtype == torch.float16:
        raise ValueError("float16 training needs loss scaling, which this loop does not do (its gradients "
                         "underflow silently): use --dtype bfloat16 or float32.")
    if ddp and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Run(rank, world, device, dtype, ddp)


def end_processes(run):
    if run.ddp:
        dist.barrier()
        dist.destroy_process_group()


def prepared_text(text, out, tok, run, prepare):
    """(prepared data directory, train tokens, val tokens, tokenizer) of a run's text: text itself
    when it is prepared data (checked against tok, the model's tokenizer); else out/data, which
    rank 0 fills with prepare(path) while the other processes wait for its manifest by polling the
    file system (no collective call, which would time out on a long preparation)."""
    if text and data.is_prepared(text):
        path = os.path.abspath(text)
    else:
        path = os.path.abspath(os.path.join(out, "data"))
        if run.master:
            try:
                prepare(path)
            except Exception as e:
                os.makedirs(path, exist_ok=True)
                with open(os.path.join(path, "error.txt"), "w") as f:
                    f.write(str(e))
                raise
        else:
            while not data.is_prepared(path):
                if os.path.exists(os.path.join(path, "error.txt")):
                    raise ValueError("rank 0 could not prepare the data (see its error)")
                time.sleep(1)
    manifest, train_tokens, val_tokens, data_tok = data.open_prepared(path, tok)
    run.log(f"data: {data.describe(path, manifest)}")
    return path, train_tokens, val_tokens, tok or data_tok


def history(source):
    """The stages a new checkpoint descends through: its source's history and the source itself."""
    return [] if source is None else history_after(source.path, source.lineage)
