import pytest
from hypothesis import given, strategies as st

from graphopt.compiler.pipeline import parse_pipeline
from graphopt.errors import GraphoptError
from graphopt.passes import DEFAULT_PIPELINE, registry


def test_default_pipeline_is_exact_cleanup():
    steps = parse_pipeline(DEFAULT_PIPELINE)
    assert [s.name for s in steps] == ["remove-noops", "fold-constants", "dce"]
    assert all(s.cls.exact for s in steps)


def test_options_resolve_with_defaults_and_types():
    (step,) = parse_pipeline("fold-constants{max_growth=2.5}")
    assert step.config == {"max_growth": 2.5}
    (step,) = parse_pipeline("fold-constants")
    assert step.config == {"max_growth": 1.0}


@pytest.mark.parametrize("text, expected", [
    ("nosuch", "unknown pass 'nosuch'; available: cache-schedule, dce, decoupleq, draft-heads, fold-constants, gptq, layer-skip, remove-noops, rtn"),
    ("dce{foo=1}", "pass 'dce' has no option 'foo'; options: none"),
    ("fold-constants{bar=1}", "has no option 'bar'; options: max_growth (float in [0.0, 1000000.0], default 1.0)"),
    ("fold-constants{max_growth=abc}", "'abc' is not a valid float"),
    ("fold-constants{max_growth=-1}", "-1 is out of range"),
    ("fold-constants{max_growth}", "must be KEY=VALUE"),
    ("fold-constants{max_growth=1,max_growth=2}", "given twice"),
    ("dce,,fold-constants", "empty pass name"),
    ("dce{", "unclosed brace"),
    ("dce}", "unbalanced"),
])
def test_bad_pipelines_name_the_problem(text, expected):
    with pytest.raises(GraphoptError) as e:
        parse_pipeline(text)
    assert expected in str(e.value)
    assert "\n" not in str(e.value)


def test_every_pass_is_documented():
    for name, cls in registry().items():
        assert cls.summary(), name
        for key, opt in cls.options.items():
            assert opt.doc and opt.parse("x", opt.default) == opt.default


@given(st.floats(min_value=0, max_value=1e6, allow_nan=False), st.sampled_from(["dce", "remove-noops"]))
def test_printed_pipeline_parses_back(growth, other):
    steps = parse_pipeline(f"fold-constants{{max_growth={growth!r}}},{other}")
    again = parse_pipeline(",".join(str(s) for s in steps))
    assert [(s.name, s.config) for s in again] == [(s.name, s.config) for s in steps]
