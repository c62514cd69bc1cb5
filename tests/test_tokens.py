import pytest

from clora import CLoRAError, plan_tokens, spec_from_dict
from clora.tokens import PromptTruncatedWarning, dropped_words, find_phrase, trigger_prompt


def _spec(prompt, *concepts, **extra):
    return spec_from_dict(
        {"prompt": prompt, "concepts": [{"lora": f"l{i}.safetensors", **c} for i, c in enumerate(concepts)], **extra}
    )


def test_real_sd15_ids_and_bos_aware_positions(sd15_tokenizer):
    assert sd15_tokenizer("a sks dog").input_ids == [49406, 320, 48136, 1929, 49407]
    plan = plan_tokens(
        sd15_tokenizer,
        _spec("A cat and a dog", {"phrase": "cat", "trigger": "sks cat"}, {"phrase": "dog", "trigger": "sks dog"}),
    )
    assert plan.prompts == ("A cat and a dog", "A sks cat and a dog", "A cat and a sks dog")
    assert plan.tokens[0] == ("<|startoftext|>", "a</w>", "cat</w>", "and</w>", "a</w>", "dog</w>", "<|endoftext|>")
    assert plan.concept_tokens == (((2,), (2, 3), (2,)), ((5,), (6,), (5, 6)))
    assert plan.mask_tokens == ((), (2, 3), (5, 6))


# prompt, phrase, trigger, expected positions in prompt 0, expected positions in the concept's own prompt
TRICKY = [
    ("a cat near a catapult", "cat", "sks cat", (2,), (2, 3)),  # not the 'cat' inside 'catapult'
    ("a catapult near a cat", "cat", None, (6,), (6,)),
    ("a teddybear on a bed", "teddybear", "zwx teddybear", (2, 3), (2, 3, 4, 5)),  # one word, two tokens
    ("a photo of the Eiffel Tower, at night", "eiffel tower", None, (5, 6), (5, 6)),  # multi-word, any case
    ("A ZWX toy", "zwx toy", None, (2, 3, 4), (2, 3, 4)),  # multi-token trigger word
    ("CAT!!! and a dog", "cat", "sks cat", (1,), (1, 2)),  # punctuation, case
    ("a dog's ball", "dog", "sks dog", (2,), (2, 3)),  # possessive
    ("a wildcat and a cat", "cat", None, (5,), (5,)),  # not the end of 'wildcat'
    ("a  red\tcar", "red car", None, (2, 3), (2, 3)),  # any whitespace between words
]


@pytest.mark.parametrize("prompt, phrase, trigger, base, own", TRICKY)
def test_tricky_prompts(sd15_tokenizer, prompt, phrase, trigger, base, own):
    plan = plan_tokens(sd15_tokenizer, _spec(prompt, {"phrase": phrase, "trigger": trigger}))
    assert plan.concept_tokens[0][0] == base
    assert plan.concept_tokens[0][1] == own
    assert plan.mask_tokens[1] == own
    own_tokens = "".join(plan.tokens[1][p] for p in own).replace("</w>", " ").strip()
    assert own_tokens == (trigger or phrase).lower().replace("  ", " ")


def test_occurrence_picks_a_later_match(sd15_tokenizer):
    plan = plan_tokens(
        sd15_tokenizer,
        _spec(
            "a dog and another dog",
            {"phrase": "dog", "trigger": "sks dog"},
            {"phrase": "dog", "occurrence": 2, "trigger": "zwx dog"},
        ),
    )
    assert plan.prompts[1] == "a sks dog and another dog"
    assert plan.prompts[2] == "a dog and another zwx dog"
    assert plan.concept_tokens == (((2,), (2, 3), (2,)), ((5,), (6,), (5, 6, 7)))  # z, wx, dog


def test_find_phrase_whole_words_only():
    assert find_phrase("a catapult", "cat") is None
    assert find_phrase("a cat, a dog", "cat") == (2, 5)
    assert find_phrase("one Dog two dog", "dog", occurrence=2) == (12, 15)


def test_phrase_missing_or_shared_words_are_errors(sd15_tokenizer):
    with pytest.raises(CLoRAError, match=r"concepts\[0\]\.phrase: 'cat' is not a whole word"):
        plan_tokens(sd15_tokenizer, _spec("a catapult", {"phrase": "cat"}))
    with pytest.raises(CLoRAError, match="overlaps the words of concepts"):
        plan_tokens(sd15_tokenizer, _spec("a red car", {"phrase": "red car"}, {"phrase": "car"}))


def test_concept_past_the_77_token_limit_is_an_error(sd15_tokenizer):
    prompt = "a " + "very " * 80 + "big dog"
    with pytest.raises(CLoRAError, match="77-token limit"):
        plan_tokens(sd15_tokenizer, _spec(prompt, {"phrase": "dog"}))
    with pytest.warns(PromptTruncatedWarning):
        plan = plan_tokens(sd15_tokenizer, _spec("a dog " + "very " * 80, {"phrase": "dog"}))
    assert plan.concept_tokens[0][0] == (2,) and len(plan.tokens[0]) == 77


def test_explicit_positions_are_validated(sd15_tokenizer):
    base = {"prompts": ["a cat and a dog", "a sks cat and a dog", "a cat and a sks dog"]}
    ok = _spec(
        "a cat and a dog",
        {"phrase": "cat"},
        {"phrase": "dog"},
        **base,
        concept_tokens=[[[2], [2, 3], [2]], [[5], [6], [5, 6]]],
        mask_tokens=[[], [2, 3], [5, 6]],
    )
    assert plan_tokens(sd15_tokenizer, ok).mask_tokens == ((), (2, 3), (5, 6))
    for bad, message in [
        ([[[0], [2, 3], [2]], [[5], [6], [5, 6]]], "position 0 is the BOS"),
        ([[[2], [2, 3], [2]], [[6], [6], [5, 6]]], "position 6 is EOS/padding"),
        ([[[2], [2, 3], [2]], [[5], [90], [5, 6]]], "position 90 is out of range"),
    ]:
        with pytest.raises(CLoRAError, match=message):
            plan_tokens(
                sd15_tokenizer,
                _spec("a cat and a dog", {"phrase": "cat"}, {"phrase": "dog"}, **base, concept_tokens=bad),
            )
    with pytest.raises(CLoRAError, match=r"mask_tokens\[0\]"):
        plan_tokens(
            sd15_tokenizer,
            _spec("a cat and a dog", {"phrase": "cat"}, {"phrase": "dog"}, **base, mask_tokens=[[1], [2, 3], [5, 6]]),
        )


def test_explicit_prompts_derive_positions_from_phrases(sd15_tokenizer):
    spec = _spec(
        "a cat and a dog",
        {"phrase": "cat", "trigger": "sks cat"},
        {"phrase": "dog", "trigger": "sks dog"},
        prompts=["a cat and a dog", "a photo of a sks cat and a dog", "a cat and a sks dog"],
    )
    plan = plan_tokens(sd15_tokenizer, spec)
    assert plan.concept_tokens[0][1] == (5, 6) and plan.concept_tokens[1][1] == (9,)
    bad = _spec(
        "a cat and a dog",
        {"phrase": "cat"},
        {"phrase": "dog"},
        prompts=["a cat and a dog", "a cat and a puppy", "a cat and a dog"],
    )
    with pytest.raises(CLoRAError, match=r"prompts\[1\]: 'dog'"):
        plan_tokens(sd15_tokenizer, bad)


def test_words_past_the_77_token_limit_are_named_for_every_prompt(sd15_tokenizer):
    prompt = "a cat and a dog in a garden, " + "very " * 80 + "detailed painting"
    spec = _spec(prompt, {"phrase": "cat", "trigger": "sks cat"}, {"phrase": "dog"})
    with pytest.warns(PromptTruncatedWarning) as caught:
        plan = plan_tokens(sd15_tokenizer, spec)
    assert issubclass(PromptTruncatedWarning, UserWarning)
    assert len(plan.truncated) == 3 and all(plan.truncated)
    for text, dropped in zip(plan.prompts, plan.truncated):
        assert text.endswith(dropped) and dropped.endswith("very detailed painting")
        kept = text[: len(text) - len(dropped)]
        # what is kept fits in the 75 word tokens; the first dropped word does not
        assert len(sd15_tokenizer(kept, add_special_tokens=False).input_ids) <= 75
        first_dropped = dropped.split()[0]
        assert len(sd15_tokenizer(kept + first_dropped, add_special_tokens=False).input_ids) > 75
    # "sks cat" is one token longer than "cat": that prompt loses one more word
    assert len(plan.truncated[1].split()) == len(plan.truncated[0].split()) + 1
    messages = [str(w.message) for w in caught]
    assert len(messages) == 3 and "concepts[0] ('cat')" in messages[1] and plan.truncated[2] in messages[2]


def test_dropped_words_keeps_the_users_spelling_and_is_empty_when_all_fits(sd15_tokenizer):
    assert dropped_words(sd15_tokenizer, "A Cat and a Dog") == ""
    long = "A photo of " + "Many " * 72 + "Red Roses!"  # 3 + 72 tokens fill the 75 word slots
    assert dropped_words(sd15_tokenizer, long) == "Red Roses!"
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing cut: no warning
        assert plan_tokens(sd15_tokenizer, _spec("a cat", {"phrase": "cat"})).truncated == ("", "")


def test_trigger_prompt_puts_every_trigger_in_place_of_its_phrase():
    spec = _spec(
        "a dog, a cat and another cat",
        {"phrase": "cat", "occurrence": 2, "trigger": "sks cat"},
        {"phrase": "dog", "trigger": "zwx small dog"},
        {"phrase": "a cat"},  # no trigger: its words stay
    )
    assert trigger_prompt(spec) == "a zwx small dog, a cat and another sks cat"
