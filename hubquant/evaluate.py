"""Measured quality of a variant against its base: perplexity on held-out text, next-token agreement and KL,
size on disk. The eval text never comes from the calibration source (the pipeline checks it)."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm


@dataclass(frozen=True, kw_only=True)
class EvalSet:
    """Non-overlapping windows of held-out text, tokenized once."""

    ids: torch.Tensor  # [n, seq_len]
    spec: str
    description: str

    @property
    def n_tokens(self) -> int:
        return int(self.ids.numel())


def build_eval_set(tokenizer, texts, *, spec: str, description: str, n_windows: int = 8, seq_len: int = 512) -> EvalSet:
    """Concatenate documents (EOS between them) and cut the first `n_windows` windows of `seq_len` tokens."""
    eos = tokenizer.eos_token_id
    buf: list[int] = []
    need = n_windows * seq_len
    for text in texts:
        buf.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        if eos is not None:
            buf.append(eos)
        if len(buf) >= need:
            break
    n = min(n_windows, len(buf) // seq_len)
    if n == 0:
        from hubquant.errors import UsageError

        raise UsageError(f"the eval text {spec} has fewer than {seq_len} tokens", hint="use a larger eval dataset")
    ids = torch.tensor(buf[: n * seq_len], dtype=torch.long).reshape(n, seq_len)
    return EvalSet(ids=ids, spec=spec, description=description)


@dataclass
class Reference:
    """The base model's numbers and next-token distributions, computed once before quantization."""

    perplexity: float
    logprobs: torch.Tensor  # [n_prompts, L, vocab] in bfloat16
    seconds: float


@dataclass
class Comparison:
    base_perplexity: float
    perplexity: float
    top1_agreement: float
    mean_kl: float
    eval_tokens: int
    metrics: dict = field(default_factory=dict)

    @property
    def ppl_increase_pct(self) -> float:
        return 100.0 * (self.perplexity / self.base_perplexity - 1.0)

    def as_dict(self) -> dict:
        return {
            "base_perplexity": round(self.base_perplexity, 4), "perplexity": round(self.perplexity, 4),
            "ppl_increase_pct": round(self.ppl_increase_pct, 3), "top1_agreement": round(self.top1_agreement, 4),
            "mean_kl": round(self.mean_kl, 5), "eval_tokens": self.eval_tokens, **self.metrics,
        }


def _device_of(model) -> torch.device:
    return next(model.parameters()).device


TOKEN_CHUNK = 128  # positions whose logits exist at a time (vocabulary x chunk, not vocabulary x window)


class _Once(torch.nn.Module):
    """Stands in for the decoder while one batch's logits are taken chunk by chunk: runs it on the first call,
    returns that output on the later ones."""

    def __init__(self, inner: torch.nn.Module):
        super().__init__()
        self.inner = inner
        self.out = None

    def forward(self, *args, **kwargs):
        if self.out is None:
            self.out = self.inner(*args, **kwargs)
        return self.out


def _decoder_attr(model) -> str | None:
    """The attribute of `model` that holds the decoder, when its forward takes `logits_to_keep` (the logits are
    then taken a chunk of positions at a time); None: whole windows."""
    import inspect

    name = getattr(model, "base_model_prefix", None)
    try:
        takes = "logits_to_keep" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        takes = False
    return name if takes and isinstance(getattr(model, name or "", None), torch.nn.Module) else None


def _logprobs(model, batch: torch.Tensor, chunk: int):
    """(first position, log-probs [B, n, vocab] fp32) of the next token at every position but the last, `chunk`
    positions at a time: the decoder runs once, lm_head (with the model's own logit scaling) once per chunk."""
    attr = _decoder_attr(model) if chunk else None
    n = batch.shape[1] - 1
    if attr is None or n <= chunk:
        yield 0, F.log_softmax(model(batch).logits.float()[:, :-1], dim=-1)
        return
    inner = getattr(model, attr)
    setattr(model, attr, _Once(inner))
    try:
        for s in range(0, n, chunk):
            keep = torch.arange(s, min(s + chunk, n), device=batch.device)
            yield s, F.log_softmax(model(batch, logits_to_keep=keep).logits.float(), dim=-1)
    finally:
        setattr(model, attr, inner)


@torch.no_grad()
def perplexity(model, eval_set: EvalSet, *, batch_size: int = 2, progress: bool = True, keep_logprobs: int = 0,
               on_logprobs=None, chunk: int = TOKEN_CHUNK) -> tuple[float, torch.Tensor | None]:
    """exp(mean next-token NLL) over every window. Optionally keep log-probs of the first `keep_logprobs`
    windows (bf16) for agreement/KL, or hand each of them to `on_logprobs(window, logprobs_bf16)` instead.

    The logits are taken `chunk` positions at a time (0: whole windows); the numbers are the same."""
    dev = _device_of(model)
    nll, count, kept, window = 0.0, 0, None, 0
    batches = eval_set.ids.split(batch_size)
    for batch in tqdm(batches, desc="eval: perplexity", disable=not progress, leave=False):
        batch = batch.to(dev)
        b, n = batch.shape[0], batch.shape[1] - 1
        picked = torch.empty(b, n, 1, device=dev)
        keep = max(0, min(b, keep_logprobs - window))
        lp16 = None
        for s, lp in _logprobs(model, batch, chunk):
            e = s + lp.shape[1]
            picked[:, s:e] = lp.gather(-1, batch[:, s + 1: e + 1].unsqueeze(-1))
            if keep:
                if lp16 is None:
                    lp16 = torch.empty(keep, n, lp.shape[-1], dtype=torch.bfloat16)
                lp16[:, s:e] = lp[:keep].to(torch.bfloat16).cpu()
            del lp
        nll -= picked.sum().item()
        count += picked.numel()
        if lp16 is not None:
            if on_logprobs is not None:
                for i in range(keep):
                    on_logprobs(window + i, lp16[i])
            else:
                if kept is None:
                    rows = min(keep_logprobs, eval_set.ids.shape[0])
                    kept = torch.empty(rows, n, lp16.shape[-1], dtype=torch.bfloat16)
                kept[window: window + keep] = lp16
            del lp16
        window += b
    return math.exp(nll / count), kept


def reference(model, eval_set: EvalSet, *, n_prompts: int = 4, progress: bool = True) -> Reference:
    t0 = time.time()
    ppl, lp = perplexity(model, eval_set, progress=progress, keep_logprobs=n_prompts)
    return Reference(perplexity=ppl, logprobs=lp, seconds=time.time() - t0)


@torch.no_grad()
def compare(model, eval_set: EvalSet, ref: Reference, *, progress: bool = True) -> Comparison:
    """The variant (already in `model`) against the base's reference numbers. Agreement and KL are taken window
    by window as the variant's log-probs come (a few [L, vocab] fp32 temporaries, not every window's)."""
    sums = [0.0, 0.0]

    def visit(i: int, v16: torch.Tensor) -> None:
        same = torch.empty(v16.shape[0])
        kl = torch.empty(v16.shape[0])
        for r in range(0, v16.shape[0], TOKEN_CHUNK):  # per position, then summed over the window as one vector
            base, var = ref.logprobs[i][r: r + TOKEN_CHUNK].float(), v16[r: r + TOKEN_CHUNK].float()
            same[r: r + TOKEN_CHUNK] = (base.argmax(-1) == var.argmax(-1)).float()
            kl[r: r + TOKEN_CHUNK] = (base.exp() * (base - var)).sum(-1)  # KL(base || variant) per position
            del base, var
        sums[0] += same.sum().item()
        sums[1] += kl.clamp(min=0).sum().item()

    ppl, _ = perplexity(model, eval_set, progress=progress, keep_logprobs=ref.logprobs.shape[0], on_logprobs=visit)
    n = ref.logprobs.shape[0] * ref.logprobs.shape[1]
    agree, kl = sums[0] / n, sums[1] / n
    return Comparison(base_perplexity=ref.perplexity, perplexity=ppl, top1_agreement=agree, mean_kl=kl,
                      eval_tokens=eval_set.n_tokens)


def on_device(model, device: str, log=print):
    """Context: the model on `device` for evaluation when it fits in 90% of free GPU memory, else where it is."""
    import contextlib

    @contextlib.contextmanager
    def ctx():
        if not str(device).startswith("cuda") or not torch.cuda.is_available():
            yield
            return
        need = sum(p.numel() * p.element_size() for p in model.parameters())
        free, _ = torch.cuda.mem_get_info(torch.device(device))
        if need > 0.9 * free:
            log(f"evaluating on CPU: the model ({need / 1e9:.1f} GB) does not fit in free GPU memory "
                f"({free / 1e9:.1f} GB); pass --skip-eval to skip")
            yield
            return
        model.to(device)
        try:
            yield
        finally:
            model.to("cpu")
            torch.cuda.empty_cache()

    return ctx()


def folder_size(path: Path, patterns=("*.safetensors", "*.gguf")) -> int:
    return sum(f.stat().st_size for p in patterns for f in Path(path).glob(p))
