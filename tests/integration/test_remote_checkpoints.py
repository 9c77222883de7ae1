"""Object storage as a checkpoint tier, against a real S3 API: moto's server on 127.0.0.1, spoken to
over HTTP by s3fs (as a bucket on AWS, MinIO or R2 would be). Upload order and remote ``latest``,
remote retention, a killed upload, a damaged object, resume on an empty machine, reading tools."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

pytest.importorskip("s3fs")
moto_server = pytest.importorskip("moto.server")

from accel_trainer.checkpoint import CheckpointError, load_model_for_inference, verify  # noqa: E402
from accel_trainer.checkpoint.remote import RemoteTier, fetch, resolve_with_remote  # noqa: E402
from launching import REPO, TINY, launch, read_jsonl  # noqa: E402
from loops import Loop  # noqa: E402

BUCKET = "ckpts"


@pytest.fixture(scope="module")
def s3():
    """A local S3 endpoint; credentials are fake ones, given the usual way (environment)."""
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")}
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1")
    options = {"endpoint_url": endpoint}
    RemoteTier(f"s3://{BUCKET}", options).fs.mkdir(BUCKET)
    yield options
    server.stop()
    for k, v in saved.items():
        os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


@pytest.fixture
def url(request):
    return f"s3://{BUCKET}/{request.node.name[:40]}"


def uploaded_run(folder, url, s3, steps=(1, 2)) -> RemoteTier:
    loop = Loop(folder, upload_to=url, storage_options=s3)
    for step in steps:
        loop.train(1)
        loop.ckpt.save(step)
    loop.ckpt.close()
    return RemoteTier(url, s3)


def remote_state(tier: RemoteTier) -> dict:
    return {"steps": sorted(tier.listing()), "latest": tier.read_pointer("latest"), "best": tier.read_pointer("best")}


def test_every_checkpoint_is_uploaded_in_commit_order_with_remote_retention(s3, url, tmp_path):
    loop = Loop(tmp_path / "run", save_total_limit=2, upload_to=url, storage_options=s3)
    for step in range(1, 6):
        loop.train(1)
        loop.ckpt.save(step, metrics={"val_loss": {1: 3.0, 2: 1.0}.get(step, 2.0)})  # step-2 is best
        loop.ckpt.wait_for_uploads()  # else a step still queued when the next is saved is skipped (newest wins)
    loop.ckpt.close()
    tier = RemoteTier(url, s3)
    # Newest two, plus best; the others deleted remotely too.
    assert remote_state(tier) == {"steps": ["step-2", "step-4", "step-5"], "latest": "step-5", "best": "step-2"}
    for name in ("step-2", "step-4", "step-5"):
        assert tier.problems(name, checksums=True) == ([], json.loads(tier.cat(name, "manifest.json")))
    local = json.loads((tmp_path / "run" / "checkpoints" / "step-5" / "manifest.json").read_text())
    assert json.loads(tier.cat("step-5", "manifest.json")) == local  # the same files, byte for byte checked


@pytest.mark.parametrize("cut", ["some files", "all files", "manifest", "COMPLETE, no pointer"])
def test_an_upload_stopped_at_any_point_never_moves_or_breaks_remote_latest(s3, url, tmp_path, cut):
    tier = uploaded_run(tmp_path / "run", url, s3)
    assert tier.read_pointer("latest") == "step-2"
    # Fake a step-3 upload that stopped at `cut`: its objects are those the protocol had written.
    folder = tmp_path / "run" / "checkpoints" / "step-2"
    files = list(json.loads((folder / "manifest.json").read_text())["files"])
    sent = {"some files": files[:2], "all files": files, "manifest": files + ["manifest.json"],
            "COMPLETE, no pointer": files + ["manifest.json", "COMPLETE"]}[cut]
    for f in sent:
        tier.fs.put_file(str(folder / f), tier.path("step-3", f))
    assert tier.read_pointer("latest") == "step-2"
    name, _, _ = tier.latest_valid()
    # Only a fully committed copy counts (step-3 here is a byte-identical copy of step-2's files).
    assert name == ("step-3" if cut == "COMPLETE, no pointer" else "step-2")


def test_kill_9_during_an_upload_leaves_remote_latest_valid(s3, url, tmp_path):
    uploaded_run(tmp_path / "run", url, s3, steps=(1,))
    loop2 = Loop(tmp_path / "run2")  # a second, unuploaded checkpoint to send from a child process
    loop2.train(2)
    folder = loop2.ckpt.save(2)
    loop2.ckpt.close()
    child = subprocess.Popen([sys.executable, "-c", f"""
import json, sys, time
sys.path.insert(0, {str(REPO)!r})
from accel_trainer.checkpoint.remote import RemoteTier
tier = RemoteTier({url!r}, {s3!r}, workers=1)
put = tier.fs.put_file
def slow_put(*a, **k):  # a slow network: the kill lands mid-upload
    print("put", a[1], flush=True); put(*a, **k); time.sleep(1.0)
tier.fs.put_file = slow_put
tier.upload(__import__("pathlib").Path({str(folder)!r}))
tier.write_pointer("latest", "step-2")
"""], stdout=subprocess.PIPE, text=True, env=os.environ.copy())
    assert "put" in child.stdout.readline()
    time.sleep(1.5)
    child.send_signal(signal.SIGKILL)
    child.wait()
    tier = RemoteTier(url, s3)
    assert "step-2" in tier.listing() and "COMPLETE" not in tier.listing()["step-2"]  # half uploaded
    assert tier.read_pointer("latest") == "step-1" and tier.latest_valid()[0] == "step-1"
    target = tmp_path / "fresh"
    found = resolve_with_remote("latest", target, tier, progress=False)
    assert found.path == target / "checkpoints" / "step-1"


def test_a_damaged_remote_object_fails_verify_and_latest_falls_back(s3, url, tmp_path):
    tier = uploaded_run(tmp_path / "run", url, s3)
    obj = tier.path("step-2", "model.safetensors")
    data = bytearray(tier.fs.cat_file(obj))
    data[-10] ^= 0xFF  # same size: only a checksum finds it
    tier.fs.pipe_file(obj, bytes(data))
    cli = [sys.executable, "-m", "accel_trainer.cli"]
    out = subprocess.run([*cli, "verify", url, "--storage_options", json.dumps(s3)], capture_output=True, text=True,
                         cwd=REPO)
    assert out.returncode == 1, out.stderr
    assert "BAD" in out.stdout and "step-2/model.safetensors: checksum mismatch" in out.stdout
    reports = []
    found = resolve_with_remote("latest", tmp_path / "fresh", tier, report=reports.append, progress=False)
    assert found.path.name == "step-1" and any("skips the remote step-2" in r for r in reports)


def test_a_damaged_local_checkpoint_downloads_only_its_damaged_files_from_the_store(s3, url, tmp_path):
    tier = uploaded_run(tmp_path / "run", url, s3)
    local = tmp_path / "run" / "checkpoints" / "step-2"
    damaged = local / "optimizer.safetensors"
    data = bytearray(damaged.read_bytes())
    data[-10] ^= 0xFF  # a bad sector: same size, another checksum
    damaged.write_bytes(bytes(data))
    intact = {p.name: p.stat().st_ino for p in local.iterdir() if p.name not in ("optimizer.safetensors",)}
    reports = []
    found = resolve_with_remote("latest", tmp_path / "run", tier, report=reports.append, progress=False)
    assert found.path == local and verify(local) == []
    files = len(json.loads((local / "manifest.json").read_text())["files"])
    assert any(f"{files - 1} of {files} files intact locally; downloading 1 (optimizer.safetensors" in r
               for r in reports), reports
    assert any("its local copy does not verify: downloading it" in r for r in reports)
    # The intact files are the same inodes (linked, not downloaded again); the damaged one is new.
    kept = {n: (local / n).stat().st_ino for n in intact if n not in ("manifest.json", "COMPLETE")}
    assert kept == {n: i for n, i in intact.items() if n in kept}
    assert damaged.read_bytes() == tier.fs.cat_file(tier.path("step-2", "optimizer.safetensors"))


def test_frozen_tensors_linked_locally_are_copied_inside_the_store_not_sent_again(s3, url, tmp_path, monkeypatch):
    loop = Loop(tmp_path / "run", upload_to=url, storage_options=s3)
    loop.model.get_input_embeddings().weight.requires_grad_(False)  # frozen: no gradient, never changes
    tier = RemoteTier(url, s3)
    copies = []
    real_copy = loop.ckpt.remote.fs.copy  # the uploader's own filesystem object

    def spy(src, dst, *args, **kwargs):
        copies.append(dst)
        return real_copy(src, dst, *args, **kwargs)

    monkeypatch.setattr(loop.ckpt.remote.fs, "copy", spy)
    for step in (1, 2):
        loop.train(1)
        loop.ckpt.save(step)
    loop.ckpt.close()
    local = tmp_path / "run" / "checkpoints"
    frozen = "model.frozen.safetensors"
    assert (local / "step-1" / frozen).stat().st_ino == (local / "step-2" / frozen).stat().st_ino
    assert [c.rsplit("/", 2)[-2:] for c in copies] == [["step-2", frozen]]  # one copy in the store, no upload
    assert tier.problems("step-2", checksums=True)[0] == []
    assert tier.fs.cat_file(tier.path("step-2", frozen)) == (local / "step-2" / frozen).read_bytes()


def test_reading_tools_take_an_s3_url(s3, url, tmp_path, monkeypatch):
    monkeypatch.setenv("ACCEL_TRAINER_CACHE", str(tmp_path / "cache"))
    loop = Loop(tmp_path / "run", upload_to=url, storage_options=s3)
    loop.train(1)
    loop.ckpt.save(1)
    loop.ckpt.close()
    model, config, step = load_model_for_inference(url, device="cpu", storage_options=s3)
    assert step == 1 and model.load_report.exact
    reference = loop.accelerator.unwrap_model(loop.model).state_dict()
    assert all(torch.equal(v, reference[k]) for k, v in model.state_dict().items())
    assert fetch(url, s3).is_relative_to(tmp_path / "cache")  # cached: the second call downloads nothing
    cli = [sys.executable, "-m", "accel_trainer.cli"]
    options = ["--storage_options", json.dumps(s3)]
    listed = subprocess.run([*cli, "list", url, *options], capture_output=True, text=True, cwd=REPO,
                            env={**os.environ, "ACCEL_TRAINER_CACHE": str(tmp_path / "cache")})
    assert listed.returncode == 0 and "step-1" in listed.stdout and "latest" in listed.stdout, listed.stderr
    inspected = subprocess.run([*cli, "inspect", url, *options], capture_output=True, text=True, cwd=REPO,
                               env={**os.environ, "ACCEL_TRAINER_CACHE": str(tmp_path / "cache")})
    assert inspected.returncode == 0 and "progress     step 1" in inspected.stdout, inspected.stderr


def test_unreachable_storage_is_one_line_and_training_goes_on(s3, tmp_path, capsys):
    url = "s3://no-such-bucket/run"
    loop = Loop(tmp_path / "run", upload_to=url, storage_options=s3)
    loop.train(1)
    assert loop.ckpt.save(1) is not None  # the local checkpoint is saved
    loop.ckpt.close()
    out = capsys.readouterr().out
    assert "--checkpoint_upload_to: s3://no-such-bucket/run: the bucket 'no-such-bucket' does not exist" in out
    assert "checkpoint upload of step-1 to s3://no-such-bucket/run failed" in out
    assert "testing" not in out  # no credential in any line
    with pytest.raises(CheckpointError, match="does not exist.*--save_strict"):
        Loop(tmp_path / "strict", upload_to=url, storage_options=s3, save_strict=True)


def test_resume_on_an_empty_machine_downloads_the_remote_latest_and_is_bit_exact(s3, url, tmp_path):
    args = [*TINY, "--max_steps", "6", "--lr_schedule_steps", "6", "--save_steps", "3", "--eval_steps", "0",
            "--logging_steps", "1", "--checkpoint_upload_to", url, "--storage_options", json.dumps(s3)]
    launch([*args, "--output_dir", str(tmp_path / "reference"), "--checkpoint_upload_to", url + "-reference"])
    first = launch([*args, "--max_steps", "3", "--output_dir", str(tmp_path / "node1")])
    assert "checkpoint: uploaded step-3" in first.stdout
    shutil.rmtree(tmp_path / "node1")  # the machine is gone; a new one starts with an empty disk
    second = launch([*args, "--output_dir", str(tmp_path / "node2"), "--resume_from_checkpoint", "latest"])
    assert "is newer than any local checkpoint: downloading it" in second.stdout
    reference = {r["step"]: r["loss"] for r in read_jsonl(tmp_path / "reference" / "metrics.jsonl")}
    resumed = {r["step"]: r["loss"] for r in read_jsonl(tmp_path / "node2" / "metrics.jsonl")}
    assert all(resumed.get(s) == reference[s] for s in (4, 5, 6)), (resumed, reference, second.stdout[-3000:])
    saved = json.loads((tmp_path / "node2" / "checkpoints" / "step-6" / "run_config.json").read_text())
    assert json.loads(saved["storage_options"]) == s3  # an endpoint is kept; keys would read "***"


def test_sharded_checkpoints_upload_per_rank_in_parallel_and_resume_from_the_remote(s3, url, tmp_path):
    """FSDP2 on 2 CPU ranks: each rank uploads the shards it wrote; rank 0 commits after both."""
    worker = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
              str(__import__("launching").free_port()), str(REPO / "tests" / "integration" / "sharded_ckpt_worker.py")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    remote = ["--upload_to", url, "--storage_options", json.dumps(s3)]
    out = subprocess.run([*worker, str(tmp_path / "node1"), "--steps", "4", "--async_save", *remote],
                         capture_output=True, text=True, timeout=300, cwd=REPO, env=env)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    assert "checkpoint: uploaded step-4" in out.stdout and "2 ranks in parallel" in out.stdout, out.stdout
    tier = RemoteTier(url, s3)
    assert tier.read_pointer("latest") == "step-4"
    assert {"sharded/__0_0.distcp", "sharded/__1_0.distcp", "sharded/.metadata"} <= set(tier.listing()["step-4"])
    assert tier.problems("step-4", checksums=True)[0] == []
    # A new machine: nothing local; it resumes from the remote (downloaded once, by rank 0).
    again = subprocess.run([*worker, str(tmp_path / "node2"), "--steps", "6", "--resume", *remote],
                           capture_output=True, text=True, timeout=300, cwd=REPO, env=env)
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-3000:]
    assert "resumed from" in again.stdout and "step 4" in again.stdout
    assert tier.read_pointer("latest") == "step-6"


def test_network_errors_are_retried_with_backoff_then_reported_naming_the_file(s3, url, tmp_path):
    loop = Loop(tmp_path / "run")
    loop.train(1)
    folder = loop.ckpt.save(1)
    loop.ckpt.close()
    tier = RemoteTier(url, s3, retries=3, backoff=0.01)
    put, calls = tier.fs.put_file, []

    def flaky(local, remote, **kw):  # every file fails twice, then goes through
        calls.append(remote)
        if calls.count(remote) <= 2:
            raise ConnectionError("connection reset by peer")
        return put(local, remote, **kw)

    tier.fs.put_file = flaky
    tier.upload(folder)
    assert tier.latest_valid()[0] == "step-1"
    tier.fs.put_file = lambda *a, **k: (_ for _ in ()).throw(ConnectionError("network is unreachable"))
    tier.begin("step-1")
    with pytest.raises(CheckpointError, match=r"uploading .*model\.safetensors to s3://.*step-1/model\.safetensors: "
                                              r"ConnectionError: network is unreachable"):
        tier.put(folder, ["model.safetensors"])


HOLD_WITH_SECRETS = """
import sys, time
from accel_trainer.checkpoint import RunLock
RunLock.acquire(sys.argv[1])
print("held", flush=True)
time.sleep(600)
"""


def test_no_credential_reaches_a_file_a_log_or_an_error(tmp_path, s3, url, capsys):
    """A credential hunt over every file and stream of a run that used --storage_options with secrets,
    and over the lock and the one-line error a second run on the busy dir gets."""
    import subprocess

    from launching import RECIPE, TINY, launch

    secrets = {"key": "testing", "secret": "SuperSecret-9f8e7d",
               "client_kwargs": {"aws_session_token": "SessTok-4c3b2a"}}
    options = json.dumps({**s3, **secrets})
    out = tmp_path / "run"
    proc = launch([*TINY, "--max_steps", "2", "--save_steps", "2", "--output_dir", str(out), "--report_to",
                   "tensorboard",
                   "--checkpoint_upload_to", url, "--storage_options", options])
    leaks = ("SuperSecret-9f8e7d", "SessTok-4c3b2a")
    streams = proc.stdout + proc.stderr
    assert not [s for s in leaks if s in streams]
    for path in out.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            assert not [s for s in leaks if s.encode() in data], path
    assert (out / "exit_status.json").stat().st_mode & 0o077 == 0  # describes the run: its owner's only
    # A second run on a dir another run holds: the lock file and the error name the holder, not its secrets.
    busy = tmp_path / "busy"
    busy.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", HOLD_WITH_SECRETS, str(busy), "--storage_options", options,
                               "--hub_token", "hf_abcdefghijklmnopqrstuvwx"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        lock = (busy / ".lock").read_text()
        assert (busy / ".lock").stat().st_mode & 0o077 == 0
        refused = launch([*TINY, "--max_steps", "1", "--output_dir", str(busy)], check=False, script=RECIPE)
        assert refused.returncode == 2 and "is in use by another run" in refused.stderr
        for text in (lock, refused.stderr, refused.stdout):
            assert not [s for s in (*leaks, "hf_abcdefghijklmnopqrstuvwx") if s in text], text
    finally:
        holder.kill()
        holder.wait()


def test_a_store_gone_for_good_ends_with_status_4_saying_so_once_per_outage(tmp_path):
    """The run trains on and keeps every checkpoint locally, but does not claim a plain 'finished':
    exit status 4, one warning when the outage begins and one summary, not a line per request."""
    from launching import TINY, free_port, launch

    options = {"endpoint_url": f"http://127.0.0.1:{free_port()}",  # nothing listens there
               "config_kwargs": {"retries": {"max_attempts": 1}}}
    out = tmp_path / "run"
    proc = launch([*TINY, "--max_steps", "4", "--save_steps", "2", "--eval_steps", "0", "--output_dir", str(out),
                   "--checkpoint_upload_to", "s3://bucket/run", "--storage_options", json.dumps(options)], check=False,
                  env={"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_DEFAULT_REGION": "us-east-1"})
    assert proc.returncode == 4, proc.stderr[-3000:]
    status = json.loads((out / "exit_status.json").read_text())
    assert status["exit_code"] == 4 and "object store" in status["meaning"]
    assert "the object store's newest complete checkpoint is nothing, the local one step-4" in proc.stderr
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if "checkpoint upload" in line]
    assert 1 <= len(lines) <= 3, lines
    assert not [line for line in lines if "RemoteError: RemoteError" in line]
    assert (out / "checkpoints" / "step-4" / "COMPLETE").is_file()  # the local tier is whole
