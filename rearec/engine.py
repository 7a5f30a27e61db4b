"""FastReaRec: the inference engine production code imports.

One prefill over the history writes every layer's keys and values into a preallocated cache; each
reasoning step is then one token per user (``decode_attention`` on that cache), and scoring is a
fused top-K over the item table that never materialises the B × N score matrix. The kernels come
from ``rearec_kernels``: Triton on CUDA tensors, fast PyTorch paths on CPU tensors.

It computes exactly what ``ReaRec.reasoning_states`` / ``ReaRec.recommend`` compute (the parity
tests hold it to 1e-5 in float32), in inference mode, with weights in the engine's own layout
(Q, K and V projections fused into one matmul).
"""
from __future__ import annotations

import math
import threading
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from rearec.model import Recommendations, ReaRec, exclusion_ids, prepare_histories, resolve_depth
from rearec_kernels.attention import decode_attention, prefill_attention
from rearec_kernels.kv_cache import KVCache
from rearec_kernels.topk import fused_topk


class _Layer:
    """One transformer layer's weights in the engine's layout."""

    def __init__(self, layer, device, dtype):
        def w(t):
            return t.detach().to(device=device, dtype=dtype).contiguous()

        self.qkv_weight = w(torch.cat([layer.query.weight, layer.key.weight, layer.value.weight]))  # (3d, d)
        self.qkv_bias = w(torch.cat([layer.query.bias, layer.key.bias, layer.value.bias]))
        self.out_weight, self.out_bias = w(layer.attn_out.weight), w(layer.attn_out.bias)
        self.norm1 = (w(layer.attn_norm.weight), w(layer.attn_norm.bias))
        self.ffn_in = (w(layer.ffn_in.weight), w(layer.ffn_in.bias))
        self.ffn_out = (w(layer.ffn_out.weight), w(layer.ffn_out.bias))
        self.norm2 = (w(layer.ffn_norm.weight), w(layer.ffn_norm.bias))
        self.act = layer.act


class _Buffers:
    """Per-thread reusable state for one (batch, capacity) shape."""

    def __init__(self, cache: KVCache):
        self.cache = cache
        self.graphs = {}  # depth -> (CUDA graph, its input state, its output states)


class FastReaRec:
    """Serve a trained ReaRec: ``engine.recommend(histories, k=10, depth=None, readout=None, exclude_seen=False)``.

    ``histories``: a list of item-id lists (oldest first), or a right-padded LongTensor (B, T) with
    ``lengths``. When the checkpoint carries a raw-id mapping, histories are raw ids (strings or ints)
    and results carry ``raw_items`` too; pass ``raw_ids=False`` to use dense ids.
    ``depth`` is chosen per call, 0..K. Safe to share between threads.
    """

    def __init__(self, model: ReaRec, device=None, dtype=None, backend=None, cuda_graphs: bool = True):
        cfg = model.config
        self.config = cfg
        self.device = torch.device(device) if device is not None else model.item_embedding.weight.device
        self.dtype = dtype or torch.float32
        if self.dtype != torch.float32 and self.device.type != "cuda":
            raise ValueError(f"dtype {self.dtype} is for CUDA devices; on CPU use float32")
        self.backend = backend
        self.cuda_graphs = cuda_graphs
        dev, dt = self.device, self.dtype

        def w(t):
            return t.detach().to(device=dev, dtype=dt).contiguous()

        self.item_table = w(model.item_embedding.weight)
        self.positions = w(model.position_embedding.weight)
        self.reasoning_positions = w(model.reasoning_position_embedding.weight)
        self.input_norm = (w(model.input_norm.weight), w(model.input_norm.bias))
        self.layers = [_Layer(layer, dev, dt) for layer in model.layers]
        self.eps = cfg.layer_norm_eps
        self.id_mapping = model.id_mapping
        self._raw_to_dense = None
        if self.id_mapping is not None and "items" in self.id_mapping:
            self._raw_to_dense = {str(raw): i for i, raw in enumerate(self.id_mapping["items"])}
        self._local = threading.local()  # per-thread reusable buffers

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_model(cls, model: ReaRec, device=None, dtype=None, backend=None) -> "FastReaRec":
        return cls(model, device=device, dtype=dtype, backend=backend)

    @classmethod
    def load(cls, path, device=None, dtype=None, backend=None) -> "FastReaRec":
        return cls(ReaRec.load(path), device=device, dtype=dtype, backend=backend)

    @classmethod
    def from_official_checkpoint(cls, path_or_state_dict, n_heads: int = 2, device=None, dtype=None,
                                 backend=None, **overrides) -> "FastReaRec":
        model = ReaRec.from_official_checkpoint(path_or_state_dict, n_heads=n_heads, **overrides)
        return cls(model, device=device, dtype=dtype, backend=backend)

    # ------------------------------------------------------------------ inputs
    def _depth(self, depth: Optional[int]) -> int:
        return resolve_depth(depth, self.config.reason_steps)

    def _to_dense(self, histories, raw_ids):
        if raw_ids is None:
            raw_ids = self._raw_to_dense is not None
        if not raw_ids:
            return histories
        if self._raw_to_dense is None:
            raise ValueError("raw_ids=True needs a checkpoint with a raw-id mapping; this model has none")
        if isinstance(histories, torch.Tensor):
            raise ValueError("raw ids come as lists of ids; pass raw_ids=False for a tensor of dense ids")
        dense = []
        for b, history in enumerate(histories):
            row = []
            for raw in history:
                index = self._raw_to_dense.get(str(raw))
                if index is None:
                    raise ValueError(f"history {b} holds item {raw!r}, which the model never saw in training")
                row.append(index)
            dense.append(row)
        return dense

    def _prepare(self, histories, lengths, raw_ids):
        return prepare_histories(self._to_dense(histories, raw_ids), lengths, n_items=self.config.n_items,
                                 max_len=self.config.max_len, device=self.device)

    # ------------------------------------------------------------------ the computation
    def _buffers(self, batch: int, capacity: int) -> "_Buffers":
        """This thread's KV cache (and CUDA graphs) for this shape, reused across calls."""
        pool = self._local.__dict__.setdefault("buffers", {})
        key = (batch, capacity)
        if key not in pool:
            cfg = self.config
            pool.clear()  # keep one shape per thread: serving batches rarely alternate
            cache = KVCache.allocate(cfg.n_layers, batch, cfg.n_heads, capacity, cfg.head_dim,
                                     dtype=self.dtype, device=self.device)
            pool[key] = _Buffers(cache)
        return pool[key]

    def _layer_tail(self, layer: _Layer, x, context):
        """Everything after attention: output projection, residual + LN, feed-forward, residual + LN."""
        d = x.shape[-1]
        x = F.layer_norm(x + F.linear(context, layer.out_weight, layer.out_bias), (d,), *layer.norm1, self.eps)
        hidden = layer.act(F.linear(x, *layer.ffn_in))
        return F.layer_norm(x + F.linear(hidden, *layer.ffn_out), (d,), *layer.norm2, self.eps)

    def _states(self, padded, lengths, depth):
        cfg = self.config
        B, L = padded.shape
        H, Dh, d = cfg.n_heads, cfg.head_dim, cfg.hidden_size
        buffers = self._buffers(B, L + cfg.reason_steps)  # room for any depth: one cache per batch shape
        cache = buffers.cache
        cache.lengths.copy_(lengths.to(cache.lengths.dtype))

        # Prefill: the whole history, every layer's K/V into the cache.
        x = F.embedding(padded, self.item_table) + self.positions[:L]
        x = F.layer_norm(x, (d,), *self.input_norm, self.eps)
        newest = torch.arange(B, device=x.device), lengths - 1
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers[:last]):
            qkv = F.linear(x, layer.qkv_weight, layer.qkv_bias).view(B, L, 3, H, Dh)
            context = prefill_attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], lengths, cache, i,
                                        backend=self.backend)
            x = self._layer_tail(layer, x, context.reshape(B, L, d))
        # The last layer's output is needed for the newest item only: cache every item's K/V, then
        # attend from the newest item alone, as a decode step at slot lengths-1.
        layer = self.layers[last]
        qkv = F.linear(x, layer.qkv_weight, layer.qkv_bias).view(B, L, 3, H, Dh)
        cache.store(last, qkv[:, :, 1], qkv[:, :, 2])
        cache.lengths.sub_(1)
        q, k, v = qkv[newest].unbind(1)  # each (B, H, Dh)
        context = decode_attention(q, k, v, cache, last, backend=self.backend)
        cache.lengths.add_(1)
        first = self._layer_tail(layer, x[newest], context.reshape(B, d))  # r_0: (B, d)
        if depth == 0:
            return first[:, None]
        if self.device.type == "cuda" and self.cuda_graphs:
            steps = self._reason_graphed(first, buffers, depth)
        else:
            steps = self._reason(first, cache, depth)
        return torch.cat([first[:, None], steps], dim=1)

    def _reason(self, state, cache: KVCache, depth: int) -> torch.Tensor:
        """Reasoning steps 1..depth, one token per user each: (B, depth, d)."""
        B, d = state.shape
        H, Dh = self.config.n_heads, self.config.head_dim
        states = []
        for s in range(depth):
            x = F.layer_norm(state + self.reasoning_positions[s], (d,), *self.input_norm, self.eps)
            for i, layer in enumerate(self.layers):
                qkv = F.linear(x, layer.qkv_weight, layer.qkv_bias).view(B, 3, H, Dh)
                context = decode_attention(qkv[:, 0], qkv[:, 1], qkv[:, 2], cache, i, backend=self.backend)
                x = self._layer_tail(layer, x, context.reshape(B, d))
            cache.advance()
            state = x
            states.append(state)
        return torch.stack(states, dim=1)

    def _reason_graphed(self, state, buffers: "_Buffers", depth: int) -> torch.Tensor:
        """``_reason`` replayed from a CUDA graph captured once per (thread, shape, depth): the decode
        loop is dozens of small kernels whose launch cost would otherwise dominate."""
        cache = buffers.cache
        if depth not in buffers.graphs:
            history_lengths = cache.lengths.clone()
            static_state = state.clone()
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):  # warm up (Triton compiles) outside the capture
                for _ in range(2):
                    cache.lengths.copy_(history_lengths)
                    self._reason(static_state, cache, depth)
            torch.cuda.current_stream(self.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            cache.lengths.copy_(history_lengths)
            with torch.cuda.graph(graph):
                static_out = self._reason(static_state, cache, depth)
            cache.lengths.copy_(history_lengths)
            buffers.graphs[depth] = (graph, static_state, static_out)
        graph, static_state, static_out = buffers.graphs[depth]
        static_state.copy_(state)
        graph.replay()
        return static_out.clone()

    # ------------------------------------------------------------------ public API
    @torch.inference_mode()
    def reasoning_states(self, histories, depth: Optional[int] = None, lengths=None, raw_ids=None) -> torch.Tensor:
        """(B, depth+1, d) float32 states r_0..r_depth, as ``ReaRec.reasoning_states``."""
        depth = self._depth(depth)
        padded, lens = self._prepare(histories, lengths, raw_ids)
        return self._states(padded, lens, depth).float()

    @torch.inference_mode()
    def recommend(self, histories, k: int = 10, depth: Optional[int] = None, readout: Optional[str] = None,
                  exclude_seen: bool = False, lengths=None, raw_ids=None) -> Recommendations:
        """Top-k items per history, best first; never the padding item, optionally never a seen item."""
        depth = self._depth(depth)
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be a positive integer (got {k!r})")
        readout = readout or self.config.readout
        if readout not in ("last", "mean"):
            raise ValueError(f"readout {readout!r} is unknown: use 'last' or 'mean'")
        padded, lens = self._prepare(histories, lengths, raw_ids)
        states = self._states(padded, lens, depth)
        user = states[:, -1] if readout == "last" else states.mean(dim=1)
        exclude = exclusion_ids(padded, lens, self.config.pad_item, exclude_seen)
        values, items = fused_topk(user, self.item_table, min(k, self.config.n_items),
                                   scale=1.0 / self.config.temperature, exclude=exclude, backend=self.backend)
        recs = Recommendations(items=items, scores=values.float())
        if raw_ids if raw_ids is not None else self._raw_to_dense is not None:
            names = self.id_mapping["items"]
            recs.raw_items = [[names[i] if i >= 0 else None for i in row] for row in items.tolist()]
        return recs
