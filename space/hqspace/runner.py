"""Load models (bounded cache) and run one prompt through several of them, greedy and side by side.

Each model advances one token per round, so the panels stream together; each model's clock runs
only around its own forward passes, so round-robin does not distort its speed.
"""
from __future__ import annotations

import inspect
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from hubquant.errors import AuthError, NotFoundError, UnsupportedError

# files a causal LM needs; never pickles
MODEL_FILES = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja", "tokenizer*"]


@dataclass
class LoadedModel:
    repo_id: str
    model: torch.nn.Module
    tokenizer: object
    memory_bytes: int
    disk_bytes: int
    load_seconds: float
    loader: str  # "hubquant.load" or "transformers"
    notes: tuple[str, ...] = ()  # what the loader says it did (e.g. weights dequantized for lack of a kernel)


def module_bytes(model: torch.nn.Module) -> int:
    """Bytes held by a module's parameters and buffers (each storage counted once)."""
    seen: set[int] = set()
    total = 0
    for t in list(model.parameters()) + list(model.buffers()):
        try:
            key = t.untyped_storage().data_ptr()
        except (RuntimeError, NotImplementedError):
            key = id(t)
        if key in seen:
            continue
        seen.add(key)
        total += t.numel() * t.element_size()
    return total


def folder_weight_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*.safetensors"))


def download(repo_id: str, *, endpoint: str | None = None, token: str | None = None) -> Path:
    """snapshot_download of the files a causal LM needs, with hubquant's error types."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    try:
        return Path(snapshot_download(repo_id, allow_patterns=MODEL_FILES, endpoint=endpoint, token=token))
    except GatedRepoError as e:
        raise AuthError(f"{repo_id} is gated", hint="accept its terms on the Hub and log in") from e
    except RepositoryNotFoundError as e:
        raise NotFoundError(f"no model named {repo_id}", hint="check the repo id, or log in if it is private") from e


def load_model(path: Path, repo_id: str) -> LoadedModel:
    """Load a folder with hubquant's runtime when it is there, else with transformers."""
    from transformers import AutoTokenizer

    t0 = time.perf_counter()
    model = None
    loader = "transformers"
    try:
        from hubquant.runtime import load as hq_load  # the kernels' loader, where it exists
    except ImportError:
        hq_load = None
    tok = None
    notes: list[str] = []
    if hq_load is not None:
        try:
            model, tok = hq_load(str(path), device="cpu", progress=False, log=notes.append)
            loader = "hubquant.load"
        except UnsupportedError:
            model = None
    if model is None:
        from transformers import AutoModelForCausalLM

        try:
            model = AutoModelForCausalLM.from_pretrained(path, dtype="auto")
        except (ValueError, OSError, ImportError) as e:
            raise UnsupportedError(
                f"cannot load {repo_id}: {str(e).splitlines()[0][:200]}",
                hint="pick a variant in a format transformers loads on CPU (compressed-tensors)") from e
    model.eval()
    if tok is None:
        tok = AutoTokenizer.from_pretrained(path)
    with torch.inference_mode():  # first-call costs (weight unpacking, kernel setup) belong to loading
        model(input_ids=torch.tensor([[tok.eos_token_id or 0] * 4]))
    return LoadedModel(repo_id=repo_id, model=model, tokenizer=tok, memory_bytes=module_bytes(model),
                       disk_bytes=folder_weight_bytes(path), load_seconds=time.perf_counter() - t0, loader=loader,
                       notes=tuple(notes))


class ModelCache:
    """Least-recently-used models, kept while their summed memory stays under `max_bytes`.

    The model asked for last always stays, even alone over the bound.
    """

    def __init__(self, max_bytes: int, *, loader: Callable[[str], LoadedModel]):
        self.max_bytes = max_bytes
        self._loader = loader
        self._models: OrderedDict[str, LoadedModel] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, repo_id: str) -> LoadedModel:
        with self._lock:
            if repo_id in self._models:
                self._models.move_to_end(repo_id)
                return self._models[repo_id]
            loaded = self._loader(repo_id)
            self._models[repo_id] = loaded
            while len(self._models) > 1 and self.total_bytes > self.max_bytes:
                self._models.popitem(last=False)
            return loaded

    @property
    def total_bytes(self) -> int:
        return sum(m.memory_bytes for m in self._models.values())

    def __contains__(self, repo_id: str) -> bool:
        return repo_id in self._models

    def keys(self) -> list[str]:
        return list(self._models)


def prompt_ids(tokenizer, prompt: str) -> list[int]:
    """Token ids of the prompt, through the chat template when the tokenizer has one."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                             tokenize=False)
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    return list(tokenizer(prompt)["input_ids"])


def _eos_ids(loaded: LoadedModel) -> set[int]:
    """eos ids plus the chat template's end-of-turn tokens (prompts go through the chat template)."""
    from hubquant.runtime.chat import stop_ids

    return stop_ids(loaded.model, loaded.tokenizer, chat=bool(getattr(loaded.tokenizer, "chat_template", None)))


def _cache_arg(model: torch.nn.Module) -> str:
    """transformers 5.x names the KV cache `cache`; older versions `past_key_values`."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


@dataclass
class Stream:
    """One model's greedy generation, advanced a token at a time."""

    loaded: LoadedModel
    prompt: list[int]
    max_new_tokens: int
    tokens: list[int] = field(default_factory=list)
    ttft: float | None = None      # seconds to the first token (prefill + first argmax)
    seconds: float = 0.0           # all forward time
    done: bool = False
    _past: object = None
    _eos: set[int] = field(default_factory=set)

    def __post_init__(self):
        self._eos = _eos_ids(self.loaded)

    @torch.inference_mode()
    def step(self) -> None:
        if self.done:
            return
        model = self.loaded.model
        t0 = time.perf_counter()
        ids = self.prompt if self._past is None else self.tokens[-1:]
        out = model(input_ids=torch.tensor([ids]), use_cache=True, **{_cache_arg(model): self._past})
        nxt = int(out.logits[0, -1].argmax())
        dt = time.perf_counter() - t0
        self._past = out.get("cache") or out.get("past_key_values")
        self.seconds += dt
        if self.ttft is None:
            self.ttft = dt
        if nxt in self._eos:
            self.done = True
            return
        self.tokens.append(nxt)
        if len(self.tokens) >= self.max_new_tokens:
            self.done = True

    @property
    def text(self) -> str:
        return self.loaded.tokenizer.decode(self.tokens, skip_special_tokens=True)

    @property
    def decode_tokens_per_second(self) -> float:
        """Tokens after the first, over the time after the first (the steady decode speed)."""
        n = len(self.tokens) - 1
        t = self.seconds - (self.ttft or 0.0)
        return n / t if n > 0 and t > 0 else 0.0


@torch.inference_mode()
def sequence_logits(loaded: LoadedModel, ids: list[int]) -> torch.Tensor:
    """[len(ids), vocab] float32 logits of a model over a token sequence (teacher forcing)."""
    out = loaded.model(input_ids=torch.tensor([ids]))
    return out.logits[0].float()


def run_streams(streams: list[Stream]) -> Iterator[list[Stream]]:
    """Advance every stream one token per round, yielding after each round until all are done."""
    while not all(s.done for s in streams):
        for s in streams:
            s.step()
        yield streams
