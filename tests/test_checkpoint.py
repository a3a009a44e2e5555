import json

import pytest
import torch
from safetensors.torch import save_file

from evomerge.checkpoint import Checkpoint, atomic_folder, parse_size, write_model, write_safetensors
from evomerge.errors import EvomergeError


def test_sharded_folder_reads_lazily_by_index(llama_family):
    ck = Checkpoint(llama_family["base"])
    index = json.loads((llama_family["base"] / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1  # really sharded
    assert sorted(ck.names()) == sorted(index["weight_map"])
    name = "model.layers.3.mlp.down_proj.weight"
    assert ck.shape(name) == (32, 64)
    assert ck.get(name, torch.float64).dtype == torch.float64


def test_pickle_checkpoint_refused_unless_opted_in(tmp_path, llama_family):
    folder = tmp_path / "pickled"
    folder.mkdir()
    (folder / "config.json").write_text((llama_family["base"] / "config.json").read_text())
    state = dict(Checkpoint(llama_family["base"]).iter_tensors())
    torch.save(state, folder / "pytorch_model.bin")
    with pytest.raises(EvomergeError, match=r"pytorch_model\.bin is a pickle checkpoint.*--allow-pickle"):
        Checkpoint(folder)
    ck = Checkpoint(folder, allow_pickle=True)
    name = "model.embed_tokens.weight"
    assert torch.equal(ck.get(name), state[name])


def test_pickle_with_code_is_refused_even_when_opted_in(tmp_path, llama_family):
    folder = tmp_path / "evil"
    folder.mkdir()
    (folder / "config.json").write_text((llama_family["base"] / "config.json").read_text())

    class Payload:  # unpickling this would need arbitrary code execution
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"x": Payload()}, folder / "model.pt")
    with pytest.raises(EvomergeError, match="weights_only=True"):
        Checkpoint(folder, allow_pickle=True)


def test_missing_path_and_unreachable_hub_id(tmp_path):
    with pytest.raises(EvomergeError, match="does not exist"):
        Checkpoint(tmp_path / "nope" / "x y")
    with pytest.raises(EvomergeError, match="could not be fetched from the hub"):
        Checkpoint("evomerge-test-org/definitely-not-cached")  # HF_HUB_OFFLINE=1: cache miss


def test_shards_and_index_written(tmp_path):
    tensors = {f"t{i}": torch.full((256,), float(i)) for i in range(5)}  # 1 KiB each
    files = write_safetensors(tmp_path, tensors, shard_size="2KiB")
    assert len(files) == 3
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == 5 * 1024
    assert set(index["weight_map"]) == set(tensors)
    assert parse_size("1.5GiB") == int(1.5 * 2**30)
    with pytest.raises(EvomergeError, match="shard size"):
        parse_size("lots")


def test_interrupted_write_leaves_previous_model_intact(tmp_path):
    out = tmp_path / "model"
    write_model(out, {"w": torch.ones(4)}, {"model_type": "llama"})
    before = sorted(p.name for p in out.iterdir())
    with pytest.raises(RuntimeError):
        with atomic_folder(out, overwrite=True) as tmp:
            save_file({"w": torch.zeros(4)}, str(tmp / "model.safetensors"))
            raise RuntimeError("killed mid-write")
    assert sorted(p.name for p in out.iterdir()) == before
    assert torch.equal(Checkpoint(out).get("w"), torch.ones(4))
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # no temp folder left behind
    with pytest.raises(EvomergeError, match="already exists.*--overwrite"):
        write_model(out, {"w": torch.zeros(4)}, {"model_type": "llama"})
    write_model(out, {"w": torch.zeros(4)}, {"model_type": "llama"}, overwrite=True)
    assert torch.equal(Checkpoint(out).get("w"), torch.zeros(4))
