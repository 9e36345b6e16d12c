"""Storage on fsspec (local folders, s3://, memory://): teacher shards, run files, checksums and credentials.

- :mod:`flows.storage.teachers`: ``TeacherStore`` (content-addressed teacher shards, write-once commits);
- :mod:`flows.storage.stream`: ``BatchStream`` (TeacherBatches streamed at a student's grid);
- :mod:`flows.storage.generate`: ``generate`` (a teacher into the store on this machine, resumable);
- :mod:`flows.storage.runs`: ``RunStore`` (checkpoints, scores, progress, results);
- :mod:`flows.storage.checksums`, :mod:`flows.storage.reads`, :mod:`flows.storage.urls`,
  :mod:`flows.storage.credentials`, :mod:`flows.storage.errors`: the helpers they share.

The names below are this package's public API (``from flows.storage import TeacherStore``).
"""

from flows.storage.credentials import redact, s3_options_from_env
from flows.storage.errors import ShardVerificationError, StoreCredentialsError
from flows.storage.generate import GenerateSummary, generate
from flows.storage.runs import RunStore
from flows.storage.stream import BatchStream
from flows.storage.teachers import TeacherStore, VerifyReport

__all__ = ["TeacherStore", "VerifyReport", "BatchStream", "GenerateSummary", "generate", "RunStore",
           "StoreCredentialsError", "ShardVerificationError", "redact", "s3_options_from_env"]
