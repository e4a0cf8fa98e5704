"""The loopback Hub server driven by the real `huggingface_hub` and `transformers` clients.

Client code runs in subprocesses because `huggingface_hub` reads `HF_ENDPOINT` when it is imported.
"""

import hashlib
import json
import os
import re
import textwrap
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from hub_server import TOKEN, USER, HubServer, StoredFile, run_client

MiB = 2**20
REPO = f"{USER}/demo"


def client(server: HubServer, tmp_path: Path, code: str, xet: bool = False) -> Any:
    """Run `code` against `server`; it prints one JSON value on its last line."""
    prelude = f"import json\nREPO = {REPO!r}\nTMP = {str(tmp_path)!r}\n"
    out = run_client(prelude + textwrap.dedent(code), server.client_env(tmp_path, xet=xet))
    return json.loads(out.strip().splitlines()[-1])


def write_folder(root: Path) -> dict[str, bytes]:
    """A folder to push: a model card, a text file in a subfolder, a small `.bin` and an 11 MiB binary."""
    files = {
        "README.md": b"---\nlicense: apache-2.0\n---\n# Demo\n",
        "sub/notes.txt": b"some notes\n",
        "small.bin": bytes(range(256)) * 2,
        "big.dat": os.urandom(11 * MiB),
    }
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return files


@pytest.mark.parametrize("mode", ["lfs", "multipart", "xet"])
def test_push_and_pull_a_folder(hub_server: HubServer, tmp_path: Path, mode: str) -> None:
    if mode != "xet":
        hub_server.lfs_threshold = 10 * MiB
    if mode == "multipart":
        hub_server.multipart_threshold, hub_server.multipart_chunk_size = 10 * MiB, 4 * MiB
    local = write_folder(tmp_path / "folder")

    result = client(hub_server, tmp_path, """
        from huggingface_hub import HfApi, hf_hub_download, snapshot_download
        from huggingface_hub.errors import HfHubHTTPError
        from huggingface_hub.utils._runtime import is_xet_available

        api = HfApi()
        api.create_repo(REPO)
        try:
            api.create_repo(REPO)
            conflict = None
        except HfHubHTTPError as error:
            conflict = error.response.status_code
        url_again = api.create_repo(REPO, exist_ok=True)
        first = api.upload_folder(repo_id=REPO, folder_path=TMP + "/folder", commit_message="first push")
        second = api.upload_folder(repo_id=REPO, folder_path=TMP + "/folder", commit_message="same files")
        api.create_tag(REPO, tag="v1")
        api.create_branch(REPO, branch="dev")
        refs = api.list_repo_refs(REPO)
        print(json.dumps({
            "xet": is_xet_available(),
            "conflict": conflict,
            "url_again": url_again,
            "first": first.oid,
            "second": second.oid,
            "branches": {ref.name: ref.target_commit for ref in refs.branches},
            "tags": {ref.name: ref.target_commit for ref in refs.tags},
            "titles": [commit.title for commit in api.list_repo_commits(REPO)],
            "snapshot": snapshot_download(REPO, revision="v1"),
            "big": hf_hub_download(REPO, "big.dat", revision="dev"),
        }))
    """, xet=mode == "xet")

    assert result["xet"] == (mode == "xet")
    assert result["conflict"] == 409
    assert result["url_again"] == f"{hub_server.url}/{REPO}"
    # The second push of the same files is a no-op: no new commit.
    assert result["second"] == result["first"]
    history = hub_server.commits(REPO)
    assert [c.title for c in history] == result["titles"] == ["first push", "initial commit"]
    assert history[0].oid == result["first"]
    assert result["branches"] == {"main": result["first"], "dev": result["first"]}
    assert result["tags"] == {"v1": result["first"]}

    snapshot = Path(result["snapshot"])
    for name, data in local.items():
        assert (snapshot / name).read_bytes() == data
        assert hub_server.file_bytes(REPO, name, revision="v1") == data
    assert Path(result["big"]).read_bytes() == local["big.dat"]

    stored = hub_server.files(REPO)
    lfs_on = mode != "xet"
    assert (stored["big.dat"].lfs, stored["small.bin"].lfs, stored["README.md"].lfs) == (lfs_on, lfs_on, False)
    puts = [r.path for r in hub_server.requests if r.method == "PUT"]
    parts = [p for p in puts if re.fullmatch(r"/_lfs/\w+/\d+", p)]
    expected_puts = {"lfs": (2, 0), "multipart": (4, 3), "xet": (0, 0)}[mode]
    assert (len(puts), len(parts)) == expected_puts


def test_client_errors(hub_server: HubServer, tmp_path: Path) -> None:
    data = os.urandom(64 * 1024)
    (tmp_path / "data.bin").write_bytes(data)

    result = client(hub_server, tmp_path, """
        from huggingface_hub import CommitOperationAdd, HfApi, HfFileSystem, hf_hub_download

        def outcome(call):
            try:
                call()
            except Exception as error:
                response = getattr(error, "response", None)
                return [type(error).__name__, getattr(response, "status_code", None), str(error).splitlines()[0]]
            return "ok"

        api, intruder = HfApi(), HfApi(token="hf_wrong")
        api.create_repo(REPO)
        api.upload_file(path_or_fileobj=TMP + "/data.bin", path_in_repo="data.bin", repo_id=REPO)
        api.create_repo(REPO + "-private", private=True)
        api.create_repo(REPO + "-data", repo_type="dataset")
        api.upload_file(
            path_or_fileobj=b"a,b\\n1,2\\n", path_in_repo="train.csv", repo_id=REPO + "-data", repo_type="dataset"
        )
        initial_commit = api.list_repo_commits(REPO)[-1].commit_id
        with HfFileSystem().open(REPO + "/data.bin", "rb") as remote:
            remote.seek(1000)
            middle = remote.read(500)
        print(json.dumps({
            "whoami_bad_token": outcome(intruder.whoami),
            "push_bad_token": outcome(
                lambda: intruder.upload_file(path_or_fileobj=b"x", path_in_repo="x", repo_id=REPO)
            ),
            "stale_parent": outcome(lambda: api.create_commit(
                REPO, [CommitOperationAdd("x", b"x")], commit_message="late", parent_commit=initial_commit
            )),
            "download_bad_token": outcome(lambda: hf_hub_download(REPO, "data.bin", token="hf_wrong")),
            "missing_repo": outcome(lambda: hf_hub_download(REPO + "-missing", "data.bin")),
            "missing_repo_info": outcome(lambda: api.model_info(REPO + "-missing")),
            "private_anonymous": outcome(lambda: hf_hub_download(REPO + "-private", ".gitattributes", token=False)),
            "missing_revision": outcome(lambda: hf_hub_download(REPO, "data.bin", revision="nope")),
            "missing_file": outcome(lambda: hf_hub_download(REPO, "nope.txt")),
            "range": middle.hex(),
            "dataset_file": open(hf_hub_download(REPO + "-data", "train.csv", repo_type="dataset")).read(),
        }))
    """)

    assert result["whoami_bad_token"][:2] == ["HfHubHTTPError", 401]
    assert result["whoami_bad_token"][2].startswith("Invalid user token.")
    assert result["push_bad_token"][:2] == ["HfHubHTTPError", 401]
    assert result["download_bad_token"][:2] == ["HfHubHTTPError", 401]
    assert result["stale_parent"][:2] == ["HfHubHTTPError", 412]
    assert result["missing_repo"][0] == result["missing_repo_info"][0] == "RepositoryNotFoundError"
    assert result["private_anonymous"][0] == "RepositoryNotFoundError"
    assert result["missing_revision"][0] == "RevisionNotFoundError"
    assert result["missing_file"][0] == "RemoteEntryNotFoundError"  # the client's EntryNotFoundError over HTTP
    assert bytes.fromhex(result["range"]) == data[1000:1500]
    assert any(r.method == "GET" and r.status == 206 for r in hub_server.requests)
    assert result["dataset_file"] == "a,b\n1,2\n"
    assert hub_server.file_bytes(REPO + "-data", "train.csv", repo_type="dataset") == b"a,b\n1,2\n"


PUSH_TWICE = """
import httpx2
from huggingface_hub import HfApi
from huggingface_hub.errors import HfHubHTTPError

def push():
    try:
        HfApi().upload_file(path_or_fileobj=TMP + "/payload.bin", path_in_repo="payload.bin", repo_id=REPO)
    except HfHubHTTPError as error:
        return f"HTTP {error.response.status_code}"
    except httpx2.TransportError:
        return "connection lost"
    return "ok"

HfApi().create_repo(REPO)
print(json.dumps([push(), push()]))
"""


@pytest.mark.parametrize(
    "inject, first_push, first_status",
    [
        (lambda server: server.fail_next("POST", r"/commit/main$", status=500), "HTTP 500", 500),
        # With inline (regular) uploads the file travels in the commit's body: cut it midway.
        (lambda server: server.drop_next("POST", r"/commit/main$", after_bytes=64 * 1024), "connection lost", 0),
    ],
    ids=["server-error", "connection-cut"],
)
def test_failed_commit_then_retry(
    hub_server: HubServer, tmp_path: Path, inject, first_push: str, first_status: int
) -> None:
    payload = os.urandom(2 * MiB)
    (tmp_path / "payload.bin").write_bytes(payload)
    inject(hub_server)

    assert client(hub_server, tmp_path, PUSH_TWICE, xet=True) == [first_push, "ok"]
    assert [r.status for r in hub_server.requests if r.path.endswith("/commit/main")] == [first_status, 200]
    assert [c.title for c in hub_server.commits(REPO)] == ["Upload payload.bin with huggingface_hub", "initial commit"]
    assert hub_server.file_bytes(REPO, "payload.bin") == payload


def test_lfs_upload_cut_midway_is_resent(hub_server: HubServer, tmp_path: Path) -> None:
    hub_server.lfs_threshold = 1 * MiB
    payload = os.urandom(3 * MiB)
    (tmp_path / "payload.bin").write_bytes(payload)
    hub_server.drop_next("PUT", r"^/_lfs/\w+$", after_bytes=1 * MiB)

    # The LFS transfer retries a dropped connection by itself, so the push succeeds at once.
    assert client(hub_server, tmp_path, PUSH_TWICE) == ["ok", "ok"]
    assert [r.status for r in hub_server.requests if r.method == "PUT"] == [0, 200]
    stored = hub_server.files(REPO)["payload.bin"]
    assert stored.lfs and stored.data == payload


def test_transformers_pushes_and_loads_a_model(hub_server: HubServer, tmp_path: Path) -> None:
    result = client(hub_server, tmp_path, """
        import shutil
        import torch
        from huggingface_hub import constants
        from transformers import AutoConfig, AutoModel, BertConfig, BertModel

        model = BertModel(BertConfig(
            vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37
        ))
        commits = [model.push_to_hub(REPO).oid, model.push_to_hub(REPO).oid]
        shutil.rmtree(constants.HF_HUB_CACHE, ignore_errors=True)  # load from an empty cache

        loaded_config = AutoConfig.from_pretrained(REPO)
        loaded = AutoModel.from_pretrained(REPO)
        expected = model.state_dict()
        print(json.dumps({
            "commits": commits,
            "config": [type(loaded_config).__name__, loaded_config.hidden_size, loaded_config.num_hidden_layers],
            "model": type(loaded).__name__,
            "same_weights": all(torch.equal(value, expected[name]) for name, value in loaded.state_dict().items()),
        }))
    """, xet=True)

    head = hub_server.commits(REPO)[0]
    # The second push of the same model is a no-op.
    assert result["commits"] == [head.oid, head.oid]
    assert (result["config"], result["model"], result["same_weights"]) == (["BertConfig", 32, 2], "BertModel", True)
    assert {"config.json", "model.safetensors"} <= set(head.files)
    downloads = {r.path.rsplit("/", 1)[-1] for r in hub_server.requests if r.method == "GET" and "/resolve/" in r.path}
    assert {"config.json", "model.safetensors"} <= downloads


def raw_request(server: HubServer, method: str, path: str, body: Any = None, data: bytes = b"") -> tuple[int, Any]:
    """One request without the Hub client: for the checks that a well-behaved client never trips."""
    payload = json.dumps(body).encode() if body is not None else data
    request = urllib.request.Request(server.url + path, payload, {"Authorization": f"Bearer {TOKEN}"}, method=method)
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: never through a proxy
    try:
        with opener.open(request) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_lfs_objects_are_checked_before_commit(hub_server: HubServer) -> None:
    assert raw_request(hub_server, "POST", "/api/repos/create", {"name": "demo"})[0] == 200
    weights = os.urandom(4096)
    oid = hashlib.sha256(weights).hexdigest()
    header = {"key": "header", "value": {"summary": "add weights"}}
    pointer = {"key": "lfsFile", "value": {"path": "w.bin", "algo": "sha256", "oid": oid, "size": len(weights)}}
    commit = b"".join(json.dumps(line).encode() + b"\n" for line in (header, pointer))

    status, answer = raw_request(hub_server, "POST", f"/api/models/{REPO}/commit/main", data=commit)
    assert (status, answer["error"]) == (400, "LFS pointer to an object that was never uploaded: w.bin")

    batch = {"operation": "upload", "transfers": ["basic"], "objects": [{"oid": oid, "size": len(weights)}]}
    _, answer = raw_request(hub_server, "POST", f"/{REPO}.git/info/lfs/objects/batch", batch)
    upload_path = urlsplit(answer["objects"][0]["actions"]["upload"]["href"]).path
    assert raw_request(hub_server, "PUT", upload_path, data=weights[:-1] + b"!")[0] == 400
    assert raw_request(hub_server, "PUT", upload_path, data=weights)[0] == 200
    assert raw_request(hub_server, "POST", f"/api/models/{REPO}/commit/main", data=commit)[0] == 200
    assert hub_server.files(REPO)["w.bin"] == StoredFile(weights, lfs=True)
