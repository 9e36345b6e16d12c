"""Faults and bad inputs (issue 15): the fast probes, run in CI. ``bench/reliability.py`` runs these and the heavy
ones (SIGKILL during each stage, full disk, S3 killed mid-generate, ...) and prints the table kept in BENCHMARKS.md.

Every bad input must end in one line that names the problem and the fix, a non-zero exit, no traceback, and nothing
partial written. Each test here failed on the code before its fix (issue 15's list), or keeps a solid behaviour.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from flows.config import load_sweep
from fixtures_s3 import s3_server  # noqa: F401
from flows.storage.credentials import redact, secret_paths

REPO = Path(__file__).resolve().parents[1]
AMED = [sys.executable, "-m", "flows.cli"]
MINIMAL = {"datasets": [{"name": "digits", "teacher": "digits-gmm"}]}
CANARY = "AMEDCANARY0SECRET0do0not0leak0000000000"


def amed(*args: str, cwd: Path | None = None, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """``amed ARGS`` as a real process (what a user runs); stdout + stderr captured."""
    full_env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    return subprocess.run([*AMED, *args], cwd=cwd or REPO, env=full_env, capture_output=True, text=True, timeout=timeout)


def one_line_error(proc: subprocess.CompletedProcess) -> str:
    """A non-zero exit with a short error and no traceback; returns stderr."""
    assert proc.returncode != 0, (proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    assert len(proc.stderr) < 2000, proc.stderr
    return proc.stderr


def _error(data) -> str:
    with pytest.raises(ValueError) as e:
        load_sweep(data)
    return str(e.value)


# ---------------------------------------------------------------------------------------------------------------
# Secrets: refused anywhere in storage_options; redacted wherever a config is recorded.

@pytest.mark.parametrize("options", [
    {"client_kwargs": {"aws_secret_access_key": CANARY}},
    {"client_kwargs": {"aws_session_token": CANARY}},
    {"key": "AKIAEXAMPLE", "secret": CANARY},
    {"s3_additional_kwargs": {"SSECustomerKey": CANARY}},
    {"config_kwargs": {"proxies": [{"auth": {"password": CANARY}}]}},
    {"client_kwargs": {"endpoint_url": f"http://user:{CANARY}@127.0.0.1:9000"}},
])
def test_secret_anywhere_in_storage_options_is_refused(options):
    msg = _error({**MINIMAL, "storage_options": options})
    assert "storage_options" in msg and "credentials" in msg and "AWS_SECRET_ACCESS_KEY" in msg
    assert CANARY not in msg  # the refusal never echoes the value


def test_plain_storage_options_still_accepted():
    opts = {"client_kwargs": {"endpoint_url": "http://127.0.0.1:9000", "region_name": "us-east-1"},
            "config_kwargs": {"signature_version": "s3v4"}, "use_ssl": False, "anon": False}
    assert load_sweep({**MINIMAL, "storage_options": opts}).storage_options == opts
    assert secret_paths(opts) == []


def test_redact_walks_the_whole_tree():
    cfg = {"storage_options": {"client_kwargs": {"aws_secret_access_key": CANARY, "endpoint_url": "http://h:9"},
                               "list": [{"token": CANARY}], "url": f"https://u:{CANARY}@h/x"}, "name": "s"}
    text = json.dumps(redact(cfg))
    assert CANARY not in text and "http://h:9" in text and '"name": "s"' in text


def test_credentials_error_does_not_send_users_to_storage_options(monkeypatch):
    from flows.storage import StoreCredentialsError, TeacherStore

    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    store = TeacherStore("s3://bucket/x", {"endpoint_url": "http://127.0.0.1:9"})
    with pytest.raises(StoreCredentialsError) as e:
        store.get_spec("abc")
    msg = str(e.value)
    assert "AWS_SECRET_ACCESS_KEY" in msg and "in the environment" in msg
    assert "key/secret in the store's storage options" not in msg and "never go in storage options" in msg


def test_recorded_configs_are_redacted_even_if_validation_is_bypassed(tmp_path):
    """Defence in depth: results.json and the MLflow params/sweep.json go through redact()."""
    import inspect

    import flows.distill as distill
    import flows.registry.sweep as sweep

    assert "redact(cfg_json)" in inspect.getsource(distill.register_stage)
    src = inspect.getsource(sweep.log_sweep)
    assert "redact(config.model_dump" in src and "config.to_json()" not in src


# ---------------------------------------------------------------------------------------------------------------
# Sweep configs: the bad inputs (fixed) and the solid ones (kept).

def test_nfe_true_is_not_nfe_one():
    msg = _error({**MINIMAL, "nfes": [True]})
    assert "nfes.0" in msg and "valid integer" in msg


@pytest.mark.parametrize("nfe", [10**9, 1001])
def test_huge_nfe_is_bounded(nfe):
    msg = _error({**MINIMAL, "nfes": [nfe]})
    assert "nfes" in msg and "1..1000" in msg


@pytest.mark.parametrize("where", ["seeds", "teacher.seed", "evaluation.seed"])
def test_huge_seed_is_refused_at_config_time(where):
    data = json.loads(json.dumps(MINIMAL))
    if where == "seeds":
        data["seeds"] = [2**70]
    else:
        section, field = where.split(".")
        data[section] = {field: 2**70}
    msg = _error(data)
    assert where.split(".")[0] in msg and ("9007199254740992" in msg or "less than or equal" in msg)


def test_unknown_teacher_option_is_refused_at_config_time():
    msg = _error({"datasets": [{"name": "d", "teacher": "digits-gmm", "options": {"foo": 1}}]})
    assert "datasets.0" in msg and "'foo'" in msg and "sigma_max" in msg
    assert load_sweep({"datasets": [{"name": "d", "teacher": "digits-gmm", "options": {"sigma_max": 40.0}}]})


def _bomb(levels: int = 9) -> str:
    """Nine levels of ``&aN [*aN-1 x 9]`` inside a teacher's options: a few hundred bytes, 9**9 values expanded."""
    items = "".join(f"        - &a{i} [{','.join(['*a' + str(i - 1)] * 9) if i else ','.join(['lol'] * 9)}]\n"
                    for i in range(levels))
    return "datasets:\n  - name: d\n    teacher: digits-gmm\n    options:\n      bomb:\n" + items


def test_yaml_alias_bomb_is_refused_before_expansion(tmp_path):
    import time

    path = tmp_path / "bomb.yaml"
    path.write_text(_bomb())
    t0 = time.perf_counter()
    msg = _error(path)
    assert "aliases" in msg and time.perf_counter() - t0 < 5


def test_huge_sweep_file_is_refused_by_size_before_reading(tmp_path):
    path = tmp_path / "big.yaml"
    with open(path, "wb") as f:
        f.write(b"datasets: []\n")
        f.truncate(50 << 20)  # sparse: 50 MB without writing them
    msg = _error(path)
    assert "bytes" in msg and "at most" in msg


def test_fifo_as_sweep_file_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "sweep.yaml"
    os.mkfifo(fifo)
    assert "not a regular file" in _error(fifo)


@pytest.mark.parametrize("data, words", [
    ({**MINIMAL, "nfes": [0]}, ["nfes"]),
    ({**MINIMAL, "nfes": [-3]}, ["nfes"]),
    ({**MINIMAL, "nfes": [3.5]}, ["nfes"]),
    ({**MINIMAL, "nfes": []}, ["nfes"]),
    ({**MINIMAL, "solvers": ["nope"]}, ["solvers", "nope"]),
    ({**MINIMAL, "colour": 1}, ["colour", "unknown field"]),
    ({**MINIMAL, "teacher": {"M": "two"}}, ["teacher.M"]),
    ({"datasets": [{"name": "d", "teacher": "digits-gmm"}, {"name": "d", "teacher": "digits-gmm"}]}, ["unique"]),
    ({**MINIMAL, "name": "../../etc"}, ["name"]),
    ({"datasets": [{"name": "../x", "teacher": "digits-gmm"}]}, ["datasets.0.name"]),
])
def test_solid_config_refusals_kept(data, words):
    msg = _error(data)
    assert all(w in msg for w in words), msg


def test_non_mapping_and_python_tags_refused():
    assert "mapping" in _error("- a\n- b\n")
    assert "not valid YAML" in _error("!!python/object/apply:os.system ['echo pwned']\n")


def test_cli_bad_sweep_is_one_line(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump({**MINIMAL, "nfes": [True], "storage_options": {"client_kwargs": {"aws_secret_access_key": CANARY}}}))
    proc = amed("distill", str(path), "--out", str(tmp_path / "out"))
    err = one_line_error(proc)
    assert "nfes.0" in err and "storage_options" in err and CANARY not in err + proc.stdout
    assert not (tmp_path / "out").exists()  # nothing written


# ---------------------------------------------------------------------------------------------------------------
# Checkpoints: every malformed file ends in one ValueError naming the file; nothing is allocated from a lying header.

@pytest.fixture(scope="module")
def ckpt_files():
    from amed_core.amed import AMEDPredictor, SamplerSpec, checkpoint_files
    from amed_core.denoisers import load_teacher

    spec = SamplerSpec.create("amed", 5, denoiser=load_teacher("digits-gmm"))
    return checkpoint_files(AMEDPredictor(spec.predictor), spec)


def _load_error(files) -> str:
    from amed_core.amed import sampler_from_files

    with pytest.raises(ValueError) as e:
        sampler_from_files(files)
    msg = str(e.value)
    assert "\n" not in msg and len(msg) < 600, msg
    return msg


def _st(header: dict, body: bytes = b"") -> bytes:
    raw = json.dumps(header).encode()
    return len(raw).to_bytes(8, "little") + raw + body


def test_checkpoint_round_trip_still_loads(ckpt_files):
    from amed_core.amed import sampler_from_files

    assert sampler_from_files(ckpt_files).spec.nfe == 5


@pytest.mark.parametrize("kind", ["zero", "truncated", "half", "huge_header", "lying_offsets", "not_json", "pickle",
                                  "trailing"])
def test_bad_predictor_safetensors_is_one_line(ckpt_files, kind):
    import pickle

    good = ckpt_files["predictor.safetensors"]
    bad = {"zero": b"", "truncated": good[:5], "half": good[: len(good) // 2],
           "huge_header": (10**15).to_bytes(8, "little") + b"{}",
           "lying_offsets": _st({"w": {"dtype": "F32", "shape": [10**6, 10**6], "data_offsets": [0, 4]}}, b"\0" * 4),
           "not_json": (4).to_bytes(8, "little") + b"\xff\xfe\x00\x01",
           "pickle": pickle.dumps({"w": [1, 2, 3]}),
           "trailing": good + b"\0" * 16}[kind]
    msg = _load_error({**ckpt_files, "predictor.safetensors": bad})
    assert "predictor.safetensors" in msg


def test_spec_that_is_a_list_or_huge_or_mismatched_is_one_line(ckpt_files):
    assert "JSON object" in _load_error({**ckpt_files, "sampler.json": b"[1, 2]"})
    spec = json.loads(ckpt_files["sampler.json"])
    big = json.dumps({**spec, "solver": "x" * (2 << 20)}).encode()
    assert "at most" in _load_error({**ckpt_files, "sampler.json": big})
    assert "sampler.json" in _load_error({**ckpt_files, "sampler.json": json.dumps({**spec, "solver": "euler9"}).encode()})
    assert "sampler.json" in _load_error({**ckpt_files, "sampler.json": json.dumps({**spec, "nfe": -5}).encode()})
    assert "sampler.json" in _load_error({**ckpt_files, "sampler.json": json.dumps({**spec, "colour": 1}).encode()})


def test_predictor_config_is_checked_against_the_weights_before_allocating(ckpt_files):
    import resource
    import time

    spec = json.loads(ckpt_files["sampler.json"])
    spec["predictor"] = {**spec["predictor"], "hidden_dim": 2**24, "max_positions": 2**20}  # ~512 GB if allocated
    t0, rss0 = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    msg = _load_error({**ckpt_files, "sampler.json": json.dumps(spec).encode()})
    assert "does not fit" in msg and time.perf_counter() - t0 < 5
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0 < 200_000  # KiB: nothing big was allocated


def test_fifo_in_a_checkpoint_folder_does_not_hang(ckpt_files, tmp_path):
    from amed_core.amed import load_sampler

    d = tmp_path / "ckpt"
    d.mkdir()
    (d / "sampler.json").write_bytes(ckpt_files["sampler.json"])
    os.mkfifo(d / "predictor.safetensors")
    with pytest.raises(ValueError, match="not a regular file"):
        load_sampler(d)


# ---------------------------------------------------------------------------------------------------------------
# amed fetch: verify in a temporary folder, then move; a non-empty --out is refused unless --force.

def _write_ckpt(d: Path, files: dict) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    for k, v in files.items():
        (d / k).write_bytes(v)
    return d


def test_fetch_broken_source_leaves_a_good_copy_untouched(ckpt_files, tmp_path):
    good = _write_ckpt(tmp_path / "good", ckpt_files)
    broken = _write_ckpt(tmp_path / "broken", {**ckpt_files, "predictor.safetensors": b"\0" * 7})
    out = tmp_path / "out"
    assert amed("fetch", str(good), "--out", str(out)).returncode == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    err = one_line_error(amed("fetch", str(broken), "--out", str(out), "--force"))
    assert "predictor.safetensors" in err and "nothing was written" in err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken", "good", "out"]  # no temporary folder left


def test_fetch_refuses_a_non_empty_out_unless_force(ckpt_files, tmp_path):
    from amed_core.amed import AMEDPredictor, PredictorConfig, SamplerSpec, checkpoint_files
    from amed_core.denoisers import load_teacher

    spec = SamplerSpec.create("amed", 3, predictor=PredictorConfig(scale_time=0.1), denoiser=load_teacher("digits-gmm"))
    other = _write_ckpt(tmp_path / "other", checkpoint_files(AMEDPredictor(spec.predictor), spec))
    good = _write_ckpt(tmp_path / "good", ckpt_files)
    out = tmp_path / "out"
    assert amed("fetch", str(good), "--out", str(out)).returncode == 0
    err = one_line_error(amed("fetch", str(other), "--out", str(out)))
    assert "not empty" in err and "--force" in err
    assert (out / "sampler.json").read_bytes() == ckpt_files["sampler.json"]
    assert amed("fetch", str(other), "--out", str(out), "--force").returncode == 0
    assert json.loads((out / "sampler.json").read_bytes())["nfe"] == 3
    (tmp_path / "empty").mkdir()
    assert amed("fetch", str(good), "--out", str(tmp_path / "empty")).returncode == 0  # an empty folder is fine


@pytest.mark.parametrize("uri", ["foo://bar", "http://127.0.0.1:9"])
def test_fetch_with_a_bad_tracking_uri_is_one_line(uri, tmp_path):
    import time

    t0 = time.perf_counter()
    err = one_line_error(amed("fetch", "models:/x@champion", "--out", str(tmp_path / "o"), "--tracking-uri", uri))
    assert "MLflow registry" in err and time.perf_counter() - t0 < 60
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------------------------------------------------------
# The teacher store: a repair path, special files refused without hanging, stray and out-of-range records ignored.

GEN = ["teacher", "generate", "--teacher", "digits-gmm", "--grid-for", "amed:3", "--n", "40", "--shard-size", "8",
       "--no-progress"]


@pytest.fixture
def small_store(tmp_path):
    """A 5-shard teacher generated into a local store in-process; yields (store_url, spec_dir)."""
    from flows.cli import main

    url = str(tmp_path / "store")
    assert main([*GEN, "--store", url]) == 0
    (h,) = os.listdir(Path(url, "teachers"))
    return url, Path(url, "teachers", h)


def test_sub_steps_zero_and_bad_flags_are_refused(tmp_path):
    from flows.cli import main

    for flag, value in (("--sub-steps", "0"), ("--n", "0"), ("--shard-size", "-1"), ("--seed", str(2**70))):
        argv = [*GEN, "--store", str(tmp_path / "s"), flag, value]
        if flag == "--n":
            argv[argv.index("--n") + 1] = value
            argv = argv[:-2]
        assert main(argv) == 2
    assert not (tmp_path / "s").exists()  # nothing written


def test_corrupted_shard_is_repaired_by_generate_verify(small_store, capsys):
    from flows.cli import main

    url, d = small_store
    with open(d / "shard-00001.safetensors", "r+b") as f:
        f.seek(300)
        f.write(b"\x55")
    assert main(["teacher", "verify", "--store", url]) == 1
    assert main([*GEN, "--store", url, "--verify"]) == 0
    out = capsys.readouterr().out
    assert "shard 1:" in out and "1 written now" in out and "verify: OK" in out
    assert main(["teacher", "verify", "--store", url]) == 0


def test_fifo_in_place_of_a_shard_is_refused_then_repaired(small_store, capsys):
    import threading

    from flows.cli import main
    from flows.storage import TeacherStore

    url, d = small_store
    (d / "shard-00002.safetensors").unlink()
    os.mkfifo(d / "shard-00002.safetensors")
    result = {}
    t = threading.Thread(target=lambda: result.setdefault("rc", main(["teacher", "verify", "--store", url])), daemon=True)
    t.start()
    t.join(20)
    assert not t.is_alive(), "verify hung on a FIFO"
    assert result["rc"] == 1 and "not a regular file" in capsys.readouterr().out
    store = TeacherStore(url)
    with pytest.raises(Exception, match="not a regular file"):
        store.read_shard(d.name, 2)
    assert main(["teacher", "repair", "--store", url]) == 0
    assert main([*GEN, "--store", url]) == 0 and main(["teacher", "verify", "--store", url]) == 0


def test_stray_and_out_of_range_records_do_not_count(small_store, capsys):
    from flows.cli import main

    url, d = small_store
    (d / "manifest.d" / "notes.json").write_text("junk")
    (d / "manifest.d" / "shard-00003.json.bak").write_text("{}")
    e4 = json.loads((d / "manifest.d" / "shard-00004.json").read_text())
    (d / "manifest.d" / "shard-00006.json").write_text(json.dumps({**e4, "index": 6, "path": "shard-00006.safetensors"}))
    (d / "manifest.d" / "shard-00007.json").write_text(json.dumps({**e4, "index": 7, "path": "../../../etc/passwd"}))
    capsys.readouterr()
    assert main(["teacher", "ls", "--store", url]) == 0
    assert " 5/5 " in capsys.readouterr().out  # not 6/5 or 7/5, and no KeyError
    assert main(["teacher", "verify", "--store", url]) == 1  # the shards verify; the stray records are reported
    assert "notes.json: not a commit record" in capsys.readouterr().out
    assert main(["teacher", "repair", "--store", url]) == 0
    assert main(["teacher", "verify", "--store", url]) == 0
    assert sorted(p.name for p in (d / "manifest.d").iterdir()) == [f"shard-{i:05d}.json" for i in range(5)]


def test_ls_on_a_missing_bucket_or_folder_is_an_error(tmp_path, s3_server):
    err = one_line_error(amed("teacher", "ls", "--store", "s3://no-such-bucket-amed/x"))
    assert "bucket" in err and "does not exist" in err
    err = one_line_error(amed("teacher", "ls", "--store", str(tmp_path / "typo")))
    assert "does not exist" in err


# ---------------------------------------------------------------------------------------------------------------
# Mixture files (gmm:PATH.npz): one line naming the file and the field; never a suggestion to unpickle.

def _mixture(**over):
    from amed_core.adapters import BUILTIN_TEACHERS, _data_path

    with np.load(_data_path(BUILTIN_TEACHERS["digits-gmm"])) as d:
        arrays = {k: d[k] for k in ("weights", "means", "covs", "shape")}
    arrays.update(over)
    return arrays


def _mixture_error(tmp_path, name: str, write) -> str:
    from amed_core.denoisers import load_teacher

    path = tmp_path / name
    write(path)
    with pytest.raises(ValueError) as e:
        load_teacher(f"gmm:{path}")
    msg = str(e.value)
    assert str(path) in msg and "allow_pickle" not in msg and "\n" not in msg, msg
    return msg


def test_mixture_files_that_are_not_npz(tmp_path):
    import pickle

    assert "not an .npz" in _mixture_error(tmp_path, "text.npz", lambda p: p.write_text("hello"))
    assert "not an .npz" in _mixture_error(tmp_path, "pickle.npz", lambda p: p.write_bytes(pickle.dumps({"a": 1})))
    assert ".npy" in _mixture_error(tmp_path, "array.npz", lambda p: open(p, "wb").write(b"") or np.save(open(p, "wb"), np.ones(3)))
    assert "object array" in _mixture_error(tmp_path, "obj.npz", lambda p: np.savez(open(p, "wb"), **_mixture(
        weights=np.array([{"x": 1}], dtype=object))))
    assert "readable" in _mixture_error(tmp_path, "trunc.npz", lambda p: (np.savez(open(p, "wb"), **_mixture()),
                                                                       p.write_bytes(p.read_bytes()[:2000])))


@pytest.mark.parametrize("field, value, words", [
    ("means", "nan", ["'means'", "NaN"]),
    ("covs", "inf", ["'covs'", "inf"]),
    ("weights", np.float64(1.0), ["'weights'", "1-D"]),
    ("shape", np.array([1, -8, 8]), ["'shape'", "positive"]),
    ("shape", np.array([1.5, 8, 8]), ["'shape'"]),
])
def test_mixture_fields_are_named(tmp_path, field, value, words):
    arrays = _mixture()
    if isinstance(value, str):
        bad = arrays[field].copy()
        bad.flat[0] = float(value)
        value = bad
    msg = _mixture_error(tmp_path, f"{field}.npz", lambda p: np.savez(open(p, "wb"), **{**arrays, field: value}))
    assert all(w in msg for w in words), msg


def test_fid_reference_stats_errors_name_the_file_and_never_suggest_pickles(tmp_path):
    import pickle

    from amed_core.fid import load_reference_stats

    for name, data in (("text.npz", b"hello"), ("pickle.npz", pickle.dumps({"mu": 1}))):
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ValueError) as e:
            load_reference_stats(str(tmp_path / name))
        assert str(tmp_path / name) in str(e.value) and "allow_pickle" not in str(e.value)


# ---------------------------------------------------------------------------------------------------------------
# Killed attempts: their MLflow runs are closed on the rerun; one amed distill per output folder.

def test_runs_of_a_killed_attempt_are_marked_killed(tmp_path):
    import socket

    import mlflow

    from flows.registry.sweep import close_stale_runs
    from flows.registry.tracking import tracking

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with tracking(uri) as client:
        exp = client.create_experiment("s")
        tags = {"amed.sweep": "s", "amed.host": socket.gethostname()}
        killed = client.create_run(exp, tags={**tags, "amed.pid": str(dead.pid)})
        child = client.create_run(exp, tags={"mlflow.parentRunId": killed.info.run_id})
        live = client.create_run(exp, tags={**tags, "amed.pid": str(os.getpid())})
        other = client.create_run(exp, tags={**tags, "amed.sweep": "other", "amed.pid": str(dead.pid)})
        assert sorted(close_stale_runs(client, exp, "s")) == sorted([killed.info.run_id, child.info.run_id])
        status = {r: client.get_run(r.info.run_id).info.status for r in (killed, child, live, other)}
    assert [status[r] for r in (killed, child, live, other)] == ["KILLED", "KILLED", "RUNNING", "RUNNING"]


def test_a_rerun_carries_on_in_the_killed_attempts_runs(tmp_path):
    """Issue 15: a rerun after a kill used to open a new parent run and a new child run per candidate each time.
    Now it resumes the killed attempt's runs: one parent, one child per candidate, no metric logged twice, no
    version registered twice; a sweep that FINISHED is not resumed (a rerun of it is a new record)."""
    import socket

    import mlflow

    from amed_core.denoisers import load_teacher
    from flows.registry import log_sweep
    from test_registry import _candidate, _config

    teacher = load_teacher("digits-gmm")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = _config("rerun", uri)
    a = _candidate(tmp_path, teacher, solver="amed", seed=0, value=0.5)
    b = _candidate(tmp_path, teacher, solver="amed+ipndm", seed=0, value=0.3)
    first = log_sweep(cfg, [a, b])
    client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)

    # make it look killed: the parent RUNNING under a process that is gone, candidate b killed after its
    # registration but before its run was tagged and closed
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    client.update_run(first.parent_run_id, status="RUNNING")
    client.set_tag(first.parent_run_id, "amed.pid", str(dead.pid))
    client.set_tag(first.parent_run_id, "amed.host", socket.gethostname())
    rb = first.child_run_ids[1]
    client.update_run(rb, status="RUNNING")
    client.delete_tag(rb, "amed.model_version")

    second = log_sweep(cfg, [a, b])
    assert second.parent_run_id == first.parent_run_id and second.child_run_ids == first.child_run_ids
    assert sorted(second.versions) == sorted(first.versions)
    runs = client.search_runs([first.experiment_id])
    assert len(runs) == 3 and {r.info.status for r in runs} == {"FINISHED"}
    assert client.get_run(first.parent_run_id).data.tags["amed.attempt"] == "2"
    assert client.get_run(rb).data.tags["amed.model_version"] == "/".join(first.versions[1])
    for rid in first.child_run_ids:
        assert len(client.get_metric_history(rid, "fd_exact")) == 1
        assert len(client.get_metric_history(rid, "train_loss")) == 3
    names = {n for n, _ in first.versions}
    assert sum(len(client.search_model_versions(f"name = '{n}'")) for n in names) == 2

    third = log_sweep(cfg, [a, b])  # the sweep finished: a rerun is a new record, registering nothing new
    assert third.parent_run_id != first.parent_run_id and sorted(third.versions) == sorted(first.versions)
    assert sum(len(client.search_model_versions(f"name = '{n}'")) for n in names) == 2


def test_second_distill_on_the_same_folder_is_refused_while_the_first_lives(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; sys.path.insert(0, %r); "
                               "from flows.storage.locks import hold_lock; hold_lock(%r, 'x'); print('held', flush=True); "
                               "time.sleep(60)" % (str(REPO), str(tmp_path / "out" / ".amed-distill.lock"))],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        err = one_line_error(amed("distill", "--out", str(tmp_path / "out"), "--store", str(tmp_path / "store")))
        assert "in use by another amed distill" in err and f"pid {holder.pid}" in err
        assert not (tmp_path / "store").exists()
    finally:
        holder.kill()
        holder.wait()
    from flows.storage.locks import hold_lock, release_lock

    hold_lock(tmp_path / "out" / ".amed-distill.lock", "x")  # SIGKILL freed it: no stale lock
    release_lock(tmp_path / "out" / ".amed-distill.lock")


# ---------------------------------------------------------------------------------------------------------------
# The bench's fast probes, against real processes and servers (bench/reliability.py runs these and the heavy ones:
# SIGKILL during each stage, two distills at once, the Ray OOM killer, the bad-input sweeps through the CLI).

def _reliability():
    import importlib.util

    spec = importlib.util.spec_from_file_location("amed_bench_reliability", REPO / "bench" / "reliability.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


_REL = _reliability()


@pytest.mark.services
@pytest.mark.parametrize("name", [p[0] for p in _REL.PROBES if p[3]])
def test_fast_fault_probe(name):
    row = _REL.run_probe(name)
    if row.verdict == "skipped":
        pytest.skip(row.observed)
    assert row.verdict in ("survived", "refused"), f"{row.expected}\nobserved: {row.observed}"


def test_fetch_from_an_unreachable_store_is_one_line(tmp_path):
    env = {"AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "y", "AWS_MAX_ATTEMPTS": "1",
           "AWS_ENDPOINT_URL": "http://127.0.0.1:9", "AWS_EC2_METADATA_DISABLED": "true"}
    err = one_line_error(amed("fetch", "s3://dead/x", "--out", str(tmp_path / "o"), env=env))
    assert "cannot read the checkpoint" in err and not (tmp_path / "o").exists()


# ---------------------------------------------------------------------------------------------------------------
# Issue 20 (hardening, second pass). Each test below failed on the code before its fix; the comment above each says how.

def amed_bounded(*args: str, timeout: float = 60, mem_gib: float = 3, **kw) -> subprocess.CompletedProcess:
    """``amed ARGS`` with an address-space limit (an unbounded read ends in MemoryError, not in the machine's swap)
    and a timeout (a hang fails the test instead of blocking the suite). A hang is reported as rc 124."""
    import resource

    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (int(mem_gib * (1 << 30)),) * 2)

    full_env = {**os.environ, "PYTHONPATH": str(REPO), **(kw.pop("env", None) or {})}
    try:
        return subprocess.run([*AMED, *args], cwd=kw.pop("cwd", REPO), env=full_env, capture_output=True, text=True,
                              timeout=timeout, preexec_fn=limit)
    except subprocess.TimeoutExpired as e:
        return subprocess.CompletedProcess(e.cmd, 124, e.stdout or "", f"hung for {timeout} s")


# -- 1. MLflow's local database: a kill while it is created never blocks a rerun -------------------------------------
# Before: SIGKILL while MLflow migrates a new SQLite database left `_alembic_tmp_*` tables in <out>/mlflow.db and every
# later use failed ("table _alembic_tmp_trace_info already exists"). The kill lands deterministically: a SQLAlchemy
# hook SIGKILLs the process right after MLflow's migration copies a table into `_alembic_tmp_...`.

KILL_IN_MIGRATION = r"""
import os, signal, sys
from sqlalchemy import event
from sqlalchemy.engine import Engine

@event.listens_for(Engine, "after_cursor_execute")
def _kill(conn, cursor, statement, *args):
    if "_alembic_tmp_" in statement and statement.lstrip().upper().startswith("INSERT"):
        os.kill(os.getpid(), signal.SIGKILL)  # inside MLflow's table creation, on purpose
"""


def _killed_while_creating(db: Path, how: str) -> subprocess.CompletedProcess:
    code = KILL_IN_MIGRATION + {
        "ours": "from flows.registry.tracking import tracking\nwith tracking(%r) as c:\n    c.search_experiments()\n",
        "mlflow": "import mlflow\nmlflow.MlflowClient(tracking_uri=%r).search_experiments()\n",
    }[how] % f"sqlite:///{db}"
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                          capture_output=True, text=True, timeout=300)


def _registry_works(db: Path) -> None:
    import uuid

    from flows.registry.tracking import check_registry, tracking

    check_registry(f"sqlite:///{db}")
    with tracking(f"sqlite:///{db}") as client:
        exp = client.create_experiment(f"after-the-kill-{uuid.uuid4().hex[:6]}")
        run = client.create_run(exp)
        client.log_param(run.info.run_id, "a", "1")
        client.create_registered_model(f"m-after-the-kill-{uuid.uuid4().hex[:6]}")
        assert client.get_run(run.info.run_id).data.params == {"a": "1"}


@pytest.mark.parametrize("how", ["ours", "mlflow"])
def test_kill_while_the_mlflow_database_is_created_never_blocks_a_rerun(tmp_path, how):
    """``ours``: killed inside our own creation of the database (the flow's warm-up, `amed fetch`, registration): the
    database is built in a temporary file and moved into place complete, so nothing half-made is ever at the path.
    ``mlflow``: a database half-created by MLflow itself (an older amed, or plain mlflow) is detected and rebuilt."""
    db = tmp_path / "mlflow.db"
    proc = _killed_while_creating(db, how)
    assert proc.returncode == -9, f"the kill hook never fired: {proc.stderr[-2000:]}"  # else this test proves nothing
    _registry_works(db)
    _registry_works(db)  # and again, on the database as it is now
    assert not [p.name for p in tmp_path.iterdir() if p.name != "mlflow.db" and not p.name.startswith("mlartifacts")]


def test_a_database_with_runs_is_never_rebuilt(tmp_path):
    """Detection never discards data: a complete database with runs in it is used as it is."""
    from flows.registry.tracking import tracking

    db = tmp_path / "mlflow.db"
    with tracking(f"sqlite:///{db}") as client:
        rid = client.create_run(client.create_experiment("keep")).info.run_id
    with tracking(f"sqlite:///{db}") as client:
        assert client.get_run(rid).info.run_id == rid


# -- 2. Checkpoints: regular files only, sizes checked before reading, every field and weight validated ----------------
# Before: a FIFO hung `amed fetch` / `amed sample --predictor`; a symlink to /dev/zero read until MemoryError;
# num_steps 10**9 was fetched (exit 0) and made `sample` allocate 8 GB; a 100k-deep sampler.json gave a RecursionError
# traceback (and fetch blamed the URL); all-NaN weights were fetched; a pickle as sampler.json gave "'utf-8' codec can't
# decode byte 0x80".

@pytest.fixture(scope="module")
def family_files():
    """{family: checkpoint files} for amed and epd (weights) and free (JSON only)."""
    import torch

    import amed_core.families as F
    from amed_core.amed import AMEDPredictor, Sampler, SamplerSpec
    from amed_core.denoisers import load_teacher
    from amed_core.methods.epd import EPDParams

    teacher = load_teacher("digits-gmm")
    spec = SamplerSpec.create("amed", 5, denoiser=teacher)
    grid = spec.grid()
    doc = F.epd.spec_doc("epd", 5, grid, afs=True, options={}, num_points=2, teacher=teacher.identity())
    epd = F.epd.EPDSampler(EPDParams(len(grid), 2, scale_dir=0.01, generator=torch.Generator().manual_seed(0)), doc)
    return {"amed": Sampler(spec, AMEDPredictor(spec.predictor, seed=0)).files(), "epd": epd.files(),
            "free": F.free.make("ipndm", 5, denoiser=teacher).files()}


def _bad_variant(files: dict, name: str, kind: str, d: Path) -> None:
    """Write ``files`` into ``d`` with ``name`` replaced by a bad ``kind``."""
    import pickle

    d.mkdir(parents=True, exist_ok=True)
    for k, v in files.items():
        if k != name:
            (d / k).write_bytes(v)
    target = d / name
    if kind in ("fifo", "dev-zero", "sparse", "deep", "nan"):  # bench/reliability.py's bad-files variants
        nan = _REL._nan_safetensors(files[name]) if kind == "nan" else None
        assert _REL._make_bad(target, kind, files[name], nan, _REL._deep_json())
    elif kind == "pickle":
        target.write_bytes(pickle.dumps({"solver": "amed", "nfe": 5}))
    elif kind == "num_steps":
        doc = json.loads(files[name])
        doc.update(num_steps=10**9, nfe=2 * (10**9 - 1) - 1)
        target.write_bytes(json.dumps(doc).encode())
    elif kind == "inf-sigma":
        doc = json.loads(files[name])
        doc["sigmas"] = [float("inf")] + doc["sigmas"][1:]
        target.write_bytes(json.dumps(doc).encode())
    else:
        raise AssertionError(kind)


# Through the real commands: one case per cause of the issue (the whole matrix of files x variants runs in-process in
# the bad-files probe below, 53 cases in one child process, so CI pays one interpreter start for it, not 53).
BAD_CHECKPOINT_FILES = [
    ("amed", "predictor.safetensors", "fifo"), ("amed", "predictor.safetensors", "dev-zero"),
    ("amed", "predictor.safetensors", "nan"), ("amed", "sampler.json", "deep"), ("amed", "sampler.json", "pickle"),
    ("amed", "sampler.json", "num_steps"), ("epd", "epd.safetensors", "nan"), ("epd", "epd.json", "deep"),
    ("free", "sampler.json", "inf-sigma"),
]


@pytest.mark.parametrize("family, name, kind", BAD_CHECKPOINT_FILES)
def test_bad_checkpoint_file_is_refused_in_one_line_by_fetch(family_files, tmp_path, family, name, kind):
    src = tmp_path / "src"
    _bad_variant(family_files[family], name, kind, src)
    proc = amed_bounded("fetch", str(src), "--out", str(tmp_path / "out"))
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    err = one_line_error(proc)
    assert name in err, err
    assert "URL" not in err and "endpoint" not in err, err  # a bad file is not a network problem
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("family, name, kind", [("amed", "predictor.safetensors", "fifo"), ("amed", "sampler.json", "deep"),
                                                ("amed", "sampler.json", "num_steps"),
                                                ("amed", "predictor.safetensors", "nan")])
def test_bad_checkpoint_file_is_refused_in_one_line_by_sample(family_files, tmp_path, family, name, kind):
    src = tmp_path / "src"
    _bad_variant(family_files[family], name, kind, src)
    proc = amed_bounded("sample", "--predictor", str(src), "--n", "16", "--out-dir", str(tmp_path / "o"))
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    assert name in one_line_error(proc)


def test_checkpoint_loader_helper_refuses_before_reading(tmp_path):
    """The one local reader (amed_core.io.read_limited): regular files only, the limit checked before a byte is read."""
    import time

    from amed_core.io import FileRefused, read_limited

    os.mkfifo(tmp_path / "fifo")
    os.symlink("/dev/zero", tmp_path / "zero")
    with open(tmp_path / "sparse", "wb") as f:
        f.truncate(1 << 40)  # 1 TiB, sparse
    (tmp_path / "ok").write_bytes(b"x" * 10)
    t0 = time.perf_counter()
    for name, words in (("fifo", "FIFO"), ("zero", "device"), ("sparse", "at most"), (".", "folder")):
        with pytest.raises(FileRefused, match=words):
            read_limited(tmp_path / name, 1 << 20, what=name)
    assert time.perf_counter() - t0 < 2
    assert read_limited(tmp_path / "ok", 10) == b"x" * 10
    with pytest.raises(FileRefused, match="at most 9"):
        read_limited(tmp_path / "ok", 9)


# -- 3. Sweep YAML: depth bounded before parsing ------------------------------------------------------------------
# Before: 5,000 levels (10 KB) parsed for 72 s and ended in a RecursionError traceback.

@pytest.mark.parametrize("style", ["flow", "block"])
def test_deeply_nested_sweep_is_refused_fast(tmp_path, style):
    import time

    levels = 5000
    if style == "flow":
        text = "datasets: [{name: d, teacher: digits-gmm}]\nextra: " + "[" * levels + "]" * levels + "\n"
    else:
        text = "datasets: [{name: d, teacher: digits-gmm}]\nextra:\n" + "".join(
            "  " * i + "- \n" for i in range(1, 300)) + "  " * 300 + "- x\n"
    path = tmp_path / "deep.yaml"
    path.write_text(text)
    t0 = time.perf_counter()
    msg = _error(path)
    assert "nested" in msg and "levels" in msg and time.perf_counter() - t0 < 5, msg


# -- 4. Disks: a full or read-only --out is one line naming the folder ------------------------------------------
# Before: a full 3 MB --out restarted Prefect's ephemeral server ~10 times and ended after 127 s in 15 tracebacks; a
# read-only --out gave an OSError traceback in distill, fetch and train.

@contextlib.contextmanager
def _tmpfs(path: Path, size: str, read_only: bool = False):
    path.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}" + (",ro" if read_only else ""), "tmpfs", str(path)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip()[:80]})")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def test_full_disk_out_is_refused_before_any_work(tmp_path):
    import time

    with _tmpfs(tmp_path / "disk", "3m") as disk:
        t0 = time.perf_counter()
        proc = amed_bounded("distill", "--out", str(disk / "out"), timeout=120)
        seconds = time.perf_counter() - t0
        err = one_line_error(proc)
        assert proc.returncode == 2 and str(disk / "out") in err and "free" in err and seconds < 60, (seconds, err)
        assert "Traceback" not in proc.stdout and len((proc.stdout + proc.stderr).splitlines()) < 10


@pytest.mark.parametrize("command", ["distill", "fetch", "train"])
def test_read_only_out_is_one_line(family_files, tmp_path, command):
    src = tmp_path / "src"
    src.mkdir()
    for k, v in family_files["amed"].items():
        (src / k).write_bytes(v)
    with _tmpfs(tmp_path / "ro", "1m", read_only=True) as ro:
        args = {"distill": ["distill", "--out", str(ro / "out")],
                "fetch": ["fetch", str(src), "--out", str(ro / "out")],
                "train": ["train", "--teacher", "digits-gmm", "--solver", "amed", "--nfe", "3", "--out", str(ro / "out")]}
        proc = amed_bounded(*args[command], timeout=300)
        err = one_line_error(proc)
        assert proc.returncode == 2 and str(ro) in err and "read-only" in err.lower(), err


# -- 5. Store: one broken teacher does not break the store ---------------------------------------------------------
# Before: one edited spec.json made `amed teacher ls` fail for the whole store; repair and generate --verify failed with
# the same line and no advice.

def test_one_edited_spec_does_not_break_the_store(small_store, tmp_path, capsys):
    from flows.cli import main

    url, d = small_store
    other = [*GEN[:5], "amed:5", *GEN[6:]]  # a second, healthy teacher
    assert main([*other, "--store", url]) == 0
    spec = json.loads((d / "spec.json").read_text())
    spec["base_seed"] = spec.get("base_seed", 0) + 1
    (d / "spec.json").write_text(json.dumps(spec))
    capsys.readouterr()
    assert main(["teacher", "ls", "--store", url]) == 1
    out = capsys.readouterr()
    lines = out.out.splitlines()
    assert any("5/5" in ln and d.name[:12] not in ln for ln in lines), out.out  # the healthy one is listed
    assert any(d.name[:12] in ln and "BROKEN" in ln for ln in lines), out.out  # the broken one is marked
    assert main(["teacher", "repair", "--store", url]) == 1
    said = capsys.readouterr()
    assert "spec.json" in said.out + said.err and "generate" in said.out + said.err and "--verify" in said.out + said.err
    assert main([*GEN, "--store", url, "--verify"]) == 0  # the generator knows the spec: it restores spec.json
    capsys.readouterr()
    assert main(["teacher", "verify", "--store", url]) == 0
    assert main(["teacher", "ls", "--store", url]) == 0


# -- 6. Messages: no secret in an error line, the right cause named ------------------------------------------------

def test_secret_in_a_store_url_is_never_printed(tmp_path):
    proc = amed_bounded("distill", "--out", str(tmp_path / "o"), "--store", f"s3://AKIAEXAMPLE:{CANARY}@bucket/x",
                        env={"AWS_EC2_METADATA_DISABLED": "true", "AWS_MAX_ATTEMPTS": "1",
                             "AWS_ENDPOINT_URL": "http://127.0.0.1:9"})
    err = one_line_error(proc)
    assert CANARY not in proc.stdout + proc.stderr and "credentials" in err, err


def test_a_tracking_uri_with_a_password_names_the_real_cause(tmp_path):
    err = one_line_error(amed_bounded("fetch", "models:/x@champion", "--out", str(tmp_path / "o"), "--tracking-uri",
                                      "http://user:pw@127.0.0.1:9"))
    assert ":pw@" not in err
    assert "Name or service not known" not in err and "refused" in err.lower(), err


def test_fetch_into_a_symlink_to_an_empty_folder(family_files, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for k, v in family_files["amed"].items():
        (src / k).write_bytes(v)
    (tmp_path / "real").mkdir()
    os.symlink(tmp_path / "real", tmp_path / "link")
    proc = amed("fetch", str(src), "--out", str(tmp_path / "link"))
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in (tmp_path / "real").iterdir()) == ["predictor.safetensors", "sampler.json"]
    assert (tmp_path / "link").is_symlink()


def test_a_local_store_without_room_for_the_teacher_is_refused_before_it_is_generated(tmp_path):
    """Once the sweep is planned, `amed distill` checks the local store's free space against the teacher still to
    write (TeacherSpec.bytes_estimate); here a teacher of 10**9 trajectories (~3 TB) on this machine's disk."""
    from types import SimpleNamespace

    from amed_core.denoisers import load_teacher
    from amed_core.teacher import TeacherSpec, student_grids_for
    from flows.storage.preflight import FolderUnusable, check_teacher_space

    spec = TeacherSpec.for_denoiser(load_teacher("digits-gmm"), student_grids_for("amed:3"), num_trajectories=10**9,
                                    shard_size=10**6)
    job = SimpleNamespace(store_url=str(tmp_path / "store"), storage_options={}, spec_json=spec.to_json())
    with pytest.raises(FolderUnusable, match="store .* needs about"):
        check_teacher_space([job])
    small = TeacherSpec.for_denoiser(load_teacher("digits-gmm"), student_grids_for("amed:3"), num_trajectories=64)
    check_teacher_space([SimpleNamespace(store_url=str(tmp_path / "store"), storage_options={},
                                         spec_json=small.to_json())])  # room enough: no error
