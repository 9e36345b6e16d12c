"""Suite-wide settings: services stay on loopback, no telemetry, single-threaded torch for stable timings."""

import os

import torch

from flows.env import apply_safe_defaults

apply_safe_defaults()
os.environ.setdefault("MPLBACKEND", "Agg")
torch.set_num_threads(1)  # small tensors: threads only add sync cost on a 2-core machine
