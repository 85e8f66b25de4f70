"""JSON bodies for every HTTP protocol: parsing, validation with readable messages, list-of-text
checks, and encoding straight from numpy."""

from __future__ import annotations

from typing import Any, Literal, TypeVar

import orjson
from fastapi import Response
from pydantic import BaseModel, ConfigDict, Field, StrictInt, ValidationError

from serve_app.errors import EmptyInput, InvalidInput
from serve_app.types import ClassifyInput, LongInputs, late_chunking, long_inputs

M = TypeVar("M", bound=BaseModel)


class LongInputField(BaseModel):
    """The field of every embedding body that says what becomes of long texts (serve_app's
    extension, the same on every protocol: docs/protocols.md)."""

    model_config = ConfigDict(extra="allow")

    long_inputs: Literal["truncate", "chunk", "error"] | None = Field(
        None, description="serve_app extension: a text over the model's token limit is cut "
        "(truncate), embedded whole in windows whose vectors are averaged (chunk), or refused "
        "(error); default: the model's long_inputs.")

    def long_inputs_of(self, truncate: bool | None = None) -> LongInputs | None:
        return long_inputs(self.long_inputs, truncate)


class LateChunkFields(LongInputField):
    """Late chunking's fields (serve_app's extension): one vector per chunk of the one text."""

    chunks: list[tuple[StrictInt, StrictInt]] | None = Field(
        None, description="serve_app extension, late chunking: the one input's chunks as "
        "[start, end] character offsets; one vector per chunk, from a pass over the whole text.")
    chunk_tokens: StrictInt | None = Field(
        None, description="serve_app extension, late chunking: cut the one input every N "
        "tokens; one vector per chunk, with its offsets.")

    def late_chunking(self) -> tuple[tuple[tuple[int, int], ...] | None, int | None]:
        return late_chunking(self.chunks, self.chunk_tokens)


def json_response(
    content: Any, status_code: int = 200, headers: dict[str, str] | None = None
) -> Response:
    """Encode with orjson straight from numpy (no per-float Python objects)."""
    return Response(
        orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY),
        status_code=status_code,
        headers=headers,
        media_type="application/json",
    )


def openapi_body(*models: type[BaseModel]) -> dict[str, Any]:
    """A route's ``openapi_extra`` for a JSON body of ``models`` (one of them, for several):
    routes read their bodies themselves, so FastAPI cannot see them."""
    schemas = [m.model_json_schema() for m in models]
    schema = schemas[0] if len(schemas) == 1 else {"oneOf": schemas}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


def parse_json(data: bytes) -> Any:
    if not data:
        raise InvalidInput("request body is empty; expected a JSON object")
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError as e:
        raise InvalidInput(f"request body is not valid JSON: {e}") from e


def validate(model: type[M], data: Any) -> M:
    """``model.model_validate(data)`` with pydantic's errors as one readable InvalidInput."""
    if not isinstance(data, dict):
        raise InvalidInput(f"request body must be a JSON object, got {type(data).__name__}")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise InvalidInput(describe_validation(e.errors()), param=_first_param(e.errors())) from e


def describe_validation(errors: Any) -> str:
    parts = []
    for err in list(errors)[:5]:
        loc = ".".join(str(p) for p in err.get("loc", ()) if p != "body") or "body"
        parts.append(f"{loc}: {err.get('msg', 'invalid')}")
    return "invalid request: " + "; ".join(parts)


def _first_param(errors: Any) -> str | None:
    for err in errors:
        loc = [p for p in err.get("loc", ()) if p != "body"]
        if loc:
            return str(loc[0])
    return None


def check_texts(items: Any, field: str, allow_empty: bool = False) -> tuple[str, ...]:
    """A non-empty list of strings (non-empty ones unless ``allow_empty``), as a tuple. Names
    ``field`` in every message."""
    if not isinstance(items, list):
        raise InvalidInput(f"'{field}' must be a list of strings", param=field)
    if not items:
        raise EmptyInput(f"'{field}' must not be empty", param=field)
    for i, x in enumerate(items):
        if not isinstance(x, str):
            raise InvalidInput(
                f"'{field}[{i}]' must be a string, got {type(x).__name__}", param=field
            )
        if not x and not allow_empty:
            raise EmptyInput(f"'{field}[{i}]' is an empty string", param=field)
    return tuple(items)


def classify_inputs(items: Any, field: str) -> tuple[ClassifyInput, ...]:
    """A classifier's inputs: a list of texts and text pairs (``["a", "b"]``), none empty."""
    if not isinstance(items, list):
        raise InvalidInput(f"'{field}' must be a list of texts or [text, text] pairs",
                           param=field)
    if not items:
        raise EmptyInput(f"'{field}' must not be empty", param=field)
    out: list[ClassifyInput] = []
    for i, x in enumerate(items):
        if isinstance(x, list) and len(x) == 2 and all(isinstance(t, str) for t in x):
            out.append((x[0], x[1]))
        elif isinstance(x, str):
            out.append(x)
        else:
            raise InvalidInput(f"'{field}[{i}]' must be a text or a [text, text] pair",
                               param=field)
        if not x or not all(x):
            raise EmptyInput(f"'{field}[{i}]' is empty", param=field)
    return tuple(out)
