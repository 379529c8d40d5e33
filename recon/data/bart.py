"""BART's ``.cfl`` / ``.hdr`` array files.

A BART array ``NAME`` is two files: ``NAME.hdr`` (text: a ``# Dimensions`` line, then the
dimensions separated by spaces) and ``NAME.cfl`` (raw little-endian complex64, Fortran order —
the first dimension varies fastest). BART's k-space convention puts readout, phase encoding,
partition and coils on dimensions 0, 1, 2 and 3.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from recon.errors import InputError

__all__ = ["read_cfl", "write_cfl", "bart_kspace_to_slices", "slices_to_bart_kspace"]


def _base(name: str | os.PathLike) -> Path:
    path = Path(name)
    return path.with_suffix("") if path.suffix in (".cfl", ".hdr") else path


def read_cfl(name: str | os.PathLike) -> np.ndarray:
    """Read a BART array.

    Maths: ``a[i0, i1, ...] = data[i0 + n0 (i1 + n1 (...))]`` (Fortran order).

    Shape: the header's dimensions with trailing singleton dimensions dropped (at least 1-D);
    complex64.

    Args:
        name: ``NAME``, ``NAME.cfl`` or ``NAME.hdr``.

    Raises:
        InputError: missing ``.hdr``/``.cfl``, a malformed header, or a data size that does not
            match the header.
    """
    base = _base(name)
    hdr, cfl = base.with_suffix(".hdr"), base.with_suffix(".cfl")
    for path in (hdr, cfl):
        if not path.is_file():
            raise InputError(f"{path}: file not found, expected a BART array (NAME.hdr with NAME.cfl).")
    lines = [ln.strip() for ln in hdr.read_text(errors="replace").splitlines()]
    try:
        at = lines.index("# Dimensions")
        dims = [int(d) for d in lines[at + 1].split()]
    except (ValueError, IndexError):
        raise InputError(f"{hdr}: key '# Dimensions' is missing or not followed by integers, expected BART's header format.") from None
    if not dims or any(d < 1 for d in dims):
        raise InputError(f"{hdr}: key '# Dimensions' must list positive integers, got {dims}.")
    count = int(np.prod(dims))
    size = cfl.stat().st_size
    if size != 8 * count:
        raise InputError(
            f"{cfl}: key 'data' holds {size} bytes, expected {8 * count} (complex64 of dimensions {dims} from the header)."
        )
    while len(dims) > 1 and dims[-1] == 1:
        dims.pop()
    data = np.fromfile(cfl, dtype="<c8", count=count)
    return data.reshape(dims, order="F").astype(np.complex64)


def write_cfl(name: str | os.PathLike, array: np.ndarray | torch.Tensor) -> Path:
    """Write a BART array atomically (both files via temporary names and ``os.replace``).

    Maths: inverse of :func:`read_cfl`. Shape: any, at most 16 dimensions; stored complex64.

    Returns:
        The base path ``NAME`` (without suffix).
    """
    if isinstance(array, torch.Tensor):
        array = array.detach().cpu().numpy()
    array = np.asarray(array)
    if array.dtype.kind not in "biufc":
        raise InputError(f"{name}: key 'data' must be numeric, got dtype {array.dtype}.")
    if array.ndim > 16:
        raise InputError(f"{name}: key 'data' has {array.ndim} dimensions, expected at most 16 (BART's limit).")
    base = _base(name)
    dims = list(array.shape) + [1] * (16 - array.ndim)
    pid = os.getpid()
    tmp_hdr = base.with_name(f".{base.name}.hdr.tmp-{pid}")
    tmp_cfl = base.with_name(f".{base.name}.cfl.tmp-{pid}")
    try:
        tmp_hdr.write_text("# Dimensions\n" + " ".join(str(d) for d in dims) + "\n")
        np.asarray(array, dtype="<c8").ravel(order="F").tofile(tmp_cfl)
        os.replace(tmp_cfl, base.with_suffix(".cfl"))
        os.replace(tmp_hdr, base.with_suffix(".hdr"))
    finally:
        for tmp in (tmp_hdr, tmp_cfl):
            if tmp.exists():
                tmp.unlink()
    return base


def bart_kspace_to_slices(kspace: np.ndarray, source: str = "kspace") -> torch.Tensor:
    """BART k-space ``[RO, PE1, PE2, COIL]`` to the project's slices ``(slices, coils, H, W)``.

    Maths: ``y[s, c, h, w] = k[h, w, s, c]`` (H readout, W phase encoding, partitions as slices).

    Shape: ``(RO, PE1[, PE2[, COIL]])`` complex → ``(PE2, COIL, RO, PE1)`` complex64.
    """
    if kspace.dtype.kind != "c" or not 2 <= kspace.ndim <= 4:
        raise InputError(
            f"{source}: key 'kspace' must be complex BART k-space of dimensions [RO, PE1, PE2, COIL], "
            f"got {kspace.dtype} of shape {kspace.shape}."
        )
    k = kspace.reshape(kspace.shape + (1,) * (4 - kspace.ndim))
    return torch.from_numpy(np.ascontiguousarray(np.transpose(k, (2, 3, 0, 1)), dtype=np.complex64))


def slices_to_bart_kspace(kspace: torch.Tensor | np.ndarray) -> np.ndarray:
    """The project's ``(slices, coils, H, W)`` k-space to BART's ``[RO, PE1, PE2, COIL]``.

    Maths: inverse of :func:`bart_kspace_to_slices`. Shape: ``(S, C, H, W)`` → ``(H, W, S, C)``.
    """
    if isinstance(kspace, torch.Tensor):
        kspace = kspace.detach().cpu().numpy()
    return np.ascontiguousarray(np.transpose(np.asarray(kspace, dtype=np.complex64), (2, 3, 0, 1)))
