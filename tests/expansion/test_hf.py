"""LEMON on Hugging Face models: BERT, RoBERTa-PreLayerNorm, ViT, GPT-2, Llama/Mistral/Qwen2."""

from __future__ import annotations

import dataclasses

import pytest
import torch

transformers = pytest.importorskip("transformers")

from scaledl.expansion import (  # noqa: E402
    expand,
    lemon,
    max_logit_diff,
)
from scaledl.expansion import hf as hf_rules  # noqa: E402

FP64_TOL, FP32_TOL = 1e-9, 1e-4
SMALL = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=48)


def perturbed(cls, config, seed: int = 0):
    """Random model with non-default norm weights, norm biases and biases, float64, eval."""
    torch.manual_seed(seed)
    model = cls(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            module = name.rsplit(".", 2)[-2].lower()  # e.g. "layernorm", "ln_f", "norm"
            if ("norm" in module or module.startswith("ln_")) and name.endswith("weight"):
                p.copy_(1 + 0.3 * torch.randn_like(p))
            else:  # biases well away from zero; matrices keep their init scale
                p.add_((0.1 if p.ndim == 1 else 0.02) * torch.randn_like(p))
    return model.double().eval()


@pytest.fixture
def exact_rmsnorm(monkeypatch):
    """HF's RMSNorm computes in float32 even for float64 inputs; for the float64 exactness check
    use the same formula in the input's precision (the float32 check keeps the stock layer)."""
    from transformers.models.llama import modeling_llama
    from transformers.models.mistral import modeling_mistral
    from transformers.models.qwen2 import modeling_qwen2

    def forward(self, h):
        return self.weight * (
            h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        )

    for mod, name in [
        (modeling_llama, "LlamaRMSNorm"),
        (modeling_mistral, "MistralRMSNorm"),
        (modeling_qwen2, "Qwen2RMSNorm"),
    ]:
        monkeypatch.setattr(getattr(mod, name), "forward", forward)


def bert_cfg(**kw):
    return transformers.BertConfig(
        vocab_size=60, max_position_embeddings=24, attn_implementation="eager", **SMALL, **kw
    )


def llama_cfg(cls_name: str, **kw):
    cfg_cls = getattr(transformers, cls_name.replace("ForCausalLM", "Config"))
    return cfg_cls(
        vocab_size=60,
        num_key_value_heads=2,
        max_position_embeddings=64,
        attn_implementation="eager",
        **SMALL,
        **kw,
    )


def vit_cfg(**kw):
    return transformers.ViTConfig(
        image_size=16, patch_size=8, attn_implementation="eager", **SMALL, **kw
    )


def gpt2_cfg(**kw):
    base = dict(vocab_size=60, n_embd=32, n_layer=3, n_head=4, n_positions=24)
    return transformers.GPT2Config(**{**base, **kw})


CASES = {
    "bert-mlm": (transformers.BertForMaskedLM, bert_cfg, [(64, 6)]),
    "bert-base": (transformers.BertModel, bert_cfg, [(64, 5)]),
    "bert-seqcls": (
        transformers.BertForSequenceClassification,
        lambda: bert_cfg(num_labels=3),
        [(96, 3)],
    ),
    "roberta-preln": (
        transformers.RobertaPreLayerNormForMaskedLM,
        lambda: transformers.RobertaPreLayerNormConfig(
            vocab_size=60, max_position_embeddings=30, attn_implementation="eager", **SMALL
        ),
        [(64, 6)],
    ),
    "vit-cls": (
        transformers.ViTForImageClassification,
        lambda: vit_cfg(num_labels=4),
        [(64, 6), (40, 5)],
    ),
    "vit-base": (transformers.ViTModel, vit_cfg, [(56, 4)]),
    "gpt2-lm": (
        transformers.GPT2LMHeadModel,
        lambda: gpt2_cfg(attn_implementation="eager"),
        [(64, 6), (40, 4)],
    ),
    "gpt2-base": (transformers.GPT2Model, gpt2_cfg, [(48, 5)]),
    "gpt2-inverse-idx": (
        transformers.GPT2LMHeadModel,
        lambda: gpt2_cfg(scale_attn_by_inverse_layer_idx=True, attn_implementation="eager"),
        [(48, 6)],
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_layernorm_families_are_exact(case):
    cls, make_cfg, targets = CASES[case]
    src = perturbed(cls, make_cfg())
    for hidden, layers in targets:
        tgt = expand(src, hidden_size=hidden, num_layers=layers)
        assert type(tgt) is cls
        assert tgt.config.hidden_size == hidden and tgt.config.num_hidden_layers == layers
        d64 = max_logit_diff(src, tgt, dtype=torch.float64)
        d32 = max_logit_diff(src, tgt, dtype=torch.float32)
        assert d64 <= FP64_TOL and d32 <= FP32_TOL, (case, hidden, layers, d64, d32)


@pytest.mark.parametrize("cls_name", ["LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"])
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_gqa_decoders_4q2kv_to_6q3kv(cls_name, tied, exact_rmsnorm):
    cls = getattr(transformers, cls_name)
    src = perturbed(cls, llama_cfg(cls_name, tie_word_embeddings=tied))
    tgt = expand(src, hidden_size=48, num_layers=5)  # 4q/2kv -> 6q/3kv, indivisible width
    assert tgt.config.num_attention_heads == 6 and tgt.config.num_key_value_heads == 3
    assert max_logit_diff(src, tgt, dtype=torch.float64) <= FP64_TOL
    assert max_logit_diff(src, tgt, dtype=torch.float32) <= FP32_TOL
    tgt2 = expand(src, hidden_size=64, num_layers=6)  # divisible, 2x depth
    assert max_logit_diff(src, tgt2, dtype=torch.float64) <= FP64_TOL


def test_stock_rmsnorm_float32_precision_and_generate():
    """With HF's own (float32-internal) RMSNorm the difference is at float32 rounding, and
    greedy generation with the KV cache gives the same tokens."""
    src = perturbed(transformers.Qwen2ForCausalLM, llama_cfg("Qwen2ForCausalLM"))
    tgt = expand(src, hidden_size=48, num_layers=4)
    assert max_logit_diff(src, tgt, dtype=torch.float64) <= 1e-5
    ids = torch.randint(3, 60, (2, 5))
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(src.generate(ids, **kw), tgt.generate(ids, **kw))


def test_negative_controls_gqa_and_rmsnorm(monkeypatch, exact_rmsnorm):
    src = perturbed(transformers.Qwen2ForCausalLM, llama_cfg("Qwen2ForCausalLM"))
    assert max_logit_diff(src, expand(src, hidden_size=48)) <= FP64_TOL
    # Average residues (right for LayerNorm) break RMSNorm's mean square.
    fam = hf_rules.FAMILIES["llama"]
    monkeypatch.setitem(hf_rules.FAMILIES, "llama", dataclasses.replace(fam, stream_residue="avg"))
    assert max_logit_diff(src, expand(src, hidden_size=48)) > 1e-2
    monkeypatch.setitem(hf_rules.FAMILIES, "llama", fam)
    # Tiling only the query heads (key-value heads fixed) breaks the query-group pairing.
    sizes = lemon.target_sizes
    monkeypatch.setattr(
        lemon,
        "target_sizes",
        lambda s, *a: dataclasses.replace(sizes(s, *a), kv_heads=s.kv_heads),
    )
    q_only = expand(src, hidden_size=48)
    assert q_only.config.num_key_value_heads == 2
    assert max_logit_diff(src, q_only) > 1e-2


def test_tied_save_and_reload(tmp_path):
    src = perturbed(
        transformers.GPT2LMHeadModel,
        gpt2_cfg(n_layer=2),
    )
    tgt = expand(src, hidden_size=56, num_layers=3)
    assert tgt.lm_head.weight is tgt.transformer.wte.weight
    tgt.save_pretrained(tmp_path)
    back = transformers.GPT2LMHeadModel.from_pretrained(tmp_path, dtype=torch.float64).eval()
    assert back.config.layer_norm_epsilon == pytest.approx(tgt.config.layer_norm_epsilon)
    assert max_logit_diff(src, back) <= FP64_TOL


def test_post_ln_and_hf_errors():
    bert = perturbed(transformers.BertForMaskedLM, bert_cfg())
    with pytest.raises(ValueError, match="not a multiple of 32"):
        expand(bert, hidden_size=40)
    with pytest.raises(ValueError, match="more than 2x"):
        expand(bert, num_layers=7)
    qwen = perturbed(transformers.Qwen2ForCausalLM, llama_cfg("Qwen2ForCausalLM"))
    with pytest.raises(ValueError, match="query heads per key-value head"):
        expand(qwen, hidden_size=40)  # 5 heads cannot keep groups of 2
    t5 = transformers.T5EncoderModel(
        transformers.T5Config(vocab_size=20, d_model=16, d_ff=32, num_layers=1, num_heads=2)
    )
    with pytest.raises(ValueError, match=r"unsupported model class T5EncoderModel.*BertModel"):
        expand(t5, hidden_size=32)


def test_importing_expansion_does_not_import_transformers():
    import subprocess
    import sys

    code = "import sys, scaledl.expansion; print('transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
