"""Scheduler names a spec may use, mapped to diffusers scheduler classes and options."""

from __future__ import annotations

import inspect
from typing import Any

from .errors import CLoRAError

# name -> (diffusers class name, extra config)
SCHEDULERS: dict[str, tuple[str, dict[str, Any]]] = {
    "ddim": ("DDIMScheduler", {}),
    "ddpm": ("DDPMScheduler", {}),
    "pndm": ("PNDMScheduler", {"skip_prk_steps": True}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "lms": ("LMSDiscreteScheduler", {}),
    "dpm++": ("DPMSolverMultistepScheduler", {}),
    "dpm++_karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    "dpm++_sde": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}),
    "unipc": ("UniPCMultistepScheduler", {}),
    # rectified flow (Flux): Euler on the flow-matching ODE, shifted by the image size as FluxPipeline does
    "flow_euler": ("FlowMatchEulerDiscreteScheduler", {}),
}


def check_scheduler_name(name: str, field: str = "scheduler") -> str:
    if name not in SCHEDULERS:
        raise CLoRAError(f"{field}: unknown scheduler {name!r}; expected one of {', '.join(SCHEDULERS)}")
    return name


def make_scheduler(name: str, base_config: Any) -> Any:
    """A fresh scheduler of the named kind built on the model's own scheduler config."""
    import diffusers  # here, so that ``import clora`` (spec, tokens, --dry-run) stays light

    class_name, extra = SCHEDULERS[check_scheduler_name(name)]
    return getattr(diffusers, class_name).from_config(base_config, **extra)


def accepts_generator(scheduler: Any) -> bool:
    """Whether ``scheduler.step`` takes ``generator=`` (the stochastic ones); PNDM, Heun, LMS and UniPC don't."""
    return "generator" in inspect.signature(scheduler.step).parameters
