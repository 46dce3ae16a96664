"""Words → text-token positions, with the pipeline's real tokenizer.

Attention masking acts on token positions (0 = the start token), but users name words. A word can be split
into several BPE pieces ("giraffes" → "gira" + "ffes"), and all of them must be confined, not only the first
(the official code's fixed positions miss 13–18 % of its targets, docs/method.md §5). Because CLIP-style tokenizers
split text into words before BPE, a phrase tokenises the same alone as inside a prompt, so its positions are
found as a token subsequence of the prompt. Every occurrence counts. SentencePiece tokenizers (T5, for SD3 and
Flux) can split a word differently in context (after a bracket, "cat" is no longer "▁cat"); where the phrase's
own tokens do not occur, its positions are the tokens whose characters overlap a whole-word occurrence of it
in the prompt (the fast tokenizer's offsets). A phrase that is not in the prompt is an
error that names it; one that the text encoder never sees (past its token limit) is an error that says so.
Integers are taken as raw token positions (the reference "fixed positions" mode).

The automatic word choices (:func:`new_words`, :func:`subject_words`) split prompts into words the way the
tokenizer does (:func:`tokenizer_words`), so any prompt the tokenizer accepts — accents, other scripts,
emoji — yields words that are found again.
"""

from __future__ import annotations

import re
import unicodedata

from pfbdiff.errors import PFBDiffError

STOP_WORDS = frozenset({"a", "an", "the", "of", "on", "in", "at", "and", "with", "to", "is", "are", "its", "by"})
# CLIP's own pre-tokenisation rule, for tokenizers without a fast backend to ask.
_CLIP_WORD = re.compile(r"'s|'t|'re|'ve|'m|'ll|'d|[^\W\d_]+|\d|[^\s\w]+")


def tokenizer_words(tokenizer, text: str) -> list[str]:
    """The words of ``text`` as ``tokenizer`` splits it before BPE, normalised (lower-cased) as it does:
    for CLIP, runs of letters of any script, single digits, runs of other symbols, and contractions (``'s``)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or backend.pre_tokenizer is None:
        normal, split = unicodedata.normalize("NFC", text).lower(), _CLIP_WORD.findall
    else:
        normal = backend.normalizer.normalize_str(text) if backend.normalizer is not None else text
        split = lambda part: [part[a:b] for _, (a, b) in backend.pre_tokenizer.pre_tokenize_str(part)]  # noqa: E731
    # tokens added to the vocabulary (a textual-inversion "<my-token>") are whole words, as the tokenizer sees them
    special = set(getattr(tokenizer, "all_special_tokens", ()))
    added = sorted((t for t in getattr(tokenizer, "added_tokens_encoder", {}) if t not in special), key=len, reverse=True)
    if not added:
        return split(normal)
    words, start = [], 0
    for match in re.finditer("|".join(map(re.escape, added)), normal):
        words += split(normal[start:match.start()]) + [match.group()]
        start = match.end()
    return words + split(normal[start:])


def content_words(tokenizer, text: str) -> list[str]:
    """The words of ``text`` that can name something: not stop words, not bare punctuation or contractions
    (a pictograph such as an emoji counts)."""
    return [word for word in tokenizer_words(tokenizer, text) if word not in STOP_WORDS and _names_something(word)]


def _names_something(word: str) -> bool:
    return not word.startswith("'") and any(char.isalnum() or unicodedata.category(char) == "So" for char in word)


def new_words(tokenizer, source_prompt: str, prompt: str) -> list[str]:
    """Content words of ``prompt`` that the source prompt does not have: what an edit introduces."""
    old = set(content_words(tokenizer, source_prompt))
    return list(dict.fromkeys(w for w in content_words(tokenizer, prompt) if w not in old))


def subject_words(tokenizer, source_prompt: str, prompt: str) -> list[str]:
    """Content words of the words ``prompt`` starts with in common with the source prompt: the subject
    a background edit keeps ("a dog is standing on grass" → "a dog is standing in a desert": dog, standing).

    Where the change starts inside a phrase, the phrase's words before it describe the new part, not the subject
    ("a cat on a wooden bench" → "a cat on a wooden floor": cat, not wooden): the common start then ends at the
    stop word before that phrase."""
    old, new = tokenizer_words(tokenizer, source_prompt), tokenizer_words(tokenizer, prompt)
    common = 0
    while common < min(len(old), len(new)) and old[common] == new[common]:
        common += 1
    if common < len(new) and new[common] not in STOP_WORDS:
        while common and new[common - 1] not in STOP_WORDS:
            common -= 1
    return list(dict.fromkeys(w for w in new[:common] if w not in STOP_WORDS and _names_something(w)))


def prompt_token_ids(tokenizer, prompt: str) -> list[int]:
    """The prompt's token ids as the text encoder sees them (cut at its token limit)."""
    return tokenizer(prompt, truncation=True, max_length=tokenizer.model_max_length).input_ids


def split_at_token_limit(tokenizer, prompt: str) -> tuple[str, str | None]:
    """``(seen, cut)``: the words of ``prompt`` the text encoder sees, and the words it does not because the prompt
    is longer than its token limit (``tokenizer.model_max_length``: 77 for CLIP), cut at a word's start; ``cut``
    is ``None`` when all of it fits."""
    limit = tokenizer.model_max_length
    if len(tokenizer(prompt).input_ids) <= limit:
        return prompt, None
    try:
        offsets = tokenizer(prompt, return_offsets_mapping=True).offset_mapping
        start = offsets[limit - 1][0]  # the first token past the limit (the last place is the end token's)
    except (NotImplementedError, TypeError, ValueError):  # a tokenizer without offsets: cut its decoded text
        ids = tokenizer(prompt).input_ids
        seen = tokenizer.decode(ids[: limit - 1], skip_special_tokens=True)
        return seen, tokenizer.decode(ids[limit - 1 : -1], skip_special_tokens=True).strip()
    while start > 0 and not prompt[start - 1].isspace():
        start -= 1
    return prompt[:start].rstrip(), prompt[start:].strip()


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
    first = _first_word(tokenizer)
    found = _occurrences(prompt_token_ids(tokenizer, prompt), pieces, first)
    if found:
        return tuple(sorted(set(found)))
    beyond = _occurrences(tokenizer(prompt).input_ids, pieces, first)  # only to tell "cut" from "missing"
    if not beyond:
        found, beyond = _overlapping(tokenizer, prompt, phrase)
    if not found and beyond:
        raise PFBDiffError(
            f"{phrase!r} lies past the text encoder's {tokenizer.model_max_length}-token limit, so the model never "
            f"sees it (it does not see {split_at_token_limit(tokenizer, prompt)[1]!r}); shorten the prompt or move the word "
            "forward"
        )
    if not found:
        raise PFBDiffError(f"{phrase!r} does not occur in the prompt {prompt!r}; name words that appear in the prompt")
    return tuple(sorted(set(found)))


def _overlapping(tokenizer, prompt: str, phrase: str) -> tuple[list[int], list[int]]:
    """(seen, all) positions of the tokens whose characters overlap a whole-word, case-insensitive occurrence of
    ``phrase`` in ``prompt``; ``seen`` only those within the token limit. Empty without a fast tokenizer."""
    words = r"\s+".join(map(re.escape, phrase.split()))
    spans = [m.span() for m in re.finditer(rf"(?<!\w){words}(?!\w)", prompt, flags=re.IGNORECASE)]
    try:
        offsets = tokenizer(prompt, return_offsets_mapping=True).offset_mapping
    except (NotImplementedError, TypeError, ValueError):
        return [], []
    hits = [i for i, (a, b) in enumerate(offsets) if b > a and any(a < end and b > start for start, end in spans)]
    return [i for i in hits if i < tokenizer.model_max_length - 1], hits


def _first_word(tokenizer) -> int:
    """Where words start in a tokenised prompt: after the start token (CLIP), or at 0 (T5 has none)."""
    return 0 if tokenizer("").input_ids[:1] != [tokenizer.bos_token_id] else 1


def _occurrences(ids: list[int], pieces: list[int], first: int) -> list[int]:
    """Positions of every piece of every occurrence of ``pieces`` in ``ids`` from position ``first`` on."""
    return [
        position
        for start in range(first, len(ids) - len(pieces) + 1)
        if ids[start : start + len(pieces)] == pieces
        for position in range(start, start + len(pieces))
    ]


def positions_of(tokenizer, prompt: str, phrases) -> tuple[int, ...]:
    """Union of the positions of several phrases (or raw positions)."""
    return tuple(sorted({p for phrase in phrases for p in token_positions(tokenizer, prompt, phrase)}))


def joined_positions(parts, prompt: str, phrases) -> tuple[int, ...]:
    """Positions of ``phrases`` in a text sequence made of several encodings of ``prompt`` one after another:
    ``parts`` is ``[(tokenizer, length), ...]`` in sequence order, each encoding padded to its ``length``. SD3's
    sequence is its CLIP tokens (77) followed by its T5 tokens, and a word sits in both: both are confined."""
    found, offset = set(), 0
    for tokenizer, length in parts:
        found.update(offset + p for p in positions_of(tokenizer, prompt, phrases) if p < length)
        offset += length
    return tuple(sorted(found))
