"""Tests written to kill mutmut survivors of ``fl_sparse/codec.py`` (docs/testing.md, "Mutation testing").

They pin what the wire format promises and the suite left open: the exact reason each malformed
record is refused (a message names the field and the bound it broke), the exact boundaries of
every range check (the largest valid value decodes, one more is refused), and exact round trips at
the edges of the position codes. Records are written by hand here, field by field, from the format
the module docstring specifies -- not with the encoder whose checks are under test.
"""

from __future__ import annotations

import math
import re
import zlib

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord

from fl_sparse.codec import (
    PayloadError,
    decode,
    decode_dense,
    decode_positions,
    decode_values,
    encode,
    encode_dense,
    encode_positions,
    encode_values,
    lossy_roundtrip,
    lossy_values,
    wire_size,
)
from fl_sparse.sparse import SparseTensor

STYPE = "fl_sparse.raw-le"
TAG = (0x464C5350 << 16) | 1
SPARSE, POSITIONS, VALUES, DENSE = 1, 2, 3, 4
V_NONE, V_FP32, V_FP16, V_Q, V_SIGN = 0, 1, 2, 3, 4
P_NONE, P_RAW, P_BLOCK, P_RICE, P_SEGMENTED = 0, 1, 2, 3, 4
_LE = {"uint8": "u1", "int32": "<i4", "int64": "<i8", "float16": "<f2", "float32": "<f4"}


# ------------------------------------------------------------------ hand-written records
def wire(dtype: str, values, *, shape=None, stype: str = STYPE, data=None) -> Array:
    """An Array of the codec's format: raw little-endian bytes of a 1-D array (any field overridable)."""
    a = np.asarray(values, dtype=_LE[dtype]).ravel()
    out = Array(dtype=dtype, shape=(a.size,), stype=stype, data=a.tobytes())
    if shape is not None:
        out.shape = shape  # set afterwards: Array() itself refuses some of the malformed shapes tested here
    if data is not None:
        out.data = data
    return out


def header(kind=POSITIONS, numel=10, nnz=2, vcode=V_NONE, vbits=0, pcode=P_RAW, pparam=32, pbits=64,
           tag=TAG) -> Array:
    return wire("int64", [tag, kind, numel, nnz, vcode, vbits, pcode, pparam, pbits])


def record(hdr: Array, **arrays: Array) -> ArrayRecord:
    out = ArrayRecord()
    for key, arr in {"header": hdr, **arrays}.items():
        out[key] = arr  # item by item: ArrayRecord(dict) would rebuild (and re-check) each Array
    return out


def raw_positions(idx, numel: int = 10) -> ArrayRecord:
    """A positions record with raw int32 indices (as sent, unchecked)."""
    return record(header(numel=numel, nnz=len(idx), pbits=32 * len(idx)), positions=wire("int32", idx))


def bits_of(text: str) -> tuple[int, Array]:
    """A position/value bit stream from a '0'/'1' string (spaces ignored), MSB first, zero padded."""
    text = text.replace(" ", "")
    packed = np.packbits(np.array([int(c) for c in text], np.uint8)) if text else np.zeros(0, np.uint8)
    return len(text), wire("uint8", packed)


def stream_positions(pcode: int, param: int, nnz: int, numel: int, text: str) -> ArrayRecord:
    nbits, arr = bits_of(text)
    return record(header(numel=numel, nnz=nnz, pcode=pcode, pparam=param, pbits=nbits), positions=arr)


def refused(reason: str, fn, *args, **kwargs) -> None:
    """``fn(*args, **kwargs)`` raises PayloadError whose message is ``reason``, or starts or ends with it."""
    with pytest.raises(PayloadError) as info:
        fn(*args, **kwargs)
    message = str(info.value)
    assert message.startswith(reason) or message.endswith(reason), (message, reason)


GOOD = raw_positions([3, 7])


def test_the_hand_written_records_are_valid():
    assert decode_positions(GOOD, 10).tolist() == [3, 7]


# ------------------------------------------------------------------ the header and its arrays
@pytest.mark.parametrize("bad,reason", [
    (object(), "expected an ArrayRecord, got object"),
    (ArrayRecord(), "record has no 'header' array"),
    ({"header": 5}, "'header' is a int, not an Array"),
    (record(wire("int64", [TAG, 2, 10, 0, 0, 0, 1, 32, 0], stype="numpy.ndarray")),
     "'header' has stype 'numpy.ndarray', expected 'fl_sparse.raw-le'"),
    (record(wire("int32", [TAG & 0x7FFFFFFF] * 18, shape=(9,))), "'header' has dtype 'int32', expected 'int64'"),
    (record(wire("int64", [TAG, 2, 10, 0, 0, 0, 1, 32])), "'header' has shape (8,), expected (9,)"),
    (record(wire("int64", [TAG, 2, 10, 0, 0, 0, 1, 32, 0], shape=(9, 1))), "'header' has shape (9, 1), expected (9,)"),
    (record(wire("int64", [TAG, 2, 10, 0, 0, 0, 1, 32, 0], shape=("9",))), "'header' has shape ('9',), expected (9,)"),
    (record(wire("int64", [TAG, 2, 10, 0, 0, 0, 1, 32, 0], shape=(9.0,))), "'header' has shape (9.0,), expected (9,)"),
    (record(wire("int64", [TAG, 2, 10, 0, 0, 0, 1, 32, 0], data=bytes(71))), "'header' holds 71 bytes, expected 72"),
    (record(wire("int64", [TAG, 2, 10, 0, 0, 0, 1, 32, 0], data=bytes(73))), "'header' holds 73 bytes, expected 72"),
    (record(header(tag=(0x464C5351 << 16) | 1)), "header magic is not 'FLSP': not an fl-sparse payload"),
    (record(header(tag=0x464C5350 << 15 | 1)), "header magic is not 'FLSP'"),
    (record(header(tag=TAG + 1)), "unsupported format version 2 (this is version 1)"),
    (record(header(tag=TAG - 1)), "unsupported format version 0 (this is version 1)"),
    (record(header(tag=TAG + 0xFFFF)), "header magic is not 'FLSP'"),  # version 0x10000: a carry into the magic
    (record(header(kind=0)), "unknown payload kind 0"),
    (record(header(kind=5)), "unknown payload kind 5"),
    (record(header(numel=-1)), "declared numel -1 outside [0, 2**62]"),
    (record(header(numel=2**62 + 1)), f"declared numel {2**62 + 1} outside [0, 2**62]"),
    (record(header(nnz=-1)), "declared nnz -1 outside [0, numel=10]"),
    (record(header(nnz=11)), "declared nnz 11 outside [0, numel=10]"),
    (record(header(vbits=1)), "header declares value bits but no value code"),
    (record(header(kind=VALUES, nnz=10, vcode=V_FP32, vbits=16, pcode=P_NONE, pparam=0, pbits=0)),
     "value code 1 must have 32 bits, header says 16"),
    (record(header(kind=VALUES, nnz=10, vcode=V_FP16, vbits=32, pcode=P_NONE, pparam=0, pbits=0)),
     "value code 2 must have 16 bits, header says 32"),
    (record(header(kind=VALUES, nnz=10, vcode=V_SIGN, vbits=2, pcode=P_NONE, pparam=0, pbits=0)),
     "value code 4 must have 1 bits, header says 2"),
    (record(header(kind=VALUES, nnz=10, vcode=V_Q, vbits=1, pcode=P_NONE, pparam=0, pbits=0)),
     "fractional quantizer bits must be in [2, 16], header says 1"),
    (record(header(kind=VALUES, nnz=10, vcode=V_Q, vbits=17, pcode=P_NONE, pparam=0, pbits=0)),
     "fractional quantizer bits must be in [2, 16], header says 17"),
    (record(header(kind=VALUES, nnz=10, vcode=5, vbits=8, pcode=P_NONE, pparam=0, pbits=0)), "unknown value code id 5"),
    (record(header(kind=VALUES, nnz=10, vcode=-1, vbits=8, pcode=P_NONE, pparam=0, pbits=0)),
     "unknown value code id -1"),
    (record(header(pcode=P_NONE, pparam=1, pbits=0)), "header declares a position parameter or bits but no position code"),
    (record(header(pcode=P_NONE, pparam=0, pbits=1)), "header declares a position parameter or bits but no position code"),
    (record(header(pparam=64)), "raw positions for numel=10 must be 32-bit, header says 64"),
    (record(header(numel=2**31, pparam=32)), f"raw positions for numel={2**31} must be 64-bit, header says 32"),
    (record(header(pcode=P_BLOCK, pparam=5, pbits=12)), "block size exponent b=5 outside [0, 4]"),
    (record(header(pcode=P_BLOCK, pparam=-1, pbits=2)), "block size exponent b=-1 outside [0, 4]"),
    (record(header(numel=8, pcode=P_BLOCK, pparam=4, pbits=10)), "block size exponent b=4 outside [0, 3]"),
    (record(header(pcode=P_RICE, pparam=4, pbits=10)), "rice parameter r=4 outside [0, 3]"),
    (record(header(pcode=P_RICE, pparam=-1, pbits=2)), "rice parameter r=-1 outside [0, 3]"),
    (record(header(numel=7, pcode=P_RICE, pparam=3, pbits=8)), "rice parameter r=3 outside [0, 2]"),
    (record(header(pcode=P_SEGMENTED, pparam=7, pbits=8)),
     "segmented positions: segment count 0 outside [1, 2147483647]"),
    (record(header(pcode=P_SEGMENTED, pparam=-(1 << 32) | 5, pbits=8)),
     "segmented positions: segment count -1 outside [1, 2147483647]"),
    (record(header(pcode=P_SEGMENTED, pparam=-(2 << 32), pbits=8)),
     "segmented positions: segment count -2 outside [1, 2147483647]"),
    (record(header(pcode=5)), "unknown position code id 5"),
    (record(header(pcode=-1)), "unknown position code id -1"),
    # exact [min, max] bit lengths of each position code
    (record(header(pbits=63)), "declared position stream of 63 bits is impossible for nnz=2 (raw, param 32: must be in [64, 64])"),
    (record(header(pbits=65)), "(raw, param 32: must be in [64, 64])"),
    (record(header(pcode=P_BLOCK, pparam=2, pbits=5)),
     "declared position stream of 5 bits is impossible for nnz=2 (block, param 2: must be in [6, 8])"),
    (record(header(pcode=P_BLOCK, pparam=2, pbits=9)), "(block, param 2: must be in [6, 8])"),
    (record(header(numel=9, pcode=P_BLOCK, pparam=1, pbits=9)), "(block, param 1: must be in [4, 8])"),
    (record(header(nnz=3, pcode=P_RICE, pparam=1, pbits=5)), "(rice, param 1: must be in [6, 9])"),
    (record(header(nnz=3, pcode=P_RICE, pparam=1, pbits=10)), "(rice, param 1: must be in [6, 9])"),
    (record(header(nnz=0, pcode=P_RICE, pparam=1, pbits=1)), "(rice, param 1: must be in [0, 0])"),
    (record(header(nnz=0, pcode=P_BLOCK, pparam=1, pbits=1)), "(block, param 1: must be in [0, 0])"),
    (record(header(nnz=0, pcode=P_SEGMENTED, pparam=(2 << 32) | 5, pbits=1)),
     f"(segmented rice, param {(2 << 32) | 5}: must be in [0, 0])"),
    # S = 2 segments, nnz = 3, numel 14: 2 S (bitlen(3) + 1) + 7 min(S, nnz) + 187 nnz + numel = 12 + 14 + 561 + 14
    (record(header(numel=14, nnz=3, pcode=P_SEGMENTED, pparam=(2 << 32) | 5, pbits=602)),
     f"(segmented rice, param {(2 << 32) | 5}: must be in [0, 601])"),
    (record(header(numel=14, nnz=5, pcode=P_SEGMENTED, pparam=(9 << 32) | 5, pbits=-1)),
     # 2 * 9 * 4 + 7 * 5 + 187 * 5 + 14
     f"(segmented rice, param {(9 << 32) | 5}: must be in [0, 1056])"),
    # a header whose fields do not fit its kind
    (record(header(kind=SPARSE)), "header fields are inconsistent with a sparse payload"),
    (record(header(kind=SPARSE, nnz=9, vcode=V_FP32, vbits=32, pcode=P_NONE, pparam=0, pbits=0)),
     "header fields are inconsistent with a sparse payload"),
    (record(header(kind=SPARSE, numel=0, nnz=0, vcode=V_FP32, vbits=32, pcode=P_NONE, pparam=0, pbits=0)),
     "header fields are inconsistent with a sparse payload"),
    (record(header(vcode=V_FP32, vbits=32)), "header fields are inconsistent with a positions payload"),
    (record(header(pcode=P_NONE, pparam=0, pbits=0)), "header fields are inconsistent with a positions payload"),
    (record(header(kind=VALUES, nnz=9, vcode=V_FP32, vbits=32, pcode=P_NONE, pparam=0, pbits=0)),
     "header fields are inconsistent with a values payload"),
    (record(header(kind=VALUES, nnz=10, vcode=V_FP32, vbits=32, pbits=320)),
     "header fields are inconsistent with a values payload"),
    (record(header(kind=VALUES, nnz=10, pbits=320)), "header fields are inconsistent with a values payload"),
    (record(header(kind=DENSE, nnz=10, vcode=V_FP16, vbits=16, pcode=P_NONE, pparam=0, pbits=0)),
     "header fields are inconsistent with a dense payload"),
    (record(header(kind=DENSE, nnz=9, vcode=V_FP32, vbits=32, pcode=P_NONE, pparam=0, pbits=0)),
     "header fields are inconsistent with a dense payload"),
    (record(header(kind=DENSE, nnz=10, vcode=V_FP32, vbits=32, pbits=320)),
     "header fields are inconsistent with a dense payload"),
    (record(header(kind=DENSE, nnz=10, pcode=P_NONE, pparam=0, pbits=0)),
     "header fields are inconsistent with a dense payload"),
    # arrays that do not match the header
    (record(header(nnz=0, pbits=0)), "record arrays do not match the header: missing ['positions'], unexpected []"),
    (record(header(), positions=wire("int32", [3, 7]), extra=wire("uint8", [])),
     "record arrays do not match the header: missing [], unexpected ['extra']"),
    (record(header(), positions=wire("int32", [3, 7]), values=wire("float32", [1, 2]), means=wire("float32", [])),
     "missing [], unexpected ['means', 'values']"),
])
def test_a_malformed_header_is_refused_with_its_reason(bad, reason):
    # wire_size parses the header the same way; both must refuse
    refused(reason, decode_positions, bad, 10)
    refused(reason, wire_size, bad)


def test_the_largest_declared_sizes_are_accepted():
    # numel = 2**62 is allowed (an empty support of it decodes), one more is not (above)
    empty = record(header(numel=2**62, nnz=0, pparam=64, pbits=0), positions=wire("int64", []))
    assert decode_positions(empty, 2**62).tolist() == []
    big = record(header(numel=2**31, nnz=2, pparam=64, pbits=128), positions=wire("int64", [0, 2**31 - 1]))
    assert decode_positions(big, 2**31).tolist() == [0, 2**31 - 1]
    refused("'positions' has dtype 'int32', expected 'int64'", decode_positions,
            record(header(numel=2**31, nnz=2, pparam=64, pbits=128), positions=wire("int32", [0, 5])), 2**31)
    # nnz == numel
    full = record(header(numel=3, nnz=3, pbits=96), positions=wire("int32", [0, 1, 2]))
    assert decode_positions(full, 3).tolist() == [0, 1, 2]
    # the largest block exponent and rice parameter for numel 10: b = 4, r = 3
    # block b = 4: offsets 3, 9 in one block -> '0011' '1001' then '1' '1'
    assert decode_positions(stream_positions(P_BLOCK, 4, 2, 10, "0011 1001 11"), 10).tolist() == [3, 9]
    # rice r = 3: gaps 3 and 5 -> remainders '011' '101', quotients '1' '1'
    assert decode_positions(stream_positions(P_RICE, 3, 2, 10, "011 101 11"), 10).tolist() == [3, 9]
    # the exact bit bounds are inclusive: block b = 2 for numel 10 and nnz 2 may take 6 to 8 bits
    assert decode_positions(stream_positions(P_BLOCK, 2, 2, 10, "01 10 11"), 10).tolist() == [1, 2]
    assert decode_positions(stream_positions(P_BLOCK, 2, 2, 10, "01 01 1001"), 10).tolist() == [1, 9]
    # rice r = 1, nnz 3, numel 10 may take 6 to 9 bits
    assert decode_positions(stream_positions(P_RICE, 1, 3, 10, "000 111"), 10).tolist() == [0, 1, 2]
    assert decode_positions(stream_positions(P_RICE, 1, 3, 10, "000 111"), 10).tolist() == [0, 1, 2]
    assert decode_positions(stream_positions(P_RICE, 1, 3, 10, "001 11 0001"), 10).tolist() == [0, 1, 9]


@pytest.mark.parametrize("fields", [dict(), dict(pcode=P_NONE, pparam=0, pbits=0, nnz=10)])
def test_value_bits_at_the_ends_of_the_fractional_range_decode(fields):
    for q in (2, 16):
        x = torch.tensor([0.5, -0.25, 1.0, 0.0])
        got = decode_values(encode_values(x, f"q{q}"), 4)
        assert got.shape == (4,) and bool(torch.isfinite(got).all())


# ------------------------------------------------------------------ what the caller passes
def test_the_callers_arguments_are_checked_before_the_record():
    for numel in (-1, 2**62 + 1, True, 10.0, "10"):
        with pytest.raises(ValueError, match=re.escape(f"numel must be an int in [0, 2**62], got {numel!r}")) as info:
            decode_positions(GOOD, numel)
        assert not isinstance(info.value, PayloadError)
    for max_nnz in (-1, 1.5, "2"):
        with pytest.raises(ValueError, match=re.escape(f"max_nnz must be a non-negative int or None, got {max_nnz!r}")):
            decode_positions(GOOD, 10, max_nnz=max_nnz)
    refused("expected a sparse payload, got a positions payload", decode, GOOD, 10)
    refused("expected a values payload, got a positions payload", decode_values, GOOD, 10)
    refused("expected a dense payload, got a positions payload", decode_dense, GOOD, 10)
    refused("expected a positions payload, got a dense payload", decode_positions, encode_dense(torch.ones(10)), 10)
    refused("payload declares numel=10, expected 11", decode_positions, GOOD, 11)
    refused("payload declares numel=10, expected 9", decode_positions, GOOD, 9)
    refused("payload declares nnz=2, more than the allowed 1", decode_positions, GOOD, 10, max_nnz=1)
    refused("payload declares nnz=2, more than the allowed 0", decode_positions, GOOD, 10, max_nnz=0)
    assert decode_positions(GOOD, 10, max_nnz=2).tolist() == [3, 7]
    assert decode_positions(GOOD, 10, max_nnz=100).tolist() == [3, 7]
    empty = record(header(nnz=0, pbits=0), positions=wire("int32", []))
    assert decode_positions(empty, 10, max_nnz=0).tolist() == []
    assert decode_positions(GOOD, 2**62 // 2**52 * 0 + 10).tolist() == [3, 7]


# ------------------------------------------------------------------ arrays other than the header
def test_every_array_is_checked_like_the_header():
    refused("'positions' is a str, not an Array", decode_positions, {"header": header(), "positions": "x"}, 10)
    refused("'positions' has stype 'x', expected 'fl_sparse.raw-le'", decode_positions,
            record(header(), positions=wire("int32", [3, 7], stype="x")), 10)
    refused("'positions' has dtype 'int64', expected 'int32'", decode_positions,
            record(header(), positions=wire("int64", [3, 7])), 10)
    refused("'positions' has shape (3,), expected (2,)", decode_positions,
            record(header(), positions=wire("int32", [3, 7, 8])), 10)
    refused("'positions' has shape (True,), expected (1,)", decode_positions,
            record(header(nnz=1, pbits=32), positions=wire("int32", [3], shape=(True,))), 10)
    refused("'positions' has shape (2, 1), expected (2,)", decode_positions,
            record(header(), positions=wire("int32", [3, 7], shape=(2, 1))), 10)
    refused("'positions' holds 12 bytes, expected 8", decode_positions,
            record(header(), positions=wire("int32", [3, 7], data=bytes(12))), 10)
    bad = wire("int32", [3, 7])
    bad.data = "abcdefgh"
    refused("'positions' data is a str, not bytes", decode_positions, record(header(), positions=bad), 10)
    # accepted forms of a valid shape and data
    ok = wire("int32", [3, 7], shape=(np.int64(2),))
    assert decode_positions(record(header(), positions=ok), 10).tolist() == [3, 7]
    listed = wire("int32", [3, 7])
    listed.shape = [2]
    assert decode_positions(record(header(), positions=listed), 10).tolist() == [3, 7]
    for data in (bytearray(np.array([3, 7], "<i4").tobytes()), memoryview(np.array([3, 7], "<i4").tobytes())):
        assert decode_positions(record(header(), positions=wire("int32", [3, 7], data=data)), 10).tolist() == [3, 7]


# ------------------------------------------------------------------ positions
def test_raw_positions_are_range_checked_at_both_ends():
    assert decode_positions(raw_positions([0, 9]), 10).tolist() == [0, 9]
    refused("positions outside [0, 10)", decode_positions, raw_positions([3, 10]), 10)
    refused("positions outside [0, 10)", decode_positions, raw_positions([-1, 3]), 10)
    refused("positions outside [0, 10)", decode_positions, raw_positions([10]), 10)
    refused("positions outside [0, 10)", decode_positions, raw_positions([-1]), 10)
    refused("positions are not strictly increasing (unsorted or duplicated)", decode_positions,
            raw_positions([3, 3]), 10)
    refused("positions are not strictly increasing (unsorted or duplicated)", decode_positions,
            raw_positions([1, 2, 8, 7]), 10)
    assert decode_positions(raw_positions([5]), 10).tolist() == [5]


def test_block_streams():
    # numel 10, b = 1: positions 1, 4 -> offsets '1' '0', structure: '1' (block 0), '0' '1' (block 2)... block of 4
    # is 2, so two '0's precede its '1': '1' '001'
    assert decode_positions(stream_positions(P_BLOCK, 1, 2, 10, "10 1001"), 10).tolist() == [1, 4]
    # header bounds for nnz 2, b 1, numel 10: [4, 8]
    refused("block stream holds 1 positions, header says 2", decode_positions,
            stream_positions(P_BLOCK, 1, 2, 10, "10 0001"), 10)
    refused("block stream holds 3 positions, header says 2", decode_positions,
            stream_positions(P_BLOCK, 1, 2, 10, "10 1011"), 10)
    refused("block stream has trailing block-end symbols after the last position", decode_positions,
            stream_positions(P_BLOCK, 1, 2, 10, "10 10010"), 10)
    refused("block stream has trailing block-end symbols", decode_positions,
            stream_positions(P_BLOCK, 1, 2, 10, "10 1100"), 10)
    # b = 0: every position its own block; offsets take no bits
    assert decode_positions(stream_positions(P_BLOCK, 0, 2, 10, "01 0001"), 10).tolist() == [1, 4]
    # a block past the end: b = 1, numel 10, position (4 << 1) | 1 = 9 is fine, block 5 is not reachable (bounds)
    assert decode_positions(stream_positions(P_BLOCK, 1, 1, 10, "1 00001"), 10).tolist() == [9]


def test_rice_streams():
    # numel 10, r = 1: positions 1, 4 -> gaps 1, 2 -> remainders '1' '0', quotients '1' '01'
    assert decode_positions(stream_positions(P_RICE, 1, 2, 10, "10 101"), 10).tolist() == [1, 4]
    refused("rice stream holds 1 gaps, header says 2", decode_positions,
            stream_positions(P_RICE, 1, 2, 10, "10 001"), 10)
    refused("rice stream holds 3 gaps, header says 2", decode_positions,
            stream_positions(P_RICE, 1, 2, 10, "10 111"), 10)
    refused("rice stream has trailing bits after the last gap", decode_positions,
            stream_positions(P_RICE, 1, 2, 10, "10 1010"), 10)
    # r = 3, nnz 1 (bounds [4, 5]): gap 9 (remainder 1, quotient 1) is position 9; gap 10 is past the end
    assert decode_positions(stream_positions(P_RICE, 3, 1, 10, "001 01"), 10).tolist() == [9]
    refused("rice stream encodes a gap beyond the vector length", decode_positions,
            stream_positions(P_RICE, 3, 1, 10, "010 01"), 10)
    refused("rice stream encodes a gap beyond the vector length", decode_positions,
            stream_positions(P_RICE, 3, 1, 10, "111 01"), 10)
    # two gaps, the second one too long on its own: 0, then 10 (r = 3: '000' '010', '1' '01')
    refused("rice stream encodes a gap beyond the vector length", decode_positions,
            stream_positions(P_RICE, 3, 2, 10, "000 010 101"), 10)
    # r = 0: gaps are the unary parts alone
    assert decode_positions(stream_positions(P_RICE, 0, 3, 10, "1 1 0000001"), 10).tolist() == [0, 1, 8]


def test_non_zero_padding_is_refused_wherever_it_is():
    # 10 meaningful bits in 2 bytes: 6 padding bits, each must be zero
    good = "10 101" + "0000"  # r = 1, positions 1, 4 then 4 bits after... use nbits from the header instead
    nbits, arr = bits_of("10101")
    base = np.frombuffer(arr.data, np.uint8).copy()
    for bit in range(8 - nbits):  # the 3 padding bits of the one byte
        bad = base.copy()
        bad[-1] |= 1 << bit
        rec = record(header(nnz=2, pcode=P_RICE, pparam=1, pbits=nbits), positions=wire("uint8", bad))
        refused("positions: non-zero padding bits after the last meaningful bit", decode_positions, rec, 10)
    assert good
    # values: 3 q2 codes = 6 bits, 2 padding bits
    means = wire("float32", [0.5, 1.0])
    for pad in (1, 2):
        rec = record(header(kind=VALUES, numel=3, nnz=3, vcode=V_Q, vbits=2, pcode=P_NONE, pparam=0, pbits=0),
                     values=wire("uint8", [0b00011000 | pad]), means=means)
        refused("values: non-zero padding bits after the last meaningful bit", decode_values, rec, 3)
    # a whole byte of stream: no padding to check, every bit meaningful (the last one set)
    rec = stream_positions(P_BLOCK, 2, 2, 10, "01 01 1001")
    assert decode_positions(rec, 10).tolist() == [1, 9]


# ------------------------------------------------------------------ values
def values_record(vcode, vbits, count, values: Array, **side: Array) -> ArrayRecord:
    return record(header(kind=VALUES, numel=count, nnz=count, vcode=vcode, vbits=vbits, pcode=P_NONE, pparam=0,
                         pbits=0), values=values, **side)


def test_value_arrays_are_checked():
    for bad in (np.nan, np.inf, -np.inf):
        refused("values contain NaN or Inf", decode_values, values_record(V_FP32, 32, 2, wire("float32", [1, bad])), 2)
        refused("values contain NaN or Inf", decode_values, values_record(V_FP16, 16, 2, wire("float16", [bad, 1])), 2)
    refused("'values' has dtype 'float32', expected 'float16'", decode_values,
            values_record(V_FP16, 16, 2, wire("float32", [1, 2])), 2)
    refused("'values' has dtype 'float16', expected 'float32'", decode_values,
            values_record(V_FP32, 32, 2, wire("float16", [1, 2])), 2)
    assert decode_values(values_record(V_FP16, 16, 2, wire("float16", [1.5, -2])), 2).tolist() == [1.5, -2.0]
    assert decode_values(values_record(V_FP32, 32, 2, wire("float32", [1.5, -2])), 2).tolist() == [1.5, -2.0]
    # q2: 3 codes in 6 bits -> 1 byte; means: 2**(q-1) = 2 floats
    q2 = lambda means, data=0b00011000: values_record(V_Q, 2, 3, wire("uint8", [data]),  # noqa: E731
                                                      means=wire("float32", means))
    for side in ([np.nan, 1.0], [np.inf, 1.0], [-1e-30, 1.0], [0.5, -np.inf]):
        refused("'means' must be finite and non-negative", decode_values, q2(side), 3)
    refused("'means' has shape (3,), expected (2,)", decode_values, q2([0.5, 1.0, 2.0]), 3)
    refused("'values' has shape (2,), expected (1,)", decode_values,
            values_record(V_Q, 2, 3, wire("uint8", [0, 0]), means=wire("float32", [0.5, 1.0])), 3)
    zero = decode_values(q2([0.0, 0.0], 0b00011000), 3)
    assert zero.abs().tolist() == [0.0, 0.0, 0.0]
    # sign: 1 bit per value, 'scale' one float; a zero scale is valid (all values 0)
    sign = lambda scale, data=0b10100000: values_record(V_SIGN, 1, 3, wire("uint8", [data]),  # noqa: E731
                                                        scale=wire("float32", [scale]))
    assert decode_values(sign(2.0), 3).tolist() == [-2.0, 2.0, -2.0]
    assert decode_values(sign(0.0), 3).abs().tolist() == [0.0, 0.0, 0.0]
    for bad in (np.nan, np.inf, -1.0):
        refused("'scale' must be finite and non-negative", decode_values, sign(bad), 3)
    refused("'scale' has shape (2,), expected (1,)", decode_values,
            values_record(V_SIGN, 1, 3, wire("uint8", [0]), scale=wire("float32", [1.0, 1.0])), 3)


def test_sparse_and_dense_records_decode_exactly():
    sp = SparseTensor(torch.tensor([1, 4, 9]), torch.tensor([0.5, -2.0, 3.0]), 10)
    for values, positions in (("fp32", "raw"), ("fp16", "block"), ("fp32", "rice")):
        got = decode(encode(sp, values, positions), 10)
        assert got.indices.tolist() == [1, 4, 9] and got.values.tolist() == [0.5, -2.0, 3.0]
    full = SparseTensor(torch.arange(4), torch.tensor([1.0, 2.0, 3.0, 4.0]), 4)
    got = decode(encode(full, "fp32", "rice"), 4)
    assert got.indices.tolist() == [0, 1, 2, 3] and got.values.tolist() == [1.0, 2.0, 3.0, 4.0]
    assert decode_dense(encode_dense(torch.tensor([1.0, -1.0])), 2).tolist() == [1.0, -1.0]
    assert decode_positions(encode_positions(torch.tensor([0, 9]), 10, "raw"), 10).tolist() == [0, 9]


def test_position_code_parameters_at_their_limits():
    # raw: int32 up to numel = 2**31 - 1 inclusive, int64 above
    top = 2**31 - 1
    rec = record(header(numel=top, nnz=1, pparam=32, pbits=32), positions=wire("int32", [top - 1]))
    assert decode_positions(rec, top).tolist() == [top - 1]
    refused(f"raw positions for numel={top} must be 32-bit, header says 64", decode_positions,
            record(header(numel=top, nnz=1, pparam=64, pbits=64), positions=wire("int64", [top - 1])), top)
    assert encode_positions(torch.tensor([top - 1]), top)["positions"].dtype == "int32"
    assert encode_positions(torch.tensor([top]), top + 1)["positions"].dtype == "int64"
    # block: b <= bitlen(numel - 1): 4 for numel 9 (one block of 16 covers it), 0 for numel 1
    assert decode_positions(stream_positions(P_BLOCK, 4, 1, 9, "1000 1"), 9).tolist() == [8]
    assert decode_positions(stream_positions(P_BLOCK, 0, 1, 1, "1"), 1).tolist() == [0]
    refused("block size exponent b=1 outside [0, 0]", decode_positions, stream_positions(P_BLOCK, 1, 1, 1, "01"), 1)
    # rice: r <= bitlen(numel) - 1: 3 for numel 8, 0 for numel 1
    assert decode_positions(stream_positions(P_RICE, 3, 1, 8, "111 1"), 8).tolist() == [7]
    assert decode_positions(stream_positions(P_RICE, 0, 1, 1, "1"), 1).tolist() == [0]
    refused("rice parameter r=1 outside [0, 0]", decode_positions, stream_positions(P_RICE, 1, 1, 1, "01"), 1)


# ------------------------------------------------------------------ the segmented ("rice with layers") code
def segmented(segments: list[int], nnz: int, text: str) -> ArrayRecord:
    """A positions record with a hand-written segmented stream (header parameter: S << 32 | CRC-32, by spec)."""
    param = (len(segments) << 32) | zlib.crc32(np.asarray(segments, dtype="<i8").tobytes())
    return stream_positions(P_SEGMENTED, param, nnz, sum(segments), text)


def decode_segmented(segments: list[int], nnz: int, text: str) -> list[int]:
    return decode_positions(segmented(segments, nnz, text), sum(segments), segments=segments).tolist()


def refused_segmented(reason: str, segments: list[int], nnz: int, text: str) -> None:
    refused(reason, decode_positions, segmented(segments, nnz, text), sum(segments), segments=segments)


# Segments [4, 10], nnz 3, positions 1, 3 | 10 (as in tests/test_codec_segmented.py):
# count of segment 0 in [0, 3], order 0: 2 -> '011' (segment 1's is implied); segment 0: Rice, r = 0 ('0' '00');
# segment 1: Rice, r = 3 ('0' '11'); remainders: '110' (segment 1's gap 6); unary: '01' '01' (gaps 1, 1) '1' (6 >> 3).
OK = "011 000 011 110 01 01 1"
# The same with segment 0 in exp-Golomb, r = 0: gap 1 -> q + 1 = 2: prefix '01', mantissa '0'.
OK_EG = "011 100 011 110 01 01 1 0 0"


def test_segmented_streams_decode_exactly():
    assert decode_segmented([4, 10], 3, OK) == [1, 3, 10]
    assert decode_segmented([4, 10], 3, OK_EG) == [1, 3, 10]
    # nnz 2, segment 0 holds 1 (count in [0, 2], v = 1 -> '010'): its largest gap, 3 (position 3), is valid
    # in Rice (quotient 3 = '0001') and in exp-Golomb (q + 1 = 4: prefix '001', mantissa '00')
    assert decode_segmented([4, 10], 2, "010 000 011 110 0001 1") == [3, 10]
    assert decode_segmented([4, 10], 2, "010 100 011 110 001 1 00") == [3, 10]
    assert decode_segmented([4, 10], 2, "010 110 011 11 110 1 1") == [3, 10]  # exp-Golomb at r = 2, prefix 0
    # segment 1 full (10 of 10) and segment 0 empty: nothing but the count; segment 0 full, segment 1 empty
    assert decode_segmented([4, 10], 10, "1") == list(range(4, 14))
    assert decode_segmented([4, 10], 4, "00101") == [0, 1, 2, 3]
    # an exp-Golomb segment and a full one after it: [2, 3], nnz 4: segment 0 holds 1 or 2
    # (lo = 1, hi = 2, order 0): 1 -> v = 0 -> '1'; segment 0: exp-Golomb, r = 0 ('1' '0'); gap 1: '01' '0'
    assert decode_segmented([2, 3], 4, "1 10 01 0") == [1, 2, 3, 4]


def test_a_malformed_segmented_stream_is_refused_with_its_reason():
    cases = [
        # count section: cut inside the leading '0's, cut inside the field, and a code longer than any count
        ("segmented position stream of 2 bits is truncated in the segment counts", [4, 10], 3, "00"),
        ("segmented position stream of 2 bits is truncated in the segment counts", [4, 10], 3, "01"),
        ("segment 0's count code is longer than any count up to 3 can be", [4, 10], 3, "0001 000 011 110 01 01 1"),
        # the longest valid count code bounds how many leading '0's are read: [2, 10], nnz 2: k_0 in [0, 2],
        # order 0, at most one '0' ('011' = 2); [2, 3], nnz 4: k_0 in [1, 2], at most one '0' ('010' = 2)
        ("segment 0's count code is longer than any count up to 2 can be", [2, 10], 2, "001 0000"),
        ("segment 0's count code is longer than any count up to 2 can be", [2, 3], 4, "001 10 01 0"),
        # [10, 7], nnz 7: k_0 in [0, 7], order 1 (7 * 10 // 17 = 4): at most two '0's; three '0's and a '1'
        # are read as a field too large for any count
        ("segment 0 declares 14 positions, more than the 7 that fit (segment length 10, 7 of nnz=7 positions left)",
         [10, 7], 7, "0001 0000 00"),
        ("segment 0 declares 4 positions, more than the 3 that fit (segment length 4, 3 of nnz=3 positions left)",
         [4, 10], 3, "00101"),
        ("segment 0 declares 3 positions, more than the 2 that fit (segment length 2, 3 of nnz=3 positions left)",
         [2, 2], 3, "011"),
        # per-segment gap code and r
        ("segmented position stream of 5 bits is truncated in the per-segment gap-code parameters", [4, 10], 3,
         "011 00"),
        ("segmented position stream of 8 bits is truncated in the per-segment gap-code parameters", [4, 10], 3,
         "011 000 01"),
        ("segment 0: gap-code parameter r=3 outside [0, 2]", [4, 10], 3, "011 011 011 110 01 01 1"),
        # remainders, unary codes, mantissas
        ("segmented position stream of 11 bits is truncated in the remainders", [4, 10], 3, "011 000 011 11"),
        ("segmented position stream of 9 bits is truncated in the remainders", [4, 10], 3, "011 000 011"),
        ("segmented position stream holds 2 gap codes, the segment counts need 3", [4, 10], 3, "011 000 011 110 01 01"),
        ("segmented position stream holds 0 gap codes, the segment counts need 3", [4, 10], 3, "011 000 011 110 00"),
        ("segmented position stream has 1 bits after its last gap code", [4, 10], 3, OK + "0"),
        ("segmented position stream has 2 bits after its last gap code", [4, 10], 3, OK + "00"),
        ("segmented position stream has 3 bits after the unary codes, its exp-Golomb codes need 2", [4, 10], 3,
         OK_EG + "0"),
        ("segmented position stream has 1 bits after the unary codes, its exp-Golomb codes need 2", [4, 10], 3,
         OK_EG[:-2]),
        # gaps past the segment: Rice quotient 4 > 3; exp-Golomb prefix 3 > 2; prefix 2 with a mantissa past 3
        ("segmented position stream encodes a gap beyond the end of its segment", [4, 10], 2, "010 000 011 110 00001 1"),
        ("segmented position stream encodes a gap beyond the end of its segment", [4, 10], 2,
         "010 100 011 110 0001 1 000"),
        ("segmented position stream encodes a gap beyond the end of its segment", [4, 10], 2,
         "010 100 011 110 001 1 01"),
        # the prefix is bounded before the mantissas are counted: prefix 3 and no mantissa bits at all
        ("segmented position stream encodes a gap beyond the end of its segment", [4, 10], 2, "010 100 011 110 0001 1"),
        # segment 0 in exp-Golomb at r = 2: its quotients are 0 ((4 - 1) >> 2), so its prefix must be 0
        ("segmented position stream encodes a gap beyond the end of its segment", [4, 10], 2,
         "010 110 011 11 110 01 1"),
        # segment 1 at r = 3: quotients above (10 - 1) >> 3 = 1 are past its end (Rice 2; exp-Golomb prefix 2)
        ("segmented position stream encodes a gap beyond the end of its segment", [4, 10], 3,
         "011 000 011 110 01 01 001"),
        ("segmented position stream encodes a gap beyond the end of its segment", [4, 10], 3,
         "011 000 111 110 01 01 001 00"),
        # ... and prefix 1 with mantissa 1: q = 2
        ("segmented position stream encodes a gap beyond the end of its segment", [4, 10], 3,
         "011 000 111 110 01 01 01 1"),
        # each gap fits, their sum does not
        ("segment 0's positions run past its end (4 entries)", [4, 10], 3, "011 000 011 110 01 001 1"),
        # segment 0 holds 1 (v = 1: '010'), segment 1 two: gaps 5 and 5 from its start, position 11 of 10
        ("segment 1's positions run past its end (10 entries)", [4, 10], 3, "010 000 000 1 000001 000001"),
    ]
    for reason, segments, nnz, text in cases:
        refused_segmented(reason, segments, nnz, text)


# Found by the mutation run of codec.py: the running sums of the gaps are int64 and can wrap around for a
# vector of 2**61 or more entries, and the order checks used np.diff, which wraps too (every difference
# read as a positive step): the decoders returned positions outside [0, numel). They now compare.


def test_rice_positions_that_wrap_around_int64_are_refused():
    # plain Rice, numel 2**62, nnz 3, r = 62: three gaps of 2**62 - 1 (remainder 62 ones, quotient 0).
    numel, r = 2**62, 62
    rec = stream_positions(P_RICE, r, 3, numel, "1" * r * 3 + "111")
    with pytest.raises(PayloadError):
        got = decode_positions(rec, numel).tolist()
        raise AssertionError(f"decoded to {got}")


def test_segmented_positions_that_wrap_around_int64_are_refused():
    # One segment of 2**62 entries, nnz 3 (its count is implied), Rice with r = 61 ('0' '111101': r in 6 bits),
    # three gaps of 2**62 - 1 (remainder 61 ones, quotient 1): their running sum passes 2**63.
    segments = [2**62]
    rec = segmented(segments, 3, "0 111101" + "1" * 183 + "01" * 3)
    with pytest.raises(PayloadError):
        got = decode_positions(rec, 2**62, segments=segments).tolist()
        raise AssertionError(f"decoded to {got}")


def test_raw_int64_positions_outside_the_vector_between_in_range_ends_are_refused():
    # First and last in range, the middle ones far outside; every np.diff step wraps to a positive number.
    numel = 2**31
    idx = [0, 7 * 10**18, -(2**63) + 20, 10]
    rec = record(header(numel=numel, nnz=4, pparam=64, pbits=256), positions=wire("int64", idx))
    refused("positions are not strictly increasing (unsorted or duplicated)", decode_positions, rec, numel)


def test_gaps_of_a_huge_segment_decode():
    # one gap of 2**62 - 1 in a segment of 2**62: the last entry; two of them: refused (the second is past
    # the end; today through the final range check, after a wrap-around -- refused by the order check)
    assert decode_segmented([2**62], 1, "0 111101" + "1" * 61 + "01") == [2**62 - 1]
    assert decode_segmented([2**62], 2, "0 000000 1 1") == [0, 1]  # r = 0, two gaps of 0
    # count 0 in segment 0 ('1'), the 3 positions in segment 1: 2**61 + 0, 1, 2
    assert decode_segmented([2**61, 2**61], 3, "1 0 000000 1 1 1") == [2**61, 2**61 + 1, 2**61 + 2]
    with pytest.raises(PayloadError):
        decode_positions(segmented([2**62], 2, "0 111101" + "1" * 122 + "0101"), 2**62, segments=[2**62])


def test_segmented_records_need_the_senders_segments():
    rec = segmented([4, 10], 3, OK)
    refused("positions use the segmented (layout-aware) code for 2 segments, but the receiver passed no segments",
            decode_positions, rec, 14)
    refused("positions were coded for 2 segments, the receiver's layout has 3", decode_positions, rec, 14,
            segments=[4, 10, 0])
    refused("positions were coded for other segment lengths (checksum mismatch over 2 segments): "
            "sender and receiver disagree on the model layout", decode_positions, rec, 14, segments=[5, 9])
    # the largest segment count the header can carry is accepted as a count (and then compared)
    big = stream_positions(P_SEGMENTED, (2**31 - 1) << 32, 1, 14, "1")
    refused("positions were coded for 2147483647 segments, the receiver's layout has 2", decode_positions, big, 14,
            segments=[4, 10])
    # a sparse record decodes its segmented positions the same way
    sparse = record(header(kind=SPARSE, numel=14, nnz=3, vcode=V_FP32, vbits=32, pcode=P_SEGMENTED,
                           pparam=segmented([4, 10], 3, OK)["header"] and
                           (2 << 32) | zlib.crc32(np.asarray([4, 10], "<i8").tobytes()), pbits=17),
                    positions=bits_of(OK)[1], values=wire("float32", [1, 2, 3]))
    got = decode(sparse, 14, segments=[4, 10])
    assert got.indices.tolist() == [1, 3, 10] and got.values.tolist() == [1.0, 2.0, 3.0]
    refused("but the receiver passed no segments", decode, sparse, 14)


def test_the_callers_segments_are_checked_with_their_reason():
    sp = SparseTensor(torch.tensor([0, 5]), torch.ones(2), 10)
    cases = [
        ("46", TypeError, "segments must be a sequence of segment lengths, got str"),
        (b"46", TypeError, "segments must be a sequence of segment lengths, got bytes"),
        ({4: 6}, TypeError, "segments must be a sequence of segment lengths, got dict"),
        (10, TypeError, "segments must be a sequence of segment lengths, got int"),
        ((n for n in (4, 6)), TypeError, "segments must be a sequence of segment lengths, got generator"),
        ([True, 9], TypeError, "segment lengths must be ints, got a bool"),
        ([np.bool_(True), 9], TypeError, "segment lengths must be ints, got a bool"),
        ([], ValueError, "segments must hold 1 to 2147483647 lengths, got 0"),
        ([4, 5], ValueError, "segment lengths must be non-negative and sum to numel=10, got sum 9"),
        ([-1, 11], ValueError, "segment lengths must be non-negative and sum to numel=10, got sum 10"),
        ([4, 7], ValueError, "segment lengths must be non-negative and sum to numel=10, got sum 11"),
    ]
    for segments, error, reason in cases:
        for call in (lambda: encode(sp, positions="rice", segments=segments),
                     lambda: encode_positions(sp.indices, 10, "rice", segments=segments),
                     lambda: decode_positions(GOOD, 10, segments=segments),
                     lambda: decode(encode(sp), 10, segments=segments)):
            with pytest.raises(error) as info:
                call()
            assert not isinstance(info.value, PayloadError)
            assert str(info.value).startswith(reason) or str(info.value).endswith(reason), (str(info.value), reason)
    # empty segments are allowed; a list, a tuple, numpy ints: the same
    for segments in ([0, 10, 0], (0, 10, 0), [np.int64(0), np.int32(10), 0], (10,)):
        assert decode_positions(GOOD, 10, segments=segments).tolist() == [3, 7]


@pytest.mark.parametrize("segments", [[6, 7, 10], [7, 7, 1]])
def test_a_count_code_that_ends_the_stream_on_a_byte_boundary_decodes(segments):
    # segment 0 full, 1 empty, 2 full: only counts are sent, 8 bits, and the last count code is shorter than
    # the longest one its range allows: reading must stop at the end of the stream
    numel = sum(segments)
    idx = np.concatenate([np.arange(segments[0]), np.arange(segments[0] + segments[1], numel)])
    rec = encode_positions(torch.from_numpy(idx), numel, "rice", segments=segments)
    assert wire_size(rec).position_bits == 8
    assert decode_positions(rec, numel, segments=segments).tolist() == idx.tolist()


def test_exp_golomb_prefixes_are_bounded_exactly_in_segments_beyond_2_to_the_53():
    # One segment, one position (its count implied), exp-Golomb at r = 0 ('1' '000000': r in 6 bits here):
    # the longest prefix is floor(log2(L)), computed exactly where float64 rounds L - 1 + 1.
    head = "1 000000"
    # L = 2**54 - 1: prefix at most 53; 54 is refused before its 54 mantissa bits are looked for
    refused_segmented("segmented position stream encodes a gap beyond the end of its segment", [2**54 - 1], 1,
                      head + "0" * 54 + "1")
    assert decode_segmented([2**54 - 1], 1, head + "0001" + "000") == [7]
    assert decode_segmented([2**54 - 1], 1, head + "0" * 53 + "1" + "1" * 53) == [2**54 - 2]
    # L = 2**54 and L = 2**54 + 1: prefix 54 (q + 1 = 2**54) is valid, the gap 2**54 - 1
    for length in (2**54, 2**54 + 1):
        assert decode_segmented([length], 1, head + "0" * 54 + "1" + "0" * 54) == [2**54 - 1]


def test_only_exactly_checked_segments_are_remembered():
    sp = SparseTensor(torch.tensor([0, 5]), torch.ones(2), 10)
    assert decode(encode(sp, positions="rice", segments=(np.int64(4), np.int64(6))), 10, segments=[4, 6]).nnz == 2
    assert decode(encode(sp, positions="rice", segments=(np.int64(1), np.int64(9))), 10, segments=[1, 9]).nnz == 2
    # equal to those tuples, but not lengths
    for segments in ((4.0, 6.0), (True, 9)):
        with pytest.raises(TypeError):
            encode(sp, positions="rice", segments=segments)
        with pytest.raises(TypeError):
            decode_positions(GOOD, 10, segments=segments)


def test_wire_size_checks_every_array_holds_bytes():
    bad = wire("int32", [3, 7])
    bad.data = "abcdefgh"
    refused("'positions' is not an Array holding bytes", wire_size, record(header(), positions=bad))
    refused("'positions' is not an Array holding bytes", wire_size, {"header": header(), "positions": 5})
    size = wire_size(GOOD)
    assert (size.header_bytes, size.position_bytes, size.value_bytes, size.total_bytes) == (72, 8, 0, 80)
    assert (size.position_bits, size.value_bits) == (64, 0)


# ------------------------------------------------------------------ the encoder (docs/testing.md: the encoder-side run)
def positions_stream(rec: ArrayRecord) -> tuple[list[int], bytes]:
    """Header fields 6-8 (position code, parameter, bits) and the positions array's bytes."""
    fields = np.frombuffer(rec["header"].data, dtype="<i8").tolist()
    return fields[6:], bytes(rec["positions"].data)


def test_a_full_support_of_one_entry_sends_no_positions():
    # nnz == numel == 1: positions implied (code 0), one fp32 value
    hdr = header(kind=SPARSE, numel=1, nnz=1, vcode=V_FP32, vbits=32, pcode=P_NONE, pparam=0, pbits=0)
    out = decode(record(hdr, values=wire("float32", [2.5])), 1)
    assert out.indices.tolist() == [0] and out.values.tolist() == [2.5]
    rec = encode(SparseTensor(torch.tensor([0]), torch.tensor([2.5]), 1), positions="rice")
    assert np.frombuffer(rec["header"].data, dtype="<i8").tolist() == [TAG, SPARSE, 1, 1, V_FP32, 32, P_NONE, 0, 0]


def test_an_exp_golomb_mantissa_beyond_2_to_the_53_is_written_exactly():
    # One segment of 2**62 (count implied), a far first position then 50 adjacent ones: gaps i0, 0 x 50.
    # Exp-Golomb at r = 0 (each further r costs 51 bits, saves at most 2): i0 + 1 = 2**60 + m, prefix 60
    # '0's and '1', mantissa m in 60 bits; the gaps 0 are a '1' each. Side: '1' and r in bitlen(62) = 6 bits.
    # 178 bits, where plain Rice needs about 51 * 55 bits: the segmented code is sent.
    i0 = 2**60 + 2**59 + 12345
    idx = torch.arange(i0, i0 + 51)
    text = "1 000000" + "0" * 60 + "1" + "1" * 50 + format(i0 + 1 - 2**60, "060b")
    nbits, arr = bits_of(text)
    rec = encode_positions(idx, 2**62, "rice", segments=[2**62])
    param = (1 << 32) | zlib.crc32(np.asarray([2**62], dtype="<i8").tobytes())
    assert positions_stream(rec) == ([P_SEGMENTED, param, 178], bytes(arr.data))
    assert nbits == 178
    assert torch.equal(decode_positions(rec, 2**62, segments=[2**62]), idx)


def count_code_bits(segments: list[int], counts: list[int]) -> int:
    """Length of the count section, from the format: k_s - lo in exp-Golomb of order o_s unless lo == hi."""
    bits, remaining, after = 0, sum(counts), sum(segments)
    for length, count in zip(segments, counts):
        after -= length
        lo, hi = max(0, remaining - after), min(length, remaining)
        mu = remaining * length // (length + after) if length else 0
        order = max(0, math.floor(math.log2(mu)) - 1) if mu else 0
        if hi > lo:
            n = (count - lo + 2**order).bit_length() - 1 - order
            bits += n + 1 + order + n
        remaining -= count
    return bits


def best_gap_code_bits(gaps: np.ndarray, length: int) -> int:
    """The shortest Rice or exp-Golomb stream of a segment's gaps, over every r in [0, floor(log2 L)]."""
    costs = []
    for r in range(length.bit_length()):
        q = gaps >> r
        costs.append(gaps.size * (r + 1) + int(q.sum()))  # Rice: r bits, q '0's, '1'
        costs.append(gaps.size * (r + 1) + 2 * sum(int(v).bit_length() - 1 for v in q + 1))  # exp-Golomb
    return min(costs)


def test_large_supports_take_each_segments_shortest_code():
    # Above 2**17 (position, r) pairs the encoder descends per segment instead of trying every r: the stream
    # must still be the shortest. Segments: clustered positions, gaps 1 or 2 between rare far jumps (exp-Golomb
    # at r = 1 wins, five below the Rice r), a full one, uniform positions (Rice wins), clustered positions
    # with gaps 0 to 2 (exp-Golomb at r = 0), an empty one.
    # (The exp-Golomb length need not be unimodal in r -- gaps 0..3 give 24162, 24262, 24210 bits at r = 0, 1,
    # 2 -- where the descent may stop above the shortest; these gaps are not such a case.)
    rng = np.random.default_rng(5)
    segments = [2**20, 64, 2**20, 2**20, 100]

    def clustered(steps: list[int]) -> np.ndarray:
        starts = np.sort(rng.choice(2**20 - 5000, 8, replace=False))
        return np.unique(np.concatenate([s + np.cumsum(rng.choice(steps, 1000)) for s in starts]))

    parts = [clustered([2, 2, 2, 3]), np.arange(64), np.sort(rng.choice(2**20, 10_000, replace=False)),
             clustered([1, 2, 3]), np.zeros(0, dtype=np.int64)]
    offsets = np.cumsum(segments) - segments
    idx = np.concatenate([part + offset for part, offset in zip(parts, offsets)])
    expected = count_code_bits(segments, [part.size for part in parts])
    for part, length in zip(parts, segments):
        if 0 < part.size < length:
            gaps = np.diff(part, prepend=-1) - 1
            expected += 1 + (length.bit_length() - 1).bit_length() + best_gap_code_bits(gaps, length)
    numel = sum(segments)
    rec = encode_positions(torch.from_numpy(idx), numel, "rice", segments=segments)
    (pcode, _, nbits), _ = positions_stream(rec)
    assert (pcode, nbits) == (P_SEGMENTED, expected)
    assert np.array_equal(decode_positions(rec, numel, segments=segments).numpy(), idx)


def test_block_and_rice_encoders_write_the_streams_of_the_format():
    # block, numel 64, positions 3 17 18 40 63: the paper's b is 4 (5 * 2**4 >= 64), 5 * 5 + (63 >> 4) = 28 bits;
    # b = 3 costs 5 * 4 + (63 >> 3) = 27 and is sent. Offsets 011 001 010 000 111; blocks 0 2 2 5 7, so the
    # j-th '1' sits at j + block: 0 3 4 8 11 of 12 structure symbols.
    rec = encode_positions(torch.tensor([3, 17, 18, 40, 63]), 64, "block")
    nbits, arr = bits_of("011 001 010 000 111" + "100110001001")
    assert positions_stream(rec) == ([P_BLOCK, 3, nbits], bytes(arr.data)) and nbits == 27
    # numel 64 = 4 * 2**4 exactly: the paper's b is 4 (4 * 5 + (30 >> 4) = 21 bits), b = 3 costs 4 * 4 + 3 = 19.
    # Offsets 101 110 001 110, blocks 0 0 2 3: '1's at 0 1 4 6.
    rec = encode_positions(torch.tensor([5, 6, 17, 30]), 64, "block")
    nbits, arr = bits_of("101 110 001 110" + "1100101")
    assert positions_stream(rec) == ([P_BLOCK, 3, nbits], bytes(arr.data)) and nbits == 19
    # b - 1 is never longer than the paper's b; at equal length (here 4 * 5 + 3 = 4 * 4 + 7 = 23) b is kept.
    # Offsets 0000 0100 1000 1111, blocks 0 1 2 3: '1's at 0 2 4 6.
    rec = encode_positions(torch.tensor([0, 20, 40, 63]), 64, "block")
    nbits, arr = bits_of("0000 0100 1000 1111" + "1010101")
    assert positions_stream(rec) == ([P_BLOCK, 4, nbits], bytes(arr.data)) and nbits == 23
    # rice, numel 16, positions 1 5 6 14: gaps 1 3 0 7; r = 0, 1, 2, 3 cost 15, 12, 13, 16 bits: r = 1.
    # Remainders 1 1 0 1, quotients 0 1 0 3 in unary.
    rec = encode_positions(torch.tensor([1, 5, 6, 14]), 16, "rice")
    nbits, arr = bits_of("1101" + "1 01 1 0001")
    assert positions_stream(rec) == ([P_RICE, 1, nbits], bytes(arr.data)) and nbits == 12
    # The descent from floor(log2(mean gap)) goes both ways. Gaps 1 1 3 (positions 1 3 7 of 8): mean 5/3,
    # r = 0, 1, 2 cost 8, 7, 9: r = 1, remainders 1 1 1, quotients 0 0 1.
    rec = encode_positions(torch.tensor([1, 3, 7]), 8, "rice")
    nbits, arr = bits_of("111" + "1 1 01")
    assert positions_stream(rec) == ([P_RICE, 1, nbits], bytes(arr.data)) and nbits == 7
    # Gaps 2 3 19 (positions 2 6 26 of 32): mean 8, r = 1, 2, 3 cost 17, 13, 14: r = 2, remainders 10 11 11,
    # quotients 0 0 4.
    rec = encode_positions(torch.tensor([2, 6, 26]), 32, "rice")
    nbits, arr = bits_of("10 11 11" + "1 1 00001")
    assert positions_stream(rec) == ([P_RICE, 2, nbits], bytes(arr.data)) and nbits == 13
    # raw: int32 little-endian, 32 bits each
    rec = encode_positions(torch.tensor([1, 5]), 16, "raw")
    assert positions_stream(rec) == ([P_RAW, 32, 64], np.array([1, 5], "<i4").tobytes())


def test_value_encoders_defaults_dtypes_and_messages():
    x = torch.tensor([0.5, -2.0, 65504.0])
    sp = SparseTensor(torch.tensor([1, 4, 9]), x, 10)
    # the default value code is fp32: exact, and nothing but the values changes
    out = lossy_roundtrip(sp)
    assert out.indices is sp.indices and out.values.tolist() == [0.5, -2.0, 65504.0]
    assert lossy_values(x).tolist() == [0.5, -2.0, 65504.0]
    # fp16: what the receiver reconstructs is float32 (65504 is float16's largest finite value)
    for got in (lossy_values(x, "fp16"), lossy_roundtrip(sp, "fp16").values):
        assert got.dtype == torch.float32 and got.tolist() == [0.5, -2.0, 65504.0]
    message = r"^values exceed the float16 range \(\|v\| >= 65520\); use 'fp32' or a quantizer$"
    with pytest.raises(ValueError, match=message):
        encode_values(torch.tensor([65520.0]), "fp16")
    with pytest.raises(ValueError, match=message):
        lossy_values(torch.tensor([-7e4]), "fp16")
    # encode_values' default is fp32 too
    rec = encode_values(x)
    assert np.frombuffer(rec["header"].data, dtype="<i8").tolist() == [TAG, VALUES, 3, 3, V_FP32, 32, P_NONE, 0, 0]
    assert bytes(rec["values"].data) == np.array([0.5, -2.0, 65504.0], "<f4").tobytes()


def test_an_empty_vector_sends_its_empty_positions():
    # numel 0, nnz 0: not a "full support" (that needs nnz > 0): raw positions, 32-bit, 0 bits
    rec = encode(SparseTensor(torch.zeros(0, dtype=torch.int64), torch.zeros(0), 0))
    assert np.frombuffer(rec["header"].data, dtype="<i8").tolist() == [TAG, SPARSE, 0, 0, V_FP32, 32, P_RAW, 32, 0]
    out = decode(rec, 0)
    assert out.indices.tolist() == [] and out.values.tolist() == []


def test_encode_positions_checks_its_arguments_with_their_reason():
    def rejected(message: str, indices, numel) -> None:
        with pytest.raises(ValueError) as info:
            encode_positions(indices, numel)
        assert str(info.value) == message

    for numel in (True, 2.0, -1, 2**62 + 1):
        rejected(f"numel must be an int in [0, 2**62], got {numel!r}", torch.tensor([0]), numel)
    rejected("indices must be a 1-D integer tensor, got torch.bool (2,)", torch.tensor([True, False]), 3)
    rejected("indices must be a 1-D integer tensor, got torch.int64 (1, 2)", torch.tensor([[0, 1]]), 3)
    rejected("indices must be a 1-D integer tensor, got torch.float32 (1,)", torch.tensor([0.0]), 3)
    # a decrease after the first step, still above the first index
    rejected("indices must be strictly increasing and within [0, 10)", torch.tensor([1, 5, 3]), 10)
    # the ends of numel's range, and indices of another integer dtype
    assert positions_stream(encode_positions(torch.zeros(0, dtype=torch.int64), 0)) == ([P_RAW, 32, 0], b"")
    rec = encode_positions(torch.tensor([2**62 - 1]), 2**62)
    assert positions_stream(rec) == ([P_RAW, 64, 64], np.array([2**62 - 1], "<i8").tobytes())
    # (gaps 1 3: r = 0, 1, 2 cost 6, 5, 6; remainders 1 1, quotients 0 1)
    rec = encode_positions(torch.tensor([1, 5], dtype=torch.int32), 16, "rice")
    assert positions_stream(rec) == ([P_RICE, 1, 5], bytes(bits_of("11" + "1 01")[1].data))


def test_the_segmented_code_is_sent_only_when_strictly_shorter():
    # numel 15 as one segment, positions 0 1 14 (gaps 0 0 12). Plain Rice: r = 1, 2, 3 cost 12, 12, 13 (the
    # descent from floor(log2(4)) = 2 keeps 2): remainders 00 00 00, quotients 0 0 3. Segmented: the count is
    # implied, '1' and r in bitlen(3) = 2 bits, exp-Golomb at r = 0: '1' '1' and 13 = '0001' '101': 12 bits too.
    rec = encode_positions(torch.tensor([0, 1, 14]), 15, "rice", segments=[15])
    nbits, arr = bits_of("00 00 00" + "1 1 0001")
    assert positions_stream(rec) == ([P_RICE, 2, nbits], bytes(arr.data)) and nbits == 12
