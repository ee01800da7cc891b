#!/bin/sh
# dmoe-check-model DIR: exit 0 when DIR holds a complete Hugging Face
# checkpoint as dmoe loads it (config.json, the tokenizer files, and
# model.safetensors or every shard that model.safetensors.index.json names).
# The Kubernetes init containers run it before a pod starts serving.
set -eu
dir="${1:?usage: dmoe-check-model DIR}"
fail() { echo "dmoe-check-model: $dir: $*" >&2; exit 1; }
[ -d "$dir" ] || fail "not a directory"
for f in config.json tokenizer.json tokenizer_config.json; do
  [ -s "$dir/$f" ] || fail "$f is missing or empty"
done
if [ -f "$dir/model.safetensors.index.json" ]; then
  shards=$(grep -o '"[^"]*\.safetensors"' "$dir/model.safetensors.index.json" | tr -d '"' | sort -u)
  [ -n "$shards" ] || fail "model.safetensors.index.json names no shard"
  n=0
  for s in $shards; do
    [ -s "$dir/$s" ] || fail "shard $s (named by model.safetensors.index.json) is missing or empty"
    n=$((n + 1))
  done
  echo "dmoe-check-model: $dir: config, tokenizer and $n shards present"
elif [ -s "$dir/model.safetensors" ]; then
  echo "dmoe-check-model: $dir: config, tokenizer and model.safetensors present"
else
  fail "no model.safetensors and no model.safetensors.index.json"
fi
