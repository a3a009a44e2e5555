import os

# No test may reach a hub or write Ray auth tokens.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import pytest  # noqa: E402
import torch  # noqa: E402

from evomerge.tiny import build_family  # noqa: E402

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def llama_family(tmp_path_factory):
    """A tiny Llama base with three perturbed experts, sharded to exercise the index reader."""
    root = tmp_path_factory.mktemp("llama_family")
    return build_family(root, 3, arch="llama", hidden=32, layers=4, shard_size="60KB", seed=0)


@pytest.fixture(scope="session")
def gpt2_family(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpt2_family")
    return build_family(root, 2, arch="gpt2", hidden=32, layers=3, seed=1)


@pytest.fixture(scope="session")
def demo_cache(tmp_path_factory):
    """The demo family, trained once per session into a private cache (~90 s on 2 cores)."""
    cache = tmp_path_factory.mktemp("evomerge-cache")
    old = os.environ.get("EVOMERGE_CACHE")
    os.environ["EVOMERGE_CACHE"] = str(cache)
    try:
        from evomerge.demo import ensure_family

        ensure_family(progress=False)
    finally:
        if old is None:
            os.environ.pop("EVOMERGE_CACHE")
        else:
            os.environ["EVOMERGE_CACHE"] = old
    return cache
