"""Tests run on the CPU: Triton kernels go through its interpreter (set before anything
imports triton, which reads the variable once), and nothing touches the network."""
import os
import sys
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
