"""The lab: what the eval scripts share, beside the core they evaluate.

    harness.py         the evals' common run: prompt split, the aware / agnostic protocols, options,
                       errors, resume, the run loop
    stats.py           bootstrap CIs, paired differences, the loss ratio; tables and plots
    decode.py          decoding as data, one sequence at a time or every case as one batch
    memory.py          memory per part for any model shape; the plan over devices (python -m lab.memory)
    distributed.py     one eval over torchrun's ranks
    bench_kernels.py   Triton vs PyTorch on a GPU (python -m lab.bench_kernels)
    kvpress_laprox.py  LaProxPress: our LaProx inside NVIDIA kvpress

The core (model, cache, laprox, laprox_triton, checkpoint, baselines, methods, at the root) never
imports this folder; run the commands from the repository's root.
"""
