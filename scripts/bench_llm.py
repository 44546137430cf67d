"""Throughput of federated LoRA fine-tuning: raysim's local training against a plain single-process peft loop.

Both train the tiny Llama-style causal LM (byte-level, LoRA on every linear layer plus the LM head) on
CPU, on the same Shakespeare clients (natural partition by play and speaker), the same rounds and
sampled clients, batch size and optimizer. The plain loop is what one would write by hand with
transformers and peft: per client, reset the adapters to the global ones, run one epoch of Adam
with the model's own ``labels=`` loss, count the non-padding tokens.

raysim's throughput is the tokens trained per second of round wall time as the driver sees it (every
worker together; Ray dispatch, adapter loading and the reduction included; the last round, which
evaluates, is left out), after one warm-up round; the loop trains one untimed client first. It prints

    llm_overhead_ratio: X  =  loop tokens/s × workers / raysim tokens/s      (target ≤ 1.3)

Usage: OMP_NUM_THREADS=1 python scripts/bench_llm.py [--workers 2] [--rounds 4] [--clients-per-round 16]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np
import torch

PLAYS = ["hamlet", "macbeth", "the-tempest", "twelfth-night", "julius-caesar", "henry-v"]


def scenario(workers: int, rounds: int, clients_per_round: int, out_dir: str) -> dict:
    return {
        "name": "bench-llm", "seed": 0, "num_clients": 89, "rounds": rounds,
        "data": {"source": "shakespeare_lm", "plays": PLAYS, "min_lines": 30, "seq_len": 64},
        "partition": {"kind": "natural"}, "sampling": {"clients_per_round": clients_per_round},
        "model": {"kind": "hf_causal_lm", "lora": {"r": 4, "alpha": 8, "target_modules": "all-linear", "train_head": True}},
        "training": {"epochs": 1, "batch_size": 16, "optimizer": "adam", "lr": 0.005},
        "evaluation": {"every": rounds}, "executor": {"num_workers": workers, "num_cpus": 1, "clients_per_call": 1},
        "tracking": {"progress": False, "wandb": "disabled"}, "output": {"dir": out_dir},
    }


def raysim_throughput(config: dict) -> dict[str, float]:
    """Tokens per second of round wall time over rounds 2..R−1, and the workers' in-call throughput."""
    import raysim

    result = raysim.run(config)
    measured = result.history[1:-1]
    tokens = sum(m["tokens"] for m in measured)
    seconds = sum(result.round_seconds[1:-1])  # as the driver sees a round, not as the server reports it
    return {"tokens_per_second": tokens / seconds, "tokens": tokens, "seconds": seconds,
            "per_worker_in_call": float(np.mean([m["tokens_per_second_per_worker"] for m in measured])),
            "trainable_parameters": result.summary["final"]["trainable_parameters"],
            "worker_rss_mb": result.summary["final"]["worker_rss_mb"]}


def loop_throughput(config: dict) -> dict[str, float]:
    """The same clients and rounds, trained one after another by a hand-written transformers + peft loop."""
    import peft
    import transformers as tf

    from raysim.config import parse_scenario
    from raysim.data.load import load_data, partition_data
    from raysim.engine.sampling import sample_clients

    torch.set_num_threads(1)
    resolved = parse_scenario(config)
    dataset = load_data(resolved)
    part = partition_data(resolved, dataset)
    torch.manual_seed(0)
    base = tf.LlamaForCausalLM(tf.LlamaConfig(
        vocab_size=259, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        tie_word_embeddings=False))
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                      modules_to_save=["lm_head"]))
    trainable = [p for p in model.parameters() if p.requires_grad]
    global_weights = [p.detach().clone() for p in trainable]
    x_all = torch.from_numpy(dataset.x_train)
    tokens, seconds = 0, 0.0
    warm_up = int(sample_clients(resolved.sampling, resolved.num_clients, resolved.seed, 0)[0])
    for round_index, clients in [(0, [warm_up]), *((r, None) for r in range(1, resolved.rounds - 1))]:
        # One untimed client first, as raysim's warm-up round; then the rounds raysim_throughput measures.
        clients = clients or sample_clients(resolved.sampling, resolved.num_clients, resolved.seed, round_index).tolist()
        for cid in clients:
            start = time.perf_counter()
            with torch.no_grad():
                for p, g in zip(trainable, global_weights):
                    p.copy_(g)
            optimizer = torch.optim.Adam(trainable, lr=resolved.training.lr)
            x = x_all[part.client_indices(cid)]
            model.train()
            for batch in torch.randperm(len(x)).split(resolved.training.batch_size):
                ids = x[batch].long()
                mask = ids >= 0
                inputs = torch.where(mask, ids, 0)
                loss = model(input_ids=inputs, attention_mask=mask.long(), labels=torch.where(mask, ids, -100)).loss
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
            if round_index:
                seconds += time.perf_counter() - start
                tokens += int((x >= 0).sum())
    return {"tokens_per_second": tokens / seconds, "tokens": tokens, "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=4, help="one warm-up, R−2 measured, one that evaluates")
    parser.add_argument("--clients-per-round", type=int, default=16)
    args = parser.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray
    from raysim.engine.cluster import start_local

    with tempfile.TemporaryDirectory() as out_dir:
        config = scenario(args.workers, max(args.rounds, 3), args.clients_per_round, out_dir)
        loop = loop_throughput(config)
        start_local(num_cpus=args.workers, log_to_driver=False)
        try:
            ours = raysim_throughput(config)
        finally:
            ray.shutdown()
    ratio = loop["tokens_per_second"] * args.workers / ours["tokens_per_second"]
    print(f"trainable_parameters: {ours['trainable_parameters']} ({4 * ours['trainable_parameters']} adapter bytes per client)")
    print(f"loop_tokens_per_second: {loop['tokens_per_second']:.0f} ({loop['tokens']} tokens in {loop['seconds']:.1f} s, 1 process)")
    print(f"raysim_tokens_per_second: {ours['tokens_per_second']:.0f} ({ours['tokens']} tokens in {ours['seconds']:.1f} s of "
          f"rounds, {args.workers} workers; in-call {ours['per_worker_in_call']:.0f} per worker)")
    print(f"worker_rss_mb: {ours['worker_rss_mb']:.0f}")
    print(f"llm_overhead_ratio: {ratio:.2f}")


if __name__ == "__main__":
    main()
