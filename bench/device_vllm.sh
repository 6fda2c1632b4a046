#!/usr/bin/env bash
# The GPU check of make serve's peer: vLLM on both exports of a run, called by the official openai client and by
# lm-eval's local-completions, on a machine with a GPU and vLLM installed (pip install vllm). Not run here: no GPU
# was lent when this was written, and the device machine reaches no package index to install vLLM on.
#
#   bash bench/device_vllm.sh runs/smollm2_135m_lora_cpu          # after make demo + make export on that machine
set -euo pipefail
RUN=${1:?usage: bench/device_vllm.sh runs/<name>}
NAME=$(basename "$RUN")
PORT=${PORT:-8100}
MAX_LEN=$(python -c "import json,sys; print(json.load(open(sys.argv[1]))['max_seq_len'])" "$RUN/export/export.json")
python -c "import vllm" 2>/dev/null || { echo "vllm is not installed here: pip install vllm"; exit 2; }
BASE=$(python -c "import json,sys; print(json.load(open(sys.argv[1]))['base_model_name_or_path'])" "$RUN/export/adapter/adapter_config.json")
RANK=$(python -c "import json,sys; print(json.load(open(sys.argv[1]))['r'])" "$RUN/export/adapter/adapter_config.json")

check() {  # the served model answers a templated prompt and scores an echo request
  python - "$RUN" "$NAME" "$PORT" <<'EOF'
import json, sys
from openai import OpenAI
run, name, port = sys.argv[1], sys.argv[2], sys.argv[3]
t = json.load(open(f"{run}/export/export.json"))
client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused")
r = client.completions.create(model=name, prompt=t["prompt_prefix"] + "How do I stop a board from cupping?" + t["prompt_suffix"],
                              max_tokens=48, temperature=0)
print("generation:", json.dumps(r.choices[0].text))
s = client.completions.create(model=name, prompt="Oak is a hardwood.", max_tokens=0, echo=True, logprobs=1)
print("echo logprobs:", s.choices[0].logprobs.token_logprobs[:6])
EOF
}

serve() {  # $@: the vllm serve arguments; waits for it, runs the check, stops it
  vllm serve "$@" --port "$PORT" --max-model-len "$MAX_LEN" & pid=$!
  for _ in $(seq 300); do curl -sf "http://127.0.0.1:$PORT/health" >/dev/null && break; sleep 1; done
  check; kill $pid; wait $pid || true
}

serve "$RUN/export/hf" --served-model-name "$NAME"
serve "$BASE" --enable-lora --lora-modules "$NAME=$RUN/export/adapter" --max-lora-rank "$RANK"
