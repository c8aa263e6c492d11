"""Drives `strata sql` in a pseudo-terminal as a person would: a multi-line query, \\d,
\\d NAME, an error with its position marked, then \\q. Prints the session transcript.
Usage: sql_repl.py STRATA_BIN FLIGHT_ADDR HTTP_ADDR"""
import os
import re
import sys
import tempfile

import pexpect

PROMPT = "strata> "


def main() -> None:
    binary, flight, http = sys.argv[1:4]
    home = tempfile.mkdtemp()
    transcript = open(os.path.join(home, "transcript"), "w")
    child = pexpect.spawn(
        binary,
        ["sql", "--endpoint", f"http://{flight}", "--http", f"http://{http}"],
        env={**os.environ, "HOME": home, "TERM": "dumb"},
        encoding="utf-8",
        timeout=20,
        dimensions=(50, 160),
    )
    child.logfile_read = transcript
    child.expect_exact(PROMPT)

    # A statement over two lines: the REPL waits for the `;`.
    child.sendline("SELECT id, name FROM sites")
    child.expect_exact("...> ")
    child.sendline("WHERE id = 2;")
    child.expect_exact("south")
    child.expect(r"\(1 row, [0-9.]+ ms\) route: local \(local\) versions: sites=1@")
    child.expect_exact(PROMPT)

    child.sendline("\\d")
    child.expect(r"sites\s+\|\s+file:")
    child.expect_exact(PROMPT)

    child.sendline("\\d sites")
    child.expect(r"sites\s+\|\s+name\s+\|\s+Utf8")
    child.expect_exact(PROMPT)

    # An error: the server's message, the statement, a caret under the column.
    bad = "SELECT name FROM sites WHERE id = = 2"
    child.sendline(bad + ";")
    child.expect_exact("error: ")
    child.expect_exact(PROMPT)
    shown = child.before.replace("\r", "")
    column = int(re.search(r"Column: (\d+)", shown).group(1))
    lines = shown.split("\n")
    sql_line = next(i for i, l in enumerate(lines) if l.strip() == bad)
    caret = lines[sql_line + 1]
    assert caret.strip() == "^", shown
    assert caret.index("^") - lines[sql_line].index("S") == column - 1, shown
    assert "Traceback" not in shown and "panicked" not in shown, shown

    child.sendline("\\q")
    child.expect(pexpect.EOF)
    child.close()
    transcript.close()
    history = open(os.path.join(home, ".strata_history")).read()
    assert "WHERE id = 2;" in history, history
    sys.stdout.write(open(os.path.join(home, "transcript")).read())
    if child.exitstatus != 0:
        sys.exit(f"strata sql exited with {child.exitstatus}")


if __name__ == "__main__":
    main()
