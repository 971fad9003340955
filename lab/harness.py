"""The evaluation harness the eval scripts share: one work unit (a context and its question),
every (method, budget, protocol) case on it, from one prefill of the context; and what every
eval does around its units (arguments, output folder, results file, errors, statistics).

Two protocols decide WHEN the cache is compressed:

    aware     (default; the paper's setting, and that of SnapKV, PyramidKV, AdaKV, ...):
              prefill context + question, compress, decode. The question is in the prompt when
              the cache is compressed, so the observation window (the last w prompt tokens)
              holds the question itself, and a window-attention score (SnapKV, LaProx) keeps
              exactly the entries that this question reads.
    agnostic  prefill the context alone, compress it, THEN prefill the question onto the
              compressed cache and decode. This is what a server does with prefix caching or
              a multi-turn chat: the context (a document, a system prompt, the conversation so
              far) is compressed once and must serve questions that are not known yet. The
              window is now the end of the context, which says little about the question.

Query-aware scores look better than they are when the question is known at compression time:
a method that does well under `aware` may only be reading the question out of the window. The
gap between the two protocols measures how much of a method's score is that.

What both protocols share, so that they compare like with like:
  * the same token ids: the prompt's own ids (one tokenization of the whole text), split where
    the context ends in the task's template (encode_split); everything after the context
    (question, instructions, answer prefix, the chat template's closing tokens) is "the
    question", also for tasks that have no separate question;
  * one prefill of the context per unit: `agnostic` compresses it; `aware` continues it with
    the question (Model.prefill(question, past=context)) and compresses that whole-prompt
    prefill, identical (within float rounding) to a one-shot prefill of the prompt. When only
    `aware` is asked, the prompt is prefilled in one go instead (as before the protocols).
The budget is a fraction of the entries of what is compressed: the whole prompt's (L x H_kv x n)
under `aware`, the context's (L x H_kv x c) under `agnostic`, where the question's t entries are
added after compression and never evicted.

    cases = make_cases({"full": ("full", {}), "laprox": ("laprox", {})}, [0.05], ["aware", "agnostic"])
    context, question = encode_split(tok, text, text.index(ctx_text) + len(ctx_text))
    for r in run_unit(model, context, question, cases, Decoding(64, frozenset(tok.eos_ids)), tok):
        print(r.case.method, r.case.protocol, r.generated, r.kept_fraction)

Around the units, the same for every eval script (eval_niah.py, eval_ruler.py, eval_longbench.py):

    arguments  add_eval_arguments + check_eval_arguments: --methods (method specs, parsed and
               checked completely), --budget, --protocol, --device, ... before any model loads;
               OneLineParser + run_main: a user error is one line and exit code 2, no traceback
    files      output_folder, OutputLock (one run per --out at a time), read_rows (a torn line
               is skipped with a warning), RowWriter (every row starts on a fresh line), latest
               (the newest row per case), fingerprint (the configuration a row was made with)
    running    fitting_units (each unit's exact sizes, from the tokenizer before the weights load:
               budgets too small for a unit skipped and said once, a budget that fits no unit
               refused), load_checkpoint, evaluate (each unit's cases through run_unit, rows written
               as they finish), stats_report (stats.py on the score rows)
    torchrun   run_main(..., torchrun=True) gives run() its distributed.Group: placement (this
               rank's --device / --devices), lock_output (rank 0's lock; every rank must see
               --out: check_shared), finished (every rank reads the results), share_units
               (balanced by prompt length), evaluate(group=...) (each rank its own rows file,
               merged by rank 0: write_rows); without torchrun, a group of one process and
               nothing changes
"""
from __future__ import annotations

import argparse
import fcntl
import hashlib
import io
import json
import math
import os
import re
import shlex
import sys
import time
from collections import Counter
from contextlib import ExitStack, contextmanager, nullcontext, redirect_stderr
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import torch

from lab import memory
from lab import stats
from cache import KVCache
from checkpoint import EMBEDDED, choose_dtype
from lab.decode import Decoding, Sequence, answer_text, decode_case, decode_in_groups
from lab import distributed
from lab.distributed import Group, unit_cost
from methods import (METHODS, Scored, budget_fits, check_flag_name, check_flags, compress, flag_defaults, resolved_flags,
                     score, score_key, split_flags, type_name)

PROTOCOLS = ("aware", "agnostic")
DEFAULT_METHODS = "full,laprox,snapkv,pyramidkv,adakv,criticalkv,streamingllm"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"  # what load_model(None) loads
DTYPES = ("float32", "bfloat16", "float16")
SINGLE = Group()  # one process, no torchrun


# ----------------------------------------------------------------------------- inputs

def encode_split(tok, text: str, context_end: int) -> tuple[list[int], list[int]]:
    """Token ids of a prompt whose first `context_end` characters are the context, in two parts
    that both protocols share: the prompt's own ids, tok.encode(text), cut after the tokens it
    has in common with tok.encode(text[:context_end]), the context's own tokenization.

    Where the tokenizer does not merge characters across the seam (the usual case: the question
    part starts a new word, "\\n" or " </book>"), the context part is exactly the context's ids
    and the aware prompt is exactly today's one-shot prompt. Where it does (e.g. "\\n" + "\\n\\n"
    as one "\\n\\n\\n" token), the merged token goes to the question. (Tokenizing the question
    text on its own instead would give other ids than the prompt's where a tokenizer prepends a
    space marker to every text, as SentencePiece-style "Prepend" normalizers do.)
    context_end: e.g. text.index(context_text) + len(context_text). Returns (context ids,
    question ids), both non-empty; context + question == tok.encode(text)."""
    if not 0 < context_end < len(text):
        raise ValueError(f"context_end {context_end} must split the prompt into a non-empty context and "
                         f"question (0 < context_end < {len(text)}); locate the end of the context in the text")
    ids, head = tok.encode(text), tok.encode(text[:context_end])
    common = next((i for i, (a, b) in enumerate(zip(ids, head)) if a != b), min(len(ids), len(head)))
    if not 0 < common < len(ids):
        raise ValueError(f"the prompt cannot be split at character {context_end}: its tokens share {common} of "
                         f"{len(ids)} with the context's; the context or the question is too short")
    return ids[:common], ids[common:]


def parse_protocols(text: str) -> list[str]:
    """'aware,agnostic' -> ['aware', 'agnostic'] (order kept, duplicates dropped); a clear error otherwise."""
    items = list(dict.fromkeys(p.strip() for p in str(text).split(",") if p.strip()))
    bad = [p for p in items if p not in PROTOCOLS]
    if bad or not items:
        raise ValueError(f"--protocol {text!r}: expected a comma list of {', '.join(PROTOCOLS)}")
    return items


def parse_list(text: str, kind, name: str) -> list:
    """'a,b,c' -> [kind(a), ...] in order, duplicates dropped; a clear error on junk."""
    try:
        items = [kind(x.strip()) for x in str(text).split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--{name} {text!r}: expected a comma list of {kind.__name__} values") from None
    if not items:
        raise ValueError(f"--{name} is empty")
    return list(dict.fromkeys(items))


def _parse_flag_value(text: str, default):
    """A flag's value as written in a method spec, read by the type of its default. Raises ValueError."""
    if default is None or isinstance(default, bool):
        words = {"true": True, "false": False, **({"none": None} if default is None else {})}
        if text.lower() not in words:
            raise ValueError(f"write {' or '.join(words)}")
        return words[text.lower()]
    if isinstance(default, (int, float)):
        return type(default)(text)  # int("2.5") and float("abc") raise
    return text


def parse_method(spec: str) -> tuple[str, dict]:
    """A method spec, as the eval scripts' --methods take it: a name from METHODS, optionally with
    flags, "laprox:selection=layer:pool=0" -> ("laprox", {"selection": "layer", "pool": 0}).

    Each value is read by the type of the flag's default (pool=0 an int, center=false a bool,
    alpha=0.5 a float) and the whole spec is checked as select would check it (check_flags), so
    that a bad spec fails before any model is loaded.
    """
    name, *pairs = spec.strip().split(":")
    defaults = flag_defaults(name)
    flags = {}
    for pair in pairs:
        key, eq, text = pair.partition("=")
        if not eq or not key:
            raise ValueError(f"method {spec!r}: flags are written key=value, e.g. laprox:selection=layer")
        if key in flags:
            raise ValueError(f"method {spec!r}: flag {key} is given twice")
        check_flag_name(name, key, defaults)
        try:
            flags[key] = _parse_flag_value(text, defaults[key])
        except ValueError:
            raise ValueError(f"method {spec!r}: flag {key} takes {type_name(defaults[key])} "
                             f"(default {defaults[key]!r}), got {text!r}") from None
    check_flags(name, flags)
    return name, flags


def parse_methods(text: str) -> dict[str, tuple[str, dict]]:
    """--methods: a comma list of method specs -> {spec: (name, flags)} (parse_method:
    "laprox:selection=layer:pool=0" -> ("laprox", {"selection": "layer", "pool": 0})), every name,
    flag and value checked, so that a bad spec fails before any model loads."""
    return {spec: parse_method(spec) for spec in parse_list(text, str, "methods")}


def parse_budgets(text: str, tokens: bool = False) -> list[float | int]:
    """--budget: a comma list of fractions in (0, 1] of the KV entries; with tokens, an integer
    written without a point ("128") is tokens per head instead (cache.resolve_budget)."""
    out = []
    for x in parse_list(text, str, "budget"):
        try:
            b = int(x) if tokens and x.isdigit() else float(x)
        except ValueError:
            raise ValueError(f"--budget {x!r} is not a number: expected a comma list of fractions in (0, 1]") from None
        if isinstance(b, int) and b < 1 or isinstance(b, float) and not 0 < b <= 1:  # also refuses nan
            more = " or integers >= 1 (tokens per head)" if tokens else ""
            raise ValueError(f"--budget {x} is out of range: fractions of the KV entries in (0, 1]{more}")
        out.append(b)
    return list(dict.fromkeys(out))


def check_device(name: str, flag: str = "--device") -> None:
    """Fail early, naming the fix, on a device string torch does not know or cannot use here
    (flag: the option that named it, for the message)."""
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise ValueError(f"{flag} {name!r} is not a device; use cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            why = (f"torch {torch.__version__} is a CPU-only build" if torch.version.cuda is None
                   else f"torch {torch.__version__} sees no GPU")
            raise ValueError(f"{flag} {name}: CUDA is not available ({why}); use --device cpu, or install "
                             f"the torch build for your CUDA on a machine with a GPU")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"{flag} {name}: only {torch.cuda.device_count()} CUDA device(s) here; "
                             f"use cuda:0 .. cuda:{torch.cuda.device_count() - 1}")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"{flag} {name}: MPS is not available here; use --device cpu")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"{flag} {name}: only cpu, cuda and mps devices are supported")


# ----------------------------------------------------------------------------- the command line

class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help shows each default once: not after a help text that already says its default, nor
    when it is None (the help says what happens then)."""

    def _get_help_string(self, action):
        if "(default" in (action.help or "") or action.default is None:
            return action.help
        return super()._get_help_string(action)


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports a bad command line in one line (no usage block), and --help with each
    default once (DefaultsHelpFormatter). Under torchrun every rank parses the same command line and
    finds the same error: rank 0 alone prints it."""

    def __init__(self, *args, formatter_class=DefaultsHelpFormatter, **kwargs):
        super().__init__(*args, formatter_class=formatter_class, **kwargs)

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n" if os.environ.get("RANK", "0") == "0" else None)


def add_eval_arguments(p: argparse.ArgumentParser, budget_help: str, out_help: str) -> None:
    """The options every eval script takes: --methods, --budget, --protocol, --model, --device,
    --devices, --dtype, --window, --out, --resume (check_eval_arguments reads them)."""
    p.add_argument("--methods", default=DEFAULT_METHODS,
                   help=f"comma list of {', '.join(METHODS)}; 'full' runs once per unit and protocol; "
                        "name:flag=value:... for an ablation, e.g. laprox:selection=layer or laprox:pool=0 "
                        "(each method's flags: methods.METHODS)")
    p.add_argument("--budget", default="0.05", help=budget_help)
    p.add_argument("--protocol", default="aware",
                   help="comma list of aware (compress with the question in the prompt, the paper's setting) "
                        "and agnostic (compress the context, then add the question)")
    p.add_argument("--agnostic-budget", default=None,
                   help="the agnostic protocol's budgets, a comma list among --budget (default: all of them), e.g. "
                        "--budget 0.01,0.05,0.2 --protocol aware,agnostic --agnostic-budget 0.05")
    p.add_argument("--model", default=None,
                   help=f"checkpoint folder, hub id, or an embedded model: {', '.join(EMBEDDED)} (default: the "
                        f"embedded {DEFAULT_MODEL_NAME})")
    p.add_argument("--device", default="cpu",
                   help="cpu, cuda or cuda:N; under torchrun, cuda is each rank's cuda:LOCAL_RANK")
    p.add_argument("--devices", default=None,
                   help="instead of --device, a comma list such as cuda:0,cuda:1 that holds ranges of the model's "
                        "layers (a model larger than one device); under torchrun each rank takes its own slice")
    p.add_argument("--dtype", default=None, choices=DTYPES,
                   help="default: float32, but qwen2.5-coder-1.5b in bfloat16 on a GPU or a CPU with bfloat16 "
                        "instructions (checkpoint.choose_dtype); the summary says which and why")
    p.add_argument("--window", type=int, default=32, help="observation window w of the prefill")
    p.add_argument("--out", default=None, help=out_help)
    p.add_argument("--resume", action=argparse.BooleanOptionalAction, default=True,
                   help="skip the cases already in the results file; --no-resume redoes them (newer lines win)")
    p.add_argument("--batch", action=argparse.BooleanOptionalAction, default=True,
                   help="decode a unit's cases as batches, one forward per step (the same answers); --no-batch: "
                        "one case at a time, holding one compressed cache at once")


def check_eval_arguments(args, tokens: bool = False, group: Group = SINGLE) -> tuple[dict, list, list[str]]:
    """(methods {spec: (name, flags)}, budgets, protocols) of add_eval_arguments' options, each
    checked, and --window and this rank's devices (placement), before any model work; ValueError
    naming the problem. args.dtype becomes a dtype name: --dtype, or the model's (checkpoint.choose_dtype)."""
    methods = parse_methods(args.methods)
    budgets = parse_budgets(args.budget, tokens)
    protocols = parse_protocols(args.protocol)
    args.agnostic_budgets = None
    if getattr(args, "agnostic_budget", None) is not None:
        if "agnostic" not in protocols:
            raise ValueError(f"--agnostic-budget {args.agnostic_budget} without agnostic in --protocol "
                             f"{args.protocol}; add it (--protocol aware,agnostic) or drop --agnostic-budget")
        args.agnostic_budgets = parse_budgets(args.agnostic_budget, tokens)
        extra = [b for b in args.agnostic_budgets if b not in budgets]
        if extra:
            raise ValueError(f"--agnostic-budget {args.agnostic_budget}: {', '.join(map(str, extra))} not among "
                             f"--budget {args.budget}; the agnostic budgets are a subset of --budget")
    if args.window < 1:
        raise ValueError(f"--window must be >= 1, got {args.window}")
    device, devices = placement(args, group)
    args.dtype = choose_dtype(args.model, devices[0] if devices else device, args.dtype)[0]  # --dtype, or the model's
    return methods, budgets, protocols


def placement(args, group: Group = SINGLE) -> tuple[str, list[str] | None]:
    """(device, devices): where this rank loads the model (checkpoint.load_model's device= or devices=),
    checked. --device alone: group.device(--device) ("cuda" is cuda:LOCAL_RANK under torchrun).
    --devices a,b,...: this rank's contiguous slice of the list (group.devices), every name a usable
    device, a GPU named (cuda:N) and in one rank's slice only, and --device left at cpu."""
    if args.devices is None:
        device = group.device(args.device)
        check_device(device)
        return device, None
    if args.device != "cpu":
        raise ValueError(f"--device {args.device} and --devices {args.devices}: pass one of them (--devices places "
                         f"the layers on several devices, --device the whole model on one)")
    names = [d.strip() for d in str(args.devices).split(",") if d.strip()]
    if not names:
        raise ValueError("--devices is empty: pass a comma list such as cuda:0,cuda:1")
    for name in names:
        check_device(name, "--devices")
        if torch.device(name).type == "cuda" and torch.device(name).index is None:
            raise ValueError(f"--devices {args.devices}: name each GPU (cuda:0,cuda:1), not {name}")
    mine = group.devices(names)
    k = len(mine)
    others = names[:group.local_rank * k] + names[(group.local_rank + 1) * k:]  # the node's other ranks'
    shared = sorted({d for d in mine if torch.device(d).type == "cuda"} & set(others))
    if shared:
        raise ValueError(f"--devices {args.devices}: {', '.join(shared)} would serve several ranks of a node; "
                         f"list every GPU of the node once (each rank takes {k} of them)")
    return (mine[0], None) if k == 1 else ("cpu", mine)


def run_main(parser: argparse.ArgumentParser, run: Callable, argv=None, *, torchrun: bool = False,
             interrupted: str = "interrupted; the same command resumes where it stopped"):
    """A script's main(): parse argv, return run(args). A user error (ValueError, OSError: a bad
    argument, method spec, path, checkpoint, device, the disk or the hub) is one line on stderr
    naming the problem and the fix, exit code 2; Ctrl-C is one line, exit code 130. Never a
    traceback for these; any other exception is a bug and keeps its traceback.

    torchrun: run(args, group=group) in torchrun's process group (distributed.start; without
    torchrun a group of one process). An error that every rank meets through group.together is
    printed by the lowest failing rank; the others leave with its exit code (SystemExit), silently."""
    args = parser.parse_args(argv)
    try:
        if not torchrun:
            return run(args)
        with distributed.start() as group:
            return run(args, group=group)
    except (ValueError, OSError) as e:
        parser.exit(2, f"{parser.prog}: error: {' '.join(str(e).split())}\n")
    except KeyboardInterrupt:
        parser.exit(130, f"{parser.prog}: {interrupted}\n")


def load_eval_tokenizer(args):
    """The tokenizer and model.Config of an eval's --model without its weights (cheap: what
    fitting_units needs: the prompts' sizes, and the context length its advice must stay within)."""
    from checkpoint import Tokenizer, load_config, resolve_checkpoint
    try:
        cfg = load_config(args.model)
        return Tokenizer(resolve_checkpoint(args.model), cfg), cfg
    except Exception as e:  # a broken or unreachable checkpoint
        raise unloadable(args.model, e) from None


def unloadable(name_or_path: str | None, e: Exception) -> ValueError:
    """The one-line error for a checkpoint that cannot be loaded, whatever the library raised."""
    what = "the default model" if name_or_path is None else f"--model {name_or_path}"
    return ValueError(f"cannot load {what}: {type(e).__name__}: {e}")


def model_label(name_or_path: str | None) -> str:
    """The model's name in output folders and tables: the folder's or hub id's last part."""
    return DEFAULT_MODEL_NAME if name_or_path is None else Path(str(name_or_path).rstrip("/")).name


def load_checkpoint(name_or_path: str | None, device: str, dtype: str | None, devices: list[str] | None = None,
                    length: int | None = None, check_finite: bool = True):
    """(model, tok) of --model (checkpoint.load_model) on `device`, or its layers over `devices` as
    memory.plan_layers balances them for prompts of `length` tokens (default: the model's context;
    it refuses a model that does not fit). check_finite: checkpoint.load_model's. A checkpoint that cannot
    be loaded, whatever the library raises, is a ValueError naming it. dtype None: the model's own
    (checkpoint.choose_dtype)."""
    from checkpoint import load_config, load_model
    try:
        dtype = dtype or choose_dtype(name_or_path, devices[0] if devices else device)[0]
        torch_dtype, layers = getattr(torch, dtype), None
        if devices is not None:
            cfg = load_config(name_or_path)
            layers = memory.plan_layers(cfg, length or cfg.max_position, torch_dtype.itemsize, len(devices),
                                        capacities=memory.device_capacities(devices))
        return load_model(name_or_path, device=device, dtype=torch_dtype, devices=devices, layers=layers,
                          check_finite=check_finite)
    except Exception as e:  # a broken or unreachable checkpoint
        raise unloadable(name_or_path, e) from None


def load_eval_model(args, group: Group = SINGLE, length: int | None = None):
    """(model, tok) of an eval's --model, --dtype on this rank's placement (--device or its slice of
    --devices, whose layers are planned for prompts of `length` tokens), loaded by every rank
    together: a rank that cannot load it says so once, every rank stops."""
    device, devices = placement(args, group)
    return group.together(lambda: load_checkpoint(args.model, device, args.dtype, devices, length))


# ----------------------------------------------------------------------------- the output folder

def output_folder(path: str | Path) -> Path:
    """--out as a folder, created if missing; a path that is a file (or lies under one) is a ValueError."""
    out = Path(path).expanduser()
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file, not a folder; pass a folder (it is created if missing)")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"cannot create the output folder --out {out} ({e.strerror}); pass another folder") from None
    return out


class OutputLock:
    """An exclusive lock on an output folder for a whole run: two runs on one --out would compute
    every case twice and interleave their rows.

        with OutputLock(out):   # ValueError at once if another process holds it
            ...                 # run, write rows and summary

    flock(2) on <out>/.lock, which then holds the holder's pid and command line (what a refused
    run prints). The kernel releases the lock when the holder's file is closed, including when
    the process dies (kill -9, a crash): a stale .lock file never blocks a later run. Only the
    process that writes the results takes it (under torchrun, rank 0)."""
    NAME = ".lock"

    def __init__(self, folder: str | Path):
        self.path = Path(folder) / self.NAME
        self.file = None

    def __enter__(self) -> "OutputLock":
        self.file = os.fdopen(os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644), "r+")
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = self.file.read().strip() or "another process"
            self.file.close()
            raise ValueError(f"--out {self.path.parent} is in use by {holder}; wait for that run to finish "
                             f"or pass another --out") from None
        self.file.truncate(0)
        self.file.write(f"pid {os.getpid()} ({shlex.join(sys.argv) or 'python'})\n")
        self.file.flush()
        return self

    def __exit__(self, *exc) -> None:
        self.file.truncate(0)
        self.file.close()  # releases the lock


@contextmanager
def lock_output(folder: Path, group: Group = SINGLE) -> Iterator[None]:
    """For a `with` block, before any model loads: rank 0 creates the output folder (output_folder),
    holds its OutputLock and merges the rows files that the ranks of an interrupted torchrun left
    there (merge_rank_files: a resume reads every row, whatever the number of ranks then and now);
    under torchrun every rank then checks that it sees the folder (check_shared). An error is said once."""
    with ExitStack() as stack:
        def claim():
            if group.is_main:
                out = output_folder(folder)
                stack.enter_context(OutputLock(out))
                merge_rank_files(out)
        group.together(claim)
        check_shared(group, Path(folder).expanduser())
        yield


def check_shared(group: Group, folder: Path) -> None:
    """Refuse, in one line, an output folder that some rank does not see (--out on one node's own
    disk): under torchrun every rank writes its rows there and rank 0 merges them. Rank 0 writes a
    token there, then every rank looks for it; rank 0 removes it at once. The token is named after
    this run (torchrun's run id and rendezvous address, which every rank knows), so that no other
    run's token, nor a "no such file" that a network filesystem cached, can answer for it."""
    if group.world == 1:
        return
    run = "-".join(os.environ.get(k, "") for k in ("TORCHELASTIC_RUN_ID", "MASTER_ADDR", "MASTER_PORT"))
    token = folder / (".rank0-was-here-" + re.sub(r"[^\w.-]", "_", run))

    def look() -> None:
        if not token.exists():
            raise ValueError(f"rank {group.rank} does not see --out {folder}, which rank 0 made: every rank writes "
                             f"its rows there, so pass an --out on a filesystem that every node mounts")
    try:
        group.together(lambda: token.touch() if group.is_main else None)
        group.together(look)
    finally:
        if group.is_main:
            token.unlink(missing_ok=True)


# ----------------------------------------------------------------------------- the results file

def read_rows(path: str | Path, required: tuple = ()) -> list[dict]:
    """The rows of a JSON-lines results file, in order ([] if it does not exist). A line that is
    not a whole row (a JSON object with the `required` keys: a run killed mid-write leaves its last
    line torn) is skipped with one warning on stderr that counts them: their cases run again."""
    path = Path(path)
    if not path.is_file():
        return []
    rows, skipped = [], []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                row = None
            if isinstance(row, dict) and all(k in row for k in required):
                rows.append(row)
            else:
                skipped.append(number)
    if skipped:
        print(f"warning: skipped {len(skipped)} unreadable line(s) of {path} (line "
              f"{', '.join(map(str, skipped[:5]))}{', ...' if len(skipped) > 5 else ''}; cut short by an "
              f"interrupted run?): their cases are not counted as done", file=sys.stderr)
    return rows


class RowWriter:
    """Appends rows to a JSON-lines results file, one write and one flush per row, the first on a
    fresh line: after a run killed mid-write the file ends in a torn line, and a row appended to
    it would be unreadable as well.

        with RowWriter(out / "results.jsonl") as w:
            w.write({"method": "laprox", ...})"""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.file = None

    def __enter__(self) -> "RowWriter":
        torn = False
        if self.path.is_file() and self.path.stat().st_size > 0:
            with open(self.path, "rb") as f:
                f.seek(-1, 2)
                torn = f.read(1) != b"\n"
        self.file = open(self.path, "a", encoding="utf-8")
        if torn:
            self.file.write("\n")
        return self

    def write(self, row: dict) -> None:
        self.file.write(json.dumps(row, ensure_ascii=False) + "\n")
        self.file.flush()

    def __exit__(self, *exc) -> None:
        self.file.close()


def append_rows(path: Path, rows: Iterable[dict]) -> list[dict]:
    """Append each row to `path` as it comes (RowWriter: a row is on disk once it is made, so an
    interrupted run keeps it); returns the rows."""
    made = []
    with RowWriter(path) as writer:
        for row in rows:
            writer.write(row)
            made.append(row)
    return made


RANK_FILE = re.compile(r"(.+)\.rank(\d+)\.jsonl")  # results.rank3.jsonl: rank 3's rows of results.jsonl


def rank_file(results: Path, rank: int) -> Path:
    """The file where one rank of a torchrun writes its rows of `results` (a .jsonl file)."""
    return results.with_name(f"{results.stem}.rank{rank}.jsonl")


def merge_rank_files(folder: Path) -> dict[Path, list[dict]]:
    """Append every rank file in `folder` (rank_file: this run's, or those that an interrupted run
    left, of any number of ranks) to its results file, in rank order, and delete it; returns
    {results file: the rows appended}. Rank 0 alone calls it, while no rank writes. (Killed between
    an append and its delete, it appends those rows again next time: equal rows, latest keeps one.)"""
    found = sorted((m[1], int(m[2]), path) for path in folder.glob("*.rank*.jsonl")
                   if (m := RANK_FILE.fullmatch(path.name)))
    merged: dict[Path, list[dict]] = {}
    for stem, _, path in found:
        results = folder / f"{stem}.jsonl"
        merged.setdefault(results, []).extend(append_rows(results, read_rows(path)))
        path.unlink()
    return merged


def write_rows(results: Path, rows: Iterable[dict], group: Group = SINGLE) -> list[dict]:
    """Write the rows as they come and return them. One process: appended to `results`. Under
    torchrun, each rank appends its own to its own file (rank_file), so that no two processes write
    one file; once every rank has finished (group.together: an error on any rank is said once, and
    the rank files stay for the rerun to merge), rank 0 merges them into `results` and returns every
    rank's rows, the others their own. Every rank calls it, also with no rows."""
    if group.world == 1:
        return append_rows(results, rows)
    mine = group.together(lambda: append_rows(rank_file(results, group.rank), rows))
    return merge_rank_files(results.parent).get(results, []) if group.is_main else mine


def latest(rows: list[dict], key: Callable[[dict], tuple]) -> list[dict]:
    """The last row of each key(row), in the order the keys first appear (a --no-resume rerun
    appends newer rows for the same cases: they win)."""
    out: dict = {}
    for row in rows:
        out[key(row)] = row
    return list(out.values())


def same_definitions(rows: list[dict], methods: dict[str, tuple[str, dict]]) -> list[dict]:
    """The rows whose method, if this run has it (methods: label -> (name, flags)), was made with the
    flags it resolves to now (the row's `method_flags`): a row made under other defaults (an older
    `laprox` or `snapkv`), or before rows recorded them, is neither done nor reported."""
    now = {label: resolved_flags(name, flags) for label, (name, flags) in methods.items()}
    return [r for r in rows if r.get("method") not in now or r.get("method_flags") == now[r["method"]]]


def finished(read: Callable[[], list[dict]], key: Callable[[dict], tuple], resume: bool,
             group: Group = SINGLE, methods: dict[str, tuple[str, dict]] | None = None) -> tuple[list[dict], set[tuple]]:
    """(rows, done): the rows of the results file (read(): this configuration's rows; with `methods`,
    only those of the methods' current definitions, see same_definitions) and the keys of its
    finished cases (done, key(row) as tuples; empty with --no-resume), whatever the number of ranks
    that made them (lock_output merged their files). Under torchrun every rank reads the file, which
    no rank writes before evaluate ends, so that every rank skips the same cases; rank 0 alone warns
    of unreadable lines (every rank finds the same)."""
    def read_once():
        with nullcontext() if group.is_main else redirect_stderr(io.StringIO()):
            return read()
    rows = group.together(read_once)
    rows = rows if methods is None else same_definitions(rows, methods)
    return rows, {tuple(key(r)) for r in rows} if resume else set()


def fingerprint(cfg: dict) -> str:
    """Short hash of what changes the answers (data, model, prompts, ...): rows of another
    configuration in the same results file are never taken as done."""
    return hashlib.sha1(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:12]


# ----------------------------------------------------------------------------- cases

@dataclass(frozen=True)
class Case:
    """One evaluation of a work unit.

    method: the label the eval reports (e.g. "laprox:selection=layer"). name, flags: the registry
    name and its flags (methods.METHODS). budget: fraction of the entries (or int tokens per head)
    that compression keeps, see protocol; ignored by "full". protocol: "aware" | "agnostic".
    """
    method: str
    name: str
    flags: dict = field(hash=False)
    budget: float | int
    protocol: str = "aware"


def make_cases(methods: dict[str, tuple[str, dict]], budgets: list, protocols: list[str],
               full_budget: float | int = 1.0, agnostic_budgets: list | None = None) -> list[Case]:
    """Every (method, budget, protocol) case: methods maps a label to its parsed (name, flags);
    "full" keeps everything, so it runs once per protocol, under `full_budget`. agnostic_budgets:
    the agnostic protocol's budgets, when fewer than `budgets` (--agnostic-budget)."""
    for p in protocols:
        if p not in PROTOCOLS:
            raise ValueError(f"unknown protocol {p!r}; known: {', '.join(PROTOCOLS)}")
    of = {p: agnostic_budgets if p == "agnostic" and agnostic_budgets is not None else budgets for p in protocols}
    return [Case(label, name, dict(flags), b, p) for p in protocols for label, (name, flags) in methods.items()
            for b in ([full_budget] if name == "full" else of[p])]


@dataclass
class Result:
    """What one case gave. generated: what the eval's decode returned (None when skipped).
    kept_fraction: entries kept / entries of what was compressed (kept_of: "prompt" for aware,
    "context" for agnostic). cache_mb: the compressed cache right after compression (agnostic:
    before the question is added). Timings in seconds: prefill_s, the shared prefill(s) this case
    read (aware via the continuation: context + continuation); compress_s, scoring (its even share
    of a scoring that several cases use, see score_once: then timing_shared) + selection + building
    the cache; question_s, prefilling the question onto the compressed cache (agnostic
    only, else 0); decode_s. skipped: why the case did not run (its budget does not fit), else None."""
    case: Case
    generated: str | None = None
    kept_fraction: float | None = None
    kept_of: str | None = None
    cache_mb: float | None = None
    prefill_s: float = 0.0
    compress_s: float = 0.0
    question_s: float = 0.0
    decode_s: float = 0.0
    skipped: str | None = None
    timing_shared: bool = False

    def row(self) -> dict:
        """The flat fields a results line holds (method label, its resolved flags, budget, protocol, then
        the measurements)."""
        c = self.case
        return dict(method=c.method, method_flags=resolved_flags(c.name, c.flags), budget=c.budget,
                    protocol=c.protocol, generated=self.generated,
                    kept_fraction=self.kept_fraction, kept_of=self.kept_of, cache_mb=self.cache_mb,
                    prefill_s=self.prefill_s, compress_s=self.compress_s, question_s=self.question_s,
                    decode_s=self.decode_s, timing_shared=self.timing_shared)


def unit_seconds(rows: list[dict], unit: Callable[[dict], tuple]) -> dict[tuple, float]:
    """{unit(row): seconds} the work units took by their rows' own timings: the unit's shared prefill
    once (the largest prefill_s of its cases: aware's context + continuation) plus every case's
    compress_s, question_s and decode_s. The cost of a run to come, from the units done (the analysis
    plan's rule on RULER's sample count reads it)."""
    prefill, rest = {}, {}
    for r in rows:
        k = unit(r)
        prefill[k] = max(prefill.get(k, 0.0), r.get("prefill_s") or 0.0)
        rest[k] = rest.get(k, 0.0) + sum(r.get(f) or 0.0 for f in ("compress_s", "question_s", "decode_s"))
    return {k: prefill[k] + rest[k] for k in prefill}


# ----------------------------------------------------------------------------- running a unit

def clock(device) -> float:
    """time.perf_counter() once the device has finished its queued work (CUDA runs asynchronously)."""
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter()


def skipped_budgets(cases: list[Case], n: int, c: int, window: int) -> dict[tuple, str]:
    """{(budget, protocol): why} for the budgets that leave some method of `cases` (with its flags,
    e.g. streamingllm:sinks=40) fewer entries per head than its window + sinks (methods.budget_fits)
    on what that protocol compresses: the n-token prompt (aware) or the c-token context (agnostic).
    Such a budget is skipped for EVERY method alike, so that a budget's mean compares the same
    units ("full" never is). Needs no model: evals also call it with a prompt's nominal length."""
    out = {}
    for case in cases:
        size = n if case.protocol == "aware" else c
        if case.name != "full" and not budget_fits(case.name, case.budget, size, window, **case.flags):
            what = "prompt" if case.protocol == "aware" else "context"
            sinks = split_flags(case.name, case.flags)[1].get("sinks", 0)
            k = case.budget if isinstance(case.budget, int) else round(case.budget * size)
            out[case.budget, case.protocol] = (
                f"budget {k} tokens a head exceeds the {size}-token {what}" if k > size else
                f"budget {case.budget:g} keeps {k} tokens a head of the {size}-token {what}, fewer than the "
                f"{min(size, window + sinks)} every {case.method} head keeps (its {window}-token window + {sinks} sinks)")
    return out


def case_flags(case: Case, seed: int) -> dict:
    """The flags a case compresses with: "random" draws from `seed` unless its flags set one."""
    flags = dict(case.flags)
    if case.name == "random":
        flags.setdefault("seed", seed)
    return flags


def compress_case(prefill, case: Case, seed: int, scored: Scored | None = None) -> KVCache:
    """methods.compress for one case (scored: its scores on this prefill, made once, see score_once)."""
    return compress(prefill, case.name, case.budget, scored, **case_flags(case, seed))


def score_once(prefill, cases: list[Case], seed: int) -> dict[int, tuple[Scored, float, bool]]:
    """Score `prefill` once for each distinct methods.score_key among `cases` (scores do not depend
    on the budget, nor on the selection flags: laprox and laprox:selection=head share theirs).
    Returns {index in cases: (its Scored, its even share of that scoring's seconds, whether it was
    shared with another case)}; "full" cases have no entry."""
    groups: dict[tuple, list[int]] = {}
    for i, case in enumerate(cases):
        if case.name != "full":
            groups.setdefault(score_key(case.name, case_flags(case, seed)), []).append(i)
    device, out = prefill.keys[0].device, {}
    for members in groups.values():
        first = cases[members[0]]
        t0 = clock(device)
        scored = score(prefill, first.name, **case_flags(first, seed))
        seconds = clock(device) - t0
        out.update({i: (scored, seconds / len(members), len(members) > 1) for i in members})
    return out


@torch.inference_mode()
def run_unit(model, context_ids: list[int], question_ids: list[int], cases: list[Case], decoding: Decoding,
             tok, *, window: int = 32, seed: int = 0, batch: bool = True) -> Iterator[Result]:
    """Run every case on one work unit; yield one Result per case (agnostic cases first, then aware).

    model: model.Model. context_ids (c,), question_ids (t,): the prompt's two parts (encode_split),
    both non-empty. cases: see make_cases (an eval drops the ones it has done). decoding: the eval's
    decoding rule for this unit (decode.Decoding), from the next-token logits after the whole prompt.
    tok: the tokenizer (decode, eos_ids) that turns tokens into the generated text (decode.answer_text).
    window: the observation window w of the prefills. seed: the "random" method's seed. batch: decode
    every case of a protocol as one batch (decode.decode_batch, in groups bounded by memory:
    decode_cases); False: one case at a time (decode.decode_case). Both give
    the same rows but for the timings.

    The context is prefilled once (H2O's statistics only when an h2o case is present). Agnostic
    cases compress that prefill and prefill the question onto each compressed cache; aware cases
    compress its continuation by the question, made after the agnostic cases so that the context
    prefill can be freed before the aware ones decode. With only aware cases, the prompt is
    prefilled in one go. Budgets that do not fit are yielded as skipped (see skipped_budgets).
    """
    c, t = len(context_ids), len(question_ids)
    if c < 1 or t < 1:
        raise ValueError(f"a work unit needs a non-empty context and question, got {c} and {t} tokens; "
                         "split the prompt with encode_split")
    for case in cases:
        if case.protocol not in PROTOCOLS:
            raise ValueError(f"unknown protocol {case.protocol!r}; known: {', '.join(PROTOCOLS)}")
    device = next(model.parameters()).device
    skip = skipped_budgets(cases, c + t, c, window)
    why = [None if case.name == "full" else skip.get((case.budget, case.protocol)) for case in cases]
    for case, reason in zip(cases, why):
        if reason is not None:
            yield Result(case, skipped=reason)
    todo = [case for case, reason in zip(cases, why) if reason is None]
    agnostic = [case for case in todo if case.protocol == "agnostic"]
    aware = [case for case in todo if case.protocol == "aware"]
    if not todo:
        return
    h2o = any(case.name == "h2o" for case in todo)
    context = torch.tensor([context_ids], device=device)
    question = torch.tensor([question_ids], device=device)
    decode = decode_cases if batch else decode_one_at_a_time

    t0 = clock(device)
    if agnostic:
        prefill = model.prefill(context, window=window, h2o=h2o)
    else:  # aware only: no split needed, one prefill of the whole prompt (the same ids)
        prefill = model.prefill(torch.cat([context, question], 1), window=window, h2o=h2o)
    prefill_s = clock(device) - t0
    if agnostic:
        yield from decode(model, prepare_cases(model, prefill, agnostic, question, prefill_s, seed), decoding, tok)
    if agnostic and aware:
        t0 = clock(device)
        prefill = model.prefill(question, window=window, h2o=h2o, past=prefill)  # the context prefill is freed
        prefill_s += clock(device) - t0
    if aware:
        yield from decode(model, prepare_cases(model, prefill, aware, None, prefill_s, seed), decoding, tok)


def prepare_cases(model, prefill, cases: list[Case], question, prefill_s: float,
                  seed: int) -> Iterator[tuple[Sequence, Result]]:
    """(sequence ready to decode, its Result so far) per case, lazily: decoding one at a time holds one
    compressed cache at once, a batch holds them all. Scores are made once first (score_once)."""
    scored = score_once(prefill, cases, seed)
    return (prepare_case(model, prefill, case, question, prefill_s, seed, *scored.pop(i, (None, 0.0, False)))
            for i, case in enumerate(cases))


def prepare_case(model, prefill, case: Case, question, prefill_s: float, seed: int, scored: Scored | None = None,
                 score_s: float = 0.0, shared: bool = False) -> tuple[Sequence, Result]:
    """Compress `prefill` for one case; (the sequence to decode, its Result without the answer). question:
    None (aware: the prefill holds the whole prompt) or (1, t) ids to prefill onto the compressed
    context first (agnostic). scored, score_s, shared: the case's scores made by score_once, its share
    of their time (counted in compress_s) and whether other cases shared them (None: scored here)."""
    device = prefill.keys[0].device
    t0 = clock(device)
    cache = compress_case(prefill, case, seed, scored)
    t1 = clock(device)
    kept, mb = cache.kept_fraction(), cache.nbytes() / 2 ** 20  # before the question or decoding appends
    seq, t2 = Sequence.of(prefill, cache), t1
    if question is not None:  # the question reads only what compression kept of the context
        seq.extend(model, question)
        t2 = clock(device)
    return seq, Result(case, None, kept, "prompt" if question is None else "context", mb,
                         prefill_s, score_s + t1 - t0, t2 - t1, timing_shared=shared)


def decode_one_at_a_time(model, prepared, decoding: Decoding, tok) -> Iterator[Result]:
    """Decode each prepared (Sequence, Result) alone (decode.decode_case), as it comes."""
    for seq, result in prepared:
        device = seq.cache.k[0].device
        t0 = clock(device)
        result.generated = answer_text(tok, decode_case(model, seq, decoding, tok.decode), decoding)
        result.decode_s = clock(device) - t0
        yield result


def decode_cases(model, prepared, decoding: Decoding, tok) -> Iterator[Result]:
    """Decode the prepared (Sequence, Result) pairs of one protocol as batches (decode.decode_in_groups):
    a batch's padded buffers hold at most the unit's full cache (every cache of the unit is at the
    prompt's n tokens, so that is decode_in_groups' default), so a full cache decodes alone. A batch's
    time is split evenly over its cases (timing_shared). Yields the Results in the order of the cases."""
    seqs, results = map(list, zip(*prepared))
    device = seqs[0].cache.k[0].device
    t0 = clock(device)
    for group, tokens in decode_in_groups(model, seqs, [decoding] * len(seqs), tok.decode):
        t1 = clock(device)
        for i, answer in zip(group, tokens):
            results[i].generated = answer_text(tok, answer, decoding)
            results[i].decode_s = (t1 - t0) / len(group)
            results[i].timing_shared = results[i].timing_shared or len(group) > 1
            seqs[i] = None  # answered: its memory can go
        t0 = t1
    yield from results


# ----------------------------------------------------------------------------- running an eval

@dataclass
class Unit:
    """One work unit of an eval and the cases still to run on it. key: what identifies the unit
    in its rows (NIAH (length, depth), RULER (task, length, index), LongBench (task, index)).
    data: what the eval's prompt function reads (e.g. a LongBench sample)."""
    key: tuple
    cases: list[Case]
    data: Any = None


def share_units(units: list[Unit], length: Callable[[Unit], int], group: Group = SINGLE) -> list[Unit]:
    """This rank's units, balanced by the estimated cost of their prompts (distributed.unit_cost of
    length(unit), a token count known before the model loads); rank 0 prints every rank's share.
    Every unit without torchrun."""
    return [units[i] for i in group.share([unit_cost(length(unit)) for unit in units])]


CODE_PATHS = (":(glob)**/*.py", ":(glob)**/requirements*.txt", "data")  # what makes a row; results, docs do not


def source_commit(root: Path | None = None) -> str | None:
    """The git commit of the code that runs, with "+dirty" when tracked code (CODE_PATHS) differs
    from it; None outside a git checkout. Every row records it (evaluate), not in the fingerprint: a
    resume still takes rows of earlier commits, and a change of the core mid-run shows in the rows.
    Rows still being written (another run's results.jsonl) do not make the code dirty."""
    import subprocess
    root = root or Path(__file__).resolve().parent.parent  # this checkout
    try:
        git = lambda *a: subprocess.run(["git", *a], cwd=root, capture_output=True, text=True,  # noqa: E731
                                        check=True, timeout=30).stdout.strip()
        dirty = git("status", "--porcelain", "--untracked-files=no", "--", *CODE_PATHS)
        return git("rev-parse", "HEAD") + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def evaluate(model, tok, units: list[Unit], prompt: Callable, decoding: Callable, row: Callable, results: Path, *,
             window: int, seed: int = 0, desc: str = "units", group: Group = SINGLE, batch: bool = True) -> list[dict]:
    """Run the cases of every unit (run_unit: one context prefill per unit) and append a row per
    finished case to `results` as it finishes (RowWriter). Returns the rows written.

    prompt(unit) -> (context_ids, question_ids, info): the unit's prompt split where its context
    ends (encode_split), and whatever decoding and row need (e.g. the sample). decoding(info) -> the
    unit's decode.Decoding (its answers' text: decode.answer_text with tok). row(unit, info, result)
    -> the results line of one case (a dict), to which evaluate adds "commit" (source_commit).
    batch: see run_unit.
    Budgets that do not fit a unit (skipped_budgets) are skipped for every method alike and said
    once at the end, per (budget, protocol), with how many units they skipped.

    group: under torchrun, units are this rank's share (share_units); each rank writes its rows to
    its own file, which rank 0 merges into `results` once every rank has finished (write_rows),
    returning every rank's rows; the other ranks return their own. Every rank calls it, also with
    no units."""
    from tqdm import tqdm
    skipped, why = Counter(), {}
    rank = f" (rank {group.rank})" if group.world > 1 else ""
    commit = source_commit()

    def rows() -> Iterator[dict]:
        for unit in tqdm(units, desc=desc + rank, unit="unit"):
            context, question, info = prompt(unit)
            counted = set()
            for result in run_unit(model, context, question, unit.cases, decoding(info), tok,
                                   window=window, seed=seed, batch=batch):
                if result.skipped:
                    key = (result.case.budget, result.case.protocol)
                    skipped[key] += key not in counted
                    counted.add(key)
                    why.setdefault(key, result.skipped)
                    continue
                yield {**row(unit, info, result), "commit": commit}
    made = write_rows(results, rows(), group)
    for (budget, protocol), count in skipped.items():
        print(f"note: budget {budget:g} ({protocol}) skipped for every method on {count} of {len(units)} unit(s)"
              f"{rank}, e.g. {why[budget, protocol]}")
    return made


def fitting_units(units: list[Unit], size: Callable[[Unit], tuple[int, int]], window: int, *,
                  length: Callable[[Unit], int] | None = None, desc: str = "units", say: bool = True,
                  strict: bool = True, max_length: int | None = None) -> list[Unit]:
    """The units with only the cases whose budget fits them: skipped_budgets on each unit's exact
    sizes, size(unit) -> (n prompt tokens, c context tokens), made with the tokenizer alone, so
    that this runs before the weights load. Each (budget, protocol) skipped somewhere is said once
    (say), naming the units it skips; a unit left with nothing to run is dropped. When the units
    ask for compressed cases and none fits any unit, a ValueError names why and the smallest budget
    (and, given length(unit), the nominal length of its prompt, the smallest length that fits, when
    it is within max_length, the model's context); strict=False (a resumed grid whose other budgets
    have run) only skips them."""
    sizes = {unit.key: size(unit) for unit in units}
    skips = {unit.key: skipped_budgets(unit.cases, *sizes[unit.key], window) for unit in units}
    fit = [Unit(u.key, [c for c in u.cases if c.name == "full" or (c.budget, c.protocol) not in skips[u.key]], u.data)
           for u in units]
    compressed = lambda us: any(c.name != "full" for u in us for c in u.cases)  # noqa: E731
    if strict and compressed(units) and not compressed(fit):
        raise ValueError(no_fit_message(units, lambda u: sizes[u.key], window, length, max_length))
    where: dict[tuple, list] = {}
    for key, skip in skips.items():
        for budget_protocol in skip:
            where.setdefault(budget_protocol, []).append(key)
    for (budget, protocol), keys in sorted(where.items(), key=str) if say else ():
        shown = ", ".join(map(str, keys[:6])) + (f" and {len(keys) - 6} more" if len(keys) > 6 else "")
        print(f"note: budget {budget:g} ({protocol}) does not fit {len(keys)} of {len(units)} {desc}, which run no "
              f"method at that budget: {shown}; e.g. {skips[keys[0]][budget, protocol]}")
    return [u for u in fit if u.cases]


def no_fit_message(units: list[Unit], size: Callable[[Unit], tuple[int, int]], window: int,
                   length: Callable[[Unit], int] | None, max_length: int | None = None) -> str:
    """Why no compressed case of `units` fits any of them, and what would (fitting_units' error): per
    protocol, the largest budget asked on the largest unit, against the tokens every head keeps."""
    cases = [c for u in units for c in u.cases if c.name != "full"]
    sinks = {c.method: split_flags(c.name, c.flags)[1].get("sinks", 0) for c in cases}
    most = max(sinks.values())
    keep = f"its {window}-token observation window" + (
        f" plus {most} sinks for {', '.join(m for m, s in sinks.items() if s == most)}" if most else "")
    parts, fixes = [], []
    for protocol in [p for p in PROTOCOLS if any(c.protocol == p for c in cases)]:
        budget = max((c.budget for c in cases if c.protocol == protocol), key=float)
        unit = max(units, key=lambda u: size(u)[protocol == "agnostic"])
        n = size(unit)[protocol == "agnostic"]
        need = window + most
        what = ("prompt" if protocol == "aware" else
                "context (under agnostic the budget is a fraction of the context, not of the prompt)")
        if isinstance(budget, int) and budget > n:
            parts.append(f"{budget} tokens a head exceed the largest {n}-token {what.split(' ')[0]} ({protocol})")
            fixes.append(f"--budget {n} or less, or a fraction" if n >= need else "")
            continue
        if isinstance(budget, int):
            parts.append(f"{budget} tokens a head are fewer than the {need} each head keeps ({protocol})")
            fixes.append(f"--budget {need}" if n >= need else "")
            continue
        k = round(budget * n)
        parts.append(f"{budget:g} of the largest {n}-token {what} is {k} tokens a head ({protocol})")
        fixes.append(f"--budget {min(1.0, math.ceil(round(need / n * 1e4, 6)) / 1e4):g}" if n >= need else "")
        if length is not None:
            m = max(1, math.floor((need - 0.5) / budget))
            while round(budget * m) < need:
                m += 1
            if max_length is None or m + length(unit) - n <= max_length:  # never past the model's context
                fixes[-1] += f"{' or ' if fixes[-1] else ''}--lengths of {m + length(unit) - n}+"
    fixes = [f for f in fixes if f]
    return (f"no compressed method fits any case: each head keeps {keep}, {window + most} tokens, but "
            f"{'; '.join(parts)}; use {' or '.join(dict.fromkeys(fixes)) or 'a longer prompt'}")


@dataclass
class Eval:
    """What an eval script defines; run_eval does the rest, the same way for every eval.

    results: the results file (its folder is --out). read() -> this configuration's rows in it.
    key(row) -> what identifies a row's case. units(done) -> the work Units whose cases are not all
    in done (the keys of finished rows). length(unit) -> its prompt's tokens, known before the model
    loads (to share the units among ranks). longest: tokens the model must hold, prompt + answer
    (None: its context), for placing layers over --devices. prepare(model, tok) -> (prompt,
    decoding, row), see evaluate, after the checks that need the model. report(rows) -> the
    summaries, written from the latest row of every case in the results file (rank 0 only).
    sizes(tok) -> size(unit): its exact (prompt, context) tokens, with the tokenizer alone
    (fitting_units, before the weights load). length_flag: whether --lengths sets length(unit)."""
    results: Path
    read: Callable[[], list[dict]]
    key: Callable[[dict], tuple]
    units: Callable[[set[tuple]], list[Unit]]
    length: Callable[[Unit], int]
    longest: int | None
    prepare: Callable[[Any, Any], tuple[Callable, Callable, Callable]]
    report: Callable[[list[dict]], Any]
    sizes: Callable[[Any], Callable[[Unit], tuple[int, int]]]
    desc: str = "units"
    length_flag: bool = False


def run_eval(args, ev: Eval, methods: dict[str, tuple[str, dict]], group: Group = SINGLE, model=None,
             tok=None) -> tuple[list[dict], Any]:
    """One eval, end to end: lock --out, find what is done (resume), share the rest among the ranks,
    drop the cases whose budget fits no unit (fitting_units: the tokenizer alone, before the weights;
    nothing fits: a ValueError), load the model (unless given: tests), run every unit (evaluate) and,
    on rank 0, report.
    args: the eval's options (add_eval_arguments: resume, window, batch; seed if it has one).
    Returns (the rows made now, ev.report's result; None on the other ranks)."""
    with lock_output(ev.results.parent, group):
        before, done = finished(ev.read, ev.key, args.resume, group, methods)
        units, new = ev.units(done), []
        if units:
            # model and tok are given together (tests) or not at all
            sizing_tok, cfg = (tok, model.config) if model is not None else group.together(
                lambda: load_eval_tokenizer(args))
            size = ev.sizes(sizing_tok)
            ran = any(methods.get(r.get("method"), ("full",))[0] != "full" for r in before)
            units = group.together(lambda: fitting_units(units, size, args.window, desc=ev.desc, say=group.is_main,
                                                         length=ev.length if ev.length_flag else None, strict=not ran,
                                                         max_length=cfg.max_position))
        if units:
            mine = share_units(units, ev.length, group)
            if model is None:
                model, tok = load_eval_model(args, group, ev.longest)
            prompt, decoding, row = ev.prepare(model, tok)
            new = evaluate(model, tok, mine, prompt, decoding, row, ev.results, window=args.window,
                           seed=getattr(args, "seed", 0), desc=ev.desc, group=group, batch=args.batch)
        if not group.is_main:  # rank 0 has every rank's rows: it writes the reports
            return new, None
        return new, ev.report(latest(before + new, ev.key))


def machine_line(model: str | None = None, dtype: str | None = None) -> str:
    """Where a summary is written: the CPU, its cores, torch's thread count and the GPU if this
    process used CUDA; with dtype, the dtype `model` ran in and why (checkpoint.choose_dtype: the
    model's default on this machine, else --dtype). A resumed run may have made some rows elsewhere:
    the line says so."""
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), None) if Path("/proc/cpuinfo").exists() else None
    gpu = f"; GPU {torch.cuda.get_device_name()}" if torch.cuda.is_initialized() else ""
    chosen = ""
    if dtype is not None:
        default, why = choose_dtype(model, "cuda" if gpu else "cpu")
        chosen = f"; weights and cache in {dtype} ({why if dtype == default else '--dtype'})"
    return (f"Run on: {cpu or 'a CPU'} ({os.cpu_count()} cores), torch with {torch.get_num_threads()} thread(s){gpu}"
            f"{chosen}: the machine that wrote this summary (rows resumed from an earlier run may come from another).")


def stats_report(rows: list[dict], plot: Path, title: str, scale: float = 1.0, digits: int = 3,
                 unit: str = "sample", stratum: str | None = "task") -> tuple[dict | None, str]:
    """stats.summarize of score rows ({"unit", "stratum", "method", "budget", "protocol", "score"}:
    means with bootstrap CIs per method x budget x protocol, LaProx's paired differences, loss vs
    full and the loss ratio), its plot (score vs budget, CI bars, a panel per protocol) written to
    `plot`, and its markdown (unit, stratum: the benchmark's words, see stats.summary_markdown);
    (None, a line saying so) when there are no rows."""
    if not rows:
        return None, "No scored rows: nothing to summarise."
    summary = stats.summarize(rows)
    stats.plot_summary(summary, plot, title)
    return summary, stats.summary_markdown(summary, scale, digits, unit, stratum)
