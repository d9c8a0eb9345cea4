"""
Say in a few lines why `pip install` failed, for the deploy's error output; pip's whole output
stays in the log file on the host. Run by the venv's own Python after a failed install:
``python - LOG PYTHON_COMMAND`` (the script on standard input).

The cases worth naming: ``pip check`` (run after the install) found installed packages whose
requirements are not met; and a pinned package with no wheel for this Python, whose build from source
failed (no compiler, no Rust, a missing -dev package, or code that does not build on this
Python): pip prints hundreds of lines of compiler output and the package's name far above them.
"""

import re
import sys

#: How pip reports a failed step: " ... error" on a terminal, ": finished with status 'error'"
#: otherwise (as here: its output goes to a file).
FAILED = r"(?: \.\.\. error|: finished with status 'error')"
#: pip's own summaries of which packages failed to build (their wording differs by pip version).
BUILD_FAILURES = (
    r"Failed to build installable wheels for some pyproject\.toml based projects \((?P<names>[^)]*)\)",
    r"Could not build wheels for (?P<names>.+?), which is required",
    r"^Failed to build (?P<names>.+)$",
    rf"Building wheel for (?P<names>\S+) \(.*\){FAILED}",
    rf"Running setup\.py install for (?P<names>\S+){FAILED}",
)
#: Steps that prepare a source distribution's build; on error, the package is the one pip was
#: collecting.
SOURCE_STEPS = re.compile(
    r"(Installing build dependencies|Getting requirements to build wheel|Installing backend dependencies"
    rf"|Preparing metadata \(.*\)){FAILED}"
)
#: pip's own error lines (resolution, download, hash), not the build's.
PIP_ERRORS = re.compile(r"^ERROR: ")
#: Where pip quotes a failed build's own output ("╰─> [3 lines of output]" ... "[end of output]").
BUILD_OUTPUT = re.compile(r"lines of output\]\s*$")
END_OF_OUTPUT = "[end of output]"
#: Where pip says which requirements conflict (each on an indented line below, up to a blank line).
CONFLICT = "The conflict is caused by:"
COLLECTING = re.compile(r"^Collecting (?P<name>[A-Za-z0-9._-]+)")
#: The deploy's line before `pip check`'s output (tasks/app.py, PIP_CHECK_MARK).
PIP_CHECK_MARK = "stack-pip-check:"
#: What `pip check` says of a package whose requirements are not met.
BROKEN = re.compile(
    r"^\S+ \S+ (requires .+, which is not installed|has requirement .+, but you have .+|is not supported on this platform)\.$"
)


def failed_builds(lines: list[str]) -> list[str]:
    """Names of the packages pip failed to build from source, in the order it says them."""
    names: list[str] = []
    collecting = ""
    for line in lines:
        stripped = line.strip()
        if match := COLLECTING.match(stripped):
            collecting = match["name"]
        if SOURCE_STEPS.search(stripped) and collecting:
            names.append(collecting)
        for pattern in BUILD_FAILURES:
            if match := re.search(pattern, stripped):
                names += re.split(r"[,\s]+", match["names"].strip())  # "a, b" (pip 25) or "a b" (pip 23)
    return list(dict.fromkeys(name for name in names if name))


def last_build_output(lines: list[str], count: int = 3) -> list[str]:
    """The last ``count`` lines of the last failed build's own output: its cause, usually
    (a missing library, a compiler's last error), without the lines before it."""
    blocks: list[list[str]] = []
    inside = False
    for line in lines:
        if BUILD_OUTPUT.search(line):
            blocks.append([])
            inside = True
        elif line.strip() == END_OF_OUTPUT:
            inside = False
        elif inside and line.strip():
            blocks[-1].append(line.strip())
    quoted = [block for block in blocks if block]
    return quoted[-1][-count:] if quoted else []


def conflict(lines: list[str]) -> list[str]:
    """The requirements pip says conflict ("The user requested (constraint) x==1"), if it says so."""
    stripped = [line.strip() for line in lines]
    if CONFLICT not in stripped:
        return []
    following = stripped[stripped.index(CONFLICT) + 1 :]
    return following[: following.index("")] if "" in following else following


def main(log: str, command: str) -> None:
    lines = open(log, errors="replace").read().splitlines()
    python = f"Python {sys.version_info.major}.{sys.version_info.minor}"
    errors = [line.strip() for line in lines if PIP_ERRORS.match(line)][-3:]
    built = failed_builds(lines)
    checked = lines[lines.index(PIP_CHECK_MARK) + 1 :] if PIP_CHECK_MARK in lines else []
    broken = [line.strip() for line in checked if BROKEN.match(line.strip())]
    if broken:
        errors = []  # the resolver's warnings of the same conflicts, if any: pip check's say it
        print(
            f"pip installed the packages with {python} ({command}), but pip check found some whose requirements "
            "are not met:",
            file=sys.stderr,
        )
        for line in broken[:5]:
            print(f"  {line}", file=sys.stderr)
        print(
            "Pin versions that fit together (the requirements, app_python_packages, app_constraints): the "
            "application gets a new venv for each set of packages, so nothing of this one is kept.",
            file=sys.stderr,
        )
    elif built:
        print(
            f"pip found no wheel of {', '.join(built)} for {python} ({command}) and could not build "
            f"{'it' if len(built) == 1 else 'them'} from source.\nPin a version that publishes wheels for "
            f"{python}, set app_python to an interpreter it has wheels for, or add what building it "
            "needs to app_system_packages (e.g. build-essential, python3-dev, the library's -dev package).",
            file=sys.stderr,
        )
        for line in last_build_output(lines):
            print(f"  the build said: {line}", file=sys.stderr)
    else:
        print(f"pip could not install the packages with {python} ({command}).", file=sys.stderr)
    for line in errors:
        print(f"  {line}", file=sys.stderr)
    for line in conflict(lines)[:6]:
        print(f"  the conflict: {line}", file=sys.stderr)
    print(f"pip's whole output: {log} on this host.", file=sys.stderr)


if __name__ == "__main__":
    main(*sys.argv[1:3])
