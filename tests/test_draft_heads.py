"""draft-heads: the verify method's tree attention, the LM head found by structure, training, lossless speculative
decoding on both backends, and the error paths."""
from __future__ import annotations

import pytest
import torch

import graphopt
from graphopt.compiler.capture import capture
from graphopt.compiler.draft_heads import find_lm_head, with_hidden_output
from graphopt.errors import GraphoptError
from graphopt.runtime.speculative import TreeShape, accept_greedy, accept_sampled


@pytest.fixture(scope="module")
def heads_bundle(llama_dir, tmp_path_factory):
    """A tiny Llama with 3 Medusa heads, trained for a few steps (tiny models: structure and exactness, not speed)."""
    out = tmp_path_factory.mktemp("heads") / "lm"
    graphopt.compile(str(llama_dir), "draft-heads{heads=3}").save(out)
    data = tmp_path_factory.mktemp("data") / "prompts.pt"
    g = torch.Generator().manual_seed(0)
    torch.save([torch.randint(0, 128, (int(n),), generator=g) for n in torch.randint(3, 12, (16,), generator=g)],
               data)
    return out, data


def test_verify_scores_each_tree_node_as_if_its_path_were_the_sequence(llama_dir):
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(llama_dir).eval()
    c = graphopt.compile(str(llama_dir), "draft-heads{heads=2}", backend="torch")
    p = c.program
    assert set(p.methods) == {"prefill", "decode", "verify", "draft"}
    assert p.output_names["verify"][-1] == "hidden_states" and p.output_names["prefill"][-1] == "hidden_states"
    assert "hidden_states" not in p.output_names["decode"]  # plain decoding stays as it was
    prompt = torch.tensor([[5, 17, 42, 9]])
    outs = p.run("prefill", prompt, torch.ones_like(prompt), torch.arange(4)[None])
    past = list(outs[1:5])
    # root 7 with children 8 and 11; 8 has child 3: paths [7,8,3] and [7,11] share only the root.
    tree = TreeShape([[0], [1], [0, 0]])
    tokens = torch.tensor([7, 8, 11, 3])
    mask = torch.cat([torch.ones(4, 4, dtype=torch.int64), tree.ancestors], 1)[None, None]
    logits, *rest = p.run("verify", tokens[None], mask, (4 + tree.depth)[None], *past)
    hidden = rest[-1]
    presents = rest[:-1]
    assert logits.shape == (1, 4, 128) and hidden.shape == (1, 4, 32) and presents[0].shape[2] == 8
    with torch.no_grad():
        a = model(torch.tensor([[5, 17, 42, 9, 7, 8, 3]])).logits[0]
        b = model(torch.tensor([[5, 17, 42, 9, 7, 11]])).logits[0]
    for node, ref in [(0, a[4]), (1, a[5]), (3, a[6]), (2, b[5])]:
        torch.testing.assert_close(logits[0, node], ref, rtol=1e-4, atol=1e-5)
    # the last hidden state feeds the LM head: hidden_states @ W == logits
    w = model.lm_head.weight
    torch.testing.assert_close(hidden[0] @ w.T, logits[0], rtol=1e-4, atol=1e-5)


def test_lm_head_is_found_by_structure_not_by_name():
    class Odd(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.table = torch.nn.Embedding(50, 16)
            self.mix = torch.nn.Linear(16, 16)
            self.to_vocab = torch.nn.Linear(16, 50)

        def forward(self, ids):
            h = torch.tanh(self.mix(self.table(ids)))
            return self.to_vocab(h[:, -1:, :])

    p = capture(Odd().eval(), example_inputs=(torch.randint(0, 50, (2, 6)),))
    ep = p.methods["forward"]
    lin, hidden, w, b = find_lm_head(ep)
    assert w.shape == (50, 16) and b.shape == (50,)
    assert hidden.meta["val"].dim() == 3 and lin.args[0] is not hidden  # the slice to the last position is skipped
    new = with_hidden_output(ep)
    ids = torch.randint(0, 50, (2, 6))
    logits, h = new.module()(ids)
    torch.testing.assert_close(logits, ep.module()(ids)[0])
    assert h.shape == (2, 6, 16)
    torch.testing.assert_close(torch.nn.functional.linear(h[:, -1:], w, b), logits)
    cnn = capture("examples.tiny_cnn:build")
    with pytest.raises(GraphoptError, match="found no LM head; looked for the first output"):
        find_lm_head(cnn.methods["forward"])


def test_accept_greedy_keeps_the_longest_path_the_base_agrees_with():
    tree = TreeShape([[0], [1], [0, 0], [1, 0], [0, 0, 0]])  # nodes: 1=[0] 2=[1] 3=[0,0] 4=[1,0] 5=[0,0,0]
    tokens = [10, 20, 21, 30, 31, 40]
    V = 50
    logits = torch.zeros(6, V)
    # base after root -> 21 (node 2 accepted), after node 2 -> 31 (node 4), after node 4 -> 7 (bonus)
    for node, nxt in [(0, 21), (1, 30), (2, 31), (3, 40), (4, 7), (5, 1)]:
        logits[node, nxt] = 1
    path, bonus = accept_greedy(tokens, tree, logits)
    assert path == [0, 2, 4] and bonus == 7
    logits[0] = 0
    logits[0, 3] = 1  # nothing matches the root's prediction
    assert accept_greedy(tokens, tree, logits) == ([0], 3)


def test_rejection_sampling_follows_the_target_distribution():
    g = torch.Generator().manual_seed(0)
    p = torch.tensor([[0.5, 0.3, 0.2, 0.0], [0.25, 0.25, 0.25, 0.25]])
    q = torch.tensor([[0.1, 0.2, 0.3, 0.4]])  # a bad drafter: lots of mass where p has none
    counts = torch.zeros(4)
    n = 20000
    for _ in range(n):
        draft = int(torch.multinomial(q[0], 1, generator=g))
        path, nxt = accept_sampled([0, draft], p, q, g)
        first = draft if len(path) == 2 else nxt
        counts[first] += 1
    assert torch.allclose(counts / n, p[0], atol=0.015)


def test_tree_options_are_checked_against_the_heads_when_parsed():
    from graphopt.compiler.pipeline import parse_pipeline
    for spec, msg in [("draft-heads{heads=2,tree=[[0],[0,0],[0,0,0]]}", "3 deep but there are only 2 heads"),
                      ("draft-heads{topk=2,tree=[[0],[2]]}", "outside the top-2"),
                      ("draft-heads{tree=[[0],[1,0]]}", r"no parent \[1\]"),
                      ("draft-heads{tree=[[0],[0]]}", "listed twice"),
                      ("draft-heads{tree=lots}", "not 'auto' or a list of paths")]:
        with pytest.raises(GraphoptError, match=msg):
            parse_pipeline(spec)
    with pytest.raises(GraphoptError, match="applies to causal-lm programs"):
        graphopt.compile("examples.tiny_cnn:build", "draft-heads")


def test_untrained_heads_are_refused_then_training_makes_speculative_greedy_lossless(heads_bundle, tmp_path):
    from graphopt.compiler.train_heads import train_heads
    out, data = heads_bundle
    engine = graphopt.load(out)
    ids = torch.tensor([[3, 14, 15, 92, 65]])
    with pytest.raises(GraphoptError, match="untrained: run graphopt train-heads"):
        engine.generate(ids, 8, speculative=True)
    report = train_heads(out, steps=30, data=data, prompts=16, new_tokens=24, batch=64)
    assert report["tree_size"] >= 1 and len(report["top1_accuracy"]) == 3
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 128, (1, n), generator=g) for n in (1, 4, 9, 30)]
    for backend in ("onnxruntime", "torch"):
        engine = graphopt.load(out, backend=backend)
        assert engine.plan["draft_heads"]["trained"]["steps"] == 30
        for ids in prompts:
            plain = engine.generate(ids, 20, eos_token_id=[])
            spec = engine.generate(ids, 20, eos_token_id=[], speculative=True)
            assert torch.equal(plain, spec), (backend, ids)
            assert engine.last_stats["mean_accepted_length"] >= 1.0
    # batch > 1 (rows one after another, left padding removed) equals plain batched greedy
    ids = torch.tensor([[0, 0, 5, 6], [7, 8, 9, 10]])
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    plain = engine.generate(ids, 12, attention_mask=mask, eos_token_id=[])
    assert torch.equal(engine.generate(ids, 12, attention_mask=mask, eos_token_id=[], speculative=True), plain)
    # sampling: exact rejection sampling, reproducible with a seed, tokens inside the vocabulary
    a = engine.generate(ids[:1], 16, do_sample=True, seed=3, eos_token_id=[], speculative=True)
    b = engine.generate(ids[:1], 16, do_sample=True, seed=3, eos_token_id=[], speculative=True)
    assert torch.equal(a, b) and a.shape == (1, 16) and int(a.max()) < 128


def test_cli_train_heads_and_run_speculative(heads_bundle, tmp_path, capsys):
    from graphopt.cli import graphopt_main
    out, data = heads_bundle
    assert graphopt_main(["train-heads", str(out), "--data", str(data), "--steps", "5", "--prompts", "8",
                          "--new-tokens", "8", "--quiet"]) == 0
    assert "tokens per step" in capsys.readouterr().out
    assert graphopt_main(["run", str(out), "--prompt-ids", "1,2,3", "--max-new-tokens", "10", "--speculative"]) == 0
    err = capsys.readouterr().err
    assert "mean accepted tokens per step" in err
    assert graphopt_main(["train-heads", str(tmp_path / "nope")]) == 2
    assert "not found" in capsys.readouterr().err
    assert graphopt_main(["train-heads", str(out), "--data", str(tmp_path / "missing.pt")]) == 2
    assert "--data" in capsys.readouterr().err
    assert graphopt_main(["train-heads", str(out), "--steps", "0", "--data", str(data)]) == 2
    assert "--steps must be a positive integer" in capsys.readouterr().err


def test_medusa_with_an_explicit_branching_tree_is_lossless(llama_dir, tmp_path):
    from graphopt.compiler.train_heads import train_heads
    out = tmp_path / "medusa"
    graphopt.compile(str(llama_dir), "draft-heads{kind=medusa,heads=2,topk=3,tree=[[0],[1],[2],[0,0],[1,0],[0,1]]}",
                     backend="torch").save(out)
    data = tmp_path / "p.pt"
    g = torch.Generator().manual_seed(5)
    torch.save([torch.randint(0, 128, (6,), generator=g) for _ in range(10)], data)
    report = train_heads(out, steps=20, data=data, prompts=10, new_tokens=16, batch=64)
    assert report["tree_size"] == 6  # an explicit tree is kept
    engine = graphopt.load(out, backend="torch")
    assert engine.plan["draft_heads"]["tree"] == [[0], [1], [2], [0, 0], [0, 1], [1, 0]]
    for n in (2, 7, 15):
        ids = torch.randint(0, 128, (1, n), generator=g)
        assert torch.equal(engine.generate(ids, 30, eos_token_id=[], speculative=True),
                           engine.generate(ids, 30, eos_token_id=[]))


def test_layer_skip_after_draft_heads_leaves_the_heads_alone(llama_dir):
    c = graphopt.compile(str(llama_dir), "draft-heads{heads=2},layer-skip{skip=1,keep_ends=false}",
                         calibration=[(torch.randint(0, 128, (1, 12), generator=torch.Generator().manual_seed(i)),)
                                      for i in range(4)], backend="torch")
    assert c.reports[-1]["status"] == "ok" and len(c.reports[-1]["details"]["skipped"]) == 1
    assert c.reports[0]["headline"].startswith("2 hydra heads, ")
    assert c.reports[-1]["headline"] == "1 of 2 blocks skipped"
    assert "draft" in c.program.methods and c.program.output_names["prefill"][-1] == "hidden_states"
