"""Train a Llama-style model with fp8train.

    python train.py                                  # tiny Llama on the shipped tinyshakespeare, CPU is fine
    python train.py model=llama_125m data=wikitext2 trainer.max_steps=2000
    python train.py hydra.run.dir=runs/mine resume=auto   # continue a run from its newest checkpoint

Every option lives in conf/ (one group per concern); fp8train/config.py holds the typed schema.
"""

try:
    from fp8train.cli.train import main
except BaseException as e:  # Ctrl-C while Python imports Hydra, before main() can catch it
    from fp8train.cli import by_ctrl_c, interrupted

    if by_ctrl_c(e):
        interrupted()
    raise

if __name__ == "__main__":
    main()
