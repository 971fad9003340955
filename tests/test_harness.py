"""harness.py and Model.prefill(past=): a prefill continued by the question equals a one-shot
prefill of the whole prompt (every field, and the kept sets of the methods); the question
prefilled onto a compressed cache against a float64 loop; run_unit's cases, skips and prefills;
and, on the default model, aware-through-the-continuation against the path before the protocols;
the shared command-line, file and lock helpers."""
import copy
import math
import re
from pathlib import Path

import pytest
import torch

import eval_niah as E
from lab import harness as Hn
from cache import KVCache
from methods import compress, select
from lab.decode import Decoding, Sequence, answer_text, decode_case
from checkpoint import load_model
from test_model import BASE, make_checkpoint

METHODS = ["snapkv", "laprox", "h2o", "tova", "knorm", "adakv", "pyramidkv", "criticalkv", "streamingllm", "random"]


def rel_diff(a, b) -> float:
    """max |a - b| / max |b|, in float64."""
    a, b = a.double(), b.double()
    return ((a - b).abs().max() / b.abs().max()).item()


def assert_same_prefill(got, want, tol=1e-5):
    """Every field of two Prefills, within `tol` relative to each tensor's largest entry."""
    assert (got.n, got.window, got.n_layers) == (want.n, want.window, want.n_layers)
    for name in ("keys", "values", "queries", "h2o"):
        for l, (a, b) in enumerate(zip(getattr(got, name), getattr(want, name))):
            assert a.shape == b.shape and rel_diff(a, b) <= tol, f"{name}[{l}]: {rel_diff(a, b):.2e}"
    assert all(a is b for a, b in zip(got.o_proj, want.o_proj))
    for name in ("resid_norm", "out_norm", "resid_rows", "out_rows", "logits"):
        a, b = getattr(got, name), getattr(want, name)
        assert a.shape == b.shape and rel_diff(a, b) <= tol, f"{name}: {rel_diff(a, b):.2e}"


def kept_sets(prefill, method, budget):
    return [[i.tolist() for i in layer] for layer in select(prefill, method, budget)]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Tiny random checkpoints of a few families, loaded: {family: model}."""
    out = {}
    for seed, family in enumerate(["llama-gqa", "llama-mha-tied", "qwen2-bias", "qwen3-qknorm"]):
        _, folder = make_checkpoint(tmp_path_factory.mktemp(family), family, seed=20 + seed)
        out[family] = load_model(str(folder))[0]
    return out


def random_ids(n, seed):
    return torch.randint(3, BASE["vocab_size"], (1, n), generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- the continuation

SPLITS = [(39, 8), (36, 8), (32, 8), (20, 8), (5, 8), (36, 12)]


@pytest.mark.parametrize("family, c, past_window", [("llama-gqa", c, pw) for c, pw in SPLITS] + [
    ("llama-mha-tied", 36, 8), ("qwen2-bias", 20, 8), ("qwen3-qknorm", 36, 8), ("qwen3-qknorm", 5, 8)])
def test_continuation_equals_one_shot(tiny, family, c, past_window):
    """n = 40, w = 8: the question is 1, 4 or 8 tokens (the window spans the split), 20 (it does not),
    35 (the context is shorter than the window); a past made with a wider window works too."""
    model = tiny[family]
    ids = random_ids(40, seed=c)
    one_shot = model.prefill(ids, window=8, h2o=True, h2o_chunk=7)
    context = model.prefill(ids[:, :c], window=past_window, h2o=True, h2o_chunk=7)
    continued = model.prefill(ids[:, c:], window=8, h2o=True, h2o_chunk=7, past=context)
    assert_same_prefill(continued, one_shot)
    for m in METHODS:
        assert kept_sets(continued, m, 12) == kept_sets(one_shot, m, 12), m


def test_continuation_checks_its_past(tiny):
    model = tiny["llama-gqa"]
    ids = random_ids(30, seed=1)
    narrow = model.prefill(ids[:, :20], window=4)
    with pytest.raises(ValueError, match="window >= this one's"):
        model.prefill(ids[:, 20:], window=8, past=narrow)
    with pytest.raises(ValueError, match="h2o=True"):
        model.prefill(ids[:, 20:], window=4, h2o=True, past=narrow)
    handmade = copy.copy(narrow)
    handmade.resid_rows = None
    with pytest.raises(ValueError, match="past must come from model.prefill"):
        model.prefill(ids[:, 20:], window=4, past=handmade)
    assert model.prefill(ids[:, 20:], window=4, past=narrow).n == 30


# ----------------------------------------------------------------------------- the agnostic path

def reference_forward(model, ids, readable):
    """float64 forward with a plain loop over query heads, where in layer l query i of KV head g
    reads key j iff readable(l, g)[i, j]. ids: (1, n) -> logits (n, vocab) float64, and per layer
    (residual after the attention add, attention output), each (n, d)."""
    m = copy.deepcopy(model).double()
    cfg = m.config
    H, G, D, n = cfg.n_heads, cfg.n_heads // cfg.n_kv_heads, cfg.head_dim, ids.shape[1]
    x, streams = m.embed(ids), []
    for l, blk in enumerate(m.layers):
        q, k, v = blk.attn.qkv(blk.attn_norm(x), torch.arange(n), m.inv_freq("cpu"))
        heads = []
        for h in range(H):
            s = (q[0, h] @ k[0, h // G].T) / math.sqrt(D)
            heads.append(s.masked_fill(~readable(l, h // G), -math.inf).softmax(-1) @ v[0, h // G])
        y = blk.attn.o_proj(torch.stack(heads, 1).reshape(1, n, H * D))
        x = x + y
        streams.append((x[0], y[0]))
        x = x + blk.mlp(blk.mlp_norm(x))
    return m.lm_head(m.norm(x))[0], streams


def test_prefill_window_rows_match_float64_loop(tiny):
    """resid_rows / out_rows (what a continuation needs) and the norms made from them, against the loop."""
    model = tiny["qwen3-qknorm"]
    ids = random_ids(30, seed=30)
    p = model.prefill(ids, window=8)
    logits, streams = reference_forward(model, ids, lambda l, g: torch.ones(30, 30, dtype=torch.bool).tril())
    resid = torch.stack([x[-8:].pow(2).sum(-1) for x, _ in streams])
    out = torch.stack([y[-8:].pow(2).sum(-1) for _, y in streams])
    assert rel_diff(p.resid_rows, resid) <= 1e-5 and rel_diff(p.out_rows, out) <= 1e-5
    assert rel_diff(p.resid_norm, resid.sum(1).sqrt()) <= 1e-5 and rel_diff(p.out_norm, out.sum(1).sqrt()) <= 1e-5
    assert rel_diff(p.logits[0], logits[-1]) <= 1e-5


@pytest.mark.parametrize("uneven", [True, False])
@pytest.mark.parametrize("t", [1, 6])
def test_question_onto_a_compressed_cache_matches_float64_loop(tiny, uneven, t):
    """Model.forward(question, cache) over a cache that kept a different subset of the context per
    (layer, KV head): each question token reads the kept context entries and the question tokens
    up to itself; the context's own entries were made with full attention."""
    model = tiny["llama-gqa"]
    c, L, H_kv = 30, model.config.n_layers, model.config.n_kv_heads
    ids = random_ids(c + t, seed=40 + t)
    gen = torch.Generator().manual_seed(41)
    sizes = [[int(s) for s in torch.randint(1, c + 1, (H_kv,), generator=gen)] if uneven else [17] * H_kv
             for _ in range(L)]
    kept = [[torch.randperm(c, generator=gen)[:s].sort().values for s in layer] for layer in sizes]
    cache = KVCache.from_prefill(model.prefill(ids[:, :c], window=8), kept)
    with torch.no_grad():
        got = model(ids[:, c:], cache, c)[0]

    def readable(l, g):
        causal = torch.ones(c + t, c + t, dtype=torch.bool).tril()
        context_key = torch.zeros(c + t, dtype=torch.bool)
        context_key[kept[l][g]] = True
        question_reads = context_key | (torch.arange(c + t) >= c)
        causal[c:] &= question_reads  # the question rows; the context rows read everything before them
        return causal

    want = reference_forward(model, ids, readable)[0][c:]
    assert rel_diff(got, want) <= 1e-5
    assert cache.lengths.tolist() == [[s + t for s in layer] for layer in sizes]


class Spy:
    """The model, logging the prefills run_unit asks for: (tokens, on a past?, h2o?), and the
    next-token logits of each question prefilled onto a compressed cache (agnostic)."""

    def __init__(self, model):
        self.model, self.calls, self.question_logits = model, [], []

    def parameters(self):
        return self.model.parameters()

    def prefill(self, ids, **kw):
        self.calls.append((ids.shape[1], kw.get("past") is not None, kw["h2o"]))
        return self.model.prefill(ids, **kw)

    def __call__(self, ids, cache, pos):
        logits = self.model(ids, cache, pos)
        if ids.shape[0] == 1 and ids.shape[1] > 1:  # a question, not a decoding step
            self.question_logits.append(logits[:, -1].clone())
        return logits


class IdsTok:
    """A tokenizer's decoding side for tiny models: text is the ids; id 2 is the eos (BASE)."""
    eos_ids = [2]

    def decode(self, ids):
        return " ".join(map(str, ids))


SIX = Decoding(6, stop_ids=frozenset(IdsTok.eos_ids))  # 6 greedy tokens, or up to the eos


def six_tokens(model, prefill) -> str:
    """What run_unit generates with SIX from the whole cache of `prefill`, decoded alone."""
    return answer_text(IdsTok(), decode_case(model, Sequence.of(prefill), SIX), SIX)


@pytest.mark.parametrize("family", ["llama-gqa", "qwen3-qknorm"])
@pytest.mark.parametrize("batch", [True, False])
def test_agnostic_full_gives_the_one_shot_logits(tiny, family, batch):
    model = Spy(tiny[family])
    ids = random_ids(40, seed=50)
    cases = Hn.make_cases({"full": ("full", {})}, [0.5], ["agnostic", "aware"])
    results = list(Hn.run_unit(model, ids[0, :31].tolist(), ids[0, 31:].tolist(), cases, SIX, IdsTok(), window=8,
                               batch=batch))
    one_shot = model.model.prefill(ids, window=8)
    assert [r.case.protocol for r in results] == ["agnostic", "aware"]
    (logits,) = model.question_logits
    assert (logits - one_shot.logits).abs().max() <= 1e-4
    assert results[0].generated == results[1].generated == six_tokens(model.model, one_shot)
    assert results[0].kept_fraction == results[1].kept_fraction == 1.0
    assert (results[0].kept_of, results[1].kept_of) == ("context", "prompt")


def test_run_unit_budgets_skips_and_prefills(tiny):
    """c = 30, t = 10, w = 8. At budget 0.2 the agnostic context gives 6 tokens a head (< 8) and the
    aware prompt 8 (< 8 + streamingllm's 4 sinks): both skipped for every method, "full" never.
    At 0.5: 20 of 40 prompt tokens a head (aware), 15 of 30 context tokens (agnostic)."""
    model = Spy(tiny["llama-gqa"])
    ids = random_ids(40, seed=60)
    methods = {"full": ("full", {}), "laprox": ("laprox", {}), "snapkv:pool=0": ("snapkv", {"pool": 0}),
               "streamingllm": ("streamingllm", {})}
    cases = Hn.make_cases(methods, [0.2, 0.5], list(Hn.PROTOCOLS))
    assert len(cases) == 2 * (1 + 3 * 2)
    results = list(Hn.run_unit(model, ids[0, :30].tolist(), ids[0, 30:].tolist(), cases, SIX, IdsTok(), window=8))
    assert sorted(map(id, (r.case for r in results))) == sorted(map(id, cases))
    skipped = {(r.case.method, r.case.protocol) for r in results if r.skipped}
    assert skipped == {(m, p) for m in methods if m != "full" for p in Hn.PROTOCOLS}
    assert all(r.case.budget == 0.2 for r in results if r.skipped)
    assert model.calls == [(30, False, False), (10, True, False)]  # one context prefill, then its continuation
    for r in results:
        if not r.skipped and r.case.name != "full":
            assert r.kept_of == ("prompt" if r.case.protocol == "aware" else "context")
            assert r.kept_fraction == pytest.approx(0.5)
            assert r.cache_mb > 0 and len(r.generated) >= 1 and (r.question_s > 0) == (r.case.protocol == "agnostic")
    row = results[-1].row()
    assert row["method"] == results[-1].case.method and "generated" in row and "decode_s" in row


def test_run_unit_prefills_once_and_asks_h2o_only_when_needed(tiny):
    model = Spy(tiny["llama-gqa"])
    ids = random_ids(40, seed=61)
    ctx, q = ids[0, :30].tolist(), ids[0, 30:].tolist()
    aware_only = Hn.make_cases({"h2o": ("h2o", {}), "snapkv": ("snapkv", {})}, [0.5], ["aware"])
    list(Hn.run_unit(model, ctx, q, aware_only, SIX, IdsTok(), window=8))
    agnostic_only = Hn.make_cases({"snapkv": ("snapkv", {})}, [0.5], ["agnostic"])
    list(Hn.run_unit(model, ctx, q, agnostic_only, SIX, IdsTok(), window=8))
    assert model.calls == [(40, False, True), (30, False, False)]


def test_agnostic_budgets_are_a_subset():
    """--agnostic-budget: the plan's 1.5B grids (1/5/20% aware, 5% agnostic) in one run and one summary."""
    methods = {"full": ("full", {}), "laprox": ("laprox", {})}
    cases = Hn.make_cases(methods, [0.01, 0.05, 0.2], ["aware", "agnostic"], agnostic_budgets=[0.05])
    assert [(c.method, c.budget, c.protocol) for c in cases] == [
        ("full", 1.0, "aware"), ("laprox", 0.01, "aware"), ("laprox", 0.05, "aware"), ("laprox", 0.2, "aware"),
        ("full", 1.0, "agnostic"), ("laprox", 0.05, "agnostic")]
    assert cases == [c for c in Hn.make_cases(methods, [0.01, 0.05, 0.2], ["aware", "agnostic"])
                     if c.protocol == "aware" or c.budget in (1.0, 0.05)]
    import eval_ruler
    parse = eval_ruler.build_parser().parse_args
    args = parse(["--budget", "0.05,0.2", "--protocol", "aware,agnostic", "--agnostic-budget", "0.05"])
    Hn.check_eval_arguments(args)
    assert args.agnostic_budgets == [0.05]
    args = parse(["--budget", "0.05,0.2", "--protocol", "aware,agnostic"])
    Hn.check_eval_arguments(args)
    assert args.agnostic_budgets is None
    with pytest.raises(ValueError, match="0.01 not among --budget 0.05,0.2"):
        Hn.check_eval_arguments(parse(["--budget", "0.05,0.2", "--protocol", "agnostic", "--agnostic-budget", "0.01"]))
    with pytest.raises(ValueError, match="without agnostic in --protocol aware"):
        Hn.check_eval_arguments(parse(["--budget", "0.05", "--agnostic-budget", "0.05"]))


def test_argument_errors(tiny):
    with pytest.raises(ValueError, match="expected a comma list of aware, agnostic"):
        Hn.parse_protocols("aware,blind")
    assert Hn.parse_protocols("agnostic, aware,agnostic") == ["agnostic", "aware"]
    with pytest.raises(ValueError, match="unknown protocol"):
        Hn.make_cases({"full": ("full", {})}, [0.5], ["blind"])
    with pytest.raises(ValueError, match="non-empty context and question"):
        Hn.encode_split(None, "abc", 3)
    with pytest.raises(ValueError, match="non-empty context and question"):
        next(Hn.run_unit(tiny["llama-gqa"], [5, 6], [], [], SIX, IdsTok()))


# ----------------------------------------------------------------------------- the prompt split

class CharTok:
    """One token per character (its code point), except that a run of newlines is one token (as a
    BPE pre-tokenizer keeps whitespace runs together); `marker`: every encode starts with token
    -1, as a SentencePiece "Prepend" normalizer puts a space marker before every text."""

    def __init__(self, marker=False):
        self.marker = marker

    def encode(self, text):
        pieces = re.findall(r"\n+|[^\n]", text)
        return [-1] * self.marker + [sum(map(ord, p)) * (1 if len(p) == 1 else 1000) for p in pieces]


def test_encode_split_cuts_the_prompts_own_ids():
    tok = CharTok()
    context, question = Hn.encode_split(tok, "ab.\nQ?", 3)
    assert (context, question) == (tok.encode("ab."), tok.encode("\nQ?"))
    context, question = Hn.encode_split(tok, "ab\n\n\nQ", 3)  # "\n" + "\n\nQ": one "\n\n\n" token in the prompt
    assert context + question == tok.encode("ab\n\n\nQ") and context == tok.encode("ab") and len(question) == 2
    marked = CharTok(marker=True)
    context, question = Hn.encode_split(marked, "ab. Q?", 3)
    assert context + question == marked.encode("ab. Q?") and -1 not in question  # no marker at the seam
    with pytest.raises(ValueError, match="cannot be split"):
        Hn.encode_split(tok, "\n\nQ", 1)  # the context's only token merges into the question's
    with pytest.raises(ValueError, match="non-empty context and question"):
        Hn.encode_split(tok, "abc", 0)


# ----------------------------------------------------------------------------- arguments and skips

def test_parsers_and_device_checks():
    assert Hn.parse_budgets("0.05, 0.2,0.05") == [0.05, 0.2]
    assert Hn.parse_budgets("0.05,128,1", tokens=True) == [0.05, 128, 1]
    for text, tokens, match in [("0", False, "out of range"), ("1.5", True, "out of range"),
                                ("128", False, r"\(0, 1\]"), ("abc", False, "not a number"),
                                ("nan", False, "out of range"), ("", False, "empty")]:
        with pytest.raises(ValueError, match=match):
            Hn.parse_budgets(text, tokens)
    assert Hn.parse_methods("full, laprox:pool=0,full") == {"full": ("full", {}),
                                                             "laprox:pool=0": ("laprox", {"pool": 0})}
    for spec, match in [("laprox:center=no", "takes a bool"), ("snap-kv", "unknown method"), ("laprox:pool=4", "odd")]:
        with pytest.raises(ValueError, match=match):
            Hn.parse_methods(f"full,{spec}")
    Hn.check_device("cpu")
    with pytest.raises(ValueError, match="is not a device"):
        Hn.check_device("bogus")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            Hn.check_device("cuda:0")


def test_skipped_budgets_read_each_specs_flags():
    """n = 100 prompt, c = 80 context, w = 32, budget 0.5: 50 and 40 tokens a head. streamingllm keeps
    32 + 4 sinks by default (fits both), 32 + 16 with sinks=16 (fits the prompt, not the context),
    32 + 40 with sinks=40 (fits neither)."""
    def skipped(spec):
        return set(Hn.skipped_budgets(Hn.make_cases(Hn.parse_methods(f"full,{spec}"), [0.5], list(Hn.PROTOCOLS)),
                                      100, 80, 32))
    assert skipped("streamingllm") == set()
    assert skipped("streamingllm:sinks=16") == {(0.5, "agnostic")}
    assert skipped("streamingllm:sinks=40") == {(0.5, "aware"), (0.5, "agnostic")}
    assert skipped("snapkv,streamingllm:sinks=40") == skipped("streamingllm:sinks=40")  # every method alike


def test_fitting_units_skip_what_does_not_fit_and_refuse_a_grid_where_nothing_does(capsys):
    """Exact sizes per unit (n prompt, c context tokens), w = 32: 0.01 keeps round(0.01 * n) tokens a
    head. Unit a (n 2000, c 1960): 20 < 32, skipped; unit b (n 4000, c 3960): 40 and 40 >= 32 fit
    laprox, but not streamingllm's 32 + 4 sinks under agnostic (0.01 * 3960 = 40 fits; 36 <= 40)."""
    cases = Hn.make_cases(Hn.parse_methods("full,laprox,streamingllm"), [0.01], list(Hn.PROTOCOLS))
    units = [Hn.Unit("a", list(cases)), Hn.Unit("b", list(cases))]
    size = {"a": (2000, 1960), "b": (4000, 3960)}
    kept = Hn.fitting_units(units, lambda u: size[u.key], 32, desc="cells")
    assert [u.key for u in kept] == ["a", "b"]
    assert {c.name for c in kept[0].cases} == {"full"} and kept[1].cases == cases  # full runs; b runs all
    out = capsys.readouterr().out
    assert out.count("note:") == 2 and "does not fit 1 of 2 cells" in out and "budget: a;" in out  # once per protocol
    # nothing fits: one ValueError naming the window, the sinks, the protocol's unit and the smallest fixes
    with pytest.raises(ValueError) as e:
        Hn.fitting_units(units, lambda u: size[u.key], 48, length=lambda u: size[u.key][0] + 7)
    msg = str(e.value)
    assert "48-token observation window plus 4 sinks for streamingllm, 52 tokens" in msg
    assert "0.01 of the largest 4000-token prompt is 40" in msg and "3960-token context" in msg
    assert "fraction of the context, not of the prompt" in msg
    # 52 / 3960 = 0.01313 -> 0.0132 (agnostic); round(0.01 * m) >= 52 from m = 5150, + 7 not in the prompt
    assert "--budget 0.013 " in msg and "--budget 0.0132" in msg and "--lengths of 5157+" in msg
    assert math.ceil(0.0132 * 3960) >= 52 and round(0.01 * 5150) == 52 > round(0.01 * 5149)
    # past the model's context a longer prompt is no fix: only the budget is offered then
    with pytest.raises(ValueError) as e:
        Hn.fitting_units(units, lambda u: size[u.key], 48, length=lambda u: size[u.key][0] + 7, max_length=5000)
    assert "--budget 0.013 " in str(e.value) and "--lengths" not in str(e.value)
    with pytest.raises(ValueError) as e:
        Hn.fitting_units(units, lambda u: size[u.key], 48, length=lambda u: size[u.key][0] + 7, max_length=8192)
    assert "--lengths of 5157+" in str(e.value)
    # a resumed grid whose other budgets ran (strict=False) only skips; a grid of "full" alone is no error
    assert Hn.fitting_units(units, lambda u: size[u.key], 48, strict=False, say=False) == [
        Hn.Unit(k, [c for c in cases if c.name == "full"]) for k in "ab"]
    only_full = [Hn.Unit("a", [c for c in cases if c.name == "full"])]
    assert Hn.fitting_units(only_full, lambda u: size[u.key], 48) == only_full
    # tokens per head (LongBench): 16 < 32 + 4 every head keeps
    ints = Hn.make_cases(Hn.parse_methods("full,streamingllm"), [16], ["aware"])
    with pytest.raises(ValueError, match=r"16 tokens a head are fewer than the 36 .* use --budget 36"):
        Hn.fitting_units([Hn.Unit("a", ints)], lambda u: (500, 480), 32)
    ints = Hn.make_cases(Hn.parse_methods("full,streamingllm"), [600], ["aware"])  # more than the prompt holds
    with pytest.raises(ValueError, match=r"600 tokens a head exceed the largest 500-token prompt .* use --budget 500 or less"):
        Hn.fitting_units([Hn.Unit("a", ints)], lambda u: (500, 480), 32)
    assert "budget 600 tokens a head exceeds the 500-token prompt" in Hn.skipped_budgets(ints, 500, 480, 32)[600, "aware"]


def test_run_main_reports_user_errors_in_one_line(capsys):
    parser = Hn.OneLineParser(prog="tool.py")
    parser.add_argument("--x", type=int, default=0)

    def run(args):
        if args.x == 1:
            raise ValueError("bad x:\n  use another")
        if args.x == 2:
            raise FileNotFoundError("no such file")
        if args.x == 3:
            raise KeyboardInterrupt
        return args.x
    assert Hn.run_main(parser, run, []) == 0
    for argv, code, words in [(["--x", "1"], 2, "tool.py: error: bad x: use another"),
                              (["--x", "2"], 2, "tool.py: error: no such file"),
                              (["--x", "3"], 130, "tool.py: interrupted"), (["--x", "y"], 2, "invalid int value")]:
        with pytest.raises(SystemExit) as done:
            Hn.run_main(parser, run, argv)
        err = capsys.readouterr().err
        assert done.value.code == code and words in err and err.count("\n") == 1, err


# ----------------------------------------------------------------------------- results file and lock

def test_rows_after_a_torn_line(tmp_path, capsys):
    path = tmp_path / "results.jsonl"
    assert Hn.read_rows(path) == []
    with Hn.RowWriter(path) as w:
        w.write({"k": 1, "v": "a"})
    path.write_text(path.read_text() + '{"k": 2, "v"')  # killed mid-write
    with Hn.RowWriter(path) as w:
        w.write({"k": 2, "v": "b"})
        w.write({"k": 1, "v": "c"})
    assert path.read_text().splitlines()[1] == '{"k": 2, "v"'  # the new rows start on a fresh line
    with open(path, "a") as f:
        f.write('[1, 2]\n{"v": "no key"}\n')
    rows = Hn.read_rows(path, required=("k",))
    err = capsys.readouterr().err
    assert [r["v"] for r in rows] == ["a", "b", "c"]
    assert err.count("\n") == 1 and "skipped 3 unreadable line(s)" in err and "line 2, 5, 6" in err
    assert [r["v"] for r in Hn.latest(rows, lambda r: r["k"])] == ["c", "b"]


def test_output_lock_refuses_a_second_run_and_dies_with_its_holder(tmp_path, capsys):
    import os
    import signal
    import subprocess
    import sys
    out = Hn.output_folder(tmp_path / "out")
    with Hn.OutputLock(out):
        with pytest.raises(ValueError, match=f"in use by pid {os.getpid()} "):
            Hn.OutputLock(out).__enter__()
    with Hn.OutputLock(out):  # released on exit
        pass
    code = ("import sys, time; from lab import harness; lock = harness.OutputLock(sys.argv[1]).__enter__(); "
            "print('locked', flush=True); time.sleep(120)")
    holder = subprocess.Popen([sys.executable, "-c", code, str(out)], cwd=Path(Hn.__file__).parent.parent,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(ValueError, match=f"--out {out} is in use by pid {holder.pid} .*-c.* wait for that run"):
            Hn.OutputLock(out).__enter__()
        with pytest.raises(SystemExit) as done:  # an eval on that folder: one line, before any model work
            E.main(["--lengths", "600", "--depths", "0", "--methods", "full", "--out", str(out)])
        err = capsys.readouterr().err
        assert done.value.code == 2 and err.count("\n") == 1 and f"is in use by pid {holder.pid} (" in err, err
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
    with Hn.OutputLock(out):  # kill -9 left the .lock file, but no lock
        assert (out / ".lock").read_text().startswith(f"pid {os.getpid()} ")
    with pytest.raises(ValueError, match="is a file"):
        Hn.output_folder(out / ".lock")


# ----------------------------------------------------------------------------- the default model

@pytest.fixture(scope="module")
def default(default_model):
    """(model, tok, context ids, question ids, one-shot prefill of the whole prompt with h2o, w = 16)
    of a short NIAH prompt on the default model."""
    model, tok = default_model
    hay = E.haystack_ids(tok, E.read_haystack(), 400)
    prompt = E.build_prompt(tok, hay, 300, 0.5)
    text, context = prompt["text"], prompt["context"]
    context_ids, question_ids = Hn.encode_split(tok, text, text.index(context) + len(context))
    one_shot = model.prefill(torch.tensor([context_ids + question_ids]), window=16, h2o=True)
    return model, tok, context_ids, question_ids, one_shot


def test_encode_split_keeps_the_text(default):
    _, tok, context_ids, question_ids, _ = default
    assert 230 < len(context_ids) and 10 < len(question_ids) < 70
    prompt = E.build_prompt(tok, E.haystack_ids(tok, E.read_haystack(), 400), 300, 0.5)
    assert context_ids + question_ids == prompt["ids"] == tok.encode(prompt["text"])  # the prompt's own ids
    assert context_ids == tok.encode(prompt["text"][:prompt["text"].index(prompt["context"]) + len(prompt["context"])])
    text = tok.decode(context_ids + question_ids, skip_special_tokens=False)
    assert tok.decode(question_ids, skip_special_tokens=False).startswith(" </book>.")
    assert text.endswith(E.QUESTION + "<|im_end|>\n<|im_start|>assistant\n" + E.ANSWER_PREFIX)


def test_default_model_continuation_equals_one_shot(default):
    model, _, context_ids, question_ids, one_shot = default
    context = model.prefill(torch.tensor([context_ids]), window=16, h2o=True)
    continued = model.prefill(torch.tensor([question_ids]), window=16, h2o=True, past=context)
    assert_same_prefill(continued, one_shot)
    for m in ["laprox", "snapkv", "h2o", "tova", "knorm"]:  # all of METHODS on the tiny models
        assert kept_sets(continued, m, 0.1) == kept_sets(one_shot, m, 0.1), m


def test_aware_through_the_continuation_matches_todays_path(default):
    """The harness with both protocols (aware from the continuation, decoded as a batch) generates
    exactly what the path before the protocols did (a one-shot prefill of tok.encode(text), compress,
    generate, one case at a time);
    agnostic "full" starts from the one-shot logits within 1e-4 and answers the same. (Few cases:
    decoding is the slow part.)"""
    from model import generate
    model, tok, context_ids, question_ids, one_shot = default
    specs = ["full", "laprox", "snapkv:pool=0"]
    cases = [c for c in Hn.make_cases(Hn.parse_methods(",".join(specs)), [0.1], list(Hn.PROTOCOLS))
             if c.protocol == "aware" or c.name in ("full", "laprox")]
    spy = Spy(model)
    spec = Decoding(8, stop_ids=frozenset(tok.eos_ids), stop_strings=("\n",))
    results = list(Hn.run_unit(spy, context_ids, question_ids, cases, spec, tok, window=16))  # batched
    assert not any(r.skipped for r in results) and len(results) == len(cases)
    got = {(r.case.method, r.case.budget, r.case.protocol): r for r in results}
    with torch.inference_mode():  # today's path, written out
        prefill = model.prefill(torch.tensor([context_ids + question_ids]), window=16)
        for c in cases:
            if c.protocol == "aware":
                cache = compress(prefill, c.name, c.budget, **c.flags)
                want = generate(model, tok, cache=cache, prefill=prefill, max_new_tokens=8, stop_strings=("\n",))
                assert got[c.method, c.budget, "aware"].generated == want, c.method
                assert got[c.method, c.budget, "aware"].kept_fraction == cache.kept_fraction()
    agnostic_full = spy.question_logits[[c.method for c in cases if c.protocol == "agnostic"].index("full")]
    assert (agnostic_full - one_shot.logits).abs().max() <= 1e-4
    assert got["full", 1.0, "agnostic"].generated == got["full", 1.0, "aware"].generated
    print({k: r.generated for k, r in got.items()})


def test_rows_of_other_method_definitions_are_neither_done_nor_reported():
    """A row records its method's resolved flags; a rerun takes it as done only under the same ones
    (an old default laprox row, or a row from before method_flags existed, runs again)."""
    methods = Hn.parse_methods("laprox,snapkv:pooling=max")
    now = {label: Hn.resolved_flags(name, flags) for label, (name, flags) in methods.items()}
    old = dict(now["laprox"], group="exact", normalize="residual", pooling="max")
    rows = [dict(method="laprox", method_flags=now["laprox"], budget=0.05),
            dict(method="laprox", method_flags=old, budget=0.2),
            dict(method="snapkv:pooling=max", budget=0.05),                     # made before method_flags
            dict(method="snapkv:pooling=max", method_flags=now["snapkv:pooling=max"], budget=0.2),
            dict(method="h2o", method_flags={"sinks": 0}, budget=0.05)]          # not in this run: kept as is
    kept = Hn.same_definitions(rows, methods)
    assert [(r["method"], r["budget"]) for r in kept] == [("laprox", 0.05), ("snapkv:pooling=max", 0.2), ("h2o", 0.05)]
    _, done = Hn.finished(lambda: rows, lambda r: (r["method"], r["budget"]), True, methods=methods)
    assert done == {("laprox", 0.05), ("snapkv:pooling=max", 0.2), ("h2o", 0.05)}


def test_scores_are_made_once_per_score_key_and_select_the_same(tiny):
    """laprox at two budgets and laprox:selection=head share one scoring; snapkv and
    snapkv:pooling=max do not; every case keeps what it keeps when scored alone."""
    model = tiny["llama-gqa"]
    with torch.inference_mode():
        prefill = model.prefill(random_ids(260, 9), window=8)
        cases = Hn.make_cases(Hn.parse_methods("full,laprox,laprox:selection=head,snapkv,snapkv:pooling=max,random"),
                              [0.1, 0.3], ["aware"])
        once = Hn.score_once(prefill, cases, seed=3)
        by = {(c.method, c.budget): once.get(i) for i, c in enumerate(cases)}
        assert by["full", 1.0] is None
        laprox_scored = by["laprox", 0.1][0]
        assert all(by[m, b][0] is laprox_scored and by[m, b][2] for m in ("laprox", "laprox:selection=head")
                   for b in (0.1, 0.3))
        assert by["snapkv", 0.1][0] is by["snapkv", 0.3][0] is not by["snapkv:pooling=max", 0.1][0]
        for i, case in enumerate(cases):
            alone = Hn.compress_case(prefill, case, seed=3)
            shared = Hn.compress_case(prefill, case, 3, once[i][0] if i in once else None)
            assert torch.equal(alone.lengths, shared.lengths)
            for l in range(len(alone.k)):
                assert torch.equal(alone.k[l], shared.k[l])


@pytest.mark.parametrize("script", ["eval_niah", "eval_ruler", "eval_longbench"])
def test_help_says_each_default_once_and_lists_the_methods(script):
    """--help: every option has a help text, no default said twice or as None, every method named."""
    import importlib
    from methods import METHODS
    parser = importlib.import_module(script).build_parser()
    assert all(action.help for action in parser._actions), [a.dest for a in parser._actions if not a.help]
    for action in parser._actions:
        shown = parser._get_formatter()._get_help_string(action)
        assert shown.count("(default:") + shown.count("(default ") <= 1 and "(default: None)" not in shown, shown
    assert "(default: None)" not in parser.format_help()
    methods_help = next(a.help for a in parser._actions if a.dest == "methods")
    assert all(name in methods_help for name in METHODS)


def test_source_commit_is_dirty_for_code_not_for_rows(tmp_path):
    """A row records the commit of the code; rows still being written by another run (a tracked
    results.jsonl) do not make it "+dirty", a changed .py or data file does."""
    import subprocess
    git = lambda *a: subprocess.run(["git", *a], cwd=tmp_path, check=True, capture_output=True, text=True)  # noqa: E731
    git("init", "-q")
    for path, text in {"model.py": "x = 1\n", "lab/stats.py": "y = 2\n", "data/words.txt": "a\n",
                       "docs/niah/results.jsonl": "{}\n", "README.md": "r\n"}.items():
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text(text)
    git("add", "-A")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "c")
    head = git("rev-parse", "HEAD").stdout.strip()
    assert Hn.source_commit(tmp_path) == head
    (tmp_path / "docs/niah/results.jsonl").write_text("{}\n{}\n")
    (tmp_path / "README.md").write_text("edited\n")
    assert Hn.source_commit(tmp_path) == head                      # rows and docs: still the code of HEAD
    for path in ("lab/stats.py", "model.py", "data/words.txt"):
        git("checkout", "-q", "--", ".")
        (tmp_path / path).write_text("changed\n")
        assert Hn.source_commit(tmp_path) == head + "+dirty", path
