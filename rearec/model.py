"""ReaRec: a SASRec encoder that thinks for K extra steps before it recommends.

Notation (shapes in docstrings): B users, L history slots, d hidden size, H heads, N items, K
reasoning steps.

1. A history (oldest item first, truncated to its newest ``max_len`` items) is embedded as
   item embedding + position embedding (position 0 = the oldest item kept).
2. Step 0 runs the whole history through a post-LN transformer, causal, padding never attended to.
   r_0 is the last layer's state of the newest item.
3. Step s = 1..K feeds one new token, r_{s-1} + reason_pos[s-1], through the same transformer. It
   attends to every history item and to the reasoning tokens of steps 1..s; r_s is its output.
   Every step's input first goes through one shared input LayerNorm, then input dropout.
4. A user's scores are readout(r_0..r_K) · Eᵀ / temperature, E the (tied) item embedding table;
   readout is r_K ("last") or the mean of r_0..r_K ("mean").

The step loop keeps each layer's keys and values, so a reasoning step costs one token of compute;
this module is the readable reference that the kernels and the engine are tested against, and the
training path (it is differentiable).

Batches are RIGHT-padded: row b holds its items in columns 0..lengths[b]-1, oldest first.
"""
from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from rearec.config import ReaRecConfig

Histories = Union[Sequence[Sequence[int]], torch.Tensor]

FORMAT_VERSION = "1"


@dataclass
class Recommendations:
    """Top-k items per user, best first: ``items`` (B, k) int64 and ``scores`` (B, k) float32; with a
    raw-id mapping also ``raw_items``, the same items as raw ids (None where fewer than k remained)."""

    items: torch.Tensor
    scores: torch.Tensor
    raw_items: Optional[list] = None


def _activation(name: str):
    return {
        "gelu": F.gelu,  # erf form, as in the public code
        "relu": F.relu,
        "swish": F.silu,
        "tanh": torch.tanh,
        "sigmoid": torch.sigmoid,
    }[name]


class TransformerLayer(nn.Module):
    """Post-LN layer: x = LN(x + drop(attn(x))); x = LN(x + drop(ffn(x)))."""

    def __init__(self, cfg: ReaRecConfig):
        super().__init__()
        d = cfg.hidden_size
        self.n_heads = cfg.n_heads
        self.dropout = cfg.dropout
        self.query = nn.Linear(d, d)
        self.key = nn.Linear(d, d)
        self.value = nn.Linear(d, d)
        self.attn_out = nn.Linear(d, d)
        self.attn_norm = nn.LayerNorm(d, eps=cfg.layer_norm_eps)
        self.ffn_in = nn.Linear(d, cfg.inner_size)
        self.ffn_out = nn.Linear(cfg.inner_size, d)
        self.ffn_norm = nn.LayerNorm(d, eps=cfg.layer_norm_eps)
        self.act = _activation(cfg.hidden_act)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, d) -> (B, H, T, d/H)
        B, T, d = x.shape
        return x.view(B, T, self.n_heads, d // self.n_heads).transpose(1, 2)

    def forward(self, x, past_keys, past_values, allowed, kv_input=None):
        """x (B, T, d) query tokens; past_keys/values (B, H, P, d/H) or None; allowed (B, 1, T, P+S) bool.

        New keys and values come from ``kv_input`` (B, S, d) when given (only some tokens need an
        output), else from x (S = T). Returns (output (B, T, d), keys and values (B, H, P+S, d/H)).
        """
        source = x if kv_input is None else kv_input
        q, k, v = self._heads(self.query(x)), self._heads(self.key(source)), self._heads(self.value(source))
        if past_keys is not None:
            k = torch.cat([past_keys, k], dim=2)
            v = torch.cat([past_values, v], dim=2)
        drop = self.dropout if self.training else 0.0
        context = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=drop)
        context = context.transpose(1, 2).reshape(x.shape)
        x = self.attn_norm(x + F.dropout(self.attn_out(context), drop, self.training))
        x = self.ffn_norm(x + F.dropout(self.ffn_out(self.act(self.ffn_in(x))), drop, self.training))
        return x, k, v


class ReaRec(nn.Module):
    def __init__(self, config: ReaRecConfig):
        super().__init__()
        config.validate()
        self.config = config
        d = config.hidden_size
        self.item_embedding = nn.Embedding(config.n_items, d)
        self.position_embedding = nn.Embedding(config.max_len, d)
        self.reasoning_position_embedding = nn.Embedding(config.reason_steps, d)  # K rows
        self.input_norm = nn.LayerNorm(d, eps=config.layer_norm_eps)
        self.layers = nn.ModuleList(TransformerLayer(config) for _ in range(config.n_layers))
        self.id_mapping: Optional[dict] = None  # raw-id mapping saved with the model, if any
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=self.config.init_std)
        if isinstance(module, nn.Linear):
            nn.init.zeros_(module.bias)
        if isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    # ------------------------------------------------------------------ the reasoning loop
    def _step_input(self, x: torch.Tensor) -> torch.Tensor:
        return F.dropout(self.input_norm(x), self.config.input_dropout, self.training)

    def _run(self, histories, lengths, depth, noise_std=0.0):
        """States r_0..r_depth (B, depth+1, d); with noise_std > 0 also those of a noisy copy.

        The noisy copy (PRL's contrastive view) runs the same batch with its own dropout; its input at
        step s is the CLEAN run's r_{s-1} + reason_pos[s-1] plus Gaussian noise of std noise_std.
        """
        B, L = histories.shape
        copies = 2 if noise_std > 0 else 1
        positions = torch.arange(L, device=histories.device)
        x = self.item_embedding(histories) + self.position_embedding(positions)
        if copies == 2:
            x, lengths = x.repeat(2, 1, 1), lengths.repeat(2)
        x = self._step_input(x)

        # Step 0: causal over the history; padded slots are never keys of a real item. A padded slot
        # may attend to itself only, so that no softmax row is empty.
        valid_key = positions[None, :] < lengths[:, None]  # (copies·B, L)
        causal = positions[:, None] >= positions[None, :]
        allowed = causal & (valid_key[:, None, :] | torch.eye(L, dtype=torch.bool, device=x.device))
        allowed = allowed[:, None]  # (copies·B, 1, L, L)
        history_allowed = valid_key[:, None, None, :]  # (copies·B, 1, 1, L)
        newest = torch.arange(x.shape[0], device=x.device), lengths - 1
        keys, values = [], []
        for i, layer in enumerate(self.layers):
            if i < len(self.layers) - 1:
                x, k, v = layer(x, None, None, allowed)
            else:  # only the newest item's output is needed from the last layer (its K/V: all items)
                x, k, v = layer(x[newest][:, None], None, None, history_allowed, kv_input=x)
            keys.append(k)
            values.append(v)
        states = [x[:, -1]]  # r_0: (copies·B, d)

        # Steps 1..depth: one new token each, attending to the valid history and all reasoning tokens.
        for s in range(1, depth + 1):
            token = states[-1][:B] + self.reasoning_position_embedding.weight[s - 1]
            if copies == 2:
                token = torch.cat([token, token + noise_std * torch.randn_like(token)])
            x = self._step_input(token[:, None, :])
            reasoning_allowed = history_allowed.new_ones(x.shape[0], 1, 1, s)
            allowed = torch.cat([history_allowed, reasoning_allowed], dim=-1)
            for i, layer in enumerate(self.layers):
                x, keys[i], values[i] = layer(x, keys[i], values[i], allowed)
            states.append(x[:, 0])
        states = torch.stack(states, dim=1)  # (copies·B, depth+1, d)
        return (states[:B], states[B:]) if copies == 2 else (states, None)

    def forward(self, histories: torch.Tensor, lengths: torch.Tensor, depth: Optional[int] = None):
        """histories (B, L) right-padded ids, lengths (B,) -> states r_0..r_depth, (B, depth+1, d)."""
        return self._run(histories, lengths, self._depth(depth))[0]

    def forward_with_noisy_copy(self, histories, lengths, noise_std: float, depth: Optional[int] = None):
        """-> (clean states, noisy-copy states), each (B, depth+1, d). See ``_run``."""
        return self._run(histories, lengths, self._depth(depth), noise_std)

    # ------------------------------------------------------------------ scoring
    def readout(self, states: torch.Tensor, readout: Optional[str] = None) -> torch.Tensor:
        """states (B, S, d) -> user vectors (B, d): the last step ("last") or the mean of all steps."""
        readout = readout or self.config.readout
        if readout == "last":
            return states[:, -1]
        if readout == "mean":
            return states.mean(dim=1)
        raise ValueError(f"readout {readout!r} is unknown: use 'last' or 'mean'")

    def scores(self, user_vectors: torch.Tensor) -> torch.Tensor:
        """user_vectors (..., d) -> logits over every row of the item table (..., N)."""
        return user_vectors @ self.item_embedding.weight.T / self.config.temperature

    # ------------------------------------------------------------------ inference helpers
    @torch.no_grad()
    def reasoning_states(self, histories: Histories, depth: Optional[int] = None, lengths=None) -> torch.Tensor:
        """Reasoning states for a batch of histories, in eval mode: float tensor (B, depth+1, d).

        ``histories``: a list of item-id lists (oldest first), or a right-padded LongTensor (B, T)
        with ``lengths`` (B,). Histories longer than ``max_len`` keep their newest ``max_len`` items.
        ``depth`` is any value 0..K (default K).
        """
        padded, lens = self.prepare_histories(histories, lengths)
        was_training = self.training
        self.eval()
        try:
            return self(padded, lens, depth)
        finally:
            self.train(was_training)

    @torch.no_grad()
    def recommend(
        self,
        histories: Histories,
        k: int = 10,
        depth: Optional[int] = None,
        readout: Optional[str] = None,
        exclude_seen: bool = False,
        lengths=None,
    ) -> Recommendations:
        """Top-k items for each history, best first (never the padding item; optionally never an item
        of the user's own history)."""
        padded, lens = self.prepare_histories(histories, lengths)
        if not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be a positive integer (got {k!r})")
        states = self.reasoning_states(padded, depth, lengths=lens)
        scores = self.scores(self.readout(states, readout)).float()
        if self.config.pad_item is not None:
            scores[:, self.config.pad_item] = -math.inf
        if exclude_seen:
            seen = torch.arange(padded.shape[1], device=padded.device)[None, :] < lens[:, None]
            rows = torch.arange(padded.shape[0], device=padded.device)[:, None].expand_as(padded)
            scores[rows[seen], padded[seen]] = -math.inf
        k = min(k, scores.shape[1])
        values, items = torch.topk(scores, k, dim=1)
        return Recommendations(items=items, scores=values)

    def _depth(self, depth: Optional[int]) -> int:
        return resolve_depth(depth, self.config.reason_steps)

    def prepare_histories(self, histories: Histories, lengths=None):
        """Validated right-padded ids (B, T ≤ max_len) and lengths (B,) on the model's device; see
        :func:`prepare_histories`."""
        return prepare_histories(histories, lengths, n_items=self.config.n_items, max_len=self.config.max_len,
                                 device=self.item_embedding.weight.device)

    # ------------------------------------------------------------------ checkpoints
    def save(self, path: Union[str, os.PathLike], id_mapping: Optional[dict] = None) -> None:
        """Write weights (safetensors), config and raw-id mapping (JSON in its metadata) atomically."""
        from safetensors.torch import save_file

        mapping = id_mapping if id_mapping is not None else self.id_mapping
        metadata = {
            "format": "rearec",
            "format_version": FORMAT_VERSION,
            "config": json.dumps(self.config.to_dict()),
        }
        if mapping is not None:
            metadata["id_mapping"] = json.dumps(mapping)
        tensors = {name: t.detach().cpu().contiguous() for name, t in self.state_dict().items()}
        path = os.fspath(path)
        folder = os.path.dirname(os.path.abspath(path))
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".safetensors", dir=folder)
        os.close(fd)
        try:
            save_file(tensors, tmp, metadata=metadata)
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.remove(tmp)
            raise

    @classmethod
    def load(cls, path: Union[str, os.PathLike], map_location="cpu") -> "ReaRec":
        """Load a checkpoint written by :meth:`save`; verifies every tensor against the config."""
        from safetensors import safe_open

        path = os.fspath(path)
        if not os.path.isfile(path):
            raise ValueError(f"checkpoint {path} does not exist")
        try:
            with safe_open(path, framework="pt", device=str(map_location)) as f:
                metadata = f.metadata() or {}
                tensors = {name: f.get_tensor(name) for name in f.keys()}
        except Exception as error:  # safetensors raises its own error types for corrupt files
            raise ValueError(f"{path} is not a readable rearec checkpoint ({error})") from None
        if metadata.get("format") != "rearec":
            raise ValueError(f"{path} is a safetensors file but not a rearec checkpoint (no rearec metadata)")
        model = cls(ReaRecConfig.from_dict(json.loads(metadata["config"])))
        _load_checked(model, tensors, source=path)
        if "id_mapping" in metadata:
            model.id_mapping = json.loads(metadata["id_mapping"])
        return model.eval()

    @classmethod
    def from_official_checkpoint(cls, path_or_state_dict, n_heads: int = 2, **overrides) -> "ReaRec":
        """Load a state_dict written by the paper's public code (TangJiakai/ReaRec).

        Sizes come from the tensors' shapes (layers, hidden and inner size, K, max_len); the head count
        and other hyperparameters from the arguments. Item ids are kept: official id i is id i here; the
        official padding row (the table's last) becomes ``pad_item`` and is never recommended. Returns
        the model in eval mode.
        """
        from rearec.official import convert_official_state_dict

        state, sizes = convert_official_state_dict(path_or_state_dict)
        config = ReaRecConfig(**{**sizes, "n_heads": n_heads, **overrides})
        model = cls(config)
        _load_checked(model, state, source="official checkpoint")
        return model.eval()


def exclusion_ids(padded: torch.Tensor, lengths: torch.Tensor, pad_item: Optional[int], exclude_history: bool):
    """Item ids never to rank, as a padded (B, M) tensor with -1 in empty slots (the form ``fused_topk``
    and ``target_ranks`` take): the padding item if the table has one, and the history if asked. None
    when there is nothing to exclude."""
    columns = []
    if pad_item is not None:
        columns.append(torch.full((padded.shape[0], 1), pad_item, dtype=torch.long, device=padded.device))
    if exclude_history:
        valid = torch.arange(padded.shape[1], device=padded.device)[None, :] < lengths[:, None]
        columns.append(torch.where(valid, padded, torch.full_like(padded, -1)))
    return torch.cat(columns, dim=1) if columns else None


def resolve_depth(depth: Optional[int], K: int) -> int:
    """The number of reasoning steps to run: ``depth`` checked against 0..K, or K when None."""
    if depth is None:
        return K
    if isinstance(depth, bool) or not isinstance(depth, int) or not 0 <= depth <= K:
        raise ValueError(f"depth must be an integer in 0..{K} (this model has K={K} reasoning steps), got {depth!r}")
    return depth


def prepare_histories(histories: Histories, lengths=None, *, n_items: int, max_len: int, device="cpu"):
    """Validate histories -> (right-padded LongTensor (B, T ≤ max_len), lengths (B,)) on ``device``.

    ``histories``: a list of item-id lists (oldest first), or a right-padded integer tensor (B, T) with
    ``lengths`` (B,); padded slots may hold anything.

    Raises ValueError naming the offending row for an empty history, an id outside [0, n_items) or
    a non-integer tensor. Longer histories keep their newest ``max_len`` items.
    """
    if isinstance(histories, torch.Tensor):
        if histories.dtype in (torch.bool,) or histories.dtype.is_floating_point or histories.dtype.is_complex:
            raise ValueError(f"histories must be an integer tensor of item ids (got dtype {histories.dtype})")
        if histories.dim() != 2:
            raise ValueError(f"histories must be 2-D (batch, slots), got shape {tuple(histories.shape)}")
        if lengths is None:
            raise ValueError("a padded histories tensor needs lengths: pass lengths=(B,) valid items per row")
        lengths = torch.as_tensor(lengths, device=histories.device)
        if lengths.shape != (histories.shape[0],) or lengths.dtype.is_floating_point:
            raise ValueError(f"lengths must be an integer tensor of shape ({histories.shape[0]},)")
        for b, n in enumerate(lengths.tolist()):
            if not 1 <= n <= histories.shape[1]:
                raise ValueError(f"history {b} has length {n}: lengths must be in 1..{histories.shape[1]} (empty histories cannot be scored)")
        padded, lens = histories.long(), lengths.long()
        if padded.shape[1] > max_len:  # keep the newest max_len items of each row
            start = (lens - max_len).clamp(min=0)
            cols = start[:, None] + torch.arange(max_len, device=padded.device)
            padded = padded.gather(1, cols.clamp(max=padded.shape[1] - 1))
            lens = lens.clamp(max=max_len)
    else:
        rows = []
        for b, history in enumerate(histories):
            history = list(history)
            if not history:
                raise ValueError(f"history {b} is empty: every user needs at least one item")
            rows.append(history[-max_len:])
        if not rows:
            raise ValueError("no histories given")
        lens = torch.tensor([len(r) for r in rows])
        padded = torch.zeros(len(rows), int(lens.max()), dtype=torch.long)
        for b, row in enumerate(rows):
            try:
                padded[b, : len(row)] = torch.tensor(row, dtype=torch.long)
            except (TypeError, ValueError, RuntimeError):
                raise ValueError(f"history {b} holds non-integer item ids: {row[:5]}...") from None
    valid = torch.arange(padded.shape[1], device=padded.device)[None, :] < lens[:, None]
    bad = valid & ((padded < 0) | (padded >= n_items))
    if bad.any():
        b, t = (int(i) for i in bad.nonzero()[0])
        raise ValueError(f"history {b} holds item id {int(padded[b, t])}: ids must be in [0, {n_items})")
    padded = torch.where(valid, padded, torch.zeros_like(padded))
    return padded.to(device), lens.to(device)


def _load_checked(model: nn.Module, tensors: dict, source: str) -> None:
    """Copy ``tensors`` into ``model``: any missing, unexpected, mis-shaped or non-finite tensor is a
    ValueError that names it."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing:
        raise ValueError(f"{source}: missing weight(s) {missing}")
    if unexpected:
        raise ValueError(f"{source}: unexpected weight(s) {unexpected}")
    for name, tensor in tensors.items():
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise ValueError(
                f"{source}: weight {name} has shape {tuple(tensor.shape)}, the config needs {tuple(expected[name].shape)}"
            )
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise ValueError(f"{source}: weight {name} holds NaN or Inf values")
    model.load_state_dict(tensors)
