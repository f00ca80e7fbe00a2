"""Test-session settings."""

import torch

# On a 2-core machine, PyTorch's intra-op threads contend with XLA's CPU threads; tiny reference
# models then run orders of magnitude slower. One torch thread keeps the suite fast.
torch.set_num_threads(1)
