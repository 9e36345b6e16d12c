"""SweepConfig: one schema for YAML and deployment parameters; bad configs fail early, naming the field."""

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from flows.config import SweepConfig, load_sweep, quickstart_path

ROOT = Path(__file__).resolve().parents[1]
MINIMAL = {"datasets": [{"name": "digits", "teacher": "digits-gmm"}]}


def _error(data) -> str:
    with pytest.raises(ValueError) as e:
        load_sweep(data)
    return str(e.value)


def test_defaults_are_the_paper_recipe():
    cfg = load_sweep(MINIMAL)
    assert (cfg.train.lr, cfg.train.batch_size, cfg.teacher.num_trajectories) == (5e-3, 128, 10_000)
    assert (cfg.teacher.M, cfg.teacher.solver, cfg.sampler.scale_dir, cfg.sampler.scale_time) == (1, "heun", 0.01, 0.0)
    assert cfg.sampler.afs_for(5) is True and cfg.sampler.afs_for(4) is False  # NFE = 2 (N - 1) - afs


def test_quickstart_and_every_shipped_config_validate():
    assert quickstart_path() == ROOT / "configs" / "quickstart.yaml"
    qs = load_sweep(quickstart_path())
    assert qs.solvers == ["amed", "amed+ipndm"] and qs.nfes == [3, 5] and qs.datasets[0].teacher == "digits-gmm"
    assert qs.store_url is None  # filled in under the output folder by `amed distill`
    assert qs.train_for("amed+ipndm").lr == 2e-3 and qs.train_for("amed").lr == 5e-3  # per-solver recipe
    assert qs.sampler_for("amed+ipndm").afs_in_history is False and qs.sampler_for("amed").afs_in_history is None
    for path in sorted((ROOT / "configs").glob("*.yaml")):
        load_sweep(path)


def test_json_round_trip_and_yaml_equals_dict():
    cfg = load_sweep(quickstart_path())
    again = SweepConfig.model_validate_json(cfg.to_json())
    assert again == cfg and again.hash == cfg.hash
    assert load_sweep(yaml.safe_load(quickstart_path().read_text())) == cfg
    assert load_sweep(quickstart_path().read_text()) == cfg  # YAML text, as a deployment parameter may carry
    assert load_sweep(cfg) == cfg
    assert load_sweep(cfg, store_url="memory://x").store_url == "memory://x"
    with pytest.raises(Exception):
        cfg.name = "other"  # frozen


def test_errors_name_the_field_and_what_is_allowed():
    msg = _error({**MINIMAL, "evaluation": {"metric": "fdx"}, "teacher": {"M": 0, "shard": 3}, "colour": 1})
    assert "evaluation.metric" in msg and "'fd_exact', 'rmse' or 'fid'" in msg and "'fdx'" in msg
    assert "teacher.M" in msg and "greater than or equal to 1" in msg
    assert "teacher.shard: unknown field; allowed here: ['M', 'dtype'" in msg
    assert "colour: unknown field" in msg and "'datasets'" in msg
    assert "datasets: required field is missing" in _error({})
    msg = _error({**MINIMAL, "solvers": ["amed", "dpm-solver"]})
    assert "solvers" in msg and "dpm-solver" in msg and "amed+ipndm" in msg
    msg = _error({**MINIMAL, "nfes": [4], "sampler": {"afs": True}})
    assert "nfes: 4" in msg and "afs" in msg
    msg = _error({"datasets": [{"name": "x", "teacher": "gmm:/nonexistent/mix.npz"}]})
    assert "datasets.0.teacher" in msg and "does not exist" in msg
    msg = _error({**MINIMAL, "evaluation": {"metric": "fid"}})
    assert "fid_stats" in msg and "inception_weights" in msg
    msg = _error({"datasets": [{"name": "unet", "teacher": "edm", "weights_url": "/w.safetensors"}]})
    assert "evaluation.metric: 'fd_exact' needs analytic" in msg
    msg = _error({**MINIMAL, "storage_options": {"secret": "x"}})
    assert "storage_options" in msg and "AWS_" in msg
    msg = _error({**MINIMAL, "solver_options": {"amed+dpmpp": {}}})
    assert "solver_options" in msg and "amed+dpmpp" in msg
    msg = _error({**MINIMAL, "train_options": {"amed+ipndm": {"lr": 1e-3}}})
    assert "train_options" in msg and "amed+ipndm" in msg
    msg = _error({**MINIMAL, "solver_options": {"amed": {"afs_in_history": False}}})
    assert "solver_options.amed.afs_in_history" in msg
    assert "train.loss_weighting" in _error({**MINIMAL, "train": {"loss_weighting": "mean"}})
    msg = _error({**MINIMAL, "teacher": {"num_trajectories": 10}})
    assert "teacher.num_trajectories" in msg and "train.batch_size" in msg
    msg = _error({"datasets": [{"name": "a b", "teacher": "digits-gmm"}]})
    assert "datasets.0.name" in msg
    assert "compute.gpus_per_task" in _error({**MINIMAL, "compute": {"gpus_per_task": -1}})


def test_file_sources(tmp_path):
    np.savez(tmp_path / "mix.npz", weights=np.array([1.0]), means=np.zeros((1, 4)), covs=np.eye(4)[None],
             shape=np.array([1, 2, 2]))
    p = tmp_path / "sweep.json"
    p.write_text(json.dumps({"datasets": [{"name": "m", "teacher": f"gmm:{tmp_path / 'mix.npz'}"}], "nfes": [3]}))
    cfg = load_sweep(str(p))
    assert cfg.datasets[0].analytic and cfg.combos()[0][1:] == ("amed", 3, 0)
    assert "does not exist" in _error(str(tmp_path / "missing.yaml"))
    assert "mapping" in _error("- just\n- a list\n")


def test_bad_plan_fails_before_work():
    """Errors only visible once the teacher is loaded still fail in plan_sweep, before any Ray/Prefect work."""
    from flows.plan import plan_sweep

    cfg = load_sweep({**MINIMAL, "sampler": {"sigma_min": 0.002, "sigma_max": 500.0}, "solvers": ["amed+euler"],
                      "nfes": [3], "init": {"mode": "recipe"}})
    plan = plan_sweep(cfg)  # a larger sigma_max than the teacher's is allowed (the grid is the user's choice)
    assert len(plan.candidates) == 1 and plan.baselines[0].solver == "euler"
    qs = plan_sweep(load_sweep(quickstart_path()))
    by = {c.train.solver: c.train for c in qs.candidates if c.train.nfe == 5}
    assert by["amed+ipndm"].sampler_spec["afs_in_history"] is False and by["amed+ipndm"].train["lr"] == 2e-3
    assert by["amed"].train["loss_weighting"] == "relative"
    assert len({c.train.teacher_hash for c in qs.candidates if c.family == "amed"}) == 1  # GITS reads its own
    bad = load_sweep({"datasets": [{"name": "d", "teacher": "no-such-model"}], "evaluation": {"metric": "rmse"}})
    with pytest.raises(ValueError, match=r"datasets\[d\]\.teacher: unknown teacher"):
        plan_sweep(bad)


def test_fid_protocol_hash_names_statistics_and_network():
    """A FID computed with other reference statistics or another Inception network is another protocol: the
    champion never moves on a comparison between them."""
    from flows.plan import plan_sweep

    def proto(stats, weights):
        plan = plan_sweep(load_sweep({**MINIMAL, "solvers": ["amed"], "nfes": [3], "init": {"mode": "recipe"},
                                      "evaluation": {"metric": "fid", "fid_stats": stats, "inception_weights": weights}}))
        return plan.candidates[0].eval.protocol_hash

    base = proto("s3://b/cifar10.npz", "s3://b/inception-a.pth")
    assert proto("s3://b/cifar10.npz", "s3://b/inception-a.pth") == base
    assert proto("s3://b/cifar10.npz", "s3://b/inception-b.pth") != base
    assert proto("s3://b/other.npz", "s3://b/inception-a.pth") != base


def test_wheel_carries_the_configs(tmp_path):
    """A wheel (not only the editable checkout) ships configs/ as flows/configs, so `amed distill` finds the
    quickstart after `pip install amed-distill`."""
    import shutil
    import subprocess
    import sys
    import zipfile

    src = tmp_path / "src"
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, files):
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        if (ROOT / name).is_symlink():
            (src / name).symlink_to(Path(str((ROOT / name).readlink())))
        elif (ROOT / name).is_file():
            shutil.copy2(ROOT / name, src / name)
    import setuptools

    # this environment's setuptools when it is new enough for pyproject.toml (fast, offline); else pip's isolated build
    isolation = ["--no-build-isolation"] if int(setuptools.__version__.split(".")[0]) >= 77 else []
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", *isolation, "-w",
                          str(tmp_path / "dist"), str(src)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    wheel = next((tmp_path / "dist").glob("amed_distill-*.whl"))
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        z.extractall(tmp_path / "site")
    assert {"flows/configs/quickstart.yaml", "flows/configs/presets/cifar10.yaml"} <= names
    code = ("import flows.config as c; p = c.quickstart_path(); assert str(p).startswith(%r), p; "
            "print(c.load_sweep(p).name)" % str(tmp_path / "site"))
    run = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env={**__import__("os").environ,
                         "PYTHONPATH": str(tmp_path / "site")}, capture_output=True, text=True)
    assert run.returncode == 0 and run.stdout.strip() == "quickstart", run.stderr[-2000:]


def test_plan_expands_paths_for_remote_workers(monkeypatch):
    """`$VARS`/`~` in a teacher's path are expanded when the sweep is planned (on the driver), so Ray workers
    without the variable load the same teacher."""
    from amed_core.adapters import builtin_network_dir
    from flows.cluster.worker import load_dataset_teacher
    from flows.config import DatasetConfig
    from flows.plan import plan_sweep

    where = str(builtin_network_dir("digits-tiny-unet"))
    monkeypatch.setenv("AMED_TEST_TINY_UNET", where)
    plan = plan_sweep(load_sweep({"datasets": [{"name": "t", "teacher": "tiny-unet:$AMED_TEST_TINY_UNET"}],
                                  "solvers": ["amed"], "nfes": [3], "evaluation": {"metric": "rmse"},
                                  "init": {"mode": "recipe"}}))
    monkeypatch.delenv("AMED_TEST_TINY_UNET")
    ds = plan.candidates[0].train.dataset
    assert ds.teacher == f"tiny-unet:{where}"
    builtin = DatasetConfig(name="t", teacher="digits-tiny-unet")
    assert load_dataset_teacher(ds).identity() == load_dataset_teacher(builtin).identity()


def test_worker_keeps_loaded_teachers(monkeypatch):
    """A worker process loads a dataset's teacher once and hands the same object to its next jobs
    (flows.cluster.worker.load_dataset_teacher); AMED_TEACHER_CACHE bounds how many stay loaded (0: none)."""
    import amed_core.denoisers
    import flows.cluster.worker as worker
    from flows.config import DatasetConfig

    loads = []
    real = amed_core.denoisers.load_teacher

    def counting(spec, **kw):
        loads.append(spec)
        return real(spec, **kw)

    monkeypatch.setattr(amed_core.denoisers, "load_teacher", counting)
    worker._TEACHERS.clear()
    a, b = DatasetConfig(name="a", teacher="digits-gmm"), DatasetConfig(name="b", teacher="digits-tiny-unet")
    try:
        monkeypatch.setenv("AMED_TEACHER_CACHE", "1")
        first = worker.load_dataset_teacher(a)
        assert worker.load_dataset_teacher(DatasetConfig(name="a2", teacher="digits-gmm")) is first  # same model
        assert loads == ["digits-gmm"]
        worker.load_dataset_teacher(b)  # evicts a (one kept)
        assert worker.load_dataset_teacher(a) is not first and loads == ["digits-gmm", "digits-tiny-unet", "digits-gmm"]
        monkeypatch.setenv("AMED_TEACHER_CACHE", "2")
        worker.load_dataset_teacher(b)
        assert len(loads) == 4 and len(worker._TEACHERS) == 2
        worker.load_dataset_teacher(a), worker.load_dataset_teacher(b)
        assert len(loads) == 4
        monkeypatch.setenv("AMED_TEACHER_CACHE", "0")
        assert worker.load_dataset_teacher(a) is not worker.load_dataset_teacher(a) and len(loads) == 6
        monkeypatch.setenv("AMED_TEACHER_CACHE", "lots")
        with pytest.raises(ValueError, match="AMED_TEACHER_CACHE must be a whole number"):
            worker.load_dataset_teacher(a)
    finally:
        worker._TEACHERS.clear()


def test_job_runtime_env_only_carries_a_set_teacher_cache(monkeypatch):
    """A job with a runtime env of its own cannot use the workers Ray already started (0.8 s on a 4-candidate sweep,
    BENCHMARKS "Fixed overhead, third pass"): ray_session gives a connected cluster one only for AMED_TEACHER_CACHE."""
    from flows.cluster.session import _runtime_env

    monkeypatch.delenv("AMED_TEACHER_CACHE", raising=False)
    assert _runtime_env() is None
    monkeypatch.setenv("AMED_TEACHER_CACHE", "3")
    assert _runtime_env() == {"env_vars": {"AMED_TEACHER_CACHE": "3"}}
