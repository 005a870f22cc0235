"""Perplexity over fixed token windows (needs only torch; shared by the hubquant and llm-compressor runs)."""
from __future__ import annotations

import math

import torch


@torch.no_grad()
def perplexity(model, ids: torch.Tensor, *, batch_size: int = 8) -> float:
    """exp(mean next-token NLL) over every window in ids [n, L] (each window scored on its own)."""
    total, count = 0.0, 0
    for i in range(0, ids.shape[0], batch_size):
        x = ids[i: i + batch_size]
        logits = model(input_ids=x).logits.float()
        nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1),
                                                reduction="sum")
        total += float(nll)
        count += x[:, 1:].numel()
    return math.exp(total / count)


def peak_rss_mib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def prepare_data(work, model_dir, *, calib: tuple[str, int, int], eval_windows: int, eval_len: int) -> dict:
    """Calibration windows (checked disjoint from the eval text) and eval windows spread over the Lee news
    corpus, saved as work/calib_ids.pt and work/eval_ids.pt: the same data for every tool in a run."""
    from transformers import AutoTokenizer

    from hubquant.calibration import build_calibration, check_disjoint
    from hubquant.textdata import load_texts

    tok = AutoTokenizer.from_pretrained(model_dir)
    cal = build_calibration(tok, spec=calib[0], num_samples=calib[1], seq_len=calib[2], seed=0)
    ev = load_texts("lee-news")
    check_disjoint(cal, ev)
    flat: list[int] = []
    for ids in tok(list(ev.texts), add_special_tokens=False)["input_ids"]:
        flat += ids + [tok.eos_token_id]
    n_win = len(flat) // eval_len
    step = max(1, n_win // eval_windows)  # windows spread over the whole corpus
    data = torch.tensor(flat)
    eval_ids = torch.stack([data[i * eval_len:(i + 1) * eval_len] for i in range(0, n_win, step)][:eval_windows])
    torch.save(cal.ids, work / "calib_ids.pt")
    torch.save(eval_ids, work / "eval_ids.pt")
    return {"calib": cal.description, "eval": f"{ev.description}: {eval_ids.shape[0]} x {eval_len} tokens",
            "calib_ids": cal.ids, "eval_ids": eval_ids}
