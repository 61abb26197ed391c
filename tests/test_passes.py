"""Pass tests: export a graph, run the pass, assert the structure changed as expected and outputs did not."""
import pytest
import torch
from torch import nn

from graphopt.compiler.capture import capture
from graphopt.compiler.pipeline import PassContext, parse_pipeline, run_pipeline
from graphopt.errors import PassFailure

aten = torch.ops.aten


def targets(program, method="forward"):
    return [n.target for n in program.methods[method].graph.nodes if n.op == "call_function"]


def run_passes(program, text, **kw):
    return run_pipeline(program, parse_pipeline(text), PassContext(**kw))


def outputs_equal(a, b, inputs):
    for x in inputs:
        ra, rb = a.run("forward", *x), b.run("forward", *x)
        assert len(ra) == len(rb)
        for u, v in zip(ra, rb):
            torch.testing.assert_close(u, v)  # float32 defaults: rtol 1.3e-6, atol 1e-5


class Noops(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)
        self.drop = nn.Dropout(0.5)

    def forward(self, x):
        y = x.clone().view(x.shape) * 1
        y = self.drop(self.lin(y)) + 0
        y = y.reshape(y.shape).transpose(1, 1).contiguous().to(torch.float32)
        return y.permute(0, 1).relu()


def test_remove_noops_strips_identities_and_eval_dropout():
    p = capture(Noops(), example_inputs=(torch.randn(4, 8),))
    before = targets(p)
    assert aten.dropout.default in before and aten.clone.default in before
    new, reports, _ = run_passes(p, "remove-noops")
    after = targets(new)
    assert after == [aten.linear.default, aten.relu.default]
    d = reports[0]["details"]
    assert d["removed_noops"] + d["removed_asserts"] == len(before) - 2
    assert reports[0]["headline"] == f"{d['removed_noops']} no-ops, {d['removed_asserts']} asserts removed"
    outputs_equal(p, new, [(torch.randn(4, 8),), (torch.randn(4, 8),)])


class ShapeChanging(nn.Module):
    def forward(self, x):
        return x.view(2, -1).transpose(0, 1) * 2 + torch.nn.functional.dropout(x.sum(), 0.1, training=False)


def test_remove_noops_keeps_real_reshapes():
    p = capture(ShapeChanging(), example_inputs=(torch.randn(4, 6),))
    new, _, _ = run_passes(p, "remove-noops")
    after = targets(new)
    assert aten.view.default in after and aten.transpose.int in after and aten.mul.Tensor in after
    outputs_equal(p, new, [(torch.randn(4, 6),)])


class ParamOnly(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(8, 8))
        self.b = nn.Parameter(torch.randn(8))
        self.unused = nn.Parameter(torch.randn(100))

    def forward(self, x):
        w = (self.w.t() * 2.0).exp()          # weights-only: folded to one constant
        big = self.b.expand(4096, 1, 8)        # a 128 KiB broadcast of 32 bytes: must not be stored
        small = self.b.expand(4096, 8)[:1]     # a broadcast cut back to 8 floats: stored
        return (x @ w + big) * small


def test_fold_constants_evaluates_weight_only_subgraphs_once():
    p = capture(ParamOnly(), example_inputs=(torch.randn(3, 8),))
    assert aten.exp.default in targets(p)
    new, reports, _ = run_passes(p, "fold-constants")
    after = targets(new)
    assert aten.exp.default not in after and aten.t.default not in after
    assert after.count(aten.expand.default) == 1  # the big broadcast is left for run time
    assert reports[0]["details"]["folded_subgraphs"] == 2 and reports[0]["headline"] == "2 subgraphs folded"
    ep = new.methods["forward"]
    assert "w" not in ep.state_dict and any(k.startswith("_graphopt_folded") for k in ep.constants)
    outputs_equal(p, new, [(torch.randn(3, 8),), (torch.randn(5, 8)[:3],)])


class Dead(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)

    def forward(self, x):
        _ = self.b(x).sin()  # computed, never used
        return self.a(x)


def test_dce_removes_dead_nodes_and_their_weights():
    p = capture(Dead(), example_inputs=(torch.randn(2, 4),))
    assert aten.sin.default in targets(p) or len(targets(p)) == 1  # the exporter may already drop it
    new, reports, _ = run_passes(p, "dce")
    assert targets(new) == [aten.linear.default]
    assert set(new.methods["forward"].state_dict) == {"model.a.weight", "model.a.bias"}
    assert reports[0]["param_bytes_after"] < reports[0]["param_bytes_before"]
    outputs_equal(p, new, [(torch.randn(2, 4),)])


@pytest.mark.parametrize("fixture", ["gpt2_dir", "llama_dir"])
def test_default_pipeline_on_hf_models(fixture, request):
    path = request.getfixturevalue(fixture)
    p = capture(str(path), task="single", inputs=["input_ids:1xS:int64"], dynamic=["S=1..64"])
    n_asserts = sum(1 for t in targets(p) if getattr(t, "__name__", "").startswith("_assert"))
    assert n_asserts > 0
    new, reports, _ = run_passes(p, "remove-noops,fold-constants,dce")
    assert [r["status"] for r in reports] == ["ok"] * 3
    assert not any(getattr(t, "__name__", "").startswith("_assert") for t in targets(new))
    assert new.node_count() < p.node_count()
    assert all(r["error_metric"] <= 1e-5 for r in reports)
    outputs_equal(p, new, [(torch.randint(0, 128, (1, n)),) for n in (1, 5, 64)])


class Explode(nn.Module):
    def forward(self, x):
        return x.exp()


def test_guard_stops_a_pass_that_changes_numerics(temp_pass):
    from graphopt.compiler.graph_edit import GraphEditor
    from graphopt.passes import Pass

    class Perturb(Pass):
        """Test pass: replaces exp by sin (wrong on purpose)."""
        name = "test-perturb"

        def run(self, program, ctx):
            ed = GraphEditor(program.methods["forward"])
            for n in ed.graph.nodes:
                if n.target is aten.exp.default:
                    n.target = aten.sin.default
            program.methods = {"forward": ed.build()}
            return program, {}
    temp_pass(Perturb)
    p = capture(Explode(), example_inputs=(torch.randn(5),))
    with pytest.raises(PassFailure, match=r"pass 'test-perturb' \(exact\) broke its tolerance: max_rel .* > 1e-05"):
        run_passes(p, "test-perturb")
    new, reports, _ = run_pipeline(p, parse_pipeline("test-perturb,dce"), PassContext(), on_error="skip")
    assert [r["status"] for r in reports] == ["rolled back", "ok"]
    assert targets(new) == [aten.exp.default]


def test_passes_after_a_lossy_one_answer_for_their_own_change(temp_pass):
    """Each pass is checked against the program it was given: an exact pass after a lossy one (rtn, then dce) is
    not blamed for the lossy pass's error, and a second lossy pass also reports its error against the original."""
    from graphopt.compiler.graph_edit import GraphEditor
    from graphopt.passes import Pass

    class Nudge(Pass):
        """Test pass: scales the output by 1.01 (lossy, within its tolerance)."""
        name = "test-nudge"
        exact = False
        metric = "rel_l2"
        tolerance = 0.02

        def run(self, program, ctx):
            ed = GraphEditor(program.methods["forward"])
            out = next(n for n in ed.graph.nodes if n.op == "output")
            y = out.args[0][0]
            with ed.graph.inserting_before(out):
                scaled = ed.graph.call_function(aten.mul.Tensor, (y, 1.01))
            scaled.meta = dict(y.meta)
            out.args = ((scaled,),)
            program.methods = {"forward": ed.build()}
            return program, {}
    temp_pass(Nudge)
    p = capture(Noops().eval(), example_inputs=(torch.randn(2, 8),))
    new, reports, _ = run_passes(p, "test-nudge,dce,test-nudge")
    assert [r["status"] for r in reports] == ["ok", "ok", "ok"]
    assert reports[1]["error_metric"] == 0.0  # dce: exact against the nudged program
    assert reports[2]["error_metric"] == pytest.approx(0.01, rel=1e-3)
    assert reports[2]["error_vs_original"] == pytest.approx(0.0201, rel=1e-3) and "error_vs_original" not in reports[0]
    from graphopt.api import CompiledModel
    rows = CompiledModel.summary_rows(type("R", (), {"reports": reports})())
    assert rows[2][5] == "1.00e-02 / 0.02 (total 2.01e-02)" and rows[1][5] == "0.00e+00 / 1e-05"
    # a lossy pass whose accumulated error passes its tolerance is still judged on its own step
    new, reports, _ = run_passes(p, "test-nudge,test-nudge,test-nudge")
    assert [r["status"] for r in reports] == ["ok", "ok", "ok"] and reports[2]["error_vs_original"] > 0.02
