"""Key mapping from the paper's public code (TangJiakai/ReaRec) to this package's ReaRec.

Their state_dict (see ../shared/golden/README.md) stores the encoder twice (``trm_encoder.*`` and
``model.transformer.*``, one module registered under two names), a position table with one extra
padding row, and an item table whose last row is the padding item.
"""
from __future__ import annotations

import os
import re

import torch

_LAYER_KEYS = {  # theirs (under trm_encoder.layer.{i}.) -> ours (under layers.{i}.)
    "multi_head_attention.query_layer": "query",
    "multi_head_attention.key_layer": "key",
    "multi_head_attention.value_layer": "value",
    "multi_head_attention.dense": "attn_out",
    "multi_head_attention.LayerNorm": "attn_norm",
    "feed_forward.dense_1": "ffn_in",
    "feed_forward.dense_2": "ffn_out",
    "feed_forward.LayerNorm": "ffn_norm",
}
_LAYER_KEY = re.compile(r"^trm_encoder\.layer\.(\d+)\.(.+)\.(weight|bias)$")


def _read(path_or_state_dict) -> dict:
    if isinstance(path_or_state_dict, (str, os.PathLike)):
        path = os.fspath(path_or_state_dict)
        if not os.path.isfile(path):
            raise ValueError(f"official checkpoint {path} does not exist")
        loaded = torch.load(path, map_location="cpu", weights_only=True)
        # Accept a bare state_dict or a dict that holds one under 'state_dict' (as the golden file does).
        return loaded.get("state_dict", loaded) if isinstance(loaded, dict) else loaded
    if isinstance(path_or_state_dict, dict):
        return path_or_state_dict
    raise ValueError("expected a path or a state_dict")


def convert_official_state_dict(path_or_state_dict):
    """-> (state_dict with our key names, sizes for ReaRecConfig). ValueError names any bad key."""
    theirs = dict(_read(path_or_state_dict))
    for name, tensor in theirs.items():
        if not isinstance(tensor, torch.Tensor):
            raise ValueError(f"official checkpoint: entry {name} is not a tensor")
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise ValueError(f"official checkpoint: weight {name} holds NaN or Inf values")

    def take(name: str) -> torch.Tensor:
        if name not in theirs:
            raise ValueError(f"official checkpoint: missing weight {name}")
        return theirs.pop(name)

    items = take("item_emb.weight")
    positions = take("pos_emb.weight")
    ours = {
        "item_embedding.weight": items,
        "position_embedding.weight": positions[:-1],  # the last row is their padding position
        "input_norm.weight": take("model.LayerNorm.weight"),
        "input_norm.bias": take("model.LayerNorm.bias"),
    }
    reasoning = theirs.pop("model.reason_pos_emb.weight", None)
    hidden = items.shape[1]
    ours["reasoning_position_embedding.weight"] = (
        reasoning if reasoning is not None else items.new_zeros(0, hidden)
    )

    n_layers, inner = 0, None
    for name in sorted(k for k in theirs if k.startswith("trm_encoder.")):
        match = _LAYER_KEY.match(name)
        if not match or match.group(2) not in _LAYER_KEYS:
            raise ValueError(f"official checkpoint: unexpected weight {name}")
        layer, module, kind = match.groups()
        tensor = theirs.pop(name)
        twin = theirs.pop(f"model.transformer.layer.{layer}.{module}.{kind}", None)
        if twin is not None and not torch.equal(twin, tensor):
            raise ValueError(
                f"official checkpoint: {name} and its twin model.transformer.layer.{layer}.{module}.{kind} differ"
            )
        ours[f"layers.{layer}.{_LAYER_KEYS[module]}.{kind}"] = tensor
        n_layers = max(n_layers, int(layer) + 1)
        if module == "feed_forward.dense_1" and kind == "weight":
            inner = tensor.shape[0]
    if theirs:
        raise ValueError(f"official checkpoint: unexpected weight(s) {sorted(theirs)}")
    if n_layers == 0 or inner is None:
        raise ValueError("official checkpoint: no encoder layers (trm_encoder.layer.*) found")
    sizes = {
        "n_items": items.shape[0],
        "hidden_size": hidden,
        "n_layers": n_layers,
        "inner_size": inner,
        "max_len": positions.shape[0] - 1,
        "reason_steps": ours["reasoning_position_embedding.weight"].shape[0],
        "pad_item": items.shape[0] - 1,
    }
    return ours, sizes
