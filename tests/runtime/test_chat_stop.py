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
