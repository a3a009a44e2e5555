"""The memory plan: where a campaign's bank lives, decided before a tensor is read.

A worker holds, on its compute device: the reference weights, the task vectors (deltas) or the
staging buffers they stream through, the model being evaluated, and that model's KV cache while
it generates (and in host memory the magnitude sketches of sparsifying methods, and streamed
deltas). `plan_memory` adds those up from
safetensors headers and the model config, compares them with what the device (and the host) can
give, and picks the placement:

  device  every delta resident beside the reference (fastest);
  host    deltas in pinned host RAM, streamed to the device per tensor, copy overlapped with merge;
  int8    either of the above with deltas stored as int8 plus one scale per row (opt-in: lossy).

`storage: auto` (the default) takes `device` when it fits and `host` when only that does. When
nothing fits, the plan is one line naming what is short and which option would fit. The config's
`bank:` block sets the choices and may state the memory available (for a machine other than
this one, or to rehearse a small device on a laptop):

    bank: {storage: auto, quantize: none, device_memory: 80GB, host_memory: 512GB}
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from evomerge.checkpoint import format_size, parse_size
from evomerge.errors import EvomergeError, check_keys

BANK_KEYS = ("storage", "quantize", "device_memory", "host_memory")
STORAGE_CHOICES = ("auto", "device", "host")
QUANTIZE_CHOICES = {"none": None, "int8": 8}
HEADROOM = 0.9  # the share of free memory a plan may fill: the allocator and activations want the rest
PROMPT_TOKENS = 512  # prompt length the KV-cache estimate allows for, beside the generated tokens
SKETCH_BYTES = (1 << 16) * 4  # one float32 quantile sketch per large tensor and delta (methods.SKETCH_SIZE)


def parse_bank(block) -> dict:
    """The config's `bank:` block with defaults, or one line naming the bad field."""
    if block is None:
        block = {}
    if not isinstance(block, dict):
        raise EvomergeError(f"config field 'bank': bad value {block!r}; allowed: a mapping such as "
                            "{storage: auto, quantize: none, device_memory: 80GB}")
    check_keys(block, BANK_KEYS, "bank")
    storage = block.get("storage", "auto")
    if storage not in STORAGE_CHOICES:
        raise EvomergeError(f"config field 'bank.storage': bad value {storage!r}; allowed: "
                            f"{', '.join(STORAGE_CHOICES)} (auto: device when it fits, else host)")
    quantize = block.get("quantize", "none")
    quantize = "none" if quantize is None or quantize is False else quantize
    if quantize not in QUANTIZE_CHOICES:
        raise EvomergeError(f"config field 'bank.quantize': bad value {quantize!r}; allowed: none, int8 "
                            "(int8: deltas in 8 bits with per-row scales; lossy, opt-in)")
    out = {"storage": storage, "quantize": quantize}
    for key in ("device_memory", "host_memory"):
        if block.get(key) is not None:
            try:
                size = parse_size(block[key])
            except EvomergeError:
                size = 0
            if size <= 0:
                raise EvomergeError(f"config field 'bank.{key}': bad value {block[key]!r}; allowed: a size such "
                                    "as 80GB or 24GiB")
            out[key] = size
    return out


@dataclass(frozen=True)
class BankLayout:
    """What a parameter space's bank holds, in elements (from headers: nothing loaded)."""

    reference: int  # elements of the reference model, all on the device
    merged: int  # elements of one delta (the merged tensors)
    deltas: int  # number of stored deltas (a source that is the reference stores none)
    largest: int  # elements of the largest merged tensor (the staging buffers' size)
    matrix_rows: int  # rows over the merged matrices (int8 scales are one float32 per row)
    vector_elements: int  # elements of merged 1-d tensors (int8 leaves them in full precision)
    sketched: int  # merged tensors that get a quantile sketch per delta (sparsifying methods only)
    model: int  # elements of the model being evaluated


def kv_cache_bytes(config: dict, tokens: int, element: int) -> int:
    """Keys and values of every layer for `tokens` positions (batch x length), from the model config."""
    text = config.get("text_config") or config  # a vision-language model generates with its language model
    layers = int(text.get("num_hidden_layers") or text.get("n_layer") or 0)
    heads = int(text.get("num_attention_heads") or text.get("n_head") or 1)
    hidden = int(text.get("hidden_size") or text.get("n_embd") or 0)
    kv_heads = int(text.get("num_key_value_heads") or heads)
    head_dim = int(text.get("head_dim") or (hidden // heads if heads else 0))
    return 2 * layers * kv_heads * head_dim * tokens * element


def generation_tokens(evaluators: list[dict]) -> int:
    """The most positions one generating batch holds: batch_size x (prompt allowance + max_new_tokens)."""
    most = 0
    for spec in evaluators:
        if spec.get("max_new_tokens") is None and spec.get("task") not in ("mgsm", "vqa", "lm_eval"):
            continue
        batch = int(spec.get("batch_size") or (8 if spec.get("task") == "lm_eval" else 16))
        most = max(most, batch * (PROMPT_TOKENS + int(spec.get("max_new_tokens") or 256)))
    return most


@dataclass
class MemoryPlan:
    """The placement chosen and the bytes behind it."""

    device: str
    storage: str  # "device" or "host"
    quantize: int | None
    on_device: dict[str, int]
    on_host: dict[str, int] = field(default_factory=dict)
    device_capacity: int | None = None
    host_capacity: int | None = None
    per_worker: bool = False  # Ray: each worker holds one of these wherever it is placed

    @property
    def device_total(self) -> int:
        return sum(self.on_device.values())

    @property
    def host_total(self) -> int:
        return sum(self.on_host.values())

    def lines(self, dtype: str) -> list[str]:
        quant = "int8 deltas (per-row scales)" if self.quantize else f"{dtype} deltas"
        where = "per worker, " if self.per_worker else ""
        cap = f" of {format_size(self.device_capacity)}" if self.device_capacity else ""
        lines = [f"memory plan ({where}{dtype}): storage {self.storage}, {quant}",
                 f"  on {self.device}: " + ", ".join(f"{k} {format_size(v)}" for k, v in self.on_device.items() if v)
                 + f"; total ~{format_size(self.device_total)}{cap}"]
        if self.on_host:
            cap = f" of {format_size(self.host_capacity)}" if self.host_capacity else ""
            lines.append("  in host RAM: " + ", ".join(f"{k} {format_size(v)}" for k, v in self.on_host.items())
                         + f"; total ~{format_size(self.host_total)}{cap}")
        return lines

    def bank_options(self) -> dict:
        """The SourceBank arguments that realize this plan."""
        return {"storage": self.storage, "quantize": self.quantize}


def _delta_bytes(layout: BankLayout, element: int, quantize: int | None) -> int:
    if quantize is None:
        return layout.deltas * layout.merged * element
    matrices = layout.merged - layout.vector_elements
    return layout.deltas * (matrices + layout.matrix_rows * 4 + layout.vector_elements * element)


def _parts(layout: BankLayout, element: int, kv: int, storage: str, quantize: int | None) -> tuple[dict, dict]:
    deltas = _delta_bytes(layout, element, quantize)
    device = {"reference": layout.reference * element}
    host: dict[str, int] = {}
    if storage == "device":
        device["deltas"] = deltas
        if quantize:  # int8 deltas are dequantized through the staging buffers even when resident
            device["staging"] = 2 * layout.deltas * layout.largest * element
    else:
        host["deltas"] = deltas
        device["staging"] = 2 * layout.deltas * layout.largest * element
    if layout.sketched:
        host["sketches"] = layout.sketched * layout.deltas * SKETCH_BYTES  # kept in host memory
    device["evaluation model"] = layout.model * element
    device["KV cache"] = kv
    return device, host


def _fits(total: int, capacity: int | None) -> bool:
    return capacity is None or total <= capacity * HEADROOM


def plan_memory(layout: BankLayout, element: int, kv: int, device: str, bank: dict, *,
                device_capacity: int | None, host_capacity: int | None, per_worker: bool = False) -> MemoryPlan:
    """The placement for this bank on this device, or one line saying what does not fit and what would.

    On a CPU device the "device" and the host are the same RAM: streaming saves nothing there unless
    `bank.device_memory` says the device is smaller (a rehearsal of a GPU plan)."""
    quantize = QUANTIZE_CHOICES[bank["quantize"]]
    device_capacity = bank.get("device_memory", device_capacity)
    host_capacity = bank.get("host_memory", host_capacity)
    shared_ram = device == "cpu" and "device_memory" not in bank

    def plan(storage: str, q: int | None) -> MemoryPlan | None:
        on_device, on_host = _parts(layout, element, kv, storage, q)
        total = sum(on_device.values())
        ok = _fits(total + sum(on_host.values()), device_capacity) if shared_ram else \
            _fits(total, device_capacity) and _fits(sum(on_host.values()), host_capacity)
        return MemoryPlan(device, storage, q, on_device, on_host, device_capacity, host_capacity, per_worker) \
            if ok else None

    storages = ["device", "host"] if bank["storage"] == "auto" else [bank["storage"]]
    for storage in storages:
        chosen = plan(storage, quantize)
        if chosen is not None:
            return chosen
    # Nothing asked for fits: say by how much, and which option would.
    first = storages[-1]
    on_device, on_host = _parts(layout, element, kv, first, quantize)
    need = sum(on_device.values()) + (sum(on_host.values()) if shared_ram else 0)
    detail = ", ".join(f"{k} {format_size(v)}" for k, v in on_device.items() if v)
    options = []
    for storage, q in (("host", quantize), ("device", 8), ("host", 8)):
        if (storage, q) != (first, quantize) and (bank["storage"] == "auto" or storage == bank["storage"]
                                                  or q != quantize) and plan(storage, q) is not None:
            options.append(f"bank: {{storage: {storage}" + (", quantize: int8}" if q else "}"))
    hint = ("set " + " or ".join(dict.fromkeys(options))) if options else \
        "use a larger device, fewer sources, a smaller dtype (bfloat16), or a smaller evaluation batch_size"
    cap = format_size(device_capacity) if device_capacity else "?"
    raise EvomergeError(f"memory plan: storage {first}{' with int8 deltas' if quantize else ''} needs "
                        f"~{format_size(need)} on {device} ({detail}) but ~{format_size(int((device_capacity or 0) * HEADROOM))} "
                        f"of {cap} can be used; {hint}")


def layout_of(shapes: dict[str, tuple[int, ...]], merged_names: set[str], deltas: int, sketched: bool,
              model_numel: int) -> BankLayout:
    """The BankLayout of a reference with these tensor shapes, `merged_names` the tensors merged."""
    merged = [shapes[n] for n in merged_names]
    sizes = [math.prod(s) for s in merged]
    return BankLayout(
        reference=sum(math.prod(s) for s in shapes.values()),
        merged=sum(sizes),
        deltas=deltas,
        largest=max(sizes, default=0),
        matrix_rows=sum(s[0] for s in merged if len(s) > 1),
        vector_elements=sum(n for s, n in zip(merged, sizes) if len(s) <= 1),
        sketched=sum(1 for n in sizes if n > (1 << 16)) if sketched else 0,
        model=model_numel,
    )
