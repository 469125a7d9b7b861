"""Model families: what differs between architectures, in one place per family (families/llama.py), registered
by name. Sources, tracing, calibration, verify, the memory planner and the package writer ask the family of a
config rather than naming LLaMA's classes. This room calls none of the others (transformers is imported lazily)."""

from __future__ import annotations

from llama_export.families.base import FamilyConfigError, ModelFamily, UnsupportedFamily
from llama_export.families.llama import LLAMA
from llama_export.families.llama4 import LLAMA4

FAMILIES: dict[str, ModelFamily] = {}


def register(family: ModelFamily) -> ModelFamily:
    """Make a family known: configs whose model_type it lists, GGUF files of its architecture."""
    for other in FAMILIES.values():
        taken = set(other.model_types) & set(family.model_types)
        if other is not family and taken:
            raise ValueError(f"model_type {sorted(taken)} is family '{other.name}''s already")
    FAMILIES[family.name] = family
    return family


register(LLAMA)
register(LLAMA4)
BUILT_IN = frozenset(FAMILIES)  # what every interpreter registers on import


def model_types() -> list[str]:
    return [t for family in FAMILIES.values() for t in family.model_types]


def family_for(model_type) -> ModelFamily:
    """The family of a config's model_type (UnsupportedFamily when none is registered)."""
    for family in FAMILIES.values():
        if model_type in family.model_types:
            return family
    raise UnsupportedFamily(model_type, model_types())


def family_for_multimodal(model_type) -> ModelFamily | None:
    """The family whose text model a multimodal checkpoint of this model_type holds (None: not one)."""
    return next((f for f in FAMILIES.values() if model_type in f.multimodal_types), None)


def family_for_gguf(architecture) -> ModelFamily:
    """The family of a GGUF file's general.architecture."""
    for family in FAMILIES.values():
        if family.gguf_architecture is not None and architecture == family.gguf_architecture:
            return family
    raise UnsupportedFamily(architecture, model_types())


def family_of(config) -> ModelFamily:
    """The family of a config (a transformers config or a config.json dict); one without a model_type is LLaMA's,
    as configs written by hand for `llama-export plan` often are."""
    model_type = config.get("model_type") if isinstance(config, dict) else getattr(config, "model_type", None)
    return family_for(model_type or LLAMA.model_types[0])


__all__ = ["BUILT_IN", "FAMILIES", "FamilyConfigError", "ModelFamily", "UnsupportedFamily", "family_for",
           "family_for_gguf", "family_for_multimodal", "family_of",
           "model_types", "register"]
