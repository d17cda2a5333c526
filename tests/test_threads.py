"""vit_ms's OpenMP spin defaults (`vit_ms.threads`): set before MindSpore loads libgomp, never over a
user's choice, and really read by libgomp (which prints what it read under OMP_DISPLAY_ENV=verbose)."""
import os
import subprocess
import sys

from vit_ms import threads


def _libgomp_reads(code, **env):
    """(GOMP_SPINCOUNT, OMP_WAIT_POLICY) as the libgomp loaded by `import mindspore` in a fresh process running
    `code` read them."""
    environ = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    environ.update(env, OMP_DISPLAY_ENV="verbose")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=environ, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]

    def value(name):
        lines = [line for line in done.stderr.splitlines() if line.strip().startswith(name + " ")]
        assert lines, done.stderr[-2000:]
        return lines[0].split("=", 1)[1].strip().strip("'")

    return value("GOMP_SPINCOUNT"), value("OMP_WAIT_POLICY")


def test_libgomp_reads_the_defaults_when_vit_ms_is_imported_first():
    assert _libgomp_reads("import vit_ms, mindspore") == (threads.SPIN_DEFAULT, threads.WAIT_DEFAULT)


def test_a_user_value_and_a_late_import_are_left_alone():
    # Either variable set by the user: vit_ms sets neither (OMP_DISPLAY_ENV prints PASSIVE for every policy
    # but ACTIVE, an unset one included).
    assert _libgomp_reads("import vit_ms, mindspore", GOMP_SPINCOUNT="12345") == ("12345", "PASSIVE")
    assert _libgomp_reads("import vit_ms, mindspore", OMP_WAIT_POLICY="passive")[1] == "PASSIVE"
    # MindSpore first: libgomp is already loaded with its own defaults, and vit_ms does not pretend otherwise.
    assert _libgomp_reads("import mindspore, vit_ms, os; assert 'GOMP_SPINCOUNT' not in os.environ") == \
        (threads.LIBGOMP_DEFAULT, "PASSIVE")


def test_set_spin_default_decides_from_the_environment_and_loaded_modules():
    env = {}
    assert threads.set_spin_default(env, modules={}) and \
        env == {"GOMP_SPINCOUNT": threads.SPIN_DEFAULT, "OMP_WAIT_POLICY": threads.WAIT_DEFAULT}
    for env in ({"GOMP_SPINCOUNT": "7"}, {"OMP_WAIT_POLICY": "passive"}):
        before = dict(env)
        assert not threads.set_spin_default(env, modules={}) and env == before
    env = {}
    assert not threads.set_spin_default(env, modules={"mindspore": object()}) and env == {}


def test_the_hint_names_the_fix_only_when_the_import_came_too_late(monkeypatch):
    monkeypatch.setattr(threads, "TOO_LATE", False)
    assert threads.late_import_hint() == ""
    monkeypatch.setattr(threads, "TOO_LATE", True)
    assert "import vit_ms first, or set GOMP_SPINCOUNT=3000 OMP_WAIT_POLICY=ACTIVE" in threads.late_import_hint()


def test_another_framework_runs_at_libgomps_own_default(monkeypatch):
    monkeypatch.setattr(threads, "DEFAULTED", True)
    assert threads.foreign_environment({"GOMP_SPINCOUNT": threads.SPIN_DEFAULT, "OMP_WAIT_POLICY": "ACTIVE",
                                        "A": "1"}) == {"GOMP_SPINCOUNT": threads.LIBGOMP_DEFAULT, "A": "1"}
    monkeypatch.setattr(threads, "DEFAULTED", False)  # the user chose that value: kept
    assert threads.foreign_environment({"GOMP_SPINCOUNT": threads.SPIN_DEFAULT}) == \
        {"GOMP_SPINCOUNT": threads.SPIN_DEFAULT}
