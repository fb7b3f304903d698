"""Run a placed model across devices: :class:`PlacedModule` (spec §2.9).

The traced ``fx`` graph is executed node by node in the plan's launch order (a stable
topological order keyed by simulated start), with each module and its parameters moved to its
device. A producer's output is copied **once per destination device** and that copy is shared by
every consumer there. On CUDA each copy runs on a side stream per (source, destination) pair:
the side stream waits for the producer's stream, the source tensor is marked with
``record_stream`` (so the allocator does not reuse it early) and the consumer's stream waits for
the copy just before its first use; no host synchronisation. Copies are differentiable, so
``loss.backward()`` mirrors every transfer and runs each op's backward on its forward device.

On a machine without several GPUs, logical devices may all map to ``cpu``: the execution,
the copy bookkeeping and the numerics are the same.
"""

from __future__ import annotations

import contextlib
import heapq
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import fx, nn
from torch.utils._pytree import tree_map

from scaledl.placement.trace import symbolic_trace


def default_devices(n: int) -> list[torch.device]:
    """``cuda:0 .. cuda:n-1`` when that many GPUs exist, else ``n`` logical CPU devices."""
    if torch.cuda.is_available() and torch.cuda.device_count() >= n:
        return [torch.device("cuda", i) for i in range(n)]
    return [torch.device("cpu")] * n


class PlacedModule(nn.Module):
    """A model whose fx nodes run on the devices of a placement.

    ``placement`` is a :class:`~scaledl.placement.pipeline.Plan` (from ``place``) or a
    mapping fx node name -> logical device index. The model's modules are moved in place (as
    ``model.to`` would), so pass a copy if the original must stay where it is.
    """

    def __init__(
        self,
        model: nn.Module,
        placement: Any,
        devices: Sequence[torch.device | str] | None = None,
        *,
        leaf_modules: Sequence[type] = (),
        order: Sequence[str] | None = None,
        output_device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if hasattr(placement, "fx_placement"):
            if placement.traced is not None:
                leaf_modules = tuple(leaf_modules) + placement.traced.info.get("leaf_modules", ())
            mapping = placement.fx_placement()
            order = order or placement.fx_order()
        else:
            mapping = placement_from_mapping(placement)
        # Re-trace ``model`` itself (fx names are deterministic), so a copy of the planned model
        # is placed rather than the planned instance.
        self.gm = gm = symbolic_trace(model, leaf_modules)
        nodes = [n for n in gm.graph.nodes if n.op != "output"]
        missing = [n.name for n in nodes if n.name not in mapping]
        if missing:
            raise ValueError(f"placement has no device for fx node {missing[0]!r}")
        n_logical = max(mapping.values()) + 1
        self.devices = [torch.device(d) for d in (devices or default_devices(n_logical))]
        if n_logical > len(self.devices):
            raise ValueError(
                f"placement uses {n_logical} devices but only {len(self.devices)} were given"
            )
        self.device_of = {n.name: int(mapping[n.name]) for n in nodes}
        self.output_device = torch.device(output_device) if output_device else None
        self.order = self._launch_order(nodes, order)
        self._move_parameters(nodes)
        self._streams: dict[tuple[int, int], Any] = {}
        #: Copies (and their bytes) of the last forward, between logical devices.
        self.copies = 0
        self.copy_bytes = 0

    # -- set-up -------------------------------------------------------------------------------
    def _launch_order(self, nodes: list[fx.Node], order: Sequence[str] | None) -> list[fx.Node]:
        """Stable topological order keyed by the position in ``order`` (else fx order)."""
        pos = {name: i for i, name in enumerate(order or [])}
        fx_pos = {n: i for i, n in enumerate(nodes)}
        indeg = {n: len(set(n.all_input_nodes)) for n in nodes}
        key = {n: (pos.get(n.name, len(pos) + fx_pos[n]), fx_pos[n]) for n in nodes}
        heap = [(key[n], fx_pos[n], n.name) for n in nodes if indeg[n] == 0]
        by_name = {n.name: n for n in nodes}
        heapq.heapify(heap)
        out = []
        while heap:
            _, _, name = heapq.heappop(heap)
            n = by_name[name]
            out.append(n)
            for user in n.users:
                if user in indeg:
                    indeg[user] -= 1
                    if indeg[user] == 0:
                        heapq.heappush(heap, (key[user], fx_pos[user], user.name))
        return out

    def _move_parameters(self, nodes: list[fx.Node]) -> None:
        modules = dict(self.gm.named_modules())
        placed: dict[str, int] = {}
        for n in nodes:
            d = self.device_of[n.name]
            if n.op == "call_module" or n.op == "get_attr":
                target = n.target
            else:
                continue
            if target in placed and placed[target] != d:
                raise ValueError(
                    f"{target!r} is used by nodes on devices {placed[target]} and {d}: "
                    "tied weights must be colocated"
                )
            placed[target] = d
            dev = self.devices[d]
            if n.op == "call_module":
                modules[target].to(dev)
            else:
                owner_path, _, attr = target.rpartition(".")
                owner = modules[owner_path] if owner_path else self.gm
                t = getattr(owner, attr)
                if isinstance(t, torch.Tensor) and t.device != dev:
                    t.data = t.data.to(dev)

    def param_groups_by_device(self) -> list[dict[str, Any]]:
        """Optimizer parameter groups, one per device (spec §2.9 step 7)."""
        groups: dict[torch.device, list[nn.Parameter]] = {}
        for p in self.gm.parameters():
            groups.setdefault(p.device, []).append(p)
        return [{"params": ps, "device": str(d)} for d, ps in groups.items()]

    # -- execution ----------------------------------------------------------------------------
    def _copy(self, t: torch.Tensor, d: int) -> torch.Tensor:
        dst = self.devices[d]
        self.copies += 1
        self.copy_bytes += t.numel() * t.element_size()
        if t.device == dst:  # two logical devices on one physical device
            return t
        if dst.type != "cuda" or t.device.type != "cuda":
            return t.to(dst)
        key = (t.device.index, dst.index)
        if key not in self._streams:
            self._streams[key] = (
                torch.cuda.Stream(device=t.device),
                torch.cuda.Stream(device=dst),
            )
        s_src, s_dst = self._streams[key]
        s_src.wait_stream(torch.cuda.current_stream(t.device))
        with torch.cuda.stream(s_src), torch.cuda.stream(s_dst):
            y = t.to(dst, non_blocking=True)
        t.record_stream(s_src)
        consumer = torch.cuda.current_stream(dst)
        consumer.wait_stream(s_dst)
        y.record_stream(consumer)
        return y

    def forward(self, *inputs: Any) -> Any:
        env: dict[str, Any] = {}
        copies: dict[tuple[str, int], Any] = {}
        self.copies = self.copy_bytes = 0
        placeholders = iter(inputs)
        modules = dict(self.gm.named_modules())

        def fetch(node: fx.Node, d: int) -> Any:
            if self.device_of[node.name] == d:
                return env[node.name]
            key = (node.name, d)
            if key not in copies:  # one copy per (tensor, destination device)
                copies[key] = tree_map(
                    lambda t: self._copy(t, d) if isinstance(t, torch.Tensor) else t,
                    env[node.name],
                )
            return copies[key]

        for node in self.order:
            d = self.device_of[node.name]
            if node.op == "placeholder":  # inputs start on their node's device
                env[node.name] = tree_map(
                    lambda t, d=d: t.to(self.devices[d]) if isinstance(t, torch.Tensor) else t,
                    next(placeholders),
                )
                continue
            args = fx.node.map_arg(node.args, lambda a, d=d: fetch(a, d))
            kwargs = fx.node.map_arg(node.kwargs, lambda a, d=d: fetch(a, d))
            dev = self.devices[d]
            with torch.cuda.device(dev) if dev.type == "cuda" else contextlib.nullcontext():
                if node.op == "call_module":
                    out = modules[node.target](*args, **kwargs)
                elif node.op == "call_function":
                    out = node.target(*args, **kwargs)
                elif node.op == "call_method":
                    out = getattr(args[0], node.target)(*args[1:], **kwargs)
                else:  # get_attr
                    owner_path, _, attr = node.target.rpartition(".")
                    out = getattr(modules[owner_path] if owner_path else self.gm, attr)
            env[node.name] = out
        output = next(n for n in self.gm.graph.nodes if n.op == "output")
        result = fx.node.map_arg(output.args[0], lambda a: env[a.name])
        if self.output_device is not None:
            result = tree_map(
                lambda t: t.to(self.output_device) if isinstance(t, torch.Tensor) else t, result
            )
        return result


def placement_from_mapping(mapping: Mapping[str, int]) -> dict[str, int]:
    """Validate a user placement mapping (non-negative integer devices)."""
    bad = {k: v for k, v in mapping.items() if not isinstance(v, int) or v < 0}
    if bad:
        k = next(iter(bad))
        raise ValueError(f"device of fx node {k!r} must be an int >= 0, got {bad[k]!r}")
    return dict(mapping)
