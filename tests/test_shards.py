"""TeacherSpec, per-sample seeded teacher shards, their bytes format and the student-grid slicing (amed_core only)."""

from __future__ import annotations

import json
import struct

import pytest
import torch

from amed_core.adapters import load_teacher
from amed_core.schedules import ScheduleSpec, grid_indices
from amed_core.shards import TeacherShard
from amed_core.methods import solve
from amed_core.teacher import (StudentGrid, TeacherSpec, generate_shard, num_steps_for, parse_grid_for, shard_to_batches,
                               student_grids_for, teacher_nfe_per_trajectory, trajectory_inputs)


@pytest.fixture(scope="module")
def teacher():
    return load_teacher("digits-gmm")


@pytest.fixture(scope="module")
def spec(teacher):
    return TeacherSpec.for_denoiser(teacher, student_grids_for("amed:3,5,7;amed+ipndm:3,5,7"), num_trajectories=20,
                                    shard_size=8, dtype="float64")


def test_spec_json_round_trip_and_hash(spec):
    again = TeacherSpec.from_json(spec.to_json())
    assert again == spec and again.spec_hash == spec.spec_hash
    assert len(spec.spec_hash) == 64
    # Every field that changes the content changes the hash.
    for change in (dict(sub_steps=2), dict(base_seed=1), dict(dtype="float16"), dict(solver="euler"),
                   dict(num_trajectories=21), dict(shard_size=9), dict(compute_dtype="float32")):
        d = spec.to_dict() | change
        assert TeacherSpec.from_dict(d).spec_hash != spec.spec_hash, change
    # Order of the student grids does not matter.
    d = spec.to_dict()
    d["grids"] = d["grids"][::-1]
    assert TeacherSpec.from_dict(d).spec_hash == spec.spec_hash


@pytest.mark.parametrize("change, field", [
    (dict(dtype="int8"), "dtype"), (dict(label_policy="sometimes"), "label_policy"), (dict(solver="rk45"), "rk45"),
    (dict(solver_options={"max_order": 3}), "solver_options"), (dict(grids=[]), "grids"), (dict(shard_size=0), "shard_size"),
    (dict(model={"adapter": "gmm", "name": "x"}), "content hash"), (dict(label_policy="uniform"), "label_dim"),
    (dict(sub_steps=-1), "sub_steps"), (dict(colour="red"), "colour"),
])
def test_spec_rejects_bad_fields(spec, change, field):
    with pytest.raises(ValueError, match=field):
        TeacherSpec.from_dict(spec.to_dict() | change)


def test_student_grids_are_exact_points_of_the_union(spec):
    assert parse_grid_for("amed:3,5;amed+ipndm:7") == [("amed", 3), ("amed", 5), ("amed+ipndm", 7)]
    assert [g.num_steps for g in spec.grids] == [3, 4, 5]  # NFE = 2(N - 1) - 1 with AFS at odd NFE
    assert num_steps_for("amed", 9, True) == 6
    U = spec.union_grid()
    fine = spec.teacher_grid()
    assert len(fine) == spec.sub_steps * (len(U) - 1) + len(U)
    for g in spec.grids:
        s = g.sigmas()
        assert torch.equal(U[grid_indices(U, s)], s)  # bitwise: the student's own points
        assert torch.equal(fine[grid_indices(fine, s)], s)
    with pytest.raises(ValueError, match="grid-for"):
        parse_grid_for("amed")


def test_shard_content_is_per_sample_and_independent_of_batching(teacher, spec):
    whole = generate_shard(teacher, spec, 1)
    chunked = generate_shard(teacher, spec, 1, batch_size=3)
    assert whole.seeds.tolist() == list(range(8, 16))
    assert torch.equal(whole.noise, chunked.noise)
    torch.testing.assert_close(whole.states, chunked.states, rtol=1e-12, atol=1e-12)
    # The same trajectory j in a differently sharded spec (shard_size 4: j = 8..11 are shard 2).
    other = TeacherSpec.from_dict(spec.to_dict() | {"shard_size": 4})
    part = generate_shard(teacher, other, 2)
    assert torch.equal(part.noise, whole.noise[:4])
    torch.testing.assert_close(part.states, whole.states[:, :4], rtol=1e-12, atol=1e-12)
    # Noise is the documented per-sample draw; states[0] is the start noise * sigma_max.
    noise, labels = trajectory_inputs([8, 9], spec.shape)
    assert labels is None and torch.equal(noise, whole.noise[:2])
    assert torch.equal(whole.states[0], whole.noise * spec.union_grid()[0])
    # The last shard is short.
    assert generate_shard(teacher, spec, 2).num_samples == 4


def test_teacher_states_follow_the_ode(teacher, spec):
    """States at the union points match a near-exact solution (Heun on a 16x finer grid) and improve with M."""
    shard = generate_shard(teacher, spec, 0)
    assert shard.nfe == teacher_nfe_per_trajectory("heun", spec.teacher_grid()) == 2 * (len(spec.teacher_grid()) - 1)
    x = shard.noise * spec.union_grid()[0]
    from amed_core.schedules import refine
    ref = solve("heun", teacher, x, refine(spec.union_grid(), 15), return_trajectory=True).trajectory[::16]
    err1 = (shard.states - ref).abs().max()
    fine = TeacherSpec.from_dict(spec.to_dict() | {"sub_steps": 3})
    err3 = (generate_shard(teacher, fine, 0).states - ref).abs().max()
    assert err3 < err1 / 4  # second order: error ~ h^2, h shrinks by 2
    assert err3 < 0.1, (err1, err3)


def test_wrong_model_is_refused(spec):
    other = load_teacher("digits-gmm", sigma_max=40.0)
    other.content_hash = "0" * 64
    with pytest.raises(ValueError, match="identity"):
        generate_shard(other, spec, 0)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32", "float64"])
def test_bytes_round_trip_every_dtype(teacher, spec, dtype):
    s = TeacherSpec.from_dict(spec.to_dict() | {"dtype": dtype})
    shard = generate_shard(teacher, s, 2)
    data = shard.to_bytes()
    assert data == generate_shard(teacher, s, 2).to_bytes()  # deterministic bytes
    back = TeacherShard.from_bytes(data, expect_spec_hash=s.spec_hash, expect_index=2)
    assert back.dtype == dtype and back.nfe == shard.nfe and back.spec_hash == s.spec_hash
    for name in ("seeds", "noise", "states", "sigmas"):
        assert torch.equal(getattr(back, name), getattr(shard, name)), name
    assert back.sigmas.dtype == torch.float64


def test_labels_round_trip_and_one_hot(spec):
    cond = load_teacher("digits-gmm")
    cond.label_dim = 3  # the mixture ignores labels; this exercises the label plumbing
    s = TeacherSpec.for_denoiser(cond, spec.grids, num_trajectories=6, shard_size=6)
    assert s.label_policy == "uniform" and s.label_dim == 3
    shard = generate_shard(cond, s, 0)
    back = TeacherShard.from_bytes(shard.to_bytes())
    assert torch.equal(back.labels, shard.labels) and back.labels.max() < 3
    assert torch.equal(trajectory_inputs(shard.seeds, s.shape, label_policy="uniform", label_dim=3)[1], shard.labels)
    batch = next(shard_to_batches(back, s.grids[0].sigmas()))
    assert torch.equal(batch.class_labels.argmax(1), shard.labels) and batch.class_labels.sum() == 6


def test_from_bytes_refuses_bad_input(teacher, spec):
    shard = generate_shard(teacher, spec, 2)
    data = shard.to_bytes()
    with pytest.raises(ValueError, match="spec"):
        TeacherShard.from_bytes(data, expect_spec_hash="f" * 64)
    with pytest.raises(ValueError, match="index"):
        TeacherShard.from_bytes(data, expect_index=0)
    with pytest.raises(ValueError, match="truncated|valid"):
        TeacherShard.from_bytes(data[: len(data) // 2])
    from safetensors.torch import save
    with pytest.raises(ValueError, match="not a teacher shard"):
        TeacherShard.from_bytes(save({"x": torch.zeros(2)}))
    # A header that lies about the tensors.
    n = struct.unpack("<Q", data[:8])[0]
    head = json.loads(data[8:8 + n])
    meta = json.loads(head["__metadata__"]["amed.teacher_shard"])
    meta["nfe"] = 999999
    meta["num_samples"] = 5
    head["__metadata__"]["amed.teacher_shard"] = json.dumps(meta)
    raw = json.dumps(head).encode()
    raw += b" " * (-len(raw) % 8)
    with pytest.raises(ValueError, match="disagrees"):
        TeacherShard.from_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n:])


def test_shard_to_batches_slices_the_student_grid(teacher, spec):
    shard = generate_shard(teacher, TeacherSpec.from_dict(spec.to_dict() | {"dtype": "float16"}), 0)
    g = spec.grids[1]
    batches = list(shard_to_batches(shard, g.sigmas(), batch_size=3))
    assert [b.noise.shape[0] for b in batches] == [3, 3, 2]
    idx = grid_indices(shard.sigmas, g.sigmas())
    b = batches[1]
    assert b.states.shape == (g.num_steps, 3, *spec.shape) and b.states.dtype == torch.float32
    torch.testing.assert_close(b.states[1:], shard.states[idx][1:, 3:6].float())
    assert torch.equal(b.states[0], b.noise * g.sigmas()[0].float())  # the TeacherBatch contract, exactly
    off_grid = ScheduleSpec(rho=5.0).grid(4)
    with pytest.raises(ValueError, match="not a point"):
        next(shard_to_batches(shard, off_grid))
    lower_start = StudentGrid(schedule=ScheduleSpec(sigma_max=40.0), num_steps=3)
    s2 = TeacherSpec.from_dict(spec.to_dict() | {"grids": [g.to_dict() for g in spec.grids] + [lower_start.to_dict()]})
    with pytest.raises(ValueError, match="starts at"):
        next(shard_to_batches(generate_shard(teacher, s2, 2), lower_start.sigmas()))


def test_bytes_are_plain_safetensors(teacher, spec):
    """Our one-copy writer and zero-copy reader agree with the safetensors library both ways."""
    from safetensors.torch import load, save

    from amed_core.shards import SHARD_FORMAT, read_safetensors

    shard = generate_shard(teacher, TeacherSpec.from_dict(spec.to_dict() | {"dtype": "bfloat16"}), 2)
    theirs = load(shard.to_bytes())
    for name in ("seeds", "sigmas", "noise", "states"):
        assert torch.equal(theirs[name], getattr(shard, name)), name
    meta = {SHARD_FORMAT: json.dumps(shard.header(), sort_keys=True)}
    written_by_lib = save({k: getattr(shard, k) for k in ("seeds", "sigmas", "noise", "states")}, metadata=meta)
    back = TeacherShard.from_bytes(written_by_lib)
    assert torch.equal(back.states, shard.states) and back.header() == shard.header()
    tensors, _ = read_safetensors(bytearray(shard.to_bytes()))
    assert tensors["states"].data_ptr() != shard.states.data_ptr()
    with pytest.raises(ValueError, match="trailing"):
        read_safetensors(shard.to_bytes() + b"\0" * 8)
