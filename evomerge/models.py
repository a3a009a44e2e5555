"""Model references: local folders, hub ids, and built-in families (`builtin:<family>/<member>`).

A built-in family is a set of tiny models evomerge builds locally on first use (no download).
A family registers itself here with how to build a member and how to describe it without
building it (config and tensor shapes), so a campaign's pre-flight and `--dry-run` can plan a
campaign over a family that does not exist on disk yet. The demo registers `demo`.
"""

from __future__ import annotations

import importlib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from evomerge.errors import EvomergeError

BUILTIN = "builtin:"


@dataclass
class ModelInfo:
    """What pre-flight knows about a model without reading a tensor."""

    ref: str  # as the config wrote it
    path: Path  # where its folder is (or will be, for a family not built yet)
    config: dict
    shapes: dict[str, tuple[int, ...]]
    element_bytes: int = 4  # bytes per element as stored
    fingerprint: str | None = None  # None: not on disk yet
    built: bool = True

    @property
    def model_type(self) -> str:
        return self.config.get("model_type", "llama")

    @property
    def numel(self) -> int:
        return sum(math.prod(shape) for shape in self.shapes.values())


@dataclass
class BuiltinFamily:
    name: str
    members: tuple[str, ...]
    build: Callable[[str], Path]  # the member's folder, building the family first if needed
    location: Callable[[str], Path]  # where the member's folder is or will be (builds nothing)
    describe: Callable[[str], ModelInfo]  # config and shapes without building
    is_built: Callable[[], bool] = field(default=lambda: True)
    tokenizer: Callable[[], object] | None = None  # the family's tokenizer without building (for pre-flight)


FAMILIES: dict[str, BuiltinFamily] = {}
# Families whose module registers them on import (imported only when a config names them).
PROVIDERS = {"demo": "evomerge.demo", "length": "evomerge.length_family", "vqa": "evomerge.vqa_family"}


def build_once(folder: Path, build: Callable[[Path], object], version: str) -> Path:
    """A built-in family's folder, built on first use: into a temporary sibling, marked done, then
    renamed into place, so an interrupted build never leaves a folder that looks finished."""
    import json
    import os
    import shutil
    import tempfile
    import time

    if (folder / "done").is_file():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{version}.tmp-", dir=folder.parent))
    try:
        build(tmp)
        (tmp / "done").write_text(json.dumps({"version": version, "built": time.time()}))
        if folder.exists():  # a stale, unfinished build of ours
            shutil.rmtree(folder)
        os.rename(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def register_cached(name: str, members: tuple[str, ...], folder: Callable[[], Path], ensure: Callable[[], Path],
                    describe: Callable[[str], ModelInfo], tokenizer: Callable[[], object] | None = None) -> BuiltinFamily:
    """Register a family whose members live in `folder()` once `ensure()` has built it."""
    return register_family(BuiltinFamily(
        name, members, build=lambda member: ensure() / member, location=lambda member: folder() / member,
        describe=describe, is_built=lambda: (folder() / "done").is_file(), tokenizer=tokenizer))


def register_family(family: BuiltinFamily) -> BuiltinFamily:
    FAMILIES[family.name] = family
    return family


def builtin_family(ref: str) -> tuple[BuiltinFamily, str]:
    """(family, member) for `builtin:<family>/<member>`, or one line listing what exists."""
    name = ref[len(BUILTIN):]
    fam_name, _, member = name.partition("/")
    if fam_name not in FAMILIES and fam_name in PROVIDERS:
        importlib.import_module(PROVIDERS[fam_name])
    fam = FAMILIES.get(fam_name)
    if fam is None or member not in fam.members:
        for provider in PROVIDERS.values():  # so the message can list every family
            importlib.import_module(provider)
        known = [f"{BUILTIN}{f.name}/{m}" for f in FAMILIES.values() for m in f.members]
        raise EvomergeError(f"unknown builtin model {ref!r}; available: {', '.join(known)}")
    return fam, member


def resolve_ref(ref: str, build: bool = True) -> str:
    """A model reference as a folder path (or hub id): builtins map to their local folder."""
    if not ref.startswith(BUILTIN):
        return ref
    fam, member = builtin_family(ref)
    return str(fam.build(member) if build else fam.location(member))


def model_info(ref: str, allow_pickle: bool = False) -> ModelInfo:
    """Config, shapes and fingerprint of a model from its headers alone (or its family's description)."""
    if ref.startswith(BUILTIN):
        fam, member = builtin_family(ref)
        if not fam.is_built():
            info = fam.describe(member)
            info.ref, info.built = ref, False
            return info
        ref_path = str(fam.location(member))
    else:
        ref_path = ref
    from evomerge.checkpoint import DTYPE_BYTES, Checkpoint

    ckpt = Checkpoint(ref_path, allow_pickle=allow_pickle)
    sizes = [DTYPE_BYTES[h["dtype"]] for header, _ in ckpt._headers.values() for h in header.values()]
    return ModelInfo(ref, ckpt.path, ckpt.config, ckpt.shapes(), max(sizes) if sizes else 4, ckpt.fingerprint())
