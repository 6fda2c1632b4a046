"""`make bench`'s results (bench/results/peers.json) printed as tables; a case that failed is a row saying where
and why."""

from __future__ import annotations


def _ok(*cases: dict | None) -> bool:
    return all(c is not None and not c.get("failed") for c in cases)


def print_table(r: dict) -> None:
    """The results as tables; a case that failed is a row saying where and why."""
    for size, cases in r["data_side"].items():
        print(f"\nData side, {size} ({r['data']}):")
        print(f"  {'case':<26}{'prep s':>9}{'peak RSS MB':>13}{'packs':>8}{'fill':>9}{'supervised':>12}{'text kept':>11}"
              f"{'long pairs':>12}")
        for name, c in cases.items():
            if c.get("failed"):
                print(f"  {name:<26} FAILED: {c['error']}")
                continue
            long = "uncounted" if c["truncated_pairs_counted"] is None else f"{c['truncated_pairs_counted']} cut"
            print(f"  {name:<26}{c['seconds']:>9.3f}{c['peak_rss_mb']:>13.0f}{c['packs']:>8}{100 * c['fill']:>8.2f}%"
                  f"{100 * c['supervised_share']:>11.1f}%{100 * c['text_kept']:>10.1f}%{long:>12}")
        ours, warm, line, doc = (cases.get(k) for k in ("ours (cold)", "ours (warm)", "stock, text by line", "stock, text by document"))
        if _ok(ours, warm, line, doc):
            print(f"  ratios: cold time {ours['seconds'] / line['seconds']:.2f}x stock, warm {warm['seconds'] / line['seconds']:.3f}x stock; "
                  f"fill {100 * ours['fill']:.2f}% vs {100 * line['fill']:.2f}%; text kept {100 * ours['text_kept']:.1f}% vs "
                  f"{100 * doc['text_kept']:.1f}% (whole documents)")
    t = r["train_side"]
    print("\nTraining side (tiny Llama 3.1, CPU, stock lora_finetune_single_device, same steps and seed; median run):")
    for name, c in t.items():
        if c.get("failed"):
            print(f"  {name:<16} FAILED at step {c['step']} of {c['steps']}: {c['error']}")
            continue
        each = ", ".join(f"{x['supervised_tokens_per_s']:.1f}" if not x.get("failed") else f"failed at step {x['step']}"
                         for x in c.get("runs", []))
        print(f"  {name:<16} {c['supervised_tokens_per_s']:>9.1f} supervised tokens/s  {c['s_per_step'] or float('nan'):>6.2f} s/step"
              f"  (runs: {each})")
    ours = t.get("ours (packed)")
    for peer in ("stock unpacked", "stock packed"):
        if _ok(ours, t.get(peer)):
            print(f"  ratio: {ours['supervised_tokens_per_s'] / t[peer]['supervised_tokens_per_s']:.2f}x {peer}")
    d = r["data_side"].get("max_seq_len 256", {})
    if _ok(d.get("ours (cold)"), d.get("stock, text by line")):
        per_pack = {k: d[k]["fill"] * d[k]["supervised_share"] for k in ("ours (cold)", "stock, text by line")}
        print(f"  (same shapes per step, so from the data alone: {per_pack['ours (cold)'] / per_pack['stock, text by line']:.2f}x "
              "the supervised tokens per packed step; CPU step times vary by a few tens of percent between runs)")
    g = r.get("generation") or {}
    if g:
        print(f"\nGeneration (greedy, fp32, CPU, one process, median of {g.get('repeats')}):")
        if g.get("failed"):
            print(f"  FAILED: {g['error']}")
        else:
            print(f"  {g['prompts']} prompts x up to {g['max_new_tokens']} tokens, batches of {g['batch_size']}, {g['model']}")
            print(f"  ours (torchtune generate + KV cache) {g['ours_tokens_per_s']:.1f} tokens/s, transformers generate "
                  f"{g['transformers_tokens_per_s']:.1f} tokens/s: ratio {g['ratio']:.2f}x")
    print(f"\nGPU side: {r['gpu_side']}")
