"""LEMON rules for Hugging Face ``transformers`` models (BERT, RoBERTa-PreLayerNorm, ViT, GPT-2,
Llama / Mistral / Qwen2).

Every family is a table of (parameter-name pattern, :class:`~scaledl.expansion.lemon.Rule`)
plus how to read and write its config. Nothing here imports ``transformers``: families are
recognised by class name and targets are built with ``type(model)(config)``.
"""

from __future__ import annotations

import torch
from torch import nn

from scaledl.expansion.lemon import Family, Maps, Rule, RuleTable, Sizes, depth_plan

#: Supported model classes, by family.
SUPPORTED: dict[str, tuple[str, ...]] = {
    "bert": ("BertModel", "BertForMaskedLM", "BertForSequenceClassification"),
    "roberta-prelayernorm": (
        "RobertaPreLayerNormModel",
        "RobertaPreLayerNormForMaskedLM",
        "RobertaPreLayerNormForSequenceClassification",
    ),
    "vit": ("ViTModel", "ViTForImageClassification"),
    "gpt2": ("GPT2Model", "GPT2LMHeadModel", "GPT2ForSequenceClassification"),
    "llama": (
        "LlamaModel",
        "LlamaForCausalLM",
        "MistralModel",
        "MistralForCausalLM",
        "Qwen2Model",
        "Qwen2ForCausalLM",
    ),
}


def _linear(pattern: str, out: str | None, inp: str | None, **kw) -> list[tuple[str, Rule]]:
    """Rules for an ``nn.Linear`` (weight (out, in), bias (out,)) whose name ends in pattern."""
    return [
        (rf"(^|\.){pattern}\.weight$", Rule(out=out, out_dim=0, inp=inp, inp_dim=1, **kw)),
        (rf"(^|\.){pattern}\.bias$", Rule(out=out, out_dim=0, **kw)),
    ]


def _conv1d(pattern: str, out: str, inp: str, **kw) -> list[tuple[str, Rule]]:
    """Rules for GPT-2's ``Conv1D``, which stores its weight as (in, out)."""
    return [
        (rf"(^|\.){pattern}\.weight$", Rule(out=out, out_dim=1, inp=inp, inp_dim=0, **kw)),
        (rf"(^|\.){pattern}\.bias$", Rule(out=out, out_dim=0, **kw)),
    ]


def _norm(pattern: str, tied_final: bool = False) -> list[tuple[str, Rule]]:
    return [
        (rf"(^|\.){pattern}\.weight$", Rule(norm="weight", tied_final=tied_final)),
        (rf"(^|\.){pattern}\.bias$", Rule(norm="bias", tied_final=tied_final)),
    ]


def _embedding(pattern: str) -> list[tuple[str, Rule]]:
    return [(rf"(^|\.){pattern}\.weight$", Rule(out="stream", out_dim=1))]


def _head(pattern: str, inp: str = "stream") -> list[tuple[str, Rule]]:
    """An output head (classifier, untied LM head): fan-in split, outputs unchanged."""
    return [
        (rf"(^|\.){pattern}\.weight$", Rule(inp=inp, inp_dim=1)),
        (rf"(^|\.){pattern}\.bias$", Rule()),
    ]


def _tied(model: nn.Module) -> bool:
    get_out = getattr(model, "get_output_embeddings", None)
    out = get_out() if get_out is not None else None
    return out is not None and out.weight is model.get_input_embeddings().weight


# --------------------------------------------------------------------------- config access


def _hf_sizes(cfg) -> Sizes:
    hidden, heads = cfg.hidden_size, cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or hidden // heads
    if head_dim * heads != hidden:
        raise ValueError(
            f"head_dim * num_attention_heads = {head_dim * heads} differs from hidden_size "
            f"{hidden}; such models are not supported"
        )
    inter = getattr(cfg, "intermediate_size", None) or getattr(cfg, "n_inner", None)
    return Sizes(
        hidden=hidden,
        heads=heads,
        kv_heads=getattr(cfg, "num_key_value_heads", None) or heads,
        head_dim=head_dim,
        intermediate=inter or 4 * hidden,
        layers=cfg.num_hidden_layers,
    )


def _hf_configure(cfg, tgt: Sizes, c: float) -> None:
    plan = depth_plan(cfg.num_hidden_layers, tgt.layers)
    # Per-layer settings (sliding-window layer types) follow the layer each one copies.
    layer_types = getattr(cfg, "layer_types", None)
    if isinstance(layer_types, list) and len(layer_types) == cfg.num_hidden_layers:
        cfg.layer_types = [layer_types[s] for s, _ in plan]
    if getattr(cfg, "pooler_output_size", None) == cfg.hidden_size:
        cfg.pooler_output_size = tgt.hidden  # ViT: the pooler's copies follow the stream
    cfg.hidden_size = tgt.hidden
    cfg.num_attention_heads = tgt.heads
    cfg.num_hidden_layers = tgt.layers
    if hasattr(cfg, "n_inner"):
        cfg.n_inner = tgt.intermediate
    else:
        cfg.intermediate_size = tgt.intermediate
    if getattr(cfg, "num_key_value_heads", None) is not None:
        cfg.num_key_value_heads = tgt.kv_heads
    if getattr(cfg, "head_dim", None) is not None:
        cfg.head_dim = tgt.head_dim  # explicit: RoPE frequencies depend on it
    for key in ("layer_norm_eps", "layer_norm_epsilon", "rms_norm_eps"):
        if hasattr(cfg, key):
            setattr(cfg, key, getattr(cfg, key) * c)


# --------------------------------------------------------------------------- rule tables

_ATTN_BERT = [
    *_linear(r"attention\.self\.(query|key|value)", "head", "stream"),
    *_linear(r"attention\.output\.dense", "stream", "head", block_output=True),
    *_linear(r"intermediate\.dense", "neuron", "stream"),
    *_linear(r"output\.dense", "stream", "neuron", block_output=True),
]
_EMB_BERT = _embedding(r"embeddings\.(word|position|token_type)_embeddings")


def _bert_rules(model: nn.Module) -> RuleTable:
    return [
        *_ATTN_BERT,
        *_norm(r"(attention\.output\.|output\.|embeddings\.)LayerNorm"),
        *_EMB_BERT,
        *_linear(r"pooler\.dense", "pool", "stream"),
        *_linear(r"cls\.predictions\.transform\.dense", "stream", "stream"),
        *_norm(r"cls\.predictions\.transform\.LayerNorm", tied_final=_tied(model)),
        *_head(r"cls\.predictions\.decoder"),
        (r"^cls\.predictions\.bias$", Rule()),
        *_head(r"classifier", inp="pool"),
    ]


def _bert_override(source: nn.Module, target: nn.Module, maps: Maps):
    """Post-LN depth by the identity-LayerNorm rule: a copied layer followed by a new one gets
    an identity output LayerNorm; the new layer gets an identity attention LayerNorm and keeps
    the copied layer's output LayerNorm, so LN(norm(norm(v))) ~= LN(v) (to O(eps/var))."""
    plan = maps.plan

    def override(name, rule, t, s, is_new, value):
        if rule.norm is None or t < 0:
            return value
        followed = t + 1 < len(plan) and plan[t + 1][1]
        is_out_ln = ".output.LayerNorm." in name and ".attention." not in name
        is_attn_ln = ".attention.output.LayerNorm." in name
        if (followed and is_out_ln) or (is_new and is_attn_ln):
            return torch.ones_like(value) if rule.norm == "weight" else torch.zeros_like(value)
        return value

    return override


def _roberta_pre_rules(model: nn.Module) -> RuleTable:
    return [
        *_ATTN_BERT,
        *_norm(r"(attention\.|intermediate\.|embeddings\.|^roberta_prelayernorm\.|^)LayerNorm"),
        *_EMB_BERT,
        *_linear(r"pooler\.dense", "pool", "stream"),
        *_linear(r"lm_head\.dense", "stream", "stream"),
        *_norm(r"lm_head\.layer_norm", tied_final=_tied(model)),
        *_head(r"lm_head\.decoder"),
        (r"^lm_head\.bias$", Rule()),
        *_linear(r"classifier\.dense", "pool", "stream"),
        *_head(r"classifier\.out_proj", inp="pool"),
    ]


def _vit_rules(model: nn.Module) -> RuleTable:
    # Both the current (q_proj, mlp.fc1) and the older (attention.attention.query,
    # intermediate.dense) ViT parameter names.
    return [
        *_norm(r"layernorm_(before|after)"),
        *_linear(r"attention\.([qkv]_proj|attention\.(query|key|value))", "head", "stream"),
        *_linear(r"attention\.(o_proj|output\.dense)", "stream", "head", block_output=True),
        *_linear(r"(mlp\.fc1|intermediate\.dense)", "neuron", "stream"),
        *_linear(r"(mlp\.fc2|output\.dense)", "stream", "neuron", block_output=True),
        (r"embeddings\.(cls_token|position_embeddings|mask_token)$", Rule("stream", -1)),
        (r"patch_embeddings\.projection\.(weight|bias)$", Rule("stream", 0)),
        *_norm(r"layernorm"),
        *_linear(r"pooler\.dense", "pool", "stream"),
        *_head(r"classifier"),
    ]


def _gpt2_rules(model: nn.Module) -> RuleTable:
    return [
        *_norm(r"ln_[12]"),
        *_conv1d(r"attn\.c_attn", "qkv", "stream"),
        *_conv1d(r"attn\.c_proj", "stream", "head", block_output=True),
        *_conv1d(r"mlp\.c_fc", "neuron", "stream"),
        *_conv1d(r"mlp\.c_proj", "stream", "neuron", block_output=True),
        *_embedding(r"w[tp]e"),
        *_norm(r"ln_f", tied_final=_tied(model)),
        *_head(r"(lm_head|score)"),
    ]


def _gpt2_override(source: nn.Module, target: nn.Module, maps: Maps):
    """With ``scale_attn_by_inverse_layer_idx`` scores are divided by ``layer_idx + 1``: scale
    the queries of a layer moved from position s to t by (t + 1) / (s + 1)."""
    if not getattr(target.config, "scale_attn_by_inverse_layer_idx", False):
        return None
    width = maps.tgt.hidden

    def override(name, rule, t, s, is_new, value):
        if t < 0 or rule.out != "qkv":
            return value
        value = value.clone()
        value[..., :width] *= (t + 1) / (s + 1)
        return value

    return override


def _llama_rules(model: nn.Module) -> RuleTable:
    return [
        *_norm(r"(input_layernorm|post_attention_layernorm)"),
        *_linear(r"self_attn\.q_proj", "head", "stream"),
        *_linear(r"self_attn\.[kv]_proj", "kv", "stream"),
        *_linear(r"self_attn\.o_proj", "stream", "head", block_output=True),
        *_linear(r"mlp\.(gate|up)_proj", "neuron", "stream"),
        *_linear(r"mlp\.down_proj", "stream", "neuron", block_output=True),
        *_embedding(r"embed_tokens"),
        *_norm(r"norm", tied_final=_tied(model)),
        *_head(r"lm_head"),
    ]


FAMILIES: dict[str, Family] = {
    "bert": Family(
        "BERT (Post-LN)",
        _hf_sizes,
        _hf_configure,
        _bert_rules,
        post_ln=True,
        override=_bert_override,
    ),
    "roberta-prelayernorm": Family(
        "RoBERTa-PreLayerNorm (embedding LayerNorm)",
        _hf_sizes,
        _hf_configure,
        _roberta_pre_rules,
        post_ln=True,
    ),
    "vit": Family("ViT", _hf_sizes, _hf_configure, _vit_rules),
    "gpt2": Family("GPT-2", _hf_sizes, _hf_configure, _gpt2_rules, override=_gpt2_override),
    # RMSNorm: mean squares scale by c only if the stream's residues are zero.
    "llama": Family("Llama-style", _hf_sizes, _hf_configure, _llama_rules, stream_residue="zero"),
}


def supported_classes() -> list[str]:
    return ["PreLNTransformer"] + [c for classes in SUPPORTED.values() for c in classes]


def hf_family(model: nn.Module) -> Family:
    """The family of a Hugging Face model, or a ``ValueError`` naming the supported classes."""
    name = type(model).__name__
    for family, classes in SUPPORTED.items():
        if name in classes:
            return FAMILIES[family]
    raise ValueError(
        f"unsupported model class {name}; LEMON expansion supports {', '.join(supported_classes())}"
    )
