"""The evaluation harness the eval scripts share: one work unit (a context and its question),
every (method, budget, protocol) case on it, from one prefill of the context.

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
  * the same token ids: the prompt is split where the context ends in the task's template, and
    the two parts are tokenized separately in both protocols (encode_split); everything after
    the context (question, instructions, answer prefix, the chat template's closing tokens) is
    "the question", also for tasks that have no separate question;
  * one prefill of the context per unit: `agnostic` compresses it; `aware` continues it with
    the question (Model.prefill(question, past=context)) and compresses that whole-prompt
    prefill, identical (within float rounding) to a one-shot prefill of the prompt. When only
    `aware` is asked, the prompt is prefilled in one go instead (as before the protocols).
The budget is a fraction of the entries of what is compressed: the whole prompt's (L x H_kv x n)
under `aware`, the context's (L x H_kv x c) under `agnostic`, where the question's t entries are
added after compression and never evicted.

    cases = make_cases({"full": ("full", {}), "laprox": ("laprox", {})}, [0.05], ["aware", "agnostic"])
    context, question = encode_split(tok, text, text.index(ctx_text) + len(ctx_text))
    for r in run_unit(model, context, question, cases, decode=lambda cache: generate(model, tok, cache=cache)):
        print(r.case.method, r.case.protocol, r.generated, r.kept_fraction)
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch

from cache import KVCache
from methods import budget_fits, compress

PROTOCOLS = ("aware", "agnostic")


# ----------------------------------------------------------------------------- inputs

def encode_split(tok, text: str, context_end: int) -> tuple[list[int], list[int]]:
    """Token ids of a prompt whose first `context_end` characters are the context, in two parts
    tokenized separately so that both protocols see the same ids:

        context = tok.encode(text[:context_end])                            # with the bos, if any
        question = tok.encode(text[context_end:], add_special_tokens=False)

    (One-shot tokenization of the whole text can merge characters across the seam into one
    token, which the agnostic protocol cannot do.) context_end: e.g.
    text.index(context_text) + len(context_text). Returns (context ids, question ids), both
    non-empty; the prompt's ids are context + question."""
    if not 0 < context_end < len(text):
        raise ValueError(f"context_end {context_end} must split the prompt into a non-empty context and "
                         f"question (0 < context_end < {len(text)}); locate the end of the context in the text")
    return tok.encode(text[:context_end]), tok.encode(text[context_end:], add_special_tokens=False)


def parse_protocols(text: str) -> list[str]:
    """'aware,agnostic' -> ['aware', 'agnostic'] (order kept, duplicates dropped); a clear error otherwise."""
    items = list(dict.fromkeys(p.strip() for p in str(text).split(",") if p.strip()))
    bad = [p for p in items if p not in PROTOCOLS]
    if bad or not items:
        raise ValueError(f"--protocol {text!r}: expected a comma list of {', '.join(PROTOCOLS)}")
    return items


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
               full_budget: float | int = 1.0) -> list[Case]:
    """Every (method, budget, protocol) case: methods maps a label to its parsed (name, flags);
    "full" keeps everything, so it runs once per protocol, under `full_budget`."""
    for p in protocols:
        if p not in PROTOCOLS:
            raise ValueError(f"unknown protocol {p!r}; known: {', '.join(PROTOCOLS)}")
    return [Case(label, name, dict(flags), b, p) for p in protocols for label, (name, flags) in methods.items()
            for b in ([full_budget] if name == "full" else budgets)]


@dataclass
class Result:
    """What one case gave. generated: what the eval's decode returned (None when skipped).
    kept_fraction: entries kept / entries of what was compressed (kept_of: "prompt" for aware,
    "context" for agnostic). cache_mb: the compressed cache right after compression (agnostic:
    before the question is added). Timings in seconds: prefill_s, the shared prefill(s) this case
    read (aware via the continuation: context + continuation); compress_s, scoring + selection +
    building the cache; question_s, prefilling the question onto the compressed cache (agnostic
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

    def row(self) -> dict:
        """The flat fields a results line holds (method label, budget, protocol, then the measurements)."""
        c = self.case
        return dict(method=c.method, budget=c.budget, protocol=c.protocol, generated=self.generated,
                    kept_fraction=self.kept_fraction, kept_of=self.kept_of, cache_mb=self.cache_mb,
                    prefill_s=self.prefill_s, compress_s=self.compress_s, question_s=self.question_s,
                    decode_s=self.decode_s)


# ----------------------------------------------------------------------------- running a unit

def clock(device) -> float:
    """time.perf_counter() once the device has finished its queued work (CUDA runs asynchronously)."""
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter()


def skipped_budgets(cases: list[Case], n: int, c: int, window: int) -> dict[tuple, str]:
    """{(budget, protocol): why} for the budgets that leave some method of `cases` fewer entries per
    head than its window + sinks (methods.budget_fits) on what that protocol compresses: the n-token
    prompt (aware) or the c-token context (agnostic). Such a budget is skipped for EVERY method
    alike, so that a budget's mean compares the same units ("full" never is)."""
    out = {}
    for case in cases:
        size = n if case.protocol == "aware" else c
        if case.name != "full" and not budget_fits(case.name, case.budget, size, window):
            what = "prompt" if case.protocol == "aware" else "context"
            out[case.budget, case.protocol] = (f"budget {case.budget:g} does not fit {case.name} on the {size}-token "
                                               f"{what}: a head keeps between its {min(window, size)}-token window "
                                               f"(+ sinks) and all {size} tokens")
    return out


def compress_case(prefill, case: Case, seed: int) -> KVCache:
    """methods.compress for one case; "random" draws from `seed` unless its flags set one."""
    flags = dict(case.flags)
    if case.name == "random":
        flags.setdefault("seed", seed)
    return compress(prefill, method=case.name, budget=case.budget, **flags)


@torch.inference_mode()
def run_unit(model, context_ids: list[int], question_ids: list[int], cases: list[Case],
             decode: Callable[[KVCache], str], *, window: int = 32, seed: int = 0) -> Iterator[Result]:
    """Run every case on one work unit; yield one Result per case (agnostic cases first, then aware).

    model: model.Model. context_ids (c,), question_ids (t,): the prompt's two parts (encode_split),
    both non-empty. cases: see make_cases (an eval drops the ones it has done). decode: the eval's
    decoding, cache -> text; it starts from cache.last_logits, the next-token logits after the
    whole prompt, e.g. lambda cache: generate(model, tok, cache=cache, max_new_tokens=24) (model.generate).
    window: the observation window w of the prefills. seed: the "random" method's seed.

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

    t0 = clock(device)
    if agnostic:
        prefill = model.prefill(context, window=window, h2o=h2o)
    else:  # aware only: no split needed, one prefill of the whole prompt (the same ids)
        prefill = model.prefill(torch.cat([context, question], 1), window=window, h2o=h2o)
    prefill_s = clock(device) - t0
    for case in agnostic:
        yield run_case(model, prefill, case, decode, question, prefill_s, seed)
    if agnostic and aware:
        t0 = clock(device)
        prefill = model.prefill(question, window=window, h2o=h2o, past=prefill)  # the context prefill is freed
        prefill_s += clock(device) - t0
    for case in aware:
        yield run_case(model, prefill, case, decode, None, prefill_s, seed)


def run_case(model, prefill, case: Case, decode: Callable[[KVCache], str], question, prefill_s: float,
             seed: int) -> Result:
    """Compress `prefill` for one case and decode. question: None (aware: the prefill holds the
    whole prompt) or (1, t) ids to prefill onto the compressed context first (agnostic)."""
    device = prefill.keys[0].device
    t0 = clock(device)
    cache = compress_case(prefill, case, seed)
    t1 = clock(device)
    kept, mb = cache.kept_fraction(), cache.nbytes() / 2 ** 20  # before the question or decoding appends
    t2 = t1
    if question is not None:  # the question reads only what compression kept of the context
        cache.last_logits = model(question, cache)[:, -1]
        t2 = clock(device)
    generated = decode(cache)
    t3 = clock(device)
    return Result(case, generated, kept, "prompt" if question is None else "context", mb,
                  prefill_s, t1 - t0, t2 - t1, t3 - t2)
