"""make serve: the OpenAI-compatible front (app), its request and response schema (protocol) and the engine behind it
(llama.cpp's server, managed and watched; the echo scorer) (engine)."""
