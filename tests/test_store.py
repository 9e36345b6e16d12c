"""The teacher store on a local disk, memory:// and a real S3-protocol server (moto on 127.0.0.1).

Covers: generate / resume / verify, a real `amed teacher generate` killed with SIGKILL and resumed,
a corrupted byte refused by readers, missing credentials, concurrent writers, the streaming reader,
and training from stored shards reproducing training from on-the-fly trajectories.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
import torch

from amed_core.denoisers import load_teacher
from amed_core.schedules import ScheduleSpec
from amed_core.teacher import TeacherSpec, generate_shard, shard_to_batches, student_grids_for, trajectory_inputs
from fixtures_s3 import s3_bucket, s3_server  # noqa: F401
from flows.cli import main as amed_main
from flows.storage import ShardVerificationError, StoreCredentialsError, TeacherStore, generate, redact, s3_options_from_env

REPO = Path(__file__).resolve().parents[1]
GRID_FOR = "amed:3,5;amed+ipndm:3"


@pytest.fixture(scope="module")
def teacher():
    return load_teacher("digits-gmm")


@pytest.fixture(scope="module")
def spec(teacher):
    return TeacherSpec.for_denoiser(teacher, student_grids_for(GRID_FOR), num_trajectories=24, shard_size=8,
                                    sub_steps=0)


@pytest.fixture(scope="module")
def shards(teacher, spec):
    """The spec's shards, generated once in memory (the store tests compare against these)."""
    return [generate_shard(teacher, spec, i) for i in range(spec.num_shards)]


@pytest.fixture(params=["local", "memory", "s3"])
def store_url(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "store")
    if request.param == "memory":
        return f"memory://teachers-{uuid.uuid4().hex[:8]}"
    bucket = request.getfixturevalue("s3_bucket")
    return f"s3://{bucket}/sweep"


def _fill(store, spec, shards, indices):
    store.put_spec(spec)
    for i in indices:
        store.commit_shard(spec, shards[i])


def test_generate_resume_verify_and_corruption(store_url, teacher, spec, shards):
    store = TeacherStore(store_url)
    assert store.list_specs() == []
    first = generate(store, teacher, spec, progress=False, shards=[0])
    assert (first.shards_written, first.shards, first.nfe_spent) == (1, 1, 8 * shards[0].nfe)
    assert store.missing_shards(spec) == [1, 2]
    assert not store.verify(spec.spec_hash).passed
    rest = generate(store, teacher, spec, progress=False)  # resumes: only the missing ones
    assert (rest.shards_written, rest.shards_skipped, rest.shards, rest.trajectories) == (2, 1, 3, 24)
    again = generate(store, teacher, spec, progress=False)
    assert (again.shards_written, again.nfe_spent) == (0, 0)
    report = store.verify(spec.spec_hash)
    assert report.passed and report.ok == [0, 1, 2] and report.bytes == rest.bytes
    assert store.list_specs() == [spec.spec_hash] and store.get_spec(spec.spec_hash) == spec
    for i in range(3):
        got = store.read_shard(spec.spec_hash, i)
        assert torch.equal(got.noise, shards[i].noise)
        torch.testing.assert_close(got.states, shards[i].states, rtol=0, atol=0)
    # Flip one byte in the middle of shard 1: readers and verify refuse it loudly.
    path = store.shard_path(spec.spec_hash, 1)
    data = bytearray(store.fs.cat_file(path))
    data[len(data) // 2] ^= 0x01
    store.fs.pipe_file(path, bytes(data))
    with pytest.raises(ShardVerificationError, match="xxh3_128 .*corrupted"):
        store.read_shard(spec.spec_hash, 1)  # the default (fast) check
    with pytest.raises(ShardVerificationError, match="sha256 .*corrupted"):
        store.read_shard(spec.spec_hash, 1, check="full")
    full = TeacherStore(store_url, read_check="full")
    assert torch.equal(full.read_shard(spec.spec_hash, 0).states, shards[0].states)
    with pytest.raises(ShardVerificationError, match="sha256 .*corrupted"):
        full.read_shard(spec.spec_hash, 1)
    report = store.verify(spec.spec_hash)
    assert not report.passed and list(report.bad) == [1]
    with pytest.raises(ShardVerificationError, match="corrupted"):
        list(store.iter_batches(spec.spec_hash, spec.grids[0].sigmas(), 8, shuffle=False))
    assert amed_main(["teacher", "verify", "--store", store_url, spec.spec_hash[:10]]) == 1


def test_streaming_reader(tmp_path, spec, shards):
    store = TeacherStore(str(tmp_path))
    _fill(store, spec, shards, range(3))
    sig = spec.grids[1].sigmas()
    # In order: exactly the shards' trajectories at the student's grid, across shard boundaries.
    ordered = list(store.iter_batches(spec.spec_hash, sig, 5, shuffle=False))
    assert [b.noise.shape[0] for b in ordered] == [5, 5, 5, 5, 4]
    expect = [b for s in shards for b in shard_to_batches(s, sig)]
    noise = torch.cat([b.noise for b in expect])
    states = torch.cat([b.states for b in expect], dim=1)
    assert torch.equal(torch.cat([b.noise for b in ordered]), noise)
    assert torch.equal(torch.cat([b.states for b in ordered], dim=1), states)
    # Shuffled: every trajectory once per epoch, seeded, different orders for different seeds.
    def order(seed, **kw):
        out = torch.cat([b.noise for b in store.iter_batches(spec.spec_hash, sig, 4, seed, window_shards=2, **kw)])
        return [int(torch.nonzero((noise == row).all(dim=(1, 2, 3)))[0]) for row in out]

    a, b, c = order(1), order(1), order(2)
    assert sorted(a) == list(range(24)) and a == b and a != c and a != sorted(a)
    two = order(1, epochs=2)
    assert sorted(two) == sorted(list(range(24)) * 2)
    assert sorted(order(3, num_trajectories=10)) == list(range(10))
    # Early stop of the consumer ends the prefetch thread.
    it = store.iter_batches(spec.spec_hash, sig, 4, 0, epochs=None, prefetch=1)
    next(it)
    it.close()
    deadline = time.time() + 5
    while any(t.name.startswith("teacher-prefetch") for t in threading.enumerate()) and time.time() < deadline:
        time.sleep(0.01)
    assert not any(t.name.startswith("teacher-prefetch") for t in threading.enumerate())
    # Incomplete teachers are refused unless asked.
    store2 = TeacherStore(str(tmp_path / "partial"))
    _fill(store2, spec, shards, [0, 2])
    with pytest.raises(ShardVerificationError, match="lacks shards \\[1\\]"):
        next(store2.iter_batches(spec.spec_hash, sig, 4))
    assert len(list(store2.iter_batches(spec.spec_hash, sig, 4, require_complete=False))) == 4


@pytest.mark.parametrize("backend", ["local", "s3"])
def test_concurrent_writers_and_conflicting_bytes(backend, tmp_path, request, spec, shards):
    url = str(tmp_path / "c") if backend == "local" else f"s3://{request.getfixturevalue('s3_bucket')}/c"
    # Many writers commit the same shards at once: each shard is recorded once, consistently.
    errors = []

    def writer(order):
        try:
            st = TeacherStore(url)
            st.put_spec(spec)
            for i in order:
                st.commit_shard(spec, shards[i])
        except Exception:  # pragma: no cover - reported below
            import traceback
            errors.append(traceback.format_exc())

    threads = [threading.Thread(target=writer, args=(o,)) for o in ([0, 1, 2], [2, 1, 0], [1, 0, 2], [0, 2, 1])]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]
    store = TeacherStore(url)
    assert sorted(store.manifest(spec.spec_hash)) == [0, 1, 2] and store.verify(spec.spec_hash).passed
    # A writer whose bytes differ (another GPU's rounding) loses to the stored object and adopts it.
    other = TeacherStore(url)
    perturbed = type(shards[0])(spec_hash=spec.spec_hash, index=0, seeds=shards[0].seeds, noise=shards[0].noise,
                                states=shards[0].states + 1e-3, sigmas=shards[0].sigmas, nfe=shards[0].nfe)
    entry = other.commit_shard(spec, perturbed)
    assert entry == store.manifest(spec.spec_hash)[0]
    assert torch.equal(store.read_shard(spec.spec_hash, 0).states, shards[0].states)
    # A shard object left without its entry (writer killed in between) is adopted, not regenerated.
    st = TeacherStore(url if backend == "s3" else str(tmp_path / "orphan"))
    spec2 = TeacherSpec.from_dict(spec.to_dict() | {"base_seed": 7})
    st.put_spec(spec2)
    orphan = generate_shard(load_teacher("digits-gmm"), spec2, 1)
    st.fs.pipe_file(st.shard_path(spec2.spec_hash, 1), orphan.to_bytes())
    assert st.missing_shards(spec2) == [0, 1, 2]
    assert st.adopt_shard(spec2, 1)["num_samples"] == 8 and st.missing_shards(spec2) == [0, 2]


@pytest.mark.parametrize("backend", ["local", "s3"])
def test_shard_claims_split_the_work_and_survive_dead_holders(backend, tmp_path, request, spec, shards):
    """Two writers of one teacher compute each shard once (flows.storage.claims): a live claim sends the other
    writer to the next shard, a committed shard is handed over as its entry, and a claim whose holder died (a gone
    pid on this host) or stopped renewing (expired) is taken over."""
    import json as _json

    url = str(tmp_path / "claims") if backend == "local" else f"s3://{request.getfixturevalue('s3_bucket')}/claims"
    a, b = TeacherStore(url), TeacherStore(url)
    a.put_spec(spec)
    book_a, book_b = a.claims(spec, ttl=2.0), b.claims(spec, ttl=2.0)
    held = book_a.try_claim(0)
    assert held is not None and not isinstance(held, dict)
    assert book_b.try_claim(0) is None and book_b.holder(0)["pid"] == os.getpid()
    # b skips the held shard, does the others, and gets shard 0 as its entry once a commits it
    order = []
    for i, got in book_b.each(range(spec.num_shards), poll=0.05):
        order.append(i)
        if isinstance(got, dict):
            assert i == 0 and got == a.manifest(spec.spec_hash)[0]
            continue
        with got:
            b.commit_shard(spec, shards[i])
        if i == spec.num_shards - 1:  # the holder finishes while b is at its last shard
            a.commit_shard(spec, shards[0])
            held.release()
    assert order == [1, 2, 0] and a.verify(spec.spec_hash).passed
    assert not a.fs.exists(f"{a.spec_dir(spec.spec_hash)}/claims/shard-00001.json")  # released
    # the claim renews itself while held, and expires once its holder stops renewing. Timed by the claim's own
    # expiry, not by sleeps sized for an idle box (issue 20): a renewal every TTL/4 leaves 0.75 s of slack for a
    # starved thread on a loaded machine (was 0.3 s)
    spec2 = TeacherSpec.from_dict(spec.to_dict() | {"base_seed": 11})
    a.put_spec(spec2)
    c = a.claims(spec2, ttl=1.0).try_claim(0)
    first = c.body["expires"]
    while time.time() <= first + 0.1:  # past its first expiry
        time.sleep(0.05)
    assert c.body["expires"] > first and a.claims(spec2, ttl=1.0).try_claim(0) is None  # renewed: still live
    c._stop.set()
    c._thread.join()
    while time.time() <= c.body["expires"] + 0.05:  # the last renewal's expiry passes
        time.sleep(0.05)
    taken = a.claims(spec2, ttl=1.0).try_claim(0)
    assert taken is not None and not isinstance(taken, dict) and taken.body["token"] != c.body["token"]
    taken.release()
    # a claim of a process that is gone (same host) is taken over at once, whatever its expiry
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    body = {"host": book_a.owner["host"], "pid": dead.pid, "token": "x", "expires": time.time() + 3600, "index": 1}
    a.fs.pipe_file(book_a.path(1).replace(a.spec_dir(spec.spec_hash), a.spec_dir(spec2.spec_hash)),
                   _json.dumps(body).encode())
    got = a.claims(spec2).try_claim(1)
    assert got is not None and not isinstance(got, dict)
    got.release()


def test_s3_options_credentials_and_redaction(s3_server, s3_bucket, monkeypatch, caplog, spec, shards, capsys):
    assert s3_options_from_env({"AWS_ENDPOINT_URL": "http://x", "AWS_REGION": "eu-west-1", "AWS_PROFILE": "p"}) == {
        "client_kwargs": {"endpoint_url": "http://x", "region_name": "eu-west-1"}, "profile": "p"}
    with caplog.at_level(logging.DEBUG):  # nothing - ours, s3fs's or botocore's debug logs - shows the secret
        store = TeacherStore(f"s3://{s3_bucket}/r", storage_options={"key": "AKIAEXAMPLE", "secret": "s3cr3t-value",
                                                                       "endpoint_url": s3_server})
        _fill(store, spec, shards, [0])
        assert store.verify(spec.spec_hash).ok == [0]
    assert "s3cr3t-value" not in caplog.text and caplog.text
    assert "s3cr3t-value" not in repr(store) and "AKIAEXAMPLE" not in repr(store)
    assert redact({"client_kwargs": {"aws_secret_access_key": "x"}}) == {"client_kwargs": {"aws_secret_access_key": "***"}}
    # No credentials anywhere: a clear message, from the API and from the CLI (exit 3).
    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(k, raising=False)
    with pytest.raises(StoreCredentialsError, match="AWS_ACCESS_KEY_ID"):
        TeacherStore(f"s3://{s3_bucket}/r").list_specs()
    assert amed_main(["teacher", "ls", "--store", f"s3://{s3_bucket}/r"]) == 3
    assert "no usable credentials" in capsys.readouterr().err


def _cli_env():
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


@pytest.mark.parametrize("backend", ["local", "s3"])
def test_cli_generate_killed_then_resumed(backend, tmp_path, request, capsys):
    """A real `amed teacher generate` process is SIGKILLed after some shards commit; the rerun finishes the rest."""
    url = str(tmp_path / "cli") if backend == "local" else f"s3://{request.getfixturevalue('s3_bucket')}/cli"
    cmd = [sys.executable, "-m", "flows.cli", "teacher", "generate", "--teacher", "digits-gmm", "--grid-for", GRID_FOR,
           "--n", "40", "--shard-size", "4", "--sub-steps", "8", "--store", url, "--no-progress"]
    # The kill lands by barrier, not by timing (issue 20): shards 0 and 1 are generated and committed, then the process
    # waits before shard 2 (flows.storage.barriers) until it is killed.
    from flows.storage.barriers import Hold

    store = TeacherStore(url)
    with Hold(url, "teacher-shard", skip=2) as hold:
        proc = subprocess.Popen(cmd, cwd=REPO, env=_cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            try:
                hold.wait_reached(timeout=120, alive=lambda: proc.poll() is None)
            except (RuntimeError, TimeoutError) as e:
                raise AssertionError(f"{e}: {proc.stderr.read().decode() if proc.poll() is not None else ''}") from None
            proc.send_signal(signal.SIGKILL)
        finally:
            proc.wait(timeout=30)
    (spec_hash,) = store.list_specs()
    assert proc.returncode == -signal.SIGKILL
    done_before = len(store.manifest(spec_hash))
    assert done_before == 2
    report = store.verify(spec_hash)
    assert report.ok == sorted(store.manifest(spec_hash)) and report.missing and not report.bad
    assert amed_main(["teacher", "verify", "--store", url]) == 1
    capsys.readouterr()
    # Rerun the same command in-process (same code path, no second interpreter start): it resumes.
    assert amed_main(cmd[3:]) == 0
    out = capsys.readouterr().out
    assert "trajectories: 40 / 40" in out and "shards: 10 / 10" in out
    written = int(re.search(r"shards: 10 / 10 \((\d+) written now", out).group(1))
    assert written <= 10 - done_before  # finished shards (and an orphan, if any) are not regenerated
    assert amed_main(["teacher", "verify", "--store", url]) == 0
    spec = store.get_spec(spec_hash)
    killed_run = store.read_shard(spec_hash, 0)  # written one trajectory at a time by the killed process
    torch.testing.assert_close(killed_run.states, generate_shard(load_teacher("digits-gmm"), spec, 0).states, rtol=1e-6, atol=1e-6)
    assert amed_main(["teacher", "ls", "--store", url]) == 0
    assert spec_hash[:16] in capsys.readouterr().out
    leftovers = [p for p in store.fs.find(store.spec_dir(spec_hash)) if ".tmp-" in p]
    assert leftovers in ([], [p for p in leftovers if backend == "local"])  # a killed local writer may leave a temp file


@pytest.mark.parametrize("solver", ["amed", "amed+ipndm"])
def test_training_from_store_reproduces_on_the_fly(solver, tmp_path, teacher):
    """Same teacher (solver, M, grid), same per-sample noise: stored shards train the same predictor as on the fly."""
    from amed_core.amed import SamplerSpec, TrainConfig, teacher_states, train_amed
    from amed_core.amed.train import default_teacher

    # a polynomial (rho 7) student: the store refines its grid in that space, as the reference's teacher grid does
    sampler = SamplerSpec.create(solver, 3, afs=True, denoiser=teacher, schedule=ScheduleSpec("polynomial", rho=7.0))
    cfg = TrainConfig(num_trajectories=24, batch_size=8, seed=0)
    name, M, options = default_teacher(sampler, cfg)
    spec = TeacherSpec.for_denoiser(teacher, student_grids_for(f"{solver}:3", sampler.schedule), num_trajectories=24, shard_size=10,
                                    sub_steps=M, solver=name, solver_options=options, dtype="float64", base_seed=100)
    store = TeacherStore(str(tmp_path))
    generate(store, teacher, spec, progress=False)

    def on_the_fly():  # the reference's teacher (grid((M+1)(N-1)+1)), fed the spec's per-sample noise
        for lo in range(0, 24, 8):
            noise, _ = trajectory_inputs(range(100 + lo, 100 + lo + 8), teacher.shape)
            states, _ = teacher_states(teacher, sampler, noise, solver=name, M=M, options=options)
            yield from shard_to_batches_like(noise, states)

    def shard_to_batches_like(noise, states):
        from amed_core.teacher import TeacherBatch
        yield TeacherBatch(noise=noise, class_labels=None, states=states)

    live = train_amed(teacher, sampler, cfg, batches=on_the_fly())
    stored = train_amed(teacher, sampler, cfg, batches=store.iter_batches(spec.spec_hash, sampler.grid(), 8, shuffle=False))
    assert stored.trajectories == live.trajectories == 24
    torch.testing.assert_close(torch.tensor(stored.losses), torch.tensor(live.losses), rtol=1e-9, atol=1e-12)
    for (k, a), (_, b) in zip(live.predictor.state_dict().items(), stored.predictor.state_dict().items()):
        torch.testing.assert_close(b, a, rtol=1e-7, atol=1e-9, msg=k)
    # And a stored teacher trains at all: the predictor moved away from its initialisation.
    from amed_core.amed import AMEDPredictor
    init = AMEDPredictor(sampler.predictor, seed=cfg.seed).state_dict()
    assert any(not torch.equal(init[k], v) for k, v in stored.predictor.state_dict().items())


def test_checksums_fast_full_and_legacy_entries(tmp_path, spec, shards):
    """Entries carry SHA-256 and XXH3-128; the fast check uses XXH3, the full one both, an entry without XXH3
    (written before it existed) falls back to SHA-256; truncation is caught by size; bad options name the field."""
    import hashlib

    import xxhash

    store = TeacherStore(str(tmp_path / "store"))
    _fill(store, spec, shards, [0, 1])
    entries = store.manifest(spec.spec_hash)
    data = (tmp_path / "store" / "teachers" / spec.spec_hash / store.shard_name(0)).read_bytes()
    assert entries[0]["sha256"] == hashlib.sha256(data).hexdigest()
    assert entries[0]["xxh3_128"] == xxhash.xxh3_128(data).hexdigest()
    assert entries[0]["bytes"] == len(data)

    path = tmp_path / "store" / "teachers" / spec.spec_hash / store.shard_name(1)
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0x80  # the last byte of the last tensor
    path.write_bytes(bytes(raw))
    legacy = {k: v for k, v in entries[1].items() if k != "xxh3_128"}
    with pytest.raises(ShardVerificationError, match="sha256 .*corrupted"):
        store.read_shard(spec.spec_hash, 1, legacy)
    with pytest.raises(ShardVerificationError, match="xxh3_128 .*corrupted"):
        store.read_shard(spec.spec_hash, 1, entries[1])
    path.write_bytes(bytes(raw[:-3]))
    with pytest.raises(ShardVerificationError, match="truncated"):
        store.read_shard(spec.spec_hash, 1)
    path.write_bytes(b"")
    with pytest.raises(ShardVerificationError, match="0 bytes"):
        store.read_shard(spec.spec_hash, 1)
    with pytest.raises(ValueError, match="read_check must be one of"):
        TeacherStore(str(tmp_path / "store"), read_check="none")
    with pytest.raises(ValueError, match="check must be one of"):
        store.read_shard(spec.spec_hash, 0, check="sha1")


def test_local_read_is_a_private_writable_mapping(tmp_path, spec, shards):
    """Local shards are memory-mapped copy-on-write: the tensors are writable, and writing to them changes
    neither the file nor a later read."""
    store = TeacherStore(str(tmp_path / "store"))
    _fill(store, spec, shards, [0])
    path = tmp_path / "store" / "teachers" / spec.spec_hash / store.shard_name(0)
    before = path.read_bytes()
    got = store.read_shard(spec.spec_hash, 0)
    assert got.states.untyped_storage().data_ptr() != 0
    got.states.add_(1.0)  # would raise or crash on a read-only buffer
    got.noise.zero_()
    assert path.read_bytes() == before
    again = store.read_shard(spec.spec_hash, 0)
    assert torch.equal(again.states, shards[0].states) and torch.equal(again.noise, shards[0].noise)
