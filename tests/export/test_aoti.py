"""torch.export and AOTInductor of a model with ops of both attention families, run from Python. The
same package run from C++ alone (libtorch + vitk_cpu, no interpreter) is tests/cpp/test_aoti_package.cpp."""
import torch

import aoti_model


def test_export_keeps_the_vitk_ops_and_aoti_matches_eager(tmp_path):
    model, x = aoti_model.build()
    with torch.no_grad():
        expected = model(x)
        ep = torch.export.export(model, (x,))
    called = {str(n.target) for n in ep.run_decompositions().graph.nodes if n.op == "call_function"}
    # The public ops are C++ composites, which decompose into their forward ops (what AOTInductor
    # compiles calls to), registered in C++ by the library itself.
    assert {"vitk.window_attention_fwd.default", "vitk.polyline_attention_fwd.default",
            "vitk.reduced_attention_fwd.default"} <= called, called
    path = torch._inductor.aoti_compile_and_package(ep, package_path=str(tmp_path / "model.pt2"))
    out = torch._inductor.aoti_load_package(path)(x)
    assert out.shape == expected.shape
    assert (out - expected).abs().max().item() <= 1e-4
