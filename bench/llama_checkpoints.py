"""Llama-shaped checkpoints for the merge benchmarks: a base and N experts as Hugging Face model folders.

The base is `transformers.LlamaForCausalLM(LlamaConfig(...))` with its own random initialisation, cast to bfloat16
and saved with `save_pretrained` (safetensors, one shard per `--shard-mb`). Each expert is the base plus Gaussian
noise of standard deviation `--tau-std` on every floating-point tensor (a stand-in for fine-tuning), rounded to
bfloat16 like a real bf16 checkpoint, so its task vectors hold many equal magnitudes. Folders are written under
`--out` as base/ and expert0/ … expert{N-1}/; existing folders with the same recipe are reused.

    python bench/llama_checkpoints.py --out /tmp/mb-llama                       # 1024 hidden, 8 layers: 322 MB each
    python bench/llama_checkpoints.py --out /tmp/mb-7b --hidden 4096 --layers 2 --intermediate 11008 --heads 32
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def recipe(args: argparse.Namespace) -> dict:
    return {"hidden": args.hidden, "layers": args.layers, "vocab": args.vocab, "intermediate": args.intermediate,
            "heads": args.heads, "experts": args.experts, "tau_std": args.tau_std, "seed": args.seed}


def build(args: argparse.Namespace) -> list[Path]:
    from transformers import LlamaConfig, LlamaForCausalLM

    out = Path(args.out)
    stamp = out / "recipe.json"
    folders = [out / "base"] + [out / f"expert{i}" for i in range(args.experts)]
    if stamp.is_file() and json.loads(stamp.read_text()) == recipe(args) and all(f.is_dir() for f in folders):
        return folders
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    config = LlamaConfig(hidden_size=args.hidden, intermediate_size=args.intermediate,
                         num_hidden_layers=args.layers, num_attention_heads=args.heads,
                         num_key_value_heads=args.heads, vocab_size=args.vocab, tie_word_embeddings=False,
                         torch_dtype="bfloat16")
    start = time.perf_counter()
    with torch.no_grad():
        model = LlamaForCausalLM(config).to(torch.bfloat16)
        params = sum(p.numel() for p in model.parameters())
        model.save_pretrained(folders[0], safe_serialization=True, max_shard_size=f"{args.shard_mb}MB")
        base = {k: v.clone() for k, v in model.state_dict().items()}
        g = torch.Generator().manual_seed(args.seed + 1)
        for i, folder in enumerate(folders[1:]):
            for k, p in model.state_dict().items():
                if p.is_floating_point():
                    noise = torch.randn(p.shape, generator=g, dtype=torch.float32).mul_(args.tau_std)
                    p.copy_((base[k].float() + noise).to(torch.bfloat16))
            model.save_pretrained(folder, safe_serialization=True, max_shard_size=f"{args.shard_mb}MB")
            print(f"  wrote {folder}", flush=True)
    stamp.write_text(json.dumps(recipe(args)))
    size = sum(f.stat().st_size for f in folders[0].glob("*.safetensors"))
    print(f"built {len(folders)} checkpoints of {params / 1e6:.1f} M parameters ({size / 1e6:.0f} MB each, bf16) "
          f"in {time.perf_counter() - start:.1f} s under {out}", flush=True)
    return folders


def add_arguments(parser: argparse.ArgumentParser, out: bool = True) -> None:
    if out:
        parser.add_argument("--out", required=True, help="folder for base/ and expert*/")
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--intermediate", type=int, default=2752, help="MLP width (2752: 167 M parameters at 1024)")
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--tau-std", type=float, default=1e-3, help="standard deviation of each expert's τ")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shard-mb", type=int, default=2000)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    build(p.parse_args())
