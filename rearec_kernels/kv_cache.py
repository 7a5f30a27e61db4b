"""A preallocated key/value cache for ReaRec's reasoning steps.

Layout
------
``keys`` and ``values`` have shape ``(n_layers, B, H, capacity, Dh)``; ``lengths`` is ``(B,)`` int32.

The cache is LEFT-aligned: slot 0 of user ``b`` holds that user's oldest token, slots
``0 .. lengths[b]-1`` are valid, and the next token of user ``b`` goes to slot ``lengths[b]``.
Users with different history lengths therefore have their reasoning tokens at different slots.

Who writes what
---------------
* :func:`rearec_kernels.attention.prefill_attention` writes the K/V of a user's valid history
  tokens into slots ``0 .. n_b-1`` of one layer; it leaves ``lengths`` alone (the caller sets them,
  normally to the history lengths, once all layers are prefilled).
* :func:`rearec_kernels.attention.decode_attention` writes one new token into slot ``lengths[b]``
  of one layer and attends over slots ``0 .. lengths[b]`` inclusive; it leaves ``lengths`` alone
  too: call :meth:`KVCache.advance` once per reasoning step, after the last layer.

Slots at or beyond ``lengths[b]`` are unused. The reference and Triton backends never read them.
The CPU backend batches all users into one matrix product over slots ``0 .. max(lengths)``, giving
the unused ones a weight of exactly 0, so they must hold *finite* numbers (``0 * nan`` is nan):
:meth:`KVCache.allocate` zero-fills, and the ops only ever write K/V the model computed, so this
holds unless the model itself produces non-finite K/V.
"""
from __future__ import annotations

import operator
from contextlib import contextmanager
from dataclasses import dataclass

import torch


@dataclass
class KVCache:
    """Per-layer keys and values of every user's tokens so far; see the module docstring."""

    keys: torch.Tensor  # (n_layers, B, H, capacity, Dh)
    values: torch.Tensor  # (n_layers, B, H, capacity, Dh)
    lengths: torch.Tensor  # (B,) int32: valid slots per user

    @classmethod
    def allocate(
        cls,
        n_layers: int,
        batch_size: int,
        n_heads: int,
        capacity: int,
        head_dim: int,
        *,
        dtype: torch.dtype = torch.float32,
        device: "torch.device | str | None" = None,
    ) -> "KVCache":
        """A zero-filled cache with every user's length 0."""
        for name, value in (("n_layers", n_layers), ("batch_size", batch_size), ("n_heads", n_heads),
                            ("capacity", capacity), ("head_dim", head_dim)):
            try:
                size = operator.index(value)
            except TypeError:
                size = None
            if isinstance(value, bool) or size is None:
                raise ValueError(f"KVCache.allocate: {name} must be an int, got {value!r}")
            if size < 1:
                raise ValueError(f"KVCache.allocate: {name} must be >= 1, got {value}")
        shape = (n_layers, batch_size, n_heads, capacity, head_dim)
        return cls(
            keys=torch.zeros(shape, dtype=dtype, device=device),
            values=torch.zeros(shape, dtype=dtype, device=device),
            lengths=torch.zeros(batch_size, dtype=torch.int32, device=device),
        )

    # -- shape ---------------------------------------------------------------------------------
    @property
    def n_layers(self) -> int:
        return self.keys.shape[0]

    @property
    def batch_size(self) -> int:
        return self.keys.shape[1]

    @property
    def n_heads(self) -> int:
        return self.keys.shape[2]

    @property
    def capacity(self) -> int:
        return self.keys.shape[3]

    @property
    def head_dim(self) -> int:
        return self.keys.shape[4]

    @property
    def dtype(self) -> torch.dtype:
        return self.keys.dtype

    @property
    def device(self) -> torch.device:
        return self.keys.device

    # -- lengths -------------------------------------------------------------------------------
    def set_lengths(self, lengths: torch.Tensor) -> "KVCache":
        """Sets every user's valid length (in place; e.g. to the history lengths after prefill): an
        integer tensor of shape (batch_size,) (``copy_`` alone would truncate floats and broadcast a
        wrong shape; the values are not read here, which on a GPU would wait for the device)."""
        if not isinstance(lengths, torch.Tensor) or lengths.dtype.is_floating_point or lengths.dtype.is_complex \
                or lengths.dtype == torch.bool or lengths.shape != self.lengths.shape:
            what = f"{lengths.dtype} {tuple(lengths.shape)}" if isinstance(lengths, torch.Tensor) else type(lengths).__name__
            raise ValueError(f"KVCache.set_lengths: lengths must be an integer tensor of shape "
                             f"{tuple(self.lengths.shape)}, got {what}")
        self.lengths.copy_(lengths)
        return self

    def advance(self, n: int = 1) -> "KVCache":
        """``lengths += n``: call once per reasoning step, after every layer has written its slot."""
        self.lengths += n
        return self

    def layer_index(self, layer, op: str) -> int:
        """``layer`` as an int in [0, n_layers) (numpy integers too; a bool is no layer); else a ValueError
        naming ``op``, the caller."""
        try:
            index = operator.index(layer)
        except TypeError:
            index = None
        if isinstance(layer, bool) or index is None or not 0 <= index < self.n_layers:
            raise ValueError(f"{op}: layer must be an int in [0, {self.n_layers}), got {layer!r}")
        return index

    def store(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> "KVCache":
        """Copies (B, L, H, Dh) keys/values into slots 0..L-1 of ``layer`` for every user (padding
        tokens included: they land in unused slots) without computing attention. ``lengths`` is not
        changed. For when only some tokens need an attention output (see ``decode_attention``)."""
        layer = self.layer_index(layer, "KVCache.store")
        for name, t in (("keys", keys), ("values", values)):
            if not isinstance(t, torch.Tensor) or t.dim() != 4:
                what = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                raise ValueError(f"KVCache.store: {name} must be a (B, L, H, Dh) tensor, got {what}")
            if t.dtype != self.dtype or t.device != self.device:  # copy_ would cast an integer tensor silently
                raise ValueError(f"KVCache.store: {name} are {t.dtype} on {t.device}, the cache {self.dtype} on "
                                 f"{self.device}")
        B, L, H, Dh = keys.shape
        if keys.shape != values.shape or (B, H, Dh) != (self.batch_size, self.n_heads, self.head_dim):
            raise ValueError(f"KVCache.store: keys/values of shape {tuple(keys.shape)} do not fit a cache of "
                             f"B={self.batch_size}, H={self.n_heads}, Dh={self.head_dim}")
        if L > self.capacity:
            raise ValueError(f"KVCache.store: {L} tokens exceed the capacity {self.capacity}")
        self.keys[layer, :, :, :L].copy_(keys.transpose(1, 2))
        self.values[layer, :, :, :L].copy_(values.transpose(1, 2))
        return self

    @contextmanager
    def rewound(self, n: int = 1):
        """``lengths -= n`` inside the ``with`` block, restored after it.

        For a token whose K/V are already stored at slot ``lengths[b]-1`` (e.g. the newest history
        item after :meth:`store`): inside ``with cache.rewound():`` ``decode_attention`` writes it
        again at that same slot and attends over slots ``0 .. lengths[b]-1``, i.e. as the last token.
        """
        self.lengths.sub_(n)
        try:
            yield self
        finally:
            self.lengths.add_(n)
