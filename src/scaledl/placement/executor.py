"""Run a placed model across devices: :class:`PlacedModule` (spec §2.9).

The traced ``fx`` graph is compiled once into flat launch records (resolved module or
function, argument slots, device) in the plan's launch order (a stable topological order keyed
by simulated start), with each module and its parameters moved to its device; ``forward`` then
does no per-node fx work and switches the CUDA device only when it changes.

A producer's output is copied **once per destination device**, **right after the producer is
launched**, and that copy is shared by every consumer there. On CUDA each copy runs on a side
stream per (source, destination) pair: the side stream waits for the producer's stream (so for
the producer and what was launched before it, as the simulator assumes; a copy issued at first
use would also wait for everything launched on the source device in between), the source
tensor is marked with ``record_stream`` and an event is recorded after the copy; the consumer's
stream waits for that event just before the first use. No host synchronisation. Copies are
differentiable, so ``loss.backward()`` mirrors every transfer and runs each op's backward on
its forward device.

Every tensor sent to another GPU is made dense first (:func:`dense_for_copy`) on the copy
stream; with ``grad_copies="autograd"`` a hook densifies the gradient autograd sends back.
The gradient of one input of a channel ``torch.cat`` is a strided slice, and PyTorch copies a
strided tensor between GPUs with an elementwise kernel on the sending GPU's SMs writing over
the peer link, not with the copy engines' ``cudaMemcpy`` that the transfer sweep measures:
slower, and it competes with compute. (On 2 H200s a strided transfer sweep measured no
slower than a contiguous one; the gap of Inception's split placements to the simulator was
host time, see ``docs/placement.md``. Dense copies stay: they are what the sweep fits.)

On a machine without several GPUs, logical devices may all map to ``cpu``: the execution,
the copy bookkeeping and the numerics are the same.
"""

from __future__ import annotations

import functools
import heapq
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from operator import itemgetter
from typing import Any, NamedTuple

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
        grad_copies: str = "deferred",
    ) -> None:
        super().__init__()
        if grad_copies not in ("deferred", "autograd"):
            raise ValueError(f"grad_copies must be 'deferred' or 'autograd', got {grad_copies!r}")
        self.grad_copies = grad_copies
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
        self._compile()
        #: Copies (and their bytes) of the last forward, between logical devices.
        self.copies = 0
        self.copy_bytes = 0
        #: Set to a list to have ``forward`` append the host clock before the first launch
        #: and after each node (with its copies): see :meth:`host_launch_seconds`.
        self.host_clock: list[float] | None = None
        #: Set to a list to have each node's backward append ``(name, thread id, host clock)``
        #: when it starts (a hook on the gradient of the node's output, which autograd runs
        #: right before the node's backward): see :meth:`backward_host_seconds`.
        self.backward_clock: list[tuple[str, int, float]] | None = None

    def host_launch_seconds(self) -> list[tuple[str, float]]:
        """Host seconds spent on each node (its launch and its copies) in the last forward
        run with ``host_clock`` set, in launch order. A node far above the others blocked
        the host (an allocator retry, a synchronising copy), which the host model ignores."""
        clock = self.host_clock
        if not clock or len(clock) != len(self.order) + 1:
            raise ValueError("set host_clock = [] and run one forward before host_launch_seconds")
        return [(n.name, b - a) for n, a, b in zip(self.order, clock, clock[1:])]

    def backward_host_seconds(self, end: float) -> dict[str, float]:
        """Host seconds of each node's backward in the last ``backward()`` run with
        ``backward_clock`` set, ``end`` being the host clock when it returned: from the
        node's start to the next start on the same autograd thread (the last one: to
        ``end``). With every node on one device autograd runs one thread, so these are the
        per-op backward host costs of the replay's ``backward_weights``."""
        clock = self.backward_clock
        if not clock:
            raise ValueError("set backward_clock = [] and run forward and backward first")
        out: dict[str, float] = {}
        by_thread: dict[int, list[tuple[float, str]]] = {}
        for name, thread, t in clock:
            by_thread.setdefault(thread, []).append((t, name))
        for starts in by_thread.values():
            starts.sort()
            for (t, name), (t_next, _) in zip(starts, [*starts[1:], (end, "")]):
                out[name] = out.get(name, 0.0) + t_next - t
        return out

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

    # -- compilation ----------------------------------------------------------------------------
    def _compile(self) -> None:
        """Turn the launch order into flat records so that ``forward`` does no fx work.

        Every value lives in one slot of a list: each node's output, each copy of it on another
        device and each constant argument. A node's arguments become an ``itemgetter`` over
        slots (a small builder only for nested lists, tuples, dicts and slices).
        """
        modules = dict(self.gm.named_modules())
        dev = self.device_of
        dests: dict[str, list[int]] = {}  # producer -> the other devices its users run on
        for node in self.order:
            for a in node.all_input_nodes:
                if dev[a.name] != dev[node.name] and dev[node.name] not in dests.get(a.name, []):
                    dests.setdefault(a.name, []).append(dev[node.name])
        slot: dict[tuple[str, int], int] = {}
        for node in self.order:
            slot[(node.name, dev[node.name])] = len(slot)
            for d in sorted(dests.get(node.name, ())):
                slot[(node.name, d)] = len(slot)
        template: list[Any] = [None] * len(slot)

        def compile_arg(arg: Any, d: int | None) -> int | Callable[[list], Any]:
            """A slot index (node or constant) or a builder; ``d=None``: the producer's own."""
            if isinstance(arg, fx.Node):
                return slot[(arg.name, dev[arg.name] if d is None else d)]
            if isinstance(arg, (list, tuple, dict, slice)) and _has_node(arg):
                if isinstance(arg, dict):
                    parts = {k: _getter(compile_arg(v, d)) for k, v in arg.items()}
                    return lambda vals: {k: g(vals) for k, g in parts.items()}
                if isinstance(arg, slice):
                    s, e, st = (_getter(compile_arg(x, d)) for x in (arg.start, arg.stop, arg.step))
                    return lambda vals: slice(s(vals), e(vals), st(vals))
                gets = [_getter(compile_arg(v, d)) for v in arg]
                if isinstance(arg, tuple) and hasattr(arg, "_fields"):  # a namedtuple
                    cls = type(arg)
                    return lambda vals: cls(*(g(vals) for g in gets))
                make = tuple if isinstance(arg, tuple) else list
                return lambda vals: make(g(vals) for g in gets)
            template.append(arg)
            return len(template) - 1

        waited: set[tuple[str, int]] = set()
        records: list[_Record] = []
        # The launch order may put the inputs in any order: map each to its argument.
        placeholders = [n for n in self.gm.graph.nodes if n.op == "placeholder"]
        inputs_pos = {n.name: i for i, n in enumerate(placeholders)}
        self._inputs = [(n.name, n.args[0] if n.args else _MISSING) for n in placeholders]
        for node in self.order:
            d = dev[node.name]
            # The copies this node is the first (in launch order) to read on d: its stream waits
            # for exactly those copies' events, never for the whole copy stream.
            waits = []
            for a in node.all_input_nodes:
                if dev[a.name] != d and (a.name, d) not in waited:
                    waited.add((a.name, d))
                    waits.append(slot[(a.name, d)])
            out = slot[(node.name, d)]
            copies = tuple((c, slot[(node.name, c)]) for c in sorted(dests.get(node.name, ())))
            if node.op == "placeholder":  # fn: its position among the forward's arguments
                records.append(
                    _Record(_PLACEHOLDER, inputs_pos[node.name], _NO_ARGS, None, d, out, copies, ())
                )
                continue
            args = _args_getter([compile_arg(a, d) for a in node.args])
            kwargs = None
            if node.kwargs:
                kwargs = _kwargs_getter({k: compile_arg(v, d) for k, v in node.kwargs.items()})
            if node.op == "call_module":
                fn, kind = modules[node.target], _CALL
            elif node.op == "call_function":
                fn, kind = node.target, _CALL
            elif node.op == "call_method":
                fn, kind = node.target, _METHOD
            else:  # get_attr: looked up at run time, so re-bound tensors are seen
                owner_path, _, attr = node.target.rpartition(".")
                fn, kind = (modules[owner_path] if owner_path else self.gm, attr), _ATTR
            records.append(_Record(kind, fn, args, kwargs, d, out, copies, tuple(waits)))
        output = next(n for n in self.gm.graph.nodes if n.op == "output")
        self._output = _getter(compile_arg(output.args[0], None))
        self._records = records
        self._template = template
        self._cuda_index = [x.index if x.type == "cuda" else None for x in self.devices]

    def launch_sequence(self) -> list[tuple[str, str, int]]:
        """What ``forward`` issues, in order: ``("run", node, device)`` for each fx node and
        ``("copy", node, destination)`` for each copy, issued right after its producer so that
        the copy waits only for the work launched before the producer (as simulated)."""
        out = []
        for node, rec in zip(self.order, self._records):
            out.append(("run", node.name, rec.device))
            out += [("copy", node.name, c) for c, _ in rec.copies]
        return out

    # -- execution ----------------------------------------------------------------------------
    def _input(self, inputs: tuple, i: int) -> Any:
        if i < len(inputs):
            return inputs[i]
        name, default = self._inputs[i]
        if default is _MISSING:
            raise ValueError(f"missing input {name!r} (argument {i} of forward)")
        return default

    def _pair_streams(self, src: torch.device, dst: torch.device) -> tuple[Any, Any]:
        """The copy streams of a (source, destination) GPU pair, on each side."""
        pair = (src.index, dst.index)
        streams = self._streams.get(pair)
        if streams is None:
            streams = (torch.cuda.Stream(device=src), torch.cuda.Stream(device=dst))
            streams = self._streams.setdefault(pair, streams)
        return streams

    def _copy(self, t: torch.Tensor, d: int, events: dict[int, Any], key: int) -> torch.Tensor:
        dst = self.devices[d]
        self.copies += 1
        self.copy_bytes += t.numel() * t.element_size()
        if t.device == dst:  # two logical devices on one physical device
            return t
        if dst.type != "cuda" or t.device.type != "cuda":
            return t.to(dst)
        if self.grad_copies == "deferred" and t.requires_grad and torch.is_grad_enabled():
            link = _GradLink()
            return _DeviceCopy.apply(_AwaitGrad.apply(t, link), self, dst, link, events, key)
        y = self._stream_copy(t, dst, events, key)
        if y.requires_grad:  # autograd copies the gradient back: hand it a dense one
            y.register_hook(dense_for_copy)
        return y

    def _stream_copy(
        self, t: torch.Tensor, dst: torch.device, events: dict[int, Any], key: int
    ) -> torch.Tensor:
        s_src, s_dst = self._pair_streams(t.device, dst)
        # Issued right after the producer: the copy waits for it (and the work launched before
        # it on its device), not for whatever that device runs later.
        s_src.wait_stream(torch.cuda.current_stream(t.device))
        with torch.cuda.stream(s_src), torch.cuda.stream(s_dst):
            y = dense_for_copy(t).to(dst, non_blocking=True)
        t.record_stream(s_src)
        # The copy is a two-way barrier of s_src and s_dst, so s_dst has passed it here; the
        # consumer waits on this event only, not on copies issued after it.
        ev = events.setdefault(key, [])
        e = torch.cuda.Event()
        e.record(s_dst)
        ev.append((e, y))
        return y

    def forward(self, *inputs: Any) -> Any:
        vals = list(self._template)
        events: dict[int, list] = {}
        self.copies = self.copy_bytes = 0
        if len(inputs) > len(self._inputs):
            raise ValueError(f"forward takes {len(self._inputs)} inputs, got {len(inputs)}")
        cuda_index = self._cuda_index
        restore = torch.cuda.current_device() if any(i is not None for i in cuda_index) else None
        current = restore
        clock = self.host_clock
        if clock is not None:
            clock.clear()
            clock.append(time.perf_counter())
        stamps = self.backward_clock
        if stamps is not None:
            stamps.clear()
        try:
            for i, (kind, fn, args, kwargs, d, out_slot, copies, waits) in enumerate(self._records):
                idx = cuda_index[d]
                if idx is not None and idx != current:  # switch only when the device changes
                    torch.cuda.set_device(idx)
                    current = idx
                if idx is not None:
                    for w in waits:
                        _wait_copies(events.pop(w, ()), idx)
                if kind is _CALL:
                    out = fn(*args(vals), **kwargs(vals)) if kwargs else fn(*args(vals))
                elif kind is _METHOD:
                    a = args(vals)
                    out = getattr(a[0], fn)(*a[1:], **(kwargs(vals) if kwargs else {}))
                elif kind is _ATTR:
                    out = getattr(*fn)
                else:  # placeholder: the input starts on its node's device
                    dst = self.devices[d]
                    out = tree_map(
                        lambda t, dst=dst: t.to(dst) if isinstance(t, torch.Tensor) else t,
                        self._input(inputs, fn),
                    )
                vals[out_slot] = out
                if stamps is not None and isinstance(out, torch.Tensor) and out.requires_grad:
                    out.register_hook(functools.partial(_stamp, stamps, self.order[i].name))
                for c, s in copies:
                    if isinstance(out, torch.Tensor):
                        vals[s] = self._copy(out, c, events, s)
                        continue
                    vals[s] = tree_map(
                        lambda t, c=c, s=s: (
                            self._copy(t, c, events, s) if isinstance(t, torch.Tensor) else t
                        ),
                        out,
                    )
                if clock is not None:
                    clock.append(time.perf_counter())
        finally:
            if restore is not None and current != restore:
                torch.cuda.set_device(restore)
        result = self._output(vals)
        if self.output_device is not None:
            result = tree_map(
                lambda t: t.to(self.output_device) if isinstance(t, torch.Tensor) else t, result
            )
        return result


def _stamp(clock: list, name: str, grad: torch.Tensor) -> None:
    """Gradient hook of :attr:`PlacedModule.backward_clock`: the node's backward starts."""
    clock.append((name, threading.get_ident(), time.perf_counter()))


class _GradLink:
    """The gradient copy of one forward copy, from its backward to the producer's side."""

    __slots__ = ("event",)

    def __init__(self) -> None:
        self.event: Any = None


class _AwaitGrad(torch.autograd.Function):
    """Identity before a cross-device copy. Its backward runs on autograd's thread of the
    producer's device, ranked like the producer's own backward: only there does that
    device's stream wait for the gradient copy, so the wait joins the stream in that
    thread's launch order instead of whenever the consumer's thread sent the gradient."""

    @staticmethod
    def forward(ctx: Any, t: torch.Tensor, link: _GradLink) -> torch.Tensor:
        ctx.link = link
        return t

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor, None]:
        event, ctx.link.event = ctx.link.event, None
        if event is not None:
            stream = torch.cuda.current_stream(g.device)
            stream.wait_event(event)
            g.record_stream(stream)  # allocated on the copy stream
        return g, None


class _DeviceCopy(torch.autograd.Function):
    """A GPU-to-GPU copy on the pair's copy streams whose backward copies the gradient back
    on the reverse pair's copy streams and records an event for :class:`_AwaitGrad`. The
    autograd copy would instead make the producer device's stream wait at once (PyTorch's
    cross-device copy is a barrier of both devices' current streams), stalling work launched
    there later even if it does not need the gradient."""

    @staticmethod
    def forward(
        ctx: Any,
        t: torch.Tensor,
        owner: PlacedModule | None,
        dst: torch.device,
        link: _GradLink,
        events: dict[int, Any],
        key: int,
    ) -> torch.Tensor:
        ctx.owner, ctx.link, ctx.src = owner, link, t.device
        if owner is None or t.device.type != "cuda" or dst.type != "cuda":
            return t.to(dst, copy=True)
        return owner._stream_copy(t, dst, events, key)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[Any, ...]:
        owner, src = ctx.owner, ctx.src
        if owner is None or g.device.type != "cuda" or src.type != "cuda":
            return (g.to(src), None, None, None, None, None)
        s_g, s_src = owner._pair_streams(g.device, src)
        s_g.wait_stream(torch.cuda.current_stream(g.device))
        with torch.cuda.stream(s_g), torch.cuda.stream(s_src):
            # cat's backward hands each input a strided slice of the gradient.
            out = dense_for_copy(g).to(src, non_blocking=True)
        g.record_stream(s_g)
        event = torch.cuda.Event()
        event.record(s_src)  # the copy is a barrier of s_g and s_src: s_src has passed it
        ctx.link.event = event
        return (out, None, None, None, None, None)


class _Record(NamedTuple):
    """One launch of :meth:`PlacedModule.forward`, resolved at construction."""

    kind: object
    fn: Any
    args: Callable[[list], tuple]
    kwargs: Callable[[list], dict] | None
    device: int
    out: int
    copies: tuple[tuple[int, int], ...]
    waits: tuple[int, ...]


_CALL, _METHOD, _ATTR, _PLACEHOLDER, _MISSING = object(), object(), object(), object(), object()


def _NO_ARGS(vals: list) -> tuple:
    return ()


def _has_node(arg: Any) -> bool:
    found = []
    fx.node.map_arg(arg, found.append)
    return bool(found)


def _getter(ref: int | Callable[[list], Any]) -> Callable[[list], Any]:
    return itemgetter(ref) if isinstance(ref, int) else ref


def _args_getter(refs: list[int | Callable[[list], Any]]) -> Callable[[list], tuple]:
    """Positional arguments from slots: one ``itemgetter`` when every argument is a slot."""
    if not refs:
        return _NO_ARGS
    if all(isinstance(r, int) for r in refs):
        if len(refs) == 1:
            i = refs[0]
            return lambda vals: (vals[i],)
        return itemgetter(*refs)
    gets = [_getter(r) for r in refs]
    return lambda vals: tuple(g(vals) for g in gets)


def _kwargs_getter(refs: dict[str, int | Callable[[list], Any]]) -> Callable[[list], dict]:
    gets = {k: _getter(r) for k, r in refs.items()}
    return lambda vals: {k: g(vals) for k, g in gets.items()}


def dense_for_copy(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself when a device-to-device copy of it is one ``cudaMemcpy`` (its elements
    fill one block in some dimension order: contiguous, channels-last, transposed), else a
    contiguous copy on the current stream. A strided tensor (a slice of a gradient of
    ``torch.cat``) would otherwise cross GPUs by an elementwise kernel over the peer link."""
    return t if _fills_one_block(t) else t.contiguous()


def _fills_one_block(t: torch.Tensor) -> bool:
    """Non-overlapping and dense: ``.to`` keeps such strides and copies one block."""
    expected = 1
    for size, stride in sorted(zip(t.shape, t.stride()), key=itemgetter(1)):
        if size == 1:
            continue
        if stride != expected:
            return False
        expected *= size
    return True


def _wait_copies(copies: Any, index: int) -> None:
    """Make device ``index``'s current stream wait for these copies and keep their memory
    alive for it (the copies were allocated on the copy stream)."""
    stream = torch.cuda.current_stream(index)
    for event, y in copies:
        stream.wait_event(event)
        y.record_stream(stream)


def placement_from_mapping(mapping: Mapping[str, int]) -> dict[str, int]:
    """Validate a user placement mapping (non-negative integer devices)."""
    bad = {k: v for k, v in mapping.items() if not isinstance(v, int) or v < 0}
    if bad:
        k = next(iter(bad))
        raise ValueError(f"device of fx node {k!r} must be an int >= 0, got {bad[k]!r}")
    return dict(mapping)
