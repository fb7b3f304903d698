"""A character-level language-modelling task for the optimizers (the paper's kind of task for
Local AdaAlter): a one-layer LSTM over the bytes of Python's standard library, which ships with
every Python installation, trained on N local ranks.

The corpus is deterministic for a given Python version: the top-level ``*.py`` files of the
standard library in sorted order, concatenated and cut at a fixed byte budget; the last
``heldout_bytes`` are held out. :func:`load_stdlib_corpus` returns its SHA-256 so results name
exactly the text they were measured on. Every rank samples its own windows (i.i.d. offsets in
the training text, keyed by seed, step and rank); the **averaged** model is evaluated by its
held-out cross-entropy (nats per character) and perplexity.
"""

from __future__ import annotations

import hashlib
import math
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from scaledl.optim._task import RunSpec, launch_task

__all__ = ["CharLM", "CharLMTask", "Corpus", "load_stdlib_corpus", "run_local"]


@dataclass(frozen=True)
class Corpus:
    """Token ids (uint8, indices into ``vocab``) split into training text and held-out tail."""

    train: torch.Tensor
    heldout: torch.Tensor
    vocab: bytes
    sha256: str
    files: int

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)


def load_stdlib_corpus(
    max_bytes: int = 1_000_000, heldout_bytes: int = 32_768, root: str | Path | None = None
) -> Corpus:
    """The first ``max_bytes`` of the sorted top-level ``*.py`` files of ``root`` (Python's
    standard library by default), with the last ``heldout_bytes`` held out.

    The vocabulary is the sorted set of bytes that occur, so the same text always gives the
    same ids. Raises ``ValueError`` when the files hold fewer than ``max_bytes`` bytes.
    """
    if heldout_bytes < 2 or max_bytes <= 2 * heldout_bytes:
        raise ValueError(
            f"need 2 <= heldout_bytes < max_bytes / 2, got heldout_bytes={heldout_bytes}, "
            f"max_bytes={max_bytes}"
        )
    folder = Path(root if root is not None else sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in folder.glob("*.py") if p.is_file())
    chunks, size = [], 0
    for path in files:
        if size >= max_bytes:
            break
        chunks.append(path.read_bytes())
        size += len(chunks[-1])
    text = b"".join(chunks)[:max_bytes]
    if len(text) < max_bytes:
        raise ValueError(f"{folder} holds {len(text)} bytes of *.py files, fewer than {max_bytes}")
    vocab = bytes(sorted(set(text)))
    lut = torch.zeros(256, dtype=torch.uint8)
    lut[torch.tensor(list(vocab))] = torch.arange(len(vocab), dtype=torch.uint8)
    ids = lut[torch.frombuffer(bytearray(text), dtype=torch.uint8).long()]
    return Corpus(
        train=ids[:-heldout_bytes].clone(),
        heldout=ids[-heldout_bytes:].clone(),
        vocab=vocab,
        sha256=hashlib.sha256(text).hexdigest(),
        files=len(chunks),
    )


class CharLM(nn.Module):
    """Embedding → one-layer LSTM → linear over the vocabulary; logits of shape (B, T, V)."""

    def __init__(self, vocab_size: int, embed: int = 32, hidden: int = 128) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, embed)
        self.lstm = nn.LSTM(embed, hidden, batch_first=True)
        self.out = nn.Linear(hidden, vocab_size)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h, _ = self.lstm(self.embed(ids))
        return self.out(h)


def _nll(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    logits = model(x)
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


@dataclass
class CharLMTask:
    """The character LM as a :class:`scaledl.optim._task.Task`: windows of ``seq_len``
    characters predict the next character at every position. ``device`` ("cpu", "cuda")
    holds the model and the batches; the corpus stays on the CPU until indexed."""

    corpus: Corpus
    seq_len: int = 64
    embed: int = 32
    hidden: int = 128
    device: str = "cpu"
    _offsets: torch.Tensor = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if self.seq_len < 1 or self.embed < 1 or self.hidden < 1:
            raise ValueError(
                f"seq_len, embed and hidden must be positive, got {self.seq_len}, "
                f"{self.embed}, {self.hidden}"
            )
        if len(self.corpus.train) <= self.seq_len + 1 or len(self.corpus.heldout) <= self.seq_len:
            raise ValueError(f"seq_len={self.seq_len} is too long for the corpus")
        self._offsets = torch.arange(self.seq_len + 1)

    def make_model(self, seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return CharLM(self.corpus.vocab_size, self.embed, self.hidden).to(self.device)

    def batch(
        self, step: int, rank: int, world: int, seed: int, batch_size: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(seed * 1_000_003 + step * 4099 + rank)
        starts = torch.randint(len(self.corpus.train) - self.seq_len, (batch_size,), generator=g)
        w = self.corpus.train[starts[:, None] + self._offsets].long().to(self.device)
        return w[:, :-1], w[:, 1:]

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return _nll(model, x, y)

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """Held-out cross-entropy over consecutive ``seq_len`` windows (each from a fresh
        state), its perplexity and bits per character."""
        n = (len(self.corpus.heldout) - 1) // self.seq_len
        h = self.corpus.heldout[: n * self.seq_len + 1].long().to(self.device)
        x, y = h[:-1].view(n, self.seq_len), h[1:].view(n, self.seq_len)
        loss = float(_nll(model, x, y))
        return {"loss": loss, "perplexity": math.exp(loss), "bits_per_char": loss / math.log(2)}


def run_local(
    specs: list[RunSpec],
    world_size: int,
    steps: int,
    task: CharLMTask | None = None,
    timeout_s: float = 900.0,
    **kw: Any,
) -> list[dict[str, Any]]:
    """Train ``specs`` on the character LM on ``world_size`` local gloo ranks (rank 0's
    records; ``final_loss`` is the held-out loss of the averaged model)."""
    task = task if task is not None else CharLMTask(load_stdlib_corpus())
    return launch_task(task, specs, world_size, steps, timeout_s, **kw)
