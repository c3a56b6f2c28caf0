"""CPU training step of a tiny GDN language model: gdn_lab's chunked recurrence against FLA's naive one.

What a Colab-without-GPU or laptop user runs: the torch backend. One process times `--steps`
optimizer steps (forward, backward, AdamW) of a 2-layer, 128-wide GDN LM (2 heads x 64, value dim
128, T 256, batch 8, fp32) on `--threads` CPU threads, after `--warmup` untimed steps, and prints
tokens/s. `--recurrence fla-naive` swaps the layer's chunked recurrence (`gdn_lab.ops.
chunk_gated_delta_rule`) for `fla.ops.gated_delta_rule.naive.naive_chunk_gated_delta_rule`, the
pure-torch reference FLA ships; everything else (projections, conv, norms, MLP, loss, optimizer)
is the same code. Compare the two as whole processes, alternating:

    python benchmarks/cpu_train_step.py --recurrence gdn_lab
    python benchmarks/cpu_train_step.py --recurrence fla-naive
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from gdn_lab import ops
from gdn_lab.config import ModelConfig, TrainConfig
from gdn_lab.models import build_model
from gdn_lab.results import save_results
from gdn_lab.train import make_optimizer

CONFIG = ModelConfig(vocab_size=256, hidden_size=128, num_layers=2, num_heads=2, head_dim=64, expand_v=2.0,
                     attn_num_heads=2, backend="torch")


def fla_naive_chunk(q, k, v, g, beta, initial_state=None, scale=None, chunk_size=64):
    """FLA's naive chunk form behind gdn_lab.ops' signature: (o in q's dtype, final state fp32)."""
    from fla.ops.gated_delta_rule.naive import naive_chunk_gated_delta_rule

    o, state = naive_chunk_gated_delta_rule(q, k, v, g, beta, chunk_size=chunk_size, scale=scale,
                                            initial_state=initial_state, output_final_state=True)
    return o.to(q.dtype), state


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recurrence", choices=("gdn_lab", "fla-naive"), default="gdn_lab")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--out", help="also write the result with its environment (gdn_lab.results) to this JSON")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.recurrence == "fla-naive":
        ops.chunk_gated_delta_rule = fla_naive_chunk  # what ops.gated_delta_rule calls for T > 1
    torch.manual_seed(0)
    model = build_model(CONFIG)
    optimizer = make_optimizer(model, TrainConfig(), torch.device("cpu"))
    tokens = torch.randint(0, CONFIG.vocab_size, (args.batch_size, args.seq_len + 1))

    def step() -> float:
        loss = model(tokens[:, :-1], targets=tokens[:, 1:])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    for _ in range(args.warmup):
        step()
    started = time.perf_counter()
    losses = [step() for _ in range(args.steps)]
    seconds = time.perf_counter() - started
    result = {"recurrence": args.recurrence, "threads": args.threads, "tokens_per_second":
              args.steps * args.batch_size * args.seq_len / seconds, "ms_per_step": 1e3 * seconds / args.steps,
              "last_loss": losses[-1]}
    print(json.dumps(result))
    if args.out:
        save_results(args.out, result, config={"model": CONFIG, **vars(args)}, seed=0, device="cpu")
    return result


if __name__ == "__main__":
    main()
