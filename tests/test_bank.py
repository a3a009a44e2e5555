import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from evomerge.bank import SourceBank
from evomerge.checkpoint import Checkpoint
from evomerge.methods import merge_tensor
from evomerge.recipe import Recipe


def recipe(fam, method, params, shared=None, seed=0):
    return Recipe.from_dict({
        "method": method, "base": str(fam["base"]), "seed": seed, "parameters": shared or {},
        "sources": [{"model": str(fam[f"expert{i}"]), "parameters": p} for i, p in enumerate(params)],
    })


@pytest.fixture(scope="module")
def bank(llama_family):
    return SourceBank([str(llama_family[f"expert{i}"]) for i in range(3)], str(llama_family["base"]), compile=False)


PARAMS = [{"weight": 0.6, "density": 0.4}, {"weight": 0.3, "density": 0.7}, {"weight": 0.5, "density": 0.5}]


@pytest.mark.parametrize("method", ["task_arithmetic", "ties", "dare_ties", "dare_linear", "breadcrumbs"])
def test_bank_equals_reference_merge(method, bank, llama_family):
    r = recipe(llama_family, method, PARAMS if method != "task_arithmetic" else [{"weight": p["weight"]} for p in PARAMS], seed=7)
    out = bank.materialize(r)
    base = Checkpoint(llama_family["base"])
    experts = [Checkpoint(llama_family[f"expert{i}"]) for i in range(3)]
    for name in ["model.layers.1.self_attn.q_proj.weight", "model.embed_tokens.weight", "model.norm.weight"]:
        bt = bank.tensors[name]
        shared, per_source = r.resolve(bt.role, name, bank.num_blocks)
        ref = merge_tensor(method, base.get(name), [e.get(name) for e in experts], shared, per_source,
                           seed=7, tensor_name=name)
        assert torch.allclose(out[name], ref, atol=1e-6), name


def test_materializes_in_place_into_a_model(bank, llama_family):
    config = AutoConfig.from_pretrained(llama_family["base"])
    model = AutoModelForCausalLM.from_config(config)
    ptrs = {n: p.data_ptr() for n, p in model.named_parameters()}
    r1 = recipe(llama_family, "ties", PARAMS)
    r2 = recipe(llama_family, "ties", [{"weight": 1.0, "density": 0.2}] * 3)
    bank.materialize(r1, model)
    logits1 = model(torch.tensor([[5, 6, 7]])).logits.clone()
    bank.materialize(r2, model)
    logits2 = model(torch.tensor([[5, 6, 7]])).logits
    assert {n: p.data_ptr() for n, p in model.named_parameters()} == ptrs  # same storage, rewritten
    assert not torch.allclose(logits1, logits2)
    expected = bank.materialize(r2)
    for n, p in model.named_parameters():
        assert torch.equal(p.data, expected[n]), n


def test_dare_rebuilds_bit_identically_and_seed_matters(llama_family, tmp_path):
    import shutil

    r = recipe(llama_family, "dare_ties", PARAMS, seed=3)
    a = SourceBank([s.model for s in r.sources], r.base, compile=False).materialize(r)
    b = SourceBank([s.model for s in r.sources], r.base, compile=False).materialize(r)
    assert all(torch.equal(a[n], b[n]) for n in a)
    # The same recipe over the same models copied elsewhere: still the same bits.
    moved = {k: shutil.copytree(v, tmp_path / k) for k, v in llama_family.items()}
    rm = recipe(moved, "dare_ties", PARAMS, seed=3)
    c = SourceBank([s.model for s in rm.sources], rm.base, compile=False).materialize(rm)
    assert all(torch.equal(a[n], c[n]) for n in a)
    r.seed = 4
    c = SourceBank([s.model for s in r.sources], r.base, compile=False).materialize(r)
    assert not torch.equal(a["model.layers.0.mlp.up_proj.weight"], c["model.layers.0.mlp.up_proj.weight"])


def test_dare_masks_are_nested_across_densities(bank, llama_family):
    name = "model.layers.2.mlp.down_proj.weight"
    kept = []
    for density in (0.2, 0.5, 0.8):
        r = recipe(llama_family, "dare_linear", [{"weight": 1.0, "density": density}] + [{"weight": 0.0}] * 2,
                   {"rescale": False})
        out = bank.materialize(r)[name]
        kept.append(out != bank.tensors[name].reference)
    assert bool((kept[0] <= kept[1]).all() and (kept[1] <= kept[2]).all())


def test_per_group_and_family_rules(bank, llama_family):
    rule = [{"family": "attention", "value": 1.0}, {"group": "block.3", "value": 0.5}, {"value": 0.0}]
    r = recipe(llama_family, "task_arithmetic", [{"weight": rule}, {"weight": 0.0}, {"weight": 0.0}])
    out = bank.materialize(r)
    e0 = Checkpoint(llama_family["expert0"])
    base = Checkpoint(llama_family["base"])
    name_attn, name_mlp3, name_mlp0 = ("model.layers.0.self_attn.v_proj.weight", "model.layers.3.mlp.up_proj.weight",
                                       "model.layers.0.mlp.up_proj.weight")
    assert torch.allclose(out[name_attn], e0.get(name_attn), atol=1e-7)
    assert torch.allclose(out[name_mlp3], (base.get(name_mlp3) + e0.get(name_mlp3)) / 2, atol=1e-7)
    assert torch.equal(out[name_mlp0], base.get(name_mlp0))


def test_compiled_kernel_matches_eager(llama_family):
    """The fused torch.compile path (the default for large models) gives the eager numbers."""
    sources = [str(llama_family[f"expert{i}"]) for i in range(3)]
    eager = SourceBank(sources, str(llama_family["base"]), compile=False)
    fused = SourceBank(sources, str(llama_family["base"]), compile=True)
    r = recipe(llama_family, "ties", [dict(p, density=d) for p, d in zip(PARAMS, (0.3, 1.0, 0.0))])
    a, b = eager.materialize(r), fused.materialize(r)
    for n in a:
        assert torch.allclose(a[n], b[n], atol=1e-6), n
    import evomerge.kernels as k

    assert k._compiled is not None and not k._broken  # really ran compiled


# -- the lean bank: what it stores, where, and how exactly ------------------------------------------

SOURCES3 = [f"expert{i}" for i in range(3)]


@pytest.mark.parametrize("method", ["ties", "dare_ties", "breadcrumbs", "della", "slerp"])
def test_host_storage_streams_to_the_same_bits(method, llama_family):
    """Deltas kept in host RAM and staged per tensor (the path for banks larger than the device)
    build exactly the candidate the resident bank builds."""
    params = PARAMS if method != "slerp" else [{}]
    shared = {"t": 0.3} if method == "slerp" else None
    r = recipe(llama_family, method, params[:1] if method == "slerp" else params, shared, seed=5)
    models = [s.model for s in r.sources]
    resident = SourceBank(models, r.base, compile=False).materialize(r)
    host = SourceBank(models, r.base, compile=False, storage="host")
    streamed = host.materialize(r)
    assert all(torch.equal(resident[n], streamed[n]) for n in resident)
    # On the device: the reference and two staging sets of the largest tensor, no delta.
    biggest = max(bt.reference.numel() for bt in host.tensors.values()) * 4
    refs = sum(bt.reference.numel() for bt in host.tensors.values()) * 4
    assert host.device_bytes() == refs + 2 * len(models) * biggest


def test_int8_deltas_err_by_at_most_half_a_step(llama_family):
    """quantize=8 stores each delta row as int8 times absmax/127: a task-arithmetic merge then errs by
    at most sum_i |w_i| * scale_i / 2 per element, at about a quarter of the float32 delta bytes."""
    params = [{"weight": 0.6}, {"weight": -0.3}, {"weight": 0.9}]
    r = recipe(llama_family, "task_arithmetic", params)
    models = [s.model for s in r.sources]
    exact_bank = SourceBank(models, r.base, compile=False)
    q = SourceBank(models, r.base, compile=False, quantize=8)
    exact, approx = exact_bank.materialize(r), q.materialize(r)
    worst = 0.0
    for name, bt in q.tensors.items():
        err = (exact[name] - approx[name]).abs()
        if bt.reference.dim() < 2:
            assert torch.equal(exact[name], approx[name]), name  # vectors stay in full precision
            continue
        bound = sum(abs(p["weight"]) * d.scales / 2 for p, d in zip(params, bt.deltas))
        assert bool((err <= bound * 1.001 + 1e-7).all()), name
        scale = sum(abs(p["weight"]) * e.abs() for p, e in zip(params, exact_bank.tensors[name].deltas)).mean()
        worst = max(worst, (err.mean() / scale).item())
    assert 0 < worst < 0.02  # lossy, but by about a percent of the merged task vectors
    delta_bytes = lambda b: b.memory_bytes() - sum(bt.reference.numel() * 4 for bt in b.tensors.values())  # noqa: E731
    staging = q._stager.nbytes
    assert delta_bytes(q) - staging < 0.3 * delta_bytes(exact_bank)


def _large_bank(density_method: str, numel: int = 1 << 20, storage: str = "device"):
    gen = torch.Generator().manual_seed(0)
    ref = {"model.layers.0.mlp.up_proj.weight": torch.randn(numel // 512, 512, generator=gen)}
    srcs = [{k: v + torch.randn(v.shape, generator=gen) * 0.02 for k, v in ref.items()} for _ in range(3)]
    bank = SourceBank.from_tensors(ref, srcs, compile=False, storage=storage)
    return bank, ref, srcs


def test_sketch_thresholds_keep_the_density_within_its_stated_error():
    """Tensors above SKETCH_SIZE elements take TIES thresholds from a 65536-sample sketch: the kept
    fraction is off by about sqrt(d (1 - d) / 65536); a one-shot merge (merge_tensor) is exact."""
    from evomerge.methods import SKETCH_SIZE

    bank, ref, srcs = _large_bank("ties")
    name = next(iter(ref))
    for d in (0.1, 0.3, 0.7):
        r = Recipe.from_dict({"method": "ties", "base": "base", "parameters": {"normalize": False},
                              "sources": [{"model": "source0", "parameters": {"weight": 1.0, "density": d}}]})
        kept = (bank.materialize(r)[name] != ref[name]).float().mean().item()
        assert abs(kept - d) < 4 * (d * (1 - d) / SKETCH_SIZE) ** 0.5, (d, kept)
        shared, _ = r.resolve(bank.tensors[name].role, name, bank.num_blocks)
        exact = merge_tensor("ties", ref[name], [srcs[0][name]], shared,
                             [{"weight": 1.0, "density": d}], tensor_name=name)
        assert (exact != ref[name]).sum().item() == int(d * ref[name].numel())  # k = int(d n), as mergekit


@pytest.mark.parametrize("method", ["ties", "dare_ties", "breadcrumbs_ties", "della"])
def test_resident_memory_is_the_sources_and_little_more(method):
    """The bank holds the reference and one delta per source; cached sketches add ~256 KiB per tensor
    and source, staging nothing (resident storage). Goal: <= 1.1 x (sources + 1) x model bytes."""
    bank, ref, _ = _large_bank(method)
    params = [{"weight": 0.5, "density": 0.4}] * 3
    r = Recipe.from_dict({"method": method, "base": "base",
                          "sources": [{"model": f"source{i}", "parameters": p} for i, p in enumerate(params)]})
    bank.materialize(r)
    model_bytes = sum(t.numel() * 4 for t in ref.values())
    assert bank.memory_bytes() <= 1.1 * 4 * model_bytes, bank.memory_bytes() / model_bytes


def test_dare_drop_is_the_same_hash_in_the_compiled_kernel(llama_family):
    """DARE's drop comes from a counter-based hash of (seed, source, tensor, element): the fused
    kernel and the eager pass keep exactly the same elements."""
    sources = [str(llama_family[f"expert{i}"]) for i in range(3)]
    eager = SourceBank(sources, str(llama_family["base"]), compile=False)
    fused = SourceBank(sources, str(llama_family["base"]), compile=True)
    r = recipe(llama_family, "dare_linear", [{"weight": 1.0, "density": 0.35}, {"weight": 0.0}, {"weight": 0.0}],
               {"rescale": False}, seed=11)
    a, b = eager.materialize(r), fused.materialize(r)
    for n in a:
        assert torch.equal(a[n] != eager.tensors[n].reference, b[n] != fused.tensors[n].reference), n
        assert torch.allclose(a[n], b[n], atol=1e-6), n
    # Unmasked task vectors take the kernel too (key "none"), the reference scaled for linear merges.
    for method, shared in (("task_arithmetic", {"lambda": 0.8}), ("linear", {})):
        r = recipe(llama_family, method, [{"weight": 0.6}, {"weight": -0.2}, {"weight": 0.9}], shared)
        a, b = eager.materialize(r), fused.materialize(r)
        assert all(torch.allclose(a[n], b[n], atol=1e-6) for n in a)


def test_exact_order_brackets_large_tensors_without_losing_exactness():
    """ExactOrder selects within a sample-bracketed slice on large tensors: the (value, index) of every
    rank asked equals a full sort's, repeated values (ties broken by index) included."""
    from evomerge.methods import ExactOrder

    gen = torch.Generator().manual_seed(1)
    for delta in (torch.randn(1 << 19, generator=gen), (torch.randn(1 << 19, generator=gen) * 8).round() / 8):
        order = ExactOrder(delta)
        magnitude = delta.abs()
        by_value = sorted(range(magnitude.numel()), key=lambda i: (magnitude[i].item(), i))
        for rank in (1, 7, 1000, 1 << 17, 262143, 400000, (1 << 19) - 1):
            value, index = order.at(rank)
            j = by_value[rank]
            assert value == magnitude[j].item()
            if index == 0:  # the value alone bounds the rank: it is the first of its equals
                assert magnitude[by_value[rank - 1]].item() < value
            else:  # inside a run of equal values: the index picks the element
                assert index == j


def test_as_scored_merge_is_the_bank_and_plain_merge_is_exact(tmp_path):
    """A tensor above SKETCH_SIZE: `merge --as-scored` writes what the bank scored (sketched thresholds),
    a plain merge the exact TIES; the two keep fractions differ by about the sketch's error."""
    from evomerge.merge import merge_to_disk
    from evomerge.tiny import build_family

    fam = build_family(tmp_path / "fam", 2, hidden=64, layers=1, intermediate=1100, seed=3)
    r = Recipe.from_dict({"method": "ties", "base": str(fam["base"]), "sources": [
        {"model": str(fam[f"expert{i}"]), "parameters": {"weight": 0.7, "density": 0.3}} for i in range(2)]})
    scored = SourceBank([s.model for s in r.sources], r.base, compile=False).materialize(r)
    plain = Checkpoint(merge_to_disk(r, tmp_path / "exact"))
    as_scored = Checkpoint(merge_to_disk(r, tmp_path / "scored", exact=False))
    base, experts = Checkpoint(fam["base"]), [Checkpoint(fam[f"expert{i}"]) for i in range(2)]
    name = "model.layers.0.mlp.up_proj.weight"
    assert base.get(name).numel() > (1 << 16)
    assert all(torch.equal(as_scored.get(n), scored[n]) for n in scored)
    shared, per_source = r.resolve(SourceBank([s.model for s in r.sources], r.base).tensors[name].role, name, 1)
    exact = merge_tensor("ties", base.get(name), [e.get(name) for e in experts], shared, per_source, tensor_name=name)
    assert torch.equal(plain.get(name), exact)
    moved = (plain.get(name) != base.get(name)).float().mean().item()
    assert abs((as_scored.get(name) != base.get(name)).float().mean().item() - moved) < 0.01
