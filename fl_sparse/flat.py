"""One flat float vector per model, and the way back to Flower's ArrayRecord.

Compressors, error memories and the wire codec all work on one flat 1-D
vector: top-K is global over the whole model, as in every seed paper. The
vector is the concatenation, in record order, of every floating-point array
(weights, biases and float buffers such as BatchNorm running statistics, of
any float dtype, computed in float32: float16 entries widen exactly, float64
entries are rounded to float32, which the strategy warns about). The other arrays
are *exact* arrays: integer arrays (BatchNorm's ``num_batches_tracked``) and
any float array the user names in ``exact=`` travel whole, beside the
vector, and are averaged like FedAvg averages them, never compressed.
"""

from __future__ import annotations

import fnmatch
import functools
import io
import json
import math
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch
import xxhash
from flwr.app import Array, ArrayRecord

from fl_sparse.records import array_record, wire_array

__all__ = ["FlatLayout", "all_finite", "array_to_numpy", "numpy_to_array", "vector_hash"]

# ------------------------------------------------------------ Array <-> numpy
# Flower's Array holds a whole .npy file in ``data``. ``Array.numpy()`` parses
# its header with ``ast.literal_eval`` and ``Array(ndarray)`` writes it with
# ``np.save``: about 0.1 ms per array each way, i.e. most of a client's own
# per-message work at MLP size (8 arrays in, 8 out, every message). The
# header of a C-ordered array depends only on (dtype, shape), so it is built
# once per pair and compared byte for byte; anything else (Fortran order,
# another byte order, another stype) takes Flower's own path.
_NPY_MAGIC_V1 = b"\x93NUMPY\x01\x00"


@functools.lru_cache(maxsize=4096)
def _npy_header(dtype: np.dtype, shape: tuple[int, ...]) -> bytes:
    buf = io.BytesIO()
    header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": shape}
    np.lib.format.write_array_header_1_0(buf, header)
    return buf.getvalue()


def array_to_numpy(array: Array) -> np.ndarray:
    """``array.numpy()``, read-only and without a copy when the payload is a plain C-ordered .npy."""
    data = array.data
    if array.stype == "numpy.ndarray" and isinstance(data, bytes) and data[:8] == _NPY_MAGIC_V1:
        try:
            dtype = np.dtype(array.dtype)
            shape = tuple(int(n) for n in array.shape)
        except (TypeError, ValueError):
            return array.numpy()
        if dtype.kind in "biuf":
            header = _npy_header(dtype, shape)
            count = math.prod(shape)
            if len(data) == len(header) + count * dtype.itemsize and data.startswith(header):
                return np.frombuffer(data, dtype=dtype, count=count, offset=len(header)).reshape(shape)
    return array.numpy()


@functools.lru_cache(maxsize=4096)
def _npy_meta(dtype: np.dtype, shape: tuple[int, ...]) -> tuple[bytes, str, tuple[int, ...]]:
    """(.npy header, ``str(dtype)``, shape as Python ints): ``str(dtype)`` alone costs ~3 us."""
    shape = tuple(int(n) for n in shape)
    return _npy_header(dtype, shape), str(dtype), shape


def numpy_to_array(nd: np.ndarray) -> Array:
    """``Array(nd)`` (the same bytes), without ``np.save``: one copy of the values, into the Array's bytes."""
    if nd.dtype.kind not in "biuf" or not nd.flags.c_contiguous:
        return Array(np.require(nd, requirements="C"))
    header, dtype, shape = _npy_meta(nd.dtype, nd.shape)
    data = b"".join((header, memoryview(nd.reshape(-1)).cast("B")))  # one copy (header + tobytes() made two)
    return wire_array(dtype, shape, "numpy.ndarray", data)



@dataclass(frozen=True)
class FlatLayout:
    """Names, shapes and dtypes of the arrays packed into the flat vector.

    ``passthrough`` holds the exact arrays (see the module docstring) with
    their values in the record the layout was made from; ``order`` is every
    array name in record order, so :meth:`unflatten` gives back a record with
    the same keys in the same order.
    """

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[str, ...]
    passthrough: tuple[tuple[str, np.ndarray], ...] = ()
    order: tuple[str, ...] = ()

    @functools.cached_property  # read several times per message; np.prod costs ~5 us a shape
    def numel(self) -> int:
        return sum(math.prod(s) for s in self.shapes)

    @property
    def exact_names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.passthrough)

    @classmethod
    def from_arrayrecord(cls, record: ArrayRecord, exact: Iterable[str] = ()) -> "FlatLayout":
        """The layout of ``record``; float arrays matching a pattern of ``exact`` (fnmatch) stay exact."""
        patterns = [exact] if isinstance(exact, str) else list(exact)
        names, shapes, dtypes, passthrough = [], [], [], []
        for name, array in record.items():
            nd = array.numpy()
            if nd.dtype.kind not in "biuf":  # complex, strings, objects: no exact real average, no float vector
                raise ValueError(
                    f"array {name!r} is {nd.dtype}: fl-sparse handles real arrays only (float, integer or bool); "
                    "a complex parameter can travel as two real arrays (torch.view_as_real)"
                )
            if np.issubdtype(nd.dtype, np.floating) and not any(fnmatch.fnmatchcase(name, p) for p in patterns):
                names.append(name)
                shapes.append(tuple(nd.shape))
                dtypes.append(str(nd.dtype))
            else:
                passthrough.append((name, nd.copy()))
        if not names:
            raise ValueError("the ArrayRecord holds no floating-point arrays to compress")
        return cls(tuple(names), tuple(shapes), tuple(dtypes), tuple(passthrough), tuple(record.keys()))

    # ------------------------------------------------------------ wire form
    def to_json(self) -> str:
        """Names, shapes and dtypes (not values) of every array, in record order."""
        flat = {n: ("flat", list(s), d) for n, s, d in zip(self.names, self.shapes, self.dtypes)}
        exact = {n: ("exact", list(nd.shape), str(nd.dtype)) for n, nd in self.passthrough}
        arrays = [[n, *(flat.get(n) or exact[n])] for n in (self.order or (*self.names, *self.exact_names))]
        return json.dumps(arrays, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> "FlatLayout":
        """The layout :meth:`to_json` wrote; exact arrays hold zeros until values arrive.

        Parsed once per text and process (a client reads its stored layout with
        every message): the result is immutable, its zero arrays read-only.
        """
        if cls is not FlatLayout:
            return cls._parse_json(text)
        return _layout_from_json(text)

    @classmethod
    def _parse_json(cls, text: str) -> "FlatLayout":
        try:
            arrays = json.loads(text)
            names, shapes, dtypes, passthrough, order = [], [], [], [], []
            for name, kind, shape, dtype in arrays:
                ok = (
                    isinstance(name, str)
                    and kind in ("flat", "exact")
                    and isinstance(shape, list)
                    and all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape)
                    and isinstance(dtype, str)
                )
                if not ok:
                    raise ValueError(f"bad entry {[name, kind, shape, dtype]!r}")
                shape = tuple(shape)
                np_dtype = np.dtype(dtype)
                if kind == "flat":
                    if not np.issubdtype(np_dtype, np.floating):
                        raise ValueError(f"flat array {name!r} has dtype {dtype}")
                    names.append(name)
                    shapes.append(shape)
                    dtypes.append(str(np_dtype))
                else:
                    zeros = np.zeros(shape, dtype=np_dtype)
                    zeros.flags.writeable = False  # shared by every caller of the cached layout
                    passthrough.append((name, zeros))
                order.append(name)
        except (TypeError, ValueError, json.JSONDecodeError) as exc:
            raise ValueError(f"malformed layout: {exc}") from None
        if not names or len(set(order)) != len(order):
            raise ValueError("malformed layout: no flat arrays, or a name twice")
        return cls(tuple(names), tuple(shapes), tuple(dtypes), tuple(passthrough), tuple(order))

    def spans(self):
        """``(name, start, end)`` of each flat array: its entries are ``vector[start:end]``."""
        start = 0
        for name, shape in zip(self.names, self.shapes):
            end = start + math.prod(shape)
            yield name, start, end
            start = end

    def name_at(self, index: int) -> str:
        """The name of the flat array that holds entry ``index`` of the vector."""
        for name, _, end in self.spans():
            if index < end:
                return name
        raise IndexError(f"entry {index} is beyond the vector's {self.numel} entries")

    def exact_record(self, record: ArrayRecord, *, cast_floats: bool = False) -> ArrayRecord:
        """The exact arrays of ``record`` (checked: present, same shape and dtype).

        ``cast_floats``: a float array of another float dtype is cast to the layout's (the
        client mod, taking a train function's arrays as :meth:`step` takes the compressed
        ones). The server, reading a client's reply, does not cast: the wire must match.
        """
        out = ArrayRecord()
        for name, template in self.passthrough:
            if name not in record:
                raise ValueError(f"array {name!r} missing from the record")
            nd = record[name].numpy()
            if cast_floats and nd.dtype != template.dtype and nd.dtype.kind == template.dtype.kind == "f":
                nd = nd.astype(template.dtype)
            if nd.shape != template.shape or nd.dtype != template.dtype:
                raise ValueError(
                    f"array {name!r} is {nd.dtype}{list(nd.shape)}, expected {template.dtype}{list(template.shape)}"
                )
            out[name] = Array(np.require(nd, requirements="C"))  # ascontiguousarray would make 0-d arrays 1-d
        return out

    def with_exact(self, record: ArrayRecord) -> "FlatLayout":
        """This layout with the exact arrays' values taken from ``record``."""
        exact = self.exact_record(record)
        return FlatLayout(
            self.names, self.shapes, self.dtypes, tuple((n, exact[n].numpy()) for n in self.exact_names), self.order
        )

    @classmethod
    def from_state_dict(cls, state_dict: "OrderedDict[str, torch.Tensor]") -> "FlatLayout":
        return cls.from_arrayrecord(ArrayRecord(state_dict))

    def flatten(self, record: ArrayRecord) -> torch.Tensor:
        """The float32 flat vector of ``record`` (validated against this layout)."""
        out = np.empty(self.numel, dtype=np.float32)
        for start, end, nd in self._flat_parts(record):
            out[start:end] = nd.reshape(-1)  # one copy, widening float16 exactly
        return torch.from_numpy(out)

    def check_vector(self, vector: torch.Tensor, what: str = "vector") -> None:
        """ValueError naming ``what`` and its shape unless ``vector`` is 1-D with :attr:`numel` entries."""
        if vector.dim() != 1 or vector.numel() != self.numel:
            raise ValueError(f"{what} has shape {tuple(vector.shape)}, expected ({self.numel},)")

    def step(self, model: torch.Tensor, record: ArrayRecord) -> torch.Tensor:
        """``model - flatten(record)`` as a new float32 flat vector, in one pass (validated as :meth:`flatten`).

        What a train function moved the model by, without the intermediate flat copy of
        ``record``: one 200 kB buffer fewer per message at MLP size, on a path where every
        buffer is a cache miss.
        """
        self.check_vector(model, "model")
        base = model.detach().to("cpu", torch.float32).contiguous().numpy()
        out = np.empty(self.numel, dtype=np.float32)
        for start, end, nd in self._flat_parts(record):
            # dtype=float32: each array is cast to float32 first, as flatten does (float16 exactly)
            np.subtract(base[start:end], nd.reshape(-1), out=out[start:end], dtype=np.float32)
        return torch.from_numpy(out)

    def _flat_parts(self, record: ArrayRecord):
        """``(start, end, array)`` per flat array of ``record``, in flat order; ValueError names a missing or misshapen one."""
        offset = 0
        for name, shape in zip(self.names, self.shapes):
            if name not in record:
                raise ValueError(f"array {name!r} missing from the record")
            nd = array_to_numpy(record[name])
            if tuple(nd.shape) != shape:
                raise ValueError(f"array {name!r} has shape {nd.shape}, expected {shape}")
            if nd.dtype.kind not in "biuf":  # complex, objects: numpy's cast error would not name the array
                raise ValueError(f"array {name!r} is {nd.dtype}, expected a real (float) array")
            yield offset, offset + nd.size, nd
            offset += nd.size

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
        return self.record(self.flat_arrays(vector))

    def flat_arrays(self, vector: torch.Tensor) -> dict[str, Array]:
        """The flat part of :meth:`unflatten`: each float array of this layout, filled from ``vector``."""
        self.check_vector(vector)
        vec = vector.detach().to("cpu", torch.float32).contiguous().numpy()
        arrays: dict[str, Array] = {}
        offset = 0
        for name, shape, dtype in zip(self.names, self.shapes, self.dtypes):
            n = math.prod(shape)
            part = vec[offset : offset + n].reshape(shape)  # a view: numpy_to_array copies it once
            arrays[name] = numpy_to_array(part if dtype == "float32" else part.astype(dtype))
            offset += n
        return arrays

    def record(self, flat_arrays: dict[str, Array]) -> ArrayRecord:
        """An ArrayRecord of ``flat_arrays`` (from :meth:`flat_arrays`) and the exact arrays, in record order.

        The flat arrays go in as new :class:`Array` objects that share the given ones'
        bytes (immutable), so one :meth:`flat_arrays` result can fill many records.
        """
        exact = dict(self.passthrough)
        arrays = {}
        for name in self.order or (*self.names, *exact):
            if name in exact:
                arrays[name] = numpy_to_array(exact[name])
            else:
                a = flat_arrays[name]
                arrays[name] = wire_array(a.dtype, a.shape, a.stype, a.data)
        return array_record(arrays)

    def to_state_dict(self, vector: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
        """A torch state_dict view of ``vector`` (plus the pass-through arrays)."""
        self.check_vector(vector)
        out: OrderedDict[str, torch.Tensor] = OrderedDict()
        offset = 0
        for name, shape in zip(self.names, self.shapes):
            n = int(np.prod(shape))
            out[name] = vector[offset : offset + n].view(shape)
            offset += n
        for name, nd in self.passthrough:
            out[name] = torch.from_numpy(nd.copy())
        return out


@functools.lru_cache(maxsize=64)
def _layout_from_json(text: str) -> FlatLayout:
    return FlatLayout._parse_json(text)


def vector_hash(vector: torch.Tensor) -> str:
    """Hex digest (128 bits, 32 hex digits) of the exact bytes of a float32 vector.

    Used to prove that a client trains from bit-for-bit the server's model, and
    as the content address of a model copy. XXH3-128: about 5 us at d = 50,890
    where BLAKE2b-128 took 280 us (SHA-256 with SHA-NI 145 us, MD5 360 us),
    once per message on every client and per round on the server. Not a
    cryptographic hash: a collision cannot be *found by chance* (2**-128 per
    pair of distinct models), but could be constructed on purpose. Only the
    server writes the models hashed here, and it is trusted with the model
    anyway; nothing here defends against an adversarial collision.
    """
    data = vector.detach().to("cpu", torch.float32).contiguous().numpy()
    return xxhash.xxh3_128_hexdigest(memoryview(data).cast("B"))  # no copy


def all_finite(vector: torch.Tensor) -> bool:
    """True if no entry of ``vector`` is NaN or +-Inf (exact; any float dtype, any device).

    On CPU it is numpy's ``isfinite``: ~8 us at d = 50,890, where
    ``torch.isfinite(x).all()`` took ~130 us on one thread (and, on two busy
    cores, milliseconds at its OpenMP barrier).
    """
    if vector.device.type == "cpu" and vector.dtype in (torch.float32, torch.float64, torch.float16):
        return bool(np.isfinite(vector.detach().numpy()).all())
    return bool(torch.isfinite(vector).all())
