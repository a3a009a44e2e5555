"""Read Hugging Face checkpoints lazily, a tensor at a time, and write them back atomically.

Reading: a local folder with `model.safetensors`, or shards listed by
`model.safetensors.index.json`. Pickle checkpoints (`*.bin`, `*.pt`) can execute code when
unpickled, so they are refused unless the caller opts in, and then loaded with
`torch.load(weights_only=True)`. A hub id resolves through the standard HF cache.

Writing: sharded safetensors plus index, config, generation config and tokenizer files,
all into a temporary sibling folder that is renamed into place only when complete.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Mapping

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from evomerge.errors import EvomergeError

SAFETENSORS_INDEX = "model.safetensors.index.json"
PICKLE_INDEX = "pytorch_model.bin.index.json"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "preprocessor_config.json",
    "processor_config.json",
)
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def resolve_model_path(ref: str | os.PathLike) -> Path:
    """A local folder as is; otherwise a hub id fetched into (or found in) the HF cache."""
    path = Path(ref).expanduser()
    if path.is_dir():
        return path
    text = str(ref)
    if path.exists():
        raise EvomergeError(f"model path {text!r} is a file; pass the folder that holds config.json and the weights")
    if not _HUB_ID.match(text):
        raise EvomergeError(f"model path {text!r} does not exist; pass a local model folder or a hub id like 'org/name'")
    try:
        from huggingface_hub import snapshot_download

        local = snapshot_download(
            text,
            allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"],
        )
    except Exception as exc:  # network, auth, offline cache miss: one line, no token in it
        raise EvomergeError(
            f"model {text!r} is not a local folder and could not be fetched from the hub "
            f"({type(exc).__name__}); download it first or pass a local path"
        ) from None
    return Path(local)


def read_config(folder: Path) -> dict:
    cfg = folder / "config.json"
    if not cfg.is_file():
        raise EvomergeError(f"{folder} has no config.json; pass a Hugging Face model folder")
    return json.loads(cfg.read_text())


class Checkpoint:
    """The tensors of one model folder, opened lazily: nothing is read until asked for."""

    def __init__(self, ref: str | os.PathLike, allow_pickle: bool = False):
        self.ref = str(ref)
        self.path = resolve_model_path(ref)
        self.config = read_config(self.path)
        self.model_type = self.config.get("model_type", "llama")
        self._where: dict[str, Path] = {}  # tensor name -> file
        self._pickle = False
        self._pickle_cache: dict[Path, dict] = {}
        self._index_files(allow_pickle)

    def _index_files(self, allow_pickle: bool) -> None:
        p = self.path
        if (p / SAFETENSORS_INDEX).is_file():
            weight_map = json.loads((p / SAFETENSORS_INDEX).read_text())["weight_map"]
            self._where = {k: p / v for k, v in weight_map.items()}
        elif (p / "model.safetensors").is_file():
            with safe_open(p / "model.safetensors", framework="pt") as f:
                self._where = {k: p / "model.safetensors" for k in f.keys()}
        else:
            pickles = sorted(p.glob("*.bin")) + sorted(p.glob("*.pt")) + sorted(p.glob("*.pth"))
            if not pickles:
                raise EvomergeError(f"{p} holds no model weights (no *.safetensors, *.bin or *.pt)")
            if not allow_pickle:
                raise EvomergeError(
                    f"{pickles[0]} is a pickle checkpoint, which can run code when loaded; "
                    "convert it to safetensors, or opt in with --allow-pickle (loads with weights_only=True)"
                )
            self._pickle = True
            if (p / PICKLE_INDEX).is_file():
                weight_map = json.loads((p / PICKLE_INDEX).read_text())["weight_map"]
                self._where = {k: p / v for k, v in weight_map.items()}
            else:
                for f in pickles:
                    for k in self._load_pickle(f):
                        self._where[k] = f
        if not self._where:
            raise EvomergeError(f"{p} has weight files but no tensors in them")

    def _load_pickle(self, file: Path) -> dict:
        if file not in self._pickle_cache:
            try:
                self._pickle_cache[file] = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
            except Exception as exc:
                raise EvomergeError(
                    f"{file} could not be loaded with weights_only=True ({type(exc).__name__}); "
                    "it holds more than tensors: convert it to safetensors in a trusted environment"
                ) from None
        return self._pickle_cache[file]

    def names(self) -> list[str]:
        return list(self._where)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def shape(self, name: str) -> tuple[int, ...]:
        self._file(name)
        return self.shapes()[name]

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Every tensor's shape, from the file headers alone (no tensor data is read)."""
        if getattr(self, "_shapes", None) is None:
            shapes: dict[str, tuple[int, ...]] = {}
            for file in dict.fromkeys(self._where.values()):
                if self._pickle:
                    shapes.update({k: tuple(v.shape) for k, v in self._load_pickle(file).items()})
                    continue
                with safe_open(file, framework="pt") as f:
                    for k in f.keys():
                        shapes[k] = tuple(f.get_slice(k).get_shape())
            self._shapes = shapes
        return self._shapes

    def _file(self, name: str) -> Path:
        try:
            return self._where[name]
        except KeyError:
            raise EvomergeError(
                f"tensor {name!r} is missing from {self.ref}; all sources must share one architecture "
                "(check the model folders, or restrict the merge to a common architecture)"
            ) from None

    def get(self, name: str, dtype: torch.dtype | None = None, device: str | torch.device = "cpu") -> torch.Tensor:
        """Read one tensor; only its bytes are touched."""
        file = self._file(name)
        if self._pickle:
            t = self._load_pickle(file)[name]
        else:
            with safe_open(file, framework="pt", device="cpu") as f:
                t = f.get_tensor(name)
        return t.to(device=device, dtype=dtype or t.dtype)

    def iter_tensors(self, dtype: torch.dtype | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        for name in self._where:
            yield name, self.get(name, dtype)


def parse_size(text: str | int) -> int:
    """'2GB', '500MB', '1.5GiB' or a byte count."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([\d.]+)\s*([KMGT]?)(i?)B?\s*", str(text), re.IGNORECASE)
    if not m:
        raise EvomergeError(f"shard size {text!r} is not a size; write it like '2GB' or '500MB'")
    num, unit, binary = float(m.group(1)), m.group(2).upper(), m.group(3)
    base = 1024 if binary else 1000
    return int(num * base ** " KMGT".index(unit or " "))


@contextmanager
def atomic_folder(out_dir: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it replaces `out_dir` in one rename.

    An exception (or a kill) leaves `out_dir` as it was: either absent or the previous model.
    """
    out = Path(out_dir).resolve()
    if out.exists() and not overwrite:
        raise EvomergeError(f"output folder {out} already exists; pick a new folder or pass --overwrite")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.rename(out, old / out.name)
            os.rename(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_safetensors(folder: Path, tensors: Mapping[str, torch.Tensor], shard_size: int | str = "5GB") -> list[str]:
    """Write tensors as shards of at most `shard_size` bytes (plus an index when more than one)."""
    limit = parse_size(shard_size)
    shards: list[dict[str, torch.Tensor]] = [{}]
    used = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and used + nbytes > limit:
            shards.append({})
            used = 0
        shards[-1][name] = t.detach().to("cpu").contiguous()
        used += nbytes
    meta = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], str(folder / "model.safetensors"), metadata=meta)
        return ["model.safetensors"]
    files = []
    weight_map = {}
    total = 0
    for i, shard in enumerate(shards, 1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(folder / fname), metadata=meta)
        files.append(fname)
        for name, t in shard.items():
            weight_map[name] = fname
            total += t.numel() * t.element_size()
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2))
    return files


def write_model(
    out_dir: str | os.PathLike,
    tensors: Mapping[str, torch.Tensor],
    config: dict,
    *,
    config_source: Path | None = None,
    tokenizer_source: Path | None = None,
    shard_size: int | str = "5GB",
    extra_files: Mapping[str, str] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a loadable HF model folder atomically: weights, config, generation config, tokenizer."""
    with atomic_folder(out_dir, overwrite=overwrite) as tmp:
        write_safetensors(tmp, tensors, shard_size)
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
        if config_source is not None and (config_source / "generation_config.json").is_file():
            shutil.copy2(config_source / "generation_config.json", tmp / "generation_config.json")
        if tokenizer_source is not None:
            for fname in TOKENIZER_FILES:
                if (tokenizer_source / fname).is_file():
                    shutil.copy2(tokenizer_source / fname, tmp / fname)
        for fname, text in (extra_files or {}).items():
            (tmp / fname).write_text(text)
    return Path(out_dir).resolve()
