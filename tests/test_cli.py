"""The ``mpo`` command line, end to end on a tiny local model: every method, resume, evaluate,
merge, plan, analyze, and one clear error line (status 2, no traceback) for each user mistake."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from mpo.cli import main  # noqa: E402
from mpo.finetune.methods import METHODS  # noqa: E402

FAST = ["--max-steps", "2", "--batch-size", "4", "--micro-batch-size", "2", "--eval-every", "1"]


def finetune(tiny_lm, data, out, method="dota", *extra):
    return main(
        [
            "finetune",
            "--model",
            str(tiny_lm),
            "--data",
            str(data),
            "--method",
            method,
            "--out",
            str(out),
            "--rank",
            "4",
            "--num-cores",
            "3",
            "--val-size",
            "4",
            "--dtype",
            "float32",
            "--quiet",
            *FAST,
            *extra,
        ]
    )


def logits(model, tokenizer):
    batch = tokenizer(["Is 3 greater than 2?"], return_tensors="pt")
    with torch.no_grad():
        return model(**batch).logits


@pytest.mark.parametrize("method", list(METHODS))
def test_finetune_evaluate_and_merge_with_each_method(
    method, tiny_lm, instruction_data, tmp_path, capsys
):
    train, test = instruction_data
    run = tmp_path / "run"
    assert finetune(tiny_lm, train, run, method) == 0
    assert f"{method}: 2 steps" in capsys.readouterr().out
    summary = json.loads((run / "run.json").read_text())["result"]
    rows = json.loads((run / "metrics.json").read_text())
    assert summary["best_val_loss"] == min(r["val_loss"] for r in rows)
    assert 0 < summary["trainable_params"] <= summary["total_params"]
    assert (summary["trainable_params"] == summary["total_params"]) == (method == "full")

    report = tmp_path / "eval.json"
    status = main(
        [
            "evaluate",
            "--model",
            str(tiny_lm),
            "--checkpoint",
            str(run),
            "--data",
            str(test),
            "--max-new-tokens",
            "4",
            "--dtype",
            "float32",
            "--out",
            str(report),
            "--quiet",
        ]
    )
    assert status == 0
    result = json.loads(report.read_text())
    assert "test" in capsys.readouterr().out
    assert result["tasks"]["test"]["n"] == 8
    if method == "dota":  # merging first changes the speed, not the generated text
        unmerged = tmp_path / "unmerged.json"
        evaluate = ["evaluate", "--model", str(tiny_lm), "--checkpoint", str(run), "--unmerged"]
        options = ["--max-new-tokens", "4", "--dtype", "float32", "--out", str(unmerged)]
        assert main([*evaluate, "--data", str(test), *options, "--quiet"]) == 0
        assert json.loads(unmerged.read_text())["predictions"] == result["predictions"]

    merged = tmp_path / "merged"
    status = main(
        [
            "merge",
            "--model",
            str(tiny_lm),
            "--checkpoint",
            str(run),
            "--out",
            str(merged),
            "--dtype",
            "float32",
        ]
    )
    assert status == 0
    plain = transformers.AutoModelForCausalLM.from_pretrained(merged)
    assert not any("lora" in n or "dota" in n for n, _ in plain.named_parameters())
    from mpo.finetune.methods import load_finetuned, load_tokenizer

    tokenizer = load_tokenizer(tiny_lm)
    adapted = load_finetuned(tiny_lm, run / "best", dtype="float32")
    # the merged model computes what the adapted one does: exactly up to float rounding,
    # except where the adapted model runs on a 4-bit base that merging does not keep
    tolerance = 0.15 if method in ("qlora",) else 1e-4
    torch.testing.assert_close(
        logits(plain, tokenizer), logits(adapted, tokenizer), rtol=0, atol=tolerance
    )


def test_an_interrupted_run_resumes_when_the_command_is_rerun(
    tiny_lm, instruction_data, tmp_path, capsys, monkeypatch
):
    import os
    import signal

    step = torch.optim.AdamW.step

    def interrupt(self, *args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)
        return step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", interrupt)
    assert finetune(tiny_lm, instruction_data[0], tmp_path / "run") == 130
    assert "interrupted after step 1 of 2" in capsys.readouterr().err
    monkeypatch.undo()
    assert finetune(tiny_lm, instruction_data[0], tmp_path / "run") == 0
    rows = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert [r["step"] for r in rows] == [0, 1, 2]


def test_plan_reads_a_config_without_weights(tiny_lm, tmp_path, capsys):
    config_only = tmp_path / "config_only"
    config_only.mkdir()
    (config_only / "config.json").write_text((tiny_lm / "config.json").read_text())
    assert main(["plan", str(config_only / "config.json"), "--rank", "4", "--num-cores", "3"]) == 0
    out = capsys.readouterr().out
    assert "model.layers.1.mlp.down_proj" in out
    assert "trainable params:" in out


def test_plan_writes_its_json(tiny_lm, tmp_path, capsys):
    out = tmp_path / "plan.json"
    args = ["plan", str(tiny_lm), "--rank", "4", "--num-cores", "3", "--json", str(out)]
    assert main(args) == 0
    data = json.loads(out.read_text())
    assert data["config"]["rank"] == 4
    assert data["trainable_params"] == sum(m["params"] for m in data["modules"])
    assert data["trainable_params"] < data["total_params"]
    assert f"trainable params: {data['trainable_params']:,d}" in capsys.readouterr().out


@pytest.mark.parametrize(
    "config", ["{not json", '{"hidden_size": 8}', '{"model_type": "no-such-model"}']
)
def test_plan_names_an_unreadable_config(tmp_path, capsys, config):
    (tmp_path / "config.json").write_text(config)
    assert main(["plan", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mpo plan: error: transformers cannot read")
    assert "Traceback" not in err


def test_analyze_writes_tables_and_plots(tiny_lm, tmp_path, capsys):
    out = tmp_path / "analysis"
    status = main(
        [
            "analyze",
            str(tiny_lm),
            "--ranks",
            "2",
            "4",
            "--num-cores",
            "3",
            "--out",
            str(out),
            "--targets",
            "q_proj",
            "--quiet",
        ]
    )
    assert status == 0
    rows = json.loads((out / "analysis.json").read_text())["rows"]
    assert {r["rank"] for r in rows} == {2, 4}
    assert len(rows) == 4  # two layers x two ranks
    assert (out / "errors.png").stat().st_size > 0


def bad_records(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"instruction": "x", "output": "y"}\n{"output": "no instruction"}\n')
    return path


def not_a_causal_lm(tmp_path):
    folder = tmp_path / "bert"
    folder.mkdir()
    config = transformers.BertConfig(
        vocab_size=32, hidden_size=16, num_hidden_layers=1, num_attention_heads=2
    )
    transformers.BertModel(config).save_pretrained(folder)
    return folder


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("missing data", "no such file"),
        ("malformed record", "line 2"),
        ("not a causal LM", "not a causal language model"),
        ("not a model folder", "no config.json"),
        ("missing package", "needs peft"),
        ("bad recipe", "not a multiple of micro_batch_size"),
    ],
)
def test_user_mistakes_end_with_one_error_line(
    case, message, tiny_lm, instruction_data, tmp_path, capsys, monkeypatch
):
    model, data, extra = str(tiny_lm), str(instruction_data[0]), []
    method = "dota"
    if case == "missing data":
        data = str(tmp_path / "nope.json")
    elif case == "malformed record":
        data = str(bad_records(tmp_path))
    elif case == "not a causal LM":
        model = str(not_a_causal_lm(tmp_path))
    elif case == "not a model folder":
        model = str(tmp_path)
    elif case == "missing package":
        import importlib.util

        find_spec = importlib.util.find_spec
        monkeypatch.setattr(
            importlib.util,
            "find_spec",
            lambda name, *a: None if name == "peft" else find_spec(name),
        )
        method = "lora"
    elif case == "bad recipe":
        extra = ["--micro-batch-size", "3"]
    capsys.readouterr()  # what building the fixtures printed
    status = main(
        [
            "finetune",
            "--model",
            model,
            "--data",
            data,
            "--method",
            method,
            "--out",
            str(tmp_path / "run"),
            "--quiet",
            *extra,
        ]
    )
    err = capsys.readouterr().err
    assert status == 2
    assert err.startswith("mpo finetune: error:")
    assert message in err
    assert "Traceback" not in err
    assert not (tmp_path / "run" / "state").exists()


def test_every_command_answers_help():
    result = subprocess.run(
        [sys.executable, "-m", "mpo.cli", "finetune", "--help"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0
    for option in ("--method", "--rank", "--eval-every", "--restart"):
        assert option in result.stdout


@pytest.mark.parametrize(
    ("command", "bad"),
    [
        (["plan", "{model}", "--json", "{folder}"], "is a folder"),
        (["analyze", "{model}", "--out", "{file}"], "is a file"),
        (["finetune", "--model", "{model}", "--data", "{file}", "--out", "{below}"], "lies below"),
        (["evaluate", "--model", "{model}", "--data", "{file}", "--out", "{folder}"], "a folder"),
        (["merge", "--model", "{model}", "--checkpoint", "{folder}", "--out", "{file}"], "a file"),
    ],
)
def test_an_output_path_that_cannot_be_written_is_refused_first(
    tiny_lm, tmp_path, capsys, command, bad
):
    folder, file = tmp_path / "folder", tmp_path / "file.json"
    folder.mkdir()
    file.write_text("[]")
    paths = {"model": tiny_lm, "folder": folder, "file": file, "below": file / "run"}
    assert main([part.format(**paths) for part in command]) == 2
    err = capsys.readouterr().err
    assert f"error: --{'json' if command[0] == 'plan' else 'out'} " in err
    assert bad in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.json", "folder"]
    assert not any(folder.iterdir())


def test_finetunes_default_output_folder_is_checked_first(tiny_lm, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "out").write_text("a file where the default out/finetune/dota would go")
    data = tmp_path / "data.json"
    data.write_text("[]")
    assert main(["finetune", "--model", str(tiny_lm), "--data", str(data)]) == 2
    assert "--out out/finetune/dota lies below out, which is a file" in capsys.readouterr().err
