"""The V2 tensor codec shared by REST and gRPC."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from serve_app.errors import InvalidInput
from serve_app.frontend.v2.codec import (
    check_outputs,
    fp32_bytes,
    infer_options,
    join_bytes_tensor,
    split_bytes_tensor,
    texts_from_elements,
)


@given(st.lists(st.binary(max_size=64), max_size=20))
def test_bytes_tensor_round_trips(items):
    assert split_bytes_tensor(join_bytes_tensor(items)) == items


@given(st.binary(max_size=256))
def test_arbitrary_bytes_decode_or_fail_cleanly(raw):
    try:
        items = split_bytes_tensor(raw)
    except InvalidInput as e:
        assert e.message.startswith("BYTES") and ("4-byte length" in e.message
                                                   or "remain" in e.message)
        return
    assert join_bytes_tensor(items) == raw  # decoded exactly: its elements make it again


def test_bytes_tensor_matches_tritonclient():
    from tritonclient.utils import serialize_byte_tensor

    arr = np.array([b"hello", "wörld".encode(), b""], dtype=object)
    assert split_bytes_tensor(serialize_byte_tensor(arr).item()) == list(arr)


@pytest.mark.parametrize(
    ("raw", "match"),
    [(b"\x05\x00", "inside an element's 4-byte length"), (b"\x05\x00\x00\x00ab", "says 5 bytes")],
)
def test_truncated_bytes_tensor(raw, match):
    with pytest.raises(InvalidInput, match=match):
        split_bytes_tensor(raw)


def test_texts_from_elements_accepts_both_shapes():
    assert texts_from_elements([b"a", "b"], [2], "BYTES", "text") == ("a", "b")
    assert texts_from_elements([b"a", b"b"], [2, 1], "BYTES", "text") == ("a", "b")


@pytest.mark.parametrize(
    ("elements", "shape", "datatype", "match"),
    [
        ([b"a"], [1], "FP32", "datatype FP32"),
        ([b"a", b"b"], [3], "BYTES", "holds 2 elements"),
        ([b"a"], [1, 2], "BYTES", r"expected \[n\] or \[n, 1\]"),
        ([b"a"], [1, 1, 1], "BYTES", r"expected \[n\] or \[n, 1\]"),
        ([], [0], "BYTES", "is empty"),
        ([b"\xff\xfe"], [1], "BYTES", "not valid UTF-8"),
        ([5], [1], "BYTES", "must be a string"),
        ([b"a"], [-1], "BYTES", "negative"),
    ],
)
def test_texts_from_elements_refuses(elements, shape, datatype, match):
    with pytest.raises(InvalidInput, match=match):
        texts_from_elements(elements, shape, datatype, "text")


def test_infer_options():
    assert infer_options({}).dimensions is None and infer_options({}).truncate is True
    assert infer_options({"dimensions": 8, "truncate": False}).dimensions == 8
    with pytest.raises(InvalidInput, match="'dimensions' must be an integer"):
        infer_options({"dimensions": "8"})
    with pytest.raises(InvalidInput, match="'truncate' must be a boolean"):
        infer_options({"truncate": 1})


def test_outputs_and_fp32_bytes():
    check_outputs(["output-0"])
    with pytest.raises(InvalidInput, match="unknown output 'logits'"):
        check_outputs(["logits"])
    v = np.arange(6, dtype=np.float32).reshape(2, 3)
    assert np.frombuffer(fp32_bytes(v), "<f4").tolist() == [0, 1, 2, 3, 4, 5]
