"""The GCS emulator the tests run (tests/gcs_emulator_fixed.py): object reads carry the object's
generation, so tensorstore's conditional writes after a read work (no "Malformed StorageGeneration")."""
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
