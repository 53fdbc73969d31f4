"""Kernels larger than memory: spectra of a kernel held in a .npy file, row block by row block.

``empirical_ntk(..., out_file="K.npy")`` writes the (n·k × n·k) matrix (sample-major, the
symmetric form: for the "mean" convention its eigenvalues are those of K on L²(D)) into a
memory-mapped file. :func:`kernel_file_operator` applies it to vectors reading ``max_memory``
bytes of rows at a time, accumulating in float64, so Lanczos/LOBPCG
(:func:`extreme_eigenpairs`) find its extreme eigenvalues without loading it whole.
"""

from __future__ import annotations

import os

import numpy as np
from scipy.sparse.linalg import LinearOperator

from ._common import parse_bytes

__all__ = ["kernel_file_operator"]

DEFAULT_BLOCK_BYTES = 256 * 2**20


def kernel_file_operator(path: str | os.PathLike, *, max_memory: int | str | None = None
                         ) -> LinearOperator:
    """A float64 SciPy ``LinearOperator`` for the square kernel matrix stored in ``path``.

    Each product reads the file once in row blocks of at most ``max_memory`` bytes (default
    256 MiB, as float64) and accumulates in float64. The operator counts its products in
    ``op.n_products``.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from rayleighflow.ntk import (empirical_ntk, extreme_eigenpairs,
        ...                               kernel_file_operator, kernel_matrix)
        >>> _ = torch.manual_seed(0)
        >>> net = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 2)).double()
        >>> x = torch.randn(5, 3, dtype=torch.float64)
        >>> import tempfile
        >>> from pathlib import Path
        >>> path = Path(tempfile.mkdtemp()) / "K.npy"
        >>> K = empirical_ntk(net, x, out_file=path)          # a memory-mapped kernel
        >>> lam, _ = extreme_eigenpairs(kernel_file_operator(path), 3)
        >>> top = torch.linalg.eigvalsh(kernel_matrix(empirical_ntk(net, x)))[-3:]
        >>> bool(torch.allclose(torch.as_tensor(lam), top))
        True
    """
    mm = np.load(os.fspath(path), mmap_mode="r")
    if mm.ndim == 3:
        raise ValueError(f"{path} holds a diagonal kernel (k, n, n): its blocks are not a "
                         "kernel matrix; write kind='full' or kind='trace' kernels")
    if mm.ndim == 4:  # (n, k, n, k) written by hand
        mm = mm.reshape(mm.shape[0] * mm.shape[1], -1)
    if mm.ndim != 2 or mm.shape[0] != mm.shape[1]:
        raise ValueError(f"{path} does not hold a square kernel matrix (shape {mm.shape})")
    size = mm.shape[0]
    budget = DEFAULT_BLOCK_BYTES if max_memory is None else parse_bytes(max_memory)
    rows = max(1, int(budget // (8 * size)))

    def mv(v: np.ndarray) -> np.ndarray:
        v = np.asarray(v, dtype=np.float64).reshape(size, -1)
        out = np.empty_like(v)
        for s in range(0, size, rows):
            block = np.asarray(mm[s:s + rows], dtype=np.float64)
            out[s:s + rows] = block @ v
        op.n_products += v.shape[1]
        return out

    op = LinearOperator((size, size), matvec=mv, rmatvec=mv, matmat=mv, dtype=np.float64)
    op.n_products = 0
    op.block_rows = rows
    return op
