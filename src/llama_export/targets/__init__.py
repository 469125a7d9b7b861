"""Per-target recipes (which passes, which precision, the device's limits) and the package builders."""

from llama_export.targets.base import Target, TargetError
from llama_export.targets.cpu import CPU
from llama_export.targets.mobile import MOBILE_TARGETS
from llama_export.targets.tensorrt import JETSON_TARGETS, TENSORRT

TARGETS: dict[str, Target] = {t.name: t for t in (CPU, TENSORRT, *JETSON_TARGETS, *MOBILE_TARGETS)}


def get_target(name: str) -> Target:
    if name not in TARGETS:
        raise TargetError(f"unknown target '{name}'; choose from: {', '.join(TARGETS)}")
    return TARGETS[name]


__all__ = ["TARGETS", "Target", "TargetError", "get_target"]
