"""Words → text-token positions, with the pipeline's real tokenizer.

Attention masking acts on token positions (0 = the start token), but users name words. A word can be split
into several BPE pieces ("giraffes" → "gira" + "ffes"), and all of them must be confined, not only the first
(the official code's fixed positions miss 13–18 % of its targets, docs/method.md §5). Because CLIP-style tokenizers
split text into words before BPE, a phrase tokenises the same alone as inside a prompt, so its positions are
found as a token subsequence of the prompt. Every occurrence counts. A phrase that is not in the prompt is an
error that names it. Integers are taken as raw token positions (the reference "fixed positions" mode).
"""

from __future__ import annotations

import re

from pfbdiff.errors import PFBDiffError

_WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")
STOP_WORDS = frozenset({"a", "an", "the", "of", "on", "in", "at", "and", "with", "to", "is", "are", "its", "by"})


def prompt_token_ids(tokenizer, prompt: str) -> list[int]:
    return tokenizer(prompt, truncation=True, max_length=tokenizer.model_max_length).input_ids


def token_positions(tokenizer, prompt: str, phrase) -> tuple[int, ...]:
    """Positions of every BPE piece of every occurrence of ``phrase`` in the tokenised ``prompt``."""
    if isinstance(phrase, int):
        if not 0 < phrase < tokenizer.model_max_length:
            raise PFBDiffError(
                f"token position {phrase} is out of range; use 1..{tokenizer.model_max_length - 1} (0 is the start token)"
            )
        return (phrase,)
    pieces = tokenizer(phrase, add_special_tokens=False).input_ids
    if not pieces:
        raise PFBDiffError(f"{phrase!r} contains no word; name words from the prompt")
    ids = prompt_token_ids(tokenizer, prompt)
    found = [
        position
        for start in range(1, len(ids) - len(pieces) + 1)
        if ids[start : start + len(pieces)] == pieces
        for position in range(start, start + len(pieces))
    ]
    if not found:
        raise PFBDiffError(f"{phrase!r} does not occur in the prompt {prompt!r}; name words that appear in the prompt")
    return tuple(sorted(set(found)))


def positions_of(tokenizer, prompt: str, phrases) -> tuple[int, ...]:
    """Union of the positions of several phrases (or raw positions)."""
    return tuple(sorted({p for phrase in phrases for p in token_positions(tokenizer, prompt, phrase)}))


def content_words(text: str) -> list[str]:
    return [w for w in _WORD.findall(text.lower()) if w not in STOP_WORDS]


def new_words(source_prompt: str, prompt: str) -> list[str]:
    """Content words of ``prompt`` that the source prompt does not have: what an edit introduces."""
    old = set(content_words(source_prompt))
    return list(dict.fromkeys(w for w in content_words(prompt) if w not in old))


def subject_words(source_prompt: str, prompt: str) -> list[str]:
    """Content words of the words ``prompt`` starts with in common with the source prompt: the subject
    a background edit keeps ("a dog is standing on grass" → "a dog is standing in a desert": dog, standing)."""
    old, new = _WORD.findall(source_prompt.lower()), _WORD.findall(prompt.lower())
    common = 0
    while common < min(len(old), len(new)) and old[common] == new[common]:
        common += 1
    return list(dict.fromkeys(w for w in new[:common] if w not in STOP_WORDS))
