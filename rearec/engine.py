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

import threading
from typing import Optional

import torch
import torch.nn.functional as F

from rearec.inputs import Histories, Recommendations
from rearec.model import LayerWeights, ReaRec
from rearec_kernels.attention import decode_attention, prefill_attention
from rearec_kernels.kv_cache import KVCache
from rearec_kernels.topk import fused_topk


class _Layer:
    """One transformer layer's weights in the engine's layout (Q, K and V fused into one matmul)."""

    def __init__(self, weights: LayerWeights, device, dtype):
        def w(t):
            return t.detach().to(device=device, dtype=dtype).contiguous()

        q, k, v = weights.query, weights.key, weights.value
        self.qkv_weight = w(torch.cat([q[0], k[0], v[0]]))  # (3d, d)
        self.qkv_bias = w(torch.cat([q[1], k[1], v[1]]))
        self.out_weight, self.out_bias = (w(t) for t in weights.attn_out)
        self.norm1 = tuple(w(t) for t in weights.attn_norm)
        self.ffn_in = tuple(w(t) for t in weights.ffn_in)
        self.ffn_out = tuple(w(t) for t in weights.ffn_out)
        self.norm2 = tuple(w(t) for t in weights.ffn_norm)
        self.act = weights.activation


class _Buffers:
    """Per-thread reusable state for one (batch, capacity) shape."""

    def __init__(self, cache: KVCache):
        self.cache = cache
        self.graphs = {}  # depth -> (CUDA graph, its input state, its output states)


class FastReaRec:
    """Serve a trained ReaRec: ``engine.recommend(histories, k=10, depth=None, readout=None, exclude_seen=False)``.

    Arguments and results follow ``ReaRec.recommend`` exactly (one set of rules, ``self.inputs``, from
    :mod:`rearec.inputs`): ``histories`` is a list of item-id lists (oldest first; raw ids when the
    checkpoint has an id mapping), or a right-padded integer tensor (B, T) of dense ids with
    ``lengths``; results carry ``raw_items`` whenever there is a mapping. ``depth`` is chosen per
    call, 0..K. ``cuda_graphs`` replays the reasoning steps from CUDA graphs (CUDA only).
    Safe to share between threads.
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
        self.layers = [_Layer(layer.weights(), dev, dt) for layer in model.layers]
        self.eps = cfg.layer_norm_eps
        self.id_mapping = model.id_mapping
        self.inputs = model.inputs  # the argument rules, shared with the model (rearec/inputs.py)
        self._local = threading.local()  # per-thread reusable buffers

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_model(cls, model: ReaRec, device=None, dtype=None, backend=None, cuda_graphs: bool = True) -> "FastReaRec":
        return cls(model, device=device, dtype=dtype, backend=backend, cuda_graphs=cuda_graphs)

    @classmethod
    def load(cls, path, device=None, dtype=None, backend=None, cuda_graphs: bool = True) -> "FastReaRec":
        """Serve a checkpoint written by ``ReaRec.save``."""
        return cls(ReaRec.load(path), device=device, dtype=dtype, backend=backend, cuda_graphs=cuda_graphs)

    @classmethod
    def from_official_checkpoint(cls, path_or_state_dict, n_heads: int = 2, device=None, dtype=None,
                                 backend=None, cuda_graphs: bool = True, **overrides) -> "FastReaRec":
        """Serve a state_dict of the paper's public code; see ``ReaRec.from_official_checkpoint``."""
        model = ReaRec.from_official_checkpoint(path_or_state_dict, n_heads=n_heads, **overrides)
        return cls(model, device=device, dtype=dtype, backend=backend, cuda_graphs=cuda_graphs)

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
        q, k, v = qkv[newest].unbind(1)  # each (B, H, Dh)
        with cache.rewound(1):
            context = decode_attention(q, k, v, cache, last, backend=self.backend)
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
    def reasoning_states(self, histories: Histories, depth: Optional[int] = None, lengths=None,
                         raw_ids: Optional[bool] = None) -> torch.Tensor:
        """(B, depth+1, d) float32 states r_0..r_depth, as ``ReaRec.reasoning_states``."""
        depth = self.inputs.depth(depth)
        padded, lens = self.inputs.histories(histories, lengths, raw_ids=raw_ids, device=self.device)
        return self._states(padded, lens, depth).float()

    @torch.inference_mode()
    def recommend(self, histories: Histories, k: int = 10, depth: Optional[int] = None,
                  readout: Optional[str] = None, exclude_seen: bool = False, lengths=None,
                  raw_ids: Optional[bool] = None) -> Recommendations:
        """Top-k items per history, best first; never the padding item, optionally never a seen item."""
        request = self.inputs.request(histories, k=k, depth=depth, readout=readout, exclude_seen=exclude_seen,
                                      lengths=lengths, raw_ids=raw_ids, device=self.device)
        states = self._states(request.histories, request.lengths, request.depth)
        user = states[:, -1] if request.readout == "last" else states.mean(dim=1)
        values, items = fused_topk(user, self.item_table, request.k, scale=1.0 / self.config.temperature,
                                   exclude=request.exclude, backend=self.backend)
        return self.inputs.recommendations(items, values)
