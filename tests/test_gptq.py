"""GPTQ is optional: requirements.txt installs no GPTQ package (GPT-QModel needs a compiler), LoRA trains without
them, and the GPTQ paths say what to install."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

from sft.chat import load_for_chat
from sft.gptq import GPTQ_PACKAGES, GptqMissingError

REPO = Path(__file__).resolve().parents[1]
INSTALL_HINT = "pip install -r requirements-gptq.txt"
# Run a script as if the GPTQ packages were not installed: Python treats a None entry of sys.modules as a module
# that cannot be imported (ImportError), and importlib.util.find_spec, which the libraries ask, as absent.
WITHOUT_GPTQ = "import runpy, sys; sys.modules.update(dict.fromkeys({packages}, None)); script = sys.argv[1]; "
WITHOUT_GPTQ += "sys.argv = sys.argv[1:]; runpy.run_path(script, run_name='__main__')"
WITHOUT_GPTQ = WITHOUT_GPTQ.format(packages=GPTQ_PACKAGES)


def requirement_names(path: Path) -> set[str]:
    names = set()
    for line in path.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line and not line.startswith("-"):
            names.add(line.split(";")[0].split("[")[0].split("<")[0].split(">")[0].split("=")[0].strip().lower())
    return names


def test_gptq_packages_have_their_own_requirements_file_installed_by_the_demo_and_the_tests():
    assert requirement_names(REPO / "requirements.txt").isdisjoint(GPTQ_PACKAGES)
    assert set(GPTQ_PACKAGES) <= requirement_names(REPO / "requirements-gptq.txt")
    for script in ("scripts/demo.sh", "scripts/test.sh"):
        assert "-r requirements-gptq.txt" in (REPO / script).read_text(), script


def test_only_sft_gptq_names_the_gptq_packages_in_training_code():
    # finetune.py, merge_lora.py and sft/ import nothing from them (peft and transformers look for them lazily).
    for path in [REPO / "finetune.py", REPO / "merge_lora.py", *sorted((REPO / "sft").rglob("*.py"))]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            else:
                continue
            assert not any(name.split(".")[0] in GPTQ_PACKAGES for name in names), (path, names)


def test_lora_trains_without_the_gptq_packages(tiny_model, tmp_path, common_args):
    output = tmp_path / "lora"
    argv = [*common_args(tiny_model, output, steps=2), "--use_lora"]
    done = subprocess.run(
        [sys.executable, "-c", WITHOUT_GPTQ, "finetune.py", *argv], cwd=REPO, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-4000:]
    assert json.loads((output / "trainer_state.json").read_text())["global_step"] == 2
    assert (output / "adapter_model.safetensors").is_file()


def test_run_gptq_without_the_packages_says_what_to_install(tiny_model, tmp_path, user_error):
    line = user_error(
        "-c", WITHOUT_GPTQ, str(REPO / "run_gptq.py"), "--model_name_or_path", tiny_model,
        "--data_path", str(REPO / "data/example_chatml.jsonl"), "--out_path", str(tmp_path / "out"),
    )  # fmt: skip
    assert line == (
        "error: run_gptq.py needs the GPTQ packages, not installed here (gptqmodel, optimum): "
        f"{INSTALL_HINT} (GPT-QModel builds from source: it needs a C/C++ compiler)"
    )
    assert not (tmp_path / "out").exists()


def test_loading_a_gptq_model_without_the_packages_says_what_to_install(tiny_model, tmp_path, monkeypatch):
    folder = tmp_path / "gptq-model"
    folder.mkdir()
    config = json.loads((Path(tiny_model) / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (folder / "config.json").write_text(json.dumps(config))
    monkeypatch.setitem(sys.modules, "optimum", None)  # as if optimum were not installed
    with pytest.raises(GptqMissingError) as missing:
        load_for_chat(str(folder))
    assert str(missing.value).startswith(f"{folder} is a GPTQ model: loading it needs the GPTQ packages")
    assert "(optimum)" in str(missing.value) and INSTALL_HINT in str(missing.value)
