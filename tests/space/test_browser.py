"""The Space in a real browser: headless Debian Chromium driven by Playwright, against `hubquant space`
on localhost, which talks to the local Hub seeded with SmolLM2 and a variant made by hubquant."""
from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx
import pytest

pytestmark = [pytest.mark.browser, pytest.mark.slow]

CHROMIUM = "/usr/bin/chromium"
BASE = "HuggingFaceTB/SmolLM2-135M-Instruct"
REPO_ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = REPO_ROOT / "tests" / "artifacts"
MAX_NEW_TOKENS = 16
NUMBER = r"([-+]?[0-9]+(?:\.[0-9]+)?)"

if not Path(CHROMIUM).exists():
    pytest.skip(f"{CHROMIUM} is missing (apt-get install chromium)", allow_module_level=True)
playwright_api = pytest.importorskip("playwright.sync_api")
pytest.importorskip("gradio")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _hub_env(local_hub, home: Path, token: str | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")}
    env.update(HF_ENDPOINT=local_hub.endpoint, HF_HUB_DISABLE_XET="1", HF_HOME=str(home),
               HF_HUB_CACHE=str(home / "hub"), HF_HUB_DISABLE_TELEMETRY="1", GRADIO_ANALYTICS_ENABLED="False")
    if token:
        env["HF_TOKEN"] = token
    return env


@pytest.fixture(scope="module")
def variant_repo(seeded_hub, tmp_path_factory) -> str:
    """An RTN W4 group-64 variant of SmolLM2, made and pushed by `hubquant convert`."""
    target = f"alice/space-SmolLM2-W4A16-G64-RTN-{uuid.uuid4().hex[:6]}"
    env = _hub_env(seeded_hub, tmp_path_factory.mktemp("hf-convert"), seeded_hub.token("alice"))
    cmd = [sys.executable, "-m", "hubquant.cli", "convert", BASE, "--method", "rtn", "--bits", "4", "--group-size",
           "64", "--push", "--target-repo", target, "--eval-windows", "2", "--eval-seq-len", "256", "--quiet"]
    proc = subprocess.run(cmd, env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return target


@pytest.fixture(scope="module")
def space_url(seeded_hub, variant_repo, tmp_path_factory):
    """`hubquant space` in a subprocess, with no HF_TOKEN of its own (the Convert tab takes one)."""
    port = _free_port()
    home = tmp_path_factory.mktemp("hf-space")
    log = home / "space.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "hubquant.cli", "space", "--port", str(port), "--max-new-tokens",
             str(MAX_NEW_TOKENS)], env=_hub_env(seeded_hub, home, None), cwd=REPO_ROOT, stdout=out,
            stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        t0 = time.monotonic()
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"hubquant space exited ({proc.returncode}):\n{log.read_text()}")
            try:
                if httpx.get(url + "/", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() - t0 > 120:
                raise RuntimeError(f"hubquant space did not answer in 120 s:\n{log.read_text()}")
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(log, ARTIFACTS / "space-server.log")


@pytest.fixture(scope="module")
def browser():
    with playwright_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync"])
        yield b
        b.close()


@pytest.fixture
def page(browser, space_url):
    pg = browser.new_page(viewport={"width": 1400, "height": 1000})
    pg.set_default_timeout(30_000)
    pg.goto(space_url)
    pg.get_by_label("Prompt").wait_for()
    yield pg
    pg.close()


def _metrics(text: str) -> dict[str, float]:
    """Parse a panel's metrics ("Speed: 12.3 tokens/s", ...) into numbers keyed by label."""
    units = {"Speed": "tokens/s", "Time to first token": "ms", "Size on disk": "MB", "Memory": "MB",
             "Identical tokens": "%", "Mean KL": "nats/token", "Perplexity (card)": "",
             "Perplexity change (card)": "%"}
    out = {}
    for label, unit in units.items():
        m = re.search(re.escape(label) + r":\s*" + NUMBER + (r"\s*" + re.escape(unit) if unit else ""), text)
        assert m, f"no number with unit for {label!r} in:\n{text}"
        out[label] = float(m.group(1))
    return out


def _hub_file(local_hub, repo: str, name: str) -> dict:
    from huggingface_hub import hf_hub_download

    with tempfile.TemporaryDirectory() as cache:
        return json.loads(Path(hf_hub_download(repo, name, endpoint=local_hub.endpoint, cache_dir=cache)).read_text())


def test_variants_are_listed_on_load(page, variant_repo):
    """No click on "Find variants": the page lists the default base's variants when it loads."""
    box = page.get_by_label(re.compile(re.escape(variant_repo)))
    box.wait_for()
    assert box.is_checked()  # ticked for comparison (up to three)
    assert "variant(s) of HuggingFaceTB/SmolLM2-135M-Instruct" in page.content()


def test_compare_smollm2_with_its_variant(page, seeded_hub, variant_repo):
    from huggingface_hub import HfApi

    page.get_by_role("button", name="Find variants").click()
    page.get_by_label(re.compile(re.escape(variant_repo))).wait_for()
    for box in page.locator("#variants input[type=checkbox]").all():  # only this test's variant
        label = box.evaluate("el => el.closest('label').innerText")
        box.set_checked(variant_repo in label)
    page.get_by_role("button", name="Compare").click()
    page.locator("#compare-status").get_by_text(re.compile(r"Done in")).wait_for(timeout=240_000)
    page.wait_for_timeout(500)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "space-compare.png"), full_page=True)

    # each output panel is titled with its repo id and holds generated text
    base_text = page.get_by_label(BASE, exact=True).input_value()
    variant_text = page.get_by_label(variant_repo, exact=True).input_value()
    assert len(base_text.split()) >= 3 and len(variant_text.split()) >= 3, (base_text, variant_text)

    base_m = _metrics(page.locator("#metrics-0").inner_text())
    var_m = _metrics(page.locator("#metrics-1").inner_text())
    api = HfApi(endpoint=seeded_hub.endpoint)

    def hub_weight_mb(repo):
        info = api.model_info(repo, files_metadata=True)
        return sum(s.size for s in info.siblings if s.rfilename.endswith(".safetensors")) / 1e6

    assert base_m["Size on disk"] == pytest.approx(hub_weight_mb(BASE), abs=0.051)
    assert var_m["Size on disk"] == pytest.approx(hub_weight_mb(variant_repo), abs=0.051)
    assert var_m["Size on disk"] < 0.5 * base_m["Size on disk"]  # packed int4 Linears vs bf16
    # base: bf16 everywhere; the variant keeps its packed 4-bit weights in memory (hubquant.load)
    assert base_m["Memory"] == pytest.approx(base_m["Size on disk"], rel=0.05)
    assert var_m["Memory"] < 0.6 * base_m["Memory"], "hubquant.load should keep 4-bit weights packed"
    for m in (base_m, var_m):
        assert m["Speed"] > 0 and m["Time to first token"] > 0
    assert base_m["Identical tokens"] == 100.0 and base_m["Mean KL"] == 0.0
    assert 0 <= var_m["Identical tokens"] <= 100
    # 4-bit RTN moves the distributions (measured ~0.5-0.9 nats/token on this Q4_1-derived base), but not wildly
    assert 0.01 < var_m["Mean KL"] < 3.0
    # perplexity is the card's: hubquant.json metrics of the variant (variant and base on the same text)
    prov = _hub_file(seeded_hub, variant_repo, "hubquant.json")
    assert var_m["Perplexity (card)"] == pytest.approx(prov["metrics"]["perplexity"], abs=0.006)
    assert base_m["Perplexity (card)"] == pytest.approx(prov["metrics"]["base_perplexity"], abs=0.006)
    assert base_m["Perplexity change (card)"] == 0.0
    assert var_m["Perplexity change (card)"] == pytest.approx(prov["metrics"]["ppl_increase_pct"], abs=0.051)
    # the summary table and the trade-off plot are there
    table = page.locator("#metrics-table").inner_text()
    assert BASE in table and variant_repo in table
    assert page.get_by_text("size vs quality vs speed", exact=False).count() >= 1


def test_convert_a_tiny_model_pushes_a_new_repo(page, seeded_hub, tmp_path, tokenizer):
    from huggingface_hub import HfApi

    from tests.helpers import save_tiny_repo

    name = f"space-tiny-{uuid.uuid4().hex[:6]}"
    source = f"hubquant-org/{name}"
    seeded_hub.hub.publish_folder(source, save_tiny_repo(tmp_path / name, "llama", tokenizer))
    page.get_by_role("tab", name="Convert").click()
    page.get_by_label("Hub token").fill(seeded_hub.token("bob"))
    page.get_by_label("Model", exact=True).fill(source)
    page.get_by_label("Scheme").click()
    page.get_by_role("option", name="W4A16 group 64").click()
    page.get_by_role("button", name="Convert").click()
    links = page.locator("#convert-links")
    links.get_by_role("link").first.wait_for(timeout=240_000)
    page.locator("#convert-status").get_by_text(re.compile(r"done")).wait_for(timeout=30_000)
    page.screenshot(path=str(ARTIFACTS / "space-convert.png"), full_page=True)

    target = f"bob/{name}-W4A16-G64-RTN"
    assert links.get_by_role("link").first.inner_text() == target
    assert links.get_by_role("link").first.get_attribute("href") == f"{seeded_hub.endpoint}/{target}"
    log = page.get_by_label("Log").input_value()
    assert "pushed:" in log and re.search(r"variant perplexity " + NUMBER, log)
    # the new repo is on the Hub, made by hubquant from the tiny model, in compressed-tensors
    api = HfApi(endpoint=seeded_hub.endpoint)
    files = set(api.list_repo_files(target))
    assert {"model.safetensors", "config.json", "hubquant.json", "README.md"} <= files
    prov = _hub_file(seeded_hub, target, "hubquant.json")
    assert prov["base_model"] == source and prov["settings"]["method"] == "rtn"
    weights = prov["settings"]["scheme"]["weights"]
    assert weights["bits"] == 4 and weights["group_size"] == 64
    config = _hub_file(seeded_hub, target, "config.json")
    assert config["quantization_config"]["quant_method"] == "compressed-tensors"


def test_convert_explains_unauthorized_gated_and_unsupported(page, seeded_hub, tmp_path, tokenizer):
    from tests.helpers import save_tiny_repo

    gated = f"hubquant-org/space-gated-{uuid.uuid4().hex[:6]}"
    seeded_hub.hub.publish_folder(gated, save_tiny_repo(tmp_path / "g", "llama", tokenizer, hidden=64,
                                                        intermediate=128, layers=1))
    seeded_hub.hub.set_gated(gated, "manual")
    pickled = tmp_path / "p"
    pickled.mkdir()
    (pickled / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama"}))
    (pickled / "pytorch_model.bin").write_bytes(b"not really a pickle")
    only_pickles = f"hubquant-org/space-pickles-{uuid.uuid4().hex[:6]}"
    seeded_hub.hub.publish_folder(only_pickles, pickled)

    page.get_by_role("tab", name="Convert").click()
    status = page.locator("#convert-status")

    def attempt(model: str, token: str, expect: str) -> str:
        page.get_by_label("Hub token").fill(token)
        page.get_by_label("Model", exact=True).fill(model)
        page.get_by_role("button", name="Convert").click()
        status.get_by_text(re.compile(expect)).first.wait_for(timeout=60_000)
        return status.inner_text()

    text = attempt(gated, "", r"not logged in")  # the server has no HF_TOKEN either
    assert text.startswith("Unauthorized:") and "Fix: log in" in text
    text = attempt(gated, "hf_definitely_not_valid", r"rejected your token")
    assert text.startswith("Unauthorized:")
    text = attempt(gated, seeded_hub.token("bob"), r"is gated")
    assert text.startswith("Gated:") and "request access" in text
    text = attempt(only_pickles, seeded_hub.token("bob"), r"pickled weights")
    assert text.startswith("Unsupported:") and "failed" in text
    page.screenshot(path=str(ARTIFACTS / "space-convert-error.png"), full_page=True)
