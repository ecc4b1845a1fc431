"""The module path of an exported ONNX node.

torch's ONNX exporter records, on every node, the stack of module names it was traced under
(``metadata_props["pkg.torch.onnx.name_scopes"]``, e.g. ``['', 'model', 'model.backbone',
'model.backbone.conv1']``).  The int8 paths use it to find layer groups and the parts that
stay float, and the fp16 export to find the post-processing."""

from __future__ import annotations

import json
from typing import Any

SCOPES_KEY = "pkg.torch.onnx.name_scopes"


def name_scopes(node: Any) -> list[str] | None:
    """The module paths ``node`` (an ``onnx.NodeProto``) was traced under, outermost first;
    ``None`` when the exporter recorded none (or an unreadable list)."""
    for prop in node.metadata_props:
        if prop.key == SCOPES_KEY:
            try:
                scopes = json.loads(prop.value.replace("'", '"'))
            except ValueError:
                return None
            return [str(s) for s in scopes] if isinstance(scopes, list) else None
    return None
