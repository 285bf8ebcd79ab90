"""The KV cache: every layer's keys and values, preallocated, and the causal mask over it.

Shapes in comments: B batch, T new tokens, L cache length, nkv key/value heads, hd head size.
"""

from __future__ import annotations

import torch

from .config import ModelConfig


class KVCache:
    """Keys and values of every layer for `batch_size` sequences, preallocated for `max_len` positions.

    Row b of the cache belongs to row b of the batch. The engine keeps one cache as a pool of
    slots (one slot per running sequence) and runs each step over `view(rows, length)`: the first
    `rows` slots and the first `length` positions, so that attention costs what is in use, not
    what is reserved. A decode step writes each row's new keys at that row's own position and
    attends over the whole view with a mask; shapes only change with the (bucketed) view.
    """

    def __init__(
        self,
        config: ModelConfig,
        batch_size: int,
        max_len: int,
        dtype: torch.dtype,
        device: torch.device | str,
        zero_lazily: bool = False,
    ) -> None:
        shape = (config.num_hidden_layers, batch_size, config.num_key_value_heads, max_len, config.head_dim)
        new = torch.empty if zero_lazily else torch.zeros
        k = new(shape, dtype=dtype, device=device)  # (layers, B, nkv, L, hd)
        v = new(shape, dtype=dtype, device=device)
        self._set(k, v)
        self._views: dict[tuple[int, int, int], KVCache] = {}
        # Per row, the positions below this hold finite values. Masked-out positions must not
        # hold NaN (it would survive the mask), so a lazily zeroed cache (the engine's pool, whose
        # memory then grows with the lengths in use) clears a row's range the first time a view
        # reaches it: one row at a time, so a step never stalls on clearing the whole pool.
        self.zeroed = [0 if zero_lazily else max_len] * batch_size

    def _set(self, k: torch.Tensor, v: torch.Tensor) -> None:
        self.k, self.v = k, v
        self.positions = torch.arange(k.shape[3], device=k.device)  # (L,)
        # One view per layer, made once: a compiled step then writes each in place, where views
        # taken inside the step made it copy the whole cache back at every layer.
        self.k_layers, self.v_layers = k.unbind(0), v.unbind(0)  # layers x (B, nkv, L, hd)
        if k.device.type == "cuda":
            # Fixed addresses: a step compiled with CUDA graphs ("reduce-overhead") may then write
            # them in place; inductor skips the graphs for an ordinary input that a step mutates.
            for layer in (*self.k_layers, *self.v_layers):
                torch._dynamo.mark_static_address(layer)

    @property
    def batch_size(self) -> int:
        return self.k.shape[1]

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

    def view(self, rows: int, length: int, first_row: int = 0) -> KVCache:
        """Rows [first_row, first_row + rows) and positions [0, length), sharing this cache's memory.

        Views from row 0 (the decode steps') are kept, so a step over the same window gets the
        very same tensors each time.
        """
        for row in range(first_row, first_row + rows):
            if self.zeroed[row] < length:
                self.k[:, row, :, self.zeroed[row] : length].zero_()
                self.v[:, row, :, self.zeroed[row] : length].zero_()
                self.zeroed[row] = length
        key = (first_row, rows, length)
        if key in self._views:
            return self._views[key]
        window = KVCache.__new__(KVCache)
        rows_slice = slice(first_row, first_row + rows)
        window._set(self.k[:, rows_slice, :, :length], self.v[:, rows_slice, :, :length])
        window._views, window.zeroed = {}, [length] * rows
        if first_row == 0:
            self._views[key] = window
        return window

    def copy_row(self, src: int, dst: int, length: int) -> None:
        """Move one sequence's first `length` positions from row `src` to row `dst` (compaction)."""
        self.k[:, dst, :, :length] = self.k[:, src, :, :length]
        self.v[:, dst, :, :length] = self.v[:, src, :, :length]

    def update(
        self, layer: int, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the new keys and values (B, nkv, T, hd) at each row's `input_pos` (B, T); return
        the layer's whole buffers."""
        k_all, v_all = self.k_layers[layer], self.v_layers[layer]  # (B, nkv, L, hd)
        index = input_pos[:, None, :, None].expand_as(k)  # (B, nkv, T, hd)
        k_all.scatter_(2, index, k)
        v_all.scatter_(2, index, v)
        return k_all, v_all

    def causal_mask(self, input_pos: torch.Tensor) -> torch.Tensor:
        """True where a query at `input_pos` may attend: every cache position up to its own."""
        return causal_mask(input_pos, self.positions)  # (B, 1, T, L)


def causal_mask(query_pos: torch.Tensor, key_pos: torch.Tensor, window: int | None = None) -> torch.Tensor:
    """True where a query may attend a key: at or before its own position, and, with a sliding
    `window`, fewer than `window` positions back.

    `query_pos` is (B, T); `key_pos` is (L,) for a cache, or (B, L) for the batch's own tokens.
    The mask is (B, 1, T, L), broadcast over heads.
    """
    queries = query_pos[:, None, :, None]  # (B, 1, T, 1)
    keys = key_pos.view(-1 if key_pos.dim() == 2 else 1, 1, 1, key_pos.shape[-1])  # (B or 1, 1, 1, L)
    mask = keys <= queries  # (B, 1, T, L)
    if window is not None:
        mask &= keys > queries - window
    return mask
