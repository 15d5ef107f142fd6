"""Peak memory and time of converting a Qwen-1 checkpoint (sft.qwen1_convert.convert_qwen1), against its shard size.

Builds a Qwen-1-format folder of random bf16 weights in Qwen-1's layout (real vocabulary, --layers layers of
width --hidden, in --shards shards), then measures in separate processes, one after the other in this run:
the baseline (imports only), the tokenizer conversion alone, the weights alone and the whole conversion. Weights
go shard by shard, so what they need above the baseline should stay near one or two shards, not the whole
checkpoint; the tokenizer's share is the same for every Qwen-1 size.

    python -m bench.bench_qwen1_convert [--hidden 1024] [--layers 16] [--shards 4]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


def build_source(folder: Path, hidden: int, layers: int, shards: int) -> list[int]:
    """A Qwen-1 folder (config, qwen.tiktoken, weights in `shards` safetensors files); returns the shard sizes."""
    from safetensors.torch import save_file

    from sft.qwen1_convert import packaged_qwen_tiktoken

    heads, vocab, ffn = hidden // 128, 151936, int(hidden * 2.75)
    config = {"architectures": ["QWenLMHeadModel"], "model_type": "qwen", "hidden_size": hidden}
    config |= {"num_attention_heads": heads, "num_hidden_layers": layers, "kv_channels": 128, "seq_length": 8192}
    config |= {"intermediate_size": 2 * ffn, "vocab_size": vocab, "rotary_emb_base": 10000, "layer_norm_epsilon": 1e-6}
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config))
    shutil.copy(packaged_qwen_tiktoken(), folder / "qwen.tiktoken")

    def random(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, dtype=torch.bfloat16) * 0.02

    groups: list[dict[str, torch.Tensor]] = [{} for _ in range(shards)]
    groups[0]["transformer.wte.weight"] = random(vocab, hidden)
    groups[-1]["transformer.ln_f.weight"] = torch.ones(hidden, dtype=torch.bfloat16)
    groups[-1]["lm_head.weight"] = random(vocab, hidden)
    for layer in range(layers):
        p, group = f"transformer.h.{layer}.", groups[layer * shards // layers]
        group[p + "ln_1.weight"] = group[p + "ln_2.weight"] = torch.ones(hidden, dtype=torch.bfloat16)
        group[p + "attn.c_attn.weight"], group[p + "attn.c_attn.bias"] = random(3 * hidden, hidden), random(3 * hidden)
        group[p + "attn.c_proj.weight"] = random(hidden, hidden)
        group[p + "mlp.w1.weight"], group[p + "mlp.w2.weight"] = random(ffn, hidden), random(ffn, hidden)
        group[p + "mlp.c_proj.weight"] = random(hidden, ffn)
    weight_map, sizes = {}, []
    for number, group in enumerate(groups, start=1):
        name = f"model-{number:05d}-of-{shards:05d}.safetensors"
        group = {key: value.clone() for key, value in group.items()}  # ln_1 and ln_2 shared one tensor
        save_file(group, folder / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(group, name))
        sizes.append((folder / name).stat().st_size)
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return sizes


def child(kind: str, source: str, output: str) -> None:
    """Runs in its own process: prints its peak RSS (bytes) and seconds."""
    start = time.perf_counter()
    from sft.qwen1_convert import convert_qwen1, convert_weights, qwen_fast_tokenizer, weight_files

    if kind == "tokenizer":
        qwen_fast_tokenizer(Path(source) / "qwen.tiktoken").save_pretrained(output)
    elif kind == "weights":
        Path(output).mkdir()
        convert_weights(weight_files(Path(source)), Path(output))
    elif kind == "convert":
        convert_qwen1(source, output)
    # VmHWM, not getrusage's ru_maxrss: that one starts from the parent's peak (it survives fork and exec).
    status = Path("/proc/self/status").read_text()
    peak = int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:"))) * 1024
    print(json.dumps({"peak": peak, "seconds": time.perf_counter() - start}))


KINDS = {
    "imports": "baseline (imports only)",
    "tokenizer": "tokenizer (qwen.tiktoken -> tokenizer.json)",
    "weights": "weights, shard by shard",
    "convert": "whole conversion",
}


def measure(kind: str, source: Path, output: Path) -> dict:
    command = [sys.executable, "-m", "bench.bench_qwen1_convert", "--child", kind, str(source), str(output)]
    run = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(run.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        sizes = build_source(work / "Qwen-bench", args.hidden, args.layers, args.shards)
        runs = {kind: measure(kind, work / "Qwen-bench", work / kind) for kind in KINDS}
    gib = 2**30
    print(f"checkpoint: {sum(sizes) / gib:.2f} GiB in {len(sizes)} shards, largest {max(sizes) / gib:.2f} GiB")
    baseline = runs["imports"]["peak"]
    for kind, run in runs.items():
        extra = run["peak"] - baseline
        print(
            f"{KINDS[kind]:<38} peak RSS {run['peak'] / gib:5.2f} GiB, above imports {extra / gib:5.2f} GiB "
            f"= {extra / max(sizes):4.2f}x the largest shard, {extra / sum(sizes):4.2f}x the checkpoint; "
            f"{run['seconds']:.1f} s"
        )


if __name__ == "__main__":
    main()
