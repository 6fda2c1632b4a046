"""Tools beside the pipeline: the checkpoint makers (tiny, SmolLM2) and the llama.cpp build."""
