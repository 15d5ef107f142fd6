"""bench/gpu_suite.py's CPU smoke run: every check and profile cell lands in one report, GPU-only ones skipped
with their reason, and split runs merge into the same files."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
REPORT_JSON, REPORT_MD = "gpu_suite.json", "gpu_suite.md"
# Every check the suite has: each must be in the report, run or skipped with its reason.
CHECKS = ("train-lora", "train-qlora-4bit", "train-qlora-8bit", "train-full", "packing-sdpa", "packing-flash-varlen",
          "resume-sigterm", "merge-reload", "chat-stream")  # fmt: skip
# What users run, each through its own process: every launcher (with one process) and mode.
LAUNCHER_CHECKS = {
    "launch-full-zero3": ("finetune_ds.sh", ""),
    "launch-lora-zero2": ("finetune_lora_ds.sh", ""),
    "launch-lora-zero3": ("finetune_lora_ds.sh", "zero3.json"),
    "launch-qlora-single": ("finetune_qlora_single_gpu.sh", ""),
    "launch-qlora-zero2": ("finetune_qlora_ds.sh", ""),
    "launch-qlora-zero3": ("finetune_qlora_ds.sh", "zero3.json"),
    "launch-fsdp-full": ("finetune_fsdp.sh", ""),
    "launch-fsdp-lora": ("finetune_fsdp.sh", "--use_lora"),
    "launch-lora-single": ("finetune_lora_single_gpu.sh", ""),
    "launch-dpo-lora-single": ("dpo_lora_single_gpu.sh", ""),
    "launch-dpo-qlora-single": ("dpo_qlora_single_gpu.sh", ""),
    "launch-dpo-lora-zero3": ("dpo_lora_ds.sh", "zero3.json"),
    "launch-dpo-full-zero2": ("dpo_ds.sh", ""),
    "launch-dpo-full-zero3": ("dpo_ds.sh", "zero3.json"),
    "launch-dpo-fsdp-full": ("dpo_fsdp.sh", ""),
}
USER_CHECKS = ("finetune-packing-sdpa", "finetune-packing-flash", "fp16-overflow", "liger-kernel", "outputs-merge",
               "outputs-gptq", "outputs-chat")  # fmt: skip
ALL_CHECKS = (*CHECKS, *LAUNCHER_CHECKS, *USER_CHECKS)
GPU_ONLY_CHECKS = ("train-qlora-4bit", "train-qlora-8bit", "packing-flash-varlen", "launch-qlora-single",
                   "launch-fsdp-full", "launch-full-zero3", "fp16-overflow", "finetune-packing-flash",
                   "launch-dpo-full-zero3", "launch-dpo-fsdp-full")  # fmt: skip


def test_the_check_list_names_every_launcher_and_mode():
    # Read from the suite's own table, in a process of its own (tests do not import bench).
    code = "import json; from bench import gpu_suite_launch as g; print(json.dumps(g.LAUNCHERS))"
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    launchers = json.loads(done.stdout.strip().splitlines()[-1])
    for name, (script, marker) in LAUNCHER_CHECKS.items():
        assert launchers[name][0] == script and marker in " ".join(launchers[name][1]), name
    assert {script for script, _ in LAUNCHER_CHECKS.values()} == {
        path.name for path in (REPO / "finetune").glob("*.sh") if path.name != "common.sh"
    }


def main(argv: list[str]) -> None:
    """`python -m bench.gpu_suite` with these arguments, in a process of its own (tests do not import bench)."""
    done = subprocess.run([sys.executable, "-m", "bench.gpu_suite", *argv], cwd=REPO, capture_output=True, text=True,
                          timeout=1800)  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the smoke run's expectations are those of a CPU")
def test_smoke_run_reports_every_check_and_cell_and_merges_split_runs(tmp_path):
    out, work = tmp_path / "report", tmp_path / "work"
    # resume-sigterm starts two finetune.py processes: tests/test_training.py covers it; here it must still be
    # listed, as not selected.
    cpu_checks = ["train-lora", "train-full", "packing-sdpa", "merge-reload", "chat-stream", "launch-lora-single",
                  "launch-dpo-lora-single", "finetune-packing-sdpa", "outputs-merge", "outputs-chat"]  # fmt: skip
    main(["--phase", "check", "--smoke", "--out", str(out), "--work_dir", str(work),
          "--checks", *cpu_checks, *GPU_ONLY_CHECKS])  # fmt: skip
    main(["--phase", "profile", "--smoke", "--out", str(out), "--work_dir", str(work), "--seq_lengths", "32"])

    report = json.loads((out / REPORT_JSON).read_text())
    assert [run["phase"] for run in report["runs"]] == ["check --smoke", "profile --smoke"]
    checks = report["checks"]
    assert set(checks) == set(ALL_CHECKS)  # none silently missing
    for name in cpu_checks:
        assert checks[name]["status"] == "pass", (name, checks[name])
    for name in GPU_ONLY_CHECKS:
        assert checks[name]["status"] == "skip" and "CUDA" in checks[name]["reason"], (name, checks[name])
    for name in ("launch-lora-zero2", "liger-kernel", "outputs-gptq"):  # listed, not selected
        assert checks[name]["status"] == "skip" and "not selected" in checks[name]["reason"], (name, checks[name])
    assert checks["outputs-chat"]["figures"]["replies"], checks["outputs-chat"]
    assert checks["resume-sigterm"]["status"] == "skip" and "not selected" in checks["resume-sigterm"]["reason"]
    assert (
        checks["merge-reload"]["figures"]["merge_logit_diff"]
        <= checks["merge-reload"]["figures"]["adapter_logit_effect"]
    )

    cells = report["profile"]["cells"]
    recipes = {"ours": "fused", "ours-plain-loss": "plain", "official": "plain", "official-sdpa": "plain"}
    assert set(cells) == {f"{mode}/{recipe}/32" for mode in ("lora", "qlora", "full") for recipe in recipes}
    for mode in ("lora", "full"):
        for recipe, loss in recipes.items():
            cell = cells[f"{mode}/{recipe}/32"]
            assert cell["status"] == "ok", cell
            assert cell["loss"] == loss  # both losses measured: ours against the official one's on the same rows
            assert cell["s_per_it"] > 0 and cell["tokens_per_s"] > 0 and cell["mfu"] is None
            # Like with like: at least 4 timed steps, each step's and micro-batch's seconds kept, the median shown.
            steps = cell["step_seconds"]
            assert len(steps) >= 4 and cell["s_per_it"] == statistics.median(steps)
            assert [len(micro) for micro in cell["micro_batch_seconds"]] == [2] * len(steps)  # accumulation 2
            assert len(cell["step_losses"]) == len(steps) and all(loss > 0 for loss in cell["step_losses"])
            assert cell["warmup_seconds"] > 0 and cell["shapes"] and cell["attention_kernels"]
            # Pads are processed but neither counted as real tokens nor in MFU; apart, as their share.
            assert cell["processed_tokens"] == cell["real_tokens"] + cell["pad_tokens"]
            assert cell["pad_fraction"] == pytest.approx(cell["pad_tokens"] / cell["processed_tokens"])
        for recipe, attention in (("ours", "sdpa"), ("official", "eager"), ("official-sdpa", "sdpa")):
            assert cells[f"{mode}/{recipe}/32"]["attention"] == attention
        # sdpa's own choice of kernel is recorded: on a CPU its flash kernel, none for eager attention
        assert any("scaled_dot_product" in name for name in cells[f"{mode}/ours/32"]["attention_kernels"])
        assert cells[f"{mode}/official/32"]["attention_kernels"][0].startswith("none")
        assert cells[f"{mode}/official/32"]["shapes"] == [[1, 32]]  # every row padded to the length
        assert cells[f"{mode}/ours/32"]["pad_tokens"] == 0  # packed rows of batch 1, no bucketing on a CPU
    for recipe in recipes:
        assert cells[f"qlora/{recipe}/32"]["status"] == "skip" and "CUDA" in cells[f"qlora/{recipe}/32"]["reason"]
    settings = report["profile"]["settings"]
    assert "MFU not computed" in settings["peak"] and "real (non-pad) tokens" in settings["MFU"]
    assert "cudnn" in settings and "cudnn" in report["runs"][-1]["versions"]

    markdown = (out / REPORT_MD).read_text()
    for name in ALL_CHECKS:
        assert f"| {name} | **{checks[name]['status']}** |" in markdown
    assert "| Model Size | Method | Recipe | Sequence Length 32 |" in markdown
    assert "| tiny | LoRA | ours-plain-loss / official-sdpa tok/s |" in markdown
    assert "| tiny | Q-LoRA | ours | skip: CUDA bitsandbytes kernels" in markdown

    # Reports of separate calls (separate machines) merge into one.
    merged = tmp_path / "merged"
    main(["--phase", "report", "--out", str(merged), "--merge", str(out / REPORT_JSON)])
    assert json.loads((merged / REPORT_JSON).read_text()) == report

    # A later call that did not run a check (not selected, no time left) keeps the earlier result; a later result
    # that was measured replaces it.
    later = json.loads(json.dumps(report))
    later["runs"] = [{**run, "started": "later"} for run in report["runs"]]
    later["checks"]["train-lora"] = {
        "status": "skip",
        "reason": "not selected (--checks)",
        "figures": {},
        "device": "cpu",
    }
    later["checks"]["train-full"] = {"status": "fail", "reason": "a later failure", "figures": {}, "device": "cpu"}
    (tmp_path / "later.json").write_text(json.dumps(later))
    combined = tmp_path / "combined"
    main(["--phase", "report", "--out", str(combined), "--merge", str(out / REPORT_JSON), str(tmp_path / "later.json")])
    checks = json.loads((combined / REPORT_JSON).read_text())["checks"]
    assert checks["train-lora"]["status"] == "pass" and checks["train-full"]["reason"] == "a later failure"
