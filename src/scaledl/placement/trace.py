"""Capture a model as an operator graph with ``torch.fx``: shapes, bytes, parameters, costs.

:func:`trace` symbolically traces the model (standard ``torch.nn`` layers and the classes in
``leaf_modules`` stay whole, as the "basic blocks" of spec §2.9), then runs every node once
on the example inputs (real or ``meta`` tensors) to record per node: output bytes, activation
bytes saved for backward (via saved-tensor hooks, parameters excluded), parameter bytes, and
forward/backward FLOPs (``FlopCounterMode``). Times come from a :class:`Roofline` (CPU-only
planning) or, with ``profile=True`` on a GPU, from CUDA-event measurements of each node's
forward and backward (warm-up, median). Nodes that read the same parameter (tied weights)
share a colocation group.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn
from torch.utils._pytree import tree_flatten, tree_map

from scaledl.placement.cost_model import Roofline, measure_seconds
from scaledl.placement.graph import OpGraph, OpSpec, forward_graph, training_graph


@dataclass
class TracedModel:
    """A traced model: the ``fx.GraphModule`` and one :class:`OpSpec` per placeable node."""

    module: fx.GraphModule
    specs: list[OpSpec]
    training: bool = True
    optimizer_state_factor: float = 2.0
    backward_factor: float = 2.0
    info: dict[str, Any] = field(default_factory=dict)

    def op_graph(self) -> OpGraph:
        """The graph to place: a training step (forward, backward, optimizer) or inference."""
        if self.training:
            return training_graph(
                self.specs,
                optimizer_state_factor=self.optimizer_state_factor,
                backward_factor=self.backward_factor,
            )
        return forward_graph(self.specs)

    @staticmethod
    def fx_name(graph_node: str) -> str:
        """The fx node behind a graph node name (``fwd:``/``bwd:``/``opt:`` prefixes stripped)."""
        return (
            graph_node.split(":", 1)[1]
            if graph_node[:4] in ("fwd:", "bwd:", "opt:")
            else graph_node
        )


class _Tracer(fx.Tracer):
    """An fx tracer with extra leaf classes that tags errors with the module being traced."""

    def __init__(self, leaves: tuple[type, ...]) -> None:
        super().__init__()
        self.leaves = leaves

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, self.leaves) or super().is_leaf_module(m, qualname)

    def call_module(self, m, forward, args, kwargs):
        path = self.path_of_module(m)
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception as exc:
            # The innermost module being traced is the one to blame.
            if not hasattr(exc, "scaledl_module"):
                exc.scaledl_module = (path, m)
            raise


def symbolic_trace(model: nn.Module, leaf_modules: Sequence[type] = ()) -> fx.GraphModule:
    """``torch.fx`` capture; a construct fx cannot trace names the module it came from."""
    tracer = _Tracer(tuple(leaf_modules))
    try:
        graph = tracer.trace(model)
    except Exception as exc:  # fx raises TraceError, TypeError, RuntimeError, ...
        path, mod = getattr(exc, "scaledl_module", ("<root>", model))
        raise ValueError(
            f"cannot trace module {path!r} ({type(mod).__name__}): {exc}. Pass its class in "
            f"leaf_modules to keep it whole, or remove data-dependent control flow"
        ) from exc
    return fx.GraphModule(tracer.root, graph, type(model).__name__)


def _nbytes(value: Any) -> int:
    leaves, _ = tree_flatten(value)
    return sum(t.numel() * t.element_size() for t in leaves if isinstance(t, torch.Tensor))


def _tensors(value: Any) -> list[torch.Tensor]:
    leaves, _ = tree_flatten(value)
    return [t for t in leaves if isinstance(t, torch.Tensor)]


def _fresh(value: Any) -> Any:
    """Detached leaf copies, so each node's autograd graph and saved tensors are its own."""

    def leaf(t):
        if not isinstance(t, torch.Tensor):
            return t
        d = t.detach()
        return d.requires_grad_(t.requires_grad) if d.is_floating_point() else d

    return tree_map(leaf, value)


def trace(
    model: nn.Module,
    example_inputs: Sequence[Any] | torch.Tensor,
    *,
    leaf_modules: Sequence[type] = (),
    training: bool = True,
    roofline: Roofline | None = None,
    profile: bool = False,
    optimizer_state_factor: float = 2.0,
    backward_factor: float = 2.0,
    repeats: int = 5,
) -> TracedModel:
    """Trace ``model`` on ``example_inputs`` into placeable op specs.

    ``profile=True`` measures each node's forward and backward time on the device of the model
    (CUDA events on a GPU, a clock on CPU; warm-up, median over ``repeats``); otherwise times
    come from ``roofline`` (default: CPU-class figures; when profiling, a roofline calibrated on
    the device prices the optimizer steps). Parameters may live on the ``meta`` device (shapes
    only) to plan models too big for this host.
    """
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    example_inputs = tuple(example_inputs)
    gm = symbolic_trace(model, leaf_modules)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != len(example_inputs):
        raise ValueError(
            f"{type(model).__name__}.forward takes {len(placeholders)} inputs, "
            f"got {len(example_inputs)} example inputs"
        )
    modules = dict(gm.named_modules())
    # Running the nodes updates buffers such as BatchNorm statistics: restore them afterwards.
    buffers = [(b, b.detach().clone()) for b in model.buffers() if b.device.type != "meta"]
    owner: dict[int, str] = {}  # parameter id -> first node using it
    trainable_params: list[torch.Tensor] = []
    group_of: dict[str, str] = {}
    env: dict[str, Any] = {}
    specs: list[OpSpec] = []
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    measure = profile
    if roofline is None:
        # Optimizer steps are not profiled per node: a measured roofline of the device prices them.
        roofline = Roofline.calibrate(str(device)) if measure else Roofline()
    inputs = iter(example_inputs)
    for node in gm.graph.nodes:
        if node.op == "output":
            continue
        preds = list(dict.fromkeys(a.name for a in node.all_input_nodes))
        params: list[torch.Tensor] = []
        attr: Any = None
        if node.op == "call_module":
            params = list(modules[node.target].parameters()) + list(modules[node.target].buffers())
        elif node.op == "get_attr":
            attr = gm
            for part in node.target.split("."):
                attr = getattr(attr, part)
            params = [attr] if isinstance(attr, torch.Tensor) else []
        new = [p for p in params if id(p) not in owner]
        tied = {owner[id(p)] for p in params if id(p) in owner}
        for p in new:
            owner[id(p)] = node.name
        if tied:
            root = group_of.get(min(tied), f"tied:{min(tied)}")
            for t in tied:
                group_of[t] = root
            group_of[node.name] = root
        args = _fresh(tree_map(lambda a: env[a.name] if isinstance(a, fx.Node) else a, node.args))
        kwargs = _fresh(
            tree_map(lambda a: env[a.name] if isinstance(a, fx.Node) else a, node.kwargs)
        )

        def run(node=node, args=args, kwargs=kwargs, attr=attr):
            if node.op == "placeholder":
                return next(inputs)
            if node.op == "get_attr":
                return attr
            if node.op == "call_module":
                return modules[node.target](*args, **kwargs)
            if node.op == "call_method":
                return getattr(args[0], node.target)(*args[1:], **kwargs)
            return node.target(*args, **kwargs)

        saved: dict[int, int] = {}
        param_ids = {id(p) for p in params}

        def pack(t, saved=saved, param_ids=param_ids):
            base = t._base if t._base is not None else t
            if (
                id(t) not in param_ids
                and id(base) not in param_ids
                and not (base.is_leaf and base.requires_grad)
            ):
                saved[id(t)] = t.numel() * t.element_size()
            return t

        from torch.utils.flop_counter import FlopCounterMode

        with (
            torch.set_grad_enabled(training),
            torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t),
            FlopCounterMode(display=False) as fc,
        ):
            out = run()
        fwd_flops = fc.get_total_flops()
        outs = [t for t in _tensors(out) if t.requires_grad]
        targets = [t for t in _tensors((args, kwargs)) if t.requires_grad] + [
            p for p in params if p.requires_grad
        ]
        needs_bwd = training and bool(outs) and bool(targets)
        bwd_flops = 0
        grads = [torch.ones_like(t) for t in outs]
        if needs_bwd:
            with FlopCounterMode(display=False) as fc:
                torch.autograd.grad(outs, targets, grads, retain_graph=True, allow_unused=True)
            bwd_flops = fc.get_total_flops()
        in_bytes = _nbytes((args, kwargs))
        out_bytes = _nbytes(out)
        p_bytes = sum(p.numel() * p.element_size() for p in new)
        trainable = sum(p.numel() * p.element_size() for p in new if p.requires_grad)
        fwd_s = roofline(fwd_flops, in_bytes + out_bytes + p_bytes)
        bwd_s = roofline(bwd_flops, 2 * (in_bytes + out_bytes + p_bytes)) if needs_bwd else None
        if measure and node.op != "placeholder":
            fwd_s = measure_seconds(run, device=device, repeats=repeats)
            if needs_bwd:
                bwd_s = measure_seconds(
                    lambda outs=outs, targets=targets, grads=grads: torch.autograd.grad(
                        outs, targets, grads, retain_graph=True, allow_unused=True
                    ),
                    device=device,
                    repeats=repeats,
                )
        env[node.name] = out
        opt_s = roofline(10 * trainable // 4, 7 * trainable) if trainable else 0.0
        trainable_params += [p for p in new if p.requires_grad]
        specs.append(
            OpSpec(
                name=node.name,
                inputs=preds,
                forward_s=fwd_s if node.op != "placeholder" else 0.0,
                backward_s=bwd_s,
                # An Adam step reads the parameter, its gradient and two states, writes three.
                optimizer_s=opt_s,
                param_bytes=p_bytes,
                trainable_bytes=trainable,
                out_bytes=out_bytes,
                saved_bytes=sum(saved.values()) if training else 0,
                needs_backward=training and bool(outs),
                module=node.target if node.op == "call_module" else _target_name(node),
            )
        )
    with torch.no_grad():
        for b, value in buffers:
            b.copy_(value)
    if measure and trainable_params:
        # One (foreach) Adam step over all parameters, as in training, shared out by bytes.
        total = _measure_adam(trainable_params, device, repeats)
        nbytes = sum(s.trainable_bytes for s in specs)
        for s in specs:
            s.optimizer_s = total * s.trainable_bytes / nbytes
    for s in specs:
        s.group = group_of.get(s.name)
    return TracedModel(
        gm,
        specs,
        training=training,
        optimizer_state_factor=optimizer_state_factor,
        backward_factor=backward_factor,
        info={"profiled": measure, "fx_nodes": len(specs), "leaf_modules": tuple(leaf_modules)},
    )


def _measure_adam(params: list[torch.Tensor], device, repeats: int) -> float:
    """Time of an Adam step over ``params`` (lr 0, zero gradients: the values do not change)."""
    old = [p.grad for p in params]
    for p in params:
        p.grad = torch.zeros_like(p)
    try:
        opt = torch.optim.Adam(params, lr=0.0)
        return measure_seconds(opt.step, device=device, repeats=repeats)
    finally:
        for p, g in zip(params, old):
            p.grad = g


def _target_name(node: fx.Node) -> str:
    t: Callable | str = node.target
    return t if isinstance(t, str) else getattr(t, "__name__", str(t))
