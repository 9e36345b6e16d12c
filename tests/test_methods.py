"""The method table: one entry per sampler, the NFE <-> N mapping read from it, the registry built on it."""

import inspect

import pytest
import torch

from amed_core import evaluate, methods
from amed_core.adapters import GaussianMixtureDenoiser
from amed_core.methods import get_method, method_names, nfe_for, num_steps_for
from amed_core.schedules import ScheduleSpec


def test_table_entries():
    assert method_names("amed") == ("amed", "amed+euler", "amed+dpm", "amed+ipndm", "amed+dpmpp", "amed+deis", "amed+unipc")
    assert set(method_names("free")) == {"euler", "heun", "dpm2", "ipndm", "ipndm_v", "dpmpp", "unipc", "deis"}
    assert set(method_names()) >= set(method_names("free")) | set(method_names("amed"))
    for name in method_names():
        m = get_method(name)
        assert m.name == name and m.learned == (m.base is not None)
        if m.learned:
            assert get_method(m.base).family == "free"
    assert {n: get_method(n).base for n in method_names("amed")} == {
        "amed": "heun", "amed+euler": "euler", "amed+dpm": "dpm2", "amed+ipndm": "ipndm", "amed+dpmpp": "dpmpp",
        "amed+deis": "deis", "amed+unipc": "unipc"}
    assert {n for n in method_names("amed") if get_method(n).multistep} == {"amed+ipndm", "amed+dpmpp", "amed+deis",
                                                                            "amed+unipc"}
    assert get_method("amed").default_schedule == ScheduleSpec("time_uniform", rho=1.0)
    assert get_method("amed+dpmpp").default_schedule.schedule_type == "logsnr"
    assert get_method("amed+dpmpp").options == {"max_order", "predict_x0", "lower_order_final", "dynamic_thresholding",
                                               "afs_in_history", "single_steps"}
    assert get_method("amed").options == frozenset({"single_steps"})


def test_default_options_are_the_signature_defaults_for_amed():
    for name in method_names("amed"):
        m = get_method(name)
        params = inspect.signature(m.fn).parameters
        assert {k: params[k].default for k in m.options} == dict(m.default_options)


def test_unknown_names():
    with pytest.raises(ValueError, match="unknown solver 'rk45'.*heun"):
        get_method("rk45")
    with pytest.raises(ValueError, match="family"):
        method_names("nope")


def test_evaluate_views_read_the_table():
    assert evaluate.BASE_SOLVERS == method_names("free")
    assert evaluate.DEFAULT_SCHEDULES["deis"] == ScheduleSpec("time_uniform", rho=2.0)
    assert evaluate.DEFAULT_OPTIONS["unipc"] == {"max_order": 3, "predict_x0": True, "lower_order_final": True, "variant": "bh2"}
    assert evaluate.default_schedule("amed") == get_method("amed").default_schedule


@pytest.mark.parametrize("name", ["euler", "heun", "dpm2", "ipndm", "dpmpp", "deis", "amed", "amed+dpmpp"])
def test_nfe_mapping_round_trip(name):
    k = get_method(name).evals_per_step
    for afs in (False, True):
        for N in range(2, 8):
            nfe = nfe_for(name, N, afs)
            if nfe >= 1:
                assert num_steps_for(name, nfe, afs) == N


def test_unipc_counts_its_warmup_final_corrector():
    """With warmup_final_corrector=True (the reference), N <= max_order spends one more evaluation: the mapping
    counts it, picks a grid that spends the NFE asked for, or names the fix."""
    assert nfe_for("unipc", 3, False) == 3 and nfe_for("unipc", 4, False) == 3
    assert nfe_for("unipc", 3, False, {"warmup_final_corrector": False}) == 2
    assert nfe_for("unipc", 3, False, {"max_order": 2}) == 2
    assert num_steps_for("unipc", 2) == 2
    assert num_steps_for("unipc", 2, options={"warmup_final_corrector": False}) == 3
    assert num_steps_for("unipc", 3) == 4
    with pytest.raises(ValueError, match="warmup_final_corrector=False"):
        num_steps_for("unipc", 1)
    assert num_steps_for("unipc", 1, afs=True) == 2
    teacher = GaussianMixtureDenoiser([1.0], [[0.0, 0.0, 0.0, 0.0]], [torch.eye(4).numpy()], (1, 2, 2))
    for nfe in (2, 3, 4):  # sample_solver asserts the evaluations spent
        run = evaluate.sample_solver(teacher, "unipc", nfe, n=2, seed=0)
        assert run.nfe == nfe and nfe_for("unipc", run.num_steps, run.afs) == nfe


def test_registry():
    assert set(methods.SOLVERS) == set(method_names())
    assert methods.get_solver("heun") is get_method("heun").fn
    with pytest.raises(ValueError, match="no option"):
        methods.solve("heun", None, torch.zeros(1, 1), torch.tensor([1.0, 0.5]), max_order=2)
