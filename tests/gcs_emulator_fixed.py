"""``gcp-storage-emulator`` with its media downloads fixed: the entry point tests/multiproc.py
``GcsEmulator`` runs (``python tests/gcs_emulator_fixed.py start ...``, the emulator's own arguments).

The emulator bug: a media download (``GET .../o/NAME?alt=media``, also ``/download/...`` and the
``/BUCKET/NAME`` form) answers without the ``x-goog-generation`` (and ``x-goog-metageneration``)
headers that GCS sends with every object read. tensorstore's GCS driver takes a read's generation
from that header, so every object it reads back gets generation 0; its next conditional request on
that object (``ifGenerationMatch=0`` is "must not exist", so tensorstore rejects generation 0
before sending anything) fails with "Malformed StorageGeneration". OCDBT (orbax's checkpoints) hits
it when it re-reads ``manifest.ocdbt`` before a commit instead of using the generation its own
write returned: a second handle on the same database, or a commit whose cached manifest is stale,
which depends on timing, hence the old flake. Here the download answers with the object's
generation and metageneration, as GCS does. Only what tests need is changed; the emulator's
own preconditions (it ignores ``ifGenerationMatch``/``ifGenerationNotMatch``) stay as they are.
"""
from __future__ import annotations

import sys
from http import HTTPStatus

from gcp_storage_emulator.exceptions import NotFound
from gcp_storage_emulator.handlers import objects

_download = objects.download


def download(request, response, storage, *args, **kwargs):
    _download(request, response, storage, *args, **kwargs)
    if response.status in (HTTPStatus.OK, HTTPStatus.PARTIAL_CONTENT):
        try:  # the server is single-threaded: the object read above, unchanged
            obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
        except NotFound:
            return
        response["x-goog-generation"] = str(obj["generation"])
        response["x-goog-metageneration"] = str(obj["metageneration"])


def patch() -> None:
    """Install the fixed handler; before ``gcp_storage_emulator.server`` is imported, whose route
    table holds the handler functions themselves (``objects.get`` looks ``download`` up by name)."""
    assert "gcp_storage_emulator.server" not in sys.modules, "patch before the server's routes are built"
    objects.download = download


if __name__ == "__main__":
    patch()
    from gcp_storage_emulator.__main__ import main

    main()
