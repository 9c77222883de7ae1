"""Any Hugging Face causal LM, through the same trainer, checkpoints and guarantees as our MoE recipe.

    # continue pre-training (or fine-tune) the weights of a folder or a Hub name; its tokenizer by default
    accelerate launch recipes/causal_lm.py --model_name_or_path Qwen/Qwen3-30B-A3B --data_files a.txt ...
    # a fresh model of any registered architecture, its config changed by --config_overrides
    accelerate launch recipes/causal_lm.py --model_type llama --config_overrides hidden_size=512,num_hidden_layers=8 ...
    accelerate launch recipes/causal_lm.py --config_name ./my-config --prepared_data data/web ...

Muon takes the hidden matrices (expert stacks per expert, fused matrices per part) and AdamW the
rest; the run prints the assignment. Every other flag is the MoE recipe's (see ``--help``).
"""

from __future__ import annotations

import sys

from accel_trainer.config import DataArguments, ModelArguments, TrainingArguments, parse_args
from accel_trainer.errors import ConfigError
from accel_trainer.process import exit_code_of
from accel_trainer.run import run


def main(argv: list[str] | None = None) -> int:
    model_args, data_args, train_args = parse_args((ModelArguments, DataArguments, TrainingArguments), argv)

    def job():
        if not model_args.hugging_face:
            raise ConfigError("give --model_name_or_path, --config_name or --model_type (for our MoE family's "
                              "presets use recipes/moe18b.py)")
        return run(None, model_args, data_args, train_args)

    return exit_code_of(job, output_dir=train_args.output_dir)


if __name__ == "__main__":
    sys.exit(main())
