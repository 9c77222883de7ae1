"""Flagship recipe: an ~18B-parameter mixture-of-experts LM trained with Muon + AdamW.

    accelerate launch recipes/moe18b.py --preset tiny --max_steps 200 --output_dir runs/demo
    accelerate launch --config_file accelerate_configs/<env>.yaml recipes/moe18b.py --preset 18b ...

The presets of our MoE family (``accel_trainer/models/presets.py``, registered as the ``accel_moe``
family) are the whole model definition; everything else is a flag (see ``--help``).
"""

from __future__ import annotations

import sys

from accel_trainer.config import DataArguments, ModelArguments, TrainingArguments, parse_args
from accel_trainer.models import ACCEL_MOE
from accel_trainer.process import exit_code_of
from accel_trainer.run import run

PRESETS, DEFAULTS = ACCEL_MOE.presets, ACCEL_MOE.defaults

__all__ = ["DEFAULTS", "PRESETS", "main"]


def main(argv: list[str] | None = None) -> int:
    model_args, data_args, train_args = parse_args((ModelArguments, DataArguments, TrainingArguments), argv)
    return exit_code_of(lambda: run(PRESETS, model_args, data_args, train_args, defaults=DEFAULTS),
                        output_dir=train_args.output_dir)


if __name__ == "__main__":
    sys.exit(main())
