"""Classifier head reset: drop the source classifier, give the target a fresh head initialised the
architecture's own way (the head of a freshly constructed target model with ``num_classes=N``:
timm's and torchvision's constructors run their init schemes), never a bare ``nn.Linear`` default."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .errors import MappingError


@dataclass
class HeadPlan:
    num_classes: int
    source: re.Pattern[str]
    module: str
    target: str
    seed: int = 0
    fresh_keys: list[str] = field(default_factory=list)
    dropped_layers: list[str] = field(default_factory=list)

    @property
    def target_kwargs(self) -> dict[str, Any]:
        return {"num_classes": self.num_classes}

    def drops(self, layer: Any) -> bool:
        if self.source.fullmatch(layer.name):
            self.dropped_layers.append(layer.name)
            return True
        return False

    def fresh_tensors(self, tman: dict[str, Any], kwargs: dict[str, Any]) -> dict[str, np.ndarray]:
        import torch

        from .model import build_target

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            model = build_target(self.target, **kwargs)
        sd = model.state_dict()
        self.fresh_keys = [k for k in sd if k.startswith(self.module + ".")]
        if not self.fresh_keys:
            raise MappingError(f"head module {self.module!r} has no tensors in {self.target}; fix the table's [head]")
        return {k: sd[k].detach().numpy().copy() for k in self.fresh_keys}

    def report(self) -> dict[str, Any]:
        return {
            "num_classes": self.num_classes,
            "dropped_source_layers": self.dropped_layers,
            "module": self.module,
            "fresh_keys": self.fresh_keys,
            "init": f"{self.target} constructor init with num_classes={self.num_classes}, torch seed {self.seed}",
        }


def head_plan(table: Any, variant: Any, num_classes: int) -> HeadPlan:
    if num_classes < 1:
        raise MappingError(f"num_classes must be >= 1, got {num_classes}")
    if not table.head:
        raise MappingError(f"table {table.id} declares no [head]; --num-classes is not available for it")
    return HeadPlan(num_classes, re.compile(table.head["source"]), table.head["module"], variant.target)
