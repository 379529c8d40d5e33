"""Benchmarks: what ``scripts/benchmark.py`` measures, and the markdown tables it records.

- :func:`speed` — recon's centred FFT and ``Sense.normal`` against fastMRI's formulation
  (``fastmri.fft2c`` on real views, ``fastmri.complex_mul``) and the plain-torch fftshift formulation on
  the same inputs, with two floors: plain ``fft2`` (no centring) and a one-pass copy. Median over repeats
  (CUDA events on the GPU, ``perf_counter`` on the CPU) and the ratio to fastMRI's formulation.
- :func:`pipeline` — seconds per slice and peak memory of the unadapted prior and of BiasRecon on
  synthetic k-space.
- :func:`memory` — peak memory of BiasRecon's adaptation (``adapt="gamma"``, a few steps) of one
  :func:`synthetic_slice` with and without the score network's gradient checkpointing, and of the
  unadapted reconstruction for reference, each case (:func:`memory_case`) in a fresh process so the
  peaks do not mix: peak RSS (``ru_maxrss``) on the CPU, ``torch.cuda.max_memory_allocated`` on CUDA
  (optionally under a cap set with ``torch.cuda.set_per_process_memory_fraction``).
- :func:`throughput` — whole runs of an app (``adapt.py`` or ``reconstruct.py``) on one simulated site
  with 1 process and under ``torchrun --nproc_per_node=N``: wall time, slices per second, and whether
  the outputs equal the 1-process run's.

The prior comes in as a :class:`recon.biasrecon.Prior` (or a loader of one) with its
:class:`recon.biasrecon.Sampler`, so this module, like all of recon/, never imports scores/.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import fastmri
import torch

from recon.biasrecon import BiasRecon, BiasReconSettings, Prior, Sampler
from recon.fft import fft2c, fft2c_shifted, ifft2c_shifted
from recon.operators import Sense

__all__ = [
    "median_time",
    "speed",
    "speed_markdown",
    "pipeline",
    "pipeline_markdown",
    "MEMORY_CASES",
    "synthetic_slice",
    "memory_case",
    "memory",
    "memory_markdown",
    "THROUGHPUT_SITE",
    "throughput",
    "throughput_markdown",
]


def median_time(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int = 3) -> float:
    """Median wall time of ``fn`` in microseconds (CUDA events on the GPU, ``perf_counter`` on the CPU)."""
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
    """Rows ``(shape, method, microseconds, speed-up vs fastMRI)`` at 15×640×368 and 1×320×320."""
    rows: list[tuple[str, str, float, float]] = []
    g = torch.Generator().manual_seed(0)
    for coils, h, w in [(15, 640, 368), (1, 320, 320)]:
        shape = f"{coils}×{h}×{w}"
        x = torch.randn(1, coils, h, w, dtype=torch.complex64, generator=g).to(device)
        x_r = torch.view_as_real(x).contiguous()
        t_ref = median_time(lambda: fastmri.fft2c(x_r), device, repeats)
        rows.append((shape, "fft2c: fastmri.fft2c (real view, roll)", t_ref, 1.0))
        for name, fn in [
            ("fft2c: torch fftshift formulation", lambda: fft2c_shifted(x)),
            ("fft2c: recon.fft2c (checkerboard)", lambda: fft2c(x)),
            ("floor: plain torch.fft.fft2", lambda: torch.fft.fft2(x, norm="ortho")),
            ("floor: one-pass copy", lambda: x.clone()),
        ]:
            t = median_time(fn, device, repeats)
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
        t_ref = median_time(lambda: _fastmri_normal(maps_r, mask_1d, img_r), device, repeats)
        rows.append((shape, "Sense.normal: fastMRI formulation (1-D mask)", t_ref, 1.0))
        for name, fn in [
            ("Sense.normal: torch fftshift formulation", lambda: _shift_normal(maps, mask_1d, img)),
            ("Sense.normal: recon, 1-D mask (FFT along W)", lambda op=Sense(maps, mask_1d): op.normal(img)),
            ("Sense.normal: recon, 2-D mask", lambda op=Sense(maps, mask_2d): op.normal(img)),
            ("floor: two plain fft2 on coil images", lambda: torch.fft.ifft2(torch.fft.fft2(maps, norm="ortho"), norm="ortho")),
        ]:
            t = median_time(fn, device, repeats)
            rows.append((shape, name, t, t_ref / t))
    return rows


def speed_markdown(rows: Sequence[tuple[str, str, float, float]], device: torch.device, repeats: int,
                   command: str) -> str:
    """The table of :func:`speed`'s rows, headed by the machine, the date and ``command``."""
    if device.type == "cuda":
        machine = torch.cuda.get_device_name(device)
    else:
        machine = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads (CPU)"
    head = (
        f"### {device.type.upper()} — {machine}\n\n"
        f"torch {torch.__version__}, complex64, median of {repeats} repeats, "
        f"{_dt.date.today().isoformat()}; command: `{command}`\n\n"
        "| shape | method | µs | speed-up vs fastMRI |\n|---|---|---:|---:|\n"
    )
    body = "".join(f"| {s} | {m} | {t:,.0f} | {r:.2f}× |\n" for s, m, t, r in rows)
    return head + body


def pipeline(prior: Prior, sampler: Sampler, device: torch.device, coils: int, h: int, w: int, steps: int,
             slices: int) -> list[tuple[str, float, float]]:
    """Seconds per slice and peak memory of the unadapted prior and of BiasRecon on synthetic k-space.

    Synthetic but shaped like fastMRI data: random smooth maps, a 4× equispaced mask with 24 ACS lines,
    a random complex image; the cost does not depend on the content. ``prior`` on ``device``.
    Shape: ``slices`` slices of ``(coils, h, w)``; rows ``(method, s/slice, peak MB)``.
    """
    import resource

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
        BiasRecon(prior, op, y, BiasReconSettings(num_steps=steps, adapt=adapt, sure=sure, noise_sigma=0.01),
                  sampler=sampler).run()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            peak = torch.cuda.max_memory_allocated(device) / 2**20
        else:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # process peak RSS so far
        rows.append((name, (time.perf_counter() - start) / slices, peak))
    return rows


def pipeline_markdown(rows: Sequence[tuple[str, float, float]], device: torch.device, shape: str, steps: int,
                      slices: int, command: str) -> str:
    """The table of :func:`pipeline`'s rows; ``shape`` is ``"coils,H,W"``."""
    coils, h, w = shape.split(",")
    machine = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{platform.machine()} CPU"
    return (f"### pipeline — {machine}, torch {torch.__version__}, {_dt.date.today().isoformat()}\n\n"
            f"{slices} slice(s) of {coils}×{h}×{w}, {steps} noise levels; command: "
            f"`{command}`\n\n| method | s/slice | peak memory (MB) |\n|---|---:|---:|\n"
            + "".join(f"| {n} | {t:.2f} | {m:,.0f} |\n" for n, t, m in rows))


MEMORY_CASES: dict[str, tuple[str, bool]] = {
    # name -> (BiasRecon adapt mode, gradient checkpointing of the score network)
    "unadapted": ("none", False),
    "BiasRecon γ": ("gamma", False),
    "BiasRecon γ + checkpointing": ("gamma", True),
}


def synthetic_slice(coils: int, h: int, w: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A random smooth multi-coil slice with a 4× equispaced mask: ``(maps, mask, kspace)``.

    The image is complex Gaussian noise low-passed in k-space (a Gaussian of σ = 1/32 cycle/pixel) inside
    an elliptical support, scaled so its 99th magnitude percentile is 1 (the prior's normalisation);
    the maps are smooth random complex fields (a 6×6 grid, bicubically upsampled), normalised to
    ``Σ_c |S_c|² = 1``; the mask keeps every 4th column plus 24 central ACS columns; k-space gets
    complex noise of σ = 0.01 on the sampled entries. Costs do not depend on the content.
    Shape: maps ``(1, coils, h, w)`` complex64, mask ``(h, w)`` float32, kspace ``(1, coils, h, w)``.
    """
    g = torch.Generator().manual_seed(seed)
    noise = torch.view_as_complex(torch.randn(h, w, 2, generator=g))
    fy, fx = torch.fft.fftfreq(h)[:, None], torch.fft.fftfreq(w)[None, :]
    image = torch.fft.ifft2(torch.fft.fft2(noise) * torch.exp(-(fy**2 + fx**2) / (2 * (1 / 32) ** 2)))
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
    image = image * ((yy / 0.85) ** 2 + (xx / 0.7) ** 2 < 1)
    image = (image / torch.quantile(image.abs().flatten(), 0.99)).to(torch.complex64)[None, None]
    coarse = torch.randn(1, 2 * coils, 6, 6, generator=g)
    fine = torch.nn.functional.interpolate(coarse, size=(h, w), mode="bicubic", align_corners=True)
    maps = torch.complex(fine[:, :coils], fine[:, coils:])
    maps = maps / torch.sqrt(torch.sum(torch.abs(maps) ** 2, dim=1, keepdim=True))
    cols = torch.zeros(w)
    cols[::4] = 1
    cols[w // 2 - 12: w // 2 + 12] = 1
    mask = cols.expand(h, w).contiguous()
    y = Sense(maps, mask).A(image)
    y = y + 0.01 * torch.view_as_complex(torch.randn(*y.shape, 2, generator=g)) * mask
    return maps, mask, y


def _rss_mb() -> float:
    """Current resident set size in MB (Linux ``/proc/self/statm``; NaN elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return float("nan")


def memory_case(case: str, device: torch.device, coils: int, h: int, w: int, steps: int, theta_steps: int,
                cuda_limit_gb: float | None, load_prior: Callable[[torch.device, bool], Prior],
                sampler: Sampler) -> dict:
    """Run one case of :data:`MEMORY_CASES` in this process; returns its measurements (MB, seconds).

    ``load_prior(device, gradient_checkpointing)`` is called after the CUDA cap (``cuda_limit_gb``) is set,
    so the prior's weights count against it.
    """
    import resource

    adapt, checkpointing = MEMORY_CASES[case]
    if device.type == "cuda" and cuda_limit_gb:
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, cuda_limit_gb * 2**30 / total), device)
    prior = load_prior(device, checkpointing)
    maps, mask, y = synthetic_slice(coils, h, w)
    op = Sense(maps.to(device), mask.to(device))
    y = y.to(device)
    settings = BiasReconSettings(num_steps=steps, adapt=adapt, theta_steps=theta_steps, sure=False, noise_sigma=0.01)
    record: dict = {"case": case, "adapt": adapt, "checkpointing": checkpointing}
    # warm-up, the same in every case, so "before" holds what every case loads anyway: Adam's first
    # construction imports torch._dynamo (~900 modules); on CUDA also cuDNN and the compiled coil combination
    torch.optim.Adam([torch.zeros(1, requires_grad=True)])
    with torch.no_grad():
        size = (h, w) if device.type == "cuda" else (16, 16)
        prior.denoise(torch.zeros(1, 1, *size, dtype=torch.complex64, device=device), 0.1)
        op.normal(torch.zeros(1, 1, h, w, dtype=torch.complex64, device=device))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        record["before_mb"] = torch.cuda.memory_allocated(device) / 2**20
    else:
        record["before_mb"] = _rss_mb()
        record["peak_before_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    start = time.perf_counter()
    try:
        BiasRecon(prior, op, y, settings, sampler=sampler).run()
        record["error"] = None
    except torch.cuda.OutOfMemoryError as exc:
        record["error"] = f"out of memory ({str(exc).splitlines()[0][:120]})"
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        record["peak_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
        record["reserved_mb"] = torch.cuda.max_memory_reserved(device) / 2**20
    else:
        record["peak_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # ru_maxrss is in KiB on Linux
    record["seconds"] = time.perf_counter() - start
    return record


def memory(case_command: Callable[[str], list[str]]) -> list[dict]:
    """Every case of :data:`MEMORY_CASES`, each in a fresh process.

    ``case_command(case)`` is the command line that runs :func:`memory_case` for ``case`` and prints its
    record as the last JSON line of stdout; a failing process gives a record with ``error`` set.
    """
    records = []
    for case in MEMORY_CASES:
        proc = subprocess.run(case_command(case), capture_output=True, text=True)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
        if proc.returncode != 0 or not lines:
            tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            records.append({"case": case, "error": f"exit {proc.returncode}: {tail[:160]}"})
        else:
            records.append(json.loads(lines[-1]))
        print(f"  {case}: {records[-1]}", file=sys.stderr, flush=True)
    return records


def memory_markdown(records: Sequence[dict], device: torch.device, shape: str, steps: int, theta_steps: int,
                    cuda_limit_gb: float | None, command: str) -> str:
    """The table of :func:`memory`'s records; ``shape`` is ``"coils,H,W"``."""
    coils, h, w = shape.split(",")
    if device.type == "cuda":
        machine = f"{torch.cuda.get_device_name(device)}"
    else:
        machine = f"{platform.machine()} CPU, {os.cpu_count()} cores, {torch.get_num_threads()} threads"
    head = (f"### memory — {machine}, torch {torch.__version__}, {_dt.date.today().isoformat()}\n\n"
            f"One synthetic {coils}-coil {h}×{w} slice (`synthetic_slice`: random smooth image and maps, 4× equispaced "
            f"mask + 24 ACS columns), BiasRecon with {steps} noise levels, {theta_steps} Adam step(s) per θ-step, "
            f"SURE off; each case in a fresh process. Command: `{command}`\n\n")
    if device.type == "cuda":
        cap = f" (cap {cuda_limit_gb:g} GiB)" if cuda_limit_gb else ""
        head += (f"| case | max allocated (MB) | allocated before (MB) | max reserved (MB) | s | result{cap} |\n"
                 "|---|---:|---:|---:|---:|---|\n")
        body = "".join(
            f"| {r['case']} | {r.get('peak_mb', float('nan')):,.0f} | {r.get('before_mb', float('nan')):,.0f} | "
            f"{r.get('reserved_mb', float('nan')):,.0f} | {r.get('seconds', float('nan')):.1f} | "
            f"{r['error'] or 'ok'} |\n" for r in records)
    else:
        head += ("| case | peak RSS (MB) | RSS before the run (MB) | peak − before (MB) | s |\n"
                 "|---|---:|---:|---:|---:|\n")
        body = "".join(
            f"| {r['case']} | {r.get('peak_mb', float('nan')):,.0f} | {r.get('before_mb', float('nan')):,.0f} | "
            f"{r.get('peak_mb', float('nan')) - r.get('before_mb', float('nan')):,.0f} | "
            f"{r.get('seconds', float('nan')):.1f} |" + (f" {r['error']}" if r.get("error") else "") + "\n"
            for r in records)
    return head + body


THROUGHPUT_SITE = ["site.data.slices_per_subject={slices}", "site.data.num_subjects={volumes}"]
"""The site overrides of :func:`throughput` (``adapt.py``'s dotlist form; ``reconstruct.py`` drops ``site.``)."""


def throughput(scripts_dir: Path, procs: Sequence[int], volumes: int, slices: int, script: str,
               extra: Sequence[str], threads: int | None = None) -> list[dict]:
    """Wall time of whole runs of ``scripts_dir/<script>.py`` with each process count in ``procs`` (sequentially).

    The site (unseen_center, ``volumes`` × ``slices``) is simulated once with ``scripts_dir/simulate_site.py``.
    Every run gets ``OMP_NUM_THREADS = threads`` or, by default, ``max(1, cores // N)``; outputs are
    compared with the first run's (bitwise only when the thread counts match).
    """
    import tempfile

    import h5py
    import numpy as np

    site = [s.format(slices=slices, volumes=volumes) for s in THROUGHPUT_SITE]
    cores = os.cpu_count() or 1
    rows, reference = [], None
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        subprocess.run([sys.executable, str(scripts_dir / "simulate_site.py"), "--site", "unseen_center",
                        "--out", str(data), *[s[len("site."):] for s in site]], check=True, capture_output=True)
        for n in procs:
            out = Path(tmp) / f"out{n}"
            launcher = ([sys.executable] if n == 1 else
                        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}"])
            args = ["--site", "unseen_center", "--data", str(data), "--out", str(out), *extra]
            if script == "adapt":
                args += [s for s in site]
            else:
                args += [s[len("site."):] for s in site]
            per_process = threads or max(1, cores // n)
            env = {**os.environ, "OMP_NUM_THREADS": str(per_process)}
            start = time.perf_counter()
            done = subprocess.run([*launcher, str(scripts_dir / f"{script}.py"), *args], env=env,
                                  capture_output=True, text=True)
            seconds = time.perf_counter() - start
            if done.returncode != 0:
                raise RuntimeError(f"{script}.py with {n} processes failed:\n{done.stderr[-2000:]}")
            images = {}
            for path in sorted((out / "reconstructions").rglob("*.h5")):
                with h5py.File(path, "r") as hf:
                    images[path.relative_to(out).as_posix()] = hf["reconstruction"][()]
            if reference is None:
                reference = images
            same = images.keys() == reference.keys() and all(
                np.array_equal(images[k], reference[k]) for k in images)
            max_diff = max((float(np.abs(images[k] - reference[k]).max() / np.abs(reference[k]).max())
                            for k in images if k in reference), default=float("nan"))
            rows.append({"procs": n, "threads": per_process, "seconds": seconds,
                         "slices_per_s": volumes * slices / seconds, "identical": same, "max_rel_diff": max_diff})
            print(f"{n} process(es): {seconds:.1f} s, {volumes * slices / seconds:.3f} slices/s", file=sys.stderr)
    return rows


def throughput_markdown(rows: Sequence[dict], script: str, volumes: int, slices: int, command: str) -> str:
    """The table of :func:`throughput`'s rows (speed-up relative to the first row)."""
    base = rows[0]["seconds"]
    head = (f"### throughput — {platform.machine()} CPU, {os.cpu_count()} cores, torch {torch.__version__}, "
            f"{_dt.date.today().isoformat()}\n\n`scripts/{script}.py` on {volumes} simulated unseen_center volumes "
            f"of {slices} slices; command: `{command}`\n\n"
            "| processes | threads each | wall s | slices/s | speed-up | outputs identical to 1 process |\n"
            "|---:|---:|---:|---:|---:|---|\n")
    return head + "".join(
        f"| {r['procs']} | {r['threads']} | {r['seconds']:.1f} | {r['slices_per_s']:.3f} | "
        f"{base / r['seconds']:.2f}× | {'yes' if r['identical'] else 'no (max rel. diff %.1e)' % r['max_rel_diff']} |\n"
        for r in rows)
