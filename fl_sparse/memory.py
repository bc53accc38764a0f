"""Error-feedback memory (GRACE's ``Memory``), for clients and for the server.

With a (biased) compressor ``C``, error feedback keeps what was not sent and
adds it back before the next compression::

    compensated_t = x_t + e_t            # compensate()
    sent_t        = C(compensated_t)     # any compressor / quantizer
    e_{t+1}       = compensated_t - sent_t   # update()

so that ``sum_t sent_t = sum_t x_t - e_T``: nothing is lost, only delayed.
The invariant ``sent_t + e_{t+1} == compensated_t`` holds exactly on the
positions that were not sent and up to one float rounding on the others
(exactly 0 where ``sent`` carries the compensated value unchanged, as for
Top-k, rTop-k and hard threshold).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from fl_sparse.sparse import SparseTensor

__all__ = ["ErrorFeedback", "shares_memory"]


def shares_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    """True if the storages of ``a`` and ``b`` overlap (conservative: whole storages, not the views)."""
    if a.numel() == 0 or b.numel() == 0 or a.device != b.device:
        return False
    sa, sb = a.untyped_storage(), b.untyped_storage()
    return sa.data_ptr() < sb.data_ptr() + sb.nbytes() and sb.data_ptr() < sa.data_ptr() + sa.nbytes()


def _same_device(a: torch.device, b: torch.device) -> bool:
    """Device equality where an index-less device (``"cuda"``) matches any index of its type."""
    return a.type == b.type and (a.index is None or b.index is None or a.index == b.index)


class ErrorFeedback:
    """Error-feedback memory ``e`` for flat 1-D vectors of length ``numel``.

    Parameters
    ----------
    numel : int, optional
        Length of the vectors. If omitted it is taken from the first vector
        seen and fixed from then on.
    device : torch.device or str, optional
        Where ``e`` lives. If omitted, the device of the first vector seen.
    dtype : torch.dtype
        dtype of ``e`` (default float32). ``compensate`` returns
        ``x + e`` in the promoted dtype of ``x`` and ``e``.

    ``e`` is allocated lazily (a never-used memory costs nothing and
    ``compensate`` on a zero memory is a copy). Vectors of another length,
    shape or device raise ``ValueError``.
    """

    def __init__(
        self,
        numel: int | None = None,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        if numel is not None and (not isinstance(numel, int) or isinstance(numel, bool) or numel < 0):
            raise ValueError(f"numel must be a non-negative int or None, got {numel!r}")
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating torch.dtype, got {dtype!r}")
        self._numel = numel
        self._device = torch.device(device) if device is not None else None
        self._dtype = dtype
        self._error: torch.Tensor | None = None

    # ----------------------------------------------------------- properties
    @property
    def numel(self) -> int | None:
        return self._numel

    @property
    def device(self) -> torch.device | None:
        return self._device

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    @property
    def error(self) -> torch.Tensor | None:
        """The current residual ``e`` (zeros if nothing was stored yet; ``None`` if the length is still unknown)."""
        if self._error is None:
            if self._numel is None:
                return None
            return torch.zeros(self._numel, dtype=self._dtype, device=self._device or "cpu")
        return self._error

    def norm(self) -> float:
        """``||e||_2`` as a Python float (0.0 while empty; NaN or inf only where ``e`` holds one).

        A float32/float64 memory on CPU goes through numpy (``sqrt(e·e)``, accumulated in
        ``e``'s dtype like ``torch.linalg.vector_norm``, equal to it up to rounding): 5 us
        against torch's 12 at d = 50,890 timed alone, and more inside a client's message,
        where a torch reduction kernel runs cold (see docs/performance.md).
        """
        error = self._error
        if error is None:
            return 0.0
        if error.device.type == "cpu" and error.dtype in (torch.float32, torch.float64):
            v = error.numpy()
            with np.errstate(over="ignore", invalid="ignore"):  # inf and NaN are the answer, not a warning
                norm = math.sqrt(float(np.dot(v, v)))
        else:
            norm = float(torch.linalg.vector_norm(error))
        if math.isinf(norm) and bool(torch.isfinite(error).all()):
            # e·e overflowed e's dtype, e did not (finite float32 entries above ~1e19): the
            # norm is finite, in float64. Rare (a diverging train function), so only then.
            norm = float(torch.linalg.vector_norm(error, dtype=torch.float64))
        return norm

    # -------------------------------------------------------------- checks
    def _adopt(self, x: torch.Tensor, what: str) -> None:
        """Check ``x`` against (or fix) the memory's length and device."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{what} must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 1:
            raise ValueError(f"{what} must be a flat 1-D tensor, got shape {tuple(x.shape)}")
        if not x.is_floating_point():
            raise ValueError(f"{what} must be floating point, got {x.dtype}")
        if self._numel is None:
            self._numel = x.numel()
        elif x.numel() != self._numel:
            raise ValueError(f"{what} has {x.numel()} entries, the memory holds {self._numel}")
        if self._device is None:
            self._device = x.device
        elif not _same_device(x.device, self._device):
            raise ValueError(f"{what} is on {x.device}, the memory is on {self._device}")

    # ---------------------------------------------------------- operations
    def compensate(self, x: torch.Tensor, *, out: torch.Tensor | None = None) -> torch.Tensor:
        """Return ``x + e``: a new tensor (``x`` is not modified), or written into ``out``.

        ``out`` may be ``x`` itself (a caller that gives ``x`` up saves a dense copy); it must
        have ``x``'s shape and the dtype of ``x + e``, and must not be ``e``'s own tensor.
        """
        self._adopt(x, "x")
        x = x.detach()
        dtype = torch.promote_types(x.dtype, self._dtype)
        if out is None:
            return x.to(dtype, copy=True) if self._error is None else x + self._error
        if out.shape != x.shape or out.dtype != dtype or out.device != x.device:
            raise ValueError(f"out must be a {dtype} tensor of shape {tuple(x.shape)} on {x.device}")
        if self._error is not None and shares_memory(out, self._error):
            raise ValueError("out must not be the memory's own tensor")
        if self._error is None:
            return out if out is x else out.copy_(x)
        return torch.add(x, self._error, out=out)

    def update(self, compensated: torch.Tensor, sent: SparseTensor | torch.Tensor, *, in_place: bool = False) -> None:
        """Store ``e = compensated - sent``.

        ``sent`` is what actually went on the wire (after any quantization),
        either a :class:`SparseTensor` or a dense tensor. The sparse case costs
        one copy of ``compensated`` plus ``O(nnz)``; with ``in_place=True`` (sparse
        ``sent`` only) no copy: the caller gives ``compensated`` up, and the memory
        subtracts ``sent`` in it and keeps it (when it has the memory's dtype and is
        not the memory's own tensor; otherwise it is copied as without the flag).
        """
        self._adopt(compensated, "compensated")
        compensated = compensated.detach()
        if isinstance(sent, SparseTensor):
            if sent.numel != self._numel:
                raise ValueError(f"sent has numel {sent.numel}, the memory holds {self._numel}")
            if not _same_device(sent.device, self._device):
                raise ValueError(f"sent is on {sent.device}, the memory is on {self._device}")
            values = sent.values.to(self._dtype)
            take = (
                in_place
                and compensated.dtype == self._dtype
                and not (self._error is not None and shares_memory(compensated, self._error))
            )
            if take:
                error = compensated
                if shares_memory(values, error):  # a compressor whose values view its input
                    values = values.clone()
            else:
                error = compensated.to(self._dtype, copy=True)
            # index_add_ (not index_put) is also right if indices repeat
            error.index_add_(0, sent.indices, values, alpha=-1)
        elif isinstance(sent, torch.Tensor):
            if sent.shape != compensated.shape:
                raise ValueError(
                    f"sent has shape {tuple(sent.shape)}, compensated has {tuple(compensated.shape)}"
                )
            if not _same_device(sent.device, self._device):
                raise ValueError(f"sent is on {sent.device}, the memory is on {self._device}")
            error = (compensated - sent.detach()).to(self._dtype)
        else:
            raise TypeError(f"sent must be a SparseTensor or torch.Tensor, got {type(sent).__name__}")
        self._error = error

    def reset(self) -> None:
        """Forget the residual (``e = 0``); the length and device stay fixed."""
        self._error = None

    # ---------------------------------------------------------- persistence
    def state_dict(self) -> dict[str, Any]:
        """``{"numel": int | None, "error": Tensor | None}`` (the tensor is the memory's own; copy it to keep it)."""
        return {"numel": self._numel, "error": self._error}

    def load_state_dict(self, state: dict[str, Any], *, copy: bool = True) -> None:
        """Restore from :meth:`state_dict` output; the tensor is copied to this memory's device and dtype.

        ``copy=False``: the memory takes the tensor itself when it already has
        that device and dtype (the caller hands it over). Safe because the
        memory never changes its tensor in place: :meth:`compensate` and
        :meth:`update` make new ones. The caller must not change it either.
        """
        if not isinstance(state, dict) or "error" not in state or "numel" not in state:
            raise ValueError("state must be a dict with keys 'numel' and 'error'")
        numel, error = state["numel"], state["error"]
        if numel is not None and (not isinstance(numel, int) or isinstance(numel, bool) or numel < 0):
            raise ValueError(f"state['numel'] must be a non-negative int or None, got {numel!r}")
        if self._numel is not None and numel is not None and numel != self._numel:
            raise ValueError(f"state holds numel {numel}, the memory holds {self._numel}")
        if error is not None:
            if not isinstance(error, torch.Tensor) or error.dim() != 1:
                raise ValueError("state['error'] must be a 1-D tensor or None")
            expected = numel if numel is not None else self._numel
            if expected is not None and error.numel() != expected:
                raise ValueError(f"state['error'] has {error.numel()} entries, expected {expected}")
            device = self._device if self._device is not None else error.device
            self._error = error.detach().to(device=device, dtype=self._dtype, copy=copy)
            self._device = device
            self._numel = error.numel()
        else:
            self._error = None
            if numel is not None:
                self._numel = numel

    def __repr__(self) -> str:
        return f"ErrorFeedback(numel={self._numel}, device={self._device}, dtype={self._dtype}, norm={self.norm():.4g})"
