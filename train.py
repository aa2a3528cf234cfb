"""Fine-tune and evaluate one run (or, with -m, a sweep of runs).

    python train.py                                    # offline default
    python train.py model=llama2_13b quant=nf4 data=sst2 train.n=100
    python train.py -m +sweep=sst2_study data.path=/data/SST-2   # a study's sweep: see sweeps/
"""

import sys

import hydra
from omegaconf import DictConfig

from ftexp.cli import quote_paths, run_guarded
from ftexp.config import register_configs

register_configs()


@hydra.main(config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    from ftexp.recipes import finetune

    return run_guarded(finetune, cfg, objective=cfg.objective)


if __name__ == "__main__":
    from ftexp.distributed import rank

    sys.argv[1:] = quote_paths(sys.argv[1:])

    if rank() > 0:  # under torchrun, rank 0 alone writes Hydra's record and job log into the run dir
        sys.argv.append("hydra.output_subdir=null")
        if not any(a.startswith("hydra/job_logging=") for a in sys.argv):
            sys.argv.append("hydra/job_logging=stdout")
    main()
