"""Teacher trajectories: what a student trains against, generated once per sweep and sharded.

AMED (Zhou et al., arXiv 2312.00094) trains each student against a teacher ODE solution at the
student's grid points t_0 > ... > t_{N-1}. The reference regenerates those trajectories in every
training run; here one teacher serves a whole sweep. A :class:`TeacherSpec` fixes the model (its
identity, with a content hash), the union U of every student grid of the sweep (each student's times
are exact points of U), M sub-steps inserted into every interval of U (teacher grid
``refine(U, M)``, which keeps U's points exactly), the teacher solver, the storage dtype, the number of
trajectories, the shard size and the base seed. Trajectory ``j`` starts from
``x(t_0) = t_0 * n_j``, ``n_j ~ N(0, I)`` drawn from its own generator seeded ``base_seed + j``, so a
shard's content never depends on batch size or worker. The spec's SHA-256 (canonical JSON) names
its folder in the store.

`TeacherBatch` is the unit the AMED training loop consumes, whether the teacher runs on the fly
(the reference's way) or is streamed from stored shards (flows' storage).

Modules: :mod:`.spec` (TeacherSpec, StudentGrid, the sweep's grids), :mod:`.generate` (shards from the teacher
solver), :mod:`.batches` (TeacherBatch and reading shards at a student's grid); this package re-exports them.
"""

from ..methods import num_steps_for  # the one NFE <-> N mapping (re-exported: callers size student grids with it)
from .batches import TeacherBatch, batch_dtype, shard_to_batches, student_indices
from .generate import generate_shard, teacher_nfe_per_trajectory, trajectory_inputs
from .spec import (COMPUTE_DTYPES, LABEL_POLICIES, SPEC_VERSION, StudentGrid, TeacherSpec, canonical_json, freeze_json,
                   parse_grid_for, student_grids_for)

__all__ = [
    "TeacherBatch",
    "StudentGrid",
    "TeacherSpec",
    "LABEL_POLICIES",
    "COMPUTE_DTYPES",
    "SPEC_VERSION",
    "num_steps_for",
    "parse_grid_for",
    "student_grids_for",
    "trajectory_inputs",
    "generate_shard",
    "student_indices",
    "shard_to_batches",
    "teacher_nfe_per_trajectory",
    "batch_dtype",
    "canonical_json",
    "freeze_json",
]
