import pytest
import torch
from hqspace.compare import metrics_markdown, run_comparison, tradeoff_plot
from hqspace.discover import ModelEntry
from hqspace.metrics import mean_kl, token_agreement
from hqspace.runner import LoadedModel, ModelCache, Stream, load_model, module_bytes, prompt_ids

from tests.helpers import save_tiny_repo


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory, tokenizer):
    """A tiny Llama and a copy with noisy weights (a stand-in for a quantized variant)."""
    root = tmp_path_factory.mktemp("tiny")
    base = save_tiny_repo(root / "base", "llama", tokenizer, seed=1, dtype=torch.float32)
    noisy = root / "noisy"
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(base)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith("proj.weight"):
                p.add_(torch.randn(p.shape, generator=g) * p.std() * 0.3)
    m.save_pretrained(noisy)
    tokenizer.save_pretrained(noisy)
    return base, noisy


def test_stream_is_greedy_decoding(tiny_pair):
    lm = load_model(tiny_pair[0], "t/base")
    ids = prompt_ids(lm.tokenizer, "Tell me about the sea.")
    s = Stream(loaded=lm, prompt=ids, max_new_tokens=12)
    while not s.done:
        s.step()
    ref = lm.model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=12, pad_token_id=0)[0, len(ids):]
    ref = [t for t in ref.tolist() if t not in s._eos]
    assert s.tokens == ref
    assert s.ttft is not None and 0 < s.ttft <= s.seconds


def test_prompt_goes_through_the_chat_template(tokenizer):
    ids = prompt_ids(tokenizer, "hi")
    text = tokenizer.decode(ids)
    assert text.startswith("<|im_start|>system") and text.endswith("<|im_start|>assistant\n")


def test_cache_keeps_models_within_the_memory_bound():
    loads = []

    def loader(repo):
        loads.append(repo)
        m = torch.nn.Linear(250, 1000, bias=False)  # 1 MB of float32
        return LoadedModel(repo_id=repo, model=m, tokenizer=None, memory_bytes=module_bytes(m), disk_bytes=0,
                           load_seconds=0.0, loader="test")

    cache = ModelCache(int(2.5e6), loader=loader)
    for repo in ("a", "b", "a", "c"):  # "a" was used after "b", so "b" is the one dropped
        cache.get(repo)
    assert cache.keys() == ["a", "c"] and cache.total_bytes == 2_000_000
    cache.get("a")
    assert loads == ["a", "b", "c"]
    # one model over the bound still stays (the one in use)
    tiny = ModelCache(10, loader=loader)
    tiny.get("x")
    tiny.get("y")
    assert tiny.keys() == ["y"]


def test_comparison_numbers_match_an_independent_computation(tiny_pair):
    base, noisy = tiny_pair
    paths = {"t/base": base, "t/noisy": noisy}
    cache = ModelCache(int(1e9), loader=lambda repo: load_model(paths[repo], repo))
    entries = [ModelEntry(repo_id="t/base", perplexity=20.0),
               ModelEntry(repo_id="t/noisy", base="t/base", perplexity=25.0, base_perplexity=20.0)]
    prompt = "Write a short poem about rivers."
    *_, final = run_comparison(entries, prompt, cache=cache, max_new_tokens=16)

    # independent: plain greedy generate and one teacher-forced pass per model
    lm_b, lm_n = cache.get("t/base"), cache.get("t/noisy")
    ids = prompt_ids(lm_b.tokenizer, prompt)
    outs = []
    for lm in (lm_b, lm_n):
        s = Stream(loaded=lm, prompt=ids, max_new_tokens=16)
        while not s.done:
            s.step()
        outs.append(s.tokens)
    seq = torch.tensor([ids + outs[0]])
    with torch.no_grad():
        kl = mean_kl(lm_b.model(seq).logits[0], lm_n.model(seq).logits[0])

    b, n = final
    assert b.agreement_pct == 100.0 and b.mean_kl == 0.0
    assert n.agreement_pct == pytest.approx(token_agreement(outs[0], outs[1]))
    assert n.mean_kl == pytest.approx(kl, rel=1e-4) and n.mean_kl > 1e-3
    assert b.text == lm_b.tokenizer.decode(outs[0], skip_special_tokens=True)
    assert b.disk_mb == pytest.approx(sum(f.stat().st_size for f in base.glob("*.safetensors")) / 1e6)
    assert n.memory_mb == pytest.approx(module_bytes(lm_n.model) / 1e6)
    for p in final:
        assert p.ttft_ms > 0 and (p.n_tokens <= 1 or p.tokens_per_s > 0)
        md = metrics_markdown(p)
        assert f"Size on disk: {p.disk_mb:.1f} MB" in md and "tokens/s" in md
    fig = tradeoff_plot(final)
    assert n.ppl_change_pct == pytest.approx(25.0) and b.ppl_change_pct == 0.0
    assert "Perplexity change (card): +25.0 %" in metrics_markdown(n)
    assert fig.axes[0].get_ylabel().startswith("perplexity change")


def test_stream_stops_at_the_chat_templates_end_of_turn(tokenizer, tmp_path):
    """eos is <|endoftext|> in this model; the Space's prompts go through the chat template, whose <|im_end|> ends
    the reply (before, the stream ran on into "system ...")."""
    from tests.runtime.test_chat_stop import scripted_chat_model

    paris, im_end, system = scripted_chat_model(tokenizer, tmp_path)
    lm = load_model(tmp_path, "t/scripted")
    s = Stream(loaded=lm, prompt=prompt_ids(lm.tokenizer, "Capital of France?"), max_new_tokens=6)
    while not s.done:
        s.step()
    assert s.tokens == [paris] and s.text.strip() == "Paris"
