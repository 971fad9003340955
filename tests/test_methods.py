"""The method registry's front door (methods.py): method specs parsed and checked completely before
any model work, every flag typed by its default, budgets checked for every method ("full"
included), and a budget that keeps everything working for every method on any prompt length."""
import math
import re

import pytest

import methods
from cache import resolve_budget
from lab.harness import parse_method
from methods import budget_fits, check_flags, compress, method_scores, select
from test_selection import make_prefill

EVICTING = [m for m in methods.METHODS if m != "full"]


# ----------------------------------------------------------------------------- specs and flags

def test_specs_parse_by_the_type_of_each_default():
    assert parse_method("laprox:selection=layer:pool=0:center=true:normalize=none:group=sum") == (
        "laprox", {"selection": "layer", "pool": 0, "center": True, "normalize": "none", "group": "sum"})
    assert parse_method("laprox:center=FALSE:use_triton=none") == ("laprox", {"center": False, "use_triton": None})
    assert parse_method("laprox:use_triton=true")[1] == {"use_triton": True}
    name, flags = parse_method("pyramidkv:beta=2.5")
    assert flags == {"beta": 2.5}
    name, flags = parse_method("adakv:alpha=1:sinks=2")
    assert flags == {"alpha": 1.0, "sinks": 2} and type(flags["sinks"]) is int
    assert parse_method("random:seed=7") == ("random", {"seed": 7}) and parse_method(" full ") == ("full", {})
    assert parse_method("criticalkv:eps=0:first_stage=1") == ("criticalkv", {"eps": 0.0, "first_stage": 1.0})


BAD_SPECS = {  # spec: words of the error
    "laprox:center=no": "takes a bool (true or false)",
    "laprox:center=off": "takes a bool",
    "laprox:center=0": "takes a bool",
    "laprox:center=1": "takes a bool",
    "laprox:center=yes": "takes a bool",
    "laprox:center=": "takes a bool",
    "laprox:pool=4": "must be odd",
    "laprox:pool=2.0": "takes an int",
    "laprox:pool=-1": "int >= 0",
    "laprox:pool=seven": "takes an int",
    "laprox:selection=foo": "one of model, layer, head",
    "laprox:selection=Model": "one of model, layer, head",
    "laprox:group=mean": "one of sum, exact",
    "laprox:pooling=mean": "one of avg, max",
    "laprox:floor=1.5": "floor must be a finite number in [0, 1]",
    "laprox:normalize=None": "one of mass, residual, output, none",
    "laprox:use_triton=maybe": "true, false or none",
    "adakv:alpha=1.5": "alpha must be a finite number in [0, 1]",
    "adakv:alpha=nan": "alpha must be a finite number",
    "adakv:alpha=abc": "takes a number",
    "criticalkv:first_stage=-0.1": "first_stage",
    "criticalkv:eps=-1": "eps must be a finite number >= 0",
    "criticalkv:eps=inf": "eps must be a finite number",
    "pyramidkv:beta=0.5": "beta must be a finite number >= 1",
    "pyramidkv:beta=inf": "beta must be a finite number",
    "streamingllm:sinks=2.5": "takes an int",
    "streamingllm:sinks=-1": "sinks must be an int >= 0",
    "random:seed=1.5": "takes an int",
    "laprox:pool=0:pool=1": "given twice",
    "laprox:pool": "key=value",
    "laprox:=3": "key=value",
    "laprox:colour=red": "unknown flag 'colour'",
    "snapkv:window=16": "window is fixed by the prefill",
    "full:pool=3": "unknown flag 'pool'",
    "snap-kv": "unknown method 'snap-kv'",
    "": "unknown method ''",
}


@pytest.mark.parametrize("spec", list(BAD_SPECS))
def test_bad_specs_fail_with_the_reason(spec):
    with pytest.raises(ValueError) as err:
        parse_method(spec)
    assert BAD_SPECS[spec] in str(err.value) and "\n" not in str(err.value)


BAD_FLAGS = [  # what an API caller can pass: (method, flags, words)
    ("laprox", dict(center="no"), "takes a bool"),
    ("laprox", dict(center=0), "takes a bool"),
    ("laprox", dict(use_triton="yes"), "true, false or none"),
    ("snapkv", dict(pool=7.0), "takes an int"),
    ("snapkv", dict(pool=True), "takes an int"),
    ("adakv", dict(alpha=True), "takes a number"),
    ("adakv", dict(alpha="0.2"), "takes a number"),
    ("pyramidkv", dict(beta=math.inf), "beta must be a finite number"),
    ("streamingllm", dict(sinks=2.5), "takes an int"),
    ("laprox", dict(selection="global"), "one of model, layer, head"),
]


@pytest.mark.parametrize("method, flags, words", BAD_FLAGS)
def test_flags_are_checked_where_they_enter_the_registry(method, flags, words):
    p = make_prefill(n=120, w=8)
    for call in (lambda: select(p, method, 0.2, **flags), lambda: compress(p, method, 0.2, **flags),
                 lambda: method_scores(p, method, **flags), lambda: check_flags(method, flags)):
        with pytest.raises(ValueError, match=re.escape(words)):
            call()


def test_strict_booleans_reach_the_scorer():
    """center=false is the default, center=true is not: the parsed spec selects what the flags say."""
    p = make_prefill(n=200, w=8, seed=4)
    as_lists = lambda kept: [[i.tolist() for i in layer] for layer in kept]  # noqa: E731
    kept = {}
    for spec in ("laprox:center=false", "laprox:center=true"):
        name, flags = parse_method(spec)
        kept[spec] = as_lists(select(p, name, 0.2, **flags))
    assert kept["laprox:center=false"] == as_lists(select(p, "laprox", 0.2))
    assert kept["laprox:center=true"] == as_lists(select(p, "laprox", 0.2, center=True))
    assert kept["laprox:center=true"] != kept["laprox:center=false"]


# ----------------------------------------------------------------------------- budgets

BAD_BUDGETS = [(-5, ValueError, ">= 1"), (0, ValueError, ">= 1"), (0.0, ValueError, "(0, 1]"),
               (1.5, ValueError, "(0, 1]"), (float("nan"), ValueError, "(0, 1]"), (-0.1, ValueError, "(0, 1]"),
               ("abc", TypeError, "budget must be"), (None, TypeError, "budget must be"), (True, TypeError, "budget")]


@pytest.mark.parametrize("budget, exc, words", BAD_BUDGETS)
@pytest.mark.parametrize("method", ["full", "snapkv", "laprox"])
def test_budgets_are_checked_for_every_method(method, budget, exc, words):
    p = make_prefill(n=120, w=8)
    for call in (lambda: compress(p, method, budget), lambda: select(p, method, budget),
                 lambda: budget_fits(method, budget, 120, 8)):
        with pytest.raises(exc) as err:
            call()
        assert words in str(err.value)


def test_full_still_ignores_what_a_budget_asks():
    p = make_prefill(n=120, w=8)
    for budget in (0.01, 1.0, 7, 120):
        assert compress(p, "full", budget).kept_fraction() == 1.0


@pytest.mark.parametrize("n, w", [(3, 3), (10, 8), (30, 8), (35, 32)])
@pytest.mark.parametrize("method", EVICTING)
def test_a_budget_that_keeps_everything_works_on_any_prompt(method, n, w):
    """Budget 1.0 (and n tokens) keep every entry, even when window + sinks (streamingllm: 4)
    exceed the prompt: the forced tokens overlap, they cannot ask for more than n."""
    p = make_prefill(n=n, w=w, seed=n)
    for budget in (1.0, n):
        kept = select(p, method, budget)
        assert all(idx.tolist() == list(range(n)) for layer in kept for idx in layer)
        assert budget_fits(method, budget, n, w)
    assert budget_fits("streamingllm", 1.0, n, w, sinks=n + 5) and select(p, "streamingllm", 1.0, sinks=n + 5)


@pytest.mark.parametrize("n, w, sinks", [(10, 8, 4), (300, 32, 4), (330, 32, 0), (1000, 64, 7), (97, 32, 4)])
def test_too_small_budget_advice_is_possible(n, w, sinks):
    """The advice of a refused budget, in tokens and as a fraction, is itself accepted."""
    with pytest.raises(ValueError) as err:
        resolve_budget(1, n, w, sinks=sinks) if n < w + sinks else resolve_budget(0.01, n, w, sinks=sinks)
    msg = str(err.value)
    tokens = int(re.search(r"at least (\d+) tokens per head", msg).group(1))
    fraction = float(re.search(r"\(fraction ([0-9.]+)\)", msg).group(1))
    assert tokens == min(n, w + sinks) and 0 < fraction <= 1
    assert resolve_budget(tokens, n, w, sinks=sinks) == tokens
    assert resolve_budget(fraction, n, w, sinks=sinks) >= tokens


def test_budget_fits_reads_the_flags():
    assert budget_fits("streamingllm", 0.05, 1000, 32)  # 50 >= 32 + 4
    assert not budget_fits("streamingllm", 0.05, 1000, 32, sinks=20)  # 50 < 32 + 20
    with pytest.raises(ValueError, match="takes an int"):
        budget_fits("streamingllm", 0.05, 1000, 32, sinks=2.5)
