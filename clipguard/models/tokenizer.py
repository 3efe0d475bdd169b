"""A memoising front for open_clip's tokenizer, giving exactly the same tokens, faster.

Why: open_clip's ``SimpleTokenizer`` runs ftfy and a regex over every caption on every call
(~0.16 ms a caption). On the CPU a tiny model's training step is then as slow to tokenize as to
compute, and the defences re-tokenize fresh EDA captions every step. Two exact caches fix it:

* whole captions (the dataset's own captions come back every epoch and every split update);
* single words, for captions made only of printable ASCII without ``&`` or ``<``: there ftfy,
  HTML unescaping and lower-casing act word by word and the tokenizer's regex never matches
  across a space, so the token ids of a caption are the concatenation of its words' ids.

Anything else (other tokenizer classes, reduction masks, other characters) goes to open_clip
unchanged. ``tests/test_models.py`` checks the equality on real and adversarial captions.
"""

from __future__ import annotations

import re
from typing import Any

import torch

_WORDWISE = re.compile(r"^[ -%'-;=?-~]*$")  # printable ASCII without '&' and '<'
_MAX_CAPTIONS = 500_000


class CachedTokenizer:
    """Callable like an open_clip tokenizer: ``tok(texts) -> LongTensor[n, context_length]``."""

    def __init__(self, inner: Any):
        self.inner = inner
        simple = type(inner).__name__ == "SimpleTokenizer" and getattr(inner, "reduction_fn", None) is None
        self._fast = simple and hasattr(inner, "encode") and hasattr(inner, "eot_token_id")
        self._captions: dict[str, list[int]] = {}
        self._words: dict[str, list[int]] = {}

    def __getattr__(self, name: str) -> Any:  # context_length, encode, decode, ...
        return getattr(self.inner, name)

    def encode_ids(self, text: str) -> list[int]:
        """open_clip's ``encode(text)`` (no start/end tokens), memoised."""
        ids = self._captions.get(text)
        if ids is not None:
            return ids
        if _WORDWISE.match(text):
            ids = []
            for word in text.split():
                w = self._words.get(word)
                if w is None:
                    w = self._words[word] = self.inner.encode(word)
                ids.extend(w)
        else:
            ids = self.inner.encode(text)
        if len(self._captions) >= _MAX_CAPTIONS:
            self._captions.clear()
        self._captions[text] = ids
        return ids

    def __call__(self, texts: str | list[str], context_length: int | None = None) -> torch.Tensor:
        if not self._fast:
            return self.inner(texts, context_length) if context_length else self.inner(texts)
        if isinstance(texts, str):
            texts = [texts]
        n_ctx = context_length or self.inner.context_length
        sot, eot = self.inner.sot_token_id, self.inner.eot_token_id
        rows = []
        for text in texts:
            ids = [sot] + self.encode_ids(text) + [eot]
            if len(ids) > n_ctx:  # open_clip's truncation: keep the end-of-text token last
                ids = ids[:n_ctx]
                ids[-1] = eot
            rows.append(ids + [0] * (n_ctx - len(ids)))
        # one tensor from padded lists: a tensor per row costs more than the look-ups on a step
        return torch.tensor(rows, dtype=torch.long) if rows else torch.zeros(0, n_ctx, dtype=torch.long)
