"""Evaluate without training: a trained run, or a base model zero/k-shot.

    python evaluate.py run=outputs/runs/<run dir>                 # re-evaluate a trained run
    python evaluate.py run=outputs/runs/<run dir> eval.method=both eval.n=200
    python evaluate.py model=tiny data=sst2 data.path=../shared/data/SST-2 eval.shots=3   # baseline
    python evaluate.py -m model=flan_t5_base data=dialogsum task=summarization eval.shots=0,1,3

Results (config.yaml, metrics.json, predictions.jsonl) go to outputs/evals/<time>_<name>
unless output_dir= or hydra.run.dir= says otherwise; the trained run's files are
never touched.
"""

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from ftexp.cli import command_line_keys, objective_value, quote_paths, run_guarded
from ftexp.config import register_configs

register_configs()


def _own_output_dirs(argv: list[str]) -> list[str]:
    """Hydra overrides that put an evaluation in a folder of its own, named after the
    evaluated run, or after the model and data; none when the user chose one."""
    if any(a.startswith(("hydra.run.dir=", "hydra.sweep.dir=")) for a in argv):
        return []
    run = next((a.split("=", 1)[1].strip("'\"") for a in argv if a.startswith("run=")), None)
    name = Path(run.rstrip("/")).name.replace("'", "") if run else "${model.name}_${data.name}"
    return [f"hydra.run.dir='outputs/evals/${{now:%Y-%m-%d_%H-%M-%S}}_{name}'",
            "hydra.sweep.dir='outputs/eval_sweeps/${now:%Y-%m-%d_%H-%M-%S}'"]


def _refuse_writing_into_the_run(argv: list[str]) -> None:
    """Hydra writes its own record (.hydra/, the job log) into hydra.run.dir before any
    ftexp code runs: pointed at the evaluated run, it would overwrite that run's record."""
    values = dict(a.split("=", 1) for a in argv if "=" in a)
    run, out = values.get("run"), values.get("hydra.run.dir")
    if run and out and Path(run.strip("'\"")).resolve() == Path(out.strip("'\"")).resolve():
        print(f"ftexp: error: hydra.run.dir={out} is the run being evaluated; its .hydra/ record and files "
              "would be overwritten. Give the evaluation a directory of its own (or leave hydra.run.dir out).",
              file=sys.stderr)
        sys.exit(2)


@hydra.main(config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    from ftexp.evaluation import eval_config
    from ftexp.recipes import evaluate_only

    overrides = command_line_keys()  # with run=<dir>: the evaluation settings that replace the run's own

    def evaluate_and_pick(cfg: DictConfig) -> float:
        metrics = evaluate_only(cfg, overrides)
        return objective_value(metrics, eval_config(cfg, overrides).objective)

    return run_guarded(evaluate_and_pick, cfg)


if __name__ == "__main__":
    sys.argv[1:] = quote_paths(sys.argv[1:])
    _refuse_writing_into_the_run(sys.argv[1:])
    sys.argv += _own_output_dirs(sys.argv[1:])
    main()
