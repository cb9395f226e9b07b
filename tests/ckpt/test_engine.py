"""The checkpoint engine end to end, in real processes: crashes, corruption, preemption,
memory caps, tier policies and an S3 tier against a real S3-compatible server."""

from __future__ import annotations

import glob
import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest

import stalwart.formats as F
from stalwart.formats.atomic import read_latest

from .conftest import WORKERS, free_port, kill_keepers, run_group, shm_base, stalwart_shm_dirs

SINGLE = os.path.join(WORKERS, "single_train.py")


def train(root, *args, timeout=120, expect=0, env=None):
    # one intra-op thread, as the torchrun tests use: results then cannot depend on how many threads a
    # BLAS call got on a busy machine (a reference run once differed in its last bits under heavy load)
    res = run_group([sys.executable, SINGLE, "--root", str(root), *map(str, args)], timeout,
                    {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
    if expect is not None:
        assert res.returncode == expect, (res.returncode, res.stderr[-3000:])
    lines = [line for line in res.stdout.splitlines() if line.startswith("{")]
    return (json.loads(lines[-1]) if lines else None), res


def local_tier(root, **kw):
    return json.dumps(["memory", {"url": f"local:{root}/local", **kw}])


def test_sigkill_then_resume_is_bitwise(tmp_path, no_leftovers):
    ref, _ = train(tmp_path / "ref", "--steps", 12, "--tiers", local_tier(tmp_path / "ref"))
    out, _ = train(tmp_path / "run", "--steps", 12, "--kill-at", 7, "--tiers", local_tier(tmp_path / "run"),
                   "--linger", 60, expect=-9)
    assert out is None
    out, _ = train(tmp_path / "run", "--steps", 12, "--tiers", local_tier(tmp_path / "run"))
    # the newest complete snapshot (snapshots are skipped while one drains to disk)
    assert 1 <= out["start"] <= 7 and out["stats"]["restored_from"] == "memory"
    assert out["step"] == 12 and out["digest"] == ref["digest"]


def _flip_byte(path, offset_from_end=20):
    with open(path, "r+b") as f:
        f.seek(-offset_from_end, 2)
        b = f.read(1)
        f.seek(-offset_from_end, 2)
        f.write(bytes([b[0] ^ 0xFF]))


def test_corrupted_newest_step_falls_back_and_says_why(tmp_path, no_leftovers):
    root = tmp_path / "run"
    tiers = local_tier(root, keep_last=5)
    train(root, "--steps", 6, "--sleep", 0.05, "--tiers", tiers)
    local = root / "local"
    newest = read_latest(str(local))
    assert newest == "step-00000006"
    _flip_byte(glob.glob(str(local / newest / "rank-*.safetensors"))[0])
    assert not F.verify(str(local / newest)).ok
    out, res = train(root, "--steps", 6, "--tiers", tiers)
    assert out["start"] < 6, "the corrupt step must not be restored"
    why = " ".join(out["stats"]["fallbacks"]) + res.stderr
    assert "step 6" in why and "checksum mismatch" in why and "falling back" in why


def test_corrupted_memory_snapshot_falls_back_to_the_next_tier(tmp_path, no_leftovers):
    root = tmp_path / "run"
    tiers = local_tier(root, keep_last=5)
    train(root, "--steps", 6, "--sleep", 0.05, "--kill-at", 6, "--tiers", tiers, "--linger", 20, expect=-9)
    shm = glob.glob(os.path.join(shm_base(), "stalwart-*/slot-*/manifest.json"))
    mine = [m for m in shm if os.path.exists(m)]
    assert mine, "the keeper must still hold the snapshot in memory"
    for manifest in mine:  # corrupt every memory snapshot of this job
        for f in glob.glob(os.path.join(os.path.dirname(manifest), "rank-*.safetensors")):
            _flip_byte(f)
    out, _ = train(root, "--steps", 6, "--tiers", tiers)
    assert out["stats"]["restored_from"].startswith("local:")
    assert any("memory" in f and "checksum" in f for f in out["stats"]["fallbacks"])


def test_host_memory_stays_within_the_cap_over_100_snapshots(tmp_path, no_leftovers):
    cap = 3 * 2**20
    out, _ = train(tmp_path / "run", "--steps", 100, "--width", 96, "--max-host-memory", cap, "--slots", 2,
                   "--tiers", local_tier(tmp_path / "run", every=10))
    stats = out["stats"]
    # while a snapshot drains to the tier, later ones are skipped (documented back-pressure)
    assert stats["snapshots"] + stats["skipped"] == 100 and stats["snapshots"] >= 10
    assert 0 < stats["pool_bytes"] <= cap
    assert 0 < stats["shm_bytes"] <= cap, "shared memory actually used"
    assert stats["rss_growth"] < 32 * 2**20, "the trainer's memory does not grow with snapshots"
    # a cap below one snapshot is a clear error, not a crash later
    _, res = train(tmp_path / "small", "--steps", 3, "--width", 96, "--max-host-memory", 2**16, expect=1)
    assert "max_host_memory" in res.stderr and "needs" in res.stderr


def test_sigterm_writes_a_final_checkpoint_within_the_deadline(tmp_path, no_leftovers):
    root = tmp_path / "run"
    tiers = local_tier(root, every=1000)  # only the final (forced) checkpoint reaches disk
    t0 = time.monotonic()
    _, res = train(root, "--steps", 200, "--sleep", 0.02, "--term-at", 9, "--deadline", 20, "--tiers", tiers, expect=143)
    assert time.monotonic() - t0 < 60
    assert "final checkpoint of step 9" in res.stderr or "final checkpoint of step 10" in res.stderr
    latest = read_latest(str(root / "local"))
    assert latest in ("step-00000009", "step-00000010")
    assert F.verify(str(root / "local" / latest)).ok
    kill_keepers(stalwart_shm_dirs())  # the next run must restore from disk
    out, _ = train(root, "--steps", 12, "--tiers", tiers)
    assert out["start"] in (9, 10) and out["stats"]["restored_from"].startswith("local:")


def test_tier_every_retention_compression_and_durability(tmp_path, no_leftovers):
    root = tmp_path / "run"
    tiers = local_tier(root, every=2, keep_last=2, keep_every=4, compress="zstd")
    train(root, "--steps", 12, "--sleep", 0.1, "--tiers", tiers)
    local = root / "local"
    steps = sorted(int(d.split("-")[1]) for d in os.listdir(local) if d.startswith("step-"))
    assert 12 in steps and set(steps) <= {4, 8, 10, 12} and all(s % 2 == 0 for s in steps)
    assert len(steps) >= 3, steps
    for s in steps:
        files = os.listdir(local / f"step-{s:08d}")
        assert all(f.endswith(".zst") for f in files if f.startswith("rank-")), files
        assert F.verify(str(local / f"step-{s:08d}")).ok
    with open(local / "durability.json") as f:
        assert json.load(f)["steps"] == steps
    kill_keepers(stalwart_shm_dirs())
    out, _ = train(root, "--steps", 14, "--tiers", tiers)
    assert out["start"] == 12, "restores from the compressed tier"


@pytest.fixture
def s3_server():
    pytest.importorskip("moto")
    pytest.importorskip("s3fs")
    import boto3

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                boto3.client("s3", endpoint_url=url, aws_access_key_id="test", aws_secret_access_key="test",
                             region_name="us-east-1").create_bucket(Bucket="ckpt")
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_s3_tier_on_a_real_s3_server(tmp_path, s3_server, no_leftovers):
    options = {"key": "test", "secret": "test", "client_kwargs": {"endpoint_url": s3_server, "region_name": "us-east-1"}}
    tiers = json.dumps(["memory", {"url": "s3://ckpt/run7", "every": 3, "keep_last": 2, "options": options}])
    root = tmp_path / "run"
    ref, _ = train(tmp_path / "ref", "--steps", 9)
    train(root, "--steps", 9, "--stop-at", 6, "--sleep", 0.1, "--tiers", tiers)
    import s3fs

    fs = s3fs.S3FileSystem(**options)
    names = sorted(p.split("/")[-1] for p in fs.ls("ckpt/run7"))
    assert "latest" in names and "durability.json" in names and "step-00000006" in names
    from stalwart.ckpt.tiers import open_tier, parse_tier

    tier = open_tier(parse_tier({"url": "s3://ckpt/run7", "options": options}))
    local = tier.fetch(6)
    try:
        assert F.verify(local).ok
    finally:
        tier.release(local)
    kill_keepers(stalwart_shm_dirs())
    out, _ = train(root, "--steps", 9, "--tiers", tiers)
    assert out["start"] == 6 and out["stats"]["restored_from"] == "s3://ckpt/run7"
    assert out["digest"] == ref["digest"]


def _stress_trials(tmp_path, trials: int, seed: int) -> None:
    rnd = random.Random(seed)
    for trial in range(trials):
        root = tmp_path / f"t{trial}"
        tiers = local_tier(root, every=1, keep_last=3)
        cmd = [sys.executable, SINGLE, "--root", str(root), "--steps", "40", "--width", "384", "--sleep", "0.01",
               "--tiers", tiers, "--linger", "3"]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
        time.sleep(rnd.uniform(2.5, 5.0))  # import time + some steps: kills land during persistence
        victim = rnd.choice(["keeper", "trainer"])
        if victim == "keeper":
            kill_keepers(stalwart_shm_dirs(), remove=False)
        else:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=120)
        local = root / "local"
        latest = read_latest(str(local)) if local.exists() else None
        if latest is not None:
            report = F.verify(str(local / latest))
            assert report.ok, f"trial {trial} ({victim} killed): latest {latest} does not verify: {report.problems}"
        # nothing half-written is ever loaded: a fresh run restores a verified step (or starts fresh)
        kill_keepers(stalwart_shm_dirs())
        again, res = train(root, "--steps", 40, "--width", 384, "--tiers", tiers, "--linger", 1)
        assert again is not None, res.stderr[-2000:]
        assert not again["stats"]["fallbacks"], f"trial {trial}: a committed step failed to restore: {again['stats']['fallbacks']}"
        if latest is not None:
            # the keeper may still have committed a newer step after we looked
            assert again["start"] >= int(latest.split("-")[1]), (trial, victim, latest, again["start"])
        if again["start"]:
            restored = local / f"step-{again['start']:08d}"
            if restored.exists():
                assert F.verify(str(restored)).ok


def test_kill_keeper_or_trainer_during_persistence(tmp_path, no_leftovers):
    _stress_trials(tmp_path, trials=6, seed=5)


@pytest.mark.slow
@pytest.mark.timeout(3600)  # 60 trials of ~10 s each: past the suite's per-test limit
def test_kill_keeper_or_trainer_during_persistence_stress(tmp_path, no_leftovers):
    _stress_trials(tmp_path, trials=60, seed=6)
