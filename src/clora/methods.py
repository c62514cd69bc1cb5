"""Composition methods as policies over the one branch runner.

A method says which prompt branches exist (each branch's prompt and concept LoRAs; style LoRAs join
every branch), which of them run at a step, whether the latent gets CLoRA's contrastive update, and
how the branches' noise predictions fuse. The denoising loop in ``pipeline`` is the same for all.

- ``clora``: N+1 branches (the prompt with the styles alone; prompt i with concept i's trigger and
  LoRA), the contrastive update, fusion by attention masks (ALGORITHM.md).
- ``merge``: one branch, the trigger prompt with every concept LoRA at once (diffusers'
  ``set_adapters``).
- ``switch`` (LoRA Switch, Zhong et al. 2024): one branch per concept LoRA on the trigger prompt;
  one runs at a time, the next every ``switch_every`` steps (unset: Zhong et al.'s rate of 5 steps in
  100, ``switch_interval``).
- ``composite`` (LoRA Composite, same paper): one branch per concept LoRA on the trigger prompt,
  all every step, their guided predictions averaged.

The trigger prompt is the prompt with every concept's trigger in place of its phrase.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Method:
    branches: str  # "base_and_each_concept" | "all_concepts" | "each_concept"
    contrastive_update: bool
    masked_fusion: bool  # fuse by attention masks; else a uniform average of the running branches
    one_branch_at_a_time: bool = False

    def branch_layout(self, prompts: tuple[str, ...], trigger_prompt: str, n: int) -> list[tuple[str, tuple[int, ...]]]:
        """(prompt, concept indices) of every branch. ``prompts`` are CLoRA's N+1 prompts."""
        if self.branches == "base_and_each_concept":
            return [(prompts[0], ())] + [(prompts[c + 1], (c,)) for c in range(n)]
        if self.branches == "all_concepts":
            return [(trigger_prompt, tuple(range(n)))]
        return [(trigger_prompt, (c,)) for c in range(n)]

    def running(self, step: int, branches: int, switch_every: int) -> tuple[int, ...]:
        """The branches that run at denoising step ``step``."""
        if self.one_branch_at_a_time:
            return ((step // switch_every) % branches,)
        return tuple(range(branches))


SWITCH_RATE = (5, 100)
"""Zhong et al. switch LoRAs every 5 of their 100-200 steps."""


def switch_interval(steps: int, switch_every: int | None = None) -> int:
    """LoRA Switch's steps per turn: ``switch_every`` when given, else the paper's rate scaled to
    ``steps`` (5 per 100, rounded down, at least 1): 1 for 20-39 steps, 2 for 50, 5 for 100."""
    if switch_every is not None:
        return switch_every
    every, per = SWITCH_RATE
    return max(1, steps * every // per)


METHODS: dict[str, Method] = {
    "clora": Method("base_and_each_concept", contrastive_update=True, masked_fusion=True),
    "merge": Method("all_concepts", contrastive_update=False, masked_fusion=False),
    "switch": Method("each_concept", contrastive_update=False, masked_fusion=False, one_branch_at_a_time=True),
    "composite": Method("each_concept", contrastive_update=False, masked_fusion=False),
}
