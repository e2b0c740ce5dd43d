"""The command line fails like a tool should: exit status non-zero and one line on stderr
naming the file or option (the traceback only with --debug or LORI_DEBUG=1), and it never
overwrites its inputs."""

import pytest
from test_model import randomize_b, tiny_model

import lori
from lori import LoRIConfig
from lori.cli import main


@pytest.fixture(autouse=True)
def quiet_loading():
    """Hugging Face's weight-loading progress bars also write to stderr; off here."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    yield
    hf_logging.enable_progress_bar()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    tiny_model().save_pretrained(root / "base")
    model = lori.get_lori_model(tiny_model(), LoRIConfig(r=8, block=(16, 8)))
    randomize_b(model)
    lori.save_lori(model, root / "run" / "adapter")
    (root / "bad.jsonl").write_text('{"prompt": "a", "response": "b"}\n{"prompt": "a"}\n')
    return root


def fails(capsys, argv, message, status=1):
    try:
        got = main(argv)
    except SystemExit as e:  # argparse's usage errors
        got = e.code
    assert got == status
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert message in err, err
    return err


def test_every_failure_is_one_line(files, capsys, tmp_path):
    base = ["--model", str(files / "base")]
    adapter = ["--adapter", str(files / "run" / "adapter")]
    data = ["--data", str(files / "bad.jsonl")]
    fails(capsys, ["train", *base, *data, "--output", str(tmp_path / "o"), "--clip-grad", "-1"], "clip_grad must be")
    fails(
        capsys, ["train", "--model", str(tmp_path / "nowhere"), *data, "--output", str(tmp_path)], "no model directory"
    )
    fails(capsys, ["extract-masks", *base, *adapter, "--output", str(tmp_path)], "is a directory")
    fails(capsys, ["extract-masks", *base, *adapter, "--sparsity", "0.9999", "--output", str(tmp_path / "m.st")],
          "keeps none of the")  # fmt: skip
    fails(capsys, ["import", *base, "--adapter", str(tmp_path / "none"), "--output", str(tmp_path / "x")], "is missing")
    fails(capsys, ["import", *base, *adapter, "--dropout", "1", "--output", str(tmp_path / "x")],
          "expected a probability in [0, 1) or 'peft', got '1'", status=2)  # fmt: skip
    fails(capsys, ["eval", *base, *data], "bad.jsonl line 2 has no 'response' field")
    fails(
        capsys,
        ["merge", "--model", str(tmp_path / "nowhere"), "--adapters", adapter[1], "--output", str(tmp_path / "m")],
        "no model",
    )
    err = fails(capsys, ["train", *base], "the following arguments are required", status=2)
    assert err.startswith("lori train: error:")


@pytest.mark.parametrize("command", ["export", "import", "merge", "extract-masks"])
def test_an_output_that_holds_the_input_is_refused(files, capsys, command):
    """``lori export --adapter run/adapter --output run`` used to replace run/ (the input with
    it); an output inside the input (``extract-masks --output run/adapter/adapter.safetensors``)
    would replace one of its files."""
    before = sorted(p.relative_to(files) for p in files.rglob("*"))
    flag = "--adapters" if command == "merge" else "--adapter"
    outputs = (files / "run", files / "run" / "adapter", files / "run" / "adapter" / "adapter.safetensors")
    for output in outputs:
        argv = [command, "--model", str(files / "base"), flag, str(files / "run" / "adapter"), "--output", str(output)]
        fails(capsys, argv, "would write over or into the input")
    assert sorted(p.relative_to(files) for p in files.rglob("*")) == before


def test_export_into_a_directory_of_other_files_is_refused(files, capsys, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    argv = ["export", "--model", str(files / "base"), "--adapter", str(files / "run" / "adapter")]
    fails(capsys, [*argv, "--output", str(tmp_path)], "holds files that are not a PEFT adapter's (notes.txt)")
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


def test_merge_fold_writes_a_model_beside_nothing_foreign(files, capsys, tmp_path):
    argv = ["merge", "--model", str(files / "base"), "--adapters", str(files / "run" / "adapter"), "--fold"]
    assert main([*argv, "--output", str(tmp_path / "folded")]) == 0
    assert main([*argv, "--output", str(tmp_path / "folded")]) == 0  # its own files: replaced
    assert sorted(p.name for p in (tmp_path / "folded").iterdir()) == [
        "config.json",
        "generation_config.json",
        "model.safetensors",
    ]
    (tmp_path / "folded" / "README.md").write_text("mine")
    fails(capsys, [*argv, "--output", str(tmp_path / "folded")], "holds files that are not a model's (README.md)")


def test_debug_shows_the_traceback(files, tmp_path, monkeypatch):
    argv = ["extract-masks", "--model", str(files / "base"), "--adapter", str(files / "run" / "adapter")]
    with pytest.raises(ValueError, match="is a directory"):
        main(["--debug", *argv, "--output", str(tmp_path)])
    monkeypatch.setenv("LORI_DEBUG", "1")
    with pytest.raises(ValueError, match="is a directory"):
        main([*argv, "--output", str(tmp_path)])
