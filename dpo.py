"""Preference tuning of a chat LLM after SFT (DPO, IPO, hinge, robust DPO, SimPO, ORPO): full, LoRA or Q-LoRA.

    python dpo.py --model_name_or_path SFT_OUTPUT --data_path pairs.jsonl --output_dir out --use_lora

The same arguments as finetune.py (sft/args.py) plus the preference ones (sft/preference.py), from flags or one
JSON/YAML file followed by overriding flags. --model_name_or_path may be a model, or an SFT LoRA output (adapter
folder): then the reference model is base + that adapter and the policy trains a copy of it, so the first step's
loss is ln 2 and its rewards 0. Outputs are what finetune.py writes: merge_lora.py, cli_demo.py and web_demo.py
take them the same way. Rerunning the same command resumes; `train()` raises a UserError for what the user can fix.
"""

from __future__ import annotations

import sft.quiet

if __name__ == "__main__":
    sft.quiet.setup()  # first: it silences known chatter of the libraries imported below

# isort: split
import logging
import os
import sys
from dataclasses import asdict
from pathlib import Path

from transformers.integrations import is_deepspeed_zero3_enabled

from sft.args import (
    DataArguments,
    LoraArguments,
    ModelArguments,
    TrainingArguments,
    check_arguments,
    check_parallelism,
    check_required,
    parse_dataclasses,
    training_mode,
)
from sft.data import cache_folder, load_train_eval, pad_multiple
from sft.data.files import file_fingerprint
from sft.data.pairs import PairCollator, pair_sample, tokenize_pairs
from sft.disk import check_room, checkpoint_bytes
from sft.distributed import local_main_first
from sft.errors import ConfigurationError, run_main
from sft.model_setup import build_model, data_path_record, tokenizer_or_error
from sft.modeling import load_model, training_dtype
from sft.outputs import save_final
from sft.packing import LeakProbe
from sft.packing_pairs import keep_samples_apart, pack_pairs, pair_packing_collator
from sft.preference import (
    REFERENCE_ADAPTER,
    AdapterReference,
    ModelReference,
    PrecomputedReference,
    PreferenceArguments,
    PreferenceTrainer,
    StartingModelReference,
    check_preference_arguments,
    disable_dropout,
    numbered_pairs,
    reference_key,
    reference_precomputed,
    sft_adapter_of,
)
from sft.preference_loss import needs_reference
from sft.resume import decide_resume, run_identity
from sft.training import train_until_done

logger = logging.getLogger("dpo")

ARGUMENT_TYPES = (ModelArguments, DataArguments, TrainingArguments, LoraArguments, PreferenceArguments)


def parse_arguments(argv: list[str]) -> tuple:
    """dpo.py's five argument objects from its command line (without the program name)."""
    return parse_dataclasses(ARGUMENT_TYPES, argv)


def train(
    model_args: ModelArguments,
    data_args: DataArguments,
    training_args: TrainingArguments,
    lora_args: LoraArguments,
    preference_args: PreferenceArguments,
) -> PreferenceTrainer | None:
    """One run: checks, pairs, model and reference, Trainer, training, final save. Returns the Trainer after a
    finished run, None when --output_dir held this run finished already."""
    sft.quiet.setup_logging(logging.INFO if training_args.should_log else logging.WARNING)

    # 1. Every mistake in the arguments, the data and the output folder, before the model loads.
    check_required(model_args, data_args)
    check_preference_arguments(preference_args)
    base, sft_adapter = sft_adapter_of(model_args.model_name_or_path, lora_args.lora_weight_path)
    if os.path.isdir(base):
        base = os.path.abspath(base)
    model_args.model_name_or_path = base
    lora_args.lora_weight_path = sft_adapter if training_args.use_lora else None
    check_arguments(training_args, lora_args)
    check_parallelism(training_args, lora_args)
    mode = training_mode(training_args, lora_args)
    reference_used = needs_reference(preference_args.loss_type)
    sharding = "FSDP" if training_args.fsdp else "ZeRO-3" if is_deepspeed_zero3_enabled() else None
    preference_args.precompute_reference = reference_precomputed(preference_args, mode, sharding)
    training_args.remove_unused_columns = False  # the pair columns are ours, not the model's inputs
    prepared = cache_folder(data_args.preprocessing_cache_dir)
    with local_main_first(training_args.local_process_index, shared_dir=prepared):
        train_pairs, eval_pairs = load_train_eval(data_args, training_args.seed, parse=pair_sample)
    logger.info("Mode: %s (%s loss); %d training pairs from %s", mode, preference_args.loss_type, len(train_pairs),
                data_args.data_path)  # fmt: skip

    # 2. The tokenizer (an SFT output's own, with its chat template) and what --output_dir holds.
    tokenizer_source = sft_adapter if sft_adapter and Path(sft_adapter, "tokenizer_config.json").is_file() else base
    tokenizer = tokenizer_or_error(
        ModelArguments(**{**asdict(model_args), "model_name_or_path": tokenizer_source}),
        training_args.model_max_length,
    )
    identity = run_identity(mode, base, tokenizer.chat_template, data_args, training_args, lora_args)
    identity["preference"] = asdict(preference_args)
    identity["sft_adapter"] = sft_adapter_identity(sft_adapter)
    plan = decide_resume(training_args, identity)
    if plan.finished:
        return None

    # 3. Tokenised pairs: the template's refusals and the prompt-prefix check, still before the model loads.
    options = dict(
        tokenizer=tokenizer,
        max_length=training_args.model_max_length,
        num_proc=data_args.preprocessing_num_workers,
        cache_dir=data_args.preprocessing_cache_dir,
        fold_system=data_args.fold_system_prompt,
    )
    with local_main_first(training_args.local_process_index, shared_dir=prepared):
        train_dataset, _ = tokenize_pairs(train_pairs, description="train", **options)
        eval_dataset = tokenize_pairs(eval_pairs, description="eval", **options)[0] if eval_pairs else None
        del train_pairs, eval_pairs
        scored, key = [], None  # the pairs a precomputed reference scores (unpacked, numbered), and their key
        if preference_args.precompute_reference:
            scored = [dataset for dataset in (train_dataset, eval_dataset) if dataset is not None]
            key = reference_key({
                "identity": identity,
                "dtype": str(training_dtype(training_args.bf16, training_args.fp16)),
                "data": [dataset._fingerprint for dataset in scored],
            })  # fmt: skip
            scored = numbered_pairs(scored)
            train_dataset, eval_dataset = scored[0], scored[1] if eval_dataset is not None else None
        if data_args.packing:  # rows of whole pairs (with their numbers), written next to the tokenised pairs
            train_dataset = pack_pairs(train_dataset, training_args.model_max_length)
            if eval_dataset is not None:
                eval_dataset = pack_pairs(eval_dataset, training_args.model_max_length)

    # 4. The policy, and the reference it is compared with (chosen once, logged once).
    model = build_model(model_args, training_args, lora_args, tokenizer)
    if sft_adapter and not training_args.use_lora:
        model = merged_adapter(model, sft_adapter)
    check_room(
        training_args.output_dir,
        checkpoint_bytes(model, full=mode == "full", with_optimizer=training_args.save_strategy != "no"),
    )
    reference = None
    if reference_used:
        reference = make_reference(model, model_args, training_args, sft_adapter, preference_args.precompute_reference)
        when = "; its log-probs computed once as training starts" if preference_args.precompute_reference else ""
        logger.info("Reference model: %s%s", reference.description, when)
    else:
        logger.info("Reference model: none (--loss_type %s is reference-free)", preference_args.loss_type)
    # After the reference is made: a second adapter brings dropouts of its own.
    dropouts = disable_dropout(model)
    if dropouts:
        logger.info("Dropout off in %d modules: policy and reference score the same tokens alike", dropouts)

    # 5. Batches: padded pairs, or packed rows of whole pairs that keep their sequences apart.
    pair_collator = PairCollator(tokenizer.pad_token_id)
    collator, callbacks = pair_collator, []
    if data_args.packing:
        multiple = pad_multiple(training_args.pad_to_multiple_of, training_args.device.type)
        collator = pair_packing_collator(model, tokenizer.pad_token_id, training_args.use_cache, multiple,
                                         training_args.model_max_length, training_args.device.type)  # fmt: skip
        if isinstance(reference, ModelReference):  # the frozen copy scores the same packed rows
            keep_samples_apart(reference.model, training_args.device.type)
        if not is_deepspeed_zero3_enabled():  # ZeRO-3 weights are only whole inside DeepSpeed's own forward
            callbacks.append(LeakProbe(collator.layout))
    if preference_args.precompute_reference:
        # One pass over the unpacked pairs as training starts (then DeepSpeed and FSDP have set the model up).
        batch_size = training_args.per_device_eval_batch_size
        reference = PrecomputedReference(reference, scored, pair_collator, batch_size, prepared / f"reference-{key}.pt",
                                         key)  # fmt: skip

    # 6. Training, stoppable by a signal and guarded against NaN.
    trainer = PreferenceTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        data_collator=collator,
        callbacks=callbacks,
        processing_class=tokenizer,
        max_nonfinite_steps=training_args.max_nonfinite_steps,
        run_mode=mode,
        identity=identity,
        loraplus_lr_ratio=lora_args.loraplus_lr_ratio,
        preference=preference_args,
        reference=reference,
    )
    if training_args.fsdp and not trainer.is_fsdp_enabled:
        raise ConfigurationError("--fsdp was given but accelerate did not enable FSDP (it needs GPUs and torchrun)")
    if plan.checkpoint:
        logger.info("Resuming from %s (pass --start_over to ignore it)", plan.checkpoint)
    result = train_until_done(trainer, plan.checkpoint, training_args.output_dir)

    # 7. The final model or adapter (applying to the base model), with what made it.
    unwrapped = trainer.accelerator.unwrap_model(trainer.model)
    if REFERENCE_ADAPTER in getattr(unwrapped, "peft_config", {}):
        unwrapped.delete_adapter(REFERENCE_ADAPTER)
    run_info = {
        "mode": mode,
        "stage": "preference",
        "base_model": base,
        "sft_adapter": sft_adapter,
        "data_path": data_path_record(data_args.data_path),
        "identity": identity,
        "global_step": trainer.state.global_step,
        "epoch": trainer.state.epoch,
        "train_loss": trainer.run_train_loss(),
        **trainer.throughput(result.metrics["train_runtime"]),
        "arguments": {**asdict(model_args), **asdict(data_args), **asdict(lora_args), **asdict(preference_args)},
    }
    save_final(trainer, tokenizer, training_args.output_dir, run_info)
    return trainer


def sft_adapter_identity(adapter: str | None) -> dict | None:
    """The SFT adapter a run starts from, by content (its weights, or its config where they are elsewhere)."""
    if not adapter:
        return None
    weights = Path(adapter, "adapter_model.safetensors")
    fingerprint = file_fingerprint(weights if weights.is_file() else Path(adapter, "adapter_config.json"))
    return {key: value for key, value in fingerprint.items() if key != "path"}


def merged_adapter(model, adapter: str):
    """`model` with the LoRA adapter in `adapter` merged into its weights (full fine-tuning from an SFT adapter)."""
    from peft import PeftModel

    logger.info("Merging the SFT adapter %s into the base weights (full fine-tuning continues from there)", adapter)
    return PeftModel.from_pretrained(model, adapter).merge_and_unload()


def make_reference(
    model, model_args: ModelArguments, training_args: TrainingArguments, sft_adapter: str | None, precompute: bool
):
    """The reference: the policy's adapter switched off or to a frozen copy of the SFT adapter (LoRA); in full
    fine-tuning a frozen copy of the starting model in the compute dtype, or, when its log-probs are precomputed,
    the policy itself before training."""
    if training_args.use_lora:
        if sft_adapter:
            model.load_adapter(sft_adapter, adapter_name=REFERENCE_ADAPTER, is_trainable=False)
            return AdapterReference(model, REFERENCE_ADAPTER)
        return AdapterReference(model, None)
    if precompute:
        return StartingModelReference()
    dtype = training_dtype(training_args.bf16, training_args.fp16)
    copy = load_model(model_args.model_name_or_path, dtype, None, model_args.trust_remote_code,
                      model_args.attn_implementation)  # fmt: skip
    if sft_adapter:
        copy = merged_adapter(copy, sft_adapter)
    copy.to(training_args.device)
    what = "base + the SFT adapter, merged" if sft_adapter else "the starting model"
    return ModelReference(copy, f"a frozen copy of {what}, in {dtype}")


def main(argv: list[str] | None = None) -> None:
    run_main(lambda: train(*parse_arguments(sys.argv[1:] if argv is None else argv)))


if __name__ == "__main__":
    main()
