"""PyTorch ``.pt``/``.pth`` state dicts: read with ``torch.load(weights_only=True)`` only (never
unpickling arbitrary objects), written as a plain state dict that loads with ``strict=True``."""

from __future__ import annotations

import zipfile
from collections import OrderedDict
from pathlib import Path

import numpy as np

from ..errors import SourceFormatError
from . import Format, RawCheckpoint, RawTensor, register


@register
class TorchPt(Format):
    name = "pt"
    description = "PyTorch state dict (.pt/.pth), read with weights_only=True"
    extensions = (".pt", ".pth")
    can_write = True

    def sniff(self, path: Path) -> bool:
        return (
            path.is_file() and path.suffix in (".pt", ".pth", ".bin") and zipfile.is_zipfile(path)
        )

    def read(self, path: Path) -> RawCheckpoint:
        import torch

        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # pickle refusals and damaged zips
            first = str(exc).splitlines()[0]
            raise SourceFormatError(
                f"{path} cannot be read as a weights-only PyTorch file ({first})"
            ) from exc
        meta = dict(getattr(obj, "ckptport_metadata", {}) or {})
        if not isinstance(obj, dict):
            raise SourceFormatError(
                f"{path} does not hold a state dict (found {type(obj).__name__})"
            )
        tensors = {
            k: RawTensor(k, tuple(v.shape), _dtype_name(v), lambda v=v: v.numpy())
            for k, v in obj.items()
            if hasattr(v, "shape")
        }
        return RawCheckpoint(path, self.name, tensors, metadata=meta)

    def write(self, path: Path, tensors: dict[str, np.ndarray], metadata: dict[str, str]) -> None:
        import torch

        # A plain state dict (loads with strict=True); the metadata rides as an attribute, which
        # torch.load(weights_only=True) restores.
        sd = OrderedDict((k, torch.from_numpy(np.array(v))) for k, v in sorted(tensors.items()))
        sd.ckptport_metadata = dict(sorted(metadata.items()))
        torch.save(sd, path)


def _dtype_name(t) -> str:
    """``torch.float32`` -> ``float32``."""
    return str(t.dtype).replace("torch.", "")
