"""Built-in benchmark models for placement, each with example inputs and its basic blocks.

- ``transformer``: the 6+6 encoder-decoder Transformer of the Baechi PyTorch evaluation
  (d 512, 8 heads, d_ff 2048, vocab 30 000, sequence 50).
- ``gpt2``, ``gpt2-medium``, ``gpt2-large``, ``gpt2-xl``: GPT-2 decoders of the published sizes
  (tied input/output embedding).
- ``inception``: an Inception-style CNN whose blocks run four convolution branches in parallel.
- ``branches``: synthetic parallel MLP branches joined by a sum (the placers' best case).

:func:`load_model` also accepts ``package.module:function`` returning ``(model, inputs)`` or
``(model, inputs, leaf_modules)``. Build on ``device="meta"`` to plan without allocating.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class ModelCase:
    """A model to place: the module, example inputs and the classes kept whole as leaves."""

    model: nn.Module
    inputs: tuple
    leaf_modules: tuple[type, ...] = ()


class Seq2SeqTransformer(nn.Module):
    """Encoder-decoder Transformer (``nn.TransformerEncoderLayer``/``DecoderLayer`` blocks)."""

    def __init__(
        self, vocab: int = 30000, d: int = 512, heads: int = 8, ff: int = 2048, layers: int = 6
    ) -> None:
        super().__init__()
        self.src_emb = nn.Embedding(vocab, d)
        self.tgt_emb = nn.Embedding(vocab, d)
        self.encoder = nn.ModuleList(
            nn.TransformerEncoderLayer(d, heads, ff, dropout=0.0, batch_first=True)
            for _ in range(layers)
        )
        self.decoder = nn.ModuleList(
            nn.TransformerDecoderLayer(d, heads, ff, dropout=0.0, batch_first=True)
            for _ in range(layers)
        )
        self.proj = nn.Linear(d, vocab)

    def forward(self, src: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
        memory = self.src_emb(src)
        for layer in self.encoder:
            memory = layer(memory)
        x = self.tgt_emb(tgt)
        for layer in self.decoder:
            x = layer(x, memory)
        return self.proj(x)


class GPT2Block(nn.Module):
    """Pre-norm causal self-attention and MLP: one GPT-2 layer, placed whole."""

    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.out = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d)
        self.fc = nn.Linear(d, 4 * d)
        self.proj = nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, d // self.heads).unbind(2)
        att = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True
        )
        x = x + self.out(att.transpose(1, 2).reshape(b, t, d))
        return x + self.proj(F.gelu(self.fc(self.ln2(x)), approximate="tanh"))


class GPT2(nn.Module):
    """GPT-2 decoder with the output projection tied to the token embedding."""

    def __init__(
        self, layers: int, d: int, heads: int, vocab: int = 50257, max_len: int = 1024
    ) -> None:
        super().__init__()
        self.wte = nn.Embedding(vocab, d)
        self.wpe = nn.Embedding(max_len, d)
        self.blocks = nn.ModuleList(GPT2Block(d, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(ids.shape[1], device=ids.device)
        x = self.wte(ids) + self.wpe(pos)
        for block in self.blocks:
            x = block(x)
        return F.linear(self.ln_f(x), self.wte.weight)


GPT2_SIZES = {
    "gpt2": (12, 768, 12),
    "gpt2-medium": (24, 1024, 16),
    "gpt2-large": (36, 1280, 20),
    "gpt2-xl": (48, 1600, 25),
}


class ConvBNReLU(nn.Module):
    """Convolution, batch norm and ReLU: the unit an Inception branch is built from."""

    def __init__(self, cin: int, cout: int, k: int = 1, stride: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, stride, padding=k // 2, bias=False)
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


class InceptionBlock(nn.Module):
    """Four parallel branches (1x1; 1x1-3x3; 1x1-3x3-3x3; pool-1x1) concatenated."""

    def __init__(self, cin: int, width: int) -> None:
        super().__init__()
        self.b1 = ConvBNReLU(cin, width)
        self.b2 = nn.Sequential(ConvBNReLU(cin, width), ConvBNReLU(width, width, 3))
        self.b3 = nn.Sequential(
            ConvBNReLU(cin, width), ConvBNReLU(width, width, 3), ConvBNReLU(width, width, 3)
        )
        self.b4 = ConvBNReLU(cin, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = F.avg_pool2d(x, 3, stride=1, padding=1)
        return torch.cat([self.b1(x), self.b2(x), self.b3(x), self.b4(pooled)], dim=1)


class InceptionNet(nn.Module):
    """An Inception-style branchy CNN classifier."""

    def __init__(self, blocks: int = 6, width: int = 64, classes: int = 1000) -> None:
        super().__init__()
        self.stem = nn.Sequential(ConvBNReLU(3, 64, 3, 2), ConvBNReLU(64, 4 * width, 3, 2))
        self.blocks = nn.Sequential(*(InceptionBlock(4 * width, width) for _ in range(blocks)))
        self.head = nn.Linear(4 * width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.stem(x))
        return self.head(x.mean(dim=(2, 3)))


class MLPBlock(nn.Module):
    """Linear, GELU, Linear with a residual: one step of a synthetic branch."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, 2 * width)
        self.fc2 = nn.Linear(2 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(F.gelu(self.fc1(x)))


class ParallelBranches(nn.Module):
    """``branches`` independent stacks of ``depth`` MLP blocks on one input, summed."""

    def __init__(self, branches: int = 4, depth: int = 4, width: int = 1024) -> None:
        super().__init__()
        self.inp = nn.Linear(width, width)
        self.branches = nn.ModuleList(
            nn.Sequential(*(MLPBlock(width) for _ in range(depth))) for _ in range(branches)
        )
        self.out = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        total = None
        for branch in self.branches:
            y = branch(h)
            total = y if total is None else total + y
        return self.out(total)


def _transformer(batch: int, device: str) -> ModelCase:
    with torch.device(device):
        model = Seq2SeqTransformer()
        src = torch.randint(0, 30000, (batch, 50))
        tgt = torch.randint(0, 30000, (batch, 50))
    return ModelCase(model, (src, tgt))


def _gpt2(size: str) -> Callable[[int, str], ModelCase]:
    def build(batch: int, device: str) -> ModelCase:
        layers, d, heads = GPT2_SIZES[size]
        with torch.device(device):
            model = GPT2(layers, d, heads)
            ids = torch.randint(0, 50257, (batch, 1024))
        return ModelCase(model, (ids,), (GPT2Block,))

    return build


def _inception(batch: int, device: str) -> ModelCase:
    with torch.device(device):
        model = InceptionNet()
        x = torch.randn(batch, 3, 224, 224)
    return ModelCase(model, (x,), (ConvBNReLU,))


def _branches(batch: int, device: str) -> ModelCase:
    with torch.device(device):
        model = ParallelBranches()
        x = torch.randn(batch, 1024)
    return ModelCase(model, (x,), (MLPBlock,))


#: name -> (builder(batch, device), default batch, description)
BUILTIN_MODELS: dict[str, tuple[Callable[[int, str], ModelCase], int, str]] = {
    "transformer": (_transformer, 64, "6+6 encoder-decoder Transformer, d 512, seq 50"),
    **{
        name: (_gpt2(name), 8, f"GPT-2 {name.split('-')[-1] if '-' in name else 'small'}, seq 1024")
        for name in GPT2_SIZES
    },
    "inception": (_inception, 32, "Inception-style CNN, 6 four-branch blocks, 224x224"),
    "branches": (_branches, 256, "4 parallel branches of 4 MLP blocks, width 1024"),
}


def load_model(spec: str, *, batch: int | None = None, device: str = "cpu") -> ModelCase:
    """A built-in model by name, or ``package.module:function`` returning the model case."""
    if spec in BUILTIN_MODELS:
        build, default_batch, _ = BUILTIN_MODELS[spec]
        b = default_batch if batch is None else batch
        if b < 1:
            raise ValueError(f"batch must be >= 1, got {b}")
        return build(b, device)
    if ":" not in spec:
        raise ValueError(
            f"unknown model {spec!r}: use one of {', '.join(BUILTIN_MODELS)} "
            "or package.module:function"
        )
    mod_name, fn_name = spec.split(":", 1)
    try:
        fn = getattr(importlib.import_module(mod_name), fn_name)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"cannot load model function {spec!r}: {exc}") from exc
    out = fn()
    if not isinstance(out, tuple) or len(out) not in (2, 3):
        raise ValueError(f"{spec} must return (model, example_inputs[, leaf_modules])")
    inputs = out[1] if isinstance(out[1], tuple) else (out[1],)
    return ModelCase(out[0], inputs, tuple(out[2]) if len(out) == 3 else ())


def param_count(model: nn.Module) -> int:
    return sum(math.prod(p.shape) for p in model.parameters())
