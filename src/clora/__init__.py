"""CLoRA: contrastive test-time composition of several LoRA models for Stable Diffusion and FLUX.1."""

from .errors import CLoRAError
from .spec import CompositionSpec, ConceptSpec, StyleSpec, load_spec, spec_from_dict
from .tokens import TokenPlan, plan_tokens

__version__ = "0.1.0"

__all__ = [
    "CLoRAError",
    "CLoRAFluxPipeline",
    "CLoRAOutput",
    "CLoRAPipeline",
    "CLoRAXLPipeline",
    "CompositionSpec",
    "ConceptSpec",
    "StyleSpec",
    "TokenPlan",
    "load_spec",
    "plan_tokens",
    "spec_from_dict",
]


def __getattr__(name: str):
    # The pipeline pulls in diffusers; keep `import clora` light for spec/token work and --dry-run.
    if name in ("CLoRAPipeline", "CLoRAXLPipeline", "CLoRAFluxPipeline"):
        from . import family_pipelines

        return getattr(family_pipelines, name)
    if name == "CLoRAOutput":
        from .output import CLoRAOutput

        return CLoRAOutput
    raise AttributeError(name)
