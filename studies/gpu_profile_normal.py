"""Kernel-level breakdown of Sense.normal on CUDA (torch.profiler), to see where the time goes.

    python studies/gpu_profile_normal.py   # prints the top CUDA kernels for 15×640×368, 1-D and 2-D masks
"""

import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from recon.operators import Sense  # noqa: E402

g = torch.Generator().manual_seed(0)
maps = torch.randn(1, 15, 640, 368, dtype=torch.complex64, generator=g).cuda()
x = torch.randn(1, 1, 640, 368, dtype=torch.complex64, generator=g).cuda()
cols = (torch.rand(368, generator=g) < 0.25).float()
for name, mask in [("1-D mask", cols.expand(640, 368).contiguous()), ("2-D mask", (torch.rand(640, 368, generator=g) < 0.25).float())]:
    for fused in (True, False):
        op = Sense(maps, mask.cuda(), fused=fused)
        for _ in range(5):
            op.normal(x)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
            for _ in range(20):
                op.normal(x)
            torch.cuda.synchronize()
        print(f"== {name}, fused={fused}: per call")
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=8, max_name_column_width=60))
