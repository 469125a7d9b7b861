"""What a target recipe holds."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from passes import GraphPass


class TargetError(Exception):
    """A target cannot take this model or output; reported as one line."""


@dataclass(frozen=True)
class Target:
    name: str
    description: str
    device: str
    runtime: str  # what runs the package
    precisions: tuple[str, ...]
    default_precision: str
    pipeline: Callable[..., list[GraphPass]]  # (precision, config, quant options, weight hints) -> passes, in order

    def check_precision(self, precision: str) -> None:
        if precision not in self.precisions:
            raise TargetError(
                f"target '{self.name}' does not support precision '{precision}' (supported: {', '.join(self.precisions)})"
            )
