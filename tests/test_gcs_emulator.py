"""The GCS emulator the tests run (tests/gcs_emulator_fixed.py): object reads carry the object's
generation, so tensorstore's conditional writes after a read work (no "Malformed StorageGeneration"),
and a process that checkpoints to the bucket through cgjax exits clean."""
import subprocess
import sys

import multiproc
import tensorstore as ts


def test_a_media_read_returns_the_generation_of_the_write(gcs):
    """A read of a whole object (``?alt=media``) gives the generation the write gave, not 0."""
    kv = ts.KvStore.open(f"gs://{gcs.bucket}/emulator/", context=ts.Context()).result()
    written = kv.write("x", b"data").result()
    got = kv.read("x").result()
    assert got.value == b"data"
    assert got.stamp.generation == written.generation != b"\0" * 9


def test_an_ocdbt_commit_after_a_read_and_on_a_reopened_database(gcs):
    """OCDBT (orbax's checkpoints) writes ``manifest.ocdbt`` conditioned on the generation it knows.
    After a read that revalidated the manifest (a read once an earlier commit is done: in an orbax
    save, a later array's open, so it depended on timing) or on a second handle (which reads the
    manifest back first), that generation came from a media read; with the stock emulator's reads
    (generation 0) the commit failed every time with "Malformed StorageGeneration"."""
    spec = {"driver": "ocdbt", "base": f"gs://{gcs.bucket}/emulator-ocdbt/"}
    kv = ts.KvStore.open(spec, context=ts.Context()).result()
    kv.write("a", b"1").result()
    assert kv.read("a").result().value == b"1"
    kv.write("b", b"2").result()
    other = ts.KvStore.open(spec, context=ts.Context()).result()
    other.write("a", b"3").result()
    again = ts.KvStore.open(spec, context=ts.Context()).result()
    assert [again.read(k).result().value for k in ("a", "b")] == [b"3", b"2"]


SAVE_AND_EXIT = """
import numpy as np
from cgjax import checkpoints, persistence

url = {url!r}
persistence.check_reachable(url)
mngr = checkpoints.plain_manager(persistence.join(url, "checkpoints"), keep=2)
for step in range(1, 11):
    state = {{"w": {{str(i): np.full((64, 256), step + i, np.float32) for i in range(40)}}}}
    checkpoints.save_step(mngr, step, state, {{"step": step}})
    persistence.append_lines(persistence.join(url, "metrics.jsonl"), [f"{{step}}\\n"])
mngr.wait_until_finished()
assert checkpoints.restore_step(mngr, 10)[1]["step"] == 10
assert persistence.read_text(persistence.join(url, "metrics.jsonl")).split() == [str(s) for s in range(1, 11)]
print("saved")
"""


def test_a_process_checkpointing_to_the_bucket_exits_clean(gcs):
    """orbax saves (40 arrays, 10 steps) and whole-file writes to ``gs://`` through cgjax, in a
    process of its own: it exits 0 and its stderr has no error or exit noise. With the stock
    emulator a save failed in 4 runs of 4 ("Malformed StorageGeneration", see above), and the
    writes still in flight then completed into the event loop orbax had closed on the error:
    "Event loop is closed" from ``call_soon_threadsafe``, what pytest reports in-process as
    PytestUnraisableExceptionWarning (gcsfs's own exit was clean with either emulator)."""
    prog = SAVE_AND_EXIT.format(url=f"gs://{gcs.bucket}/exits-clean")
    out = subprocess.run([sys.executable, "-c", prog], env={**multiproc.env_for(1), **gcs.env}, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "saved", out.stderr[-3000:]
    for noise in ("Malformed StorageGeneration", "Exception ignored", "cannot schedule new futures",
                  "Event loop is closed", "Traceback"):
        assert noise not in out.stderr, out.stderr[-3000:]
