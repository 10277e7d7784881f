"""`ctxmem extend`: fine-tuned and training-free extensions write folders that both loaders read alike.

The reference model and tiny random-weight configs are extended for a few steps on short
sequences, so the tests stay fast. The real runs at 1,024 tokens are in benchmarks/extension.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config

from ctxmem import cli
from ctxmem.extend import ExtendSettings, ExtensionJob, estimate_memory, extend, finetune
from ctxmem.model import REFERENCE_MODEL_DIR, load_model
from ctxmem.reference import corpus
from ctxmem.rope_scaling import max_cache_positions

CTXMEM = str(Path(sys.executable).parent / "ctxmem")
FOLDER_FILES = {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                "chat_template.jinja", "generation_config.json", "extension.json"}


@pytest.fixture(scope="module")
def training_ids() -> list[int]:
    """About 6,000 token ids of a training play, tokenized by the reference tokenizer without BOS."""
    tokenizer = AutoTokenizer.from_pretrained(REFERENCE_MODEL_DIR)
    text = corpus.load_play(corpus.training_play_names()[0])[:24_000]
    return tokenizer.encode(text, add_special_tokens=False)


@pytest.fixture
def data_file(tmp_path: Path) -> Path:
    path = tmp_path / "plays.txt"
    path.write_text(corpus.load_play(corpus.training_play_names()[0])[:24_000], encoding="utf-8")
    return path


def same_logits(folder: Path, ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits of `ids` from plain transformers and from ctxmem's load_model, both reading `folder`."""
    plain = AutoModelForCausalLM.from_pretrained(folder).eval()
    ours, _ = load_model(folder, device="cpu")
    row = torch.tensor([ids])  # [1, tokens]
    with torch.no_grad():
        return plain(row).logits, ours(row).logits


def hidden_leftovers(parent: Path) -> list[str]:
    return [path.name for path in parent.iterdir() if path.name.startswith(".")]


def test_reference_yarn_folder_loads_in_both(tmp_path, training_ids):
    out = tmp_path / "reference-yarn-4x"
    settings = ExtendSettings(method="yarn", factor=4, steps=3, context=64, batch_size=2)
    result = extend("reference", out, settings, data=training_ids, device="cpu")

    assert set(path.name for path in out.iterdir()) == FOLDER_FILES
    config = json.loads((out / "config.json").read_text())
    assert config["rope_parameters"]["rope_type"] == "yarn"
    assert config["rope_parameters"]["factor"] == 4.0
    assert config["rope_parameters"]["original_max_position_embeddings"] == 256
    assert config["max_position_embeddings"] == 1024
    assert result.tokens_seen == 3 * 2 * 64
    assert len(result.losses) == 3

    # 600 tokens run past the trained 256 positions, where the scaling matters.
    plain, ours = same_logits(out, training_ids[:600])
    torch.testing.assert_close(plain, ours, rtol=0, atol=0)
    loaded, _ = load_model(out, device="cpu")
    assert loaded.config.rope_parameters["rope_type"] == "yarn"
    assert max_cache_positions(loaded.config) == 1024

    record = json.loads((out / "extension.json").read_text())
    assert record["method"] == "yarn"
    assert record["tokens_seen"] == 384
    assert len(record["losses"]) == 3


def test_fine_tuning_changes_the_weights(tmp_path, training_ids):
    out = tmp_path / "pi"
    extend("reference", out, ExtendSettings(method="pi", factor=2, steps=2, context=32, batch_size=1),
           data=training_ids, device="cpu")
    before = load_file(REFERENCE_MODEL_DIR / "model.safetensors")
    after = load_file(out / "model.safetensors")
    assert set(before) == set(after)
    changed = [name for name in before if not torch.equal(before[name], after[name])]
    assert len(changed) == len(before)


def test_cli_extends_tiny_config(tmp_path, tiny_model_dir, data_file):
    source = tiny_model_dir("llama-gqa")
    out = tmp_path / "tiny-pi"
    result = subprocess.run([CTXMEM, "extend", "--model", str(source), "--method", "pi", "--factor", "2",
                             "--steps", "2", "--context", "48", "--batch-size", "2", "--data", str(data_file),
                             "--out", str(out), "--json"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["rope_parameters"]["rope_type"] == "linear"
    assert summary["max_position_embeddings"] == 2 * 2048
    assert summary["tokens_seen"] == 2 * 2 * 48
    assert summary["memory_estimate"]["total_bytes"] > 0

    plain, ours = same_logits(out, list(range(10, 110)))
    torch.testing.assert_close(plain, ours, rtol=0, atol=0)
    assert AutoModelForCausalLM.from_pretrained(out).config.max_position_embeddings == 4096


@pytest.mark.parametrize("method, rope_type, positions", [("ntk", "default", 1024), ("dynamic-ntk", "dynamic", 256)])
def test_training_free_keeps_weights(tmp_path, method, rope_type, positions):
    out = tmp_path / method
    result = extend("reference", out, ExtendSettings(method=method, factor=4), device="cpu")

    assert result.losses == []
    config = json.loads((out / "config.json").read_text())
    assert config["rope_parameters"]["rope_type"] == rope_type
    # Dynamic NTK reads max_position_embeddings as the trained length, so it stays 256.
    assert config["max_position_embeddings"] == positions
    before = load_file(REFERENCE_MODEL_DIR / "model.safetensors")
    after = load_file(out / "model.safetensors")
    assert all(torch.equal(before[name], after[name]) for name in before)
    plain, ours = same_logits(out, list(range(10, 700)))
    torch.testing.assert_close(plain, ours, rtol=0, atol=0)


def test_ntk_folder_refuses_a_second_scaling(tmp_path):
    out = tmp_path / "ntk"
    extend("reference", out, ExtendSettings(method="ntk", factor=4), device="cpu")
    with pytest.raises(ValueError, match="already extended from original_max_position_embeddings 256"):
        extend(out, tmp_path / "again", ExtendSettings(method="ntk", factor=2), device="cpu")
    assert not (tmp_path / "again").exists()


def test_shorter_run_equals_start_of_longer(training_ids):
    model, tokenizer = load_model("reference", device="cpu")
    short = finetune(model, training_ids, ExtendSettings(method="pi", factor=2, steps=3, context=32, batch_size=1),
                     32, tokenizer.bos_token_id)
    model, _ = load_model("reference", device="cpu")
    long = finetune(model, training_ids, ExtendSettings(method="pi", factor=2, steps=5, context=32, batch_size=1),
                    32, tokenizer.bos_token_id)
    assert short == long[:3]


def test_loss_falls_on_repeated_text(training_ids):
    model, tokenizer = load_model("reference", device="cpu")
    settings = ExtendSettings(method="yarn", factor=2, steps=12, lr=1e-3, context=64, batch_size=2, warmup_steps=2)
    losses = finetune(model, training_ids[:200], settings, 64, tokenizer.bos_token_id)
    assert losses[-1] < 0.8 * losses[0]


def test_checkpointing_gives_same_losses(tiny_model_dir, training_ids):
    source = tiny_model_dir("qwen2")
    losses, during = {}, {}
    for checkpointing in (False, True):
        model, tokenizer = load_model(source, device="cpu")
        settings = ExtendSettings(method="pi", factor=2, steps=3, context=32, batch_size=2)
        losses[checkpointing] = finetune(
            model, training_ids, settings, 32, tokenizer.bos_token_id, checkpointing=checkpointing,
            on_step=lambda step, loss: during.setdefault(checkpointing, checkpointing_on(model)))
        assert not checkpointing_on(model)
    assert during == {False: False, True: True}
    assert losses[True] == pytest.approx(losses[False], rel=1e-5)


def checkpointing_on(model) -> bool:
    return any(getattr(module, "gradient_checkpointing", False) for module in model.modules())


def test_memory_estimate_parts(tiny_model_dir):
    config = AutoModelForCausalLM.from_pretrained(tiny_model_dir("llama-gqa")).config
    full = estimate_memory(config, batch_size=2, context=128, checkpointing=False, activation_bytes=4)
    checkpointed = estimate_memory(config, batch_size=2, context=128, checkpointing=True, activation_bytes=4)
    parameters = sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())
    assert full.parameters == parameters
    assert full.optimizer_bytes == 8 * parameters
    assert full.total_bytes == full.parameter_bytes + full.gradient_bytes + full.optimizer_bytes + full.activation_bytes
    assert checkpointed.activation_bytes < full.activation_bytes


def write_gpt2(folder: Path) -> Path:
    GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=3072).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("options, fragment", [
    (["--method", "pi", "--factor", "1", "--steps", "2", "--data", "{data}"], "invalid factor 1.0"),
    (["--method", "yarn", "--factor", "0.5"], "invalid factor 0.5"),
    (["--method", "pi", "--factor", "4", "--steps", "2", "--data", "{empty}"], "is empty (0 tokens)"),
    (["--method", "pi", "--factor", "4", "--steps", "2", "--data", "{short}"],
     "fewer than one training sequence of context 1024"),
    (["--method", "pi", "--factor", "4", "--steps", "2", "--data", "{tmp}/missing.txt"], "not found"),
    (["--method", "pi", "--factor", "4", "--steps", "2"], "needs training text; pass --data PATH"),
    (["--method", "pi", "--factor", "4", "--data", "{data}"], "training text is unused with steps 0"),
    (["--method", "ntk", "--factor", "4", "--steps", "5", "--data", "{data}"], "'ntk' is training-free"),
    (["--method", "dynamic-ntk", "--factor", "4", "--steps", "5", "--data", "{data}"],
     "'dynamic-ntk' is training-free"),
    (["--method", "yarn", "--factor", "4", "--steps", "2", "--context", "2048", "--data", "{data}"],
     "context 2048 is longer than the extended length 1024"),
    (["--method", "yarn", "--factor", "4", "--steps", "2", "--lr", "0", "--data", "{data}"],
     "invalid learning rate 0.0"),
    (["--method", "pi", "--factor", "4", "--model", "{gpt2}"], "'gpt2' has no rotary position embeddings"),
])
def test_bad_input_writes_nothing(tmp_path, data_file, capsys, options, fragment):
    (tmp_path / "empty.txt").write_text("", encoding="utf-8")
    (tmp_path / "short.txt").write_text("ROMEO: But soft, what light", encoding="utf-8")
    paths = {"data": data_file, "empty": tmp_path / "empty.txt", "short": tmp_path / "short.txt", "tmp": tmp_path,
             "gpt2": write_gpt2(tmp_path / "gpt2")}
    out = tmp_path / "out"
    args = [option.format(**paths) for option in options]

    code = cli.main(["extend", *args, "--out", str(out)])

    error = capsys.readouterr().err
    assert code == 2
    assert fragment in error
    assert len(error.strip().splitlines()) == 1
    assert not out.exists()
    assert hidden_leftovers(tmp_path) == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_cuda_without_gpu_rejected(tmp_path, capsys):
    out = tmp_path / "out"
    code = cli.main(["extend", "--method", "ntk", "--factor", "2", "--device", "cuda", "--out", str(out)])
    assert code == 2
    assert "device 'cuda' needs a CUDA GPU" in capsys.readouterr().err
    assert not out.exists()


def test_existing_output_untouched(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("keep me", encoding="utf-8")

    code = cli.main(["extend", "--method", "ntk", "--factor", "4", "--out", str(out)])

    assert code == 2
    assert "output folder" in capsys.readouterr().err
    assert [path.name for path in out.iterdir()] == ["notes.txt"]
    assert (out / "notes.txt").read_text(encoding="utf-8") == "keep me"


def test_overwrite_replaces_output(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("old", encoding="utf-8")
    assert cli.main(["extend", "--method", "ntk", "--factor", "2", "--out", str(out), "--overwrite", "--json"]) == 0
    assert set(path.name for path in out.iterdir()) == FOLDER_FILES
    assert hidden_leftovers(tmp_path) == []


def test_output_cannot_be_the_source(tmp_path, capsys):
    source = tmp_path / "ntk"
    extend("reference", source, ExtendSettings(method="ntk", factor=2), device="cpu")
    code = cli.main(["extend", "--model", str(source), "--method", "pi", "--factor", "2", "--out", str(source),
                     "--overwrite"])
    assert code == 2
    assert "is the model being extended" in capsys.readouterr().err


def test_failure_during_training_writes_nothing(tmp_path, training_ids):
    out = tmp_path / "out"

    def stop(step: int, loss: float) -> None:
        if step == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        extend("reference", out, ExtendSettings(method="pi", factor=2, steps=4, context=32, batch_size=1),
               data=training_ids, device="cpu", on_step=stop)
    assert not out.exists()
    assert hidden_leftovers(tmp_path) == []


def test_failure_while_saving_keeps_old_folder(tmp_path, training_ids, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("old", encoding="utf-8")
    job = ExtensionJob.prepare("reference", out, ExtendSettings(method="ntk", factor=2), device="cpu",
                               overwrite=True)

    def broken_save(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(job.tokenizer, "save_pretrained", broken_save)
    with pytest.raises(OSError, match="disk full"):
        job.run()
    assert [path.name for path in out.iterdir()] == ["notes.txt"]
    assert hidden_leftovers(tmp_path) == []
