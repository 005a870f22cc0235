"""Where a chat reply ends: the chat template's end-of-turn token(s) plus the model's eos ids."""
from __future__ import annotations

_SENTINEL = "hubquant-reply-sentinel"


def end_of_turn_ids(tokenizer) -> set[int]:
    """The special token(s) the chat template writes right after an assistant message (e.g. `<|im_end|>`,
    `<|eot_id|>`, `<end_of_turn>`); empty without a chat template."""
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        return set()
    try:
        text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"},
                                              {"role": "assistant", "content": _SENTINEL}], tokenize=False)
    except Exception:  # a template that rejects this conversation: fall back to the eos ids
        return set()
    after = text.split(_SENTINEL, 1)[-1] if _SENTINEL in text else ""
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    special.update(getattr(tokenizer, "added_tokens_decoder", {}) or {})
    ids = tokenizer(after, add_special_tokens=False)["input_ids"] if after.strip() else []
    return {i for i in ids[:2] if i in special}


def stop_ids(model, tokenizer, *, chat: bool = True) -> set[int]:
    """Token ids that end generation: eos of the generation config, the model config and the tokenizer, and with
    `chat` the chat template's end-of-turn tokens."""
    ids: set[int] = set()
    for src in (getattr(model, "generation_config", None), getattr(model, "config", None), tokenizer):
        eos = getattr(src, "eos_token_id", None)
        if isinstance(eos, int):
            ids.add(eos)
        elif isinstance(eos, (list, tuple)):
            ids.update(int(e) for e in eos)
    if chat:
        ids |= end_of_turn_ids(tokenizer)
    return ids


def cut_at_stop(tokens: list[int], stops: set[int]) -> list[int]:
    """`tokens` up to (not including) the first stop token."""
    for i, t in enumerate(tokens):
        if t in stops:
            return tokens[:i]
    return tokens
