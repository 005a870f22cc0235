"""Chat replies end at the chat template's end-of-turn token (SmolLM2's real template: `<|im_end|>`)."""
from __future__ import annotations

from hubquant.runtime.chat import cut_at_stop, end_of_turn_ids, stop_ids


def test_end_of_turn_from_the_template(tokenizer):
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert end_of_turn_ids(tokenizer) == {im_end}
    # a reply that runs on into the next turn is cut where the template ends the assistant's turn
    reply = tokenizer("Paris.", add_special_tokens=False)["input_ids"] + [im_end] + \
        tokenizer("\nsystem\nYou are", add_special_tokens=False)["input_ids"]
    cut = cut_at_stop(reply, stop_ids(None, tokenizer))
    assert tokenizer.decode(cut) == "Paris." and "system" in tokenizer.decode(reply, skip_special_tokens=True)


def test_no_template_no_end_of_turn(tokenizer):
    class Plain:
        chat_template = None
        eos_token_id = 7

    assert end_of_turn_ids(Plain()) == set() and stop_ids(None, Plain()) == {7}


def scripted_chat_model(tokenizer, path):
    """A tiny Llama whose layers add nothing and whose next token depends only on the current one:
    (end of the chat prompt) -> "Paris" -> <|im_end|> -> "system" -> "system" ... (SmolLM2's tokenizer)."""
    import torch

    from tests.helpers import tiny_model

    model = tiny_model("llama", layers=1)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Capital of France?"}],
                                           add_generation_prompt=True, tokenize=False)
    last = tokenizer(prompt, add_special_tokens=False)["input_ids"][-1]
    paris = tokenizer(" Paris", add_special_tokens=False)["input_ids"][0]
    system = tokenizer("system", add_special_tokens=False)["input_ids"][0]
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    chain = [last, paris, im_end, system]
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.model.embed_tokens.weight.zero_()
        model.lm_head.weight.zero_()
        for i, tok in enumerate(chain):
            model.model.embed_tokens.weight[tok, i] = 1.0
            model.lm_head.weight[chain[min(i + 1, 3)], i] = 10.0
    # eos is <|endoftext|> everywhere: only the chat template says that <|im_end|> ends the reply
    endoftext = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    model.config.eos_token_id = model.generation_config.eos_token_id = endoftext
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    cfg = path / "tokenizer_config.json"
    cfg.write_text(cfg.read_text().replace('"eos_token": "<|im_end|>"', '"eos_token": "<|endoftext|>"'))
    return paris, im_end, system


def test_generate_chat_stops_at_end_of_turn(tokenizer, tmp_path, capsys):
    from hubquant.cli import run

    paris, im_end, system = scripted_chat_model(tokenizer, tmp_path)
    args = ["generate", str(tmp_path), "--prompt", "Capital of France?", "--chat", "--max-new-tokens", "6",
            "--device", "cpu", "--dtype", "float32"]
    assert run(args) == 0
    text = capsys.readouterr().out.splitlines()[0]
    assert text.strip() == "Paris"  # not "Paris system system system ..."
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(tmp_path).eos_token == "<|endoftext|>"
    assert "system" in tokenizer.decode([paris, im_end, system], skip_special_tokens=True)  # what runs on
