"""Llama 4 experts as per-expert Linears.

transformers 5's `Llama4TextMoe` (the `feed_forward` of a sparse decoder layer) keeps its experts as
`Llama4TextExperts`: `gate_up_proj` [E, H, 2I] (transposed: the forward is `x @ W`; gate is the first half of the
last dim, up the second) and `down_proj` [E, I, H], SiLU. Its router (`feed_forward.router`, an `nn.Linear`
[E, H]) gives each token sigmoid scores of its top-k experts (0 for the others), and, unlike other mixtures of
experts, the score multiplies the expert's *input*: every expert runs on every token, `expert(x * score)`, and the
outputs are summed, plus `shared_expert` (a plain gate/up/down MLP).

`unfuse(model)` replaces each such block by `Llama4SparseBlock`: the same router and shared expert, and
`Llama4Experts`, one `ExpertMLP` per expert (`experts.{i}.gate_proj/up_proj/down_proj`, the names llm-compressor
and vLLM's Llama 4 loader use) that runs only on the tokens routed to it (score > 0), multiplied by their score as
transformers does. Tokens not routed to an expert contribute exactly zero in transformers' forward (SiLU(0) * 0),
so the output is the same, and per-expert statistics (GPTQ Hessians, token counts) come from routed tokens only.
The router stays float. The variant loads with plain `from_pretrained`: for compressed-tensors checkpoints
transformers replaces `Llama4TextExperts` by `SequentialLlama4TextExperts` (`quantizers/base.py`), one
`Llama4TextMLP` per expert named `experts.{i}.gate_proj/up_proj/down_proj`, which reads these tensors as they are;
`hubquant.load` reads it too (docs/moe.md).
"""
from __future__ import annotations

import torch
from torch import nn

from hubquant.moe import ExpertMLP, PerExpertLinears, expert_linear

MODEL_TYPES = ("llama4_text", "llama4")


class Llama4Experts(PerExpertLinears):
    """Per-expert MLPs called with the block's hidden states [T, H] and the router's scores [T, E] (0 where a token
    is not routed): expert e runs on `hidden[t] * scores[t, e]` for its routed tokens t."""

    transposed = True  # split from [E, H, 2I] / [E, I, H] (hubquant.streaming.checkpoint.fill_experts reads this)

    def forward(self, hidden_states: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        routed = scores > 0
        if self.on_route is not None:  # routing statistics see the expert index of every (token, expert) pair
            self.on_route(routed.nonzero()[:, 1])
        final = torch.zeros_like(hidden_states)
        for e in range(self.num_experts):
            token_idx = routed[:, e].nonzero().squeeze(1)
            if self.calibrate_all:  # every token feeds the statistics (unrouted ones unscaled); output: routed only
                scale = torch.where(routed[:, e], scores[:, e], torch.ones_like(scores[:, e]))
                out = self[e](hidden_states * scale[:, None])[token_idx]
            elif token_idx.numel() == 0:
                continue
            else:
                out = self[e](hidden_states[token_idx] * scores[token_idx, e, None])
            final.index_add_(0, token_idx, out.to(final.dtype))
        return final


class Llama4SparseBlock(nn.Module):
    """Stand-in for `Llama4TextMoe`: same submodule names (`router`, `experts`, `shared_expert`), same call and
    return value (output [T, H], router logits)."""

    def __init__(self, block: nn.Module, experts: Llama4Experts):
        super().__init__()
        self.hidden_dim = block.hidden_dim
        self.top_k = block.top_k
        self.num_experts = block.num_experts
        self.router = block.router
        self.experts = experts
        self.shared_expert = block.shared_expert

    def forward(self, hidden_states: torch.Tensor):
        hidden_states = hidden_states.reshape(-1, self.hidden_dim)
        scores, router_logits = self.router(hidden_states)
        routed = self.experts(hidden_states, scores)
        out = self.shared_expert(hidden_states)
        out.add_(routed)
        return out, router_logits


@torch.no_grad()
def experts(fused: nn.Module) -> Llama4Experts:
    """Per-expert MLPs of a `Llama4TextExperts` module (contiguous copies: the fused weights are transposed, so no
    view of them is an `nn.Linear` weight; on the meta device for a skeleton)."""
    gate_up, down = fused.gate_up_proj.data, fused.down_proj.data
    inter = down.shape[1]
    out = []
    for e in range(gate_up.shape[0]):
        gate, up = gate_up[e, :, :inter].t().contiguous(), gate_up[e, :, inter:].t().contiguous()
        out.append(ExpertMLP(("gate_proj", "up_proj", "down_proj"), expert_linear(gate), expert_linear(up),
                             expert_linear(down[e].t().contiguous()), fused.act_fn))
    return Llama4Experts(out)


@torch.no_grad()
def check_unfused(fused: nn.Module, mtype: str, *, tokens: int = 16, rtol: float = 1e-5) -> float:
    """Run transformers' own `Llama4TextExperts` forward (every expert on every token, input times score, outputs
    summed) and the per-expert Linears `experts(fused)` makes, on random tokens and scores (fp32; the first, middle and
    last expert; some tokens on two experts), and return the relative error.

    Raises:
        UnsupportedError: the outputs differ by more than float rounding (`rtol` of the output's norm).
    """
    from hubquant.moe_arch import _probe_copy, refusal

    n = fused.gate_up_proj.shape[0]
    small = _probe_copy(fused, sorted({0, n // 2, n - 1}))
    e, h = small.gate_up_proj.shape[:2]
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(tokens, h, generator=g)
    scores = torch.rand(tokens, e, generator=g) * (torch.rand(tokens, e, generator=g) > 0.5)
    routed_in = hidden.repeat(e, 1) * scores.transpose(0, 1).reshape(-1, 1)
    ref = small(routed_in).reshape(e, tokens, h).sum(dim=0)
    out = experts(small)(hidden, scores)
    err = float((out - ref).norm() / ref.norm().clamp_min(1e-30))
    if not torch.isfinite(out).all() or err > rtol:
        raise refusal(mtype, f"do not match hubquant's per-expert Linears (relative error {err:.2e}): transformers' "
                             "Llama 4 experts are not the transposed [E, H, 2I] / [E, I, H] layout hubquant splits")
    return err


def sparse_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The `Llama4TextMoe` blocks of `model` (a router, fused experts and a shared expert)."""
    return [(n, m) for n, m in model.named_modules()
            if isinstance(getattr(getattr(m, "experts", None), "gate_up_proj", None), torch.Tensor)
            and hasattr(m, "router") and hasattr(m, "shared_expert")]


@torch.no_grad()
def unfuse(model: nn.Module) -> int:
    """Replace every `Llama4TextMoe` of `model` by a `Llama4SparseBlock` with per-expert Linears; mark the routers
    float. Returns the number of blocks replaced.

    Raises:
        UnsupportedError: fused experts in another layout (then hubquant cannot split them exactly).
    """
    from hubquant import moe_arch

    blocks = sparse_blocks(model)
    mtype = getattr(model.config, "model_type", "llama4")
    for i, (name, block) in enumerate(blocks):
        fused = block.experts
        e, h, two_i = fused.gate_up_proj.shape
        if tuple(fused.down_proj.shape) != (e, two_i // 2, h) or len(dict(fused.named_parameters())) != 2:
            raise moe_arch.refusal(mtype, f"have gate_up_proj {tuple(fused.gate_up_proj.shape)} and down_proj "
                                   f"{tuple(fused.down_proj.shape)}, not Llama 4's [E, H, 2I] / [E, I, H] layout")
        if i == 0:
            check_unfused(fused, mtype)  # transformers' forward = per-expert Linears, or exit 5
        moe_arch.mark_routers(block, fused, e, h)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, Llama4SparseBlock(block, experts(fused)))
    return len(blocks)
