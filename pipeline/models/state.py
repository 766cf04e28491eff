"""Decode states: explicit tensors that ``step`` reads and updates, flattenable to a list for the ONNX graph."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class KVCache:
    """The transformer's state: per layer a key and a value cache preallocated to ``max_seq_len``.

    keys[i], values[i]: (B, nh, max_seq_len, hs); entries at and after ``position`` are not yet written.
    position: () int64, how many tokens the state has consumed (the same for every row of the batch).
    """

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    position: torch.Tensor

    def tensors(self) -> list[torch.Tensor]:
        """[k_0, v_0, k_1, v_1, ..., position]."""
        return [t for kv in zip(self.keys, self.values) for t in kv] + [self.position]

    @classmethod
    def from_tensors(cls, tensors: list[torch.Tensor]) -> "KVCache":
        *kv, position = tensors
        return cls(keys=list(kv[0::2]), values=list(kv[1::2]), position=position)

    def take(self, rows: torch.Tensor) -> "KVCache":
        """A new cache whose row i is row ``rows[i]`` of this one (rows may repeat), e.g. a beam's hypotheses.

        Copies only the entries written so far; the rest of the preallocated cache is left uninitialised.
        """
        n = int(self.position)

        def gather(cache: torch.Tensor) -> torch.Tensor:
            out = cache.new_empty((len(rows), *cache.shape[1:]))
            out[:, :, :n] = cache[rows, :, :n]
            return out

        return KVCache([gather(k) for k in self.keys], [gather(v) for v in self.values], self.position.clone())


@dataclass
class MambaState:
    """Mamba's state: per layer the last ``d_conv`` conv inputs and the SSM hidden state.

    conv_states[i]: (B, D_inner, d_conv), oldest input first. ssm_states[i]: (B, D_inner, N).
    """

    conv_states: list[torch.Tensor]
    ssm_states: list[torch.Tensor]

    def tensors(self) -> list[torch.Tensor]:
        """[conv_0, ssm_0, conv_1, ssm_1, ...]."""
        return [t for pair in zip(self.conv_states, self.ssm_states) for t in pair]

    @classmethod
    def from_tensors(cls, tensors: list[torch.Tensor]) -> "MambaState":
        return cls(conv_states=list(tensors[0::2]), ssm_states=list(tensors[1::2]))

    def take(self, rows: torch.Tensor) -> "MambaState":
        """A new state whose row i is row ``rows[i]`` of this one (rows may repeat), e.g. a beam's hypotheses."""
        return MambaState([c[rows] for c in self.conv_states], [s[rows] for s in self.ssm_states])
