"""Benchmarks, measured side by side in one process.

    python scripts/benchmark.py speed [--device cpu|cuda] [--repeats N] [--record docs/results/speed.md]

``speed`` times recon's centred FFT and ``Sense.normal`` against fastMRI's formulation
(``fastmri.fft2c`` on real views, ``fastmri.complex_mul``) and the plain-torch fftshift
formulation on the same inputs, with two floors: plain ``fft2`` (no centring) and a one-pass copy.
Reported: median over repeats (CUDA events on the GPU, ``perf_counter`` on the CPU) and the ratio
to fastMRI's formulation.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import fastmri
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from recon.atomic import write_text  # noqa: E402
from recon.fft import fft2c, fft2c_shifted, ifft2c_shifted  # noqa: E402
from recon.operators import Sense  # noqa: E402


def _time(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int = 3) -> float:
    """Median wall time of ``fn`` in microseconds."""
    for _ in range(warmup):
        fn()
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end) * 1e3)
    else:
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e6)
    return statistics.median(times)


def _fastmri_normal(maps_r: torch.Tensor, mask: torch.Tensor, x_r: torch.Tensor) -> torch.Tensor:
    """fastMRI-style SENSE normal operator on real views (…, 2), as in VarNet's expand/reduce."""
    k = fastmri.fft2c(fastmri.complex_mul(x_r, maps_r))
    coil = fastmri.ifft2c(k * mask[..., None])
    return fastmri.complex_mul(coil, fastmri.complex_conj(maps_r)).sum(dim=1, keepdim=True)


def _shift_normal(maps: torch.Tensor, mask: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The fftshift formulation on native complex tensors."""
    coil = ifft2c_shifted(mask * fft2c_shifted(maps * x))
    return torch.sum(maps.conj() * coil, dim=1, keepdim=True)


def speed(device: torch.device, repeats: int) -> list[tuple[str, str, float, float]]:
    """Rows ``(shape, method, microseconds, speed-up vs fastMRI)``."""
    rows: list[tuple[str, str, float, float]] = []
    g = torch.Generator().manual_seed(0)
    for coils, h, w in [(15, 640, 368), (1, 320, 320)]:
        shape = f"{coils}×{h}×{w}"
        x = torch.randn(1, coils, h, w, dtype=torch.complex64, generator=g).to(device)
        x_r = torch.view_as_real(x).contiguous()
        t_ref = _time(lambda: fastmri.fft2c(x_r), device, repeats)
        rows.append((shape, "fft2c: fastmri.fft2c (real view, roll)", t_ref, 1.0))
        for name, fn in [
            ("fft2c: torch fftshift formulation", lambda: fft2c_shifted(x)),
            ("fft2c: recon.fft2c (checkerboard)", lambda: fft2c(x)),
            ("floor: plain torch.fft.fft2", lambda: torch.fft.fft2(x, norm="ortho")),
            ("floor: one-pass copy", lambda: x.clone()),
        ]:
            t = _time(fn, device, repeats)
            rows.append((shape, name, t, t_ref / t))

        if coils == 1:
            continue
        maps = torch.randn(1, coils, h, w, dtype=torch.complex64, generator=g).to(device)
        maps = maps / torch.sqrt(torch.sum(torch.abs(maps) ** 2, dim=1, keepdim=True))
        img = torch.randn(1, 1, h, w, dtype=torch.complex64, generator=g).to(device)
        cols = (torch.rand(w, generator=g) < 0.25).float()
        cols[w // 2 - 12: w // 2 + 12] = 1
        mask_1d = cols.expand(h, w).contiguous().to(device)
        mask_2d = (torch.rand(h, w, generator=g) < 0.25).float().to(device)
        maps_r, img_r = torch.view_as_real(maps).contiguous(), torch.view_as_real(img).contiguous()
        t_ref = _time(lambda: _fastmri_normal(maps_r, mask_1d, img_r), device, repeats)
        rows.append((shape, "Sense.normal: fastMRI formulation (1-D mask)", t_ref, 1.0))
        for name, fn in [
            ("Sense.normal: torch fftshift formulation", lambda: _shift_normal(maps, mask_1d, img)),
            ("Sense.normal: recon, 1-D mask (FFT along W)", lambda op=Sense(maps, mask_1d): op.normal(img)),
            ("Sense.normal: recon, 2-D mask", lambda op=Sense(maps, mask_2d): op.normal(img)),
            ("floor: two plain fft2 on coil images", lambda: torch.fft.ifft2(torch.fft.fft2(maps, norm="ortho"), norm="ortho")),
        ]:
            t = _time(fn, device, repeats)
            rows.append((shape, name, t, t_ref / t))
    return rows


def pipeline(device: torch.device, coils: int, h: int, w: int, steps: int, slices: int) -> list[tuple[str, float, float]]:
    """Seconds per slice and peak memory of the unadapted prior and of BiasRecon on synthetic k-space.

    Synthetic but shaped like fastMRI data: random smooth maps, a 4× equispaced mask with 24 ACS lines,
    a random complex image; the cost does not depend on the content. Rows ``(method, s/slice, peak MB)``.
    """
    import resource

    from recon.biasrecon import BiasRecon, BiasReconSettings
    from scores.checkpoints import load_checkpoint

    prior, _ = load_checkpoint(Path(__file__).resolve().parents[1] / "scores" / "weights" / "source_brain.safetensors",
                               device=device)
    for p in prior.parameters():
        p.requires_grad_(False)
    g = torch.Generator().manual_seed(0)
    maps = torch.randn(slices, coils, h, w, dtype=torch.complex64, generator=g)
    maps = maps / torch.sqrt(torch.sum(torch.abs(maps) ** 2, dim=1, keepdim=True))
    cols = torch.zeros(w)
    cols[::4] = 1
    cols[w // 2 - 12: w // 2 + 12] = 1
    mask = cols.expand(h, w).contiguous()
    op = Sense(maps.to(device), mask.to(device))
    image = torch.randn(slices, 1, h, w, dtype=torch.complex64, generator=g).to(device)
    y = op.A(image)
    with torch.no_grad():  # warm-up: lazy imports, cuDNN autotuning, allocator
        prior.denoise(image[:1], 0.1)
    rows = []
    for name, adapt, sure in [("unadapted (fixed λ)", "none", False), ("unadapted + SURE", "none", True),
                              ("BiasRecon (γ + SURE)", "gamma", True)]:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        BiasRecon(prior, op, y, BiasReconSettings(num_steps=steps, adapt=adapt, sure=sure, noise_sigma=0.01)).run()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            peak = torch.cuda.max_memory_allocated(device) / 2**20
        else:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # process peak RSS so far
        rows.append((name, (time.perf_counter() - start) / slices, peak))
    return rows


def _markdown(rows, device: torch.device, repeats: int) -> str:
    if device.type == "cuda":
        machine = torch.cuda.get_device_name(device)
    else:
        machine = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads (CPU)"
    head = (
        f"### {device.type.upper()} — {machine}\n\n"
        f"torch {torch.__version__}, complex64, median of {repeats} repeats, "
        f"{_dt.date.today().isoformat()}; command: `python scripts/benchmark.py speed --device {device.type}`\n\n"
        "| shape | method | µs | speed-up vs fastMRI |\n|---|---|---:|---:|\n"
    )
    body = "".join(f"| {s} | {m} | {t:,.0f} | {r:.2f}× |\n" for s, m, t, r in rows)
    return head + body


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("speed", help="centred FFT and SENSE normal operator vs fastMRI's formulation")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    p.add_argument("--repeats", type=int, default=None, help="timed repeats (default 20 on CPU, 200 on CUDA)")
    p.add_argument("--record", type=Path, default=None, help="write the markdown table to this file")
    q = sub.add_parser("pipeline", help="seconds per slice and peak memory of the unadapted prior and BiasRecon")
    q.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    q.add_argument("--shape", default="15,320,320", help="coils,H,W")
    q.add_argument("--steps", type=int, default=20)
    q.add_argument("--slices", type=int, default=1)
    q.add_argument("--record", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda was asked for but torch sees no CUDA device", file=sys.stderr)
        return 2
    device = torch.device(args.device)
    if args.command == "pipeline":
        coils, h, w = (int(v) for v in args.shape.split(","))
        rows = pipeline(device, coils, h, w, args.steps, args.slices)
        machine = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{platform.machine()} CPU"
        table = (f"### pipeline — {machine}, torch {torch.__version__}, {_dt.date.today().isoformat()}\n\n"
                 f"{args.slices} slice(s) of {coils}×{h}×{w}, {args.steps} noise levels; command: "
                 f"`python scripts/benchmark.py pipeline --device {device.type} --shape {args.shape} "
                 f"--steps {args.steps} --slices {args.slices}`\n\n| method | s/slice | peak memory (MB) |\n|---|---:|---:|\n"
                 + "".join(f"| {n} | {t:.2f} | {m:,.0f} |\n" for n, t, m in rows))
        print(table)
        if args.record is not None:
            write_text(args.record, table)
        return 0
    repeats = args.repeats or (200 if device.type == "cuda" else 20)
    table = _markdown(speed(device, repeats), device, repeats)
    print(table)
    if args.record is not None:
        write_text(args.record, table)
        print(f"wrote {args.record}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
