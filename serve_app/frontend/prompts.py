"""Which of a model's prompts a request gets: ``prompt_name`` checked against the model's
prompts, or ``input_type`` (query or document, as Cohere and NVIDIA NIM name it) turned into
the model's prompt for that side."""

from __future__ import annotations

import dataclasses

from serve_app.errors import InvalidInput
from serve_app.types import INPUT_TYPES, NO_PROMPT, EmbedRequest, ModelInfo


def resolve_prompt(req: EmbedRequest, info: ModelInfo) -> EmbedRequest:
    """``req`` with its ``input_type`` turned into the model's prompt name for it, after
    checking both against the model's prompts.

    ``prompt_name`` must be one of the model's prompts. ``input_type`` picks the model's prompt
    of that name or of a synonym (``query``/``search_query``, ``document``/``search_document``/
    ``passage``); a model without one for that side embeds those texts with no prompt, as
    asymmetric models without a document prompt (BGE) expect."""
    names = info.prompt_names()
    if req.prompt_name is None and req.input_type is None:
        return req
    if any(not isinstance(x, str) for x in req.inputs):
        raise InvalidInput("prompts apply to texts; token-id inputs are used as they are",
                           param="prompt_name" if req.prompt_name else "input_type")
    if req.prompt_name is not None:
        if req.input_type is not None:
            raise InvalidInput("give prompt_name or input_type, not both", param="input_type")
        if req.prompt_name not in names:
            raise InvalidInput(f"model {req.model!r} has no prompt {req.prompt_name!r}; its "
                               f"prompts: {names}", param="prompt_name")
        return req
    synonyms = INPUT_TYPES.get(str(req.input_type))
    if synonyms is None:
        raise InvalidInput(f"input_type must be one of {sorted(INPUT_TYPES)}, got "
                           f"{req.input_type!r}", param="input_type")
    # no prompt for that side: "" (none), not None, which would add the model's default
    found = next((n for n in synonyms if n in names), NO_PROMPT)
    return dataclasses.replace(req, prompt_name=found, input_type=None)

