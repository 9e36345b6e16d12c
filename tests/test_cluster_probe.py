"""Planning without the model in the flow's process (issue 13, item 7): ``plan_sweep`` on a diffusers pipeline folder
gets the teacher's identity, sigma range, VP table and shape from a probe (a child process, or a Ray task when a Ray
session is up) while every weight loader in the planning process is booby-trapped; the facts equal the model's own."""

from __future__ import annotations

import json

import pytest

diffusers = pytest.importorskip("diffusers")

SCHED = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


@pytest.fixture(scope="module")
def pipeline_folder(tmp_path_factory):
    import torch
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("pipeline")
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        sample_size=16, block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4, in_channels=4, out_channels=4,
        cross_attention_dim=8, attention_head_dim=2, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    unet.save_pretrained(root / "unet")
    (root / "scheduler").mkdir()
    (root / "scheduler" / "scheduler_config.json").write_text(json.dumps({"_class_name": "DDPMScheduler", **SCHED}))
    (root / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline",
                                                       "unet": ["diffusers", "UNet2DConditionModel"],
                                                       "scheduler": ["diffusers", "DDPMScheduler"]}))
    save_file({"prompt_embeds": torch.randn(2, 4, 8), "negative_prompt_embeds": torch.zeros(1, 4, 8)},
              str(root / "prompts.safetensors"))
    return root


def _sweep(root, tmp_path):
    from flows.config import load_sweep

    return load_sweep({
        "name": "probe", "store_url": str(tmp_path / "store"),
        "datasets": [{"name": "sd", "teacher": f"diffusers:{root}",
                      "options": {"prompt_embeds": str(root / "prompts.safetensors")}}],
        "solvers": ["amed"], "nfes": [4], "sampler": {"schedule_type": "discrete"},
        "teacher": {"num_trajectories": 64, "shard_size": 64}, "train": {"batch_size": 32},
        "evaluation": {"metric": "rmse", "num_samples": 64},
        "panel": {"entries": [{"solver": "ipndm"}]}, "register_models": False, "init": {"mode": "recipe"}})


@pytest.fixture
def no_weights_here(monkeypatch):
    """Every way the planning process could load the model raises."""
    import safetensors.torch
    import torch

    import amed_core.adapters
    import amed_core.denoisers
    import flows.cluster.worker

    def trap(*a, **k):
        raise AssertionError("a model was loaded in the planning process")

    monkeypatch.setattr(amed_core.adapters, "load_teacher", trap)
    monkeypatch.setattr(amed_core.denoisers, "load_teacher", trap)
    monkeypatch.setattr(flows.cluster.worker, "load_dataset_teacher", trap)
    monkeypatch.setattr(diffusers.ModelMixin, "from_pretrained", classmethod(trap))
    monkeypatch.setattr(safetensors.torch, "load_file", trap)
    monkeypatch.setattr(torch, "load", trap)
    import flows.cluster.probe

    flows.cluster.probe._CACHE.clear()


def _expected(cfg):
    from flows.cluster.probe import teacher_facts

    return teacher_facts(cfg.datasets[0])


def test_plan_reads_the_teacher_in_a_child_process(pipeline_folder, tmp_path, no_weights_here):
    from flows.plan import plan_sweep

    cfg = _sweep(pipeline_folder, tmp_path)
    plan = plan_sweep(cfg)
    assert len(plan.candidates) == 1 and plan.teachers[0].num_shards == 1
    spec = json.loads(plan.teachers[0].spec_json)
    assert spec["shape"] == [4, 16, 16] and spec["model"]["adapter"].startswith("diffusers")


def test_probe_facts_equal_the_model(pipeline_folder, tmp_path, monkeypatch):
    import ray

    import flows.cluster.probe as probe
    from flows.plan import plan_sweep

    cfg = _sweep(pipeline_folder, tmp_path)
    want = _expected(cfg)
    probe._CACHE.clear()
    child = probe.probe_teacher(cfg.datasets[0], use_ray=False)
    assert child.facts == json.loads(json.dumps(want))
    assert child.alphas_cumprod and len(child.alphas_cumprod) == 1000 and child.shape == (4, 16, 16)
    ray.init(address="local", num_cpus=1, include_dashboard=False, configure_logging=False, log_to_driver=False)
    try:
        probe._CACHE.clear()
        on_ray = probe.probe_teacher(cfg.datasets[0])
        assert on_ray.facts == child.facts
        # the plan made from probed facts is the plan made from the loaded model (same ids, specs, store keys)
        import amed_core.denoisers

        real = amed_core.denoisers.load_teacher(cfg.datasets[0].teacher, **cfg.datasets[0].load_kwargs())
        monkeypatch.setattr(probe, "probe_teacher", lambda d, **k: real)
        from_model = plan_sweep(cfg)
    finally:
        ray.shutdown()
    monkeypatch.undo()
    probe._CACHE.clear()
    assert plan_sweep(cfg).model_dump() == from_model.model_dump()
