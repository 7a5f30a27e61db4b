"""Key mapping from the paper's public code (TangJiakai/ReaRec) to this package's ReaRec.

Their state_dict (see tests/golden/README.md) stores the encoder twice (``trm_encoder.*`` and
``model.transformer.*``, one module registered under two names), a position table with one extra
padding row, and an item table whose last row is the padding item.
"""
from __future__ import annotations

import os
import re
import zipfile

import torch

#: The eps of their input LayerNorm (``model.LayerNorm``): their ReaRec wrapper builds it without passing
#: on their layer_norm_eps, so it keeps the wrapper's default whatever the run's layer_norm_eps.
OFFICIAL_INPUT_NORM_EPS = 1e-12

_TOP_KEYS = {  # theirs -> ours, outside the encoder layers
    "item_emb.weight": "item_embedding.weight",
    "pos_emb.weight": "position_embedding.weight",  # ours without their last (padding) row
    "model.LayerNorm.weight": "input_norm.weight",
    "model.LayerNorm.bias": "input_norm.bias",
    "model.reason_pos_emb.weight": "reasoning_position_embedding.weight",  # absent in a plain SASRec
}
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
_TWIN_PREFIX = "model.transformer.layer."  # their encoder, registered a second time under this name
_OUR_LAYER_KEY = re.compile(r"^layers\.(\d+)\.(\w+)\.(weight|bias)$")
_THEIR_TOP_KEY = {ours: theirs for theirs, ours in _TOP_KEYS.items()}  # the maps above, read backwards
_THEIR_LAYER_KEY = {ours: theirs for theirs, ours in _LAYER_KEYS.items()}


def official_key(ours: str) -> str:
    """The key of a public-code state_dict that holds our tensor ``ours`` (for messages)."""
    if ours == "position_embedding.weight":
        return "pos_emb.weight without its last (padding) row"
    if ours in _THEIR_TOP_KEY:
        return _THEIR_TOP_KEY[ours]
    match = _OUR_LAYER_KEY.match(ours)
    if match and match.group(2) in _THEIR_LAYER_KEY:
        return f"trm_encoder.layer.{match.group(1)}.{_THEIR_LAYER_KEY[match.group(2)]}.{match.group(3)}"
    return ours


def official_source(path_or_state_dict) -> str:
    """How messages name a public-code checkpoint: its path, if it came from a file."""
    if isinstance(path_or_state_dict, (str, os.PathLike)):
        return f"official checkpoint {os.fspath(path_or_state_dict)}"
    return "official checkpoint"


def _read(path_or_state_dict, source: str) -> dict:
    if isinstance(path_or_state_dict, (str, os.PathLike)):
        path = os.fspath(path_or_state_dict)
        if not os.path.isfile(path):
            raise ValueError(f"{source} does not exist; check the path of the public code's checkpoint (a .pth file)")
        try:
            loaded = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # not a torch file, or one holding more than tensors and containers
            # torch's own text is long and suggests loading without weights_only, which runs arbitrary
            # code: the first sentence of it only
            reason = str(error).split(". ")[0][:120] or type(error).__name__
            if not zipfile.is_zipfile(path):
                reason = f"not a file torch.save wrote: {reason}"
            raise ValueError(f"{source} is not a readable state_dict of tensors ({reason}); give the .pth file "
                             "the public code saved") from None
        # Accept a bare state_dict or a dict that holds one under 'state_dict' (as training scripts often save).
        loaded = loaded.get("state_dict", loaded) if isinstance(loaded, dict) else loaded
        if not isinstance(loaded, dict):
            raise ValueError(f"{source} holds a {type(loaded).__name__}, not a state_dict")
        return loaded
    if isinstance(path_or_state_dict, dict):
        return path_or_state_dict
    raise ValueError("expected a path or a state_dict")


def convert_official_state_dict(path_or_state_dict):
    """-> (state_dict with our key names, sizes for ReaRecConfig). A ValueError names any missing,
    unexpected or non-finite tensor by its key in THEIR file; shapes are checked by the loader
    against the config these sizes make (see :func:`official_key` to name them)."""
    source = official_source(path_or_state_dict)
    theirs = dict(_read(path_or_state_dict, source))
    odd = [name for name in theirs if not isinstance(name, str)]
    if odd:
        raise ValueError(f"{source}: a state_dict's keys are weight names, but {odd[0]!r} is a {type(odd[0]).__name__}")
    for name in [n for n in theirs if n.startswith(_TWIN_PREFIX)]:  # a twin whose first copy is gone
        first = "trm_encoder.layer." + name[len(_TWIN_PREFIX):]
        if first not in theirs:
            theirs[first] = theirs.pop(name)
    for name, tensor in theirs.items():
        if not isinstance(tensor, torch.Tensor):
            raise ValueError(f"{source}: entry {name} is not a tensor")
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise ValueError(f"{source}: weight {name} holds NaN or Inf values")

    def take(name: str, dims: int) -> torch.Tensor:
        if name not in theirs:
            raise ValueError(f"{source}: missing weight {name}")
        if theirs[name].dim() != dims:
            raise ValueError(f"{source}: weight {name} has shape {tuple(theirs[name].shape)}; "
                             f"a {dims}-D tensor was expected")
        return theirs.pop(name)

    items = take("item_emb.weight", 2)
    hidden = items.shape[1]
    reasoning = theirs.pop("model.reason_pos_emb.weight", items.new_zeros(0, hidden))
    ours = {
        _TOP_KEYS["item_emb.weight"]: items,
        _TOP_KEYS["pos_emb.weight"]: take("pos_emb.weight", 2)[:-1],  # the last row is their padding position
        _TOP_KEYS["model.LayerNorm.weight"]: take("model.LayerNorm.weight", 1),
        _TOP_KEYS["model.LayerNorm.bias"]: take("model.LayerNorm.bias", 1),
        _TOP_KEYS["model.reason_pos_emb.weight"]: reasoning,
    }

    n_layers, inner = 0, None
    for name in sorted(k for k in theirs if k.startswith("trm_encoder.")):
        match = _LAYER_KEY.match(name)
        if not match or match.group(2) not in _LAYER_KEYS:
            raise ValueError(f"{source}: unexpected weight {name}")
        layer, module, kind = match.groups()
        tensor = theirs.pop(name)
        twin = theirs.pop(f"{_TWIN_PREFIX}{layer}.{module}.{kind}", None)
        if twin is not None and not torch.equal(twin, tensor):
            raise ValueError(f"{source}: {name} and its twin {_TWIN_PREFIX}{layer}.{module}.{kind} differ")
        ours[f"layers.{layer}.{_LAYER_KEYS[module]}.{kind}"] = tensor
        n_layers = max(n_layers, int(layer) + 1)
        if module == "feed_forward.dense_1" and kind == "weight":
            inner = tensor.shape[0]
    if theirs:
        raise ValueError(f"{source}: unexpected weight(s) {sorted(theirs)}")
    if n_layers == 0 or inner is None:
        raise ValueError(f"{source}: no encoder layers (trm_encoder.layer.*) found")
    sizes = {
        "n_items": items.shape[0],
        "hidden_size": hidden,
        "n_layers": n_layers,
        "inner_size": inner,
        "max_len": ours["position_embedding.weight"].shape[0],
        "reason_steps": ours["reasoning_position_embedding.weight"].shape[0],
        "pad_item": items.shape[0] - 1,
    }
    return ours, sizes
