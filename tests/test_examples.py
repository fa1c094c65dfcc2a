"""The examples and the real-use configs.

- examples/01 and 03 run at their tiny size in a subprocess; their ``STAGE key=value``
  lines are parsed and checked (finite losses, accuracies and gold scores in [0, 1]);
- examples/02 (hub model + OASST, for a GPU) is only imported and asked for --help;
- every configs/*.yaml loads and validates without a download; every accelerate launch
  file parses with accelerate's own loader and prepares a launch;
- the stage functions take in-memory datasets, models, prompts and a reward function.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import random
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from rlhfkit.config import collect_errors, load_config, read_yaml
from rlhfkit.pipeline import RunConfig

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"
CONFIGS = REPO / "configs"
ACCELERATE = CONFIGS / "accelerate"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
LINE = re.compile(r"^([A-Z][A-Z_]*) ((?:[a-z_]+=\S+ ?)+)$")


def parse_figures(stdout: str) -> dict[str, dict[str, str]]:
    """``STAGE key=value ...`` lines -> {STAGE: {key: value}} (a later line of a stage wins)."""
    figures: dict[str, dict[str, str]] = {}
    for line in stdout.splitlines():
        m = LINE.match(line.strip())
        if m:
            figures[m.group(1)] = dict(pair.split("=", 1) for pair in m.group(2).split())
    return figures


def number(figures: dict, stage: str, key: str) -> float:
    assert stage in figures, f"no {stage} line; got {sorted(figures)}"
    assert key in figures[stage], f"{stage} line has no {key}: {figures[stage]}"
    return float(figures[stage][key])


def run_example(script: str, *args: str, timeout: int = 900, env: dict | None = None) -> str:
    proc = subprocess.run([sys.executable, str(EXAMPLES / script), *args], cwd=REPO, env=env or ENV,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{script} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def in_unit(value: float) -> bool:
    return 0.0 <= value <= 1.0


# ---------------------------------------------------------------------------------------
# examples/01 and 03 at their tiny size
# ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def example01_tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("example01") / "run"
    started = time.perf_counter()
    stdout = run_example("01_embedded_chain.py", "--size", "tiny", "--out", str(out))
    return out, parse_figures(stdout), time.perf_counter() - started


@pytest.mark.slow
def test_example01_tiny_prints_the_figures_of_every_stage(example01_tiny):
    out, figures, _ = example01_tiny
    assert {"WORLD", "DATA", "MODEL", "SFT", "REWARD", "PPO_TRAIN", "PPO", "DONE"} <= set(figures)
    assert number(figures, "WORLD", "trees") == 240
    assert number(figures, "DATA", "prompts_validation") > 0
    for key in ("eval_loss", "train_loss", "train_loss_first"):
        assert math.isfinite(number(figures, "SFT", key)) and number(figures, "SFT", key) > 0
    assert number(figures, "SFT", "train_loss") < number(figures, "SFT", "train_loss_first")  # it learned something
    assert in_unit(number(figures, "REWARD", "eval_accuracy"))
    assert in_unit(number(figures, "REWARD", "gold_agreement"))  # the gold judge knows the world's prompts
    assert math.isfinite(number(figures, "REWARD", "eval_loss"))
    assert number(figures, "PPO_TRAIN", "updates") == 4
    assert math.isfinite(number(figures, "PPO_TRAIN", "kl"))
    assert in_unit(number(figures, "PPO_TRAIN", "gold_first")) and in_unit(number(figures, "PPO_TRAIN", "gold_last"))
    before, after, gain = (number(figures, "PPO", k) for k in ("gold_before", "gold_after", "gain"))
    assert in_unit(before) and in_unit(after) and math.isfinite(gain)
    assert abs(gain - (after - before)) < 1e-3  # same prompts: the gain is the difference of the means
    assert in_unit(number(figures, "PPO", "win_rate_gold"))
    assert number(figures, "PPO", "prompts") == 16
    for stage in ("sft", "reward", "ppo"):
        assert (out / stage / "model" / "config.json").is_file() and (out / stage / "metrics.json").is_file()
    assert json.loads((out / "eval.json").read_text())["prompts"] == 16


@pytest.mark.slow
def test_example03_ppo_on_a_reward_function(example01_tiny, tmp_path):
    run_dir, _, _ = example01_tiny
    out = tmp_path / "ex03"
    # --from-run reuses example 01's SFT model and data (the standalone path runs the same stage calls)
    figures = parse_figures(run_example("03_custom_reward.py", "--size", "tiny", "--from-run", str(run_dir),
                                        "--out", str(out)))
    assert {"PPO_TRAIN", "PPO", "DONE"} <= set(figures) and "REWARD" not in figures
    assert number(figures, "PPO_TRAIN", "updates") == 4
    assert in_unit(number(figures, "PPO_TRAIN", "gold_first")) and in_unit(number(figures, "PPO_TRAIN", "gold_last"))
    before, after = number(figures, "PPO", "gold_before"), number(figures, "PPO", "gold_after")
    assert in_unit(before) and in_unit(after) and math.isfinite(number(figures, "PPO", "gain"))
    rows = [json.loads(line) for line in (out / "ppo_gold" / "metrics.jsonl").read_text().splitlines()]
    # the reward is the gold judge: the raw score PPO optimised is the logged gold score
    assert all(abs(r["objective/raw_scores"] - r["objective/gold"]) < 1e-6 for r in rows)
    assert (out / "ppo_gold" / "model" / "config.json").is_file()
    assert not (out / "sft").exists()  # nothing retrained


def test_example03_rejects_a_missing_run(tmp_path):
    proc = subprocess.run([sys.executable, str(EXAMPLES / "03_custom_reward.py"), "--from-run", str(tmp_path / "no"),
                           "--out", str(tmp_path / "o")], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "not found" in proc.stderr


@pytest.mark.parametrize("script", ["01_embedded_chain.py", "02_oasst_hub_lora.py", "03_custom_reward.py"])
def test_examples_import_light_and_answer_help(script):
    """Importing an example loads no torch (heavy imports live in main()); --help works offline."""
    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('example', {str(EXAMPLES / script)!r})\n"
        "module = importlib.util.module_from_spec(spec); spec.loader.exec_module(module)\n"
        "assert callable(module.main) and callable(module.parse_args)\n"
        "print('torch' in sys.modules, 'transformers' in sys.modules)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["False", "False"]
    first = (EXAMPLES / script).read_text().splitlines()[:12]
    assert any("python examples/" + script in line for line in first), "the header gives the exact command"
    assert any("Tried on" in line or "Meant for" in line for line in first), "the header names the hardware"
    help_text = subprocess.run([sys.executable, str(EXAMPLES / script), "--help"], cwd=REPO, env=ENV,
                               capture_output=True, text=True, timeout=120)
    assert help_text.returncode == 0 and "--out" in help_text.stdout


def test_example02_parses_its_options():
    spec = importlib.util.spec_from_file_location("example02", EXAMPLES / "02_oasst_hub_lora.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    args = module.parse_args([])
    assert args.model == "HuggingFaceTB/SmolLM2-135M-Instruct" and args.data == ["OpenAssistant/oasst1"]
    assert args.lang == "en" and not args.quick
    args = module.parse_args(["--model", "EleutherAI/pythia-160m", "--quick", "--data", "a.jsonl", "b.jsonl"])
    assert args.model == "EleutherAI/pythia-160m" and args.quick and args.data == ["a.jsonl", "b.jsonl"]
    assert module.PLAIN_TEMPLATE.is_file()
    # the PPO sizes obey the batch arithmetic (checked before any model loads)
    from rlhfkit.ppo import PPOStageConfig

    for sizes in (module.FULL, module.QUICK):
        assert PPOStageConfig(model="m", reward_model="r", output_dir="o", **sizes["ppo"]).validate() == []
    # its full sizes are configs/oasst_smollm.yaml's sections, read from the file (not a copy that can drift)
    shipped = read_yaml(REPO / "configs" / "oasst_smollm.yaml")
    assert module.FULL["ppo"] == shipped["ppo"] and module.FULL["reward"] == shipped["reward"]
    assert module.FULL["sft"] == {k: v for k, v in shipped["sft"].items() if k != "pad_token"}


# ---------------------------------------------------------------------------------------
# configs/*.yaml: every config loads and validates, without a download
# ---------------------------------------------------------------------------------------
def _stage_class(path: Path):
    """sft_*.yaml / reward_*.yaml / ppo_*.yaml are single-stage configs; everything else a RunConfig."""
    from rlhfkit.ppo import PPOStageConfig
    from rlhfkit.reward import RewardStageConfig
    from rlhfkit.sft import SFTStageConfig

    kind = path.name.split("_")[0]
    return {"sft": SFTStageConfig, "reward": RewardStageConfig, "ppo": PPOStageConfig}.get(kind, RunConfig)


CONFIG_FILES = sorted(CONFIGS.glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIG_FILES, ids=[p.name for p in CONFIG_FILES])
def test_config_loads_and_validates(path, tmp_path):
    cls = _stage_class(path)
    if "\nsweep:" in path.read_text():  # a sweep's run config: every run of its grid validates
        from rlhfkit.sweep import plan_sweep

        assert all(cfg.output_dir.startswith("runs/") for _, _, cfg in plan_sweep(path, {}, "runs/x").runs)
        return
    config = load_config(cls, path)  # hub ids in data.source need no download to validate
    if cls is RunConfig:
        assert config.output_dir.startswith("runs/")


@pytest.mark.parametrize("name", ["oasst_smollm.yaml", "oasst_pythia.yaml"])
def test_real_use_configs(name, tmp_path, monkeypatch):
    path = CONFIGS / name
    text = path.read_text()
    data = yaml.safe_load(text)
    assert data["data"]["source"] == ["OpenAssistant/oasst1"] and data["data"]["lang"] == ["en"]
    assert data["model"]["name"] in ("HuggingFaceTB/SmolLM2-135M-Instruct", "EleutherAI/pythia-160m")
    for section in ("sft", "reward", "ppo"):
        assert data[section]["lora"] is True, section
    assert data["sft"]["bf16"] is True and data["reward"]["bf16"] is True
    assert data["reward"]["gold_agreement"] == "off"
    # the header: the exact command, with an accelerate file that exists, and the hardware
    command = re.search(r"accelerate launch --config_file (\S+) -m rlhfkit\.cli run (\S+)", text)
    assert command and command.group(2) == f"configs/{name}" and (REPO / command.group(1)).is_file()
    assert "Meant for:" in text
    template = data["sft"].get("chat_template_path")
    if template is not None:
        assert (REPO / template).is_file()
    # every stage section is a valid stage config, and PPO's batch arithmetic divides for
    # every process count of the accelerate files (and 1, 2, 4, 8)
    local = tmp_path / "export.jsonl"
    local.write_text("{}\n")
    counts = {1, 2, 4, 8} | {yaml.safe_load(p.read_text())["num_processes"] for p in ACCELERATE.glob("*.yaml")}
    from rlhfkit.ppo import PPOStageConfig

    for n in sorted(counts):
        monkeypatch.setenv("WORLD_SIZE", str(n))
        load_config(RunConfig, path, [f"data.source={local}"])
        assert collect_errors(PPOStageConfig, {**data["ppo"], "model": "m", "reward_model": "r"}) == [], n


def test_plain_chat_template_trains_the_reply_and_its_eos():
    """configs/templates/oasst_plain.jinja (for Pythia): assistant mask = reply + eos, as TRL checks it."""
    from trl.chat_template_utils import has_generation_markers, is_chat_template_stop_token_trained

    from rlhfkit.world.model import train_tokenizer

    template = (CONFIGS / "templates" / "oasst_plain.jinja").read_text()
    tok = train_tokenizer(["what is the capital of France", "Paris is the capital"], 300)
    messages = [{"role": "user", "content": "what is the capital"}, {"role": "assistant", "content": "Paris"}]
    text = tok.apply_chat_template(messages, chat_template=template, tokenize=False)
    assert text == f"<|prompter|>what is the capital{tok.eos_token}<|assistant|>Paris{tok.eos_token}"
    prompt = tok.apply_chat_template(messages[:1], chat_template=template, tokenize=False, add_generation_prompt=True)
    assert text.startswith(prompt) and prompt.endswith("<|assistant|>")
    enc = tok.apply_chat_template(messages, chat_template=template, return_assistant_tokens_mask=True, return_dict=True)
    trained = [i for i, m in zip(enc["input_ids"], enc["assistant_masks"]) if m]
    assert tok.decode(trained) == f"Paris{tok.eos_token}"
    assert has_generation_markers(template) and is_chat_template_stop_token_trained(tok, chat_template=template)


# ---------------------------------------------------------------------------------------
# configs/accelerate/*.yaml
# ---------------------------------------------------------------------------------------
ACCELERATE_FILES = sorted(ACCELERATE.glob("*.yaml"))
EXPECTED = {
    "single_gpu.yaml": ("NO", 1), "multi_gpu.yaml": ("MULTI_GPU", 2), "deepspeed_zero2.yaml": ("DEEPSPEED", 2),
    "deepspeed_zero3.yaml": ("DEEPSPEED", 2), "fsdp.yaml": ("FSDP", 2), "cpu_2proc.yaml": ("MULTI_GPU", 2),
    "cpu_2proc_fsdp.yaml": ("FSDP", 2),
}


def test_every_launch_file_is_there():
    assert {p.name for p in ACCELERATE_FILES} >= set(EXPECTED)


@pytest.mark.parametrize("path", ACCELERATE_FILES, ids=[p.name for p in ACCELERATE_FILES])
def test_accelerate_file_parses_and_prepares_a_launch(path):
    from accelerate.commands.config.config_args import ClusterConfig
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils import launch as launch_utils

    text = path.read_text()
    raw = yaml.safe_load(text)
    for key in ("compute_environment", "distributed_type", "num_processes", "num_machines", "machine_rank",
                "mixed_precision", "use_cpu"):
        assert key in raw, f"{path.name}: {key} missing"
    assert raw["compute_environment"] == "LOCAL_MACHINE" and raw["num_machines"] == 1
    if path.name in EXPECTED:
        assert (raw["distributed_type"], raw["num_processes"]) == EXPECTED[path.name]
    assert f"--config_file configs/accelerate/{path.name}" in text and "Meant for:" in text
    ClusterConfig.from_yaml_file(str(path))  # accelerate's own loader: rejects unknown keys
    args = launch_command_parser().parse_args(["--config_file", str(path), "-m", "rlhfkit.cli", "run", "x.yaml"])
    args, defaults, mp_from_config = _validate_launch_command(args)
    assert args.num_processes == raw["num_processes"]
    if args.use_deepspeed:
        args.deepspeed_fields_from_accelerate_config = ",".join(
            list(defaults.deepspeed_config) + (["mixed_precision"] if mp_from_config else []))
        _, env = launch_utils.prepare_deepspeed_cmd_env(args)
        assert env["ACCELERATE_DEEPSPEED_ZERO_STAGE"] == str(raw["deepspeed_config"]["zero_stage"])
    elif args.use_fsdp or args.multi_gpu:
        env = launch_utils.prepare_multi_gpu_env(args)
        if args.use_fsdp:
            assert env["FSDP_STATE_DICT_TYPE"] == "FULL_STATE_DICT"  # from_pretrained reads the saved model
    else:
        _, env = launch_utils.prepare_simple_launcher_cmd_env(args)
    assert env["ACCELERATE_MIXED_PRECISION"] == raw["mixed_precision"]
    if path.name.startswith("cpu_2proc"):
        assert raw["mixed_precision"] == "no" and "ACCELERATE_USE_CPU=true accelerate launch" in text
        assert not args.cpu  # a --cpu launch starts one process
    if path.name == "cpu_2proc_fsdp.yaml":  # what rlhfkit's RL stage reads to shard
        assert env["ACCELERATE_USE_FSDP"] == "true" and env["FSDP_VERSION"] == "2"


@pytest.mark.slow
@pytest.mark.parametrize("launch_file", ["cpu_2proc.yaml", "cpu_2proc_fsdp.yaml"])
def test_cpu_2proc_launch_runs_the_ppo_stage_on_two_processes(example01_tiny, tmp_path, launch_file):
    """The CPU launch files really give 2 gloo processes: rlhfkit's PPO stops unless the
    launcher's process count matches WORLD_SIZE, and its batch arithmetic counts 2; the FSDP
    file shards the policy and value model (started from the reward model, as by default)."""
    run_dir, _, _ = example01_tiny
    cfg = tmp_path / "ppo.yaml"
    cfg.write_text(yaml.safe_dump({
        "model": str(run_dir / "sft"), "reward_model": str(run_dir / "reward"), "data": str(run_dir / "data"),
        "output_dir": str(tmp_path / "ppo"), "num_updates": 2, "rollout_batch_size": 8, "num_mini_batches": 2,
        "per_device_train_batch_size": 2, "num_ppo_epochs": 1, "response_length": 8, "save_steps": 0,
        "sample_every": 0,
    }))
    accelerate = Path(sys.executable).parent / "accelerate"
    env = {**ENV, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([str(accelerate), "launch", "--config_file", str(ACCELERATE / launch_file),
                           "--main_process_port", "0", "-m", "rlhfkit.cli", "ppo", str(cfg)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "PPO batch arithmetic (2 processes)" in proc.stdout
    assert "gradient accumulation = 4 / (2 x 2) = 1" in proc.stdout
    assert ("FSDP: the policy and value model sharded over 2 processes (one unit per decoder layer), the reference" in proc.stdout) == ("fsdp" in launch_file)
    assert json.loads((tmp_path / "ppo" / "metrics.json").read_text())["updates"] == 2
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(tmp_path / "ppo" / "model")  # an ordinary, complete folder


# ---------------------------------------------------------------------------------------
# The stage functions take in-memory objects
# ---------------------------------------------------------------------------------------
def _world_rows(n: int, seed: int = 0):
    """TRL-style rows from the embedded world: messages (SFT) and prompt/chosen/rejected (pairs)."""
    from rlhfkit.world import reference_answer, sample_prompt

    rng = random.Random(seed)
    sft, pairs = [], []
    for _ in range(n):
        prompt = sample_prompt(rng)
        answer = reference_answer(prompt)
        sft.append({"messages": prompt + [{"role": "assistant", "content": answer}]})
        pairs.append({"prompt": prompt, "chosen": [{"role": "assistant", "content": answer}],
                      "rejected": [{"role": "assistant", "content": "I am not sure, sorry."}]})
    return sft, pairs


@pytest.fixture(scope="module")
def micro(tmp_path_factory):
    import torch

    from rlhfkit.world.model import build_model, train_tokenizer

    sft_rows, pair_rows = _world_rows(48)
    texts = [m["content"] for r in sft_rows for m in r["messages"]] + ["I am not sure, sorry."]
    tok = train_tokenizer(texts, 400)
    torch.manual_seed(0)
    return tok, build_model(tok, "micro", seed=0), sft_rows, pair_rows


def _gold_reward(prompts, responses):
    from rlhfkit.world import gold_score

    return [gold_score(p, r) for p, r in zip(prompts, responses)]


def test_stage_functions_take_in_memory_objects(micro, tmp_path):
    import datasets
    from transformers import LlamaForSequenceClassification

    from rlhfkit.data import DataBuildConfig, build_data, prompts_from_data_dir
    from rlhfkit.ppo import PPOStageConfig, train_ppo
    from rlhfkit.reward import RewardStageConfig, train_reward
    from rlhfkit.sft import SFTStageConfig, train_sft

    tok, policy, sft_rows, pair_rows = micro
    # data: in-memory datasets.Dataset objects (no source files)
    built = build_data(DataBuildConfig(sources=[], out=str(tmp_path / "data"), val_fraction=0.25),
                       datasets=[datasets.Dataset.from_list(sft_rows), datasets.Dataset.from_list(pair_rows)])
    assert built.metrics["sft_examples"] == 48 and built.metrics["pairs"] == 48
    prompts = prompts_from_data_dir(tmp_path / "data", "train")
    assert prompts and all(p[-1]["role"] == "user" for p in prompts)

    # SFT: model, tokenizer and datasets in memory
    quick = {"max_steps": 2, "per_device_train_batch_size": 8, "save_steps": 1000, "logging_steps": 1}
    sft = train_sft(load_config(SFTStageConfig, {**quick, "output_dir": str(tmp_path / "sft")}),
                    model=policy, tokenizer=tok, train_dataset=datasets.Dataset.from_list(sft_rows[:32]),
                    eval_dataset=datasets.Dataset.from_list(sft_rows[32:]))
    assert sft.metrics["steps"] == 2 and math.isfinite(sft.metrics["eval_loss"])

    # reward: a sequence-classification model built in memory
    config = policy.config.__class__(**{**policy.config.to_dict(), "num_labels": 1})
    rm = LlamaForSequenceClassification(config)
    reward = train_reward(load_config(RewardStageConfig, {**quick, "output_dir": str(tmp_path / "reward")}),
                          model=rm, tokenizer=tok, train_dataset=datasets.Dataset.from_list(pair_rows[:32]),
                          eval_dataset=datasets.Dataset.from_list(pair_rows[32:]))
    assert in_unit(reward.metrics["eval_accuracy"]) and in_unit(reward.metrics["gold_agreement"])

    # PPO: policy, tokenizer, prompts (a plain list) and reward_fn in memory; value model too
    value = LlamaForSequenceClassification(config)
    ppo_cfg = PPOStageConfig(model="", output_dir=str(tmp_path / "ppo"), value_model="policy", num_updates=1,
                             rollout_batch_size=8, num_mini_batches=2, per_device_train_batch_size=4,
                             num_ppo_epochs=1, response_length=6, save_steps=0, sample_every=0)
    result = train_ppo(ppo_cfg, policy=policy, tokenizer=tok, prompts=prompts, reward_fn=_gold_reward,
                       value_model=value, gold_fn=_gold_reward)
    assert result.metrics["updates"] == 1 and in_unit(result.metrics["objective/gold"])
    assert (tmp_path / "ppo" / "model" / "config.json").is_file()


def test_ppo_value_model_from_an_in_memory_policy(micro, tmp_path):
    from rlhfkit.ppo import PPOStageConfig, train_ppo

    tok, policy, sft_rows, _ = micro
    prompts = [r["messages"][:-1] for r in sft_rows[:8]]
    ppo_cfg = PPOStageConfig(model="", output_dir=str(tmp_path / "ppo"), value_model="policy", num_updates=1,
                             rollout_batch_size=8, num_mini_batches=2, per_device_train_batch_size=4,
                             num_ppo_epochs=1, response_length=4, save_steps=0, sample_every=0)
    result = train_ppo(ppo_cfg, policy=policy, tokenizer=tok, prompts=prompts, reward_fn=_gold_reward)
    # a value model of the policy's architecture with a new head: it trained (a value loss), and the policy saved
    (row,) = [json.loads(line) for line in (tmp_path / "ppo" / "metrics.jsonl").read_text().splitlines()]
    assert result.metrics["updates"] == 1 and row["loss/value_avg"] > 0 and 0 <= row["val/clipfrac_avg"] <= 1
    assert (tmp_path / "ppo" / "model" / "model.safetensors").is_file()
