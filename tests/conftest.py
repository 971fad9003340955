"""Tests run on the CPU: Triton kernels go through its interpreter (set before anything
imports triton, which reads the variable once), and nothing touches the network."""
import contextlib
import io
import os
import sys
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import pytest  # noqa: E402


@pytest.fixture
def one_line_error(capsys):
    """run(main, argv, words, cuda=False): a script's main(argv) on a user error must exit with code 2
    after printing exactly one stderr line 'script: error: ...' that contains `words`; returns that line.
    cuda=True: the error is CUDA's absence, so the case is skipped on a machine that has CUDA."""
    def run(main, argv, words, cuda=False):
        if cuda:
            import torch
            if torch.cuda.is_available():
                pytest.skip("this machine has CUDA")
        with pytest.raises(SystemExit) as done:
            main(argv)
        err = capsys.readouterr().err
        assert done.value.code == 2 and words in err and err.count("\n") == 1 and ": error: " in err, err
        return err
    return run


@pytest.fixture(scope="session")
def default_model():
    """(model, tok) of the embedded default checkpoint, loaded once for the whole run: the tests
    that use it only read it (M, cached on its o_proj weights, is computed once too)."""
    from model import load_model
    return load_model()


@contextlib.contextmanager
def one_thread():
    """torch on one thread inside the block, as every torchrun rank of the tests runs
    (OMP_NUM_THREADS=1): rows compared across processes are made at the same thread count."""
    import torch
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


NIAH_GRID = ["--lengths", "600", "--depths", "0,1", "--methods", "full,laprox,snapkv:pool=0", "--budget", "0.2",
             "--protocol", "aware,agnostic", "--max-new-tokens", "4"]


@pytest.fixture(scope="session")
def niah_small_run(default_model, tmp_path_factory):
    """(argv, rows made, results lines, printed) of a small NIAH grid in both protocols (2 cells of 600
    tokens; full, laprox, snapkv:pool=0 at 0.2), on one thread: test_niah checks it, test_dist_evals
    compares torchrun's rows with it. Read-only: a test that writes into its folder copies it first."""
    import eval_niah as E
    model, tok = default_model
    out = tmp_path_factory.mktemp("niah") / "results" / "niah"  # not there yet: the run makes it
    argv = NIAH_GRID + ["--out", str(out)]
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed), one_thread():
        rows = E.run(E.build_parser().parse_args(argv), model, tok)
    return argv, rows, (out / "results.jsonl").read_text().splitlines(), printed.getvalue()
