"""Push an exported model folder to the Hugging Face Hub (`evomerge export --push-to-hub`).

huggingface_hub does the work; this module decides what to refuse before any request and turns
every failure into one `EvomergeError` line that names the culprit and the fix, with the token
scrubbed out. The endpoint (HF_ENDPOINT) and offline switch (HF_HUB_OFFLINE) are read by
huggingface_hub when it is first imported; the token comes from HF_TOKEN or the stored login.
"""

from __future__ import annotations

import os
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from evomerge.checkpoint import OUTPUT_MARKER
from evomerge.errors import EvomergeError

LOGIN_HINT = "log in with `hf auth login` or set HF_TOKEN"


def check_push(repo_id: str) -> str:
    """Everything that can be refused without the network (the repo id, offline mode, the token),
    checked before the export writes a byte; the token, for the upload."""
    # Imported here so that `evomerge` runs without touching huggingface_hub unless pushing.
    from huggingface_hub import constants, get_token
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        raise EvomergeError(f"--push-to-hub: {repo_id!r} is not a valid repo id; use NAMESPACE/NAME, at most "
                            "96 letters, digits, '-', '_' or '.' (no '--' or '..')") from None
    if constants.HF_HUB_OFFLINE:
        raise EvomergeError(f"--push-to-hub: {_offline_variable()} is set, so huggingface_hub refuses "
                            "every request; unset it to push")
    try:
        token = get_token()
    except Exception as exc:  # an OIDC exchange (HF_OIDC_RESOURCE) that failed raises here
        raise EvomergeError(f"--push-to-hub: could not read the Hub token ({_first_line(exc)}); "
                            f"{LOGIN_HINT}") from None
    if not token:
        raise EvomergeError(f"--push-to-hub: no Hugging Face token found; {LOGIN_HINT}")
    return token


def push_folder(folder: str | Path, repo_id: str, private: bool = False,
                commit_message: str | None = None) -> str:
    """Create `repo_id` (a model repo) if needed and upload `folder` into it; the commit's URL."""
    from huggingface_hub import HfApi

    folder = Path(folder)
    if not folder.is_dir():
        raise EvomergeError(f"--push-to-hub: {folder} is not a folder; export the model first")
    if not any(path.is_file() for path in folder.rglob("*")):
        raise EvomergeError(f"--push-to-hub: {folder} holds no files; nothing to push")
    token = check_push(repo_id)

    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        with _plain_lfs_unless_xet_offered(api, repo_id, token):
            commit = api.upload_folder(repo_id=repo_id, folder_path=folder, repo_type="model",
                                       commit_message=commit_message or "Upload merged model with evomerge",
                                       ignore_patterns=[OUTPUT_MARKER])  # local bookkeeping, not the model
    except Exception as exc:
        # Broad on purpose: hf_xet and the HTTP stack raise their own types, and the CLI promises one
        # line, never a traceback. `from None`: chained errors may quote replies holding the token.
        raise _explain(exc, repo_id, api.endpoint, token) from None
    return str(commit.commit_url)


@contextmanager
def _plain_lfs_unless_xet_offered(api, repo_id: str, token: str) -> Iterator[None]:
    """Upload over plain git-LFS when the endpoint has no xet storage.

    huggingface_hub 2.x sends every LFS file through xet whenever hf_xet is installed, without
    asking the server, so a Hub without xet (a mirror, an older Hub Enterprise, a test stand-in)
    would fail. We ask for the xet write token, exactly as hf_xet would: if the endpoint does not
    grant one, xet is switched off for this upload only, through the flag HF_HUB_DISABLE_XET sets.
    huggingface.co grants it, so real uploads keep xet.
    """
    from importlib.util import find_spec

    from huggingface_hub import constants
    from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status

    # No hf_xet, HF_HUB_DISABLE_XET=1, or a huggingface_hub without the flag: already plain LFS.
    if getattr(constants, "HF_HUB_DISABLE_XET", True) or find_spec("hf_xet") is None:
        yield
        return
    response = get_session().get(f"{api.endpoint}/api/models/{repo_id}/xet-write-token/main",
                                 headers=build_hf_headers(token=token))
    if response.status_code != 404:
        hf_raise_for_status(response)  # 401/403 and the like are the user's problem, explained above
    if response.status_code == 200 and constants.HUGGINGFACE_HEADER_X_XET_ENDPOINT in response.headers:
        yield
        return
    constants.HF_HUB_DISABLE_XET = True
    try:
        yield
    finally:
        constants.HF_HUB_DISABLE_XET = False


def _explain(exc: BaseException, repo_id: str, endpoint: str, token: str) -> EvomergeError:
    """One line naming what went wrong and what to do, without the token."""
    from huggingface_hub.utils import HfHubHTTPError, OfflineModeIsEnabled, RepositoryNotFoundError

    # huggingface_hub wraps some failures (an LFS upload in a RuntimeError): judge by the cause.
    chain = list(_chain(exc))
    http = next((e for e in chain if isinstance(e, HfHubHTTPError) and e.response is not None), None)
    if any(isinstance(e, OfflineModeIsEnabled) for e in chain):
        message = f"{_offline_variable()} is set, so huggingface_hub refuses every request; unset it to push"
    elif http is not None:
        status = http.response.status_code
        reason = _first_line(http.server_message or http.response.reason_phrase or "")
        if status in (401, 403) or isinstance(http, RepositoryNotFoundError):
            message = (f"the token lacks write access to {repo_id} (HTTP {status}: {reason}); use a token with "
                       f"write access to that namespace: {LOGIN_HINT}")
        else:
            message = f"the Hub answered HTTP {status} while pushing to {repo_id}: {reason or 'no reason given'}"
    elif any(isinstance(e, _transport_errors()) for e in chain):
        message = (f"cannot reach the Hub endpoint {endpoint} ({_first_line(chain[-1])}); "
                   "check the network, or HF_ENDPOINT if you set it")
    else:
        message = f"pushing to {repo_id} failed: {type(exc).__name__}: {_first_line(exc)}"
    return EvomergeError(f"--push-to-hub: {_scrub(message, token)}")


def _chain(exc: BaseException | None) -> Iterator[BaseException]:
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def _transport_errors() -> tuple[type[BaseException], ...]:
    """Connection-level errors: OSError covers `requests` (huggingface_hub < 1.0), httpx* the rest."""
    found: list[type[BaseException]] = [OSError]
    for module in ("httpx2", "httpx"):
        try:
            found.append(__import__(module).TransportError)
        except (ImportError, AttributeError):
            pass
    return tuple(found)


def _offline_variable() -> str:
    return "HF_HUB_OFFLINE" if os.environ.get("HF_HUB_OFFLINE") else "TRANSFORMERS_OFFLINE"


def _first_line(value: object, limit: int = 200) -> str:
    lines = [line.strip() for line in str(value).splitlines() if line.strip()]
    text = lines[0] if lines else ""
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _scrub(text: str, token: str) -> str:
    """The message without the token, nor anything shaped like one a server might echo back."""
    text = text.replace(token, "***")
    text = re.sub(r"(?i)(bearer\s+)[\w.~+/=-]+", r"\1***", text)
    return re.sub(r"\bhf_[A-Za-z0-9]{8,}", "hf_***", text).replace("\n", " ")
