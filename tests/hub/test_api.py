"""The local Hub driven by unmodified huggingface_hub over real HTTP (server in a subprocess)."""
from __future__ import annotations

import hashlib
import os
import uuid
from pathlib import Path

import httpx
import pytest
from huggingface_hub import (
    CommitOperationAdd,
    HfApi,
    ModelCard,
    ModelCardData,
    hf_hub_download,
    snapshot_download,
)
from huggingface_hub.errors import (
    EntryNotFoundError,
    GatedRepoError,
    HfHubHTTPError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from hubquant.localhub.store import git_blob_oid


def _name(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def _folder(tmp_path: Path, big_mb: int = 3) -> Path:
    d = tmp_path / "up"
    (d / "sub").mkdir(parents=True)
    (d / "model.safetensors").write_bytes(os.urandom(big_mb * 1024 * 1024 + 123))
    (d / "config.json").write_text('{"architectures": ["LlamaForCausalLM"], "model_type": "llama"}\n')
    (d / "sub" / "notes.txt").write_text("hello\n")
    (d / "README.md").write_text(
        "---\nlicense: apache-2.0\nlibrary_name: transformers\npipeline_tag: text-generation\n"
        "base_model: HuggingFaceTB/SmolLM2-135M-Instruct\nbase_model_relation: quantized\ntags: [hubquant, rtn]\n---\n"
        "# test\n"
    )
    return d


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_upload_folder_snapshot_download_roundtrip(hub_env, tmp_path):
    api = HfApi()
    repo_id = f"alice/{_name('roundtrip')}"
    url = api.create_repo(repo_id)
    assert url == f"{hub_env.endpoint}/{repo_id}"
    assert api.create_repo(repo_id, exist_ok=True) == url  # 409 still carries the url
    with pytest.raises(HfHubHTTPError) as e:
        api.create_repo(repo_id)
    assert e.value.response.status_code == 409
    src = _folder(tmp_path)
    info0 = api.model_info(repo_id)
    ci = api.upload_folder(repo_id=repo_id, folder_path=src, commit_message="add files")
    assert len(ci.oid) == 40 and ci.oid != info0.sha

    info = api.model_info(repo_id)
    assert info.sha == ci.oid and info.id == repo_id and info.author == "alice" and info.private is False
    sib = {s.rfilename: s for s in info.siblings}
    assert set(sib) == {".gitattributes", "README.md", "config.json", "model.safetensors", "sub/notes.txt"}
    st = sib["model.safetensors"]
    assert st.lfs is not None and st.lfs.sha256 == _sha256(src / "model.safetensors")
    assert st.size == (src / "model.safetensors").stat().st_size
    assert sib["config.json"].lfs is None
    assert sib["config.json"].blob_id == git_blob_oid((src / "config.json").read_bytes())
    # the bytes on the server are a content-addressed blob
    assert (hub_env.root / "blobs" / st.lfs.sha256[:2] / st.lfs.sha256).stat().st_size == st.size
    assert set(info.tags) >= {"hubquant", "rtn", "transformers", "safetensors", "llama", "text-generation",
                              "license:apache-2.0", "base_model:HuggingFaceTB/SmolLM2-135M-Instruct",
                              "base_model:quantized:HuggingFaceTB/SmolLM2-135M-Instruct"}
    assert info.card_data.license == "apache-2.0" and info.library_name == "transformers"
    assert info.pipeline_tag == "text-generation" and info.created_at is not None and info.last_modified is not None

    local = Path(snapshot_download(repo_id))
    assert local.name == ci.oid
    for rel in ("model.safetensors", "config.json", "sub/notes.txt", "README.md"):
        assert (local / rel).read_bytes() == (src / rel).read_bytes(), rel
    # pinned to the old commit: only .gitattributes
    old = Path(snapshot_download(repo_id, revision=info0.sha))
    assert sorted(p.name for p in old.iterdir()) == [".gitattributes"]

    # unchanged files: preupload reports their oids and huggingface_hub makes no commit
    again = api.upload_folder(repo_id=repo_id, folder_path=src, commit_message="same")
    assert again.oid == ci.oid
    assert [c.title for c in api.list_repo_commits(repo_id)] == ["add files", "initial commit"]
    api.delete_repo(repo_id)
    with pytest.raises(RepositoryNotFoundError):
        api.model_info(repo_id)


def test_resolve_headers_range_and_resume(hub_env, tmp_path):
    api = HfApi()
    repo_id = f"alice/{_name('range')}"
    api.create_repo(repo_id)
    data = os.urandom(2 * 1024 * 1024 + 7)
    ci = api.upload_file(path_or_fileobj=data, path_in_repo="w.safetensors", repo_id=repo_id)
    api.upload_file(path_or_fileobj=b"small\n", path_in_repo="s.txt", repo_id=repo_id)
    sha = hashlib.sha256(data).hexdigest()
    url = f"{hub_env.endpoint}/{repo_id}/resolve/main/w.safetensors"
    head = httpx.head(url)
    assert head.status_code == 200
    assert head.headers["X-Repo-Commit"] == api.model_info(repo_id).sha
    assert head.headers["ETag"] == head.headers["X-Linked-Etag"] == f'"{sha}"'
    assert int(head.headers["X-Linked-Size"]) == int(head.headers["Content-Length"]) == len(data)
    r = httpx.get(url, headers={"Range": "bytes=100-199"})
    assert r.status_code == 206 and r.content == data[100:200]
    assert r.headers["Content-Range"] == f"bytes 100-199/{len(data)}"
    assert httpx.get(url, headers={"Range": "bytes=-5"}).content == data[-5:]
    assert httpx.get(url, headers={"Range": f"bytes={len(data)}-"}).status_code == 416
    small = httpx.head(f"{hub_env.endpoint}/{repo_id}/resolve/main/s.txt")
    small_oid = git_blob_oid(b"small\n")
    assert small.headers["ETag"] == f'"{small_oid}"' and "X-Linked-Etag" not in small.headers
    # by commit sha and by refs/heads/main (quoted as huggingface_hub quotes it)
    assert httpx.get(f"{hub_env.endpoint}/{repo_id}/resolve/{ci.oid}/w.safetensors").content == data
    assert httpx.get(f"{hub_env.endpoint}/{repo_id}/resolve/refs%2Fheads%2Fmain/s.txt").content == b"small\n"



def test_download_resumes_with_range_after_a_cut(local_hub, monkeypatch, tmp_path):
    # the server (in this process) cuts the first full GET after 1 MiB; huggingface_hub resumes with Range
    import huggingface_hub.file_download as fd
    from huggingface_hub import constants

    from tests.fixtures_hub import point_hf_at

    cut = 1024 * 1024
    monkeypatch.setenv("HUBQUANT_HUB_FAILPOINT_DROP_DOWNLOAD", str(cut))
    monkeypatch.setattr(constants, "DOWNLOAD_CHUNK_SIZE", 256 * 1024)  # the client keeps whole chunks only
    data = os.urandom(3 * 1024 * 1024)
    with local_hub.hub.serve() as endpoint:
        point_hf_at(monkeypatch, endpoint, local_hub.token("alice"), tmp_path / "hf")
        repo_id = f"alice/{_name('resume')}"
        HfApi().create_repo(repo_id)
        HfApi().upload_file(path_or_fileobj=data, path_in_repo="w.safetensors", repo_id=repo_id)
        seen = []
        real_http_get = fd.http_get

        def spy(*a, **kw):
            seen.append(kw.get("resume_size", 0))
            return real_http_get(*a, **kw)

        monkeypatch.setattr(fd, "http_get", spy)
        path = hf_hub_download(repo_id, "w.safetensors")
    assert seen == [0, cut]  # the second request asked for bytes=1048576-
    assert Path(path).read_bytes() == data


def test_model_card_push_load_validate(hub_env):
    api = HfApi()
    repo_id = f"hubquant-org/{_name('card')}"  # alice writes to her org
    api.create_repo(repo_id)
    data = ModelCardData(license="mit", library_name="transformers", base_model="HuggingFaceTB/SmolLM2-135M-Instruct",
                         base_model_relation="quantized", tags=["hubquant", "w4a16"], pipeline_tag="text-generation")
    card = ModelCard.from_template(data, model_description="a test card")
    card.validate()
    ci = card.push_to_hub(repo_id, commit_message="card")
    loaded = ModelCard.load(repo_id)
    assert loaded.data.license == "mit" and loaded.data.tags == ["hubquant", "w4a16"]
    assert loaded.text == card.text
    info = api.model_info(repo_id)
    assert info.sha == ci.split("/commit/")[1] if isinstance(ci, str) else True
    assert {"license:mit", "base_model:quantized:HuggingFaceTB/SmolLM2-135M-Instruct", "w4a16"} <= set(info.tags)
    assert info.card_data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct"
    bad = httpx.post(f"{hub_env.endpoint}/api/validate-yaml",
                     json={"content": "---\nlicense: [unclosed\n---\n# bad\n", "repoType": "model"})
    assert bad.status_code == 400 and "Invalid metadata" in bad.json()["error"]
    with pytest.raises(ValueError):
        ModelCard("---\npipeline_tag: [a, b]\n---\n# bad\n").validate()


def test_list_models_author_search_filter_sort_limit(hub_env, tmp_path):
    api = HfApi(token=hub_env.token("bob"))
    tag = _name("tag")
    ids = []
    for i in range(3):
        repo_id = f"bob/{_name(f'lm{i}')}"
        api.create_repo(repo_id)
        tags = f"[{tag}, even]" if i % 2 == 0 else f"[{tag}]"
        api.upload_file(path_or_fileobj=f"---\nlicense: mit\ntags: {tags}\n---\n# m{i}\n".encode(),
                        path_in_repo="README.md", repo_id=repo_id)
        ids.append(repo_id)
    got = [m.id for m in api.list_models(filter=tag, sort="created_at")]
    assert got == ids[::-1]  # newest first
    assert [m.id for m in api.list_models(filter=[tag, "even"], sort="createdAt")] == [ids[2], ids[0]]
    assert [m.id for m in api.list_models(filter=tag, sort="created_at", limit=2)] == ids[::-1][:2]
    api.upload_file(path_or_fileobj=b"x", path_in_repo="touch.txt", repo_id=ids[0])
    assert [m.id for m in api.list_models(filter=tag, sort="last_modified")][0] == ids[0]
    api.upload_file(path_or_fileobj=b"{}", path_in_repo="config.json", repo_id=ids[1])
    hf_hub_download(ids[1], "config.json", token=hub_env.token("bob"), cache_dir=tmp_path / "dl")  # one download
    by_downloads = list(api.list_models(filter=tag, sort="downloads"))
    assert by_downloads[0].id == ids[1] and by_downloads[0].downloads == 1
    raw = httpx.get(f"{hub_env.endpoint}/api/models", params={"filter": tag, "sort": "createdAt", "direction": "1"})
    assert [m["id"] for m in raw.json()] == ids  # direction=1: oldest first
    suffix = ids[1].split("-")[-1]
    assert [m.id for m in api.list_models(search=suffix)] == [ids[1]]
    assert set(ids) <= {m.id for m in api.list_models(author="bob")}
    assert not any(m.id in ids for m in api.list_models(author="alice"))
    full = next(iter(api.list_models(search=suffix, full=True, cardData=True)))
    assert {s.rfilename for s in full.siblings} == {".gitattributes", "README.md", "config.json"}
    assert full.card_data.license == "mit" and full.sha is not None


def test_commits_tree_paging_and_revisions(local_hub, monkeypatch, tmp_path):
    # a server in this process, so the page size can be changed per test
    from tests.fixtures_hub import point_hf_at

    monkeypatch.setenv("HUBQUANT_HUB_PAGE_SIZE", "3")
    with local_hub.hub.serve() as endpoint:
        point_hf_at(monkeypatch, endpoint, local_hub.token("alice"), tmp_path / "hf")
        api = HfApi()
        repo_id = f"alice/{_name('paging')}"
        api.create_repo(repo_id)
        ops = [CommitOperationAdd(f"d{i % 2}/f{i}.txt", f"{i}\n".encode()) for i in range(8)]
        c1 = api.create_commit(repo_id, ops, commit_message="eight files")
        for i in range(4):
            api.upload_file(path_or_fileobj=f"v{i}".encode(), path_in_repo="v.txt", repo_id=repo_id,
                            commit_message=f"v{i}")
        files = api.list_repo_files(repo_id)
        assert len(files) == 10 and "d1/f7.txt" in files and "v.txt" in files
        tree = list(api.list_repo_tree(repo_id))  # top level: 2 folders + 2 files, over 2 pages
        assert [(type(t).__name__, t.path) for t in tree] == [
            ("RepoFolder", "d0"), ("RepoFolder", "d1"), ("RepoFile", ".gitattributes"), ("RepoFile", "v.txt")]
        d1 = [t.path for t in api.list_repo_tree(repo_id, path_in_repo="d1")]
        assert d1 == [f"d1/f{i}.txt" for i in (1, 3, 5, 7)]
        commits = api.list_repo_commits(repo_id)  # 6 commits over 2 pages
        assert [c.title for c in commits] == ["v3", "v2", "v1", "v0", "eight files", "initial commit"]
        assert commits[4].commit_id == c1.oid and commits[0].authors == ["alice"]
        assert api.list_repo_files(repo_id, revision=c1.oid) == sorted(
            [".gitattributes"] + [f"d{i % 2}/f{i}.txt" for i in range(8)])
        assert [c.title for c in api.list_repo_commits(repo_id, revision=c1.oid)] == ["eight files", "initial commit"]
        assert api.model_info(repo_id, revision="refs/heads/main").sha == commits[0].commit_id
        assert hf_hub_download(repo_id, "v.txt", revision=commits[2].commit_id) and Path(
            hf_hub_download(repo_id, "v.txt", revision=commits[2].commit_id)).read_text() == "v1"
        refs = api.list_repo_refs(repo_id)
        assert [(b.name, b.target_commit) for b in refs.branches] == [("main", commits[0].commit_id)]


def test_stale_parent_commit_is_rejected(hub_env):
    api = HfApi()
    repo_id = f"alice/{_name('race')}"
    api.create_repo(repo_id)
    base = api.model_info(repo_id).sha
    first = api.create_commit(repo_id, [CommitOperationAdd("a.txt", b"a")], commit_message="a", parent_commit=base)
    with pytest.raises(HfHubHTTPError) as e:
        api.create_commit(repo_id, [CommitOperationAdd("b.txt", b"b")], commit_message="b", parent_commit=base)
    assert e.value.response.status_code == 412
    assert api.model_info(repo_id).sha == first.oid
    assert api.list_repo_files(repo_id) == [".gitattributes", "a.txt"]
    # deletions travel as deletedFile / deletedFolder lines
    api.create_commit(repo_id, [CommitOperationAdd("dir/x.txt", b"x"), CommitOperationAdd("dir/y.txt", b"y")],
                      commit_message="dir")
    api.delete_file("a.txt", repo_id)
    assert api.list_repo_files(repo_id) == [".gitattributes", "dir/x.txt", "dir/y.txt"]
    api.delete_folder("dir", repo_id)
    assert api.list_repo_files(repo_id) == [".gitattributes"]
    with pytest.raises(EntryNotFoundError):
        api.delete_file("a.txt", repo_id)


def test_typed_errors(hub_env, tmp_path):
    alice = HfApi(token=hub_env.token("alice"))
    bob = HfApi(token=hub_env.token("bob"))
    anon = HfApi(token=False)
    missing = f"alice/{_name('missing')}"
    with pytest.raises(RepositoryNotFoundError) as e:
        alice.model_info(missing)
    assert e.value.response.status_code == 404
    with pytest.raises(RepositoryNotFoundError) as e:
        anon.model_info(missing)
    assert e.value.response.status_code == 401
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download(missing, "config.json", cache_dir=tmp_path / "c0")

    repo_id = f"alice/{_name('errs')}"
    alice.create_repo(repo_id)
    alice.upload_file(path_or_fileobj=b"{}", path_in_repo="config.json", repo_id=repo_id)
    with pytest.raises(RevisionNotFoundError):
        alice.model_info(repo_id, revision="no-such-branch")
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download(repo_id, "config.json", revision="0" * 40, cache_dir=tmp_path / "c1")
    with pytest.raises(EntryNotFoundError):
        hf_hub_download(repo_id, "nope.json", cache_dir=tmp_path / "c2")

    # no write permission: 403 from create_repo and from a commit
    with pytest.raises(HfHubHTTPError) as e:
        bob.upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id=repo_id)
    assert e.value.response.status_code == 403 and not isinstance(e.value, RepositoryNotFoundError)
    with pytest.raises(HfHubHTTPError) as e:
        bob.create_repo(f"hubquant-org/{_name('nope')}")
    assert e.value.response.status_code == 403
    reader = HfApi(token=hub_env.add_token("carol-ro", orgs=["alice"], write=False))
    with pytest.raises(HfHubHTTPError) as e:
        reader.upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id=repo_id)
    assert e.value.response.status_code == 403
    with pytest.raises(HfHubHTTPError) as e:
        HfApi(token="hf_invalid").whoami()
    assert e.value.response.status_code == 401
    assert alice.whoami()["name"] == "alice" and [o["name"] for o in alice.whoami()["orgs"]] == ["hubquant-org"]

    # gated: metadata is visible, downloads need access
    hub_env.hub.set_gated(repo_id, "manual")
    assert bob.model_info(repo_id).gated == "manual"
    with pytest.raises(GatedRepoError) as e:
        hf_hub_download(repo_id, "config.json", token=hub_env.token("bob"), cache_dir=tmp_path / "c3")
    assert e.value.response.status_code == 403
    with pytest.raises(GatedRepoError) as e:
        hf_hub_download(repo_id, "config.json", token=False, cache_dir=tmp_path / "c4")
    assert e.value.response.status_code == 401
    assert Path(hf_hub_download(repo_id, "config.json", cache_dir=tmp_path / "c5")).read_bytes() == b"{}"  # owner
    hub_env.hub.grant_access(repo_id, "bob")
    assert Path(hf_hub_download(repo_id, "config.json", token=hub_env.token("bob"),
                                cache_dir=tmp_path / "c6")).read_bytes() == b"{}"

    # private: invisible to others, as if missing
    private_id = f"alice/{_name('private')}"
    alice.create_repo(private_id, private=True)
    assert alice.model_info(private_id).private is True
    with pytest.raises(RepositoryNotFoundError):
        bob.model_info(private_id)
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download(private_id, ".gitattributes", token=hub_env.token("bob"), cache_dir=tmp_path / "c7")
    with pytest.raises(RepositoryNotFoundError) as e:
        anon.model_info(private_id)
    assert e.value.response.status_code == 401
    assert private_id not in {m.id for m in bob.list_models(author="alice")}
    assert private_id in {m.id for m in alice.list_models(author="alice")}


def test_datasets_paths(hub_env, tmp_path):
    api = HfApi()
    repo_id = f"alice/{_name('ds')}"
    url = api.create_repo(repo_id, repo_type="dataset")
    assert url == f"{hub_env.endpoint}/datasets/{repo_id}"
    api.upload_file(path_or_fileobj=b"a,b\n1,2\n", path_in_repo="data/train.csv", repo_id=repo_id, repo_type="dataset")
    info = api.dataset_info(repo_id)
    assert {s.rfilename for s in info.siblings} == {".gitattributes", "data/train.csv"}
    local = Path(snapshot_download(repo_id, repo_type="dataset", cache_dir=tmp_path / "c"))
    assert (local / "data" / "train.csv").read_bytes() == b"a,b\n1,2\n"
    with pytest.raises(RepositoryNotFoundError):
        api.model_info(repo_id)  # a dataset is not a model


def test_lfs_upload_links_carry_their_own_auth(hub_env):
    api = HfApi()
    repo_id = f"alice/{_name('lfs')}"
    api.create_repo(repo_id)
    data = os.urandom(100_000)
    oid = hashlib.sha256(data).hexdigest()
    batch_url = f"{hub_env.endpoint}/{repo_id}.git/info/lfs/objects/batch"
    body = {"operation": "upload", "transfers": ["basic"], "objects": [{"oid": oid, "size": len(data)}],
            "hash_algo": "sha256"}
    assert httpx.post(batch_url, json=body).status_code == 401  # no token
    bob = {"Authorization": f"Bearer {hub_env.token('bob')}"}
    assert httpx.post(batch_url, json=body, headers=bob).status_code == 403  # not bob's repo
    alice = {"Authorization": f"Bearer {hub_env.token('alice')}"}
    r = httpx.post(batch_url, json=body, headers=alice)
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/vnd.git-lfs+json")
    href = r.json()["objects"][0]["actions"]["upload"]["href"]
    assert httpx.put(href.replace("sig=", "sig=0"), content=data).status_code == 403  # tampered link
    assert httpx.put(href, content=data[:-1] + b"\0").status_code == 400  # bytes do not match the oid
    assert not (hub_env.root / "blobs" / oid[:2] / oid).exists()
    assert httpx.put(href, content=data).status_code == 200  # no Authorization header needed
    verify = r.json()["objects"][0]["actions"]["verify"]["href"]
    assert httpx.post(verify, json={"oid": oid, "size": len(data)}, headers=alice).status_code == 200
    again = httpx.post(batch_url, json=body, headers=alice).json()["objects"][0]
    assert "actions" not in again  # already stored
    assert (hub_env.root / "blobs" / oid[:2] / oid).read_bytes() == data
