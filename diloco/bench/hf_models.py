"""GPT vs a Llama of the same size, SNOO vs AdamW, on the same tokenized text (docs/hf.md).

    diloco bench hf [--steps 150] [--out bench_hf]   (or python -m diloco.bench.hf_models)

Offline, on the CPU: the text is the running interpreter's standard-library ``.py`` sources
(the first ``--text-kb`` KiB), a byte-level BPE of ``--vocab`` tokens is trained on it
(``diloco tokenizer train``), and four runs train on ``text:FILE`` through that tokenizer with
the same seed, batches, learning-rate schedule and token budget:

* the built-in GPT (L layers, width C, learned positions, GELU MLP of 4C, tied embeddings);
* a Llama (``transformers.LlamaConfig``: the same L and C, RoPE, SwiGLU MLP of width 8C/3
  rounded to a multiple of 32 so the parameter counts match within a few %, tied embeddings),

each with AdamW alone (``outer.method=none``) and with SNOO (``outer.method=nesterov``, one
group, K = ``--sync-every``). Prints a Markdown table (parameters, tokens/s, final val loss on
the held-out tail of the text) and writes ``OUT/results.json``. Timings are of this machine, as
it is loaded; they are reported, never asserted.
"""

from __future__ import annotations

import argparse
import json
import sysconfig
from pathlib import Path
from typing import Any

__all__ = ["add_arguments", "main", "run_from_args"]

METHODS = {"AdamW": ["outer.method=none"], "SNOO": ["outer.method=nesterov"]}


def write_text(path: Path, kib: int) -> Path:
    """The first ``kib`` KiB of the stdlib ``.py`` train files, joined by blank lines."""
    from diloco.job.data import stdlib_files

    root = Path(sysconfig.get_paths()["stdlib"])
    parts, size = [], 0
    for rel in stdlib_files()[0]:
        text = (root / rel).read_text(encoding="utf-8", errors="replace")
        parts.append(text)
        size += len(text)
        if size >= kib * 1024:
            break
    path.write_text("\n\n".join(parts)[: kib * 1024], encoding="utf-8")
    return path


def write_llama(path: Path, layers: int, width: int, heads: int, vocab: int, block: int) -> Path:
    """A Llama config directory of the GPT's size (see the module docstring)."""
    from transformers import LlamaConfig

    hidden = -(-(8 * width // 3) // 32) * 32
    LlamaConfig(
        vocab_size=vocab,
        hidden_size=width,
        intermediate_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=block,
        tie_word_embeddings=True,
    ).save_pretrained(path)
    return path


def run_all(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Train the tokenizer and the four runs (torch is imported here, not by the command line)."""
    from diloco.config import load_config
    from diloco.job.tokenizer import train_tokenizer
    from diloco.job.train import train

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    text = write_text(out / "text.txt", args.text_kb)
    tok = train_tokenizer(f"text:{text}", args.vocab, str(out / "tokenizer"))["out"]
    vocab = -(-args.vocab // 64) * 64
    llama = write_llama(out / "llama", args.layers, args.width, args.heads, vocab, args.block)
    models = {
        "GPT": [
            f"model.vocab_size={vocab}",
            f"model.n_layer={args.layers}",
            f"model.n_embd={args.width}",
            f"model.n_head={args.heads}",
        ],
        "Llama": [f"model.source=hf:{llama}"],
    }
    common = [
        f"data.source=text:{text}",
        f"data.tokenizer={tok}",
        f"model.block_size={args.block}",
        f"data.batch_size={args.batch}",
        f"train.steps={args.steps}",
        f"inner.warmup_steps={max(1, args.steps // 10)}",
        f"outer.sync_every={args.sync_every}",
        "train.eval_every=0",
        "train.eval_batches=8",
        "run.device=cpu",
        "run.progress=false",
    ]
    rows = []
    for model, model_sets in models.items():
        for method, method_sets in METHODS.items():
            run_dir = out / "runs" / f"{model}-{method}".lower()
            cfg = load_config(None, [*common, *model_sets, *method_sets, f"run.out_dir={run_dir}"])
            summary = train(cfg, resume="never", force=True)
            rows.append(
                {
                    "model": model,
                    "method": method,
                    "params": _params(run_dir),
                    "tokens_per_s": summary["tokens_per_s"],
                    "final_val_loss": summary["final_val_loss"],
                    "tokens": summary["tokens"],
                }
            )
    return rows


def _params(run_dir: Path) -> int:
    import torch

    state = torch.load(run_dir / "final_model.pt", map_location="cpu")
    return sum(t.numel() for k, t in state.items() if not k.endswith("lm_head.weight"))


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| model | method | parameters | tokens/s | final val loss |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['method']} | {r['params']:,} | {r['tokens_per_s']:,.0f} | "
            f"{r['final_val_loss']:.3f} |"
        )
    return "\n".join(lines) + "\n"


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The benchmark's options (``diloco bench hf`` and ``python -m diloco.bench.hf_models``)."""
    p.add_argument("--steps", type=int, default=150, help="inner steps per run")
    p.add_argument("--batch", type=int, default=16, help="sequences per step")
    p.add_argument("--block", type=int, default=64, help="tokens per sequence")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=1024, help="BPE vocabulary")
    p.add_argument("--text-kb", type=int, default=1024, help="KiB of text")
    p.add_argument("--sync-every", type=int, default=8, help="SNOO's K")
    p.add_argument("--out", default="bench_hf", help="output directory")


def run_from_args(args: argparse.Namespace) -> int:
    """Run the four trainings, print the table, write ``OUT/results.json``."""
    rows = run_all(args)
    keys = ("steps", "batch", "block", "layers", "width", "heads", "vocab", "text_kb", "sync_every")
    result = {"settings": {k: getattr(args, k) for k in keys}, "rows": rows}
    (Path(args.out) / "results.json").write_text(json.dumps(result, indent=1) + "\n")
    print(table(rows), end="")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m diloco.bench.hf_models", description=__doc__)
    add_arguments(p)
    return run_from_args(p.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
