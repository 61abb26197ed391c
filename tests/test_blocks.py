"""Block discovery (graphopt.compiler.blocks) on decoders, encoders-style stacks and DiT, with numerics: cutting a
block out of the graph by wiring its input to its output must equal running the model without that block."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from graphopt.compiler.blocks import block_lists, find_blocks
from graphopt.compiler.capture import capture

torch.set_num_threads(1)


@pytest.mark.parametrize("fixture, path, cls", [("llama_dir", "model.model.layers", "LlamaDecoderLayer"),
                                                ("gpt2_dir", "model.transformer.h", "GPT2Block")])
def test_decoder_layers_are_found_in_order_with_residual_io(fixture, path, cls, request):
    p = capture(str(request.getfixturevalue(fixture)), task="single")
    blocks = find_blocks(p.methods["forward"])
    assert [b.path for b in blocks] == [f"{path}.{k}" for k in range(len(blocks))] and len(blocks) == 2
    assert all(b.cls == cls and b.residual for b in blocks)
    assert blocks[1].input is blocks[0].output  # the residual stream runs block to block
    order = {n: i for i, n in enumerate(p.methods["forward"].graph.nodes)}
    assert order[blocks[0].nodes[-1]] < order[blocks[1].nodes[0]]


class Stack(nn.Module):
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = nn.LayerNorm(16)
            self.ff = nn.Linear(16, 16)

        def forward(self, h):
            return h + self.ff(self.norm(h))

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList([Stack.Block() for _ in range(4)])
        self.heads = nn.ModuleList([nn.Linear(16, 2), nn.Linear(16, 3)])  # numbered, but different layer sizes

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        x = self.blocks[0].norm(x)  # a block's submodule called again outside it (as DiT's output head does)
        return self.heads[0](x), self.heads[1](x)

    @torch.no_grad()
    def without_block(self, skip: int, x):
        """The model's outputs with block `skip` left out: the reference for cutting it from the graph."""
        for k, b in enumerate(self.blocks):
            if k != skip:
                x = b(x)
        x = self.blocks[0].norm(x)
        return self.heads[0](x), self.heads[1](x)


def test_reused_submodules_and_other_families():
    p = capture(Stack().eval(), example_inputs=(torch.randn(2, 16),))
    ep = p.methods["forward"]
    assert set(block_lists(ep.graph)) == {"model.blocks", "model.heads"}
    blocks = find_blocks(ep)
    assert [b.path for b in blocks] == [f"model.blocks.{k}" for k in range(4)] and all(b.residual for b in blocks)
    # the final norm re-uses blocks.0.norm's module but runs after block 3: not part of block 0
    order = {n: i for i, n in enumerate(ep.graph.nodes)}
    assert max(order[n] for n in blocks[0].nodes) < min(order[n] for n in blocks[1].nodes)
    # Numerics: skipping block 2 in the graph = running the model without it.
    from graphopt.compiler.graph_edit import GraphEditor
    ed = GraphEditor(ep)
    names = {n.name: n for n in ed.graph.nodes}
    out, inp = names[blocks[2].output.name], names[blocks[2].input.name]
    out.replace_all_uses_with(inp)
    ed.graph.eliminate_dead_code()
    skipped = ed.build()
    x = torch.randn(2, 16)
    ref = Stack().eval().without_block(2, x)[0]
    torch.testing.assert_close(skipped.module()(x)[0], ref)


def test_dit_blocks():
    from diffusers import DiTTransformer2DModel
    torch.manual_seed(0)
    m = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                              num_layers=3, sample_size=8, patch_size=2, num_embeds_ada_norm=10,
                              norm_type="ada_norm_zero").eval()
    p = capture(m, example_inputs={"hidden_states": torch.randn(1, 4, 8, 8), "timestep": torch.tensor([10]),
                                   "class_labels": torch.tensor([3])})
    blocks = find_blocks(p.methods["forward"])
    assert [b.path for b in blocks] == ["model.transformer_blocks.0", "model.transformer_blocks.1",
                                        "model.transformer_blocks.2"]
    assert all(b.residual for b in blocks) and blocks[2].input is blocks[1].output


def test_no_blocks_and_unknown_prefix():
    p = capture("examples.tiny_cnn:build")
    assert find_blocks(p.methods["forward"]) == []
    p = capture(Stack().eval(), example_inputs=(torch.randn(2, 16),))
    with pytest.raises(KeyError, match="found: model.blocks, model.heads"):
        find_blocks(p.methods["forward"], prefix="model.layers")
