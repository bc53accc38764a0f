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
               uint8, ceil(position_bits/8)      bit stream (``block``, ``rice``, segmented), MSB first
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
6     position code        0 none, 1 raw, 2 block, 3 rice, 4 segmented rice
7     position parameter   raw: index width 32/64; block: b; rice: r; segmented:
                           ``S * 2**32 + CRC-32`` of the S segment lengths (0 if none)
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

segmented rice (layout-aware; what ``"rice"`` sends when it is shorter)
    Given ``segments`` -- lengths :math:`L_0, \dots, L_{S-1}` summing to
    ``numel``, in practice the model's arrays in flat order
    (:func:`segments_of` of the :class:`~fl_sparse.flat.FlatLayout` both
    sides hold) -- the positions are coded segment by segment. Real gradient
    supports are far from uniform across layers (on the MLP below, a layer
    holding 3 % of the weights can get a quarter of a top-1 %, the biases
    none):
    knowing the count :math:`k_s` of each segment, a code needs only
    :math:`\sum_s \log_2\binom{L_s}{k_s}` bits, the *per-layer ideal*,
    instead of :math:`\log_2\binom{d}{k}`. The stream has five sections:

    1. *counts*, in segment order. With :math:`m_s` positions not yet placed
       and :math:`A_s` entries in the later segments, :math:`k_s` lies in
       :math:`[\max(0, m_s - A_s), \min(L_s, m_s)]`; when that range is one
       value nothing is sent (all counts after the last position, the last
       segment's count), else :math:`k_s - lo` in the exp-Golomb code of
       order :math:`o_s = \max(0, \lfloor\log_2 \mu_s\rfloor - 1)`,
       :math:`\mu_s = m_s L_s / (L_s + A_s)` (the count's expectation were
       the rest uniform; exact integer arithmetic). The order-:math:`o`
       exp-Golomb code of :math:`v` is :math:`n` '0's then
       :math:`v + 2^o` in :math:`n + 1 + o` bits,
       :math:`n = \lfloor\log_2(v + 2^o)\rfloor - o`. On the MLP below it
       costs 0.14 bits per position at 0.1 % (a fixed
       :math:`\lceil\log_2(\min(L_s, m_s) + 1)\rceil`-bit field: 0.19,
       Elias-gamma: 0.21); with a hundred mostly empty segments at 0.01 %
       it is 4x cheaper than the fixed width.
    2. for every *coded* segment (:math:`0 < k_s < L_s`; an empty or a full
       segment costs nothing more): one bit for its gap code (0 Rice, 1
       exp-Golomb) and its parameter :math:`r_s` in
       :math:`\mathrm{bitlen}(\lfloor\log_2 L_s\rfloor)` bits.
    3. the remainders :math:`g \bmod 2^{r_s}` of every coded position;
    4. the unary parts: a Rice gap's quotient :math:`g \gg r_s`, an
       exp-Golomb gap's prefix :math:`n = \lfloor\log_2((g \gg r_s) +
       1)\rfloor`, as that many '0's then a '1';
    5. the exp-Golomb mantissas :math:`(g \gg r_s) + 1 - 2^n`, :math:`n`
       bits each.

    Gaps restart in every segment: :math:`g = i - i' - 1` with :math:`i'`
    the previous position of the segment, or the segment's start minus one.
    A Rice gap costs :math:`r + 1 + (g \gg r)` bits, an exp-Golomb gap
    :math:`r + 1 + 2n`: logarithmic instead of linear in the gap, which pays
    off when positions cluster (a few hot rows of a weight matrix): on the
    MLP's real supports the segmented code ends about half a bit per
    position *below* the per-layer ideal (which assumes uniform positions
    inside a layer), side information included. Each coded segment takes
    the code and :math:`r_s` that minimise its exact length (Rice: as
    above; exp-Golomb: a descent from the Rice :math:`r`), and the encoder
    sends the segmented stream only when it is strictly shorter than plain
    Rice's, so ``"rice"`` with segments never costs more than without.

    The segments are not sent: the header's parameter carries their number
    :math:`S` and a CRC-32 of their lengths (as little-endian int64), and a
    decoder given other segments, or none, refuses the record. Decoding is
    vectorised like the plain codes (the sections make every field's offset
    computable before it is read; fields are read and written as 64-bit
    words, not bit by bit); only the count section and the per-segment
    parameters are Python loops, over the segments.

    Measured (``benchmarks/bench_codec.py``), bits per position: on the
    error-compensated top-k supports of the Fashion-MNIST MLP [784, 256, 128,
    64, 10] every 25 of 300 SGD steps (lr 0.1, batch 32), at 0.1 % the bound
    is 11.38, the per-layer ideal 10.35 on average (9.29-11.11 over the 12
    supports), plain Rice 11.71 and segmented rice 9.88 (8.67-11.04); at
    1 %: bound 8.08, ideal 7.62, Rice 8.27, segmented 6.99 (5.74-7.66). On
    uniform supports ``"rice"`` sends plain Rice (+0 bytes). The price is
    CPU time: at MLP size (8 segments) ``encode_positions`` takes about 0.33
    ms instead of 0.10 and ``decode_positions`` 0.16 instead of 0.05 (0.1 %;
    0.46 / 0.24 ms at 1 %), at ResNet-18 size (d = 11.2 M as 60 synthetic
    layers; the real model has 102 segments, 1 %) encode + decode 7-9 ms
    instead of 5 (one thread of this 2-core machine). Small
    supports try every useful ``r`` of every segment at once (a few numpy
    calls in all); large ones descend per segment.

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
negative or non-finite quantizer means/scales; for the segmented code also
a receiver without segments or with other ones (count or CRC-32 differ),
segment counts beyond their range (more than the segment holds or than the
positions left), parameters above their segment's maximum, and gaps that
run past the end of their segment. Every size is checked against
the header *and* the received byte counts before anything sized by the
header is allocated, so an absurd declared size fails fast, and all work is
linear in the received bytes. Arguments that are the caller's own mistake
(e.g. a negative ``numel``) raise plain ``ValueError``/``TypeError``.
"""

from __future__ import annotations

import functools
import math
import operator
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from flwr.app import Array, ArrayRecord

from fl_sparse.records import array_record, wire_array
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
    "record_bytes",
    "wire_size",
    "lossy_roundtrip",
    "lossy_values",
    "segments_of",
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
PCODE_NONE, PCODE_RAW, PCODE_BLOCK, PCODE_RICE, PCODE_SEGMENTED = 0, 1, 2, 3, 4

VALUE_CODES: tuple[str, ...] = ("fp32", "fp16", "sign") + tuple(f"q{q}" for q in range(2, 17))
POSITION_CODES: tuple[str, ...] = ("raw", "block", "rice")
_PCODE_IDS = {"raw": PCODE_RAW, "block": PCODE_BLOCK, "rice": PCODE_RICE}
_PCODE_NAMES = {v: k for k, v in _PCODE_IDS.items()} | {PCODE_SEGMENTED: "segmented rice"}

# Layout-aware ("segmented") code: the gap code of a segment, and the most segments a layout may have
# (the count sits in the upper half of the 64-bit position-parameter field, above a CRC-32).
GAP_RICE, GAP_EXP_GOLOMB = 0, 1
MAX_SEGMENTS = 2**31 - 1
# Largest remainder / exp-Golomb prefix or mantissa width: 2**62 >= any segment length.
_MAX_FIELD_BITS = 62

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


def _new_words(nbits: int) -> np.ndarray:
    """Zeroed 64-bit words for an ``nbits``-bit stream (and one spare: a 0-width field may start at nbits)."""
    return np.zeros((nbits >> 6) + 2, dtype=np.uint64)


def _words_to_bytes(words: np.ndarray, nbits: int) -> np.ndarray:
    return words.astype(">u8").view(np.uint8)[: (nbits + 7) // 8]


def _or_fields(words: np.ndarray, offsets: np.ndarray, values: np.ndarray, widths: np.ndarray | int) -> None:
    """OR fields into ``words``: field ``j`` holds ``values[j] < 2**widths[j]`` (widths <= 62), MSB first,
    from bit ``offsets[j]`` of the stream. Fields must be sorted and disjoint.

    Work is per field, not per bit. A field starting ``s`` bits into 64-bit
    word ``w`` puts its head in word ``w`` and, if ``s + width > 64``, its tail
    in word ``w + 1``; the heads (and tails) landing in one word are OR-ed by
    one ``bitwise_or.reduceat`` (sorted fields give sorted word numbers).
    Every shift stays in [0, 63]; temporaries are reused (large fresh
    allocations are what costs most on a busy machine).
    """
    if offsets.size == 0:
        return
    word = offsets >> 6
    shift = (offsets & 63).astype(np.uint64)
    # The field left-aligned in 64 bits, v << (64 - width), as two shifts so that width 0 works.
    field = values.astype(np.uint64)
    field <<= np.uint64(1)
    field <<= np.asarray(63 - widths, dtype=np.uint64)
    groups = np.flatnonzero(word[1:] != word[:-1])  # each group: the fields starting in one word
    groups += 1
    groups = np.concatenate((np.zeros(1, dtype=groups.dtype), groups))
    first_words = word[groups]
    words[first_words] |= np.bitwise_or.reduceat(field >> shift, groups)
    # The tail: the field's low `shift` bits, moved to the top of the next word (0 unless it crosses).
    np.subtract(np.uint64(63), shift, out=shift)
    field <<= np.uint64(1)
    field <<= shift
    first_words += 1
    words[first_words] |= np.bitwise_or.reduceat(field, groups)


def _stream_words(packed: np.ndarray) -> np.ndarray:
    """The packed stream as big-endian 64-bit words, zero-padded so that any field start has a next word."""
    padded = np.concatenate([packed, np.zeros((-packed.size) % 8 + 16, dtype=np.uint8)])
    return padded.view(">u8").astype(np.uint64)


def _read_fields(words: np.ndarray, offsets: np.ndarray, widths: np.ndarray) -> np.ndarray:
    """Inverse of :func:`_or_fields` on :func:`_stream_words` (int64; the caller bounds the fields).

    The 64 bits from a field's first bit on are ``(w0 << s) | (w1 >> (64 - s))``;
    the field is their top ``width`` bits. Every shift stays in [0, 63].
    """
    word = offsets >> 6
    shift = (offsets & 63).astype(np.uint64)
    window = words[word]
    window <<= shift
    word += 1
    following = words[word]
    following >>= np.uint64(1)
    np.subtract(np.uint64(63), shift, out=shift)
    following >>= shift
    window |= following
    window >>= np.uint64(1)
    window >>= np.asarray(63 - widths, dtype=np.uint64)
    return window.view(np.int64)


def _read_field(packed: np.ndarray, offset: int, width: int) -> int:
    """One field of a packed stream, in plain Python (cheap for the few per-segment fields)."""
    first, last = offset >> 3, (offset + width + 7) >> 3
    chunk = int.from_bytes(packed[first:last].tobytes(), "big")
    return (chunk >> ((last << 3) - offset - width)) & ((1 << width) - 1)


def _floor_log2(x: np.ndarray) -> np.ndarray:
    """Exact ``floor(log2(x))`` of int64 values in ``[1, 2**62]``."""
    n = (x.astype(np.float64).view(np.int64) >> 52) - 1023  # the float64 exponent field
    if x.size and int(x.max()) > 2**53:
        # Only above 2**53 can the float conversion round x up, to the next power of
        # two (never down past one): then 2**n > x, and n is one too large.
        n -= np.left_shift(np.int64(1), n) > x
    return n


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
            if next_cost >= cost:  # a tie stops here: the r reached first is kept (not always the smaller)
                break
            r, cost = r + step, next_cost
    return r


def _encode_rice(
    indices: np.ndarray, numel: int, gaps: np.ndarray | None = None, r: int | None = None
) -> tuple[np.ndarray, int, int]:
    """Plain Rice stream; ``gaps`` and ``r`` (:func:`_choose_rice_bits`) when the caller has them already."""
    nnz = indices.size
    if nnz == 0:
        return np.zeros(0, np.uint8), 0, 0
    if gaps is None:
        gaps = np.diff(indices, prepend=np.int64(-1)) - 1
    if r is None:
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
    # The running sums can wrap around int64 only for numel >= 2**61: _decode_positions_from's order check
    # (a comparison, which cannot wrap) refuses that.
    return np.cumsum(gaps + 1) - 1


# ----------------------------------------------------------------- layout-aware code
def segments_of(layout) -> tuple[int, ...]:
    """The segments of a :class:`~fl_sparse.flat.FlatLayout`: each flat array's entry count, in flat order.

    Both sides hold the layout (the server sends it with every dense sync), so
    these are what :func:`encode`/:func:`decode` take as ``segments``. The
    exact (pass-through) arrays are not in the flat vector and not segments.
    """
    return tuple(math.prod(shape) for shape in layout.shapes)


def _segment_lengths(segments: Sequence[int], numel: int) -> np.ndarray:
    """The caller's segment lengths as int64 (``ValueError``/``TypeError`` unless they tile ``[0, numel)``).

    Read-only; the checked lengths of a tuple (what :func:`segments_of` gives, the same
    on every message) are kept, so a client's encode does not check them again.
    """
    key = (segments, numel) if type(segments) is tuple and all(type(n) is int for n in segments) else None
    if key is not None:
        known = _SEGMENT_LENGTHS.get(key)
        if known is not None:
            return known
    lengths = _checked_segment_lengths(segments, numel)
    lengths.flags.writeable = False
    if key is not None:
        if len(_SEGMENT_LENGTHS) >= 64:
            _SEGMENT_LENGTHS.clear()
        _SEGMENT_LENGTHS[key] = lengths
    return lengths


_SEGMENT_LENGTHS: dict[tuple, np.ndarray] = {}


def _checked_segment_lengths(segments: Sequence[int], numel: int) -> np.ndarray:
    if isinstance(segments, (str, bytes, Mapping)) or not hasattr(segments, "__len__"):
        raise TypeError(f"segments must be a sequence of segment lengths, got {type(segments).__name__}")
    lengths = []
    for n in segments:
        if isinstance(n, (bool, np.bool_)):
            raise TypeError("segment lengths must be ints, got a bool")
        try:
            lengths.append(operator.index(n))
        except TypeError:  # floats and other non-integers: numpy's message would not say what was wrong
            raise TypeError(f"segment lengths must be ints, got {type(n).__name__} {n!r}") from None
    if not 1 <= len(lengths) <= MAX_SEGMENTS:
        raise ValueError(f"segments must hold 1 to {MAX_SEGMENTS} lengths, got {len(lengths)}")
    if min(lengths) < 0 or sum(lengths) != numel:
        raise ValueError(f"segment lengths must be non-negative and sum to numel={numel}, got sum {sum(lengths)}")
    return np.asarray(lengths, dtype=np.int64)


def _segments_fingerprint(lengths: np.ndarray) -> int:
    """Header parameter of the segmented code: ``S * 2**32 + CRC-32`` of the S lengths (int64 LE)."""
    return (int(lengths.size) << 32) | zlib.crc32(lengths.astype("<i8").tobytes())


def _count_range(remaining: int, length: int, after: int) -> tuple[int, int, int]:
    """``(lo, hi, order)`` for a segment's count ``k_s``, from what both sides know before it.

    ``remaining`` = m_s positions not yet placed, ``length`` = L_s, ``after``
    = A_s entries in later segments. ``k_s`` lies in ``[max(0, m_s - A_s),
    min(L_s, m_s)]`` and is sent as ``k_s - lo`` in the exp-Golomb code of
    order ``max(0, floor(log2(mu_s)) - 1)``, where ``mu_s = m_s L_s /
    (L_s + A_s)`` is its expectation were the remaining positions uniform
    (exact integer arithmetic: both sides must agree).
    """
    lo, hi = max(0, remaining - after), min(length, remaining)
    expected = remaining * length // (length + after) if length else 0
    return lo, hi, max(0, expected.bit_length() - 2)


def _count_fields(counts: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """The count section as fields ``(offsets, values, widths)`` and its length in bits.

    A count with ``lo == hi`` is implied and costs nothing (e.g. every count
    after the last position, or the last segment's). Otherwise the code is
    ``n`` '0's then ``v + 2**o`` in ``n + 1 + o`` bits (``v = k_s - lo``): one
    field, after the '0's.
    """
    offsets, values, widths = [], [], []
    cursor, remaining, after = 0, int(counts.sum()), int(lengths.sum())
    for count, length in zip(counts.tolist(), lengths.tolist()):  # tens to hundreds of segments
        after -= length
        lo, hi, order = _count_range(remaining, length, after)
        if hi > lo:
            field = count - lo + (1 << order)
            zeros = field.bit_length() - 1 - order
            offsets.append(cursor + zeros)
            values.append(field)
            widths.append(field.bit_length())
            cursor += zeros + field.bit_length()
        remaining -= count
    as_array = lambda x: np.array(x, dtype=np.int64)  # noqa: E731
    return as_array(offsets), as_array(values), as_array(widths), cursor


def _exp_golomb_stream_bits(gaps: np.ndarray, r: int) -> int:
    """``sum(r + 2 n + 1)`` with ``n = floor(log2((g >> r) + 1))``."""
    return gaps.size * (r + 1) + 2 * int(_floor_log2((gaps >> r) + 1).sum())


def _choose_exp_golomb_bits(gaps: np.ndarray, max_r: int, start: int) -> tuple[int, int]:
    """(r, stream bits): a local minimum of the exp-Golomb length, descending from ``start``."""
    r, cost = start, _exp_golomb_stream_bits(gaps, start)
    for step in (-1, 1):
        while 0 <= r + step <= max_r:
            next_cost = _exp_golomb_stream_bits(gaps, r + step)
            if next_cost >= cost:
                break
            r, cost = r + step, next_cost
    return r, cost


@dataclass(frozen=True)
class _SegmentedPlan:
    """What the segmented code sends for one support, and its exact length."""

    counts: np.ndarray  # positions per segment
    coded: np.ndarray  # the segments sent explicitly: 0 < count < length
    gaps: np.ndarray  # per position of a coded segment: distance to the previous one of its segment (or its start)
    gap_codes: np.ndarray  # GAP_RICE / GAP_EXP_GOLOMB per coded segment
    params: np.ndarray  # r per coded segment
    count_fields: tuple[np.ndarray, np.ndarray, np.ndarray, int]  # see _count_fields
    nbits: int


# Up to this many (position, r) pairs, every useful r of every coded segment is tried at once: a few
# numpy calls in all, where a small model's message would otherwise pay numpy's per-call overhead a
# few times per segment and per r. Above it, a descent per segment.
_ALL_R_AT_ONCE = 1 << 17


def _gap_code_costs(gaps: np.ndarray, firsts: np.ndarray, counts: np.ndarray, max_r: np.ndarray):
    """Rice and exp-Golomb stream lengths of every coded segment for r = 0 .. max(max_r).

    Returns two (r x segments) int64 arrays; entries with r above a segment's ``max_r`` are huge.
    """
    shifts = np.arange(int(max_r.max()) + 1, dtype=np.int64)[:, None]
    quotients = gaps[None, :] >> shifts  # one row per r: sums along rows are contiguous
    fixed = (shifts + 1) * counts[None, :]  # remainder bits and the '1' of every code
    rice = fixed + np.add.reduceat(quotients, firsts, axis=1)
    quotients += 1
    exp_golomb = fixed + 2 * np.add.reduceat(_floor_log2(quotients), firsts, axis=1)
    too_large = shifts > max_r[None, :]
    rice[too_large] = exp_golomb[too_large] = np.iinfo(np.int64).max
    return rice, exp_golomb


def _plan_segmented(indices: np.ndarray, lengths: np.ndarray) -> _SegmentedPlan:
    """Counts, per-segment gap codes and parameters minimising each segment's exact length.

    Where few enough, all r in ``[0, min(max_r, r0 + 2)]`` are tried, ``r0 =
    floor(log2(mean gap))``; that range holds both codes' optimum. Rice: with
    ``S = sum(g >> r)`` in ``(sum(g)/2**r - k, sum(g)/2**r]``, the length
    ``k (r + 1) + S`` cannot be smallest below ``r0 - 1`` or above ``r0 + 2``.
    exp-Golomb: going from ``r`` to ``r + 1`` costs ``k`` bits and saves at
    most 2 bits per gap ``>= 2**r``, of which there are fewer than ``k / 2``
    (Markov) once ``r >= r0 + 2``.

    (Written for few numpy calls: on a small model, a message's codec time is
    mostly numpy's per-call overhead.)
    """
    seg_ends = np.cumsum(lengths)
    counts = np.searchsorted(indices, seg_ends)
    counts[1:] -= counts[:-1].copy()
    count_list, length_list = counts.tolist(), lengths.tolist()
    count_fields = _count_fields(counts, lengths)
    coded = [s for s, (k, n) in enumerate(zip(count_list, length_list)) if 0 < k < n]
    coded_counts = counts[coded]
    max_r = [max(0, length_list[s].bit_length() - 1) for s in coded]
    nbits = count_fields[3] + sum(1 + r.bit_length() for r in max_r)
    # Gaps of the positions of coded segments, restarting at each segment's start.
    gaps = np.empty(indices.size, dtype=np.int64)
    if indices.size:
        gaps[0] = indices[0]
        np.subtract(indices[1:], indices[:-1], out=gaps[1:])
        gaps[1:] -= 1
    entry_starts = np.cumsum(counts) - counts
    nonempty = counts > 0
    firsts = entry_starts[nonempty]
    gaps[firsts] = indices[firsts] - (seg_ends - lengths)[nonempty]
    if len(coded) < int(nonempty.sum()):  # drop the positions of full segments: they are not sent
        gaps = gaps[np.repeat(np.isin(np.arange(lengths.size), coded), counts)]
    coded_firsts = np.cumsum(coded_counts) - coded_counts
    max_r = np.asarray(max_r, dtype=np.int64)
    if not coded:
        empty = np.zeros(0, dtype=np.int64)
        return _SegmentedPlan(counts, np.asarray(coded, dtype=np.int64), gaps, empty, empty, count_fields, nbits)
    mean_gaps = np.add.reduceat(gaps, coded_firsts) // coded_counts
    useful_r = np.minimum(max_r, _floor_log2(np.maximum(mean_gaps, 1)) + 2)
    if gaps.size * (int(useful_r.max()) + 1) <= _ALL_R_AT_ONCE:
        rice, exp_golomb = _gap_code_costs(gaps, coded_firsts, coded_counts, useful_r)
        r_rice, r_exp_golomb = rice.argmin(axis=0), exp_golomb.argmin(axis=0)  # ties: the smaller r
        rice_bits, exp_golomb_bits = rice.min(axis=0), exp_golomb.min(axis=0)
        use_exp_golomb = exp_golomb_bits < rice_bits
        gap_codes = use_exp_golomb.astype(np.int64)  # GAP_RICE = 0, GAP_EXP_GOLOMB = 1
        params = np.where(use_exp_golomb, r_exp_golomb, r_rice)
        nbits += int(np.minimum(rice_bits, exp_golomb_bits).sum())
    else:
        gap_codes = np.zeros(len(coded), dtype=np.int64)
        params = np.zeros(len(coded), dtype=np.int64)
        # One pass per coded segment (tens to hundreds), each vectorised over its positions.
        for j, (first, count) in enumerate(zip(coded_firsts.tolist(), coded_counts.tolist())):
            g = gaps[first : first + count]
            r_rice = _choose_rice_bits(g, length_list[coded[j]])
            rice_bits = _rice_stream_bits(g, r_rice)
            r_eg, eg_bits = _choose_exp_golomb_bits(g, int(max_r[j]), r_rice)
            if eg_bits < rice_bits:
                gap_codes[j], params[j], nbits = GAP_EXP_GOLOMB, r_eg, nbits + eg_bits
            else:
                gap_codes[j], params[j], nbits = GAP_RICE, r_rice, nbits + rice_bits
    return _SegmentedPlan(counts, np.asarray(coded, dtype=np.int64), gaps, gap_codes, params, count_fields, nbits)


# Below this many positions, the sections are written by one _or_fields call on concatenated
# arrays (fewer numpy calls); above it, one call per section (fewer large temporaries).
_ONE_WRITE = 1 << 14


def _encode_segmented(plan: _SegmentedPlan, lengths: np.ndarray) -> tuple[np.ndarray, int]:
    """The packed stream of ``plan``: five sections, in the order :func:`_decode_segmented` reads them."""
    coded_counts = plan.counts[plan.coded]
    count_offsets, count_values, count_widths, count_bits = plan.count_fields
    # Section 2, per coded segment: the gap code (1 bit), then r in bitlen(max r) bits.
    segment_values, segment_widths = [], []
    for code, r, length in zip(plan.gap_codes.tolist(), plan.params.tolist(), lengths[plan.coded].tolist()):
        segment_values += [code, r]
        segment_widths += [1, max(0, length.bit_length() - 1).bit_length()]
    segment_widths = np.asarray(segment_widths, dtype=np.int64)
    segment_offsets = np.cumsum(segment_widths)
    segment_offsets += count_bits
    segment_offsets -= segment_widths
    # Sections 3-5, per sent position (those of empty and full segments are not sent).
    gaps = plan.gaps
    r = np.repeat(plan.params, coded_counts)
    quotients = gaps >> r
    has_exp_golomb = GAP_EXP_GOLOMB in plan.gap_codes
    if has_exp_golomb:
        exp_golomb = np.repeat(plan.gap_codes == GAP_EXP_GOLOMB, coded_counts)
        prefix = np.where(exp_golomb, _floor_log2(quotients + 1), quotients)  # the '0's before each '1'
        mantissa_widths = np.where(exp_golomb, prefix, 0)
    else:
        prefix = quotients
    remainder_start = count_bits + int(segment_widths.sum())
    remainder_offsets = np.cumsum(r)
    unary_start = int(remainder_offsets[-1]) + remainder_start if r.size else remainder_start
    remainder_offsets += remainder_start
    remainder_offsets -= r
    unary_ones = np.cumsum(prefix)
    unary_ones += np.arange(unary_start, unary_start + gaps.size)  # the j-th '1' follows j earlier codes
    mantissa_start = unary_start + (int(unary_ones[-1]) - unary_start + 1 if gaps.size else 0)
    nbits = mantissa_start + (int(mantissa_widths.sum()) if has_exp_golomb else 0)
    assert nbits == plan.nbits, (nbits, plan.nbits)
    sections = [
        (count_offsets, count_values, count_widths),
        (segment_offsets, np.asarray(segment_values, dtype=np.int64), segment_widths),
        (remainder_offsets, gaps & ((np.int64(1) << r) - 1), r),
        (unary_ones, np.ones(gaps.size, dtype=np.int64), np.ones(gaps.size, dtype=np.int64)),
    ]
    if has_exp_golomb:
        mantissa_offsets = np.cumsum(mantissa_widths)
        mantissa_offsets += mantissa_start
        mantissa_offsets -= mantissa_widths
        # q + 1 without its leading '1'
        sections.append((mantissa_offsets, quotients + 1 - (np.int64(1) << mantissa_widths), mantissa_widths))
    words = _new_words(nbits)
    if gaps.size <= _ONE_WRITE:
        sections = [tuple(np.concatenate(parts) for parts in zip(*sections))]
    for offsets, values, widths in sections:
        _or_fields(words, offsets, values, widths)
    return _words_to_bytes(words, nbits), nbits


def _decode_segmented(packed: np.ndarray, bits: np.ndarray, nnz: int, lengths: np.ndarray) -> np.ndarray:
    """Positions from a segmented stream; every field is range-checked before it sizes anything.

    ``packed`` is the stream, ``bits`` the same unpacked (its ``nbits`` meaningful bits).
    """
    nbits, cursor = bits.size, 0

    def truncated(section: str) -> PayloadError:
        return PayloadError(f"segmented position stream of {nbits} bits is truncated in the {section}")

    # 1. Counts: each code depends on the counts before it, so this loop is sequential (over
    #    the receiver's own segments, never over anything the sender sized).
    counts = np.zeros(lengths.size, dtype=np.int64)
    remaining, after = nnz, int(lengths.sum())
    for s, length in enumerate(lengths.tolist()):
        after -= length
        lo, hi, order = _count_range(remaining, length, after)
        count = lo
        if hi > lo:
            # The longest valid code: n '0's before v + 2**o with v <= hi - lo.
            longest = (hi - lo + (1 << order)).bit_length()
            window = min(longest, nbits - cursor)
            head = _read_field(packed, cursor, window)
            if head == 0:
                if window < longest:
                    raise truncated("segment counts")
                raise PayloadError(f"segment {s}'s count code is longer than any count up to {hi} can be")
            zeros = window - head.bit_length()
            width = zeros + 1 + order
            if cursor + zeros + width > nbits:
                raise truncated("segment counts")
            count = lo + _read_field(packed, cursor + zeros, width) - (1 << order)
            cursor += zeros + width
            if count > hi:
                raise PayloadError(
                    f"segment {s} declares {count} positions, more than the {hi} that fit "
                    f"(segment length {length}, {remaining} of nnz={nnz} positions left)"
                )
        counts[s] = count
        remaining -= count
    # (lo and hi keep sum(counts) == nnz and every count <= its segment's length.)

    # 2. Gap code and r of every segment sent explicitly (a Python loop over coded segments).
    length_list = lengths.tolist()
    coded_list = [s for s, (k, n) in enumerate(zip(counts.tolist(), length_list)) if 0 < k < n]
    gap_code_list, param_list = [], []
    for s in coded_list:
        max_r = max(0, length_list[s].bit_length() - 1)
        width = max_r.bit_length()
        if cursor + 1 + width > nbits:
            raise truncated("per-segment gap-code parameters")
        field = _read_field(packed, cursor, 1 + width)
        cursor += 1 + width
        gap_code, r = field >> width, field & ((1 << width) - 1)
        if r > max_r:
            raise PayloadError(f"segment {s}: gap-code parameter r={r} outside [0, {max_r}]")
        gap_code_list.append(gap_code)
        param_list.append(r)
    coded = np.asarray(coded_list, dtype=np.int64)
    params = np.asarray(param_list, dtype=np.int64)

    # 3. Remainders, 4. unary parts (Rice quotients, exp-Golomb prefixes), 5. exp-Golomb mantissas.
    #    (In-place arithmetic where it is safe: fresh large temporaries are slow on a busy machine.)
    coded_counts = counts[coded]
    total = int(coded_counts.sum())
    r = np.repeat(params, coded_counts)
    remainder_bits = int((coded_counts * params).sum())
    if cursor + remainder_bits > nbits:
        raise truncated("remainders")
    words = _stream_words(packed)
    field_offsets = np.cumsum(r)
    field_offsets += cursor
    field_offsets -= r
    steps = _read_fields(words, field_offsets, r)  # the remainders, for now
    cursor += remainder_bits
    ones = np.flatnonzero(bits[cursor:])
    if ones.size < total:
        raise PayloadError(f"segmented position stream holds {ones.size} gap codes, the segment counts need {total}")
    quotients = ones[:total].copy()  # the '0's before each '1': a Rice quotient or an exp-Golomb prefix length
    if total:
        cursor += int(quotients[-1]) + 1
        quotients[1:] -= ones[: total - 1]
        quotients[1:] -= 1
    # Every gap lies inside its segment (g <= L - 1): bound each quotient before any shift.
    max_quotient = np.repeat((lengths[coded] - 1) >> params, coded_counts)
    if GAP_EXP_GOLOMB in gap_code_list:
        exp_golomb = np.repeat(np.asarray(gap_code_list) == GAP_EXP_GOLOMB, coded_counts)
        max_prefix = np.where(exp_golomb, _floor_log2(max_quotient + 1), max_quotient)
        if (quotients > max_prefix).any():
            raise PayloadError("segmented position stream encodes a gap beyond the end of its segment")
        mantissa_widths = np.where(exp_golomb, quotients, 0)
        mantissa_bits = int(mantissa_widths.sum())
        if nbits - cursor != mantissa_bits:
            raise PayloadError(
                f"segmented position stream has {nbits - cursor} bits after the unary codes, "
                f"its exp-Golomb codes need {mantissa_bits}"
            )
        field_offsets = np.cumsum(mantissa_widths)
        field_offsets += cursor
        field_offsets -= mantissa_widths
        mantissas = _read_fields(words, field_offsets, mantissa_widths)
        quotients = np.where(exp_golomb, (np.int64(1) << mantissa_widths) + mantissas - 1, quotients)
    elif nbits != cursor:
        raise PayloadError(f"segmented position stream has {nbits - cursor} bits after its last gap code")
    if (quotients > max_quotient).any():
        raise PayloadError("segmented position stream encodes a gap beyond the end of its segment")
    quotients <<= r
    steps += quotients
    steps += 1  # gap + 1, in [1, 2 L): each < 2**63

    # Positions within each coded segment: running sums of the steps, restarted per segment.
    ends = np.cumsum(steps)
    if total and total * int(lengths.max()) >= 2**62 and not (ends[1:] > ends[:-1]).all():
        # Only a hostile stream gets here: with every step < 2**63, an int64 wrap-around shows as a
        # decrease (compared, not subtracted: np.diff would wrap around too and read as an increase).
        raise PayloadError("segmented position stream encodes positions beyond the end of their segments")
    firsts = np.cumsum(coded_counts) - coded_counts
    lasts = firsts + coded_counts - 1
    seg_starts = np.cumsum(lengths) - lengths
    before = ends[firsts] - steps[firsts]  # the running sum before each coded segment
    overrun = np.flatnonzero(ends[lasts] - before > lengths[coded])
    if overrun.size:
        s = int(coded[overrun[0]])
        raise PayloadError(f"segment {s}'s positions run past its end ({int(lengths[s])} entries)")
    positions = ends
    positions += np.repeat(seg_starts[coded] - before - 1, coded_counts)
    full = np.flatnonzero((counts == lengths) & (counts > 0))
    if full.size == 0:
        return positions
    # Full segments send nothing: every entry is present.
    parts, taken = [], 0
    for s in np.flatnonzero(counts).tolist():
        if counts[s] == lengths[s]:
            parts.append(np.arange(seg_starts[s], seg_starts[s] + lengths[s], dtype=np.int64))
        else:
            parts.append(positions[taken : taken + counts[s]])
            taken += int(counts[s])
    return np.concatenate(parts)


def _position_bits_bounds(pcode: int, param: int, nnz: int, numel: int) -> tuple[int, int]:
    """Inclusive [min, max] of a valid position stream's bit length."""
    if pcode == PCODE_RAW:
        return nnz * param, nnz * param
    if nnz == 0:
        return 0, 0
    if pcode == PCODE_SEGMENTED:
        # Full segments cost nothing, so any length down to 0 is possible. At most: S count
        # codes of <= 2 bitlen(2 nnz) bits, 1 + 6 bits per coded segment (<= min(S, nnz) of
        # them), per position <= 62 remainder + 62 prefix + 1 + 62 mantissa bits, and the
        # Rice quotients' '0's, <= sum over segments of L_s >> r_s <= numel.
        segments = param >> 32
        return 0, 2 * segments * (nnz.bit_length() + 1) + 7 * min(segments, nnz) + 187 * nnz + numel
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
    elif pcode == PCODE_SEGMENTED:
        if not 1 <= param >> 32 <= MAX_SEGMENTS:
            raise PayloadError(f"segmented positions: segment count {param >> 32} outside [1, {MAX_SEGMENTS}]")
    else:
        raise PayloadError(f"unknown position code id {pcode}")


# ----------------------------------------------------------------- array I/O
@functools.lru_cache(maxsize=64)
def _little_endian(dtype: np.dtype) -> tuple[np.dtype, str]:
    """(little-endian dtype, its name): ``dtype.name`` alone costs ~3 us a call."""
    le = dtype.newbyteorder("<")
    assert le.name in _WIRE_DTYPES, dtype
    return le, le.name


def _wire_array(a: np.ndarray) -> Array:
    """A 1-D numpy array as an :class:`Array` holding its raw little-endian bytes."""
    le, name = _little_endian(a.dtype)
    a = np.ascontiguousarray(a.ravel(), dtype=le)
    return wire_array(name, (int(a.size),), STYPE, a.tobytes())


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
    if indices.device.type == "cpu" and indices.dtype == torch.int64 and not indices.requires_grad:
        idx = indices.numpy()  # each skipped torch call is ~15 us on a client's cold message path
    else:
        idx = indices.detach().to("cpu", torch.int64).numpy()
    if idx.size:
        if idx[0] < 0 or idx[-1] >= numel or (idx.size > 1 and not (idx[1:] > idx[:-1]).all()):
            raise ValueError(f"indices must be strictly increasing and within [0, {numel})")
    return idx


def _position_arrays(
    idx: np.ndarray, numel: int, positions: str, lengths: np.ndarray | None
) -> tuple[np.ndarray, int, int, int]:
    """(positions array, code id, parameter, meaningful bits).

    ``"rice"`` with segment ``lengths`` sends the segmented code when its
    stream is strictly shorter than plain Rice's, plain Rice otherwise.
    """
    pcode = _position_code(positions)
    gaps = r = None
    if pcode == PCODE_RICE and lengths is not None and idx.size:
        gaps = np.diff(idx, prepend=np.int64(-1)) - 1
        r = _choose_rice_bits(gaps, numel)  # kept: plain Rice below needs the same r, not a second descent
        plain_bits = _rice_stream_bits(gaps, r)
        plan = _plan_segmented(idx, lengths)
        if plan.nbits < plain_bits:
            packed, nbits = _encode_segmented(plan, lengths)
            return packed, PCODE_SEGMENTED, _segments_fingerprint(lengths), nbits
    if pcode == PCODE_RAW:
        width = _raw_width(numel)
        return idx.astype("<i4" if width == 32 else "<i8"), pcode, width, width * idx.size
    if pcode == PCODE_BLOCK:
        packed, b, nbits = _encode_block(idx, numel)
        return packed, pcode, b, nbits
    packed, r, nbits = _encode_rice(idx, numel, gaps, r)
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
        return {"values": (v32 if v32.device.type == "cpu" else v32.cpu()).numpy()}  # _wire_array copies it
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
    return array_record({"header": _wire_array(header), **{key: _wire_array(value) for key, value in arrays.items()}})


def encode(
    sparse: SparseTensor, values: str = "fp32", positions: str = "raw", *, segments: Sequence[int] | None = None
) -> ArrayRecord:
    """Encode a sparse vector (positions + values) as a record.

    ``values`` is one of :data:`VALUE_CODES`, ``positions`` one of
    :data:`POSITION_CODES`. ``segments`` (lengths summing to ``numel``, e.g.
    the model's layers in flat order) lets ``"rice"`` pick the layout-aware
    segmented code when it is shorter; the receiver must then pass the same
    segments to :func:`decode`. Raises ``ValueError`` for unsorted/duplicate/
    out of range indices, NaN/Inf values, values outside the float16 range
    with ``"fp16"``, or segments that do not tile ``[0, numel)``.
    Deterministic: equal inputs give byte-identical records.
    """
    vcode = _value_code(values)
    _position_code(positions)  # reject an unknown code even when it goes unused
    idx = _indices_to_numpy(sparse.indices, sparse.numel)
    lengths = None if segments is None else _segment_lengths(segments, sparse.numel)
    value_arrays = _value_arrays(sparse.values, vcode)
    if idx.size == sparse.numel and idx.size > 0:
        # Every entry present (dense FedAvg, a full aggregate): positions are
        # implied, so none are sent -- a dense update costs what it should.
        header = _make_header(KIND_SPARSE, sparse.numel, idx.size, vcode, PCODE_NONE, 0, 0)
        return _record(header, value_arrays)
    pos, pcode, pparam, pbits = _position_arrays(idx, sparse.numel, positions, lengths)
    header = _make_header(KIND_SPARSE, sparse.numel, idx.size, vcode, pcode, pparam, pbits)
    return _record(header, {"positions": pos, **value_arrays})


def encode_positions(
    indices: torch.Tensor, numel: int, positions: str = "raw", *, segments: Sequence[int] | None = None
) -> ArrayRecord:
    """Encode a position set (sorted unique int indices in ``[0, numel)``), e.g. a vote or mask.

    ``segments`` as for :func:`encode`.
    """
    idx = _indices_to_numpy(indices, numel)
    lengths = None if segments is None else _segment_lengths(segments, numel)
    pos, pcode, pparam, pbits = _position_arrays(idx, numel, positions, lengths)
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
    lossy = _lossy(sparse.values, _value_code(values))
    return sparse if lossy is sparse.values else SparseTensor(sparse.indices, lossy, sparse.numel)


def lossy_values(x: torch.Tensor, values: str = "fp32") -> torch.Tensor:
    """What the receiver reconstructs from ``encode_values(x, values)`` (float32, x's device)."""
    return _lossy(x, _value_code(values))


# ----------------------------------------------------------------- decode side
def _check_segments(header: _Header, lengths: np.ndarray | None) -> None:
    """The receiver's segments are the ones the sender coded with (count and CRC-32 in the header)."""
    declared = header.position_param >> 32
    if lengths is None:
        raise PayloadError(
            f"positions use the segmented (layout-aware) code for {declared} segments, "
            "but the receiver passed no segments"
        )
    if declared != lengths.size:
        raise PayloadError(f"positions were coded for {declared} segments, the receiver's layout has {lengths.size}")
    if header.position_param != _segments_fingerprint(lengths):
        raise PayloadError(
            f"positions were coded for other segment lengths (checksum mismatch over {lengths.size} segments): "
            "sender and receiver disagree on the model layout"
        )


def _decode_positions_from(record: Mapping, header: _Header, lengths: np.ndarray | None = None) -> np.ndarray:
    """Validated int64 indices: strictly increasing, within [0, numel)."""
    nnz, numel, pcode, param = header.nnz, header.numel, header.position_code, header.position_param
    if pcode == PCODE_NONE:  # a full sparse payload: every position, implied
        return np.arange(numel, dtype=np.int64)
    if pcode == PCODE_SEGMENTED:
        _check_segments(header, lengths)  # before reading anything else
    if pcode == PCODE_RAW:
        raw = _read_array(record, "positions", "int32" if param == 32 else "int64", nnz)
        idx = raw.astype(np.int64)
    else:
        nbits = header.position_bits
        packed = _read_array(record, "positions", "uint8", _nbytes_for_bits(nbits))
        bits = _unpack(packed, nbits, "positions")
        if pcode == PCODE_BLOCK:
            idx = _decode_block(bits, nnz, param)
        elif pcode == PCODE_RICE:
            idx = _decode_rice(bits, nnz, param, numel)
        else:
            idx = _decode_segmented(packed, bits, nnz, lengths)
    if idx.size:
        if idx[0] < 0 or idx[-1] >= numel:
            raise PayloadError(f"positions outside [0, {numel})")
        # Compared, not subtracted: np.diff wraps around int64, so positions far outside [0, numel)
        # between in-range ends (raw int64 ones, or gap sums that wrapped) could read as increasing.
        if idx.size > 1 and not (idx[1:] > idx[:-1]).all():
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


def decode(
    record: ArrayRecord, numel: int, *, max_nnz: int | None = None, segments: Sequence[int] | None = None
) -> SparseTensor:
    """Decode and fully validate a sparse payload from :func:`encode`.

    ``numel`` is the length the receiver expects; ``max_nnz`` (default
    ``numel``) caps the declared entry count; ``segments`` are the receiver's
    segment lengths (needed for, and checked against, a segmented position
    code; unused by the others). Returns a CPU :class:`SparseTensor` (int64
    indices, float32 values) that passes :meth:`SparseTensor.validate`.
    Raises :class:`PayloadError` for any malformed record, and for a
    segmented one coded with other segments.
    """
    header = _check_header(record, KIND_SPARSE, numel, max_nnz)
    lengths = None if segments is None else _segment_lengths(segments, numel)
    idx = _decode_positions_from(record, header, lengths)
    vals = _decode_values_from(record, header)
    return SparseTensor(torch.from_numpy(idx), vals, numel)


def decode_positions(
    record: ArrayRecord, numel: int, *, max_nnz: int | None = None, segments: Sequence[int] | None = None
) -> torch.Tensor:
    """Decode a position set from :func:`encode_positions`: int64, sorted, unique, in range (CPU).

    ``max_nnz`` and ``segments`` as for :func:`decode`.
    """
    header = _check_header(record, KIND_POSITIONS, numel, max_nnz)
    lengths = None if segments is None else _segment_lengths(segments, numel)
    return torch.from_numpy(_decode_positions_from(record, header, lengths))


def decode_values(record: ArrayRecord, count: int) -> torch.Tensor:
    """Decode ``count`` finite float32 values from :func:`encode_values` (CPU)."""
    header = _check_header(record, KIND_VALUES, count, None)
    return _decode_values_from(record, header)


def decode_dense(record: ArrayRecord, numel: int) -> torch.Tensor:
    """Decode a finite float32 vector of length ``numel`` from :func:`encode_dense` (CPU)."""
    header = _check_header(record, KIND_DENSE, numel, None)
    return _decode_values_from(record, header)


def record_bytes(record: ArrayRecord) -> int:
    """``wire_size(record).total_bytes`` of a record this module just encoded, without re-checking its header."""
    return sum(len(arr.data) for arr in record.values())


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
