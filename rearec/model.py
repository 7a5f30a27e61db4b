"""ReaRec: a sequence encoder (SASRec, or BERT4Rec below) that thinks for K extra steps before it recommends.

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

On CUDA, SASRec's step 0 (the whole history, the bulk of a training step) runs the Triton attention
of ``rearec_kernels.prefill_attention_autograd``, forward and backward, instead of a masked SDPA;
elsewhere, and for BERT4Rec (not causal), it runs PyTorch's SDPA. ``model.attention_backend`` (a
kernel backend name, default None = ``REAREC_KERNEL_BACKEND`` or "auto") overrides the choice; the
tests put "triton" on CPU tensors under Triton's interpreter. With attention dropout the two paths
draw different masks (same distribution).

Batches are RIGHT-padded: row b holds its items in columns 0..lengths[b]-1, oldest first.

Backbones (``config.backbone``):

- "sasrec": as above.
- "bert4rec" (Sun et al., 2019; as in RecBole 1.2.1): step 0 is bidirectional among the history
  items, and the history ends in a learned mask token whose state is r_0 ("what comes next?").
  As RecBole does at prediction time, the history keeps its newest max_len - 1 items so that the
  mask token fits in max_len positions. The reasoning tokens use prefix masking: each attends to
  every history slot (mask token included) and to earlier reasoning tokens, and no history slot
  attends to a reasoning token, so reasoning never changes a history state. The loop feeds back the
  encoder states; the states the model returns (and scores) are those passed through BERT4Rec's
  output head (Linear, GELU, LayerNorm), and scores add a per-item output bias. Training adds
  RecBole's cloze loss (``rearec.objectives.cloze_loss``). Deliberate differences from RecBole's
  BERT4Rec (README, Backbones): logits at ReaRec's temperature τ (RecBole: 1), every step's input
  dropout is ``input_dropout``, and the short-history and cloze details listed there.

Item features (``config.item_feature_dim``, both backbones): the item table is the id embedding plus
a learned linear projection of a fixed (N, f) feature matrix, used both as input embedding and for
scoring, so an item with features but no training interactions still gets a meaningful vector: those
cold items (``config.cold_items``, the table's last rows) keep a zero id embedding (and BERT4Rec output
bias), and the training losses leave them out (:mod:`rearec.objectives`).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Callable, Optional, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from rearec.config import ReaRecConfig
from rearec.dropout import dropout, softmax_dropout_attention
from rearec.inputs import Histories, InputRules, Recommendations, check_readout, top_k_excluding
from rearec.runs import MODEL_FILE, STATE_FILE, atomic_write, model_file
from rearec_kernels.attention_autograd import OP as PREFILL_AUTOGRAD_OP, prefill_attention_autograd
from rearec_kernels.backend import Backend, resolve

FORMAT_VERSION = "1"


@dataclass(frozen=True)
class LayerWeights:
    """One transformer layer's parameters by role, each a (weight, bias) pair, for code that keeps
    them in its own layout (the engine). Linear weights are (out, in), as in ``nn.Linear``."""

    query: Tuple[torch.Tensor, torch.Tensor]
    key: Tuple[torch.Tensor, torch.Tensor]
    value: Tuple[torch.Tensor, torch.Tensor]
    attn_out: Tuple[torch.Tensor, torch.Tensor]
    attn_norm: Tuple[torch.Tensor, torch.Tensor]
    ffn_in: Tuple[torch.Tensor, torch.Tensor]
    ffn_out: Tuple[torch.Tensor, torch.Tensor]
    ffn_norm: Tuple[torch.Tensor, torch.Tensor]
    activation: Callable[[torch.Tensor], torch.Tensor]


def _activation(name: str):
    return {
        "gelu": F.gelu,  # erf form, as in the public code
        "relu": F.relu,
        "swish": F.silu,
        "tanh": torch.tanh,
        "sigmoid": torch.sigmoid,
    }[name]


class RealSlots:
    """The real (non-padding) slots of a right-padded (B, L) batch, so that per-token work (projections,
    feed-forward, norms, dropout) runs on those P slots alone and only attention on the padded
    layout. Packed order is row-major: row 0's slots, then row 1's, ...

    The packed tensors have ``rows`` >= P rows: P rounded up to 1/16 of its power of two (at most 6%
    more, never more than B * L), the extra rows copies of slot 0 (real: every history has an item)
    that nothing reads. Their few sizes let the allocator reuse freed blocks: with P itself, every
    batch's different sizes fragmented glibc's heap until an ML-1M epoch's peak RSS grew from 0.86
    to 7.1 GB."""

    def __init__(self, lengths: torch.Tensor, L: int):
        self.B, self.L = lengths.shape[0], L
        valid = torch.arange(L, device=lengths.device)[None, :] < lengths[:, None]
        self.flat = valid.reshape(-1).nonzero().squeeze(1)  # (P,) indices into the B*L slots
        P = self.flat.shape[0]
        step = 1 << max(P.bit_length() - 5, 0)
        self.rows = min(-(-P // step) * step, self.B * L)
        self.gather = torch.cat([self.flat, self.flat.new_zeros(self.rows - P)])
        self.lengths = lengths
        self.starts = torch.cumsum(lengths, 0) - lengths  # each row's first packed position

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        """(B, L, ...) -> (rows, ...): the real slots, then the extra rows."""
        return x.reshape(self.B * self.L, *x.shape[2:]).index_select(0, self.gather)

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        """(rows, ...) -> (B, L, ...), zeros at the padding."""
        out = x.new_zeros(self.B * self.L, *x.shape[1:]).index_copy_(0, self.flat, x[: self.flat.shape[0]])
        return out.view(self.B, self.L, *x.shape[1:])

    def positions(self, slots: torch.Tensor) -> torch.Tensor:
        """(B, M) slot indices -> their packed positions; a padding slot maps to its row's first slot
        (a placeholder whose output the caller drops)."""
        real = slots < self.lengths[:, None]
        return self.starts[:, None] + torch.where(real, slots, torch.zeros_like(slots))


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

    def weights(self) -> LayerWeights:
        """This layer's parameters by role (the tensors themselves, not copies)."""
        def pair(module):
            return module.weight, module.bias

        return LayerWeights(
            query=pair(self.query), key=pair(self.key), value=pair(self.value), attn_out=pair(self.attn_out),
            attn_norm=pair(self.attn_norm), ffn_in=pair(self.ffn_in), ffn_out=pair(self.ffn_out),
            ffn_norm=pair(self.ffn_norm), activation=self.act,
        )

    def _heads(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, d) -> (B, H, T, d/H)
        B, T, d = x.shape
        return x.view(B, T, self.n_heads, d // self.n_heads).transpose(1, 2)

    @staticmethod
    def _merge_heads(x: torch.Tensor) -> torch.Tensor:  # (B, H, T, Dh) -> (B, T, H*Dh)
        B, H, T, Dh = x.shape
        return x.transpose(1, 2).reshape(B, T, H * Dh)

    def prefill(self, x, lengths, backend=None):
        """Step 0 of a causal (SASRec) layer through :func:`rearec_kernels.prefill_attention_autograd`
        (differentiable; Triton forward and backward on CUDA): x (B, L, d) right-padded, lengths (B,).

        Returns what :meth:`forward` returns for the causal mask of ``ReaRec._encode``. Real slots
        match it; a padded slot differs (its attention output is 0 here, the slot itself there), and
        nothing real reads a padded slot.
        """
        B, L, d = x.shape
        shape = (B, L, self.n_heads, d // self.n_heads)
        q, k, v = self.query(x).view(shape), self.key(x).view(shape), self.value(x).view(shape)
        drop = self.dropout if self.training else 0.0
        context = prefill_attention_autograd(q, k, v, lengths, dropout_p=drop, backend=backend)
        keys, values = k.transpose(1, 2).contiguous(), v.transpose(1, 2).contiguous()  # (B, H, L, Dh), read by
        # every reasoning step
        return self._feed_forward(x, context.reshape(B, L, d), drop), keys, values

    def _feed_forward(self, x, context, drop):
        """The rest of the layer after attention: output projection, residuals, norms, FFN."""
        x = self.attn_norm(x + dropout(self.attn_out(context), drop, self.training))
        return self.ffn_norm(x + dropout(self.ffn_out(self.act(self.ffn_in(x))), drop, self.training))

    def forward(self, x, allowed):
        """x (B, T, d) tokens attending to each other where ``allowed`` (B, 1, T, T) bool (None:
        everywhere) -> output (B, T, d). The plain form of the layer, which the tests' full-sequence
        references run; the model's step 0 runs :meth:`forward_real_slots` (or :meth:`prefill`), its
        reasoning steps :meth:`reasoning_step`."""
        q, k, v = self._heads(self.query(x)), self._heads(self.key(x)), self._heads(self.value(x))
        drop = self.dropout if self.training else 0.0
        return self._feed_forward(x, self._attend(q, k, v, allowed, drop), drop)

    def reasoning_step(self, x, history, reasoning, history_allowed):
        """One reasoning token per row: x (B, 1, d); ``history`` the step-0 (keys, values), each
        (B, H, L, Dh), with ``history_allowed`` (B, 1, 1, L) bool; ``reasoning`` the earlier reasoning
        tokens' (keys, values), each (B, H, s, Dh), or None. The token attends to the allowed history
        slots, every earlier reasoning token and itself.

        Returns (output (B, 1, d), the reasoning (keys, values) with this token's appended). The
        arithmetic of :meth:`forward`'s attention over the concatenated keys, with the history's keys
        and values never copied (:func:`rearec.dropout.softmax_dropout_attention` over two segments;
        concatenating the history's keys every step, and splitting their gradient back, cost a PRL
        training step 2-3% on CPU).
        """
        q, k, v = self._heads(self.query(x)), self._heads(self.key(x)), self._heads(self.value(x))
        if reasoning is not None:
            k = torch.cat([reasoning[0], k], dim=2)
            v = torch.cat([reasoning[1], v], dim=2)
        drop = self.dropout if self.training else 0.0
        context = softmax_dropout_attention(q, [(*history, history_allowed), (k, v, None)], drop)
        return self._feed_forward(x, self._merge_heads(context), drop), (k, v)

    def forward_real_slots(self, x, slots: RealSlots, allowed, outputs_at=None, causal: bool = False):
        """Step 0 on the real slots of a right-padded batch: x (rows, d) in ``slots``' packed order,
        ``allowed`` and ``causal`` as for :meth:`_attend`. The same arithmetic as :meth:`forward` on the
        padded batch (every output a real slot reads is equal), with the per-token work on the P real
        slots only; the padding's queries, keys and values are 0 here, and a real slot never attends
        to one.

        Returns (outputs (rows, d), or (B, M, d) at the packed positions ``outputs_at`` (B, M) alone, for
        a last layer of which only some outputs are needed; keys and values (B, H, L, Dh))."""
        d = x.shape[-1]
        drop = self.dropout if self.training else 0.0
        if outputs_at is None:  # one GEMM for q, k and v, one scatter into the padded layout
            weight = torch.cat([self.query.weight, self.key.weight, self.value.weight])
            bias = torch.cat([self.query.bias, self.key.bias, self.value.bias])
            q, k, v = slots.pad(F.linear(x, weight, bias)).split(d, dim=-1)
            queries = x
        else:
            weight = torch.cat([self.key.weight, self.value.weight])
            bias = torch.cat([self.key.bias, self.value.bias])
            k, v = slots.pad(F.linear(x, weight, bias)).split(d, dim=-1)
            queries = x[outputs_at]  # (B, M, d)
            q = self.query(queries)
        k, v = self._heads(k).contiguous(), self._heads(v).contiguous()  # read again by every reasoning step
        context = self._attend(self._heads(q), k, v, allowed, drop, causal)  # (B, T, d)
        if outputs_at is None:
            context = slots.pack(context)
        return self._feed_forward(queries, context, drop), k, v

    def _attend(self, q, k, v, allowed, drop: float, causal: bool = False) -> torch.Tensor:
        """q (B, H, T, Dh), k/v (B, H, S, Dh), allowed bool broadcastable to (B, 1, T, S) or None (every
        key); ``causal`` (T = S, allowed None): query t sees keys 0..t -> context (B, T, H*Dh)."""
        if drop > 0 and q.device.type == "cpu":  # SDPA would fall back to this arithmetic, with a costlier mask
            if causal:
                allowed = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool, device=q.device).tril_()
            context = softmax_dropout_attention(q, [(k, v, allowed)], drop)
        else:
            context = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=drop, is_causal=causal)
        return self._merge_heads(context)


def cloze_inputs(histories: torch.Tensor, lengths: torch.Tensor, max_len: int):
    """BERT4Rec's next-item input: each history's newest max_len - 1 items, then a mask slot.

    histories (B, T) right-padded ids, lengths (B,) -> (ids (B, T'+1) with padding and the mask slot
    set to 0, lengths + mask slot (B,), is_mask (B, T'+1) bool: True at each row's mask slot),
    T' = min(T, max_len - 1).
    """
    B, T = histories.shape
    kept = lengths.clamp(max=max_len - 1)
    width = min(T, max_len - 1)
    columns = (lengths - kept)[:, None] + torch.arange(width, device=histories.device)
    ids = histories.gather(1, columns.clamp(max=T - 1))
    ids = torch.cat([ids, ids.new_zeros(B, 1)], dim=1)
    slots = torch.arange(width + 1, device=histories.device)[None, :]
    return ids.masked_fill(slots >= kept[:, None], 0), kept + 1, slots == kept[:, None]


class OutputHead(nn.Module):
    """BERT4Rec's prediction transform: LayerNorm(GELU(Linear(x)))."""

    def __init__(self, cfg: ReaRecConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(F.gelu(self.dense(x)))


class ReaRec(nn.Module):
    """``ReaRec(config)``; with ``config.item_feature_dim = f``, also ``item_features``: a float
    (n_items, f) matrix (saved in the checkpoint as the buffer ``item_features``)."""

    def __init__(self, config: ReaRecConfig, item_features: Optional[torch.Tensor] = None):
        super().__init__()
        config.validate()
        self.config = config
        d = config.hidden_size
        self.item_embedding = nn.Embedding(config.n_items, d)
        if config.item_feature_dim is not None:
            # beside the weights, wherever the matrix was (a CUDA matrix for a CPU model, or the reverse)
            self.register_buffer("item_features", _checked_features(item_features, config)
                                 .to(self.item_embedding.weight.device))
            self.feature_projection = nn.Linear(config.item_feature_dim, d, bias=False)
        elif item_features is not None:
            raise ValueError("item_features were given but config.item_feature_dim is None: set it to the "
                             "feature matrix's width")
        if config.backbone == "bert4rec":
            self.mask_embedding = nn.Parameter(torch.empty(d).normal_(0.0, config.init_std))
            self.output_head = OutputHead(config)
            self.output_bias = nn.Parameter(torch.zeros(config.n_items))
        self.position_embedding = nn.Embedding(config.max_len, d)
        self.reasoning_position_embedding = nn.Embedding(config.reason_steps, d)  # K rows
        self.input_norm = nn.LayerNorm(d, eps=config.input_eps)
        self.layers = nn.ModuleList(TransformerLayer(config) for _ in range(config.n_layers))
        self.id_mapping = None  # raw-id mapping saved with the model, if any; sets self.inputs
        # Kernel backend of SASRec's step-0 attention (None: REAREC_KERNEL_BACKEND, else "auto"); see
        # the module docstring. Not saved: a property of where the model runs.
        self.attention_backend: Optional[str] = None
        self.apply(self._init_weights)
        with torch.no_grad():  # cold items: their features alone (config.cold_items)
            self.item_embedding.weight[config.trained_items:] = 0.0
            if config.backbone == "bert4rec":
                self.output_bias[config.trained_items:] = 0.0

    @property
    def id_mapping(self) -> Optional[dict]:
        """The raw-id mapping saved with the model (``IdMapping.to_dict()`` form), or None."""
        return self._id_mapping

    @id_mapping.setter
    def id_mapping(self, mapping) -> None:
        """Accepts None, an ``IdMapping`` or its dict form; rebuilds :attr:`inputs`."""
        self.inputs = InputRules(self.config, mapping)  # checks the mapping against the item table
        self._id_mapping = self.inputs.mapping.to_dict() if self.inputs.mapping is not None else None

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=self.config.init_std)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
        if isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    # ------------------------------------------------------------------ item table and scoring
    def item_table(self) -> torch.Tensor:
        """(N, d): each item's input and scoring vector (id embedding + projected features, if any)."""
        table = self.item_embedding.weight
        if self.config.item_feature_dim is not None:
            table = table + self.feature_projection(self.item_features)
        return table

    def scoring_table(self) -> torch.Tensor:
        """(N, d'): the item table that scores compare with, ``queries @ table.T / τ`` (see
        :meth:`scoring_view`): the item table, and for BERT4Rec its output bias as a last column."""
        table = self.item_table()
        if self.config.backbone != "bert4rec":
            return table
        return torch.cat([table, self.output_bias[:, None]], dim=1)

    def scoring_view(self, states: torch.Tensor):
        """states (..., d) -> (queries (..., d'), items (N, d')) with scores = queries @ items.T / τ.

        SASRec: the states and the item table. BERT4Rec: its per-item output bias enters as one extra
        column (queries end in τ, items in the bias), so that every objective and the engine's fused
        top-K, which all compute ``queries @ items.T / τ``, include it.
        """
        table = self.scoring_table()
        if table.shape[1] == states.shape[-1]:
            return states, table
        return torch.cat([states, states.new_full(states.shape[:-1] + (1,), self.config.temperature)], -1), table

    # ------------------------------------------------------------------ the reasoning loop
    def _step_input(self, x: torch.Tensor) -> torch.Tensor:
        return dropout(self.input_norm(x), self.config.input_dropout, self.training)

    def _history_embeddings(self, ids, is_mask, table):
        """ids (B, L) -> item (or mask token, where ``is_mask``) + position embeddings, (B, L, d)."""
        x = F.embedding(ids, table)
        if is_mask is not None:
            x = torch.where(is_mask[..., None], self.mask_embedding.to(x.dtype), x)
        return x + self.position_embedding.weight[: ids.shape[1]]

    def _encode(self, x, lengths, outputs_at=None):
        """Step 0 over embedded slots x (B, L, d) with lengths (B,).

        Causal for SASRec, bidirectional for BERT4Rec; padded slots are never keys of a real slot.
        Returns (the last layer's outputs at ``outputs_at`` (B, M) slot indices, (B, M, d) — each
        row's last slot when None, (B, 1, d) —, per-layer keys and values, the keys every later token
        may attend to).
        """
        L = x.shape[1]
        positions = torch.arange(L, device=x.device)
        history_allowed = (positions[None, :] < lengths[:, None])[:, None, None, :]  # (B, 1, 1, L)
        if outputs_at is None:
            outputs_at = (lengths - 1)[:, None]
        rows = torch.arange(x.shape[0], device=x.device)[:, None]
        keys, values = [], []
        if self.uses_attention_kernel(x.device):
            for layer in self.layers:
                x, k, v = layer.prefill(x, lengths, backend=Backend.TRITON)
                keys.append(k)
                values.append(v)
            return x[rows, outputs_at], keys, values, history_allowed
        slots = RealSlots(lengths, L)  # per-token work on the real slots only (a quarter or more is padding)
        x = slots.pack(x)
        # Padding comes after a row's real slots, so causal attention alone keeps every real slot away
        # from it; bidirectional attention masks the padding keys. A padding slot's own output is never
        # read (its q/k/v are 0, and some key is always allowed).
        causal = self.config.backbone == "sasrec"
        for i, layer in enumerate(self.layers):
            if i < len(self.layers) - 1:
                x, k, v = layer.forward_real_slots(x, slots, None if causal else history_allowed, causal=causal)
            else:  # only some slots' outputs are needed from the last layer (its K/V: all slots)
                query_allowed = (positions <= outputs_at[..., None])[:, None] if causal else history_allowed
                x, k, v = layer.forward_real_slots(x, slots, query_allowed, outputs_at=slots.positions(outputs_at))
            keys.append(k)
            values.append(v)
        return x, keys, values, history_allowed

    def uses_attention_kernel(self, device: torch.device) -> bool:
        """Whether step 0 runs the Triton attention kernels (forward and backward) for tensors on
        ``device``: SASRec, with :attr:`attention_backend` resolving to Triton (CUDA by default)."""
        if self.config.backbone != "sasrec":
            return False
        return resolve(PREFILL_AUTOGRAD_OP, self.attention_backend, device) is Backend.TRITON

    def _run(self, histories, lengths, depth, noise_std=0.0):
        """States r_0..r_depth (B, depth+1, d); with noise_std > 0 also those of a noisy copy.

        The noisy copy (PRL's contrastive view) runs the same batch again with its own dropout; its
        input at step s is the CLEAN pass's r_{s-1} + reason_pos[s-1] plus Gaussian noise of std
        noise_std. Both run as one batch of 2B rows, the clean rows first, as in the public code
        (at ML-1M's shape on CPU, against two passes of B rows: a PRL step 4% faster under bf16,
        1.5% slower in fp32, with the heap set by :func:`rearec.heap.reuse_freed_memory`).
        """
        if histories.shape[-1] > self.config.max_len:  # SASRec failed inside the position add, BERT4Rec cut silently
            raise ValueError(f"histories are {histories.shape[-1]} slots wide but max_len is {self.config.max_len}: keep "
                             "each row's newest max_len items (recommend and reasoning_states do), or build the model "
                             "with a larger max_len")
        is_mask = None
        if self.config.backbone == "bert4rec":  # the newest max_len - 1 items, then the mask token
            histories, lengths, is_mask = cloze_inputs(histories, lengths, self.config.max_len)
        embedded = self._history_embeddings(histories, is_mask, self.item_table())
        B, noisy = embedded.shape[0], noise_std > 0
        x = self._step_input(embedded)
        if noisy:  # the noisy copy: the same histories again, with dropout drawn anew
            x, lengths = torch.cat([x, self._step_input(embedded)]), lengths.repeat(2)
        last, keys, values, history_allowed = self._encode(x, lengths)
        history = list(zip(keys, values))  # per layer: step 0's (keys, values)
        states = [last[:, -1]]  # r_0 of each row, the noisy copy's after the clean ones: (B or 2B, d)

        # Steps 1..depth: one new token each, attending to the valid history and all reasoning tokens.
        reasoning = [None] * len(self.layers)  # per layer: the reasoning tokens' (keys, values)
        for s in range(1, depth + 1):
            token = states[-1][:B] + self.reasoning_position_embedding.weight[s - 1]
            if noisy:
                token = torch.cat([token, token + noise_std * torch.randn_like(token)])
            x = self._step_input(token[:, None, :])
            for i, layer in enumerate(self.layers):
                x, reasoning[i] = layer.reasoning_step(x, history[i], reasoning[i], history_allowed)
            states.append(x[:, 0])
        out = self.output_states(torch.stack(states, dim=1))  # (B or 2B, depth+1, d)
        return out[:B], (out[B:] if noisy else None)

    def output_states(self, states: torch.Tensor) -> torch.Tensor:
        """The backbone's output transform of encoder states (..., d): BERT4Rec's head; SASRec: none."""
        return self.output_head(states) if self.config.backbone == "bert4rec" else states

    def forward(self, histories: torch.Tensor, lengths: torch.Tensor, depth: Optional[int] = None):
        """histories (B, L) right-padded ids, lengths (B,) -> states r_0..r_depth, (B, depth+1, d)."""
        return self._run(histories, lengths, self.inputs.depth(depth))[0]

    def forward_with_noisy_copy(self, histories, lengths, noise_std: float, depth: Optional[int] = None):
        """-> (clean states, noisy-copy states), each (B, depth+1, d). See ``_run``."""
        return self._run(histories, lengths, self.inputs.depth(depth), noise_std)

    def masked_item_states(self, sequences, lengths, masked):
        """BERT4Rec's cloze task: sequences (B, L) right-padded ids with lengths (B,), ``masked`` (B, L)
        bool (valid slots only, at least one per row) -> the output states (head applied) at the masked
        slots, (number masked, d), row-major order. Masked slots take the mask token as input."""
        if self.config.backbone != "bert4rec":
            raise ValueError("masked_item_states is BERT4Rec's cloze task; this model's backbone is "
                             f"{self.config.backbone!r}")
        count = masked.sum(dim=1)
        width = int(count.max())
        # Each row's masked slots first, in slot order; a row with fewer than ``width`` masked slots is
        # filled up with its other slots, whose outputs are dropped below.
        order = torch.sort((~masked).to(torch.int8), dim=1, stable=True).indices[:, :width]
        x = self._step_input(self._history_embeddings(sequences, masked, self.item_table()))
        x = self.output_states(self._encode(x, lengths, outputs_at=order)[0])  # (B, width, d)
        return x[torch.arange(width, device=x.device)[None, :] < count[:, None]]

    # ------------------------------------------------------------------ scoring
    def readout(self, states: torch.Tensor, readout: Optional[str] = None) -> torch.Tensor:
        """states (B, S, d) -> user vectors (B, d): the last step ("last"), the mean of all steps
        ("mean"), or each user's halting step ("adaptive", at ``config.halt_kl``)."""
        readout = check_readout(readout, self.config.readout, self.config.halt_kl)
        if readout == "last":
            return states[:, -1]
        if readout == "adaptive":
            return self.halting_readout(states, self.config.halt_kl)[0]
        return states.mean(dim=1)

    def halting_readout(self, states: torch.Tensor, halt_kl: float):
        """Adaptive depth by halting (the study's ``kl-halt`` selector, :mod:`rearec.selectors`): per user
        the first step s >= 1 whose item distribution moved less than ``halt_kl`` nats from step s-1,
        KL(p_s || p_{s-1}) < halt_kl, else the last step. states (B, S, d) -> (user vectors (B, d),
        steps (B,)). ``readout="adaptive"`` is this at ``config.halt_kl``; ``FastReaRec`` computes the
        same decisions step by step, dropping halted users from the decode batch. With one state
        (depth 0) every user stops at step 0."""
        if states.shape[1] == 1:
            return states[:, 0], torch.zeros(states.shape[0], dtype=torch.long, device=states.device)
        log_p = torch.log_softmax(self.scores(states).double(), dim=-1)  # (B, S, N); float64: the KL of
        # close steps is a small difference of large numbers
        kl = (log_p[:, 1:].exp() * (log_p[:, 1:] - log_p[:, :-1])).sum(-1)  # (B, S-1)
        below = kl < halt_kl
        last = torch.full_like(below[:, 0], states.shape[1] - 1, dtype=torch.long)
        steps = torch.where(below.any(dim=1), below.int().argmax(dim=1) + 1, last)
        return states[torch.arange(states.shape[0], device=states.device), steps], steps

    def scores(self, user_vectors: torch.Tensor) -> torch.Tensor:
        """user_vectors (..., d) -> logits over every row of the item table (..., N)."""
        queries, items = self.scoring_view(user_vectors)
        return queries @ items.T / self.config.temperature

    # ------------------------------------------------------------------ inference helpers
    # The argument rules (histories, raw ids, k, depth, readout, exclusion) live in rearec/inputs.py,
    # shared with FastReaRec; ``self.inputs`` holds this model's.
    @torch.no_grad()
    def reasoning_states(self, histories: Histories, depth: Optional[int] = None, lengths=None,
                         raw_ids: Optional[bool] = None) -> torch.Tensor:
        """Reasoning states for a batch of histories, in eval mode: float tensor (B, depth+1, d).

        ``histories``: a list of item-id lists (oldest first; raw ids when the model has an id mapping),
        or a right-padded integer tensor (B, T) of dense ids with ``lengths`` (B,). Histories longer
        than ``max_len`` keep their newest ``max_len`` items. ``depth`` is any value 0..K (default K).
        """
        depth = self.inputs.depth(depth)
        padded, lens = self.prepare_histories(histories, lengths, raw_ids=raw_ids)
        return self._eval_states(padded, lens, depth)

    @torch.no_grad()
    def recommend(self, histories: Histories, k: int = 10, depth: Optional[int] = None,
                  readout: Optional[str] = None, exclude_seen: bool = False, lengths=None,
                  raw_ids: Optional[bool] = None) -> Recommendations:
        """Top-k items for each history, best first (never the padding item; optionally never an item
        of the user's own history). See :class:`rearec.inputs.Recommendations`. Runs in eval mode; a
        model in train mode is switched for the call and back, so share only an eval-mode model (as
        ``ReaRec.load`` returns it) between threads, or serve with :class:`rearec.FastReaRec`."""
        request = self.inputs.request(histories, k=k, depth=depth, readout=readout, exclude_seen=exclude_seen,
                                      lengths=lengths, raw_ids=raw_ids, device=self.item_embedding.weight.device)
        states = self._eval_states(request.histories, request.lengths, request.depth)
        scores = self.scores(self.readout(states, request.readout)).float()
        values, items = top_k_excluding(scores, request.k, request.exclude)
        return self.inputs.recommendations(items, values)

    def _eval_states(self, padded, lengths, depth):
        # A model in train mode is put in eval mode for the call and back after it: so calls from several
        # threads are safe on a model in eval mode (ReaRec.load's), not on one that is training.
        was_training = self.training
        self.eval()
        try:
            return self(padded, lengths, depth)
        finally:
            self.train(was_training)

    def prepare_histories(self, histories: Histories, lengths=None, raw_ids: Optional[bool] = None):
        """Validated right-padded dense ids (B, T ≤ max_len) and lengths (B,) on the model's device;
        see :meth:`rearec.inputs.InputRules.histories`."""
        return self.inputs.histories(histories, lengths, raw_ids=raw_ids, device=self.item_embedding.weight.device)

    # ------------------------------------------------------------------ checkpoints
    def save(self, path: Union[str, os.PathLike], id_mapping: Optional[dict] = None) -> None:
        """Write weights (safetensors), config and raw-id mapping (JSON in its metadata) atomically.

        ``id_mapping`` (an ``IdMapping`` or its dict form) replaces the model's own in the file."""
        from safetensors.torch import save_file

        mapping = self.id_mapping if id_mapping is None else InputRules(self.config, id_mapping).mapping.to_dict()
        metadata = {
            "format": "rearec",
            "format_version": FORMAT_VERSION,
            "config": json.dumps(self.config.to_dict()),
        }
        if mapping is not None:
            metadata["id_mapping"] = json.dumps(mapping)
        tensors = {name: t.detach().cpu().contiguous() for name, t in self.state_dict().items()}
        atomic_write(os.fspath(path), lambda tmp: save_file(tensors, tmp, metadata=metadata))

    @classmethod
    def load(cls, path: Union[str, os.PathLike], map_location="cpu") -> "ReaRec":
        """Load a checkpoint written by :meth:`save` (``path``: the file, or a run folder holding
        ``model.safetensors``); verifies every tensor against the config."""
        from safetensors import safe_open

        path = model_file(path)
        if not os.path.isfile(path):
            raise ValueError(f"checkpoint {path} does not exist; pass a {MODEL_FILE} or the run folder holding one")
        try:
            with safe_open(path, framework="pt", device=str(map_location)) as f:
                metadata = f.metadata() or {}
                tensors = {name: f.get_tensor(name) for name in f.keys()}
        except Exception as error:  # safetensors raises its own error types for corrupt files
            raise ValueError(f"{path} is not a readable rearec checkpoint ({' '.join(str(error).split())[:120]}); pass "
                             f"a {MODEL_FILE} written by rearec train or ReaRec.save, or the run folder holding one "
                             f"({STATE_FILE} is the training state, for --resume)") from None
        if metadata.get("format") != "rearec":
            raise ValueError(f"{path} is a safetensors file but not a rearec checkpoint (no rearec metadata)")
        if metadata.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{path} is a rearec checkpoint of format version "
                             f"{metadata.get('format_version')!r}, but this rearec reads version {FORMAT_VERSION!r}; "
                             "load it with the rearec version that wrote it")
        config = _metadata_json(metadata, "config", path)
        try:
            config = ReaRecConfig.from_dict(config)
        except (TypeError, ValueError) as error:  # a config that parses but does not validate
            raise ValueError(f"{path}: metadata entry 'config' is not a valid model config: {error}") from None
        # The feature matrix is a tensor of the file: a missing or bad one is named as _load_checked names
        # the others (without features in the config, one in the file is an unexpected weight there)
        features = tensors.get("item_features") if config.item_feature_dim is not None else None
        if config.item_feature_dim is not None and features is None:
            raise ValueError(f"{path}: missing weight(s) item_features")
        try:
            model = cls(config, item_features=features)
        except ValueError as error:  # the feature matrix's shape or values
            raise ValueError(f"{path}: weight item_features: {error}") from None
        _load_checked(model, tensors, source=path)
        # The model comes back on the device the tensors were read to, in the float dtype they were saved in
        # (a model cast to bfloat16 before saving loads as bfloat16, not as float32).
        float_dtypes = {t.dtype for t in tensors.values() if t.is_floating_point()}
        model.to(map_location, dtype=float_dtypes.pop() if len(float_dtypes) == 1 else None)
        if "id_mapping" in metadata:
            mapping = _metadata_json(metadata, "id_mapping", path)
            try:
                model.id_mapping = mapping
            except ValueError as error:
                raise ValueError(f"{path}: metadata entry 'id_mapping': {error}") from None
        return model.eval()

    @classmethod
    def from_official_checkpoint(cls, path_or_state_dict, n_heads: int = 2, **overrides) -> "ReaRec":
        """Load a state_dict written by the paper's public code (TangJiakai/ReaRec).

        Sizes come from the tensors' shapes (layers, hidden and inner size, K, max_len); the head count
        and other hyperparameters from the arguments (``layer_norm_eps`` is the transformer layers'; the
        input LayerNorm keeps the public code's fixed 1e-12 unless ``input_norm_eps`` is given). Item ids are kept: official id i is id i here; the
        official padding row (the table's last) becomes ``pad_item`` and is never recommended. Returns
        the model in eval mode. ERL and PRL checkpoints hold the same keys: ``objective`` defaults to
        "prl" (readout "last"); pass ``objective="erl"`` for an ERL checkpoint (readout "mean").
        """
        from rearec.official import OFFICIAL_INPUT_NORM_EPS, convert_official_state_dict, official_key, official_source

        state, sizes = convert_official_state_dict(path_or_state_dict)
        config = ReaRecConfig(**{**sizes, "n_heads": n_heads, "input_norm_eps": OFFICIAL_INPUT_NORM_EPS, **overrides})
        model = cls(config)
        _load_checked(model, state, source=official_source(path_or_state_dict),
                      describe=lambda ours: f"{official_key(ours)} (our {ours})")
        return model.eval()


def _checked_features(features, cfg: ReaRecConfig) -> torch.Tensor:
    """The (n_items, item_feature_dim) finite float feature matrix, as float32; else a ValueError."""
    shape = (cfg.n_items, cfg.item_feature_dim)
    if features is None:
        raise ValueError(f"config.item_feature_dim is {cfg.item_feature_dim}: pass item_features, a float "
                         f"{shape} matrix (see rearec.data.item_features)")
    if not isinstance(features, torch.Tensor):
        array = np.asarray(features)  # a numpy matrix, a list of rows, a pandas DataFrame
        try:
            features = torch.tensor(array.astype(np.float32) if array.dtype == object else array)
        except (TypeError, ValueError) as error:
            raise ValueError(f"item_features must be a numeric {shape} matrix ({type(features).__name__} of "
                             f"{array.dtype} given: {error})") from None
    if features.dtype == torch.bool or features.dtype.is_complex:
        raise ValueError(f"item_features must be a real-valued matrix, got dtype {features.dtype}")
    if tuple(features.shape) != shape:
        raise ValueError(f"item_features has shape {tuple(features.shape)}, but the config needs {shape} "
                         "(one row per item of the table, item_feature_dim columns)")
    features = features.detach().float()  # a constant: no gradient back into the user's encoder
    if not torch.isfinite(features).all():
        raise ValueError("item_features holds NaN or Inf values; replace them (e.g. with 0) first")
    return features.clone()


def _metadata_json(metadata: dict, key: str, path: str):
    """One JSON entry of a checkpoint's metadata; a ValueError naming the file and the entry if it is
    missing or corrupt."""
    if key not in metadata:
        raise ValueError(f"{path}: the checkpoint's metadata has no {key!r} entry; it was not written by "
                         "ReaRec.save or is damaged, save it again")
    try:
        return json.loads(metadata[key])
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: metadata entry {key!r} is not valid JSON ({error}); the checkpoint is "
                         "damaged, save or copy it again") from None


def _load_checked(model: nn.Module, tensors: dict, source: str, describe: Callable[[str], str] = str) -> None:
    """Copy ``tensors`` into ``model``: any missing, unexpected, mis-shaped or non-finite tensor is a
    ValueError that names it as ``describe(our key)`` (the key in the user's file)."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing:
        raise ValueError(f"{source}: missing weight(s) {', '.join(map(describe, missing))}")
    if unexpected:
        raise ValueError(f"{source}: unexpected weight(s) {', '.join(map(describe, unexpected))}")
    for name, tensor in tensors.items():
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise ValueError(f"{source}: weight {describe(name)} has shape {tuple(tensor.shape)}, but the "
                             f"config needs {tuple(expected[name].shape)}")
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise ValueError(f"{source}: weight {describe(name)} holds NaN or Inf values")
    model.load_state_dict(tensors)
