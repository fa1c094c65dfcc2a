# SFT -> reward model -> PPO on the real Open Assistant data (OASST1, from the Hugging Face
# hub) with a small hub model and LoRA adapters, as explicit stage calls. Meant for a GPU.
#
#   python examples/02_oasst_hub_lora.py --out runs/oasst-smollm
#   python examples/02_oasst_hub_lora.py --model EleutherAI/pythia-160m --out runs/oasst-pythia
#   python examples/02_oasst_hub_lora.py --quick --out /tmp/oasst-quick      # a few steps per stage: checks the set-up
#
# One process: this script builds the data and evaluates in every process it runs in, so do
# not start it with a multi-process `accelerate launch`; for several GPUs launch the stages
# one by one (`accelerate launch --config_file configs/accelerate/multi_gpu.yaml -m rlhfkit.cli sft ...`).
#
# Meant for: one CUDA GPU with bf16 (A10G / L4 / A100, >= 16 GB; the 135M/160M models
# need far less), network access to the hub for the first run (then HF_HUB_OFFLINE=1 works
# from the cache). Written on a 2-core CPU machine without a GPU or network: there the hub
# path was not run; the whole script ran with --quick on local stand-ins (--model = the
# embedded micro model with its chat template and pad token removed, --data = the 100-tree
# OASST sample in ../shared/data/oasst, --max-length 256 --lora-r 4) in about 8 minutes, with
# the sizes this file then copied; they are now read from configs/oasst_smollm.yaml, whose SFT
# and reward sections add LoRA on all linear layers (and dropout 0.05 for SFT): not re-run since.
# tests/test_examples.py imports it and runs --help. The same run through `rlhfkit run`:
# configs/oasst_smollm.yaml and configs/oasst_pythia.yaml.
#
# What it does:
#   1. build_data: OpenAssistant/oasst1 (a hub id; any export file or saved dataset works
#      too) -> English SFT conversations (top-1 replies) and ranked preference pairs.
#   2. train_sft with lora=true on the hub model; the adapter is merged into OUT/sft/model.
#      A model without a chat template (Pythia) gets configs/templates/oasst_plain.jinja.
#      assistant_only_loss needs {% generation %} markers in the template; SmolLM2's ChatML
#      template has none, so it is turned off there -- the loss still covers only the last
#      reply, because rlhfkit gives TRL prompt/completion pairs (completion_only_loss).
#      The reward stage needs a pad token distinct from eos: SFT sets one (TRL's pad_token)
#      and saves it with the model.
#   3. train_reward with lora=true from the SFT model (the score head is trained in full).
#   4. train_ppo with lora=true: the reference policy is the same weights with the adapter
#      disabled (no second copy); the value model starts from the reward model.
#   5. a short held-out comparison, SFT vs PPO, under the reward model (OASST has no gold
#      judge: watch the KL and read the samples, a reward gain alone can be reward hacking).
#
# Each stage folder holds metrics.json when done; re-running the same command skips
# finished stages and resumes interrupted ones from their last checkpoint.
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PLAIN_TEMPLATE = REPO / "configs" / "templates" / "oasst_plain.jinja"

# Sizes of a full run (about an hour per stage or less for a 135M model on one A10G-class GPU):
# the stage sections of configs/oasst_smollm.yaml, the same run through `rlhfkit run`, read
# from the file (one place for them); the options below (model, LoRA rank, lengths, template,
# bf16) are set on top.
SHIPPED = REPO / "configs" / "oasst_smollm.yaml"


def shipped_sizes() -> dict[str, dict]:
    from rlhfkit.config import read_yaml

    config = read_yaml(SHIPPED)
    sizes = {stage: dict(config[stage]) for stage in ("sft", "reward", "ppo", "eval")}
    sizes["sft"].pop("pad_token")  # SmolLM2's; chosen below for the model given (distinct_pad)
    return sizes


FULL = shipped_sizes()
# --quick: a few steps of each stage, to check model, data, LoRA and the GPU before a long run.
QUICK = {
    "sft": {**FULL["sft"], "max_steps": 10, "logging_steps": 2, "save_steps": 1000},
    "reward": {**FULL["reward"], "max_steps": 10, "logging_steps": 2, "save_steps": 1000},
    "ppo": {**FULL["ppo"], "num_updates": 2, "rollout_batch_size": 32, "num_mini_batches": 2,
            "rollout_forward_batch_size": 16, "response_length": 32, "save_steps": 0, "sample_every": 1},
    "eval": {"max_prompts": 16, "samples_per_prompt": 1, "batch_size": 16},
}


def fmt(value) -> str:
    if value is None:
        return "none"
    if isinstance(value, float):
        return f"{value:.4f}" if math.isfinite(value) else str(value)
    return str(value)


def say(stage: str, **figures) -> None:
    print(stage + " " + " ".join(f"{k}={fmt(v)}" for k, v in figures.items()), flush=True)


PAD_CANDIDATES = ("<|padding|>", "<pad>", "[PAD]", "<|pad|>", "<|endoftext|>", "<unk>")


def distinct_pad(tokenizer) -> str | None:
    """A pad token of the vocabulary other than eos, when the tokenizer has none (None = keep its own)."""
    if tokenizer.pad_token is not None and tokenizer.pad_token_id != tokenizer.eos_token_id:
        return None
    vocab = tokenizer.get_vocab()
    for token in PAD_CANDIDATES:
        if token in vocab and token != tokenizer.eos_token:
            return token
    raise SystemExit(f"{tokenizer.name_or_path}: no pad token distinct from eos in the vocabulary; "
                     "add one (tokenizer.add_special_tokens) and save the model with resized embeddings")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="SFT -> reward -> PPO with LoRA on Open Assistant data and a hub model (for a GPU).")
    p.add_argument("--model", default="HuggingFaceTB/SmolLM2-135M-Instruct",
                   help="hub id or folder of the starting policy (default HuggingFaceTB/SmolLM2-135M-Instruct; "
                        "EleutherAI/pythia-160m also works)")
    p.add_argument("--data", nargs="+", default=["OpenAssistant/oasst1"], metavar="SOURCE",
                   help="hub id(s), export file(s) or saved dataset folder(s) (default OpenAssistant/oasst1)")
    p.add_argument("--lang", default="en", help="languages to keep, comma-separated (default en)")
    p.add_argument("--top-k", type=int, default=1, help="SFT on replies ranked among the K best (default 1)")
    p.add_argument("--chat-template", default=None, metavar="FILE.jinja",
                   help=f"chat template for a model without one (default {PLAIN_TEMPLATE.relative_to(REPO)})")
    p.add_argument("--max-length", type=int, default=1024,
                   help="longest SFT example / reward pair in tokens (default 1024; longer pairs are dropped)")
    p.add_argument("--lora-r", type=int, default=16, help="LoRA rank of all three stages (default 16)")
    p.add_argument("--quick", action="store_true", help="a few steps per stage, to check the set-up")
    p.add_argument("--out", default="runs/oasst-lora", help="run folder (default runs/oasst-lora)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # Heavy imports only here: `--help` and `import` work without torch/transformers loading.
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
    from trl.chat_template_utils import has_generation_markers

    from rlhfkit.artifacts import load_pretrained, load_tokenizer, resolve_model_path
    from rlhfkit.config import load_config
    from rlhfkit.data import DataBuildConfig, build_data, prompts_from_data_dir
    from rlhfkit.evaluate import EvalConfig, evaluate
    from rlhfkit.ppo import PPOStageConfig, train_ppo
    from rlhfkit.reward import RewardStageConfig, train_reward
    from rlhfkit.sft import SFTStageConfig, train_sft

    sizes = QUICK if args.quick else FULL
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    bf16 = bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    if not torch.cuda.is_available():
        print("warning: no CUDA GPU; this example is sized for one (try --quick on a CPU)", file=sys.stderr)
    lora = {"lora": True, "lora_r": args.lora_r, "lora_alpha": 2 * args.lora_r}

    # 1. data: the hub export -> SFT conversations and preference pairs, split by tree
    data = out / "data"
    if not (data / "manifest.json").is_file():
        lang = [x.strip() for x in args.lang.split(",") if x.strip()] or None
        build_data(DataBuildConfig(sources=args.data, out=str(data), lang=lang, val_fraction=0.05,
                                   top_k=args.top_k, seed=args.seed))
    stats = json.loads((data / "stats.json").read_text())["splits"]
    say("DATA", sft_train=stats["train"]["sft_examples"], pairs_train=stats["train"]["pairs"],
        sft_validation=stats["validation"]["sft_examples"], pairs_validation=stats["validation"]["pairs"])

    # 2. SFT with LoRA. The chat template decides assistant_only_loss (see the header).
    tokenizer = load_tokenizer(args.model)
    template_keys = {}
    if not tokenizer.chat_template:
        template_keys["chat_template_path"] = str(Path(args.chat_template or PLAIN_TEMPLATE))
        template = Path(template_keys["chat_template_path"]).read_text()
    else:
        template = tokenizer.chat_template
    template_keys["assistant_only_loss"] = has_generation_markers(template)
    pad = distinct_pad(tokenizer)
    if pad is not None:
        template_keys["pad_token"] = pad
    sft_cfg = load_config(SFTStageConfig, {
        **sizes["sft"], **lora, **template_keys, "bf16": bf16, "max_length": args.max_length,
        "model": args.model, "data": str(data), "output_dir": str(out / "sft"), "seed": args.seed,
    })
    sft = train_sft(sft_cfg).metrics
    say("SFT", eval_loss=sft["eval_loss"], train_loss=sft["train_loss"], steps=sft["steps"], time_s=sft["wall_time_s"])

    # 3. reward model with LoRA from the SFT model (gold agreement off: OASST has no gold judge)
    reward_cfg = load_config(RewardStageConfig, {
        **sizes["reward"], **lora, "bf16": bf16, "max_length": args.max_length, "gold_agreement": "off",
        "model": str(out / "sft"), "data": str(data), "output_dir": str(out / "reward"), "seed": args.seed,
    })
    rm = train_reward(reward_cfg).metrics
    say("REWARD", eval_accuracy=rm["eval_accuracy"], eval_loss=rm["eval_loss"], time_s=rm["wall_time_s"])

    # 4. PPO with LoRA against the reward model. Mixed precision for PPO comes from
    #    `accelerate launch` (configs/accelerate/*.yaml: mixed_precision: bf16), not from a key.
    ppo_cfg = load_config(PPOStageConfig, {
        **sizes["ppo"], **lora, "model": str(out / "sft"), "reward_model": str(out / "reward"), "data": str(data),
        "output_dir": str(out / "ppo"), "seed": args.seed,
    })
    ppo = train_ppo(ppo_cfg).metrics
    say("PPO_TRAIN", updates=ppo["updates"], score_last=ppo["objective/scores"], kl=ppo["objective/kl"],
        response_length=ppo["val/response_length"], time_s=ppo["wall_time_s"])

    # 5. held-out comparison under the reward model (on the CPU: rlhfkit.evaluate places no tensors)
    tok = load_tokenizer(resolve_model_path(out / "sft"))
    sft_policy = load_pretrained(AutoModelForCausalLM, resolve_model_path(out / "sft"))
    ppo_policy = load_pretrained(AutoModelForCausalLM, resolve_model_path(out / "ppo"))
    reward_model = load_pretrained(AutoModelForSequenceClassification, resolve_model_path(out / "reward"), num_labels=1)
    eval_cfg = EvalConfig(num_examples=3, greedy=False, seed=args.seed, **sizes["eval"])
    ev, examples = evaluate(sft_policy, ppo_policy, reward_model.eval(), tok, prompts_from_data_dir(data, "validation"),
                            eval_cfg, ppo_cfg.temperature, ppo_cfg.response_length)
    for ex in examples:
        print(f"  prompt: {ex['prompt'][:200]!r}\n    sft ({ex['sft_reward']:+.2f}): {ex['sft'][:300]!r}\n"
              f"    ppo ({ex['ppo_reward']:+.2f}): {ex['ppo'][:300]!r}")
    say("PPO", reward_before=ev["sft"]["reward"], reward_after=ev["ppo"]["reward"], gain=ev["reward_gain"],
        gain_se=ev["reward_gain_se"], win_rate_reward=ev["win_rate_reward"], kl=ev["ppo"]["kl"],
        length_before=ev["sft"]["length"], length_after=ev["ppo"]["length"], prompts=ev["prompts"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
