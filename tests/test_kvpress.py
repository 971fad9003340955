"""kvpress_laprox.LaProxPress inside NVIDIA kvpress (0.5.5, transformers 5.2.0) against our reference.

The default model is loaded twice from the same converted folder: with model.py, and with
transformers (their parity: test_checkpoint.py, test_longbench.py). One context and question go
through kvpress's `kv-press-text-generation` pipeline with the press; the pipeline compresses the
context before the question is added, which is our `agnostic` protocol (harness.py), run here on
the pipeline's own context ids. The masked entries must be the complement of our kept set, but for
entries whose score lies within the measured score difference of the two paths of the cut (at most
0.1% of the entries), and the greedy answers must be identical. Not skipped: kvpress is a test
requirement (requirements-test.txt). About 40 s on one idle core, most of it the two imports, the
prefills and the decoding.
"""

import pytest
import torch
from kvpress.utils import compute_n_kept
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache, pipeline
from transformers.utils import logging as hf_logging

from lab import harness
from cache import resolve_budget, stack_scores
from checkpoint import default_checkpoint_dir
from lab.decode import Decoding, answer_text, decode_case
from eval_niah import insert_needle, read_haystack
from lab.kvpress_laprox import LaProxPress, kept_per_head, masked_key_indices
from lab.harness import parse_method
from methods import score, select
from test_model import make_checkpoint

RATIOS = (0.5, 0.8)            # kvpress's compression_ratio: half, then four fifths of the context removed
MAX_NEW_TOKENS = 16
NEEDLE = "The secret code of the blue door is 4817."
QUESTION = "\n\nWhat is the secret code of the blue door? Answer with the code."
MAX_DIFFERING = 0.001          # at most 0.1% of the entries may differ between the two paths


# ----------------------------------------------------------------------------- the budget, without a model

def test_kept_per_head_is_kvpress_truncation_and_our_int_budget():
    for n in (720, 1000, 4096):
        for r in (0.1, 0.25, 0.5, 0.7, 0.9):
            k = kept_per_head(r, n)
            assert k == compute_n_kept(n, r) == max(1, int(n * (1 - r)))
            assert resolve_budget(k, n, 32) == k          # our int budget: tokens per head
    assert kept_per_head(0.9, 1000) == 99 and resolve_budget(1 - 0.9, 1000, 32) == 100   # truncation vs round
    assert kept_per_head(0.0, 1000) == 1000                                           # kvpress: no compression


@pytest.mark.parametrize("bad", [1.0, 1.5, -0.1, float("nan"), float("inf"), True, "0.5", None])
def test_out_of_range_compression_ratio_is_refused(bad):
    with pytest.raises(ValueError, match=r"compression_ratio is the fraction of KV entries removed, a number in \[0, 1\)"):
        kept_per_head(bad, 1000)
    with pytest.raises(ValueError, match="compression_ratio"):
        LaProxPress(compression_ratio=bad)


@pytest.mark.parametrize("n", [40, 100, 333, 1000, 4097])
def test_a_ratio_that_leaves_less_than_the_window_names_the_largest_that_fits(n):
    with pytest.raises(ValueError, match="fewer than the 32") as err:
        kept_per_head(0.999, n)
    most = float(str(err.value).split("at most ")[1].split(" ")[0])
    assert kept_per_head(most, n) >= 32 and "\n" not in str(err.value)
    with pytest.raises(ValueError, match="fewer than the 32"):
        kept_per_head(round(most + 1e-4, 4), n)                  # the largest: one step more does not fit


def test_flags_are_laprox_flags_checked_where_they_enter():
    press = LaProxPress.from_spec("laprox:group=exact:normalize=residual:pooling=max", 0.5)
    assert press.flags == {**LaProxPress().flags, "group": "exact", "normalize": "residual", "pooling": "max"}
    assert set(press.flags) == set(parse_method("laprox")[1]) | set(LaProxPress().flags)
    with pytest.raises(ValueError, match="pooling must be one of avg, max"):
        LaProxPress(0.5, pooling="mean")
    with pytest.raises(ValueError, match="flag floor"):
        LaProxPress(0.5, floor=2.0)
    with pytest.raises(ValueError, match="runs the method 'laprox', not 'snapkv'"):
        LaProxPress.from_spec("snapkv", 0.5)
    with pytest.raises(ValueError, match="window_size"):
        LaProxPress(0.5, window_size=0)


def test_masked_key_indices_are_the_complement_of_the_kept_set():
    kept = [torch.tensor([0, 2, 3]), torch.tensor([1]), torch.tensor([0, 1, 2, 3])]
    batch, heads, seqs = masked_key_indices(kept, 4, torch.device("cpu"))
    assert batch.tolist() == [0, 0, 0, 0] and heads.tolist() == [0, 1, 1, 1] and seqs.tolist() == [1, 0, 2, 3]


# ----------------------------------------------------------------------------- a tiny random model

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A small random Llama in transformers (sdpa), and its folder."""
    _, folder = make_checkpoint(tmp_path_factory.mktemp("tiny_kvpress"), "llama-gqa", seed=21)
    return AutoModelForCausalLM.from_pretrained(folder, attn_implementation="sdpa").eval(), folder


def test_refusals_at_the_prefill(tiny):
    hf, folder = tiny
    ids = torch.randint(3, 300, (1, 40), generator=torch.Generator().manual_seed(22))
    press = LaProxPress(0.5)
    press.compression_ratio = 1.0            # as kvpress's evaluate.py sets it, after construction
    with pytest.raises(ValueError, match="compression_ratio"):
        with press(hf):
            pass
    with pytest.raises(ValueError, match="saw the prefill of 0 of the model's 3 layers"):
        with LaProxPress(0.5)(hf):
            pass
    with pytest.raises(ValueError, match="batch size 1"):
        with LaProxPress(0.5)(hf):
            hf.model(input_ids=ids.repeat(2, 1), past_key_values=DynamicCache())
    with torch.no_grad(), LaProxPress(0.0)(hf):
        hf.model(input_ids=ids, past_key_values=DynamicCache())
    assert all(layer.self_attn.masked_key_indices is None for layer in hf.model.layers)
    press = LaProxPress(window_size=8)
    press.compression_ratio = 0.5            # as evaluate.py does: the ratio set after construction is the one used
    with torch.no_grad(), press(hf):
        hf.model(input_ids=ids, past_key_values=DynamicCache())
    assert press_kept_mask(hf, 40).sum() == 3 * 2 * kept_per_head(0.5, 40, window=8) and press.last_scores is None
    eager = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager").eval()
    with pytest.raises(ValueError, match="eager attention is not patched"):
        with LaProxPress(0.5)(eager):
            pass


# ----------------------------------------------------------------------------- the default model, both paths

@pytest.fixture(scope="module")
def both(default_model):
    """Our model and transformers' from the same converted folder, kvpress's pipeline on the latter,
    the pipeline's own ids of the context and question, and our prefill and scores of that context."""
    hf_logging.disable_progress_bar()
    ours, tok = default_model
    folder = str(default_checkpoint_dir())
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="sdpa").eval()
    pipe = pipeline("kv-press-text-generation", model=hf, tokenizer=AutoTokenizer.from_pretrained(folder), device="cpu")
    hay = read_haystack()[:2400]
    context, _ = insert_needle(hay, NEEDLE, len(hay) // 2)
    inputs = pipe.preprocess(context, questions=[QUESTION], answer_prefix="", max_context_length=10 ** 9)
    context_ids, question_ids = inputs["context_ids"][0].tolist(), inputs["questions_ids"][0][0].tolist()
    # our tokenization of the same chat prompt, split where the context ends, gives the same ids
    text = tok.apply_chat_template([{"role": "user", "content": context + QUESTION}])
    assert harness.encode_split(tok, text, text.index(context) + len(context)) == (context_ids, question_ids)
    prefill = ours.prefill(torch.tensor([context_ids]), window=32)
    full = harness.prepare_case(ours, prefill, harness.Case("full", "full", {}, 1.0, "agnostic"),
                                torch.tensor([question_ids]), 0.0, 0)[0]
    return dict(ours=ours, tok=tok, hf=hf, pipe=pipe, context=context, context_ids=context_ids,
                question_ids=question_ids, prefill=prefill, scored=score(prefill, "laprox"),
                full_answer=our_answer(ours, tok, full))


def our_answer(model, tok, cache) -> str:
    """Greedy answer from a cache that holds the question already, as kvpress's pipeline decodes."""
    spec = Decoding(MAX_NEW_TOKENS, frozenset(tok.eos_ids))
    return answer_text(tok, decode_case(model, cache, spec, tok.decode), spec)


def kept_mask(kept: list[list[torch.Tensor]], n: int) -> torch.Tensor:
    """methods.select's kept indices -> (L, H_kv, n) bool, True = kept."""
    mask = torch.zeros(len(kept), len(kept[0]), n, dtype=torch.bool)
    for l, layer in enumerate(kept):
        for g, idx in enumerate(layer):
            mask[l, g, idx] = True
    return mask


def press_kept_mask(hf, n: int) -> torch.Tensor:
    """What kvpress's attention reads after the press: (L, H_kv, n) bool, True = not masked."""
    layers = [layer.self_attn for layer in hf.model.layers]
    mask = torch.ones(len(layers), hf.config.num_key_value_heads, n, dtype=torch.bool)
    for l, attn in enumerate(layers):
        batch, heads, seqs = attn.masked_key_indices
        assert batch.eq(0).all()
        mask[l, heads, seqs] = False
    return mask


def count_differing(ours: torch.Tensor, theirs: torch.Tensor, k: int, forced: torch.Tensor) -> int:
    """Two kept masks (L, H_kv, n): the same total L * H_kv * k, the forced tokens (n,) bool kept in every
    head on both sides, and at most 0.1% of the entries kept on one side only. Returns how many are."""
    L, H, n = ours.shape
    assert ours.sum() == theirs.sum() == L * H * k
    assert ours[..., forced].all() and theirs[..., forced].all()
    differing = int((ours != theirs).sum())
    assert differing <= MAX_DIFFERING * L * H * n, (differing, L * H * n)
    return differing


def window_mask(n: int, window: int, sinks: int = 0) -> torch.Tensor:
    """(n,) bool: the last `window` and the first `sinks` tokens, kept in every head."""
    mask = torch.zeros(n, dtype=torch.bool)
    mask[n - window:] = True
    mask[:sinks] = True
    return mask


def compare_model_wide(ours: torch.Tensor, theirs: torch.Tensor, our_scores, their_scores, k: int,
                       window: int) -> dict:
    """Two kept masks (L, H_kv, n) of one model-wide cut (no floor, no sinks): count_differing, and every
    entry kept on one side only lies near the cut.

    our_scores, their_scores: per layer (1, H_kv, n), what each selection read (pooled, normalised).
    delta = max |ours - theirs| over the candidates (the tokens before the window). cut: the K-th
    largest candidate score, K = L * H_kv * (k - w). The K-th largest moves by at most delta, so an
    entry kept on one side only has its score within band = delta + |cut_ours - cut_theirs| (<= 2 delta)
    of our cut. Returns the measured figures."""
    L, H, n = ours.shape
    differing = count_differing(ours, theirs, k, window_mask(n, window))
    s_o, s_p = (stack_scores(s)[..., : n - window] for s in (our_scores, their_scores))
    delta = (s_o - s_p).abs().max().item()
    K = L * H * (k - window)
    cut_o, cut_p = (s.flatten().topk(K).values[-1].item() for s in (s_o, s_p))
    differ = ours[..., : n - window] != theirs[..., : n - window]
    band = delta + abs(cut_o - cut_p)
    far = (s_o[differ] - cut_o).abs().max().item() if differ.any() else 0.0
    figures = dict(delta=delta, relative_delta=delta / cut_o, cut=cut_o, cut_shift=abs(cut_o - cut_p),
                   differing=differing, entries=L * H * n, farthest_from_cut=far, band=band)
    print(figures)
    assert far <= band, figures
    return figures


@pytest.mark.parametrize("ratio", RATIOS)
def test_pipeline_press_masks_what_our_agnostic_protocol_evicts(both, ratio):
    hf, ours, tok, prefill, scored = both["hf"], both["ours"], both["tok"], both["prefill"], both["scored"]
    assert hf.config.num_attention_heads // hf.config.num_key_value_heads == 3     # GQA, G = 3
    n = len(both["context_ids"])
    k = kept_per_head(ratio, n)
    press = LaProxPress(compression_ratio=ratio, keep_scores=True)
    with torch.inference_mode():
        theirs = both["pipe"](both["context"], question=QUESTION, press=press, max_new_tokens=MAX_NEW_TOKENS)["answer"]

    # ours: harness's agnostic protocol on the pipeline's context ids, at our int budget k
    case = harness.Case("laprox", "laprox", {}, k, "agnostic")
    compare_model_wide(kept_mask(select(prefill, "laprox", k, scored), n), press_kept_mask(hf, n),
                       scored.scores, press.last_scores, k, prefill.window)
    cache, result = harness.prepare_case(ours, prefill, case, torch.tensor([both["question_ids"]]), 0.0, 0, scored)
    assert result.kept_fraction == k / n and result.kept_of == "context"
    answer = our_answer(ours, tok, cache)
    print(f"ratio {ratio}, k = {k} of n = {n}: kvpress {theirs!r}, ours {answer!r}, full {both['full_answer']!r}")
    assert theirs == answer
    assert answer != both["full_answer"]      # the answer depends on what was evicted: its equality says something


@pytest.mark.parametrize("spec", ["laprox:group=exact:normalize=residual:pooling=max",
                                  "laprox:normalize=output:selection=layer:floor=0.2:sinks=4:pool=0"])
def test_press_flags_select_as_ours(both, spec):
    """Our flags through the press (the previous default; the layer ablation with a floor, sinks and no
    pooling), on a plain prefill under `with press(model)`, against methods.select with the same flags."""
    hf, prefill = both["hf"], both["prefill"]
    _, flags = parse_method(spec)
    n, ratio, sinks = prefill.n, 0.8, flags.get("sinks", 0)
    k = kept_per_head(ratio, n, sinks=sinks)
    press = LaProxPress.from_spec(spec, ratio)
    press.keep_scores = True
    with torch.inference_mode(), press(hf):
        hf.model(input_ids=torch.tensor([both["context_ids"]]), past_key_values=DynamicCache())
    scored = score(prefill, "laprox", **flags)
    ours, theirs = kept_mask(select(prefill, "laprox", k, scored, **flags), n), press_kept_mask(hf, n)
    if spec.endswith("pooling=max"):         # one model-wide cut, like the default's
        compare_model_wide(ours, theirs, scored.scores, press.last_scores, k, prefill.window)
        return
    differing = count_differing(ours, theirs, k, window_mask(n, prefill.window, sinks))
    if flags.get("selection") == "layer":    # one cut per layer: the same count in every layer
        assert ours.sum((1, 2)).eq(theirs.sum((1, 2))).all()
    print(f"{spec}: {differing} of {ours.numel()} entries differ")
