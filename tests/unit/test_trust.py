"""Trust at the edges, in-process: data identified by content (an edited file is never trained on as
its old tokens), secrets masked in one place, every bad input one line, resumes that say what changed."""

from __future__ import annotations

import json

import pytest

from accel_trainer.cli import main as cli_main
from accel_trainer.secrets import redact_argv, redact_text
from launching import TINY


def write_jsonl(path, texts):
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))


DOCS = [f"document {i}: " + "the quick brown fox jumps over the lazy dog. " * 6 for i in range(120)]


def test_prepare_data_rerun_after_the_input_grew_is_refused_naming_the_file(tmp_path, capsys):
    data = tmp_path / "a.jsonl"
    write_jsonl(data, DOCS)
    args = ["prepare-data", "--data_files", str(data), "--output_dir", str(tmp_path / "prep"), "--num_proc", "1"]
    assert cli_main(args) == 0
    capsys.readouterr()
    write_jsonl(data, DOCS + ["appended later: " + "more text " * 20])
    assert cli_main(args) == 2
    assert f"was prepared from other contents of {data} (the file changed since)" in capsys.readouterr().err


def test_a_byte_changed_with_size_and_mtime_kept_is_another_file_in_the_same_process(tmp_path):
    """A notebook prepares, the file is edited in place with its size and mtime restored, it prepares
    again: the content hash must be taken again (found by the fault campaign)."""
    import os

    from accel_trainer.data.sources import file_identity

    data = tmp_path / "a.txt"
    data.write_text("the quick brown fox\n")
    before = file_identity(data)
    stat = data.stat()
    data.write_text("the quick brown cat\n")
    os.utime(data, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    after = file_identity(data)
    assert (after["size"], after["mtime_ns"]) == (before["size"], before["mtime_ns"])
    assert after["xxh3_128"] != before["xxh3_128"]


def test_a_full_disk_while_preparing_is_one_line_and_keeps_what_was_written(tmp_path, capsys, monkeypatch):
    """Found by the fault campaign: a disk that filled up while the shards were written was a raw
    OSError traceback."""
    import errno

    from accel_trainer.data import shards

    data = tmp_path / "a.jsonl"
    write_jsonl(data, DOCS)
    real = shards._write_shard

    def full(out, i, *args):
        (out / f".tmp-shard-{i}").write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(shards, "_write_shard", full)
    args = ["prepare-data", "--data_files", str(data), "--output_dir", str(tmp_path / "prep"), "--num_proc", "1"]
    assert cli_main(args) == 2
    err = capsys.readouterr().err
    assert "could not write the prepared data (No space left on device); free space on that disk" in err
    assert "Traceback" not in err and not list((tmp_path / "prep").glob(".tmp-*"))
    monkeypatch.setattr(shards, "_write_shard", real)  # space again: the same command finishes
    assert cli_main(args) == 0


def test_an_unfinished_preparation_of_a_file_fixed_since_starts_over(tmp_path, capsys, monkeypatch):
    from accel_trainer.data import shards

    data = tmp_path / "a.jsonl"
    write_jsonl(data, DOCS[:60])
    real = shards._write_shard

    def dies(*args):
        raise KeyboardInterrupt  # half-way: the plan is written, no shard

    monkeypatch.setattr(shards, "_write_shard", dies)
    args = ["prepare-data", "--data_files", str(data), "--output_dir", str(tmp_path / "prep"), "--num_proc", "1"]
    with pytest.raises(KeyboardInterrupt):
        cli_main(args)
    monkeypatch.setattr(shards, "_write_shard", real)
    write_jsonl(data, DOCS)  # the user fixed (here: completed) the file
    assert cli_main(args) == 0
    out = capsys.readouterr().out
    assert "an unfinished preparation of other inputs is there; preparing again from the start" in out
    assert f"{len(DOCS):,} documents" in out  # none silently dropped


def test_an_edited_file_is_prepared_again_and_a_resume_on_it_is_refused(tmp_path, recipe_module, capsys):
    data = tmp_path / "a.jsonl"
    write_jsonl(data, DOCS)
    run = [a for a in TINY if a not in ("--max_corpus_bytes", "300000")] + [
        "--data_files", str(data), "--save_steps", "2", "--eval_steps", "0", "--output_dir", str(tmp_path / "run")]
    assert recipe_module.main([*run, "--max_steps", "2"]) == 0
    write_jsonl(data, [d.replace("fox", "cat") for d in DOCS])
    capsys.readouterr()
    assert recipe_module.main([*run, "--max_steps", "4", "--resume_from_checkpoint", "latest"]) == 2
    err = capsys.readouterr().err
    assert f"the data's contents (edited since: {data})" in err  # the file is named
    assert "--reset_data_position" in err
    assert recipe_module.main([*run, "--max_steps", "4", "--resume_from_checkpoint", "latest",
                               "--reset_data_position"]) == 0
    assert len(list((tmp_path / "run" / "data").iterdir())) == 2  # the edited file was prepared anew


@pytest.mark.parametrize("argv, message", [
    (["plan", "--num_gpus", "0"], "--num_gpus=0: must be >= 1"),
    (["plan", "--gpu_memory_gib", "-8"], "--gpu_memory_gib=-8.0: must be a number > 0"),
    (["plan", "--gpu_memory_gib", "nan"], "--gpu_memory_gib=nan: must be a number > 0"),
    (["plan", "--block_size", "0"], "--block_size=0: must be in 1..4096"),
    (["plan", "--block_size", "100000000"], "--block_size=100000000: must be in 1..4096"),
    (["prune", ".", "--keep", "0"], "--keep=0: must be >= 1"),
    (["prune", ".", "--keep", "-1"], "--keep=-1: must be >= 1"),
])
def test_nonsense_numbers_are_one_line(argv, message, capsys):
    assert cli_main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_a_null_text_row_is_one_line(tmp_path, capsys):
    data = tmp_path / "a.jsonl"
    data.write_text('{"text": "fine"}\n{"text": null}\n')
    assert cli_main(["prepare-data", "--data_files", str(data), "--output_dir", str(tmp_path / "p")]) == 2
    assert f"--data_files: {data}:2: 'text' is null; give the row its text or remove the row" in capsys.readouterr().err


def test_a_resume_past_the_end_says_there_is_nothing_left_and_a_new_global_batch_is_named(tmp_path, recipe_module,
                                                                                          capsys):
    run = [*TINY, "--save_steps", "2", "--eval_steps", "0", "--output_dir", str(tmp_path)]
    assert recipe_module.main([*run, "--max_steps", "4"]) == 0
    capsys.readouterr()
    assert recipe_module.main([*run, "--max_steps", "2", "--resume_from_checkpoint", "latest"]) == 0
    out = capsys.readouterr().out
    assert "the checkpoint is at step 4, at or past the end of this run (2 steps" in out
    assert "continuing at step" not in out
    assert recipe_module.main([*run, "--max_steps", "6", "--per_device_train_batch_size", "2",
                               "--resume_from_checkpoint", "latest"]) == 0
    assert "global_batch_size: 4 -> 2" in capsys.readouterr().out


def test_one_redaction_masks_every_form_a_credential_takes():
    argv = ["recipe.py", "--storage_options", '{"key": "AKIAIOSFODNN7EXAMPLE", "secret": "S3cr3t", '
            '"client_kwargs": {"aws_session_token": "T0k"}}', "--hub_token", "hf_abcdefghijklmnopqrstuv",
            "--checkpoint_upload_to=s3://user:pw@bucket/x?X-Amz-Signature=abc", "--tokenizer_name", "tok/"]
    shown = " ".join(redact_argv(argv))
    for secret in ("AKIAIOSFODNN7EXAMPLE", "S3cr3t", "T0k", "hf_abcdefghijklmnopqrstuv", "user:pw", "=abc"):
        assert secret not in shown, secret
    assert "--tokenizer_name tok/" in shown  # names that merely contain 'token' stay
    assert redact_text("aws_secret_access_key=xyz password: hunter2 --hub_token hf_abcdefghijklmnopqrstuv") == \
        "aws_secret_access_key=*** password: *** --hub_token ***"


def test_a_dropped_connections_orphaned_task_prints_no_traceback(capsys, caplog):
    """Found by the fault campaign: when the store died mid-upload, aiohttp's orphaned write task made
    asyncio print "Task exception was never retrieved" with a traceback; the uploader already says it."""
    import asyncio

    from accel_trainer.checkpoint.remote import _quiet_orphaned_connection_errors

    loop = asyncio.new_event_loop()
    try:
        _quiet_orphaned_connection_errors(loop)
        loop.call_exception_handler({"message": "Task exception was never retrieved",
                                     "exception": ConnectionResetError("Cannot write to closing transport")})
        assert "Traceback" not in capsys.readouterr().err and not caplog.records
        loop.call_exception_handler({"message": "Task exception was never retrieved", "exception": ValueError("bug")})
        assert any("ValueError" in str(r.exc_info) for r in caplog.records)  # anything else still reported
    finally:
        loop.close()


def test_the_same_bytes_at_another_path_resume_exactly(tmp_path, recipe_module, monkeypatch):
    """A run moves (another machine, a copied corpus, a relative path): the data is its contents."""
    data = tmp_path / "here" / "a.jsonl"
    data.parent.mkdir()
    write_jsonl(data, DOCS)
    common = [a for a in TINY if a not in ("--max_corpus_bytes", "300000")] + [
        "--save_steps", "2", "--eval_steps", "0", "--logging_steps", "1"]
    straight = tmp_path / "straight"
    assert recipe_module.main([*common, "--data_files", str(data), "--output_dir", str(straight),
                               "--max_steps", "4"]) == 0
    moved = tmp_path / "moved"
    assert recipe_module.main([*common, "--data_files", str(data), "--output_dir", str(moved),
                               "--max_steps", "2"]) == 0
    copy = tmp_path / "elsewhere" / "corpus.jsonl"
    copy.parent.mkdir()
    copy.write_bytes(data.read_bytes())
    monkeypatch.chdir(copy.parent)
    assert recipe_module.main([*common, "--data_files", "corpus.jsonl", "--output_dir", str(moved),
                               "--max_steps", "4", "--resume_from_checkpoint", "latest"]) == 0

    def losses(run):
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        return {r["step"]: r["loss"] for r in rows if "loss" in r}

    assert losses(moved) == losses(straight)
