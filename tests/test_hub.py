"""`evomerge.hub.push_folder` with the real huggingface_hub against a local stand-in Hub.

huggingface_hub reads HF_ENDPOINT and HF_HUB_OFFLINE once, when imported, and this test session
sets HF_HUB_OFFLINE=1: each push therefore runs in a fresh interpreter with its own environment.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from hub_standin import HubStandIn

ROOT = Path(__file__).resolve().parents[1]
SECRET = "hf_StandInSecret0123456789abcdefXYZ"
PUSH = """
import sys
from evomerge.errors import EvomergeError
from evomerge.hub import push_folder
try:
    print(push_folder(sys.argv[1], sys.argv[2], private=sys.argv[3] == "private"))
except EvomergeError as exc:
    print(f"{type(exc).__name__}: {exc}")
    sys.exit(2)
"""


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory) -> Path:
    """A small export: safetensors weights (sent through LFS), a config and a model card."""
    folder = tmp_path_factory.mktemp("export")
    save_file({"embed.weight": torch.randn(64, 16), "head.bias": torch.zeros(16)},
              str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 16}))
    (folder / "README.md").write_text("---\nlicense: apache-2.0\ntags: [evomerge]\n---\n# A merged model\n")
    return folder


@pytest.fixture
def hub():
    with HubStandIn() as standin:
        yield standin


def push(endpoint: str, folder: Path, repo_id: str, home: Path, private: bool = False,
         token: str | None = SECRET, offline: bool = False) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items()
           if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN",
                        "HF_OIDC_RESOURCE", "HF_HUB_DISABLE_XET", "HF_HUB_CACHE", "HF_TOKEN_PATH")}
    env.update(HF_ENDPOINT=endpoint, HF_HOME=str(home))  # HF_HOME: no real stored login is read
    if token is not None:
        env["HF_TOKEN"] = token
    if offline:
        env["HF_HUB_OFFLINE"] = "1"
    return subprocess.run([sys.executable, "-c", PUSH, str(folder), repo_id, "private" if private else "public"],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)


def one_error_line(result: subprocess.CompletedProcess) -> str:
    """The single `EvomergeError: ...` line a failed push prints, checked to leak nothing."""
    output = result.stdout + result.stderr
    assert result.returncode == 2, output
    assert SECRET not in output
    lines = output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("EvomergeError: --push-to-hub: "), output
    return lines[0]


@pytest.mark.parametrize("private", [True, False])
def test_push_creates_the_repo_and_uploads_every_file(hub, model_folder, tmp_path, private):
    result = push(hub.url, model_folder, "evo-user/merged", tmp_path, private=private)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert result.stdout.strip().splitlines()[-1].startswith(f"{hub.url}/evo-user/merged/commit/")
    assert SECRET not in output
    assert hub.unknown == [], f"requests the stand-in does not implement: {hub.unknown}"

    assert hub.repos == {"evo-user/merged": {"private": private, "type": "model"}}
    expected = {p.name: p.read_bytes() for p in model_folder.iterdir()}
    assert hub.files["evo-user/merged"] == expected
    # The weights went through the LFS protocol (batch, PUT, verify), not xet nor inline.
    weights = expected["model.safetensors"]
    assert weights in hub.lfs_objects.values()
    assert any(r.startswith("PUT /_lfs-upload/") for r in hub.requests)
    assert not any("xet" in r for r in hub.requests if "xet-write-token" not in r)

    sent = dict(zip(hub.requests, hub.auth_headers))
    for request, auth in sent.items():
        if request.startswith(("POST /api/repos/create", "POST /api/models/", "POST /evo-user/merged.git/")):
            assert auth == f"Bearer {SECRET}", request
        if request.startswith("PUT /_lfs-upload/"):  # a presigned storage URL: no token goes there
            assert auth is None


def test_second_push_updates_the_existing_repo(hub, model_folder, tmp_path):
    assert push(hub.url, model_folder, "evo-user/merged", tmp_path).returncode == 0
    changed = tmp_path / "changed"
    changed.mkdir()
    for path in model_folder.iterdir():
        (changed / path.name).write_bytes(path.read_bytes())
    (changed / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 32}))

    result = push(hub.url, changed, "evo-user/merged", tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert len(hub.commits["evo-user/merged"]) == 2  # the 409 "already exists" was not an error
    assert hub.files["evo-user/merged"]["config.json"] == (changed / "config.json").read_bytes()
    assert hub.unknown == []


def test_no_token_is_one_line_naming_the_login(hub, model_folder, tmp_path):
    line = one_error_line(push(hub.url, model_folder, "evo-user/merged", tmp_path, token=None))
    assert "no Hugging Face token" in line and "hf auth login" in line and "HF_TOKEN" in line
    assert hub.requests == []


def test_forbidden_repo_is_one_line_naming_the_repo(hub, model_folder, tmp_path):
    hub.fail(403, repo_id="someone-else/merged", message="You don't have the rights to create a model")
    line = one_error_line(push(hub.url, model_folder, "someone-else/merged", tmp_path))
    assert "someone-else/merged" in line and "403" in line and "write access" in line
    assert hub.repos == {}


def test_server_error_echoing_the_token_is_scrubbed(hub, model_folder, tmp_path):
    hub.fail(500, route="create", message="internal error", echo_auth=True)
    line = one_error_line(push(hub.url, model_folder, "evo-user/merged", tmp_path))
    assert "500" in line and "internal error" in line and "Authorization: Bearer ***)" in line
    assert f"Bearer {SECRET}" in hub.auth_headers  # the stand-in did receive, and echo, the token


def test_invalid_repo_id_is_refused_before_any_request(hub, model_folder, tmp_path):
    line = one_error_line(push(hub.url, model_folder, "not a/valid//id", tmp_path))
    assert "'not a/valid//id' is not a valid repo id" in line
    assert hub.requests == []


def test_offline_mode_is_one_line_saying_to_unset_it(hub, model_folder, tmp_path):
    line = one_error_line(push(hub.url, model_folder, "evo-user/merged", tmp_path, offline=True))
    assert "HF_HUB_OFFLINE" in line and "unset" in line
    assert hub.requests == []


def test_unreachable_endpoint_is_one_line_naming_it(model_folder, tmp_path):
    with socket.socket() as sock:  # a port nobody listens on once this socket closes
        sock.bind(("127.0.0.1", 0))
        endpoint = f"http://127.0.0.1:{sock.getsockname()[1]}"
    line = one_error_line(push(endpoint, model_folder, "evo-user/merged", tmp_path))
    assert f"cannot reach the Hub endpoint {endpoint}" in line


def test_missing_or_empty_folder_is_refused_before_any_request(tmp_path):
    from evomerge.errors import EvomergeError
    from evomerge.hub import push_folder

    with pytest.raises(EvomergeError, match="is not a folder; export the model first"):
        push_folder(tmp_path / "missing", "evo-user/merged")
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    with pytest.raises(EvomergeError, match="holds no files; nothing to push"):
        push_folder(tmp_path / "empty", "evo-user/merged")
