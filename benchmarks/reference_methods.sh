#!/usr/bin/env bash
# Every method measured on one reference model, the figures docs/methods.md and docs/evaluation.md
# report: HiPrune and the baselines on `shapes` (n = 500, swept), HalfV against RandomPrune at the
# same LLM FLOPs, `vlmopt analyze stages`, HERMES and the stream baselines at 32% of the visual
# tokens on `shapes-video` and `needle` (n = 300), APB-V with 4 hosts on `needle` (n = 300; under
# torchrun on 4 processes, n = 100). Two lanes run side by side, one thread each (2 cores).
#
#   bash benchmarks/reference_methods.sh tiny-qwen3vl
#
# RANDOM_MATCH: RandomPrune's keep ratio at HalfV's LLM FLOPs (read off a small eval first);
# FRAMES_MATCH: the frame-sampling ratio whose cache holds as many entries as HERMES's (a model that
# writes timestamps between frames caches more than its visual tokens per frame); STAGES_N: the
# analysis's samples; TORCHRUN_N: the torchrun run's samples (4 processes share the 2 cores);
# N_IMAGE / N_VIDEO: the sample counts (a smoke run: N_IMAGE=8 N_VIDEO=4 STAGES_N=4 TORCHRUN_N=4).
# HERMES runs twice: with the paper's pseudo-queries (English the reference vocabulary reads as unknown
# tokens) and with OWN_WORDS, the same two prompts said in the reference models' words.
set -euo pipefail
model=${1:?usage: bash benchmarks/reference_methods.sh MODEL}
random_match=${RANDOM_MATCH:-0.29}
frames_match=${FRAMES_MATCH:-0.21}
stages_n=${STAGES_N:-100}
torchrun_n=${TORCHRUN_N:-100}
n_image=${N_IMAGE:-500}
n_video=${N_VIDEO:-300}
own_words=${OWN_WORDS:-"local_query=what objects are there now? what colour? what shape? where?,global_query=what objects appear? what was there?"}
out=${OUT:-benchmarks/results/$(basename "$model")}
export OMP_NUM_THREADS=1
log() { echo "[$(date +%H:%M:%S)] $*"; }

lane_streams() {
    log "hermes needle"
    vlmopt eval --model "$model" --task needle --n "$n_video" --passes hermes --passes streaming_llm --passes snapkv \
        --passes frame_subsample:keep_ratio=0.32 --passes "frame_subsample:keep_ratio=$frames_match" \
        --stream-budget 0.32 --json "$out-hermes-needle.json"
    log "hermes shapes-video"
    vlmopt eval --model "$model" --task shapes-video --n "$n_video" --passes hermes --passes streaming_llm --passes snapkv \
        --passes frame_subsample:keep_ratio=0.32 --passes "frame_subsample:keep_ratio=$frames_match" \
        --stream-budget 0.32 --json "$out-hermes-shapes-video.json"
    for task in needle shapes-video; do
        log "hermes in the model's words, $task"
        vlmopt eval --model "$model" --task "$task" --n "$n_video" --passes "hermes:$own_words" --stream-budget 0.32 \
            --json "$out-hermes-own-words-$task.json"
    done
    log "lane done"
}

lane_prefill() {
    log "shapes sweep"
    vlmopt eval --model "$model" --task shapes --n "$n_image" --passes hiprune:keep_ratio=1 --passes random_prune:keep_ratio=1 \
        --passes pool_prune:keep_ratio=1 --sweep keep_ratio=0.5,1/3,1/9 --json "$out-shapes.json"
    log "halfv"
    vlmopt eval --model "$model" --task shapes --n "$n_image" --passes halfv --passes "random_prune:keep_ratio=$random_match" \
        --json "$out-halfv.json"
    log "apbv"
    vlmopt eval --model "$model" --task needle --n "$n_video" --passes apbv:hosts=4 --json "$out-apbv-needle.json"
    log "apbv torchrun"
    torchrun --nproc-per-node 4 -m vlmopt eval --model "$model" --task needle --samples "$torchrun_n" \
        --passes apbv:hosts=4 --json "$out-apbv-needle-torchrun.json"
    log "stages"
    vlmopt analyze stages --model "$model" --n "$stages_n" --plot "$out-stages.png" --json "$out-stages.json"
    log "lane done"
}

lane_streams > "$out-streams.log" 2>&1 &
streams=$!
lane_prefill > "$out-prefill.log" 2>&1 &
prefill=$!
wait $streams $prefill
python benchmarks/eval_plot.py "$out-shapes.json" "$out-halfv.json" --out "$out-shapes.png"
