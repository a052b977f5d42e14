"""Restoring a checkpoint written with the other layer layout (scanned vs unrolled blocks).

The checkpoint is read into `target` converted to its layout (in orbax's serialized,
nested-dict form), then converted back and placed on `target`'s shardings.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import orbax.checkpoint as ocp

from megalodon_flax.megalodon import layer_stack


def stored_layout_target(stored_tree: Any, target: Any) -> Any | None:
    """`target` (abstract train state) in the layer layout of `stored_tree` (the checkpoint's
    metadata tree), serialized; None when the layouts agree or either has no blocks."""
    if not isinstance(stored_tree, Mapping):
        return None
    stored_layout = layer_stack.layout_of(stored_tree.get("params"))
    serialized = ocp.tree.serialize_tree(target, keep_empty_nodes=True)
    target_layout = layer_stack.layout_of(serialized.get("params"))
    if None in (stored_layout, target_layout) or stored_layout == target_layout:
        return None
    return layer_stack.to_layout(serialized, scan_layers=stored_layout == "scanned")


def into_target_layout(serialized_state: Any, target: Any) -> Any:
    """A state restored through `stored_layout_target`, in `target`'s layout and structure
    and on its shardings."""
    stored_scanned = layer_stack.layout_of(serialized_state.get("params")) == "scanned"
    converted = layer_stack.to_layout(serialized_state, scan_layers=not stored_scanned)
    state = ocp.tree.deserialize_tree(converted, target, keep_empty_nodes=True)
    return jax.device_put(state, jax.tree.map(lambda t: t.sharding, target))
