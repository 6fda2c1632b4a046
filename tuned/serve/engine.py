"""The engines behind `make serve`, both llama.cpp on the same exported GGUF (memory-mapped, so the weights are
in RAM once):

- `LlamaServer`: llama.cpp's own server (`llama-server`, tools/server, built by `make install` from the
  llama-cpp-python sdist) as a child process on a private loopback port: parallel slots, continuous batching
  (many sequences decoded in one step). Every generation goes here, through its native `/completion`.
- `Scorer`: llama-cpp-python's `Llama` with every position's logits kept: the prompt's log-probabilities for
  `echo` requests, which llama-server does not compute ("Only no echo is supported"; upstream PRs #15189 and
  #17935 unmerged). Loaded on the first scoring request; also the tokenizer (vocab only) of the front.
"""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections import deque
from pathlib import Path

import numpy as np


def token_text(raw: bytes) -> str:
    """One token's text as OpenAI writes it: the text, or `bytes:\\xe2\\x80` for part of a UTF-8 character."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)


KV_CACHE_TYPES = {"f16": 1, "f32": 0}  # ggml type ids (GGML_TYPE_F16, GGML_TYPE_F32), for llama-cpp-python


def llama_server_binary() -> Path:
    """`llama-server` as `make install` builds it into the venv's bin/; LLAMA_SERVER overrides it."""
    path = Path(os.environ.get("LLAMA_SERVER") or Path(sys.prefix) / "bin" / "llama-server")
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: make install builds llama.cpp's server from the llama-cpp-python "
                                "sdist (or set LLAMA_SERVER to a llama-server binary).")
    return path


def wait_healthy(url: str, proc: subprocess.Popen, timeout: float = 300) -> None:
    """Polls `url`/health until it answers 200 (llama-server once its model is loaded, make serve's front once its
    engine is up). RuntimeError if `proc` exits first, TimeoutError after `timeout` s."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{url}: the server exited with {proc.returncode} before answering /health")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.25)
    raise TimeoutError(f"{url} did not answer /health within {timeout:.0f} s")


def _dies_with_parent() -> None:
    """In the child, before exec (Linux): SIGTERM when the process that started it dies, even by SIGKILL, so that
    no llama-server outlives its front holding the model's memory and a port. (The signal follows the starting
    thread: both recipes start the engine from their main thread.)"""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class LlamaServer:
    """llama-server on `gguf` with `parallel` slots of `n_ctx` tokens each, on 127.0.0.1 only, behind a random
    internal API key (the front is the only client). `start()` returns once it answers /health.

    Args:
        gguf: the model file.
        n_ctx: tokens per slot (a request's prompt + completion).
        parallel: slots: requests decoded together in one batch; KV cache memory = parallel x n_ctx x
            (2 x layers x kv_heads x head_dim x bytes): 8B in f16, 128 KiB a token.
        n_threads: llama.cpp's threads (None: its default).
        kv_cache: f16 (llama.cpp's default) or f32.
        name: the model alias.
    """

    def __init__(self, gguf: str | Path, *, n_ctx: int, parallel: int, n_threads: int | None = None,
                 kv_cache: str = "f16", name: str = "model"):
        if kv_cache not in KV_CACHE_TYPES:
            raise ValueError(f"serve.kv_cache={kv_cache!r}: expected one of {list(KV_CACHE_TYPES)}")
        self.gguf, self.n_ctx, self.parallel = str(gguf), int(n_ctx), int(parallel)
        self.n_threads, self.kv_cache, self.name = n_threads, kv_cache, name
        self.key = secrets.token_urlsafe(24)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.log: deque[str] = deque(maxlen=40)  # its last lines, for the message when it dies

    def command(self) -> list[str]:
        cmd = [str(llama_server_binary()), "-m", self.gguf, "--host", "127.0.0.1", "--port", str(self.port),
               "--alias", self.name, "--api-key", self.key,
               # one slot per concurrent sequence, each with its own n_ctx (not one pool they compete for)
               "-np", str(self.parallel), "-c", str(self.n_ctx * self.parallel), "--no-kv-unified", "--cont-batching",
               "-ctk", self.kv_cache, "-ctv", self.kv_cache,
               # memory bounded by the slots: no host-RAM prompt cache beside them (8 GiB by default)
               "--cache-ram", "0", "--no-webui"]
        if self.n_threads:
            cmd += ["-t", str(self.n_threads)]
        return cmd

    def _drain(self, stream) -> None:
        """Reads its log as it comes (a full pipe would block it), keeping the last lines."""
        for line in stream:
            self.log.append(line.rstrip())

    def start(self, timeout: float = 300) -> "LlamaServer":
        """Starts it (on a fresh port: a restart never races the old process's socket) and waits for /health."""
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log.clear()
        self.proc = subprocess.Popen(self.command(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     errors="replace", preexec_fn=_dies_with_parent)
        threading.Thread(target=self._drain, args=(self.proc.stdout,), daemon=True).start()
        try:
            wait_healthy(self.url, self.proc, timeout)
        except RuntimeError:
            time.sleep(0.2)  # the drain thread's last lines
            raise RuntimeError(f"llama-server exited with {self.proc.returncode}: " + "\n".join(self.log)) from None
        except TimeoutError:
            self.kill()
            raise
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None  # poll() also reaps it once it has died

    def kill(self) -> None:
        """SIGKILL (a hung or stopped process ignores SIGTERM) and reap."""
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.kill()
        self.proc = None

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}


class Scorer:
    """Tokenizer and prompt scorer over the GGUF (llama-cpp-python). The vocabulary loads at once (vocab_only);
    the weights on the first `score`, which holds a lock: one prompt at a time.

    Args:
        gguf: the model file.
        n_ctx: the longest prompt that can be scored.
        n_threads: llama.cpp's threads (None: its default).
        kv_cache: f16 or f32, as LlamaServer's.
    """

    def __init__(self, gguf: str | Path, *, n_ctx: int, n_threads: int | None = None, kv_cache: str = "f16"):
        from llama_cpp import Llama

        self.gguf, self.n_ctx, self.n_threads, self.kv_cache = str(gguf), int(n_ctx), n_threads, kv_cache
        self.vocab = Llama(self.gguf, vocab_only=True, verbose=False)
        self.n_vocab = self.vocab.n_vocab()
        self.add_bos = self.vocab.metadata.get("tokenizer.ggml.add_bos_token", "false") == "true"
        self.bos = self.vocab.token_bos()
        # the longest text one token stands for (special tokens' text included): a text of more characters than
        # n_ctx times this cannot fit in n_ctx tokens, so the front refuses it without tokenizing it
        self.max_token_chars = max(len(self.token_bytes(t)) for t in range(self.n_vocab))
        self._llm = None
        self._lock = threading.Lock()

    def split_pieces(self, raw: bytes) -> list[int]:
        """The tokens whose pieces, joined, are `raw` (longest piece first): how llama-server's bytes of a token
        that ended inside a UTF-8 character map back to it."""
        if getattr(self, "_by_piece", None) is None:
            self._by_piece = {}
            for t in range(self.n_vocab):
                self._by_piece.setdefault(self.vocab.detokenize([t], special=False), t)
            self._longest = max(len(p) for p in self._by_piece)
        tokens, at = [], 0
        while at < len(raw):
            for size in range(min(self._longest, len(raw) - at), 0, -1):
                token = self._by_piece.get(raw[at : at + size])
                if token is not None:
                    tokens.append(token)
                    at += size
                    break
            else:
                raise ValueError(f"no token of the vocabulary spells {raw[at:]!r}")
        return tokens

    def tokenize(self, text: str) -> list[int]:
        """Text -> ids as llama-server tokenizes a prompt: special-token text read as special tokens, BOS where
        the GGUF says so (what the exported model saw in training)."""
        return self.vocab.tokenize(text.encode("utf-8"), add_bos=self.add_bos, special=True)

    def token_bytes(self, token: int) -> bytes:
        """One token's bytes (special tokens' text included)."""
        return self.vocab.detokenize([token], special=True)

    def piece(self, token: int) -> str:
        """One token's text (a partial UTF-8 sequence as OpenAI writes it: `bytes:\\xe2\\x80`)."""
        return token_text(self.token_bytes(token))

    def detokenize(self, ids: list[int]) -> str:
        return self.vocab.detokenize(ids, special=True).decode("utf-8", errors="replace")

    def _model(self):
        if self._llm is None:
            from llama_cpp import Llama

            kwargs = {"n_threads": self.n_threads} if self.n_threads else {}
            self._llm = Llama(self.gguf, n_ctx=self.n_ctx, n_batch=min(self.n_ctx, 512), logits_all=True,
                              verbose=False, type_k=KV_CACHE_TYPES[self.kv_cache],
                              type_v=KV_CACHE_TYPES[self.kv_cache], **kwargs)
        return self._llm

    def score(self, ids: list[int], top: int) -> tuple[list[float | None], list[dict[str, float] | None]]:
        """For each token of `ids`: its log-probability given the tokens before it, and the `top` most likely
        tokens there ({piece: logprob}); None for the first token, which has no context. OpenAI's `echo` +
        `logprobs` semantics: nothing is added around `ids`."""
        with self._lock:
            llm = self._model()
            llm.reset()
            llm.eval(ids)
            logits = np.asarray(llm.scores[: len(ids) - 1], dtype=np.float64)
        logits -= logits.max(axis=1, keepdims=True)
        logprobs = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
        chosen: list[float | None] = [None]
        tops: list[dict[str, float] | None] = [None]
        for row, token in zip(logprobs, ids[1:]):
            chosen.append(float(row[token]))
            if top > 0:
                best = np.argpartition(-row, top - 1)[:top]
                best = best[np.argsort(-row[best])]
                entry = {self.piece(int(t)): float(row[t]) for t in best}
                entry.setdefault(self.piece(token), float(row[token]))  # OpenAI: the chosen token is always listed
                tops.append(entry)
            else:
                tops.append({})
        return chosen, tops
