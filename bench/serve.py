"""`make bench-serve`: `make serve` under concurrent callers, and llama.cpp's server alone on the same load.

    python -m bench.serve --config configs/smollm2_135m_lora_cpu.yaml [--concurrency 1,4,8,16]
        [--requests 2] [--max-tokens 64] [--out bench/results/serve.json] [key=value ...]

At each concurrency c, c callers each send `--requests` greedy completions of exactly `--max-tokens` tokens
(`ignore_eos`), one after the other (prompts: the config's first instruct source, in turn). Measured per case: aggregate completion tokens
per second (all tokens / wall time), p50 and p99 latency of a request, errors. Two cases per c, run back to back (which first alternates):
`front` (recipes/serve.py, as make serve starts it) and `engine` (the same llama-server, same slots and
context, called directly on its own OpenAI endpoint with the prompt already templated): their ratio is the
front's overhead. Prints the table; writes `--out` (JSON).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

from bench.results import save, stamp

REPO = Path(__file__).resolve().parents[1]


def load(url: str, headers: dict, bodies: list[dict], callers: int, per_caller: int) -> dict:
    """`callers` threads, each sending `per_caller` requests in turn; returns the case's figures."""
    latencies, tokens, errors, lock = [], [0], [], threading.Lock()

    def caller(k: int) -> None:
        with httpx.Client(timeout=600, headers=headers) as client:
            for j in range(per_caller):
                body = bodies[(k * per_caller + j) % len(bodies)]
                start = time.perf_counter()
                try:
                    r = client.post(url, json=body)
                    ok = r.status_code == 200
                    n = r.json()["usage"]["completion_tokens"] if ok else 0
                except (httpx.HTTPError, KeyError, ValueError) as err:
                    ok, n, r = False, 0, err
                with lock:
                    latencies.append(time.perf_counter() - start)
                    tokens[0] += n
                    if not ok:
                        errors.append(str(getattr(r, "text", r))[:200])

    threads = [threading.Thread(target=caller, args=(k,)) for k in range(callers)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    lat = sorted(latencies)
    return {"callers": callers, "requests": len(lat), "completion_tokens": tokens[0], "wall_s": round(wall, 3),
            "tokens_per_s": round(tokens[0] / wall, 2), "p50_s": round(statistics.median(lat), 3),
            "p99_s": round(lat[min(len(lat) - 1, int(round(0.99 * (len(lat) - 1))))], 3), "errors": len(errors),
            "first_error": errors[0] if errors else None}


def _ensure_export(config: str, overrides: list[str], export_dir: Path) -> None:
    """A fresh clone has no export yet: train (the stock recipe) and export first."""
    if (export_dir / "export.json").is_file():
        return
    tune = str(Path(sys.executable).parent / "tune")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    print(f"{export_dir} has no export yet: training and exporting {config} first", flush=True)
    subprocess.run([tune, "run", "lora_finetune_single_device", "--config", config, *overrides], check=True)
    subprocess.run([tune, "run", "recipes/export_tuned.py", "--config", config, *overrides], check=True, env=env)


def _bodies(cfg, manifest: dict, name: str, max_tokens: int) -> tuple[list[dict], list[dict]]:
    """The same prompts as the engine alone gets them (template around the prompt, OpenAI's samplers) and as the
    front gets them. Every request decodes exactly max_tokens tokens (vLLM's ignore_eos, llama-server's too): the
    load is the same whatever the answers, and a case measures decoding, not how soon the model says EOS."""
    source = next(s for s in cfg.dataset.sources.values() if s.get("type") == "instruct")
    rows_file = Path(source.path if "path" in source else source.paths[0])
    prompts = [json.loads(line)["prompt"] for line in rows_file.read_text().splitlines() if line.strip()]
    common = {"max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
    raw = [{**common, "prompt": manifest.get("prompt_prefix", "") + p + manifest.get("prompt_suffix", ""),
            "top_k": 0, "min_p": 0.0, "repeat_penalty": 1.0} for p in prompts]
    return raw, [{**common, "prompt": p, "model": name} for p in prompts]


def _measure(cases: list[tuple], levels: list[int], requests: int) -> list[dict]:
    """Each case warmed once (weights paged in, first slot used), then every level; who goes first alternates."""
    for _, url, headers, bodies in cases:
        load(url, headers, bodies[:1], 1, 1)
    rows = []
    for i, c in enumerate(levels):
        for case, url, headers, bodies in cases[:: 1 if i % 2 else -1]:
            rows.append({"case": case, **load(url, headers, bodies, c, requests)})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def _summarize(rows: list[dict], levels: list[int]) -> float:
    """Adds each front row's speed-up over one caller and overhead over the engine; returns the overall overhead."""
    by = {(r["case"], r["callers"]): r for r in rows}
    one = by[("front", levels[0])]["tokens_per_s"]
    for r in rows:
        if r["case"] == "front":
            r["speedup_vs_1"] = round(r["tokens_per_s"] / one, 2)
            r["front_overhead"] = round(1 - r["tokens_per_s"] / by[("engine", r["callers"])]["tokens_per_s"], 3)
    walls = {case: sum(r["wall_s"] for r in rows if r["case"] == case) for case in ("front", "engine")}
    return round(walls["front"] / walls["engine"] - 1, 3)  # the same tokens through each: time the front adds


def _print_table(result: dict, levels: list[int]) -> None:
    by = {(r["case"], r["callers"]): r for r in result["rows"]}
    print(f"\nmake serve under load: {result['gguf']}, {result['parallel']} slots, {result['max_tokens']} tokens a "
          f"request, greedy ({result['machine']}, {result['date']})")
    print(f"{'callers':>7} | {'front tok/s':>11} | {'engine tok/s':>12} | {'front overhead':>14} | {'x 1 caller':>10} | "
          f"{'p50 s':>6} | {'p99 s':>6} | errors")
    for c in levels:
        f, e = by[("front", c)], by[("engine", c)]
        print(f"{c:>7} | {f['tokens_per_s']:>11.1f} | {e['tokens_per_s']:>12.1f} | {f['front_overhead']:>13.1%} | "
              f"{f['speedup_vs_1']:>10.2f} | {f['p50_s']:>6.2f} | {f['p99_s']:>6.2f} | {f['errors'] + e['errors']}")
    line = (f"overall: the front took {result['overall_front_overhead']:+.1%} the engine's time for the same requests "
            "(sum over the levels)")
    if ("front", 8) in by:
        line += f"; 8 callers: {by[('front', 8)]['speedup_vs_1']:.2f}x one caller"
    print(line)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/smollm2_135m_lora_cpu.yaml")
    parser.add_argument("--concurrency", default="1,4,8,16")
    parser.add_argument("--requests", type=int, default=3, help="requests per caller")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--out", default="bench/results/serve.json")
    args, overrides = parser.parse_known_args(argv)
    levels = [int(c) for c in args.concurrency.split(",")]

    from tuned.config import load as load_config
    from tuned.serve.engine import LlamaServer, free_port, wait_healthy
    from tuned.serve.options import options, served_gguf  # the options make serve reads

    cfg = load_config(["--config", args.config, *overrides])
    opts = options(cfg)
    parallel = max(levels) if "serve.parallel" not in " ".join(overrides) else int(opts["parallel"])
    export_dir = Path(cfg.output_dir) / "export"
    _ensure_export(args.config, overrides, export_dir)
    gguf, manifest = served_gguf(export_dir, opts["gguf"])
    raw, ours = _bodies(cfg, manifest, opts["model_name"][0], args.max_tokens)  # the served name: OpenAI requires it

    engine = LlamaServer(gguf, n_ctx=int(opts["n_ctx"] or manifest["max_seq_len"]), parallel=parallel,
                         n_threads=opts["n_threads"], kv_cache=opts["kv_cache"]).start()
    port = free_port()
    front = subprocess.Popen([sys.executable, str(REPO / "recipes" / "serve.py"), "--config", args.config, *overrides,
                              f"serve.port={port}", f"serve.parallel={parallel}"], cwd=REPO,
                             env={**os.environ, "PYTHONPATH": str(REPO)},
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        try:
            wait_healthy(f"http://127.0.0.1:{port}", front)
        except (RuntimeError, TimeoutError) as err:
            raise SystemExit(f"{err}: {front.stdout.read()[-3000:] if front.poll() is not None else ''}") from None
        key = {"Authorization": f"Bearer {opts['api_key']}"} if opts["api_key"] else {}
        rows = _measure([("engine", f"{engine.url}/v1/completions", engine.headers, raw),
                         ("front", f"http://127.0.0.1:{port}/v1/completions", key, ours)], levels, args.requests)
    finally:
        os.killpg(front.pid, signal.SIGTERM)
        front.wait(timeout=60)
        engine.stop()

    overall = _summarize(rows, levels)
    result = {"overall_front_overhead": overall, **stamp(), "config": args.config, "gguf": gguf.name,
              "parallel": parallel, "max_tokens": args.max_tokens, "requests_per_caller": args.requests,
              "n_threads": opts["n_threads"], "rows": rows}
    save(args.out, result)
    _print_table(result, levels)
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
