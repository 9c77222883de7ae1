"""Every accelerate_configs/*.yaml parses with Accelerate's own loader and says what it should."""

import re
import subprocess

import pytest
from accelerate.commands.config.config_args import load_config_from_file
from accelerate.utils import DistributedType

from launching import REPO

CONFIGS = REPO / "accelerate_configs"
EXPECTED = {
    # file: (distributed_type, num_processes, num_machines, mixed_precision, fsdp state dict type)
    "cpu.yaml": (DistributedType.NO, 1, 1, "no", None),
    "cpu_2proc.yaml": (DistributedType.MULTI_GPU, 2, 1, "no", None),
    "local_2gpu_ddp.yaml": (DistributedType.MULTI_GPU, 2, 1, "bf16", None),
    "container_multigpu.yaml": (DistributedType.FSDP, 8, 1, "bf16", "SHARDED_STATE_DICT"),
    "cluster_fsdp_multinode.yaml": (DistributedType.FSDP, 32, 4, "bf16", "SHARDED_STATE_DICT"),
}


def test_every_config_is_covered():
    assert sorted(p.name for p in CONFIGS.glob("*.yaml")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_config_fields(name):
    config = load_config_from_file(str(CONFIGS / name))
    dtype, procs, machines, precision, state_dict_type = EXPECTED[name]
    assert config.distributed_type == dtype
    assert (config.num_processes, config.num_machines, str(config.mixed_precision)) == (procs, machines, precision)
    if state_dict_type:
        assert config.fsdp_config["fsdp_version"] == 2
        assert config.fsdp_config["fsdp_state_dict_type"] == state_dict_type
        # No class named: Accelerate wraps the model's own _no_split_modules, so any model's layers.
        assert config.fsdp_config["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
        assert "fsdp_transformer_layer_cls_to_wrap" not in config.fsdp_config


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_config_header_says_when_and_how(name):
    text = (CONFIGS / name).read_text()
    assert text.startswith("#") and re.search(r"(?m)^# Launch.*accelerate launch --config_file "
                                              r"accelerate_configs/" + name, text)


def test_slurm_script_is_valid_bash_and_requeues_with_latest():
    script = REPO / "scripts" / "slurm_train.sbatch"
    subprocess.run(["bash", "-n", str(script)], check=True)
    text = script.read_text()
    assert "#SBATCH --signal=B:USR1@" in text and "scontrol requeue" in text
    assert "--resume_from_checkpoint latest" in text and "cluster_fsdp_multinode.yaml" in text
    assert "--prepared_data $PREPARED_DATA" in text and "--data_mix $DATA_MIX" in text
    assert "trap requeue USR1 TERM" in text  # pre-emption without warning is SIGTERM
    assert "--max_restarts" in text  # a dead rank comes back within the allocation
