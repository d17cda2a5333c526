"""vit_ms.interrupts: SIGINT and SIGTERM reach the watcher thread whatever handler is installed, and behave as
usual where nobody listens. Each case runs in a fresh process, since routing must start before any thread."""
import subprocess
import sys
import textwrap

PRELUDE = """
import os, signal, sys, threading, time
from vit_ms import interrupts
routed = interrupts.route_to_watcher()
print("routed", routed, flush=True)
"""


def run(body, timeout=60):
    script = PRELUDE + textwrap.dedent(body)
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=timeout)


def test_a_listener_gets_the_signal_whatever_handler_is_installed():
    # SIG_DFL would kill the process at once, as MindSpore's own handler would turn SIGINT into SIGTERM:
    # with the signals routed, no handler runs and the listener sees the signal the user sent.
    result = run("""
        got = []
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        with interrupts.listening(got.append):
            for sent, signum in enumerate((signal.SIGINT, signal.SIGTERM), start=1):
                os.kill(os.getpid(), signum)
                deadline = time.monotonic() + 10
                while len(got) < sent and time.monotonic() < deadline:
                    time.sleep(0.01)
        print("got", got)
    """)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["routed True", "got [2, 15]"]


def test_without_a_listener_ctrl_c_raises_keyboard_interrupt_in_the_main_thread():
    result = run("""
        try:
            os.kill(os.getpid(), signal.SIGINT)
            for _ in range(1000):
                time.sleep(0.01)
            print("not interrupted")
        except KeyboardInterrupt:
            print("KeyboardInterrupt in", threading.current_thread().name)
    """)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["routed True", "KeyboardInterrupt in MainThread"]


def test_without_a_listener_a_second_ctrl_c_exits_at_once():
    # The first KeyboardInterrupt waits for the main thread's next Python instruction (here: a 30 s call
    # that never returns to Python in time); the second Ctrl-C does not wait.
    result = run("""
        threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGINT)).start()
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(30)
        print("not interrupted")
    """)
    assert result.returncode == 130, result.stderr
    assert result.stdout.splitlines() == ["routed True"] and "Ctrl-C again: exiting at once" in result.stderr


def test_without_a_listener_sigterm_keeps_its_default_action_and_its_python_handler():
    killed = run("""
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(10)
        print("survived")
    """)
    assert killed.returncode == -15 and killed.stdout.splitlines() == ["routed True"], killed.stderr
    handled = run("""
        signal.signal(signal.SIGTERM, lambda signum, frame: print("handler", signum, threading.current_thread().name))
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.5)
    """)
    assert handled.returncode == 0, handled.stderr
    assert handled.stdout.splitlines() == ["routed True", "handler 15 MainThread"]


def test_routing_is_refused_once_other_threads_exist():
    # A thread started earlier keeps its own mask: routing would then be partial, so it is not done.
    script = """
import threading, time
threading.Thread(target=time.sleep, args=(5,), daemon=True).start()
from vit_ms import interrupts
print(interrupts.route_to_watcher(), interrupts.is_routed())
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["False", "False"]


def test_a_script_run_by_run_script_ends_on_ctrl_c_with_one_line_and_130():
    # eval.py, infer.py, export.py and convert.py run their main() this way.
    script = """
import os, signal, sys, time
from vit_ms.cli import run_script
sys.argv[0] = "infer.py"
def main():
    os.kill(os.getpid(), signal.SIGINT)
    for _ in range(1000):
        time.sleep(0.01)
    return 0
run_script(main)
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert result.returncode == 130
    assert result.stderr == "infer.py: interrupted (Ctrl-C)\n"
