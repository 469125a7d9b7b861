"""Per-target recipes (which passes, which precision, the device's limits) and the package builders."""

from targets.base import Target, TargetError
from targets.cpu import CPU
from targets.mobile import MOBILE_TARGETS
from targets.tensorrt import JETSON_TARGETS, TENSORRT

TARGETS: dict[str, Target] = {t.name: t for t in (CPU, TENSORRT, *JETSON_TARGETS, *MOBILE_TARGETS)}


def get_target(name: str) -> Target:
    if name not in TARGETS:
        raise TargetError(f"unknown target '{name}'; choose from: {', '.join(TARGETS)}")
    return TARGETS[name]


__all__ = ["TARGETS", "Target", "TargetError", "get_target"]
