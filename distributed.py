"""One evaluation over many processes, launched by torchrun: each rank runs a share of the work
units, the rows reach rank 0, which alone writes the results file and the summaries.

    torchrun --nproc-per-node 8 eval_niah.py --device cuda ...            # one node, 8 GPUs
    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 eval_niah.py ...

Every rank runs the same script with the same arguments; an eval uses this module so:

    with distributed.start() as group:                          # torchrun's environment, a gloo group
        plan = group.together(lambda: check_arguments(args))     # every rank checks, before any model
        with group.hold(lambda: OutputLock(out)):                # only rank 0 takes the output lock
            done = group.from_main(lambda: finished_keys(out))   # rank 0 reads the results, all get them
            todo = [u for u in units if key(u) not in done]
            mine = [todo[i] for i in group.share([unit_cost(n_tokens(u)) for u in todo])]
            model = group.together(lambda: load(device=group.device(args.device)))
            with group.rows(writer.write if group.is_main else None) as put:   # rank 0 writes, others send
                for unit in mine:
                    for row in run(model, unit):
                        put(row)
            if group.is_main:
                write_summaries(out)

Without torchrun (no RANK / WORLD_SIZE in the environment) nothing changes: one process, no
process group, `together` and `from_main` just call their function, `share` gives every unit,
`rows` writes directly.

How things travel. The process group is gloo, which moves CPU tensors between CPU or GPU ranks
alike (rows are small; the model's own tensors never travel). Collectives (all_gather, broadcast)
are used only where every rank waits anyway: argument checks, the lock, the resume set, loading.
Rows go point to point: a worker sends each finished row at once, without waiting (isend: a
header (kind, bytes) then the row as UTF-8 JSON, never pickle), and waits for its sends only at
the end; on rank 0 a receiver thread takes the rows as they arrive, from any rank, and appends
them through the writer (under a lock shared with rank 0's own rows). A worker that fails sends
its error instead; rank 0 then stops with one line (RankFailed), keeping the rows it has.

Errors. `together(fn)` runs fn on every rank and gathers one exit code per rank (-1 for none):
if any rank failed, the lowest such rank re-raises its exception (the eval's main prints it, one
line) and every other rank exits silently with that rank's exit code, so the error is printed
once and every rank exits with the same code. torchrun's agent stops the other ranks when one
dies later on.
"""
from __future__ import annotations

import json
import os
import threading
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Callable, Iterator

import torch
import torch.distributed as dist

HEADER, PAYLOAD = 1, 2     # message tags
ROW, DONE, FAILED = 0, 1, 2  # message kinds
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


class RankFailed(ValueError):
    """A worker rank stopped with an error (which it printed itself). A ValueError, so that the
    eval scripts report it in one line."""


@dataclass(frozen=True)
class Group:
    """This process among torchrun's: rank (0 .. world - 1, 0 writes the results), world size,
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

    def __exit__(self, *exc) -> None:
        stop(self)

    # ---- devices

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

    # ---- every rank together

    def together(self, fn: Callable):
        """fn() on every rank (a collective: every rank must call it, in the same order). If any rank
        raised, the lowest such rank re-raises its exception, the others raise SystemExit with its
        exit code (exit_code) without a word: the error is printed once, every rank exits alike."""
        if not self.active:
            return fn()
        value, error, code = None, None, -1
        try:
            value = fn()
        except (Exception, SystemExit) as e:  # a KeyboardInterrupt reaches every rank by itself
            error, code = e, exit_code(e)
        codes = [torch.zeros(1, dtype=torch.int64) for _ in range(self.world)]
        dist.all_gather(codes, torch.tensor([code]))
        failed = [r for r, c in enumerate(codes) if int(c) >= 0]
        if not failed:
            return value
        if failed[0] == self.rank:
            raise error
        raise SystemExit(int(codes[failed[0]]))

    def from_main(self, fn: Callable):
        """fn() on rank 0 only, its result (JSON: tuples arrive as lists) on every rank; also without
        torchrun, so that every run sees the same value. An error is rank 0's: re-raised there,
        SystemExit with its code elsewhere. A collective: every rank calls it."""
        if not self.active:
            return json.loads(json.dumps(fn()))
        error, code, data = None, -1, b""
        if self.is_main:
            try:
                data = json.dumps(fn()).encode()
            except (Exception, SystemExit) as e:
                error, code = e, exit_code(e)
        header = torch.tensor([code, len(data)])
        dist.broadcast(header, src=0)
        if int(header[0]) >= 0:
            if self.is_main:
                raise error
            raise SystemExit(int(header[0]))
        buffer = torch.frombuffer(bytearray(data), dtype=torch.uint8) if self.is_main else \
            torch.empty(int(header[1]), dtype=torch.uint8)
        dist.broadcast(buffer, src=0)
        return json.loads(buffer.numpy().tobytes().decode())

    @contextmanager
    def hold(self, make: Callable) -> Iterator:
        """Hold make()'s context manager (the output folder's lock) on rank 0 only, for the block;
        an error entering it (the folder is in use) is rank 0's, as in `together`."""
        with ExitStack() as stack:
            yield self.together(lambda: stack.enter_context(make()) if self.is_main else None)

    # ---- work and rows

    def share(self, costs: list[float]) -> list[int]:
        """The indices of this rank's units (assign: balanced by cost, the same on every rank given the
        same costs); rank 0 prints every rank's share, a line each."""
        shares = assign(costs, self.world)
        if self.world > 1 and self.is_main:
            print("\n".join(describe_shares(shares, costs)), flush=True)
        return shares[self.rank]

    @contextmanager
    def rows(self, write: Callable[[dict], None] | None) -> Iterator[Callable[[dict], None]]:
        """put(row) for the block: on rank 0 write(row) (the results file's writer; None elsewhere),
        on the others a send to rank 0, which writes every rank's rows as they arrive. Leaving the
        block, a worker waits until rank 0 has its rows; rank 0 waits for every worker's last row.
        No collective may run inside the block. Rows are JSON objects (dicts)."""
        if not self.active or self.world == 1:
            if write is None:
                raise ValueError("rank 0 needs the results file's writer")
            yield write
        elif self.is_main:
            if write is None:
                raise ValueError("rank 0 needs the results file's writer")
            receiver = Receiver(self.world, write)
            yield receiver.put
            receiver.finish()
        else:
            sender = Sender()
            try:
                yield sender.put
            except Exception as e:  # (a Ctrl-C reaches every rank by itself)
                sender.close(FAILED, f"{type(e).__name__}: {e}")
                raise
            sender.close(DONE)


def start(backend: str = "gloo", timeout: timedelta = timedelta(hours=24)) -> Group:
    """The Group of this process; under torchrun, its process group is started (env:// rendezvous:
    MASTER_ADDR, MASTER_PORT from torchrun). timeout: how long a rank waits in a collective or for
    the next row (units can take long; torchrun stops every rank when one dies)."""
    group = Group.from_env()
    if group.launched and not dist.is_initialized():
        dist.init_process_group(backend, timeout=timeout)
    return group


def stop(group: Group) -> None:
    """End the process group (a no-op without one). Skipped while rank 0 still waits for rows (an
    error left a rows block early): the process exits without it."""
    if group.active and not Receiver.waiting:
        dist.destroy_process_group()


# ----------------------------------------------------------------------------- rows to rank 0

class Sender:
    """A worker's rows, each sent to rank 0 at once (isend); the sends are waited for at close."""

    def __init__(self):
        self.pending = []  # (work, tensor): a tensor must live until its send is done

    def send(self, kind: int, text: str = "") -> None:
        data = torch.frombuffer(bytearray(text.encode()), dtype=torch.uint8) if text else None
        header = torch.tensor([kind, 0 if data is None else data.numel()])
        self.pending.append((dist.isend(header, dst=0, tag=HEADER), header))
        if data is not None:
            self.pending.append((dist.isend(data, dst=0, tag=PAYLOAD), data))

    def put(self, row: dict) -> None:
        self.send(ROW, json.dumps(row, ensure_ascii=False))

    def close(self, kind: int, message: str = "") -> None:
        self.send(kind, message)
        for work, _ in self.pending:
            work.wait()
        self.pending.clear()


class Receiver:
    """Rank 0's side: a thread that receives rows from any worker as they come and writes them;
    put() writes rank 0's own rows through the same writer (one lock: whole lines, one at a time)."""
    waiting = 0  # receivers whose thread may still block in a receive (see stop)

    def __init__(self, world: int, write: Callable[[dict], None]):
        self.write, self.lock = write, threading.Lock()
        self.open = set(range(1, world))            # workers whose last message has not come
        self.failed: dict[int, str] = {}
        self.error: BaseException | None = None
        self.received = 0
        Receiver.waiting += 1
        self.thread = threading.Thread(target=self.receive, name="rows-to-rank-0", daemon=True)
        self.thread.start()

    def receive(self) -> None:
        try:
            while self.open:
                header = torch.zeros(2, dtype=torch.int64)
                src = dist.recv(header, tag=HEADER)            # from any worker
                kind, size = header.tolist()
                data = torch.empty(size, dtype=torch.uint8)
                if size:
                    dist.recv(data, src=src, tag=PAYLOAD)
                text = data.numpy().tobytes().decode()
                if kind == ROW:
                    self.keep(text)
                else:
                    self.open.discard(src)
                    if kind == FAILED:
                        self.failed[src] = text
        except Exception as e:  # a worker vanished: finish() says so
            self.error = self.error or e
        finally:
            Receiver.waiting -= 1

    def keep(self, text: str) -> None:
        """Write one worker row; after a failed write (the disk is full) the rows are still received,
        so that the workers can finish, but no longer written."""
        if self.error is None:
            try:
                with self.lock:
                    self.write(json.loads(text))
                self.received += 1
            except Exception as e:
                self.error = e

    def check(self) -> None:
        if self.failed:
            rank, message = min(self.failed.items())
            raise RankFailed(f"rank {rank} stopped ({message}); the rows received so far are in the results "
                             f"file: the same command resumes")
        if self.error is not None:
            raise RankFailed(f"receiving rows from the other ranks failed: {type(self.error).__name__}: "
                             f"{self.error}") from None

    def put(self, row: dict) -> None:
        self.check()  # a worker failed: stop now rather than after rank 0's share
        with self.lock:
            self.write(row)

    def finish(self) -> None:
        """Wait until every worker has sent its last row (or failed)."""
        self.thread.join()
        self.check()
