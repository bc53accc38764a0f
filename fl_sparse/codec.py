r"""The wire format: sparse vectors, position sets and value vectors as Flower ``ArrayRecord``\ s.

Every message fl-sparse sends is one :class:`flwr.app.ArrayRecord` built here,
and every message it receives is parsed here, with full validation: a peer is
not trusted to send well-formed data.

Payload kinds
-------------
* **sparse** -- positions + values (:func:`encode` / :func:`decode`),
* **positions** -- a position set only, e.g. a vote or a mask
  (:func:`encode_positions` / :func:`decode_positions`),
* **values** -- values on a mask both sides already know
  (:func:`encode_values` / :func:`decode_values`),
* **dense** -- a full float32 vector, e.g. the initial model or a catch-up
  (:func:`encode_dense` / :func:`decode_dense`).

Record layout (format version 1)
--------------------------------
Each array is a :class:`flwr.app.Array` whose ``data`` is the **raw
little-endian bytes** of a 1-D numpy array (``stype = "fl_sparse.raw-le"``,
``dtype`` the numpy dtype name, ``shape = (n,)``). There is no ``.npy`` header
inside ``data``, so ``len(data)`` is exactly what the payload costs. (Such
arrays are not readable with ``Array.numpy()``; use the decoders here.)

=============  ================================  ============================================
key            dtype, length                     content
=============  ================================  ============================================
``header``     int64, 9                          see below (72 bytes)
``positions``  int32 / int64, nnz (``raw``)      the sorted indices (int64 iff numel > 2**31-1)
               uint8, ceil(position_bits/8)      bit stream (``block``, ``rice``), MSB first
``values``     float32 / float16, nnz            ``fp32`` / ``fp16``
               uint8, ceil(nnz*q/8)              ``q<q>``: packed q-bit codes, MSB first
               uint8, ceil(nnz/8)                ``sign``: packed sign bits (1 = negative)
``means``      float32, 2**(q-1)                 ``q<q>`` only: interval means
``scale``      float32, 1                        ``sign`` only: ||v||_1 / nnz
=============  ================================  ============================================

Only the keys a payload needs are present (sparse: header, positions, values
[, means|scale]; positions: header, positions; values/dense: header, values
[, means|scale]). Header fields (int64 each):

====  ===================  ==================================================================
0     magic + version      ``0x464C5350 << 16 | 1`` ("FLSP", version 1)
1     kind                 1 sparse, 2 positions, 3 values, 4 dense
2     numel                dense length (for *values*: the value count)
3     nnz                  number of entries carried (== numel for values/dense)
4     value code           0 none, 1 fp32, 2 fp16, 3 fractional ``q<q>``, 4 scaled sign
5     value bits           bits per value: 32, 16, q, 1 (0 if none)
6     position code        0 none, 1 raw, 2 block, 3 rice
7     position parameter   raw: index width 32/64; block: b; rice: r (0 if none)
8     position bits        exact number of meaningful bits in ``positions``
====  ===================  ==================================================================

Position codes
--------------
``raw``
    int32 indices (int64 when ``numel > 2**31 - 1``): 32 bits per position.

``block`` (SSGD-MV paper, section 4.3.1)
    The vector is cut into blocks of ``2**b`` entries; each non-zero costs a
    ``'1'`` plus its ``b``-bit offset inside its block, and a ``'0'`` closes a
    block, so a support of density :math:`\phi` costs about
    :math:`\log_2(1/\phi) + 2` bits per position. The paper's block size is
    :math:`1/\phi`; we use ``b = ceil(log2(1/phi))`` or ``b - 1``, whichever
    gives the shorter stream for this support (never longer than the paper's
    choice; ``b`` is in the header). Two layout details, neither changing the
    bit count: (1) the ``'0'``\ s after the last non-zero are not sent (the
    receiver knows nnz); (2) the stream is stored as two sections, first all
    ``b``-bit offsets, then the ``'1'``/``'0'`` block-structure symbols in the
    paper's order. The paper interleaves them, which forces a sequential,
    bit-by-bit parse; split, both sections decode with vectorised numpy
    (fixed-width reads, and ``np.flatnonzero`` on the structure bits, where
    the block of the ``j``-th ``'1'`` is its position minus ``j``).

``rice`` (Golomb-Rice code of the gaps)
    Gaps ``g_0 = i_0`` and ``g_j = i_j - i_{j-1} - 1``. With parameter ``r``
    each gap is a ``r``-bit remainder ``g & (2**r - 1)`` and the quotient
    ``g >> r`` in unary (that many ``'0'``\ s, then a ``'1'``). ``r`` minimises
    the exact stream length ``nnz*(r+1) + sum(g >> r)`` (a convex function of
    ``r``, minimised by a short descent from ``floor(log2(mean gap))``). As
    for ``block``, the stream holds all remainders first, then all unary
    quotients, so decoding is vectorised. On uniformly random supports this
    measures 0.03 bit (k ~ 1e5) to 0.2 bit (k ~ 24) above the entropy bound
    :math:`\log_2\binom{d}{k}/k` (``benchmarks/bench_codec.py``); on any
    support it costs at most :math:`\log_2(d/k) + 2` bits per position, the
    paper's block-code estimate (tested).

Value codes
-----------
``"fp32"``, ``"fp16"`` (encoding values outside the float16 range is a
``ValueError``), ``"q2"`` .. ``"q16"`` (:class:`~fl_sparse.quantize.FractionalQuantizer`
with that many bits), ``"sign"`` (:class:`~fl_sparse.quantize.ScaledSign`).
:func:`lossy_roundtrip` / :func:`lossy_values` give exactly what the receiver
will reconstruct, without bit packing, for error feedback.

Devices
-------
Encoders accept tensors on any device. Quantization runs on the tensor's
device; indices, codes and values are then copied to the CPU because bit
packing is numpy. Decoders return CPU tensors (int64 indices, float32
values); move them where you need them.

Validation
----------
The decoders raise :class:`PayloadError` (a ``ValueError``) and nothing else
for a malformed record: wrong type, missing/extra arrays, wrong ``stype``,
dtype or shape, bad magic/version/kind, unknown codes or parameters, a
declared ``numel`` different from the caller's, a declared ``nnz`` above
``max_nnz``, byte lengths inconsistent with the header, non-zero padding,
bit streams that are truncated, over-long or hold the wrong number of
codewords, indices out of range or not strictly increasing, NaN/Inf values,
negative or non-finite quantizer means/scales. Every size is checked against
the header *and* the received byte counts before anything sized by the
header is allocated, so an absurd declared size fails fast, and all work is
linear in the received bytes. Arguments that are the caller's own mistake
(e.g. a negative ``numel``) raise plain ``ValueError``/``TypeError``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
from flwr.app import Array, ArrayRecord

from fl_sparse.quantize import FractionalQuantizer, ScaledSign, _as_finite_float32
from fl_sparse.sparse import SparseTensor

__all__ = [
    "PayloadError",
    "VALUE_CODES",
    "POSITION_CODES",
    "WireSize",
    "encode",
    "decode",
    "encode_positions",
    "decode_positions",
    "encode_values",
    "decode_values",
    "encode_dense",
    "decode_dense",
    "wire_size",
    "lossy_roundtrip",
    "lossy_values",
]


class PayloadError(ValueError):
    """A received record is malformed; the message says what is wrong."""


# ----------------------------------------------------------------- constants
STYPE = "fl_sparse.raw-le"
MAGIC = 0x464C5350  # "FLSP"
FORMAT_VERSION = 1
HEADER_TAG = (MAGIC << 16) | FORMAT_VERSION

# header field positions
H_TAG, H_KIND, H_NUMEL, H_NNZ, H_VCODE, H_VBITS, H_PCODE, H_PPARAM, H_PBITS = range(9)
HEADER_LEN = 9

KIND_SPARSE, KIND_POSITIONS, KIND_VALUES, KIND_DENSE = 1, 2, 3, 4
_KIND_NAMES = {KIND_SPARSE: "sparse", KIND_POSITIONS: "positions", KIND_VALUES: "values", KIND_DENSE: "dense"}

VCODE_NONE, VCODE_FP32, VCODE_FP16, VCODE_FRACTIONAL, VCODE_SIGN = 0, 1, 2, 3, 4
PCODE_NONE, PCODE_RAW, PCODE_BLOCK, PCODE_RICE = 0, 1, 2, 3

VALUE_CODES: tuple[str, ...] = ("fp32", "fp16", "sign") + tuple(f"q{q}" for q in range(2, 17))
POSITION_CODES: tuple[str, ...] = ("raw", "block", "rice")
_PCODE_IDS = {"raw": PCODE_RAW, "block": PCODE_BLOCK, "rice": PCODE_RICE}
_PCODE_NAMES = {v: k for k, v in _PCODE_IDS.items()}

INT32_MAX = 2**31 - 1
# Above this, index arithmetic could overflow int64 (gaps are added up).
MAX_NUMEL = 2**62

# numpy dtype name (as stored in Array.dtype) -> explicit little-endian dtype
_WIRE_DTYPES = {
    "uint8": np.dtype("u1"),
    "int32": np.dtype("<i4"),
    "int64": np.dtype("<i8"),
    "float16": np.dtype("<f2"),
    "float32": np.dtype("<f4"),
}


@dataclass(frozen=True)
class WireSize:
    """Exact size of a record.

    ``total_bytes`` is the sum of ``len(Array.data)`` over every array in the
    record (= header + position + value bytes). ``position_bits`` /
    ``value_bits`` are the meaningful bits before byte padding; ``value_bits``
    includes side information (32 bits per quantizer mean or sign scale), so
    ``(position_bits + value_bits) / numel`` is the payload's bits per
    parameter.
    """

    header_bytes: int
    position_bytes: int
    value_bytes: int
    total_bytes: int
    position_bits: int
    value_bits: int

    @property
    def payload_bits(self) -> int:
        return self.position_bits + self.value_bits


# ----------------------------------------------------------------- value codes
@dataclass(frozen=True)
class _ValueCode:
    name: str
    code_id: int
    bits: int  # bits per value

    @property
    def side_key(self) -> str | None:
        """Name of the side-information array, if any."""
        return {VCODE_FRACTIONAL: "means", VCODE_SIGN: "scale"}.get(self.code_id)

    @property
    def side_len(self) -> int:
        if self.code_id == VCODE_FRACTIONAL:
            return 1 << (self.bits - 1)
        return 1 if self.code_id == VCODE_SIGN else 0

    def payload_bits(self, count: int) -> int:
        return count * self.bits + 32 * self.side_len


def _value_code(name: str) -> _ValueCode:
    """Parse a value code name such as ``"fp16"`` or ``"q4"`` (ValueError if unknown)."""
    if name == "fp32":
        return _ValueCode(name, VCODE_FP32, 32)
    if name == "fp16":
        return _ValueCode(name, VCODE_FP16, 16)
    if name == "sign":
        return _ValueCode(name, VCODE_SIGN, 1)
    if isinstance(name, str) and name in VALUE_CODES:  # q2..q16
        return _ValueCode(name, VCODE_FRACTIONAL, int(name[1:]))
    raise ValueError(f"unknown value code {name!r}; expected one of {VALUE_CODES}")


def _value_code_from_header(code_id: int, bits: int) -> _ValueCode:
    expected_bits = {VCODE_FP32: 32, VCODE_FP16: 16, VCODE_SIGN: 1}
    if code_id in expected_bits:
        if bits != expected_bits[code_id]:
            raise PayloadError(f"value code {code_id} must have {expected_bits[code_id]} bits, header says {bits}")
        return _value_code({VCODE_FP32: "fp32", VCODE_FP16: "fp16", VCODE_SIGN: "sign"}[code_id])
    if code_id == VCODE_FRACTIONAL:
        if not 2 <= bits <= 16:
            raise PayloadError(f"fractional quantizer bits must be in [2, 16], header says {bits}")
        return _value_code(f"q{bits}")
    raise PayloadError(f"unknown value code id {code_id}")


def _position_code(name: str) -> int:
    if name not in _PCODE_IDS:
        raise ValueError(f"unknown position code {name!r}; expected one of {POSITION_CODES}")
    return _PCODE_IDS[name]


# ----------------------------------------------------------------- bit helpers
def _fixed_width_bits(x: np.ndarray, width: int) -> np.ndarray:
    """The ``width`` low bits of each non-negative int in ``x``, MSB first, as 0/1 uint8."""
    if width == 0 or x.size == 0:
        return np.zeros(0, dtype=np.uint8)
    shifts = np.arange(width - 1, -1, -1, dtype=np.uint64)
    return ((x.astype(np.uint64)[:, None] >> shifts) & np.uint64(1)).astype(np.uint8).ravel()


def _read_fixed_width(bits: np.ndarray, count: int, width: int) -> np.ndarray:
    """Inverse of :func:`_fixed_width_bits` for ``width <= 62``: int64 array of ``count`` ints."""
    if width == 0 or count == 0:
        return np.zeros(count, dtype=np.int64)
    weights = np.left_shift(np.int64(1), np.arange(width - 1, -1, -1, dtype=np.int64))
    return bits[: count * width].reshape(count, width).astype(np.int64) @ weights


def _pack(bits: np.ndarray) -> np.ndarray:
    return np.packbits(bits)  # zero-pads the last byte


def _unpack(packed: np.ndarray, nbits: int, what: str) -> np.ndarray:
    """``nbits`` bits of ``packed`` (whose length was already checked); padding must be zero."""
    padding = packed.size * 8 - nbits
    if padding and int(packed[-1]) & ((1 << padding) - 1):
        raise PayloadError(f"{what}: non-zero padding bits after the last meaningful bit")
    return np.unpackbits(packed, count=nbits)


def _nbytes_for_bits(nbits: int) -> int:
    return (nbits + 7) // 8


# ----------------------------------------------------------------- position codes
def _raw_width(numel: int) -> int:
    return 32 if numel <= INT32_MAX else 64


def _max_block_bits(numel: int) -> int:
    """Largest sensible b: one block covering the whole vector."""
    return max(0, (numel - 1).bit_length())


def _max_rice_bits(numel: int) -> int:
    """Largest sensible r: 2**r <= numel (a larger r never shortens the stream)."""
    return max(0, numel.bit_length() - 1)


def _block_stream_bits(nnz: int, b: int, last_index: int) -> int:
    return nnz * (b + 1) + (last_index >> b) if nnz else 0


def _choose_block_bits(indices: np.ndarray, numel: int) -> int:
    """``ceil(log2(numel/nnz))`` (the paper's block size) or one less, whichever is shorter."""
    nnz = indices.size
    if nnz == 0:
        return 0
    paper_b = 0
    while (nnz << paper_b) < numel:  # smallest b with 2**b >= 1/phi (integer arithmetic)
        paper_b += 1
    paper_b = min(paper_b, _max_block_bits(numel))
    last = int(indices[-1])
    candidates = [paper_b] + ([paper_b - 1] if paper_b > 0 else [])
    return min(candidates, key=lambda b: (_block_stream_bits(nnz, b, last), -b))


def _encode_block(indices: np.ndarray, numel: int) -> tuple[np.ndarray, int, int]:
    b = _choose_block_bits(indices, numel)
    nnz = indices.size
    if nnz == 0:
        return np.zeros(0, np.uint8), b, 0
    block = indices >> b
    offsets = indices & ((1 << b) - 1)
    # Structure symbols in the paper's order: the j-th '1' is preceded by one
    # '0' for every block closed before it, i.e. by block[j] zeros.
    structure = np.zeros(nnz + int(block[-1]), dtype=np.uint8)
    structure[np.arange(nnz) + block] = 1
    stream = np.concatenate([_fixed_width_bits(offsets, b), structure])
    return _pack(stream), b, stream.size


def _decode_block(bits: np.ndarray, nnz: int, b: int) -> np.ndarray:
    offsets = _read_fixed_width(bits, nnz, b)
    structure = bits[nnz * b:]
    ones = np.flatnonzero(structure)
    if ones.size != nnz:
        raise PayloadError(f"block stream holds {ones.size} positions, header says {nnz}")
    if nnz and ones[-1] != structure.size - 1:
        raise PayloadError("block stream has trailing block-end symbols after the last position")
    block = ones - np.arange(nnz)
    return (block << b) | offsets


def _rice_stream_bits(gaps: np.ndarray, r: int) -> int:
    return gaps.size * (r + 1) + int((gaps >> r).sum())


def _choose_rice_bits(gaps: np.ndarray, numel: int) -> int:
    """The r minimising the exact stream length (convex in r: descend from log2(mean gap))."""
    if gaps.size == 0:
        return 0
    max_r = _max_rice_bits(numel)
    mean_gap = float(gaps.sum()) / gaps.size
    r = min(max_r, max(0, int(math.floor(math.log2(mean_gap))) if mean_gap >= 1 else 0))
    cost = _rice_stream_bits(gaps, r)
    for step in (-1, 1):
        while 0 <= r + step <= max_r:
            next_cost = _rice_stream_bits(gaps, r + step)
            if next_cost >= cost:  # ties keep the smaller r (we try downwards first)
                break
            r, cost = r + step, next_cost
    return r


def _encode_rice(indices: np.ndarray, numel: int) -> tuple[np.ndarray, int, int]:
    nnz = indices.size
    if nnz == 0:
        return np.zeros(0, np.uint8), 0, 0
    gaps = np.diff(indices, prepend=np.int64(-1)) - 1
    r = _choose_rice_bits(gaps, numel)
    quotients = gaps >> r
    remainders = gaps & ((1 << r) - 1)
    # Unary quotients: q '0's then a '1'; the j-th '1' sits at sum_{i<=j}(q_i+1) - 1.
    unary = np.zeros(int(quotients.sum()) + nnz, dtype=np.uint8)
    unary[np.cumsum(quotients + 1) - 1] = 1
    stream = np.concatenate([_fixed_width_bits(remainders, r), unary])
    return _pack(stream), r, stream.size


def _decode_rice(bits: np.ndarray, nnz: int, r: int, numel: int) -> np.ndarray:
    remainders = _read_fixed_width(bits, nnz, r)
    unary = bits[nnz * r:]
    ones = np.flatnonzero(unary)
    if ones.size != nnz:
        raise PayloadError(f"rice stream holds {ones.size} gaps, header says {nnz}")
    if nnz and ones[-1] != unary.size - 1:
        raise PayloadError("rice stream has trailing bits after the last gap")
    quotients = np.diff(ones, prepend=np.int64(-1)) - 1
    # The header check bounds sum(quotients) by numel >> r, so the shift
    # cannot overflow; a gap >= numel is impossible in a valid support.
    gaps = (quotients << r) | remainders
    if nnz and int(gaps.max()) >= numel:
        raise PayloadError("rice stream encodes a gap beyond the vector length")
    return np.cumsum(gaps + 1) - 1


def _position_bits_bounds(pcode: int, param: int, nnz: int, numel: int) -> tuple[int, int]:
    """Inclusive [min, max] of a valid position stream's bit length."""
    if pcode == PCODE_RAW:
        return nnz * param, nnz * param
    if nnz == 0:
        return 0, 0
    if pcode == PCODE_BLOCK:
        # at most one block-end '0' per block before the last position's block
        return nnz * (param + 1), nnz * (param + 1) + ((numel - 1) >> param)
    # rice: sum(gap >> r) <= (sum gaps) >> r and sum gaps <= numel - nnz
    return nnz * (param + 1), nnz * (param + 1) + ((numel - nnz) >> param)


def _check_position_param(pcode: int, param: int, numel: int) -> None:
    if pcode == PCODE_RAW:
        if param != _raw_width(numel):
            raise PayloadError(f"raw positions for numel={numel} must be {_raw_width(numel)}-bit, header says {param}")
    elif pcode == PCODE_BLOCK:
        if not 0 <= param <= _max_block_bits(numel):
            raise PayloadError(f"block size exponent b={param} outside [0, {_max_block_bits(numel)}]")
    elif pcode == PCODE_RICE:
        if not 0 <= param <= _max_rice_bits(numel):
            raise PayloadError(f"rice parameter r={param} outside [0, {_max_rice_bits(numel)}]")
    else:
        raise PayloadError(f"unknown position code id {pcode}")


# ----------------------------------------------------------------- array I/O
def _wire_array(a: np.ndarray) -> Array:
    """A 1-D numpy array as an :class:`Array` holding its raw little-endian bytes."""
    a = np.ascontiguousarray(a.ravel(), dtype=a.dtype.newbyteorder("<"))
    assert a.dtype.name in _WIRE_DTYPES, a.dtype
    return Array(dtype=a.dtype.name, shape=(int(a.size),), stype=STYPE, data=a.tobytes())


def _read_array(record: Mapping, key: str, dtype_name: str, count: int) -> np.ndarray:
    """Zero-copy read-only view of ``record[key]``, after checking type, dtype, shape and byte length."""
    arr = record[key]
    if not isinstance(arr, Array):
        raise PayloadError(f"{key!r} is a {type(arr).__name__}, not an Array")
    if arr.stype != STYPE:
        raise PayloadError(f"{key!r} has stype {arr.stype!r}, expected {STYPE!r}")
    if arr.dtype != dtype_name:
        raise PayloadError(f"{key!r} has dtype {arr.dtype!r}, expected {dtype_name!r}")
    shape = arr.shape
    if not (isinstance(shape, (tuple, list)) and len(shape) == 1
            and isinstance(shape[0], (int, np.integer)) and not isinstance(shape[0], bool)
            and shape[0] == count):
        raise PayloadError(f"{key!r} has shape {shape!r}, expected ({count},)")
    data = arr.data
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise PayloadError(f"{key!r} data is a {type(data).__name__}, not bytes")
    dtype = _WIRE_DTYPES[dtype_name]
    if len(data) != count * dtype.itemsize:
        raise PayloadError(f"{key!r} holds {len(data)} bytes, expected {count * dtype.itemsize}")
    return np.frombuffer(data, dtype=dtype, count=count)


# ----------------------------------------------------------------- header
@dataclass(frozen=True)
class _Header:
    kind: int
    numel: int
    nnz: int
    value_code: _ValueCode | None
    position_code: int
    position_param: int
    position_bits: int

    def expected_keys(self) -> set[str]:
        keys = {"header"}
        if self.position_code != PCODE_NONE:
            keys.add("positions")
        if self.value_code is not None:
            keys.add("values")
            if self.value_code.side_key:
                keys.add(self.value_code.side_key)
        return keys


def _make_header(kind: int, numel: int, nnz: int, value_code: _ValueCode | None,
                 position_code: int, position_param: int, position_bits: int) -> np.ndarray:
    return np.array([
        HEADER_TAG, kind, numel, nnz,
        value_code.code_id if value_code else VCODE_NONE, value_code.bits if value_code else 0,
        position_code, position_param, position_bits,
    ], dtype="<i8")


def _parse_header(record: object) -> _Header:
    """Parse and self-check the header (everything that does not need the caller's numel)."""
    if not isinstance(record, Mapping):
        raise PayloadError(f"expected an ArrayRecord, got {type(record).__name__}")
    if "header" not in record:
        raise PayloadError("record has no 'header' array")
    fields = _read_array(record, "header", "int64", HEADER_LEN).tolist()
    if fields[H_TAG] >> 16 != MAGIC:
        raise PayloadError("header magic is not 'FLSP': not an fl-sparse payload")
    if fields[H_TAG] & 0xFFFF != FORMAT_VERSION:
        raise PayloadError(f"unsupported format version {fields[H_TAG] & 0xFFFF} (this is version {FORMAT_VERSION})")
    kind, numel, nnz = fields[H_KIND], fields[H_NUMEL], fields[H_NNZ]
    if kind not in _KIND_NAMES:
        raise PayloadError(f"unknown payload kind {kind}")
    if not 0 <= numel <= MAX_NUMEL:
        raise PayloadError(f"declared numel {numel} outside [0, 2**62]")
    if not 0 <= nnz <= numel:
        raise PayloadError(f"declared nnz {nnz} outside [0, numel={numel}]")

    vcode_id, vbits = fields[H_VCODE], fields[H_VBITS]
    if vcode_id == VCODE_NONE:
        if vbits != 0:
            raise PayloadError("header declares value bits but no value code")
        value_code = None
    else:
        value_code = _value_code_from_header(vcode_id, vbits)

    pcode, pparam, pbits = fields[H_PCODE], fields[H_PPARAM], fields[H_PBITS]
    if pcode == PCODE_NONE:
        if pparam != 0 or pbits != 0:
            raise PayloadError("header declares a position parameter or bits but no position code")
    else:
        _check_position_param(pcode, pparam, numel)
        lo, hi = _position_bits_bounds(pcode, pparam, nnz, numel)
        if not lo <= pbits <= hi:
            raise PayloadError(
                f"declared position stream of {pbits} bits is impossible for nnz={nnz} "
                f"({_PCODE_NAMES[pcode]}, param {pparam}: must be in [{lo}, {hi}])"
            )

    has_positions, has_values = pcode != PCODE_NONE, value_code is not None
    shape_ok = {
        KIND_SPARSE: has_values and (has_positions or (nnz == numel and nnz > 0)),
        KIND_POSITIONS: has_positions and not has_values,
        KIND_VALUES: has_values and not has_positions and nnz == numel,
        KIND_DENSE: not has_positions and value_code is not None and value_code.code_id == VCODE_FP32 and nnz == numel,
    }[kind]
    if not shape_ok:
        raise PayloadError(f"header fields are inconsistent with a {_KIND_NAMES[kind]} payload")

    header = _Header(kind, numel, nnz, value_code, pcode, pparam, pbits)
    keys = set(record.keys())
    expected = header.expected_keys()
    if keys != expected:
        missing, extra = sorted(expected - keys), sorted(map(repr, keys - expected))
        raise PayloadError(f"record arrays do not match the header: missing {missing}, unexpected [{', '.join(extra)}]")
    return header


def _check_header(record: object, kind: int, numel: int, max_nnz: int | None) -> _Header:
    """Parse the header and check it against what the caller expects."""
    if not isinstance(numel, int) or isinstance(numel, bool) or not 0 <= numel <= MAX_NUMEL:
        raise ValueError(f"numel must be an int in [0, 2**62], got {numel!r}")
    if max_nnz is not None and (not isinstance(max_nnz, int) or max_nnz < 0):
        raise ValueError(f"max_nnz must be a non-negative int or None, got {max_nnz!r}")
    header = _parse_header(record)
    if header.kind != kind:
        raise PayloadError(f"expected a {_KIND_NAMES[kind]} payload, got a {_KIND_NAMES[header.kind]} payload")
    if header.numel != numel:
        raise PayloadError(f"payload declares numel={header.numel}, expected {numel}")
    limit = numel if max_nnz is None else min(max_nnz, numel)
    if header.nnz > limit:
        raise PayloadError(f"payload declares nnz={header.nnz}, more than the allowed {limit}")
    return header


# ----------------------------------------------------------------- encode side
def _indices_to_numpy(indices: torch.Tensor, numel: int) -> np.ndarray:
    """Sorted unique in-range int64 numpy indices (ValueError otherwise)."""
    if not isinstance(numel, int) or isinstance(numel, bool) or not 0 <= numel <= MAX_NUMEL:
        raise ValueError(f"numel must be an int in [0, 2**62], got {numel!r}")
    if indices.dim() != 1 or indices.dtype.is_floating_point or indices.dtype == torch.bool:
        raise ValueError(f"indices must be a 1-D integer tensor, got {indices.dtype} {tuple(indices.shape)}")
    idx = indices.detach().to("cpu", torch.int64).numpy()
    if idx.size:
        if idx[0] < 0 or idx[-1] >= numel or (idx.size > 1 and not (np.diff(idx) > 0).all()):
            raise ValueError(f"indices must be strictly increasing and within [0, {numel})")
    return idx


def _position_arrays(idx: np.ndarray, numel: int, positions: str) -> tuple[np.ndarray, int, int, int]:
    """(positions array, code id, parameter, meaningful bits)."""
    pcode = _position_code(positions)
    if pcode == PCODE_RAW:
        width = _raw_width(numel)
        return idx.astype("<i4" if width == 32 else "<i8"), pcode, width, width * idx.size
    if pcode == PCODE_BLOCK:
        packed, b, nbits = _encode_block(idx, numel)
        return packed, pcode, b, nbits
    packed, r, nbits = _encode_rice(idx, numel)
    return packed, pcode, r, nbits


def _to_fp16(v32: torch.Tensor) -> torch.Tensor:
    half = v32.to(torch.float16)
    if half.numel() and not bool(torch.isfinite(half).all()):
        raise ValueError("values exceed the float16 range (|v| >= 65520); use 'fp32' or a quantizer")
    return half


def _value_arrays(x: torch.Tensor, code: _ValueCode) -> dict[str, np.ndarray]:
    """Encode values to the 'values' array (+ side array); quantization runs on x's device."""
    v32 = _as_finite_float32(x)
    if code.code_id == VCODE_FP32:
        return {"values": v32.cpu().numpy().astype("<f4")}
    if code.code_id == VCODE_FP16:
        return {"values": _to_fp16(v32).cpu().numpy().astype("<f2")}
    if code.code_id == VCODE_FRACTIONAL:
        codes, means = FractionalQuantizer(code.bits).encode(v32)
        packed = _pack(_fixed_width_bits(codes.cpu().numpy(), code.bits))
        return {"values": packed, "means": means.cpu().numpy().astype("<f4")}
    negative, scale = ScaledSign().encode(v32)
    return {"values": _pack(negative.cpu().numpy().astype(np.uint8)),
            "scale": scale.reshape(1).cpu().numpy().astype("<f4")}


def _lossy(x: torch.Tensor, code: _ValueCode) -> torch.Tensor:
    v32 = _as_finite_float32(x)
    if code.code_id == VCODE_FP32:
        return v32
    if code.code_id == VCODE_FP16:
        return _to_fp16(v32).to(torch.float32)
    if code.code_id == VCODE_FRACTIONAL:
        return FractionalQuantizer(code.bits)(v32)
    return ScaledSign()(v32)


def _record(header: np.ndarray, arrays: dict[str, np.ndarray]) -> ArrayRecord:
    record = ArrayRecord()
    record["header"] = _wire_array(header)
    for key, value in arrays.items():
        record[key] = _wire_array(value)
    return record


def encode(sparse: SparseTensor, values: str = "fp32", positions: str = "raw") -> ArrayRecord:
    """Encode a sparse vector (positions + values) as a record.

    ``values`` is one of :data:`VALUE_CODES`, ``positions`` one of
    :data:`POSITION_CODES`. Raises ``ValueError`` for unsorted/duplicate/out of
    range indices, NaN/Inf values, or values outside the float16 range with
    ``"fp16"``. Deterministic: equal inputs give byte-identical records.
    """
    vcode = _value_code(values)
    _position_code(positions)  # reject an unknown code even when it goes unused
    idx = _indices_to_numpy(sparse.indices, sparse.numel)
    value_arrays = _value_arrays(sparse.values, vcode)
    if idx.size == sparse.numel and idx.size > 0:
        # Every entry present (dense FedAvg, a full aggregate): positions are
        # implied, so none are sent -- a dense update costs what it should.
        header = _make_header(KIND_SPARSE, sparse.numel, idx.size, vcode, PCODE_NONE, 0, 0)
        return _record(header, value_arrays)
    pos, pcode, pparam, pbits = _position_arrays(idx, sparse.numel, positions)
    header = _make_header(KIND_SPARSE, sparse.numel, idx.size, vcode, pcode, pparam, pbits)
    return _record(header, {"positions": pos, **value_arrays})


def encode_positions(indices: torch.Tensor, numel: int, positions: str = "raw") -> ArrayRecord:
    """Encode a position set (sorted unique int indices in ``[0, numel)``), e.g. a vote or mask."""
    idx = _indices_to_numpy(indices, numel)
    pos, pcode, pparam, pbits = _position_arrays(idx, numel, positions)
    header = _make_header(KIND_POSITIONS, numel, idx.size, None, pcode, pparam, pbits)
    return _record(header, {"positions": pos})


def encode_values(x: torch.Tensor, values: str = "fp32") -> ArrayRecord:
    """Encode a 1-D value vector whose positions the receiver already knows."""
    vcode = _value_code(values)
    value_arrays = _value_arrays(x, vcode)
    count = int(x.numel())
    header = _make_header(KIND_VALUES, count, count, vcode, PCODE_NONE, 0, 0)
    return _record(header, value_arrays)


def encode_dense(x: torch.Tensor) -> ArrayRecord:
    """Encode a full 1-D vector as float32 (e.g. the initial model or a catch-up)."""
    vcode = _value_code("fp32")
    value_arrays = _value_arrays(x, vcode)
    numel = int(x.numel())
    header = _make_header(KIND_DENSE, numel, numel, vcode, PCODE_NONE, 0, 0)
    return _record(header, value_arrays)


def lossy_roundtrip(sparse: SparseTensor, values: str = "fp32") -> SparseTensor:
    """What the receiver reconstructs from ``encode(sparse, values, ...)``, without packing.

    Same indices (same tensor, same device), float32 values on the values'
    device. Equal, value for value, to ``decode(encode(sparse, values, p), ...)``
    for every position code ``p`` -- use it for error feedback.
    """
    return SparseTensor(sparse.indices, _lossy(sparse.values, _value_code(values)), sparse.numel)


def lossy_values(x: torch.Tensor, values: str = "fp32") -> torch.Tensor:
    """What the receiver reconstructs from ``encode_values(x, values)`` (float32, x's device)."""
    return _lossy(x, _value_code(values))


# ----------------------------------------------------------------- decode side
def _decode_positions_from(record: Mapping, header: _Header) -> np.ndarray:
    """Validated int64 indices: strictly increasing, within [0, numel)."""
    nnz, numel, pcode, param = header.nnz, header.numel, header.position_code, header.position_param
    if pcode == PCODE_NONE:  # a full sparse payload: every position, implied
        return np.arange(numel, dtype=np.int64)
    if pcode == PCODE_RAW:
        raw = _read_array(record, "positions", "int32" if param == 32 else "int64", nnz)
        idx = raw.astype(np.int64)
    else:
        nbits = header.position_bits
        packed = _read_array(record, "positions", "uint8", _nbytes_for_bits(nbits))
        bits = _unpack(packed, nbits, "positions")
        idx = _decode_block(bits, nnz, param) if pcode == PCODE_BLOCK else _decode_rice(bits, nnz, param, numel)
    if idx.size:
        if idx[0] < 0 or idx[-1] >= numel:
            raise PayloadError(f"positions outside [0, {numel})")
        if idx.size > 1 and not (np.diff(idx) > 0).all():
            raise PayloadError("positions are not strictly increasing (unsorted or duplicated)")
    return idx


def _decode_values_from(record: Mapping, header: _Header) -> torch.Tensor:
    """Validated finite float32 CPU values."""
    code, count = header.value_code, header.nnz
    assert code is not None
    if code.code_id in (VCODE_FP32, VCODE_FP16):
        raw = _read_array(record, "values", "float32" if code.code_id == VCODE_FP32 else "float16", count)
        if not np.isfinite(raw).all():
            raise PayloadError("values contain NaN or Inf")
        return torch.from_numpy(raw.astype(np.float32))
    nbits = count * code.bits
    packed = _read_array(record, "values", "uint8", _nbytes_for_bits(nbits))
    side = _read_array(record, code.side_key, "float32", code.side_len)
    if not np.isfinite(side).all() or (side < 0).any():
        raise PayloadError(f"{code.side_key!r} must be finite and non-negative")
    bits = _unpack(packed, nbits, "values")
    if code.code_id == VCODE_FRACTIONAL:
        codes = torch.from_numpy(_read_fixed_width(bits, count, code.bits))
        return FractionalQuantizer(code.bits)._decode_trusted(codes, torch.from_numpy(side.copy()))
    negative = torch.from_numpy(bits.astype(bool))
    return ScaledSign._decode_trusted(negative, torch.from_numpy(side.copy()))


def decode(record: ArrayRecord, numel: int, *, max_nnz: int | None = None) -> SparseTensor:
    """Decode and fully validate a sparse payload from :func:`encode`.

    ``numel`` is the length the receiver expects; ``max_nnz`` (default
    ``numel``) caps the declared entry count. Returns a CPU
    :class:`SparseTensor` (int64 indices, float32 values) that passes
    :meth:`SparseTensor.validate`. Raises :class:`PayloadError` for any
    malformed record.
    """
    header = _check_header(record, KIND_SPARSE, numel, max_nnz)
    idx = _decode_positions_from(record, header)
    vals = _decode_values_from(record, header)
    return SparseTensor(torch.from_numpy(idx), vals, numel)


def decode_positions(record: ArrayRecord, numel: int, *, max_nnz: int | None = None) -> torch.Tensor:
    """Decode a position set from :func:`encode_positions`: int64, sorted, unique, in range (CPU)."""
    header = _check_header(record, KIND_POSITIONS, numel, max_nnz)
    return torch.from_numpy(_decode_positions_from(record, header))


def decode_values(record: ArrayRecord, count: int) -> torch.Tensor:
    """Decode ``count`` finite float32 values from :func:`encode_values` (CPU)."""
    header = _check_header(record, KIND_VALUES, count, None)
    return _decode_values_from(record, header)


def decode_dense(record: ArrayRecord, numel: int) -> torch.Tensor:
    """Decode a finite float32 vector of length ``numel`` from :func:`encode_dense` (CPU)."""
    header = _check_header(record, KIND_DENSE, numel, None)
    return _decode_values_from(record, header)


def wire_size(record: ArrayRecord) -> WireSize:
    """Exact byte and bit counts of a record (header checked; content not decoded)."""
    header = _parse_header(record)
    for key, arr in record.items():
        if not isinstance(arr, Array) or not isinstance(arr.data, (bytes, bytearray, memoryview)):
            raise PayloadError(f"{key!r} is not an Array holding bytes")
    nbytes = {key: len(arr.data) for key, arr in record.items()}
    side = header.value_code.side_key if header.value_code else None
    value_bytes = nbytes.get("values", 0) + (nbytes.get(side, 0) if side else 0)
    return WireSize(
        header_bytes=nbytes["header"],
        position_bytes=nbytes.get("positions", 0),
        value_bytes=value_bytes,
        total_bytes=sum(nbytes.values()),
        position_bits=header.position_bits,
        value_bits=header.value_code.payload_bits(header.nnz) if header.value_code else 0,
    )
