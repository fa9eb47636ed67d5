"""Property-based fuzzing of what lssf parses from untrusted model folders (issue #9).

Any bytes given as a safetensors file or a shard index either parse into something consistent
or raise lssf's own ``CheckpointError``: never another exception. Derandomized, so a run is
deterministic; a few hundred examples each, a few seconds in all.
"""

from __future__ import annotations

import itertools
import json
import struct
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lssf.checkpoint import INDEX_NAME, weight_files
from lssf.errors import CheckpointError
from lssf.st_io import DTYPES, read_header

FUZZ = settings(
    max_examples=150,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)

SCRATCH = Path(tempfile.mkdtemp(prefix="lssf-fuzz-"))

json_scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner),
    max_leaves=12,
)
dims = st.integers(min_value=-2, max_value=6) | st.sampled_from([2**63, 1.0, True, "2"])
entries = (
    st.fixed_dictionaries(
        {
            "dtype": st.sampled_from([*DTYPES, "F4", "", 7]) | json_values,
            "shape": st.lists(dims, max_size=3) | json_values,
            "data_offsets": st.lists(st.integers(-4, 64) | st.floats(0, 64), max_size=3)
            | json_values,
        }
    )
    | json_values
)
headers = st.dictionaries(
    st.sampled_from(["a", "b", "__metadata__", "w.weight"]) | st.text(max_size=4),
    entries,
    max_size=4,
)


def _write(name: str, data: bytes) -> Path:
    path = SCRATCH / name
    path.write_bytes(data)
    return path


def _check_header(path: Path) -> None:
    try:
        header = read_header(path)
    except CheckpointError:
        return
    # Accepted: the tensors tile the data exactly, and metadata maps strings to strings.
    size = path.stat().st_size
    spans = sorted((t.start, t.end) for t in header.tensors.values())
    assert all(a[1] == b[0] for a, b in itertools.pairwise(spans))
    assert not spans or (spans[0][0] == header.data_start and spans[-1][1] == size)
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in header.metadata.items())


@FUZZ
@given(st.binary(max_size=200))
def test_any_bytes_parse_or_raise_checkpoint_error(data: bytes) -> None:
    _check_header(_write("raw.safetensors", data))


@FUZZ
@given(
    headers,
    st.integers(min_value=-16, max_value=16),
    st.binary(max_size=80),
)
def test_structured_headers_parse_or_raise_checkpoint_error(
    header: dict, length_error: int, body: bytes
) -> None:
    """Plausible JSON headers (right shape, wrong details) with a length prefix that is right
    or off by a little, followed by arbitrary data."""
    text = json.dumps(header).encode()
    length = max(0, len(text) + length_error)
    _check_header(_write("json.safetensors", struct.pack("<Q", length) + text + body))


MODEL = SCRATCH / "model"
MODEL.mkdir()
(MODEL / "model.safetensors").write_bytes(struct.pack("<Q", 2) + b"{}")


def _check_index(data: bytes) -> None:
    """Parse a model folder whose index is ``data``; accepted shards must lie inside it."""
    (MODEL / INDEX_NAME).write_bytes(data)
    try:
        files = weight_files(MODEL)
    except CheckpointError:
        return
    assert all(f.parent == MODEL and f.name.endswith(".safetensors") for f in files)
    assert all(f.resolve().parent == MODEL.resolve() for f in files)


@FUZZ
@given(st.binary(max_size=200))
def test_any_index_bytes_parse_or_raise_checkpoint_error(data: bytes) -> None:
    _check_index(data)


shard_names = st.sampled_from(
    ["model.safetensors", "../x.safetensors", "/etc/passwd", "a/b.safetensors", "", ".."]
) | st.text(max_size=12)


@FUZZ
@given(
    st.dictionaries(st.text(max_size=4), shard_names | json_values, max_size=4) | json_values,
    st.booleans(),
)
def test_structured_indexes_parse_or_raise_checkpoint_error(weight_map: object, wrap: bool) -> None:
    doc = {"metadata": {"total_size": 1}, "weight_map": weight_map} if wrap else weight_map
    _check_index(json.dumps(doc).encode())


@pytest.mark.parametrize("depth", [10_000, 100_000])
def test_deeply_nested_json_is_refused_not_crashing(depth: int) -> None:
    text = b"[" * depth + b"]" * depth
    with pytest.raises(CheckpointError):
        read_header(_write("deep.safetensors", struct.pack("<Q", len(text)) + text))
    (MODEL / INDEX_NAME).write_bytes(text)
    with pytest.raises(CheckpointError):
        weight_files(MODEL)
