"""Tests every OpSpec: reference parity over shapes and dtypes, errors, opcheck, compile."""

import pytest
import torch
from opspecs import OP_SPECS

SPEC_IDS = [s.name for s in OP_SPECS]


def _overload(spec):
    return getattr(torch.ops.fastlatent, spec.name).default


@pytest.mark.parametrize("spec", OP_SPECS, ids=SPEC_IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_matches_reference(spec, device, dtype):
    if dtype not in spec.dtypes:
        pytest.skip(f"{spec.name} does not support {dtype}")
    for sample in spec.sample_inputs(device, dtype):
        ours = spec.op(*sample.args, **sample.kwargs)
        ref = spec.reference(*sample.args, **sample.kwargs)
        spec.compare(sample, ours, ref)


@pytest.mark.parametrize("spec", OP_SPECS, ids=SPEC_IDS)
def test_non_contiguous_inputs(spec, device):
    for sample in spec.sample_inputs(device, torch.float32):
        # Same values with every element two apart in memory.
        allowed = spec.non_contiguous_args
        strided = tuple(
            torch.stack([a, a], dim=-1)[..., 0]
            if isinstance(a, torch.Tensor) and (allowed is None or i in allowed)
            else a
            for i, a in enumerate(sample.args)
        )
        ours = spec.op(*strided, **sample.kwargs)
        ref = spec.reference(*sample.args, **sample.kwargs)
        spec.compare(sample, ours, ref)


@pytest.mark.parametrize("spec", OP_SPECS, ids=SPEC_IDS)
def test_error_inputs(spec, device):
    for err in spec.error_inputs(device):
        with pytest.raises(err.error, match=err.match):
            spec.op(*err.args, **err.kwargs)


@pytest.mark.parametrize("spec", OP_SPECS, ids=SPEC_IDS)
def test_error_inputs_on_meta_device(spec):
    # The fake implementation must reject what the kernels reject, with the same message.
    for err in spec.error_inputs(torch.device("meta")):
        if "same device" in err.match:
            continue  # meta vs meta: nothing to mismatch
        with pytest.raises(err.error, match=err.match):
            _overload(spec)(*err.args, **err.kwargs)


@pytest.mark.parametrize("spec", OP_SPECS, ids=SPEC_IDS)
def test_opcheck(spec, device):
    samples = list(spec.sample_inputs(device, torch.float32))[:4]
    for sample in samples:
        torch.library.opcheck(_overload(spec), sample.args, sample.kwargs)


@pytest.mark.parametrize("spec", OP_SPECS, ids=SPEC_IDS)
def test_torch_compile_fullgraph(spec, device):
    torch._dynamo.reset()
    sample = list(spec.sample_inputs(device, torch.float32))[4]
    compiled = torch.compile(spec.op, fullgraph=True)  # in-place specs clone inside the graph
    ours = compiled(*sample.args, **sample.kwargs)
    ref = spec.reference(*sample.args, **sample.kwargs)
    spec.compare(sample, ours, ref)
