"""Benchmark the rollout side on CPU.

Measures, in one run on the same model and batch:
  1. generated tokens/s of the embedded engine (our decode loop, log-probs on) vs plain
     ``transformers`` ``model.generate`` (sampling, no log-probs) -> ratio;
  2. overhead of routed-expert capture (engine with / without routes) -> ratio;
  3. the same batch through HTTP (embedded server + SGLangClient) vs the engine called directly;
  4. bytes per token of routes, SGLang's int32 wire format (raw and base64) vs our compact dtype,
     for the benchmark model and for Qwen3-30B-A3B (48 layers, top-8 of 128 experts);
  5. decode cost of the SGLang base64 payload -> compact tensor (microseconds per token).

Usage: python tools/bench_rollout.py [--preset tiny] [--batch 16] [--prompt-len 16] [--new-tokens 64]
       [--repeats 3] [--threads 1] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time

import torch

from megatron_vespo.rollout.client import SGLangClient
from megatron_vespo.rollout.embedded.engine import EmbeddedEngine
from megatron_vespo.rollout.embedded.models import build_tiny_model
from megatron_vespo.rollout.embedded.server import start_embedded_server
from megatron_vespo.rollout.routes import RouteSpec, decode_routes, encode_routes


def timed(fn, repeats: int) -> float:
    """Median wall time of ``fn()`` over ``repeats`` runs (after one warm-up)."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def interleaved(fns: dict, repeats: int) -> dict:
    """Run the variants round-robin ``repeats`` times (after a warm-up round); per variant the
    median wall and CPU seconds, and per round ratios (robust to load drifting on a shared machine)."""
    for fn in fns.values():
        fn()
    wall = {k: [] for k in fns}
    cpu = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            w0, c0 = time.perf_counter(), time.process_time()
            fn()
            wall[k].append(time.perf_counter() - w0)
            cpu[k].append(time.process_time() - c0)
    return {"wall": wall, "cpu": cpu}


def engine_body(prompts, new_tokens, routes, seed=0):
    return {"input_ids": prompts, "return_logprob": True, "return_routed_experts": routes,
            "sampling_params": {"temperature": 1.0, "max_new_tokens": new_tokens, "ignore_eos": True,
                                "sampling_seed": seed}}


def bench_generation(args, model, prompts):
    engine = EmbeddedEngine(model, max_batch_size=len(prompts))

    def run_engine(routes):
        reqs, _ = engine.parse(engine_body(prompts, args.new_tokens, routes))
        engine.run_batch(reqs)
        assert all(len(r.output_ids) == args.new_tokens for r in reqs)

    ids = torch.tensor(prompts)

    def run_hf():
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True,
                                 max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, top_k=None,
                                 top_p=None, temperature=1.0, pad_token_id=0)
        assert out.shape[1] == ids.shape[1] + args.new_tokens

    n = len(prompts) * args.new_tokens
    res = interleaved({"hf": run_hf, "engine": lambda: run_engine(False), "engine_r3": lambda: run_engine(True)},
                      args.repeats)
    med = {kind: {k: statistics.median(v) for k, v in res[kind].items()} for kind in res}

    def ratio(kind, a, b):  # median over rounds of a/b
        return statistics.median(x / y for x, y in zip(res[kind][a], res[kind][b]))
    return {"tokens": n, "hf_generate_tok_s": n / med["wall"]["hf"], "engine_tok_s": n / med["wall"]["engine"],
            "engine_r3_tok_s": n / med["wall"]["engine_r3"],
            "engine_vs_hf": ratio("wall", "hf", "engine"), "engine_vs_hf_cpu": ratio("cpu", "hf", "engine"),
            "r3_capture_overhead": ratio("wall", "engine_r3", "engine"),
            "r3_capture_overhead_cpu": ratio("cpu", "engine_r3", "engine")}


def bench_http(args, model, prompts):
    """The same batch through HTTP (thread-mode server + client, R3 on) vs the engine called directly."""
    engine = EmbeddedEngine(model, max_batch_size=len(prompts))
    handle = start_embedded_server(engine=engine)
    spec = RouteSpec.from_hf_config(engine.model_info())
    loop = asyncio.new_event_loop()
    client = SGLangClient(handle.url, route_spec=spec, return_routed_experts=True)

    def run_http():
        async def once():
            params = [engine_body(p, args.new_tokens, True, i)["sampling_params"] for i, p in enumerate(prompts)]
            return await asyncio.gather(*[client.generate(p, sp) for p, sp in zip(prompts, params)])
        samples = loop.run_until_complete(once())
        assert all(s.routed_experts is not None and len(s.response_tokens) == args.new_tokens for s in samples)

    def run_direct():  # the server's worker is idle meanwhile
        reqs, _ = engine.parse(engine_body(prompts, args.new_tokens, True))
        engine.run_batch(reqs)

    try:
        res = interleaved({"http": run_http, "direct": run_direct}, args.repeats)
    finally:
        loop.run_until_complete(client.aclose())
        loop.close()
        handle.stop()
    n = len(prompts) * args.new_tokens
    return {"http_r3_tok_s": n / statistics.median(res["wall"]["http"]),
            "http_vs_direct": statistics.median(d / h for h, d in zip(res["wall"]["http"], res["wall"]["direct"]))}


def bench_routes(spec: RouteSpec, tokens: int, repeats: int) -> dict:
    routes = torch.randint(0, spec.num_experts, (tokens - 1, spec.num_layers, spec.topk), dtype=torch.int32)
    payload = encode_routes(routes)
    t_dec = timed(lambda: decode_routes(payload, num_tokens=tokens, spec=spec), repeats)
    t_enc = timed(lambda: encode_routes(routes), repeats)
    out = decode_routes(payload, num_tokens=tokens, spec=spec)
    assert torch.equal(out.long(), routes.long())
    return {"int32_bytes_per_token": spec.bytes_per_token(compact=False),
            "base64_bytes_per_token": len(payload) / (tokens - 1),
            "compact_bytes_per_token": spec.bytes_per_token(compact=True), "compact_dtype": str(out.dtype),
            "wire_over_compact": spec.bytes_per_token(compact=False) / spec.bytes_per_token(compact=True),
            "decode_us_per_token": 1e6 * t_dec / (tokens - 1), "encode_us_per_token": 1e6 * t_enc / (tokens - 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="tiny")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--route-tokens", type=int, default=4096)
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model = build_tiny_model(args.preset, seed=0)
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(3, model.config.vocab_size, (args.batch, args.prompt_len), generator=g).tolist()

    results = {"config": vars(args)}
    results["generation"] = gen = bench_generation(args, model, prompts)
    results["http"] = bench_http(args, model, prompts)
    bench_spec = RouteSpec.from_hf_config(EmbeddedEngine(model).model_info())
    qwen = RouteSpec(num_layers=48, topk=8, num_experts=128)
    results["routes"] = {args.preset: bench_routes(bench_spec, args.route_tokens, args.repeats),
                         "qwen3-30b-a3b": bench_routes(qwen, args.route_tokens, args.repeats)}

    print(f"model {args.preset}, batch {args.batch} x prompt {args.prompt_len} -> {args.new_tokens} new tokens, "
          f"{args.threads} thread(s), median of {args.repeats}")
    print(f"  HF generate()            {gen['hf_generate_tok_s']:9.0f} tok/s")
    print(f"  embedded engine          {gen['engine_tok_s']:9.0f} tok/s   speed engine/HF = "
          f"{gen['engine_vs_hf']:.2f} (wall), {gen['engine_vs_hf_cpu']:.2f} (CPU time)")
    print(f"  embedded engine + R3     {gen['engine_r3_tok_s']:9.0f} tok/s   capture overhead = "
          f"{gen['r3_capture_overhead']:.3f}x (wall), {gen['r3_capture_overhead_cpu']:.3f}x (CPU time)")
    print(f"  HTTP server + client, R3 {results['http']['http_r3_tok_s']:9.0f} tok/s   "
          f"speed HTTP/direct engine = {results['http']['http_vs_direct']:.2f}")
    for name, r in results["routes"].items():
        print(f"  routes {name:14s} int32 {r['int32_bytes_per_token']} B/tok "
              f"(base64 {r['base64_bytes_per_token']:.0f}),"
              f" {r['compact_dtype']} {r['compact_bytes_per_token']} B/tok ({r['wire_over_compact']:.0f}x), "
              f"decode {r['decode_us_per_token']:.2f} us/tok, encode {r['encode_us_per_token']:.2f} us/tok")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=2)


if __name__ == "__main__":
    main()
