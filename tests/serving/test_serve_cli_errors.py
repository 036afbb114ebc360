"""First contact with ``deepzero-oracle serve``: every mistake a user can make before the server
listens (a module that does not import, a missing or non-callable attribute, a taken port, a bad
tensor spec or number) is one line on stderr saying what and what to do, exit code 2 (5 for a
port in use), no traceback, no path inside this repository, no Python-only hint.

The subprocess cases run concurrently (each pays the interpreter's start-up); the rest call the
command's ``main`` in this process.
"""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest

import deepzero_oracle
from deepzero_oracle.blackbox.errors import remote_error
from deepzero_oracle.errors import EXIT_UNREACHABLE, EXIT_USAGE
from deepzero_oracle.server import cli

PACKAGE_DIR = str(Path(deepzero_oracle.__file__).resolve().parent)
CONSOLE_SCRIPT = str(Path(sys.executable).with_name("deepzero-oracle"))

MODULES = {
    "usermod.py": "def fn(x):\n    return x * 2\n\n\nvalue = 3\n",
    "broken.py": "raise RuntimeError('boom at import')\n",
    "needsdep.py": "import not_installed_package_xyz\n",
    "badsyntax.py": "def f(:\n",
    "garbage.pem": "not a certificate\n",
}


def _listening_port() -> tuple[socket.socket, int]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    return sock, sock.getsockname()[1]


# (id, command: "module" = python -m deepzero_oracle.server, "script" = the console script,
#  arguments, exit code, text the line must contain). PORT / HTTP_PORT: a port in use.
SUBPROCESS_CASES = [
    ("unimportable-module", "module", ["nomod:fn"], EXIT_USAGE, "no module named 'nomod'"),
    ("missing-attribute", "script", ["usermod:missing"], EXIT_USAGE, "has no attribute 'missing' (its callables: fn)"),
    ("import-raises", "script", ["broken:fn"], EXIT_USAGE, "raised RuntimeError: boom at import (broken.py, line 1)"),
    ("port-in-use", "module", ["usermod:fn", "--port", "PORT"], EXIT_UNREACHABLE,
     "--port PORT: 127.0.0.1:PORT is already in use"),
    ("bad-input-spec", "module", ["usermod:fn", "--input", "x:FP99"], EXIT_USAGE,
     "argument --input: tensor spec 'x:FP99': unknown datatype"),
    ("pending-below-concurrency", "script", ["usermod:fn", "--max-concurrency", "4", "--max-pending", "2"], EXIT_USAGE,
     "--max-pending (2)"),
]


@pytest.fixture(scope="module")
def subprocess_results(tmp_path_factory):
    """Run every SUBPROCESS_CASES command at once; {id: (exit code, stdout, stderr, expected text)}."""
    folder = tmp_path_factory.mktemp("serve_cli")
    for name, text in MODULES.items():
        (folder / name).write_text(text)
    busy, port = _listening_port()
    running = {}
    try:
        for case_id, how, args, _, _ in SUBPROCESS_CASES:
            args = [a.replace("PORT", str(port)) for a in args]
            cmd = ([sys.executable, "-m", "deepzero_oracle.server"] if how == "module"
                   else [CONSOLE_SCRIPT, "serve"]) + args
            running[case_id] = subprocess.Popen(cmd, cwd=folder, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                                stdin=subprocess.DEVNULL, text=True)
        results = {}
        for case_id, proc in running.items():
            try:
                out, err = proc.communicate(timeout=180)
            except subprocess.TimeoutExpired:
                proc.kill()
                out, err = proc.communicate()
            results[case_id] = (proc.returncode, out, err)
    finally:
        for proc in running.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        busy.close()
    return results, port


def _assert_one_clean_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}:\n{err[-3000:]}"
    line = lines[0]
    assert line.startswith("deepzero-oracle serve: error: "), line
    assert "Traceback" not in err and PACKAGE_DIR not in err and "wait_for_ready" not in err, line
    return line


@pytest.mark.parametrize("case", SUBPROCESS_CASES, ids=[c[0] for c in SUBPROCESS_CASES])
def test_first_contact_error_is_one_line(subprocess_results, case):
    results, port = subprocess_results
    case_id, _, _, code, text = case
    returncode, out, err = results[case_id]
    line = _assert_one_clean_line(err)
    assert text.replace("PORT", str(port)) in line, line
    assert returncode == code, (returncode, line)
    assert "serving" not in out


# In this process: argparse checks and loading errors (no interpreter start-up to pay).
# (arguments, text the line must contain); exit code 2 unless the case is in IN_PROCESS_CODES.
IN_PROCESS_CASES = [
    (["usermod:value"], "usermod:value is not callable (its type is int)"),
    (["usermod:fn", "--port", "0", "--http-port", "PORT"], "--http-port PORT: 127.0.0.1:PORT is already in use"),
    (["usermod:fn", "--grace", "-1"], "argument --grace: expected seconds from 0 to 86400, got '-1'"),
    (["usermod:fn", "--output", "y:FP32:a,3"], "argument --output: tensor spec 'y:FP32:a,3': the shape must be"),
    (["usermod:fn", "--max-concurrency", "0"], "argument --max-concurrency: expected a whole number from 1"),
    (["usermod:fn", "--max-pending", "lots"], "argument --max-pending: expected a whole number from 1 to 4096, got 'lots'"),
    (["usermod:fn", "--grace", "nan"], "argument --grace: expected seconds"),
    (["usermod:fn", "--port", "70000"], "argument --port: expected a TCP port 0..65535"),
    (["usermod:fn", "--max-message-mb", "inf"], "argument --max-message-mb: expected MiB"),
    (["usermod:fn", "--workers", "-2"], "argument --workers: expected a whole number from 1"),
    (["usermod:fn", "--tls-cert", "missing.pem", "--tls-key", "missing.key"], "--tls-cert missing.pem: no such file"),
    (["usermod:fn", "--tls-cert", "only.pem"], "TLS needs both --tls-cert and --tls-key"),
    (["usermod:fn", "--tls-cert", "garbage.pem", "--tls-key", "garbage.pem"],
     "--tls-cert garbage.pem / --tls-key garbage.pem: not a PEM certificate and its unencrypted private key"),
    (["needsdep:fn"], "needs the package 'not_installed_package_xyz', which is not installed"),
    (["badsyntax:f"], "raised SyntaxError: invalid syntax (badsyntax.py, line 1)"),
    (["usermod"], "expected MODULE:CALLABLE"),
    (["usermod:fn", "--host", "no-such-host.invalid"], "--host no-such-host.invalid: cannot resolve it"),
    ([], "the following arguments are required: MODULE:CALLABLE"),
]


IN_PROCESS_CODES = {"--http-port PORT": EXIT_UNREACHABLE}


@pytest.mark.parametrize("argv, text", IN_PROCESS_CASES, ids=[" ".join(c[0]) or "no-target" for c in IN_PROCESS_CASES])
def test_bad_values_in_process(tmp_path, monkeypatch, capsys, argv, text):
    for name, source in MODULES.items():
        (tmp_path / name).write_text(source)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(cli, "configure_logging", lambda *a, **k: None)  # leave this process's logging be
    busy, port = _listening_port()
    try:
        code = cli.main([a.replace("PORT", str(port)) for a in argv])
    except SystemExit as e:  # argparse's checks exit from parse_args
        code = e.code
    finally:
        busy.close()
    captured = capsys.readouterr()
    line = _assert_one_clean_line(captured.err)
    assert text.replace("PORT", str(port)) in line, line
    expected_code = next((c for key, c in IN_PROCESS_CODES.items() if key in " ".join(argv)), EXIT_USAGE)
    assert code == expected_code, (code, line)
    assert "serving" not in captured.out


def test_python_only_hints_stay_out_of_error_messages():
    """The UNAVAILABLE hint is shown to command-line users too: no Python keyword in it."""
    message = str(remote_error("UNAVAILABLE", "connection refused", "127.0.0.1:1"))
    assert "wait_for_ready" not in message and "deepzero-oracle serve" in message
