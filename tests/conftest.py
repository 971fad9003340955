"""Tests run on the CPU: Triton kernels go through its interpreter (set before anything
imports triton, which reads the variable once), and nothing touches the network."""
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
