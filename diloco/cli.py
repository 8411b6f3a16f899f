"""The ``diloco`` command line: ``diloco train [--config FILE] [--set section.key=value ...]``,
``diloco train … [--resume auto|never|PATH] [--force]``, ``diloco export RUN_DIR --out FILE``
(``--format hf --out DIR``: a Hugging Face model directory), ``diloco tokenizer train --data
text:FILE --vocab N --out DIR``,
``diloco plot RUN_DIR ... --out curves.png``, ``diloco summary RUN_DIR ... [--json]``,
``diloco bench optim [--quick] ...``, ``diloco bench hf`` and ``diloco launch ray [--config FILE]
[--address …]``.

User errors (:class:`diloco.errors.DilocoError`) and what the machine refuses (an ``OSError``
such as a full disk or a path that cannot be written, running out of memory) print one line,
``diloco: error: …``, and exit with status 2; Ctrl-C exits with 130; anything else is a bug and
keeps its traceback. ``diloco --version`` prints the installed version.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from diloco.errors import DilocoError, report_error, write_line

__all__ = ["main"]


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML config file (default: the tiny CPU SNOO job)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override one config value (repeatable), e.g. --set outer.sync_every=32",
    )


def _cmd_train(args: argparse.Namespace) -> int:
    from diloco.config import load_config
    from diloco.job.train import train

    cfg = load_config(args.config, args.overrides)
    summary = train(cfg, resume=args.resume, force=args.force)
    if os.environ.get("RANK", "0") != "0" or "finished_elsewhere" in summary:
        return 0  # rank 0 reports for the whole job (an elastic latecomer has said why)
    print(
        f"final val loss {summary['final_val_loss']:.4f} after {summary['steps']} steps "
        f"({summary['tokens']} tokens, {summary['wall_s']:.1f} s); outputs in {cfg.run.out_dir}"
    )
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    if args.format == "hf":
        from diloco.persist.export_hf import export_hf

        info = export_hf(args.run_dir, args.out)
    else:
        from diloco.persist.export import export

        info = export(args.run_dir, args.out)
    tokenizer = f" with the tokenizer of {info['tokenizer']}" if info.get("tokenizer") else ""
    print(
        f"wrote θ of {info['checkpoint']} (step {info['step']}, {info['params']} parameters) "
        f"to {info['out']}{tokenizer}"
    )
    return 0


def _cmd_tokenizer_train(args: argparse.Namespace) -> int:
    from diloco.job.tokenizer import train_tokenizer

    info = train_tokenizer(args.data, args.vocab, args.out)
    print(
        f"wrote a byte-level BPE of {info['vocab']} tokens, trained on {info['data']}, to "
        f"{info['out']}; use it with --set data.tokenizer={info['out']}"
    )
    return 0


def _add_tokenizer_parser(sub: argparse._SubParsersAction) -> None:
    """``tokenizer train``: a byte-level BPE on a local text file (offline)."""
    p = sub.add_parser("tokenizer", help="tokenizers for text: and hf: data (train: a BPE)")
    kinds = p.add_subparsers(dest="tokenizer", required=True)
    q = kinds.add_parser("train", help="train a byte-level BPE on a local text file")
    q.add_argument("--data", required=True, metavar="text:FILE", help="UTF-8 training text")
    q.add_argument("--vocab", type=int, default=8192, help="vocabulary size (default: %(default)s)")
    q.add_argument("--out", required=True, metavar="DIR", help="tokenizer directory to write")
    q.set_defaults(func=_cmd_tokenizer_train)


def _load_runs(args: argparse.Namespace) -> list:
    from diloco.reports.runs import load_run

    labels = args.labels or [None] * len(args.run_dirs)
    if len(labels) != len(args.run_dirs):
        raise DilocoError(
            f"got {len(labels)} --label for {len(args.run_dirs)} run directories; "
            "give one --label per RUN_DIR, in the same order, or none"
        )
    return [load_run(path, label) for path, label in zip(args.run_dirs, labels, strict=True)]


def _cmd_plot(args: argparse.Namespace) -> int:
    from diloco.reports.plot import plot_runs

    out = plot_runs(_load_runs(args), args.out, title=args.title)
    print(f"wrote {out}")
    return 0


def _cmd_summary(args: argparse.Namespace) -> int:
    from diloco.reports.summary import format_json, format_markdown, summary_row

    rows = [summary_row(run) for run in _load_runs(args)]
    print(format_json(rows) if args.json else format_markdown(rows), end="")
    return 0


def _add_bench_parser(sub: argparse._SubParsersAction) -> None:
    """``bench optim``: SNOO / EMA-Nesterov / DiLoCo against tuned AdamW and Muon."""
    from diloco.bench.optim import add_arguments, run_from_args

    p = sub.add_parser(
        "bench", help="benchmarks (optim: optimisers against tuned baselines; hf: GPT vs Llama)"
    )
    kinds = p.add_subparsers(dest="bench", required=True)
    p = kinds.add_parser(
        "optim", help="train one GPT with several optimisers and seeds; tables + val-loss plot"
    )
    add_arguments(p)
    p.set_defaults(func=run_from_args)
    from diloco.bench import hf_models

    p = kinds.add_parser(
        "hf", help="GPT vs a Llama of the same size, SNOO vs AdamW, on one tokenized text"
    )
    hf_models.add_arguments(p)
    p.set_defaults(func=hf_models.run_from_args)


def _add_report_parsers(sub: argparse._SubParsersAction) -> None:
    """``plot`` and ``summary``: read run directories back (no torch needed)."""
    for name, help_text in (
        ("plot", "overlay val/train loss vs tokens of several runs in one image"),
        ("summary", "compare runs in a table: final val loss, tokens/s, wall time, memory"),
    ):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run.out_dir of a run")
        p.add_argument(
            "--label",
            dest="labels",
            action="append",
            metavar="TEXT",
            help="legend/table name of the next RUN_DIR (repeat once per run; default: from "
            "its config.yaml, e.g. 'SNOO (AdamW, K=16)')",
        )
        if name == "plot":
            p.add_argument(
                "--out",
                default="curves.png",
                help="image file: .png, .pdf or .svg (default: %(default)s)",
            )
            p.add_argument("--title", help="figure title")
            p.set_defaults(func=_cmd_plot)
        else:
            p.add_argument("--json", action="store_true", help="print JSON instead of Markdown")
            p.set_defaults(func=_cmd_summary)


def _add_launch_parser(sub: argparse._SubParsersAction) -> None:
    """``launch local`` and ``launch ray`` (Ray is imported only when it runs)."""
    from diloco.launchers import ray_launcher, supervisor

    p = sub.add_parser("launch", help="run a whole job under a launcher (local, ray)")
    kinds = p.add_subparsers(dest="launcher", required=True)
    for name, module, help_text in (
        (
            "local",
            supervisor,
            "G groups x S shards on this machine; --elastic: groups restart alone",
        ),
        ("ray", ray_launcher, "Ray places and supervises the G·S workers; restarts on failure"),
    ):
        q = kinds.add_parser(name, help=help_text)
        _add_config_args(q)
        module.add_arguments(q)
        q.set_defaults(func=module.run_from_args)


def _cmd_coordinator(args: argparse.Namespace) -> int:
    from diloco.comm.elastic.coordinator import CoordinatorSettings, run_coordinator
    from diloco.config import load_config

    per_group = ("topology.group_id", "topology.coordinator", "topology.elastic")
    overrides = [o for o in args.overrides if not o.strip().startswith(per_group)]
    cfg = load_config(args.config, overrides)
    return run_coordinator(args.bind, CoordinatorSettings.from_topology(cfg.topology))


def _add_coordinator_parser(sub: argparse._SubParsersAction) -> None:
    """``coordinator``: the membership service of elastic worker groups (one per job)."""
    p = sub.add_parser(
        "coordinator",
        help="serve an elastic job's membership (torchft lighthouse) and rendezvous store",
    )
    p.add_argument(
        "--bind",
        required=True,
        metavar="HOST:PORT",
        help="where groups reach it (topology.coordinator); the store uses PORT+1",
    )
    _add_config_args(p)
    p.set_defaults(func=_cmd_coordinator)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("diloco")
    except PackageNotFoundError:  # a source tree on PYTHONPATH, not installed
        from diloco import __version__

        return __version__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="diloco",
        description="Low-communication two-loop training (DiLoCo, SNOO, EMA-Nesterov).",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="train a model with the configured inner/outer optimisers")
    _add_config_args(p)
    p.add_argument(
        "--resume",
        metavar="auto|never|PATH",
        help="continue from a checkpoint: auto = the newest in run.out_dir (the default when "
        "there is one), never = start at step 0, or a checkpoint or run directory",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="resume although the config differs from the checkpoint's, or start over "
        "(--resume never) in a run directory that holds checkpoints",
    )
    p.set_defaults(func=_cmd_train)
    p = sub.add_parser(
        "export", help="write θ of a run's newest checkpoint (a GPT state dict, or an HF model)"
    )
    p.add_argument("run_dir", metavar="RUN_DIR", help="run.out_dir of a run, or a checkpoint")
    p.add_argument(
        "--out", required=True, help="output: a .safetensors or .pt file; --format hf: a directory"
    )
    p.add_argument(
        "--format",
        choices=("file", "hf"),
        default="file",
        help="file: a GPT state dict (by --out's suffix); hf: a Hugging Face model directory "
        "(save_pretrained, and the run's tokenizer) of a model.source=hf:PATH run",
    )
    p.set_defaults(func=_cmd_export)
    _add_tokenizer_parser(sub)
    _add_report_parsers(sub)
    _add_bench_parser(sub)
    _add_launch_parser(sub)
    _add_coordinator_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (DilocoError, OSError, MemoryError) as e:
        report_error(_one_line(e))  # under torchrun: once every rank said its own
        return 2
    except KeyboardInterrupt:
        write_line("diloco: interrupted")
        return 130
    except RuntimeError as e:
        if not _out_of_memory(e):
            raise  # a bug: keep the traceback
        report_error(_one_line(e))
        return 2


def _one_line(e: BaseException) -> str:
    """The report of a user-caused error: its message, or for an OSError the operation's file
    and the system's reason (``/proc/m.pt: Permission denied``), on one line."""
    if isinstance(e, DilocoError):
        return str(e)
    if isinstance(e, MemoryError) or _out_of_memory(e):
        first = " ".join(str(e).split())[:300]
        return (
            f"out of memory ({first or type(e).__name__}); lower data.batch_size or the model size"
        )
    if isinstance(e, OSError) and e.strerror:
        where = f"{e.filename}: " if e.filename else ""
        return f"{where}{e.strerror}" + (f" (-> {e.filename2})" if e.filename2 else "")
    return " ".join(str(e).split()) or type(e).__name__


def _out_of_memory(e: BaseException) -> bool:
    """torch's out-of-memory errors: ``torch.OutOfMemoryError`` (a device) or a CPU allocation
    that failed (``DefaultCPUAllocator: can't allocate memory``)."""
    return type(e).__name__ == "OutOfMemoryError" or "can't allocate memory" in str(e)


if __name__ == "__main__":
    sys.exit(main())
