"""From phrases to prompts and token positions, with the model's own tokenizer.

CLoRA needs, for every concept, the token positions that name it in each of the N+1 prompts, and
for every concept prompt the positions of its own concept (its mask tokens). Users write phrases;
this module finds them as whole words (``cat`` never matches ``catapult``), builds each LoRA's
prompt by putting its trigger in place of its phrase, and maps character spans to token positions.
CLIP's BPE and T5's sentencepiece both work word by word, so the tokens of a prefix that ends at a
word boundary are exactly the tokens before the phrase; every derived position is checked against the
prompt's token ids. Positions count the text encoder's sequence: with CLIP position 0 is BOS and the
words start at 1; T5 (Flux) has no BOS, so its words start at 0. A phrase may be several tokens.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from .errors import CLoRAError
from .spec import CompositionSpec


class Tokenizer(Protocol):
    model_max_length: int

    def __call__(self, text: str, add_special_tokens: bool = ...) -> Any: ...

    def convert_ids_to_tokens(self, ids: Sequence[int]) -> list[str]: ...


@dataclass(frozen=True)
class TokenPlan:
    """The resolved prompts and positions: what ``--dry-run`` prints and the pipeline uses."""

    prompts: tuple[str, ...]
    tokens: tuple[tuple[str, ...], ...]  # token strings per prompt, BOS (CLIP) and EOS included
    concept_tokens: tuple[tuple[tuple[int, ...], ...], ...]  # [concept][prompt] -> positions
    mask_tokens: tuple[tuple[int, ...], ...]  # [prompt] -> positions; prompt 0 (background) is empty
    truncated: tuple[str, ...] = ()  # [prompt] -> the words the text encoder never sees ("" = none)

    def to_json(self) -> dict[str, Any]:
        as_lists = lambda x: [as_lists(y) for y in x] if isinstance(x, (list, tuple)) else x
        return {
            "prompts": list(self.prompts),
            "tokens": as_lists(self.tokens),
            "concept_tokens": as_lists(self.concept_tokens),
            "mask_tokens": as_lists(self.mask_tokens),
        }


def find_phrase(text: str, phrase: str, occurrence: int = 1) -> tuple[int, int] | None:
    """Character span of the ``occurrence``-th whole-word match of ``phrase`` in ``text``.

    Case-insensitive; runs of whitespace in the phrase match any whitespace. A match may not
    start or end inside a word (letters or digits), so ``cat`` does not match ``catapult`` or
    ``wildcat`` but does match ``cat,`` and ``cat's``.
    """
    words = phrase.split()
    if not words:
        return None
    pattern = r"(?<![^\W_])" + r"\s+".join(re.escape(w) for w in words) + r"(?![^\W_])"
    matches = list(re.finditer(pattern, text, flags=re.IGNORECASE))
    if len(matches) < occurrence:
        return None
    return matches[occurrence - 1].span()


def token_ids(tokenizer: Tokenizer, text: str) -> list[int]:
    """Ids of ``text`` without BOS/EOS and without truncation."""
    return list(tokenizer(text, add_special_tokens=False).input_ids)


class PromptTruncatedWarning(UserWarning):
    """A prompt is longer than the text encoder's token limit; its last words are dropped."""


def first_word_position(tokenizer: Tokenizer) -> int:
    """1 where the tokenizer starts a sequence with BOS (CLIP), 0 where it does not (T5)."""
    bos = getattr(tokenizer, "bos_token_id", None)
    return int(bos is not None and list(tokenizer("a").input_ids[:1]) == [bos])


def word_limit(tokenizer: Tokenizer) -> int:
    """How many word tokens fit the text encoder with its special tokens (BOS, EOS)."""
    return tokenizer.model_max_length - 1 - first_word_position(tokenizer)


def dropped_words(tokenizer: Tokenizer, prompt: str) -> str:
    """The end of ``prompt`` that falls past the text encoder's limit (BOS and EOS included), as the
    user wrote it, from the first word that loses any token; ``""`` when the whole prompt fits."""
    limit = word_limit(tokenizer)
    if len(token_ids(tokenizer, prompt)) <= limit:
        return ""
    words = list(re.finditer(r"\S+", prompt))
    lo, hi = 0, len(words) - 1  # the first word whose end is past the limit: the prompt's tokens grow with it
    while lo < hi:
        mid = (lo + hi) // 2
        if len(token_ids(tokenizer, prompt[: words[mid].end()])) > limit:
            hi = mid
        else:
            lo = mid + 1
    return prompt[words[lo].start() :].strip()


def truncation_messages(plan: TokenPlan, spec: CompositionSpec, limit: int = 77) -> list[str]:
    """One line per prompt that lost words, naming the prompt and the words."""
    lines = []
    for i, dropped in enumerate(plan.truncated):
        if dropped:
            whose = "the prompt" if i == 0 else f"the prompt of concepts[{i - 1}] ({spec.concepts[i - 1].label!r})"
            lines.append(
                f"{whose} is longer than the text encoder's {limit} tokens; these words are dropped: {dropped!r}"
            )
    return lines


def span_positions(tokenizer: Tokenizer, text: str, span: tuple[int, int], ids: Sequence[int]) -> list[int]:
    """Token positions (in the encoder's sequence: BOS = 0 for CLIP) covering the character span
    ``span`` of ``text``.

    ``ids`` are the ids of the whole text (no special tokens), used to check the alignment.
    """
    start, end = span
    before = token_ids(tokenizer, text[:start])
    inside = token_ids(tokenizer, text[start:end])
    first = len(before)
    if not inside or list(ids[first : first + len(inside)]) != inside:
        raise CLoRAError(f"cannot align {text[start:end]!r} with the tokens of {text!r}; give the positions explicitly")
    offset = first_word_position(tokenizer)
    return [offset + first + k for k in range(len(inside))]


def plan_tokens(tokenizer: Tokenizer, spec: CompositionSpec) -> TokenPlan:
    """Derive (or validate, where the spec gives them) prompts, concept and mask token positions."""
    n = len(spec.concepts)
    prompts, spans = _prompts_and_spans(spec) if spec.prompts is None else (tuple(spec.prompts), None)
    ids = [token_ids(tokenizer, p) for p in prompts]
    limit, offset = word_limit(tokenizer), first_word_position(tokenizer)

    if spec.concept_tokens is not None:
        concept_tokens = spec.concept_tokens
    else:
        concept_tokens = tuple(
            tuple(tuple(_derived_positions(tokenizer, spec, prompts, ids, spans, c, i, limit)) for i in range(n + 1))
            for c in range(n)
        )
    for c, per_prompt in enumerate(concept_tokens):
        for i, positions in enumerate(per_prompt):
            _check_positions(
                positions, len(ids[i]), limit, offset, f"concept_tokens[{c}][{i}]", prompts[i], allow_empty=False
            )

    if spec.mask_tokens is not None:
        mask_tokens = spec.mask_tokens
        for i, positions in enumerate(mask_tokens):
            _check_positions(positions, len(ids[i]), limit, offset, f"mask_tokens[{i}]", prompts[i], allow_empty=i == 0)
        if mask_tokens[0]:
            raise CLoRAError("mask_tokens[0]: prompt 0 is the background and has no mask tokens; expected []")
    else:
        mask_tokens = ((),) + tuple(concept_tokens[c][c + 1] for c in range(n))

    bos = [_bos(tokenizer)] if offset else []
    tokens = tuple(tuple(tokenizer.convert_ids_to_tokens(bos + i[:limit] + [_eos(tokenizer)])) for i in ids)
    truncated = tuple(dropped_words(tokenizer, p) if len(i) > limit else "" for p, i in zip(prompts, ids))
    plan = TokenPlan(
        prompts=prompts, tokens=tokens, concept_tokens=concept_tokens, mask_tokens=mask_tokens, truncated=truncated
    )
    for message in truncation_messages(plan, spec, tokenizer.model_max_length):
        warnings.warn(message, PromptTruncatedWarning, stacklevel=2)
    return plan


def trigger_prompt(spec: CompositionSpec) -> str:
    """The prompt with every concept's trigger in place of its phrase: the one prompt of the
    methods that run every LoRA on the same words (``methods``)."""
    prompt = spec.prompt
    spans = _concept_spans(spec)
    for c in sorted(range(len(spans)), key=lambda k: spans[k][0], reverse=True):
        start, end = spans[c]
        prompt = prompt[:start] + (spec.concepts[c].trigger or prompt[start:end]) + prompt[end:]
    return prompt


def _concept_spans(spec: CompositionSpec) -> list[tuple[int, int]]:
    """The character span of every concept's phrase in the prompt; phrases may not overlap."""
    base_spans: list[tuple[int, int]] = []
    for c, concept in enumerate(spec.concepts):
        span = find_phrase(spec.prompt, concept.phrase, concept.occurrence)
        if span is None:
            nth = "" if concept.occurrence == 1 else f" (occurrence {concept.occurrence})"
            raise CLoRAError(
                f"concepts[{c}].phrase: {concept.phrase!r}{nth} is not a whole word/phrase of the prompt {spec.prompt!r}"
            )
        for other, other_span in enumerate(base_spans):
            if span[0] < other_span[1] and other_span[0] < span[1]:
                raise CLoRAError(
                    f"concepts[{c}].phrase: {concept.phrase!r} overlaps the words of concepts[{other}] "
                    f"({spec.concepts[other].phrase!r}); each concept must own different words "
                    "(use occurrence: 2 for a repeated phrase)"
                )
        base_spans.append(span)
    return base_spans


def _prompts_and_spans(spec: CompositionSpec) -> tuple[tuple[str, ...], list[list[tuple[int, int]]]]:
    """Prompt 0 is the base prompt; prompt i puts concept i's trigger in place of its phrase.

    Returns the prompts and, per prompt, the character span of every concept in it.
    """
    base_spans = _concept_spans(spec)
    prompts = [spec.prompt]
    spans = [base_spans]
    for c, concept in enumerate(spec.concepts):
        start, end = base_spans[c]
        trigger = concept.trigger or spec.prompt[start:end]
        delta = len(trigger) - (end - start)
        prompts.append(spec.prompt[:start] + trigger + spec.prompt[end:])
        spans.append(
            [
                (start, start + len(trigger)) if k == c else ((s + delta, e + delta) if s >= end else (s, e))
                for k, (s, e) in enumerate(base_spans)
            ]
        )
    return tuple(prompts), spans


def _derived_positions(
    tokenizer: Tokenizer,
    spec: CompositionSpec,
    prompts: Sequence[str],
    ids: Sequence[Sequence[int]],
    spans: list[list[tuple[int, int]]] | None,
    c: int,
    i: int,
    limit: int,
) -> list[int]:
    concept = spec.concepts[c]
    if spans is not None:
        span = spans[i][c]
    else:  # explicit prompts: look the words up in them
        words = concept.trigger_text if i == c + 1 else concept.phrase
        span = find_phrase(prompts[i], words, concept.occurrence if i != c + 1 else 1)
        if span is None:
            raise CLoRAError(
                f"prompts[{i}]: {words!r} of concept {concept.label!r} is not in {prompts[i]!r}; "
                "give concept_tokens explicitly"
            )
    positions = span_positions(tokenizer, prompts[i], span, ids[i])
    if positions[-1] >= limit + first_word_position(tokenizer):
        raise CLoRAError(
            f"concepts[{c}]: {concept.label!r} ends at token {positions[-1]} of prompt {i}, past the text "
            f"encoder's {tokenizer.model_max_length}-token limit; shorten the prompt {prompts[i][:40]!r}..."
        )
    return positions


def _check_positions(
    positions: Sequence[int], n_tokens: int, limit: int, offset: int, name: str, prompt: str, allow_empty: bool
) -> None:
    if not positions and not allow_empty:
        raise CLoRAError(f"{name}: expected at least one token position")
    first, last_word = offset, offset + min(n_tokens, limit) - 1
    for p in positions:
        if p == 0 and offset:
            raise CLoRAError(
                f"{name}: position 0 is the BOS token; the words of {prompt!r} are at {first}..{last_word}"
            )
        if not first <= p <= last_word:
            what = "EOS/padding" if last_word < p <= limit + offset else "out of range"
            raise CLoRAError(f"{name}: position {p} is {what}; the words of {prompt!r} are at {first}..{last_word}")


def _bos(tokenizer: Tokenizer) -> int:
    return int(tokenizer.bos_token_id)  # type: ignore[attr-defined]


def _eos(tokenizer: Tokenizer) -> int:
    return int(tokenizer.eos_token_id)  # type: ignore[attr-defined]
