"""The model and the data of ``adamw demo``: a GPT-style character-level transformer, and the text it
learns: *Hamlet* and *Macbeth* by William Shakespeare, in the public domain, shipped as package data in
``data/shakespeare.txt`` (its edition and provenance: ``data/README.md``). Nothing is downloaded.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass(frozen=True)
class ModelConfig:
    d_model: int = 128
    n_layers: int = 2
    n_heads: int = 4
    context: int = 64


class Block(nn.Module):
    """Pre-LayerNorm transformer block: causal self-attention, then a 4x GELU MLP."""

    def __init__(self, d_model: int, n_heads: int) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.ln1 = nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.ln2 = nn.LayerNorm(d_model)
        self.fc = nn.Linear(d_model, 4 * d_model)
        self.out = nn.Linear(4 * d_model, d_model)

    def forward(self, x: Tensor) -> Tensor:
        batch, length, width = x.shape
        qkv = self.qkv(self.ln1(x)).view(batch, length, 3, self.n_heads, width // self.n_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(batch, length, width))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class CharTransformer(nn.Module):
    """A GPT-style character model: token and position embeddings, blocks, LayerNorm, linear head."""

    def __init__(self, vocab_size: int, config: ModelConfig) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab_size, config.d_model)
        self.pos = nn.Embedding(config.context, config.d_model)
        self.blocks = nn.ModuleList(Block(config.d_model, config.n_heads) for _ in range(config.n_layers))
        self.ln = nn.LayerNorm(config.d_model)
        self.head = nn.Linear(config.d_model, vocab_size)
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)

    def forward(self, idx: Tensor) -> Tensor:
        positions = torch.arange(idx.shape[1], device=idx.device)
        x = self.tok(idx) + self.pos(positions)
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln(x))


def load_text() -> str:
    return (resources.files(__package__) / "data" / "shakespeare.txt").read_text(encoding="ascii")


@dataclass
class Corpus:
    tokens: Tensor  # int64 character ids
    vocab: list[str]

    @classmethod
    def from_text(cls, text: str) -> Corpus:
        vocab = sorted(set(text))
        index = {c: i for i, c in enumerate(vocab)}
        return cls(torch.tensor([index[c] for c in text], dtype=torch.int64), vocab)


def batch_starts(corpus_size: int, context: int, steps: int, batch_size: int, seed: int) -> Tensor:
    """Window offsets of every batch, drawn once so that every mode sees the same data in the same order."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, corpus_size - context - 1, (steps, batch_size), generator=generator)


def get_batch(tokens: Tensor, starts: Tensor, context: int, device: torch.device) -> tuple[Tensor, Tensor]:
    offsets = starts.unsqueeze(1) + torch.arange(context + 1)
    window = tokens[offsets].to(device)
    return window[:, :-1], window[:, 1:]
