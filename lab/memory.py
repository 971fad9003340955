"""How much memory a model needs to prefill, score and compress one prompt of n tokens.

    python -m lab.memory --model llama-3.1-8b --length 131072 --dtype bfloat16
    python -m lab.memory --table                    # every known model at 8k, 32k, 128k (up to its context)

The estimate follows what this repository's code holds (model.Model.prefill, cache.Prefill,
laprox.laprox_scorer, cache.select), batch size 1:

  persistent, for the whole run
    weights      embeddings, every layer's projections and norms, the final norm and lm_head
    kv           the full KV cache once: keys and values of every layer, (H_kv, n, D) each
    queries      the window queries every layer keeps for the scorers, (H, w, D)
    gram_cache   the value Gram matrices M, float32 (H_kv, G(G+1)/2, D, D) per layer, computed once
                 per weight and kept (laprox.value_gram_pairs)
    scores       every layer's (H_kv, n) float32 scores until the model-wide selection
  transient, one layer at a time (the largest counts)
    activation   the peak of a prefill layer: the MLP's three (n, F) intermediates (silu(gate), up,
                 their product) next to the residual stream and its normed copy, or the attention
                 block's q, k, v and RoPE temporaries, or RMSNorm's float32 copies, whichever is larger
    score_work   the LaProx score of one layer: on the Triton path the (H_kv, pairs, n) value Gram
                 and the bfloat16 pieces of M; on the PyTorch path the (H, w, n) float32 attention,
                 its logits and a float32 copy of the keys while the softmax runs
    selection    stacked and pooled copies of all scores during the model-wide top-k

It assumes attention itself runs as a fused kernel (no n x n matrix). Everything is per layer
first (layer_memory), so that contiguous layer ranges can be placed on several GPUs and balanced
(model_memory(shape, n, dtype, layers=range(a, b), embed=..., head=...)): plan_layers chooses the
ranges (checkpoint.load_model(devices=..., layers=...) places them; harness.load_checkpoint asks plan_layers), e.g. Llama-3.1-70B on two or three GPUs:

    python -m lab.memory --model llama-3.1-70b --length 32768 --devices 2 --capacity 80

Shapes: any object with the fields of model.Config that matter here (dim, n_layers, n_heads,
n_kv_heads, head_dim, hidden_dim, vocab_size, tie_embeddings, qkv_bias, qk_norm), e.g. a
model.Config or an entry of KNOWN.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass

DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}


@dataclass(frozen=True)
class Shape:
    """The numbers memory needs, named as model.Config names them, plus the native context
    (the longest prompt the checkpoint is meant for without RoPE extrapolation) and a source."""
    dim: int              # d
    n_layers: int         # L
    n_heads: int          # H
    n_kv_heads: int       # H_kv
    head_dim: int         # D
    hidden_dim: int       # MLP width F
    vocab_size: int
    tie_embeddings: bool = False
    qkv_bias: bool = False
    qk_norm: bool = False
    context: int = 0
    hub_id: str = ""
    source: str = ""


# From each checkpoint's config.json on the Hugging Face hub (hub_id/config.json: hidden_size,
# num_hidden_layers, num_attention_heads, num_key_value_heads, head_dim or hidden_size/heads,
# intermediate_size, vocab_size, tie_word_embeddings), cross-checked against public copies of
# those files; `context` is the model card's native context length.
_HUB = "config.json of {} on the Hugging Face hub"
KNOWN = {
    "llama-3.1-8b": Shape(4096, 32, 32, 8, 128, 14336, 128256, context=131072,
                          hub_id="meta-llama/Llama-3.1-8B-Instruct", source=_HUB.format("meta-llama/Llama-3.1-8B-Instruct")),
    "llama-3.1-70b": Shape(8192, 80, 64, 8, 128, 28672, 128256, context=131072,
                           hub_id="meta-llama/Llama-3.1-70B-Instruct", source=_HUB.format("meta-llama/Llama-3.1-70B-Instruct")),
    "mistral-7b-v0.3": Shape(4096, 32, 32, 8, 128, 14336, 32768, context=32768,
                             hub_id="mistralai/Mistral-7B-Instruct-v0.3", source=_HUB.format("mistralai/Mistral-7B-Instruct-v0.3")),
    "qwen3-8b": Shape(4096, 36, 32, 8, 128, 12288, 151936, qk_norm=True, context=32768,
                      hub_id="Qwen/Qwen3-8B", source=_HUB.format("Qwen/Qwen3-8B") + " (max_position_embeddings "
                      "40960; 32768 native, 131072 only with YaRN, which model.py refuses)"),
    "qwen2.5-7b": Shape(3584, 28, 28, 4, 128, 18944, 152064, qkv_bias=True, context=32768,
                        hub_id="Qwen/Qwen2.5-7B-Instruct", source=_HUB.format("Qwen/Qwen2.5-7B-Instruct")),
    "qwen2.5-14b": Shape(5120, 48, 40, 8, 128, 13824, 152064, qkv_bias=True, context=32768,
                         hub_id="Qwen/Qwen2.5-14B-Instruct", source=_HUB.format("Qwen/Qwen2.5-14B-Instruct")),
    "qwen2.5-1.5b": Shape(1536, 28, 12, 2, 128, 8960, 151936, tie_embeddings=True, qkv_bias=True, context=32768,
                          hub_id="Qwen/Qwen2.5-1.5B-Instruct", source=_HUB.format("Qwen/Qwen2.5-1.5B-Instruct")),
    "qwen2.5-coder-1.5b": Shape(1536, 28, 12, 2, 128, 8960, 151936, tie_embeddings=False, qkv_bias=True, context=32768,
                                hub_id="Qwen/Qwen2.5-Coder-1.5B-Instruct",
                                source="the second embedded model's converted config.json (checkpoint.qwen_checkpoint_dir): "
                                       "its GGUF carries an output.weight of its own (Q6_K), so the head is untied"),
    "smollm2-135m": Shape(576, 30, 9, 3, 64, 1536, 49152, tie_embeddings=True, context=8192,
                          hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
                          source="the embedded default's config.json (model.default_checkpoint_dir(), from its GGUF)"),
}


def _check(n, itemsize, window):
    if n < 1:
        raise ValueError(f"prompt length n must be >= 1, got {n}")
    if itemsize not in (2, 4, 8):
        raise ValueError(f"itemsize must be 2 (bfloat16, float16), 4 (float32) or 8 (float64), got {itemsize}")
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")


def layer_weight_bytes(shape, itemsize: int) -> int:
    """One decoder layer's parameters: q, k, v, o projections (+ Qwen2 biases, Qwen3 q/k norms),
    the MLP's gate, up and down projections, two RMSNorms."""
    d, H, H_kv, D, F = shape.dim, shape.n_heads, shape.n_kv_heads, shape.head_dim, shape.hidden_dim
    params = d * (H + 2 * H_kv) * D + H * D * d + 3 * d * F + 2 * d
    params += (H + 2 * H_kv) * D if getattr(shape, "qkv_bias", False) else 0
    params += 2 * D if getattr(shape, "qk_norm", False) else 0
    return params * itemsize


def layer_memory(shape, n: int, itemsize: int, *, window: int = 32, path: str = "triton") -> dict:
    """Bytes one decoder layer needs for an n-token prompt, by part (see the module docstring).

    shape: model.Config-like; itemsize: bytes per weight / activation element (2 or 4);
    window: w; path: "triton" or "torch", which score implementation runs.
    Returns {"weights", "kv", "queries", "gram_cache", "scores"} (held for the whole run) and
    {"activation", "score_work"} (transient: only the largest layer's counts).
    """
    _check(n, itemsize, window)
    if path not in ("triton", "torch"):
        raise ValueError(f"path must be 'triton' or 'torch', got {path!r}")
    d, H, H_kv, D, F = shape.dim, shape.n_heads, shape.n_kv_heads, shape.head_dim, shape.hidden_dim
    G = H // H_kv
    pairs = G * (G + 1) // 2
    w = min(window, n)
    norm = n * d * (2 * itemsize + 8)                                      # x, x.float(), its square, the cast back
    attention = n * itemsize * (2 * d + (H + 2 * H_kv) * D + 4 * H * D)   # x, normed x, q k v, RoPE temps, output
    mlp = n * itemsize * (2 * d + 3 * F)                                   # x, normed x, silu(gate), up, product
    if path == "triton":
        score_work = H_kv * pairs * n * 4 + H_kv * n * 4 + 3 * H_kv * pairs * D * D * 2
    else:
        score_work = 2 * H * w * n * 4 + H_kv * n * D * 4                  # A, its logits, keys in float32
    return {
        "weights": layer_weight_bytes(shape, itemsize),
        "kv": 2 * H_kv * n * D * itemsize,
        "queries": H * w * D * itemsize,
        "gram_cache": H_kv * pairs * D * D * 4,
        "scores": H_kv * n * 4,
        "activation": max(norm, attention, mlp),
        "score_work": score_work,
    }


PERSISTENT = ("weights", "kv", "queries", "gram_cache", "scores")
TRANSIENT = ("activation", "score_work", "selection")


def model_memory(shape, n: int, itemsize: int, *, window: int = 32, path: str = "triton",
                 layers: range | None = None, embed: bool = True, head: bool = True, gather: bool | None = None) -> dict:
    """Bytes a model (or the contiguous `layers` of it on one device) needs for an n-token prompt.

    embed / head: whether this device also holds the embeddings / the final norm and lm_head
    (a tied lm_head is the embedding matrix: counted once when both are on this device).
    gather: whether this device makes the model-wide selection, where the scores of every layer are
    stacked (cache.stack_scores gathers them on layer 0's device; default: whether `layers` holds layer 0).
    Returns each part of layer_memory summed over the layers (persistent parts) or the largest
    (transient parts), "selection" (the pooled scores of these layers, and on the gathering device
    the stacked scores of every layer and their sort key), and "total": the persistent parts plus
    the largest transient one.
    """
    layers = range(shape.n_layers) if layers is None else layers
    per = layer_memory(shape, n, itemsize, window=window, path=path)   # every layer has the same shape
    return _device_parts(shape, per, itemsize, layers, embed, head, 0 in layers if gather is None else gather)


def _device_parts(shape, per: dict, itemsize: int, layers: range, embed: bool, head: bool, gather: bool) -> dict:
    """model_memory from one layer's parts `per` (layer_memory): plan_layers calls it for every candidate range."""
    out = {k: per[k] * len(layers) for k in PERSISTENT}
    embedding = shape.vocab_size * shape.dim * itemsize
    out["weights"] += (embedding if embed else 0) + (shape.dim * itemsize if head else 0)   # + final norm
    if head and not (shape.tie_embeddings and embed):      # lm_head (a tied one elsewhere needs its copy)
        out["weights"] += embedding
    out["activation"] = per["activation"] if layers else 0
    out["score_work"] = per["score_work"] if layers else 0
    out["selection"] = out["scores"] + (2 * per["scores"] * shape.n_layers if gather else 0)
    out["total"] = sum(out[k] for k in PERSISTENT) + max(out[k] for k in TRANSIENT)
    return out


# ----------------------------------------------------------------------------- several devices

def split_layers(n_layers: int, n_devices: int, device_bytes, capacities: list[float] | None = None) -> list[range]:
    """Contiguous ranges of layers, one per device (in order), that minimise the largest fraction of
    its capacity any device uses: device_bytes(d, range) / capacities[d] (equal capacities by default).

    device_bytes(d, layers: range) -> bytes device d needs when it holds `layers`; it may charge the
    first and last devices more (embeddings, lm_head, the gathered scores). Exact, by dynamic
    programming over (device, first layer of the next device): O(n_devices * n_layers^2) calls.
    Ties are broken toward even loads (smaller sum of squared fractions), then the earlier boundary,
    so the plan is deterministic. Ranges may be empty (more devices than layers).
    """
    if n_devices < 1 or n_layers < 0:
        raise ValueError(f"need n_devices >= 1 and n_layers >= 0, got {n_devices} and {n_layers}")
    caps = [1.0] * n_devices if capacities is None else [float(c) for c in capacities]
    if len(caps) != n_devices or not all(c > 0 for c in caps):
        raise ValueError(f"capacities must be {n_devices} positive numbers, got {capacities}")
    frac = lambda d, a, b: device_bytes(d, range(a, b)) / caps[d]  # noqa: E731
    # best[d][i]: (largest fraction, sum of squares, boundary j) for devices 0..d holding layers 0..i-1
    best = [[(frac(0, 0, i), frac(0, 0, i) ** 2, 0) for i in range(n_layers + 1)]]
    for d in range(1, n_devices):
        row = []
        for i in range(n_layers + 1):
            options = []
            for j in range(i + 1):
                f = frac(d, j, i)
                options.append((max(best[d - 1][j][0], f), best[d - 1][j][1] + f * f, j))
            row.append(min(options))
        best.append(row)
    ranges, stop = [], n_layers
    for d in range(n_devices - 1, -1, -1):
        start = best[d][stop][2] if d else 0
        ranges.append(range(start, stop))
        stop = start
    return ranges[::-1]


def plan_layers(shape, n: int, itemsize: int, n_devices: int, *, capacities: list[int] | None = None,
                window: int = 32, path: str = "triton") -> list[range]:
    """Which layers each of n_devices devices holds for prompts of up to n tokens: contiguous ranges,
    balanced by what each device needs (model_memory: its layers' weights, KV cache, queries, Gram
    matrices and scores, the largest transient; the embeddings on the first device, the final norm
    and lm_head on the last, the model-wide selection on layer 0's device).

    capacities: bytes per device (device_capacities); the plan then balances the fraction used and
    a model that does not fit is a ValueError naming what each device would need. Without them the
    devices count as equal and nothing is checked (a CPU). Deterministic: the same arguments give
    the same plan on every rank. Returns a list of n_devices ranges (checkpoint.check_ranges).
    """
    _check(n, itemsize, window)
    per = layer_memory(shape, n, itemsize, window=window, path=path)
    last = n_devices - 1
    need = lambda d, r: _device_parts(shape, per, itemsize, r, d == 0, d == last, 0 in r)["total"]  # noqa: E731
    ranges = split_layers(shape.n_layers, n_devices, need, capacities)
    if capacities is not None:
        needs = [need(d, r) for d, r in enumerate(ranges)]
        if any(x > c for x, c in zip(needs, capacities)):
            split = ", ".join(f"layers {r.start}-{r.stop - 1}: {gib(x)} of {gib(c)}"
                              for r, x, c in zip(ranges, needs, capacities))
            raise ValueError(f"the model does not fit on {n_devices} device(s) at {n} tokens: the best split needs "
                             f"{split}; use more devices, shorter prompts or a smaller dtype")
    return ranges


def device_capacities(devices: list[str]) -> list[int] | None:
    """Bytes each device of `devices` offers to plan_layers: a CUDA device's total memory, shared
    equally among the entries that name it (cuda:0,cuda:0: half each); None when some device is not
    a CUDA device (a CPU's memory is not planned, the layers are only balanced)."""
    import torch
    found = [torch.device(d) for d in devices]
    if any(d.type != "cuda" for d in found):
        return None
    index = [torch.cuda.current_device() if d.index is None else d.index for d in found]
    return [torch.cuda.get_device_properties(i).total_memory // index.count(i) for i in index]


def gib(x: float) -> str:
    return f"{x / 2**30:.1f} GiB"


def _resolve(name):
    if name not in KNOWN:
        raise SystemExit(f"error: unknown model {name!r}; known: {', '.join(KNOWN)}")
    return KNOWN[name]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="llama-3.1-8b", help=f"one of: {', '.join(KNOWN)}")
    p.add_argument("--length", type=int, default=None, help="prompt tokens (default: the model's native context)")
    p.add_argument("--dtype", choices=list(DTYPE_BYTES), default="bfloat16")
    p.add_argument("--window", type=int, default=32)
    p.add_argument("--path", choices=["triton", "torch"], default="triton", help="which LaProx score runs")
    p.add_argument("--table", action="store_true", help="every known model at 8k, 32k and 128k tokens")
    p.add_argument("--devices", type=int, default=1, help="split the layers over this many devices (plan_layers)")
    p.add_argument("--capacity", type=float, default=None, help="GiB per device, to check that the split fits")
    a = p.parse_args()
    itemsize = DTYPE_BYTES[a.dtype]
    if a.window < 1 or (a.length is not None and a.length < 1) or a.devices < 1:
        raise SystemExit("error: --length, --window and --devices must be >= 1")
    if a.capacity is not None and not a.capacity > 0:
        raise SystemExit("error: --capacity must be a positive number of GiB")

    print(f"{'model':18s} {'d':>5s} {'L':>3s} {'H':>3s} {'H_kv':>4s} {'D':>4s} {'MLP F':>6s} {'vocab':>7s} "
          f"{'context':>8s}  hub id")
    for name, s in KNOWN.items():
        print(f"{name:18s} {s.dim:5d} {s.n_layers:3d} {s.n_heads:3d} {s.n_kv_heads:4d} {s.head_dim:4d} "
              f"{s.hidden_dim:6d} {s.vocab_size:7d} {s.context:8d}  {s.hub_id}")
    print()
    if a.table:
        print(f"total memory ({a.dtype}, w={a.window}, {a.path} score path) by prompt length, up to each "
              f"model's native context:")
        lengths = (8192, 32768, 131072)
        print(f"{'model':18s} " + " ".join(f"{n:>10d}" for n in lengths))
        for name, s in KNOWN.items():
            cells = [gib(model_memory(s, n, itemsize, window=a.window, path=a.path)["total"]) if n <= s.context
                     else "-" for n in lengths]
            print(f"{name:18s} " + " ".join(f"{c:>10s}" for c in cells))
        return
    s = _resolve(a.model)
    n = a.length or s.context
    m = model_memory(s, n, itemsize, window=a.window, path=a.path)
    print(f"{a.model} ({s.hub_id}), {n} tokens, {a.dtype}, window {a.window}, {a.path} score path"
          + (f"  [longer than the native context {s.context}]" if n > s.context else ""))
    for k in PERSISTENT:
        print(f"  {k:12s} {gib(m[k]):>12s}   held")
    for k in TRANSIENT:
        print(f"  {k:12s} {gib(m[k]):>12s}   transient (the largest counts)")
    print(f"  {'total':12s} {gib(m['total']):>12s}")
    print(f"  (the full-cache baseline decodes from a packed copy of the KV: +{gib(m['kv'])} while it runs)")
    if a.devices > 1:
        print_plan(s, n, itemsize, a.devices, a.capacity, window=a.window, path=a.path)


def print_plan(shape, n: int, itemsize: int, n_devices: int, capacity_gib: float | None, **kw):
    """The layers and memory of each device under plan_layers, or the one-line reason it does not fit."""
    capacities = None if capacity_gib is None else [int(capacity_gib * 2**30)] * n_devices
    try:
        ranges = plan_layers(shape, n, itemsize, n_devices, capacities=capacities, **kw)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    print(f"\nsplit over {n_devices} devices (plan_layers" + (f", {capacity_gib:g} GiB each):" if capacities else "):"))
    for d, r in enumerate(ranges):
        m = model_memory(shape, n, itemsize, layers=r, embed=d == 0, head=d == n_devices - 1, **kw)
        print(f"  device {d}: layers {r.start:2d}-{r.stop - 1:2d}  weights {gib(m['weights']):>10s}  kv {gib(m['kv']):>9s}  "
              f"total {gib(m['total']):>10s}" + ("  (+ the gathered scores)" if 0 in r else ""))


if __name__ == "__main__":
    main()
