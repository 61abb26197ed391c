"""Capture a decoder LM as a `causal-lm` Program: `prefill` and `decode` methods with an explicit KV cache.

Cache layout: growing past key/values. `prefill(input_ids[B,S], attention_mask[B,S], position_ids[B,S])` returns the
last position's logits [B,1,V] and present_key_i / present_value_i [B,Hkv,S,D]; `decode(input_ids[B,1],
attention_mask[B,P+1], position_ids[B,1], past_key_0, past_value_0, ...)` returns logits [B,1,V] and the presents
grown to P+1. Why growing rather than a static pre-allocated cache: in ONNX Runtime a graph output is a fresh buffer
either way (a static cache is copied whole on every step too), and attention then runs over the P real positions
instead of the whole allocation; Concat lowers to one ORT kernel, and the shapes stay dynamic in batch and length.
"""
from __future__ import annotations

import inspect

import torch
from torch.export import Dim

from ..errors import GraphoptError
from .program import DTYPE_NAMES, Program, TensorSpec

EXAMPLE_BATCH, EXAMPLE_LEN = 2, 8


def is_causal_lm(model) -> bool:
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover
        return False
    return (isinstance(model, PreTrainedModel) and not getattr(model.config, "is_encoder_decoder", False)
            and model.can_generate())


def _cache_kwarg(model) -> str:
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _cache_layout(model) -> tuple[int, list[tuple[int, int]]]:
    """(layers, [(kv_heads, head_dim)] per layer), read from one eager forward rather than from config names."""
    with torch.no_grad():
        out = model(input_ids=torch.zeros(1, 2, dtype=torch.int64), use_cache=True, return_dict=True)
    cache = out["cache"] if "cache" in out else out.get("past_key_values")
    layers = getattr(cache, "layers", None)
    if layers is None:
        raise GraphoptError(f"{type(model).__name__} returned no layered KV cache; --task causal-lm supports "
                            f"transformers decoder models with a DynamicCache")
    return len(layers), [(int(layer.keys.shape[1]), int(layer.keys.shape[3])) for layer in layers]


class _KVStep(torch.nn.Module):
    """One forward over new tokens with the cache passed in and out as flat tensors."""

    def __init__(self, model, n_layers: int, with_past: bool, tree: bool = False):
        super().__init__()
        self.model = model
        self.n_layers = n_layers
        self.with_past = with_past
        self.tree = tree
        self.cache_kwarg = _cache_kwarg(model)
        names = ["input_ids", "tree_mask" if tree else "attention_mask", "position_ids"]
        if with_past:
            names += [f"past_{kv}_{i}" for i in range(n_layers) for kv in ("key", "value")]
        self.input_names = names
        params = [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD) for n in names]
        inner = self._step

        def forward(*args, **kwargs):
            return inner(*args, **kwargs)
        forward.__signature__ = inspect.Signature(params)  # torch.export names graph inputs after these
        self.forward = forward

    def _step(self, input_ids, attention_mask, position_ids, *past):
        from transformers import DynamicCache
        cache = DynamicCache(config=self.model.config)
        for i in range(len(past) // 2):
            cache.update(past[2 * i], past[2 * i + 1], i)
        if self.tree:
            # A 4-D mask [B,1,T,P+T] (1 = may attend) is passed to transformers as an additive float mask, which
            # every attention implementation takes as given (no causal mask is built on top of it).
            dtype = self.model.dtype  # the program's float dtype (--dtype)
            attention_mask = torch.zeros(attention_mask.shape, dtype=dtype).masked_fill(
                attention_mask == 0, torch.finfo(dtype).min)
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         use_cache=True, logits_to_keep=0 if self.tree else 1, return_dict=True,
                         **{self.cache_kwarg: cache})
        presents = []
        cache = out["cache"] if "cache" in out else out["past_key_values"]
        for layer in cache.layers:
            presents += [layer.keys, layer.values]
        return (out.logits, *presents)


def _export(step: _KVStep, examples: tuple, dynamic: list[dict], name: str):
    try:
        with torch.no_grad():
            ep = torch.export.export(step, examples, dynamic_shapes=tuple(dynamic), strict=False)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise GraphoptError(f"torch.export of the {name} step failed: {first} (--verbose shows the trace)") from e
    # Dim.DYNAMIC never raises on a guard; it may specialise instead. A specialised axis would silently reject
    # other sizes at run time, so check every axis we asked for is still symbolic.
    placeholders = {n.name: n for n in ep.graph.nodes if n.op == "placeholder"}
    for input_name, axes in zip(ep.graph_signature.user_inputs, dynamic):
        val = placeholders[input_name].meta["val"]
        for axis in axes:
            if not isinstance(val.shape[axis], torch.SymInt):
                raise GraphoptError(f"torch.export specialised axis {axis} of {name} input '{input_name}' to "
                                    f"{val.shape[axis]}; this model's code branches on that size")
    # Export assumes dynamic sizes are >= 2 (its 0/1 specialisation rule) and the saved program checks that at
    # run time; batch 1, one-token prompts and a one-entry cache are everyday inputs, and the exactness tests run
    # them, so declare the lower bound 1.
    from torch.utils._sympy.value_ranges import ValueRanges
    from .graph_edit import GraphEditor
    relaxed = {sym: ValueRanges(min(1, vr.lower), vr.upper) for sym, vr in ep.range_constraints.items()}
    return GraphEditor(ep).build(range_constraints=relaxed)


def capture_causal_lm(model, source_info: dict, plan_extra: dict | None = None, seed: int = 0,
                      max_batch: int = 64, verify: bool = False) -> Program:
    """prefill + decode; with verify=True also `verify`, a decode over T tokens at once under a 4-D mask (a token
    tree for speculative decoding: each token attends to the cache and its ancestors)."""
    if not is_causal_lm(model):
        raise GraphoptError(f"--task causal-lm needs a transformers decoder model that can generate, not "
                            f"{type(model).__name__}")
    model = model.eval()
    cfg = model.config
    vocab = int(cfg.vocab_size)
    max_len = int(getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None) or 2048)
    n_layers, layout = _cache_layout(model)
    g = torch.Generator().manual_seed(seed)
    B, S, P = EXAMPLE_BATCH, EXAMPLE_LEN, EXAMPLE_LEN
    dyn = Dim.DYNAMIC

    prefill = _KVStep(model, n_layers, with_past=False)
    ids = torch.randint(0, vocab, (B, S), generator=g)
    mask = torch.ones(B, S, dtype=torch.int64)
    pos = torch.arange(S).expand(B, S).contiguous()
    prefill_ex = (ids, mask, pos)
    ep_prefill = _export(prefill, prefill_ex, [{0: dyn, 1: dyn}] * 3, "prefill")

    decode = _KVStep(model, n_layers, with_past=True)
    past = []
    dtype = model.dtype  # the KV cache's dtype is the model's (float32, or --dtype bfloat16/float16)
    for heads, dim in layout:
        past += [torch.randn(B, heads, P, dim, generator=g).to(dtype) for _ in ("key", "value")]
    decode_ex = (torch.randint(0, vocab, (B, 1), generator=g), torch.ones(B, P + 1, dtype=torch.int64),
                 torch.full((B, 1), P, dtype=torch.int64), *past)
    ep_decode = _export(decode, decode_ex, [{0: dyn}, {0: dyn, 1: dyn}, {0: dyn}] + [{0: dyn, 2: dyn}] * len(past),
                        "decode")

    methods = {"prefill": ep_prefill, "decode": ep_decode}
    examples = {"prefill": prefill_ex, "decode": decode_ex}
    if verify:
        T = 4
        step = _KVStep(model, n_layers, with_past=True, tree=True)
        tree = torch.ones(B, 1, T, P + T, dtype=torch.int64)
        tree[:, :, :, P:] = torch.tril(torch.ones(T, T, dtype=torch.int64))
        verify_ex = (torch.randint(0, vocab, (B, T), generator=g), tree,
                     (P + torch.arange(T)).expand(B, T).contiguous(), *past)
        methods["verify"] = _export(step, verify_ex, [{0: dyn, 1: dyn}, {0: dyn, 2: dyn, 3: dyn}, {0: dyn, 1: dyn}]
                                    + [{0: dyn, 2: dyn}] * len(past), "verify")
        examples["verify"] = verify_ex

    kv_specs_in, kv_out_names = [], []
    for i, (heads, dim) in enumerate(layout):
        for kv in ("key", "value"):
            kv_specs_in.append(TensorSpec(f"past_{kv}_{i}", DTYPE_NAMES[dtype], ["B", heads, "P", dim]))
            kv_out_names.append(f"present_{kv}_{i}")
    gen = getattr(model, "generation_config", None)
    plan = {
        "kind": "causal-lm", "prefill": "prefill", "decode": "decode", "cache": "growing-past",
        "num_layers": n_layers, "kv_heads": [h for h, _ in layout], "head_dim": [d for _, d in layout],
        "vocab_size": vocab, "max_length": max_len,
        "eos_token_id": getattr(gen, "eos_token_id", None) if gen is not None else getattr(cfg, "eos_token_id", None),
        "pad_token_id": getattr(gen, "pad_token_id", None) if gen is not None else getattr(cfg, "pad_token_id", None),
        "bos_token_id": getattr(cfg, "bos_token_id", None),
        **(plan_extra or {}),
    }
    inputs = {
            "prefill": [TensorSpec("input_ids", "int64", ["B", "S"]), TensorSpec("attention_mask", "int64", ["B", "S"]),
                        TensorSpec("position_ids", "int64", ["B", "S"])],
            "decode": [TensorSpec("input_ids", "int64", ["B", 1]), TensorSpec("attention_mask", "int64", ["B", "M"]),
                       TensorSpec("position_ids", "int64", ["B", 1])] + kv_specs_in,
    }
    output_names = {"prefill": ["logits"] + kv_out_names, "decode": ["logits"] + kv_out_names}
    if verify:
        plan["verify"] = "verify"
        inputs["verify"] = [TensorSpec("input_ids", "int64", ["B", "T"]),
                            TensorSpec("tree_mask", "int64", ["B", 1, "T", "M"]),
                            TensorSpec("position_ids", "int64", ["B", "T"])] + kv_specs_in
        output_names["verify"] = ["logits"] + kv_out_names
    return Program(
        methods=methods, plan=plan, inputs=inputs, example_inputs=examples,
        dims={"B": [1, max_batch], "S": [1, max_len], "P": [1, max_len - 1], "M": [2, max_len],
              "T": [1, max_len - 1]},
        source=source_info, output_names=output_names,
    )


def prefill_inputs(input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
    """(input_ids, attention_mask, position_ids) as the prefill method takes them (HF's position rule)."""
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    position_ids = (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)
    return input_ids, attention_mask.long(), position_ids


def sequence_inputs(ep, ids: torch.Tensor) -> tuple:
    """A token sequence as the method's inputs: (ids, mask, positions) for a prefill graph, (ids,) for a forward."""
    return prefill_inputs(ids) if len(ep.graph_signature.user_inputs) == 3 else (ids,)
