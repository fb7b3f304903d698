"""LEMON: lossless expansion of pre-trained Transformers (arXiv 2310.07999).

``expand(model, hidden_size=..., num_layers=...)`` returns a wider and/or deeper model of the
same class that computes the same function; ``lemon_schedule`` is the learning-rate schedule to
train it with; ``max_logit_diff`` measures how exact an expansion is. Importing this package
does not import ``transformers``.
"""

from scaledl.expansion.lemon import (
    count_parameters,
    depth_plan,
    expand,
    lemon_schedule,
    make_inputs,
    max_logit_diff,
)
from scaledl.expansion.transformer import PreLNTransformer, TransformerConfig

__all__ = [
    "PreLNTransformer",
    "TransformerConfig",
    "count_parameters",
    "depth_plan",
    "expand",
    "lemon_schedule",
    "make_inputs",
    "max_logit_diff",
]
