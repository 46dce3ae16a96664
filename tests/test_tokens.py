"""Words → token positions with the real tokenizer (docs/method.md §5): every BPE piece, every occurrence."""

import pytest

from pfbdiff.engine.tokens import new_words, positions_of, subject_words, token_positions
from pfbdiff.errors import PFBDiffError


def test_single_token_word_maps_to_its_position(tiny_pipe):
    tok = tiny_pipe.tokenizer
    assert token_positions(tok, "a cat on a bench", "cat") == (2,)


def test_multi_piece_word_maps_to_all_its_pieces(tiny_pipe):
    tok = tiny_pipe.tokenizer
    pieces = tok("giraffe", add_special_tokens=False).input_ids
    assert len(pieces) >= 2
    assert token_positions(tok, "a giraffe on a bench", "giraffe") == tuple(range(2, 2 + len(pieces)))


def test_phrase_and_several_words(tiny_pipe):
    tok = tiny_pipe.tokenizer
    assert token_positions(tok, "a red hat on a cat", "red hat") == (2, 3)
    assert positions_of(tok, "a red hat on a cat", ["hat", "cat"]) == (3, 6)


def test_every_occurrence_counts(tiny_pipe):
    assert token_positions(tiny_pipe.tokenizer, "a cat and a cat", "cat") == (2, 5)


def test_word_not_in_prompt_is_an_error_naming_it(tiny_pipe):
    with pytest.raises(PFBDiffError, match="'dog' does not occur in the prompt 'a cat on a bench'"):
        token_positions(tiny_pipe.tokenizer, "a cat on a bench", "dog")


def test_integers_are_raw_positions_and_zero_is_refused(tiny_pipe):
    assert token_positions(tiny_pipe.tokenizer, "a cat", 2) == (2,)
    with pytest.raises(PFBDiffError, match="start token"):
        token_positions(tiny_pipe.tokenizer, "a cat", 0)


def test_new_and_shared_content_words():
    assert new_words("a cat sitting on a bench", "a dog sitting on a bench") == ["dog"]
    assert subject_words("a dog is standing on grass", "a dog is standing in a desert area") == ["dog", "standing"]
    assert subject_words("a red circle on a plain yellow background", "a red circle on a striped blue background") == [
        "red", "circle"]  # "background" is shared but is what changes
