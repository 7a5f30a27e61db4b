"""FastReaRec: the inference engine production code imports.

One prefill over the history writes every layer's keys and values into a preallocated cache; each
reasoning step is then one token per user (``decode_attention`` on that cache), and scoring is a
fused top-K over the item table that never materialises the B × N score matrix. The kernels come
from ``rearec_kernels``: Triton on CUDA tensors, fast PyTorch paths on CPU tensors.

It computes exactly what ``ReaRec.reasoning_states`` / ``ReaRec.recommend`` compute (the parity
tests hold it to 1e-5 in float32), in inference mode, with weights in the engine's own layout
(Q, K and V projections fused into one matmul).

For serving (see also :mod:`rearec.serving`):

* a session KV cache (``session_cache_mb``, :mod:`rearec.session_cache`): with ``users=`` a returning
  user's history prefills only the items after what the cache holds for that user;
* fixed shapes: each thread keeps a KV cache of capacity ``max_len + K`` whatever the histories'
  lengths, for the largest batch bucket (power of two) it served, and smaller batches use its first
  rows, so changing batches allocate nothing. With CUDA graphs the batch is padded to its bucket,
  each bucket has its own cache, and the reasoning steps are captured once per (bucket, depth);
* no needless copies on CPU: most of ``aten::copy_`` in a profile of ``recommend`` was not copying
  but page faults. A fresh multi-megabyte output is faulted in by whichever op writes it first,
  and for the prefill's projections that is addmm's copy of the bias into its output (the QKV
  output is 39 MB at B=256, above glibc's largest mmap threshold, so it is fresh memory on every
  call). The prefill's four projections now write into per-thread workspaces. The copies left are
  structural: the bias into each projection's output (MKL computes C = A·B + C), K/V into the
  cache; the decode step reads the cache in place (strided views, never made contiguous);
* bfloat16 on CPU as on CUDA: weights, cache and item table in bf16; matrix products, softmax and
  LayerNorm accumulate in float32 inside torch's kernels.

Backbones: for BERT4Rec the history ends in the mask token (one extra row of the input table), the
prefill is bidirectional (``prefill_attention(causal=False)``), the returned states pass through
its output head, and the scoring table carries its output bias as a last column (the query's last
entry is τ). The decode steps are the same. The session cache is off: a new item changes every
earlier K/V, so each call recomputes the history (``users=`` is accepted and changes nothing).
Item features: the input and scoring tables are the model's ``item_table()``, computed once here.
"""
from __future__ import annotations

import contextlib
import math
import numbers
import threading
from collections import OrderedDict
from typing import Hashable, Optional, Sequence

import torch
import torch.nn.functional as F

from rearec.distributed import ItemShard
from rearec.inputs import Histories, Recommendations, check_flag
from rearec.model import LayerWeights, ReaRec, RealSlots, cloze_inputs
from rearec.session_cache import SessionKVCache
from rearec_kernels.attention import decode_attention, prefill_attention
from rearec_kernels.backend import Backend, requested, resolve
from rearec_kernels.kv_cache import KVCache
from rearec_kernels.topk import fused_topk, prepare_table


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


#: Session cache budget when none is given: 256 MB keeps about 1,300 users at the serving shape
#: (d=256, 2 layers, max_len 50, float32: 200 kB per user). On CPU, memory is committed as users
#: arrive; on CUDA the whole budget is allocated at the first call with ``users``.
DEFAULT_SESSION_CACHE_MB = 256
MAX_GRAPH_BUCKETS_PER_THREAD = 10  # with CUDA graphs: buckets (1..512) a thread keeps, least recent go


def pin_cuda_index(device: torch.device) -> torch.device:
    """``cuda`` without an index as the GPU current now (``cuda:N``); any other device as it is. An
    engine keeps its device for every call, from every thread: "cuda" alone would mean each calling
    thread's current GPU (a batcher's worker starts on cuda:0 whatever the thread that built the
    engine on cuda:1 had set), so its inputs and caches would land beside the wrong weights."""
    if device.type == "cuda" and device.index is None and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return device


def batch_bucket(batch: int) -> int:
    """The buffers' batch size for ``batch`` rows: the next power of two."""
    return 1 << (batch - 1).bit_length()


class _Buffers:
    """One thread's reusable state for batches up to one bucket: the KV cache (capacity max_len + K),
    the prefill's projection workspaces, and the CUDA graphs of the reasoning steps, one per depth."""

    def __init__(self, cache: KVCache, max_len: int):
        self.cache = cache
        self.max_len = max_len
        self.workspaces = {}  # name -> (bucket * max_len, width): the prefill's projection outputs
        self.graphs = {}  # depth -> (CUDA graph, its input state, its output states)

    def workspace(self, name: str, rows: int, width: int) -> torch.Tensor:
        """A reused (rows, width) output for the prefill projection ``name`` (rows <= bucket * max_len)."""
        buffer = self.workspaces.get(name)
        if buffer is None:  # zeros: a workspace only ever holds finite numbers (see _prefill)
            keys = self.cache.keys
            buffer = torch.zeros(self.cache.batch_size * self.max_len, width, dtype=keys.dtype, device=keys.device)
            self.workspaces[name] = buffer
        return buffer[:rows]

    def rows(self, batch: int) -> KVCache:
        """The cache of the first ``batch`` rows (views: nothing is copied or allocated)."""
        c = self.cache
        if batch == c.batch_size:
            return c
        return KVCache(keys=c.keys[:, :batch], values=c.values[:, :batch], lengths=c.lengths[:batch])


class FastReaRec:
    """Serve a trained ReaRec: ``engine.recommend(histories, k=10, depth=None, readout=None, exclude_seen=False)``.

    Arguments and results follow ``ReaRec.recommend`` exactly (one set of rules, ``self.inputs``, from
    :mod:`rearec.inputs`): ``histories`` is a list of item-id lists (oldest first; raw ids when the
    checkpoint has an id mapping), or a right-padded integer tensor (B, T) of dense ids with
    ``lengths``; results carry ``raw_items`` whenever there is a mapping. ``depth`` is chosen per
    call, 0..K. ``cuda_graphs`` replays the reasoning steps from CUDA graphs (CUDA only).
    ``dtype``: float32 (default) or bfloat16 (also float16 on CUDA). Safe to share between threads
    (except with ``shard_items``: one calling thread per rank, every rank making the same calls);
    on CPU, though, every calling thread keeps its own OpenMP team, and more teams' threads than
    cores make them all sleep between parallel ops: serve many callers through one
    :class:`rearec.serving.RequestBatcher` (see ``rearec.serving.release_openmp_threads``).
    ``bf16_filter`` (CPU; None: where the CPU has native bf16 dot products): a float32 engine keeps a
    bfloat16 copy of the scoring table (half its bytes again, and as much again packed for oneDNN's
    GEMM, which serves batches of up to 16 users) for the top-K's filter pass and rescores the
    survivors from the float32 rows: the same top-K, about twice as fast at serving batch sizes
    (``rearec_kernels.topk.prepare_table``). A bfloat16 engine keeps its table packed likewise.

    ``session_cache_mb`` (default :data:`DEFAULT_SESSION_CACHE_MB`; 0 turns it off): with
    ``recommend(..., users=keys)`` / ``reasoning_states(..., users=keys)``, one hashable key per
    history (None: not cached), each user's history K/V are kept between calls (LRU, bounded in
    bytes) and an extended history prefills only its new items. Results equal the call without
    ``users``. ``cache_stats()`` counts hits, misses, evictions and bytes.

    Weights: the engine reads the model's own tensors where their dtype and device already fit, and
    keeps copies of others (fused Q/K/V, the bf16 filter table, another dtype): after any change to the
    model's weights (training, ``load_state_dict``) build a new engine; this one would mix old and new.
    """

    #: The session cache keeps a history's K/V across calls. That is exact only when an item's K/V
    #: never depend on later items: causal attention, as in ReaRec's SASRec encoder. For a
    #: bidirectional backbone (BERT4Rec) it is False, and the cache is then off (histories recomputed).
    causal_history = True

    def __init__(self, model: ReaRec, device=None, dtype=None, backend=None, cuda_graphs: bool = True,
                 session_cache_mb: float = DEFAULT_SESSION_CACHE_MB, shard_items: bool = False,
                 bf16_filter: Optional[bool] = None):
        if not isinstance(model, ReaRec):  # a state_dict, a path, another engine...
            raise TypeError(f"FastReaRec serves a ReaRec model, got {type(model).__name__}: pass ReaRec.load(path) "
                            "or use FastReaRec.load(path) (a checkpoint of the public code: "
                            "FastReaRec.from_official_checkpoint)")
        cfg = model.config
        self.config = cfg
        self.device = pin_cuda_index(torch.device(device) if device is not None else model.item_embedding.weight.device)
        if isinstance(dtype, str):  # "bfloat16" as well as torch.bfloat16
            dtype = getattr(torch, dtype.replace("torch.", ""), dtype)
        self.dtype = dtype or torch.float32
        served = (torch.float32, torch.bfloat16) + ((torch.float16,) if self.device.type == "cuda" else ())
        if self.dtype not in served:
            names = ", ".join(str(t).replace("torch.", "") for t in served)
            raise ValueError(f"dtype {self.dtype} is not served on {self.device.type}: use one of {names}")
        requested("FastReaRec", backend)  # a backend name that no kernel knows: refused now, not at every call
        self.backend = backend
        self.cuda_graphs = check_flag(cuda_graphs, "cuda_graphs")
        shard_items = check_flag(shard_items, "shard_items")
        bf16_filter = check_flag(bf16_filter, "bf16_filter", optional=True)  # None: auto
        if shard_items and bf16_filter:
            raise ValueError("bf16_filter=True filters a whole table, and shard_items scores this rank's rows with "
                             "sharded_topk, which has no filter pass: leave bf16_filter out (None) with shard_items")
        dev, dt = self.device, self.dtype

        def w(t):
            return t.detach().to(device=dev, dtype=dt).contiguous()

        self.causal_history = cfg.backbone == "sasrec"
        table = model.item_table().detach()  # with projected item features, if any: computed once
        if cfg.backbone == "bert4rec":  # the mask token is the input table's last row
            table = torch.cat([table, model.mask_embedding.detach()[None]])
        self.mask_item = table.shape[0] - 1  # BERT4Rec's mask token's row (its input only)
        # The table that scores compare with: the item table itself, or for BERT4Rec a copy with its
        # output bias as a last column (one table in memory, never two, when they are the same).
        scoring = model.scoring_table().detach() if cfg.backbone == "bert4rec" else None
        self.output_head = None
        if cfg.backbone == "bert4rec":
            head = model.output_head
            self.output_head = (w(head.dense.weight), w(head.dense.bias), w(head.norm.weight), w(head.norm.bias))
        # shard_items (inside an initialised process group): this rank keeps 1/world of each table;
        # lookups and the top-k are completed with collectives (rearec.distributed.ItemShard), so every
        # rank must call with the same histories, in the same order: one calling thread per rank, and
        # no RequestBatcher (its batches follow arrival times, which differ between ranks). The rows
        # are cut where the model's tables are, before they move: the whole table never sits on `dev`.
        self.input_shard = self.scoring_shard = None
        if shard_items:
            self.input_shard = ItemShard.of(table)
            self.input_shard.local = w(self.input_shard.local)
            self.scoring_shard = self.input_shard if scoring is None else ItemShard.of(scoring)
            self.scoring_shard.local = w(self.scoring_shard.local)
            self.item_table, self.scoring_table = self.input_shard.local, self.scoring_shard.local
        else:
            self.item_table = w(table)
            self.scoring_table = self.item_table if scoring is None else w(scoring)
        # The table fused_topk scans, with its per-table work done once (a bf16 copy, row norms); a
        # sharded table is scored by its ItemShard instead.
        if self.scoring_table.is_inference():  # built under torch.inference_mode: a plain tensor, which the
            same = self.item_table is self.scoring_table  # Triton top-K's per-table cache can key
            with torch.inference_mode(False), torch.no_grad():
                self.scoring_table = self.scoring_table.clone()
            if same:
                self.item_table = self.scoring_table
            if shard_items:  # the shards score (and look up) their rows: the copy, never both
                self.scoring_shard.local = self.scoring_table
                self.input_shard.local = self.item_table
        self.scoring_index = prepare_table(self.scoring_table, False if shard_items else bf16_filter)
        self.positions = w(model.position_embedding.weight)
        self.reasoning_positions = w(model.reasoning_position_embedding.weight)
        self.input_norm = (w(model.input_norm.weight), w(model.input_norm.bias))
        self.layers = [_Layer(layer.weights(), dev, dt) for layer in model.layers]
        self.eps = cfg.layer_norm_eps
        self.input_eps = cfg.input_eps
        self.id_mapping = model.id_mapping
        self.inputs = model.inputs  # the argument rules, shared with the model (rearec/inputs.py)
        self._local = threading.local()  # per-thread reusable buffers
        self._capture_lock = threading.Lock()  # one CUDA graph capture at a time
        self.session_cache = self._session_cache(session_cache_mb)

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_model(cls, model: ReaRec, device=None, dtype=None, backend=None, cuda_graphs: bool = True,
                   session_cache_mb: float = DEFAULT_SESSION_CACHE_MB, shard_items: bool = False,
                   bf16_filter: Optional[bool] = None) -> "FastReaRec":
        """Serve a model in memory; the arguments: see the constructor."""
        return cls(model, device=device, dtype=dtype, backend=backend, cuda_graphs=cuda_graphs,
                   session_cache_mb=session_cache_mb, shard_items=shard_items, bf16_filter=bf16_filter)

    @classmethod
    def load(cls, path, device=None, dtype=None, backend=None, cuda_graphs: bool = True,
             session_cache_mb: float = DEFAULT_SESSION_CACHE_MB, shard_items: bool = False,
             bf16_filter: Optional[bool] = None) -> "FastReaRec":
        """Serve a checkpoint written by ``ReaRec.save``; ``shard_items``, ``bf16_filter``: see the constructor."""
        return cls(ReaRec.load(path), device=device, dtype=dtype, backend=backend, cuda_graphs=cuda_graphs,
                   session_cache_mb=session_cache_mb, shard_items=shard_items, bf16_filter=bf16_filter)

    @classmethod
    def from_official_checkpoint(cls, path_or_state_dict, n_heads: int = 2, device=None, dtype=None,
                                 backend=None, cuda_graphs: bool = True,
                                 session_cache_mb: float = DEFAULT_SESSION_CACHE_MB, shard_items: bool = False,
                                 bf16_filter: Optional[bool] = None, **overrides) -> "FastReaRec":
        """Serve a state_dict of the paper's public code; see ``ReaRec.from_official_checkpoint``
        (``overrides``: its config fields) and the constructor."""
        model = ReaRec.from_official_checkpoint(path_or_state_dict, n_heads=n_heads, **overrides)
        return cls(model, device=device, dtype=dtype, backend=backend, cuda_graphs=cuda_graphs,
                   session_cache_mb=session_cache_mb, shard_items=shard_items, bf16_filter=bf16_filter)

    # ------------------------------------------------------------------ the session cache
    def _session_cache(self, megabytes) -> Optional[SessionKVCache]:
        if isinstance(megabytes, bool) or not isinstance(megabytes, numbers.Real) or not megabytes >= 0 \
                or not math.isfinite(megabytes):
            raise ValueError(f"session_cache_mb must be a number of megabytes >= 0 (0: off), got {megabytes!r}")
        if megabytes == 0:
            return None
        if not self.causal_history:  # bidirectional: a new item changes every cached K/V, so recompute
            return None
        cfg = self.config
        return SessionKVCache(int(megabytes * 2**20), n_layers=cfg.n_layers, n_heads=cfg.n_heads,
                              max_len=cfg.max_len, head_dim=cfg.head_dim, dtype=self.dtype, device=self.device)

    def cache_stats(self) -> dict:
        """The session cache's counters: hits, misses, evictions, bytes (held for cached users),
        users and max_bytes; all 0 when the cache is off."""
        if self.session_cache is None:
            return dict(hits=0, misses=0, evictions=0, bytes=0, users=0, max_bytes=0)
        return self.session_cache.stats()

    # ------------------------------------------------------------------ the computation
    def _on_device(self):
        """The engine's GPU made the current device while it computes: CUDA graphs capture on the
        current device's stream and Triton launches on the current device, so an engine on cuda:1
        called while cuda:0 is current would capture nothing and replay stale outputs. A no-op on CPU."""
        return torch.cuda.device(self.device) if self.device.type == "cuda" else contextlib.nullcontext()

    def _graphed(self) -> bool:
        """Whether the reasoning steps replay from CUDA graphs (the Triton kernels make no host sync)."""
        return self.device.type == "cuda" and self.cuda_graphs and resolve("decode_attention", self.backend, self.device) is Backend.TRITON

    def _buffers(self, batch: int, per_bucket: bool) -> "_Buffers":
        """This thread's buffers for ``batch`` rows, reused across calls. With ``per_bucket`` (CUDA
        graphs, which are captured per bucket) one set per bucket; otherwise one set that grows to
        the largest bucket seen and serves smaller batches from its first rows."""
        pool = self._local.__dict__.setdefault("buffers", OrderedDict())
        bucket = batch_bucket(batch)
        key = bucket if per_bucket else "rows"
        buffers = pool.get(key)
        if buffers is None or buffers.cache.batch_size < bucket:
            graphed = [k for k in pool if k != "rows"]  # the one set of the calls without graphs is no bucket
            if per_bucket and len(graphed) >= MAX_GRAPH_BUCKETS_PER_THREAD:
                del pool[graphed[0]]  # the least recently used bucket
            cfg = self.config
            cache = KVCache.allocate(cfg.n_layers, bucket, cfg.n_heads, cfg.max_len + cfg.reason_steps, cfg.head_dim,
                                     dtype=self.dtype, device=self.device)
            buffers = pool[key] = _Buffers(cache, cfg.max_len)
        pool.move_to_end(key)
        return buffers

    @staticmethod
    def _linear(x, weight, bias, buffers: Optional["_Buffers"] = None, name: str = ""):
        """``F.linear``; with ``buffers``, written into their workspace ``name``: a fresh output of the
        prefill's size would be page-faulted in on every call (an ``aten::copy_`` in a profile, where
        addmm first copies the bias into it)."""
        if buffers is None:
            return F.linear(x, weight, bias)
        rows, width = x.numel() // x.shape[-1], weight.shape[0]
        out = buffers.workspace(name, rows, width)
        torch.addmm(bias, x.reshape(rows, x.shape[-1]), weight.t(), out=out)
        return out.view(*x.shape[:-1], width)

    def _layer_tail(self, layer: _Layer, x, context, buffers: Optional["_Buffers"] = None):
        """Everything after attention: output projection, residual + LN, feed-forward, residual + LN."""
        d = x.shape[-1]
        attended = self._linear(context, layer.out_weight, layer.out_bias, buffers, "out")
        x = F.layer_norm(x + attended, (d,), *layer.norm1, self.eps)
        hidden = layer.act(self._linear(x, *layer.ffn_in, buffers, "ffn_in"))
        return F.layer_norm(x + self._linear(hidden, *layer.ffn_out, buffers, "ffn_out"), (d,), *layer.norm2, self.eps)

    def _states(self, padded, lengths, depth, users: Optional[list] = None):
        """States r_0..r_depth (B, depth+1, d) in the engine's dtype."""
        B = padded.shape[0]
        graphed = self._graphed()
        first, cache, buffers = self._prefilled(padded, lengths, users, graphed)
        if depth == 0:
            return self._output_states(first[:B, None])
        steps = self._reason_graphed(first, buffers, depth) if graphed else self._reason(first, cache, depth)
        return self._output_states(torch.cat([first[:, None], steps], dim=1)[:B])

    def _halting_states(self, padded, lengths, depth, users: Optional[list] = None):
        """``readout="adaptive"``: (each user's state at its halting step (B, d), the steps (B,)), the
        decisions of ``ReaRec.halting_readout`` at ``config.halt_kl``. After step s < depth, users whose
        item distribution moved less than halt_kl nats, KL(p_s || p_{s-1}) < halt_kl, stop; the others
        go on in a smaller decode batch (their cache rows copied out), so the cost falls with them.
        The KL streams over the scoring table in chunks (never the (B, N) scores). Eager: no graphs."""
        if self.scoring_shard is not None:
            raise ValueError("readout 'adaptive' is not served with shard_items=True (its KL needs the whole "
                             "table on every rank); use 'last' or 'mean'")
        B = padded.shape[0]
        eps = float(self.config.halt_kl)
        prev, cache, _ = self._prefilled(padded, lengths, users, graphed=False)
        prev_out = self._output_states(prev)  # the output states of the active users' last step
        chosen = prev_out.clone()
        steps = torch.zeros(B, dtype=torch.long, device=prev.device)
        active = torch.arange(B, device=prev.device)
        for s in range(1, depth + 1):
            state = self._reason(prev, cache, 1, first_step=s - 1)[:, 0]
            out = self._output_states(state)
            if s == depth:
                chosen[active], steps[active] = out, s
                break
            halt = self._step_kl(out, prev_out) < eps
            chosen[active[halt]], steps[active[halt]] = out[halt], s
            go_on = (~halt).nonzero().squeeze(1)
            if go_on.numel() == 0:
                break
            if go_on.numel() < active.numel():  # the halted users leave the decode batch
                active, state, out = active[go_on], state[go_on], out[go_on]
                cache = KVCache(keys=cache.keys[:, go_on], values=cache.values[:, go_on], lengths=cache.lengths[go_on])
            prev, prev_out = state, out
        return chosen, steps

    def _scoring_queries(self, user: torch.Tensor) -> torch.Tensor:
        """User vectors (B, d) -> the queries that score against the scoring table: for BERT4Rec, with
        a last column of τ that meets the table's output-bias column (τ / τ = 1)."""
        if self.scoring_table.shape[1] > user.shape[1]:
            user = torch.cat([user, user.new_full((user.shape[0], 1), self.config.temperature)], dim=1)
        return user

    def _step_kl(self, newer: torch.Tensor, older: torch.Tensor, chunk: int = 8192) -> torch.Tensor:
        """KL(p_newer || p_older) (B,) in float64, p = softmax of the scores over every item, streamed over
        the scoring table in chunks (never the (B, N) scores).

        With l the newer scores and g = l - l_older (from the difference of the queries, so that g
        keeps its own precision however close the steps are), and any per-user constant c:
        KL = E_p[g - c] + log E_p[exp(-(g - c))], p the newer distribution. c is g at the user's top
        item so far, so that g - c is small where p has its mass: a step that moves every score by the
        same 20 nats changes nothing, and exp(-20) must not round away (expm1 -> -1 gave -inf). Each
        chunk updates a running maximum of l and the sums of exp(l - max) times 1, g - c and
        expm1(-(g - c)) (log1p of the last keeps the small differences); when the top moves to a later
        chunk, the sums are re-based to its c, in float64. A chunk where an item's score fell past
        float32's exp range (exp(-(g - c)) = inf, beside a weight that underflowed to 0) is redone in
        float64, without products of 0 and inf: the sum must not turn NaN (then users never halted)."""
        q1 = self._scoring_queries(newer).float()
        gap = q1 - self._scoring_queries(older).float()
        scale = 1.0 / self.config.temperature
        B = q1.shape[0]
        f64 = torch.float64
        top = torch.full((B,), float("-inf"), device=q1.device)
        centre = torch.zeros(B, device=q1.device)
        mass, mean_g, mean_e = (torch.zeros(B, dtype=f64, device=q1.device) for _ in range(3))
        for start in range(0, self.scoring_table.shape[0], chunk):
            table = self.scoring_table[start:start + chunk].float()
            l = torch.mm(q1, table.T).mul_(scale)  # (B, chunk) float32; the sums below in float64
            g = torch.mm(gap, table.T).mul_(scale)
            chunk_top, at = l.max(dim=1)
            moved = chunk_top > top  # the user's top item is in this chunk: centre on its g
            new_centre = torch.where(moved, g.gather(1, at[:, None]).squeeze(1), centre)
            delta = (new_centre - centre).double()
            new_top = torch.where(moved, chunk_top, top)
            shrink = torch.exp((top - new_top).double())
            # Re-base the sums so far from c to c + delta: sum w (g - c') = sum w (g - c) - mass delta, and
            # sum w expm1(-(g - c')) = (sum w expm1(-(g - c)) + mass) exp(delta) - mass.
            mean_g = (mean_g - mass * delta) * shrink
            rebased = (mean_e + mass) * torch.exp(delta) - mass
            mean_e = torch.where((delta != 0) & (mass > 0), rebased, mean_e) * shrink
            centred = g.sub_(new_centre[:, None])  # g - c
            shifted = l.sub_(new_top[:, None])  # l - max <= 0
            weight = shifted.exp()
            mass = mass * shrink + weight.sum(dim=1, dtype=f64)
            mean_g = mean_g + (weight * centred).sum(dim=1, dtype=f64)
            change = centred.neg().expm1_().mul_(weight)  # exp(l - max - (g - c)) - exp(l - max)
            if not torch.isfinite(change).all():
                # An item's score fell past float32's exp range (exp(-(g - c)) = inf beside a weight that
                # may be 0): this chunk in float64, as the difference itself where |g - c| > 1 (no
                # precision to keep there), so that nothing is 0 * inf.
                g64, shifted64 = centred.double(), shifted.double()
                weight64 = shifted64.exp()
                change = torch.where(g64.abs() <= 1.0, weight64 * torch.expm1(-g64), torch.exp(shifted64 - g64) - weight64)
            mean_e = mean_e + change.sum(dim=1, dtype=f64)
            top, centre = new_top, new_centre
        return mean_g / mass + torch.log1p(mean_e / mass)

    def _prefilled(self, padded, lengths, users: Optional[list], graphed: bool):
        """The prefill of every layer (reusing session-cached K/V where it can) -> (r_0 (rows, d),
        the cache, the thread's buffers); rows = B, or B's bucket when ``graphed``."""
        B = padded.shape[0]
        if self.output_head is not None:  # BERT4Rec: the newest max_len - 1 items, then the mask token
            padded, lengths, is_mask = cloze_inputs(padded, lengths, self.config.max_len)
            padded = padded.masked_fill(is_mask, self.mask_item)
        rows = batch_bucket(B) if graphed else B
        if rows > B:  # graphs replay fixed shapes: pad to the bucket with one-item rows, dropped below
            padded = torch.cat([padded, padded.new_zeros(rows - B, padded.shape[1])])
            lengths = torch.cat([lengths, lengths.new_ones(rows - B)])
            users = None if users is None else users + [None] * (rows - B)
        buffers = self._buffers(rows, per_bucket=graphed)
        cache = buffers.rows(rows)
        cache.lengths.copy_(lengths.to(cache.lengths.dtype))

        windows = reuse = None
        if users is not None and self.session_cache is not None:
            windows = [tuple(row[:n]) for row, n in zip(padded.tolist(), lengths.tolist())]
            reuse = self.session_cache.load(users, windows, cache)
        if reuse is not None and any(reuse):
            first = self._prefill_extending(padded, lengths, reuse, cache, buffers)
        else:
            first = self._prefill(padded, lengths, cache, buffers)
        if windows is not None:  # the history's K/V only: the reasoning steps write after them
            self.session_cache.store(users, windows, cache)
        return first, cache, buffers

    def _output_states(self, states):
        """BERT4Rec's output head on the encoder states (as ``ReaRec.output_states``); SASRec: none."""
        if self.output_head is None:
            return states
        weight, bias, norm_weight, norm_bias = self.output_head
        hidden = F.gelu(F.linear(states, weight, bias))
        return F.layer_norm(hidden, (hidden.shape[-1],), norm_weight, norm_bias, self.eps)

    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Input rows of the item table for ``ids`` (gathered across ranks when it is sharded)."""
        if self.input_shard is not None:
            return self.input_shard.embed(ids)
        return F.embedding(ids, self.item_table)

    def _prefill(self, padded, lengths, cache: KVCache, buffers: "_Buffers"):
        """The whole history, every layer's K/V into the cache -> r_0 (B, d).

        A ragged batch does its per-item work (projections, norms, feed-forward) on the real slots
        alone, packed by :class:`rearec.model.RealSlots`; only attention sees the (B, L) layout, its
        q/k/v scattered into a workspace whose padding rows hold finite leftovers (no real slot
        attends to them; the CPU kernels need them finite)."""
        cfg = self.config
        B, L = padded.shape
        H, Dh, d = cfg.n_heads, cfg.head_dim, cfg.hidden_size
        rows = torch.arange(B, device=padded.device)
        real = RealSlots(lengths, L) if int(lengths.min()) < L else None
        if real is None:
            x = self._embed(padded) + self.positions[:L]
            newest = rows, lengths - 1
        else:
            x = self._embed(padded.reshape(-1)[real.gather]) + self.positions[real.gather % L]
            newest = real.positions((lengths - 1)[:, None])[:, 0]
        x = F.layer_norm(x, (d,), *self.input_norm, self.input_eps)

        def projections(layer):  # -> q, k and v of every slot, (B, L, 3, H, Dh)
            qkv = self._linear(x, layer.qkv_weight, layer.qkv_bias, buffers, "qkv")
            if real is not None:
                qkv = buffers.workspace("qkv_slots", B * L, 3 * d).index_copy_(0, real.flat, qkv[: real.flat.shape[0]])
            return qkv.view(B, L, 3, H, Dh)

        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers[:last]):
            qkv = projections(layer)
            context = prefill_attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], lengths, cache, i,
                                        backend=self.backend, causal=self.causal_history).reshape(B, L, d)
            x = self._layer_tail(layer, x, context if real is None else real.pack(context), buffers)
        # The last layer's output is needed for the newest item only: cache every item's K/V, then
        # attend from the newest item alone, as a decode step at slot lengths-1.
        layer = self.layers[last]
        qkv = projections(layer)
        cache.store(last, qkv[:, :, 1], qkv[:, :, 2])
        q, k, v = qkv[rows, lengths - 1].unbind(1)  # each (B, H, Dh)
        with cache.rewound(1):
            context = decode_attention(q, k, v, cache, last, backend=self.backend)
        return self._layer_tail(layer, x[newest], context.reshape(B, d))  # r_0: (B, d)

    def _prefill_extending(self, padded, lengths, reuse: Sequence[int], cache: KVCache, buffers: "_Buffers"):
        """As ``_prefill``, when slots 0..reuse[b]-1 of every layer already hold row b's K/V (from the
        session cache): only the items after them run through the layers -> r_0 (B, d).

        The new items of all rows are packed into one (P, d) batch for the per-item work; attention
        places them as (B, T) queries over the cache, new item j of row b at slot reuse[b] + j seeing
        slots 0..reuse[b] + j (causal, as in the full prefill)."""
        cfg = self.config
        B, L = padded.shape
        H, Dh, d = cfg.n_heads, cfg.head_dim, cfg.hidden_size
        dev = padded.device
        start = torch.tensor(reuse, device=dev)
        slots = torch.arange(L, device=dev)
        fresh = (slots[None, :] >= start[:, None]) & (slots[None, :] < lengths[:, None])
        rows, cols = fresh.nonzero(as_tuple=True)  # the new items, row by row, oldest first
        place = cols - start[rows]  # each one's place among its row's new items
        T, n = int(place.max()) + 1, int(lengths.max())
        x = self._embed(padded[rows, cols]) + self.positions[cols]
        x = F.layer_norm(x, (d,), *self.input_norm, self.input_eps)  # (P, d)
        query_slot = start[:, None] + torch.arange(T, device=dev)  # (B, T); rows' unused places too
        unseen = torch.arange(n, device=dev)[None, None, :] > query_slot[:, :, None]  # (B, T, n)
        bias = torch.zeros(B, 1, T, n, dtype=x.dtype, device=dev).masked_fill_(unseen[:, None], float("-inf"))
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            qkv = self._linear(x, layer.qkv_weight, layer.qkv_bias, buffers, "qkv").view(-1, 3, H, Dh)
            keys, values = cache.keys[i], cache.values[i]  # (B, H, capacity, Dh)
            keys[rows, :, cols] = qkv[:, 1]
            values[rows, :, cols] = qkv[:, 2]
            if i == last:
                break
            # Unused query places stay 0 and see finite slots (the cache holds only computed K/V).
            q = x.new_zeros(B, T, H, Dh)
            q[rows, place] = qkv[:, 0]
            context = F.scaled_dot_product_attention(q.transpose(1, 2), keys[:, :, :n], values[:, :, :n],
                                                     attn_mask=bias)  # (B, H, T, Dh)
            x = self._layer_tail(layer, x, context.transpose(1, 2)[rows, place].reshape(-1, d), buffers)
        newest = torch.cumsum(lengths - start, 0) - 1  # each row's newest item in the packed order
        q, k, v = qkv[newest].unbind(1)
        with cache.rewound(1):
            context = decode_attention(q, k, v, cache, last, backend=self.backend)
        return self._layer_tail(self.layers[last], x[newest], context.reshape(B, d))

    def _reason(self, state, cache: KVCache, depth: int, first_step: int = 0) -> torch.Tensor:
        """Reasoning steps first_step+1 .. first_step+depth, one token per user each: (B, depth, d)."""
        B, d = state.shape
        H, Dh = self.config.n_heads, self.config.head_dim
        states = []
        for s in range(first_step, first_step + depth):
            x = F.layer_norm(state + self.reasoning_positions[s], (d,), *self.input_norm, self.input_eps)
            for i, layer in enumerate(self.layers):
                qkv = F.linear(x, layer.qkv_weight, layer.qkv_bias).view(B, 3, H, Dh)
                context = decode_attention(qkv[:, 0], qkv[:, 1], qkv[:, 2], cache, i, backend=self.backend)
                x = self._layer_tail(layer, x, context.reshape(B, d))
            cache.advance()
            state = x
            states.append(state)
        return torch.stack(states, dim=1)

    def _reason_graphed(self, state, buffers: "_Buffers", depth: int) -> torch.Tensor:
        """``_reason`` replayed from a CUDA graph captured once per (thread, bucket, depth): the decode
        loop is dozens of small kernels whose launch cost would otherwise dominate. The cache's
        capacity and the bucket are fixed, so a new batch or history length replays, never recaptures.
        Captures run one at a time (a lock) in thread-local mode, so other threads' CUDA calls during
        a capture neither fail nor invalidate it."""
        cache = buffers.cache
        if depth not in buffers.graphs:
            with self._capture_lock:
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
                with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                    static_out = self._reason(static_state, cache, depth)
                cache.lengths.copy_(history_lengths)
                buffers.graphs[depth] = (graph, static_state, static_out)
        graph, static_state, static_out = buffers.graphs[depth]
        static_state.copy_(state)
        graph.replay()
        return static_out.clone()

    # ------------------------------------------------------------------ public API
    @staticmethod
    def _users(users, batch: int) -> Optional[list]:
        return None if users is None else SessionKVCache.check_users(users, batch)

    @torch.inference_mode()
    def reasoning_states(self, histories: Histories, depth: Optional[int] = None, lengths=None,
                         raw_ids: Optional[bool] = None, users: Optional[Sequence[Hashable]] = None) -> torch.Tensor:
        """(B, depth+1, d) float32 states r_0..r_depth, as ``ReaRec.reasoning_states``; ``users``: see
        the class docstring."""
        depth = self.inputs.depth(depth)
        padded, lens = self.inputs.histories(histories, lengths, raw_ids=raw_ids, device=self.device)
        with self._on_device():
            return self._states(padded, lens, depth, self._users(users, padded.shape[0])).float()

    @torch.inference_mode()
    def adaptive_states(self, histories: Histories, depth: Optional[int] = None, lengths=None,
                        raw_ids: Optional[bool] = None, users: Optional[Sequence[Hashable]] = None):
        """``readout="adaptive"``'s choice: (each user's state at its halting step (B, d) float32, the
        steps (B,)); as ``ReaRec.halting_readout(states, config.halt_kl)`` on the model's states."""
        self.inputs.readout("adaptive")  # refuses a model without halt_kl
        depth = self.inputs.depth(depth)
        padded, lens = self.inputs.histories(histories, lengths, raw_ids=raw_ids, device=self.device)
        with self._on_device():
            chosen, steps = self._halting_states(padded, lens, depth, self._users(users, padded.shape[0]))
        return chosen.float(), steps

    @torch.inference_mode()
    def recommend(self, histories: Histories, k: int = 10, depth: Optional[int] = None,
                  readout: Optional[str] = None, exclude_seen: bool = False, lengths=None,
                  raw_ids: Optional[bool] = None, users: Optional[Sequence[Hashable]] = None) -> Recommendations:
        """Top-k items per history, best first; never the padding item, optionally never a seen item.
        ``users``: one key per history for the session cache (see the class docstring)."""
        request = self.inputs.request(histories, k=k, depth=depth, readout=readout, exclude_seen=exclude_seen,
                                      lengths=lengths, raw_ids=raw_ids, device=self.device)
        users = self._users(users, request.histories.shape[0])
        with self._on_device():
            if request.readout == "adaptive":
                user = self._halting_states(request.histories, request.lengths, request.depth, users)[0]
            else:
                states = self._states(request.histories, request.lengths, request.depth, users)
                user = states[:, -1] if request.readout == "last" else states.mean(dim=1)
            user = self._scoring_queries(user)
            if self.scoring_shard is not None:
                values, items = self.scoring_shard.topk(user, request.k, scale=1.0 / self.config.temperature,
                                                        exclude=request.exclude, backend=self.backend)
            else:
                values, items = fused_topk(user, self.scoring_index, request.k, scale=1.0 / self.config.temperature,
                                           exclude=request.exclude, backend=self.backend)
        return self.inputs.recommendations(items, values)
