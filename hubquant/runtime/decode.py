"""Fast greedy decoding for Llama-like models: a static KV cache and one CUDA graph per decode step.

Small-batch decoding is bound by streaming the weights; Python and launch overheads would hide the kernels'
gains, so each decode step (all layers, argmax, position update) is captured once and replayed. The model's
own modules run the step (quantized Linears, norms, rotary embedding, MLP); only attention over the static
cache is written here. On CPU the same step runs eagerly (no graph). A decoder runs `batch` sequences side by side
(prompts of one length, so every sequence is at the same position): each Linear then sees M = batch rows.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn

from hubquant.errors import UnsupportedError

ARCHS = ("llama", "mistral", "qwen2")


def supports(model: nn.Module) -> bool:
    """True for architectures whose decoder layers this module knows how to run."""
    cfg = getattr(model, "config", None)
    inner = getattr(model, "model", None)
    return (getattr(cfg, "model_type", None) in ARCHS and inner is not None and hasattr(inner, "layers")
            and hasattr(inner, "rotary_emb") and hasattr(model, "lm_head"))


@dataclass(frozen=True, kw_only=True)
class FusedLayer:
    """One decoder layer's fused pieces: q/k/v and gate/up Linears, norm (weight, eps) pairs, the MLP activation."""

    qkv: nn.Module
    gate_up: nn.Module
    inter: int
    silu: bool
    act: nn.Module
    norm_in: tuple[torch.Tensor, float]
    norm_post: tuple[torch.Tensor, float]


class _Cat(nn.Module):
    """Fallback when Linears cannot be fused: the parts' outputs side by side."""

    def __init__(self, mods: list[nn.Module]):
        super().__init__()
        self.parts = nn.ModuleList(mods)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([m(x) for m in self.parts], -1)


def _norm(mod: nn.Module) -> tuple[torch.Tensor, float]:
    eps = getattr(mod, "variance_epsilon", None) or getattr(mod, "eps", None) or 1e-6
    return mod.weight, float(eps)


def fused_layers(model: nn.Module) -> list[FusedLayer]:
    """Fused q/k/v and gate/up modules per layer (new weights: concatenated copies of the originals)."""
    from hubquant.runtime.fuse import fuse_linears

    out = []
    for layer in model.model.layers:
        a, m = layer.self_attn, layer.mlp
        qkv = fuse_linears([a.q_proj, a.k_proj, a.v_proj]) or _Cat([a.q_proj, a.k_proj, a.v_proj])
        gate_up = fuse_linears([m.gate_proj, m.up_proj]) or _Cat([m.gate_proj, m.up_proj])
        act = getattr(m, "act_fn", nn.SiLU())
        out.append(FusedLayer(qkv=qkv, gate_up=gate_up, inter=m.gate_proj.out_features,
                              silu=type(act).__name__ in ("SiLU", "SiLUActivation"), act=act,
                              norm_in=_norm(layer.input_layernorm), norm_post=_norm(layer.post_attention_layernorm)))
    return out


@dataclass(frozen=True, kw_only=True)
class DecodeResult:
    tokens: list[int]
    prefill_seconds: float
    decode_seconds: float
    new_tokens: int
    batch: int = 1
    all_tokens: list[list[int]] | None = None  # every sequence's new tokens (tokens is the first's)

    @property
    def tokens_per_second(self) -> float:
        """New tokens of all sequences per second of decoding."""
        return self.batch * self.new_tokens / self.decode_seconds if self.decode_seconds > 0 else float("inf")


class GraphDecoder:
    """Greedy generation of `batch` sequences with a static cache (CUDA graph replay on GPU, eager on CPU)."""

    def __init__(self, model: nn.Module, max_len: int = 1024, *, fuse: bool = True, batch: int = 1):
        if not supports(model):
            arch = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
            raise UnsupportedError(f"the fast decoder does not know {arch}",
                                   hint=f"it runs {', '.join(ARCHS)}; use model.generate for other architectures")
        self.model = model
        cfg = model.config
        p = next(model.model.embed_tokens.parameters())
        self.device, self.dtype = p.device, p.dtype
        self.n_heads = cfg.num_attention_heads
        self.n_kv = getattr(cfg, "num_key_value_heads", None) or self.n_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.n_heads
        self.max_len, self.batch = max_len, batch
        shape = (batch, self.n_kv, max_len, self.head_dim)
        n_layers = len(model.model.layers)
        self.k = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(n_layers)]
        self.v = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(n_layers)]
        self.slots = torch.arange(max_len, device=self.device)
        # static inputs/outputs of the captured step
        self.tok = torch.zeros(batch, 1, dtype=torch.long, device=self.device)
        self.pos = torch.zeros(1, dtype=torch.long, device=self.device)
        self.out = torch.zeros(batch, max_len, dtype=torch.long, device=self.device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.fused = fused_layers(model) if fuse else None
        self.final_norm = _norm(model.model.norm)

    def forward(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Last-position logits [B, V] for ids [B, T] at cache positions [T] (fills the cache)."""
        if self.fused is not None:
            return self._forward_fused(ids, positions)
        return self._forward(ids, positions)

    @torch.no_grad()
    def _forward(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        inner = self.model.model
        b, t = ids.shape
        h = inner.embed_tokens(ids)
        cos, sin = inner.rotary_emb(h, positions[None])
        mask = (self.slots[None, :] <= positions[:, None])[None, None]  # [1, 1, T, max_len]
        for i, layer in enumerate(inner.layers):
            attn = layer.self_attn
            x = layer.input_layernorm(h)
            q = attn.q_proj(x).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
            k = attn.k_proj(x).view(b, t, self.n_kv, self.head_dim).transpose(1, 2)
            v = attn.v_proj(x).view(b, t, self.n_kv, self.head_dim).transpose(1, 2)
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            self.k[i].index_copy_(2, positions, k)
            self.v[i].index_copy_(2, positions, v)
            o = nn.functional.scaled_dot_product_attention(q, self.k[i], self.v[i], attn_mask=mask,
                                                           enable_gqa=self.n_kv != self.n_heads)
            h = h + attn.o_proj(o.transpose(1, 2).reshape(b, t, self.n_heads * self.head_dim))
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        return self.model.lm_head(inner.norm(h[:, -1:]))[:, -1]

    @torch.no_grad()
    def _forward_fused(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """_forward with q/k/v and gate/up fused, residual add + RMSNorm, SiLU * up, rotary + cache in one launch
        each."""
        from hubquant_kernels import fused as kf

        inner = self.model.model
        b, t = ids.shape
        h = inner.embed_tokens(ids)
        cos, sin = inner.rotary_emb(h, positions[None])
        mask = (self.slots[None, :] <= positions[:, None])[None, None]
        layers = self.fused
        x, h = kf.add_rmsnorm(h, *layers[0].norm_in)
        for i, (layer, f) in enumerate(zip(inner.layers, layers)):
            attn = layer.self_attn
            q = kf.rope_to_cache(f.qkv(x).view(b * t, -1), cos[0], sin[0], positions, self.k[i], self.v[i],
                                 self.n_heads, self.n_kv)
            o = nn.functional.scaled_dot_product_attention(q, self.k[i], self.v[i], attn_mask=mask,
                                                           enable_gqa=self.n_kv != self.n_heads)
            o = attn.o_proj(o.transpose(1, 2).reshape(b, t, self.n_heads * self.head_dim))
            x, h = kf.add_rmsnorm(o, *f.norm_post, residual=h)
            gu = f.gate_up(x)
            a = kf.silu_mul(gu) if f.silu else f.act(gu[..., :f.inter]) * gu[..., f.inter:]
            nxt = layers[i + 1].norm_in if i + 1 < len(layers) else self.final_norm
            x, h = kf.add_rmsnorm(layer.mlp.down_proj(a), *nxt, residual=h)
        return self.model.lm_head(x[:, -1:])[:, -1]

    def _step(self) -> None:
        """One decode step on the static tensors: logits -> argmax -> next token, position + 1."""
        nxt = self.forward(self.tok, self.pos).argmax(-1)
        self.out.index_copy_(1, self.pos, nxt.view(-1, 1))
        self.tok.copy_(nxt.view(-1, 1))
        self.pos.add_(1)

    def _capture(self) -> None:
        # warm up on a side stream (tunes every kernel for M=1 and allocates workspaces), then capture
        pos0, tok0 = self.pos.clone(), self.tok.clone()
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(2):
                self._step()
        torch.cuda.current_stream().wait_stream(s)
        self.pos.copy_(pos0)
        self.tok.copy_(tok0)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self._step()
        self.pos.copy_(pos0)
        self.tok.copy_(tok0)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, *, use_graph: bool = True) -> DecodeResult:
        """Greedy continuation of input_ids [B, T] (or one prompt [T] / [1, T], repeated for every sequence);
        times prefill and decode separately."""
        ids = input_ids.reshape(-1, input_ids.shape[-1]).to(self.device)
        if ids.shape[0] != self.batch:
            if ids.shape[0] != 1:
                raise UnsupportedError(f"{ids.shape[0]} prompts for a decoder of batch {self.batch}",
                                       hint="pass one prompt or as many as the GraphDecoder's batch")
            ids = ids.expand(self.batch, -1)
        t = ids.shape[1]
        if t + max_new_tokens > self.max_len:
            raise UnsupportedError(f"{t} prompt + {max_new_tokens} new tokens exceed the cache of {self.max_len}",
                                   hint="build the GraphDecoder with a larger max_len")
        cuda = self.device.type == "cuda"
        sync = torch.cuda.synchronize if cuda else (lambda: None)
        t0 = time.perf_counter()
        positions = torch.arange(t, device=self.device)
        first = self.forward(ids, positions).argmax(-1)
        self.tok.copy_(first.view(-1, 1))
        self.pos.fill_(t)
        self.out[:, t - 1] = first
        sync()
        t1 = time.perf_counter()
        n = max_new_tokens - 1
        if cuda and use_graph and n > 0:
            if self.graph is None:
                self._capture()
                t1 = time.perf_counter()
            for _ in range(n):
                self.graph.replay()
        else:
            for _ in range(n):
                self._step()
        sync()
        t2 = time.perf_counter()
        new = self.out[:, t - 1: t - 1 + max_new_tokens].tolist()
        return DecodeResult(tokens=new[0], prefill_seconds=t1 - t0, decode_seconds=t2 - t1, new_tokens=max(n, 0),
                            batch=self.batch, all_tokens=new)
