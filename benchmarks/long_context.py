"""Cost vs sequence length: Gated DeltaNet vs an SDPA transformer vs a sparse hybrid.

Forward and forward+backward time and peak memory at 1k to 32k tokens, batch 1, bf16
autocast, for three models of the hybrid study's size (the `h100` preset: 768d x 12 layers,
12 heads x 64, GDN value dim 64): pure GDN (fla kernels), pure transformer (SDPA, which picks
flash attention on the GPU) and the sparse hybrid (attention at layers 5 and 11). The vocabulary
is the byte tokenizer's 256 ids, so the LM head (the same for all three, linear in length) does
not hide the mixers; `--vocab-size 50257` measures a GPT-2-sized head instead. A length that
runs out of memory is recorded as 'oom' and longer ones for that model as 'skipped'.

    python benchmarks/long_context.py --out benchmarks/results/long_context_h100.json   # GPU
    python benchmarks/long_context.py --smoke --device cpu                                # seconds, CPU

The JSON (gdn_lab.results.save_results: device, versions, commit) holds one record per model
and length (see gdn_lab.longctx.scan_lengths) and the GDN/transformer and hybrid/transformer
ratios of time and memory per length.
"""
from __future__ import annotations

import pathlib
import sys

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from benchmarks.common import benchmark_parser, environment_line, fmt  # noqa: E402
from gdn_lab.config import get_preset  # noqa: E402
from gdn_lab.env import environment_report, pick_device, pick_dtype  # noqa: E402
from gdn_lab.longctx import scan_lengths, scan_ratios  # noqa: E402
from gdn_lab.results import save_results  # noqa: E402

FULL_LENGTHS = (1024, 2048, 4096, 8192, 16384, 32768)
SMOKE_LENGTHS = (64, 128)
MODELS = {"gdn": "gdn", "transformer": "transformer", "hybrid": "sparse"}  # name -> attention pattern


def model_configs(smoke: bool, vocab_size: int, backend: str) -> dict:
    """The three models: the `h100` preset (or a 4-layer 32d model for --smoke), one per pattern."""
    base = get_preset("h100").model
    if smoke:
        base = base.replace(hidden_size=32, num_layers=4, num_heads=2, head_dim=16, attn_num_heads=2)
    base = base.replace(vocab_size=vocab_size, backend=backend)
    return {name: base.replace(attn_layers=pattern) for name, pattern in MODELS.items()}


def table(records: list[dict]) -> str:
    lines = [f"{'model':<12}{'seq_len':>8}{'status':>9}{'fwd ms':>10}{'fwd+bwd ms':>12}{'peak MiB':>10}"
             f"{'tokens/s':>11}"]
    for r in records:
        lines.append(f"{r['model']:<12}{r['seq_len']:>8}{r['status']:>9}{fmt(r['forward_ms'], '.2f'):>10}"
                     f"{fmt(r['train_ms'], '.2f'):>12}{fmt(r['train_peak_mib'] or r['forward_peak_mib'], '.0f'):>10}"
                     f"{fmt(r['tokens_per_s'], '.0f'):>11}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = benchmark_parser(__doc__, "tiny models and lengths 64, 128 (CPU, seconds)")
    parser.add_argument("--backend", default="auto", help="GDN kernels: auto (fla on CUDA) | fla | torch")
    parser.add_argument("--lengths", type=int, nargs="+", help="sequence lengths (default 1k..32k, smoke 64 128)")
    parser.add_argument("--vocab-size", type=int, default=256)
    parser.add_argument("--tokens-per-step", type=int, default=None,
                        help="batch = tokens_per_step // length (default: batch 1 at every length)")
    parser.add_argument("--no-backward", action="store_true", help="forward only")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)

    device = pick_device(args.device)
    dtype = pick_dtype(device, args.dtype)
    lengths = args.lengths or (SMOKE_LENGTHS if args.smoke else FULL_LENGTHS)
    warmup, repeats = (1, 2) if args.smoke else (args.warmup, args.repeats)
    configs = model_configs(args.smoke, args.vocab_size, args.backend)
    print(environment_line(environment_report(str(device), args.backend), dtype))

    records = scan_lengths(configs, lengths, tokens_per_step=args.tokens_per_step, device=device,
                           dtype=None if dtype == torch.float32 else dtype, backward=not args.no_backward,
                           warmup=warmup, repeats=repeats, seed=args.seed)
    ratios = {f"{name}/transformer": scan_ratios(records, name, "transformer") for name in ("gdn", "hybrid")}
    print(table(records))
    for label, rows in ratios.items():
        cells = "  ".join(f"{r['seq_len']}: time {fmt(r['train_time'] or r['forward_time'], '.2f')}x "
                          f"memory {fmt(r['train_memory'] or r['forward_memory'], '.2f')}x" for r in rows)
        print(f"{label:<22}{cells}")
    if args.out:
        config = {"lengths": list(lengths), "dtype": str(dtype), "backend": args.backend,
                  "tokens_per_step": args.tokens_per_step, "backward": not args.no_backward, "warmup": warmup,
                  "repeats": repeats, "models": {name: c.to_dict() for name, c in configs.items()}}
        path = save_results(args.out, {"records": records, "ratios": ratios}, config=config, seed=args.seed,
                            device=str(device))
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
