"""LEMON primitives: index maps, fan-in splits, norm rules, depth plans and the expansion engine.

LEMON (Wang et al., arXiv 2310.07999) initialises a wider and/or deeper Transformer from a
smaller one so that both compute the same function, while copied units are *not* symmetric.

Vocabulary (source width ``D_S``, target width ``D_T``, ``k = D_T // D_S``, ``r = D_T % D_S``,
``c = k * D_S / D_T``): an index map sends every target unit to the source unit it copies, or to
``-1`` for one of the ``r`` residue units. The residual stream of a LayerNorm model is kept as
``[x, ..., x, mean(x) * r]`` ("avg" residues), the output of every norm as ``[y, ..., y, 0 * r]``
and heads / MLP neurons as circular copies. RMSNorm models keep zero residues in the stream.

The engine (:func:`expand_parameters`) fills every parameter of a freshly initialised target
model from the source by a :class:`Rule` chosen by the parameter's name; the target's own
random initialisation supplies the random parts that break the symmetry between copies.
"""

from __future__ import annotations

import copy
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

#: Depth initialisations of the new layers: canceling random outputs (LEMON) or zero outputs.
DEPTH_INITS = ("cancel", "zero")


# --------------------------------------------------------------------------- index maps


def stream_map(src: int, tgt: int) -> torch.Tensor:
    """Residual-stream map: ``k`` whole copies of the source, then ``r`` residues (``-1``)."""
    k = tgt // src
    j = torch.arange(tgt)
    return torch.where(j < k * src, j % src, torch.full_like(j, -1))


def head_map(src_heads: int, tgt_heads: int, head_dim: int) -> torch.Tensor:
    """Map of a concatenation of heads: target head ``h`` copies source head ``h mod H_S``."""
    j = torch.arange(tgt_heads * head_dim)
    return ((j // head_dim) % src_heads) * head_dim + j % head_dim


def neuron_map(src: int, tgt: int) -> torch.Tensor:
    """Circular map: target unit ``j`` copies source unit ``j mod src`` (no residues)."""
    return torch.arange(tgt) % src


def copy_counts(index_map: torch.Tensor, src: int) -> torch.Tensor:
    """How many target units copy each source unit."""
    return torch.bincount(index_map[index_map >= 0], minlength=src)


# --------------------------------------------------------------------------- primitives


def _to_last(t: torch.Tensor, dim: int) -> torch.Tensor:
    return t.movedim(dim, -1)


def gather_rows(
    w: torch.Tensor, index_map: torch.Tensor, dim: int = 0, residue: str = "avg"
) -> torch.Tensor:
    """Expand ``w`` along its output axis ``dim``: copies by ``index_map``, residues by rule.

    ``residue="avg"`` makes residue units the mean of all source units (LayerNorm streams),
    ``"zero"`` makes them zero (norm outputs, RMSNorm streams).
    """
    if residue not in ("avg", "zero"):
        raise ValueError(f"residue must be 'avg' or 'zero', got {residue!r}")
    dim = dim % w.dim()
    # Selecting along ``dim`` directly keeps the result contiguous (fast later passes).
    out = torch.index_select(w, dim, index_map.clamp(min=0))
    res = torch.nonzero(index_map < 0).flatten()
    if res.numel():
        fill = (
            w.mean(dim, keepdim=True) if residue == "avg" else torch.zeros_like(w.narrow(dim, 0, 1))
        )
        shape = list(out.shape)
        shape[dim] = res.numel()
        out.index_copy_(dim, res, fill.expand(shape))
    return out


def split_cols(
    w: torch.Tensor,
    index_map: torch.Tensor,
    rand: torch.Tensor | None,
    dim: int = -1,
    scale: float = 1.0,
) -> torch.Tensor:
    """Split the fan-in axis ``dim`` of ``w`` over the copies named by ``index_map``.

    Copy ``j`` of source column ``s`` (copy set ``C_s`` of size ``n_s``) becomes
    ``R_j - mean_{C_s}(R) + w_s / n_s``: the copies sum to ``w_s`` (so a copied input gives the
    same output) but differ (so they get different gradients). Residue columns keep ``R_j``
    (they only ever see a zero input). ``rand=None`` gives the symmetric Net2Net split.
    """
    x = _to_last(w, dim)
    n_src = x.shape[-1]
    valid = index_map >= 0
    all_valid = bool(valid.all())
    src_idx = index_map.clamp(min=0)
    counts = copy_counts(index_map, n_src).to(x.dtype).clamp(min=1)
    if rand is None:
        out = torch.index_select(x / counts, -1, src_idx)
        if not all_valid:
            out[..., ~valid] = 0
        return out.movedim(-1, dim)
    r = _to_last(rand, dim).to(x.dtype)
    if scale != 1.0:
        r = r * scale
    sums = torch.zeros(*r.shape[:-1], n_src, dtype=x.dtype, device=x.device)
    if all_valid:
        sums.index_add_(-1, index_map, r)
    else:
        sums.index_add_(-1, index_map[valid], r[..., valid])
    # (w_s - sum_C R) / n_s is source-sized: one target-sized gather plus one add.
    out = torch.index_select((x - sums) / counts, -1, src_idx)
    out += r
    if not all_valid:
        out[..., ~valid] = r[..., ~valid]
    return out.movedim(-1, dim)


def cancel_cols(
    index_map: torch.Tensor, rand: torch.Tensor, dim: int = -1, scale: float = 1.0
) -> torch.Tensor:
    """Random fan-in weights whose copies sum to zero (exactly zero where a unit has one copy).

    Used for the output projections of new layers: non-zero, yet the block outputs zero
    because every copy set sees one shared input value.
    """
    n_src = int(index_map.max()) + 1
    shape = list(rand.shape)
    shape[dim] = n_src
    zeros = torch.zeros(shape, dtype=rand.dtype, device=rand.device)
    return split_cols(zeros, index_map, rand, dim=dim, scale=scale)


def norm_expand(
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    index_map: torch.Tensor,
    generator: torch.Generator | None = None,
    scale: float = 1.0,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """LEMON LayerNorm/RMSNorm expansion for a stream in ``index_map`` form.

    With ``c = k D_S / D_T`` the expanded stream has variance (or mean square) ``c`` times the
    source's, so ``gamma`` is multiplied by ``sqrt(c)`` (the caller multiplies ``eps`` by
    ``c``); residue ``gamma`` is random in (-1, 1) (it multiplies an exact zero), residue
    ``beta`` is zero. ``scale`` multiplies both (``1/k`` before a tied output head).
    """
    k = int(copy_counts(index_map, int(index_map.max()) + 1).min())
    c = k * (int(index_map.max()) + 1) / index_map.numel()
    res = index_map < 0
    new_w = new_b = None
    if weight is not None:
        new_w = weight[index_map.clamp(min=0)] * math.sqrt(c)
        if res.any():
            u = torch.rand(int(res.sum()), generator=generator, dtype=torch.float64)
            new_w[res] = (2 * u - 1).to(weight.dtype) * math.sqrt(c)
        new_w = new_w * scale
    if bias is not None:
        new_b = bias[index_map.clamp(min=0)].clone()
        new_b[res] = 0
        new_b = new_b * scale
    return new_w, new_b


def depth_plan(src_layers: int, tgt_layers: int) -> list[tuple[int, bool]]:
    """Target layer ``t`` -> (source layer, is_new). Layers ``0..2L_S-L_T-1`` stay single;
    every later source layer ``i`` is followed by a new layer ``i'`` (6->12: 1,1',...,6,6')."""
    if tgt_layers < src_layers:
        raise ValueError(
            f"num_layers={tgt_layers} is smaller than the source's {src_layers} layers"
        )
    if tgt_layers > 2 * src_layers:
        raise ValueError(
            f"num_layers={tgt_layers} is more than 2x the source's {src_layers} layers in one "
            f"call; expand to at most {2 * src_layers} and call expand() again"
        )
    single = 2 * src_layers - tgt_layers
    plan = [(i, False) for i in range(single)]
    for i in range(single, src_layers):
        plan += [(i, False), (i, True)]
    return plan


# --------------------------------------------------------------------------- sizes and maps


@dataclass(frozen=True)
class Sizes:
    """Widths and depth of a model (heads counted, head dimension fixed)."""

    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    layers: int


@dataclass
class Maps:
    """All index maps of one expansion, plus the stream residue rule."""

    src: Sizes
    tgt: Sizes
    stream_residue: str  # "avg" (LayerNorm stream) or "zero" (RMSNorm stream)

    def __post_init__(self) -> None:
        s, t = self.src, self.tgt
        self.k = t.hidden // s.hidden
        self.c = self.k * s.hidden / t.hidden
        self.maps = {
            "stream": stream_map(s.hidden, t.hidden),
            "head": head_map(s.heads, t.heads, s.head_dim),
            "kv": head_map(s.kv_heads, t.kv_heads, s.head_dim),
            "neuron": neuron_map(s.intermediate, t.intermediate),
            "pool": neuron_map(s.hidden, t.hidden),
        }
        # GPT-2's fused c_attn: three head-mapped blocks (q, k, v) side by side.
        hm, width = self.maps["head"], s.heads * s.head_dim
        self.maps["qkv"] = torch.cat([hm, hm + width, hm + 2 * width])
        self.plan = depth_plan(s.layers, t.layers)

    def residue(self, kind: str) -> str:
        return self.stream_residue if kind == "stream" else "zero"


def check_sizes(src: Sizes, tgt: Sizes, post_ln: bool, family: str) -> None:
    """Raise a ``ValueError`` naming the problem for any target LEMON cannot reach exactly."""
    for what, a, b in [
        ("hidden_size", src.hidden, tgt.hidden),
        ("intermediate_size", src.intermediate, tgt.intermediate),
    ]:
        if b < a:
            raise ValueError(f"{what}={b} is smaller than the source's {a}; LEMON only grows")
    if tgt.hidden % src.head_dim:
        raise ValueError(
            f"hidden_size={tgt.hidden} is not a multiple of the head dimension {src.head_dim}; "
            "LEMON keeps the head dimension and adds heads"
        )
    if post_ln and tgt.hidden % src.hidden:
        raise ValueError(
            f"hidden_size={tgt.hidden} is not a multiple of {src.hidden}: {family} normalises "
            "its residual stream (Post-LN or embedding LayerNorm), which is exact only for "
            "integer width ratios"
        )
    if src.kv_heads != src.heads and tgt.heads % (src.heads // src.kv_heads):
        g = src.heads // src.kv_heads
        raise ValueError(
            f"{tgt.heads} attention heads cannot keep the source's {g} query heads per "
            f"key-value head (grouped-query attention); choose a hidden_size giving a multiple "
            f"of {g} heads"
        )
    depth_plan(src.layers, tgt.layers)


def target_sizes(
    src: Sizes, hidden_size: int | None, num_layers: int | None, intermediate_size: int | None
) -> Sizes:
    """The target sizes: unspecified widths scale with the hidden size, head_dim is kept."""
    hidden = src.hidden if hidden_size is None else int(hidden_size)
    for name, v in [
        ("hidden_size", hidden),
        ("num_layers", num_layers),
        ("intermediate_size", intermediate_size),
    ]:
        if v is not None and int(v) <= 0:
            raise ValueError(f"{name} must be positive, got {v}")
    if intermediate_size is None:
        intermediate_size = max(src.intermediate, round(src.intermediate * hidden / src.hidden))
    heads = hidden // src.head_dim
    group = src.heads // src.kv_heads
    return Sizes(
        hidden=hidden,
        heads=heads,
        kv_heads=max(1, heads // group),
        head_dim=src.head_dim,
        intermediate=int(intermediate_size),
        layers=src.layers if num_layers is None else int(num_layers),
    )


# --------------------------------------------------------------------------- rule engine


@dataclass(frozen=True)
class Rule:
    """How one parameter expands.

    ``out``/``inp`` name the index map of the output axis (gathered) and of the fan-in axis
    (split); ``norm`` marks a norm's ``"weight"``/``"bias"``; ``block_output`` marks the output
    projection of a residual branch (cancelled or zeroed in new layers); ``scale`` multiplies
    the result (``1/k`` for the norm before a tied head, filled in by the family).
    """

    out: str | None = None
    out_dim: int = 0
    inp: str | None = None
    inp_dim: int = -1
    norm: str | None = None
    block_output: bool = False
    tied_final: bool = False


#: Rules are matched against the parameter name (layer prefix removed) with ``re.search``.
RuleTable = Sequence[tuple[str, Rule]]

_LAYER_RE = re.compile(r"^(.*?(?:^|\.)(?:layer|layers|h|blocks)\.)(\d+)\.(.+)$")


def find_rule(table: RuleTable, key: str, full_name: str) -> Rule:
    for pattern, rule in table:
        if re.search(pattern, key):
            return rule
    raise ValueError(f"no LEMON rule for parameter {full_name!r}; this model is not supported")


def expand_tensor(
    rule: Rule,
    w: torch.Tensor,
    rand: torch.Tensor,
    maps: Maps,
    generator: torch.Generator,
    split: str = "lemon",
    rand_scale: float = 1.0,
) -> torch.Tensor:
    """Apply ``rule`` to a source tensor (float64), using ``rand`` (target init, times
    ``rand_scale``) as noise."""
    if rule.norm is not None:
        scale = 1.0 / maps.k if rule.tied_final else 1.0
        idx = maps.maps["stream"]
        if split == "net2net":  # naive: circular copies, no sqrt(c) / residue handling
            return w[neuron_map(w.shape[0], idx.numel())] * scale
        gw, gb = norm_expand(
            w if rule.norm == "weight" else None,
            w if rule.norm == "bias" else None,
            idx,
            generator,
            scale,
        )
        return gw if rule.norm == "weight" else gb
    out = w
    if rule.out is not None:
        idx = maps.maps[rule.out]
        if split == "net2net" and rule.out == "stream":
            idx = maps.maps["pool"]
        out = gather_rows(out, idx, rule.out_dim, maps.residue(rule.out))
    if rule.inp is not None:
        idx = maps.maps[rule.inp]
        if split == "net2net" and rule.inp == "stream":
            idx = maps.maps["pool"]
        noise = None if split == "net2net" else rand
        out = split_cols(out, idx, noise, rule.inp_dim, scale=rand_scale)
    return out


def expand_parameters(
    source: nn.Module,
    target: nn.Module,
    table: RuleTable,
    maps: Maps,
    depth_init: str = "cancel",
    seed: int = 0,
    split: str = "lemon",
    rand_scale: float = 1.0,
    override: Callable[[str, Rule, int, int, bool, torch.Tensor], torch.Tensor] | None = None,
) -> None:
    """Fill every parameter of ``target`` (freshly initialised: its values are the noise R)
    from ``source`` by the rule its name matches. New layers of the depth plan copy their
    source layer's fan-in and get canceling (or zero) output projections.

    ``override(name, rule, t, s, is_new, value)`` may replace the computed value (Post-LN
    depth rules, layer-index scaling). ``split="net2net"`` gives the symmetric naive duplication.
    """
    if depth_init not in DEPTH_INITS:
        raise ValueError(f"depth_init must be one of {DEPTH_INITS}, got {depth_init!r}")
    src_params = dict(source.named_parameters())
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in target.named_parameters():
            m = _LAYER_RE.match(name)
            t = s = -1
            is_new = False
            src_name = key = name
            if m is not None:
                t = int(m.group(2))
                s, is_new = maps.plan[t]
                src_name = f"{m.group(1)}{s}.{m.group(3)}"
                key = m.group(3)
            rule = find_rule(table, key, name)
            if src_name not in src_params:
                raise ValueError(f"parameter {src_name!r} missing from the source model")
            rand = p.detach().to(torch.float64)
            value = None
            if is_new and rule.block_output:
                if depth_init == "zero" or p.ndim == 1 or rule.inp is None:
                    value = torch.zeros_like(rand)
                else:
                    value = cancel_cols(maps.maps[rule.inp], rand, rule.inp_dim, rand_scale)
            if value is None:
                w = src_params[src_name].detach().to(torch.float64)
                value = expand_tensor(rule, w, rand, maps, gen, split, rand_scale)
            if override is not None:
                value = override(name, rule, t, s, is_new, value)
            if value.shape != p.shape:
                raise ValueError(
                    f"internal shape mismatch for {name}: {tuple(value.shape)} vs {tuple(p.shape)}"
                )
            p.copy_(value.to(p.dtype))


def count_parameters(model: nn.Module) -> int:
    """Number of distinct parameters (tied weights counted once)."""
    return sum(p.numel() for p in model.parameters())


# --------------------------------------------------------------------------- LR schedule


def lemon_schedule(
    optimizer: torch.optim.Optimizer,
    total_steps: int,
    warmup_steps: int,
    min_lr_ratio: float = 0.1,
) -> torch.optim.lr_scheduler.LambdaLR:
    """The LEMON schedule: linear warm-up to the optimizer's (from-scratch) peak LR, then a
    full cosine decay to ``min_lr_ratio * peak`` compressed into ``total_steps``.

    Use a fresh optimizer on the expanded model with the same peak LR as from scratch and
    ``total_steps`` a fraction (about 0.4-0.6) of the from-scratch budget; see
    ``docs/expansion.md``.
    """
    if total_steps <= 0:
        raise ValueError(f"total_steps must be positive, got {total_steps}")
    if not 0 <= warmup_steps < total_steps:
        raise ValueError(f"warmup_steps must be in [0, total_steps), got {warmup_steps}")
    if not 0.0 <= min_lr_ratio <= 1.0:
        raise ValueError(f"min_lr_ratio must be in [0, 1], got {min_lr_ratio}")

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# --------------------------------------------------------------------------- families and API


@dataclass
class Family:
    """What LEMON needs to know about one model family.

    ``sizes(config)`` reads the source sizes; ``configure(config, tgt, c)`` writes the target
    sizes (and ``eps * c``) into a copy of the config; ``rules(model)`` gives the rule table;
    ``post_ln`` marks families whose residual stream is a LayerNorm output (integer width
    ratios only); ``override`` builds an optional per-parameter override for the engine.
    """

    name: str
    sizes: Callable[[object], Sizes]
    configure: Callable[[object, Sizes, float], None]
    rules: Callable[[nn.Module], RuleTable]
    stream_residue: str = "avg"
    post_ln: bool = False
    override: Callable[[nn.Module, nn.Module, Maps], Callable] | None = None


def _own_sizes(cfg) -> Sizes:
    return Sizes(
        hidden=cfg.hidden_size,
        heads=cfg.num_attention_heads,
        kv_heads=cfg.num_attention_heads,
        head_dim=cfg.head_dim,
        intermediate=cfg.intermediate_size,
        layers=cfg.num_hidden_layers,
    )


def _own_configure(cfg, tgt: Sizes, c: float) -> None:
    cfg.hidden_size, cfg.num_attention_heads = tgt.hidden, tgt.heads
    cfg.intermediate_size, cfg.num_hidden_layers = tgt.intermediate, tgt.layers
    cfg.layer_norm_eps = cfg.layer_norm_eps * c


#: Pre-LN rules shared by scaledl's own model (names of :mod:`.transformer`).
_OWN_LAYER_RULES: list[tuple[str, Rule]] = [
    (r"^ln_[12]\.weight$", Rule(norm="weight")),
    (r"^ln_[12]\.bias$", Rule(norm="bias")),
    (r"^attn\.[qkv]_proj\.weight$", Rule(out="head", inp="stream")),
    (r"^attn\.[qkv]_proj\.bias$", Rule(out="head")),
    (r"^attn\.o_proj\.weight$", Rule(out="stream", inp="head", block_output=True)),
    (r"^attn\.o_proj\.bias$", Rule(out="stream", block_output=True)),
    (r"^mlp\.fc1\.weight$", Rule(out="neuron", inp="stream")),
    (r"^mlp\.fc1\.bias$", Rule(out="neuron")),
    (r"^mlp\.fc2\.weight$", Rule(out="stream", inp="neuron", block_output=True)),
    (r"^mlp\.fc2\.bias$", Rule(out="stream", block_output=True)),
]


def _own_rules(model: nn.Module) -> RuleTable:
    tied = model.head.weight is getattr(getattr(model, "embed_tokens", None), "weight", None)
    return [
        *_OWN_LAYER_RULES,
        (r"^embed_tokens\.weight$", Rule(out="stream", out_dim=1)),
        (r"^patch_embed\.weight$", Rule(out="stream", out_dim=0)),
        (r"^(patch_embed\.bias|cls_token|pos_embed)$", Rule(out="stream", out_dim=-1)),
        (r"^norm\.weight$", Rule(norm="weight", tied_final=tied)),
        (r"^norm\.bias$", Rule(norm="bias", tied_final=tied)),
        (r"^head\.weight$", Rule(inp="stream", inp_dim=1)),
        (r"^head\.bias$", Rule()),
    ]


OWN_FAMILY = Family("PreLNTransformer", _own_sizes, _own_configure, _own_rules)


def _family_of(model: nn.Module) -> Family:
    from scaledl.expansion.transformer import PreLNTransformer

    if isinstance(model, PreLNTransformer):
        return OWN_FAMILY
    from scaledl.expansion.hf import hf_family  # imports nothing from transformers eagerly

    return hf_family(model)


def expand(
    model: nn.Module,
    *,
    hidden_size: int | None = None,
    num_layers: int | None = None,
    intermediate_size: int | None = None,
    depth_init: str = "cancel",
    seed: int = 0,
    split: str = "lemon",
    rand_scale: float = 1.0,
) -> nn.Module:
    """Return a wider and/or deeper copy of ``model`` computing the same function (LEMON).

    Supported: :class:`~scaledl.expansion.transformer.PreLNTransformer` and the Hugging Face
    families listed in :data:`scaledl.expansion.hf.SUPPORTED`. The head dimension is kept
    (heads are added); ``num_layers`` may be at most twice the source depth per call;
    ``intermediate_size`` defaults to the source's scaled with the hidden size. New layers get
    canceling random output weights (``depth_init="cancel"``) or zero outputs (``"zero"``).
    The random parts come from the target's own initialisation under ``torch.manual_seed(seed)``.
    The source model is left untouched; the result is in ``eval`` mode if the source was.
    ``rand_scale`` multiplies the random parts (smaller keeps the copies closer together);
    ``split="net2net"`` builds the symmetric naive duplication (a baseline, lossy under LN at
    indivisible widths).
    """
    if not (math.isfinite(rand_scale) and rand_scale > 0):
        raise ValueError(f"rand_scale must be a positive number, got {rand_scale}")
    if split not in ("lemon", "net2net"):
        raise ValueError(f"split must be 'lemon' or 'net2net', got {split!r}")
    if depth_init not in DEPTH_INITS:
        raise ValueError(f"depth_init must be one of {DEPTH_INITS}, got {depth_init!r}")
    fam = _family_of(model)
    src = fam.sizes(model.config)
    tgt = target_sizes(src, hidden_size, num_layers, intermediate_size)
    check_sizes(src, tgt, fam.post_ln, fam.name)
    maps = Maps(src, tgt, fam.stream_residue)
    cfg = copy.deepcopy(model.config)
    fam.configure(cfg, tgt, maps.c if split == "lemon" else 1.0)
    dtype = next(model.parameters()).dtype
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        target = type(model)(cfg)
    finally:
        torch.random.set_rng_state(state)
    target = target.to(dtype)
    override = fam.override(model, target, maps) if fam.override is not None else None
    expand_parameters(
        model, target, fam.rules(target), maps, depth_init, seed, split, rand_scale, override
    )
    if hasattr(target, "tie_weights"):
        target.tie_weights()
    target.train(model.training)
    return target


def _outputs(model: nn.Module, inputs: dict) -> dict[str, torch.Tensor]:
    out = model(**inputs)
    if isinstance(out, torch.Tensor):
        return {"logits": out}
    if getattr(out, "logits", None) is not None:
        return {"logits": out.logits}
    res = {"last_hidden_state": out.last_hidden_state}
    if getattr(out, "pooler_output", None) is not None:
        res["pooler_output"] = out.pooler_output
    return res


def _outputs_as(model: nn.Module, dtype: torch.dtype, inputs: dict) -> dict[str, torch.Tensor]:
    """Outputs in eval mode and ``dtype``; copies the model only if it must be cast."""
    if all(p.dtype == dtype for p in model.parameters()):
        was_training = model.training
        try:
            return _outputs(model.eval(), inputs)
        finally:
            model.train(was_training)
    return _outputs(copy.deepcopy(model).to(dtype).eval(), inputs)


def make_inputs(model: nn.Module, batch: int = 3, seq_len: int = 12, seed: int = 0) -> dict:
    """Random inputs for ``model``: token ids with a right-padded attention mask (and
    ``token_type_ids`` where the model has them) or images ``randn * 10 + 1.5``."""
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    image = getattr(model, "main_input_name", "input_ids") == "pixel_values" or (
        getattr(cfg, "vocab_size", 1) <= 0
    )
    if image:
        c, s = cfg.num_channels, cfg.image_size
        pixels = torch.randn(batch, c, s, s, generator=g, dtype=torch.float64) * 10 + 1.5
        key = "pixel_values" if hasattr(model, "main_input_name") else "inputs"
        return {key: pixels}
    max_pos = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", 64)
    t = min(seq_len, max_pos - 2)
    ids = torch.randint(3, cfg.vocab_size, (batch, t), generator=g)
    mask = torch.ones(batch, t, dtype=torch.long)
    for b in range(1, batch):  # right padding of growing length; row 0 stays full
        mask[b, t - min(t - 1, 2 * b) :] = 0
    key = "input_ids" if hasattr(model, "main_input_name") else "inputs"
    inputs = {key: ids, "attention_mask": mask}
    if getattr(cfg, "type_vocab_size", 0) > 1:
        inputs["token_type_ids"] = torch.randint(0, 2, (batch, t), generator=g)
    return inputs


def max_logit_diff(
    source: nn.Module,
    expanded: nn.Module,
    inputs: dict | torch.Tensor | None = None,
    dtype: torch.dtype = torch.float64,
) -> float:
    """Largest absolute output difference between ``source`` and ``expanded`` (eval mode).

    Both models are copied and cast to ``dtype``. Logits are compared directly; hidden states
    of headless models are compared copy by copy (every one of the ``k`` copies of the source
    width must match) and pooler outputs on their first ``hidden_size`` units. Positions that
    the attention mask pads are skipped (their outputs are arbitrary). ``inputs`` defaults to
    :func:`make_inputs` (padded token batches or images).
    """
    if inputs is None:
        inputs = make_inputs(source)
    if isinstance(inputs, torch.Tensor):
        inputs = {"input_ids" if hasattr(source, "main_input_name") else "inputs": inputs}
    inputs = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in inputs.items()}
    mask = inputs.get("attention_mask")
    with torch.no_grad():
        a = _outputs_as(source, dtype, inputs)
        b = _outputs_as(expanded, dtype, inputs)
    worst = 0.0
    for key, x in a.items():
        y = b[key]
        if key == "last_hidden_state":
            d = x.shape[-1]
            k = y.shape[-1] // d
            y = y[..., : k * d].unflatten(-1, (k, d))
            x = x.unsqueeze(-2)
        elif key == "pooler_output":
            y = y[..., : x.shape[-1]]
        diff = (x - y).abs()
        if mask is not None and diff.dim() >= 3 and diff.shape[:2] == mask.shape:
            diff = diff[mask.bool()]
        worst = max(worst, float(diff.max()))
    return worst
