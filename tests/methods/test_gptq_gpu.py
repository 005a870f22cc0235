"""GPTQ/AWQ on CUDA: CUDA-graph replay of GPTQ's column loop equals the eager loop; the engine runs on the GPU."""
import copy

import pytest
import torch

from hubquant.methods.gptq import gptq_quantize
from hubquant.quant import WeightScheme

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)


@pytest.mark.parametrize("actorder,group,sym", [(True, 64, True), (False, 64, False), (True, -1, True)])
def test_cuda_graph_equals_eager(actorder, group, sym):
    torch.manual_seed(0)
    x = torch.randn(4096, 256, device="cuda") * torch.linspace(0.1, 3, 256, device="cuda")
    h = 2 * x.T @ x / x.shape[0]
    w = torch.randn(384, 256, device="cuda")
    scheme = WeightScheme(bits=4, group_size=group, symmetric=sym)
    a, la = gptq_quantize(w, h, scheme, actorder=actorder, cuda_graphs=True)
    b, lb = gptq_quantize(w, h, scheme, actorder=actorder, cuda_graphs=False)
    assert torch.equal(a.qweight, b.qweight)
    assert torch.equal(a.scale, b.scale)
    assert la == pytest.approx(lb, rel=1e-4)
    cpu, _ = gptq_quantize(w.cpu(), h.cpu(), scheme, actorder=actorder)
    agree = (cpu.qweight == a.qweight.cpu()).float().mean().item()
    assert agree > 0.99  # CPU vs GPU float rounding may flip a few codes


def test_gptq_and_awq_run_on_cuda_match_cpu_quality():
    from hubquant.methods import QuantJob, get_method
    from hubquant.quant import QuantScheme
    from tests.helpers import tiny_model

    base = tiny_model("llama", vocab=1000)
    calib = torch.randint(0, 1000, (8, 128), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = base(calib).logits
    for method, sym in (("gptq", True), ("awq", False)):
        scheme = QuantScheme(weights=WeightScheme(bits=4, group_size=32, symmetric=sym))
        errs = {}
        for dev in ("cpu", "cuda"):
            m = copy.deepcopy(base)
            q = get_method(method).load()(m, QuantJob(scheme=scheme, calib=calib, device=dev, progress=False))
            assert next(m.parameters()).device.type == "cpu"  # layers go back where they were
            assert all(v.qweight.device.type == "cpu" for v in q.values())
            with torch.no_grad():
                errs[dev] = float((m(calib).logits - ref).pow(2).mean())
        assert errs["cuda"] == pytest.approx(errs["cpu"], rel=0.05)
