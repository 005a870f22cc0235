"""The layer-sequential engine: exact layer inputs/outputs, causal attention, statistics, rerun semantics,
memory placement, and the callback API SmoothQuant uses."""
import torch

from hubquant.engine import run_layers
from tests.helpers import tiny_model


def _ids(n=2, L=48, seed=0):
    return torch.randint(0, 1000, (n, L), generator=torch.Generator().manual_seed(seed))


def test_layer_outputs_match_the_model_and_stay_causal():
    model = tiny_model("llama", vocab=1000, layers=3)
    ids = _ids()
    outs = {}

    def keep(work):
        work.forward()
        outs[work.index] = torch.cat(work.outputs)

    run_layers(model, ids, on_layer=keep, rerun=False, progress=False, tokens_per_batch=48)  # 2 batches
    with torch.no_grad():
        hs = model(ids, output_hidden_states=True).hidden_states
    for i in range(2):  # the last hidden state is normed by the model
        torch.testing.assert_close(outs[i], hs[i + 1], rtol=1e-5, atol=1e-5)
    ids2 = ids.clone()
    ids2[:, -1] = (ids2[:, -1] + 1) % 1000
    outs2 = {}
    run_layers(model, ids2, on_layer=lambda w: (w.forward(), outs2.__setitem__(w.index, torch.cat(w.outputs))),
               rerun=False, progress=False)
    assert torch.equal(outs[2][:, :-1], outs2[2][:, :-1])


def test_collect_statistics_are_exact():
    model = tiny_model("qwen2", vocab=1000, layers=1, intermediate=1152)  # down_proj: the blocked symmetric path
    ids = _ids()
    captured = {}
    names = {}

    def on_layer(work):
        q = f"{work.name}.self_attn.q_proj"
        d = f"{work.name}.mlp.down_proj"
        names.update(q=q, d=d)
        work.forward(hooks={q: lambda x: captured.setdefault("q", []).append(x.reshape(-1, x.shape[-1])),
                            d: lambda x: captured.setdefault("d", []).append(x.reshape(-1, x.shape[-1]))})
        captured["stats"] = work.collect([q, d], hessian=True, absmean=True, absmax=True)

    run_layers(model, ids, on_layer=on_layer, progress=False)
    for key, name in (("q", names["q"]), ("d", names["d"])):
        x = torch.cat(captured[key]).double()
        st = captured["stats"][name]
        assert st.count == x.shape[0] == 96
        torch.testing.assert_close(st.xtx.double(), x.T @ x, rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(st.hessian().double(), 2 * x.T @ x / 96, rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(st.absmax.double(), x.abs().amax(0), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(st.absmean.double(), x.abs().mean(0), rtol=1e-5, atol=1e-6)


def test_rerun_propagates_changed_weights_and_layers_return_home():
    model = tiny_model("llama", vocab=1000, layers=2)
    ids = _ids()
    seen_inputs = {}

    def zero_mlp(work):
        seen_inputs[work.index] = torch.cat(work.inputs).clone()
        if work.index == 0:
            with torch.no_grad():
                work.layer.mlp.down_proj.weight.zero_()

    run_layers(model, ids, on_layer=zero_mlp, progress=False)
    with torch.no_grad():
        hs = model(ids, output_hidden_states=True).hidden_states  # model now has the zeroed MLP
    torch.testing.assert_close(seen_inputs[1], hs[1], rtol=1e-5, atol=1e-5)
    assert all(p.device.type == "cpu" for p in model.parameters())


def test_linears_respect_ignore_patterns():
    model = tiny_model("llama", vocab=1000, layers=1)
    got = {}
    run_layers(model, _ids(), on_layer=lambda w: got.update(w.linears), ignore=("lm_head", "re:.*down_proj"),
               progress=False)
    assert len(got) == 6 and not any(n.endswith("down_proj") for n in got)
    assert all(n.startswith("model.layers.0.") for n in got)


def test_layers_with_sliding_and_full_attention_get_their_own_masks():
    """Gemma 2-style models alternate sliding-window and full attention: each layer must see its own mask."""
    import transformers

    torch.manual_seed(0)
    cfg = transformers.Gemma2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                                    num_key_value_heads=2, head_dim=16, vocab_size=1000, sliding_window=8,
                                    max_position_embeddings=128)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    assert len(set(cfg.layer_types)) == 2
    ids = _ids(L=40)
    outs = {}
    run_layers(model, ids, on_layer=lambda w: (w.forward(), outs.__setitem__(w.index, torch.cat(w.outputs))),
               rerun=False, progress=False)
    with torch.no_grad():
        hs = model(ids, output_hidden_states=True).hidden_states
    for i in range(3):
        torch.testing.assert_close(outs[i], hs[i + 1], rtol=1e-4, atol=1e-4)
