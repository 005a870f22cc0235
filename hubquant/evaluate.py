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


@torch.no_grad()
def perplexity(model, eval_set: EvalSet, *, batch_size: int = 2, progress: bool = True,
               keep_logprobs: int = 0) -> tuple[float, torch.Tensor | None]:
    """exp(mean next-token NLL) over every window. Optionally keep log-probs of the first `keep_logprobs`
    windows (bf16) for agreement/KL."""
    dev = _device_of(model)
    nll, count, kept = 0.0, 0, []
    batches = eval_set.ids.split(batch_size)
    for batch in tqdm(batches, desc="eval: perplexity", disable=not progress, leave=False):
        logits = model(batch.to(dev)).logits.float()
        lp = F.log_softmax(logits[:, :-1], dim=-1)
        target = batch[:, 1:].to(dev)
        nll -= lp.gather(-1, target.unsqueeze(-1)).sum().item()
        count += target.numel()
        if sum(k.shape[0] for k in kept) < keep_logprobs:
            kept.append(lp.to(torch.bfloat16).cpu())
        del logits, lp
    logprobs = torch.cat(kept)[:keep_logprobs] if kept else None
    return math.exp(nll / count), logprobs


def reference(model, eval_set: EvalSet, *, n_prompts: int = 4, progress: bool = True) -> Reference:
    t0 = time.time()
    ppl, lp = perplexity(model, eval_set, progress=progress, keep_logprobs=n_prompts)
    return Reference(perplexity=ppl, logprobs=lp, seconds=time.time() - t0)


@torch.no_grad()
def compare(model, eval_set: EvalSet, ref: Reference, *, progress: bool = True) -> Comparison:
    """The variant (already in `model`) against the base's reference numbers."""
    ppl, lp = perplexity(model, eval_set, progress=progress, keep_logprobs=ref.logprobs.shape[0])
    agree_sum = kl_sum = 0.0
    for b16, v16 in zip(ref.logprobs, lp):  # one window at a time: a few [L, vocab] fp32 temporaries, not n_prompts
        base, var = b16.float(), v16.float()
        agree_sum += (base.argmax(-1) == var.argmax(-1)).float().sum().item()
        # KL(base || variant) per position, averaged
        kl_sum += (base.exp() * (base - var)).sum(-1).clamp(min=0).sum().item()
        del base, var
    n = lp.shape[0] * lp.shape[1]
    agree, kl = agree_sum / n, kl_sum / n
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
