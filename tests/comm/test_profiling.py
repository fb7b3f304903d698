"""Work attributed to the hook's codec ranges (scaledl.comm.profiling.range_time)."""

import torch
from torch.autograd import DeviceType
from torch.autograd.profiler_util import FunctionEvent
from torch.profiler import ProfilerActivity, profile, record_function

from scaledl.comm.hooks import CODEC_RANGE
from scaledl.comm.profiling import range_time


def test_host_time_counts_the_operators_inside_the_ranges_only():
    a = torch.randn(256, 256)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(3):
            a @ a @ a  # outside: far more host time than the ranges' work
            with record_function(CODEC_RANGE):
                b = (a * 2).sum()
                with record_function("inner"):  # nested ranges and operators count once
                    b.add_(1)
        a @ a
    events = prof.events()
    ranges = [e for e in events if e.name == CODEC_RANGE]
    outside = [e for e in events if e.name == "aten::mm"]
    assert len(ranges) == 3 and len(outside) == 7
    got = range_time(events, CODEC_RANGE, device=False)
    want = sum(r.cpu_time_total for r in ranges) * 1e-6  # the ranges' inclusive time
    assert abs(got - want) <= 1e-9 * max(1.0, want), (got, want)
    # self times are positive, so counting any operator outside would exceed the ranges' time
    assert all(e.self_cpu_time_total > 0 for e in outside)
    assert range_time(events, "no such range", device=False) == 0.0
    assert range_time(events, CODEC_RANGE, device=True) == 0.0  # no device events on CPU


def _ev(id_, name, start, end, *, device=False, linked=0, stream=None, annotation=False):
    return FunctionEvent(
        id=id_,
        name=name,
        thread=1,
        start_us=start,
        end_us=end,
        device_type=DeviceType.CUDA if device else DeviceType.CPU,
        device_index=0,
        device_resource_id=stream,
        is_user_annotation=annotation,
        linked_correlation_id=linked,
    )


def test_device_time_counts_every_kernel_launched_inside_the_ranges():
    """A CUDA-shaped profile: kernels linked to an operator, Triton kernels known only by their
    driver call or by the range's device-side span, and work outside the range."""
    events = [
        _ev(1, CODEC_RANGE, 100, 200, annotation=True),  # the host range
        _ev(2, "aten::add", 110, 120),  # an operator inside
        _ev(3, "aten::mm", 250, 260),  # an operator outside
        _ev(4, "autograd::engine::evaluate_function", 90, 230),  # encloses the range
        _ev(900, "cuLaunchKernelEx", 130, 135),  # Triton launch, linked to no operator
        _ev(3, "cuLaunchKernel", 140, 142),  # driver call whose id equals an operator's
        _ev(903, "cudaLaunchKernel", 210, 212, linked=3),  # the outside operator's launch
        _ev(1, CODEC_RANGE, 300, 360, device=True, stream=7, annotation=True),  # device copy
        # kernels (device times): inside are 10 + 25 + 10 + 4 + 1 = 50 us
        _ev(50, "add_kernel", 300, 310, device=True, linked=2, stream=7),
        _ev(900, "_worker_sums_kernel", 320, 345, device=True, stream=7),
        _ev(3, "_worker_pack_kernel", 346, 356, device=True, stream=7),
        _ev(901, "_decode_kernel", 356, 360, device=True, stream=7),  # no host link
        _ev(902, "ncclDevKernel_SendRecv", 330, 340, device=True, stream=9),  # other stream
        _ev(903, "mm_kernel", 400, 450, device=True, linked=3, stream=7),
        _ev(904, "after_kernel", 360, 380, device=True, stream=7),  # past the span
        # linked to the enclosing operator only: inside the span or not
        _ev(905, "_server_pack_kernel", 345, 346, device=True, linked=4, stream=7),
        _ev(906, "optimizer_kernel", 380, 390, device=True, linked=4, stream=7),
    ]
    counts: dict = {}
    got = range_time(events, CODEC_RANGE, device=True, counts=counts)
    assert abs(got - 50e-6) < 1e-12, got
    assert counts == {"launch": 2, "operator": 1, "device_span": 2, "outside": 4}
    # the same events without the device-side span: the kernels placed by it are outside
    no_span = [e for e in events if not (e.is_user_annotation and e.device_type != DeviceType.CPU)]
    assert abs(range_time(no_span, CODEC_RANGE, device=True) - 45e-6) < 1e-12
    assert range_time(events, "elsewhere", device=True) == 0.0
