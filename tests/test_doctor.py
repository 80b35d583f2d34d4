"""``python -m cgjax.doctor``: versions, devices, mesh, and the tiny conversion parity self-test."""
import re

from cgjax import doctor


def test_doctor_passes_on_this_install(capsys):
    rc = doctor.main([])
    out = capsys.readouterr().out
    assert rc == 0, out
    for pkg in ("python", "jax", "flax", "optax", "orbax", "numpy", "torch", "transformers"):
        assert re.search(rf"^  {pkg}\s+\d", out, re.M), pkg
    assert "make_mesh(): data=" in out
    from cgjax.kernels import int8_cpu
    reason = int8_cpu.unavailable_reason()
    assert f"int8 CPU kernel (w8a8 generation): {'serves' if reason is None else 'not used: ' + reason}" in out
    passed = re.findall(r"^  PASS  (\w+): .* max abs diff (\S+)", out, re.M)
    assert [n for n, _ in passed] == ["llava", "clip"], out
    assert all(float(d) <= doctor.ATOL for _, d in passed)
    assert "FAIL" not in out and "all checks passed" in out


def test_doctor_no_torch_skips_parity_and_says_so(capsys, monkeypatch):
    monkeypatch.setattr(doctor, "torch_available", lambda: False)
    rc = doctor.main(["--no-torch"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert re.search(r"^  SKIP  llava: .*--no-torch", out, re.M) and re.search(r"^  SKIP  clip: ", out, re.M)
    assert re.search(r"^  PASS  jax: .* max abs diff", out, re.M)
    assert "converters are not verified" in out


def test_doctor_fails_without_torch_unless_told(capsys, monkeypatch):
    monkeypatch.setattr(doctor, "torch_available", lambda: False)
    monkeypatch.setattr(doctor, "check_jax", lambda: 0.0)  # already covered above; keep the test fast
    monkeypatch.setattr(doctor, "CHECKS", tuple((n, d, doctor.check_jax if n == "jax" else f, t)
                                                 for n, d, f, t in doctor.CHECKS))
    rc = doctor.main([])
    out = capsys.readouterr().out
    assert rc == 1
    assert re.search(r"^  FAIL  llava: .*torch is not importable.*--no-torch", out, re.M)


def test_a_failing_check_fails_the_run(capsys, monkeypatch):
    monkeypatch.setattr(doctor, "CHECKS", (("bad", "a check over tolerance", lambda: 1.0, False),))
    monkeypatch.setattr(doctor, "torch_available", lambda: False)
    rc = doctor.main(["--no-torch"])
    out = capsys.readouterr().out
    assert rc == 1 and re.search(r"^  FAIL  bad: .* max abs diff 1\.00e\+00", out, re.M)
