"""distributed.py: the balanced assignment and torchrun's environment as pure functions, then a toy
eval (tests/toy_eval.py, no model, through harness.py's torchrun path) in 2 and 3 gloo processes on
127.0.0.1 started with torchrun's environment variables: the rows that rank 0 merges from the
ranks' files are a single process's rows, a resumed run with another number of ranks (or none)
skips what is done, also from the files an interrupted run left; an error is printed once and
every rank exits alike; a rank that does not see --out refuses before any work."""
import itertools
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from lab import distributed
from lab.distributed import Group, assign, describe_shares, unit_cost
from lab.harness import OutputLock, rank_file

ROOT = Path(__file__).resolve().parent.parent
TOY = Path(__file__).resolve().parent / "toy_eval.py"
sys.path.insert(0, str(TOY.parent))
import toy_eval  # noqa: E402


# ----------------------------------------------------------------------------- pure parts

def loads(shares, costs):
    return [sum(costs[i] for i in s) for s in shares]


def test_assignment_is_longest_first_deterministic_and_near_the_best():
    """NIAH-like prompt lengths (3 lengths x 5 depths): every unit once; the largest share within
    4/3 of the best split (brute force over every assignment on 2 ranks) and below round-robin's."""
    lengths = [2000] * 5 + [4000] * 5 + [7500] * 5
    costs = [unit_cost(n, 6000.0) for n in lengths]
    for world in (1, 2, 3, 4):
        shares = assign(costs, world)
        assert sorted(i for s in shares for i in s) == list(range(len(costs)))
        assert all(s == sorted(s) for s in shares) and assign(costs, world) == shares
    shares = assign(costs, 2)
    best = min(max(sum(c for c, r in zip(costs, pick) if r == k) for k in (0, 1))
               for pick in itertools.product((0, 1), repeat=len(costs)))
    assert max(loads(shares, costs)) <= 4 / 3 * best
    round_robin = [list(range(r, len(costs), 2)) for r in range(2)]
    assert max(loads(shares, costs)) < max(loads(round_robin, costs))
    # ties: equal costs go to the lower rank, lower index first
    assert assign([1.0] * 5, 2) == [[0, 2, 4], [1, 3]]
    assert assign([], 3) == [[], [], []]
    lines = describe_shares(shares, costs)
    assert len(lines) == 2 and lines[0].startswith(f"rank 0: {len(shares[0])} unit(s), estimated cost")
    with pytest.raises(ValueError, match="world size"):
        assign(costs, 0)


def test_unit_cost_is_linear_then_quadratic():
    assert unit_cost(1000, 1000.0) == 2000.0 and unit_cost(4000, 1000.0) == 20000.0
    assert unit_cost(100) < unit_cost(200) and distributed.QUADRATIC > 0


def test_ranks_and_devices_from_torchrun_environment():
    assert Group.from_env({}) == Group()  # no torchrun: one process
    assert not Group().active and Group().device("cuda") == "cuda" and Group().devices(["cuda:0", "cuda:1"]) == [
        "cuda:0", "cuda:1"]
    env = dict(RANK="5", WORLD_SIZE="8", LOCAL_RANK="1", LOCAL_WORLD_SIZE="4")
    g = Group.from_env(env)
    assert (g.rank, g.world, g.local_rank, g.local_world, g.launched, g.is_main) == (5, 8, 1, 4, True, False)
    assert g.device("cuda") == "cuda:1" and g.device("cpu") == "cpu"
    with pytest.raises(ValueError, match="one device"):
        g.device("cuda:0")
    assert g.devices([f"cuda:{i}" for i in range(8)]) == ["cuda:2", "cuda:3"]
    with pytest.raises(ValueError, match="multiple of 4"):
        g.devices(["cuda:0", "cuda:1"])
    for bad in (dict(RANK="2", WORLD_SIZE="2"), dict(RANK="0"), dict(RANK="x", WORLD_SIZE="2")):
        with pytest.raises(ValueError, match="torchrun"):
            Group.from_env(bad)


def test_without_torchrun_everything_is_one_process(capsys):
    g = Group()
    assert g.together(lambda: 7) == 7
    assert g.share([3.0, 1.0, 2.0]) == [0, 1, 2] and capsys.readouterr().out == ""

    def bad():
        raise ValueError("a bad argument")
    with pytest.raises(ValueError, match="a bad argument"):
        g.together(bad)


# ----------------------------------------------------------------------------- processes

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(world: int, *args: str, timeout: float = 90, script: Path = TOY,
           cwds: list[Path] | None = None) -> list[tuple[int, str, str]]:
    """Run `script` (the toy eval) in `world` processes with torchrun's environment on 127.0.0.1, one
    thread each, each in its folder of `cwds` (default: the repository); returns (exit code, stdout,
    stderr) per rank."""
    port, procs = free_port(), []
    for rank in range(world):
        env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                   WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world), OMP_NUM_THREADS="1")
        if Path("/sys/class/net/lo").exists():
            env["GLOO_SOCKET_IFNAME"] = "lo"  # the loopback only
        procs.append(subprocess.Popen([sys.executable, str(script), *args], env=env, cwd=cwds[rank] if cwds else ROOT,
                                      text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    try:
        outputs = [p.communicate(timeout=timeout) for p in procs]
        return [(p.returncode, *o) for p, o in zip(procs, outputs)]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()


def rows_of(path: Path) -> dict:
    """{(unit, case): row} of a results folder's results.jsonl (or of one file); every case once."""
    path = path / "results.jsonl" if path.is_dir() else path
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    keyed = {(r["unit"], r["case"]): r for r in rows}
    assert len(keyed) == len(rows), "a case was written twice"
    return keyed


def write_lines(path: Path, rows) -> None:
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def computed(stdout: str) -> list[int]:
    line = next(line for line in stdout.splitlines() if " computes " in line)
    return json.loads(line.split(" computes ", 1)[1])


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> dict:
    """The toy's rows in one process (no torchrun environment: distributed is a no-op)."""
    out = tmp_path_factory.mktemp("single")
    toy_eval.main(["--units", "12", "--out", str(out)])
    return rows_of(out)


def test_two_ranks_write_the_single_process_rows(single, tmp_path):
    out = tmp_path / "two"
    (rc0, out0, err0), (rc1, out1, err1) = launch(2, "--units", "12", "--out", str(out))
    assert rc0 == rc1 == 0, err0 + err1
    assert rows_of(out) == single                            # every row, exactly, once
    costs = [unit_cost(toy_eval.unit_length(u), 1000.0) for u in range(12)]
    assert [computed(out0), computed(out1)] == assign(costs, 2)      # balanced, as assign says
    assert describe_shares(assign(costs, 2), costs)[1] in out0 and "unit(s)" not in out1   # rank 0 prints shares
    assert json.loads((out / "summary.json").read_text()) == {"rows": 24}   # written once every rank finished
    assert sorted(p.name for p in out.iterdir()) == [".lock", "results.jsonl", "summary.json"]   # merged, tidy


def test_resume_with_another_number_of_ranks_reads_every_ranks_file(single, tmp_path):
    """An earlier run left results.jsonl (units 0, 3) and, interrupted, two ranks' files: rank 0's
    with units 4 and 7, rank 1's with unit 9 and the first row of unit 10; each file ends in a torn
    line (killed mid-write). 3 ranks resume: they compute only what is missing (unit 10's second
    row, not its first), and results.jsonl ends with exactly the single process's rows (and the
    torn line it had), the rank files merged; rank 0 alone warns, once per torn line."""
    out = tmp_path / "resumed"
    out.mkdir()
    results = out / "results.jsonl"
    write_lines(results, [row for (u, _), row in single.items() if u in (0, 3)])
    write_lines(rank_file(results, 0), [row for (u, _), row in single.items() if u in (4, 7)])
    write_lines(rank_file(results, 1), [single[9, "a"], single[9, "b"], single[10, "a"]])
    for path in (results, rank_file(results, 1)):
        with open(path, "a") as f:
            f.write('{"unit": 11, "ca')
    ranks = launch(3, "--units", "12", "--out", str(out))
    assert all(rc == 0 for rc, _, _ in ranks), [err for _, _, err in ranks]
    done_now = [computed(stdout) for _, stdout, _ in ranks]
    assert sorted(u for units in done_now for u in units) == [1, 2, 5, 6, 8, 10, 11]
    lines = results.read_text().splitlines()
    assert lines[4] == '{"unit": 11, "ca'
    assert [json.loads(line) for line in lines[:4]] == [single[u, c] for u in (0, 3) for c in "ab"]
    results.write_text("\n".join(lines[:4] + lines[5:]) + "\n")
    assert rows_of(out) == single and not list(out.glob("*.rank*.jsonl"))
    assert ranks[0][2].count("skipped 1 unreadable line(s)") == 2 and ranks[1][2] == ranks[2][2] == ""


def test_an_argument_error_on_rank_1_is_printed_once_by_rank_1(tmp_path):
    out = tmp_path / "bad"
    (rc0, out0, err0), (rc1, out1, err1) = launch(2, "--units", "12", "--out", str(out), "--bad-on-rank", "1")
    assert rc0 == rc1 == 2
    assert err1.count("--bad-on-rank 1") == 1 and len(err1.strip().splitlines()) == 1 and "Traceback" not in err1
    assert err0.strip() == "" and out0 == ""                 # rank 0 found nothing: silent, same exit code
    assert not out.exists()                                  # before any work: no folder, no lock


def test_a_busy_output_folder_is_said_once_by_rank_0(tmp_path):
    out = tmp_path / "busy"
    out.mkdir()
    with OutputLock(out):                                    # another run holds the folder
        (rc0, _, err0), (rc1, _, err1) = launch(2, "--units", "4", "--out", str(out))
    assert rc0 == rc1 == 2 and "is in use" in err0 and len(err0.strip().splitlines()) == 1 and err1.strip() == ""
    assert not (out / "results.jsonl").exists()


def test_a_rank_that_does_not_see_the_output_folder_refuses_before_any_work(tmp_path):
    """Rank 1 runs in another folder, so that the same relative --out is another folder there, as a
    node's own disk would be: it says so in one line, before any rank computes, and leaves nothing."""
    node0, node1 = tmp_path / "node0", tmp_path / "node1"
    node0.mkdir(), node1.mkdir()
    (rc0, out0, err0), (rc1, out1, err1) = launch(2, "--units", "4", "--out", "out", cwds=[node0, node1])
    assert rc0 == rc1 == 2, (err0, err1)
    assert "rank 1 does not see --out out" in err1 and "every node mounts" in err1
    assert len(err1.strip().splitlines()) == 1 and err0 == "" and "computes" not in out0 + out1
    assert [p.name for p in (node0 / "out").iterdir()] == [".lock"] and not (node1 / "out").exists()


def test_a_worker_that_fails_is_said_once_and_one_process_resumes_from_the_ranks_files(single, tmp_path):
    out = tmp_path / "failed"
    costs = [unit_cost(toy_eval.unit_length(u), 1000.0) for u in range(12)]
    main, worker = assign(costs, 2)
    (rc0, _, err0), (rc1, _, err1) = launch(2, "--units", "12", "--out", str(out), "--fail-at-unit", str(worker[1]))
    assert rc0 == rc1 == 2 and err0 == ""                    # said once, by the rank that failed
    assert f"unit {worker[1]} failed" in err1 and len(err1.strip().splitlines()) == 1 and "Traceback" not in err1
    assert not (out / "results.jsonl").exists() and not (out / "summary.json").exists()
    kept = {**rows_of(rank_file(out / "results.jsonl", 0)), **rows_of(rank_file(out / "results.jsonl", 1))}
    assert {u for u, _ in kept} == set(main) | {worker[0]} and all(kept[k] == single[k] for k in kept)
    toy_eval.main(["--units", "12", "--out", str(out)])     # no torchrun: one process resumes
    assert rows_of(out) == single and not list(out.glob("*.rank*.jsonl"))
