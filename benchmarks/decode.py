"""Decode speed: gdn_lab GDN (plain and CUDA-graph captured) vs FLA's HF model vs an SDPA transformer.

Per model, path, context (128, 8k, 32k tokens) and batch (1, 32): the prompt is prefilled with
the chunked kernels (no grad, in pieces of at most --prefill-tokens tokens per call), then
--steps greedy tokens are decoded one at a time and timed from the host (synchronised), so
the figure is what a user waits per token: kernel time plus Python and launch overhead.

    gdn/plain           gdn_lab GatedDeltaNet LM, `model(token, cache=...)` per token (generate's loop)
    gdn/captured        the same weights through `gdn_lab.generate.CapturedDecoder` (one CUDA graph per token)
    fla/hf              FLA's GatedDeltaNetForCausalLM with the same weights (`gdn_lab.models.to_fla`),
                        `model(ids, past_key_values=cache, use_cache=True)` per token
    transformer/plain   gdn_lab's SDPA transformer of the same width and depth, KV cache grown by concatenation
    transformer/captured  its preallocated KV cache (a mask over the filled slots) in a CUDA graph

Models: 768d x 12 layers, 12 heads x 64 (GDN value dim 128: FLA's quick-reference "small"),
vocab 32000, bf16 on Ampere+ GPUs. Also: peak memory per cell, and the largest batch whose
cache at 32k context plus one decode step fits in the GPU's memory, for GDN and the
transformer (bisection over batch sizes with out-of-memory probes; each probe allocates the
caches, marks `context` KV slots filled, as a prefill would leave them, and runs one step).
A cell that runs out of memory is recorded as 'oom'.

    python benchmarks/decode.py --out benchmarks/results/decode_h100.json     # GPU, a few minutes
    python benchmarks/decode.py --smoke --device cpu                           # seconds, CPU

The JSON (gdn_lab.results.save_results: device, versions, commit) holds one record per cell,
the ratios (captured vs FLA, 8k/128, 32k/128 per path) and issue 13's targets with pass/fail.
"""
from __future__ import annotations

import pathlib
import sys
import time
from collections.abc import Callable
from operator import ge, le

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from benchmarks.common import (  # noqa: E402
    benchmark_parser,
    compared_models,
    environment_line,
    fla_small_configs,
    fmt,
    free_memory,
    model_configs,
    peak_mib,
    reset_peak,
    synchronize,
)
from gdn_lab.env import environment_report, pick_device, pick_dtype  # noqa: E402
from gdn_lab.generate import CapturedDecoder, prefill  # noqa: E402
from gdn_lab.layers import KVState  # noqa: E402
from gdn_lab.models import CausalLM  # noqa: E402
from gdn_lab.results import save_results  # noqa: E402

FULL_CONTEXTS = (128, 8192, 32768)
SMOKE_CONTEXTS = (16, 64)
PATHS = (("gdn", "plain"), ("gdn", "captured"), ("fla", "hf"), ("transformer", "plain"), ("transformer", "captured"))
TARGETS = {"batch1_8k_ms_per_token": 2.0, "batch1_32k_over_128": 1.2, "batch1_speedup_vs_fla": 5.0}

Step = Callable[[torch.Tensor], torch.Tensor]


def cache_mib(cache) -> float:
    """Bytes held by a gdn_lab Cache's tensors, in MiB."""
    return sum(t.numel() * t.element_size() for state in cache.states for t in vars(state).values()
               if isinstance(t, torch.Tensor)) / 2**20


def time_greedy_steps(step: Step, logits: torch.Tensor, steps: int, warmup: int, device: torch.device) -> float:
    """Seconds per greedy decode step (argmax included), host-timed between two synchronisations."""
    tokens = logits.argmax(-1)
    for _ in range(warmup):
        tokens = step(tokens).argmax(-1)
    synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        tokens = step(tokens).argmax(-1)
    synchronize(device)
    return (time.perf_counter() - start) / steps


@torch.no_grad()
def prepare_gdn_lab(model: CausalLM, path: str, prompt: torch.Tensor, new_tokens: int,
                    prefill_tokens: int) -> tuple[Step, torch.Tensor, dict]:
    """Prefill a gdn_lab model; returns (step, last logits, extras) for the plain or captured path."""
    B, T = prompt.shape
    if path == "captured":
        start = time.perf_counter()
        decoder = CapturedDecoder(model, B, T + new_tokens)
        capture_s = time.perf_counter() - start
        logits = decoder.prefill(prompt, max_tokens_per_call=prefill_tokens)
        return decoder.step, logits, {"capture_s": capture_s, "cache_mib": cache_mib(decoder.cache)}
    cache = model.new_cache(B)
    logits = prefill(model, prompt, cache, max_tokens_per_call=prefill_tokens)

    def step(tokens: torch.Tensor) -> torch.Tensor:
        return model(tokens[:, None], cache=cache)[:, -1]

    return step, logits, {"cache_mib_after_prefill": cache_mib(cache)}


@torch.no_grad()
def prepare_fla(fla_model, prompt: torch.Tensor, prefill_tokens: int) -> tuple[Step, torch.Tensor, dict]:
    """Prefill FLA's HF model in pieces with its own cache; the step is its HF forward with the cache."""
    B, T = prompt.shape
    piece = max(64, prefill_tokens // B // 64 * 64)
    cache = None
    for start in range(0, T, piece):
        out = fla_model(input_ids=prompt[:, start:start + piece], past_key_values=cache, use_cache=True,
                        logits_to_keep=1)
        cache = out.past_key_values

    def step(tokens: torch.Tensor) -> torch.Tensor:
        return fla_model(input_ids=tokens[:, None], past_key_values=cache, use_cache=True).logits[:, -1]

    return step, out.logits[:, -1].float(), {}


def run_cell(name: str, path: str, model, context: int, batch: int, args, device: torch.device) -> dict:
    """One (model, path, context, batch) measurement; out-of-memory is recorded, not raised."""
    record = {"model": name, "path": path, "context": context, "batch": batch, "status": "ok",
              "ms_per_token": None, "tokens_per_s": None, "prefill_s": None, "prefill_peak_mib": None,
              "decode_peak_mib": None}
    free_memory(device)
    reset_peak(device)
    prompt = torch.randint(0, model.config.vocab_size, (batch, context), device=device,
                           generator=torch.Generator(device).manual_seed(args.seed))
    try:
        start = time.perf_counter()
        if name == "fla":
            step, logits, extras = prepare_fla(model, prompt, args.prefill_tokens)
        else:
            step, logits, extras = prepare_gdn_lab(model, path, prompt, args.warmup + args.steps + 1,
                                                   args.prefill_tokens)
        synchronize(device)
        record["prefill_s"] = time.perf_counter() - start
        record.update(extras, prefill_peak_mib=peak_mib(device))
        reset_peak(device)
        with torch.no_grad():
            seconds = time_greedy_steps(step, logits, args.steps, args.warmup, device)
        record.update(ms_per_token=seconds * 1e3, tokens_per_s=batch / seconds, decode_peak_mib=peak_mib(device))
    except torch.cuda.OutOfMemoryError:
        record["status"] = "oom"
    finally:
        step = logits = None
        free_memory(device)
    return record


@torch.no_grad()
def fits(model: CausalLM, batch: int, context: int, device: torch.device) -> bool:
    """Does a batch of caches filled to `context` tokens, plus one decode step on them, fit?"""
    cache = None
    try:
        cache = model.new_cache(batch, max_len=context + 1)
        for state in cache.states:
            if isinstance(state, KVState):       # mark `context` slots filled, as a prefill would
                state.valid[:, :context] = True
                state.length.fill_(context)
                state.position.fill_(context)
        cache.seen_tokens = context
        model(torch.zeros(batch, 1, dtype=torch.long, device=device), cache=cache)
        synchronize(device)
        return True
    except torch.cuda.OutOfMemoryError:
        return False
    finally:
        cache = None
        free_memory(device)


def largest_batch(model: CausalLM, context: int, device: torch.device, max_probes: int) -> dict:
    """Bisect the largest batch that fits at `context` (within 1%), starting from the estimate
    free memory / cache bytes per sequence (an upper bound: it ignores the step's activations)."""
    per_sequence = model.new_cache(1, max_len=context + 1, device="meta")
    per_sequence_mib = cache_mib(per_sequence)
    free_memory(device)
    free_bytes = torch.cuda.mem_get_info(device)[0]
    estimate = max(1, int(free_bytes / (per_sequence_mib * 2**20)))
    lo, hi, probes = 0, estimate + 1, []
    while hi - lo > max(1, lo // 100) and len(probes) < max_probes:
        batch = estimate if not probes else (lo + hi) // 2
        ok = fits(model, batch, context, device)
        probes.append({"batch": batch, "fits": ok})
        lo, hi = (batch, hi) if ok else (lo, batch)
    return {"context": context, "largest_batch": lo, "first_failure": hi if hi <= estimate else None,
            "estimate": estimate, "cache_mib_per_sequence": per_sequence_mib,
            "free_mib_at_start": free_bytes / 2**20, "probes": probes}


def lookup(records: list[dict], name: str, path: str, context: int, batch: int) -> float | None:
    for r in records:
        if (r["model"], r["path"], r["context"], r["batch"]) == (name, path, context, batch) and r["status"] == "ok":
            return r["ms_per_token"]
    return None


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b is not None else None


def summarize(records: list[dict], contexts: tuple[int, ...], batches: tuple[int, ...]) -> tuple[dict, dict]:
    """Ratios per batch: each path's latency at every context over its shortest-context latency,
    and other paths' latency over gdn/captured's (FLA's: the speedup); issue 13's targets at
    batch 1 (ms/token at 8k, 32k over 128, the smallest speedup over FLA at any context)."""
    short = min(contexts)
    ratios: dict = {}
    for batch in batches:
        per_batch = {}
        for name, path in PATHS:
            for context in contexts:
                if context != short:
                    key = f"{name}/{path} {context}/{short}"
                    per_batch[key] = ratio(lookup(records, name, path, context, batch),
                                           lookup(records, name, path, short, batch))
        for context in contexts:
            captured = lookup(records, "gdn", "captured", context, batch)
            per_batch[f"fla/hf over gdn/captured @{context}"] = ratio(lookup(records, "fla", "hf", context, batch),
                                                                     captured)
            per_batch[f"gdn/plain over gdn/captured @{context}"] = ratio(
                lookup(records, "gdn", "plain", context, batch), captured)
            per_batch[f"transformer/captured over gdn/captured @{context}"] = ratio(
                lookup(records, "transformer", "captured", context, batch), captured)
        ratios[f"batch {batch}"] = per_batch

    mid, long = (8192, 32768) if {128, 8192, 32768} <= set(contexts) else (sorted(contexts)[len(contexts) // 2],
                                                                          max(contexts))
    at_mid = lookup(records, "gdn", "captured", mid, 1)
    flat = ratio(lookup(records, "gdn", "captured", long, 1), lookup(records, "gdn", "captured", short, 1))
    speedups = [ratio(lookup(records, "fla", "hf", c, 1), lookup(records, "gdn", "captured", c, 1)) for c in contexts]
    speedup = min((s for s in speedups if s is not None), default=None)
    measured = {"batch1_8k_ms_per_token": (at_mid, [mid], le), "batch1_32k_over_128": (flat, [short, long], le),
                "batch1_speedup_vs_fla": (speedup, list(contexts), ge)}
    targets = {key: {"value": value, "contexts": where, "target": f"{'<=' if op is le else '>='} {TARGETS[key]}",
                     "met": None if value is None else op(value, TARGETS[key])}
               for key, (value, where, op) in measured.items()}
    return ratios, targets


def table(records: list[dict]) -> str:
    lines = [f"{'model/path':<22}{'context':>8}{'batch':>6}{'status':>8}{'ms/token':>10}{'tokens/s':>11}"
             f"{'prefill s':>10}{'decode MiB':>11}"]
    for r in records:
        lines.append(f"{r['model'] + '/' + r['path']:<22}{r['context']:>8}{r['batch']:>6}{r['status']:>8}"
                     f"{fmt(r['ms_per_token'], '.3f'):>10}{fmt(r['tokens_per_s'], '.0f'):>11}"
                     f"{fmt(r['prefill_s'], '.2f'):>10}{fmt(r['decode_peak_mib'], '.0f'):>11}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = benchmark_parser(__doc__, "a 64d x 2-layer model, contexts 16 and 64 (CPU, seconds)")
    parser.add_argument("--contexts", type=int, nargs="+", help="context lengths (default 128 8192 32768)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=None, help="default 1 32 (smoke 1 4)")
    parser.add_argument("--models", nargs="+", default=["gdn", "fla", "transformer"],
                        choices=["gdn", "fla", "transformer"])
    parser.add_argument("--vocab-size", type=int, default=32000)
    parser.add_argument("--steps", type=int, default=64, help="timed decode steps per cell")
    parser.add_argument("--warmup", type=int, default=8)
    parser.add_argument("--prefill-tokens", type=int, default=8192, help="batch x tokens per prefill call")
    parser.add_argument("--max-batch-context", type=int, default=32768, help="0 skips the largest-batch search")
    parser.add_argument("--max-batch-probes", type=int, default=12)
    args = parser.parse_args(argv)

    device = pick_device(args.device)
    dtype = pick_dtype(device, args.dtype)
    contexts = tuple(args.contexts or (SMOKE_CONTEXTS if args.smoke else FULL_CONTEXTS))
    batches = tuple(args.batch_sizes or ((1, 4) if args.smoke else (1, 32)))
    if args.smoke:
        args.vocab_size, args.steps, args.warmup = min(args.vocab_size, 256), min(args.steps, 4), min(args.warmup, 1)
    print(environment_line(environment_report(str(device)), dtype))

    configs = fla_small_configs(args.smoke, args.vocab_size)
    torch.manual_seed(args.seed)
    models, notes = compared_models(configs, args.models, device, dtype)
    models = {name: model.eval() for name, model in models.items()}
    params = {name: sum(p.numel() for p in m.parameters()) for name, m in models.items()}
    print("parameters: " + ", ".join(f"{n} {p / 1e6:.1f}M" for n, p in params.items()))

    records = []
    for name, path in PATHS:
        if name not in models:
            continue
        for batch in batches:
            for context in contexts:
                record = run_cell(name, path, models[name], context, batch, args, device)
                records.append(record)
                print(table([record]).splitlines()[1], flush=True)

    largest = {}
    if device.type == "cuda" and args.max_batch_context:
        for name in ("gdn", "transformer"):
            if name in models:
                largest[name] = largest_batch(models[name], args.max_batch_context, device, args.max_batch_probes)
                print(f"largest batch at {args.max_batch_context} context, {name}: {largest[name]['largest_batch']} "
                      f"({largest[name]['cache_mib_per_sequence']:.1f} MiB of cache per sequence)", flush=True)
        if {"gdn", "transformer"} <= set(largest) and largest["transformer"]["largest_batch"]:
            largest["gdn_over_transformer"] = largest["gdn"]["largest_batch"] / largest["transformer"]["largest_batch"]
    elif args.max_batch_context:
        notes["largest_batch"] = "skipped: the out-of-memory bisection needs a CUDA GPU"

    ratios, targets = summarize(records, contexts, batches)
    print(table(records))
    for key, target in targets.items():
        print(f"target {key}: {target['value']} (want {target['target']}): {target['met']}")
    results = {"records": records, "ratios": ratios, "targets": targets, "largest_batch": largest,
               "parameters": params, "notes": notes}
    if args.out:
        config = {"contexts": list(contexts), "batch_sizes": list(batches), "dtype": str(dtype), "steps": args.steps,
                  "warmup": args.warmup, "prefill_tokens": args.prefill_tokens, "smoke": args.smoke,
                  "models": model_configs(configs, models)}
        path = save_results(args.out, results, config=config, seed=args.seed, device=str(device))
        print(f"wrote {path}")
    return results


if __name__ == "__main__":
    main()
