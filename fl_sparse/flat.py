"""One flat float vector per model, and the way back to Flower's ArrayRecord.

Compressors, error memories and the wire codec all work on one flat 1-D
vector: top-K is global over the whole model, as in every seed paper. The
vector is the concatenation, in record order, of every floating-point array
(weights, biases and float buffers such as BatchNorm running statistics);
integer arrays (``num_batches_tracked``) are not part of it, stay at their
initial values on the server and are local state on clients.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch
from flwr.app import Array, ArrayRecord

__all__ = ["FlatLayout", "vector_hash"]


@dataclass(frozen=True)
class FlatLayout:
    """Names, shapes and dtypes of the arrays packed into the flat vector."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[str, ...]
    # Non-float arrays travel unchanged beside the vector (e.g. BN counters).
    passthrough: tuple[tuple[str, np.ndarray], ...] = ()

    @property
    def numel(self) -> int:
        return int(sum(int(np.prod(s)) for s in self.shapes))

    @classmethod
    def from_arrayrecord(cls, record: ArrayRecord) -> "FlatLayout":
        names, shapes, dtypes, passthrough = [], [], [], []
        for name, array in record.items():
            nd = array.numpy()
            if np.issubdtype(nd.dtype, np.floating):
                names.append(name)
                shapes.append(tuple(nd.shape))
                dtypes.append(str(nd.dtype))
            else:
                passthrough.append((name, nd.copy()))
        if not names:
            raise ValueError("the ArrayRecord holds no floating-point arrays")
        return cls(tuple(names), tuple(shapes), tuple(dtypes), tuple(passthrough))

    @classmethod
    def from_state_dict(cls, state_dict: "OrderedDict[str, torch.Tensor]") -> "FlatLayout":
        return cls.from_arrayrecord(ArrayRecord(state_dict))

    def flatten(self, record: ArrayRecord) -> torch.Tensor:
        """The float32 flat vector of ``record`` (validated against this layout)."""
        parts = []
        for name, shape in zip(self.names, self.shapes):
            if name not in record:
                raise ValueError(f"array {name!r} missing from the record")
            nd = record[name].numpy()
            if tuple(nd.shape) != shape:
                raise ValueError(f"array {name!r} has shape {nd.shape}, expected {shape}")
            parts.append(torch.from_numpy(np.ascontiguousarray(nd, dtype=np.float32)).reshape(-1))
        return torch.cat(parts) if parts else torch.empty(0)

    def flatten_state_dict(self, state_dict) -> torch.Tensor:
        """The float32 flat vector of a torch ``state_dict`` (same device)."""
        parts = []
        for name, shape in zip(self.names, self.shapes):
            tensor = state_dict[name]
            if tuple(tensor.shape) != shape:
                raise ValueError(f"tensor {name!r} has shape {tuple(tensor.shape)}, expected {shape}")
            parts.append(tensor.detach().reshape(-1).float())
        return torch.cat(parts)

    def unflatten(self, vector: torch.Tensor) -> ArrayRecord:
        """An ArrayRecord with this layout's arrays filled from ``vector``."""
        if vector.dim() != 1 or vector.numel() != self.numel:
            raise ValueError(f"vector has shape {tuple(vector.shape)}, expected ({self.numel},)")
        vec = vector.detach().to("cpu", torch.float32).numpy()
        record = ArrayRecord()
        offset = 0
        for name, shape, dtype in zip(self.names, self.shapes, self.dtypes):
            n = int(np.prod(shape))
            record[name] = Array(vec[offset : offset + n].reshape(shape).astype(dtype, copy=True))
            offset += n
        for name, nd in self.passthrough:
            record[name] = Array(nd)
        return record

    def to_state_dict(self, vector: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
        """A torch state_dict view of ``vector`` (plus the pass-through arrays)."""
        if vector.dim() != 1 or vector.numel() != self.numel:
            raise ValueError(f"vector has shape {tuple(vector.shape)}, expected ({self.numel},)")
        out: OrderedDict[str, torch.Tensor] = OrderedDict()
        offset = 0
        for name, shape in zip(self.names, self.shapes):
            n = int(np.prod(shape))
            out[name] = vector[offset : offset + n].view(shape)
            offset += n
        for name, nd in self.passthrough:
            out[name] = torch.from_numpy(nd.copy())
        return out


def vector_hash(vector: torch.Tensor) -> str:
    """Hex digest of the exact bytes of a float32 vector.

    Used to prove that a client trains from bit-for-bit the server's model.
    """
    data = vector.detach().to("cpu", torch.float32).contiguous().numpy()
    return hashlib.blake2b(memoryview(data).cast("B"), digest_size=16).hexdigest()  # no copy
