"""Script-path entry for launchers that want a file rather than a module.

`deepspeed --num_gpus 2 --module adapt_pretrain.train ...` is the preferred form; this shim serves
`deepspeed launch/train.py ...`, `torchrun launch/train.py ...` and srun scripts alike.
"""
from adapt_pretrain.train import main

if __name__ == "__main__":
    raise SystemExit(main())
