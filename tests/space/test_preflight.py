"""The Convert tab's checks before a job is queued, against the local Hub: clear messages for the
unauthorized, gated and missing cases, and the error-kind headings the page shows."""
import uuid

import pytest
from hqspace.jobs import error_kind, preflight

from hubquant.errors import AuthError, NotFoundError, UnsupportedError


@pytest.fixture(scope="module")
def repos(local_hub, tmp_path_factory, tokenizer):
    from tests.helpers import save_tiny_repo

    folder = save_tiny_repo(tmp_path_factory.mktemp("pf") / "m", "llama", tokenizer, hidden=64, intermediate=128,
                            layers=1)
    open_repo = f"hubquant-org/pf-open-{uuid.uuid4().hex[:6]}"
    gated_repo = f"hubquant-org/pf-gated-{uuid.uuid4().hex[:6]}"
    local_hub.hub.publish_folder(open_repo, folder)
    local_hub.hub.publish_folder(gated_repo, folder)
    local_hub.hub.set_gated(gated_repo, "manual")
    local_hub.hub.grant_access(gated_repo, "alice")
    return open_repo, gated_repo


@pytest.fixture
def api(local_hub):
    from huggingface_hub import HfApi

    return HfApi(endpoint=local_hub.endpoint)


def test_preflight_names_the_user(api, local_hub, repos):
    assert preflight(api, repos[0], local_hub.token("bob")) == "bob"
    assert preflight(api, repos[1], local_hub.token("alice")) == "alice"  # granted access


def test_preflight_refuses_without_login_or_with_a_bad_token(api, repos):
    with pytest.raises(AuthError, match="not logged in") as e:
        preflight(api, repos[0], None)
    assert "log in" in e.value.hint and error_kind(e.value) == "Unauthorized"
    with pytest.raises(AuthError, match="rejected your token") as e:
        preflight(api, repos[0], "hf_not_a_real_token")
    assert error_kind(e.value) == "Unauthorized"


def test_preflight_explains_gated_and_missing_models(api, local_hub, repos):
    with pytest.raises(AuthError, match="gated") as e:
        preflight(api, repos[1], local_hub.token("bob"))
    assert error_kind(e.value) == "Gated" and "request access" in e.value.hint
    with pytest.raises(NotFoundError, match="no model named") as e:
        preflight(api, "hubquant-org/does-not-exist", local_hub.token("bob"))
    assert error_kind(e.value) == "Not found"
    assert error_kind(UnsupportedError("x")) == "Unsupported"
