"""Benchmarks, ours against peers, each a module run from the repo root (`python -m bench.<name>`, or its make
target): peers (make bench), scale (make bench-scale), train (make bench-train), serve (make bench-serve); the peer
sides (trl_side, trl_prep) and helpers; committed results in bench/results/."""
