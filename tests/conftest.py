"""Run Triton kernels in its CPU interpreter unless a GPU is there. Set before anything
imports triton, which reads the variable once."""
import os
import sys
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
