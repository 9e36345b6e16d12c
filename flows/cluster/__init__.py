"""Ray for the distill flow (named ``cluster``, not ``ray``, so that ``import ray`` always means the library).

- :mod:`flows.cluster.session`: start a local Ray on loopback or connect to a cluster; task options;
- :mod:`flows.cluster.worker`: torch threads, device and teacher inside a worker; progress reports;
- :mod:`flows.cluster.teacher`: a task per teacher shard, on workers that keep the loaded teacher;
- :mod:`flows.cluster.jobs`: ``train_job`` and ``eval_job``;
- :mod:`flows.cluster.schedule`: ``run_one`` / ``run_jobs``, the flow's slots and the prefetched work.

The Prefect tasks in :mod:`flows.distill` call these; Ray workers never import Prefect.
"""
