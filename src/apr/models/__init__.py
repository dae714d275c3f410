"""Architecture families: config, tensor table, stage graph, forward and runtime maps, one module each.

`open_model(path)` opens any checkpoint and resolves its family (models/model.py); the registry lists the
families (models/registry.py); a family module declares itself with `FAMILY: Family` (models/base.py).
"""

from __future__ import annotations

from apr.models.model import Model, open_model

__all__ = ["Model", "open_model"]
