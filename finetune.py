"""Supervised fine-tuning of a chat LLM: full-parameter, LoRA or Q-LoRA, with the Hugging Face Trainer.

    python finetune.py --model_name_or_path MODEL --data_path data.jsonl --output_dir out --use_lora

Also takes one JSON or YAML file holding the same arguments, optionally followed by flags that override it:
`python finetune.py config.yaml --learning_rate 1e-4`. Flags follow Qwen's finetune.py (sft/args.py), so its
users' commands keep working. Rerunning the same command resumes from the last checkpoint in --output_dir, or
says the run is finished; another run's folder is refused (sft/resume.py; --start_over moves the old run aside).

`train()` is the whole run as a function of the parsed arguments; it raises a UserError for what the user can fix,
which `main()` prints as one `error:` line.
"""

from __future__ import annotations

import sft.quiet

if __name__ == "__main__":
    sft.quiet.setup()  # first: it silences known chatter of the libraries imported below

# isort: split
import atexit
import logging
import os
import shutil
import sys
import tempfile
from dataclasses import asdict

from transformers.integrations import is_deepspeed_zero3_enabled

from sft.args import (
    DataArguments,
    LoraArguments,
    ModelArguments,
    TrainingArguments,
    check_arguments,
    check_parallelism,
    check_required,
    lora_init_moves_base_weights,
    parse_arguments,
    training_mode,
)
from sft.data import (
    cache_folder,
    load_train_eval,
    make_collator,
    pad_multiple,
    tokenize_conversations,
)
from sft.disk import check_room, checkpoint_bytes
from sft.distributed import local_main_first
from sft.errors import ConfigurationError, run_main
from sft.model_setup import build_model, data_path_record, tokenizer_or_error
from sft.outputs import save_final, save_initial_adapter
from sft.packing import LeakProbe, pack_dataset, packing_collator
from sft.qwen1 import native_lora_targets, resolve_model_path
from sft.resume import decide_resume, run_identity
from sft.training import FinetuneTrainer, train_until_done

logger = logging.getLogger("finetune")


def train(
    model_args: ModelArguments, data_args: DataArguments, training_args: TrainingArguments, lora_args: LoraArguments
) -> FinetuneTrainer | None:
    """One run: checks, data, model, Trainer, training, final save. Returns the Trainer after a finished run, None
    when --output_dir held this run finished already (nothing is trained or written then); raises a UserError for
    what the user can fix, `Preempted` when a signal stopped the run (checkpoint saved)."""
    sft.quiet.setup_logging(logging.INFO if training_args.should_log else logging.WARNING)

    # 1. Every mistake in the arguments, the data and the output folder is reported before the (slow) model load.
    check_required(model_args, data_args)
    check_arguments(training_args, lora_args)
    check_parallelism(training_args, lora_args)
    # Read into memory-mapped Arrow files once per node, or once in all where the nodes share the cache folder
    # (the other processes open the files), however long it takes: not bound by --ddp_timeout.
    prepared = cache_folder(data_args.preprocessing_cache_dir)
    with local_main_first(training_args.local_process_index, shared_dir=prepared):
        train_conversations, eval_conversations = load_train_eval(data_args, training_args.seed)
    mode = training_mode(training_args, lora_args)
    sources = " ".join(data_args.data_path)
    logger.info("Mode: %s; %d training conversations from %s", mode, len(train_conversations), sources)

    # 2. The base model's path, resolved once: later steps and the saved adapter use the resolved one.
    requested_model = model_args.model_name_or_path
    if os.path.isdir(requested_model):
        # Adapters record the base model's path: make it one that works from anywhere.
        model_args.model_name_or_path = os.path.abspath(requested_model)
    native = resolve_model_path(model_args.model_name_or_path)
    qwen1_source = None
    if native != model_args.model_name_or_path:
        # A Qwen-1 model trains as its native conversion, recorded as the base: the adapter loads without it.
        qwen1_source, model_args.model_name_or_path = model_args.model_name_or_path, native
        lora_args.lora_target_modules = native_lora_targets(lora_args.lora_target_modules)

    # 3. The tokenizer, and what --output_dir holds: this run to resume, extend or leave finished, or another
    # run (refused), all before the model loads.
    tokenizer = tokenizer_or_error(model_args, training_args.model_max_length, lora_args.train_special_tokens)

    identity = run_identity(
        mode,
        qwen1_source or model_args.model_name_or_path,
        tokenizer.chat_template,
        data_args,
        training_args,
        lora_args,
    )
    plan = decide_resume(training_args, identity)
    if plan.finished:
        return None
    checkpoint = plan.checkpoint

    # 4. Tokenised data: the chat template's refusals, still before the model loads.
    tokenize_options = dict(
        tokenizer=tokenizer,
        max_length=training_args.model_max_length,
        train_on=data_args.train_on,
        drop_long=data_args.drop_long_samples,
        num_proc=data_args.preprocessing_num_workers,
        cache_dir=data_args.preprocessing_cache_dir,
        fold_system=data_args.fold_system_prompt,
    )
    with local_main_first(training_args.local_process_index, shared_dir=prepared):
        train_dataset, _ = tokenize_conversations(train_conversations, description="train", **tokenize_options)
        eval_dataset = None
        if eval_conversations is not None:
            eval_dataset, _ = tokenize_conversations(eval_conversations, description="eval", **tokenize_options)
        # The read files' mappings are closed here, and with them the pages tokenising read.
        del train_conversations, eval_conversations
        if data_args.packing:  # rows of many samples, written next to the tokenised data
            train_dataset = pack_dataset(train_dataset, training_args.model_max_length)
            if eval_dataset is not None:
                eval_dataset = pack_dataset(eval_dataset, training_args.model_max_length)

    # 5. The model, with LoRA adapters unless a full fine-tune, and room on the disk for its checkpoints.
    model = build_model(model_args, training_args, lora_args, tokenizer)
    check_room(
        training_args.output_dir,
        checkpoint_bytes(model, full=mode == "full", with_optimizer=training_args.save_strategy != "no"),
    )
    initial_adapter = None
    if training_args.use_lora and lora_init_moves_base_weights(lora_args.init_lora_weights):
        # PiSSA/OLoRA moved part of each base weight into the adapter: the final adapter is saved as its difference
        # from this initial one, which applies to the unchanged base (what merge_lora.py and the demos load).
        initial_adapter = tempfile.mkdtemp(prefix="initial-adapter-")
        atexit.register(shutil.rmtree, initial_adapter, ignore_errors=True)  # also when the run stops early
        save_initial_adapter(model, initial_adapter, training_args.should_save)

    # 6. Batches: padded, or packed rows that each keep their samples apart.
    multiple = pad_multiple(training_args.pad_to_multiple_of, training_args.device.type)
    data_collator = make_collator(tokenizer, pad_to_multiple_of=multiple, max_length=training_args.model_max_length)
    callbacks = []
    if data_args.packing:
        data_collator = packing_collator(
            model,
            tokenizer.pad_token_id,
            training_args.use_cache,
            multiple,
            training_args.model_max_length,
            device_type=training_args.device.type,
        )
        if not is_deepspeed_zero3_enabled():  # ZeRO-3 weights are only whole inside DeepSpeed's own forward
            callbacks.append(LeakProbe(data_collator.layout))

    # 7. Training, stoppable by a signal and guarded against NaN.
    trainer = FinetuneTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        data_collator=data_collator,
        processing_class=tokenizer,
        max_nonfinite_steps=training_args.max_nonfinite_steps,
        run_mode=mode,
        callbacks=callbacks,
        identity=identity,
        loraplus_lr_ratio=lora_args.loraplus_lr_ratio,
    )
    if training_args.fsdp and not trainer.is_fsdp_enabled:
        raise ConfigurationError("--fsdp was given but accelerate did not enable FSDP (it needs GPUs and torchrun)")
    if checkpoint:
        logger.info("Resuming from %s (pass --start_over to ignore it)", checkpoint)
    result = train_until_done(trainer, checkpoint, training_args.output_dir)

    # 8. The final model or adapter, with what made it.
    run_info = {
        "mode": mode,
        "base_model": model_args.model_name_or_path,
        "data_path": data_path_record(data_args.data_path),
        "identity": identity,
        "global_step": trainer.state.global_step,
        "epoch": trainer.state.epoch,
        "train_loss": trainer.run_train_loss(),  # the whole run's, across resumes (result's is this session's)
        **trainer.throughput(result.metrics["train_runtime"]),  # trained tokens and tokens per second
        "arguments": {**asdict(model_args), **asdict(data_args), **asdict(lora_args)},
    }
    if qwen1_source:
        run_info["qwen1_source"] = qwen1_source
    save_final(trainer, tokenizer, training_args.output_dir, run_info, initial_adapter)
    return trainer


def main(argv: list[str] | None = None) -> None:
    run_main(lambda: train(*parse_arguments(sys.argv[1:] if argv is None else argv)))


if __name__ == "__main__":
    main()
