"""The one sparse type every compressor returns and every codec speaks.

A :class:`SparseTensor` is a flat (1-D) vector of length ``numel`` stored as
sorted, unique int64 ``indices`` and the matching ``values``. Keeping the
indices sorted is what makes compact position codes (gap codes, block codes)
possible and makes merging two sparse vectors a linear-time operation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["SparseTensor"]


@dataclass(frozen=True)
class SparseTensor:
    """A flat sparse vector: ``dense[indices] = values``, zero elsewhere.

    Parameters
    ----------
    indices : torch.Tensor
        1-D int64 tensor of positions, sorted ascending and unique.
    values : torch.Tensor
        1-D floating tensor, same length and device as ``indices``.
    numel : int
        Length of the dense vector this represents.

    The constructor checks shapes, dtypes and devices (cheap, no host sync).
    Ordering, uniqueness and range are checked by :meth:`validate`, which
    needs a device-to-host sync on CUDA and is therefore opt-in; the wire
    codec always validates what it decodes.
    """

    indices: torch.Tensor
    values: torch.Tensor
    numel: int

    def __post_init__(self) -> None:
        if not isinstance(self.numel, int) or isinstance(self.numel, bool) or self.numel < 0:
            raise ValueError(f"numel must be a non-negative int, got {self.numel!r}")
        if self.indices.dim() != 1 or self.values.dim() != 1:
            raise ValueError(
                f"indices and values must be 1-D, got shapes "
                f"{tuple(self.indices.shape)} and {tuple(self.values.shape)}"
            )
        if self.indices.dtype != torch.int64:
            raise ValueError(f"indices must be int64, got {self.indices.dtype}")
        if not self.values.is_floating_point():
            raise ValueError(f"values must be floating point, got {self.values.dtype}")
        if self.indices.numel() != self.values.numel():
            raise ValueError(
                f"indices ({self.indices.numel()}) and values ({self.values.numel()}) "
                "differ in length"
            )
        if self.indices.device != self.values.device:
            raise ValueError(
                f"indices on {self.indices.device} but values on {self.values.device}"
            )

    # ------------------------------------------------------------------ basics
    @property
    def nnz(self) -> int:
        """Number of stored entries."""
        return int(self.indices.numel())

    @property
    def density(self) -> float:
        """Stored entries over ``numel`` (0.0 for an empty vector)."""
        return self.nnz / self.numel if self.numel else 0.0

    @property
    def device(self) -> torch.device:
        return self.values.device

    @property
    def dtype(self) -> torch.dtype:
        return self.values.dtype

    def to_dense(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dense 1-D vector of length ``numel``."""
        out = torch.zeros(self.numel, dtype=dtype or self.values.dtype, device=self.device)
        out[self.indices] = self.values.to(out.dtype)
        return out

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "SparseTensor":
        """Move to ``device`` and/or cast values to ``dtype``."""
        return SparseTensor(
            self.indices.to(device) if device is not None else self.indices,
            self.values.to(device=device, dtype=dtype),
            self.numel,
        )

    def with_values(self, values: torch.Tensor) -> "SparseTensor":
        """Same positions, new values (e.g. after quantization)."""
        return SparseTensor(self.indices, values, self.numel)

    # ------------------------------------------------------------ constructors
    @classmethod
    def empty(cls, numel: int, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> "SparseTensor":
        return cls(
            torch.empty(0, dtype=torch.int64, device=device),
            torch.empty(0, dtype=dtype, device=device),
            numel,
        )

    @classmethod
    def from_dense(cls, x: torch.Tensor) -> "SparseTensor":
        """All non-zero entries of a 1-D tensor."""
        if x.dim() != 1:
            raise ValueError(f"expected a 1-D tensor, got shape {tuple(x.shape)}")
        idx = torch.nonzero(x, as_tuple=True)[0]
        return cls(idx, x[idx], x.numel())

    @classmethod
    def gather(cls, x: torch.Tensor, indices: torch.Tensor) -> "SparseTensor":
        """``x`` restricted to ``indices``, in any order; a position named twice is kept once.

        Raises ValueError for an index outside ``[0, x.numel())``: torch would read a negative one
        from the end, and the result would name a position that does not exist.
        """
        if x.dim() != 1:
            raise ValueError(f"expected a 1-D tensor, got shape {tuple(x.shape)}")
        idx = torch.unique(indices.to(torch.int64).reshape(-1), sorted=True)
        if idx.numel():
            low, high = int(idx[0]), int(idx[-1])  # sorted: the extremes decide
            if low < 0 or high >= x.numel():
                raise ValueError(f"index {low if low < 0 else high} is outside [0, {x.numel()})")
        return cls(idx, x[idx], x.numel())

    # --------------------------------------------------------------- arithmetic
    def add_(self, dense: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
        """``dense += alpha * self`` in place; returns ``dense``."""
        if dense.dim() != 1 or dense.numel() != self.numel:
            raise ValueError(f"dense has shape {tuple(dense.shape)}, expected ({self.numel},)")
        dense.index_add_(0, self.indices, self.values.to(dense.dtype), alpha=alpha)
        return dense

    @staticmethod
    def sum(parts: list["SparseTensor"], weights: list[float] | None = None) -> "SparseTensor":
        """Weighted sum of sparse vectors of equal ``numel`` (union of supports).

        Exact zeros produced by cancellation are kept, so the support of the
        result is exactly the union of the supports.
        """
        if not parts:
            raise ValueError("need at least one SparseTensor to sum")
        numel = parts[0].numel
        if any(p.numel != numel for p in parts):
            raise ValueError("all parts must have the same numel")
        weights = weights if weights is not None else [1.0] * len(parts)
        if len(weights) != len(parts):
            raise ValueError("weights and parts differ in length")
        idx = torch.cat([p.indices for p in parts])
        val = torch.cat([p.values * w for p, w in zip(parts, weights)])
        uniq, inverse = torch.unique(idx, sorted=True, return_inverse=True)
        out = torch.zeros(uniq.numel(), dtype=val.dtype, device=val.device)
        out.index_add_(0, inverse, val)
        return SparseTensor(uniq, out, numel)

    # --------------------------------------------------------------- checking
    def validate(self) -> "SparseTensor":
        """Raise ``ValueError`` unless indices are sorted, unique, in range and values finite."""
        if self.nnz:
            if int(self.indices[0]) < 0 or int(self.indices[-1]) >= self.numel:
                raise ValueError(f"indices out of range [0, {self.numel})")
            if self.nnz > 1 and not bool((self.indices[1:] > self.indices[:-1]).all()):
                raise ValueError("indices are not strictly increasing (sorted and unique)")
            if not bool(torch.isfinite(self.values).all()):
                raise ValueError("values contain NaN or Inf")
        return self

    def __repr__(self) -> str:  # short: never print millions of numbers
        return (
            f"SparseTensor(nnz={self.nnz}, numel={self.numel}, "
            f"dtype={self.dtype}, device={self.device})"
        )
