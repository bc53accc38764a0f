"""The wire format (fl_sparse.codec): round trips, sizes, and hostile input."""

from __future__ import annotations

import math
import tracemalloc

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fl_sparse.codec import (
    POSITION_CODES,
    VALUE_CODES,
    PayloadError,
    WireSize,
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
from fl_sparse.quantize import FractionalQuantizer, ScaledSign
from fl_sparse.sparse import SparseTensor

ALL_COMBOS = [(v, p) for v in VALUE_CODES for p in POSITION_CODES]
FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ------------------------------------------------------------------ helpers
def make_sparse(numel: int, nnz: int, seed: int, *, ends: bool = False, zeros: bool = False,
                log_scale: float = 0.0) -> SparseTensor:
    """Random support of size nnz (optionally forcing 0 and numel-1 in), Gaussian values."""
    rng = np.random.default_rng(seed)
    if ends and nnz >= 2:
        inner = rng.choice(numel - 2, size=nnz - 2, replace=False) + 1
        idx = np.concatenate([[0, numel - 1], inner])
    else:
        idx = rng.choice(numel, size=nnz, replace=False)
    idx = np.sort(idx).astype(np.int64)
    vals = rng.standard_normal(idx.size) * 10.0 ** log_scale
    vals = np.clip(vals, -6e4, 6e4)  # stay inside the float16 range
    if zeros and idx.size:
        vals[rng.random(idx.size) < 0.2] = 0.0
    return SparseTensor(torch.from_numpy(idx), torch.from_numpy(vals.astype(np.float32)), numel)


@st.composite
def sparse_tensors(draw, max_numel: int = 100_000) -> SparseTensor:
    numel = draw(st.one_of(st.integers(1, 40), st.integers(1, max_numel)))
    nnz = draw(st.one_of(st.just(0), st.just(numel), st.integers(0, numel), st.integers(0, min(numel, 30))))
    return make_sparse(
        numel, nnz, draw(st.integers(0, 2**32 - 1)),
        ends=draw(st.booleans()), zeros=draw(st.booleans()), log_scale=draw(st.floats(-6, 4)),
    )


def expected_values(values: torch.Tensor, code: str) -> torch.Tensor:
    """What the receiver must reconstruct, computed without the codec."""
    v = values.to(torch.float32)
    if code == "fp32":
        return v
    if code == "fp16":
        return v.to(torch.float16).to(torch.float32)
    if code == "sign":
        return ScaledSign()(v)
    return FractionalQuantizer(int(code[1:]))(v)


def side_len(code: str) -> int:
    if code.startswith("q"):
        return 2 ** (int(code[1:]) - 1)
    return 1 if code == "sign" else 0


def bits_per_value(code: str) -> int:
    return {"fp32": 32, "fp16": 16, "sign": 1}.get(code) or int(code[1:])


def rebuilt(record: ArrayRecord, drop: tuple[str, ...] = (), **arrays: Array) -> ArrayRecord:
    out = ArrayRecord()
    for key in record.keys():
        if key not in drop:
            a = record[key]
            out[key] = Array(dtype=a.dtype, shape=tuple(a.shape), stype=a.stype, data=a.data)
    for key, a in arrays.items():
        out[key] = a
    return out


def with_array_fields(record: ArrayRecord, key: str, **fields) -> ArrayRecord:
    a = record[key]
    kw = dict(dtype=a.dtype, shape=tuple(a.shape), stype=a.stype, data=a.data) | fields
    return rebuilt(record, **{key: Array(**kw)})


def with_array_values(record: ArrayRecord, key: str, values: np.ndarray) -> ArrayRecord:
    return with_array_fields(record, key, data=values.astype(values.dtype.newbyteorder("<")).tobytes(),
                             shape=(int(values.size),))


def header_of(record: ArrayRecord) -> np.ndarray:
    return np.frombuffer(record["header"].data, dtype="<i8").copy()


def with_header(record: ArrayRecord, header: np.ndarray) -> ArrayRecord:
    return with_array_fields(record, "header", data=header.astype("<i8").tobytes())


def read_array(record: ArrayRecord, key: str) -> np.ndarray:
    a = record[key]
    return np.frombuffer(a.data, dtype=np.dtype(a.dtype).newbyteorder("<")).copy()


def decode_any(record: ArrayRecord, numel: int, kind: str, nnz: int):
    if kind == "sparse":
        return decode(record, numel)
    if kind == "positions":
        return decode_positions(record, numel)
    if kind == "values":
        return decode_values(record, nnz)
    return decode_dense(record, numel)


def assert_valid_result(result, kind: str, numel: int) -> None:
    """A decode that succeeds must return something that satisfies every invariant."""
    if kind == "sparse":
        assert isinstance(result, SparseTensor) and result.numel == numel
        result.validate()
        assert result.indices.dtype == torch.int64 and result.values.dtype == torch.float32
    elif kind == "positions":
        SparseTensor(result, torch.zeros(result.numel()), numel).validate()
    else:
        assert result.dtype == torch.float32 and bool(torch.isfinite(result).all())


def check_roundtrip(sp: SparseTensor, values: str, positions: str) -> None:
    record = encode(sp, values, positions)
    out = decode(record, sp.numel)
    out.validate()
    assert out.indices.dtype == torch.int64 and out.values.dtype == torch.float32
    assert out.device == torch.device("cpu")
    assert torch.equal(out.indices, sp.indices)
    expected = expected_values(sp.values, values)
    assert torch.equal(out.values, expected)
    assert torch.equal(out.values, lossy_roundtrip(sp, values).values)
    assert torch.equal(lossy_roundtrip(sp, values).indices, sp.indices)

    # deterministic: byte-identical on re-encoding
    again = encode(sp, values, positions)
    assert {k: (a.dtype, tuple(a.shape), a.data) for k, a in record.items()} == \
           {k: (a.dtype, tuple(a.shape), a.data) for k, a in again.items()}

    # exact sizes
    ws = wire_size(record)
    data_bytes = {k: len(a.data) for k, a in record.items()}
    assert ws.total_bytes == sum(data_bytes.values())
    assert ws.total_bytes == ws.header_bytes + ws.position_bytes + ws.value_bytes
    nnz = sp.nnz
    if nnz == sp.numel and nnz > 0:
        # every position present: implied, nothing sent for them
        assert "positions" not in record and ws.position_bytes == ws.position_bits == 0
    elif positions == "raw":
        assert ws.position_bytes == data_bytes["positions"]
        assert ws.position_bits == 32 * nnz == 8 * ws.position_bytes
    else:
        assert ws.position_bytes == data_bytes["positions"]
        assert ws.position_bytes == math.ceil(ws.position_bits / 8)
        if nnz:  # block/rice never cost more than log2(1/phi) + 2 bits per position
            assert ws.position_bits / nnz <= math.log2(sp.numel / nnz) + 2 + 1e-9
    assert ws.value_bits == bits_per_value(values) * nnz + 32 * side_len(values)
    if values in ("fp32", "fp16"):
        assert ws.value_bytes == ws.value_bits // 8
    else:
        assert ws.value_bytes == math.ceil(bits_per_value(values) * nnz / 8) + 4 * side_len(values)


# ------------------------------------------------------------------ round trips
@pytest.mark.parametrize("values,positions", ALL_COMBOS)
def test_roundtrip_edge_cases_every_combination(values, positions):
    for numel, nnz in [(1, 0), (1, 1), (2, 2), (9, 0), (9, 9), (1000, 1000), (1000, 1), (100_000, 3)]:
        for seed in (0, 1):
            check_roundtrip(make_sparse(numel, nnz, seed, ends=True, zeros=seed == 1), values, positions)
    # first and last index, alone and together
    for idx in ([0], [99], [0, 99]):
        sp = SparseTensor(torch.tensor(idx), torch.arange(1.0, len(idx) + 1), 100)
        check_roundtrip(sp, values, positions)


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sp=sparse_tensors(), values=st.sampled_from(VALUE_CODES), positions=st.sampled_from(POSITION_CODES))
def test_roundtrip_random(sp, values, positions):
    check_roundtrip(sp, values, positions)


@FAST
@given(sp=sparse_tensors(), values=st.sampled_from(VALUE_CODES), positions=st.sampled_from(POSITION_CODES))
def test_positions_values_and_dense_roundtrip(sp, values, positions):
    rec = encode_positions(sp.indices, sp.numel, positions)
    assert torch.equal(decode_positions(rec, sp.numel), sp.indices)
    assert wire_size(rec).value_bytes == 0 and wire_size(rec).value_bits == 0

    rec = encode_values(sp.values, values)
    got = decode_values(rec, sp.nnz)
    assert torch.equal(got, expected_values(sp.values, values))
    assert torch.equal(got, lossy_values(sp.values, values))
    assert wire_size(rec).position_bytes == 0

    dense = sp.to_dense()
    rec = encode_dense(dense)
    assert torch.equal(decode_dense(rec, sp.numel), dense)
    assert wire_size(rec).value_bits == 32 * sp.numel


def test_raw_positions_use_int32():
    rec = encode(make_sparse(1000, 10, 0), "fp32", "raw")
    assert rec["positions"].dtype == "int32" and len(rec["positions"].data) == 40


def test_survives_flower_serialization():
    from flwr.common.serde import array_record_from_proto, array_record_to_proto

    sp = make_sparse(5000, 77, 3)
    for values, positions in [("q4", "rice"), ("fp16", "block"), ("sign", "raw")]:
        record = array_record_from_proto(array_record_to_proto(encode(sp, values, positions)))
        out = decode(record, 5000)
        assert torch.equal(out.indices, sp.indices)
        assert torch.equal(out.values, lossy_roundtrip(sp, values).values)


# ------------------------------------------------------------------ compression
def log2_binomial(d: int, k: int) -> float:
    return (math.lgamma(d + 1) - math.lgamma(k + 1) - math.lgamma(d - k + 1)) / math.log(2)


@settings(max_examples=12, deadline=None)
@given(d=st.integers(500_000, 2_000_000), phi=st.sampled_from([1e-2, 1e-3]), seed=st.integers(0, 2**32 - 1))
def test_rice_close_to_entropy_bound_on_uniform_supports(d, phi, seed):
    k = round(phi * d)
    idx = torch.from_numpy(np.sort(np.random.default_rng(seed).choice(d, k, replace=False)))
    bits_per_position = wire_size(encode_positions(idx, d, "rice")).position_bits / k
    assert bits_per_position <= log2_binomial(d, k) / k + 0.7
    block = wire_size(encode_positions(idx, d, "block")).position_bits / k
    assert block <= math.log2(1 / phi) + 2 + 1e-9  # the paper's estimate, as a bound


def test_rice_beats_block_and_raw_at_resnet_scale():
    d, k = 11_173_962, 111_740
    x = torch.randn(d, generator=torch.Generator().manual_seed(0))
    idx = torch.topk(x.abs(), k).indices.sort().values
    sizes = {p: wire_size(encode_positions(idx, d, p)).position_bits / k for p in POSITION_CODES}
    assert sizes["rice"] < sizes["block"] < sizes["raw"] == 32
    assert sizes["rice"] <= log2_binomial(d, k) / k + 0.7


# ------------------------------------------------------------------ encoder input checks
def test_encode_rejects_bad_input():
    sp = make_sparse(100, 5, 0)
    with pytest.raises(ValueError, match="value code"):
        encode(sp, "q1")
    with pytest.raises(ValueError, match="value code"):
        encode(sp, "q17")
    with pytest.raises(ValueError, match="position code"):
        encode(sp, "fp32", "elias")
    bad = SparseTensor(torch.tensor([3, 1]), torch.ones(2), 10)
    with pytest.raises(ValueError, match="strictly increasing"):
        encode(bad)
    with pytest.raises(ValueError, match="strictly increasing"):
        encode_positions(torch.tensor([1, 1]), 10)
    with pytest.raises(ValueError, match="within"):
        encode_positions(torch.tensor([10]), 10)
    nan = SparseTensor(torch.tensor([1]), torch.tensor([float("nan")]), 10)
    with pytest.raises(ValueError, match="NaN"):
        encode(nan)
    with pytest.raises(ValueError, match="NaN"):
        lossy_roundtrip(nan, "q4")
    big = SparseTensor(torch.tensor([1]), torch.tensor([1e5]), 10)
    with pytest.raises(ValueError, match="float16"):
        encode(big, "fp16")
    with pytest.raises(ValueError, match="float16"):
        lossy_roundtrip(big, "fp16")
    with pytest.raises(ValueError, match="NaN"):
        encode_dense(torch.tensor([1.0, float("inf")]))


# ------------------------------------------------------------------ hostile records
def sample_records(seed: int = 0):
    """(kind, record, numel, nnz) for every payload kind and code."""
    sp = make_sparse(3000, 40, seed, ends=True)
    out = [("sparse", encode(sp, v, p), sp.numel, sp.nnz) for v, p in ALL_COMBOS]
    out += [("positions", encode_positions(sp.indices, sp.numel, p), sp.numel, sp.nnz) for p in POSITION_CODES]
    out += [("values", encode_values(sp.values, v), sp.nnz, sp.nnz) for v in VALUE_CODES]
    out.append(("dense", encode_dense(sp.to_dense()), sp.numel, sp.numel))
    return out


SAMPLES = sample_records()
sample_ids = st.integers(0, len(SAMPLES) - 1)


@settings(max_examples=300, deadline=None)
@given(which=sample_ids, data=st.data())
def test_byte_flips_never_escape_validation(which, data):
    """Any single-byte corruption either decodes to a valid result or raises PayloadError."""
    kind, record, numel, nnz = SAMPLES[which]
    key = data.draw(st.sampled_from(sorted(record.keys())))
    raw = bytearray(record[key].data)
    if not raw:
        return
    pos = data.draw(st.integers(0, len(raw) - 1))
    raw[pos] ^= data.draw(st.integers(1, 255))
    bad = with_array_fields(record, key, data=bytes(raw))
    try:
        result = decode_any(bad, numel, kind, nnz)
    except PayloadError:
        return
    assert_valid_result(result, kind, numel)


@settings(max_examples=300, deadline=None)
@given(which=sample_ids, field=st.integers(0, 8),
       value=st.one_of(st.integers(-(2**63), 2**63 - 1), st.integers(-3, 70), st.just(10**12)))
def test_header_field_changes_never_escape_validation(which, field, value):
    kind, record, numel, nnz = SAMPLES[which]
    header = header_of(record)
    header[field] = value
    try:
        result = decode_any(with_header(record, header), numel, kind, nnz)
    except PayloadError:
        return
    assert_valid_result(result, kind, numel)


@settings(max_examples=200, deadline=None)
@given(which=sample_ids, data=st.data())
def test_truncated_or_extended_arrays_are_rejected(which, data):
    kind, record, numel, nnz = SAMPLES[which]
    key = data.draw(st.sampled_from(sorted(record.keys())))
    raw = record[key].data
    if data.draw(st.booleans()) and raw:
        new = raw[: -data.draw(st.integers(1, len(raw)))]
    else:
        new = raw + data.draw(st.binary(min_size=1, max_size=16))
    fix_shape = data.draw(st.booleans())
    itemsize = np.dtype(record[key].dtype).itemsize
    fields = {"data": new}
    if fix_shape and len(new) % itemsize == 0:
        fields["shape"] = (len(new) // itemsize,)
    with pytest.raises(PayloadError):
        decode_any(with_array_fields(record, key, **fields), numel, kind, nnz)


@settings(max_examples=150, deadline=None)
@given(which=sample_ids, data=st.data())
def test_wrong_dtype_stype_shape_missing_and_extra_arrays_are_rejected(which, data):
    kind, record, numel, nnz = SAMPLES[which]
    key = data.draw(st.sampled_from(sorted(record.keys())))
    a = record[key]
    mutation = data.draw(st.sampled_from(["dtype", "stype", "shape", "missing", "extra", "not_array"]))
    if mutation == "dtype":
        other = data.draw(st.sampled_from(["uint8", "int8", "int16", "int32", "int64", "float16",
                                           "float32", "float64", "bool", "<f4", "garbage"]).filter(lambda d: d != a.dtype))
        bad = with_array_fields(record, key, dtype=other)
    elif mutation == "stype":
        bad = with_array_fields(record, key, stype=data.draw(st.sampled_from(["numpy.ndarray", "", "raw"])))
    elif mutation == "shape":
        shape = data.draw(st.sampled_from([(), (1, len(a.data)), (len(a.data) + 1,), (-1,)]))
        if shape == tuple(a.shape):
            return
        bad = with_array_fields(record, key, shape=shape)
    elif mutation == "missing":
        bad = rebuilt(record, drop=(key,))
    elif mutation == "extra":
        name = data.draw(st.sampled_from(["extra", "means", "scale", "positions", "values"]).filter(lambda n: n not in record))
        bad = rebuilt(record, **{name: Array(dtype="uint8", shape=(0,), stype=a.stype, data=b"")})
    else:
        bad = {k: (record[k] if k != key else np.frombuffer(record[k].data, np.uint8)) for k in record.keys()}
    with pytest.raises(PayloadError):
        decode_any(bad, numel, kind, nnz)


@pytest.mark.parametrize("which", range(len(SAMPLES)))
def test_wrong_numel_count_and_max_nnz_are_rejected(which):
    kind, record, numel, nnz = SAMPLES[which]
    for wrong in (numel - 1, numel + 1, 0, 10**12):
        if wrong >= 0 and wrong != numel:
            with pytest.raises(PayloadError, match="numel"):
                decode_any(record, wrong, kind, wrong)
    if kind == "sparse":
        with pytest.raises(PayloadError, match="nnz"):
            decode(record, numel, max_nnz=nnz - 1)
        assert decode(record, numel, max_nnz=nnz).nnz == nnz
    if kind == "positions":
        with pytest.raises(PayloadError, match="nnz"):
            decode_positions(record, numel, max_nnz=nnz - 1)


@pytest.mark.parametrize("which", range(len(SAMPLES)))
def test_wrong_kind_and_non_records_are_rejected(which):
    kind, record, numel, nnz = SAMPLES[which]
    for other in ("sparse", "positions", "values", "dense"):
        if other != kind:
            with pytest.raises(PayloadError, match="payload"):
                decode_any(record, numel if other != "values" else nnz, other, nnz)
    for junk in (None, 5, b"bytes", [record["header"]], {}, {"header": "x"}):
        with pytest.raises(PayloadError):
            decode_any(junk, numel, kind, nnz)
    # a Flower record of numpy arrays with the right names is still not our format
    numpy_record = ArrayRecord({k: Array(read_array(record, k)) for k in record.keys()})
    with pytest.raises(PayloadError, match="stype"):
        decode_any(numpy_record, numel, kind, nnz)


@pytest.mark.parametrize("mutation", ["unsorted", "duplicate", "negative", "too_large", "int64_max"])
def test_bad_raw_indices_are_rejected(mutation):
    sp = make_sparse(3000, 40, 1)
    for record, decoder in [(encode(sp, "fp32", "raw"), lambda r: decode(r, 3000)),
                            (encode_positions(sp.indices, 3000, "raw"), lambda r: decode_positions(r, 3000))]:
        idx = read_array(record, "positions")
        if mutation == "unsorted":
            idx[[3, 4]] = idx[[4, 3]]
        elif mutation == "duplicate":
            idx[5] = idx[4]
        elif mutation == "negative":
            idx[0] = -1
        elif mutation == "too_large":
            idx[-1] = 3000
        else:
            idx[-1] = np.iinfo(np.int32).max
        with pytest.raises(PayloadError, match="positions"):
            decoder(with_array_values(record, "positions", idx.astype("<i4")))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("values", ["fp32", "fp16"])
def test_non_finite_values_are_rejected(bad, values):
    sp = make_sparse(3000, 40, 2)
    for record, decoder in [(encode(sp, values), lambda r: decode(r, 3000)),
                            (encode_values(sp.values, values), lambda r: decode_values(r, 40))]:
        v = read_array(record, "values")
        v[7] = bad
        with pytest.raises(PayloadError, match="NaN or Inf"):
            decoder(with_array_values(record, "values", v))
    dense = encode_dense(sp.to_dense())
    v = read_array(dense, "values")
    v[0] = bad
    with pytest.raises(PayloadError, match="NaN or Inf"):
        decode_dense(with_array_values(dense, "values", v), 3000)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -1.0])
@pytest.mark.parametrize("values", ["q2", "q4", "q16", "sign"])
def test_bad_quantizer_side_information_is_rejected(bad, values):
    record = encode(make_sparse(3000, 40, 3), values, "rice")
    key = "scale" if values == "sign" else "means"
    side = read_array(record, key)
    side[0] = bad
    with pytest.raises(PayloadError, match=key):
        decode(with_array_values(record, key, side), 3000)


@st.composite
def position_streams(draw):
    """A header-consistent (numel, nnz, param, nbits, stream) for block/rice: random bits
    in the fixed-width section, and a structure/unary section holding exactly nnz '1's
    (random places) about half the time, so it gets past the count check."""
    positions = draw(st.sampled_from(["block", "rice"]))
    numel = draw(st.integers(1, 5000))
    nnz = draw(st.integers(0, min(numel, 200)))
    max_param = max(0, (numel - 1).bit_length()) if positions == "block" else max(0, numel.bit_length() - 1)
    param = draw(st.integers(0, max_param))
    lo = nnz * (param + 1)
    hi = lo + ((((numel - 1) if positions == "block" else (numel - nnz)) >> param) if nnz else 0)
    nbits = draw(st.integers(lo, min(hi, lo + 400)))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    bits = rng.integers(0, 2, nbits).astype(np.uint8)
    tail = nbits - nnz * param  # structure / unary section
    if draw(st.booleans()) and nnz:
        bits[nnz * param:] = 0
        bits[nnz * param + rng.choice(tail, nnz, replace=False)] = 1
        if draw(st.booleans()):
            bits[-1] = 1  # last symbol is a position: no trailing bits
    stream = np.packbits(bits).tobytes()
    return positions, numel, nnz, param, nbits, stream


@settings(max_examples=400, deadline=None)
@given(case=position_streams())
def test_arbitrary_bitstreams_never_escape_validation(case):
    """Random streams under a self-consistent header: PayloadError or a canonical valid support."""
    positions, numel, nnz, param, nbits, stream = case
    record = encode_positions(torch.tensor([0]), numel, positions)
    header = header_of(record)
    header[3], header[7], header[8] = nnz, param, nbits
    bad = with_array_fields(with_header(record, header), "positions", data=stream, shape=(len(stream),))
    try:
        idx = decode_positions(bad, numel)
    except PayloadError:
        return
    assert idx.numel() == nnz
    SparseTensor(idx, torch.zeros(nnz), numel).validate()
    if nnz == 0:
        assert nbits == 0
        return
    # Streams that decode are canonical (no trailing bits): the length is implied by the support.
    if positions == "block":
        assert nbits == nnz * (param + 1) + (int(idx[-1]) >> param)
    else:
        gaps = np.diff(idx.numpy(), prepend=-1) - 1
        assert nbits == nnz * (param + 1) + int((gaps >> param).sum())


@pytest.mark.parametrize("values,positions", [("fp32", "block"), ("fp32", "rice"), ("q3", "raw"), ("sign", "raw")])
def test_non_zero_padding_bits_are_rejected(values, positions):
    sp = make_sparse(3000, 41, 4)  # 41 codewords: bit streams end mid-byte
    record = encode(sp, values, positions)
    key = "positions" if positions != "raw" else "values"
    nbits = wire_size(record).position_bits if key == "positions" else 41 * bits_per_value(values)
    assert nbits % 8, "test needs a partial last byte"
    raw = bytearray(record[key].data)
    raw[-1] |= 1  # lowest bit of the last byte is padding
    with pytest.raises(PayloadError, match="padding"):
        decode(with_array_fields(record, key, data=bytes(raw)), 3000)


@st.composite
def supports(draw):
    """Uniform or clustered (a few random windows, like layer-wise top-k) supports."""
    numel = draw(st.integers(1, 100_000))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    if draw(st.booleans()):
        idx = rng.choice(numel, size=draw(st.integers(1, numel)), replace=False)
    else:
        starts = rng.integers(0, numel, draw(st.integers(1, 5)))
        idx = np.concatenate([np.arange(s, min(numel, s + rng.integers(1, 2000))) for s in starts])
    idx = np.unique(idx).astype(np.int64)
    return SparseTensor(torch.from_numpy(idx), torch.ones(idx.size), numel)


@settings(max_examples=200, deadline=None)
@given(sp=supports())
def test_position_code_parameters_are_optimal(sp):
    if sp.nnz == 0:
        return
    idx = sp.indices.numpy()
    gaps = np.diff(idx, prepend=-1) - 1
    rice_lengths = [sp.nnz * (r + 1) + int((gaps >> r).sum()) for r in range(0, 40)]
    assert wire_size(encode_positions(sp.indices, sp.numel, "rice")).position_bits == min(rice_lengths)
    paper_b = math.ceil(math.log2(sp.numel / sp.nnz) - 1e-12)
    paper_length = sp.nnz * (paper_b + 1) + (int(idx[-1]) >> paper_b)
    assert wire_size(encode_positions(sp.indices, sp.numel, "block")).position_bits <= paper_length


# ------------------------------------------------------------------ absurd declared sizes
ABSURD = 10**12


def absurd_header(record: ArrayRecord, kind: str) -> np.ndarray:
    """Declare numel = nnz = 10**12 with otherwise plausible fields."""
    header = header_of(record)
    header[2] = ABSURD
    header[3] = ABSURD
    if kind in ("sparse", "positions"):
        pcode = header[6]
        if pcode == 1:  # raw: 64-bit indices above 2**31
            header[7], header[8] = 64, 64 * ABSURD
        else:
            header[8] = ABSURD * (header[7] + 1)
    return header


@pytest.mark.parametrize("which", range(len(SAMPLES)))
def test_absurd_declared_sizes_fail_fast_without_allocating(which):
    kind, record, _, _ = SAMPLES[which]
    bad = with_header(record, absurd_header(record, kind))
    tracemalloc.start()
    try:
        with pytest.raises(PayloadError):
            decode_any(bad, ABSURD, kind, ABSURD)
        if kind == "sparse":
            with pytest.raises(PayloadError, match="nnz"):
                decode(bad, ABSURD, max_nnz=10**6)
        elif kind == "positions":
            with pytest.raises(PayloadError, match="nnz"):
                decode_positions(bad, ABSURD, max_nnz=10**6)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1_000_000, f"decoding an absurd header allocated {peak} bytes"


def test_wire_size_rejects_foreign_records():
    with pytest.raises(PayloadError):
        wire_size(ArrayRecord([np.zeros(3)]))
    assert isinstance(wire_size(encode(make_sparse(10, 2, 0))), WireSize)


# ------------------------------------------------------------------ CUDA
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("values,positions", [("fp32", "rice"), ("fp16", "block"), ("q4", "rice"),
                                              ("q16", "raw"), ("sign", "block")])
def test_cuda_tensors_encode_to_what_lossy_roundtrip_predicts(values, positions):
    sp = make_sparse(200_000, 2000, 5).to("cuda")
    out = decode(encode(sp, values, positions), sp.numel)
    predicted = lossy_roundtrip(sp, values)
    assert predicted.values.is_cuda
    assert torch.equal(out.indices, sp.indices.cpu())
    assert torch.equal(out.values, predicted.values.cpu())


@pytest.mark.parametrize("positions", POSITION_CODES)
def test_full_support_sends_no_positions_and_costs_like_dense(positions):
    x = torch.randn(5000)
    full = SparseTensor(torch.arange(5000), x, 5000)
    record = encode(full, "fp32", positions)
    assert wire_size(record).total_bytes == wire_size(encode_dense(x)).total_bytes
    out = decode(record, 5000)
    assert torch.equal(out.indices, full.indices) and torch.equal(out.values, x)
    # one entry short of full: positions are sent again
    assert "positions" in encode(SparseTensor(torch.arange(4999), x[:4999], 5000), "fp32", positions)
