# Shared by every finetune/*.sh launcher (sourced, not run): reads -m/-d/-o/-h/--deepspeed, passes every
# other argument on to finetune.py, and starts it through torchrun on this node's GPUs, or on the CPU
# (GPUS_PER_NODE processes over gloo) when none is visible.
#
# A launcher sets, at its top, the lines a user edits (-m/-d/-o override them):
#   MODEL          Hugging Face model id or local folder
#   DATA           training data; DATA_PLACEHOLDER (below) until the user edits it, which stops the launch
#   OUTPUT         default --output_dir
# and, before calling `launch "$@"`:
#   USAGE          its description, printed by -h
#   DEEPSPEED      default DeepSpeed config ("" for none; --deepspeed PATH replaces it)
#   MODE_ARGS      (array) its finetune.py defaults; the user's arguments come after them and win
#   ONE_PROCESS    1 for a one-GPU launcher: one process whatever the GPU count (GPUS_PER_NODE>1 is refused)
#   SCRIPT         the training script (default finetune.py; the dpo_*.sh launchers set dpo.py)
#
# torchrun variables, all overridable from the environment:
#   GPUS_PER_NODE  processes on this node (default: the visible GPU count, 1 without a GPU; always 1 for a
#                  one-GPU launcher)
#   SFT_GPU_COUNT, SFT_GPU_BF16  describe the GPUs instead of asking torch (tests; SFT_GPU_BF16=0: no native bf16)
#   SFT_DRY_RUN=1  print the torchrun command and exit without running it
#   NNODES         number of nodes (default 1)
#   NODE_RANK      this node's rank, 0..NNODES-1 (default 0)
#   MASTER_ADDR    address of node 0 (default localhost)
#   MASTER_PORT    a free port on node 0 (default 6001)
#   TORCH_ELASTIC_SHUTDOWN_TIMEOUT  seconds torchrun gives its workers after a SIGTERM/SIGINT before killing
#                  them (default here 300; torchrun's own is 30, too short to save a large model's checkpoint)

set -euo pipefail

export TORCH_ELASTIC_SHUTDOWN_TIMEOUT="${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-300}"

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# What every launcher's DATA= line holds as shipped: a launch with it stops and says what to edit.
DATA_PLACEHOLDER="path_to_data.json"

usage() {
    cat <<USAGE
$USAGE

usage: bash $0 [-m MODEL] [-d DATA] [-o OUTPUT] [--deepspeed CONFIG] [finetune.py arguments...]

Edit MODEL=, DATA= and OUTPUT= at the top of $0 and run it, or give them here:
  -m, --model PATH     Hugging Face model id or local folder (default: ${MODEL:-none})
  -d, --data PATH      training data (JSON list or JSONL: Qwen conversations, ChatML messages or alpaca)
                       (default: ${DATA:-none})
  -o, --output PATH    output folder (default: $OUTPUT)
      --deepspeed PATH DeepSpeed config (default: ${DEEPSPEED:-none})
  -h, --help           this help

Every other argument goes to finetune.py and overrides this launcher's defaults, e.g.
  --num_train_epochs 1 --learning_rate 1e-4 --model_max_length 1024   (python finetune.py --help lists them)

Environment (torchrun): GPUS_PER_NODE (default: visible GPUs, 1 on a CPU; one-GPU launchers: always 1), NNODES (1), NODE_RANK (0),
MASTER_ADDR (localhost), MASTER_PORT (6001); TORCH_ELASTIC_SHUTDOWN_TIMEOUT (300: seconds to save on SIGTERM).
Defaults: ${MODE_ARGS[*]}
USAGE
}

launch() {
    local passthrough=()
    while [[ $# -gt 0 ]]; do
        case "$1" in
            -m | --model) MODEL="${2:?$1 needs a value}"; shift 2 ;;
            -d | --data) DATA="${2:?$1 needs a value}"; shift 2 ;;
            -o | --output) OUTPUT="${2:?$1 needs a value}"; shift 2 ;;
            --deepspeed) DEEPSPEED="${2:?$1 needs a value}"; shift 2 ;;
            -h | --help) usage; exit 0 ;;
            *) passthrough+=("$1"); shift ;;
        esac
    done
    local model="${MODEL:-}" data="${DATA:-}"
    if [[ -z "$data" || "$data" == "$DATA_PLACEHOLDER" ]]; then
        echo "error: no training data: DATA= at the top of $0 still holds the placeholder $DATA_PLACEHOLDER;" \
            "edit it to your data file, or pass -d DATA (bash $0 --help)" >&2
        exit 2
    fi
    if [[ -z "$model" ]]; then
        echo "error: no model: set MODEL= at the top of $0, or pass -m MODEL (bash $0 --help)" >&2
        exit 2
    fi
    if [[ -n "$DEEPSPEED" && ! -f "$DEEPSPEED" ]]; then
        echo "error: DeepSpeed config $DEEPSPEED: no such file" >&2
        exit 2
    fi

    # sft/launch.py decides the process count and the device/precision flags from this node's GPUs: one process
    # per GPU (one on a CPU) unless GPUS_PER_NODE says otherwise, exactly one for a one-GPU launcher
    # (ONE_PROCESS=1); bf16 where the GPU computes it natively, fp16 on older GPUs, none on the CPU, unless the
    # user chose --bf16/--fp16.
    local plan
    local one_process=()
    [[ "${ONE_PROCESS:-0}" == 1 ]] && one_process=(--one_process)
    plan="$(cd "$REPO" && python -m sft.launch "${one_process[@]}" -- "${passthrough[@]}")"
    plan="${plan##*$'\n'}"  # its last line: a library may print before it
    local device_args=()
    read -r -a device_args <<<"$plan"
    GPUS_PER_NODE="${device_args[0]}"
    device_args=("${device_args[@]:1}")
    local deepspeed_args=()
    [[ -n "$DEEPSPEED" ]] && deepspeed_args=(--deepspeed "$DEEPSPEED")

    local command=(
        torchrun
        --nproc_per_node "$GPUS_PER_NODE"
        --nnodes "${NNODES:-1}"
        --node_rank "${NODE_RANK:-0}"
        --master_addr "${MASTER_ADDR:-localhost}"
        --master_port "${MASTER_PORT:-6001}"
        "$REPO/${SCRIPT:-finetune.py}"
        --model_name_or_path "$model"
        --data_path "$data"
        --output_dir "$OUTPUT"
        "${deepspeed_args[@]}"
        "${device_args[@]}"
        "${MODE_ARGS[@]}"
        "${passthrough[@]}"
    )
    echo "+ ${command[*]}" >&2
    [[ "${SFT_DRY_RUN:-0}" == 1 ]] && exit 0  # only show the command
    # torchrun, run by sft/torchrun.py: the launcher ends as the workers did (a user error's one `error:` line and
    # exit 2, 75 after a stop on request), where torchrun would report any of them as a crash.
    PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" exec python -m sft.torchrun "${command[@]:1}"
}

# Defaults every mode shares (Qwen's recipe: cosine schedule, AdamW with beta2 0.95, checkpoint every 1000 steps).
COMMON_ARGS=(
    --num_train_epochs 3
    --per_device_train_batch_size 2
    --gradient_accumulation_steps 8
    --lr_scheduler_type cosine
    --warmup_steps 0.01
    --weight_decay 0.1
    --adam_beta2 0.95
    --logging_steps 1
    --save_strategy steps
    --save_steps 1000
    --save_total_limit 10
    --model_max_length 2048
    --gradient_checkpointing true
    --report_to none
)
