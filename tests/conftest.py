"""Test-wide settings: one torch thread (tiny models are overhead-bound, and two threads stall
badly when another process holds the second core)."""

import torch

torch.set_num_threads(1)
