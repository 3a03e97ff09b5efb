"""Parameter-golf record folders: ``lmkit record RUN... --out DIR`` and ``--check DIR``.

- ``layout``: the folder's file names, the code snapshot, ``requirements.txt``, byte counts.
- ``seeds``: one seed: its artifact (reused or packed), evaluations and log figures.
- ``summary``: means and stds, ``bytes_total`` and the compliance block (pure functions).
- ``readme``: ``README.md``, rendered from ``submission.json`` alone.
- ``write``: :func:`write_record`, the folder written in one rename.
- ``check``: :func:`check_record`, everything recomputed from the folder's own files.
"""

from __future__ import annotations

from lmkit.core.record.check import check_record, schema
from lmkit.core.record.write import write_record

__all__ = ["check_record", "schema", "write_record"]
