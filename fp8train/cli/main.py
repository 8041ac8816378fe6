"""The ``fp8train`` command: ``fp8train train ...`` runs training, the other subcommands inspect and report."""

from __future__ import annotations

import argparse
import sys

from fp8train.cli import interruptible
from fp8train.errors import Fp8trainError


def cmd_check(args: argparse.Namespace) -> None:
    """Compose and validate a config, check this machine has the device it asks for and that the data can be
    trained on, without training; print it and what it implies."""
    from omegaconf import OmegaConf

    from fp8train import backends, precision
    from fp8train.config import Recipe, compose
    from fp8train.data.loader import check_data
    from fp8train.trainer import with_vocab_size

    cfg = compose(args.overrides)
    # The device checks a run makes before any work, so that a config check passes only where training could start.
    backend = backends.select(cfg.backend)
    if cfg.precision.recipe == Recipe.fp8:
        precision.check_hardware(cfg.precision, backend)
    # The data as the run reads it: every source checked, and unless the corpus is large and not tokenized yet, the
    # tokenizer and token cache built (the run then finds them) and the splits' lengths checked against data.seq_len.
    t = cfg.trainer
    data_summary, vocab = check_data(
        cfg.data, seed=t.seed, micro_batch_size=t.micro_batch_size, grad_accum_steps=t.grad_accum_steps
    )
    if vocab is not None:
        cfg = with_vocab_size(cfg, vocab)
    print(OmegaConf.to_yaml(OmegaConf.structured(cfg)), end="")
    print(f"# {data_summary}")
    m = cfg.model
    # Parameters without embeddings: attention (q, o: d*d; k, v: d*kv_dim) and SwiGLU (3*d*ffn), norms.
    kv_dim = m.kv_heads * m.head_dim
    per_layer = 2 * m.d_model * m.d_model + 2 * m.d_model * kv_dim + 3 * m.d_model * m.ffn_dim + 2 * m.d_model
    print(
        f"# {m.n_layers * per_layer / 1e6:.1f}M parameters without embeddings; "
        f"{cfg.tokens_per_step} tokens per step; backend {cfg.backend.name.value} -> {backend.describe()}; "
        "config is valid"
    )


def cmd_export_hf(args: argparse.Namespace) -> None:
    """Write a Hugging Face LlamaForCausalLM folder from a checkpoint (or a run dir's newest intact checkpoint)."""
    from pathlib import Path

    from fp8train.export.hf import checkpoint_to_export, export_hf
    from fp8train.loggers import setup_console

    setup_console()
    ckpt = checkpoint_to_export(Path(args.checkpoint))
    print(f"wrote {export_hf(ckpt, Path(args.out), args.dtype)}")


def cmd_compare(args: argparse.Namespace) -> None:
    """Loss curves of several runs on one PNG, and a table of their gaps to the bf16 run."""
    import os
    from pathlib import Path

    from fp8train.cli.compare import compare

    out = Path(args.out) if args.out else Path(os.path.commonpath([Path(p).resolve() for p in args.runs])) / "compare"
    print(compare([Path(p) for p in args.runs], out))
    print(f"wrote {out / 'compare.png'} and {out / 'compare.md'}")


def cmd_report(args: argparse.Namespace) -> None:
    """Heatmaps and a summary of a run's outlier statistics (RUN_DIR/outliers.jsonl)."""
    from pathlib import Path

    from fp8train.cli.report import FILES, report

    out = Path(args.out) if args.out else Path(args.run_dir) / "report"
    print(report(Path(args.run_dir), out))
    print(f"wrote {', '.join(FILES)} to {out}")


def cmd_import_hf(args: argparse.Namespace) -> None:
    """Turn a local Hugging Face Llama folder into weights fp8train starts from (model.init_from=OUT)."""
    from pathlib import Path

    from fp8train.export.hf import import_hf
    from fp8train.loggers import setup_console

    setup_console()
    out = import_hf(Path(args.hf_dir), Path(args.out))
    print(f"wrote {out}; train from it with model.init_from={out} and the model settings in {out / 'model.yaml'}")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(
        prog="fp8train",
        description="Train Llama-style models in FP8 (fp8train train), inspect configs, compare runs, export.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("train", help="train (same as python train.py; Hydra overrides follow)", add_help=False)
    check = sub.add_parser("check", help="validate a config and its data and print it, without training")
    check.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. model=llama_1b optim.lr=3e-4")
    check.set_defaults(func=cmd_check)
    export = sub.add_parser("export-hf", help="write a Hugging Face LlamaForCausalLM folder from a checkpoint")
    export.add_argument("checkpoint", help="RUN_DIR/checkpoints/step_N, or a run dir (its newest intact checkpoint)")
    export.add_argument("out", help="output folder (new or empty)")
    export.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16", help="weight dtype (default bf16)")
    export.set_defaults(func=cmd_export_hf)
    imp = sub.add_parser("import-hf", help="turn a local Hugging Face Llama folder into weights to train from")
    imp.add_argument("hf_dir", help="folder with config.json and safetensors weights (nothing downloads)")
    imp.add_argument("out", help="output folder (new or empty)")
    imp.set_defaults(func=cmd_import_hf)
    cmp = sub.add_parser("compare", help="plot and tabulate loss curves of runs (BF16 vs FP8 variants)")
    cmp.add_argument(
        "runs", nargs="+", help="run directories (metrics.jsonl + config.yaml each), or folders of them (a sweep)"
    )
    cmp.add_argument("--out", help="output folder (default: RUNS' common parent/compare)")
    cmp.set_defaults(func=cmd_compare)
    rep = sub.add_parser("report", help="heatmaps and a summary of a run's outliers.jsonl (monitor=default)")
    rep.add_argument("run_dir", help="a run directory with outliers.jsonl")
    rep.add_argument("--out", help="output folder (default: RUN_DIR/report)")
    rep.set_defaults(func=cmd_report)

    if argv[:1] == ["train"]:  # Hydra parses its own arguments (overrides, -m, --cfg job, ...)
        with interruptible():  # Ctrl-C while Python imports Hydra
            from fp8train.cli.train import main as train_main

        train_main(argv[1:])
        return
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except Fp8trainError as e:
        print(f"fp8train: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("fp8train: interrupted (Ctrl-C)", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
