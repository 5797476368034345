"""``KroneckerEmbedding``: E (vocab, d) ≈ Σ_r A_r ⊗ B_r with an O(d) lookup, and its tied LM head.

KnGPT2 and KroneckerBERT factor the token embedding as A (vocab, d/n) ⊗ B (1, n) (docs/method.md, "Kronecker embedding").
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kronlm.decompose.shapes import check_factor_shapes
from kronlm.decompose.vanloan import KroneckerFactors, kron_sum
from kronlm.layers.dense import StaysFloatNotice
from kronlm.layers.linear import kronecker_matmul


class KroneckerEmbedding(nn.Module):
    """Embedding table E (V, d) = Σ_r A_r ⊗ B_r, A_r (V/m2, d/n), B_r (m2, n), looked up in O(R·d).

    Row i of E is Σ_r A_r[i // m2] ⊗ B_r[i % m2]; with the papers' B of shape (1, n) that is
    Σ_r A_r[i] ⊗ B_r[0]. Parameters ``A`` (R, V/m2, d/n) and ``B`` (R, m2, n): V·d/n + n for
    R = 1, m2 = 1.

    ``padding_idx`` is kept for API compatibility with ``nn.Embedding`` (it does not zero a row:
    a factored row cannot be zeroed on its own).

    Raises:
        ValueError: factor shapes that do not multiply to (V, d), or rank below 1.
    """

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        a_shape: tuple[int, int],
        b_shape: tuple[int, int],
        rank: int = 1,
        padding_idx: int | None = None,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        m1, n1, m2, n2 = check_factor_shapes((num_embeddings, embedding_dim), a_shape, b_shape, "KroneckerEmbedding")
        if rank < 1:
            raise ValueError(f"KroneckerEmbedding: rank must be >= 1, got {rank}")
        kw = {"device": device, "dtype": dtype}
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.a_shape, self.b_shape, self.rank = (m1, n1), (m2, n2), rank
        self.padding_idx = padding_idx
        self.A = nn.Parameter(torch.empty(rank, m1, n1, **kw))
        self.B = nn.Parameter(torch.empty(rank, m2, n2, **kw))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Random init giving rows of unit-variance entries, like ``nn.Embedding``."""
        if self.A.is_meta:
            return
        with torch.no_grad():
            std = self.rank**-0.25
            self.A.normal_(0.0, std)
            self.B.normal_(0.0, 1.0 / self.rank**0.25)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids: (...) int64 -> (..., d)."""
        R, _, n1 = self.A.shape
        m2, n2 = self.b_shape
        if m2 == 1:
            a_idx, b_idx = input_ids, None
        else:
            a_idx, b_idx = input_ids // m2, input_ids % m2
        # Gather the R rows of A at once from an (V/m2, R*n1) view: one lookup for all terms.
        a = F.embedding(a_idx, self.A.permute(1, 0, 2).reshape(-1, R * n1)).unflatten(-1, (R, n1))
        if b_idx is None:
            b = self.B[:, 0, :]  # (R, n2)
        else:
            b = F.embedding(b_idx, self.B.permute(1, 0, 2).reshape(m2, R * n2)).unflatten(-1, (R, n2))
        rows = (a.unsqueeze(-1) * b.unsqueeze(-2)).sum(-3)  # (..., n1, n2)
        return rows.reshape(*input_ids.shape, self.embedding_dim)

    @torch.no_grad()
    def to_dense(self) -> torch.Tensor:
        """The table Σ_r A_r ⊗ B_r as a (V, d) tensor."""
        return kron_sum(self.A, self.B)

    @torch.no_grad()
    def to_embedding(self) -> nn.Embedding:
        """Merge back into an ``nn.Embedding`` with the same rows."""
        emb = nn.Embedding(self.num_embeddings, self.embedding_dim, padding_idx=self.padding_idx, device=self.A.device, dtype=self.A.dtype)
        emb.weight.copy_(self.to_dense())
        return emb

    @torch.no_grad()
    def resized(self, num_embeddings: int, *, mean_resizing: bool = True) -> KroneckerEmbedding:
        """A copy with ``num_embeddings`` rows: A (R, V/m2, d/n2) gains or loses rows, B is kept.

        Row i of E is Σ_r A_r[i // m2] ⊗ B_r[i % m2], so rows are added in blocks of m2. Kept rows
        are unchanged; a new A row is the mean of the old A rows (``mean_resizing``, the default,
        which makes each new embedding row the mean of the old rows with the same B row, as
        transformers' ``resize_token_embeddings(mean_resizing=True)`` does on average) or is drawn
        from N(0, std of the old A).

        Args:
            num_embeddings: the new vocabulary size V' (a multiple of m2).
            mean_resizing: see above.

        Returns:
            A new ``KroneckerEmbedding`` on the same device and dtype (``padding_idx`` kept when below V').

        Raises:
            ValueError: V' below 1 or not a multiple of m2 (both numbers named).
        """
        m2 = self.b_shape[0]
        if num_embeddings < 1 or num_embeddings % m2:
            raise ValueError(f"KroneckerEmbedding: the vocabulary size must be a positive multiple of B's {m2} rows, got {num_embeddings}")
        rows = num_embeddings // m2
        padding = self.padding_idx if self.padding_idx is not None and self.padding_idx < num_embeddings else None
        new = KroneckerEmbedding(num_embeddings, self.embedding_dim, (rows, self.a_shape[1]), self.b_shape, self.rank,
                                 padding_idx=padding, device=self.A.device, dtype=self.A.dtype)
        keep = min(rows, self.a_shape[0])
        new.A[:, :keep] = self.A[:, :keep]
        if rows > keep:
            if mean_resizing:
                new.A[:, keep:] = self.A.mean(dim=1, keepdim=True)
            else:
                new.A[:, keep:].normal_(0.0, float(self.A.float().std()))
        new.B.copy_(self.B)
        new.A.requires_grad_(self.A.requires_grad)
        new.B.requires_grad_(self.B.requires_grad)
        return new

    @torch.no_grad()
    def load_factors(self, factors: KroneckerFactors) -> None:
        """Copy factors in (per-term scales folded into A).

        Raises:
            ValueError: factor shapes differ from this layer's.
        """
        if tuple(factors.A.shape) != tuple(self.A.shape) or tuple(factors.B.shape) != tuple(self.B.shape):
            raise ValueError(
                f"KroneckerEmbedding: factors A {tuple(factors.A.shape)}, B {tuple(factors.B.shape)} do not match "
                f"the layer's A {tuple(self.A.shape)}, B {tuple(self.B.shape)}"
            )
        self.A.copy_(factors.A * factors.scales.view(-1, 1, 1))
        self.B.copy_(factors.B)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, A={self.a_shape}, B={self.b_shape}, rank={self.rank}"


class KroneckerTiedLMHead(StaysFloatNotice, nn.Module):
    """LM head tied to a ``KroneckerEmbedding``: logits = h Eᵀ with E = Σ_r A_r ⊗ B_r, never formed.

    E (V, d) is the weight of a linear map d -> V with the same factors, so the head reuses the
    embedding's A and B (no parameters of its own) and costs R·(d·m2 + V·d/n) multiply-adds per
    token instead of V·d. The embedding is held by reference, not registered as a submodule, so
    the state dict stores the factors once.

    Args:
        embedding: the model's input ``KroneckerEmbedding``.
        bias: optional (V,) output bias (kept from the original head, if it had one).
    """

    def __init__(self, embedding: KroneckerEmbedding, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        object.__setattr__(self, "_embedding", embedding)
        self.in_features, self.out_features = embedding.embedding_dim, embedding.num_embeddings
        self.bias = nn.Parameter(bias.detach().clone()) if bias is not None else None

    @property
    def embedding(self) -> KroneckerEmbedding:
        """The ``KroneckerEmbedding`` whose factors this head uses."""
        return self._embedding

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: (..., d) -> logits (..., V)."""
        emb = self._embedding
        y = kronecker_matmul(hidden, emb.A.to(hidden.dtype), emb.B.to(hidden.dtype), "b_first")
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, tied to the Kronecker embedding"
