"""bench/gpu_profile.py's CPU smoke run: every mode builds, trains a step and lands in the profile table."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_gpu_profile_smoke_run_prints_the_qwen_layout(tmp_path):
    command = ["-m", "bench.gpu_profile", "--tiny", "--device", "cpu", "--seq_lengths", "16", "--steps", "4"]
    command += ["--gradient_accumulation_steps", "1", "--lora_r", "4", "--work_dir", str(tmp_path)]
    done = subprocess.run([sys.executable, *command], cwd=REPO, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert "| Model Size | Method | Sequence Length 16 |" in lines
    assert any(", fused loss, " in line for line in lines)  # finetune.py's loss unless --plain_loss
    rows = [line for line in lines if line.startswith("| ") and "s/it" in line]
    assert [row.split("|")[2].strip() for row in rows] == ["LoRA", "Q-LoRA", "Full-parameter"]
    for row in rows:
        memory, speed = row.split("|")[3].strip().split(" / ")
        assert float(memory.rstrip("G")) > 0 and float(speed.removesuffix("s/it")) > 0
