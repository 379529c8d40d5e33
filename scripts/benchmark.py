"""Benchmarks, measured side by side in one process (``memory``: one fresh process per case).

    python scripts/benchmark.py speed [--device cpu|cuda] [--repeats N] [--record docs/results/speed.md]
    python scripts/benchmark.py pipeline [--device cpu|cuda] [--shape 15,320,320] [--steps 20]
    python scripts/benchmark.py memory [--device cpu|cuda] [--shape 15,320,320] [--steps 3] [--cuda-limit-gb 8]
    python scripts/benchmark.py throughput [--procs 1,2] [--volumes 4] [--slices 2] [--script adapt]

``speed`` times recon's centred FFT and ``Sense.normal`` against fastMRI's formulation
(``fastmri.fft2c`` on real views, ``fastmri.complex_mul``) and the plain-torch fftshift
formulation on the same inputs, with two floors: plain ``fft2`` (no centring) and a one-pass copy.
Reported: median over repeats (CUDA events on the GPU, ``perf_counter`` on the CPU) and the ratio
to fastMRI's formulation.

``memory`` measures the peak memory of BiasRecon's adaptation (``adapt="gamma"``, a few steps) of
one synthetic slice with and without the score network's gradient checkpointing, and of the
unadapted reconstruction for reference; each case runs in a fresh subprocess, so the peaks do not
mix: peak RSS (``ru_maxrss``) on the CPU, ``torch.cuda.max_memory_allocated`` on CUDA (optionally
under a cap, ``--cuda-limit-gb``, set with ``torch.cuda.set_per_process_memory_fraction``).

``throughput`` runs ``scripts/adapt.py`` (or ``reconstruct.py``) on the same simulated site with
1 process and under ``torchrun --nproc_per_node=N`` one after the other (the site is simulated
once beforehand; each run writes into a fresh folder), and reports wall time and slices per
second, and whether the outputs of every run are identical to the 1-process run's.

The measuring is :mod:`recon.bench`; this script reads the command line, loads the prior and the
sampler (scores/), calls it and prints (``--record``: also writes) the markdown table.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from recon.atomic import write_text
from recon.bench import (
    MEMORY_CASES,
    memory,
    memory_case,
    memory_markdown,
    pipeline,
    pipeline_markdown,
    speed,
    speed_markdown,
    throughput,
    throughput_markdown,
)
from scores.priors import DEFAULT_PRIOR, bundled_priors, load_prior
from scores.samplers import TweedieSampler

SCRIPT = Path(__file__).resolve()


def _record(table: str, record: Path | None) -> None:
    """Print the table and, with ``--record``, write it (atomically)."""
    print(table)
    if record is not None:
        write_text(record, table)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    prior_help = f"a bundled prior ({', '.join(bundled_priors())}) or a checkpoint file (default {DEFAULT_PRIOR})"
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
    q.add_argument("--prior", default=DEFAULT_PRIOR, help=prior_help)
    for name, helptext in [("memory", "peak memory of BiasRecon's adaptation with and without gradient checkpointing"),
                           ("memory-case", "one case of memory in this process (used by memory; prints JSON)")]:
        m = sub.add_parser(name, help=helptext)
        m.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
        m.add_argument("--shape", default="15,320,320", help="coils,H,W")
        m.add_argument("--steps", type=int, default=3, help="noise levels (θ-steps on ceil(0.7·steps) of them)")
        m.add_argument("--theta-steps", type=int, default=1, help="Adam steps per θ-step")
        m.add_argument("--prior", default=DEFAULT_PRIOR, help=prior_help)
        m.add_argument("--cuda-limit-gb", type=float, default=None,
                       help="cap the process's CUDA memory at this many GiB (an OOM is reported, not raised)")
        if name == "memory":
            m.add_argument("--record", type=Path, default=None, help="write the markdown table to this file")
        else:
            m.add_argument("--case", required=True, choices=list(MEMORY_CASES))
    t = sub.add_parser("throughput", help="whole adapt.py / reconstruct.py runs with 1 and N processes (torchrun)")
    t.add_argument("--procs", default="1,2", help="comma list of process counts")
    t.add_argument("--volumes", type=int, default=4)
    t.add_argument("--slices", type=int, default=2, help="slices per volume")
    t.add_argument("--script", default="adapt", choices=["adapt", "reconstruct"])
    t.add_argument("--threads", type=int, default=None, help="torch threads per process (default: cores // N)")
    t.add_argument("--record", type=Path, default=None, help="write the markdown table to this file")
    t.add_argument("extra", nargs="*", help="extra arguments / overrides for the script")
    args = parser.parse_args(argv)
    if getattr(args, "prior", None) is not None:
        from scores.checkpoints import CheckpointError
        from scores.priors import resolve_prior

        try:
            resolve_prior(args.prior)
        except CheckpointError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    if args.command == "throughput":
        procs = [int(v) for v in args.procs.split(",")]
        rows = throughput(SCRIPT.parent, procs, args.volumes, args.slices, args.script, args.extra, args.threads)
        command = (f"python scripts/benchmark.py throughput --script {args.script} --volumes {args.volumes} "
                   f"--slices {args.slices}" + (f" --threads {args.threads}" if args.threads else "")
                   + (" -- " + " ".join(args.extra) if args.extra else ""))
        _record(throughput_markdown(rows, args.script, args.volumes, args.slices, command), args.record)
        return 0
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda was asked for but torch sees no CUDA device", file=sys.stderr)
        return 2
    device = torch.device(args.device)
    if args.command == "memory-case":
        coils, h, w = (int(v) for v in args.shape.split(","))
        print(json.dumps(memory_case(args.case, device, coils, h, w, args.steps, args.theta_steps, args.cuda_limit_gb,
                                     lambda dev, checkpointing: load_prior(args.prior, dev, checkpointing).model,
                                     TweedieSampler())))
        return 0
    if args.command == "memory":
        def case_command(case: str) -> list[str]:
            return [sys.executable, str(SCRIPT), "memory-case", "--case", case, "--device", device.type,
                    "--shape", args.shape, "--steps", str(args.steps), "--theta-steps", str(args.theta_steps),
                    "--prior", args.prior] + (["--cuda-limit-gb", str(args.cuda_limit_gb)] if args.cuda_limit_gb else [])

        records = memory(case_command)
        limit = f" --cuda-limit-gb {args.cuda_limit_gb:g}" if args.cuda_limit_gb else ""
        command = (f"python scripts/benchmark.py memory --device {device.type} --shape {args.shape} "
                   f"--steps {args.steps} --theta-steps {args.theta_steps}{limit}")
        _record(memory_markdown(records, device, args.shape, args.steps, args.theta_steps, args.cuda_limit_gb,
                                command), args.record)
        return 0 if all(r.get("error") is None for r in records) else 1
    if args.command == "pipeline":
        coils, h, w = (int(v) for v in args.shape.split(","))
        rows = pipeline(load_prior(args.prior, device).model, TweedieSampler(), device, coils, h, w, args.steps,
                        args.slices)
        command = (f"python scripts/benchmark.py pipeline --device {device.type} --shape {args.shape} "
                   f"--steps {args.steps} --slices {args.slices}")
        _record(pipeline_markdown(rows, device, args.shape, args.steps, args.slices, command), args.record)
        return 0
    repeats = args.repeats or (200 if device.type == "cuda" else 20)
    table = speed_markdown(speed(device, repeats), device, repeats,
                           f"python scripts/benchmark.py speed --device {device.type}")
    _record(table, args.record)
    if args.record is not None:
        print(f"wrote {args.record}")
    return 0

if __name__ == "__main__":
    sys.exit(main())
