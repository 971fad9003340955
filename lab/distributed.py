"""One evaluation over many processes, launched by torchrun: each rank runs a share of the work
units and appends its rows to its own file in --out (results.rank{r}.jsonl); once every rank has
finished, rank 0 merges the files into results.jsonl and writes the summaries (harness.py:
lock_output, finished, share_units, evaluate). Without torchrun nothing changes: one process,
`together` calls its function, `share` gives every unit, rows go straight into results.jsonl.

    torchrun --nproc-per-node 8 eval_niah.py --device cuda ...            # one node, 8 GPUs
    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 \\
        eval_niah.py --out /mnt/nfs/niah ...                              # --out: seen by both nodes

Files, not messages: no two processes write one file, a rank that stops keeps every row it
finished, and a rerun with any number of ranks (or none) merges them before it reads the results.
The process group (gloo: CPU tensors, from CPU or GPU ranks alike) carries one exit code per rank,
in `together`: at once the barrier and the error exit. The price is a shared filesystem: over
several nodes --out must be on one that every node mounts (NFS, Lustre, ..., as torchrun clusters
have); a rank that does not see it says so in one line before any model loads
(harness.check_shared). Earlier versions sent the rows to rank 0 over the process group and
needed no shared filesystem: that guarantee is dropped.

Errors are printed once (`together`); a rank that fails while evaluating says so when the others
have finished their shares, whose rows are kept. torchrun's agent stops every rank when one dies.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Callable

import torch
import torch.distributed as dist

QUADRATIC = 32768.0


# ----------------------------------------------------------------------------- balancing work

def unit_cost(n: int, quadratic: float = QUADRATIC) -> float:
    """Estimated cost of a work unit whose prompt has n tokens: n + n^2 / quadratic.

    A prefill layer costs about 2 P n multiply-adds in its projections and MLP (P parameters per
    layer) and 2 H D n^2 in causal attention (QK^T and AV, each half of n x n x H D): the n^2 term
    matches the n term at n = P / (H D), the `quadratic` length: ~53k tokens for Llama-3.1-8B
    (memory.layer_weight_bytes(shape, 1) / (n_heads * head_dim)), ~6k for SmolLM2-135M. Decoding,
    scoring and selection are linear in n. Only the balance of the work depends on it, never a result.
    """
    return n + n * n / quadratic


def assign(costs: list[float], world: int) -> list[list[int]]:
    """Deterministic balanced shares: longest processing time first. Units are taken by decreasing
    cost (ties: the lower index first), each to the rank with the least cost so far (ties: the
    lower rank). costs: one per unit. Returns per rank the indices of its units, in increasing order.
    The largest share is at most 4/3 of the best possible one (Graham 1969), plus nothing for ties."""
    if world < 1:
        raise ValueError(f"world size must be >= 1, got {world}")
    shares, loads = [[] for _ in range(world)], [0.0] * world
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        r = min(range(world), key=lambda r: (loads[r], r))
        shares[r].append(i)
        loads[r] += costs[i]
    return [sorted(s) for s in shares]


def describe_shares(shares: list[list[int]], costs: list[float]) -> list[str]:
    """One line per rank: its units and their estimated cost (and its part of the total)."""
    total = sum(costs) or 1.0
    return [f"rank {r}: {len(s)} unit(s), estimated cost {sum(costs[i] for i in s):.4g} "
            f"({100 * sum(costs[i] for i in s) / total:.1f}%)" for r, s in enumerate(shares)]


# ----------------------------------------------------------------------------- the group

def exit_code(error: BaseException) -> int:
    """The exit code a script gives this exception: SystemExit's own, 2 for a user error (ValueError,
    OSError, as the eval scripts' main does), 1 for anything else (a bug)."""
    if isinstance(error, SystemExit):
        return error.code if isinstance(error.code, int) else (0 if error.code is None else 1)
    return 2 if isinstance(error, (ValueError, OSError)) else 1


@dataclass(frozen=True)
class Group:
    """This process among torchrun's: rank (0 .. world - 1, 0 merges the results), world size,
    and its place on its node (local_rank of local_world processes), which picks its devices.
    launched: started by torchrun (else a single process: rank 0 of 1)."""
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1
    launched: bool = False

    @classmethod
    def from_env(cls, env=os.environ) -> "Group":
        """The ranks torchrun exports (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE); none: one process."""
        if "RANK" not in env and "WORLD_SIZE" not in env:
            return cls()
        try:
            rank, world = int(env["RANK"]), int(env["WORLD_SIZE"])
            local_rank, local_world = int(env.get("LOCAL_RANK", rank)), int(env.get("LOCAL_WORLD_SIZE", world))
        except (KeyError, ValueError):
            raise ValueError("RANK and WORLD_SIZE (and LOCAL_RANK, LOCAL_WORLD_SIZE) must be set together, as ints: "
                             "launch with torchrun, or unset them for a single process") from None
        if not (0 <= rank < world and 0 <= local_rank < local_world <= world):
            raise ValueError(f"torchrun's environment is inconsistent: RANK={rank} WORLD_SIZE={world} "
                             f"LOCAL_RANK={local_rank} LOCAL_WORLD_SIZE={local_world}")
        return cls(rank, world, local_rank, local_world, launched=True)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        """Whether the process group is up (launched by torchrun and started)."""
        return self.launched and dist.is_available() and dist.is_initialized()

    def __enter__(self) -> "Group":
        return self

    def __exit__(self, *exc) -> None:  # `with start() as group:` ends the process group
        if self.active:
            dist.destroy_process_group()

    def device(self, name: str) -> str:
        """This rank's device for --device `name`: under torchrun "cuda" is cuda:LOCAL_RANK (one GPU
        per process); the CPU is shared; a named GPU is refused when several processes share a node."""
        if not self.launched or name == "cpu":
            return name
        if name == "cuda":
            return f"cuda:{self.local_rank}"
        if self.local_world > 1:
            raise ValueError(f"--device {name} with {self.local_world} processes per node would put them all on "
                             f"one device: pass --device cuda (each rank takes cuda:LOCAL_RANK) or --devices")
        return name

    def devices(self, names: list[str]) -> list[str]:
        """This rank's slice of --devices: the node's processes split the list in equal contiguous
        parts, in local-rank order (cuda:0..7 over 4 processes: cuda:0,cuda:1 for local rank 0)."""
        k, rest = divmod(len(names), self.local_world)
        if rest or not k:
            raise ValueError(f"--devices lists {len(names)} device(s) for {self.local_world} process(es) per node: "
                             f"give every process the same number (a multiple of {self.local_world})")
        return list(names[self.local_rank * k:(self.local_rank + 1) * k])

    def together(self, fn: Callable):
        """fn() on every rank (a collective: every rank must call it, in the same order; it returns
        when every rank's fn has). If any rank raised, the lowest such rank re-raises its exception,
        the others raise SystemExit with its exit code (exit_code) without a word: the error is
        printed once, every rank exits alike. A Ctrl-C is not gathered: it reaches every rank."""
        if not self.active:
            return fn()
        value, error, code = None, None, -1
        try:
            value = fn()
        except (Exception, SystemExit) as e:
            error, code = e, exit_code(e)
        codes = [torch.zeros(1, dtype=torch.int64) for _ in range(self.world)]
        dist.all_gather(codes, torch.tensor([code]))
        failed = [r for r, c in enumerate(codes) if int(c) >= 0]
        if not failed:
            return value
        if failed[0] == self.rank:
            raise error
        raise SystemExit(int(codes[failed[0]]))

    def share(self, costs: list[float]) -> list[int]:
        """The indices of this rank's units (assign: balanced by cost, the same on every rank given the
        same costs); rank 0 prints every rank's share, a line each."""
        shares = assign(costs, self.world)
        if self.world > 1 and self.is_main:
            print("\n".join(describe_shares(shares, costs)), flush=True)
        return shares[self.rank]


def start(backend: str = "gloo", timeout: timedelta = timedelta(hours=24)) -> Group:
    """The Group of this process; under torchrun, its process group is started (env:// rendezvous:
    MASTER_ADDR, MASTER_PORT from torchrun). timeout: how long a rank waits in `together`, e.g. for
    the other ranks to finish their shares (torchrun stops every rank when one dies)."""
    group = Group.from_env()
    if group.launched and not dist.is_initialized():
        dist.init_process_group(backend, timeout=timeout)
    return group

