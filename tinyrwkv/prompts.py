"""What a prompt is, for the Python API: text, token ids, or a list of either.

`model.embed`, `tinyrwkv.generate` and `Session.feed` take any of these. Text is encoded with a
tokenizer (the model's own, `model.tokenizer`, which tinyrwkv.load sets); a model without one
(built from weights directly, or whose vocabulary matched no known tokenizer) refuses text with a
message that names the fix. NumPy only: the tokenizer is whatever object is passed in (anything
with `.encode(text) -> ids`), so model.py can use this without importing a tokenizer library.
"""

from __future__ import annotations

import numpy as np


def is_prompt_list(prompt):
    """A list of prompts (texts or id lists), as opposed to one prompt (a text or a list of ids)."""
    return (isinstance(prompt, (list, tuple)) and len(prompt) > 0
            and all(isinstance(p, (str, list, tuple, np.ndarray)) for p in prompt))


def no_tokenizer_message(model, what):
    """Why `what` (e.g. "embed text") cannot be done without a tokenizer, and the fixes."""
    why = getattr(model, "tokenizer_error", None)
    because = f" ({why})" if why else ""
    return (f"cannot {what}: this model has no tokenizer{because}; pass tokenizer= (e.g. "
            "tinyrwkv.get_tokenizer(vocab_size, 'path/to/tokenizer.json')), load the model with "
            "tinyrwkv.load(path, tokenizer='world' or a tokenizer.json), or give token ids")


def prompt_ids(prompt, tokenizer, model=None, what="encode text"):
    """One prompt as token ids: text is encoded with `tokenizer`, ids are returned as they are
    (the model checks them)."""
    if isinstance(prompt, str):
        if tokenizer is None:
            raise ValueError(no_tokenizer_message(model, what))
        ids = tokenizer.encode(prompt)
        if len(ids) == 0:
            raise ValueError("the prompt encodes to no tokens: give some text")
        return ids
    return prompt
