"""Property-based tests of every protocol's codec: what one side encodes the other decodes to
the same thing, and arbitrary input decodes or fails with InvalidInput, never anything else."""

from __future__ import annotations

import base64
import json
import string

import numpy as np
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from serve_app.errors import InvalidInput
from serve_app.frontend.http import openai as oai
from serve_app.frontend.http.bodies import check_texts
from serve_app.frontend.v2.codec import fp32_bytes, join_bytes_tensor, split_bytes_tensor
from serve_app.frontend.v2.proto import inference_pb2 as pb
from serve_app.frontend.v2.servicer import _contents, to_request
from serve_app.types import EmbedResult
from tests.helpers import FakeBackend, app_client, fake_vector

texts = st.text(min_size=1, max_size=40)
token_ids = st.lists(st.integers(0, 30521), min_size=1, max_size=8)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=6), kids,
                                                              max_size=4),
    max_leaves=12,
)
vectors = arrays(np.float32, st.tuples(st.integers(1, 5), st.integers(1, 16)),
                 elements=st.floats(-1e6, 1e6, width=32))
FAST = settings(max_examples=60, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture])


# -- OpenAI ------------------------------------------------------------------------------------

@given(st.one_of(texts, st.lists(texts, min_size=1, max_size=5), token_ids,
                 st.lists(token_ids, min_size=1, max_size=4)))
def test_openai_inputs_decode_to_what_was_sent(value):
    out = oai._inputs(value)
    if isinstance(value, str):
        assert out == (value,)
    elif isinstance(value[0], int):
        assert out == (tuple(value),)
    else:
        assert list(out) == [v if isinstance(v, str) else tuple(v) for v in value]


def _openai_input_shape(value) -> tuple | None:
    """What a JSON ``input`` means by the OpenAI spec (a string, a list of strings, a list of
    token ids, a list of lists of them; nothing empty), or None when it is none of them."""
    def ids(x) -> bool:
        return isinstance(x, list) and bool(x) and all(type(t) is int for t in x)

    if isinstance(value, str):
        return (value,) if value else None
    if not isinstance(value, list) or not value:
        return None
    if all(isinstance(x, str) and x for x in value):
        return tuple(value)
    if ids(value):
        return (tuple(value),)
    if all(ids(x) for x in value):
        return tuple(tuple(x) for x in value)
    return None


@given(json_values)
def test_openai_inputs_never_fail_other_than_invalid_input(value):
    want = _openai_input_shape(value)
    try:
        out = oai._inputs(value)
    except InvalidInput as e:
        assert want is None, (value, e.message)  # refused only what the spec does not allow
        assert e.message and e.param == "input"
        return
    assert out == want


@given(vectors, st.sampled_from(["float", "base64"]))
def test_openai_response_decodes_to_the_vectors(v, encoding):
    result = EmbedResult(embeddings=v, token_counts=np.ones(len(v), np.int64))
    body = orjson.loads(oai.render_embeddings(result, "m", encoding).body)
    if encoding == "float":
        got = np.array([d["embedding"] for d in body["data"]], np.float32)
    else:
        got = np.array([np.frombuffer(base64.b64decode(d["embedding"]), "<f4")
                        for d in body["data"]])
    np.testing.assert_array_equal(got, v)
    assert [d["index"] for d in body["data"]] == list(range(len(v)))


# -- KServe V1 ---------------------------------------------------------------------------------

@given(json_values)
def test_v1_instances_decode_or_fail_cleanly(value):
    try:
        out = check_texts(value, "instances")
    except InvalidInput:
        return
    assert list(out) == value


# -- V2 gRPC -----------------------------------------------------------------------------------

@given(st.lists(texts, min_size=1, max_size=6), st.booleans())
def test_grpc_request_decodes_to_the_texts_sent(items, raw):
    req = pb.ModelInferRequest(model_name="m", id="x")
    inp = req.inputs.add(name="text", datatype="BYTES", shape=[len(items)])
    encoded = [t.encode() for t in items]
    if raw:
        req.raw_input_contents.append(join_bytes_tensor(encoded))
    else:
        inp.contents.bytes_contents.extend(encoded)
    wire = pb.ModelInferRequest.FromString(req.SerializeToString())
    embed, was_raw, outputs = to_request(wire)
    assert outputs == ("output-0",)
    assert list(embed.inputs) == items and was_raw == raw


@given(st.binary(max_size=300))
def test_grpc_arbitrary_messages_decode_or_fail_cleanly(data):
    try:
        req = pb.ModelInferRequest.FromString(data)
    except Exception:  # not a protobuf at all: grpc never hands it to us
        return
    try:
        embed, raw = to_request(req)
    except InvalidInput as e:
        assert e.message
        return
    # decoded: the texts of its one tensor, for the model it names
    (inp,) = req.inputs
    items = (split_bytes_tensor(req.raw_input_contents[0]) if raw
             else list(inp.contents.bytes_contents))
    assert embed.model == req.model_name
    assert list(embed.inputs) == [b.decode() for b in items]


@given(vectors)
def test_grpc_contents_decode_to_the_vectors(v):
    contents = pb.InferTensorContents.FromString(_contents(v).SerializeToString())
    np.testing.assert_array_equal(np.array(contents.fp32_contents, np.float32), v.reshape(-1))
    assert np.frombuffer(fp32_bytes(v), "<f4").reshape(v.shape).tolist() == v.tolist()


# -- every HTTP route: arbitrary bodies are never a 5xx ----------------------------------------

@pytest.fixture(scope="module")
def echo_client():
    with app_client({"m": FakeBackend("m")}) as c:
        yield c


ROUTES = ["/v1/embeddings", "/openai/v1/embeddings", "/v1/models/m:predict",
          "/v2/models/m/infer", "/v2/models/m/versions/1/infer"]


@FAST
@given(st.sampled_from(ROUTES), json_values)
def test_arbitrary_json_bodies_get_a_4xx_or_an_answer(echo_client, route, body):
    r = echo_client.post(route, content=json.dumps(body),
                         headers={"content-type": "application/json"})
    assert r.status_code in (200, 400, 404, 413), (r.status_code, r.text)
    assert "error" in r.json() or r.status_code == 200


@FAST
@given(st.sampled_from(ROUTES), st.binary(max_size=200),
       st.sampled_from([None, "gzip", "deflate", "br"]),
       st.one_of(st.none(), st.text(string.digits + "-x", max_size=4)))
def test_arbitrary_bytes_and_headers_get_a_4xx(echo_client, route, body, encoding, header_len):
    headers = {"content-type": "application/octet-stream"}
    if encoding:
        headers["content-encoding"] = encoding
    if header_len is not None:
        headers["inference-header-content-length"] = header_len
    r = echo_client.post(route, content=body, headers=headers)
    assert r.status_code < 500, (r.status_code, r.text)


@FAST
@given(st.lists(texts, min_size=1, max_size=4), st.booleans())
def test_v2_rest_binary_round_trip(echo_client, items, binary_out):
    raw = join_bytes_tensor([t.encode() for t in items])
    head = orjson.dumps({
        "inputs": [{"name": "text", "shape": [len(items)], "datatype": "BYTES",
                    "parameters": {"binary_data_size": len(raw)}}],
        "outputs": [{"name": "output-0", "parameters": {"binary_data": binary_out}}],
    })
    r = echo_client.post("/v2/models/m/infer", content=head + raw,
                         headers={"inference-header-content-length": str(len(head))})
    assert r.status_code == 200
    expected = np.stack([fake_vector(t, 8) for t in items]).ravel()
    if binary_out:
        n = int(r.headers["inference-header-content-length"])
        assert np.frombuffer(r.content[n:], "<f4").tolist() == expected.tolist()
    else:
        np.testing.assert_allclose(r.json()["outputs"][0]["data"], expected, rtol=1e-6)
