"""Words → token positions with the real tokenizer (docs/method.md §5): every BPE piece, every occurrence."""

import pytest
from helpers import tiny_sentencepiece_tokenizer

from pfbdiff.engine.tokens import (
    joined_positions,
    new_words,
    positions_of,
    split_at_token_limit,
    subject_words,
    token_positions,
    tokenizer_words,
)
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


def test_new_and_shared_content_words(tiny_pipe):
    tok = tiny_pipe.tokenizer
    assert new_words(tok, "a cat sitting on a bench", "a dog sitting on a bench") == ["dog"]
    assert subject_words(tok, "a dog is standing on grass", "a dog is standing in a desert area") == ["dog", "standing"]
    assert subject_words(tok, "a red circle on a plain yellow background",
                         "a red circle on a striped blue background") == ["red", "circle"]  # "background" changes


def test_the_subject_of_a_background_edit_stops_before_the_phrase_that_changes(tiny_pipe):
    """Words that open the changed phrase describe the new background: confined to the subject (and, in the
    background preset, added to the negative prompt) they would be kept out of the very region they describe."""
    tok = tiny_pipe.tokenizer
    assert subject_words(tok, "a cat on a wooden bench", "a cat on a wooden floor") == ["cat"]
    assert subject_words(tok, "a blue triangle and a yellow square on a checkered orange background",
                         "a blue triangle and a yellow square on a checkered red background") == [
        "blue", "triangle", "yellow", "square"]
    assert subject_words(tok, "a dog is standing on grass", "a dog is standing on sand") == ["dog", "standing"]


def test_words_are_split_as_the_tokenizer_splits_them(tiny_pipe):
    """Accents, other scripts and emoji are whole words, lower-cased as the tokenizer does; punctuation is not."""
    tok = tiny_pipe.tokenizer
    prompt = "a Blue square 🟦 on a plain yellow background — ünïcödé 猫 ✨, dog's"
    assert tokenizer_words(tok, prompt) == ["a", "blue", "square", "🟦", "on", "a", "plain", "yellow", "background",
                                            "—", "ünïcödé", "猫", "✨,", "dog", "'s"]
    assert new_words(tok, "a red square on a plain yellow background", prompt) == [
        "blue", "🟦", "ünïcödé", "猫", "✨,", "dog"]


def test_every_automatic_word_of_any_prompt_is_found_again(tiny_pipe):
    """Whatever the script, the words chosen automatically are words the tokenizer finds in the prompt."""
    tok = tiny_pipe.tokenizer
    for prompt in ("a blue square 🟦 on a plain yellow background — ünïcödé 猫 ✨", "Ελληνικά και русский 2024!",
                   "naïve café déjà-vu", "cat\tdog\n  bird"):
        words = new_words(tok, "", prompt)
        assert words, prompt
        for word in words:
            assert token_positions(tok, prompt, word), word


def test_a_prompt_is_cut_at_the_token_limit_on_a_word_boundary(tiny_pipe):
    tok = tiny_pipe.tokenizer
    assert split_at_token_limit(tok, "a cat on a bench") == ("a cat on a bench", None)
    prompt = "a cat on a bench, " + "giraffe " * 60 + "and a blue dog"
    seen, cut = split_at_token_limit(tok, prompt)
    assert f"{seen} {cut}" == prompt
    assert cut.endswith("and a blue dog") and cut.startswith("giraffe")  # whole words, not BPE pieces
    assert len(tok(seen).input_ids) <= tok.model_max_length < len(tok(seen + " " + cut.split()[0]).input_ids)


def test_a_word_past_the_token_limit_is_named_as_cut_not_as_missing(tiny_pipe):
    tok = tiny_pipe.tokenizer
    prompt = "a cat on a bench, " + "giraffe " * 60 + "and a blue dog"
    with pytest.raises(PFBDiffError, match="'blue' lies past the text encoder's 77-token limit.*'giraffe"):
        token_positions(tok, prompt, "blue")
    assert token_positions(tok, prompt, "cat") == (2,)


def test_a_cut_prompt_is_warned_about_naming_what_the_model_does_not_see(tiny_pipe):
    with pytest.warns(UserWarning, match="does not see its end: 'giraffe.*and a blue dog'"):
        tiny_pipe.encode_prompt(["a cat on a bench, " + "giraffe " * 60 + "and a blue dog"])


# -- SentencePiece (T5) tokenizers: no start token, and words spelt differently in context


def test_sentencepiece_words_map_to_all_their_pieces_from_position_zero():
    tokenizer = tiny_sentencepiece_tokenizer()
    prompt = "a red giraffes on a bench"  # ▁a ▁red ▁gira ffe s ▁on ▁a ▁bench </s>
    assert token_positions(tokenizer, prompt, "giraffes") == (2, 3, 4)
    assert token_positions(tokenizer, prompt, "a") == (0, 6)  # the first word is a word: T5 has no start token


def test_a_sentencepiece_word_spelt_differently_in_context_is_found_by_its_characters():
    tokenizer = tiny_sentencepiece_tokenizer()
    prompt = "a (cat) on a bench"  # ▁a ▁( c a t ) ▁on ▁a ▁bench: "cat" alone would be ▁cat
    ids = tokenizer(prompt).input_ids
    assert tokenizer("cat", add_special_tokens=False).input_ids[0] not in ids
    positions = token_positions(tokenizer, prompt, "cat")
    assert tokenizer.convert_ids_to_tokens([ids[p] for p in positions]) == ["c", "a", "t"]
    assert token_positions(tokenizer, prompt, "a") == (0, 7)  # whole words only: not the "a" inside "cat"


def test_a_sentencepiece_word_past_the_token_limit_is_named_as_cut():
    tokenizer = tiny_sentencepiece_tokenizer(model_max_length=6)
    with pytest.raises(PFBDiffError, match="token limit"):
        token_positions(tokenizer, "a red giraffes on a (cat)", "cat")


def test_in_sd3s_joined_text_a_word_is_found_in_the_clip_part_and_in_the_t5_part(tiny_pipe):
    clip, t5 = tiny_pipe.tokenizer, tiny_sentencepiece_tokenizer()
    prompt = "a red giraffes on a bench"
    clip_part = token_positions(clip, prompt, "giraffes")
    positions = joined_positions([(clip, 77), (t5, 16)], prompt, ["giraffes"])
    assert positions == clip_part + (77 + 2, 77 + 3, 77 + 4)  # T5: ▁gira ffe s, after the 77 CLIP places
