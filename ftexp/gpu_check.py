"""The GPU check: ``python -m ftexp.bench --gpu`` runs the tests in ``tests/gpu`` (bf16 LoRA,
QLoRA nf4 with double quantization, int8, TRL's loss on CUDA, padding-free batches with flash
attention, 2-GPU DDP; SmolLM2 from its GGUF file on the real SST-2 files) and writes a markdown
report: each test's outcome and wall time, and the figures its run wrote to metrics.json (training
time, tokens per second, MFU against the card's data-sheet peak, peak memory in training and in
evaluation, weight memory, accuracy). It needs a checkout of the repository (the tests are not
installed with the package). It is sized to finish in a few minutes on one GPU; no GPU has run it yet.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
TESTS = ROOT / "tests" / "gpu"
# metrics.json keys shown, with their headings and formats
COLUMNS = (("train/runtime_s", "train s", "{:.1f}"), ("train/tokens_per_s", "tok/s", "{:,.0f}"),
           ("train/mfu", "MFU", "{:.1%}"), ("train/peak_memory_mb", "train peak MB", "{:,.0f}"),
           ("eval/peak_memory_mb", "eval peak MB", "{:,.0f}"), ("model/weight_memory_mb", "weights MB", "{:,.0f}"),
           ("eval/likelihood_accuracy", "accuracy", "{:.3f}"), ("train/loss_first", "loss first", "{:.3f}"),
           ("train/loss_last", "loss last", "{:.3f}"))


def devices() -> str:
    if not torch.cuda.is_available():
        return "no CUDA device"
    names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return f"{len(names)} x {names[0]}" if len(set(names)) == 1 else ", ".join(names)


def outcomes(junit: Path) -> list[tuple[str, str, float, str]]:
    """(test, passed / failed / skipped, seconds, message) from pytest's JUnit XML."""
    rows = []
    for case in ET.parse(junit).getroot().iter("testcase"):
        state, message = "passed", ""
        for tag in ("failure", "error", "skipped"):
            found = case.find(tag)
            if found is not None:
                state = "skipped" if tag == "skipped" else "failed"
                message = (found.get("message") or "").splitlines()[0][:160] if found.get("message") else ""
        rows.append((case.get("name", "?"), state, float(case.get("time", 0.0)), message))
    return rows


def report(results: list[tuple[str, str, float, str]], figures: dict[str, dict], command: str, wall_s: float) -> str:
    head = ["test", "outcome", "wall s", *(h for _, h, _ in COLUMNS), "note"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, state, seconds, message in results:
        short = name.removeprefix("test_")
        m = next((v for k, v in figures.items() if short.startswith(k) or k.startswith(short)), {})
        cells = [fmt.format(m[key]) if isinstance(m.get(key), (int, float)) else "" for key, _, fmt in COLUMNS]
        lines.append("| " + " | ".join([short, state, f"{seconds:.0f}", *cells, message.replace("|", "/")]) + " |")
    import peft
    import transformers
    import trl

    return "\n\n".join([
        "# ftexp GPU check",
        f"Command: `{command}`; {wall_s:.0f} s in all.",
        f"Devices: {devices()}; torch {torch.__version__} (CUDA {torch.version.cuda}), transformers "
        f"{transformers.__version__}, TRL {trl.__version__}, peft {peft.__version__}.",
        "Each test fine-tunes SmolLM2-135M-Instruct (from its GGUF file) for 24 steps of 8 SST-2 sentences and "
        "scores 128 dev sentences; MFU is against the card's dense data-sheet peak for the precision used.",
        "\n".join(lines),
    ]) + "\n"


def run(out: Path, command: str) -> int:
    """Run the GPU tests, write the report to ``out``; 0 when none failed (skips included)."""
    if not TESTS.is_dir():
        print(f"ftexp: error: the GPU tests are not here ({TESTS}); run the check from a checkout of the "
              "repository.", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="ftexp_gpu_") as tmp:
        junit, figures_dir = Path(tmp) / "junit.xml", Path(tmp) / "figures"
        env = {**os.environ, "FTEXP_GPU_REPORT": str(figures_dir), "HF_HUB_OFFLINE": os.environ.get(
            "HF_HUB_OFFLINE", "1"), "WANDB_MODE": "disabled"}
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "pytest", str(TESTS), "-m", "gpu", "-p", "no:cacheprovider",
                               "-q", f"--junitxml={junit}"], cwd=ROOT, env=env)
        wall = time.perf_counter() - start
        if not junit.exists():
            print("ftexp: error: pytest wrote no results; see its output above.", file=sys.stderr)
            return 2
        figures = {p.stem: json.loads(p.read_text()) for p in figures_dir.glob("*.json")} if figures_dir.is_dir() else {}
        text = report(outcomes(junit), figures, command, wall)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(text, end="")
    print(f"written to {out}", file=sys.stderr)
    return 0 if proc.returncode in (0, 5) else 1  # 5: every test deselected or skipped
