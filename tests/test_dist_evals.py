"""The eval scripts under torchrun (distributed.py through harness.py), on the CPU with conftest's
small model: 2 gloo processes, launched by torchrun itself, resume a small NIAH grid from a 1-process
partial run with their layers split over two "devices" each, and write exactly the rows (timings
aside) and the summary of one plain process at the same thread count; a user error is said once,
by one rank; --devices is checked per rank. (RULER and LongBench run through the same
harness.run_eval: their single-process resume is tested in their own files.)"""
import contextlib
import json
import os
import re
import subprocess
import sys
from argparse import Namespace
from pathlib import Path

import pytest

import eval_niah as E
from lab.distributed import Group, assign, describe_shares, unit_cost
from lab.harness import OutputLock, placement
from conftest import NIAH_GRID
from test_distributed import ROOT, launch

TIMINGS = ("prefill_s", "compress_s", "question_s", "decode_s")
NIAH = NIAH_GRID  # conftest's small grid; the resume below takes its one-thread run's argv (niah_small_run)


def keyed(results: Path, key) -> dict:
    """{key(row): row without its timings} of a results file; every case once."""
    rows = [json.loads(line) for line in results.read_text().splitlines()]
    out = {key(r): {k: v for k, v in r.items() if k not in TIMINGS} for r in rows}
    assert len(out) == len(rows), "a case was written twice"
    return out


def summary(out: Path) -> dict:
    """summary.json (its tables follow the methods and protocols in the order the rows came)."""
    return json.loads((out / "summary.json").read_text())


@pytest.fixture
def niah_single(niah_small_run) -> tuple[list[str], Path]:
    """(the reference's argv without its --out, its folder)."""
    argv = niah_small_run[0]
    return argv[:-2], Path(argv[-1])


def test_niah_resumed_under_torchrun_on_split_layers_writes_the_single_process_rows(niah_single, tmp_path):
    """A results file holding the reference's first row (as if that run had stopped there), resumed by
    torchrun's 2 ranks with --devices cpu,cpu,cpu,cpu (each rank's layers over its two "devices",
    memory.plan_layers' ranges): they compute the rest, a cell each, and the file ends with exactly
    the reference's rows, the finished one untouched; rank 0 alone reports."""
    argv, niah_single = niah_single
    out = tmp_path / "two"
    finished = (niah_single / "results.jsonl").read_text().splitlines()[:1]
    out.mkdir()
    (out / "results.jsonl").write_text(finished[0] + "\n")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone",
               "eval_niah.py", *argv, "--devices", "cpu,cpu,cpu,cpu", "--out", str(out)]   # as the README says
    done = subprocess.run(command, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert keyed(out / "results.jsonl", E.row_key) == keyed(niah_single / "results.jsonl", E.row_key)
    assert (out / "results.jsonl").read_text().splitlines()[:1] == finished
    assert summary(out) == summary(niah_single)
    costs = [unit_cost(600)] * 2                                               # two cells of 600 tokens
    assert "\n".join(describe_shares(assign(costs, 2), costs)) in done.stdout and done.stdout.count("rank 0:") == 1
    assert done.stdout.count("NIAH small-llama: mean score") == 1   # rank 0 alone reports
    for name in ("heatmap_full.png", "heatmap_laprox_0.2_agnostic.png", "scores_vs_budget.png", "summary.md"):
        assert (out / name).exists()


@pytest.mark.parametrize("argv, busy, words", [
    (["--devices", "cpu,cpu,cpu"], False, "lists 3 device(s) for 2 process(es)"),   # every rank finds it
    (["--no-such-flag"], False, "unrecognized arguments"),                           # argparse, before the group
    ([], True, "is in use by pid"),                                                  # rank 0 alone finds it
])
def test_a_user_error_under_two_ranks_is_one_line_from_one_rank(tmp_path, argv, busy, words):
    out = tmp_path / "out"
    if busy:
        out.mkdir()
    with OutputLock(out) if busy else contextlib.nullcontext():  # another run holds the folder
        (rc0, out0, err0), (rc1, out1, err1) = launch(2, *NIAH, *argv, "--out", str(out),
                                                      script=ROOT / "eval_niah.py")
    assert rc0 == rc1 == 2, (err0, err1)
    assert words in err0 and err0.count("\n") == 1 and err0.startswith("eval_niah.py: error: "), err0
    assert err1 == "" and out1 == "" and "Traceback" not in err0
    assert not (out / "results.jsonl").exists() and (busy or not out.exists())  # before any work


def args(device="cpu", devices=None) -> Namespace:
    return Namespace(device=device, devices=devices)


def test_devices_are_checked_and_sliced_per_rank():
    assert placement(args()) == ("cpu", None) and placement(args(devices="cpu")) == ("cpu", None)
    assert placement(args(devices="cpu, cpu")) == ("cpu", ["cpu", "cpu"])
    rank1 = Group(rank=1, world=2, local_rank=1, local_world=2, launched=True)
    assert placement(args(devices="cpu,cpu"), rank1) == ("cpu", None)
    assert placement(args(devices="cpu,cpu,cpu,cpu"), rank1) == ("cpu", ["cpu", "cpu"])
    for given, group, words in [
        (args("cuda:0", "cpu,cpu"), Group(), "pass one of them"),
        (args(devices=","), Group(), "is empty"),
        (args(devices="cpu,bogus"), Group(), "--devices 'bogus' is not a device"),
        (args(devices="cpu,cpu,cpu"), rank1, "lists 3 device(s) for 2 process(es)"),
        (args("cuda:0"), rank1, "one device"),
    ]:
        with pytest.raises(ValueError, match=re.escape(words)):
            placement(given, group)


def test_longbench_balances_by_its_samples_length_field():
    from eval_longbench import length_estimate
    assert length_estimate({"length": 5000, "context": "x" * 100}, None) == 5000
    assert length_estimate({"length": 5000, "context": "x" * 100}, 3500) == 3500     # the cut
    assert length_estimate({"context": "x" * 4000}, None) == 1001                      # no field: characters / 4
