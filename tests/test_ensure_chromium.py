"""`make test` installs the report's headless Chromium when it is missing and it can
(tools/ensure_chromium.sh, which .ci/run reaches through make test), and otherwise fails with one line.
Run against stand-in `id`, `sudo` and `apt-get` on a PATH without a browser."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "tools" / "ensure_chromium.sh"
BASH = shutil.which("bash")
CHMOD = shutil.which("chmod")


def _tool(folder: Path, name: str, body: str) -> None:
    path = folder / name
    path.write_text(f"#!{BASH}\n{body}\n")
    path.chmod(0o755)


def _run(folder: Path) -> subprocess.CompletedProcess:
    for name in ("mktemp", "rm"):  # the coreutils the script uses, and nothing else of the real PATH
        if not (folder / name).exists():
            (folder / name).symlink_to(shutil.which(name))
    return subprocess.run(
        [BASH, str(SCRIPT)],
        env={"PATH": str(folder), "TMPDIR": str(folder)},
        capture_output=True,
        text=True,
        timeout=60,
    )


def _apt_get(folder: Path) -> None:
    # Records its arguments; `install` puts a chromium on the PATH, as Debian's package does.
    _tool(
        folder,
        "apt-get",
        f'echo "$*" >> {folder}/apt.log; '
        f'if [ "$1" = install ]; then printf "#!{BASH}\\n" > {folder}/chromium; {CHMOD} +x {folder}/chromium; fi',
    )


def test_a_present_browser_is_used_as_it_is(tmp_path):
    _tool(tmp_path, "chromium", "exit 0")
    _apt_get(tmp_path)
    result = _run(tmp_path)
    assert result.returncode == 0 and result.stderr == ""
    assert not (tmp_path / "apt.log").exists()


def test_root_installs_chromium_with_apt_get(tmp_path):
    _tool(tmp_path, "id", "echo 0")
    _apt_get(tmp_path)
    result = _run(tmp_path)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "apt.log").read_text().splitlines() == ["update -qq", "install -y -qq chromium"]
    assert (tmp_path / "chromium").is_file()
    assert not list(tmp_path.glob("tokenskip-chromium-install.*"))  # its output kept only on failure


def test_a_failed_install_says_where_apt_gets_output_is(tmp_path):
    _tool(tmp_path, "id", "echo 0")
    _tool(tmp_path, "apt-get", 'echo "E: Unable to locate package chromium"; exit 100')
    result = _run(tmp_path)
    assert result.returncode == 1
    (log,) = tmp_path.glob("tokenskip-chromium-install.*")
    assert "Unable to locate package chromium" in log.read_text()
    assert f"apt-get's output: {log}" in result.stderr.splitlines()[-1]


def test_a_user_with_password_less_sudo_installs_through_sudo(tmp_path):
    _tool(tmp_path, "id", "echo 1000")
    _tool(tmp_path, "sudo", f'[ "$1" = -n ] && shift; echo "sudo $*" >> {tmp_path}/sudo.log; "$@"')
    _apt_get(tmp_path)
    result = _run(tmp_path)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "apt.log").read_text().splitlines() == ["update -qq", "install -y -qq chromium"]
    assert "sudo apt-get install -y -qq chromium" in (tmp_path / "sudo.log").read_text()


def test_without_root_or_sudo_it_fails_with_one_line_saying_what_to_run(tmp_path):
    _tool(tmp_path, "id", "echo 1000")
    _apt_get(tmp_path)
    result = _run(tmp_path)
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1
    assert "chromium not found" in result.stderr and "sudo apt-get install -y chromium" in result.stderr
    assert not (tmp_path / "apt.log").exists()
    # a sudo that wants a password counts as none (make must not hang on a prompt)
    _tool(tmp_path, "sudo", 'echo "a password is required" >&2; exit 1')
    assert _run(tmp_path).returncode == 1


def test_make_test_and_ci_run_go_through_the_script():
    makefile = (SCRIPT.parents[1] / "Makefile").read_text()
    assert "test: $(STAMP) chromium" in makefile and "@tools/ensure_chromium.sh" in makefile
    ci = (SCRIPT.parents[1] / ".ci" / "run").read_text()
    assert "make test" in ci and "apt-get" not in ci  # one place installs it
