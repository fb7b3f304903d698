"""A small Pre-LN Transformer (encoder or decoder, tokens or image patches), no dependencies.

It is the model LEMON expands for users without Hugging Face ``transformers`` and the model
the savings benchmark trains: ``x + attn(LN(x))``, ``x + mlp(LN(x))``, a final LayerNorm and
either a (tied or untied) token head or a classifier on the first token.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class TransformerConfig:
    """Configuration of :class:`PreLNTransformer`.

    ``vocab_size > 0`` gives a token model (``forward(input_ids)``); otherwise ``image_size``,
    ``patch_size`` and ``num_channels`` give a ViT-style model (``forward(pixel_values)``) with a
    CLS token. ``num_classes > 0`` puts a classifier on the first token; otherwise the token head
    predicts ``vocab_size + extra_outputs`` symbols per position.
    """

    hidden_size: int = 64
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    intermediate_size: int = 256
    vocab_size: int = 0
    max_position_embeddings: int = 128
    image_size: int = 32
    patch_size: int = 4
    num_channels: int = 3
    num_classes: int = 0
    causal: bool = False
    tie_word_embeddings: bool = True
    layer_norm_eps: float = 1e-5
    init_std: float = 0.02

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    def to_dict(self) -> dict:
        return asdict(self)

    def validate(self) -> None:
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size={self.hidden_size} is not a multiple of "
                f"num_attention_heads={self.num_attention_heads}"
            )
        if self.vocab_size <= 0 and self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} not divisible by {self.patch_size}")
        if self.vocab_size <= 0 and self.num_classes <= 0:
            raise ValueError("an image model needs num_classes > 0")


class Attention(nn.Module):
    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        d = cfg.hidden_size
        self.heads, self.head_dim, self.causal = cfg.num_attention_heads, cfg.head_dim, cfg.causal
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.o_proj = nn.Linear(d, d)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        b, t, _ = x.shape

        def heads(p: nn.Linear) -> torch.Tensor:
            return p(x).view(b, t, self.heads, self.head_dim).transpose(1, 2)

        causal = self.causal and mask is None
        y = F.scaled_dot_product_attention(
            heads(self.q_proj), heads(self.k_proj), heads(self.v_proj), mask, is_causal=causal
        )
        return self.o_proj(y.transpose(1, 2).reshape(b, t, -1))


class Block(nn.Module):
    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.attn = Attention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = nn.Sequential()
        self.mlp.add_module("fc1", nn.Linear(cfg.hidden_size, cfg.intermediate_size))
        self.mlp.add_module("act", nn.GELU())
        self.mlp.add_module("fc2", nn.Linear(cfg.intermediate_size, cfg.hidden_size))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), mask)
        return x + self.mlp(self.ln_2(x))


class PreLNTransformer(nn.Module):
    """Pre-LN Transformer encoder/decoder; ``forward`` returns logits.

    Token models: ``forward(input_ids, attention_mask=None) -> (B, T, vocab_size)`` (or
    ``(B, num_classes)``). Image models: ``forward(pixel_values) -> (B, num_classes)``.
    """

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        config.validate()
        self.config = copy.deepcopy(config)
        cfg, d = self.config, config.hidden_size
        if cfg.vocab_size > 0:
            self.embed_tokens = nn.Embedding(cfg.vocab_size, d)
            positions = cfg.max_position_embeddings
        else:
            self.patch_embed = nn.Linear(cfg.num_channels * cfg.patch_size**2, d)
            self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
            positions = cfg.num_patches + 1
        self.pos_embed = nn.Parameter(torch.zeros(1, positions, d))
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = nn.LayerNorm(d, eps=cfg.layer_norm_eps)
        n_out = cfg.num_classes if cfg.num_classes > 0 else cfg.vocab_size
        tie = cfg.num_classes <= 0 and cfg.tie_word_embeddings and cfg.vocab_size > 0
        self.head = nn.Linear(d, n_out, bias=True)
        self.apply(self._init)
        nn.init.trunc_normal_(self.pos_embed, std=cfg.init_std)
        if cfg.vocab_size <= 0:
            nn.init.trunc_normal_(self.cls_token, std=cfg.init_std)
        if tie:
            self.head.weight = self.embed_tokens.weight

    def _init(self, m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.trunc_normal_(m.weight, std=self.config.init_std)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)

    def patchify(self, pixel_values: torch.Tensor) -> torch.Tensor:
        p = self.config.patch_size
        x = F.unfold(pixel_values, kernel_size=p, stride=p)  # (B, C*p*p, N)
        return x.transpose(1, 2)

    def hidden_states(
        self, inputs: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The final-LayerNorm output, (B, T, hidden_size)."""
        cfg = self.config
        if cfg.vocab_size > 0:
            x = self.embed_tokens(inputs)
        else:
            x = self.patch_embed(self.patchify(inputs))
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        t = x.shape[1]
        if t > self.pos_embed.shape[1]:
            raise ValueError(f"sequence length {t} exceeds {self.pos_embed.shape[1]} positions")
        x = x + self.pos_embed[:, :t]
        mask = None
        if attention_mask is not None:
            keep = attention_mask.bool()[:, None, None, :]
            if cfg.causal:
                keep = keep & torch.ones(t, t, dtype=torch.bool, device=x.device).tril()
            # Rows of padded queries would be fully masked (NaN): let them see themselves.
            keep = keep | torch.eye(t, dtype=torch.bool, device=x.device)
            mask = keep
        for layer in self.layers:
            x = layer(x, mask)
        return self.norm(x)

    def forward(
        self, inputs: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        h = self.hidden_states(inputs, attention_mask)
        if self.config.num_classes > 0:
            return self.head(h[:, 0])
        return self.head(h)
