"""Our recipes, as a regular package, so that `tune run recipes/<name>.py --config …` runs them.

torchtune 0.6.1 runs a recipe path as the module `recipes.<name>`; the torchtune wheel installs a
`recipes` package of its own, which wins unless the repo root comes first on the path. With
`PYTHONPATH=.` (what the Makefile passes) and this file, `recipes` is ours. `python recipes/<name>.py
--config …` works too.
"""
