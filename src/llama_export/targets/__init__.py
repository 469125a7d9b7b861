"""Per-target recipes (which passes, which precision, the device's limits, the INT4 preset, the finishing) and the
package builders. A new target is one file defining a Target and calling register() (imported below)."""

from llama_export.targets.base import Finished, Finishing, Target, TargetError
from llama_export.targets.cpu import CPU
from llama_export.targets.mobile import MOBILE_TARGETS
from llama_export.targets.tensorrt import JETSON_TARGETS, TENSORRT

TARGETS: dict[str, Target] = {}


def register(target: Target) -> Target:
    """Make a target known to the exporter and the command line (`--target NAME`, `llama-export targets`)."""
    if target.name in TARGETS and TARGETS[target.name] is not target:
        raise ValueError(f"a target named '{target.name}' is registered already")
    TARGETS[target.name] = target
    return target


for _target in (CPU, TENSORRT, *JETSON_TARGETS, *MOBILE_TARGETS):
    register(_target)
BUILT_IN = frozenset(TARGETS)  # what every interpreter registers on import


def get_target(name: str) -> Target:
    if name not in TARGETS:
        raise TargetError(f"unknown target '{name}'; choose from: {', '.join(TARGETS)}")
    return TARGETS[name]


__all__ = ["BUILT_IN", "TARGETS", "Finished", "Finishing", "Target", "TargetError", "get_target", "register"]
