"""Read Hugging Face checkpoints lazily, a tensor at a time, and write them back atomically.

Reading: a local folder with `model.safetensors`, or shards listed by
`model.safetensors.index.json`. Pickle checkpoints (`*.bin`, `*.pt`) can execute code when
unpickled, so they are refused unless the caller opts in, and then loaded with
`torch.load(weights_only=True)`. A hub id resolves through the standard HF cache.

Writing: sharded safetensors plus index, config, generation config and tokenizer files,
all into a temporary sibling folder that is renamed into place only when complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import socket
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator, Mapping

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


def looks_like_hub_id(ref: str) -> bool:
    return bool(_HUB_ID.match(ref))


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
            f"model {text!r}: there is no folder {path.resolve()}, and as a hub id it could not be fetched from the hub "
            f"({type(exc).__name__}); fix the path, or download the model first"
        ) from None
    return Path(local)


def read_json(file: Path, what: str) -> dict:
    """A JSON object from a file, or one line naming the file and what is wrong with it."""
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise EvomergeError(f"{file} is not valid JSON ({str(exc).splitlines()[0]}); restore the {what} "
                            "from the original model") from None
    if not isinstance(data, dict):
        raise EvomergeError(f"{file} holds a {type(data).__name__}, not a JSON object; restore the {what} "
                            "from the original model")
    return data


def read_config(folder: Path) -> dict:
    cfg = folder / "config.json"
    if not cfg.is_file():
        raise EvomergeError(f"{folder} has no config.json; pass a Hugging Face model folder")
    return read_json(cfg, "config.json")


# Bytes per element of each safetensors dtype (the header names them).
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4,
               "U16": 2, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


def _corrupt(file: Path, why: str) -> EvomergeError:
    return EvomergeError(f"{file} is not a readable safetensors file ({why}); the download or save was cut short "
                         "or the file is damaged: download or save it again")


def read_safetensors_header(file: Path) -> tuple[dict[str, dict], bytes]:
    """(tensor name -> {dtype, shape, data_offsets}, the raw header bytes) without reading tensor data.

    The header is checked against the file size, so a truncated or garbage file is caught here,
    before any weight is loaded.
    """
    try:
        size = file.stat().st_size
        with open(file, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise _corrupt(file, f"{size} bytes, shorter than a header")
            n = int.from_bytes(head, "little")
            if n > size - 8 or n > 100_000_000:
                raise _corrupt(file, f"its header claims {n} bytes but the file has {size}")
            raw = f.read(n)
    except OSError as exc:
        raise EvomergeError(f"{file} cannot be read ({exc.strerror}); check its permissions") from None
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise _corrupt(file, "its header is not JSON") from None
    if not isinstance(header, dict):
        raise _corrupt(file, "its header is not a JSON object")
    header.pop("__metadata__", None)
    end = 0
    for name, info in header.items():
        ok = (isinstance(info, dict) and info.get("dtype") in DTYPE_BYTES and isinstance(info.get("shape"), list)
              and isinstance(info.get("data_offsets"), list) and len(info["data_offsets"]) == 2)
        if not ok:
            raise _corrupt(file, f"tensor {name!r} has a malformed header entry")
        end = max(end, int(info["data_offsets"][1]))
    if 8 + n + end != size:
        raise _corrupt(file, f"its tensors need {8 + n + end} bytes but the file has {size}")
    return header, raw


class Checkpoint:
    """The tensors of one model folder, opened lazily: nothing is read until asked for."""

    def __init__(self, ref: str | os.PathLike, allow_pickle: bool = False):
        self.ref = str(ref)
        self.path = resolve_model_path(ref)
        self.config = read_config(self.path)
        self.model_type = self.config.get("model_type", "llama")
        self._where: dict[str, Path] = {}  # tensor name -> file
        self._headers: dict[Path, tuple[dict, bytes]] = {}  # safetensors file -> (header, raw header bytes)
        self._pickle = False
        self._pickle_cache: dict[Path, dict] = {}
        self._index_files(allow_pickle)

    def _index_files(self, allow_pickle: bool) -> None:
        p = self.path
        if (p / SAFETENSORS_INDEX).is_file():
            index = read_json(p / SAFETENSORS_INDEX, SAFETENSORS_INDEX)
            weight_map = index.get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise EvomergeError(f"{p / SAFETENSORS_INDEX} has no 'weight_map'; restore the index from the original model")
            for fname in dict.fromkeys(weight_map.values()):
                if not (p / str(fname)).is_file():
                    raise EvomergeError(f"{p / SAFETENSORS_INDEX} names shard {fname!r}, which is missing from {p}; "
                                        "download the missing shard")
                self._headers[p / fname] = read_safetensors_header(p / fname)
            for k, v in weight_map.items():
                if k not in self._headers[p / v][0]:
                    raise EvomergeError(f"{p / SAFETENSORS_INDEX} places tensor {k!r} in {v}, which does not hold it; "
                                        "the index and the shards are from different saves")
            self._where = {k: p / v for k, v in weight_map.items()}
        elif (p / "model.safetensors").is_file():
            file = p / "model.safetensors"
            self._headers[file] = read_safetensors_header(file)
            self._where = {k: file for k in self._headers[file][0]}
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
                weight_map = read_json(p / PICKLE_INDEX, PICKLE_INDEX).get("weight_map") or {}
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
                shapes.update({k: tuple(info["shape"]) for k, info in self._headers[file][0].items()})
            self._shapes = {k: shapes[k] for k in self._where if k in shapes}
        return self._shapes

    def fingerprint(self) -> str:
        """A hash of what identifies these weights without loading them: the config, the index, each
        weight file's name, size and safetensors header (tensor names, dtypes, shapes, offsets), and
        samples of its bytes (64 KiB at four places: weights swapped for others of the same shapes
        change them; a change confined to unsampled bytes would not)."""
        h = hashlib.sha256()
        for name in ("config.json", SAFETENSORS_INDEX, PICKLE_INDEX):
            if (self.path / name).is_file():
                h.update(name.encode() + b"\0" + (self.path / name).read_bytes())
        for file in sorted(dict.fromkeys(self._where.values())):
            size = file.stat().st_size
            h.update(f"{file.name}\0{size}\0".encode())
            if file in self._headers:
                h.update(self._headers[file][1])
            chunk = 1 << 16
            with open(file, "rb") as f:
                for at in sorted({0, size // 3, 2 * size // 3, max(0, size - chunk)}):
                    f.seek(at)
                    h.update(f.read(chunk))
        return h.hexdigest()[:16]

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
            try:
                with safe_open(file, framework="pt", device="cpu") as f:
                    t = f.get_tensor(name)
            except Exception as exc:  # the header passed but the bytes did not: one line, not a traceback
                raise _corrupt(file, f"reading {name!r} failed: {str(exc).splitlines()[0][:120]}") from None
        return t.to(device=device, dtype=dtype or t.dtype)

    def iter_tensors(self, dtype: torch.dtype | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        for name in self._where:
            yield name, self.get(name, dtype)


def format_size(n: float) -> str:
    """'1.5 GiB' (binary units)."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"


def parse_size(text: str | int) -> int:
    """'2GB', '500MB', '1.5GiB' or a byte count."""
    if isinstance(text, int) and not isinstance(text, bool):
        size = text
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([KMGT]?)(i?)B?\s*", str(text), re.IGNORECASE)
        if not m:
            raise EvomergeError(f"shard size {text!r} is not a size; write it like '2GB' or '500MB'")
        num, unit, binary = float(m.group(1)), m.group(2).upper(), m.group(3)
        size = int(num * (1024 if binary else 1000) ** " KMGT".index(unit or " "))
    if size < 1:
        raise EvomergeError(f"shard size {text!r} is not a positive size; write it like '2GB' or '500MB'")
    return size


OUTPUT_MARKER = ".evomerge-output"  # in every folder evomerge writes: only such folders may be overwritten
WRITER_MARKER = ".evomerge-writer"  # in a temporary folder while it is written: who is writing it


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temporaries(out: Path) -> list[Path]:
    """Remove `.NAME.tmp-*` / `.NAME.old-*` siblings that a dead evomerge writer left behind.

    Only folders that carry evomerge's writer marker naming a process on this host that no
    longer runs are removed (or empty ones, a writer killed before its marker landed): a
    temporary folder of a live writer, another host's, or anything else is left alone.
    """
    removed = []
    for tmp in list(out.parent.glob(f".{out.name}.tmp-*")) + list(out.parent.glob(f".{out.name}.old-*")):
        if not tmp.is_dir():
            continue
        marker = tmp / WRITER_MARKER
        try:
            owner = json.loads(marker.read_text()) if marker.is_file() else None
        except (OSError, json.JSONDecodeError):
            continue
        if owner is None:
            stale = not any(tmp.iterdir()) and time.time() - tmp.stat().st_mtime > 60
        else:
            stale = owner.get("host") == socket.gethostname() and not _alive(int(owner.get("pid", -1)))
        if stale:
            shutil.rmtree(tmp, ignore_errors=True)
            removed.append(tmp)
    return removed


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def check_output_folder(out_dir: str | os.PathLike, overwrite: bool = False, protect: Iterable[str | os.PathLike] = ()) -> Path:
    """Refuse, before any work, an output folder that cannot or must not be written.

    `--overwrite` replaces only a folder evomerge wrote (it holds OUTPUT_MARKER), and never one
    that is or contains the current directory or any of `protect` (the recipe, the models).
    """
    out = Path(out_dir).expanduser().resolve()
    if out.exists():
        if not out.is_dir():
            raise EvomergeError(f"output {out} is a file; pass a folder path")
        if not overwrite:
            raise EvomergeError(f"output folder {out} already exists; pick a new folder or pass --overwrite")
        cwd = Path.cwd().resolve()
        if _inside(cwd, out):
            raise EvomergeError(f"--overwrite refused: {out} is (or contains) the current directory; pick a new output folder")
        for item in protect:
            p = Path(item).expanduser()
            if p.exists() and _inside(p.resolve(), out):
                raise EvomergeError(f"--overwrite refused: {out} holds {p}, an input of this merge; pick a new output folder")
        if not (out / OUTPUT_MARKER).is_file():
            raise EvomergeError(f"--overwrite refused: {out} was not written by evomerge (no {OUTPUT_MARKER} in it); "
                                "remove it yourself or pick a new output folder")
    existing = out.parent
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise EvomergeError(f"cannot write {out}: {existing} is a file, not a folder; pick another output path")
    try:  # a real probe: permission bits say nothing for root, or on a read-only mount
        Path(tempfile.mkdtemp(prefix=".evomerge-probe-", dir=existing)).rmdir()
    except OSError as exc:
        raise EvomergeError(f"cannot write {out}: {existing} is not writable ({exc.strerror}); "
                            "pick an output folder you can write to") from None
    return out


@contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling path; on success it replaces `path` in one rename (a reader never
    sees half a file), with the permissions a plain `open` would have given it."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    try:
        os.chmod(tmp, 0o666 & ~umask)
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextmanager
def atomic_folder(out_dir: str | os.PathLike, overwrite: bool = False,
                  protect: Iterable[str | os.PathLike] = ()) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it replaces `out_dir` in one rename.

    An exception (or a kill) leaves `out_dir` as it was: either absent or the previous model.
    The temporary folder names its writer, so the next write to the same target removes what a
    killed writer left behind.
    """
    out = check_output_folder(out_dir, overwrite, protect)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(out)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        (tmp / WRITER_MARKER).write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                                      "started": time.time()}))
        yield tmp
        (tmp / WRITER_MARKER).unlink()
        (tmp / OUTPUT_MARKER).write_text(json.dumps({"written_by": "evomerge", "time": time.time()}) + "\n")
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            (old / WRITER_MARKER).write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))
            os.rename(out, old / out.name)
            os.rename(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_safetensors(folder: Path, tensors: Mapping[str, torch.Tensor], shard_size: int | str = "5GB") -> list[str]:
    """Write tensors as shards of at most `shard_size` bytes (plus an index when more than one).

    Shards are planned by huggingface_hub from shapes alone (meta tensors), then written one at a
    time, each tensor read from `tensors` only when its shard is written: a lazy mapping (see
    `StreamedTensors`) thus holds at most one shard in memory."""
    from huggingface_hub import split_torch_state_dict_into_shards

    layout = tensors.layout() if isinstance(tensors, StreamedTensors) else \
        {n: (tuple(t.shape), t.dtype) for n, t in tensors.items()}
    meta = {n: torch.empty(shape, dtype=dtype, device="meta") for n, (shape, dtype) in layout.items()}
    plan = split_torch_state_dict_into_shards(meta, max_shard_size=parse_size(shard_size),
                                              filename_pattern="model{suffix}.safetensors")
    for fname, names in plan.filename_to_tensors.items():
        shard = {n: tensors[n].detach().to("cpu").contiguous() for n in names}
        save_file(shard, str(folder / fname), metadata={"format": "pt"})
        del shard
    if plan.is_sharded:
        index = {"metadata": {"total_size": plan.metadata["total_size"]}, "weight_map": plan.tensor_to_filename}
        (folder / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2))
    return list(plan.filename_to_tensors)


class StreamedTensors(Mapping):
    """A name -> tensor mapping whose tensors are made when asked (by `produce`), in `layout` order."""

    def __init__(self, layout: dict[str, tuple[tuple[int, ...], torch.dtype]], produce):
        self._layout, self._produce = layout, produce

    def layout(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        return self._layout

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._layout:
            raise KeyError(name)
        return self._produce(name)

    def __iter__(self):
        return iter(self._layout)

    def __len__(self) -> int:
        return len(self._layout)


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
    protect: Iterable[str | os.PathLike] = (),
) -> Path:
    """Write a loadable HF model folder atomically: weights, config, generation config, tokenizer."""
    with atomic_folder(out_dir, overwrite=overwrite, protect=protect) as tmp:
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
